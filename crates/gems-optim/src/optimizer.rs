//! The module-level optimizer: every method behind one `step`; what distinguishes the methods
//! is in [`crate::methods`].
//!
//! A step runs in three passes so that a failure never leaves a half-updated model:
//!
//! 1. read: walk the module, collect each float parameter's path, value and per-task gradients;
//!    one device read of all squared norms and rec/search dot products (non-finite check,
//!    gates, conflict report);
//! 2. compute: new values for every updated parameter and new optimizer state, on copies;
//! 3. write: swap the new values into the module (keeping `require_grad`), commit the state.
//!
//! A non-finite loss or gradient skips the step: the model and the state stay as they were,
//! the skip is counted and reported.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use gems_subspace::NullSpaceProjector;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::adam::{AdamMoments, apply_scaled_update, bias_correction, update_scale};
use crate::config::{GatePolicy, OptimizerConfig, path_matches};
use crate::error::{OptimError, Result};
use crate::fused;
use crate::matrix::{MatrixGradients, MatrixState, RefreshReport};
use crate::methods::{MethodRule, TaskTotals};

/// One task's gradient for a step: the mean over its rows (or over the accumulation window),
/// with the number of rows and the mean loss.
#[derive(Debug)]
pub struct TaskGradient {
    /// Gradients keyed by the module's parameter ids.
    pub grads: GradientsParams,
    /// Rows (target sequences) the mean was taken over.
    pub samples: usize,
    /// Mean loss over those rows.
    pub loss: f64,
}

/// The gradients of one optimizer step.
#[derive(Debug, Default)]
pub struct StepGradients {
    /// The recommendation task (None when the window had no rec rows).
    pub rec: Option<TaskGradient>,
    /// The search task (None when the window had no search rows).
    pub search: Option<TaskGradient>,
    /// A separately computed shared gradient (the authors' third backward pass); when None the
    /// shared gradient is (n_rec G_rec + n_src G_src) / N (GEMS-SPEC §3 step 1).
    pub shared: Option<GradientsParams>,
}

/// Per-matrix measurements of a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatrixReport {
    /// Parameter path.
    pub path: String,
    /// Cosine of G_rec and G_src (None when a task is missing).
    pub cosine_rec_search: Option<f64>,
    /// |G_rec|_F.
    pub norm_rec: f64,
    /// |G_src|_F.
    pub norm_search: f64,
    /// Refresh measurements, on refresh steps of subspace methods.
    pub refresh: Option<Vec<RefreshReport>>,
    /// Whether a null-space projector was applied.
    pub null_space_applied: bool,
}

/// What a step did and measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// The optimizer step this report belongs to (1-based; a skipped step does not advance it).
    pub step: u64,
    /// Why the step was skipped, if it was.
    pub skipped: Option<String>,
    /// Steps skipped so far.
    pub skipped_total: u64,
    /// (g_rec, g_src) used for the task subspaces.
    pub gates: (f64, f64),
    /// Mean rec and search losses of the window.
    pub losses: (Option<f64>, Option<f64>),
    /// Mean over tuned matrices of the rec/search cosine.
    pub mean_cosine: Option<f64>,
    /// Global gradient norms (rec, search) over all parameters with gradients.
    pub global_norms: (f64, f64),
    /// Cosine of the rec and search gradients over all parameters with gradients (trained rows
    /// only), when both exist: what PCGrad's conflict test reads (it acts when this is < 0).
    pub global_cosine: Option<f64>,
    /// Whether the method's gradient surgery changed the task gradients this step (PCGrad on a
    /// conflicting step; never for the other methods).
    pub surgery: bool,
    /// Parameters updated this step.
    pub updated_parameters: usize,
    /// Tuned (subspace) matrices, in path order.
    pub matrices: Vec<MatrixReport>,
}

