//! `gems train`, `eval`, `recommend`, `search`, `report`, `export` and `selftest`.
//!
//! Configuration precedence: built-in defaults, then `--preset`, then `--config FILE` (JSON or
//! TOML; fields it names replace the preset's), then flags. The resolved configuration is saved
//! as `config.json` in the run directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use gems_metrics::EvalReport;
use gems_optim::Method;
use gems_subspace::{ProjectionType, ProjectorSide};
use gems_train::config::{StopMetric, TaskSelection};
use gems_train::infer::{load_run, top_items, user_history, user_items};
use gems_train::trainer::{eval_options, test_report};
use gems_train::{Reporter, RunOptions, RunOutcome, TrainConfig, train};
use serde::Serialize;

use crate::device::{Backend, device};
use crate::progress::reporter;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PresetArg {
    /// The main job's CPU preset (2 cores, about 15 minutes): see docs/training.md.
    Cpu,
    /// The full model on a GPU: see docs/training.md.
    Gpu,
    /// Library defaults.
    Default,
}

/// Where a command runs.
#[derive(Debug, Args)]
pub struct DeviceArgs {
    /// Backend: flex (CPU, always built), cuda or wgpu (need the cargo feature of that name).
    #[arg(long, value_enum, default_value = "flex")]
    pub device: Backend,
    /// Device index (GPU number).
    #[arg(long, default_value_t = 0)]
    pub device_index: usize,
}

