//! Low-rank gradient subspaces: choosing a side, building a basis, projecting onto it.
//!
//! Math layout (GEMS-SPEC §3): a gradient G is m x n. A basis of rank r lives on one side:
//!
//! | side | basis Q | project R = | back-project U = | R's shape |
//! |---|---|---|---|---|
//! | [`Side::Left`] | m x r, top left singular vectors | Q^T G | scale * Q R | r x n |
//! | [`Side::Right`] | n x r, top right singular vectors (B = Q^T) | G Q | scale * R Q^T | m x r |
//!
//! Q has orthonormal columns, so `back_project(project(G), 1)` is the orthogonal projection of
//! G onto the subspace and never has a larger Frobenius norm than G.
//!
//! The basis is computed on the host in f64 and kept there; [`SubspaceBasis::project_tensor`]
//! and [`SubspaceBasis::back_project_tensor`] run on the tensor's own device with an f32 copy of
//! Q that is uploaded once per device and cached, so a training step does two device matmuls
//! and no host round trip.
//!
//! Layout caution: Burn's `Linear` stores its weight as `[d_in, d_out]`, the transpose of the
//! math layout. This module does not know about layouts: it projects whatever matrix it is
//! given, and callers pick the side for the matrix as stored (or use [`ProjectionType`], whose
//! rules depend only on the stored shape).

use std::str::FromStr;

use burn::tensor::{Device, Tensor};
use faer::{Mat, MatRef};
use serde::{Deserialize, Serialize};

use crate::decompose::{
    RandomizedSvdConfig, clip_rank, randomized_svd, randomized_svd_f32, top_singular_vectors,
};
use crate::error::{Result, SubspaceError};
use crate::host::{DeviceCopy, ensure_finite, matrix_from_tensor, tensor_values_f32};
use gems_rng::SplitMix64;

pub use crate::decompose::Side;

/// GaLore's `proj_type`: the rule that picks a [`Side`] from a matrix's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum ProjectionType {
    /// Project the smaller dimension: right if m >= n, else left (GaLore's and GEMS' default).
    #[default]
    Std,
    /// The opposite of `Std`: left if m >= n, else right.
    ReverseStd,
    /// Always left.
    Left,
    /// Always right.
    Right,
}

impl ProjectionType {
    /// The side this rule picks for an m x n matrix.
    pub fn side(self, rows: usize, cols: usize) -> Side {
        match self {
            ProjectionType::Std if rows >= cols => Side::Right,
            ProjectionType::Std => Side::Left,
            ProjectionType::ReverseStd if rows >= cols => Side::Left,
            ProjectionType::ReverseStd => Side::Right,
            ProjectionType::Left => Side::Left,
            ProjectionType::Right => Side::Right,
        }
    }

    /// The name GaLore users write (`std`, `reverse_std`, `left`, `right`).
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectionType::Std => "std",
            ProjectionType::ReverseStd => "reverse_std",
            ProjectionType::Left => "left",
            ProjectionType::Right => "right",
        }
    }
}

impl FromStr for ProjectionType {
    type Err = SubspaceError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "std" => Ok(Self::Std),
            "reverse_std" => Ok(Self::ReverseStd),
            "left" => Ok(Self::Left),
            "right" => Ok(Self::Right),
            other => Err(SubspaceError::invalid(
                "ProjectionType::from_str",
                "proj_type",
                other,
                "expected one of std, reverse_std, left, right",
            )),
        }
    }
}

/// How a basis is computed from a gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SvdMethod {
    /// Exact top-r singular vectors from a full f64 SVD (one side only).
    Exact,
    /// Randomized range finder; see [`randomized_svd`].
    Randomized(RandomizedSvdConfig),
}

impl Default for SvdMethod {
    fn default() -> Self {
        SvdMethod::Randomized(RandomizedSvdConfig::default())
    }
}

/// An orthonormal basis of a rank-r gradient subspace on one side of an m x n matrix.
///
/// Invariants: `matrix()` is dim x rank with orthonormal columns (to f64 rounding), 1 <= rank
/// <= dim, and rank never exceeds min(m, n) of the gradient it was computed from. Bases computed
/// from a gradient have canonical signs: the largest-magnitude entry of every column is positive.
#[derive(Debug, Clone)]
pub struct SubspaceBasis {
    side: Side,
    /// Shared by clones: a basis never changes after construction, so cloning one (as the
    /// optimizer does with its states every step) copies no matrix and keeps the device copy.
    q: std::sync::Arc<Mat<f64>>,
    singular_values: Vec<f64>,
    device_copy: DeviceCopy,
}

impl SubspaceBasis {
    fn new_unchecked(side: Side, q: Mat<f64>, singular_values: Vec<f64>) -> Self {
        Self {
            side,
            q: std::sync::Arc::new(q),
            singular_values,
            device_copy: DeviceCopy::default(),
        }
    }

