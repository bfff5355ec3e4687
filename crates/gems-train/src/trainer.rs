//! The training loop: per-task forward/backward, the chosen method's step, cosine schedule,
//! validation with early stopping, atomic checkpoints, exact resume, JSON-lines metrics.
//!
//! Run directory (docs/training.md):
//!
//! ```text
//! config.json      the resolved configuration (with the model path actually used)
//! nullspace.json   kept directions per tuned matrix (gems with null space)
//! before.json      test evaluation of the untuned model
//! metrics.jsonl    one line per step ("train") and per validation ("valid")
//! conflict.jsonl   per step: cosine of G_rec and G_src for every tuned matrix
//! checkpoint/      model/ (+ adapter/ for lora), optimizer/, config.json, trainer.json: resume point
//! model/           the tuned model (best validation, else final), a Hugging Face directory
//! summary.json     before/after metrics, steps, timing, optimizer-state bytes
//! report/          report.md and plots (written by `gems train` in gems-cli when finished)
//! ```

use std::path::Path;
use std::time::Instant;

use burn::module::Module;
use burn::module::Param;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use gems_data::{Split, Task};
use gems_metrics::{EvalReport, MetricsLine, RunSummary, TrainRecord, ValidRecord};
use gems_model::{Llama, LoraConfig, Pretrained};
use gems_optim::{GradientWindow, Method, Optimizer, StepGradients, TaskGradient};

use crate::batches::{active_tasks, step_batches};
use crate::checkpoint::{TrainerState, read_json, replace_dir, resolve_dir, write_json};
use crate::config::{EmbeddingPolicy, StopMetric, TaskSelection, TrainConfig};
use crate::error::{Result, TrainError};
use crate::eval::{EvalOptions, evaluate, perplexity, text_windows};
use crate::forward::target_loss;
use crate::nullspace::{GeneralText, projectors};
use crate::progress::{Event, Phase, Reporter};
use crate::rundir::{
    METRICS, checkpoint_to_resume, prepare_logs, resolve_config, save_checkpoint, trainer_state,
};
pub use crate::rundir::{resolved_config, tuned_model_dir};
use crate::setup::{LossTargets, Sample, Setup, build, load_model};

/// How a run is driven (not part of its configuration).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The plain device (autodiff is added for training).
    pub device: Device,
    /// Continue from the run directory's checkpoint when there is one.
    pub resume: bool,
    /// Where progress events go ([`Reporter::silent`] by default).
    pub progress: Reporter,
}

/// How a call to [`train`] ended.
#[derive(Debug, Clone)]
pub enum RunOutcome {
    /// Training and the final evaluation finished.
    Finished(Box<RunSummary>),
    /// `stop_after` was reached: a checkpoint was written; resume to continue.
    Stopped {
        /// Steps done so far.
        step: u64,
    },
}

/// One task's mean loss gradient over `samples` ([`target_loss`] with `targets`).
fn task_gradient(
    model: &Llama,
    samples: &[&Sample],
    pad: u32,
    targets: LossTargets,
) -> Result<TaskGradient> {
    let loss = target_loss(model, samples, pad, targets)?;
    let value = crate::forward::read_f32(loss.clone(), "task_gradient")?[0] as f64;
    let grads = GradientsParams::from_grads(loss.backward(), model);
    Ok(TaskGradient { grads, samples: samples.len(), loss: value })
}

/// Saves a model as a Hugging Face directory (merged when it carries LoRA adapters).
/// Writes the tuned model: merged, in the Hugging Face layout; for a LoRA run also the same
/// weights as a PEFT adapter in `adapter/`, so that `gems export --adapter` ships the adapter of
/// the model that was evaluated (the best validation step), not the last checkpoint's.
fn save_model(
    model: &Llama,
    pretrained: &Pretrained,
    config: &TrainConfig,
    dir: &Path,
) -> Result<()> {
    if config.optimizer.method == Method::Lora {
        gems_model::save_peft(model, &lora_config(config, model), &dir.join("adapter"))?;
    }
    let merged = gems_model::merge_lora(model.clone().valid());
    let p = Pretrained {
        model: merged,
        tokenizer: pretrained.tokenizer.clone(),
        chat_template: pretrained.chat_template.clone(),
    };
    gems_model::save_hf_dir(&p, dir)?;
    Ok(())
}

