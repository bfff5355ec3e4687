//! The trainer's resumable state, and JSON files on the crash-safe writes of [`gems_io`]
//! (re-exported here: atomic files, whole-directory replacement with a SHA-256 manifest
//! verified on resume).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use gems_io::{MANIFEST, ManifestEntry, replace_dir, resolve_dir, verify_dir, write_atomic};

use crate::error::{Result, TrainError};

/// Writes `value` as pretty JSON to `path` atomically.
///
/// # Errors
/// I/O failures, naming the file.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| TrainError::format(path, e.to_string()))?;
    Ok(write_atomic(path, text.as_bytes())?)
}

/// Reads JSON from `path`, naming the file in every error.
///
/// # Errors
/// Missing or malformed file.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::format(path, e.to_string()))
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

    /// A resumed run re-reads its floats bit for bit (serde_json's `float_roundtrip`): without
    /// it, values such as step times came back 1 ulp off.
    #[test]
    fn floats_survive_a_json_round_trip_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trainer.json");
        let mut rng = gems_rng::SplitMix64::new(11);
        let values: Vec<f64> = (0..4000)
            .map(|i| {
                let x = f64::from_bits(rng.next_u64() >> 2);
                if i % 2 == 0 { x } else { rng.next_u64() as f64 / 3.0e7 }
            })
            .filter(|x| x.is_finite())
            .collect();
        let state = TrainerState {
            train_seconds: 0.1 + 0.2,
            step_seconds: values,
            best: Some((3, 4.726_012_345_678_901)),
            ..Default::default()
        };
        write_json(&path, &state).unwrap();
        let back: TrainerState = read_json(&path).unwrap();
        assert_eq!(back.train_seconds.to_bits(), state.train_seconds.to_bits());
        assert_eq!(back.best.unwrap().1.to_bits(), state.best.unwrap().1.to_bits());
        for (a, b) in back.step_seconds.iter().zip(&state.step_seconds) {
            assert_eq!(a.to_bits(), b.to_bits(), "{a:e} vs {b:e}");
        }
    }
}