    /// The top-`rank` singular subspace of `gradient` on `side`.
    ///
    /// The rank is clipped to min(rank, m, n) (read the result's [`rank`](Self::rank)).
    ///
    /// # Errors
    /// `rank == 0`, an empty or non-finite gradient, or an SVD that does not converge.
    pub fn from_gradient(
        gradient: MatRef<'_, f64>,
        rank: usize,
        side: Side,
        method: &SvdMethod,
    ) -> Result<Self> {
        let (q, s) = top_subspace(gradient, rank, side, method)?;
        Ok(Self::new_unchecked(side, q, s))
    }

    /// [`from_gradient`](Self::from_gradient) for a gradient tensor on any device (copied to
    /// the host once: a refresh, not a per-step operation).
    ///
    /// # Errors
    /// As [`from_gradient`](Self::from_gradient), plus a failed device read.
    pub fn from_gradient_tensor(
        gradient: &Tensor<2>,
        rank: usize,
        side: Side,
        method: &SvdMethod,
    ) -> Result<Self> {
        match method {
            SvdMethod::Exact => {
                Self::from_gradient(matrix_from_tensor(gradient)?.as_ref(), rank, side, method)
            }
            SvdMethod::Randomized(config) => {
                // The sketch runs in f32 anyway: read the tensor once, as f32, without a copy
                // into f64.
                let [rows, cols] = gradient.dims();
                let values = tensor_values_f32(gradient)?;
                let view = MatRef::from_row_major_slice(&values, rows, cols);
                let svd = randomized_svd_f32(view, rank, config)?;
                let mut q = if side == Side::Left { svd.u } else { svd.v };
                canonicalize_signs(&mut q);
                Ok(Self::new_unchecked(side, q, svd.s))
            }
        }
    }

    /// A task basis orthogonal to `shared` (GEMS-SPEC §3, option "complement").
    ///
    /// Removes the shared subspace from the gradient (G - G Q_sh Q_sh^T on the right side,
    /// G - Q_sh Q_sh^T G on the left) and takes the top-`rank` subspace of the rest, on the
    /// shared basis' side. The rank is clipped to min(rank, m, n, dim - shared rank). When the
    /// residual has fewer than `rank` significant directions (e.g. the gradient lies inside the
    /// shared subspace), the basis is completed with seeded random directions of the complement,
    /// so the result always has the promised rank and is orthogonal to `shared`.
    ///
    /// # Errors
    /// Shape mismatch between the gradient and `shared`, no room left (dim == shared rank),
    /// plus the errors of [`from_gradient`](Self::from_gradient).
    pub fn complement_from_gradient(
        gradient: MatRef<'_, f64>,
        shared: &SubspaceBasis,
        rank: usize,
        method: &SvdMethod,
    ) -> Result<Self> {
        const OP: &str = "SubspaceBasis::complement_from_gradient";
        let residual = shared.remove_from(gradient)?;
        let (m, n) = gradient.shape();
        let room = shared.dim() - shared.rank();
        if room == 0 {
            return Err(SubspaceError::invalid(
                OP,
                "shared rank",
                shared.rank(),
                format!(
                    "the shared basis spans all {} dimensions; no complement is left",
                    shared.dim()
                ),
            ));
        }
        let rank = clip_rank(OP, rank, m, n)?.min(room);
        let (candidates, s) = top_subspace(residual.as_ref(), rank, shared.side, method)?;
        // Directions of the residual that are numerically zero carry no information and may
        // lean into the shared subspace: keep only the significant ones, fill up the rest.
        // Significance is judged against the gradient, not the residual: a residual made only
        // of rounding error has no meaningful top direction either.
        let tolerance = gradient.norm_l2() * 1e-12 * (shared.dim() as f64);
        let significant = s.iter().take_while(|&&v| v > tolerance && v > 0.0).count();
        let q = orthogonal_completion(&shared.q, candidates.subcols(0, significant), rank);
        let mut values = s[..significant].to_vec();
        values.resize(rank, 0.0);
        Ok(Self::new_unchecked(shared.side, q, values))
    }

    /// Wraps an existing basis (e.g. restored optimizer state). Columns must be orthonormal to
    /// 1e-6 (max |Q^T Q - I|).
    ///
    /// # Errors
    /// Zero columns, more columns than rows, non-finite entries, or non-orthonormal columns.
    pub fn from_orthonormal(side: Side, q: Mat<f64>) -> Result<Self> {
        const OP: &str = "SubspaceBasis::from_orthonormal";
        if q.ncols() == 0 || q.ncols() > q.nrows() {
            return Err(SubspaceError::invalid(
                OP,
                "basis shape",
                format!("{}x{}", q.nrows(), q.ncols()),
                "need dim x rank with 1 <= rank <= dim",
            ));
        }
        ensure_finite(OP, "basis", q.as_ref())?;
        let gram = q.transpose() * &q;
        let mut worst = 0.0f64;
        for i in 0..gram.nrows() {
            for j in 0..gram.ncols() {
                let target = if i == j { 1.0 } else { 0.0 };
                worst = worst.max((gram[(i, j)] - target).abs());
            }
        }
        if worst > 1e-6 {
            return Err(SubspaceError::invalid(
                OP,
                "basis",
                format!("max |Q^T Q - I| = {worst:.3e}"),
                "columns must be orthonormal to 1e-6",
            ));
        }
        let rank = q.ncols();
        Ok(Self::new_unchecked(side, q, vec![f64::NAN; rank]))
    }

