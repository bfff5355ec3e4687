//! Dense decompositions on the host, in f64, with faer.
//!
//! | function | computes | cost |
//! |---|---|---|
//! | [`thin_svd`] | A = U diag(s) V^T, U m x k, V n x k, k = min(m, n) | O(m n k) |
//! | [`top_singular_vectors`] | the top-r left (U) or right (V) singular vectors only | one SVD, one side |
//! | [`randomized_svd`] | rank-r truncated SVD by a Gaussian range finder | O(m n (r + p)(2q + 2)) |
//! | [`symmetric_eigen`] | A = U diag(w) U^T, w ascending | O(n^3) |
//!
//! All inputs are checked for NaN and infinities first (a non-finite gradient must surface as
//! an error, never as a silently garbage basis). Singular values come sorted non-increasing,
//! eigenvalues non-decreasing, following faer.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::svd::{ComputeSvdVectors, svd, svd_scratch};
use faer::{Mat, MatRef, Side as TriangleSide};
use serde::{Deserialize, Serialize};

use crate::error::{Result, SubspaceError};
use crate::host::{ensure_finite, ensure_rank};
use gems_rng::SplitMix64;

/// Which side of an m x n matrix a basis acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// An m x r basis of the column space (left singular vectors); R = Q^T G is r x n.
    Left,
    /// An n x r basis of the row space (right singular vectors); R = G Q is m x r.
    Right,
}

impl Side {
    /// The length of the dimension this side's basis spans, for an m x n matrix.
    pub fn dim(self, rows: usize, cols: usize) -> usize {
        match self {
            Side::Left => rows,
            Side::Right => cols,
        }
    }
}

/// A thin singular value decomposition `A = U diag(s) V^T`.
#[derive(Debug, Clone)]
pub struct ThinSvd {
    /// Left singular vectors, m x k with orthonormal columns, k = min(m, n).
    pub u: Mat<f64>,
    /// Singular values, length k, non-negative and non-increasing.
    pub s: Vec<f64>,
    /// Right singular vectors, n x k with orthonormal columns.
    pub v: Mat<f64>,
}

/// Thin SVD of an m x n matrix (f64, faer's divide-and-conquer bidiagonal SVD).
///
/// # Errors
/// [`SubspaceError::NonFinite`] for NaN/inf input, [`SubspaceError::NoConvergence`] if faer's
/// iteration limit is hit.
pub fn thin_svd(a: MatRef<'_, f64>) -> Result<ThinSvd> {
    const OP: &str = "thin_svd";
    ensure_finite(OP, "matrix", a)?;
    let svd = a.thin_svd().map_err(|_| no_convergence(OP, a))?;
    Ok(ThinSvd {
        u: svd.U().to_owned(),
        s: svd.S().column_vector().iter().copied().collect(),
        v: svd.V().to_owned(),
    })
}

/// Singular values of `a`, non-increasing (no vectors computed).
///
/// # Errors
/// As [`thin_svd`].
pub fn singular_values(a: MatRef<'_, f64>) -> Result<Vec<f64>> {
    const OP: &str = "singular_values";
    ensure_finite(OP, "matrix", a)?;
    a.singular_values().map_err(|_| no_convergence(OP, a))
}

/// The exact top-`rank` singular vectors of one side, with their singular values.
///
/// Returns `(q, s)`: `q` is m x r (left, columns of U) or n x r (right, columns of V) with
/// orthonormal columns, and `s` the r largest singular values, non-increasing. The rank is
/// clipped to min(rank, m, n). Only the requested side's vectors are computed, which saves
/// about a third of the time of a full thin SVD.
///
/// # Errors
/// `rank == 0` or an empty matrix is [`SubspaceError::InvalidParameter`]; otherwise as
/// [`thin_svd`].
pub fn top_singular_vectors(
    a: MatRef<'_, f64>,
    rank: usize,
    side: Side,
) -> Result<(Mat<f64>, Vec<f64>)> {
    const OP: &str = "top_singular_vectors";
    let rank = clip_rank(OP, rank, a.nrows(), a.ncols())?;
    ensure_finite(OP, "matrix", a)?;
    let (m, n) = a.shape();
    let k = m.min(n);
    let par = faer::get_global_parallelism();
    let (cu, cv) = match side {
        Side::Left => (ComputeSvdVectors::Thin, ComputeSvdVectors::No),
        Side::Right => (ComputeSvdVectors::No, ComputeSvdVectors::Thin),
    };
    let mut s = faer::diag::Diag::<f64>::zeros(k);
    let mut vectors = Mat::<f64>::zeros(if side == Side::Left { m } else { n }, k);
    let mut buffer = MemBuffer::new(svd_scratch::<f64>(m, n, cu, cv, par, Default::default()));
    let stack = MemStack::new(&mut buffer);
    let result = match side {
        Side::Left => {
            svd(a, s.as_mut(), Some(vectors.as_mut()), None, par, stack, Default::default())
        }
        Side::Right => {
            svd(a, s.as_mut(), None, Some(vectors.as_mut()), par, stack, Default::default())
        }
    };
    result.map_err(|_| no_convergence(OP, a))?;
    let values = s.column_vector().iter().take(rank).copied().collect();
    Ok((vectors.subcols(0, rank).to_owned(), values))
}

