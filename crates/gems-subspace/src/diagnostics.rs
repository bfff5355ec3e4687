//! Measurements of gradients and subspaces, for logging and for choosing ranks.
//!
//! - [`cosine_similarity`]: <A, B>_F / (|A|_F |B|_F), the conflict measure between the rec and
//!   search gradients (GEMS-SPEC §6); negative means the tasks pull apart.
//! - [`principal_angles`]: the angles theta_i = acos(sigma_i(Q_a^T Q_b)) between two subspaces.
//! - [`subspace_overlap`]: |Q_a^T Q_b|_F^2 / min(r_a, r_b) in [0, 1]: 1 when the smaller
//!   subspace lies inside the larger, 0 when they are orthogonal. Logged at each basis refresh
//!   against the previous basis.
//! - [`captured_energy`]: |proj(G)|_F^2 / |G|_F^2 in [0, 1], the share of a gradient a basis keeps.

use burn::tensor::Tensor;
use faer::MatRef;

use crate::basis::SubspaceBasis;
use crate::decompose::singular_values;
use crate::error::{Result, SubspaceError};
use crate::host::matrix_from_tensor;

/// Cosine similarity of two same-shape matrices; 0 when either is zero.
///
/// # Errors
/// Shape mismatch or non-finite input.
pub fn cosine_similarity(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Result<f64> {
    const OP: &str = "cosine_similarity";
    if a.shape() != b.shape() {
        return Err(SubspaceError::shape(
            OP,
            "a",
            &[a.nrows(), a.ncols()],
            "b",
            &[b.nrows(), b.ncols()],
        ));
    }
    let mut dot = 0.0;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            dot += a[(i, j)] * b[(i, j)];
        }
    }
    cosine_from_sums(OP, dot, a.squared_norm_l2(), b.squared_norm_l2())
}

/// [`cosine_similarity`] of two tensors on their device: three reductions, one 3-element read.
///
/// # Errors
/// Shape mismatch, non-finite values, or a failed device read.
pub fn cosine_similarity_tensor(a: &Tensor<2>, b: &Tensor<2>) -> Result<f64> {
    const OP: &str = "cosine_similarity_tensor";
    if a.dims() != b.dims() {
        return Err(SubspaceError::shape(OP, "a", &a.dims(), "b", &b.dims()));
    }
    let sums = Tensor::cat(
        vec![a.clone().mul(b.clone()).sum(), a.clone().square().sum(), b.clone().square().sum()],
        0,
    );
    let host = matrix_from_tensor(&sums.reshape([1, 3]))?;
    cosine_from_sums(OP, host[(0, 0)], host[(0, 1)], host[(0, 2)])
}

fn cosine_from_sums(op: &'static str, dot: f64, aa: f64, bb: f64) -> Result<f64> {
    if !(dot.is_finite() && aa.is_finite() && bb.is_finite()) {
        return Err(SubspaceError::NonFinite { op, what: "gradient" });
    }
    if aa == 0.0 || bb == 0.0 {
        return Ok(0.0);
    }
    Ok((dot / (aa.sqrt() * bb.sqrt())).clamp(-1.0, 1.0))
}

/// Principal angles (radians, ascending) between two subspaces on the same side and dimension;
/// min(r_a, r_b) of them.
///
/// # Errors
/// Different sides or dimensions.
pub fn principal_angles(a: &SubspaceBasis, b: &SubspaceBasis) -> Result<Vec<f64>> {
    let cosines =
        singular_values((a.matrix().transpose() * check_pair("principal_angles", a, b)?).as_ref())?;
    Ok(cosines.into_iter().map(|c| c.clamp(-1.0, 1.0).acos()).collect())
}

/// |Q_a^T Q_b|_F^2 / min(r_a, r_b): the mean squared cosine of the principal angles.
///
/// # Errors
/// Different sides or dimensions.
pub fn subspace_overlap(a: &SubspaceBasis, b: &SubspaceBasis) -> Result<f64> {
    let cross = a.matrix().transpose() * check_pair("subspace_overlap", a, b)?;
    Ok(cross.squared_norm_l2() / a.rank().min(b.rank()) as f64)
}

/// Share of G's squared Frobenius norm inside the basis' subspace, in [0, 1]; 0 for G = 0.
///
/// # Errors
/// As [`SubspaceBasis::project`].
pub fn captured_energy(gradient: MatRef<'_, f64>, basis: &SubspaceBasis) -> Result<f64> {
    let total = gradient.squared_norm_l2();
    let inside = basis.project(gradient)?.squared_norm_l2();
    if !total.is_finite() {
        return Err(SubspaceError::NonFinite { op: "captured_energy", what: "gradient" });
    }
    Ok(if total == 0.0 { 0.0 } else { (inside / total).clamp(0.0, 1.0) })
}

fn check_pair<'a>(
    op: &'static str,
    a: &SubspaceBasis,
    b: &'a SubspaceBasis,
) -> Result<MatRef<'a, f64>> {
    if a.side() != b.side() || a.dim() != b.dim() {
        return Err(SubspaceError::shape(
            op,
            "basis a (dim x rank)",
            &[a.dim(), a.rank()],
            "basis b (dim x rank, same side)",
            &[b.dim(), b.rank()],
        ));
    }
    Ok(b.matrix())
}
