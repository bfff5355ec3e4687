//! Batches and the forward computations the trainer and the evaluator share: the target-token
//! loss, item scores at the last prompt position, and text log-likelihood over the original
//! vocabulary.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use gems_model::{Llama, TokenBatch, llama::gather_rows};

use crate::error::{Result, TrainError};
use crate::frozen_cache::FrozenStates;
use crate::setup::{LossTargets, Sample, SeenItems};

/// Right-padded batch of whole samples (prompt, target, end-of-sequence).
///
/// # Errors
/// An empty slice.
pub fn sample_batch(samples: &[&Sample], pad: u32) -> Result<TokenBatch> {
    if samples.is_empty() {
        return Err(TrainError::Training("empty batch".into()));
    }
    let seqs: Vec<Vec<u32>> = samples.iter().map(|s| s.ids.clone()).collect();
    Ok(TokenBatch::pad(&seqs, pad, false)?)
}

/// `(row, position)` pairs that predict each target token, with the token ids predicted:
/// position `p - 1` predicts the token at `p` for every `p` from the target to the end.
pub fn target_positions(samples: &[&Sample]) -> (Vec<(usize, usize)>, Vec<u32>) {
    let mut at = Vec::new();
    let mut ids = Vec::new();
    for (r, s) in samples.iter().enumerate() {
        for p in s.target_pos..s.ids.len() {
            at.push((r, p - 1));
            ids.push(s.ids[p]);
        }
    }
    (at, ids)
}

/// [`target_positions`] and, with `items_from = Some(base)`, every item token of each prompt
/// after its first (ids at or above `base` before the target): the history read as a sequence
/// in which each item is predicted from the list before it (`data.rec_targets = "all"`).
pub fn training_positions(
    samples: &[&Sample],
    items_from: Option<u32>,
) -> (Vec<(usize, usize)>, Vec<u32>) {
    let t = training_targets(samples, items_from);
    (t.at, t.ids)
}

/// The targets of [`training_targets`]: where each is predicted, its token id and the user
/// event it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingTargets {
    /// `(row, position)` predicting each target.
    pub at: Vec<(usize, usize)>,
    /// The target token ids.
    pub ids: Vec<u32>,
    /// The position of the event each target predicts in its user's sequence (`None` after
    /// the answer).
    pub events: Vec<Option<u32>>,
}

/// [`training_positions`] with, for each target, the position in its user's sequence of the
/// event it predicts: the answer's is the sample's position, the k-th of a prompt's n items
/// (from 0) is `position - n + k`; `None` for the tokens after the answer (end-of-sequence).
pub fn training_targets(samples: &[&Sample], items_from: Option<u32>) -> TrainingTargets {
    let mut at = Vec::new();
    let mut ids = Vec::new();
    let mut events = Vec::new();
    for (r, s) in samples.iter().enumerate() {
        if let Some(base) = items_from {
            let prompt = &s.ids[..s.target_pos.min(s.ids.len())];
            let items: Vec<usize> = (0..prompt.len()).filter(|&p| prompt[p] >= base).collect();
            let n = items.len() as u32;
            for (k, &p) in items.iter().enumerate().skip(1) {
                at.push((r, p - 1));
                ids.push(prompt[p]);
                events.push((s.position + k as u32).checked_sub(n));
            }
        }
        for p in s.target_pos..s.ids.len() {
            at.push((r, p - 1));
            ids.push(s.ids[p]);
            events.push((p == s.target_pos).then_some(s.position));
        }
    }
    TrainingTargets { at, ids, events }
}

/// The logit offsets that leave each target's earlier items out of its softmax
/// (`LossTargets::exclude_seen`), over the catalogue's `n_items` item columns:
/// `[targets.len(), n_items]` values, -1e9 (a softmax weight of exactly 0 in f32) at every item
/// the target's user had before the event it predicts, except the target's own item; 0
/// elsewhere. `targets` are `(row, event, item)` triples (`item` `None` for a text target);
/// `None` when nothing is left out.
fn seen_offsets(
    samples: &[&Sample],
    sequences: &[Vec<u32>],
    targets: &[(usize, Option<u32>, Option<u32>)],
    n_items: usize,
) -> Option<Vec<f32>> {
    let mut out = vec![0.0f32; targets.len() * n_items];
    let mut any = false;
    for (k, &(r, event, item)) in targets.iter().enumerate() {
        let (Some(event), Some(item)) = (event, item) else { continue };
        let seq = sequences.get(samples[r].user as usize).map_or(&[][..], Vec::as_slice);
        for &seen in &seq[..(event as usize).min(seq.len())] {
            if seen != item && (seen as usize) < n_items {
                out[k * n_items + seen as usize] = -1e9;
                any = true;
            }
        }
    }
    any.then_some(out)
}

