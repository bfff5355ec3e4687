//! Inputs for a peer implementation of the training step (benches/peer/step_torch.py): the
//! model exactly as a run starts training it, and the batches of its first steps, so that
//! another framework computes the same thing and the two can be timed side by side.
//!
//! `DIR/model/` is a Hugging Face directory (item tokens appended with their initial rows,
//! `keep_layers` applied). `DIR/batches.json` is a [`PeerBatches`]: per step, per task, the
//! unpadded token rows and where each row's target starts. A peer pads rows on the right with
//! `pad_id`; the loss of a task batch is the mean cross-entropy of the tokens from `target_pos`
//! to the end of every row, each predicted from the position before it (forward.rs).

use std::path::Path;

use gems_data::Task;
use serde::{Deserialize, Serialize};

use crate::batches::step_batches;
use crate::checkpoint::{TrainerState, write_json};
use crate::config::{EmbeddingPolicy, TrainConfig};
use crate::error::Result;
use crate::progress::Reporter;
use crate::run_setup::RunSetup;
use crate::setup::Sample;

/// One task's batch of one step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerBatch {
    /// `rec` or `search`.
    pub task: String,
    /// Token rows, unpadded.
    pub ids: Vec<Vec<u32>>,
    /// Per row, the index in `ids` of the first target token.
    pub target_pos: Vec<usize>,
}

/// The batches of a run's first steps and what a peer needs to reproduce the step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerBatches {
    /// Right-padding id (end-of-sequence).
    pub pad_id: u32,
    /// Rows of the original vocabulary (item tokens follow).
    pub base_vocab: u32,
    /// Total vocabulary, items included.
    pub vocab: usize,
    /// Decoder layers.
    pub layers: usize,
    /// The lowest layers that are frozen (`model.tune_layers`): a peer runs the embedding
    /// lookup and these layers without gradients (their output detached), as
    /// `Llama::freeze_lower_layers` does; 0 trains every layer.
    #[serde(default)]
    pub frozen_layers: usize,
    /// The first row of the tied token embedding that trains (`model.embeddings`): 0 for
    /// `all`, `base_vocab` for `items` (AdamW steps only rows `from..` and keeps moments for
    /// them only), absent for `none` (the table is frozen).
    #[serde(default = "all_rows")]
    pub embedding_rows_from: Option<usize>,
    /// Learning rate of each step (cosine schedule with warm-up).
    pub lr: Vec<f64>,
    /// Adam beta1.
    pub beta1: f64,
    /// Adam beta2.
    pub beta2: f64,
    /// Adam epsilon (added to sqrt(v) before the bias correction, as gems-optim does).
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Per step, its task batches in the order the trainer computes them.
    pub steps: Vec<Vec<PeerBatch>>,
}

/// Writes `dir/model/` and `dir/batches.json` for the first `steps` steps of `config`, and
/// returns the assembled run (for callers that go on to time the step themselves).
///
/// # Errors
/// Invalid configuration, missing model or data, I/O failures.
pub fn dump(config: &TrainConfig, dir: &Path, steps: u64) -> Result<(RunSetup, PeerBatches)> {
    let run = RunSetup::load(config, &burn::tensor::Device::flex(), &Reporter::silent())?;
    let batches = batches(&run, steps);
    gems_model::save_hf_dir(&run.setup.pretrained, &dir.join("model"))?;
    write_json(&dir.join("batches.json"), &batches)?;
    Ok((run, batches))
}

/// The samples of the first `steps` steps of `run`, per step in the order the trainer computes
/// them (the trainer's own batch stream).
pub fn sample_steps(run: &RunSetup, steps: u64) -> Vec<Vec<(Task, Vec<&Sample>)>> {
    let mut state = TrainerState::default();
    let mut perms = vec![None; Task::ALL.len()];
    (0..steps)
        .map(|_| step_batches(&run.setup, &run.config, &run.tasks, &mut state, &mut perms))
        .collect()
}

fn all_rows() -> Option<usize> {
    Some(0)
}

/// The first `steps` steps' batches of `run`.
pub fn batches(run: &RunSetup, steps: u64) -> PeerBatches {
    let (setup, config) = (&run.setup, &run.config);
    let steps_out = sample_steps(run, steps)
        .into_iter()
        .map(|step| {
            step.into_iter()
                .map(|(task, rows)| PeerBatch {
                    task: task.name().to_string(),
                    ids: rows.iter().map(|s| s.ids.clone()).collect(),
                    target_pos: rows.iter().map(|s| s.target_pos).collect(),
                })
                .collect()
        })
        .collect();
    let o = &config.optimizer;
    let layers = setup.pretrained.model.layers.len();
    let base = setup.corpus.base_vocab as usize;
    PeerBatches {
        pad_id: setup.corpus.eos_id,
        base_vocab: setup.corpus.base_vocab,
        vocab: setup.pretrained.model.embed_tokens.weight.val().dims()[0],
        layers,
        frozen_layers: config.model.tune_layers.map_or(0, |k| layers.saturating_sub(k)),
        embedding_rows_from: match config.model.embeddings {
            EmbeddingPolicy::All => Some(0),
            EmbeddingPolicy::Items => Some(base),
            EmbeddingPolicy::None => None,
        },
        lr: (1..=steps).map(|t| config.schedule.lr_at(t)).collect(),
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        weight_decay: o.weight_decay,
        steps: steps_out,
    }
}
