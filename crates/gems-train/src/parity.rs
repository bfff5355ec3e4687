//! Backend parity: one model, the same real batches, the same optimizer steps and one
//! evaluation on a reference device (flex) and on another (a GPU), compared number by number.
//!
//! What is compared:
//! - each task's loss on the first batch, computed on both devices;
//! - the gradients of every parameter from that batch, computed on both devices;
//! - the optimizer's update: the reference's gradients are copied to the other device and both
//!   optimizers take `steps` steps on the same gradients (the first one a subspace refresh, the
//!   later ones reuse the bases), and `W_after - W_before` is compared;
//! - an evaluation of the stepped model (validation examples) on both devices.
//!
//! Differences are relative to the reference's largest magnitude per parameter, so a float32
//! backend with another summation order should land near 1e-5 to 1e-3, and a wrong kernel near
//! 1. `gems parity` prints the report; `cargo xtask gpu` records it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use gems_data::{Split, Task};
use gems_metrics::EvalReport;
use gems_model::Llama;
use gems_optim::{StepGradients, TaskGradient};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{TrainerState, write_json};
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::eval::evaluate;
use crate::forward::read_f32;
use crate::progress::Reporter;
use crate::run_setup::RunSetup;
use crate::trainer::{eval_options, step_gradients};

/// What [`backend_parity`] measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParityReport {
    /// The reference device (`Debug` form).
    pub reference: String,
    /// The compared device (`Debug` form).
    pub device: String,
    /// Training method of the compared steps.
    pub method: String,
    /// Decoder layers of the model.
    pub layers: usize,
    /// First-batch loss per task: (reference, device).
    pub losses: BTreeMap<String, (f64, f64)>,
    /// Largest relative gradient difference over all parameters and tasks.
    pub gradient_max_rel_diff: f64,
    /// The parameter where it occurred.
    pub gradient_worst: String,
    /// Optimizer steps taken on the same (reference) gradients.
    pub steps: u64,
    /// Largest relative difference of `W_after - W_before` over all updated parameters.
    pub update_max_rel_diff: f64,
    /// The parameter where it occurred.
    pub update_worst: String,
    /// The parameters the steps changed on the reference, by path: what training trains.
    #[serde(default)]
    pub updated: Vec<String>,
    /// Evaluation of the stepped model on the reference.
    pub eval_reference: EvalReport,
    /// Evaluation of the stepped model on the device.
    pub eval_device: EvalReport,
    /// Largest absolute difference between the two evaluations' metric values (losses and
    /// ranking metrics; timings left out).
    pub eval_max_abs_diff: f64,
    /// Wall-clock seconds of the whole comparison.
    pub seconds: f64,
}

/// Runs the comparison (see the module documentation) and writes `parity.json` (and
/// `nullspace.json` for gems with the null space) into `out_dir`.
///
/// # Errors
/// Missing model or data, an invalid configuration, forward/backward or optimizer failures on
/// either device.
pub fn backend_parity(
    config: &TrainConfig,
    reference: &Device,
    device: &Device,
    steps: u64,
    out_dir: &Path,
    progress: &Reporter,
) -> Result<ParityReport> {
    if steps == 0 {
        return Err(TrainError::Config("parity needs at least one optimizer step".into()));
    }
    let started = Instant::now();
    std::fs::create_dir_all(out_dir).map_err(|e| TrainError::io(out_dir, e))?;
    let run = RunSetup::load(config, reference, &Reporter::silent())?;
    let (ref_ad, dev_ad) = (reference.clone().autodiff(), device.clone().autodiff());
    // The model exactly as training trains it (`model_to_train`: frozen lower layers, LoRA
    // adapters, the embedding policy), built once: `to_device` keeps every parameter's id (so
    // gradients keyed by id carry across, adapters included). Each copy is trained from the
    // plain snapshot (`valid` keeps which parameters train), so neither hangs off the other's
    // autodiff graph.
    let trained = run.model_to_train(None, &ref_ad)?.valid();
    let mut models =
        [trained.clone().to_device(&ref_ad).train(), trained.to_device(&dev_ad).train()];
    let before = param_values(&models[0])?;
    let mut optimizers = [
        run.optimizer(None, out_dir, &ref_ad, progress)?,
        run.optimizer(None, out_dir, &ref_ad, progress)?,
    ];
    let mut state = TrainerState::default();
    let mut perms = vec![None; Task::ALL.len()];
    let mut first = None;
    for step in 1..=steps {
        let [model_ref, model_dev] = &models;
        let (grads_ref, _) = step_gradients(model_ref, run.parts(), &mut state, &mut perms, None)?;
        if step == 1 {
            first = Some(compare_first_batch(&run, model_ref, model_dev, &grads_ref)?);
        }
        let grads_dev = gradients_to(model_ref, &grads_ref, device);
        let lr = run.config.schedule.lr_at(step);
        let [opt_ref, opt_dev] = &mut optimizers;
        models =
            [opt_ref.step(lr, model_ref, grads_ref)?.0, opt_dev.step(lr, model_dev, grads_dev)?.0];
    }
    let (losses, gradient_worst) = first.unwrap_or_default();
    let [model_ref, model_dev] = models;
    let (update_worst, updated) = compare_updates(&before, &model_ref, &model_dev)?;

    let options =
        eval_options(&run.config, Split::Valid, "parity", &run.tasks, &Reporter::silent());
    let eval_reference = evaluate(&model_ref.valid(), &run.setup.corpus, &options)?;
    let eval_device = evaluate(&model_dev.valid(), &run.setup.corpus, &options)?;
    let eval_max_abs_diff = max_metric_diff(&eval_reference, &eval_device);
    let report = ParityReport {
        reference: format!("{reference:?}"),
        device: format!("{device:?}"),
        method: run.config.optimizer.method.as_str().to_string(),
        layers: run.setup.pretrained.model.layers.len(),
        losses,
        gradient_max_rel_diff: gradient_worst.0,
        gradient_worst: gradient_worst.1,
        steps,
        update_max_rel_diff: update_worst.0,
        update_worst: update_worst.1,
        updated,
        eval_reference,
        eval_device,
        eval_max_abs_diff,
        seconds: started.elapsed().as_secs_f64(),
    };
    write_json(&out_dir.join("parity.json"), &report)?;
    Ok(report)
}