/// `logits` (one row per target of `targets`) with [`seen_offsets`] added to the item block,
/// the `n_items` columns from `first`, when `seen` is given and anything is left out.
fn leave_out_seen(
    logits: Tensor<2>,
    first: usize,
    samples: &[&Sample],
    seen: Option<SeenItems<'_>>,
    targets: &[(usize, Option<u32>, Option<u32>)],
) -> Tensor<2> {
    let Some(seen) = seen else { return logits };
    let Some(offsets) = seen_offsets(samples, seen.sequences, targets, seen.n_items) else {
        return logits;
    };
    let [n, width] = logits.dims();
    let block = [0..n, first..first + seen.n_items];
    let offsets =
        Tensor::<2>::from_data(TensorData::new(offsets, [n, seen.n_items]), &logits.device());
    if first == 0 && width == seen.n_items {
        return logits + offsets;
    }
    let moved = logits.clone().slice(block.clone()) + offsets;
    logits.slice_assign(block, moved)
}

/// Mean cross-entropy of the target tokens (GEMS-SPEC §2: item token then end-of-sequence;
/// with `targets.history_from`, also the history items of [`training_positions`]), a scalar
/// tensor on the model's device (differentiable on an autodiff device). With
/// `targets.catalogue`, an item target's softmax runs over the item tokens only (the other
/// targets keep the whole vocabulary); the mean is over all targets either way. With
/// `frozen`, the frozen layers' part comes from its kept states.
///
/// # Errors
/// Token ids out of range, an empty batch.
pub fn target_loss(
    model: &Llama,
    samples: &[&Sample],
    pad: u32,
    targets: LossTargets<'_>,
    frozen: Option<&FrozenStates>,
) -> Result<Tensor<1>> {
    let batch = sample_batch(samples, pad)?;
    let TrainingTargets { at, ids, events } = training_targets(samples, targets.history_from);
    let hidden = decoder_states(model, &batch, frozen)?;
    let seen = targets.exclude_seen;
    // Where the item tokens are, when anything needs to know.
    let items = targets.catalogue.or(seen.map(|s| (s.base, s.n_items)));
    let item_of = |t: u32| {
        items.and_then(|(base, n)| (t >= base && ((t - base) as usize) < n).then(|| t - base))
    };
    let triple = |k: usize| (at[k].0, events[k], item_of(ids[k]));
    let Some((base, n_items)) = targets.catalogue else {
        // As Llama::logits_at: the head only at the target positions.
        let rows = gather_rows(hidden, &at, "target_loss")?;
        let order: Vec<_> = (0..ids.len()).map(triple).collect();
        let first = items.map_or(0, |(base, _)| base as usize);
        let logits = leave_out_seen(model.head(rows), first, samples, seen, &order);
        return Ok(cross_entropy(logits, &ids));
    };
    let (mut item_k, mut text_at, mut text_ids) = (vec![], vec![], vec![]);
    for (k, (&p, &t)) in at.iter().zip(&ids).enumerate() {
        if item_of(t).is_some() {
            item_k.push(k);
        } else {
            text_at.push(p);
            text_ids.push(t);
        }
    }
    let total = ids.len() as f64;
    let mut parts = Vec::new();
    if !item_k.is_empty() {
        let item_at: Vec<_> = item_k.iter().map(|&k| at[k]).collect();
        let item_ids: Vec<u32> = item_k.iter().map(|&k| ids[k] - base).collect();
        let order: Vec<_> = item_k.iter().map(|&k| triple(k)).collect();
        let rows = gather_rows(hidden.clone(), &item_at, "target_loss")?;
        let logits = model.head_logits(rows, base as usize, n_items);
        let logits = leave_out_seen(logits, 0, samples, seen, &order);
        parts.push(cross_entropy(logits, &item_ids).mul_scalar(item_ids.len() as f64 / total));
    }
    if !text_at.is_empty() {
        let rows = gather_rows(hidden, &text_at, "target_loss")?;
        parts.push(
            cross_entropy(model.head(rows), &text_ids).mul_scalar(text_ids.len() as f64 / total),
        );
    }
    parts
        .into_iter()
        .reduce(|a, b| a + b)
        .ok_or_else(|| TrainError::Training("target_loss: no target tokens".into()))
}

