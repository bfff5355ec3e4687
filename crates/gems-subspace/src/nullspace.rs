//! Null-space projectors from general-domain activations (GEMS-SPEC §4).
//!
//! For a tuned layer with outputs y in R^m, the uncentred second moment K = (1/N) sum y y^T
//! over general text says which output directions the pretrained model uses. Its
//! eigendecomposition K = U S U^T splits R^m into directions with large eigenvalues (knowledge
//! to protect) and near-null directions. With U_null the eigenvectors kept by a [`NullSpaceRule`],
//! P = U_null U_null^T is a symmetric idempotent projector, and replacing a gradient G by P G
//! (output side) or G P (input side, AlphaEdit style, K of the layer inputs) leaves the layer's
//! response to general text (to first order) unchanged.
//!
//! P is never stored densely: it is kept as whichever of U_null (P = N N^T) or the protected
//! eigenvectors (P = I - Q Q^T) has fewer columns, so applying it costs 2 * min(k, m - k) * m * n
//! flops instead of m^2 n.

use burn::tensor::{Device, Tensor};
use faer::{Mat, MatRef};
use serde::{Deserialize, Serialize};

use crate::decompose::symmetric_eigen;
use crate::error::{Result, SubspaceError};
use crate::host::{DeviceCopy, ensure_finite, matrix_from_tensor};

/// Which side of the weight's math layout (W is m x n, y = W x) a projector acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum ProjectorSide {
    /// Statistics of layer outputs y (m-dim); P G with P m x m. GEMS' choice.
    #[default]
    Output,
    /// Statistics of layer inputs x (n-dim); G P with P n x n (AlphaEdit).
    Input,
}

/// Which eigen-directions of K count as "null" (free to update).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub enum NullSpaceRule {
    /// Directions with eigenvalue < `tau` (the authors: tau = 2e-2). If none qualify, the
    /// max(1, dim / 20) directions with the smallest eigenvalues (GEMS-SPEC §4 fallback).
    Absolute {
        /// Absolute eigenvalue threshold, >= 0.
        tau: f64,
    },
    /// The largest set of bottom directions whose eigenvalues sum to at most `fraction` of
    /// trace(K), i.e. the protected directions keep at least 1 - fraction of the energy. Same
    /// fallback as `Absolute` when even the smallest eigenvalue exceeds the budget.
    EnergyFraction {
        /// In [0, 1).
        fraction: f64,
    },
    /// Protect exactly the top `k` directions; the other dim - k are null. k < dim.
    RemoveTop {
        /// Number of protected directions.
        k: usize,
    },
}

impl Default for NullSpaceRule {
    fn default() -> Self {
        NullSpaceRule::Absolute { tau: 2e-2 }
    }
}

/// Streaming accumulator of the uncentred second moment sum y y^T (f64).
///
/// Feed it activation rows batch by batch (padding rows excluded by the caller), from host
/// matrices or from tensors on any device, then turn it into a [`NullSpaceProjector`].
#[derive(Debug, Clone)]
pub struct SecondMomentAccumulator {
    sum: Mat<f64>,
    rows: u64,
}

