//! The subspace update of one tuned matrix, in the math layout of GEMS-SPEC §3.
//!
//! [`MatrixState`] holds, per subspace (shared, rec, search), a basis and its Adam moments. It
//! works on the matrix as stored (no transposes on the hot path): for Burn's `[d_in, d_out]`
//! storage of W^T, a right basis of W is used as a left basis of W^T, and an output-side
//! projector is applied on the right. A step takes the three gradients (already averaged over
//! the window), and returns
//! the combined direction U_sh + g_rec U_rec + g_src U_src; the caller applies the learning
//! rate, bias correction and weight decay (shared with AdamW in [`crate::adam`]).

use burn::tensor::Tensor;
use faer::Mat;
use gems_subspace::{
    NullSpaceProjector, ProjectorSide, RandomizedSvdConfig, Side, SubspaceBasis, SvdMethod,
    matrix_from_tensor, subspace_overlap,
};

use crate::adam::AdamMoments;
use crate::config::{MomentPolicy, OptimizerConfig, Subspace, WeightLayout};
use crate::error::{OptimError, Result};

/// Basis and moments of one subspace of one matrix.
#[derive(Debug, Clone)]
pub struct SubspaceState {
    /// Which subspace.
    pub kind: Subspace,
    /// The current basis (None before the first refresh).
    pub basis: Option<SubspaceBasis>,
    /// Adam moments of the projected gradient R (None before the first step).
    pub moments: Option<AdamMoments<2>>,
}

impl SubspaceState {
    /// Advances the Adam moments with the projected gradient `r` (zero moments at the first
    /// step) and returns the normalised direction N.
    fn adam_direction(
        &mut self,
        path: &str,
        r: Tensor<2>,
        config: &OptimizerConfig,
    ) -> Result<Tensor<2>> {
        // Taken out and put back (this state is the step's own copy: an error discards it).
        let moments = match self.moments.take() {
            Some(m) => m,
            None => AdamMoments::zeros_like(&r),
        };
        moments.check_shape(&r, path)?;
        let (moments, n) = moments.advance(r, config.beta1, config.beta2, config.eps);
        self.moments = Some(moments);
        Ok(n)
    }
}

/// What a refresh measured for one subspace.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RefreshReport {
    /// Which subspace.
    pub subspace: Subspace,
    /// Rank after clipping.
    pub rank: usize,
    /// Overlap |Q_old^T Q_new|_F^2 / r with the previous basis (None at the first refresh).
    pub overlap_with_previous: Option<f64>,
}

/// Optimizer state of one tuned matrix (math layout m x n).
#[derive(Debug, Clone)]
pub struct MatrixState {
    /// Shape of the matrix as stored (for Burn's `Linear`, `[d_in, d_out]` = W^T).
    pub shape: [usize; 2],
    /// The side of the stored matrix every basis acts on: the math-layout side of
    /// `proj_type`, flipped when the stored matrix is W^T (a right basis of W is a left basis
    /// of W^T, with the same vectors).
    pub side: Side,
    /// Whether the stored matrix is W^T (layout `in_out`).
    pub transposed: bool,
    /// [Q_sh | Q_rec | Q_src] on the device, built once per refresh (not saved; rebuilt after
    /// a load).
    pub(crate) combined_basis: Option<Tensor<2>>,
    /// P [Q_sh | Q_rec | Q_src] for strict mode with the projector P on the bases' side, built
    /// with `combined_basis` (not saved either).
    pub(crate) projected_basis: Option<Tensor<2>>,
    /// P Q_X of each subspace X (in the order of `subspaces`) where the null-space projector P
    /// acts on the bases' side: what [`project_onto`] projects a gradient onto between
    /// refreshes, built at the first step after a refresh and kept until the next (not saved).
    pub(crate) projected_each: Vec<Option<Tensor<2>>>,
    /// One entry per subspace, in the order of [`OptimizerConfig::subspaces`].
    pub subspaces: Vec<SubspaceState>,
}

