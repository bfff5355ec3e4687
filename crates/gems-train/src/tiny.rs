//! A tiny random-init model and a small slice of Amazon Scientific: the fixture of the
//! end-to-end tests and of `gems selftest` (which runs the same train-and-eval on any backend).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use gems_data::HfTokenizer;
use gems_model::{Llama, LlamaConfig, Pretrained, save_hf_dir};
use serde_json::Value;

use crate::checkpoint::write_atomic;
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};

/// Writes the first `users` users of an LC-Rec dataset (and the items they touch) to `out`,
/// keeping the source's file names and ids.
///
/// # Errors
/// Missing or malformed source files.
pub fn slice_lc_rec(src: &Path, prefix: &str, users: usize, out: &Path) -> Result<()> {
    let inter_path = src.join(format!("{prefix}.inter.json"));
    let item_path = src.join(format!("{prefix}.item.json"));
    let read = |p: &Path| -> Result<BTreeMap<String, Value>> {
        let text = std::fs::read_to_string(p).map_err(|e| TrainError::io(p, e))?;
        serde_json::from_str(&text).map_err(|e| TrainError::format(p, e.to_string()))
    };
    let inter = read(&inter_path)?;
    let items = read(&item_path)?;
    let mut keys: Vec<&String> = inter.keys().collect();
    keys.sort_by_key(|k| k.parse::<u64>().unwrap_or(u64::MAX));
    let mut kept = serde_json::Map::new();
    let mut used = BTreeSet::new();
    for k in keys.into_iter().take(users) {
        if let Some(seq) = inter[k].as_array() {
            used.extend(seq.iter().map(|v| v.to_string()));
        }
        kept.insert(k.clone(), inter[k].clone());
    }
    let item_map: serde_json::Map<String, Value> =
        items.into_iter().filter(|(k, _)| used.contains(k)).collect();
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let write = |name: String, v: Value| write_atomic(&out.join(name), v.to_string().as_bytes());
    write(format!("{prefix}.inter.json"), Value::Object(kept))?;
    Ok(write(format!("{prefix}.item.json"), Value::Object(item_map))?)
}

/// The words a tiny word-level tokenizer must know: prompt templates, item titles and
/// categories of the sliced dataset, and the first lines of general text.
fn vocabulary_text(data: &Path, prefix: &str, general: &[PathBuf]) -> Result<String> {
    let mut text = String::from(
        "Below is the user's interaction history: , . Please recommend the next item the user is \
         likely to click. The user's search query is: predict might\n",
    );
    let p = data.join(format!("{prefix}.item.json"));
    let raw = std::fs::read_to_string(&p).map_err(|e| TrainError::io(&p, e))?;
    text.push_str(&gems_data::clean_text(&raw));
    for g in general {
        let t = std::fs::read_to_string(g).map_err(|e| TrainError::io(g, e))?;
        text.extend(t.lines().take(400).map(|l| format!("{l}\n")));
    }
    Ok(text)
}

/// Writes a tiny random decoder (2 layers, width 32, tied head) with a word-level tokenizer
/// to `dir` as a Hugging Face directory.
///
/// # Errors
/// Unreadable inputs, I/O failures.
pub fn write_tiny_model(dir: &Path, vocabulary: &str, seed: u64) -> Result<()> {
    let tokenizer = HfTokenizer::word_level(vocabulary.lines())?;
    let vocab = tokenizer.inner().get_vocab_size(true);
    let config: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": vocab,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "model_type": "llama"
    }))
    .map_err(|e| TrainError::Config(format!("tiny config: {e}")))?;
    let model = Llama::init_random(&config, seed, &Device::flex())?;
    let p = Pretrained { model, tokenizer: tokenizer.inner().clone(), chat_template: None };
    save_hf_dir(&p, dir)?;
    Ok(())
}

/// Everything a tiny run needs, under `root`: `data/` (the first 120 Scientific users),
/// `model/` (a tiny random decoder), and a configuration training every task for `steps`
/// steps with small evaluations. `data_root` is the shared data directory.
///
/// # Errors
/// Missing shared data, I/O failures.
pub fn tiny_run_config(root: &Path, data_root: &Path, steps: u64) -> Result<TrainConfig> {
    let data = root.join("data");
    slice_lc_rec(&data_root.join("amazon_scientific"), "Scientific", 120, &data)?;
    let general = data_root.join("wikitext2_general_text");
    let model = root.join("model");
    if !model.join("model.safetensors").exists() {
        let words = vocabulary_text(
            &data,
            "Scientific",
            &[general.join("valid.txt"), general.join("test.txt")],
        )?;
        write_tiny_model(&model, &words, 7)?;
    }
    let mut c = TrainConfig::default();
    c.model.path = Some(model);
    c.data.dataset = data.display().to_string();
    c.data.data_root = data_root.to_path_buf();
    c.data.max_history = 8;
    c.schedule.steps = steps;
    c.schedule.batch_size = 4;
    c.schedule.lr = 5e-3;
    c.schedule.warmup_ratio = 0.0;
    c.eval.every = 3;
    c.eval.patience = 0;
    c.eval.valid_examples = 16;
    c.eval.test_examples = 32;
    c.eval.batch_size = 16;
    c.eval.perplexity_tokens = 256;
    c.eval.perplexity_window = 32;
    c.null_space.max_tokens = 512;
    c.null_space.window = 32;
    c.null_space.cache = Some(root.join("nullspace-cache"));
    c.optimizer.gems.rank = 4;
    c.optimizer.gems.update_proj_gap = 3;
    c.lora.rank = 2;
    Ok(c)
}
