//! The one error type of this crate.

use gems_subspace::SubspaceError;

/// Result alias of this crate.
pub type Result<T, E = OptimError> = std::result::Result<T, E>;

/// Everything that can go wrong in an optimizer step, its configuration or its saved state.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A configuration value is out of range; the message names the field.
    #[error("invalid optimizer configuration: {0}")]
    InvalidConfig(String),
    /// Subspace math failed (shape, NaN, non-convergence), with the parameter it happened on.
    #[error("parameter `{path}`: {source}")]
    Subspace {
        /// Dotted parameter path.
        path: String,
        /// The underlying error.
        source: SubspaceError,
    },
    /// A gradient does not have its parameter's shape.
    #[error(
        "parameter `{path}`: gradient shape {gradient:?} does not match parameter shape {parameter:?}"
    )]
    GradientShape {
        /// Dotted parameter path.
        path: String,
        /// Gradient shape.
        gradient: Vec<usize>,
        /// Parameter shape.
        parameter: Vec<usize>,
    },
    /// A saved Adam moment does not have the shape of the gradient it must follow (optimizer
    /// state from another model, or damaged).
    #[error(
        "parameter `{path}`: saved Adam moment shape {moment:?} does not match its gradient's {gradient:?} (optimizer state from another model, or damaged)"
    )]
    MomentShape {
        /// Dotted parameter path.
        path: String,
        /// The moment's shape.
        moment: Vec<usize>,
        /// The gradient's shape.
        gradient: Vec<usize>,
    },
    /// A null-space projector does not fit its matrix.
    #[error("parameter `{path}`: {detail}")]
    Projector {
        /// Dotted parameter path.
        path: String,
        /// What does not fit.
        detail: String,
    },
    /// Reading or writing saved state failed.
    #[error("optimizer state `{file}`: {detail}")]
    State {
        /// The file.
        file: String,
        /// What went wrong.
        detail: String,
    },
    /// Reading a tensor back from its device failed.
    #[error("reading tensor data: {0}")]
    TensorRead(String),
    /// Writing saved state failed (`gems_io::Error`: the file and its cause).
    #[error(transparent)]
    Files(#[from] gems_io::Error),
}

impl OptimError {
    pub(crate) fn subspace(path: &str, source: SubspaceError) -> Self {
        Self::Subspace { path: path.to_string(), source }
    }

    pub(crate) fn state(file: impl std::fmt::Display, detail: impl std::fmt::Display) -> Self {
        Self::State { file: file.to_string(), detail: detail.to_string() }
    }
}
