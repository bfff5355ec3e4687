//! The crate's error type: every lower crate's error, plus files, configuration and training.

use std::path::PathBuf;

/// Errors of `gems-train`.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A model file or model operation failed.
    #[error(transparent)]
    Model(#[from] gems_model::ModelError),
    /// A dataset failed to load or prepare.
    #[error(transparent)]
    Data(#[from] gems_data::Error),
    /// The optimizer rejected a configuration or a step.
    #[error(transparent)]
    Optim(#[from] gems_optim::OptimError),
    /// A decomposition failed.
    #[error(transparent)]
    Subspace(#[from] gems_subspace::SubspaceError),
    /// A metric or record failed.
    #[error(transparent)]
    Metrics(#[from] gems_metrics::MetricsError),
    /// Reading or writing a file failed (`gems_io::Error::Io`, the path and its cause), or a
    /// crash-safe write or a directory's manifest check did.
    #[error(transparent)]
    Files(#[from] gems_io::Error),
    /// A file exists but its content is not what was expected.
    #[error("{path}: {detail}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Training cannot go on (for example every step of a window was non-finite).
    #[error("training failed: {0}")]
    Training(String),
    /// A tensor could not be read back from its device.
    #[error("reading a tensor back in {op}: {detail}")]
    Readback {
        /// The operation.
        op: &'static str,
        /// The backend's message.
        detail: String,
    },
}

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Files(gems_io::Error::io(path, source))
    }

    /// A malformed file.
    pub fn format(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Self::Format { path: path.into(), detail: detail.into() }
    }
}

/// `Result` with [`TrainError`].
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