/// Each task's loss on both devices, and the worst gradient difference with where it is.
type FirstBatch = (BTreeMap<String, (f64, f64)>, (f64, String));

/// The first batch on the device too: it computes the same batch itself, and its losses and
/// gradients are compared with the reference's (whose gradients then drive both optimizers).
fn compare_first_batch(
    run: &RunSetup,
    model_ref: &Llama,
    model_dev: &Llama,
    grads_ref: &StepGradients,
) -> Result<FirstBatch> {
    let mut replay = TrainerState::default();
    let mut replay_perms = vec![None; Task::ALL.len()];
    let (grads_dev, _) =
        step_gradients(model_dev, run.parts(), &mut replay, &mut replay_perms, None)?;
    let mut losses = BTreeMap::new();
    let mut worst = (0.0, String::new());
    for (name, a, b) in
        [("rec", &grads_ref.rec, &grads_dev.rec), ("search", &grads_ref.search, &grads_dev.search)]
    {
        if let (Some(a), Some(b)) = (a, b) {
            losses.insert(name.to_string(), (a.loss, b.loss));
            let diff = compare_gradients(model_ref, &a.grads, &b.grads)?;
            if diff.0 >= worst.0 {
                worst = (diff.0, format!("{name}: {}", diff.1));
            }
        }
    }
    Ok((losses, worst))
}

/// The worst relative difference of the two models' updates (`after - before`), with the
/// parameter, and every parameter the reference updated.
fn compare_updates(
    before: &BTreeMap<String, Vec<f32>>,
    model_ref: &Llama,
    model_dev: &Llama,
) -> Result<((f64, String), Vec<String>)> {
    let after_ref = param_values(model_ref)?;
    let after_dev = param_values(model_dev)?;
    let mut worst = (0.0, String::new());
    let mut updated = Vec::new();
    for (name, b) in before {
        let (Some(r), Some(d)) = (after_ref.get(name), after_dev.get(name)) else { continue };
        let delta_ref: Vec<f32> = r.iter().zip(b).map(|(x, y)| x - y).collect();
        let delta_dev: Vec<f32> = d.iter().zip(b).map(|(x, y)| x - y).collect();
        if delta_ref.iter().all(|v| *v == 0.0) {
            continue; // not updated (frozen or no gradient)
        }
        updated.push(name.clone());
        let diff = max_rel_diff(&delta_ref, &delta_dev);
        if diff >= worst.0 {
            worst = (diff, name.clone());
        }
    }
    Ok((worst, updated))
}

/// max_i |a_i - b_i| / max_i |a_i| (0 when both are all zero; infinite for NaN).
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = a.iter().fold(0.0f64, |m, v| m.max(f64::from(v.abs())));
    let diff = a.iter().zip(b).fold(0.0f64, |m, (x, y)| {
        let d = f64::from((x - y).abs());
        if d.is_nan() { f64::INFINITY } else { m.max(d) }
    });
    if diff == 0.0 {
        0.0
    } else if scale == 0.0 {
        f64::INFINITY
    } else {
        diff / scale
    }
}

