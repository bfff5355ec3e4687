//! [`RunSetup`]: a run assembled once. Training, the backend parity check, the PyTorch peer's
//! dump, the step bench and `gems selftest` (through [`crate::train`]) all start here, so what
//! each of them runs is what training trains: the same resolved settings, model, data, tasks,
//! model to train (frozen lower layers, LoRA adapters, embedding policy) and optimizer (with
//! its null space).

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};
use gems_data::Task;
use gems_model::{Llama, LoraConfig};
use gems_optim::{Method, Optimizer};

use crate::batches::active_tasks;
use crate::checkpoint::write_json;
use crate::config::{EmbeddingPolicy, TaskSelection, TrainConfig};
use crate::error::{Result, TrainError};
use crate::nullspace::{GeneralText, projectors};
use crate::progress::Reporter;
use crate::setup::{Setup, build, load_model, model_path};

/// A run's resolved settings with everything built from them that does not change while it
/// trains. [`RunSetup::load`] builds it; [`RunSetup::model_to_train`] and
/// [`RunSetup::optimizer`] give the trained state's starting point.
#[derive(Debug)]
pub struct RunSetup {
    /// The settings as the run records them ([`resolved_config`]: the model path filled in, one
    /// seed, what the method implies), with `data.tasks` narrowed to the tasks that have
    /// training samples.
    pub config: TrainConfig,
    /// The model file or directory the setup's model was loaded from: the pretrained one, or
    /// for [`RunSetup::tuned`] the tuned one.
    pub model_path: PathBuf,
    /// The pretrained model with item tokens, the tokenizer and the tokenised data.
    pub setup: Setup,
    /// The tasks trained, in [`Task::ALL`] order: those `data.tasks` asks for that have
    /// training samples.
    pub tasks: Vec<Task>,
}

impl RunSetup {
    /// Validates and resolves `config`, loads its model (checking the tuned layers and the
    /// subspace rank against it) and data, and finds the tasks to train; when the data has no
    /// training examples for a task `data.tasks` asks for, it says so and narrows
    /// `config.data.tasks` to what is trained.
    ///
    /// # Errors
    /// An invalid configuration, a missing model or data, no training samples for any task.
    pub fn load(config: &TrainConfig, device: &Device, reporter: &Reporter) -> Result<Self> {
        config.validate()?;
        let (config, model_path) = resolved_config(config.clone())?;
        let keep_layers = config.model.keep_layers;
        Self::with_model(config, model_path, keep_layers, device, reporter)
    }

    /// A finished run's setup from its recorded configuration and its tuned model
    /// (`model_dir`, with the item tokens and the kept layers already in it): what `gems eval`,
    /// `recommend`, `search` and `export` start from ([`crate::infer::load_run`]).
    ///
    /// # Errors
    /// A missing or unreadable model or data.
    pub fn tuned(config: TrainConfig, model_dir: &Path, device: &Device) -> Result<Self> {
        Self::with_model(config, model_dir.to_path_buf(), None, device, &Reporter::silent())
    }

    fn with_model(
        config: TrainConfig,
        model_path: PathBuf,
        keep_layers: Option<usize>,
        device: &Device,
        reporter: &Reporter,
    ) -> Result<Self> {
        let started = Instant::now();
        let pretrained = load_model(&model_path, keep_layers, device)?;
        check_rank(&config, &pretrained.model)?;
        freeze_lower_layers(pretrained.model.clone(), &config)?;
        let setup = build(pretrained, &config)?;
        let tasks = active_tasks(&config, &setup.corpus);
        if tasks.is_empty() {
            return Err(TrainError::Config(format!(
                "dataset `{}` has no training samples for tasks {:?}",
                setup.corpus.dataset, config.data.tasks
            )));
        }
        let run = Self { config, model_path, setup, tasks };
        run.note_setup(started, reporter);
        Ok(run.narrow_tasks(reporter))
    }

