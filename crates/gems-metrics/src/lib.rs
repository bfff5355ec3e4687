//! `gems-metrics`: ranking metrics, evaluation records and run reports.
//!
//! Why a crate of its own: the trainer writes what it measures, and the report tooling reads it
//! back long after the run; both sides must agree on one definition of every metric and one
//! on-disk format, without pulling Burn or a model into a tool that only formats numbers. So
//! this crate holds three things:
//! - [`ranking`]: Recall, NDCG and MRR at k in {5, 10, 20} (GEMS-SPEC §6), computed from score
//!   vectors on the host and averaged over examples with standard errors;
//! - [`record`]: the serde types of `metrics.jsonl` (one [`MetricsLine`] per line) and
//!   `summary.json` ([`RunSummary`]) in a run directory, with readers that name the bad line;
//! - [`report`]: markdown tables (per run and per seed group) and hand-written SVG line plots.
//!
//! Invariants it keeps, stated as absences:
//! - it never creates a tensor and depends on no workspace crate;
//! - it never panics on bad input: NaN scores, out-of-range indices and malformed files are
//!   [`MetricsError`]s naming the value, the file or the line;
//! - it never leaves a half-written report file: every file is written to a temporary name in
//!   the same directory and renamed.
//!
//! ```
//! use gems_metrics::ranking::{NdcgNormaliser, RankingAccumulator};
//! let mut accumulator = RankingAccumulator::new(NdcgNormaliser::Standard);
//! accumulator.add_scores(&[0.1, 0.9, 0.5, 0.7], &[2])?; // the target ranks third
//! let metrics = accumulator.finish();
//! assert_eq!(metrics.get("recall@5"), Some(1.0));
//! assert_eq!(metrics.get("ndcg@5"), Some(0.5));
//! # Ok::<(), gems_metrics::MetricsError>(())
//! ```

#![warn(missing_docs)]

mod error;
pub mod normaliser;
mod plot;
pub mod ranking;
pub mod record;
pub mod report;

pub use error::{MetricsError, Result};
pub use ranking::{KS, NdcgNormaliser, RankingAccumulator, TaskMetrics, rank_of, ranks_of};
pub use record::{
    EvalReport, MetricsLine, RunSummary, TrainRecord, ValidRecord, append_metrics_line,
    read_metrics_lines, read_summary, write_summary,
};
pub use report::{
    BASELINES_FILE, PLOT_FILES, PointGroup, Reference, Run, Scatter, Series, load_run, load_runs,
    markdown_floors, markdown_losses, markdown_protocols, write_report,
};
