//! Hugging Face directories: `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`) and `tokenizer.json`; loading and saving.
//!
//! Weights in F16/BF16 are cast to f32 on read. A saved directory holds f32 safetensors, the
//! configuration (with the grown `vocab_size` when items were added) and the tokenizer, and opens
//! in `transformers` as is.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Device;
use tokenizers::Tokenizer;

use crate::config::{LlamaConfig, ModelType, TokenIds};
use crate::error::{ModelError, Result};
use crate::llama::Llama;
use crate::weights::{WeightMap, write_safetensors};

/// A decoder with its configuration and tokenizer.
#[derive(Debug)]
pub struct Pretrained {
    /// The decoder (its `config` field is the configuration).
    pub model: Llama,
    /// The tokenizer, including any added item tokens.
    pub tokenizer: Tokenizer,
    /// Jinja chat template, when the source declares one.
    pub chat_template: Option<String>,
}

/// Reads the weights of a Hugging Face directory (single file or shards).
pub fn read_hf_weights(dir: &Path) -> Result<WeightMap> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let mut w = WeightMap::new(dir);
    if single.exists() {
        w.read_safetensors(&single)?;
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::format(&index, None, e.to_string()))?;
        let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| {
            ModelError::format(&index, Some("weight_map"), "missing or not an object")
        })?;
        let mut files: Vec<String> = Vec::new();
        for (key, f) in map {
            let f = f.as_str().ok_or_else(|| {
                ModelError::format(&index, Some(key), "shard name is not a string")
            })?;
            if f.contains('/') || f.contains('\\') || f.contains("..") {
                return Err(ModelError::format(
                    &index,
                    Some(key),
                    format!("shard name `{f}` is not a plain file name"),
                ));
            }
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
        }
        for f in files {
            w.read_safetensors(&dir.join(f))?;
        }
        // A key the index promises but no shard holds is a missing tensor.
        if let Some(k) = map.keys().find(|k| !w.tensors.contains_key(*k)) {
            return Err(ModelError::MissingTensor { path: index.clone(), key: k.clone() });
        }
    } else {
        return Err(ModelError::io(
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "neither model.safetensors nor model.safetensors.index.json exists",
            ),
        ));
    }
    w.source = dir.to_path_buf();
    Ok(w)
}

/// Loads a Hugging Face directory onto `device`.
pub fn load_hf_dir(dir: &Path, device: &Device) -> Result<Pretrained> {
    let config = LlamaConfig::from_file(&dir.join("config.json"))?;
    let mut w = read_hf_weights(dir)?;
    let model = Llama::from_weights(&config, &mut w, device)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer =
        Tokenizer::from_file(&tok_path).map_err(|e| ModelError::tokenizer(Some(&tok_path), e))?;
    // A token id past the embedding would fail at the first forward pass, naming no file.
    let (tokens, rows) = (tokenizer.get_vocab_size(true), model.embed_tokens.weight.dims()[0]);
    if tokens > rows {
        return Err(ModelError::tokenizer(
            Some(&tok_path),
            format!(
                "it has {tokens} tokens but the model's embedding has {rows} rows (config.json \
                 vocab_size): ids {rows} and up would have no row"
            ),
        ));
    }
    let chat_template = read_chat_template(dir);
    Ok(Pretrained { model, tokenizer, chat_template })
}

fn read_chat_template(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("chat_template")?.as_str().map(str::to_string)
}

/// Saves `p` as a Hugging Face directory (f32 `model.safetensors`, `config.json`,
/// `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` naming the
/// beginning, end and padding tokens and left padding, `generation_config.json`).
///
/// LoRA adapters still attached are not saved here: merge them first.
pub fn save_hf_dir(p: &Pretrained, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut config = p.model.config.clone();
    config.vocab_size = p.model.embed_tokens.weight.dims()[0];
    config.extra.insert("architectures".into(), serde_json::json!([arch_name(&config)]));
    config.extra.insert("torch_dtype".into(), serde_json::json!("float32"));
    config.to_file(&dir.join("config.json"))?;
    let w = p.model.to_weights()?;
    check_finite(&w.tensors, dir)?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    write_safetensors(&dir.join("model.safetensors"), &w.tensors, &meta)?;
    let tok = dir.join("tokenizer.json");
    p.tokenizer.save(&tok, false).map_err(|e| ModelError::tokenizer(Some(&tok), e))?;
    let special = special_tokens(&config, &p.tokenizer);
    let mut tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
        // Batched generation with a decoder-only model needs the padding on the left (the
        // last position of every row is then a real token); transformers warns otherwise.
        "padding_side": "left",
    });
    for (k, v) in &special {
        tc[k] = serde_json::json!(v);
    }
    if let Some(t) = &p.chat_template {
        tc["chat_template"] = serde_json::json!(t);
    }
    write_json(&dir.join("tokenizer_config.json"), &tc)?;
    write_json(&dir.join("special_tokens_map.json"), &serde_json::json!(special))?;
    let mut gc = serde_json::json!({});
    let json = |ids: &TokenIds| serde_json::to_value(ids).unwrap_or_default();
    if let Some(b) = &config.bos_token_id {
        gc["bos_token_id"] = json(b);
    }
    if let Some(e) = &config.eos_token_id {
        gc["eos_token_id"] = json(e);
    }
    if let Some(pad) =
        config.pad_token_id.as_ref().map(json).or_else(|| first_eos(&config).map(Into::into))
    {
        gc["pad_token_id"] = pad;
    }
    write_json(&dir.join("generation_config.json"), &gc)
}

/// Refuses to write weights holding NaN or infinity: a diverged model must never replace a good
/// one on disk. The error names the tensor.
pub(crate) fn check_finite(
    tensors: &BTreeMap<String, crate::weights::HostTensor>,
    dir: &Path,
) -> Result<()> {
    for (key, t) in tensors {
        if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::input(
                "save",
                format!(
                    "tensor `{key}` holds a non-finite value ({} at index {i}); refusing to write \
                     {}",
                    t.data[i],
                    dir.display()
                ),
            ));
        }
    }
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| ModelError::config(path, e.to_string()))?;
    crate::error::write_file(path, text.as_ref())
}

fn first_eos(config: &LlamaConfig) -> Option<u32> {
    config.eos_ids().first().copied()
}

/// The special tokens as `transformers` reads them from `tokenizer_config.json` and
/// `special_tokens_map.json`: `bos_token`, `eos_token` and `pad_token` as token strings, taken
/// from the configuration's ids (the first id when `eos_token_id` is a list). A model without a
/// padding id pads with its end-of-sequence token, as SmolLM2's own tokenizer does. Ids that
/// the tokenizer does not know are left out rather than written as a wrong string.
pub fn special_tokens(config: &LlamaConfig, tokenizer: &Tokenizer) -> BTreeMap<String, String> {
    let first = |v: Option<&TokenIds>| v.and_then(TokenIds::first);
    let bos = first(config.bos_token_id.as_ref());
    let eos = first_eos(config);
    let pad = first(config.pad_token_id.as_ref()).or(eos);
    let mut out = BTreeMap::new();
    for (name, id) in [("bos_token", bos), ("eos_token", eos), ("pad_token", pad)] {
        if let Some(token) = id.and_then(|i| tokenizer.id_to_token(i)) {
            out.insert(name.to_string(), token);
        }
    }
    out
}

fn arch_name(c: &LlamaConfig) -> &'static str {
    match c.model_type {
        ModelType::Llama => "LlamaForCausalLM",
        ModelType::Qwen2 => "Qwen2ForCausalLM",
    }
}