/// Arguments of `gems train`. Serialised (field name to value), the configuration flags are
/// what [`CONFIG_FLAGS`] reads; the others are skipped.
#[derive(Debug, Args, Serialize)]
pub struct TrainArgs {
    /// Run directory (created; must not hold a run unless --resume). A finished run writes
    /// its report to DIR/report/report.md (as `gems report DIR --out DIR/report`).
    #[arg(long)]
    #[serde(skip)]
    pub out: PathBuf,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    #[serde(skip)]
    pub resume: bool,
    /// Print the resolved configuration (preset, --config file and flags) as JSON and exit
    /// without training.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// Starting configuration.
    #[arg(long, value_enum, default_value = "cpu")]
    #[serde(skip)]
    pub preset: PresetArg,
    /// A JSON (.json) or TOML configuration file applied over the preset.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Training method.
    #[arg(long, value_enum)]
    #[serde(skip)]
    pub method: Option<Method>,
    /// gems ablation: no null-space projection.
    #[arg(long)]
    pub no_null_space: bool,
    /// gems ablation: one subspace on the shared gradient (GaLore + null space).
    #[arg(long)]
    pub single_subspace: bool,
    /// gems option: task subspaces orthogonal to the shared one.
    #[arg(long)]
    pub complement: bool,
    /// Re-apply the null-space projector to the final update (the default).
    #[arg(long, conflicts_with = "no_strict_null_space")]
    pub strict_null_space: bool,
    /// Do not re-apply the projector to the final update (the paper's GEMS).
    #[arg(long)]
    pub no_strict_null_space: bool,
    /// Side of the null-space projectors: statistics of each layer's inputs (the default;
    /// AlphaEdit: with strict mode the update leaves the layer's response to general text
    /// unchanged) or of its outputs (the paper's GEMS).
    #[arg(long, value_enum)]
    pub null_space_side: Option<ProjectorSide>,
    /// Tasks trained on.
    #[arg(long, value_enum)]
    pub tasks: Option<TaskSelection>,
    /// Shared-subspace rank r (GaLore `rank`); task subspaces get r/2.
    #[arg(long)]
    pub rank: Option<usize>,
    /// Steps between subspace refreshes (GaLore `update_proj_gap`).
    #[arg(long)]
    pub update_proj_gap: Option<u64>,
    /// Back-projection scale alpha (GaLore `scale`).
    #[arg(long)]
    pub scale: Option<f64>,
    /// Projection side rule (GaLore `proj_type`).
    #[arg(long, value_enum)]
    pub proj_type: Option<ProjectionType>,
    /// LoRA rank.
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha.
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Optimizer steps.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Rows per task per micro-batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Length bucketing: sort each run of K batches of a task's samples by length and serve
    /// its batches in a seeded random order (less padding; 1: off).
    #[arg(long)]
    pub bucket: Option<usize>,
    /// Peak learning rate (cosine schedule with warm-up).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Decoupled weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Seed of the run.
    #[arg(long)]
    pub seed: Option<u64>,
    /// A GGUF file or Hugging Face directory (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Keep only the first k decoder layers.
    #[arg(long)]
    pub keep_layers: Option<usize>,
    /// Keep all decoder layers (overrides the preset's truncation).
    #[arg(long, conflicts_with = "keep_layers")]
    pub all_layers: bool,
    /// Train only the top k decoder layers; the layers below are frozen and run without an
    /// autodiff graph (the embedding then learns through the tied head only).
    #[arg(long)]
    pub tune_layers: Option<usize>,
    /// Train every decoder layer (overrides the preset's --tune-layers).
    #[arg(long, conflicts_with = "tune_layers")]
    pub tune_all_layers: bool,
    /// Dataset name (scientific, beauty, qilin_toy) or directory.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Train on a directory written by `gems data prepare` (checksums verified) instead of
    /// preparing --dataset here; its manifest decides the dataset, history length, negatives
    /// and seed.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["dataset", "max_history"])]
    #[serde(skip)]
    pub data: Option<PathBuf>,
    /// Where dataset names are looked up.
    #[arg(long, env = "GEMS_DATA_DIR")]
    pub data_root: Option<PathBuf>,
    /// History items per prompt.
    #[arg(long)]
    pub max_history: Option<usize>,
    /// Validate every N steps and at the last (0: never; the final model is kept).
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Early-stopping patience in validations (0: never).
    #[arg(long)]
    pub patience: Option<u32>,
    /// What early stopping watches.
    #[arg(long, value_enum)]
    pub stop_metric: Option<StopMetric>,
    /// Validation examples per task (0: all).
    #[arg(long)]
    pub valid_examples: Option<usize>,
    /// Test examples per task (0: all).
    #[arg(long)]
    pub test_examples: Option<usize>,
    /// Skip the untuned model's evaluation.
    #[arg(long)]
    pub no_before: bool,
    /// Skip perplexity.
    #[arg(long)]
    pub no_perplexity: bool,
    /// Use the authors' NDCG normaliser (ideal DCG from hits found in the top k).
    #[arg(long)]
    pub authors_ndcg: bool,
    /// Leave the items each example's user had before its target out of the full-catalogue
    /// ranking (the common protocol); by default every item is ranked.
    #[arg(long)]
    pub exclude_history: bool,
    /// Untie the output head from the embedding before training: the head's copy trains (as
    /// --embeddings says) and the input rows stay as they started.
    #[arg(long)]
    pub untie_head: bool,
    /// Which embedding rows train: all, items (text-token rows frozen) or none.
    #[arg(long, value_enum)]
    pub embeddings: Option<gems_train::config::EmbeddingPolicy>,
    /// The text each item token's initial row is built from: title, or title-categories
    /// (the title and the category path below the root).
    #[arg(long, value_enum)]
    pub item_text: Option<gems_train::config::ItemText>,
    /// How that text's tokens weigh in the row: mean (all alike) or idf (inverse document
    /// frequency over the catalogue's item texts).
    #[arg(long, value_enum)]
    pub item_weights: Option<gems_train::config::ItemWeights>,
    /// Targets of a recommendation training row: last (the answer only) or all (every
    /// history item after the first too, one row per stretch of a user's training sequence).
    #[arg(long, value_enum)]
    pub rec_targets: Option<gems_train::config::RecTargets>,
    /// Softmax of the training loss at an item target: vocabulary (every token) or catalogue
    /// (the item tokens only: the ranking's cross-entropy).
    #[arg(long, value_enum)]
    pub item_softmax: Option<gems_train::config::ItemSoftmax>,
    /// Wording of a recommendation prompt: paper (the history, then the instruction) or
    /// history-last (the instruction, then the history; the answer right after the last
    /// item's separator, the kind of position --rec-targets all trains).
    #[arg(long, value_enum)]
    pub rec_prompt: Option<gems_train::config::RecPrompt>,
    /// Leave out of each item target's training softmax the items its user had before it (as
    /// --exclude-history leaves them out of the ranking).
    #[arg(long)]
    pub train_exclude_history: bool,
    /// Add to every item row a collaborative part of this many dimensions, learned from the
    /// training interactions (PPMI of co-occurrences, truncated eigendecomposition); 0: none.
    #[arg(long, value_name = "DIMS")]
    pub item_collab: Option<usize>,
    /// The collaborative part's length as a multiple of the item rows' mean norm (default 1).
    #[arg(long, value_name = "X")]
    pub item_collab_scale: Option<f64>,
    /// What the collaborative part is made from: ppmi (the training co-occurrences) or sasrec
    /// (the item embeddings of a SASRec trained on the training rec examples).
    #[arg(long, value_enum)]
    pub item_collab_source: Option<gems_train::config::CollabSource>,
    /// Learning rate of the embedding (and an untied head) as a multiple of --lr; with
    /// `--embeddings items` only the new item rows feel it.
    #[arg(long)]
    #[serde(skip)]
    pub embedding_lr_scale: Option<f64>,
    /// Keep the untuned model's evaluation and the floors in DIR, keyed by every setting they
    /// depend on, and reuse them in runs that differ only in how they train (method,
    /// optimizer, schedule); the key does not cover the code, so use one DIR per version.
    #[arg(long, value_name = "DIR")]
    pub eval_cache: Option<PathBuf>,
    /// Keep the hidden states entering the first tuned layer of every training row in DIR,
    /// computed once and reused by later epochs and by runs of the same model and item rows
    /// (seeds, methods); needs --tune-layers and --untie-head (or --embeddings none).
    #[arg(long, value_name = "DIR")]
    pub frozen_cache: Option<PathBuf>,
    /// Write a checkpoint every N steps (0: only at the end, and when stopping early).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Stop cleanly after N steps of this process (resume later).
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// Run label.
    #[arg(long)]
    pub label: Option<String>,
    /// No progress output.
    #[arg(long)]
    #[serde(skip)]
    pub quiet: bool,
    #[command(flatten)]
    #[serde(skip)]
    pub device: DeviceArgs,
}

