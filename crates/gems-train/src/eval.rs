//! The evaluation harness (GEMS-SPEC §6): full-catalogue ranking (primary), the sampled
//! protocol (99 negatives + the positive), target-token loss, and general-text perplexity over
//! the original vocabulary. Runs on a plain (non-autodiff) device: no graph is ever built.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use gems_data::{Split, Task, TextTokenizer};
use gems_metrics::{EvalReport, NdcgNormaliser, RankingAccumulator};
use gems_model::Llama;
use gems_rng::SplitMix64;

use crate::error::{Result, TrainError};
use crate::forward::{score_samples, text_nll};
use crate::progress::Reporter;
use crate::setup::{Corpus, Sample};

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Label of the report ("before", "after", "valid").
    pub label: String,
    /// The split.
    pub split: Split,
    /// Tasks evaluated.
    pub tasks: Vec<Task>,
    /// Examples per task (a seeded sample; 0 = all).
    pub max_examples: usize,
    /// Seed of that sample.
    pub seed: u64,
    /// Rows per forward pass.
    pub batch_size: usize,
    /// Also run the sampled protocol.
    pub sampled: bool,
    /// NDCG normaliser.
    pub normaliser: NdcgNormaliser,
    /// Leave the items each example's user had before its target (but not the target) out of
    /// the full-catalogue ranking ([`Corpus::seen`]).
    pub exclude_history: bool,
    /// Where progress events go (one phase per task).
    pub progress: Reporter,
}

/// The samples an evaluation uses: all of them, or a seeded sample of `max` kept in order.
pub fn select(samples: &[Sample], max: usize, seed: u64) -> Vec<&Sample> {
    if max == 0 || max >= samples.len() {
        return samples.iter().collect();
    }
    let mut idx: Vec<usize> = (0..samples.len()).collect();
    SplitMix64::new(seed).partial_shuffle(&mut idx, max);
    idx.truncate(max);
    idx.sort_unstable();
    idx.into_iter().map(|i| &samples[i]).collect()
}

/// Takes `items` out of a ranking by scoring them below everything (`f32::MIN`, which every
/// finite score ties or beats), except `keep` (the target, which a user may buy again).
pub fn exclude_items(scores: &mut [f32], items: &[u32], keep: u32) {
    for &i in items {
        if i != keep
            && let Some(s) = scores.get_mut(i as usize)
        {
            *s = f32::MIN;
        }
    }
}

/// Ranks every selected sample's target among all items (and among its sampled negatives),
/// and measures the target loss. `perplexity` is filled in separately.
///
/// # Errors
/// Forward failures, non-finite scores.
pub fn evaluate(model: &Llama, corpus: &Corpus, options: &EvalOptions) -> Result<EvalReport> {
    let n_items = corpus.n_items();
    let base = corpus.base_vocab as usize;
    let pad = corpus.eos_id;
    rank_samples(corpus, options, |_, chunk| {
        let scored = score_samples(model, chunk, pad, base, n_items)?;
        let losses = RowLosses { target: scored.loss_sum, item: scored.item_nll };
        Ok((scored.item_scores, Some(losses)))
    })
}

/// A model's losses of a chunk of samples, one value per row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowLosses {
    /// Sum of the target tokens' cross-entropies (item token and end-of-sequence).
    pub target: Vec<f64>,
    /// The item token's cross-entropy alone (full-vocabulary softmax).
    pub item: Vec<f64>,
}

/// Item scores of a chunk of samples (`rows x n_items`) and, for a model (whose item scores
/// are then logits), each row's losses.
pub type ChunkScores = (Vec<f32>, Option<RowLosses>);

/// `-log softmax(scores)[target]` over the items of one row, in f64: the ranking's own
/// cross-entropy.
pub fn catalogue_nll(scores: &[f32], target: usize) -> f64 {
    let max = scores.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
    let sum: f64 = scores.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    max + sum.ln() - f64::from(scores[target])
}

/// What [`rank_samples`] gathers for one task.
struct TaskTally {
    full: RankingAccumulator,
    unseen: RankingAccumulator,
    sampled: RankingAccumulator,
    has_loss: bool,
    /// Sums of the target loss (and its token count), the item token's loss and the catalogue
    /// softmax's, over the rows.
    loss: f64,
    tokens: usize,
    item_loss: f64,
    catalogue_loss: f64,
    rows: usize,
}

impl TaskTally {
    fn new(normaliser: NdcgNormaliser) -> Self {
        Self {
            full: RankingAccumulator::new(normaliser),
            unseen: RankingAccumulator::new(normaliser),
            sampled: RankingAccumulator::new(normaliser),
            has_loss: true,
            loss: 0.0,
            tokens: 0,
            item_loss: 0.0,
            catalogue_loss: 0.0,
            rows: 0,
        }
    }