impl SecondMomentAccumulator {
    /// An empty accumulator for `dim`-dimensional rows.
    ///
    /// # Errors
    /// `dim == 0`.
    pub fn new(dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(SubspaceError::invalid(
                "SecondMomentAccumulator::new",
                "dim",
                0,
                "activations need at least one dimension",
            ));
        }
        Ok(Self { sum: Mat::zeros(dim, dim), rows: 0 })
    }

    /// Row dimension.
    pub fn dim(&self) -> usize {
        self.sum.nrows()
    }

    /// Rows accumulated so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Adds the rows of `activations` (rows x dim) in f64.
    ///
    /// # Errors
    /// Wrong column count or non-finite values; the accumulator is left unchanged.
    pub fn add_rows(&mut self, activations: MatRef<'_, f64>) -> Result<()> {
        const OP: &str = "SecondMomentAccumulator::add_rows";
        self.check_cols(OP, activations.nrows(), activations.ncols())?;
        ensure_finite(OP, "activation rows", activations)?;
        self.sum += activations.transpose() * activations;
        self.rows += activations.nrows() as u64;
        Ok(())
    }

    /// Adds the rows of an activation tensor (rows x dim) on any device: X^T X is formed on the
    /// device in the tensor's precision, and only the dim x dim result is read back and added
    /// in f64 (so precision is f32 within a batch, f64 across batches).
    ///
    /// # Errors
    /// Wrong column count, non-finite values, or a failed device read.
    pub fn add_tensor_rows(&mut self, activations: Tensor<2>) -> Result<()> {
        const OP: &str = "SecondMomentAccumulator::add_tensor_rows";
        let [rows, cols] = activations.dims();
        self.check_cols(OP, rows, cols)?;
        if rows == 0 {
            return Ok(());
        }
        let gram = matrix_from_tensor(&activations.clone().transpose().matmul(activations))?;
        ensure_finite(OP, "activation rows", gram.as_ref())?;
        self.sum += gram;
        self.rows += rows as u64;
        Ok(())
    }

    /// Adds another accumulator's rows (for sharded or parallel collection).
    ///
    /// # Errors
    /// Different dimensions.
    pub fn merge(&mut self, other: &SecondMomentAccumulator) -> Result<()> {
        self.check_cols("SecondMomentAccumulator::merge", other.rows as usize, other.dim())?;
        self.sum += &other.sum;
        self.rows += other.rows;
        Ok(())
    }

    /// K = (1/N) sum y y^T.
    ///
    /// # Errors
    /// No rows were accumulated.
    pub fn second_moment(&self) -> Result<Mat<f64>> {
        if self.rows == 0 {
            return Err(SubspaceError::invalid(
                "SecondMomentAccumulator::second_moment",
                "rows",
                0,
                "accumulate at least one activation row first",
            ));
        }
        let mut k = self.sum.clone();
        k *= faer::Scale(1.0 / self.rows as f64);
        Ok(k)
    }

    /// The projector onto the null space of the accumulated second moment.
    ///
    /// # Errors
    /// No rows accumulated, an invalid rule, or an eigensolver failure.
    pub fn projector(
        &self,
        rule: NullSpaceRule,
        side: ProjectorSide,
    ) -> Result<NullSpaceProjector> {
        NullSpaceProjector::from_second_moment(self.second_moment()?.as_ref(), rule, side)
    }

    fn check_cols(&self, op: &'static str, rows: usize, cols: usize) -> Result<()> {
        if cols != self.dim() {
            return Err(SubspaceError::shape(
                op,
                "activations",
                &[rows, cols],
                "accumulator (dim)",
                &[self.dim()],
            ));
        }
        Ok(())
    }
}

/// P = U_null U_null^T for one layer; see the module docs.
#[derive(Debug, Clone)]
pub struct NullSpaceProjector {
    side: ProjectorSide,
    eigenvalues: Vec<f64>,
    null_directions: usize,
    used_fallback: bool,
    /// dim x c: the null basis when `stores_null` (P = B B^T), else the protected basis
    /// (P = I - B B^T); c = min(null, protected).
    basis: Mat<f64>,
    stores_null: bool,
    device_copy: DeviceCopy,
}