/// The per-task gradients of one matrix, as stored, each averaged over the window. A missing
/// task gradient counts as zero.
#[derive(Debug, Clone)]
pub struct MatrixGradients {
    /// G_sh.
    pub shared: Tensor<2>,
    /// G_rec.
    pub rec: Option<Tensor<2>>,
    /// G_src.
    pub search: Option<Tensor<2>>,
}

impl MatrixState {
    /// Empty state for a matrix stored with `shape`; the side follows `config.gems.proj_type`
    /// applied to the math-layout shape m x n.
    pub fn new(shape: [usize; 2], config: &OptimizerConfig) -> Self {
        let transposed = config.layout == WeightLayout::InOut;
        let side = if transposed {
            match config.gems.proj_type.side(shape[1], shape[0]) {
                Side::Left => Side::Right,
                Side::Right => Side::Left,
            }
        } else {
            config.gems.proj_type.side(shape[0], shape[1])
        };
        let subspaces = config
            .subspaces()
            .iter()
            .map(|&kind| SubspaceState { kind, basis: None, moments: None })
            .collect();
        Self {
            shape,
            side,
            transposed,
            subspaces,
            combined_basis: None,
            projected_basis: None,
            projected_each: Vec::new(),
        }
    }

    /// One step; returns `step_scale` times the combined direction U_sh + g_rec U_rec +
    /// g_src U_src (the caller passes lr, bias correction and weight-decay factors here so they
    /// cost nothing on the full-size tensor) and, on a refresh step, what each refresh measured.
    ///
    /// # Errors
    /// Shape mismatches (gradient or projector), NaN in a gradient at a refresh, SVD failure.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        path: &str,
        step: u64,
        gradients: MatrixGradients,
        projector: Option<&NullSpaceProjector>,
        gates: (f64, f64),
        step_scale: f64,
        config: &OptimizerConfig,
    ) -> Result<(Tensor<2>, Option<Vec<RefreshReport>>)> {
        let settings = &config.gems;
        let (mut grads, device) = self.subspace_gradients(path, gradients)?;
        // 2. Null-space projection of every gradient.
        let transposed = self.transposed;
        let project_null = |g: Tensor<2>| -> Result<Tensor<2>> {
            match projector {
                None => Ok(g),
                Some(p) => apply_projector(path, p, g, transposed),
            }
        };

        // 3. Refresh at t = 1, T, 2T, ... (the authors' schedule): the SVDs need P G itself.
        // Between refreshes only the projection of P G onto the basis is used, and that is
        // computed without forming P G (see `project_onto`).
        let refresh = crate::config::is_refresh_step(step, settings.update_proj_gap);
        let reports = if refresh {
            grads = grads.into_iter().map(project_null).collect::<Result<_>>()?;
            // P G has rank at most rank(P): directions beyond it would be arbitrary, and Adam
            // would amplify the rounding noise the gradient has along them.
            let rank_cap = projector.map(NullSpaceProjector::null_directions);
            Some(self.refresh(path, step, &grads, rank_cap, config)?)
        } else {
            None
        };
        let null_space = if refresh { None } else { projector };

        // 4-7. Project, Adam in the subspace, back-project, gate. The three back-projections
        // are one matmul over the concatenated bases, with alpha, the gate and the caller's
        // `step_scale` folded into the small N_X: U = [Q_sh|Q_rec|Q_src] [c N_sh; c g N_rec; ...]
        // (left side) or [c N_sh | ...] [Q_sh|Q_rec|Q_src]^T (right side). That writes one m x n
        // tensor instead of three, plus the sums.
        let mut scaled = Vec::with_capacity(self.subspaces.len());
        if self.projected_each.len() != self.subspaces.len()
            || self.projected_each.iter().flatten().any(|pq| pq.device() != device)
        {
            self.projected_each = vec![None; self.subspaces.len()];
        }
        let each = self.subspaces.iter_mut().zip(grads).zip(&mut self.projected_each);
        for ((state, g), projected) in each {
            let Some(basis) = state.basis.as_ref() else {
                return Err(OptimError::state(
                    path,
                    "no basis: state restored without bases at a non-refresh step",
                ));
            };
            let r = project_onto(path, basis, null_space, transposed, g, projected)?;
            let n = state.adam_direction(path, r, config)?;
            let gate = match state.kind {
                Subspace::Shared => 1.0,
                Subspace::Rec => gates.0,
                Subspace::Search => gates.1,
            };
            scaled.push(n.mul_scalar(settings.scale * gate * step_scale));
        }
        if scaled.is_empty() {
            return Err(OptimError::InvalidConfig("no subspace configured".into()));
        }
        let strict = if settings.strict_null_space { projector } else { None };
        let (q, factors) = self.back_projection_factors(path, scaled, strict, &device)?;
        let update = match self.side {
            Side::Left => q.matmul(factors),
            Side::Right => factors.matmul(q.transpose()),
        };
        Ok((update, reports))
    }

    /// Checks the gradients' shapes against the matrix and returns one gradient per subspace,
    /// in the order of `self.subspaces` (zeros for a missing task), and their device.
    fn subspace_gradients(
        &self,
        path: &str,
        gradients: MatrixGradients,
    ) -> Result<(Vec<Tensor<2>>, burn::tensor::Device)> {
        let check = |g: &Tensor<2>| -> Result<()> {
            if g.dims() != self.shape {
                return Err(OptimError::GradientShape {
                    path: path.to_string(),
                    gradient: g.dims().to_vec(),
                    parameter: self.shape.to_vec(),
                });
            }
            Ok(())
        };
        check(&gradients.shared)?;
        let device = gradients.shared.device();
        let zeros = || gradients.shared.zeros_like();
        let mut task_gradients = [Some(gradients.shared.clone()), gradients.rec, gradients.search];
        for g in task_gradients.iter().flatten() {
            check(g)?;
        }
        let mut grads: Vec<Tensor<2>> = Vec::with_capacity(self.subspaces.len());
        for state in &self.subspaces {
            grads.push(task_gradients[state.kind.index()].take().unwrap_or_else(zeros));
        }
        Ok((grads, device))
    }

    /// The two factors of the update: the concatenated bases Q = [Q_sh|Q_rec|Q_src] (dim x r,
    /// built once per refresh) and the scaled N_X stacked on the other side. In strict mode
    /// (step 8: the update itself lies in the null space) the projector P is folded into one of
    /// the factors, so the update is never projected at full size: with P on the bases' side,
    /// P (Q N) = (P Q) N, and P Q is cached with Q; on the other side, (Q N) P = Q (N P), with
    /// N P of the small factor's size. Exact in exact arithmetic; the full-size projection
    /// cost 4 m n k per matrix and step (k the projector's width), these cost 4 r n k at most.
    fn back_projection_factors(
        &mut self,
        path: &str,
        scaled: Vec<Tensor<2>>,
        strict: Option<&NullSpaceProjector>,
        device: &burn::tensor::Device,
    ) -> Result<(Tensor<2>, Tensor<2>)> {
        if self.combined_basis.as_ref().is_some_and(|q| q.device() != *device) {
            self.combined_basis = None;
            self.projected_basis = None;
        }
        let subspaces = &self.subspaces;
        let q = self
            .combined_basis
            .get_or_insert_with(|| {
                let bases = subspaces
                    .iter()
                    .filter_map(|s| s.basis.as_ref().map(|b| b.device_matrix(device)))
                    .collect();
                Tensor::cat(bases, 1) // dim x (r_sh + r_rec + r_src)
            })
            .clone();
        let factors = match self.side {
            Side::Left => Tensor::cat(scaled, 0),
            Side::Right => Tensor::cat(scaled, 1),
        };
        let Some(p) = strict else { return Ok((q, factors)) };
        let p_on_rows = projector_on_rows(path, p, self.shape, self.transposed)?;
        if p_on_rows != (self.side == Side::Left) {
            return Ok((q, apply_projector(path, p, factors, self.transposed)?));
        }
        let pq = match &self.projected_basis {
            Some(pq) => pq.clone(),
            None => {
                let pq = p.apply_left_tensor(q).map_err(|e| OptimError::subspace(path, e))?;
                self.projected_basis = Some(pq.clone());
                pq
            }
        };
        Ok((pq, factors))
    }

    fn refresh(
        &mut self,
        path: &str,
        step: u64,
        grads: &[Tensor<2>],
        rank_cap: Option<usize>,
        config: &OptimizerConfig,
    ) -> Result<Vec<RefreshReport>> {
        let settings = &config.gems;
        let mut reports = Vec::with_capacity(self.subspaces.len());
        let mut shared_basis: Option<SubspaceBasis> = None;
        for (state, g) in self.subspaces.iter_mut().zip(grads) {
            let rank = match state.kind {
                Subspace::Shared => settings.rank,
                Subspace::Rec | Subspace::Search => settings.task_rank(),
            }
            .min(rank_cap.unwrap_or(usize::MAX));
            let method = match settings.svd {
                SvdMethod::Exact => SvdMethod::Exact,
                SvdMethod::Randomized(c) => SvdMethod::Randomized(RandomizedSvdConfig {
                    seed: refresh_seed(config.seed, path, state.kind, step),
                    ..c
                }),
            };
            let new =
                match (&shared_basis, settings.complement && state.kind != Subspace::Shared) {
                    (Some(shared), true) => {
                        let host: Mat<f64> =
                            matrix_from_tensor(g).map_err(|e| OptimError::subspace(path, e))?;
                        SubspaceBasis::complement_from_gradient(
                            host.as_ref(),
                            shared,
                            rank,
                            &method,
                        )
                    }
                    _ => SubspaceBasis::from_gradient_tensor(g, rank, self.side, &method),
                }
                .map_err(|e| OptimError::subspace(path, e))?;
            let overlap = match &state.basis {
                Some(old) => subspace_overlap(old, &new).ok(),
                None => None,
            };
            state.moments = match (state.moments.take(), &state.basis, settings.moments) {
                (Some(m), Some(old), MomentPolicy::Rotate) => Some(rotate(m, old, &new, self.side)),
                (Some(m), Some(old), MomentPolicy::Keep) if old.rank() == new.rank() => Some(m),
                _ => None, // reset, first refresh, or a rank change
            };
            reports.push(RefreshReport {
                subspace: state.kind,
                rank: new.rank(),
                overlap_with_previous: overlap,
            });
            if state.kind == Subspace::Shared {
                shared_basis = Some(new.clone());
            }
            state.basis = Some(new);
            self.combined_basis = None;
            self.projected_basis = None;
            self.projected_each.clear();
        }
        Ok(reports)
    }

    /// f32 values held: moments plus bases (r x dim each).
    pub fn state_numel(&self) -> usize {
        self.subspaces
            .iter()
            .map(|s| {
                s.moments.as_ref().map_or(0, AdamMoments::numel)
                    + s.basis.as_ref().map_or(0, |b| b.rank() * b.dim())
            })
            .sum()
    }
}