    /// One sample's item scores `row` and, for a model, its (target, item token) losses;
    /// `seen` are the items the user had before the target ([`Corpus::seen`]).
    fn add(
        &mut self,
        row: &[f32],
        s: &Sample,
        seen: &[u32],
        losses: Option<(f64, f64)>,
        options: &EvalOptions,
    ) -> Result<()> {
        let target = [s.target as usize];
        let mut masked = row.to_vec();
        exclude_items(&mut masked, seen, s.target);
        if options.exclude_history {
            self.full.add_scores(&masked, &target)?;
        } else {
            self.full.add_scores(row, &target)?;
            self.unseen.add_scores(&masked, &target)?;
        }
        if options.sampled && !s.negatives.is_empty() {
            let mut cand = Vec::with_capacity(1 + s.negatives.len());
            cand.push(row[s.target as usize]);
            cand.extend(s.negatives.iter().map(|&n| row[n as usize]));
            self.sampled.add_scores(&cand, &[0])?;
        }
        if let Some((loss, item)) = losses {
            self.loss += loss;
            self.item_loss += item;
            self.catalogue_loss += catalogue_nll(row, s.target as usize);
        }
        self.tokens += s.ids.len() - s.target_pos;
        self.rows += 1;
        Ok(())
    }

    fn finish_into(self, report: &mut EvalReport, task: &str) {
        report.full.insert(task.to_string(), self.full.finish());
        if !self.unseen.is_empty() {
            report.unseen.insert(task.to_string(), self.unseen.finish());
        }
        if !self.sampled.is_empty() {
            report.sampled.insert(task.to_string(), self.sampled.finish());
        }
        if self.has_loss {
            let n = self.rows.max(1) as f64;
            report.loss.insert(task.to_string(), self.loss / self.tokens.max(1) as f64);
            report.item_loss.insert(task.to_string(), self.item_loss / n);
            report.catalogue_loss.insert(task.to_string(), self.catalogue_loss / n);
        }
    }
}

