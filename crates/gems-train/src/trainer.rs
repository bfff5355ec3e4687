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
use burn::optim::GradientsParams;
use burn::tensor::Device;
use gems_data::{Split, Task};
use gems_metrics::{EvalReport, MetricsLine, RunSummary, TrainRecord, ValidRecord};
use gems_model::{Llama, Pretrained};
use gems_optim::{GradientWindow, Method, Optimizer, StepGradients, TaskGradient};

use crate::batches::step_batches;
use crate::checkpoint::{TrainerState, read_json, replace_dir, resolve_dir, write_json};
use crate::config::{StopMetric, TrainConfig};
use crate::error::{Result, TrainError};
use crate::eval::{EvalOptions, evaluate, perplexity, text_windows};
use crate::forward::target_loss;
use crate::frozen_cache::FrozenStates;
use crate::progress::{Event, Phase, Reporter};
pub use crate::run_setup::resolved_config;
use crate::run_setup::{FrozenRows, RunSetup, lora_config};
pub use crate::rundir::tuned_model_dir;
use crate::rundir::{
    METRICS, checkpoint_to_resume, prepare_logs, resolve_config, save_checkpoint, trainer_state,
};
use crate::setup::{LossTargets, Sample, Setup};

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
    frozen: Option<&FrozenStates>,
) -> Result<TaskGradient> {
    let loss = target_loss(model, samples, pad, targets, frozen)?;
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

/// The untuned model's test evaluation (kept across resumes; a new run computes its own, never
/// one left by an earlier start with perhaps another configuration), and the floors without a
/// language model on the same test examples (`baselines.json`; SASRec trains about a minute).
/// With `eval.cache` both come from the cache when a run with the same settings stored them
/// ([`crate::eval_cache`]), and are stored there when computed.
fn before_and_floors(
    run: &RunSetup,
    run_dir: &Path,
    resumed: bool,
    progress: &Reporter,
) -> Result<Option<EvalReport>> {
    let RunSetup { config, setup, tasks, .. } = run;
    let before_path = run_dir.join("before.json");
    let before: Option<EvalReport> = if !config.eval.before {
        None
    } else {
        if !(before_path.exists() && resumed) {
            cached(run, "before.json", &before_path, progress, || {
                test_report(&setup.pretrained.model, setup, config, "before", tasks, progress)
            })?;
        }
        Some(read_json(&before_path)?)
    };
    let floors_path = run_dir.join(gems_metrics::BASELINES_FILE);
    if config.eval.floors && !floors_path.exists() {
        write_floors(run, &floors_path, progress)?;
    }
    Ok(before)
}

/// Writes the run's `name` to `dest`: from the evaluation cache when the run has one
/// (`eval.cache`) and it holds `name` for the run's settings, else computed by `compute`,
/// written, and stored there.
fn cached<T: serde::Serialize>(
    run: &RunSetup,
    name: &str,
    dest: &Path,
    progress: &Reporter,
    compute: impl FnOnce() -> Result<T>,
) -> Result<()> {
    let cache = run.eval_cache();
    if let Some(cache) = &cache
        && cache.restore(name, dest)?
    {
        progress
            .note(|| format!("{name}: from the evaluation cache {}", cache.path(name).display()));
        return Ok(());
    }
    write_json(dest, &compute()?)?;
    match &cache {
        Some(cache) => cache.store(name, dest, &run.config),
        None => Ok(()),
    }
}

/// Writes the floors without a language model (`baselines.json`: most popular, BM25, SASRec,
/// ItemKNN, successors) on the run's test examples to `dest`, through the evaluation cache
/// when the run has one ([`crate::eval_cache`]; SASRec trains about a minute): what `gems
/// train` writes beside a run, and `gems eval --floors` for a finished one.
///
/// # Errors
/// The floors' evaluation, or I/O failures.
pub fn write_floors(run: &RunSetup, dest: &Path, progress: &Reporter) -> Result<()> {
    cached(run, gems_metrics::BASELINES_FILE, dest, progress, || {
        let options =
            eval_options(&run.config, Split::Test, "floor", &run.tasks, &Reporter::silent());
        crate::baselines::evaluate_baselines(&run.setup.corpus, &options)
    })
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
/// One optimizer step's gradients (see [`step_batches`]) and the tokens they held; with
/// `frozen`, the frozen layers' part of each batch comes from its kept states.
pub(crate) fn step_gradients(
    model: &Llama,
    run: (&Setup, &TrainConfig, &[Task]),
    state: &mut TrainerState,
    perms: &mut [Option<(u64, Vec<usize>)>],
    frozen: Option<&FrozenStates>,
) -> Result<(StepGradients, usize)> {
    let (setup, config, tasks) = run;
    let mut windows: Vec<GradientWindow> = tasks.iter().map(|_| GradientWindow::new()).collect();
    let mut tokens = 0usize;
    for (task, batch) in step_batches(setup, config, tasks, state, perms) {
        let k = tasks.iter().position(|&t| t == task).unwrap_or_default();
        tokens += batch.iter().map(|s| s.ids.len()).sum::<usize>();
        let targets = setup.loss_targets(task);
        let g = task_gradient(model, &batch, setup.corpus.eos_id, targets, frozen)?;
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
    let (config, _) = resolve_config(config, run_dir, resume, reporter)?;
    let device = options.device.clone();
    let assembled = RunSetup::load(&config, &device, reporter)?;
    if assembled.config.data.tasks != config.data.tasks {
        write_json(&run_dir.join("config.json"), &assembled.config)?;
    }
    let RunSetup { config, setup, tasks, .. } = &assembled;
    let before = before_and_floors(&assembled, run_dir, resume.is_some(), reporter)?;

    let train_device = device.autodiff();
    let mut optimizer = assembled.optimizer(resume, run_dir, &train_device, reporter)?;
    let mut model = assembled.model_to_train(resume, &train_device)?;
    let run = Run {
        frozen_states: assembled.frozen_states(&model, reporter)?,
        frozen: assembled.frozen_rows(&train_device),
        n_train: tasks.iter().map(|&t| setup.train_rows(t).len()).collect(),
        setup,
        config,
        tasks,
        run_dir,
    };
    let mut state = trainer_state(resume, &optimizer, config)?;
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
            run.save_frozen_states(reporter)?;
            return Ok(RunOutcome::Stopped { step: state.step });
        }
    }
    progress.finish(Some(format!("{} steps", state.step)));
    run.save_frozen_states(reporter)?;

    let summary =
        finish_run(&model, setup, config, tasks, &optimizer, &state, before, run_dir, reporter)?;
    Ok(RunOutcome::Finished(Box::new(summary)))
}

/// What every step of a run reads: the data, the configuration, the trained tasks, the run
/// directory, and the embedding rows to keep frozen.
struct Run<'a> {
    setup: &'a Setup,
    config: &'a TrainConfig,
    tasks: &'a [Task],
    run_dir: &'a Path,
    frozen: Option<FrozenRows>,
    /// The kept states entering the first tuned layer (`model.frozen_cache`).
    frozen_states: Option<FrozenStates>,
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
        let run = (self.setup, self.config, self.tasks);
        let (grads, tokens) =
            step_gradients(&model, run, state, perms, self.frozen_states.as_ref())?;
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

    /// Saves the kept frozen states (`model.frozen_cache`) for later runs, and says how many
    /// rows were read and computed.
    fn save_frozen_states(&self, reporter: &Reporter) -> Result<()> {
        let Some(f) = &self.frozen_states else { return Ok(()) };
        let stats = f.stats();
        let in_file = f.save()?;
        reporter.note(|| {
            format!(
                "frozen states: {} rows read from the cache, {} computed; {} rows in {}",
                stats.loaded,
                stats.rows - stats.loaded,
                in_file,
                f.file().display()
            )
        });
        Ok(())
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