    /// The side this basis acts on.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The rank r (number of basis vectors).
    pub fn rank(&self) -> usize {
        self.q.ncols()
    }

    /// The dimension the basis spans: m for a left basis, n for a right basis.
    pub fn dim(&self) -> usize {
        self.q.nrows()
    }

    /// The basis Q, dim x rank, orthonormal columns.
    pub fn matrix(&self) -> MatRef<'_, f64> {
        (*self.q).as_ref()
    }

    /// The singular values belonging to the basis vectors (NaN when the basis was restored with
    /// [`from_orthonormal`](Self::from_orthonormal); 0 for completion directions of a
    /// complement basis).
    pub fn singular_values(&self) -> &[f64] {
        &self.singular_values
    }

    /// The shape of the low-rank representation R of an m x n gradient.
    pub fn projected_shape(&self, rows: usize, cols: usize) -> [usize; 2] {
        match self.side {
            Side::Left => [self.rank(), cols],
            Side::Right => [rows, self.rank()],
        }
    }

    /// R = Q^T G (left) or G Q (right), on the host.
    ///
    /// # Errors
    /// [`SubspaceError::ShapeMismatch`] when G's dimension on the basis' side is not `dim()`.
    pub fn project(&self, gradient: MatRef<'_, f64>) -> Result<Mat<f64>> {
        self.check_gradient("SubspaceBasis::project", &[gradient.nrows(), gradient.ncols()])?;
        Ok(match self.side {
            Side::Left => self.q.transpose() * gradient,
            Side::Right => gradient * &*self.q,
        })
    }

    /// U = scale * Q R (left) or scale * R Q^T (right), on the host.
    ///
    /// # Errors
    /// [`SubspaceError::ShapeMismatch`] when R's rank dimension is not `rank()`.
    pub fn back_project(&self, projected: MatRef<'_, f64>, scale: f64) -> Result<Mat<f64>> {
        self.check_projected(
            "SubspaceBasis::back_project",
            &[projected.nrows(), projected.ncols()],
        )?;
        let mut update = match self.side {
            Side::Left => &*self.q * projected,
            Side::Right => projected * self.q.transpose(),
        };
        if scale != 1.0 {
            update *= faer::Scale(scale);
        }
        Ok(update)
    }

    /// G minus its orthogonal projection onto this subspace: the part of G the basis misses.
    ///
    /// # Errors
    /// As [`project`](Self::project).
    pub fn remove_from(&self, gradient: MatRef<'_, f64>) -> Result<Mat<f64>> {
        let inside = self.back_project(self.project(gradient)?.as_ref(), 1.0)?;
        Ok(gradient - inside)
    }

    /// [`project`](Self::project) on the gradient's device (two lazy transposes and one matmul,
    /// no host transfer after the first call on a device).
    ///
    /// # Errors
    /// [`SubspaceError::ShapeMismatch`] as for [`project`](Self::project).
    pub fn project_tensor(&self, gradient: Tensor<2>) -> Result<Tensor<2>> {
        self.check_gradient("SubspaceBasis::project_tensor", &gradient.dims())?;
        let q = self.device_matrix(&gradient.device());
        Ok(match self.side {
            Side::Left => q.transpose().matmul(gradient),
            Side::Right => gradient.matmul(q),
        })
    }

    /// [`back_project`](Self::back_project) on the tensor's device.
    ///
    /// # Errors
    /// [`SubspaceError::ShapeMismatch`] as for [`back_project`](Self::back_project).
    pub fn back_project_tensor(&self, projected: Tensor<2>, scale: f64) -> Result<Tensor<2>> {
        self.check_projected("SubspaceBasis::back_project_tensor", &projected.dims())?;
        let q = self.device_matrix(&projected.device());
        let update = match self.side {
            Side::Left => q.matmul(projected),
            Side::Right => projected.matmul(q.transpose()),
        };
        Ok(if scale == 1.0 { update } else { update.mul_scalar(scale) })
    }

    /// [`remove_from`](Self::remove_from) on the tensor's device.
    ///
    /// # Errors
    /// As [`project_tensor`](Self::project_tensor).
    pub fn remove_from_tensor(&self, gradient: Tensor<2>) -> Result<Tensor<2>> {
        let inside = self.back_project_tensor(self.project_tensor(gradient.clone())?, 1.0)?;
        Ok(gradient.sub(inside))
    }

    /// Q as an f32 tensor on `device`, uploaded on first use and cached (one device at a time).
    pub fn device_matrix(&self, device: &Device) -> Tensor<2> {
        self.device_copy.get((*self.q).as_ref(), device)
    }

    fn check_gradient(&self, op: &'static str, shape: &[usize]) -> Result<()> {
        let dim = self.side.dim(shape[0], shape[1]);
        if dim != self.dim() {
            return Err(SubspaceError::shape(
                op,
                "gradient",
                shape,
                self.basis_name(),
                &self.shape(),
            ));
        }
        Ok(())
    }

    fn check_projected(&self, op: &'static str, shape: &[usize]) -> Result<()> {
        let rank = match self.side {
            Side::Left => shape[0],
            Side::Right => shape[1],
        };
        if rank != self.rank() {
            return Err(SubspaceError::shape(
                op,
                "projected",
                shape,
                self.basis_name(),
                &self.shape(),
            ));
        }
        Ok(())
    }

    fn shape(&self) -> [usize; 2] {
        [self.dim(), self.rank()]
    }

    fn basis_name(&self) -> &'static str {
        match self.side {
            Side::Left => "left basis (m x rank)",
            Side::Right => "right basis (n x rank)",
        }
    }
}

