//! Atomic files and directories, and the trainer's own resumable state.
//!
//! A file is written to `name.tmp` and renamed. A directory is written to `name.tmp/`, then
//! the old `name/` is renamed to `name.old/`, the new one into place, and the old one removed:
//! at every instant either `name/` or `name.old/` holds a complete copy, so a crash while
//! saving never destroys the previous checkpoint. [`resolve_dir`] finds whichever survives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Writes `bytes` to `path` atomically (temporary file in the same directory, then rename).
///
/// # Errors
/// I/O failures, naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling(path, "tmp");
    std::fs::write(&tmp, bytes).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

/// Writes `value` as pretty JSON to `path` atomically.
///
/// # Errors
/// I/O failures, naming the file.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| TrainError::format(path, e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

/// Reads JSON from `path`, naming the file in every error.
///
/// # Errors
/// Missing or malformed file.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::format(path, e.to_string()))
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{suffix}"));
    path.with_file_name(name)
}

/// Replaces the directory `dir` with one written by `write` (given the temporary path),
/// keeping a complete copy on disk at every instant.
///
/// # Errors
/// `write`'s error, or I/O failures naming the directory.
pub fn replace_dir(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = sibling(dir, "tmp");
    let old = sibling(dir, "old");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    write(&tmp)?;
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| TrainError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| TrainError::io(dir, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
    }
    Ok(())
}

/// The complete copy of `dir` that survives a crash during [`replace_dir`]: `dir` itself, or
/// `dir.old` when the crash hit between the two renames.
pub fn resolve_dir(dir: &Path) -> Option<PathBuf> {
    if dir.is_dir() {
        return Some(dir.to_path_buf());
    }
    let old = sibling(dir, "old");
    old.is_dir().then_some(old)
}

/// Position of one task's data stream: the epoch and the index within its permutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    /// Passes completed over the task's training samples.
    pub epoch: u64,
    /// Next index within the current epoch's permutation.
    pub index: usize,
}

/// Everything besides model and optimizer that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done (applied or skipped).
    pub step: u64,
    /// Data cursors by task name.
    pub cursors: BTreeMap<String, Cursor>,
    /// Best validation value and its step.
    pub best: Option<(u64, f64)>,
    /// Validations since the best one.
    pub bad_validations: u32,
    /// Whether early stopping ended training.
    pub stopped_early: bool,
    /// Seconds spent in training steps so far (all processes).
    pub train_seconds: f64,
    /// Seconds of every step so far.
    pub step_seconds: Vec<f64>,
    /// Consecutive skipped (non-finite) steps.
    pub consecutive_skips: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacing_a_directory_keeps_a_complete_copy() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("checkpoint");
        replace_dir(&dir, |d| write_atomic(&d.join("a"), b"1")).unwrap();
        // A failing writer leaves the previous copy untouched.
        let err = replace_dir(&dir, |_| Err(TrainError::Training("disk full".into())));
        assert!(err.is_err());
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"1");
        replace_dir(&dir, |d| write_atomic(&d.join("a"), b"2")).unwrap();
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"2");
        // A crash between the renames leaves `checkpoint.old`, which is found.
        std::fs::rename(&dir, root.path().join("checkpoint.old")).unwrap();
        assert_eq!(resolve_dir(&dir).unwrap(), root.path().join("checkpoint.old"));
    }
}