/// R = the projection of P G onto `basis` (with `projector` P; of G itself without one),
/// without forming the full-size P G: its cost is that of the basis projection plus a product
/// of P with a dim x r factor, where P G alone costs 4 m n k (k the projector's width). Exact in
/// exact arithmetic (P is symmetric): with P on the basis' side, Q^T (P G) = (P Q)^T G and
/// (G P) Q = G (P Q); with P on the other side, Q^T (G P) = (Q^T G) P and (P G) Q = P (G Q).
/// P Q is taken from `projected` when it holds it, and left there when computed (the caller
/// empties it when the basis changes).
fn project_onto(
    path: &str,
    basis: &SubspaceBasis,
    projector: Option<&NullSpaceProjector>,
    transposed: bool,
    g: Tensor<2>,
    projected: &mut Option<Tensor<2>>,
) -> Result<Tensor<2>> {
    let subspace = |e| OptimError::subspace(path, e);
    let [rows, cols] = g.dims();
    let Some(p) = projector else {
        return basis.project_tensor(g).map_err(subspace);
    };
    let p_on_rows = projector_on_rows(path, p, [rows, cols], transposed)?;
    if p_on_rows != (basis.side() == Side::Left) {
        let r = basis.project_tensor(g).map_err(subspace)?;
        return apply_projector(path, p, r, transposed);
    }
    // Same side: P Q has Q's shape (dim x r, P symmetric); project G onto it.
    if basis.side().dim(rows, cols) != basis.dim() {
        return basis.project_tensor(g).map_err(subspace); // the shape error, naming the basis
    }
    let pq = match projected {
        Some(pq) => pq.clone(),
        None => {
            let pq = p.apply_left_tensor(basis.device_matrix(&g.device())).map_err(subspace)?;
            projected.insert(pq).clone()
        }
    };
    Ok(match basis.side() {
        Side::Left => pq.transpose().matmul(g),
        Side::Right => g.matmul(pq),
    })
}