/// The optimizer: configuration, step counter and all per-parameter state, keyed by path.
#[derive(Debug, Clone)]
pub struct Optimizer {
    pub(crate) config: OptimizerConfig,
    pub(crate) step: u64,
    pub(crate) skipped: u64,
    pub(crate) matrices: BTreeMap<String, MatrixState>,
    pub(crate) adam: BTreeMap<String, AdamMoments<1>>,
    pub(crate) projectors: BTreeMap<String, Arc<NullSpaceProjector>>,
}

/// One tuned matrix's step, owning its state while it runs.
struct MatrixWork<'a> {
    index: usize,
    id: ParamId,
    state: MatrixState,
    projector: Option<&'a NullSpaceProjector>,
    gradients: Option<MatrixGradients>,
    result: Option<Result<(Tensor<2>, Option<Vec<RefreshReport>>)>>,
}

/// One float parameter as read in pass 1.
struct ParamEntry {
    path: String,
    dims: Vec<usize>,
    value: Tensor<1>,
    rec: Option<Tensor<1>>,
    search: Option<Tensor<1>>,
    shared: Option<Tensor<1>>,
    /// The row-weighted mean of `rec` and `search`, where the statistics' pass computed it
    /// ([`fused::task_sums`]); [`Combine::shared`] takes it when no surgery changes the tasks.
    mean: Option<Tensor<1>>,
}

impl Optimizer {
    /// A fresh optimizer.
    ///
    /// # Errors
    /// An invalid configuration.
    pub fn new(config: OptimizerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            step: 0,
            skipped: 0,
            matrices: BTreeMap::new(),
            adam: BTreeMap::new(),
            projectors: BTreeMap::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Steps applied so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Steps skipped for non-finite values so far.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }

    /// Registers the null-space projector of one tuned matrix (math layout: an output-side
    /// projector has dim m = d_out). Used only when `config.gems.null_space` is set.
    pub fn set_null_space_projector(
        &mut self,
        path: impl Into<String>,
        projector: Arc<NullSpaceProjector>,
    ) {
        self.projectors.insert(path.into(), projector);
    }

    /// Subspace state of a tuned matrix, for inspection.
    pub fn matrix_state(&self, path: &str) -> Option<&MatrixState> {
        self.matrices.get(path)
    }

    /// Bytes of optimizer state held now (f32 moments and f32 device bases; the f64 host copies
    /// of bases used for refresh bookkeeping are not counted).
    pub fn state_bytes(&self) -> usize {
        let matrices: usize = self.matrices.values().map(MatrixState::state_numel).sum();
        let adam: usize = self.adam.values().map(AdamMoments::numel).sum();
        4 * (matrices + adam)
    }

    /// Whether `path` (a parameter of `dims`) is updated through subspaces.
    pub fn is_tuned(&self, path: &str, dims: &[usize]) -> bool {
        self.config.uses_subspaces()
            && dims.len() == 2
            && self.config.targets.iter().any(|p| path_matches(p, path))
    }

    /// One optimizer step with learning rate `lr`; returns the updated module and a report.
    ///
    /// The module is borrowed: on error the caller still holds it unchanged, and the optimizer
    /// state is unchanged too (all fallible work happens before anything is written). Cloning a
    /// Burn module is shallow, so the returned module shares unchanged parameters; the updated
    /// ones are new tensors. [`Self::step_owned`] computes the same values in place.
    ///
    /// # Errors
    /// Shape mismatches, SVD failure, a projector that does not fit its matrix.
    pub fn step<M: Module + Clone>(
        &mut self,
        lr: f64,
        module: &M,
        gradients: StepGradients,
    ) -> Result<(M, StepReport)> {
        // The clone shares every parameter with the caller's module, so nothing is written
        // in place: the updated parameters are new tensors.
        self.step_owned(lr, module.clone(), gradients)
    }

