//! The records a training run writes, as serde types, and their readers and writers.
//!
//! A run directory holds `metrics.jsonl` ([`METRICS_FILE`]: one [`MetricsLine`] per line,
//! appended as training goes, tagged by `"kind"`) and `summary.json` ([`SUMMARY_FILE`]: one
//! [`RunSummary`] written at the end). JSON field names are the Rust field names.
//!
//! JSON has no NaN: `serde_json` writes a non-finite `f64` as `null`. So that one diverged step
//! cannot make a whole run unreadable, every plain `f64` field reads `null` back as NaN, and an
//! `Option<f64>` field reads it as `None`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{MetricsError, Result};
use crate::ranking::{NdcgNormaliser, TaskMetrics};
use gems_io::write_atomic;

/// File name of the per-step log in a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// File name of the end-of-run summary in a run directory.
pub const SUMMARY_FILE: &str = "summary.json";

/// Reads an `f64` written as a number or as `null` (a non-finite value), `null` as NaN.
pub(crate) fn nullable_f64<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// Reads a map of `f64` whose values may be `null` (non-finite values), `null` as NaN.
pub(crate) fn nullable_map<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<BTreeMap<String, f64>, D::Error> {
    let map = BTreeMap::<String, Option<f64>>::deserialize(deserializer)?;
    Ok(map.into_iter().map(|(k, v)| (k, v.unwrap_or(f64::NAN))).collect())
}

/// One evaluation of a model on one split: ranking metrics per task and protocol, losses and
/// general-text perplexity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// What was evaluated (the run label, or `"base"` for the untuned model).
    pub label: String,
    /// The split (`"valid"` or `"test"`).
    pub split: String,
    /// Full-catalogue protocol, keyed by task (`"rec"`, `"search"`); may be empty.
    #[serde(default)]
    pub full: BTreeMap<String, TaskMetrics>,
    /// The full-catalogue protocol without the items each example's user had before its
    /// target (the target kept; only the prompt's items in reports without
    /// `whole_history`), keyed by task: the common protocol of sequential recommendation,
    /// from the same scores as `full` in the same pass. Empty when `full` already leaves the
    /// history out (`history_excluded`), and in reports written before 2026-12-03 (skipped
    /// when empty).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unseen: BTreeMap<String, TaskMetrics>,
    /// Sampled protocol (the positives plus 99 seeded negatives), keyed by task; may be empty.
    #[serde(default)]
    pub sampled: BTreeMap<String, TaskMetrics>,
    /// Mean next-token loss of the target span, keyed by task.
    #[serde(default, deserialize_with = "nullable_map")]
    pub loss: BTreeMap<String, f64>,
    /// Mean cross-entropy of the target item token alone (the full-vocabulary softmax that
    /// training lowers, without the end-of-sequence token), keyed by task; models only.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "nullable_map"
    )]
    pub item_loss: BTreeMap<String, f64>,
    /// Mean cross-entropy of the target under a softmax over the catalogue's items only (the
    /// ranking's own loss: ln(items) for a uniform ranking), keyed by task; models only.
    /// `item_loss - catalogue_loss` is `-ln P(some item token)` at the target position,
    /// averaged: the mass a model still puts on text tokens.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "nullable_map"
    )]
    pub catalogue_loss: BTreeMap<String, f64>,
    /// Perplexity on held-out general text with the original vocabulary, when measured.
    #[serde(default)]
    pub perplexity: Option<f64>,
    /// The NDCG normaliser used for every NDCG value in this report.
    #[serde(default)]
    pub ndcg_normaliser: NdcgNormaliser,
    /// Whether the full-catalogue ranking left out the items of each example's history (the
    /// common protocol of sequential recommendation) rather than ranking the whole catalogue.
    /// Written only when set, so reports of the default protocol are unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub history_excluded: bool,
    /// Whether "the history" left out (in `unseen`, or in `full` with `history_excluded`) is
    /// every item the user had before the target, as since 2026-12-06; false in earlier
    /// reports, whose rankings left out only the items in the prompt (the last
    /// `max_history`).
    #[serde(default)]
    pub whole_history: bool,
    /// Wall-clock seconds the evaluation took.
    #[serde(deserialize_with = "nullable_f64")]
    pub seconds: f64,
}

