//! The run configuration: everything that decides a run, saved beside its outputs.
//!
//! A configuration is plain serde data (JSON or TOML). Every field has a default, so a file may
//! name only what it changes; [`TrainConfig::cpu_preset`] is the documented preset of the main
//! job (docs/training.md says how it was chosen).

use std::path::PathBuf;

pub use gems_data::RecPrompt;
use gems_metrics::NdcgNormaliser;
use gems_optim::{Method, OptimizerConfig};
use gems_subspace::{NullSpaceRule, ProjectorSide};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Which tasks a run trains on (GEMS-SPEC §5 single-task runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum TaskSelection {
    /// Search and recommendation (the default).
    #[default]
    Both,
    /// Recommendation only.
    Rec,
    /// Search only.
    Search,
}

impl TaskSelection {
    /// Whether the run trains on `task`.
    pub fn includes(self, task: gems_data::Task) -> bool {
        match self {
            Self::Both => true,
            Self::Rec => task == gems_data::Task::Rec,
            Self::Search => task == gems_data::Task::Search,
        }
    }
}

/// The model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// A Hugging Face directory or a GGUF file; `None` means the fetched SmolLM2-135M-Instruct
    /// (`gems model fetch`).
    pub path: Option<PathBuf>,
    /// Keep only the first k decoder layers (a cheaper model for CPU runs); `None` keeps all.
    pub keep_layers: Option<usize>,
    /// Train only the top k decoder layers (after `keep_layers`): the layers below are frozen
    /// and run without an autodiff graph, and the embedding then learns only through the tied
    /// head ([`gems_model::Llama::freeze_lower_layers`]); `None` trains every layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tune_layers: Option<usize>,
    /// Item-token rows start as the mean of their text's token rows (`true`) or seeded random.
    pub title_init: bool,
    /// The text an item's row is built from when `title_init` is on.
    pub item_text: ItemText,
    /// How the tokens of that text are weighted in the row.
    pub item_weights: ItemWeights,
    /// Dimensions of the collaborative part added to every item row (0: none, the default):
    /// a PPMI embedding of the training co-occurrences through a fixed orthonormal map, as
    /// long as the rows' mean norm ([`crate::collab`]). Left out of `config.json` when 0.
    #[serde(skip_serializing_if = "is_zero")]
    pub item_collab: usize,
    /// The collaborative part's length as a multiple of the item rows' mean norm (1 by
    /// default). Left out of `config.json` when 1.
    #[serde(skip_serializing_if = "is_one")]
    pub item_collab_scale: f64,
    /// What the collaborative part is made from: the PPMI embedding of the training
    /// co-occurrences (`ppmi`, the default) or the item embeddings of a SASRec trained on the
    /// training rec examples (`sasrec`, as LLaRA's hybrid item rows), each unit-normalised and
    /// put through the same map. Left out of `config.json` when `ppmi`.
    #[serde(default, skip_serializing_if = "CollabSource::is_ppmi")]
    pub item_collab_source: CollabSource,
    /// Which rows of the token embedding (and of an untied output head) training may change.
    pub embeddings: EmbeddingPolicy,
    /// Untie a tied output head before training: the head becomes its own copy of the
    /// embedding and trains as the embedding policy says, while the embedding (the input rows,
    /// which the frozen lower layers read) stays as it started. The tuned model is saved with
    /// `tie_word_embeddings: false`. Left out of `config.json` when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub untie_head: bool,
    /// Keep the hidden states entering the first tuned layer per training row in this
    /// directory, computed once (each row alone) and reused by later epochs and by runs of
    /// the same model and item rows ([`crate::frozen_cache`]); needs `tune_layers` and fixed
    /// input rows (`untie_head`, or `embeddings` none). Rounding aside, it changes no result.
    /// Left out of `config.json` when `None` (the default: every step runs every layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_cache: Option<PathBuf>,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            path: None,
            keep_layers: None,
            tune_layers: None,
            title_init: true,
            item_text: ItemText::Title,
            item_weights: ItemWeights::Mean,
            item_collab: 0,
            item_collab_scale: 1.0,
            item_collab_source: CollabSource::Ppmi,
            embeddings: EmbeddingPolicy::All,
            untie_head: false,
            frozen_cache: None,
        }
    }
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[allow(clippy::trivially_copy_pass_by_ref, clippy::float_cmp)] // as `is_zero`; exact default
fn is_one(x: &f64) -> bool {
    *x == 1.0
}