/// Where each configuration flag of `gems train` writes: the flag (its field in [`TrainArgs`]),
/// the dotted path of the configuration field, and for a switch the JSON value it writes when
/// given (`None`: the flag's own value). The flags reach the configuration through the same
/// merge as a preset and a `--config` file ([`TrainConfig::with_overlay`]), so a field is named
/// once here and nowhere else; a test sets every flag and finds its value at its path.
const CONFIG_FLAGS: &[(&str, &str, Option<&str>)] = &[
    ("no_null_space", "optimizer.gems.null_space", Some("false")),
    ("single_subspace", "optimizer.gems.single_subspace", Some("true")),
    ("complement", "optimizer.gems.complement", Some("true")),
    ("strict_null_space", "optimizer.gems.strict_null_space", Some("true")),
    ("no_strict_null_space", "optimizer.gems.strict_null_space", Some("false")),
    ("null_space_side", "null_space.side", None),
    ("rank", "optimizer.gems.rank", None),
    ("update_proj_gap", "optimizer.gems.update_proj_gap", None),
    ("scale", "optimizer.gems.scale", None),
    ("proj_type", "optimizer.gems.proj_type", None),
    ("weight_decay", "optimizer.weight_decay", None),
    ("lora_rank", "lora.rank", None),
    ("lora_alpha", "lora.alpha", None),
    ("tasks", "data.tasks", None),
    ("steps", "schedule.steps", None),
    ("batch_size", "schedule.batch_size", None),
    ("grad_accum", "schedule.grad_accum", None),
    ("bucket", "schedule.bucket", None),
    ("lr", "schedule.lr", None),
    // One seed: the optimizer's sketches follow it (`resolved_config` checks the two agree).
    ("seed", "seed", None),
    ("seed", "optimizer.seed", None),
    ("model", "model.path", None),
    ("keep_layers", "model.keep_layers", None),
    ("all_layers", "model.keep_layers", Some("null")),
    ("tune_layers", "model.tune_layers", None),
    ("tune_all_layers", "model.tune_layers", Some("null")),
    ("dataset", "data.dataset", None),
    ("data_root", "data.data_root", None),
    ("max_history", "data.max_history", None),
    ("eval_every", "eval.every", None),
    ("patience", "eval.patience", None),
    ("stop_metric", "eval.metric", None),
    ("valid_examples", "eval.valid_examples", None),
    ("test_examples", "eval.test_examples", None),
    ("no_before", "eval.before", Some("false")),
    ("no_perplexity", "eval.perplexity", Some("false")),
    ("authors_ndcg", "eval.ndcg_normaliser", Some("\"authors\"")),
    ("exclude_history", "eval.exclude_history", Some("true")),
    ("untie_head", "model.untie_head", Some("true")),
    ("embeddings", "model.embeddings", None),
    ("item_text", "model.item_text", None),
    ("item_weights", "model.item_weights", None),
    ("item_collab", "model.item_collab", None),
    ("item_collab_scale", "model.item_collab_scale", None),
    ("item_collab_source", "model.item_collab_source", None),
    ("rec_targets", "data.rec_targets", None),
    ("item_softmax", "data.item_softmax", None),
    ("rec_prompt", "data.rec_prompt", None),
    ("train_exclude_history", "data.train_exclude_history", Some("true")),
    ("eval_cache", "eval.cache", None),
    ("frozen_cache", "model.frozen_cache", None),
    ("checkpoint_every", "checkpoint_every", None),
    ("stop_after", "stop_after", None),
    ("label", "label", None),
];

