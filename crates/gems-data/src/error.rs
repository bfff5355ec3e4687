//! The one error type of `gems-data`.
//!
//! Input errors always carry the file and the 1-based line so that a user with a broken export
//! can open the file at the right place; nothing in this crate panics on bad input.

use std::path::PathBuf;

/// Everything that can go wrong while loading, building, tokenising or writing a dataset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed (`gems_io::Error::Io`, the path and its cause), or a
    /// crash-safe directory write or its checksum check failed.
    #[error(transparent)]
    Files(#[from] gems_io::Error),
    /// An event refers to an item that the catalogue does not have.
    #[error("{path}:{line}: unknown item id {}", quote(.item))]
    UnknownItem {
        /// The input file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The id as written in the input.
        item: String,
    },
    /// A user has no events.
    #[error("{path}:{line}: user {} has no events", quote(.user))]
    EmptyUser {
        /// The input file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The user id.
        user: String,
    },
    /// The same user appears twice.
    #[error("{path}:{line}: duplicate user {} (first seen on line {first_line})", quote(.user))]
    DuplicateUser {
        /// The input file.
        path: PathBuf,
        /// 1-based line number of the second occurrence.
        line: usize,
        /// The user id.
        user: String,
        /// 1-based line number of the first occurrence.
        first_line: usize,
    },
    /// The same item appears twice in a catalogue.
    #[error("{path}:{line}: duplicate item {} (first seen on line {first_line})", quote(.item))]
    DuplicateItem {
        /// The input file.
        path: PathBuf,
        /// 1-based line number of the second occurrence.
        line: usize,
        /// The item id.
        item: String,
        /// 1-based line number of the first occurrence.
        first_line: usize,
    },
    /// The input parses but holds nothing to learn from: no items, no users, or no user with
    /// the two events that make one example.
    #[error("{path}: {message}")]
    Empty {
        /// The file that should have held the data.
        path: PathBuf,
        /// What is missing.
        message: String,
    },
    /// The dataset directory could not be recognised or resolved.
    #[error("{path}: {message}")]
    Dataset {
        /// The dataset path or name.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The text tokenizer failed to load or to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Serialising output failed.
    #[error("serialising {what}: {cause}")]
    Serialize {
        /// What was being serialised.
        what: String,
        /// The underlying error (in the message, not repeated as `source()`).
        cause: serde_json::Error,
    },
}

/// The most characters of input an error message quotes.
pub(crate) const MAX_QUOTE: usize = 100;

/// `text` quoted for an error message (as `{:?}` does), cut after [`MAX_QUOTE`] characters with
/// `...` marking the cut, so a hostile megabyte-long id or cell never floods the terminal.
pub(crate) fn quote(text: &str) -> String {
    match text.char_indices().nth(MAX_QUOTE) {
        Some((cut, _)) => format!("{:?}...", &text[..cut]),
        None => format!("{text:?}"),
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Files(gems_io::Error::io(path, cause))
    }

    /// A malformed line ([`gems_io::Error::Malformed`]) at `path:line`.
    pub(crate) fn malformed(
        path: impl Into<PathBuf>,
        line: usize,
        message: impl Into<String>,
    ) -> Self {
        Error::Files(gems_io::Error::malformed(path, line, message))
    }

    /// An [`Error::Empty`] about `path`.
    pub(crate) fn empty(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Empty { path: path.into(), message: message.into() }
    }
}