/// The evaluation protocol with any scorer: selects the samples of `options`, asks `score` for
/// the item scores of each chunk (of one task), and ranks every target in the whole catalogue
/// (minus the items its user had before it, the whole known history and not only the
/// prompt's, with `exclude_history`; otherwise both with and without them) and among
/// its sampled negatives. Target losses (and the item token's, and the catalogue softmax's)
/// are reported when the scorer gives them. A model ([`evaluate`]) and the baselines
/// (`crate::baselines`) share it, so their numbers are comparable by construction.
///
/// # Errors
/// The scorer's errors; a score row of the wrong length or non-finite.
pub fn rank_samples(
    corpus: &Corpus,
    options: &EvalOptions,
    mut score: impl FnMut(Task, &[&Sample]) -> Result<ChunkScores>,
) -> Result<EvalReport> {
    let started = Instant::now();
    let n_items = corpus.n_items();
    let mut report = EvalReport {
        label: options.label.clone(),
        split: options.split.name().to_string(),
        full: BTreeMap::new(),
        unseen: BTreeMap::new(),
        sampled: BTreeMap::new(),
        loss: BTreeMap::new(),
        item_loss: BTreeMap::new(),
        catalogue_loss: BTreeMap::new(),
        perplexity: None,
        ndcg_normaliser: options.normaliser,
        history_excluded: options.exclude_history,
        whole_history: true,
        seconds: 0.0,
    };
    for &task in &options.tasks {
        let samples = select(corpus.get(options.split, task), options.max_examples, options.seed);
        if samples.is_empty() {
            continue;
        }
        let mut tally = TaskTally::new(options.normaliser);
        let phase = format!("eval {} {} {}", options.label, options.split.name(), task.name());
        let progress = options.progress.phase(&phase, samples.len() as u64);
        let mut done = 0;
        for window in samples.chunks(options.batch_size * SORT_WINDOW_BATCHES) {
            let (scores, losses) =
                score_by_length(task, window, options.batch_size, n_items, &mut score)?;
            tally.has_loss &= losses.is_some();
            for (r, s) in window.iter().enumerate() {
                let row = &scores[r * n_items..(r + 1) * n_items];
                let row_losses = losses.as_ref().map(|l| l[r]);
                tally.add(row, s, corpus.seen(s), row_losses, options)?;
            }
            done += window.len() as u64;
            progress.update(done, "");
        }
        progress.finish(None);
        tally.finish_into(&mut report, task.name());
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Batches of an evaluation scored together, sorted by prompt length so that each batch pads
/// little (as training buckets its batches); their rows are tallied in the sample order, so
/// the metrics' sums run in the same order whatever the lengths.
const SORT_WINDOW_BATCHES: usize = 8;

/// A window's scores (`rows x n_items`) and, for a model, each row's target and item losses.
type WindowScores = (Vec<f32>, Option<Vec<(f64, f64)>>);

/// Scores `window` in batches of `batch_size` taken in the order of the prompts' lengths, and
/// returns the scores (`window.len() x n_items`) and, when the scorer gives them for every
/// batch, the losses, both in `window`'s order.
fn score_by_length(
    task: Task,
    window: &[&Sample],
    batch_size: usize,
    n_items: usize,
    score: &mut impl FnMut(Task, &[&Sample]) -> Result<ChunkScores>,
) -> Result<WindowScores> {
    let mut order: Vec<usize> = (0..window.len()).collect();
    order.sort_by_key(|&i| window[i].ids.len());
    let mut scores = vec![0f32; window.len() * n_items];
    let mut losses = Some(vec![(0.0, 0.0); window.len()]);
    for rows in order.chunks(batch_size.max(1)) {
        let chunk: Vec<&Sample> = rows.iter().map(|&i| window[i]).collect();
        let (item_scores, chunk_losses) = score(task, &chunk)?;
        if item_scores.len() != chunk.len() * n_items {
            return Err(TrainError::Training(format!(
                "a scorer returned {} scores for {} samples of {n_items} items",
                item_scores.len(),
                chunk.len()
            )));
        }
        for (r, &i) in rows.iter().enumerate() {
            scores[i * n_items..(i + 1) * n_items]
                .copy_from_slice(&item_scores[r * n_items..(r + 1) * n_items]);
        }
        match (losses.as_mut(), chunk_losses) {
            (Some(all), Some(l)) => {
                for (r, &i) in rows.iter().enumerate() {
                    all[i] = (l.target[r], l.item[r]);
                }
            }
            _ => losses = None,
        }
    }
    Ok((scores, losses))
}

/// Writes the examples an evaluation with `options` ranks, one JSON object per line: `task`,
/// `user`, `input_ids` (the prompt, exactly the ids the model sees), `target` (item index),
/// `target_token_id` (its token id), `negatives` (the sampled protocol's items), `seen` (the
/// items the user had before the target, which the protocol without history leaves out, the
/// target kept). With these, another implementation (docs/python.md) reproduces the
/// full-catalogue metrics: score the item-token logits at the prompt's last position and rank
/// the target against all items.
///
/// # Errors
/// I/O failures naming the file.
pub fn dump_examples(corpus: &Corpus, options: &EvalOptions, path: &Path) -> Result<usize> {
    let base = corpus.base_vocab;
    let mut out = String::new();
    let mut n = 0;
    for &task in &options.tasks {
        for s in select(corpus.get(options.split, task), options.max_examples, options.seed) {
            let line = serde_json::json!({
                "task": task.name(),
                "user": s.user,
                "input_ids": &s.ids[..s.target_pos],
                "target": s.target,
                "target_token_id": base + s.target,
                "negatives": &s.negatives,
                "seen": corpus.seen(s),
            });
            out.push_str(&line.to_string());
            out.push('\n');
            n += 1;
        }
    }
    crate::checkpoint::write_atomic(path, out.as_bytes())?;
    Ok(n)
}

/// General text cut into windows for perplexity.
#[derive(Debug, Clone)]
pub struct TextWindows {
    /// Token windows.
    pub windows: Vec<Vec<u32>>,
    /// Tokens in all windows.
    pub tokens: usize,
}

/// Tokenises the start of a text file (up to `max_tokens`, 0 = all) into windows of `window`
/// tokens. Blank lines are skipped; lines are joined with newlines as in the file.
///
/// # Errors
/// The file cannot be read or is empty after tokenisation.
pub fn text_windows(
    path: &Path,
    tokenizer: &dyn TextTokenizer,
    max_tokens: usize,
    window: usize,
) -> Result<TextWindows> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let mut ids: Vec<u32> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        ids.extend(tokenizer.encode(&format!("{}\n", line.trim()))?);
        if max_tokens > 0 && ids.len() >= max_tokens {
            ids.truncate(max_tokens);
            break;
        }
    }
    if ids.len() < 2 {
        return Err(TrainError::format(path, "fewer than two tokens of text"));
    }
    let windows: Vec<Vec<u32>> =
        ids.chunks(window.max(2)).filter(|w| w.len() >= 2).map(<[u32]>::to_vec).collect();
    Ok(TextWindows { tokens: ids.len(), windows })
}

