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
use crate::llama::{Llama, LoraAdapter, init_rng, layer_prefix, tensor2, to_host};
use crate::weights::{HostTensor, WeightMap, write_safetensors};

/// LoRA settings, serialised as PEFT's `adapter_config.json` (peft 0.21 field names).
///
/// Unknown fields of a third-party file are ignored; fields that change what the adapter
/// computes and are not implemented here (`use_dora`, `fan_in_fan_out`, per-module
/// `rank_pattern`/`alpha_pattern`) are rejected by [`load_peft`] with the field named.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Always `LORA`.
    #[serde(default = "lora_type")]
    pub peft_type: String,
    /// `CAUSAL_LM` when written here; peft may write `null`.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Rank.
    pub r: usize,
    /// Scale numerator: the adapter is scaled by `lora_alpha / r` (`lora_alpha / sqrt(r)` with
    /// `use_rslora`).
    pub lora_alpha: f64,
    /// Module names or path suffixes to adapt, e.g. `["q_proj", "v_proj"]`, or PEFT's
    /// `"all-linear"`.
    pub target_modules: TargetModules,
    /// Dropout (recorded for PEFT; not applied here).
    #[serde(default)]
    pub lora_dropout: f64,
    /// Bias handling; only `none`.
    #[serde(default = "bias_none")]
    pub bias: String,
    /// Rank-stabilised scaling `lora_alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (not implemented; rejected on load when true).
    #[serde(default)]
    pub use_dora: bool,
    /// Conv1D-style transposed weights (not used by Llama; rejected on load when true).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Per-module ranks (not implemented; rejected on load when not empty).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    /// Per-module alphas (not implemented; rejected on load when not empty).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    /// Whole modules trained and saved alongside (`embed_tokens`, and `lm_head` when the head
    /// is not tied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// PEFT's trainable tokens: rows of the embedding (and of a tied head) trained and saved
    /// alone. Read from third-party adapters; the trainer saves whole tables instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_token_indices: Option<TokenIndices>,
    /// Whether a tied output head follows the saved embedding (PEFT ties the `lm_head` copy
    /// in `modules_to_save` to the `embed_tokens` copy).
    #[serde(default)]
    pub ensure_weight_tying: bool,
    /// The decoder layers that carry adapters (PEFT's `layers_to_transform`); every layer when
    /// absent. The trainer writes it whenever only the top layers are tuned, so that PEFT
    /// attaches adapters to those layers alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<OneOrMany<usize>>,
    /// The name of the layer list in module paths (`layers`), written with
    /// `layers_to_transform`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_pattern: Option<OneOrMany<String>>,
    /// The base model the adapter applies to: `gems export --adapter` writes it beside the
    /// adapter and records its absolute path here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_name_or_path: Option<String>,
    /// Seed of the `A` initialisation. Not a PEFT field, so never written: the run's
    /// `config.json` records the seed.
    #[serde(skip)]
    pub init_seed: u64,
}

/// PEFT's `target_modules`: a list of names, or one string (`"all-linear"` or a regular
/// expression, which [`apply_lora`] does not implement).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names or path suffixes.
    List(Vec<String>),
    /// `"all-linear"` or a regular expression.
    Pattern(String),
}

/// A PEFT field that holds one value or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// One value.
    One(T),
    /// A list.
    Many(Vec<T>),
}

impl<T: PartialEq> OneOrMany<T> {
    /// Whether `value` is the one value or in the list.
    pub fn contains(&self, value: &T) -> bool {
        match self {
            Self::One(v) => v == value,
            Self::Many(vs) => vs.contains(value),
        }
    }
}

/// PEFT's `trainable_token_indices`: indices of the input embedding, or indices per layer name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIndices {
    /// Rows of the input embedding.
    Embedding(Vec<u32>),
    /// Rows per layer (`embed_tokens`, `lm_head`).
    PerLayer(BTreeMap<String, Vec<u32>>),
}

impl TokenIndices {
    fn for_layer(&self, layer: &str) -> Option<&[u32]> {
        match self {
            Self::Embedding(v) => (layer == "embed_tokens").then_some(v.as_slice()),
            Self::PerLayer(m) => m
                .iter()
                .find(|(k, _)| k.rsplit('.').next() == Some(layer))
                .map(|(_, v)| v.as_slice()),
        }
    }
}

fn lora_type() -> String {
    "LORA".into()
}
fn bias_none() -> String {
    "none".into()
}