    /// [`Self::step`] on a module the caller gives up: the parameters it holds alone are
    /// updated in place where the backend can (flex can), e.g. the trained rows of a
    /// 53,496-row embedding without copying the other rows. The values are the same as
    /// [`Self::step`]'s, bit for bit. On error the module is dropped; the optimizer state is
    /// unchanged.
    ///
    /// # Errors
    /// As [`Self::step`].
    pub fn step_owned<M: Module>(
        &mut self,
        lr: f64,
        module: M,
        gradients: StepGradients,
    ) -> Result<(M, StepReport)> {
        let (writer, report) = self.compute(lr, &module, gradients)?;
        Ok((
            match writer {
                Some(mut w) => module.map(&mut w),
                None => module,
            },
            report,
        ))
    }

    /// Passes 1 and 2 of a step: the new optimizer state (committed only when everything
    /// succeeded) and the writer of the parameters' updates, `None` for a skipped step. No
    /// handle on a parameter outlives it, so the writer may update uniquely held ones in place.
    fn compute<M: Module>(
        &mut self,
        lr: f64,
        module: &M,
        gradients: StepGradients,
    ) -> Result<(Option<Writer>, StepReport)> {
        // Pass 1: read.
        let (mut entries, ids) = read_module(module, &gradients, &|path, dims| {
            if self.is_tuned(path, dims) { 0 } else { self.config.first_trained_row(path) }
        })?;
        let losses =
            (gradients.rec.as_ref().map(|g| g.loss), gradients.search.as_ref().map(|g| g.loss));
        let samples = (
            gradients.rec.as_ref().map_or(0, |g| g.samples) as f64,
            gradients.search.as_ref().map_or(0, |g| g.samples) as f64,
        );
        drop(gradients);
        let tuned: Vec<bool> = entries.iter().map(|e| self.is_tuned(&e.path, &e.dims)).collect();
        let recombines = !self.config.method.rule().accepts_shared_gradient();
        let stats = read_statistics(&mut entries, task_weights(samples), recombines)?;
        let mut report = self.new_report(losses, &stats);
        if let Some(reason) = non_finite(&entries, &stats, losses) {
            self.skipped += 1;
            report.skipped = Some(reason);
            report.step = self.step;
            report.skipped_total = self.skipped;
            return Ok((None, report));
        }
        let totals = task_totals(samples, &stats);
        let combine = Combine::new(self.config.method.rule(), &totals);
        report.global_cosine = totals.cosine();
        report.surgery = combine.surgery != (0.0, 0.0);
        report.gates = self.gates(losses, samples, &stats, &tuned);

        // Pass 2: compute. Nothing in `self` changes until every fallible part has succeeded:
        // tuned matrices step on their own copy of their state (cheap: bases are shared, not
        // copied, and keep their device copies; moments are tensor handles), and AdamW
        // parameters are checked here and updated in place after the matrices.
        let t = self.step + 1;
        let correction = bias_correction(t, self.config.beta1, self.config.beta2);
        let (mut work, plain) = self.collect_work(&mut entries, &ids, &tuned, &combine)?;
        let step_scale = update_scale(lr, correction, self.config.weight_decay);
        self.run_matrices(&mut work, &entries, t, report.gates, step_scale);
        let stepped = self.finish_matrices(work, &entries, &stats, lr, &mut report)?;
        // Every fallible part is done: commit the matrices' states and advance the AdamW
        // moments (their shapes were checked by `collect_work`); the writer applies the updates.
        let mut updates: HashMap<ParamId, Update> = HashMap::new();
        for (path, id, state, update) in stepped {
            self.matrices.insert(path, state);
            updates.insert(id, update);
        }
        for (index, shared) in plain {
            let update = self.adamw(&entries[index], shared, lr, correction);
            updates.insert(ids[index], update);
        }
        report.updated_parameters = updates.len();
        self.step = t;
        report.step = t;
        // Pass 3, the write, is the caller's.
        Ok((Some(Writer { updates }), report))
    }