/// Settings of the randomized range finder (Halko, Martinsson, Tropp 2011, Alg. 4.4 + 5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RandomizedSvdConfig {
    /// Extra sketch columns beyond the rank (p). 8 is Halko's default and enough in practice.
    pub oversampling: usize,
    /// Subspace (power) iterations (q). Each sharpens a decaying spectrum by a power of 2q+1;
    /// 2 is enough for gradient spectra (BURN-NOTES.md: overlap >= 0.98).
    pub power_iterations: usize,
    /// Seed of the Gaussian sketch. Record it: the result is a deterministic function of
    /// (matrix, rank, config).
    pub seed: u64,
}

impl Default for RandomizedSvdConfig {
    fn default() -> Self {
        Self { oversampling: 8, power_iterations: 2, seed: 0 }
    }
}

/// A rank-r truncated SVD `A ~ U diag(s) V^T`.
#[derive(Debug, Clone)]
pub struct TruncatedSvd {
    /// m x r, orthonormal columns.
    pub u: Mat<f64>,
    /// r leading singular values (estimates), non-increasing.
    pub s: Vec<f64>,
    /// n x r, orthonormal columns.
    pub v: Mat<f64>,
}

/// Randomized rank-`rank` SVD of an m x n matrix.
///
/// Algorithm: draw a Gaussian sketch Omega (n x l, l = r + oversampling) from the seed;
/// Q = orth(A Omega); `power_iterations` times: Q = orth(A orth(A^T Q)) (re-orthonormalising
/// between products keeps the tail from being lost to rounding); B = Q^T A (l x n); thin SVD of
/// B = U_b S V^T; U = Q U_b; keep the first r. The products with A run in f32 (they are the
/// whole cost); Q is re-orthonormalised and the small SVD computed in f64, so U and V are
/// orthonormal to f64 precision. When l >= min(m, n) the sketch would not save
/// anything and the exact thin SVD is used instead.
///
/// Accuracy: for a spectrum decaying like i^-1.5 the subspace overlap with the exact top-r is
/// >= 0.99 with 2 power iterations (property-tested up to r = 32).
///
/// # Errors
/// `rank == 0` or an empty matrix is [`SubspaceError::InvalidParameter`]; NaN/inf input is
/// [`SubspaceError::NonFinite`]; faer non-convergence is [`SubspaceError::NoConvergence`].
pub fn randomized_svd(
    a: MatRef<'_, f64>,
    rank: usize,
    config: &RandomizedSvdConfig,
) -> Result<TruncatedSvd> {
    const OP: &str = "randomized_svd";
    let rank = clip_rank(OP, rank, a.nrows(), a.ncols())?;
    ensure_finite(OP, "matrix", a)?;
    let (m, n) = a.shape();
    let sketch = (rank + config.oversampling).min(m.min(n));
    if sketch >= m.min(n) {
        return exact_truncated(a, rank);
    }
    let a32 = Mat::<f32>::from_fn(m, n, |i, j| a[(i, j)] as f32);
    range_finder(OP, a32.as_ref(), rank, sketch, config)
}

/// [`randomized_svd`] of an f32 matrix, e.g. a gradient read back from a device (a row-major
/// `MatRef::from_row_major_slice` view of the tensor data needs no copy). Same algorithm and
/// results up to rounding; skips the f64 -> f32 conversion pass.
///
/// # Errors
/// As [`randomized_svd`].
pub fn randomized_svd_f32(
    a: MatRef<'_, f32>,
    rank: usize,
    config: &RandomizedSvdConfig,
) -> Result<TruncatedSvd> {
    const OP: &str = "randomized_svd_f32";
    let rank = clip_rank(OP, rank, a.nrows(), a.ncols())?;
    if !a.is_all_finite() {
        return Err(SubspaceError::NonFinite { op: OP, what: "matrix" });
    }
    let (m, n) = a.shape();
    let sketch = (rank + config.oversampling).min(m.min(n));
    if sketch >= m.min(n) {
        let a64 = Mat::<f64>::from_fn(m, n, |i, j| f64::from(a[(i, j)]));
        return exact_truncated(a64.as_ref(), rank);
    }
    range_finder(OP, a, rank, sketch, config)
}

