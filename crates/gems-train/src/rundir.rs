//! The run directory: what a new run clears and what a resumed one checks (its checkpoint and
//! configuration), the configuration written to config.json, the log files, checkpoints and
//! the tuned model's place.

use std::path::{Path, PathBuf};

use burn::module::Module;
use gems_model::{Llama, Pretrained};
use gems_optim::{Method, Optimizer};

use crate::checkpoint::{
    TrainerState, read_json, replace_dir, resolve_dir, verify_dir, write_atomic, write_json,
};
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::progress::Reporter;
use crate::run_setup::{lora_config, resolved_config};
use crate::setup::Setup;

/// Keeps only the lines of a JSON-lines log (`metrics.jsonl`, `conflict.jsonl`) whose `step` is
/// at most `step`: a resumed run rewrites what followed. Kept lines are copied byte for byte; a
/// damaged last line (a crash mid-write: no final newline, or JSON cut short) is dropped.
///
/// # Errors
/// I/O failures; any other line that is not a JSON object with a whole-number `step`, naming
/// the file and the 1-based line.
pub(crate) fn truncate_steps(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let lines: Vec<&str> = text.lines().collect();
    let last = lines.iter().rposition(|line| !line.trim().is_empty());
    let mut out = String::new();
    for (index, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(value) => value,
            Err(e) if Some(index) == last && (!text.ends_with('\n') || e.is_eof()) => continue,
            Err(e) => return Err(TrainError::format(path, format!("line {}: {e}", index + 1))),
        };
        let Some(line_step) = value.get("step").and_then(serde_json::Value::as_u64) else {
            let detail = format!("line {}: no whole-number `step`", index + 1);
            return Err(TrainError::format(path, detail));
        };
        if line_step <= step {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(write_atomic(path, out.as_bytes())?)
}

/// The run's metrics file (`train` and `valid` lines).
pub(crate) const METRICS: &str = "metrics.jsonl";

/// The checkpoint `--resume` continues from, verified against its manifest; refuses, saying
/// what the directory holds, when there is none (resuming must never start a different run).
pub(crate) fn checkpoint_to_resume(run_dir: &Path) -> Result<PathBuf> {
    let Some(ckpt) = resolve_dir(&run_dir.join("checkpoint")) else {
        let mut found: Vec<String> = std::fs::read_dir(run_dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        let found = if found.is_empty() {
            "it is empty".to_string()
        } else {
            format!("it holds {}", found.join(", "))
        };
        return Err(TrainError::Config(format!(
            "--resume: {} has no checkpoint/ to resume from ({found}); run without --resume to \
             start a new run in an empty directory",
            run_dir.display()
        )));
    };
    verify_dir(&ckpt)?;
    Ok(ckpt)
}

/// What a run writes into its directory besides `checkpoint/` and `summary.json`.
pub(crate) const RUN_OUTPUTS: [&str; 7] = [
    "config.json",
    "nullspace.json",
    "before.json",
    gems_metrics::BASELINES_FILE,
    METRICS,
    "conflict.jsonl",
    "model",
];

/// Removes the outputs of an earlier start in `run_dir` that never reached a checkpoint (a
/// run killed early), so that a new run never reports a file it did not write (a tuned model,
/// floors of other test examples). Only the names of [`RUN_OUTPUTS`] (and their `.tmp` and
/// `.old` copies) are touched; the removal is noted.
pub(crate) fn clear_earlier_start(run_dir: &Path, progress: &Reporter) -> Result<()> {
    let mut removed = Vec::new();
    for name in RUN_OUTPUTS {
        for path in ["", ".tmp", ".old"].map(|s| run_dir.join(format!("{name}{s}"))) {
            let gone = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else if path.exists() {
                std::fs::remove_file(&path)
            } else {
                continue;
            };
            gone.map_err(|e| TrainError::io(&path, e))?;
            removed.push(path.file_name().unwrap_or_default().to_string_lossy().into_owned());
        }
    }
    if !removed.is_empty() {
        progress.note(|| {
            format!(
                "{} held an earlier start that never reached a checkpoint; removed its {}",
                run_dir.display(),
                removed.join(", ")
            )
        });
    }
    Ok(())
}

/// Refuses to resume when `saved` (the run's config.json) differs from the configuration the
/// checkpoint `ckpt` was taken with, other than `stop_after`: an edited config.json would
/// otherwise change the rest of the run silently. Checkpoints written before 2026-12-06 hold
/// no configuration and are not checked.
pub(crate) fn same_config_as_checkpoint(
    saved: &TrainConfig,
    run_dir: &Path,
    ckpt: &Path,
) -> Result<()> {
    let theirs_path = ckpt.join("config.json");
    if !theirs_path.is_file() {
        return Ok(());
    }
    let theirs: TrainConfig = read_json(&theirs_path)?;
    let changed = saved.differences(&theirs);
    if changed.is_empty() {
        return Ok(());
    }
    Err(TrainError::Config(format!(
        "--resume: {} differs from the configuration the checkpoint was taken with ({}) in {}: \
         a resumed run keeps its configuration; restore the file, or start a new run in \
         another directory",
        run_dir.join("config.json").display(),
        theirs_path.display(),
        changed.join(", ")
    )))
}

/// The configuration a run uses (the saved one when resuming; only `stop_after` may change),
/// with the model path filled in, written to `config.json`; and that model path.
pub(crate) fn resolve_config(
    config: &TrainConfig,
    run_dir: &Path,
    resume_from: Option<&Path>,
    progress: &Reporter,
) -> Result<(TrainConfig, PathBuf)> {
    let mut config = config.clone();
    if let Some(ckpt) = resume_from {
        // The saved configuration decides the run; only `stop_after` may change.
        let saved: TrainConfig = read_json(&run_dir.join("config.json"))?;
        same_config_as_checkpoint(&saved, run_dir, ckpt)?;
        let stop_after = config.stop_after;
        config = saved;
        config.stop_after = stop_after;
        progress.note(|| format!("resuming from {}", ckpt.display()));
    } else if resolve_dir(&run_dir.join("checkpoint")).is_some()
        || run_dir.join("summary.json").exists()
    {
        return Err(TrainError::Config(format!(
            "{} already holds a run: pass --resume to continue it, or choose another directory",
            run_dir.display()
        )));
    } else {
        clear_earlier_start(run_dir, progress)?;
    }
    let (config, path) = resolved_config(config)?;
    write_json(&run_dir.join("config.json"), &config)?;
    Ok((config, path))
}

/// The trainer's state: the checkpoint's when resuming, checked against the optimizer's step
/// (a checkpoint must hold one consistent state), else a fresh one.
pub(crate) fn trainer_state(
    resume_from: Option<&Path>,
    optimizer: &Optimizer,
    config: &TrainConfig,
) -> Result<TrainerState> {
    let state: TrainerState = match resume_from {
        Some(ckpt) => read_json(&ckpt.join("trainer.json"))?,
        None => TrainerState::default(),
    };
    if let Some(ckpt) = resume_from {
        let optimizer_steps = optimizer.steps() + optimizer.skipped_steps();
        if optimizer_steps != state.step || state.step > config.schedule.steps {
            return Err(TrainError::format(
                ckpt,
                format!(
                    "trainer.json is at step {} of {}, optimizer/ at step {optimizer_steps}: the \
                     checkpoint does not hold one consistent state",
                    state.step, config.schedule.steps
                ),
            ));
        }
    }
    Ok(state)
}

/// The run's log files at the start of a process: a resumed run keeps the lines of the steps
/// its checkpoint holds (later ones are rewritten); a new run starts them empty.
pub(crate) fn prepare_logs(run_dir: &Path, resumed: bool, step: u64) -> Result<()> {
    let metrics_path = run_dir.join(METRICS);
    let conflict_path = run_dir.join("conflict.jsonl");
    if resumed {
        truncate_steps(&metrics_path, step)?;
        truncate_steps(&conflict_path, step)?;
    } else {
        for p in [&metrics_path, &conflict_path] {
            if p.exists() {
                std::fs::remove_file(p).map_err(|e| TrainError::io(p, e))?;
            }
        }
    }
    Ok(())
}

pub(crate) fn save_checkpoint(
    dir: &Path,
    model: &Llama,
    setup: &Setup,
    optimizer: &Optimizer,
    state: &TrainerState,
    config: &TrainConfig,
) -> Result<()> {
    replace_dir(dir, |d| {
        let base = Pretrained {
            model: model.clone().valid(),
            tokenizer: setup.pretrained.tokenizer.clone(),
            chat_template: setup.pretrained.chat_template.clone(),
        };
        if config.optimizer.method == Method::Lora {
            gems_model::save_peft(model, &lora_config(config, model), &d.join("adapter"))?;
        }
        gems_model::save_hf_dir(&base, &d.join("model"))?;
        optimizer.save(d.join("optimizer"))?;
        // The configuration the checkpoint continues (checked against config.json on resume).
        write_json(&d.join("config.json"), config)?;
        write_json(&d.join("trainer.json"), state)
    })
}

/// Where a run keeps its tuned model.
pub fn tuned_model_dir(run_dir: &Path) -> Option<PathBuf> {
    resolve_dir(&run_dir.join("model"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_steps_keeps_earlier_lines_verbatim_and_drops_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let text =
            "{\"kind\":\"train\",\"step\":1,\"x\":1.50}\n\n{\"step\":2}\n{\"step\":3}\n{\"st";
        std::fs::write(&path, text).unwrap();
        truncate_steps(&path, 2).unwrap();
        let kept = std::fs::read_to_string(&path).unwrap();
        assert_eq!(kept, "{\"kind\":\"train\",\"step\":1,\"x\":1.50}\n{\"step\":2}\n");
        // A missing file is left missing.
        truncate_steps(&dir.path().join("absent.jsonl"), 2).unwrap();
        assert!(!dir.path().join("absent.jsonl").exists());
    }

    #[test]
    fn truncate_steps_refuses_a_damaged_line_before_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        for (text, line) in [("{\"step\":1}\nnot json\n{\"step\":2}\n", 2), ("{\"no\":1}\n", 1)] {
            std::fs::write(&path, text).unwrap();
            let err = truncate_steps(&path, 5).unwrap_err().to_string();
            assert!(err.contains("log.jsonl") && err.contains(&format!("line {line}")), "{err}");
            // The file is left as it was.
            assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        }
    }
}