/// The LoRA configuration of a run, with the embedding (and an untied head) saved whole.
pub fn lora_config(config: &TrainConfig, model: &Llama) -> LoraConfig {
    let targets: Vec<&str> = config.lora.targets.iter().map(String::as_str).collect();
    let mut c = LoraConfig::new(config.lora.rank, config.lora.alpha, &targets);
    if model.frozen_layers > 0 {
        // Only the tuned layers carry adapters; PEFT must be told, or it attaches (zero)
        // adapters to every layer and warns about their missing keys.
        c = c.on_layers(model.frozen_layers..model.layers.len());
    }
    if config.model.embeddings != EmbeddingPolicy::None {
        c = c.with_embeddings(model.lm_head.is_none());
    }
    c.init_seed = config.seed;
    c
}

/// The value early stopping watches, oriented so that lower is better.
fn stop_value(metric: StopMetric, report: &EvalReport) -> f64 {
    let mean = |vals: Vec<f64>| {
        if vals.is_empty() { f64::INFINITY } else { vals.iter().sum::<f64>() / vals.len() as f64 }
    };
    match metric {
        StopMetric::Loss => mean(report.loss.values().copied().collect()),
        StopMetric::Ndcg10 => {
            -mean(report.full.values().filter_map(|m| m.get("ndcg@10")).collect::<Vec<_>>())
        }
    }
}

/// The evaluation options of a run for `split`: the configured number of examples, drawn with
/// the split's own seed (test and validation never share random numbers), so that the
/// trainer, `gems eval` and `gems eval --dump-examples` evaluate the same examples.
pub fn eval_options(
    config: &TrainConfig,
    split: Split,
    label: &str,
    tasks: &[Task],
    progress: &Reporter,
) -> EvalOptions {
    let (max_examples, seed) = match split {
        Split::Valid => (config.eval.valid_examples, config.seed ^ 0x7a11d),
        _ => (config.eval.test_examples, config.seed ^ 0x7e57),
    };
    EvalOptions {
        label: label.into(),
        split,
        tasks: tasks.to_vec(),
        max_examples,
        seed,
        batch_size: config.eval.batch_size,
        sampled: config.eval.sampled,
        normaliser: config.eval.ndcg_normaliser,
        exclude_history: config.eval.exclude_history,
        progress: progress.clone(),
    }
}

/// Evaluates `model` on the test split (and perplexity), labelled `label`.
///
/// # Errors
/// Forward failures, an unreadable perplexity text.
pub fn test_report(
    model: &Llama,
    setup: &Setup,
    config: &TrainConfig,
    label: &str,
    tasks: &[Task],
    progress: &Reporter,
) -> Result<EvalReport> {
    let options = eval_options(config, Split::Test, label, tasks, progress);
    let mut report = evaluate(model, &setup.corpus, &options)?;
    if let Some(text) = config.perplexity_text() {
        let windows = text_windows(
            &text,
            &setup.text,
            config.eval.perplexity_tokens,
            config.eval.perplexity_window,
        )?;
        let started = Instant::now();
        let base = setup.corpus.base_vocab as usize;
        report.perplexity = Some(perplexity(model, &windows, base, 8, progress)?);
        report.seconds += started.elapsed().as_secs_f64();
    }
    Ok(report)
}

/// A stable key of the model file(s) a configuration starts from (path, size, keep_layers).
fn model_key(path: &Path, config: &TrainConfig) -> String {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let bytes = if path.is_dir() { size(&path.join("model.safetensors")) } else { size(path) };
    format!("{}|{bytes}|{:?}", path.display(), config.model.keep_layers)
}

/// `--embeddings none`: the embedding (and an untied head) stop requiring gradients, so no
/// gradient is computed for them at all.
fn freeze_embeddings(mut model: Llama, policy: EmbeddingPolicy) -> Llama {
    if policy == EmbeddingPolicy::None {
        model.embed_tokens.weight = model.embed_tokens.weight.set_require_grad(false);
        if let Some(h) = model.lm_head.as_mut() {
            h.weight = h.weight.clone().set_require_grad(false);
        }
    }
    model
}

