//! The one error type of this crate.
//!
//! Every failure a caller can provoke with a file or an argument (a missing or truncated file, a
//! tensor whose shape does not match the configuration, an unknown GGUF type, a token id out of
//! range) is a value of [`ModelError`], never a panic. File errors name the file and, where there
//! is one, the key (tensor name or metadata key), so a log line is enough to find the problem.

use std::path::{Path, PathBuf};

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Everything that can go wrong while loading, running or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading or writing a file failed at the operating-system level.
    #[error(transparent)]
    Files(#[from] gems_io::Error),
    /// A file exists but its content is malformed (truncated, bad magic, bad header).
    #[error("{path}: malformed file{}: {detail}", key_suffix(.key))]
    Format {
        /// The file.
        path: PathBuf,
        /// The tensor or metadata key being read, if any.
        key: Option<String>,
        /// What is wrong.
        detail: String,
    },
    /// A tensor the configuration requires is absent.
    #[error("{path}: missing tensor `{key}`")]
    MissingTensor {
        /// The file (or directory) searched.
        path: PathBuf,
        /// The Hugging Face key that was expected.
        key: String,
    },
    /// A tensor has a shape other than the configuration implies.
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor key.
        key: String,
        /// The shape the configuration implies (PyTorch layout).
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// The file uses a feature this crate does not implement (a tensor type, a tokenizer model).
    #[error("{path}: unsupported{}: {detail}", key_suffix(.key))]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The key concerned, if any.
        key: Option<String>,
        /// What is unsupported.
        detail: String,
    },
    /// `config.json` could not be parsed or is inconsistent.
    #[error("{path}: invalid configuration: {detail}")]
    Config {
        /// The configuration file (or the GGUF it was derived from).
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A tokenizer could not be built, loaded, or run.
    #[error("tokenizer{}: {detail}", path_suffix(.path))]
    Tokenizer {
        /// The tokenizer file, if one was involved.
        path: Option<PathBuf>,
        /// The tokenizer library's message.
        detail: String,
    },
    /// A caller passed an argument that cannot be valid (shapes, ids, positions).
    #[error("{op}: {detail}")]
    InvalidInput {
        /// The operation, e.g. `"Llama::logits_at"`.
        op: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// Reading a tensor back from its device failed.
    #[error("{op}: could not read tensor data: {detail}")]
    TensorRead {
        /// The operation.
        op: &'static str,
        /// The backend's message.
        detail: String,
    },
}

fn key_suffix(key: &Option<String>) -> String {
    key.as_ref().map(|k| format!(" at `{k}`")).unwrap_or_default()
}

fn path_suffix(path: &Option<PathBuf>) -> String {
    path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default()
}

impl ModelError {
    pub(crate) fn io(path: &Path, cause: std::io::Error) -> Self {
        Self::Files(gems_io::Error::io(path, cause))
    }

    pub(crate) fn format(path: &Path, key: Option<&str>, detail: impl Into<String>) -> Self {
        Self::Format {
            path: path.to_path_buf(),
            key: key.map(str::to_string),
            detail: detail.into(),
        }
    }

    pub(crate) fn unsupported(path: &Path, key: Option<&str>, detail: impl Into<String>) -> Self {
        Self::Unsupported {
            path: path.to_path_buf(),
            key: key.map(str::to_string),
            detail: detail.into(),
        }
    }

    pub(crate) fn config(path: &Path, detail: impl Into<String>) -> Self {
        Self::Config { path: path.to_path_buf(), detail: detail.into() }
    }

    pub(crate) fn input(op: &'static str, detail: impl Into<String>) -> Self {
        Self::InvalidInput { op, detail: detail.into() }
    }

    pub(crate) fn tokenizer(path: Option<&Path>, detail: impl std::fmt::Display) -> Self {
        Self::Tokenizer { path: path.map(Path::to_path_buf), detail: detail.to_string() }
    }

    pub(crate) fn read(op: &'static str, detail: impl std::fmt::Debug) -> Self {
        Self::TensorRead { op, detail: format!("{detail:?}") }
    }
}

/// Writes a file through [`gems_io::write_atomic`] (temporary sibling, fsync, rename), so a
/// crash never leaves half a model file.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(gems_io::write_atomic(path, bytes)?)
}