impl EvalReport {
    /// The full-catalogue value of metric `name` (`"ndcg@10"`) for `task`, if present.
    pub fn full_metric(&self, task: &str, name: &str) -> Option<f64> {
        self.full.get(task).and_then(|m| m.get(name))
    }

    /// The full-catalogue ranking without the history items, keyed by task: `full` when the
    /// evaluation left the history out, else `unseen`.
    pub fn without_history(&self) -> &BTreeMap<String, TaskMetrics> {
        if self.history_excluded { &self.full } else { &self.unseen }
    }

    /// The value of metric `name` for `task` in [`EvalReport::without_history`], if present.
    pub fn without_history_metric(&self, task: &str, name: &str) -> Option<f64> {
        self.without_history().get(task).and_then(|m| m.get(name))
    }

    /// The sampled-protocol value of metric `name` for `task`, if present.
    pub fn sampled_metric(&self, task: &str, name: &str) -> Option<f64> {
        self.sampled.get(task).and_then(|m| m.get(name))
    }
}

/// One optimizer step, as logged during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    /// Optimizer step (1-based after the first update).
    pub step: u64,
    /// Fractional epoch.
    #[serde(deserialize_with = "nullable_f64")]
    pub epoch: f64,
    /// Learning rate used at this step.
    #[serde(deserialize_with = "nullable_f64")]
    pub lr: f64,
    /// Recommendation loss, when the step had a rec batch.
    pub loss_rec: Option<f64>,
    /// Search loss, when the step had a search batch.
    pub loss_search: Option<f64>,
    /// Mean cosine between the rec and search gradients over the tuned matrices, when both exist.
    pub mean_cosine: Option<f64>,
    /// Cosine between the rec and search gradients over every trained parameter, when both
    /// exist (PCGrad's conflict test reads its sign). Absent in runs written before it existed.
    #[serde(default)]
    pub global_cosine: Option<f64>,
    /// Whether gradient surgery (PCGrad on a conflicting step) changed the task gradients.
    #[serde(default)]
    pub surgery: bool,
    /// Training throughput in tokens per second.
    #[serde(deserialize_with = "nullable_f64")]
    pub tokens_per_s: f64,
    /// Wall-clock seconds of this step.
    #[serde(deserialize_with = "nullable_f64")]
    pub step_seconds: f64,
    /// Wall-clock seconds since training started.
    #[serde(deserialize_with = "nullable_f64")]
    pub elapsed_seconds: f64,
    /// Whether the update was skipped (a non-finite loss or gradient).
    pub skipped: bool,
}

/// One validation pass during training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidRecord {
    /// The optimizer step after which validation ran.
    pub step: u64,
    /// What was measured.
    pub report: EvalReport,
    /// Whether this is the best validation so far (the checkpoint kept).
    pub best: bool,
}

/// One line of `metrics.jsonl`: `{"kind":"train","step":3,...}` or `{"kind":"valid",...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricsLine {
    /// A training step.
    Train(TrainRecord),
    /// A validation pass.
    Valid(ValidRecord),
}

impl MetricsLine {
    /// The optimizer step of the record.
    pub fn step(&self) -> u64 {
        match self {
            Self::Train(record) => record.step,
            Self::Valid(record) => record.step,
        }
    }
}