/// The text an item-token row is initialised from ([`ModelSettings::item_text`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum ItemText {
    /// The title alone.
    #[default]
    Title,
    /// The title followed by the category path below its root (the text BM25 indexes, less
    /// the root every item shares).
    TitleCategories,
}

impl ItemText {
    /// The text of an item with `title` and category path `categories` (root first).
    pub fn of(self, title: &str, categories: &[String]) -> String {
        match self {
            Self::Title => title.to_string(),
            Self::TitleCategories => {
                let below_root = categories.iter().skip(1).map(String::as_str);
                std::iter::once(title)
                    .chain(below_root)
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        }
    }
}

/// How the tokens of an item's text weigh in its initial row ([`ModelSettings::item_weights`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum ItemWeights {
    /// Every token alike: the plain mean of their rows.
    #[default]
    Mean,
    /// By inverse document frequency over the catalogue's item texts
    /// ([`gems_model::ItemInit::TitleIdf`]).
    Idf,
}

/// Which embedding rows train, for every method. The embedding is outside GEMS's tuned
/// matrices (GEMS-SPEC §3), so whatever trains there is updated by plain AdamW and is not
/// protected by the null space.
///
/// With a tied head (SmolLM2) the embedding row of a token is also its output row, so `items`
/// keeps every text token's input and output vectors as pretrained: the text model changes only
/// through the tuned matrices. An untied head follows the same rule on its own rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingPolicy {
    /// Every row trains (text tokens and item tokens).
    #[default]
    All,
    /// Only the item-token rows train; text-token rows stay as pretrained.
    Items,
    /// No row trains: item tokens keep their initial rows.
    None,
}

impl EmbeddingPolicy {
    /// The name used in configuration files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Items => "items",
            Self::None => "none",
        }
    }
}

/// What an item row's collaborative part is made from ([`ModelSettings::item_collab_source`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum CollabSource {
    /// The top eigenvectors of the training co-occurrences' PPMI matrix ([`crate::collab`]).
    #[default]
    Ppmi,
    /// The item embeddings of a SASRec trained on the training rec examples
    /// ([`crate::sasrec`]), `model.item_collab` wide.
    Sasrec,
}

impl CollabSource {
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
    fn is_ppmi(&self) -> bool {
        *self == Self::Ppmi
    }
}

/// The data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSettings {
    /// A dataset name (`scientific`, `beauty`, `qilin_toy`) or a dataset directory.
    pub dataset: String,
    /// A directory written by `gems data prepare` to train on instead of preparing `dataset`
    /// here. Its manifest then decides the examples (format, queries, unknown items, task
    /// assignment), and `max_history`, `negatives` and `seed` must equal its settings
    /// (`gems train --data DIR` copies them, and the dataset name, from the manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared: Option<PathBuf>,
    /// Where dataset names are looked up.
    pub data_root: PathBuf,
    /// History items kept per prompt (most recent last).
    pub max_history: usize,
    /// Sampled negatives per valid/test example (the authors' protocol: 99).
    pub negatives: usize,
    /// Seed of the data preparation (negatives); recorded in the run.
    pub seed: u64,
    /// Tasks trained on.
    pub tasks: TaskSelection,
    /// Which positions of a recommendation training row are targets: the answer alone
    /// (`last`, GEMS-SPEC §2, the default) or every history item after the first as well,
    /// on one row per stretch of a user's training sequence (`all`, as SASRec trains).
    /// Left out of `config.json` when `last`.
    #[serde(skip_serializing_if = "RecTargets::is_last")]
    pub rec_targets: RecTargets,
    /// Over what the training loss's softmax runs at an item target: the whole vocabulary
    /// (`vocabulary`, GEMS-SPEC §2, the default) or the catalogue's item tokens only
    /// (`catalogue`: the ranking's own cross-entropy; text targets such as end-of-sequence keep
    /// the whole vocabulary). Left out of `config.json` when `vocabulary`.
    #[serde(skip_serializing_if = "ItemSoftmax::is_vocabulary")]
    pub item_softmax: ItemSoftmax,
    /// How a recommendation prompt is worded, in training and evaluation alike: the paper's
    /// (`paper`, GEMS-SPEC §2, the default: the history, then the instruction) or
    /// `history-last` (the instruction, then the history, the answer right after the last
    /// item's separator, where `rec_targets = "all"` trains every other target). Search
    /// prompts keep the paper's. Left out of `config.json` when `paper`.
    #[serde(skip_serializing_if = "RecPrompt::is_paper")]
    pub rec_prompt: RecPrompt,
    /// Leave out of an item target's training softmax the items its user had before it (the
    /// whole known past, the target kept even when it repeats one), as `eval.exclude_history`
    /// leaves them out of the ranking: the loss then never asks the model to rank what the
    /// user already has below other items. Off by default (GEMS-SPEC §2's softmax). Left out
    /// of `config.json` when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub train_exclude_history: bool,
}

