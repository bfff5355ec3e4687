//! Using a finished run: reload its tuned model with the data it was trained on, rank the
//! catalogue for a user (recommendation) or a user and a query (search).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use gems_model::TokenBatch;

use crate::checkpoint::read_json;
use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::run_setup::RunSetup;
use crate::setup::{Setup, UNKNOWN_ITEM};
use crate::trainer::tuned_model_dir;

/// A run's configuration with its tuned model and data.
#[derive(Debug)]
pub struct LoadedRun {
    /// The run directory.
    pub dir: PathBuf,
    /// Its resolved configuration.
    pub config: TrainConfig,
    /// The tuned model and the data.
    pub setup: Setup,
}

/// Loads a run directory's configuration and tuned model (`model/`) onto `device`.
///
/// # Errors
/// Not a run directory, no tuned model yet, or the model or data does not load.
pub fn load_run(dir: &Path, device: &Device) -> Result<LoadedRun> {
    let config = run_config(dir)?;
    let model_dir = tuned_model_dir(dir).ok_or_else(|| {
        TrainError::Config(format!(
            "{} has no tuned model yet (model/ is written at the first validation or at the end)",
            dir.display()
        ))
    })?;
    let run = RunSetup::tuned(config, &model_dir, device)?;
    Ok(LoadedRun { dir: dir.to_path_buf(), config: run.config, setup: run.setup })
}

/// A run directory's recorded configuration (`config.json`), which is all that what needs no
/// tuned model (the floors) loads: it also works on a run that keeps no model, such as the
/// committed records of a reproduction.
///
/// # Errors
/// Not a run directory, or an unreadable configuration.
pub fn run_config(dir: &Path) -> Result<TrainConfig> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(TrainError::Config(format!(
            "{} is not a run directory (no config.json)",
            dir.display()
        )));
    }
    read_json(&config_path)
}

/// One ranked item.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RankedItem {
    /// Rank, 1-based.
    pub rank: usize,
    /// Dense item index.
    pub index: u32,
    /// Item id in the source data.
    pub id: String,
    /// Title; `None` for an item without one (ID-only data, [`crate::setup::Corpus::has_title`]).
    pub title: Option<String>,
    /// log p(item token | prompt), softmax over the whole vocabulary.
    pub log_prob: f32,
}

/// Everything the user is known to have done, oldest first: every event of every split.
///
/// # Errors
/// Unknown user id.
pub fn user_items(setup: &Setup, user: &str) -> Result<Vec<u32>> {
    let corpus = &setup.corpus;
    let index = corpus.user_index(user).ok_or_else(|| {
        TrainError::Config(format!(
            "unknown user `{user}` in dataset `{}` ({} users; ids as in the source data)",
            corpus.dataset,
            corpus.users.len()
        ))
    })?;
    let events = corpus.sequences.get(index as usize).map_or(&[][..], Vec::as_slice);
    Ok(events.iter().copied().filter(|&i| i != UNKNOWN_ITEM).collect())
}

/// The user's item sequence as the model should see it for "what next": the last
/// `max_history` of [`user_items`] (the prompt's length in training).
///
/// # Errors
/// Unknown user id.
pub fn user_history(setup: &Setup, user: &str, max_history: usize) -> Result<Vec<u32>> {
    let mut items = user_items(setup, user)?;
    items.drain(..items.len().saturating_sub(max_history));
    Ok(items)
}

/// The longest search query [`top_items`] accepts, in characters: real queries are a few
/// words, and the prompt's cost grows with its length.
pub const MAX_QUERY_CHARS: usize = 1024;

/// The top `k` items for a prompt of `history` (and `query` for search), leaving out the
/// items of `exclude` (for "what next", the user's whole history: [`user_items`]).
///
/// # Errors
/// `k` above the catalogue size, a query over [`MAX_QUERY_CHARS`], an empty prompt, forward
/// failures.
pub fn top_items(
    setup: &Setup,
    history: &[u32],
    query: Option<&str>,
    k: usize,
    exclude: &[u32],
) -> Result<Vec<RankedItem>> {
    let corpus = &setup.corpus;
    if k > corpus.n_items() {
        return Err(TrainError::Config(format!(
            "top-k {k} exceeds the catalogue's {} items",
            corpus.n_items()
        )));
    }
    if let Some(q) = query
        && q.chars().count() > MAX_QUERY_CHARS
    {
        return Err(TrainError::Config(format!(
            "the query has {} characters; at most {MAX_QUERY_CHARS} are accepted",
            q.chars().count()
        )));
    }
    let ids = setup.prompt_ids(history, query)?;
    if ids.is_empty() {
        return Err(TrainError::Config("the prompt is empty".into()));
    }
    let n = ids.len();
    let batch = TokenBatch::new(ids, vec![true; n], 1, n)?;
    let candidates: Vec<u32> =
        (0..corpus.n_items() as u32).map(|i| corpus.base_vocab + i).collect();
    let lp = setup.pretrained.model.candidate_log_probs(&batch, &[n - 1], &candidates)?;
    let lp = crate::forward::read_f32(lp, "top_items")?;
    let mut keep = vec![true; lp.len()];
    for &i in exclude {
        if let Some(k) = keep.get_mut(i as usize) {
            *k = false;
        }
    }
    let mut order: Vec<usize> = (0..lp.len()).filter(|&i| keep[i]).collect();
    order.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
    Ok(order
        .into_iter()
        .take(k)
        .enumerate()
        .map(|(r, i)| RankedItem {
            rank: r + 1,
            index: i as u32,
            id: corpus.item_ids[i].clone(),
            title: corpus.has_title(i).then(|| corpus.titles[i].clone()),
            log_prob: lp[i],
        })
        .collect())
}