/// Configuration flags that are not one field: the preset and file the flags apply over, the
/// method (which switches the optimizer's section: `switch_method`), a prepared directory
/// (whose manifest sets several data fields) and the embedding's learning-rate scale (a
/// parameter group). With [`RUN_FLAGS`] and [`CONFIG_FLAGS`] they are every flag (tested).
#[cfg(test)]
const DERIVED_FLAGS: [&str; 5] = ["preset", "config", "method", "data", "embedding_lr_scale"];

/// The configuration `args` describe: the preset, the `--config` file over it, then the flags
/// (the method first, so that the flags of its section apply to the switched section).
pub fn resolve_config(args: &TrainArgs) -> Result<TrainConfig> {
    let mut c = match args.preset {
        PresetArg::Cpu => TrainConfig::cpu_preset(),
        PresetArg::Gpu => TrainConfig::gpu_preset(),
        PresetArg::Default => TrainConfig::default(),
    };
    if let Some(path) = &args.config {
        c = merge_file(c, path)?;
    }
    if let Some(method) = args.method {
        c.optimizer = c.optimizer.switch_method(method);
    }
    c = c.with_overlay(flag_overlay(args)?).context("applying the flags")?;
    if let Some(dir) = &args.data {
        gems_train::setup::adopt_prepared(&mut c.data, dir)
            .with_context(|| format!("--data {}", dir.display()))?;
    }
    if let Some(scale) = args.embedding_lr_scale {
        c.set_embedding_lr_scale(scale);
    }
    c.validate()?;
    Ok(c)
}

/// The configuration fields the given flags set, as an overlay ([`CONFIG_FLAGS`]).
fn flag_overlay(args: &TrainArgs) -> Result<serde_json::Value> {
    let given = serde_json::to_value(args)?;
    let mut overlay = serde_json::json!({});
    for &(flag, path, switch) in CONFIG_FLAGS {
        let value = &given[flag];
        let value = match switch {
            _ if value.is_null() || *value == serde_json::Value::Bool(false) => continue,
            Some(json) => serde_json::from_str(json)?,
            None => value.clone(),
        };
        let mut slot = &mut overlay;
        for key in path.split('.') {
            slot = &mut slot[key];
        }
        *slot = value;
    }
    Ok(overlay)
}

/// Applies the fields a configuration file names over `base` (JSON objects merge recursively).
fn merge_file(base: TrainConfig, path: &Path) -> Result<TrainConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let overlay: serde_json::Value = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
    } else {
        let v: toml::Value =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        serde_json::to_value(v)?
    };
    // The error names the field (`schedule.steps: invalid type: string "many", expected u64`).
    base.with_overlay(overlay).with_context(|| path.display().to_string())
}

/// Flags of `gems train` that do not set the run's configuration.
const RUN_FLAGS: [&str; 7] =
    ["out", "resume", "stop_after", "device", "device_index", "quiet", "print_config"];

/// With `--resume`, configuration flags must resolve to the run's own configuration
/// (config.json): a resumed run keeps it, so a flag that would change it is refused, naming
/// the settings, rather than silently ignored. Repeating the run's own flags is accepted.
fn check_resume_flags(args: &TrainArgs, given: &[String], config: &TrainConfig) -> Result<()> {
    if !args.resume || given.iter().all(|id| RUN_FLAGS.contains(&id.as_str())) {
        return Ok(());
    }
    let path = args.out.join("config.json");
    if !path.is_file() {
        // The trainer refuses, saying what the directory holds.
        return Ok(());
    }
    let saved: TrainConfig = gems_train::checkpoint::read_json(&path)?;
    let (mut asked, _) = gems_train::trainer::resolved_config(config.clone())?;
    if asked.data.tasks == gems_train::config::TaskSelection::Both {
        // The trainer records the tasks the data has (no queries: rec only); not a change.
        asked.data.tasks = saved.data.tasks;
    }
    // Where the untuned evaluation and the floors are cached changes no result, nor where
    // the frozen states are kept (whether they are kept is compared).
    asked.eval.cache.clone_from(&saved.eval.cache);
    if asked.model.frozen_cache.is_some() && saved.model.frozen_cache.is_some() {
        asked.model.frozen_cache.clone_from(&saved.model.frozen_cache);
    }
    let changed = asked.differences(&saved);
    if !changed.is_empty() {
        bail!(
            "--resume continues the run in {} with its own configuration ({}); the flags \
             given would change {} and are refused. Resume with --out alone (and \
             --stop-after, --device, --quiet), or start a new run in another directory",
            args.out.display(),
            path.display(),
            changed.join(", ")
        );
    }
    Ok(())
}