/// The softmax of an item target's training loss ([`DataSettings::item_softmax`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ItemSoftmax {
    /// Over every token of the vocabulary (text and items).
    #[default]
    Vocabulary,
    /// Over the catalogue's item tokens only.
    Catalogue,
}

impl ItemSoftmax {
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
    fn is_vocabulary(&self) -> bool {
        *self == Self::Vocabulary
    }
}

/// The targets of a recommendation training row ([`DataSettings::rec_targets`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum RecTargets {
    /// One training row per training example, its answer the only target.
    #[default]
    Last,
    /// One training row per stretch of `max_history + 1` events of a user's training
    /// sequence (the longest training example and, for longer sequences, the examples its
    /// history does not reach), and every item of the row after the first a target: each
    /// history item predicted from those before it in the list, the answer after the prompt.
    /// Every training event is a target exactly once per epoch.
    All,
}

impl RecTargets {
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
    fn is_last(&self) -> bool {
        *self == Self::Last
    }
}

impl Default for DataSettings {
    fn default() -> Self {
        Self {
            dataset: "scientific".into(),
            prepared: None,
            data_root: PathBuf::from("../shared/data"),
            max_history: 20,
            negatives: 99,
            seed: 42,
            tasks: TaskSelection::Both,
            rec_targets: RecTargets::Last,
            item_softmax: ItemSoftmax::Vocabulary,
            rec_prompt: RecPrompt::Paper,
            train_exclude_history: false,
        }
    }
}

/// Learning rate, batch and length of training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleSettings {
    /// Optimizer steps.
    pub steps: u64,
    /// Rows per task per micro-batch.
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Share of the steps spent warming up linearly from 0.
    pub warmup_ratio: f64,
    /// Final learning rate of the cosine decay, as a share of the peak.
    pub min_lr_ratio: f64,
    /// Length bucketing: each run of this many batches of a task's shuffled samples is sorted
    /// by length and its batches served in a seeded random order, so that samples of similar
    /// length share a batch and pad less. None (the default) or 1: plain shuffled batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bucket: Option<usize>,
}

impl Default for ScheduleSettings {
    fn default() -> Self {
        Self {
            steps: 200,
            batch_size: 16,
            grad_accum: 1,
            lr: 5e-4,
            warmup_ratio: 0.01,
            min_lr_ratio: 0.0,
            bucket: None,
        }
    }
}