/// The run's optimizer configuration: the configured one, and with `--embeddings items` only
/// the item rows (`base..`) of the token embedding train (`trained_rows`), so AdamW neither
/// moves the text rows nor spends time and moments on them. Set at run time, since `base`
/// comes from the data; a checkpoint's optimizer keeps it.
pub fn optimizer_config(config: &TrainConfig, base: usize) -> gems_optim::OptimizerConfig {
    let mut c = config.optimizer.clone();
    if config.model.embeddings == EmbeddingPolicy::Items {
        c.trained_rows
            .push(gems_optim::TrainedRows { pattern: "embed_tokens.*".into(), from: base });
    }
    c
}

/// `--embeddings items` with an untied head: the pretrained text-token columns of the head
/// (`[0, base)` of `[d, vocab]`), written back after every optimizer step, so AdamW (its update
/// and its weight decay) never moves them. (The embedding's text rows are not trained at all:
/// [`optimizer_config`].)
struct FrozenRows {
    base: usize,
    head: Tensor<2>,
}

impl FrozenRows {
    fn new(
        pretrained: &Llama,
        policy: EmbeddingPolicy,
        base: usize,
        device: &Device,
    ) -> Option<Self> {
        if policy != EmbeddingPolicy::Items {
            return None;
        }
        let plain = device.clone().inner();
        let w = pretrained.lm_head.as_ref()?.weight.val();
        let rows = w.dims()[0];
        Some(Self { base, head: w.slice([0..rows, 0..base]).to_device(&plain) })
    }

    fn restore(&self, mut model: Llama) -> Llama {
        if let Some(h) = model.lm_head.as_mut() {
            let rows = self.head.dims()[0];
            h.weight = keep_block(h.weight.clone(), [0..rows, 0..self.base], &self.head);
        }
        model
    }
}

/// `param` with the block `at` set to `values`, as a fresh leaf that keeps the parameter's id
/// and gradient setting (the optimizer's own writer does the same).
fn keep_block(
    param: Param<Tensor<2>>,
    at: [std::ops::Range<usize>; 2],
    values: &Tensor<2>,
) -> Param<Tensor<2>> {
    let (id, tensor, mapper) = param.consume();
    let require_grad = tensor.is_require_grad();
    let autodiff = tensor.is_autodiff();
    let inner = if autodiff { tensor.inner() } else { tensor };
    let mut updated = inner.slice_assign(at, values.clone());
    if autodiff {
        updated = Tensor::from_inner(updated);
    }
    if require_grad {
        updated = updated.require_grad();
    }
    Param::from_mapped_value(id, updated, mapper)
}

/// Refuses a target pattern that matches no parameter, and a subspace rank above the full rank
/// of a tuned matrix (it used to be capped silently, so `--rank 100000` ran as full-rank GaLore
/// without saying so).
fn check_rank(config: &TrainConfig, model: &Llama) -> Result<()> {
    if !config.optimizer.uses_subspaces() {
        return Ok(());
    }
    let rank = config.optimizer.gems.rank;
    let mut paths = vec!["embed_tokens.weight".to_owned(), "lm_head.weight".to_owned()];
    for (i, layer) in model.layers.iter().enumerate() {
        paths
            .extend(layer.projections().into_iter().map(|(n, _)| format!("layers.{i}.{n}.weight")));
    }
    if let Some(t) = config
        .optimizer
        .targets
        .iter()
        .find(|t| !paths.iter().any(|p| gems_optim::path_matches(t, p)))
    {
        return Err(TrainError::Config(format!(
            "optimizer.targets pattern `{t}` matches no parameter of the model (its matrices are \
             named like {})",
            paths.get(2).map_or("layers.0.self_attn.q_proj.weight", String::as_str)
        )));
    }
    let mut smallest: Option<(usize, String)> = None;
    for (i, layer) in model.layers.iter().enumerate() {
        for (name, lin) in layer.projections() {
            let path = format!("layers.{i}.{name}.weight");
            if !config.optimizer.targets.iter().any(|t| gems_optim::path_matches(t, &path)) {
                continue;
            }
            let [a, b] = lin.weight.dims();
            if smallest.as_ref().is_none_or(|(full, _)| a.min(b) < *full) {
                smallest = Some((a.min(b), format!("{path} ({a} x {b})")));
            }
        }
    }
    match smallest {
        Some((full, what)) if rank > full => Err(TrainError::Config(format!(
            "optimizer.gems.rank {rank} exceeds the full rank {full} of {what}; choose at most \
             {full}"
        ))),
        _ => Ok(()),
    }
}

