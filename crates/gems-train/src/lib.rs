//! `gems-train`: the only crate that joins model, data and optimizer.
//!
//! - [`config`]: the run configuration (JSON or TOML), presets, the learning-rate schedule.
//! - [`setup`]: a model with item tokens and the data tokenised for it.
//! - [`forward`]: batches, the target-token loss, item scores, text log-likelihood.
//! - [`infer`]: a finished run's model: recommend for a user, search with a query.
//! - [`eval`]: full-catalogue and sampled ranking, perplexity on general text.
//! - [`nullspace`]: null-space projectors from general text, cached per model.
//! - [`trainer`]: the loop, validation, early stopping, checkpoints, resume.
//! - [`checkpoint`]: atomic files and directories, the trainer's resumable state.
//! - [`progress`]: progress as events ([`Event`]) for an [`Observer`] the caller supplies;
//!   silent by default. No code of this crate writes to the terminal.
//! - [`sasrec`]: SASRec, the sequential floor of the recommendation task ([`baselines`]).
//! - [`tiny`]: a tiny random model and data slice for tests and `gems selftest`.
//!
//! This crate never chooses a backend: every entry point takes a `Device`. The one exception is
//! the SASRec floor of [`baselines`], trained on `flex` (the CPU backend of every build) so that
//! a run's floors are the same numbers on every machine.

pub mod baselines;
mod batches;
pub mod checkpoint;
pub mod collab;
pub mod config;
pub mod drift;
mod error;
pub mod eval;
pub mod eval_cache;
pub mod export;
pub mod forward;
pub mod frozen_cache;
pub mod infer;
pub mod nullspace;
pub mod parity;
pub mod peer;
pub mod progress;
pub mod run_setup;
mod rundir;
pub mod sasrec;
pub mod setup;
pub mod tiny;
pub mod trainer;

pub use config::TrainConfig;
pub use error::{Result, TrainError};
pub use progress::{Event, Observer, Reporter};
pub use run_setup::RunSetup;
pub use setup::{Corpus, Sample, Setup};
pub use trainer::{RunOptions, RunOutcome, train};