impl ScheduleSettings {
    /// Learning rate of optimizer step `step` (1-based): linear warm-up over
    /// `ceil(warmup_ratio * steps)` steps (step `warm` reaches the peak), then cosine decay
    /// towards `min_lr_ratio * lr`. The decay counts as Hugging Face's schedule does (0-based
    /// step `t - 1`): the first step after warm-up is at the peak and the last one is just
    /// above the floor, so every step trains. Until 2026-12-02 the decay used `t` itself,
    /// which gave the last step the floor (lr 0 by default) and a 1-step run no training.
    pub fn lr_at(&self, step: u64) -> f64 {
        let total = self.steps.max(1) as f64;
        let warm = (self.warmup_ratio * total).ceil();
        let t = step as f64;
        if warm > 0.0 && t <= warm {
            return self.lr * t / warm;
        }
        let progress = ((t - 1.0 - warm) / (total - warm).max(1.0)).clamp(0.0, 1.0);
        let floor = self.min_lr_ratio * self.lr;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// What early stopping watches on the validation set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum StopMetric {
    /// Mean target-token loss over the trained tasks (lower is better; the authors' choice).
    #[default]
    Loss,
    /// Mean full-catalogue NDCG@10 over the trained tasks (higher is better).
    Ndcg10,
}

/// Validation, early stopping and the final evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSettings {
    /// Validate every N optimizer steps and at the last one (0: never; the final model is the
    /// tuned model and `best_step` stays empty).
    pub every: u64,
    /// Stop after this many validations without improvement (0: never stop early).
    pub patience: u32,
    /// What early stopping watches.
    pub metric: StopMetric,
    /// Validation examples per task (a seeded sample of users; 0 = all).
    pub valid_examples: usize,
    /// Test examples per task in the final evaluation (a seeded sample; 0 = all).
    pub test_examples: usize,
    /// Rows per evaluation forward pass.
    pub batch_size: usize,
    /// Also run the sampled protocol (99 negatives + positive).
    pub sampled: bool,
    /// NDCG normaliser (standard unless the authors' is asked for).
    pub ndcg_normaliser: NdcgNormaliser,
    /// Measure perplexity on general text (knowledge retention).
    pub perplexity: bool,
    /// That text; `None` means `<data_root>/wikitext2_general_text/test.txt`.
    pub perplexity_text: Option<PathBuf>,
    /// Tokens of that text scored (0 = all).
    pub perplexity_tokens: usize,
    /// Window length of the perplexity evaluation.
    pub perplexity_window: usize,
    /// Evaluate the untuned model on the test set before training.
    pub before: bool,
    /// Leave the items each example's user had before its target (the whole known history,
    /// not only the prompt's) out of the full-catalogue ranking, as sequential-recommendation
    /// papers commonly do; the target is kept even when it repeats a history item. Off by
    /// default: the whole catalogue is ranked.
    #[serde(default)]
    pub exclude_history: bool,
    /// Evaluate the floors without a language model (`baselines.json`: most popular, BM25,
    /// SASRec, which trains for about a minute). Off only where a run's floors are not wanted
    /// (the GPU command's smoke runs).
    pub floors: bool,
    /// A directory that keeps the untuned model's evaluation (`before.json`) and the floors
    /// (`baselines.json`) under a key of every setting they depend on, so that runs which
    /// differ only in how they train share them ([`crate::eval_cache`]); `None` (the default):
    /// every run computes its own. `cargo xtask reproduce` sets one per results epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<PathBuf>,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            every: 50,
            patience: 5,
            metric: StopMetric::Loss,
            valid_examples: 256,
            test_examples: 0,
            batch_size: 32,
            sampled: true,
            ndcg_normaliser: NdcgNormaliser::Standard,
            perplexity: true,
            perplexity_text: None,
            perplexity_tokens: 16_384,
            perplexity_window: 256,
            before: true,
            exclude_history: false,
            floors: true,
            cache: None,
        }
    }
}

/// How the null-space projectors are built (GEMS-SPEC §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NullSpaceBuild {
    /// General-domain text; `None` means `<data_root>/wikitext2_general_text/valid.txt`.
    pub text: Option<PathBuf>,
    /// Tokens of it run through the model (0 = all).
    pub max_tokens: usize,
    /// Window length (the authors: <= 512).
    pub window: usize,
    /// Eigenvalue rule.
    pub rule: NullSpaceRule,
    /// Input side (AlphaEdit; the default since 2026-12-02, docs/results.md) or output side
    /// (the paper's GEMS).
    pub side: ProjectorSide,
    /// Cache directory of projectors; `None` means `<run dir>/../nullspace-cache`.
    pub cache: Option<PathBuf>,
}

impl Default for NullSpaceBuild {
    fn default() -> Self {
        Self {
            text: None,
            max_tokens: 32_768,
            window: 256,
            rule: NullSpaceRule::Absolute { tau: 2e-2 },
            side: ProjectorSide::Input,
            cache: None,
        }
    }
}