/// The untuned model's test evaluation (kept across resumes; a new run computes its own, never
/// one left by an earlier start with perhaps another configuration), and the floors without a
/// language model on the same test examples (`baselines.json`; cheap: no forward pass).
fn before_and_floors(
    run_dir: &Path,
    setup: &Setup,
    config: &TrainConfig,
    tasks: &[Task],
    resumed: bool,
    progress: &Reporter,
) -> Result<Option<EvalReport>> {
    let before_path = run_dir.join("before.json");
    let before: Option<EvalReport> = if !config.eval.before {
        None
    } else if before_path.exists() && resumed {
        Some(read_json(&before_path)?)
    } else {
        let r = test_report(&setup.pretrained.model, setup, config, "before", tasks, progress)?;
        write_json(&before_path, &r)?;
        Some(r)
    };

    let floors_path = run_dir.join(gems_metrics::BASELINES_FILE);
    if config.eval.floors && !floors_path.exists() {
        let options = eval_options(config, Split::Test, "floor", tasks, &Reporter::silent());
        write_json(&floors_path, &crate::baselines::evaluate_baselines(&setup.corpus, &options)?)?;
    }
    Ok(before)
}

/// Null-space projectors from the pretrained model (cached), registered with the optimizer;
/// `nullspace.json` reports them.
pub fn register_null_space(
    optimizer: &mut Optimizer,
    setup: &Setup,
    config: &TrainConfig,
    path: &Path,
    run_dir: &Path,
    progress: &Reporter,
) -> Result<()> {
    let cache = config
        .null_space
        .cache
        .clone()
        .unwrap_or_else(|| run_dir.parent().unwrap_or(Path::new(".")).join("nullspace-cache"));
    let text = config.null_space_text();
    let source = GeneralText {
        tokenizer: &setup.text,
        text: &text,
        model_key: &model_key(path, config),
        cache_dir: &cache,
    };
    // Only the trained layers need projectors.
    let model = freeze_lower_layers(setup.pretrained.model.clone(), config)?;
    let (projectors, report) =
        projectors(&model, &source, &config.optimizer.targets, &config.null_space, progress)?;
    progress.note(|| {
        let kept: usize = report.layers.iter().map(|l| l.null_directions).sum();
        let dims: usize = report.layers.iter().map(|l| l.dim).sum();
        format!(
            "null space: {} matrices, {kept} of {dims} directions free ({}, {:.1}s)",
            report.layers.len(),
            if report.from_cache { "cached" } else { "built" },
            report.seconds
        )
    });
    write_json(&run_dir.join("nullspace.json"), &report)?;
    for (p, proj) in projectors {
        optimizer.set_null_space_projector(p, proj);
    }
    Ok(())
}

/// The model to train, on the autodiff `device`: the checkpoint's when resuming, else the
/// pretrained one; its lower layers frozen when `model.tune_layers` says so, with LoRA adapters
/// (on the trained layers) for `lora`, and the embedding policy applied. The step bench
/// (benches/benches/step.rs) starts from the same model.
///
/// # Errors
/// An unreadable checkpoint, `model.tune_layers` beyond the model's layers, a LoRA failure.
pub fn model_to_train(
    setup: &Setup,
    config: &TrainConfig,
    resume_from: Option<&Path>,
    device: &Device,
) -> Result<Llama> {
    let base = match resume_from {
        Some(ckpt) => gems_model::load_hf_dir(&ckpt.join("model"), device)?.model,
        None => setup.pretrained.model.clone().to_device(device).train(),
    };
    let base = freeze_lower_layers(base, config)?;
    let model = if config.optimizer.method == Method::Lora {
        let cfg = lora_config(config, &base);
        let (m, _) = gems_model::apply_lora(base, &cfg, true)?;
        match resume_from {
            Some(ckpt) => gems_model::load_peft(m, &ckpt.join("adapter"))?.0,
            None => m,
        }
    } else {
        base
    };
    Ok(freeze_embeddings(model, config.model.embeddings))
}