impl NullSpaceProjector {
    /// Builds the projector from a symmetric positive semi-definite K (dim x dim).
    ///
    /// # Errors
    /// Non-square or non-finite K, tau < 0, fraction outside [0, 1), k >= dim.
    pub fn from_second_moment(
        second_moment: MatRef<'_, f64>,
        rule: NullSpaceRule,
        side: ProjectorSide,
    ) -> Result<Self> {
        const OP: &str = "NullSpaceProjector::from_second_moment";
        let dim = second_moment.nrows();
        match rule {
            NullSpaceRule::Absolute { tau } if !(tau >= 0.0 && tau.is_finite()) => {
                return Err(SubspaceError::invalid(OP, "tau", tau, "must be finite and >= 0"));
            }
            NullSpaceRule::EnergyFraction { fraction } if !(0.0..1.0).contains(&fraction) => {
                return Err(SubspaceError::invalid(OP, "fraction", fraction, "must lie in [0, 1)"));
            }
            NullSpaceRule::RemoveTop { k } if k >= dim.max(1) => {
                return Err(SubspaceError::invalid(
                    OP,
                    "k",
                    k,
                    format!("must be < dim = {dim} (removing every direction leaves no update)"),
                ));
            }
            _ => {}
        }
        if dim == 0 {
            return Err(SubspaceError::invalid(OP, "dim", 0, "K must be at least 1 x 1"));
        }
        let eigen = symmetric_eigen(second_moment)?;
        let values = &eigen.values; // ascending
        let fallback = (dim / 20).max(1);
        let (null_directions, used_fallback) = match rule {
            NullSpaceRule::Absolute { tau } => {
                let count = values.iter().take_while(|&&v| v < tau).count();
                if count == 0 { (fallback, true) } else { (count, false) }
            }
            NullSpaceRule::EnergyFraction { fraction } => {
                let trace: f64 = values.iter().map(|v| v.max(0.0)).sum();
                let budget = fraction * trace;
                let mut acc = 0.0;
                let count = values
                    .iter()
                    .take_while(|&&v| {
                        acc += v.max(0.0);
                        acc <= budget
                    })
                    .count();
                if count == 0 { (fallback, true) } else { (count, false) }
            }
            NullSpaceRule::RemoveTop { k } => (dim - k, false),
        };
        let stores_null = null_directions <= dim - null_directions;
        let basis = if stores_null {
            eigen.vectors.subcols(0, null_directions).to_owned()
        } else {
            eigen.vectors.subcols(null_directions, dim - null_directions).to_owned()
        };
        Ok(Self {
            side,
            eigenvalues: eigen.values,
            null_directions,
            used_fallback,
            basis,
            stores_null,
            device_copy: DeviceCopy::default(),
        })
    }

    /// The stored pieces, for caching: eigenvalues (ascending), the number of null
    /// directions, whether the fallback was used, and the stored orthonormal basis (dim x c),
    /// which spans the null space when `null_directions <= dim - null_directions` and the
    /// protected space otherwise.
    pub fn parts(&self) -> (&[f64], usize, bool, MatRef<'_, f64>) {
        (&self.eigenvalues, self.null_directions, self.used_fallback, self.basis.as_ref())
    }

    /// Rebuilds a projector from [`parts`](Self::parts) (read back from a cache).
    ///
    /// # Errors
    /// Pieces that do not fit together: wrong basis width for `null_directions`, eigenvalues
    /// of another dimension, non-finite values.
    pub fn from_parts(
        side: ProjectorSide,
        eigenvalues: Vec<f64>,
        null_directions: usize,
        used_fallback: bool,
        basis: Mat<f64>,
    ) -> Result<Self> {
        const OP: &str = "NullSpaceProjector::from_parts";
        let dim = basis.nrows();
        if eigenvalues.len() != dim || null_directions == 0 || null_directions > dim {
            return Err(SubspaceError::invalid(
                OP,
                "null_directions",
                null_directions,
                format!(
                    "must lie in 1..={dim} with {} eigenvalues for dim {dim}",
                    eigenvalues.len()
                ),
            ));
        }
        let stores_null = null_directions <= dim - null_directions;
        let width = if stores_null { null_directions } else { dim - null_directions };
        if basis.ncols() != width {
            return Err(SubspaceError::shape(
                OP,
                "basis",
                &[dim, basis.ncols()],
                "expected",
                &[dim, width],
            ));
        }
        ensure_finite(OP, "basis", basis.as_ref())?;
        if eigenvalues.iter().any(|v| !v.is_finite()) {
            return Err(SubspaceError::invalid(OP, "eigenvalues", "non-finite", "must be finite"));
        }
        Ok(Self {
            side,
            eigenvalues,
            null_directions,
            used_fallback,
            basis,
            stores_null,
            device_copy: DeviceCopy::default(),
        })
    }

    /// Which side of the weight (math layout) the statistics came from.
    pub fn side(&self) -> ProjectorSide {
        self.side
    }

    /// The dimension m (output side) or n (input side).
    pub fn dim(&self) -> usize {
        self.basis.nrows()
    }

