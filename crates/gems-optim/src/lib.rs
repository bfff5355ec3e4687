//! The GEMS optimizer (Gradient Multi-Subspace Tuning) and its baselines, for Burn modules.
//!
//! GEMS-SPEC §3-5 is the specification. Per optimizer step and per tuned weight matrix W
//! (math layout m x n; Burn's `[d_in, d_out]` storage is translated, see [`WeightLayout`]):
//!
//! 1. G_sh = (n_rec G_rec + n_src G_src) / N, or a separately computed shared gradient;
//! 2. G_X <- P G_X with the layer's [`gems_subspace::NullSpaceProjector`] (if enabled);
//! 3. at t = 1, T, 2T, ... (the authors' schedule): top-r_X singular subspace of each G_X
//!    (ranks r, r/2, r/2, clipped; side by GaLore's `proj_type`; exact or randomized SVD;
//!    optional complement bases);
//! 4. R_X = projection of G_X; 5. Adam moments per subspace; 6. U_X = alpha * back-projection;
//! 7. W <- W - lr c_t (U_sh + g_rec U_rec + g_src U_src), then decoupled weight decay;
//! 8. optionally re-apply P to the update (strict mode).
//!
//! Every other parameter gets AdamW on G_sh. Methods ([`Method`]): `gems`, `galore`, `full`,
//! `pcgrad`, `lora` (optimizer side), with the ablations as settings of [`GemsSettings`].
//!
//! ```no_run
//! # use gems_optim::*;
//! # fn demo<M: burn::module::Module + Clone>(model: M, grads: StepGradients) -> Result<()> {
//! let mut optimizer = Optimizer::new(OptimizerConfig::for_method(Method::Gems))?;
//! let (model, report) = optimizer.step(5e-4, &model, grads)?;
//! println!("gates {:?}, mean rec/search cosine {:?}", report.gates, report.mean_cosine);
//! # Ok(()) }
//! ```

pub mod accumulate;
pub mod adam;
pub mod config;
pub mod error;
mod fused;
pub mod matrix;
pub mod methods;
pub mod optimizer;
pub mod state;

pub use accumulate::GradientWindow;
pub use config::{
    GatePolicy, GemsSettings, LrScale, Method, MomentPolicy, NullSpaceSettings, OptimizerConfig,
    Subspace, TrainedRows, WeightLayout, default_targets, is_refresh_step, path_matches,
};
pub use error::{OptimError, Result};
pub use matrix::{MatrixGradients, MatrixState, RefreshReport, SubspaceState};
pub use methods::{MethodRule, TaskTotals};
pub use optimizer::{
    MatrixReport, Optimizer, StepGradients, StepReport, TaskGradient, heuristic_gates,
};
