//! `gems-model`: pretrained Llama-family decoders on Burn, loaded from real files.
//!
//! - [`llama`]: the decoder (Llama 2/3, SmolLM2, Qwen2) and its forward API: hidden states,
//!   logits only at chosen positions, candidate log-probabilities, greedy decoding with a
//!   key/value cache.
//! - [`config`]: Hugging Face `config.json`.
//! - [`weights`]: host tensors and the safetensors reader/writer.
//! - [`hf`]: Hugging Face directories, load and save.
//! - [`gguf`]: GGUF v3 files: metadata, dequantization, tokenizer.
//! - [`items`]: `<item_ID>` tokens added to tokenizer, embedding and head.
//! - [`kernels`]: fused CPU kernels for graph-free passes (bit-identical to the Burn ops).
//! - [`lora`]: LoRA adapters, merge, PEFT save/load.
//! - [`fetch`]: where SmolLM2-135M-Instruct is cached and its checksums (`gems model fetch`
//!   downloads it; this crate never runs a process).
//! - [`check`]: reference cross-entropy and a greedy chat answer.
//!
//! This crate never reads datasets and never changes gradients; it depends on Burn and external
//! crates only. Every file error names the file and key.

pub mod check;
pub mod config;
pub mod error;
pub mod fetch;
pub mod gguf;
pub mod hf;
pub mod items;
pub mod kernels;
pub mod llama;
pub mod lora;
pub mod weights;

pub use config::{LlamaConfig, ModelType, RopeType, TokenIds};
pub use error::{ModelError, Result};
pub use gguf::{GgufFile, load_gguf};
pub use hf::{Pretrained, load_hf_dir, save_hf_dir};
pub use items::{ItemInit, ItemSpec, add_items, add_to_item_rows, item_row_norm};
pub use llama::{KvCache, Llama, TokenBatch};
pub use lora::{
    LoraConfig, OneOrMany, TargetModules, TokenIndices, apply_lora, load_peft, merge_lora,
    read_adapter_config, save_peft, write_adapter_config,
};
pub use weights::{HostTensor, WeightMap};