/// `gems train`; `given` are the ids of the flags typed on the command line.
pub fn run_train(args: TrainArgs, given: &[String]) -> Result<()> {
    let config = resolve_config(&args)?;
    if args.print_config {
        println!("{}", config.to_json());
        return Ok(());
    }
    check_resume_flags(&args, given, &config)?;
    let dev = device(args.device.device, args.device.device_index)?;
    let options = RunOptions { device: dev, resume: args.resume, progress: reporter(args.quiet) };
    match train(&config, &args.out, &options)? {
        RunOutcome::Stopped { step } => {
            eprintln!(
                "stopped after step {step}; continue with --resume --out {}",
                args.out.display()
            );
        }
        RunOutcome::Finished(summary) => {
            let run = gems_metrics::report::load_run(&args.out)?;
            println!("{}", gems_metrics::report::markdown_table(std::slice::from_ref(&run)));
            // The run's report, as `gems report RUN --out RUN/report` writes it.
            let report_dir = args.out.join("report");
            std::fs::create_dir_all(&report_dir)
                .with_context(|| format!("creating {}", report_dir.display()))?;
            let report =
                gems_metrics::report::write_report(std::slice::from_ref(&run), &report_dir)?;
            eprintln!(
                "run {} finished: {} steps, {:.0} s training; summary in {}, report in {}",
                summary.label,
                summary.steps,
                summary.train_seconds,
                args.out.join("summary.json").display(),
                report.display()
            );
        }
    }
    Ok(())
}

/// Arguments of `gems parity`: a run's configuration (as `gems train` takes it; `--out` gets
/// parity.json) and the number of optimizer steps compared.
#[derive(Debug, Args)]
pub struct ParityArgs {
    #[command(flatten)]
    pub train: TrainArgs,
    /// Optimizer steps taken on the same gradients on both devices.
    #[arg(long, default_value_t = 2)]
    pub parity_steps: u64,
}

/// `gems parity`: `--device` against flex on the same model, batches and steps
/// (`gems_train::parity`); prints one summary line per comparison and writes parity.json.
pub fn run_parity(args: ParityArgs) -> Result<()> {
    let config = resolve_config(&args.train)?;
    let dev = device(args.train.device.device, args.train.device.device_index)?;
    let report = gems_train::parity::backend_parity(
        &config,
        &burn::tensor::Device::flex(),
        &dev,
        args.parity_steps,
        &args.train.out,
        &reporter(args.train.quiet),
    )?;
    for (task, (a, b)) in &report.losses {
        println!("loss {task}: flex {a:.6}, {} {b:.6}", args.train.device.device);
    }
    println!(
        "gradients: max relative difference {:.3e} ({})",
        report.gradient_max_rel_diff, report.gradient_worst
    );
    println!(
        "{} {} steps: update max relative difference {:.3e} ({})",
        report.method, report.steps, report.update_max_rel_diff, report.update_worst
    );
    println!("evaluation: max metric difference {:.3e}", report.eval_max_abs_diff);
    eprintln!(
        "parity of {} against flex: {:.1} s, report in {}",
        args.train.device.device,
        report.seconds,
        args.train.out.join("parity.json").display()
    );
    Ok(())
}

/// Arguments of `gems eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run directory (its tuned model and configuration).
    pub run: PathBuf,
    /// Split: test or valid.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Examples per task (0: all; default: the run's test_examples).
    #[arg(long)]
    pub examples: Option<usize>,
    /// Write the report as JSON here (default: print it).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
    /// Leave the items each example's user had before its target out of the full-catalogue
    /// ranking (default: the run's own setting, which ranks every item unless it was trained
    /// with this flag).
    #[arg(long)]
    pub exclude_history: bool,
    /// Evaluate the floors without a language model (most popular, BM25, SASRec, ItemKNN,
    /// successors: what a run writes to baselines.json) on the same examples instead of the
    /// tuned model. Needs only the run's config.json, not its model: it works on the records
    /// of a reproduction (docs/results/runs/).
    #[arg(long)]
    pub floors: bool,
    /// With --floors and --out: take the floors from DIR when a run with the same settings
    /// stored them there (`gems train --eval-cache`), else store them there.
    #[arg(long, value_name = "DIR", requires_all = ["floors", "out"])]
    pub eval_cache: Option<PathBuf>,
    /// Also write the evaluated examples (prompt ids, target, negatives) as JSON lines here,
    /// to reproduce the metrics in another implementation (docs/python.md).
    #[arg(long, value_name = "FILE")]
    pub dump_examples: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `gems eval`.