    /// The report of the coming step as its gradients' statistics make it: the step number,
    /// the losses and the global gradient norms, everything else still at its default.
    fn new_report(&self, losses: (Option<f64>, Option<f64>), stats: &[GradStats]) -> StepReport {
        StepReport {
            step: self.step + 1,
            skipped: None,
            skipped_total: self.skipped,
            gates: (1.0, 1.0),
            losses,
            mean_cosine: None,
            global_norms: (
                stats.iter().map(|s| s.rec_sq).sum::<f64>().sqrt(),
                stats.iter().map(|s| s.search_sq).sum::<f64>().sqrt(),
            ),
            global_cosine: None,
            surgery: false,
            updated_parameters: 0,
            matrices: Vec::new(),
        }
    }

    /// The task gates from the tuned matrices' gradient norms (GEMS-SPEC §3 step 7).
    fn gates(
        &self,
        losses: (Option<f64>, Option<f64>),
        samples: (f64, f64),
        stats: &[GradStats],
        tuned: &[bool],
    ) -> (f64, f64) {
        let (tuned_rec, tuned_src) = stats
            .iter()
            .zip(tuned)
            .filter(|(_, t)| **t)
            .fold((0.0, 0.0), |acc, (s, _)| (acc.0 + s.rec_sq, acc.1 + s.search_sq));
        match self.config.gems.gates {
            GatePolicy::Unit => (1.0, 1.0),
            GatePolicy::Heuristic => heuristic_gates(
                (losses.0.unwrap_or(0.0), losses.1.unwrap_or(0.0)),
                (tuned_rec.sqrt(), tuned_src.sqrt()),
                samples,
            ),
        }
    }

    /// Sorts the parameters with a gradient the method updates into tuned matrices (work items
    /// that own a copy of their state) and AdamW parameters (index, shared gradient), checking
    /// the AdamW moments' shapes.
    fn collect_work<'a>(
        &'a self,
        entries: &mut [ParamEntry],
        ids: &[ParamId],
        tuned: &[bool],
        combine: &Combine,
    ) -> Result<(Vec<MatrixWork<'a>>, Vec<PlainGradient>)> {
        let rule = self.config.method.rule();
        let mut work = Vec::new();
        let mut plain = Vec::new();
        for (index, (entry, (&id, &is_tuned))) in
            entries.iter_mut().zip(ids.iter().zip(tuned)).enumerate()
        {
            let Some(shared) = combine.shared(entry) else { continue };
            if !rule.updates(&self.config, &entry.path) {
                continue;
            }
            if !is_tuned {
                if let Some(moments) = self.adam.get(&entry.path) {
                    moments.check_shape(&shared, &entry.path)?;
                }
                plain.push((index, shared));
                continue;
            }
            let [rows, cols] = [entry.dims[0], entry.dims[1]];
            let as_matrix = |g: Tensor<1>| -> Tensor<2> { g.reshape([rows, cols]) };
            let state = match self.matrices.get(&entry.path) {
                Some(state) => state.clone(),
                None => MatrixState::new([rows, cols], &self.config),
            };
            let projector = if self.config.gems.null_space {
                self.projectors.get(&entry.path).map(Arc::as_ref)
            } else {
                None
            };
            work.push(MatrixWork {
                index,
                id,
                state,
                projector,
                gradients: Some(MatrixGradients {
                    shared: as_matrix(shared),
                    rec: entry.rec.clone().map(as_matrix),
                    search: entry.search.clone().map(as_matrix),
                }),
                result: None,
            });
        }
        Ok((work, plain))
    }

    /// Steps every tuned matrix on its own state, across threads: the host SVDs of a refresh
    /// step, and between refreshes the projections, whose thin products keep two cores busier
    /// side by side than each product split across them (0.072 -> 0.062 s at the CPU preset).
    fn run_matrices(
        &self,
        work: &mut [MatrixWork<'_>],
        entries: &[ParamEntry],
        t: u64,
        gates: (f64, f64),
        step_scale: f64,
    ) {
        let config = &self.config;
        let run = |w: &mut MatrixWork<'_>| {
            if let Some(gradients) = w.gradients.take() {
                let path = &entries[w.index].path;
                w.result =
                    Some(w.state.step(path, t, gradients, w.projector, gates, step_scale, config));
            }
        };
        work.par_iter_mut().for_each(run);
    }

    /// The tuned matrices' updates and states (path, id, state, update), with their reports;
    /// the first failure is returned and nothing is committed.
    fn finish_matrices(
        &self,
        work: Vec<MatrixWork<'_>>,
        entries: &[ParamEntry],
        stats: &[GradStats],
        lr: f64,
        report: &mut StepReport,
    ) -> Result<Vec<(String, ParamId, MatrixState, Update)>> {
        let mut cosines = Vec::new();
        let mut stepped = Vec::with_capacity(work.len());
        for w in work {
            let entry = &entries[w.index];
            let stat = &stats[w.index];
            let Some(result) = w.result else { continue };
            let (update, refresh) = result?;
            let cosine = stat.cosine();
            cosines.extend(cosine);
            report.matrices.push(MatrixReport {
                path: entry.path.clone(),
                cosine_rec_search: cosine,
                norm_rec: stat.rec_sq.sqrt(),
                norm_search: stat.search_sq.sqrt(),
                refresh,
                null_space_applied: w.projector.is_some(),
            });
            let [rows, cols] = [entry.dims[0], entry.dims[1]];
            let update = Update {
                start: 0,
                update: update.reshape([rows * cols]),
                factor: None,
                lr,
                weight_decay: self.config.weight_decay,
            };
            stepped.push((entry.path.clone(), w.id, w.state, update));
        }
        report.mean_cosine =
            (!cosines.is_empty()).then(|| cosines.iter().sum::<f64>() / cosines.len() as f64);
        Ok(stepped)
    }

    /// AdamW on one parameter (on its trained rows, see [`read_module`]): advances (or
    /// creates) its moments and returns its update.
    fn adamw(&mut self, entry: &ParamEntry, shared: Tensor<1>, lr: f64, correction: f64) -> Update {
        let moments = match self.adam.remove(&entry.path) {
            Some(m) => m,
            None => AdamMoments::zeros_like(&shared),
        };
        let (moments, n) =
            moments.advance(shared, self.config.beta1, self.config.beta2, self.config.eps);
        self.adam.insert(entry.path.clone(), moments);
        let lr = lr * self.config.lr_scale(&entry.path);
        let weight_decay = self.config.weight_decay;
        let start = entry.value.dims()[0] - n.dims()[0];
        let factor = Some(update_scale(lr, correction, weight_decay));
        Update { start, update: n, factor, lr, weight_decay }
    }
}