/// Final hidden states of the right-padded `batch`: [`Llama::hidden_states`], or with
/// `frozen` the frozen layers' part from its kept states ([`FrozenStates::hidden_states`]).
///
/// # Errors
/// A malformed batch, a failed forward pass.
pub fn decoder_states(
    model: &Llama,
    batch: &TokenBatch,
    frozen: Option<&FrozenStates>,
) -> Result<Tensor<3>> {
    match frozen {
        Some(f) => f.hidden_states(model, batch),
        None => Ok(model.hidden_states(batch)?),
    }
}

/// Mean of `-log softmax(logits)[target]` over rows.
pub fn cross_entropy(logits: Tensor<2>, targets: &[u32]) -> Tensor<1> {
    let device = logits.device();
    let n = targets.len();
    let idx: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
    let idx = Tensor::<2, Int>::from_data(TensorData::new(idx, [n, 1]), &device);
    log_softmax(logits, 1).gather(1, idx).mean().neg()
}

/// What one evaluation forward pass gives for a batch of samples.
#[derive(Debug)]
pub struct ScoredBatch {
    /// Item logits at the last prompt position, `[rows, n_items]` (ranking order equals
    /// log p(item | prompt) order: the softmax normaliser is shared by all items of a row).
    pub item_scores: Vec<f32>,
    /// Sum of target-token cross-entropies per row.
    pub loss_sum: Vec<f64>,
    /// The target item token's cross-entropy alone per row (full-vocabulary softmax).
    pub item_nll: Vec<f64>,
}

/// One forward pass over whole samples: item scores for ranking and the target loss.
///
/// # Errors
/// Token ids out of range, non-finite outputs, a failed device read.
pub fn score_samples(
    model: &Llama,
    samples: &[&Sample],
    pad: u32,
    base_vocab: usize,
    n_items: usize,
) -> Result<ScoredBatch> {
    let batch = sample_batch(samples, pad)?;
    let hidden = model.hidden_states(&batch)?;
    let last: Vec<(usize, usize)> =
        samples.iter().enumerate().map(|(r, s)| (r, s.target_pos - 1)).collect();
    let (at, ids) = target_positions(samples);
    let rows = gather_rows(hidden.clone(), &last, "score_samples")?;
    let scores = model.head_logits(rows, base_vocab, n_items);
    let target_rows = gather_rows(hidden, &at, "score_samples")?;
    let logits = model.head(target_rows);
    let n = ids.len();
    let idx: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let idx = Tensor::<2, Int>::from_data(TensorData::new(idx, [n, 1]), &model.device());
    let token_lp = log_softmax(logits, 1).gather(1, idx).reshape([n]);
    let item_scores = read_f32(scores, "score_samples")?;
    let token_lp = read_f32(token_lp, "score_samples")?;
    let mut loss_sum = vec![0.0; samples.len()];
    let mut item_nll = vec![0.0; samples.len()];
    for (k, &(r, p)) in at.iter().enumerate() {
        loss_sum[r] -= token_lp[k] as f64;
        if p + 1 == samples[r].target_pos {
            item_nll[r] = -(token_lp[k] as f64);
        }
    }
    if item_scores.iter().any(|x| !x.is_finite()) || loss_sum.iter().any(|x| !x.is_finite()) {
        return Err(TrainError::Training("non-finite scores in evaluation".into()));
    }
    Ok(ScoredBatch { item_scores, loss_sum, item_nll })
}

