//! The one error type of `gems-metrics`.
//!
//! Every variant names what was wrong: the score index holding a NaN, the out-of-range index
//! and the length, or the file and 1-based line of a malformed record.

use std::path::PathBuf;

/// Everything that can go wrong while computing metrics or reading and writing run files.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A score vector is empty, so nothing can be ranked.
    #[error("{operation}: empty score vector")]
    EmptyScores {
        /// The function that received it.
        operation: &'static str,
    },
    /// A score is NaN, so the ranking is undefined.
    #[error("{operation}: score {index} is NaN")]
    NanScore {
        /// The function that received it.
        operation: &'static str,
        /// Index of the first NaN score.
        index: usize,
    },
    /// An item index is not a valid index into the score vector.
    #[error("{operation}: item index {index} out of range for {len} scores")]
    IndexOutOfRange {
        /// The function that received it.
        operation: &'static str,
        /// The bad index.
        index: usize,
        /// Number of scores.
        len: usize,
    },
    /// The same item is listed twice as relevant.
    #[error("{operation}: relevant item {index} listed twice")]
    DuplicateRelevant {
        /// The function that received it.
        operation: &'static str,
        /// The repeated index.
        index: usize,
    },
    /// Ranks handed to the accumulator are inconsistent with the number of relevant items.
    #[error("ranking accumulator: {message}")]
    InvalidRanks {
        /// What is wrong (a zero rank, no relevant items, more ranks than relevant items).
        message: String,
    },
    /// Two accumulators with different NDCG normalisers cannot be merged.
    #[error("ranking accumulator: cannot merge a {other} accumulator into a {this} one")]
    NormaliserMismatch {
        /// The normaliser of the accumulator merged into.
        this: crate::normaliser::NdcgNormaliser,
        /// The normaliser of the accumulator merged from.
        other: crate::normaliser::NdcgNormaliser,
    },
    /// Reading or writing a file failed (`gems_io::Error::Io`, the path and its cause), or a
    /// crash-safe write did.
    #[error(transparent)]
    Files(#[from] gems_io::Error),
    /// A JSON file is not a valid record, or a record could not be serialised.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error (it carries line and column).
        source: serde_json::Error,
    },
}

/// `Result` with this crate's [`MetricsError`].
pub type Result<T> = std::result::Result<T, MetricsError>;

impl MetricsError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Files(gems_io::Error::io(path, source))
    }
}