/// `model` with the layers below the top `model.tune_layers` frozen (none when it is unset).
///
/// # Errors
/// `model.tune_layers` exceeds the model's layers.
pub fn freeze_lower_layers(model: Llama, config: &TrainConfig) -> Result<Llama> {
    let n = model.layers.len();
    let frozen = match config.model.tune_layers {
        None => 0,
        Some(k) if k > n => {
            return Err(TrainError::Config(format!(
                "model.tune_layers {k} exceeds the model's {n} layers (after keep_layers)"
            )));
        }
        Some(k) => n - k,
    };
    Ok(model.freeze_lower_layers(frozen)?)
}

/// One validation: evaluates `model` on the validation sample, updates the best value and
/// early stopping, appends the `valid` line, and writes `model/` at a new best.
fn validate_step(
    model: &Llama,
    setup: &Setup,
    config: &TrainConfig,
    tasks: &[Task],
    state: &mut TrainerState,
    run_dir: &Path,
    progress: &Reporter,
) -> Result<()> {
    let label = format!("valid@{}", state.step);
    let mut options = eval_options(config, Split::Valid, &label, tasks, &Reporter::silent());
    options.sampled = false;
    let plain = model.valid();
    let report = evaluate(&plain, &setup.corpus, &options)?;
    let value = stop_value(config.eval.metric, &report);
    let new_best = state.best.is_none_or(|(_, b)| value < b);
    if new_best {
        state.best = Some((state.step, value));
        state.bad_validations = 0;
    } else {
        state.bad_validations += 1;
        if config.eval.patience > 0 && state.bad_validations >= config.eval.patience {
            state.stopped_early = true;
        }
    }
    if !progress.is_silent() {
        progress.emit(Event::Validated {
            step: state.step,
            ndcg10: report
                .full
                .iter()
                .map(|(t, m)| (t.clone(), m.get("ndcg@10").unwrap_or(0.0)))
                .collect(),
            loss: stop_value(StopMetric::Loss, &report),
            best: new_best,
        });
    }
    gems_metrics::record::append_metrics_line(
        &run_dir.join(METRICS),
        &MetricsLine::Valid(ValidRecord { step: state.step, report, best: new_best }),
    )?;
    if new_best {
        replace_dir(&run_dir.join("model"), |d| save_model(model, &setup.pretrained, config, d))?;
    }
    Ok(())
}

/// The end of a run: the tuned model (the best validation's, else the final weights), its
/// test evaluation, and `summary.json`.
#[allow(clippy::too_many_arguments)]
fn finish_run(
    model: &Llama,
    setup: &Setup,
    config: &TrainConfig,
    tasks: &[Task],
    optimizer: &Optimizer,
    state: &TrainerState,
    before: Option<EvalReport>,
    run_dir: &Path,
    progress: &Reporter,
) -> Result<RunSummary> {
    // The tuned model: the best validation checkpoint, else the final weights.
    let model_dir = run_dir.join("model");
    if resolve_dir(&model_dir).is_none() {
        replace_dir(&model_dir, |d| save_model(model, &setup.pretrained, config, d))?;
    }
    let tuned_dir = resolve_dir(&model_dir).unwrap_or(model_dir);
    let tuned = gems_model::load_hf_dir(&tuned_dir, &setup.pretrained.model.device())?.model;
    let after = test_report(&tuned, setup, config, "after", tasks, progress)?;
    let mut step_seconds = state.step_seconds.clone();
    step_seconds.sort_by(f64::total_cmp);
    let summary = RunSummary {
        label: format!("{}-seed{}", config.label(), config.seed),
        group: config.label(),
        method: config.optimizer.method.as_str().into(),
        seed: config.seed,
        steps: state.step,
        train_seconds: state.train_seconds,
        median_step_seconds: step_seconds.get(step_seconds.len() / 2).copied().unwrap_or(0.0),
        optimizer_state_bytes: optimizer.state_bytes() as u64,
        before,
        after: Some(after),
        best_step: state.best.map(|(s, _)| s),
    };
    gems_metrics::record::write_summary(run_dir, &summary)?;
    Ok(summary)
}
/// One optimizer step's gradients (see [`step_batches`]) and the tokens they held.
pub(crate) fn step_gradients(
    model: &Llama,
    setup: &Setup,
    config: &TrainConfig,
    tasks: &[Task],
    state: &mut TrainerState,
    perms: &mut [Option<(u64, Vec<usize>)>],
) -> Result<(StepGradients, usize)> {
    let mut windows: Vec<GradientWindow> = tasks.iter().map(|_| GradientWindow::new()).collect();
    let mut tokens = 0usize;
    for (task, batch) in step_batches(setup, config, tasks, state, perms) {
        let k = tasks.iter().position(|&t| t == task).unwrap_or_default();
        tokens += batch.iter().map(|s| s.ids.len()).sum::<usize>();
        let g = task_gradient(model, &batch, setup.corpus.eos_id, setup.loss_targets(task))?;
        windows[k].add(model, g);
    }
    let mut grads = StepGradients::default();
    for (k, w) in windows.into_iter().enumerate() {
        match tasks[k] {
            Task::Rec => grads.rec = w.finish(model),
            Task::Search => grads.search = w.finish(model),
        }
    }
    Ok((grads, tokens))
}