/// Sum of next-token negative log-likelihoods (over the first `base_vocab` tokens only) and
/// the number of predicted tokens, for windows of text tokens (each window scored on its own).
///
/// # Errors
/// Empty windows, token ids outside the text vocabulary, a failed device read.
pub fn text_nll(model: &Llama, windows: &[Vec<u32>], base_vocab: usize) -> Result<(f64, usize)> {
    let windows: Vec<&Vec<u32>> = windows.iter().filter(|w| w.len() >= 2).collect();
    if windows.is_empty() {
        return Ok((0.0, 0));
    }
    if let Some(bad) = windows.iter().flat_map(|w| w.iter()).find(|&&t| t as usize >= base_vocab) {
        return Err(TrainError::Training(format!(
            "text token {bad} >= text vocabulary {base_vocab}"
        )));
    }
    let seqs: Vec<Vec<u32>> = windows.iter().map(|w| w.to_vec()).collect();
    let batch = TokenBatch::pad(&seqs, 0, false)?;
    let hidden = model.hidden_states(&batch)?;
    let mut at = Vec::new();
    let mut next = Vec::new();
    for (r, w) in windows.iter().enumerate() {
        for p in 0..w.len() - 1 {
            at.push((r, p));
            next.push(w[p + 1]);
        }
    }
    let rows = gather_rows(hidden, &at, "text_nll")?;
    let logits = model.head_logits(rows, 0, base_vocab);
    let nll = cross_entropy(logits, &next);
    let mean = read_f32(nll, "text_nll")?[0] as f64;
    Ok((mean * next.len() as f64, next.len()))
}

/// Reads a tensor back as f32 values.
///
/// # Errors
/// The backend cannot read the tensor.
pub fn read_f32<const D: usize>(t: Tensor<D>, op: &'static str) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| TrainError::Readback { op, detail: format!("{e:?}") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::setup::UNKNOWN_ITEM;

    #[test]
    fn all_targets_add_every_history_item_after_the_first() {
        // text 10, items a b c (base 100), suffix 12, answer 103, end-of-sequence 0.
        let s = Sample {
            user: 0,
            position: 3,
            ids: vec![10, 100, 11, 101, 11, 102, 12, 103, 0],
            target_pos: 7,
            target: 3,
            history: vec![0, 1, 2],
            query: None,
            negatives: Vec::new(),
        };
        let one = vec![(0, 6), (0, 7)];
        assert_eq!(training_positions(&[&s], None), (one.clone(), vec![103, 0]));
        assert_eq!(target_positions(&[&s]), (one, vec![103, 0]));
        let (at, ids) = training_positions(&[&s, &s], Some(100));
        assert_eq!(at, [(0, 2), (0, 4), (0, 6), (0, 7), (1, 2), (1, 4), (1, 6), (1, 7)]);
        assert_eq!(ids, [101, 102, 103, 0, 101, 102, 103, 0]);
        // The events: b and c are the user's events 1 and 2, the answer event 3.
        let events = training_targets(&[&s], Some(100)).events;
        assert_eq!(events, [Some(1), Some(2), Some(3), None]);
        assert_eq!(training_targets(&[&s], None).events, [Some(3), None]);
    }

    #[test]
    fn seen_offsets_leave_out_the_earlier_items_but_the_target() {
        // The user had items 5, 7, 5, 9; a target predicting event 3 (item 9) leaves out 5 and
        // 7; one predicting event 2 whose item repeats 5 keeps 5 and leaves out 7; a text
        // target and an unknown event leave out nothing.
        let s = Sample {
            user: 0,
            position: 3,
            ids: Vec::new(),
            target_pos: 0,
            target: 9,
            history: vec![5, 7, 5],
            query: None,
            negatives: Vec::new(),
        };
        let sequences = vec![vec![5, 7, 5, 9, UNKNOWN_ITEM]];
        let targets = [(0, Some(3), Some(9)), (0, Some(2), Some(5)), (0, None, None)];
        let off = seen_offsets(&[&s], &sequences, &targets, 10).unwrap();
        let masked = |k: usize| (0..10).filter(|&c| off[k * 10 + c] != 0.0).collect::<Vec<_>>();
        assert_eq!(masked(0), [5, 7]);
        assert_eq!(masked(1), [7]);
        assert!(masked(2).is_empty());
        assert!(off.iter().all(|&x| x == 0.0 || x == -1e9));
        // The unknown event of a hand-made sequence is never an item column.
        let late = [(0, Some(5), Some(1))];
        let off = seen_offsets(&[&s], &sequences, &late, 10);
        assert_eq!(off.map(|o| (0..10).filter(|&c| o[c] != 0.0).count()), Some(3));
        assert!(seen_offsets(&[&s], &sequences, &[(0, Some(0), Some(5))], 10).is_none());
    }
}