/// Whether `projector` acts on the rows of a gradient stored `[rows, cols]` (P G; else G P):
/// an output-side projector acts on the rows of W, so on the columns of a stored W^T.
///
/// # Errors
/// [`OptimError::Projector`] when its dimension is not that of the side it acts on.
fn projector_on_rows(
    path: &str,
    projector: &NullSpaceProjector,
    [rows, cols]: [usize; 2],
    transposed: bool,
) -> Result<bool> {
    let on_rows = (projector.side() == ProjectorSide::Output) != transposed;
    let dim = if on_rows { rows } else { cols };
    if projector.dim() == dim {
        return Ok(on_rows);
    }
    Err(OptimError::Projector {
        path: path.to_string(),
        detail: format!(
            "{:?}-side null-space projector has dim {} but the matrix is stored {rows}x{cols}{} (needs {dim})",
            projector.side(),
            projector.dim(),
            if transposed { " as W^T" } else { "" },
        ),
    })
}

/// P G (output side) or G P (input side) in the math layout; on a stored W^T the sides swap
/// (P symmetric: (P G)^T = G^T P).
pub(crate) fn apply_projector(
    path: &str,
    projector: &NullSpaceProjector,
    g: Tensor<2>,
    transposed: bool,
) -> Result<Tensor<2>> {
    let on_rows = projector_on_rows(path, projector, g.dims(), transposed)?;
    let result =
        if on_rows { projector.apply_left_tensor(g) } else { projector.apply_right_tensor(g) };
    result.map_err(|e| OptimError::subspace(path, e))
}