/// LoRA settings (method `lora`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSettings {
    /// Adapter rank.
    pub rank: usize,
    /// Scale numerator (`alpha / rank`).
    pub alpha: f64,
    /// Projections adapted.
    pub targets: Vec<String>,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// Everything that decides a run.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Run label (default: the method name and its ablations).
    pub label: Option<String>,
    /// Seed of everything random in the run (data order, initialisation, sketches:
    /// `optimizer.seed` follows it). `data.seed` is the prepared data's own (its negatives and
    /// task draws).
    pub seed: u64,
    /// The model.
    pub model: ModelSettings,
    /// The data.
    pub data: DataSettings,
    /// The optimizer (method and its settings).
    pub optimizer: OptimizerConfig,
    /// LoRA (method `lora` only).
    pub lora: LoraSettings,
    /// Steps, batch, learning rate.
    pub schedule: ScheduleSettings,
    /// Validation and evaluation.
    pub eval: EvalSettings,
    /// Null-space projectors (used when `optimizer.gems.null_space`).
    pub null_space: NullSpaceBuild,
    /// Write a checkpoint every N steps (0: only at the end, and when stopping early).
    pub checkpoint_every: u64,
    /// Stop (cleanly, with a checkpoint) after this many steps of this process; for tests of
    /// kill-and-resume. `None` runs to the end.
    pub stop_after: Option<u64>,
}

/// Parameter paths of the token embedding and an untied output head.
const EMBEDDING_PATTERNS: [&str; 2] = ["embed_tokens.*", "lm_head.*"];

/// The CPU preset's settings: `presets/cpu.toml`, applied over the defaults.
pub const CPU_PRESET: &str = include_str!("../../../presets/cpu.toml");

/// The GPU preset's settings: `presets/gpu.toml`, applied over the defaults.
pub const GPU_PRESET: &str = include_str!("../../../presets/gpu.toml");

/// Applies `overlay` over `base`: objects merge field by field, anything else replaces.
pub fn merge_json(base: &mut serde_json::Value, overlay: serde_json::Value) {
    match (base, overlay) {
        (serde_json::Value::Object(b), serde_json::Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge_json(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// The dotted paths at which `a` and `b` differ (objects compared field by field).
fn json_differences(a: &serde_json::Value, b: &serde_json::Value, at: &str, out: &mut Vec<String>) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            let null = serde_json::Value::Null;
            for k in keys {
                let path = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                json_differences(x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), &path, out);
            }
        }
        _ if a != b => out.push(format!("{at} ({a} vs {b})")),
        _ => {}
    }
}

/// The most rows a batch (`schedule.batch_size`) or an accumulation window
/// (`schedule.grad_accum`) may have.
pub const MAX_BATCH_ROWS: usize = 1 << 16;

impl TrainConfig {
    /// The settings in which `self` and `other` differ, as dotted paths with both values
    /// (`schedule.lr (0.003 vs 0.05)`), `stop_after` aside (it is per process): what a resumed
    /// run would change.
    pub fn differences(&self, other: &TrainConfig) -> Vec<String> {
        let comparable = |c: &TrainConfig| {
            let mut c = c.clone();
            c.stop_after = None;
            serde_json::to_value(&c).unwrap_or(serde_json::Value::Null)
        };
        let mut out = Vec::new();
        json_differences(&comparable(self), &comparable(other), "", &mut out);
        out
    }

    /// The CPU preset of the main job (2-core machine, about 15 minutes end to end):
    /// `presets/cpu.toml` over the defaults; docs/training.md has the measurements behind
    /// each value.
    ///
    /// # Panics
    /// Never: the embedded file is a valid overlay (a unit test parses it).
    pub fn cpu_preset() -> Self {
        Self::default().with_toml(CPU_PRESET).expect("presets/cpu.toml is a valid overlay (tested)")
    }