/// The end-of-run summary, `summary.json` in a run directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// The run label (configuration and seed).
    pub label: String,
    /// The label without the seed: runs of one group are seeds of one configuration.
    pub group: String,
    /// The optimizer method (`"gems"`, `"full"`, `"galore"`, `"pcgrad"`, `"lora"`).
    pub method: String,
    /// The seed of the run.
    pub seed: u64,
    /// Optimizer steps taken.
    pub steps: u64,
    /// Wall-clock seconds of training, evaluation excluded.
    #[serde(deserialize_with = "nullable_f64")]
    pub train_seconds: f64,
    /// Median wall-clock seconds of one step.
    #[serde(deserialize_with = "nullable_f64")]
    pub median_step_seconds: f64,
    /// Bytes of optimizer state (moments, bases, projectors).
    pub optimizer_state_bytes: u64,
    /// Test evaluation of the model before tuning.
    pub before: Option<EvalReport>,
    /// Test evaluation of the tuned model (the best validation checkpoint).
    pub after: Option<EvalReport>,
    /// The step of the best validation, if validation ran.
    pub best_step: Option<u64>,
}

/// Reads every record of a `metrics.jsonl` file, in file order. Blank lines are skipped.
///
/// A last line that does not parse is skipped without error when it is truncated (no final
/// newline, or JSON cut short): a crash mid-write loses that record, not the run.
///
/// # Errors
/// [`MetricsError::Files`] (`gems_io::Error::Io`) when the file cannot be read; [`MetricsError::Files`] (`gems_io::Error::Malformed`) with the
/// 1-based line number for any other line that is not a valid record.
pub fn read_metrics_lines(path: &Path) -> Result<Vec<MetricsLine>> {
    let bytes = std::fs::read(path).map_err(|source| MetricsError::io(path, source))?;
    let ends_with_newline = bytes.last() == Some(&b'\n');
    let lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    // The index of the last line with content.
    let last = lines.iter().rposition(|line| !line.trim_ascii().is_empty());
    let mut records = Vec::with_capacity(lines.len());
    for (index, line) in lines.iter().enumerate() {
        if line.trim_ascii().is_empty() {
            continue;
        }
        match serde_json::from_slice::<MetricsLine>(line) {
            Ok(record) => records.push(record),
            Err(error) if Some(index) == last && (!ends_with_newline || error.is_eof()) => {}
            Err(error) => {
                return Err(gems_io::Error::malformed(path, index + 1, error.to_string()).into());
            }
        }
    }
    Ok(records)
}

/// Appends one record as a line to a `metrics.jsonl` file (created if missing), in one write.
///
/// # Errors
/// [`MetricsError::Files`] (`gems_io::Error::Io`) when the file cannot be opened or written.
pub fn append_metrics_line(path: &Path, line: &MetricsLine) -> Result<()> {
    let text = serde_json::to_string(line)
        .map_err(|source| MetricsError::Json { path: path.to_owned(), source })?;
    Ok(gems_io::append_line(path, &text)?)
}

/// Reads `summary.json` from a run directory.
///
/// # Errors
/// [`MetricsError::Files`] (`gems_io::Error::Io`) when it cannot be read, [`MetricsError::Json`] when it is not a
/// valid summary.
pub fn read_summary(run_dir: &Path) -> Result<RunSummary> {
    let path = run_dir.join(SUMMARY_FILE);
    let bytes = std::fs::read(&path).map_err(|source| MetricsError::io(&path, source))?;
    serde_json::from_slice(&bytes).map_err(|source| MetricsError::Json { path, source })
}

/// Writes `summary.json` into a run directory atomically (pretty-printed) and returns its path.
///
/// # Errors
/// [`MetricsError::Files`] (`gems_io::Error::Io`) when it cannot be written.
pub fn write_summary(run_dir: &Path, summary: &RunSummary) -> Result<PathBuf> {
    let path = run_dir.join(SUMMARY_FILE);
    let mut text = serde_json::to_string_pretty(summary)
        .map_err(|source| MetricsError::Json { path: path.clone(), source })?;
    text.push('\n');
    write_atomic(&path, text.as_bytes())?;
    Ok(path)
}
