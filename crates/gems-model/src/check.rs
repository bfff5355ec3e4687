//! The model check: parameter count, load time, reference cross-entropy and a greedy chat answer.
//!
//! Reference values for SmolLM2-135M-Instruct Q4_1 (computed outside this project): mean
//! next-token cross-entropy of [`REFERENCE_SENTENCE`] (19 tokens, no special tokens) about
//! 2.46 nats; the greedy answer to [`QUESTION`] under the chat template is
//! "The capital of France is Paris.".

use std::path::Path;
use std::time::Instant;

use burn::tensor::Device;

use crate::error::{ModelError, Result};
use crate::hf::{Pretrained, load_hf_dir};
use crate::llama::{Llama, TokenBatch, to_host};

/// The sentence whose mean next-token cross-entropy the check reports.
pub const REFERENCE_SENTENCE: &str =
    "The capital of France is Paris. It is known for the Eiffel Tower and its museums.";
/// The chat question whose greedy answer the check reports.
pub const QUESTION: &str = "What is the capital of France?";

/// The one-line JSON report of `gems model check`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    /// The model path.
    pub model: String,
    /// Number of parameters.
    pub parameters: usize,
    /// Seconds to load the model.
    pub load_seconds: f64,
    /// Tokens of the reference sentence.
    pub reference_tokens: usize,
    /// Mean next-token cross-entropy of the reference sentence, nats.
    pub cross_entropy: f64,
    /// The question asked.
    pub question: String,
    /// The greedy answer (special tokens removed).
    pub answer: String,
    /// Seconds spent generating the answer.
    pub answer_seconds: f64,
}

/// Loads a Hugging Face directory or a GGUF file.
pub fn load(path: &Path, device: &Device) -> Result<Pretrained> {
    if path.is_dir() { load_hf_dir(path, device) } else { crate::gguf::load_gguf(path, device) }
}

/// Mean next-token cross-entropy (nats) of `ids` under `model`.
pub fn mean_cross_entropy(model: &Llama, ids: &[u32]) -> Result<f64> {
    if ids.len() < 2 {
        return Err(ModelError::input("mean_cross_entropy", "need at least two tokens"));
    }
    let batch = TokenBatch::new(ids.to_vec(), vec![true; ids.len()], 1, ids.len())?;
    let logits = to_host(model.forward(&batch)?, "mean_cross_entropy")?;
    let v = model.config.vocab_size;
    let mut total = 0.0;
    for i in 0..ids.len() - 1 {
        let row = &logits.data[i * v..(i + 1) * v];
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        total += lse - row[ids[i + 1] as usize] as f64;
    }
    Ok(total / (ids.len() - 1) as f64)
}

/// The prompt for one user message under the model's chat template.
///
/// ChatML templates (`<|im_start|>`; SmolLM2, Qwen2) are rendered directly, including the
/// template's default system message; other models get the bare message.
pub fn chat_prompt(p: &Pretrained, user: &str) -> String {
    let Some(t) = &p.chat_template else { return user.to_string() };
    if !t.contains("<|im_start|>") {
        return user.to_string();
    }
    let t = t.replace("\\n", "\n");
    let marker = "<|im_start|>system\n";
    let system = t.find(marker).and_then(|i| {
        let rest = &t[i + marker.len()..];
        let end = rest.find("<|im_end|>")?;
        let s = &rest[..end];
        (!s.contains("{{") && !s.contains("{%")).then(|| s.to_string())
    });
    let mut out = String::new();
    if let Some(s) = system {
        out.push_str(&format!("<|im_start|>system\n{s}<|im_end|>\n"));
    }
    out.push_str(&format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"));
    out
}

/// Tokens that end a chat answer: the config's eos ids and `<|im_end|>` / `<|endoftext|>`.
pub fn stop_ids(p: &Pretrained) -> Vec<u32> {
    let mut ids = p.model.config.eos_ids();
    for s in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>"] {
        if let Some(id) = p.tokenizer.token_to_id(s) {
            ids.push(id);
        }
    }
    ids
}

/// Greedy answer to one chat message.
pub fn answer(p: &Pretrained, user: &str, max_new_tokens: usize) -> Result<String> {
    let prompt = chat_prompt(p, user);
    let enc = p.tokenizer.encode(prompt, false).map_err(|e| ModelError::tokenizer(None, e))?;
    let out = p.model.generate_greedy(enc.get_ids(), max_new_tokens, &stop_ids(p))?;
    let text = p.tokenizer.decode(&out, true).map_err(|e| ModelError::tokenizer(None, e))?;
    Ok(text.trim().to_string())
}

/// Runs the whole check on a model file or directory.
///
/// # Errors
/// The model does not load, or its loss on the reference sentence is not finite.
pub fn check(path: &Path, device: &Device) -> Result<CheckReport> {
    let t0 = Instant::now();
    let p = load(path, device)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let enc = p
        .tokenizer
        .encode(REFERENCE_SENTENCE, false)
        .map_err(|e| ModelError::tokenizer(None, e))?;
    let ids = enc.get_ids().to_vec();
    let cross_entropy = mean_cross_entropy(&p.model, &ids)?;
    if !cross_entropy.is_finite() {
        return Err(ModelError::format(
            path,
            None,
            format!(
                "the reference sentence's mean cross-entropy is {cross_entropy}: the weights \
                 hold non-finite values (a damaged or diverged model)"
            ),
        ));
    }
    let t1 = Instant::now();
    let answer = answer(&p, QUESTION, 48)?;
    Ok(CheckReport {
        model: path.display().to_string(),
        parameters: p.model.num_params(),
        load_seconds,
        reference_tokens: ids.len(),
        cross_entropy,
        question: QUESTION.to_string(),
        answer,
        answer_seconds: t1.elapsed().as_secs_f64(),
    })
}