    /// Sets the learning-rate multiplier of the token embedding and of an untied output head
    /// (`optimizer.lr_scales`, replacing earlier entries for them; 1 removes them). These are
    /// AdamW parameters outside GEMS's tuned matrices; with [`EmbeddingPolicy::Items`] only
    /// the item rows move, so the multiplier speeds up what the new tokens learn without
    /// touching the text model.
    pub fn set_embedding_lr_scale(&mut self, scale: f64) {
        let scales = &mut self.optimizer.lr_scales;
        scales.retain(|s| !EMBEDDING_PATTERNS.contains(&s.pattern.as_str()));
        if scale != 1.0 {
            for pattern in EMBEDDING_PATTERNS {
                scales.push(gems_optim::LrScale { pattern: pattern.to_string(), scale });
            }
        }
    }

    /// The perplexity text, if perplexity is measured.
    pub fn perplexity_text(&self) -> Option<PathBuf> {
        self.eval.perplexity.then(|| {
            self.eval.perplexity_text.clone().unwrap_or_else(|| {
                self.data.data_root.join("wikitext2_general_text").join("test.txt")
            })
        })
    }

    /// The general text of the null-space statistics.
    pub fn null_space_text(&self) -> PathBuf {
        self.null_space
            .text
            .clone()
            .unwrap_or_else(|| self.data.data_root.join("wikitext2_general_text").join("valid.txt"))
    }

    /// The GPU preset for the full model (every layer, the authors' batch of 32 x 4, rank
    /// 128, all test users, all of WikiText-2 test). Documented in docs/training.md; not yet
    /// run on a GPU by this project. `presets/gpu.toml` over the defaults.
    ///
    /// # Panics
    /// Never: the embedded file is a valid overlay (a unit test parses it).
    pub fn gpu_preset() -> Self {
        Self::default().with_toml(GPU_PRESET).expect("presets/gpu.toml is a valid overlay (tested)")
    }

    /// `self` with the fields `overlay` names applied over it (objects merge field by field,
    /// anything else replaces): how a preset and a `--config` file apply.
    ///
    /// # Errors
    /// A field that does not exist or has the wrong type, named.
    pub fn with_overlay(self, overlay: serde_json::Value) -> Result<Self> {
        let mut merged = serde_json::to_value(&self)
            .map_err(|e| TrainError::Config(format!("configuration: {e}")))?;
        merge_json(&mut merged, overlay);
        // The error names the field (`schedule.steps: invalid type: string "many", ...`).
        serde_path_to_error::deserialize(merged)
            .map_err(|e| TrainError::Config(format!("{}: {}", e.path(), e.inner())))
    }

    /// `self` with the TOML text `text` applied over it ([`TrainConfig::with_overlay`]).
    ///
    /// # Errors
    /// Malformed TOML, or a field that does not exist or has the wrong type.
    pub fn with_toml(self, text: &str) -> Result<Self> {
        let value: toml::Value =
            toml::from_str(text).map_err(|e| TrainError::Config(e.to_string()))?;
        let json = serde_json::to_value(value).map_err(|e| TrainError::Config(e.to_string()))?;
        self.with_overlay(json)
    }

    /// The run label: the configured one, else the method with its ablations.
    pub fn label(&self) -> String {
        if let Some(l) = &self.label {
            return l.clone();
        }
        let o = &self.optimizer;
        let mut label = o.method.as_str().to_string();
        if o.method == Method::Gems {
            if !o.gems.null_space {
                label.push_str("-no-null-space");
            }
            if o.gems.single_subspace {
                label.push_str("-single-subspace");
            }
            if o.gems.complement {
                label.push_str("-complement");
            }
            // Deviations from the default null space (input side, strict).
            if o.gems.null_space && self.null_space.side == ProjectorSide::Output {
                label.push_str("-output-side");
            }
            if o.gems.null_space && !o.gems.strict_null_space {
                label.push_str("-not-strict");
            }
        }
        match self.model.embeddings {
            EmbeddingPolicy::All => {}
            other => label.push_str(&format!("-emb-{}", other.as_str())),
        }
        match self.data.tasks {
            TaskSelection::Both => {}
            TaskSelection::Rec => label.push_str("-rec-only"),
            TaskSelection::Search => label.push_str("-search-only"),
        }
        label
    }