/// exp(mean next-token NLL) over the windows, with the softmax over the first `base_vocab`
/// tokens (the original vocabulary: item tokens excluded).
///
/// # Errors
/// Forward failures.
pub fn perplexity(
    model: &Llama,
    text: &TextWindows,
    base_vocab: usize,
    batch: usize,
    progress: &Reporter,
) -> Result<f64> {
    let (mut nll, mut n) = (0.0, 0usize);
    let phase = progress.phase("perplexity", text.windows.len() as u64);
    let mut done = 0;
    for chunk in text.windows.chunks(batch.max(1)) {
        let (s, k) = text_nll(model, chunk, base_vocab)?;
        nll += s;
        n += k;
        done += chunk.len() as u64;
        phase.update(done, "");
    }
    phase.finish(None);
    let ppl = (nll / n.max(1) as f64).exp();
    if !ppl.is_finite() {
        return Err(TrainError::Training(format!(
            "perplexity is not finite (mean NLL {})",
            nll / n as f64
        )));
    }
    Ok(ppl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(n: usize) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                user: i as u32,
                position: 1,
                ids: vec![1, 2, 3],
                target_pos: 1,
                target: 0,
                history: vec![],
                query: None,
                negatives: vec![],
            })
            .collect()
    }

    #[test]
    fn batches_are_scored_by_length_and_rows_come_back_in_sample_order() {
        let mut owned = samples(11);
        for (i, s) in owned.iter_mut().enumerate() {
            s.ids = vec![7; 1 + (i * 7) % 11]; // lengths 1, 8, 4, 11, ... in no order
        }
        let window: Vec<&Sample> = owned.iter().collect();
        let mut batch_lengths = Vec::new();
        // Each row's scores and losses say which sample they belong to.
        let mut scorer = |_: Task, chunk: &[&Sample]| -> Result<ChunkScores> {
            batch_lengths.push(chunk.iter().map(|s| s.ids.len()).collect::<Vec<_>>());
            let scores = chunk.iter().flat_map(|s| [s.user as f32, -(s.user as f32)]).collect();
            let target = chunk.iter().map(|s| f64::from(s.user)).collect();
            let item = chunk.iter().map(|s| s.ids.len() as f64).collect();
            Ok((scores, Some(RowLosses { target, item })))
        };
        let (scores, losses) = score_by_length(Task::Rec, &window, 4, 2, &mut scorer).unwrap();
        let flat: Vec<usize> = batch_lengths.concat();
        assert!(flat.windows(2).all(|w| w[0] <= w[1]), "batches by length: {batch_lengths:?}");
        assert_eq!(batch_lengths.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4, 3]);
        for (r, s) in window.iter().enumerate() {
            assert_eq!(scores[2 * r..2 * r + 2], [s.user as f32, -(s.user as f32)]);
            assert_eq!(losses.as_ref().unwrap()[r], (f64::from(s.user), s.ids.len() as f64));
        }
        // A scorer without losses for some batch gives none for the window.
        let mut calls = 0;
        let mut partial = |_: Task, chunk: &[&Sample]| -> Result<ChunkScores> {
            calls += 1;
            let losses = (calls == 1).then(|| RowLosses {
                target: vec![0.0; chunk.len()],
                item: vec![0.0; chunk.len()],
            });
            Ok((vec![0.0; chunk.len()], losses))
        };
        assert!(score_by_length(Task::Rec, &window, 4, 1, &mut partial).unwrap().1.is_none());
    }

    #[test]
    fn catalogue_nll_is_the_softmax_cross_entropy_over_items() {
        assert!((catalogue_nll(&[0.25; 8], 3) - 8f64.ln()).abs() < 1e-12);
        // Large logits do not overflow: ln(e^1000 + e^999) - 999 = 1 + ln(1 + 1/e).
        let nll = catalogue_nll(&[1000.0, 999.0], 1);
        assert!((nll - (1.0 + (-1f64).exp().ln_1p())).abs() < 1e-9, "{nll}");
    }

    #[test]
    fn excluded_items_fall_below_every_score_but_the_target_stays() {
        let mut scores = vec![0.5, 3.0, -2.0, 7.0, 1.0];
        exclude_items(&mut scores, &[1, 3, 4, 99], 4);
        assert_eq!(scores, vec![0.5, f32::MIN, -2.0, f32::MIN, 1.0]);
        // The target (item 4) ranked 3rd among all items, 1st once the history is out.
        let ranks = gems_metrics::ranking::ranks_of(&scores, &[4]).unwrap();
        assert_eq!(ranks, vec![1]);
    }

    #[test]
    fn selection_is_seeded_ordered_and_capped() {
        let s = samples(50);
        let a: Vec<u32> = select(&s, 10, 7).iter().map(|x| x.user).collect();
        let b: Vec<u32> = select(&s, 10, 7).iter().map(|x| x.user).collect();
        let c: Vec<u32> = select(&s, 10, 8).iter().map(|x| x.user).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(select(&s, 0, 1).len(), 50);
        assert_eq!(select(&s, 80, 1).len(), 50);
    }
}
