//! LoRA adapters on chosen linear layers, merging, and the PEFT file layout.
//!
//! An adapter adds `scale * (x A) B` to a projection, `scale = lora_alpha / r`, with `A`
//! initialised like PEFT (Kaiming-uniform, here seeded) and `B = 0`, so a fresh adapter does not
//! change the model. Targets are matched against module paths such as
//! `layers.3.self_attn.q_proj`: an entry matches a path equal to it or ending in `.` + entry
//! (PEFT's `target_modules` semantics for plain names).
//!
//! PEFT layout: `adapter_config.json` (`peft_type = LORA`, `r`, `lora_alpha`,
//! `target_modules`, ...) and `adapter_model.safetensors` with keys
//! `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (`[r, d_in]`) and
//! `...lora_B.weight` (`[d_out, r]`), PyTorch layout. With `modules_to_save` holding
//! `embed_tokens` / `lm_head`, their full tables are saved under PEFT's
//! `base_model.model.model.embed_tokens.weight` / `base_model.model.lm_head.weight` keys, which is
//! how trained item embeddings travel with the adapter.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::llama::{Llama, LoraAdapter, Rng, tensor2, to_host};
use crate::weights::{HostTensor, WeightMap, write_safetensors};

/// LoRA settings, serialised as PEFT's `adapter_config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Always `LORA`.
    #[serde(default = "lora_type")]
    pub peft_type: String,
    /// Always `CAUSAL_LM`.
    #[serde(default = "task_type")]
    pub task_type: String,
    /// Rank.
    pub r: usize,
    /// Scale numerator: the adapter is scaled by `lora_alpha / r`.
    pub lora_alpha: f64,
    /// Module names or path suffixes to adapt, e.g. `["q_proj", "v_proj"]`.
    pub target_modules: Vec<String>,
    /// Dropout (recorded for PEFT; not applied here).
    #[serde(default)]
    pub lora_dropout: f64,
    /// Bias handling; only `none`.
    #[serde(default = "bias_none")]
    pub bias: String,
    /// Whole modules trained and saved alongside (`embed_tokens`, `lm_head` for item tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// The base model's name or path, for PEFT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_name_or_path: Option<String>,
    /// Seed of the `A` initialisation (not a PEFT field; ignored by PEFT).
    #[serde(default)]
    pub init_seed: u64,
}

fn lora_type() -> String {
    "LORA".into()
}
fn task_type() -> String {
    "CAUSAL_LM".into()
}
fn bias_none() -> String {
    "none".into()
}

impl LoraConfig {
    /// A configuration with PEFT defaults for the other fields.
    pub fn new(r: usize, lora_alpha: f64, target_modules: &[&str]) -> Self {
        Self {
            peft_type: lora_type(),
            task_type: task_type(),
            r,
            lora_alpha,
            target_modules: target_modules.iter().map(|s| s.to_string()).collect(),
            lora_dropout: 0.0,
            bias: bias_none(),
            modules_to_save: None,
            base_model_name_or_path: None,
            init_seed: 0,
        }
    }

    fn matches(&self, path: &str) -> bool {
        self.target_modules.iter().any(|t| path == t || path.ends_with(&format!(".{t}")))
    }
}

/// Attaches fresh adapters to every matching projection; returns how many were attached.
///
/// When `freeze_base` is true, every existing parameter stops requiring gradients except
/// `embed_tokens` and `lm_head` when listed in `modules_to_save` (item embeddings train
/// alongside the adapters); the adapters require gradients.
pub fn apply_lora(model: Llama, cfg: &LoraConfig, freeze_base: bool) -> Result<(Llama, usize)> {
    let op = "apply_lora";
    if cfg.r == 0 {
        return Err(ModelError::input(op, "rank r must be positive"));
    }
    if cfg.target_modules.is_empty() {
        return Err(ModelError::input(op, "no target_modules"));
    }
    let mut model = if freeze_base { model.no_grad() } else { model };
    if freeze_base {
        let save = cfg.modules_to_save.clone().unwrap_or_default();
        if save.iter().any(|s| s == "embed_tokens") {
            model.embed_tokens.weight = model.embed_tokens.weight.set_require_grad(true);
        }
        if save.iter().any(|s| s == "lm_head")
            && let Some(h) = model.lm_head.as_mut()
        {
            h.weight = h.weight.clone().set_require_grad(true);
        }
    }
    let device = model.device();
    let mut rng = Rng::new(cfg.init_seed);
    let scale = cfg.lora_alpha / cfg.r as f64;
    let mut n = 0;
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for (name, lin) in layer.projections_mut() {
            if !cfg.matches(&format!("layers.{i}.{name}")) {
                continue;
            }
            let [d_in, d_out] = lin.weight.dims();
            // PEFT: kaiming_uniform_(a = sqrt(5)) on [r, d_in] gives U(-1/sqrt(d_in), 1/sqrt(d_in)).
            let bound = 1.0 / (d_in as f64).sqrt();
            let a: Vec<f32> =
                (0..d_in * cfg.r).map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32).collect();
            lin.lora = Some(LoraAdapter {
                lora_a: Param::from_tensor(Tensor::from_data(
                    TensorData::new(a, [d_in, cfg.r]),
                    &device,
                )),
                lora_b: Param::from_tensor(Tensor::zeros([cfg.r, d_out], &device)),
                scale,
            });
            n += 1;
        }
    }
    if n == 0 {
        return Err(ModelError::input(
            op,
            format!("no projection matches {:?}", cfg.target_modules),
        ));
    }
    Ok((model, n))
}