/// An AdamW parameter of a step: its index among the entries and its shared gradient.
type PlainGradient = (usize, Tensor<1>);

/// Why a step must be skipped, if it must: a non-finite loss or gradient.
fn non_finite(
    entries: &[ParamEntry],
    stats: &[GradStats],
    losses: (Option<f64>, Option<f64>),
) -> Option<String> {
    let non_finite_loss = [losses.0, losses.1].into_iter().flatten().any(|l| !l.is_finite());
    match stats.iter().position(|s| !s.finite()) {
        Some(i) => Some(format!("non-finite gradient in `{}`", entries[i].path)),
        None if non_finite_loss => {
            Some(format!("non-finite loss (rec {:?}, search {:?})", losses.0, losses.1))
        }
        None => None,
    }
}

/// How a parameter's shared gradient is formed: the method's surgery on the task gradients,
/// then the mean weighted by rows, or the separately computed shared gradient where the method
/// accepts it (GEMS-SPEC §3 step 1).
struct Combine {
    weights: (f64, f64),
    surgery: (f64, f64),
    accepts_shared: bool,
}

impl Combine {
    fn new(rule: &dyn MethodRule, totals: &TaskTotals) -> Self {
        Self {
            weights: task_weights(totals.samples),
            surgery: rule.surgery(totals),
            accepts_shared: rule.accepts_shared_gradient(),
        }
    }