/// What one optimizer step did, for its log line.
struct StepLog<'a> {
    lr: f64,
    tokens: usize,
    seconds: f64,
    report: &'a gems_optim::StepReport,
}

/// Appends a step's `train` line to `metrics.jsonl` and its per-matrix cosines to
/// `conflict.jsonl`, and reports the step's progress.
fn log_step(
    step: &StepLog<'_>,
    state: &TrainerState,
    tasks: &[Task],
    n_train: &[usize],
    run_dir: &Path,
    progress: &Phase,
) -> Result<()> {
    let epoch = tasks
        .iter()
        .zip(n_train)
        .map(|(t, &n)| {
            let c = state.cursors.get(t.name()).copied().unwrap_or_default();
            c.epoch as f64 + c.index as f64 / n.max(1) as f64
        })
        .fold(0.0, f64::max);
    let record = TrainRecord {
        step: state.step,
        epoch,
        lr: step.lr,
        loss_rec: step.report.losses.0,
        loss_search: step.report.losses.1,
        mean_cosine: step.report.mean_cosine,
        global_cosine: step.report.global_cosine,
        surgery: step.report.surgery,
        tokens_per_s: step.tokens as f64 / step.seconds.max(1e-9),
        step_seconds: step.seconds,
        elapsed_seconds: state.train_seconds,
        skipped: step.report.skipped.is_some(),
    };
    gems_metrics::record::append_metrics_line(
        &run_dir.join(METRICS),
        &MetricsLine::Train(record.clone()),
    )?;
    if !step.report.matrices.is_empty() {
        let cosines: std::collections::BTreeMap<&str, Option<f64>> =
            step.report.matrices.iter().map(|m| (m.path.as_str(), m.cosine_rec_search)).collect();
        let line = serde_json::json!({ "step": state.step, "cosine_rec_search": cosines });
        gems_io::append_line(&run_dir.join("conflict.jsonl"), &line.to_string())?;
    }
    let fmt = |l: Option<f64>| l.map_or("-".into(), |v| format!("{v:.3}"));
    progress.update(
        state.step,
        &format!(
            "loss rec {} search {} | cos {} | lr {:.2e} | {:.0} tok/s",
            fmt(record.loss_rec),
            fmt(record.loss_search),
            record.mean_cosine.or(record.global_cosine).map_or("-".into(), |c| format!("{c:+.3}")),
            step.lr,
            record.tokens_per_s
        ),
    );
    Ok(())
}