impl LoraConfig {
    /// A configuration with PEFT defaults for the other fields.
    pub fn new(r: usize, lora_alpha: f64, target_modules: &[&str]) -> Self {
        Self {
            peft_type: lora_type(),
            task_type: Some("CAUSAL_LM".into()),
            r,
            lora_alpha,
            target_modules: TargetModules::List(
                target_modules.iter().map(|s| s.to_string()).collect(),
            ),
            lora_dropout: 0.0,
            bias: bias_none(),
            use_rslora: false,
            use_dora: false,
            fan_in_fan_out: false,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            modules_to_save: None,
            trainable_token_indices: None,
            ensure_weight_tying: false,
            layers_to_transform: None,
            layers_pattern: None,
            base_model_name_or_path: None,
            init_seed: 0,
        }
    }

    /// The configuration the trainer saves: whole `embed_tokens` (item rows live there), and
    /// for a tied model the head declared tied to it, so that PEFT rebuilds the tie on load;
    /// an untied head is saved as a module of its own.
    pub fn with_embeddings(mut self, tied_head: bool) -> Self {
        let mut save = vec!["embed_tokens".to_string()];
        if !tied_head {
            save.push("lm_head".into());
        }
        self.modules_to_save = Some(save);
        self.ensure_weight_tying = tied_head;
        self
    }

    /// Adapters on the decoder layers `layers` only (PEFT's `layers_to_transform`, with
    /// `layers_pattern = "layers"`).
    pub fn on_layers(mut self, layers: impl IntoIterator<Item = usize>) -> Self {
        self.layers_to_transform = Some(OneOrMany::Many(layers.into_iter().collect()));
        self.layers_pattern = Some(OneOrMany::One("layers".into()));
        self
    }

    /// The factor applied to `x A B`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    fn saves(&self, module: &str) -> bool {
        self.modules_to_save.as_deref().unwrap_or_default().iter().any(|s| s == module)
    }

    fn matches(&self, path: &str) -> Result<bool> {
        match &self.target_modules {
            TargetModules::List(l) => {
                Ok(l.iter().any(|t| path == t || path.ends_with(&format!(".{t}"))))
            }
            TargetModules::Pattern(p) if p == "all-linear" => Ok(true),
            TargetModules::Pattern(p) => Err(ModelError::input(
                "apply_lora",
                format!(
                    "target_modules as a regular expression ({p:?}) is not supported; list the module names"
                ),
            )),
        }
    }

    fn is_empty(&self) -> bool {
        matches!(&self.target_modules, TargetModules::List(l) if l.is_empty())
    }

    /// Rejects the PEFT options this implementation does not compute; `path` labels the error.
    fn check_supported(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, why: &str| Err(ModelError::config(path, format!("{field}: {why}")));
        if self.peft_type != "LORA" {
            return bad("peft_type", &format!("{} (only LORA)", self.peft_type));
        }
        if self.r == 0 {
            return bad("r", "must be positive");
        }
        if self.use_dora {
            return bad("use_dora", "DoRA adapters are not supported");
        }
        if self.fan_in_fan_out {
            return bad("fan_in_fan_out", "true is for Conv1D models, not Llama");
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return bad("rank_pattern/alpha_pattern", "per-module ranks are not supported");
        }
        if self.bias != "none" {
            return bad("bias", &format!("{} (only none)", self.bias));
        }
        Ok(())
    }
}