/// Top-`rank` singular vectors of one side by the chosen method, rank clipped.
fn top_subspace(
    gradient: MatRef<'_, f64>,
    rank: usize,
    side: Side,
    method: &SvdMethod,
) -> Result<(Mat<f64>, Vec<f64>)> {
    let (mut q, s) = match method {
        SvdMethod::Exact => top_singular_vectors(gradient, rank, side)?,
        SvdMethod::Randomized(config) => {
            let svd = randomized_svd(gradient, rank, config)?;
            (if side == Side::Left { svd.u } else { svd.v }, svd.s)
        }
    };
    canonicalize_signs(&mut q);
    Ok((q, s))
}

/// Flips each column so that its entry of largest magnitude (the first one on ties) is
/// positive. Singular vectors are defined only up to sign; fixing it makes bases reproducible
/// across SVD implementations, which matters for optimizers that keep moments across refreshes.
fn canonicalize_signs(q: &mut Mat<f64>) {
    for j in 0..q.ncols() {
        let mut best = 0.0f64;
        let mut sign = 1.0;
        for i in 0..q.nrows() {
            let v = q[(i, j)];
            if v.abs() > best {
                best = v.abs();
                sign = v.signum();
            }
        }
        if sign < 0.0 {
            for i in 0..q.nrows() {
                q[(i, j)] = -q[(i, j)];
            }
        }
    }
}

/// Orthonormal `rank` columns that are orthogonal to `fixed`, starting with the span of
/// `candidates` (which must already be orthonormal and nearly orthogonal to `fixed`), then
/// completed with seeded Gaussian directions. Gram-Schmidt is applied twice per column
/// ("twice is enough", Giraud et al. 2005).
fn orthogonal_completion(fixed: &Mat<f64>, candidates: MatRef<'_, f64>, rank: usize) -> Mat<f64> {
    let dim = fixed.nrows();
    let mut accepted: Vec<Vec<f64>> = Vec::with_capacity(rank);
    let fixed_cols: Vec<Vec<f64>> =
        (0..fixed.ncols()).map(|j| (0..dim).map(|i| fixed[(i, j)]).collect()).collect();
    let mut rng = SplitMix64::new(0x5EED_C0DE);
    let mut next_candidate = 0;
    // Each random draw lands in the complement with probability 1; the bound only guards
    // against pathological rounding.
    let mut attempts = 0;
    while accepted.len() < rank && attempts < 16 * (rank + 1) {
        let mut v: Vec<f64> = if next_candidate < candidates.ncols() {
            next_candidate += 1;
            (0..dim).map(|i| candidates[(i, next_candidate - 1)]).collect()
        } else {
            attempts += 1;
            let mut draw = vec![0.0; dim];
            rng.fill_standard_normal(&mut draw);
            draw
        };
        let original = norm(&v);
        for _ in 0..2 {
            for u in fixed_cols.iter().chain(accepted.iter()) {
                let dot: f64 = u.iter().zip(&v).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(u).for_each(|(x, y)| *x -= dot * y);
            }
        }
        let remaining = norm(&v);
        if original > 0.0 && remaining > 1e-8 * original {
            v.iter_mut().for_each(|x| *x /= remaining);
            accepted.push(v);
        }
    }
    Mat::from_fn(dim, accepted.len(), |i, j| accepted[j][i])
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}