pub fn run_eval(args: EvalArgs) -> Result<()> {
    let dev = device(args.device.device, args.device.device_index)?;
    if args.floors {
        return eval_floors(&args, &dev);
    }
    let loaded = load_run(&args.run, &dev)?;
    let mut config = loaded.config.clone();
    if args.exclude_history {
        config.eval.exclude_history = true;
    }
    if let Some(n) = args.examples {
        config.eval.test_examples = n;
        config.eval.valid_examples = n;
    }
    let tasks: Vec<gems_data::Task> =
        gems_data::Task::ALL.into_iter().filter(|&t| config.data.tasks.includes(t)).collect();
    let split = split(&args.split)?;
    let progress = reporter(args.quiet);
    let options = eval_options(&config, split, "eval", &tasks, &progress);
    if let Some(path) = &args.dump_examples {
        let n = gems_train::eval::dump_examples(&loaded.setup.corpus, &options, path)?;
        eprintln!("{n} evaluated examples written to {}", path.display());
    }
    let model = &loaded.setup.pretrained.model;
    let report: EvalReport = match split {
        gems_data::Split::Test => {
            test_report(model, &loaded.setup, &config, "eval", &tasks, &progress)?
        }
        _ => gems_train::eval::evaluate(model, &loaded.setup.corpus, &options)?,
    };
    write_or_print(&report, args.out.as_deref())
}

/// `gems eval --floors`: the floors on the run's examples, from its configuration and the
/// model it started from (the floors use the data and the tokenizer, not the tuned weights).
/// The test floors written to a file are what `gems train` writes to baselines.json, through
/// the evaluation cache when one is given.
fn eval_floors(args: &EvalArgs, dev: &burn::tensor::Device) -> Result<()> {
    let mut config = gems_train::infer::run_config(&args.run)?;
    if let Some(n) = args.examples {
        config.eval.test_examples = n;
        config.eval.valid_examples = n;
    }
    if args.exclude_history {
        config.eval.exclude_history = true;
    }
    config.eval.cache = args.eval_cache.clone();
    let split = split(&args.split)?;
    let progress = reporter(args.quiet);
    let run = gems_train::run_setup::RunSetup::load(&config, dev, &progress)?;
    let options = eval_options(&run.config, split, "floor", &run.tasks, &Reporter::silent());
    if let Some(path) = &args.dump_examples {
        let n = gems_train::eval::dump_examples(&run.setup.corpus, &options, path)?;
        eprintln!("{n} evaluated examples written to {}", path.display());
    }
    match (&args.out, split) {
        (Some(out), gems_data::Split::Test) => {
            gems_train::trainer::write_floors(&run, out, &progress)?;
        }
        _ if args.eval_cache.is_some() => bail!("--eval-cache keeps the test floors only"),
        (out, _) => {
            let floors = gems_train::baselines::evaluate_baselines(&run.setup.corpus, &options)?;
            write_or_print(&floors, out.as_deref())?;
        }
    }
    Ok(())
}

/// The split `--split` names.
fn split(name: &str) -> Result<gems_data::Split> {
    match name {
        "test" => Ok(gems_data::Split::Test),
        "valid" => Ok(gems_data::Split::Valid),
        other => bail!("--split must be test or valid, not `{other}`"),
    }
}

/// `value` as pretty JSON, written atomically to `out`, else printed.
fn write_or_print(value: &impl serde::Serialize, out: Option<&Path>) -> Result<()> {
    let json = serde_json::to_string_pretty(value)?;
    match out {
        Some(p) => gems_train::checkpoint::write_atomic(p, json.as_bytes())?,
        None => println!("{json}"),
    }
    Ok(())
}