/// Attaches fresh adapters to every matching projection; returns how many were attached.
/// Layers frozen by [`Llama::freeze_lower_layers`], and layers not in
/// `cfg.layers_to_transform` when it is set, get none.
///
/// When `freeze_base` is true, every existing parameter stops requiring gradients except
/// `embed_tokens` and `lm_head` when listed in `modules_to_save` (item embeddings train
/// alongside the adapters); the adapters require gradients.
pub fn apply_lora(model: Llama, cfg: &LoraConfig, freeze_base: bool) -> Result<(Llama, usize)> {
    let op = "apply_lora";
    if cfg.r == 0 {
        return Err(ModelError::input(op, "rank r must be positive"));
    }
    if cfg.is_empty() {
        return Err(ModelError::input(op, "no target_modules"));
    }
    if !(cfg.lora_alpha.is_finite() && cfg.lora_alpha > 0.0) {
        return Err(ModelError::input(
            op,
            format!("lora_alpha must be finite and > 0, got {}", cfg.lora_alpha),
        ));
    }
    let mut model = if freeze_base { model.no_grad() } else { model };
    if freeze_base {
        if cfg.saves("embed_tokens") {
            model.embed_tokens.weight = model.embed_tokens.weight.set_require_grad(true);
        }
        if cfg.saves("lm_head")
            && let Some(h) = model.lm_head.as_mut()
        {
            h.weight = h.weight.clone().set_require_grad(true);
        }
    }
    let device = model.device();
    let mut rng = init_rng(cfg.init_seed);
    let scale = cfg.scale();
    let mut n = 0;
    let frozen = model.frozen_layers;
    for (i, layer) in model.layers.iter_mut().enumerate().skip(frozen) {
        if cfg.layers_to_transform.as_ref().is_some_and(|l| !l.contains(&i)) {
            continue;
        }
        for (name, lin) in layer.projections_mut() {
            if !cfg.matches(&format!("layers.{i}.{name}"))? {
                continue;
            }
            let [d_in, d_out] = lin.weight.dims();
            if cfg.r > d_in.min(d_out) {
                return Err(ModelError::input(
                    op,
                    format!(
                        "rank r = {} exceeds the smaller side of layers.{i}.{name} ({d_in} x \
                         {d_out}): an update of that matrix has rank at most {}",
                        cfg.r,
                        d_in.min(d_out)
                    ),
                ));
            }
            // PEFT: kaiming_uniform_(a = sqrt(5)) on [r, d_in] gives U(-1/sqrt(d_in), 1/sqrt(d_in)).
            let bound = 1.0 / (d_in as f64).sqrt();
            let a: Vec<f32> = (0..d_in * cfg.r)
                .map(|_| ((2.0 * rng.next_open01() - 1.0) * bound) as f32)
                .collect();
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

/// PEFT's key of a module saved whole (`modules_to_save`), Hugging Face layout `[vocab, d]`.
const EMBED_KEY: &str = "base_model.model.model.embed_tokens.weight";
const HEAD_KEY: &str = "base_model.model.lm_head.weight";
/// PEFT's keys of trainable-token rows (`trainable_token_indices`).
const EMBED_TOKENS_KEY: &str =
    "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";
const HEAD_TOKENS_KEY: &str = "base_model.model.lm_head.token_adapter.trainable_tokens_delta";

fn lora_prefix(layer: usize, name: &str) -> String {
    format!("base_model.model.{}.{name}", layer_prefix(layer))
}

/// Saves the adapters (and `modules_to_save`) in the PEFT layout under `dir`.
///
/// A tied model (no separate head) with `embed_tokens` in `modules_to_save` also gets the
/// table under the `lm_head` key, which PEFT reads when `ensure_weight_tying` is set: loaded
/// with `PeftModel.from_pretrained`, the head then uses the trained table, not the base's.
pub fn save_peft(model: &Llama, cfg: &LoraConfig, dir: &Path) -> Result<()> {
    let op = "save_peft";
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut tensors = BTreeMap::new();
    for (i, layer) in model.layers.iter().enumerate() {
        for (name, lin) in layer.projections() {
            if let Some(l) = &lin.lora {
                let p = lora_prefix(i, name);
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
    if cfg.saves("embed_tokens") {
        let table = to_host(model.embed_tokens.weight.val(), op)?;
        if model.lm_head.is_none() && cfg.ensure_weight_tying {
            tensors.insert(HEAD_KEY.into(), table.clone());
        }
        tensors.insert(EMBED_KEY.into(), table);
    }
    if cfg.saves("lm_head")
        && let Some(h) = &model.lm_head
    {
        tensors.insert(HEAD_KEY.into(), to_host(h.weight.val(), op)?.transposed());
    }
    crate::hf::check_finite(&tensors, dir)?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, &meta)?;
    write_adapter_config(cfg, &dir.join("adapter_config.json"))
}

/// Writes `cfg` as `adapter_config.json`.
pub fn write_adapter_config(cfg: &LoraConfig, path: &Path) -> Result<()> {
    let text =
        serde_json::to_string_pretty(cfg).map_err(|e| ModelError::config(path, e.to_string()))?;
    crate::error::write_file(path, text.as_ref())
}

/// Reads and checks `adapter_config.json`.
pub fn read_adapter_config(path: &Path) -> Result<LoraConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let cfg: LoraConfig =
        serde_json::from_str(&text).map_err(|e| ModelError::config(path, e.to_string()))?;
    cfg.check_supported(path)?;
    Ok(cfg)
}

/// Loads a PEFT adapter directory onto `model` (whose vocabulary must already include any items
/// the adapter was trained with); returns the model and the adapter's configuration.
///
/// Reads LoRA pairs on any decoder projection, whole tables saved through `modules_to_save`
/// (`embed_tokens`, `lm_head`) and rows saved through `trainable_token_indices`. A tied model
/// takes its head from the embedding, so a saved `lm_head` table must equal the saved
/// `embed_tokens` table. Every tensor in the file must be used.
pub fn load_peft(model: Llama, dir: &Path) -> Result<(Llama, LoraConfig)> {
    let cfg = read_adapter_config(&dir.join("adapter_config.json"))?;
    let file = dir.join("adapter_model.safetensors");
    let mut w = WeightMap::new(&file);
    w.read_safetensors(&file)?;
    let mut model = model;
    let device = model.device();
    let scale = cfg.scale();
    let mut n = 0;
    for (i, layer) in model.layers.iter_mut().enumerate() {
        for (name, lin) in layer.projections_mut() {
            let p = lora_prefix(i, name);
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
    load_tables(&mut model, &mut w, &cfg, &file)?;
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

/// The embedding and head parts of an adapter: whole tables, then trainable-token rows.
fn load_tables(model: &mut Llama, w: &mut WeightMap, cfg: &LoraConfig, file: &Path) -> Result<()> {
    let device = model.device();
    let d = model.config.hidden_size;
    let v = model.embed_tokens.weight.dims()[0];
    let embed =
        if w.tensors.contains_key(EMBED_KEY) { Some(w.take(EMBED_KEY, &[v, d])?) } else { None };
    let head =
        if w.tensors.contains_key(HEAD_KEY) { Some(w.take(HEAD_KEY, &[v, d])?) } else { None };
    match (&mut model.lm_head, head) {
        (Some(h), Some(t)) => h.weight = Param::from_tensor(tensor2(t.transposed(), &device)),
        (None, Some(t)) => {
            let same = embed.as_ref().is_some_and(|e| e.data == t.data);
            if !same {
                return Err(ModelError::format(
                    file,
                    Some(HEAD_KEY),
                    "the base model ties its head to the embedding, but this lm_head differs \
                     from the saved embed_tokens (an adapter for an untied model?)",
                ));
            }
        }
        (_, None) => {}
    }
    if let Some(t) = embed {
        model.embed_tokens.weight = Param::from_tensor(tensor2(t, &device));
    }
    let Some(indices) = &cfg.trainable_token_indices else { return Ok(()) };
    if let Some(rows) = indices.for_layer("embed_tokens") {
        let delta = w.take(EMBED_TOKENS_KEY, &[rows.len(), d])?;
        let table = to_host(model.embed_tokens.weight.val(), "load_peft")?;
        let table = copy_rows(table, rows, &delta, file, EMBED_TOKENS_KEY)?;
        model.embed_tokens.weight = Param::from_tensor(tensor2(table, &device));
    }
    if w.tensors.contains_key(HEAD_TOKENS_KEY) {
        let Some(h) = model.lm_head.as_mut() else {
            return Err(ModelError::format(
                file,
                Some(HEAD_TOKENS_KEY),
                "rows for a separate lm_head, but the base model ties its head",
            ));
        };
        let rows = indices
            .for_layer("lm_head")
            .or_else(|| indices.for_layer("embed_tokens"))
            .unwrap_or_default();
        let delta = w.take(HEAD_TOKENS_KEY, &[rows.len(), d])?;
        let table = to_host(h.weight.val(), "load_peft")?.transposed();
        let table = copy_rows(table, rows, &delta, file, HEAD_TOKENS_KEY)?;
        h.weight = Param::from_tensor(tensor2(table.transposed(), &device));
    }
    Ok(())
}

/// Writes `rows[i]` of `table` (`[vocab, d]`) from row `i` of `values`, as PEFT's
/// `index_copy` does.
fn copy_rows(
    mut table: HostTensor,
    rows: &[u32],
    values: &HostTensor,
    file: &Path,
    key: &str,
) -> Result<HostTensor> {
    let (v, d) = (table.shape[0], table.shape[1]);
    for (i, &r) in rows.iter().enumerate() {
        let r = r as usize;
        if r >= v {
            return Err(ModelError::format(
                file,
                Some(key),
                format!("token index {r} is outside the vocabulary of {v}"),
            ));
        }
        table.data[r * d..(r + 1) * d].copy_from_slice(&values.data[i * d..(i + 1) * d]);
    }
    Ok(table)
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