    /// The shared gradient of one parameter (None when it has no gradient at all); the mean
    /// of the two task gradients comes from the statistics' pass where it computed it.
    fn shared(&self, e: &mut ParamEntry) -> Option<Tensor<1>> {
        if e.shared.is_some() && self.accepts_shared {
            return e.shared.clone();
        }
        let (pc_rec, pc_src) = self.surgery;
        let (w_rec, w_src) = self.weights;
        let mean = e.mean.take(); // dropped when surgery changed the tasks
        if (pc_rec, pc_src) == (0.0, 0.0)
            && let Some(mean) = mean
        {
            return Some(mean);
        }
        let rec = e.rec.clone().map(|r| match (&e.search, pc_rec != 0.0) {
            (Some(s), true) => r.sub(s.clone().mul_scalar(pc_rec)),
            _ => r,
        });
        let src = e.search.clone().map(|s| match (&e.rec, pc_src != 0.0) {
            (Some(r), true) => s.sub(r.clone().mul_scalar(pc_src)),
            _ => s,
        });
        match (rec, src) {
            (Some(r), Some(s)) => Some(r.mul_scalar(w_rec).add(s.mul_scalar(w_src))),
            (Some(r), None) => Some(r),
            (None, Some(s)) => Some(s),
            (None, None) => e.shared.clone(),
        }
    }
}

/// The first trained row of a parameter, from its path and dims (0: every row).
type TrainedRows<'a> = dyn Fn(&str, &[usize]) -> usize + 'a;

/// Pass 1: the paths, values and gradients of every float parameter that has a gradient, and
/// their ids.
///
/// The gradients of a parameter with trained rows (`trained_rows`, from
/// [`OptimizerConfig::first_trained_row`]; tuned matrices are never cut) are cut to those rows
/// before anything reads them: the step's statistics (norms, the task dot product, PCGrad's
/// conflict, the non-finite check), the shared gradient and AdamW then cost what the trained
/// rows cost, and the frozen rows' gradients (e.g. the 49,152 text rows of a tied embedding)
/// steer nothing. The cut comes before the gradient is flattened: a tied head's gradient is a
/// transposed view, and flattening all of it copied every row (about 0.05 s a task at the CPU
/// preset's 53,496 x 576 embedding).
///
/// # Errors
/// A first trained row outside a 2-D parameter, naming it.
fn read_module<M: Module>(
    module: &M,
    gradients: &StepGradients,
    trained_rows: &TrainedRows<'_>,
) -> Result<(Vec<ParamEntry>, Vec<ParamId>)> {
    let mut reader = Reader {
        path: Vec::new(),
        gradients,
        trained_rows,
        entries: Vec::new(),
        ids: Vec::new(),
        error: None,
    };
    module.visit(&mut reader);
    match reader.error {
        Some(e) => Err(e),
        None => Ok((reader.entries, reader.ids)),
    }
}

/// w_k = 0.4 l_k + 0.4 q_k + 0.2 s_k, g_k = w_k / (w_rec + w_src); 0.5 for a share whose
/// denominator is 0 (GEMS-SPEC §3 step 7).
pub fn heuristic_gates(losses: (f64, f64), norms: (f64, f64), samples: (f64, f64)) -> (f64, f64) {
    let share = |a: f64, b: f64| if a + b > 0.0 { (a / (a + b), b / (a + b)) } else { (0.5, 0.5) };
    let (l_rec, l_src) = share(losses.0, losses.1);
    let (q_rec, q_src) = share(norms.0, norms.1);
    let (s_rec, s_src) = share(samples.0, samples.1);
    let w_rec = 0.4 * l_rec + 0.4 * q_rec + 0.2 * s_rec;
    let w_src = 0.4 * l_src + 0.4 * q_src + 0.2 * s_src;
    share(w_rec, w_src)
}

/// Squared norms and the dot product of one parameter's task gradients.
#[derive(Debug, Clone, Copy)]
struct GradStats {
    rec_sq: f64,
    search_sq: f64,
    shared_sq: f64,
    dot: f64,
    has_both: bool,
}

