//! Exports of a finished run: the merged model, or the PEFT adapter with the base it applies to.
//!
//! Both are written beside the target and renamed into place ([`replace_dir`]), so an
//! interrupted export never leaves a mix of two exports.

use std::path::{Path, PathBuf};

use crate::checkpoint::{replace_dir, resolve_dir};
use crate::error::{Result, TrainError};
use crate::trainer::tuned_model_dir;

/// Copies the tuned model (Hugging Face layout, LoRA merged) of `run` to `out`, replacing `out`.
///
/// # Errors
/// The run has no tuned model; I/O failures naming the file.
pub fn export_model(run: &Path, out: &Path) -> Result<PathBuf> {
    let src = tuned_model(run)?;
    replace_dir(out, |d| copy_files(&src, d))?;
    Ok(out.to_path_buf())
}

/// Writes the PEFT adapter of a LoRA run to `out` (`adapter_config.json`,
/// `adapter_model.safetensors`) with the base model it applies to in `out/base` (Hugging Face
/// layout: the frozen decoder the adapters were trained on, cut to the run's layers, with the
/// item tokens in its vocabulary), and the tokenizer files beside the adapter (so that
/// `AutoTokenizer.from_pretrained(out)` loads). `base_model_name_or_path` in the adapter's
/// configuration is `base_name` when given (a Hub id, or a path as the user will load it), else
/// `out/base`'s absolute path, so `AutoPeftModelForCausalLM.from_pretrained(out)` finds it
/// while the export stays where it was written.
///
/// The adapter is the one of the tuned model (the best validation step), the same weights as
/// [`export_model`]'s merged model. Its `embed_tokens` table (and, for a tied model, the
/// `lm_head` copy PEFT ties to it) replaces the base's, so the base's own table does not matter.
///
/// # Errors
/// Not a LoRA run, or a run trained before adapters were kept with the tuned model; I/O.
pub fn export_adapter(run: &Path, out: &Path, base_name: Option<&str>) -> Result<PathBuf> {
    let model = tuned_model(run)?;
    let adapter = model.join("adapter");
    if !adapter.is_dir() {
        return Err(TrainError::Config(format!(
            "{} has no PEFT adapter: only `--method lora` runs have one (runs trained before \
             this version keep it only in checkpoint/adapter, which is the last step's, not the \
             evaluated model's)",
            model.display()
        )));
    }
    let base = resolve_dir(&run.join("checkpoint")).map(|c| c.join("model")).filter(|b| b.is_dir());
    let base = base.ok_or_else(|| {
        TrainError::Config(format!(
            "{} has no checkpoint/model (the frozen base the adapter applies to)",
            run.display()
        ))
    })?;
    let base_name = match base_name {
        Some(name) => name.to_owned(),
        None => {
            let absolute = std::path::absolute(out).map_err(|e| TrainError::io(out, e))?;
            absolute.join("base").display().to_string()
        }
    };
    replace_dir(out, |d| -> Result<()> {
        copy_files(&adapter, d)?;
        copy_files(&base, &d.join("base"))?;
        for name in TOKENIZER_FILES {
            let from = base.join(name);
            if from.is_file() {
                let to = d.join(name);
                std::fs::copy(&from, &to).map_err(|e| TrainError::io(&to, e))?;
            }
        }
        let path = d.join("adapter_config.json");
        let mut cfg = gems_model::read_adapter_config(&path)?;
        cfg.base_model_name_or_path = Some(base_name);
        gems_model::write_adapter_config(&cfg, &path)?;
        Ok(())
    })?;
    Ok(out.to_path_buf())
}

/// The tokenizer files of a saved model (`gems_model::save_hf_dir`), copied beside an adapter.
const TOKENIZER_FILES: [&str; 3] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

fn tuned_model(run: &Path) -> Result<PathBuf> {
    tuned_model_dir(run).ok_or_else(|| {
        TrainError::Config(format!(
            "{} has no tuned model (model/): has it finished?",
            run.display()
        ))
    })
}

/// Copies the plain files of `src` into `dst` (created); subdirectories are not copied.
fn copy_files(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(|e| TrainError::io(dst, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| TrainError::io(src, e))? {
        let entry = entry.map_err(|e| TrainError::io(src, e))?;
        let from = entry.path();
        if from.is_file() {
            let to = dst.join(entry.file_name());
            std::fs::copy(&from, &to).map_err(|e| TrainError::io(&to, e))?;
        }
    }
    Ok(())
}