fn exact_truncated(a: MatRef<'_, f64>, rank: usize) -> Result<TruncatedSvd> {
    let full = thin_svd(a)?;
    Ok(TruncatedSvd {
        u: full.u.subcols(0, rank).to_owned(),
        s: full.s[..rank].to_vec(),
        v: full.v.subcols(0, rank).to_owned(),
    })
}

/// The randomized range finder on an f32 matrix. The 2q + 2 products with A are the whole
/// cost; they run in f32, where faer's matmul is about twice as fast as in f64. The range is
/// found to f32 accuracy (~1e-7 relative), far below what a gradient subspace needs, and every
/// returned factor is re-orthonormalised or computed in f64.
fn range_finder(
    op: &'static str,
    a: MatRef<'_, f32>,
    rank: usize,
    sketch: usize,
    config: &RandomizedSvdConfig,
) -> Result<TruncatedSvd> {
    let (m, n) = a.shape();
    let mut rng = SplitMix64::new(config.seed);
    let mut draws = vec![0.0; n * sketch];
    rng.fill_standard_normal(&mut draws);
    let omega = Mat::from_fn(n, sketch, |i, j| draws[j * n + i] as f32);
    let mut q = (a * &omega).qr().compute_thin_Q();
    for _ in 0..config.power_iterations {
        let z = (a.transpose() * &q).qr().compute_thin_Q();
        q = (a * &z).qr().compute_thin_Q();
    }
    let b32 = q.transpose() * a; // sketch x n
    let q = orthonormal_columns(&Mat::from_fn(m, sketch, |i, j| f64::from(q[(i, j)])));
    let b = Mat::from_fn(sketch, n, |i, j| f64::from(b32[(i, j)]));
    let small = b.thin_svd().map_err(|_| SubspaceError::NoConvergence {
        op,
        detail: format!(
            "faer reached its iteration limit on the {sketch}x{n} sketch of a {m}x{n} matrix"
        ),
    })?;
    let u = &q * small.U().subcols(0, rank);
    Ok(TruncatedSvd {
        u,
        s: small.S().column_vector().iter().take(rank).copied().collect(),
        v: small.V().subcols(0, rank).to_owned(),
    })
}

/// Symmetric eigendecomposition `A = U diag(w) U^T` of a square matrix, eigenvalues ascending.
///
/// Only the lower triangle of `a` is read (the caller vouches for symmetry, as LAPACK's
/// `dsyevd` does). Eigenvectors are orthonormal to f64 precision, so the bottom of the spectrum
/// (null spaces) is reliable.
#[derive(Debug, Clone)]
pub struct SymmetricEigen {
    /// Eigenvalues, non-decreasing.
    pub values: Vec<f64>,
    /// Eigenvectors as columns, in the order of `values`.
    pub vectors: Mat<f64>,
}

/// See [`SymmetricEigen`].
///
/// # Errors
/// A non-square matrix is [`SubspaceError::ShapeMismatch`]; otherwise as [`thin_svd`].
pub fn symmetric_eigen(a: MatRef<'_, f64>) -> Result<SymmetricEigen> {
    const OP: &str = "symmetric_eigen";
    if a.nrows() != a.ncols() {
        return Err(SubspaceError::shape(OP, "rows", &[a.nrows()], "columns", &[a.ncols()]));
    }
    ensure_finite(OP, "matrix", a)?;
    let evd = a.self_adjoint_eigen(TriangleSide::Lower).map_err(|_| no_convergence(OP, a))?;
    Ok(SymmetricEigen {
        values: evd.S().column_vector().iter().copied().collect(),
        vectors: evd.U().to_owned(),
    })
}

/// Q of a thin Householder QR: orthonormal columns spanning the columns of `y` (when `y` has
/// full column rank; otherwise still orthonormal, completing the span arbitrarily).
pub(crate) fn orthonormal_columns(y: &Mat<f64>) -> Mat<f64> {
    y.qr().compute_thin_Q()
}

/// Clips a requested rank to min(rank, m, n); zero rank or an empty matrix is an error.
pub(crate) fn clip_rank(op: &'static str, rank: usize, m: usize, n: usize) -> Result<usize> {
    ensure_rank(op, rank)?;
    if m == 0 || n == 0 {
        return Err(SubspaceError::invalid(
            op,
            "matrix shape",
            format!("{m}x{n}"),
            "a subspace of an empty matrix is undefined",
        ));
    }
    Ok(rank.min(m).min(n))
}

fn no_convergence(op: &'static str, a: MatRef<'_, f64>) -> SubspaceError {
    SubspaceError::NoConvergence {
        op,
        detail: format!("faer reached its iteration limit on a {}x{} matrix", a.nrows(), a.ncols()),
    }
}