/// Trains one run into `run_dir`; see the module docs for what it writes.
///
/// # Errors
/// Invalid configuration, missing model or data, non-finite training, I/O failures. Files
/// already written stay valid.
pub fn train(config: &TrainConfig, run_dir: &Path, options: &RunOptions) -> Result<RunOutcome> {
    config.validate()?;
    let reporter = &options.progress;
    std::fs::create_dir_all(run_dir).map_err(|e| TrainError::io(run_dir, e))?;
    let resume_from = if options.resume { Some(checkpoint_to_resume(run_dir)?) } else { None };
    let resume = resume_from.as_deref();
    let (config, path) = resolve_config(config, run_dir, resume, reporter)?;
    let device = options.device.clone();
    let (setup, tasks) = load_setup(&config, &path, &device, reporter)?;
    let config = narrow_tasks(config, &tasks, &setup, run_dir, reporter)?;
    let before = before_and_floors(run_dir, &setup, &config, &tasks, resume.is_some(), reporter)?;

    let train_device = device.autodiff();
    let mut optimizer = match resume {
        Some(ckpt) => Optimizer::load(ckpt.join("optimizer"), &train_device)?,
        None => Optimizer::new(optimizer_config(&config, setup.corpus.base_vocab as usize))?,
    };
    if config.optimizer.method == Method::Gems && config.optimizer.gems.null_space {
        register_null_space(&mut optimizer, &setup, &config, &path, run_dir, reporter)?;
    }
    let mut model = model_to_train(&setup, &config, resume, &train_device)?;
    let run = Run {
        frozen: FrozenRows::new(
            &setup.pretrained.model,
            config.model.embeddings,
            setup.corpus.base_vocab as usize,
            &train_device,
        ),
        n_train: tasks.iter().map(|&t| setup.train_rows(t).len()).collect(),
        setup: &setup,
        config: &config,
        tasks: &tasks,
        run_dir,
    };
    let mut state = trainer_state(resume, &optimizer, &config)?;
    prepare_logs(run_dir, resume.is_some(), state.step)?;

    let total = config.schedule.steps;
    let mut perms: Vec<Option<(u64, Vec<usize>)>> = vec![None; Task::ALL.len()];
    let progress = reporter.phase("train", total);
    let mut steps_here = 0u64;
    while state.step < total && !state.stopped_early {
        model = run.step(model, &mut optimizer, &mut state, &mut perms, &progress)?;
        steps_here += 1;
        if run.after_step(&model, &optimizer, &mut state, steps_here, reporter)? {
            progress
                .finish(Some(format!("stopped after step {} (resume to continue)", state.step)));
            return Ok(RunOutcome::Stopped { step: state.step });
        }
    }
    progress.finish(Some(format!("{} steps", state.step)));

    let summary =
        finish_run(&model, &setup, &config, &tasks, &optimizer, &state, before, run_dir, reporter)?;
    Ok(RunOutcome::Finished(Box::new(summary)))
}

/// When the data has no training examples for a task `data.tasks` asks for (no item has a
/// query, so no search), the run trains the others: it says so and records the tasks it trains
/// in config.json, so that the configuration is what happened.
fn narrow_tasks(
    mut config: TrainConfig,
    tasks: &[Task],
    setup: &Setup,
    run_dir: &Path,
    reporter: &Reporter,
) -> Result<TrainConfig> {
    let asked: Vec<Task> =
        Task::ALL.into_iter().filter(|&t| config.data.tasks.includes(t)).collect();
    if asked.len() == tasks.len() {
        return Ok(config);
    }
    let dropped: Vec<&str> =
        asked.iter().filter(|t| !tasks.contains(t)).map(|t| t.name()).collect();
    config.data.tasks = match tasks {
        [Task::Rec] => TaskSelection::Rec,
        [Task::Search] => TaskSelection::Search,
        _ => config.data.tasks,
    };
    reporter.note(|| {
        format!(
            "dataset `{}` has no training examples for {} (no item has a query): training {} \
             only; config.json records data.tasks = {:?}",
            setup.corpus.dataset,
            dropped.join(", "),
            tasks.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "),
            config.data.tasks
        )
    });
    write_json(&run_dir.join("config.json"), &config)?;
    Ok(config)
}