/// Arguments of `gems recommend` and `gems search`.
#[derive(Debug, Args)]
pub struct RankArgs {
    /// A run directory.
    pub run: PathBuf,
    /// The user id as in the source data.
    #[arg(long)]
    pub user: String,
    /// How many items to list.
    #[arg(long, default_value_t = 10)]
    pub top_k: usize,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also list items already in the user's history (by default every item the user had,
    /// not only those in the prompt, is left out).
    #[arg(long)]
    pub include_history: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `gems recommend` (no query) and `gems search` (with a query).
pub fn run_rank(args: RankArgs, query: Option<&str>) -> Result<()> {
    if args.top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    if query.is_some_and(|q| q.trim().is_empty()) {
        bail!("--query must not be empty");
    }
    let dev = device(args.device.device, args.device.device_index)?;
    let loaded = load_run(&args.run, &dev)?;
    let known = user_items(&loaded.setup, &args.user)?;
    let history = user_history(&loaded.setup, &args.user, loaded.config.data.max_history)?;
    let exclude = if args.include_history { &[][..] } else { known.as_slice() };
    let items = top_items(&loaded.setup, &history, query, args.top_k, exclude)?;
    if args.json {
        for it in &items {
            println!("{}", serde_json::to_string(it)?);
        }
        return Ok(());
    }
    let distinct: std::collections::BTreeSet<u32> = known.iter().copied().collect();
    println!(
        "user {} ({} events, {} distinct items, the last {} in the prompt; {}{})",
        args.user,
        known.len(),
        distinct.len(),
        history.len(),
        if args.include_history { "ranked with the rest" } else { "left out of the list" },
        query.map(|q| format!(", query \"{q}\"")).unwrap_or_default()
    );
    println!("| rank | item | log p | title |");
    println!("|---:|---|---:|---|");
    for it in items {
        println!(
            "| {} | {} | {:.3} | {} |",
            it.rank,
            it.id,
            it.log_prob,
            it.title.as_deref().unwrap_or("(no title)").replace('|', "\\|")
        );
    }
    Ok(())
}

/// `gems report`.
pub fn run_report(runs: &[PathBuf], out: &Path) -> Result<()> {
    if runs.is_empty() {
        bail!("name at least one run directory");
    }
    let mut loaded = Vec::new();
    for dir in runs {
        if dir.join("summary.json").is_file() {
            loaded.push(gems_metrics::report::load_run(dir)?);
        } else if dir.is_dir() {
            let found = gems_metrics::report::load_runs(dir)?;
            if found.is_empty() {
                bail!("{} has no summary.json and no finished runs below it", dir.display());
            }
            loaded.extend(found);
        } else {
            bail!("{} is not a directory", dir.display());
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = gems_metrics::report::write_report(&loaded, out)?;
    let text = std::fs::read_to_string(&path)?;
    println!("{text}");
    eprintln!(
        "report written to {} (with {})",
        path.display(),
        gems_metrics::PLOT_FILES.join(", ")
    );
    Ok(())
}

/// `gems export`: the tuned model as a Hugging Face directory, or the LoRA adapter (PEFT) with
/// the base it applies to in `OUT/base`.
pub fn run_export(run: &Path, out: &Path, adapter: bool, base_name: Option<&str>) -> Result<()> {
    if base_name.is_some() && !adapter {
        bail!("--base-name names the base of an adapter: give it with --adapter");
    }
    if adapter {
        gems_train::export::export_adapter(run, out, base_name)?;
        eprintln!(
            "PEFT adapter (adapter_config.json, adapter_model.safetensors, the tokenizer) in {0}, \
             its base model in {0}/base, recorded as base_model_name_or_path = {1} (see \
             docs/python.md)",
            out.display(),
            base_name.map_or_else(|| format!("{}/base (absolute)", out.display()), str::to_owned)
        );
    } else {
        gems_train::export::export_model(run, out)?;
        eprintln!("merged model (Hugging Face layout) in {}", out.display());
    }
    Ok(())
}

/// `gems selftest`: a tiny random model trained a few steps with GEMS on a slice of
/// Scientific, then evaluated, on the chosen backend.
pub fn run_selftest(device_args: &DeviceArgs, data_root: &Path, steps: u64) -> Result<()> {
    let dev = device(device_args.device, device_args.device_index)?;
    let root = tempfile::tempdir()?;
    let config = gems_train::tiny::tiny_run_config(root.path(), data_root, steps)?;
    let started = std::time::Instant::now();
    let outcome = train(
        &config,
        &root.path().join("run"),
        &RunOptions { device: dev, resume: false, progress: reporter(false) },
    )?;
    let RunOutcome::Finished(summary) = outcome else { bail!("selftest stopped early") };
    let after = summary.after.as_ref().context("no final evaluation")?;
    let before = summary.before.as_ref().context("no initial evaluation")?;
    for (task, loss) in &after.loss {
        let b = before.loss.get(task).copied().unwrap_or(f64::NAN);
        println!("{task}: target loss {b:.4} -> {loss:.4}");
        if !loss.is_finite() {
            bail!("{task}: non-finite loss after training");
        }
    }
    println!(
        "selftest on {} passed: {} steps, {:.1} s",
        device_args.device,
        summary.steps,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Train {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn parse(flags: &[&str]) -> TrainArgs {
        let line = ["gems-train", "--out", "run", "--preset", "default"].iter().chain(flags);
        Train::try_parse_from(line).expect("valid flags").args
    }

    #[test]
    fn every_train_flag_is_a_config_field_or_named_as_not_one() {
        let command = Train::command();
        let ids: Vec<&str> = command.get_arguments().map(|a| a.get_id().as_str()).collect();
        for id in &ids {
            let listed = CONFIG_FLAGS.iter().any(|(f, _, _)| f == id)
                || DERIVED_FLAGS.contains(id)
                || RUN_FLAGS.contains(id);
            assert!(listed, "--{id} is neither in CONFIG_FLAGS nor named as derived or a run flag");
        }
        for (flag, _, _) in CONFIG_FLAGS {
            assert!(ids.contains(flag), "CONFIG_FLAGS names `{flag}`, which is no flag");
        }
    }

    /// Every configuration flag that does not conflict with another, each with a value other
    /// than its default ([`every_config_flag_lands_at_its_field`]).
    const COMMON_FLAGS: &[&str] = &[
        "--no-null-space",
        "--null-space-side",
        "output",
        "--rank",
        "12",
        "--update-proj-gap",
        "7",
        "--scale",
        "0.5",
        "--proj-type",
        "left",
        "--weight-decay",
        "0.03",
        "--lora-rank",
        "4",
        "--lora-alpha",
        "9",
        "--tasks",
        "rec",
        "--steps",
        "11",
        "--batch-size",
        "3",
        "--grad-accum",
        "2",
        "--bucket",
        "5",
        "--lr",
        "0.002",
        "--seed",
        "41",
        "--model",
        "/m.gguf",
        "--dataset",
        "beauty",
        "--data-root",
        "/d",
        "--max-history",
        "6",
        "--eval-every",
        "4",
        "--patience",
        "2",
        "--stop-metric",
        "ndcg10",
        "--valid-examples",
        "17",
        "--test-examples",
        "19",
        "--no-before",
        "--no-perplexity",
        "--authors-ndcg",
        "--exclude-history",
        "--embeddings",
        "none",
        "--untie-head",
        "--item-text",
        "title-categories",
        "--item-weights",
        "idf",
        "--item-collab",
        "8",
        "--item-collab-scale",
        "0.25",
        "--rec-targets",
        "all",
        "--item-softmax",
        "catalogue",
        "--rec-prompt",
        "history-last",
        "--train-exclude-history",
        "--item-collab-source",
        "sasrec",
        "--checkpoint-every",
        "3",
        "--eval-cache",
        "/c",
        "--stop-after",
        "2",
        "--label",
        "x",
    ];

    /// Every configuration flag, given a value other than the default, is found at its field
    /// in the resolved configuration (two command lines: three pairs of flags conflict).
    #[test]
    fn every_config_flag_lands_at_its_field() {
        // The frozen states need frozen layers.
        let one = [
            "--complement",
            "--strict-null-space",
            "--keep-layers",
            "3",
            "--tune-layers",
            "2",
            "--frozen-cache",
            "/f",
        ];
        let other =
            ["--single-subspace", "--no-strict-null-space", "--all-layers", "--tune-all-layers"];
        let mut checked = std::collections::BTreeSet::new();
        for extra in [&one[..], &other[..]] {
            let args = parse(&[COMMON_FLAGS, extra].concat());
            let given = serde_json::to_value(&args).unwrap();
            let resolved = serde_json::to_value(resolve_config(&args).unwrap()).unwrap();
            for &(flag, path, switch) in CONFIG_FLAGS {
                let value = &given[flag];
                if value.is_null() || *value == serde_json::Value::Bool(false) {
                    continue;
                }
                let expected = match switch {
                    Some(json) => serde_json::from_str(json).unwrap(),
                    None => value.clone(),
                };
                let at = path.split('.').fold(&resolved, |v, key| &v[key]);
                assert_eq!(*at, expected, "--{flag} did not set {path}");
                checked.insert(flag);
            }
        }
        assert_eq!(
            checked.len(),
            CONFIG_FLAGS.iter().map(|f| f.0).collect::<std::collections::BTreeSet<_>>().len()
        );
    }
}