impl GradStats {
    fn finite(&self) -> bool {
        self.rec_sq.is_finite()
            && self.search_sq.is_finite()
            && self.shared_sq.is_finite()
            && self.dot.is_finite()
    }

    fn cosine(&self) -> Option<f64> {
        if !self.has_both {
            return None;
        }
        let denominator = (self.rec_sq * self.search_sq).sqrt();
        Some(if denominator > 0.0 { (self.dot / denominator).clamp(-1.0, 1.0) } else { 0.0 })
    }
}

/// The step's totals over every parameter: `samples`, and the squared norms and dot product of
/// the two task gradients summed over `stats` in parameter order.
fn task_totals(samples: (f64, f64), stats: &[GradStats]) -> TaskTotals {
    TaskTotals {
        samples,
        squared_norms: (
            stats.iter().map(|s| s.rec_sq).sum(),
            stats.iter().map(|s| s.search_sq).sum(),
        ),
        dot: stats.iter().map(|s| s.dot).sum(),
    }
}

/// The weights of the row-weighted mean of the task gradients (GEMS-SPEC §3 step 1): each
/// task's share of the step's rows, (0.5, 0.5) for a step without rows.
fn task_weights((n_rec, n_src): (f64, f64)) -> (f64, f64) {
    let total = n_rec + n_src;
    if total > 0.0 { (n_rec / total, n_src / total) } else { (0.5, 0.5) }
}

/// All squared norms and dot products: on flex in one fused pass per parameter, summed in f64
/// ([`fused::task_sums`]); elsewhere as Burn ops, in one device read. The fused pass also
/// writes the task gradients' mean with `weights` into [`ParamEntry::mean`] where the step will
/// want it: where the parameter has no separately computed shared gradient, or `recombines`
/// (the method ignores that gradient).
fn read_statistics(
    entries: &mut [ParamEntry],
    weights: (f64, f64),
    recombines: bool,
) -> Result<Vec<GradStats>> {
    let fused: Vec<Option<[f64; 4]>> = entries
        .iter_mut()
        .map(|e| {
            let wanted = recombines || e.shared.is_none();
            let (sums, mean) = fused::task_sums(
                &mut e.rec,
                &mut e.search,
                &mut e.shared,
                wanted.then_some(weights),
            )?;
            e.mean = mean;
            Some(sums)
        })
        .collect();
    let mut sums: Vec<Tensor<1>> = Vec::new();
    for e in entries.iter().zip(&fused).filter(|(_, f)| f.is_none()).map(|(e, _)| e) {
        let sq = |g: &Option<Tensor<1>>| g.clone().map(|g| g.square().sum());
        for t in [sq(&e.rec), sq(&e.search), sq(&e.shared)].into_iter().flatten() {
            sums.push(t);
        }
        if let (Some(r), Some(s)) = (&e.rec, &e.search) {
            sums.push(r.clone().mul(s.clone()).sum());
        }
    }
    let values: Vec<f64> = if sums.is_empty() {
        Vec::new()
    } else {
        Tensor::cat(sums, 0)
            .into_data()
            .convert::<f64>()
            .try_into_vec::<f64>()
            .map_err(|e| OptimError::TensorRead(format!("{e:?}")))?
    };
    let mut it = values.into_iter();
    Ok(entries
        .iter()
        .zip(fused)
        .map(|(e, fused)| {
            let has_both = e.rec.is_some() && e.search.is_some();
            if let Some([rec_sq, search_sq, shared_sq, dot]) = fused {
                return GradStats { rec_sq, search_sq, shared_sq, dot, has_both };
            }
            let mut take = |g: &Option<Tensor<1>>| {
                if g.is_some() { it.next().unwrap_or(f64::NAN) } else { 0.0 }
            };
            let rec_sq = take(&e.rec);
            let search_sq = take(&e.search);
            let shared_sq = take(&e.shared);
            let dot = if has_both { it.next().unwrap_or(f64::NAN) } else { 0.0 };
            GradStats { rec_sq, search_sq, shared_sq, dot, has_both }
        })
        .collect())
}