    /// Checks ranges and combinations.
    ///
    /// # Errors
    /// [`TrainError::Config`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        let s = &self.schedule;
        if s.steps == 0 {
            return bad("schedule.steps must be positive".into());
        }
        if s.batch_size == 0 || s.grad_accum == 0 {
            return bad("schedule.batch_size and schedule.grad_accum must be positive".into());
        }
        if s.batch_size > MAX_BATCH_ROWS || s.grad_accum > MAX_BATCH_ROWS {
            return bad(format!(
                "schedule.batch_size {} and schedule.grad_accum {} must be at most \
                 {MAX_BATCH_ROWS}: a batch's logits alone take tokens x vocabulary x 4 bytes per \
                 row (8.6 MB for 40 tokens of SmolLM2's vocabulary with Scientific's items)",
                s.batch_size, s.grad_accum
            ));
        }
        if s.bucket == Some(0) {
            return bad("schedule.bucket must be at least 1 (1: no bucketing)".into());
        }
        if !(s.lr.is_finite() && s.lr > 0.0 && s.lr <= 1.0) {
            return bad(format!(
                "schedule.lr must be in (0, 1], got {}: every method's step moves a weight by up \
                 to about lr, and pretrained weights are of order 0.01-1",
                s.lr
            ));
        }
        let decay = self.optimizer.weight_decay;
        if decay.is_finite() && s.lr * decay >= 1.0 {
            return bad(format!(
                "optimizer.weight_decay {decay} times schedule.lr {} is {}: decoupled decay \
                 multiplies every weight by 1 - lr * weight_decay per step, so it must stay below 1",
                s.lr,
                s.lr * decay
            ));
        }
        if !(0.0..1.0).contains(&s.warmup_ratio) {
            return bad(format!("schedule.warmup_ratio must be in [0, 1), got {}", s.warmup_ratio));
        }
        if !(0.0..=1.0).contains(&s.min_lr_ratio) {
            return bad(format!("schedule.min_lr_ratio must be in [0, 1], got {}", s.min_lr_ratio));
        }
        if self.eval.batch_size == 0 {
            return bad("eval.batch_size must be positive".into());
        }
        if self.eval.perplexity_window < 2 || self.null_space.window < 1 {
            return bad("eval.perplexity_window must be >= 2 and null_space.window >= 1".into());
        }
        self.validate_model()?;
        if self.optimizer.method == Method::Lora {
            if self.lora.rank == 0 {
                return bad("lora.rank must be positive".into());
            }
            if !(self.lora.alpha.is_finite() && self.lora.alpha > 0.0) {
                return bad(format!("lora.alpha must be finite and > 0, got {}", self.lora.alpha));
            }
        }
        self.optimizer.validate()?;
        Ok(())
    }

    /// [`Self::validate`]'s checks of the model settings.
    fn validate_model(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::Config(m));
        let scale = self.model.item_collab_scale;
        if !(scale.is_finite() && scale >= 0.0) {
            return bad(format!("model.item_collab_scale must be finite and >= 0, got {scale}"));
        }
        if self.model.keep_layers == Some(0) {
            return bad("model.keep_layers must be at least 1".into());
        }
        if self.model.tune_layers == Some(0) {
            return bad("model.tune_layers must be at least 1 (to train nothing, evaluate)".into());
        }
        if self.model.untie_head && self.optimizer.method == Method::Lora {
            return bad(
                "model.untie_head is not supported with LoRA (its adapter saves a tied head)"
                    .into(),
            );
        }
        if self.model.frozen_cache.is_some() {
            if self.model.tune_layers.is_none() {
                return bad(
                    "model.frozen_cache needs model.tune_layers (frozen lower layers)".into()
                );
            }
            if !self.model.untie_head && self.model.embeddings != EmbeddingPolicy::None {
                return bad(format!(
                    "model.frozen_cache needs input rows that do not train: with a tied head \
                     and model.embeddings {} the item rows the frozen layers read change \
                     every step; set model.untie_head (or model.embeddings none)",
                    self.model.embeddings.as_str()
                ));
            }
        }
        Ok(())
    }

    /// The configuration as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_warms_up_then_decays() {
        let s = ScheduleSettings { steps: 100, lr: 1.0, warmup_ratio: 0.1, ..Default::default() };
        assert!((s.lr_at(1) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(11) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(56) - 0.5).abs() < 1e-12);
        // The last step still trains: (1 - cos(pi / 90)) / 2 of the peak.
        let last = s.lr_at(100);
        assert!(
            last > 0.0 && (last - (1.0 - (std::f64::consts::PI / 90.0).cos()) / 2.0).abs() < 1e-12
        );
        assert!(s.lr_at(30) > s.lr_at(31));
        // Without warm-up a 1-step run trains at the peak, and a floor is approached, not hit.
        let one = ScheduleSettings { steps: 1, lr: 2.0, warmup_ratio: 0.0, ..Default::default() };
        assert_eq!(one.lr_at(1), 2.0);
        let floored = ScheduleSettings { min_lr_ratio: 0.1, ..s };
        assert!(floored.lr_at(100) > 0.1 && floored.lr_at(100) < 0.11);
    }

    /// The presets live in presets/*.toml; they equal the values the Rust preset functions
    /// held before they moved there (tests/fixtures/preset_*.json, printed by `gems train
    /// --print-config` at that commit).
    #[test]
    fn presets_come_from_their_toml_files_unchanged() {
        for (preset, fixture) in [
            (TrainConfig::cpu_preset(), include_str!("../tests/fixtures/preset_cpu.json")),
            (TrainConfig::gpu_preset(), include_str!("../tests/fixtures/preset_gpu.json")),
        ] {
            let want: TrainConfig = serde_json::from_str(fixture).unwrap();
            assert_eq!(preset, want, "{}", preset.to_json());
        }
        let err = TrainConfig::default().with_toml("[schedule]\nstepz = 3\n").unwrap_err();
        assert!(err.to_string().contains("stepz"), "{err}");
    }

    #[test]
    fn configs_round_trip_and_reject_unknown_fields() {
        let c = TrainConfig::cpu_preset();
        let back: TrainConfig = serde_json::from_str(&c.to_json()).unwrap();
        assert_eq!(back, c);
        let partial: TrainConfig = toml::from_str("seed = 3\n[schedule]\nsteps = 7\n").unwrap();
        assert_eq!(partial.seed, 3);
        assert_eq!(partial.schedule.steps, 7);
        assert_eq!(partial.schedule.batch_size, ScheduleSettings::default().batch_size);
        let err = toml::from_str::<TrainConfig>("[schedule]\nstep = 7\n").unwrap_err();
        assert!(err.to_string().contains("step"), "{err}");
    }

    #[test]
    fn item_text_joins_title_and_categories_below_the_root() {
        let cats: Vec<String> =
            ["Industrial & Scientific", "Lab Supplies", "", "Pipettes"].map(String::from).into();
        assert_eq!(ItemText::Title.of("Pipette tips", &cats), "Pipette tips");
        assert_eq!(
            ItemText::TitleCategories.of("Pipette tips", &cats),
            "Pipette tips, Lab Supplies, Pipettes"
        );
        // Only the root, or no path at all: the title alone.
        assert_eq!(ItemText::TitleCategories.of("t", &cats[..1]), "t");
        assert_eq!(ItemText::TitleCategories.of("t", &[]), "t");
        // An item without a title is named by its categories.
        assert_eq!(ItemText::TitleCategories.of("", &cats), "Lab Supplies, Pipettes");
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = TrainConfig::default();
        c.schedule.lr = f64::NAN;
        assert!(c.validate().unwrap_err().to_string().contains("schedule.lr"));
    }

    #[test]
    fn labels_name_ablations() {
        let mut c = TrainConfig::default();
        c.optimizer.gems.null_space = false;
        c.data.tasks = TaskSelection::Rec;
        assert_eq!(c.label(), "gems-no-null-space-rec-only");
        // The default null space (input side, strict) adds nothing; the paper's names itself.
        let mut c = TrainConfig::default();
        assert_eq!(c.label(), "gems");
        c.null_space.side = ProjectorSide::Output;
        c.optimizer.gems.strict_null_space = false;
        assert_eq!(c.label(), "gems-output-side-not-strict");
    }
}