    /// Number of null directions kept (the rank of P).
    pub fn null_directions(&self) -> usize {
        self.null_directions
    }

    /// Number of protected directions (dim - null_directions).
    pub fn protected_directions(&self) -> usize {
        self.dim() - self.null_directions
    }

    /// Whether no eigenvalue met the rule and the smallest max(1, dim/20) were taken instead.
    pub fn used_fallback(&self) -> bool {
        self.used_fallback
    }

    /// Eigenvalues of K, ascending.
    pub fn eigenvalues(&self) -> &[f64] {
        &self.eigenvalues
    }

    /// P as a dense dim x dim matrix (for inspection and tests; applying it never needs this).
    pub fn dense(&self) -> Mat<f64> {
        let bbt = &self.basis * self.basis.transpose();
        if self.stores_null { bbt } else { Mat::<f64>::identity(self.dim(), self.dim()) - bbt }
    }

    /// P G for a gradient with `dim()` rows (host).
    ///
    /// # Errors
    /// [`SubspaceError::ShapeMismatch`] when G has a different number of rows.
    pub fn apply_left(&self, gradient: MatRef<'_, f64>) -> Result<Mat<f64>> {
        self.check(
            "NullSpaceProjector::apply_left",
            gradient.nrows(),
            gradient.nrows(),
            gradient.ncols(),
        )?;
        let b = self.basis.as_ref();
        let inner = b * (b.transpose() * gradient);
        Ok(if self.stores_null { inner } else { gradient - inner })
    }

    /// G P for a gradient with `dim()` columns (host).
    ///
    /// # Errors
    /// [`SubspaceError::ShapeMismatch`] when G has a different number of columns.
    pub fn apply_right(&self, gradient: MatRef<'_, f64>) -> Result<Mat<f64>> {
        self.check(
            "NullSpaceProjector::apply_right",
            gradient.ncols(),
            gradient.nrows(),
            gradient.ncols(),
        )?;
        let b = self.basis.as_ref();
        let inner = (gradient * b) * b.transpose();
        Ok(if self.stores_null { inner } else { gradient - inner })
    }

    /// P G on the gradient's device. In Burn's `[d_in, d_out]` weight layout an output-side
    /// projector applies on the right ([`apply_right_tensor`](Self::apply_right_tensor)).
    ///
    /// # Errors
    /// As [`apply_left`](Self::apply_left).
    pub fn apply_left_tensor(&self, gradient: Tensor<2>) -> Result<Tensor<2>> {
        let [rows, cols] = gradient.dims();
        self.check("NullSpaceProjector::apply_left_tensor", rows, rows, cols)?;
        if self.basis.ncols() == 0 {
            return Ok(gradient); // every direction is null: P = I
        }
        let b = self.device_matrix(&gradient.device());
        let inner = b.clone().matmul(b.transpose().matmul(gradient.clone()));
        Ok(if self.stores_null { inner } else { gradient.sub(inner) })
    }

    /// G P on the gradient's device.
    ///
    /// # Errors
    /// As [`apply_right`](Self::apply_right).
    pub fn apply_right_tensor(&self, gradient: Tensor<2>) -> Result<Tensor<2>> {
        let [rows, cols] = gradient.dims();
        self.check("NullSpaceProjector::apply_right_tensor", cols, rows, cols)?;
        if self.basis.ncols() == 0 {
            return Ok(gradient); // every direction is null: P = I
        }
        let b = self.device_matrix(&gradient.device());
        let inner = gradient.clone().matmul(b.clone()).matmul(b.transpose());
        Ok(if self.stores_null { inner } else { gradient.sub(inner) })
    }

    fn device_matrix(&self, device: &Device) -> Tensor<2> {
        self.device_copy.get(self.basis.as_ref(), device)
    }

    fn check(&self, op: &'static str, dim: usize, rows: usize, cols: usize) -> Result<()> {
        if dim != self.dim() {
            return Err(SubspaceError::shape(
                op,
                "gradient",
                &[rows, cols],
                "projector (dim x dim)",
                &[self.dim(), self.dim()],
            ));
        }
        Ok(())
    }
}
