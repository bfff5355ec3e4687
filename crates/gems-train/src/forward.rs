//! Batches and the forward computations the trainer and the evaluator share: the target-token
//! loss, item scores at the last prompt position, and text log-likelihood over the original
//! vocabulary.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use gems_model::{Llama, TokenBatch, llama::gather_rows};

use crate::error::{Result, TrainError};
use crate::frozen_cache::FrozenStates;
use crate::setup::{LossTargets, Sample};

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
    let Some(base) = items_from else { return target_positions(samples) };
    let mut at = Vec::new();
    let mut ids = Vec::new();
    for (r, s) in samples.iter().enumerate() {
        let prompt = &s.ids[..s.target_pos.min(s.ids.len())];
        let items = prompt.iter().enumerate().filter(|&(_, &t)| t >= base).skip(1);
        for (p, &t) in items.chain(s.ids.iter().enumerate().skip(s.target_pos)) {
            at.push((r, p - 1));
            ids.push(t);
        }
    }
    (at, ids)
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
    targets: LossTargets,
    frozen: Option<&FrozenStates>,
) -> Result<Tensor<1>> {
    let batch = sample_batch(samples, pad)?;
    let (at, ids) = training_positions(samples, targets.history_from);
    let hidden = decoder_states(model, &batch, frozen)?;
    let Some((base, n_items)) = targets.catalogue else {
        // As Llama::logits_at: the head only at the target positions.
        let rows = gather_rows(hidden, &at, "target_loss")?;
        return Ok(cross_entropy(model.head(rows), &ids));
    };
    let is_item = |t: u32| t >= base && ((t - base) as usize) < n_items;
    let (mut item_at, mut item_ids, mut text_at, mut text_ids) = (vec![], vec![], vec![], vec![]);
    for (&p, &t) in at.iter().zip(&ids) {
        if is_item(t) {
            item_at.push(p);
            item_ids.push(t - base);
        } else {
            text_at.push(p);
            text_ids.push(t);
        }
    }
    let total = ids.len() as f64;
    let mut parts = Vec::new();
    if !item_at.is_empty() {
        let rows = gather_rows(hidden.clone(), &item_at, "target_loss")?;
        let logits = model.head_logits(rows, base as usize, n_items);
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
    }
}
