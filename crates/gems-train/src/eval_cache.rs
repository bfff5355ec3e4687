//! Evaluations shared across runs: the untuned model's test evaluation (`before.json`) and the
//! floors (`baselines.json`) depend on the model, the data, the item rows, the seed and the
//! evaluation settings, not on how a run trains. With `eval.cache` set, a run looks them up
//! under a key of every setting except the ones that only shape training ([`TRAINING_ONLY`]),
//! and stores what it computes, so the variants of one seed in a reproduction (methods,
//! ablations, learning rates) evaluate the untuned model and the floors once.
//!
//! The key does not cover the code: a change of the evaluation makes a cache stale, so a cache
//! belongs to one version of the results (`cargo xtask reproduce` keeps one per results epoch).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::checkpoint::write_json;
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};

/// The settings that shape only training (dotted paths into the configuration's JSON): they
/// are left out of the key, so runs that differ in them share the cached evaluations.
pub const TRAINING_ONLY: [&str; 16] = [
    "label",
    "optimizer",
    "lora",
    "schedule",
    "null_space",
    "checkpoint_every",
    "stop_after",
    "model.tune_layers",
    "model.embeddings",
    "model.untie_head",
    "model.frozen_cache",
    "eval.every",
    "eval.patience",
    "eval.metric",
    "eval.valid_examples",
    "eval.cache",
];

/// One run's view of the cache: its directory and the run's key.
#[derive(Debug, Clone)]
pub struct EvalCache {
    dir: PathBuf,
    key: String,
}

impl EvalCache {
    /// The cache `config` asks for (`eval.cache`), keyed by `config` and the model it loads
    /// (`model_key`: its path, size and kept layers); `None` when it asks for none.
    pub fn for_run(config: &TrainConfig, model_key: &str) -> Option<Self> {
        let dir = config.eval.cache.clone()?;
        Some(Self { dir, key: cache_key(config, model_key) })
    }

    /// The file this run's `name` (`before.json`, `baselines.json`) is kept in.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{}.{name}", &self.key[..16]))
    }

    /// Copies the cached `name` to `dest` (atomically, byte for byte) when an earlier run
    /// stored it; returns whether it did.
    ///
    /// # Errors
    /// I/O failures.
    pub fn restore(&self, name: &str, dest: &Path) -> Result<bool> {
        let path = self.path(name);
        if !path.is_file() {
            return Ok(false);
        }
        copy_atomic(&path, dest)?;
        Ok(true)
    }

    /// Stores the run's file `src` as this run's `name`, atomically, with the settings it was
    /// keyed by beside it (`KEY.settings.json`, for a reader who wants to know what it covers).
    ///
    /// # Errors
    /// I/O failures.
    pub fn store(&self, name: &str, src: &Path, config: &TrainConfig) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| TrainError::io(&self.dir, e))?;
        write_json(&self.path("settings.json"), &keyed_settings(config))?;
        copy_atomic(src, &self.path(name))
    }
}

/// Copies `from` to `to` byte for byte, `to` written atomically.
fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).map_err(|e| TrainError::io(from, e))?;
    Ok(gems_io::write_atomic(to, &bytes)?)
}

/// `config` as JSON without the [`TRAINING_ONLY`] settings.
fn keyed_settings(config: &TrainConfig) -> serde_json::Value {
    let mut value = serde_json::to_value(config).unwrap_or_default();
    for path in TRAINING_ONLY {
        let (parent, last) = match path.rsplit_once('.') {
            Some((parent, last)) => {
                (parent.split('.').try_fold(&mut value, |v, k| v.get_mut(k)), last)
            }
            None => (Some(&mut value), path),
        };
        if let Some(serde_json::Value::Object(map)) = parent {
            map.remove(last);
        }
    }
    value
}

/// The SHA-256 of the model key and the keyed settings, in hex.
fn cache_key(config: &TrainConfig, model_key: &str) -> String {
    let mut h = Sha256::new();
    h.update(model_key.as_bytes());
    h.update(keyed_settings(config).to_string().as_bytes());
    format!("{:x}", h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(config: &TrainConfig) -> String {
        cache_key(config, "model|1|None")
    }

    #[test]
    fn runs_that_differ_only_in_training_share_the_key() {
        let base = TrainConfig::cpu_preset();
        let mut other = base.clone();
        other.optimizer = other.optimizer.switch_method(gems_optim::Method::Full);
        other.schedule.lr = 1e-4;
        other.schedule.steps = 7;
        other.model.tune_layers = Some(2);
        other.label = Some("x".into());
        other.eval.cache = Some("elsewhere".into());
        assert_eq!(key(&base), key(&other));
    }

    #[test]
    fn what_the_evaluation_depends_on_changes_the_key() {
        let base = TrainConfig::cpu_preset();
        let changes: [fn(&mut TrainConfig); 6] = [
            |c| c.seed += 1,
            |c| c.eval.test_examples += 1,
            |c| c.model.item_collab += 1,
            |c| c.data.max_history += 1,
            |c| c.eval.exclude_history = !c.eval.exclude_history,
            |c| c.data.tasks = crate::config::TaskSelection::Rec,
        ];
        for change in changes {
            let mut c = base.clone();
            change(&mut c);
            assert_ne!(key(&base), key(&c), "{:?}", c.differences(&base));
        }
        assert_ne!(cache_key(&base, "a|1|None"), cache_key(&base, "b|1|None"));
    }

    #[test]
    fn every_training_only_path_names_a_setting() {
        // A renamed field would leave its old path here, silently keyed again.
        let mut c = TrainConfig::cpu_preset();
        c.model.tune_layers = Some(4);
        c.model.untie_head = true;
        c.model.frozen_cache = Some("frozen".into());
        c.stop_after = Some(1);
        c.label = Some("x".into());
        c.eval.cache = Some("dir".into());
        let value = serde_json::to_value(&c).unwrap();
        for path in TRAINING_ONLY {
            let found = path.split('.').try_fold(&value, |v, k| v.get(k));
            assert!(found.is_some(), "{path} is not a setting");
        }
    }
}