/// Pass 1: paths, values and gradients of every float parameter that has a gradient.
struct Reader<'a> {
    path: Vec<String>,
    gradients: &'a StepGradients,
    trained_rows: &'a TrainedRows<'a>,
    entries: Vec<ParamEntry>,
    ids: Vec<ParamId>,
    /// The first parameter whose trained rows do not fit it.
    error: Option<OptimError>,
}

impl ModuleVisitor for Reader<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let id = param.id;
        let rec = self.gradients.rec.as_ref().and_then(|g| g.grads.get::<D>(id));
        let search = self.gradients.search.as_ref().and_then(|g| g.grads.get::<D>(id));
        let shared = self.gradients.shared.as_ref().and_then(|g| g.get::<D>(id));
        if rec.is_none() && search.is_none() && shared.is_none() {
            return;
        }
        let value = param.val().inner();
        let dims = value.dims().to_vec();
        let path = self.path.join(".");
        let from = (self.trained_rows)(&path, &dims);
        if from > 0 && (D != 2 || from >= dims[0]) {
            self.error.get_or_insert_with(|| {
                OptimError::InvalidConfig(format!(
                    "trained_rows: `{path}` has shape {dims:?}, which has no row {from}"
                ))
            });
            return;
        }
        // Rows from `from` on, then flattened (a copy only of those rows when `g` is a view).
        let flat = |g: Tensor<D>| -> Tensor<1> {
            let g = if from > 0 { g.narrow(0, from, dims[0] - from) } else { g };
            let n = g.shape().num_elements();
            g.reshape([n])
        };
        let n = value.shape().num_elements();
        self.entries.push(ParamEntry {
            value: value.reshape([n]),
            rec: rec.map(flat),
            search: search.map(flat),
            shared: shared.map(flat),
            mean: None,
            path,
            dims,
        });
        self.ids.push(id);
    }
}

/// The update of one parameter, flattened: W (1 - lr wd) - U' on the elements from `start`
/// on (the trained rows; 0 for the whole parameter), with U' = `factor` `update`, or `update`
/// when it is already scaled by [`update_scale`] ([`apply_scaled_update`]).
struct Update {
    start: usize,
    update: Tensor<1>,
    factor: Option<f64>,
    lr: f64,
    weight_decay: f64,
}

impl Update {
    /// The new value of the flattened `weight`; in place when `weight` is its storage's only
    /// handle and the backend updates in place.
    fn apply(self, weight: Tensor<1>) -> Tensor<1> {
        let Self { start, update, factor, lr, weight_decay } = self;
        let (weight, update) =
            match fused::apply_update(weight, start, update, factor, [lr, weight_decay]) {
                Ok(updated) => return updated,
                Err(unfused) => unfused,
            };
        let scaled = match factor {
            Some(f) => update.mul_scalar(f),
            None => update,
        };
        if start == 0 {
            return apply_scaled_update(weight, scaled, lr, weight_decay);
        }
        let total = weight.dims()[0];
        let trained =
            apply_scaled_update(weight.clone().slice(start..total), scaled, lr, weight_decay);
        weight.slice_assign(start..total, trained)
    }
}

/// Pass 3: applies the updates to the parameters, keeping their autodiff state.
struct Writer {
    updates: HashMap<ParamId, Update>,
}

impl ModuleMapper for Writer {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(update) = self.updates.remove(&param.id) else { return param };
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let require_grad = tensor.is_require_grad();
        let autodiff = tensor.is_autodiff();
        let checkpointing = tensor.gradient_checkpointing_strategy();
        let weight = if autodiff { tensor.inner() } else { tensor };
        let mut updated: Tensor<D> =
            update.apply(weight.reshape([shape.num_elements()])).reshape(shape);
        if autodiff {
            updated = Tensor::from_inner(updated);
            if let Some(strategy) = checkpointing {
                updated = updated.with_gradient_checkpointing_strategy(strategy);
            }
        }
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}