/// Re-expresses moments in a new basis: C = Q_old^T Q_new; M C or C^T M; V with C∘C.
fn rotate(
    m: AdamMoments<2>,
    old: &SubspaceBasis,
    new: &SubspaceBasis,
    side: Side,
) -> AdamMoments<2> {
    let device = m.first.device();
    let q_old = old.device_matrix(&device);
    let q_new = new.device_matrix(&device);
    let c = q_old.transpose().matmul(q_new);
    let c2 = c.clone().square();
    match side {
        Side::Right => AdamMoments { first: m.first.matmul(c), second: m.second.matmul(c2) },
        Side::Left => AdamMoments {
            first: c.transpose().matmul(m.first),
            second: c2.transpose().matmul(m.second),
        },
    }
}

/// A seed for one refresh, derived from the run seed, the parameter path, the subspace and the
/// step (FNV-1a then a SplitMix64 finaliser), so resumed runs draw the same sketches.
pub(crate) fn refresh_seed(seed: u64, path: &str, kind: Subspace, step: u64) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for byte in path.bytes().chain([kind as u8]).chain(step.to_le_bytes()).chain(seed.to_le_bytes())
    {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    gems_rng::SplitMix64::new(h).next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};
    use gems_rng::SplitMix64;
    use gems_subspace::{NullSpaceRule, SecondMomentAccumulator};

    fn gaussian(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
        let mut v = vec![0.0; rows * cols];
        SplitMix64::new(seed).fill_standard_normal(&mut v);
        Mat::from_fn(rows, cols, |i, j| v[i * cols + j])
    }

    fn tensor(a: &Mat<f64>, device: &Device) -> Tensor<2> {
        let v: Vec<f32> =
            (0..a.nrows()).flat_map(|i| (0..a.ncols()).map(move |j| a[(i, j)] as f32)).collect();
        Tensor::from_data(TensorData::new(v, [a.nrows(), a.ncols()]), device)
    }

    /// A projector of dimension `dim` whose activations span 3 directions (so P has dim - 3
    /// null directions and is far from the identity).
    fn projector(dim: usize, side: ProjectorSide, seed: u64) -> NullSpaceProjector {
        let mut acc = SecondMomentAccumulator::new(dim).unwrap();
        acc.add_rows((gaussian(40, 3, seed) * gaussian(3, dim, seed + 1)).as_ref()).unwrap();
        acc.projector(NullSpaceRule::Absolute { tau: 2e-2 }, side).unwrap()
    }

    /// The shortcut of `project_onto` equals projecting P G (formed in full) onto the basis,
    /// for every combination of projector side, stored layout and basis side.
    #[test]
    fn projection_of_the_null_space_gradient_needs_no_full_size_product() {
        let device = Device::flex();
        let (rows, cols) = (12, 7);
        let g_host = gaussian(rows, cols, 1);
        for (case, (side, transposed, basis_side)) in [ProjectorSide::Output, ProjectorSide::Input]
            .into_iter()
            .flat_map(|p| [false, true].map(move |t| (p, t)))
            .flat_map(|(p, t)| [Side::Left, Side::Right].map(move |b| (p, t, b)))
            .enumerate()
        {
            let on_rows = (side == ProjectorSide::Output) != transposed;
            let p = projector(if on_rows { rows } else { cols }, side, 10 + case as u64);
            let basis = SubspaceBasis::from_gradient(
                gaussian(rows, cols, 20 + case as u64).as_ref(),
                3,
                basis_side,
                &SvdMethod::Exact,
            )
            .unwrap();
            let g = tensor(&g_host, &device);
            let full = apply_projector("w", &p, g.clone(), transposed).unwrap();
            let want = basis.project_tensor(full).unwrap();
            let mut projected = None;
            let got =
                project_onto("w", &basis, Some(&p), transposed, g.clone(), &mut projected).unwrap();
            // A second step between refreshes reads P Q back and gives the same values.
            let again = project_onto("w", &basis, Some(&p), transposed, g, &mut projected).unwrap();
            assert_eq!(
                again.to_data().try_to_vec::<f32>().unwrap(),
                got.to_data().try_to_vec::<f32>().unwrap(),
                "case {case}"
            );
            assert_eq!(got.dims(), want.dims(), "case {case}");
            let diff = (got - want.clone()).abs().max().into_scalar::<f32>();
            let scale = want.abs().max().into_scalar::<f32>();
            assert!(scale > 0.1, "case {case}: the projection is not trivially zero");
            assert!(
                diff <= 1e-5 * scale,
                "case {case} ({side:?}, {transposed}, {basis_side:?}): {diff}"
            );
        }
        // A projector of the wrong dimension is the same error as before, naming the matrix.
        let basis = SubspaceBasis::from_gradient(g_host.as_ref(), 3, Side::Left, &SvdMethod::Exact)
            .unwrap();
        let err = project_onto(
            "w",
            &basis,
            Some(&projector(5, ProjectorSide::Output, 3)),
            false,
            tensor(&g_host, &device),
            &mut None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains('w') && err.contains("needs 12"), "{err}");
    }
}