/// The model (its lower layers frozen as configured, to check the setting early), the
/// tokenised data with item tokens, and the tasks that have training samples.
fn load_setup(
    config: &TrainConfig,
    path: &Path,
    device: &Device,
    reporter: &Reporter,
) -> Result<(Setup, Vec<Task>)> {
    let started = Instant::now();
    let pretrained = load_model(path, config.model.keep_layers, device)?;
    check_rank(config, &pretrained.model)?;
    freeze_lower_layers(pretrained.model.clone(), config)?;
    let setup = build(pretrained, config)?;
    let tasks = active_tasks(config, &setup.corpus);
    if tasks.is_empty() {
        return Err(TrainError::Config(format!(
            "dataset `{}` has no training samples for tasks {:?}",
            setup.corpus.dataset, config.data.tasks
        )));
    }
    reporter.note(|| {
        format!(
            "model {} ({} layers, {} parameters), {} items, tasks {:?}, setup {:.1}s",
            path.display(),
            setup.pretrained.model.layers.len(),
            setup.pretrained.model.num_params(),
            setup.corpus.n_items(),
            tasks.iter().map(|t| t.name()).collect::<Vec<_>>(),
            started.elapsed().as_secs_f64()
        )
    });
    if config.data.negatives == 0 {
        reporter.note(|| {
            "data.negatives = 0: no sampled negatives, so the sampled protocol (the target among \
             its negatives) is not reported; the full-catalogue ranking is"
                .to_string()
        });
    }
    let untitled = setup.corpus.untitled();
    if untitled > 0 {
        reporter.note(|| {
            format!(
                "{untitled} of {} items have no title (ID-only data): their ids are not used \
                 as text; their rows start from their categories when model.item_text uses \
                 them, else from the mean item row",
                setup.corpus.n_items()
            )
        });
    }
    Ok((setup, tasks))
}

/// What every step of a run reads: the data, the configuration, the trained tasks, the run
/// directory, and the embedding rows to keep frozen.
struct Run<'a> {
    setup: &'a Setup,
    config: &'a TrainConfig,
    tasks: &'a [Task],
    run_dir: &'a Path,
    frozen: Option<FrozenRows>,
    /// Training samples per task (for the epoch in the log).
    n_train: Vec<usize>,
}

impl Run<'_> {
    /// One optimizer step: the gradients of the step's batches, the update (frozen rows
    /// restored), the state's counters and timings, and the step's log line.
    fn step(
        &self,
        model: Llama,
        optimizer: &mut Optimizer,
        state: &mut TrainerState,
        perms: &mut [Option<(u64, Vec<usize>)>],
        progress: &Phase,
    ) -> Result<Llama> {
        let started = Instant::now();
        let (grads, tokens) =
            step_gradients(&model, self.setup, self.config, self.tasks, state, perms)?;
        let lr = self.config.schedule.lr_at(state.step + 1);
        let (next, report) = optimizer.step_owned(lr, model, grads)?;
        let model = match &self.frozen {
            Some(f) => f.restore(next),
            None => next,
        };
        state.step += 1;
        let seconds = started.elapsed().as_secs_f64();
        state.train_seconds += seconds;
        state.step_seconds.push(seconds);
        if report.skipped.is_some() {
            state.consecutive_skips += 1;
            if state.consecutive_skips >= 10 {
                return Err(TrainError::Training(format!(
                    "10 consecutive steps skipped for non-finite values (last: {}); lower the \
                     learning rate",
                    report.skipped.unwrap_or_default()
                )));
            }
        } else {
            state.consecutive_skips = 0;
        }
        let step = StepLog { lr, tokens, seconds, report: &report };
        log_step(&step, state, self.tasks, &self.n_train, self.run_dir, progress)?;
        Ok(model)
    }

    /// After a step: validation and early stopping when due, then a checkpoint when due.
    /// Returns whether this process stops here (`stop_after`) with the run unfinished.
    fn after_step(
        &self,
        model: &Llama,
        optimizer: &Optimizer,
        state: &mut TrainerState,
        steps_here: u64,
        reporter: &Reporter,
    ) -> Result<bool> {
        let config = self.config;
        let last = state.step == config.schedule.steps;
        let validate =
            config.eval.every > 0 && (state.step.is_multiple_of(config.eval.every) || last);
        if validate {
            validate_step(model, self.setup, config, self.tasks, state, self.run_dir, reporter)?;
        }
        let stop_here = config.stop_after.is_some_and(|k| steps_here >= k);
        let periodic =
            config.checkpoint_every > 0 && state.step.is_multiple_of(config.checkpoint_every);
        if periodic || stop_here || last || state.stopped_early {
            let dir = self.run_dir.join("checkpoint");
            save_checkpoint(&dir, model, self.setup, optimizer, state, config)?;
        }
        Ok(stop_here && !last && !state.stopped_early)
    }
}