/// Largest absolute difference between the numeric leaves of two reports (same keys), leaving
/// out wall-clock seconds; a leaf present in one report only counts as infinite.
fn max_metric_diff(a: &EvalReport, b: &EvalReport) -> f64 {
    fn walk(a: &serde_json::Value, b: &serde_json::Value, key: &str) -> f64 {
        use serde_json::Value;
        match (a, b) {
            (_, _) if key == "seconds" => 0.0,
            (Value::Number(x), Value::Number(y)) => {
                (x.as_f64().unwrap_or(f64::NAN) - y.as_f64().unwrap_or(f64::NAN)).abs()
            }
            (Value::Object(x), Value::Object(y)) => x
                .iter()
                .map(|(k, v)| y.get(k).map_or(f64::INFINITY, |w| walk(v, w, k)))
                .fold(0.0, f64::max),
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
                x.iter().zip(y).map(|(v, w)| walk(v, w, key)).fold(0.0, f64::max)
            }
            (x, y) if x == y => 0.0,
            _ => f64::INFINITY,
        }
    }
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(x), Ok(y)) => walk(&x, &y, ""),
        _ => f64::INFINITY,
    }
}

/// Every float parameter's values on the host, by path.
fn param_values(model: &Llama) -> Result<BTreeMap<String, Vec<f32>>> {
    struct Values {
        path: Vec<String>,
        out: Vec<(String, Tensor<1>)>,
    }
    impl ModuleVisitor for Values {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let t = param.val().inner();
            let n = t.shape().num_elements();
            self.out.push((self.path.join("."), t.reshape([n])));
        }
    }
    let mut v = Values { path: Vec::new(), out: Vec::new() };
    model.visit(&mut v);
    v.out.into_iter().map(|(p, t)| Ok((p, read_f32(t, "parity")?))).collect()
}

/// The worst relative difference between two gradient sets of `model`'s parameters.
fn compare_gradients(
    model: &Llama,
    a: &GradientsParams,
    b: &GradientsParams,
) -> Result<(f64, String)> {
    struct Pairs<'a> {
        path: Vec<String>,
        a: &'a GradientsParams,
        b: &'a GradientsParams,
        out: Vec<(String, Option<Tensor<1>>, Option<Tensor<1>>)>,
    }
    impl ModuleVisitor for Pairs<'_> {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let flat = |g: Tensor<D>| {
                let n = g.shape().num_elements();
                g.reshape([n])
            };
            let (x, y) = (self.a.get::<D>(param.id).map(flat), self.b.get::<D>(param.id).map(flat));
            if x.is_some() || y.is_some() {
                self.out.push((self.path.join("."), x, y));
            }
        }
    }
    let mut pairs = Pairs { path: Vec::new(), a, b, out: Vec::new() };
    model.visit(&mut pairs);
    let mut worst = (0.0, String::new());
    for (path, x, y) in pairs.out {
        let diff = match (x, y) {
            (Some(x), Some(y)) => max_rel_diff(&read_f32(x, "parity")?, &read_f32(y, "parity")?),
            _ => f64::INFINITY, // a gradient on one device only
        };
        if diff >= worst.0 {
            worst = (diff, path);
        }
    }
    Ok(worst)
}

/// `grads` (of `model`'s parameters) copied to `device`, under the same parameter ids.
fn gradients_to(model: &Llama, grads: &StepGradients, device: &Device) -> StepGradients {
    struct Copy<'a> {
        from: &'a GradientsParams,
        to: GradientsParams,
        device: &'a Device,
    }
    impl ModuleVisitor for Copy<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.from.get::<D>(param.id) {
                self.to.register(param.id, g.to_device(self.device));
            }
        }
    }
    let copy = |from: &GradientsParams| {
        let mut c = Copy { from, to: GradientsParams::new(), device };
        model.visit(&mut c);
        c.to
    };
    let task =
        |t: &TaskGradient| TaskGradient { grads: copy(&t.grads), samples: t.samples, loss: t.loss };
    StepGradients {
        rec: grads.rec.as_ref().map(task),
        search: grads.search.as_ref().map(task),
        shared: grads.shared.as_ref().map(copy),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_difference_is_scaled_by_the_reference() {
        assert_eq!(max_rel_diff(&[1.0, -4.0], &[1.0, -4.0]), 0.0);
        assert!((max_rel_diff(&[1.0, -4.0], &[1.0, -3.0]) - 0.25).abs() < 1e-12);
        assert_eq!(max_rel_diff(&[0.0, 0.0], &[0.0, 1e-9]), f64::INFINITY);
        assert_eq!(max_rel_diff(&[1.0], &[f32::NAN]), f64::INFINITY);
    }
}