    /// The setup's note (model, items, tasks, time) and the notes on what the data lacks.
    fn note_setup(&self, started: Instant, reporter: &Reporter) {
        let (setup, config) = (&self.setup, &self.config);
        reporter.note(|| {
            format!(
                "model {} ({} layers, {} parameters), {} items, tasks {:?}, setup {:.1}s",
                self.model_path.display(),
                setup.pretrained.model.layers.len(),
                setup.pretrained.model.num_params(),
                setup.corpus.n_items(),
                self.tasks.iter().map(|t| t.name()).collect::<Vec<_>>(),
                started.elapsed().as_secs_f64()
            )
        });
        if config.data.negatives == 0 {
            reporter.note(|| {
                "data.negatives = 0: no sampled negatives, so the sampled protocol (the target \
                 among its negatives) is not reported; the full-catalogue ranking is"
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
    }

    /// When the data has no training examples for a task `data.tasks` asks for (no item has a
    /// query, so no search), the run trains the others: it says so, and `config.data.tasks`
    /// records the tasks it trains, so that the configuration is what happened.
    fn narrow_tasks(mut self, reporter: &Reporter) -> Self {
        let asked: Vec<Task> =
            Task::ALL.into_iter().filter(|&t| self.config.data.tasks.includes(t)).collect();
        if asked.len() == self.tasks.len() {
            return self;
        }
        let dropped: Vec<&str> =
            asked.iter().filter(|t| !self.tasks.contains(t)).map(|t| t.name()).collect();
        self.config.data.tasks = match self.tasks.as_slice() {
            [Task::Rec] => TaskSelection::Rec,
            [Task::Search] => TaskSelection::Search,
            _ => self.config.data.tasks,
        };
        reporter.note(|| {
            format!(
                "dataset `{}` has no training examples for {} (no item has a query): training {} \
                 only; config.json records data.tasks = {:?}",
                self.setup.corpus.dataset,
                dropped.join(", "),
                self.tasks.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "),
                self.config.data.tasks
            )
        });
        self
    }

    /// The model to train, on the autodiff `device`: the checkpoint's when resuming, else the
    /// pretrained one; its lower layers frozen when `model.tune_layers` says so, with LoRA
    /// adapters (on the trained layers) for `lora`, and the embedding policy applied.
    ///
    /// # Errors
    /// An unreadable checkpoint, a LoRA failure.
    pub fn model_to_train(&self, resume_from: Option<&Path>, device: &Device) -> Result<Llama> {
        let config = &self.config;
        let base = match resume_from {
            Some(ckpt) => gems_model::load_hf_dir(&ckpt.join("model"), device)?.model,
            None => self.setup.pretrained.model.clone().to_device(device).train(),
        };
        let mut base = freeze_lower_layers(base, config)?;
        if config.model.untie_head {
            // The input rows stay as they started: only the head's copy trains.
            base = base.untie_head();
            base.embed_tokens.weight = base.embed_tokens.weight.set_require_grad(false);
        }
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

    /// The optimizer: the checkpoint's when resuming (`device` is the autodiff device its
    /// state loads onto), else a fresh one of [`RunSetup::optimizer_config`] with, for GEMS,
    /// the null-space projectors registered ([`RunSetup::register_null_space`]; `out_dir`
    /// receives `nullspace.json`).
    ///
    /// # Errors
    /// An unreadable checkpoint, an invalid optimizer configuration, a null-space failure.
    pub fn optimizer(
        &self,
        resume_from: Option<&Path>,
        out_dir: &Path,
        device: &Device,
        reporter: &Reporter,
    ) -> Result<Optimizer> {
        let mut optimizer = match resume_from {
            Some(ckpt) => Optimizer::load(ckpt.join("optimizer"), device)?,
            None => Optimizer::new(self.optimizer_config())?,
        };
        if self.config.optimizer.method == Method::Gems && self.config.optimizer.gems.null_space {
            self.register_null_space(&mut optimizer, out_dir, reporter)?;
        }
        Ok(optimizer)
    }

    /// The run's optimizer configuration: the configured one, and with `--embeddings items`
    /// only the item rows (`base..`) of the token embedding train (`trained_rows`), so AdamW
    /// neither moves the text rows nor spends time and moments on them. Set at run time, since
    /// `base` comes from the data; a checkpoint's optimizer keeps it.
    pub fn optimizer_config(&self) -> gems_optim::OptimizerConfig {
        let mut c = self.config.optimizer.clone();
        if self.config.model.embeddings == EmbeddingPolicy::Items {
            c.trained_rows.push(gems_optim::TrainedRows {
                pattern: "embed_tokens.*".into(),
                from: self.setup.corpus.base_vocab as usize,
            });
        }
        c
    }

    /// Null-space projectors from the pretrained model (cached in `null_space.cache`, by
    /// default `nullspace-cache/` beside `out_dir`), registered with `optimizer`;
    /// `out_dir/nullspace.json` reports them.
    ///
    /// # Errors
    /// An unreadable general text or cache, a decomposition failure, I/O failures.
    pub fn register_null_space(
        &self,
        optimizer: &mut Optimizer,
        out_dir: &Path,
        progress: &Reporter,
    ) -> Result<()> {
        let (config, setup) = (&self.config, &self.setup);
        let cache =
            config.null_space.cache.clone().unwrap_or_else(|| {
                out_dir.parent().unwrap_or(Path::new(".")).join("nullspace-cache")
            });
        let text = config.null_space_text();
        let source = GeneralText {
            tokenizer: &setup.text,
            text: &text,
            model_key: &model_key(&self.model_path, config),
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
        write_json(&out_dir.join("nullspace.json"), &report)?;
        for (p, proj) in projectors {
            optimizer.set_null_space_projector(p, proj);
        }
        Ok(())
    }

    /// The evaluation cache of this run (`eval.cache`), keyed by its settings and model.
    pub fn eval_cache(&self) -> Option<crate::eval_cache::EvalCache> {
        crate::eval_cache::EvalCache::for_run(
            &self.config,
            &model_key(&self.model_path, &self.config),
        )
    }

    /// The data, settings and tasks every step of the run reads.
    pub(crate) fn parts(&self) -> (&Setup, &TrainConfig, &[Task]) {
        (&self.setup, &self.config, &self.tasks)
    }

    /// The kept frozen states of `model` (the model to train) when `model.frozen_cache` asks
    /// for them, with the rows its cache file already holds.
    ///
    /// # Errors
    /// No frozen layer, a damaged cache file.
    pub fn frozen_states(
        &self,
        model: &Llama,
        reporter: &Reporter,
    ) -> Result<Option<crate::frozen_cache::FrozenStates>> {
        let Some(dir) = &self.config.model.frozen_cache else { return Ok(None) };
        let key = model_key(&self.model_path, &self.config);
        let states = crate::frozen_cache::FrozenStates::open(dir, model, &key)?;
        reporter.note(|| {
            format!(
                "frozen states: {} rows kept in {}",
                states.stats().loaded,
                states.file().display()
            )
        });
        Ok(Some(states))
    }

    /// What every optimizer step writes back for `--embeddings items` with an untied head
    /// ([`FrozenRows`]); `None` when nothing needs it.
    pub(crate) fn frozen_rows(&self, device: &Device) -> Option<FrozenRows> {
        let pretrained = &self.setup.pretrained.model;
        // The head as training starts it: the pretrained one, or the embedding's copy.
        let head = match (&pretrained.lm_head, self.config.model.untie_head) {
            (Some(h), _) => h.weight.val(),
            (None, true) => pretrained.embed_tokens.weight.val().transpose(),
            (None, false) => return None,
        };
        FrozenRows::new(
            head,
            self.config.model.embeddings,
            self.setup.corpus.base_vocab as usize,
            device,
        )
    }
}

/// `config` as a run records it in config.json: the model path actually used filled in, the
/// optimizer's seed from `seed`, and what the method implies (LoRA trains the embedding rows; the optimizer's record of the
/// null space); and that model path.
///
/// # Errors
/// No model is found.
pub fn resolved_config(mut config: TrainConfig) -> Result<(TrainConfig, PathBuf)> {
    // One seed: the optimizer's sketches follow `seed` (`--seed` set both; a configuration
    // file that set only `seed` used to leave them at optimizer.seed's default).
    if config.optimizer.seed != config.seed {
        if config.optimizer.seed != gems_optim::OptimizerConfig::default().seed {
            return Err(TrainError::Config(format!(
                "optimizer.seed {} differs from seed {}: the optimizer's sketches derive from \
                 `seed`; set `seed` alone",
                config.optimizer.seed, config.seed
            )));
        }
        config.optimizer.seed = config.seed;
    }
    let path = model_path(&config)?;
    config.model.path = Some(path.clone());
    if config.optimizer.method == Method::Lora {
        for p in ["embed_tokens.weight", "lm_head.weight"] {
            if !config.optimizer.trainable.iter().any(|t| t == p) {
                config.optimizer.trainable.push(p.into());
            }
        }
    }
    // The optimizer's record of its projectors is the one `null_space` section builds them by.
    config.optimizer.null_space = gems_optim::NullSpaceSettings {
        rule: config.null_space.rule,
        side: config.null_space.side,
    };
    Ok((config, path))
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

/// `--embeddings items` with an untied head: the pretrained text-token columns of the head
/// (`[0, base)` of `[d, vocab]`), written back after every optimizer step, so AdamW (its update
/// and its weight decay) never moves them. (The embedding's text rows are not trained at all:
/// [`RunSetup::optimizer_config`].)
pub(crate) struct FrozenRows {
    base: usize,
    head: Tensor<2>,
}

impl FrozenRows {
    /// For the untied `head` (`[d_model, vocab]`) as training starts it.
    fn new(head: Tensor<2>, policy: EmbeddingPolicy, base: usize, device: &Device) -> Option<Self> {
        if policy != EmbeddingPolicy::Items {
            return None;
        }
        let plain = device.clone().inner();
        let w = head;
        let rows = w.dims()[0];
        Some(Self { base, head: w.slice([0..rows, 0..base]).to_device(&plain) })
    }

    /// `model` with the frozen head columns written back.
    pub(crate) fn restore(&self, mut model: Llama) -> Llama {
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
    let rank = config.optimizer.gems.rank;
    match smallest_target(config, model) {
        Some((full, what)) if rank > full => Err(TrainError::Config(format!(
            "optimizer.gems.rank {rank} exceeds the full rank {full} of {what}; choose at most \
             {full}"
        ))),
        _ => Ok(()),
    }
}

/// The smallest full rank among the tuned matrices, with the matrix it belongs to.
fn smallest_target(config: &TrainConfig, model: &Llama) -> Option<(usize, String)> {
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
    smallest
}