/// Folds every adapter into its base weight (`W += scale * A B`) and removes it.
pub fn merge_lora(mut model: Llama) -> Llama {
    for layer in model.layers.iter_mut() {
        for (_, lin) in layer.projections_mut() {
            if let Some(l) = lin.lora.take() {
                let delta = l.lora_a.val().matmul(l.lora_b.val()).mul_scalar(l.scale);
                lin.weight = Param::from_tensor(lin.weight.val() + delta);
            }
        }
    }
    model
}

/// Saves the adapters (and `modules_to_save`) in the PEFT layout under `dir`.
pub fn save_peft(model: &Llama, cfg: &LoraConfig, dir: &Path) -> Result<()> {
    let op = "save_peft";
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut tensors = BTreeMap::new();
    for (i, layer) in model.layers.iter().enumerate() {
        for (name, lin) in layer.projections() {
            if let Some(l) = &lin.lora {
                let p = format!("base_model.model.model.layers.{i}.{name}");
                tensors.insert(
                    format!("{p}.lora_A.weight"),
                    to_host(l.lora_a.val(), op)?.transposed(),
                );
                tensors.insert(
                    format!("{p}.lora_B.weight"),
                    to_host(l.lora_b.val(), op)?.transposed(),
                );
            }
        }
    }
    let save = cfg.modules_to_save.clone().unwrap_or_default();
    if save.iter().any(|s| s == "embed_tokens") {
        tensors.insert(
            "base_model.model.model.embed_tokens.weight".into(),
            to_host(model.embed_tokens.weight.val(), op)?,
        );
    }
    if save.iter().any(|s| s == "lm_head")
        && let Some(h) = &model.lm_head
    {
        tensors.insert(
            "base_model.model.lm_head.weight".into(),
            to_host(h.weight.val(), op)?.transposed(),
        );
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, &meta)?;
    let path = dir.join("adapter_config.json");
    let text =
        serde_json::to_string_pretty(cfg).map_err(|e| ModelError::config(&path, e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))
}

/// Loads a PEFT adapter directory onto `model` (whose vocabulary must already include any items
/// the adapter was trained with); returns the model and the adapter's configuration.
pub fn load_peft(model: Llama, dir: &Path) -> Result<(Llama, LoraConfig)> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let cfg: LoraConfig =
        serde_json::from_str(&text).map_err(|e| ModelError::config(&cfg_path, e.to_string()))?;
    if cfg.peft_type != "LORA" {
        return Err(ModelError::config(
            &cfg_path,
            format!("peft_type {} (only LORA)", cfg.peft_type),
        ));
    }
    if cfg.r == 0 {
        return Err(ModelError::config(&cfg_path, "r must be positive"));
    }
    let file = dir.join("adapter_model.safetensors");
    let mut w = WeightMap::new(&file);
    w.read_safetensors(&file)?;
    let mut model = model;
    let device = model.device();
    let scale = cfg.lora_alpha / cfg.r as f64;
    let mut n = 0;
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for (name, lin) in layer.projections_mut() {
            let p = format!("base_model.model.model.layers.{i}.{name}");
            let ka = format!("{p}.lora_A.weight");
            if !w.tensors.contains_key(&ka) {
                continue;
            }
            let [d_in, d_out] = lin.weight.dims();
            let a = w.take(&ka, &[cfg.r, d_in])?.transposed();
            let b = w.take(&format!("{p}.lora_B.weight"), &[d_out, cfg.r])?.transposed();
            lin.lora = Some(LoraAdapter {
                lora_a: Param::from_tensor(tensor2(a, &device)),
                lora_b: Param::from_tensor(tensor2(b, &device)),
                scale,
            });
            n += 1;
        }
    }
    let d = model.config.hidden_size;
    let v = model.embed_tokens.weight.dims()[0];
    if w.tensors.contains_key("base_model.model.model.embed_tokens.weight") {
        let t = w.take("base_model.model.model.embed_tokens.weight", &[v, d])?;
        model.embed_tokens.weight = Param::from_tensor(tensor2(t, &device));
    }
    if w.tensors.contains_key("base_model.model.lm_head.weight")
        && let Some(h) = model.lm_head.as_mut()
    {
        let t: HostTensor = w.take("base_model.model.lm_head.weight", &[v, d])?.transposed();
        h.weight = Param::from_tensor(tensor2(t, &device));
    }
    if n == 0 {
        return Err(ModelError::format(
            &file,
            None,
            "no lora_A/lora_B tensor matches the model's layers",
        ));
    }
    if let Some(k) = w.tensors.keys().next() {
        return Err(ModelError::format(
            &file,
            Some(k),
            "tensor not used by the model (wrong base model?)",
        ));
    }
    Ok((model, cfg))
}

/// Number of parameters that currently require gradients.
pub fn trainable_params(model: &Llama) -> usize {
    struct Count(usize);
    impl burn::module::ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.is_require_grad() {
                self.0 += param.shape().num_elements();
            }
        }
    }
    let mut c = Count(0);
    model.visit(&mut c);
    c.0
}
