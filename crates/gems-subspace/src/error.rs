//! The one error type of this crate.
//!
//! Every failure a caller can provoke with data (a shape that does not fit, a NaN in a
//! gradient, a decomposition that does not converge, a rank of zero) is a value of
//! [`SubspaceError`], never a panic. Messages name the operation and the offending values so a
//! log line is enough to find the bug.

/// Result alias of this crate.
pub type Result<T, E = SubspaceError> = std::result::Result<T, E>;

/// Everything that can go wrong in subspace math.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum SubspaceError {
    /// Two operands (or an operand and a basis) have incompatible shapes.
    #[error("{op}: shape mismatch, {left_name} is {left:?} but {right_name} is {right:?}")]
    ShapeMismatch {
        /// The operation that failed, e.g. `"SubspaceBasis::project"`.
        op: &'static str,
        /// What the left shape belongs to, e.g. `"gradient"`.
        left_name: &'static str,
        /// The left shape.
        left: Vec<usize>,
        /// What the right shape belongs to, e.g. `"basis (right side, dim x rank)"`.
        right_name: &'static str,
        /// The right shape.
        right: Vec<usize>,
    },
    /// The input holds NaN or an infinity.
    #[error("{op}: {what} contains a non-finite value (NaN or infinity)")]
    NonFinite {
        /// The operation that failed.
        op: &'static str,
        /// Which input, e.g. `"matrix"` or `"activation rows"`.
        what: &'static str,
    },
    /// An iterative decomposition hit its iteration limit.
    #[error("{op}: {detail}")]
    NoConvergence {
        /// The operation that failed.
        op: &'static str,
        /// What did not converge, with the input shape.
        detail: String,
    },
    /// A parameter is outside its valid range.
    #[error("{op}: invalid {name} = {value}: {reason}")]
    InvalidParameter {
        /// The operation that failed.
        op: &'static str,
        /// The parameter's name as the API spells it, e.g. `"rank"`.
        name: &'static str,
        /// The value given, formatted.
        value: String,
        /// What would be valid.
        reason: String,
    },
    /// Reading a tensor back from its device failed.
    #[error("{op}: could not read tensor data: {detail}")]
    TensorRead {
        /// The operation that failed.
        op: &'static str,
        /// The backend's message.
        detail: String,
    },
}

impl SubspaceError {
    pub(crate) fn shape(
        op: &'static str,
        left_name: &'static str,
        left: &[usize],
        right_name: &'static str,
        right: &[usize],
    ) -> Self {
        Self::ShapeMismatch {
            op,
            left_name,
            left: left.to_vec(),
            right_name,
            right: right.to_vec(),
        }
    }

    pub(crate) fn invalid(
        op: &'static str,
        name: &'static str,
        value: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Self::InvalidParameter { op, name, value: value.to_string(), reason: reason.into() }
    }
}
