//! Subspace math for GEMS (Gradient Multi-Subspace Tuning), usable on its own.
//!
//! This crate knows nothing of models, datasets or training loops: it turns matrices into
//! bases and projectors and applies them. `gems-optim` builds the optimizer on top.
//!
//! - [`decompose`]: thin SVD, exact top-r singular vectors of one side, randomized SVD with an
//!   explicit seed, symmetric eigendecomposition. Host-side, f64, faer.
//! - [`basis`]: [`SubspaceBasis`] (orthonormal, one side, rank clipped), GaLore's side rules
//!   ([`ProjectionType`]), projection and back-projection on host matrices and on Burn tensors
//!   on any device, removal of a subspace and complement bases.
//! - [`nullspace`]: [`SecondMomentAccumulator`] and [`NullSpaceProjector`] (GEMS-SPEC §4).
//! - [`diagnostics`]: cosine of gradients, principal angles, subspace overlap, captured energy.
//!
//! All fallible functions return [`Result`] with one error type, [`SubspaceError`]: bad shapes,
//! NaN, non-convergence and invalid parameters are errors, never panics.
//!
//! ```
//! use gems_subspace::{ProjectionType, SubspaceBasis, SvdMethod};
//! use faer::Mat;
//!
//! // A 6 x 4 gradient of rank 2: g[i][j] = i * j + 1 = [i, 1] . [j, 1].
//! let g = Mat::from_fn(6, 4, |i, j| (i * j) as f64 + 1.0);
//! let side = ProjectionType::Std.side(6, 4); // m >= n: project on the right
//! let basis = SubspaceBasis::from_gradient(g.as_ref(), 2, side, &SvdMethod::Exact)?;
//! let r = basis.project(g.as_ref())?; // 6 x 2
//! let update = basis.back_project(r.as_ref(), 1.0)?; // 6 x 4, the rank-2 part of g
//! assert_eq!((r.nrows(), r.ncols()), (6, 2));
//! assert!((&g - &update).norm_l2() < 1e-9 * g.norm_l2());
//! # Ok::<(), gems_subspace::SubspaceError>(())
//! ```

pub mod basis;
pub mod decompose;
pub mod diagnostics;
pub mod error;
pub mod host;
pub mod nullspace;

pub use basis::{ProjectionType, Side, SubspaceBasis, SvdMethod};
pub use decompose::{
    RandomizedSvdConfig, SymmetricEigen, ThinSvd, TruncatedSvd, randomized_svd, randomized_svd_f32,
    singular_values, symmetric_eigen, thin_svd, top_singular_vectors,
};
pub use diagnostics::{
    captured_energy, cosine_similarity, cosine_similarity_tensor, principal_angles,
    subspace_overlap,
};
pub use error::{Result, SubspaceError};
pub use host::{device_uploads, matrix_from_tensor, tensor_from_matrix, tensor_values_f32};
pub use nullspace::{NullSpaceProjector, NullSpaceRule, ProjectorSide, SecondMomentAccumulator};
