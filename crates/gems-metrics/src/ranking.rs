//! Ranking metrics at k in [`KS`]: Recall, NDCG and MRR (GEMS-SPEC §6).
//!
//! The model scores every candidate (the whole catalogue, or the positives plus 99 sampled
//! negatives); [`rank_of`] and [`ranks_of`] turn a score vector into 1-based ranks, and
//! [`RankingAccumulator`] turns ranks into per-example metrics and averages them.
//!
//! Conventions, chosen so that a degenerate model can never look good:
//! - ties are broken against the relevant item: an item tied with the target ranks above it,
//!   so a model that scores everything equally gets the worst rank, not the best;
//! - a NaN score is an error, never silently ranked;
//! - with several relevant items, [`ranks_of`] ranks each against the non-relevant items only
//!   (the other relevant items do not push it down); the accumulator then places the sorted
//!   relevant items at list positions `rank_i + i` (0-based `i`), which is where they stand in
//!   the full ranked list, so Recall@k counts relevant items in the top k of that list and
//!   NDCG@k never exceeds 1.
//!
//! Definitions for one example with `n_rel` relevant items at list positions `p_1 <= p_2 <= ...`:
//!
//! ```text
//! Recall@k = #{i: p_i <= k} / n_rel
//! DCG@k    = sum_{i: p_i <= k} 1 / log2(p_i + 1)
//! NDCG@k   = DCG@k / IDCG@k,  IDCG@k = sum_{i=1}^{m} 1 / log2(i + 1)
//!            m = min(n_rel, k)         (Standard: from the number of relevant items)
//!            m = #{i: p_i <= k}        (Authors: from the hits in the top k; NDCG = 0 if none)
//! MRR@k    = 1 / p_1 if p_1 <= k, else 0
//! ```
//!
//! Each metric is the mean over examples, reported with its standard error.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{MetricsError, Result};
pub use crate::normaliser::NdcgNormaliser;
use crate::normaliser::discount;

/// The cut-offs every ranking metric is reported at.
pub const KS: [usize; 3] = [5, 10, 20];

/// The names of the reported metrics, in a fixed order: recall, then ndcg, then mrr, each at
/// every k of [`KS`]. These are the keys of [`TaskMetrics::values`].
pub const METRIC_NAMES: [&str; 9] = [
    "recall@5",
    "recall@10",
    "recall@20",
    "ndcg@5",
    "ndcg@10",
    "ndcg@20",
    "mrr@5",
    "mrr@10",
    "mrr@20",
];

const N_METRICS: usize = METRIC_NAMES.len();

fn check_scores(operation: &'static str, scores: &[f32]) -> Result<()> {
    if scores.is_empty() {
        return Err(MetricsError::EmptyScores { operation });
    }
    match scores.iter().position(|s| s.is_nan()) {
        Some(index) => Err(MetricsError::NanScore { operation, index }),
        None => Ok(()),
    }
}

/// The 1-based rank of `scores[target]` among all scores, ties broken against the target:
/// `rank = 1 + #{j != target: scores[j] >= scores[target]}`.
///
/// Infinite scores are ranked as ordinary values (a masked item may carry `-inf`).
///
/// # Errors
/// [`MetricsError::EmptyScores`] when `scores` is empty, [`MetricsError::IndexOutOfRange`]
/// when `target >= scores.len()`, [`MetricsError::NanScore`] when any score is NaN.
///
/// ```
/// assert_eq!(gems_metrics::ranking::rank_of(&[0.1, 0.9, 0.5, 0.7], 2)?, 3);
/// assert_eq!(gems_metrics::ranking::rank_of(&[0.5, 0.5, 0.5], 0)?, 3); // ties count against
/// # Ok::<(), gems_metrics::MetricsError>(())
/// ```
pub fn rank_of(scores: &[f32], target: usize) -> Result<usize> {
    const OPERATION: &str = "rank_of";
    if scores.is_empty() {
        return Err(MetricsError::EmptyScores { operation: OPERATION });
    }
    if target >= scores.len() {
        return Err(MetricsError::IndexOutOfRange {
            operation: OPERATION,
            index: target,
            len: scores.len(),
        });
    }
    check_scores(OPERATION, scores)?;
    let target_score = scores[target];
    let above =
        scores.iter().enumerate().filter(|&(j, &s)| j != target && s >= target_score).count();
    Ok(1 + above)
}

/// The 1-based rank of each relevant item against the non-relevant items only, sorted
/// ascending: `rank_r = 1 + #{j not relevant: scores[j] >= scores[r]}`.
///
/// Other relevant items do not push an item down, so each rank says how many wrong items beat
/// it; [`RankingAccumulator::add`] turns these into list positions. An empty `relevant` gives
/// an empty vector. Cost: `O(len(scores) * len(relevant))`.
///
/// # Errors
/// [`MetricsError::EmptyScores`], [`MetricsError::NanScore`], [`MetricsError::IndexOutOfRange`]
/// for a relevant index past the end, [`MetricsError::DuplicateRelevant`] for a repeated one.
///
/// ```
/// // Items 1 and 3 are relevant; only item 2 (0.5 >= 0.5) beats item 3.
/// let ranks = gems_metrics::ranking::ranks_of(&[0.1, 0.9, 0.5, 0.5], &[3, 1])?;
/// assert_eq!(ranks, vec![1, 2]);
/// # Ok::<(), gems_metrics::MetricsError>(())
/// ```
pub fn ranks_of(scores: &[f32], relevant: &[usize]) -> Result<Vec<usize>> {
    const OPERATION: &str = "ranks_of";
    check_scores(OPERATION, scores)?;
    if let Some(&index) = relevant.iter().find(|&&r| r >= scores.len()) {
        return Err(MetricsError::IndexOutOfRange {
            operation: OPERATION,
            index,
            len: scores.len(),
        });
    }
    let mut sorted = relevant.to_vec();
    sorted.sort_unstable();
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(MetricsError::DuplicateRelevant { operation: OPERATION, index: pair[0] });
    }
    let mut ranks: Vec<usize> = relevant
        .iter()
        .map(|&r| {
            let score = scores[r];
            let at_least_all = scores.iter().filter(|&&s| s >= score).count();
            let at_least_relevant = relevant.iter().filter(|&&q| scores[q] >= score).count();
            // Both counts include `r` itself, so the difference counts non-relevant items only.
            1 + at_least_all - at_least_relevant
        })
        .collect();
    ranks.sort_unstable();
    Ok(ranks)
}

/// Per-example metric values in the order of [`METRIC_NAMES`].
fn example_metrics(
    positions: &[usize],
    n_relevant: usize,
    normaliser: NdcgNormaliser,
) -> [f64; N_METRICS] {
    let mut values = [0.0; N_METRICS];
    for (ki, &k) in KS.iter().enumerate() {
        let hits = positions.iter().filter(|&&p| p <= k).count();
        let dcg: f64 = positions.iter().filter(|&&p| p <= k).map(|&p| discount(p)).sum();
        let ideal = normaliser.ideal_dcg(n_relevant, hits, k);
        values[ki] = hits as f64 / n_relevant as f64;
        values[KS.len() + ki] = if ideal > 0.0 { dcg / ideal } else { 0.0 };
        values[2 * KS.len() + ki] = match positions.first() {
            Some(&first) if first <= k => 1.0 / first as f64,
            _ => 0.0,
        };
    }
    values
}

/// Running means (and variances, for standard errors) of every metric over examples.
///
/// Uses Welford's update per example and Chan et al.'s pairwise combination in
/// [`merge`](Self::merge), so shards evaluated separately merge to the same result as one pass
/// (up to rounding).
#[derive(Debug, Clone, PartialEq)]
pub struct RankingAccumulator {
    normaliser: NdcgNormaliser,
    examples: usize,
    mean: [f64; N_METRICS],
    /// Sum of squared deviations from the mean.
    m2: [f64; N_METRICS],
}

impl RankingAccumulator {
    /// An empty accumulator whose NDCG uses `normaliser`.
    pub fn new(normaliser: NdcgNormaliser) -> Self {
        Self { normaliser, examples: 0, mean: [0.0; N_METRICS], m2: [0.0; N_METRICS] }
    }

    /// The NDCG normaliser this accumulator uses.
    pub fn normaliser(&self) -> NdcgNormaliser {
        self.normaliser
    }

    /// Adds one example from the ranks of its relevant items as returned by [`ranks_of`]
    /// (1-based, each against the non-relevant items only, any order) and its number of
    /// relevant items. `ranks` may be shorter than `n_relevant`: relevant items that were not
    /// ranked at all (not among the candidates) count as misses.
    ///
    /// The sorted ranks `r_0 <= r_1 <= ...` become list positions `r_i + i`.
    ///
    /// # Errors
    /// [`MetricsError::InvalidRanks`] when `n_relevant` is 0, when there are more ranks than
    /// relevant items, or when a rank is 0. The accumulator is unchanged on error.
    pub fn add(&mut self, ranks: &[usize], n_relevant: usize) -> Result<()> {
        if n_relevant == 0 {
            return Err(MetricsError::InvalidRanks { message: "no relevant items".into() });
        }
        if ranks.len() > n_relevant {
            return Err(MetricsError::InvalidRanks {
                message: format!("{} ranks for {n_relevant} relevant items", ranks.len()),
            });
        }
        if ranks.contains(&0) {
            return Err(MetricsError::InvalidRanks {
                message: format!("rank 0 in {ranks:?} (ranks are 1-based)"),
            });
        }
        let mut positions = ranks.to_vec();
        positions.sort_unstable();
        for (i, position) in positions.iter_mut().enumerate() {
            *position = position.saturating_add(i);
        }
        let values = example_metrics(&positions, n_relevant, self.normaliser);
        self.examples += 1;
        let n = self.examples as f64;
        for (m, &value) in values.iter().enumerate() {
            let delta = value - self.mean[m];
            self.mean[m] += delta / n;
            self.m2[m] += delta * (value - self.mean[m]);
        }
        Ok(())
    }

    /// Adds one example from its candidate scores and the indices of its relevant items:
    /// [`ranks_of`] then [`add`](Self::add).
    ///
    /// # Errors
    /// Those of [`ranks_of`], and [`MetricsError::InvalidRanks`] when `relevant` is empty.
    pub fn add_scores(&mut self, scores: &[f32], relevant: &[usize]) -> Result<()> {
        let ranks = ranks_of(scores, relevant)?;
        self.add(&ranks, relevant.len())
    }

    /// Adds every example of `other` to this accumulator.
    ///
    /// # Errors
    /// [`MetricsError::NormaliserMismatch`] when the two use different NDCG normalisers.
    pub fn merge(&mut self, other: &RankingAccumulator) -> Result<()> {
        if self.normaliser != other.normaliser {
            return Err(MetricsError::NormaliserMismatch {
                this: self.normaliser,
                other: other.normaliser,
            });
        }
        if other.examples == 0 {
            return Ok(());
        }
        let (na, nb) = (self.examples as f64, other.examples as f64);
        let n = na + nb;
        for m in 0..N_METRICS {
            let delta = other.mean[m] - self.mean[m];
            self.mean[m] += delta * nb / n;
            self.m2[m] += other.m2[m] + delta * delta * na * nb / n;
        }
        self.examples += other.examples;
        Ok(())
    }

    /// Number of examples added.
    pub fn len(&self) -> usize {
        self.examples
    }

    /// Whether no example was added.
    pub fn is_empty(&self) -> bool {
        self.examples == 0
    }

    /// The means and their standard errors.
    ///
    /// With no examples both maps are empty; with one example `std_err` is empty (a sample
    /// standard deviation needs two).
    pub fn finish(&self) -> TaskMetrics {
        let mut metrics = TaskMetrics { examples: self.examples, ..TaskMetrics::default() };
        if self.examples == 0 {
            return metrics;
        }
        let n = self.examples as f64;
        for (m, name) in METRIC_NAMES.iter().enumerate() {
            metrics.values.insert((*name).to_owned(), self.mean[m]);
            if self.examples >= 2 {
                let variance = (self.m2[m] / (n - 1.0)).max(0.0);
                metrics.std_err.insert((*name).to_owned(), (variance / n).sqrt());
            }
        }
        metrics
    }
}

/// The metrics of one task (rec or search) under one protocol, averaged over examples.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TaskMetrics {
    /// Number of examples averaged.
    pub examples: usize,
    /// Mean of each metric, keyed by [`METRIC_NAMES`] (`"recall@10"`, `"ndcg@5"`, ...).
    #[serde(deserialize_with = "crate::record::nullable_map")]
    pub values: BTreeMap<String, f64>,
    /// Standard error of each mean (sample standard deviation / sqrt(examples)); empty with
    /// fewer than two examples.
    #[serde(default, deserialize_with = "crate::record::nullable_map")]
    pub std_err: BTreeMap<String, f64>,
}

impl TaskMetrics {
    /// The mean of the metric `name` (`"ndcg@10"`), if present.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.values.get(name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ideal_dcg_of_two_items() {
        use crate::normaliser::ideal_dcg;
        let expected = 1.0 + 1.0 / 3f64.log2();
        assert!((ideal_dcg(2) - expected).abs() < 1e-12);
        assert_eq!(ideal_dcg(0), 0.0);
    }

    #[test]
    fn positions_shift_by_earlier_relevant_items() {
        // Two relevant items both beating every non-relevant item sit at positions 1 and 2.
        let mut acc = RankingAccumulator::new(NdcgNormaliser::Standard);
        acc.add(&[1, 1], 2).unwrap();
        let m = acc.finish();
        assert_eq!(m.get("recall@5"), Some(1.0));
        assert!((m.get("ndcg@5").unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(m.get("mrr@5"), Some(1.0));
    }

    #[test]
    fn add_rejects_bad_ranks_and_leaves_state() {
        let mut acc = RankingAccumulator::new(NdcgNormaliser::Standard);
        assert!(acc.add(&[1], 0).is_err());
        assert!(acc.add(&[1, 2], 1).is_err());
        assert!(acc.add(&[0], 1).is_err());
        assert!(acc.is_empty());
    }

    #[test]
    fn merge_equals_one_pass() {
        let ranks = [[1usize], [3], [7], [25], [2]];
        let mut whole = RankingAccumulator::new(NdcgNormaliser::Standard);
        let mut left = RankingAccumulator::new(NdcgNormaliser::Standard);
        let mut right = RankingAccumulator::new(NdcgNormaliser::Standard);
        for (i, r) in ranks.iter().enumerate() {
            whole.add(r, 1).unwrap();
            if i < 2 { left.add(r, 1).unwrap() } else { right.add(r, 1).unwrap() }
        }
        left.merge(&right).unwrap();
        let (a, b) = (whole.finish(), left.finish());
        assert_eq!(a.examples, b.examples);
        for name in METRIC_NAMES {
            assert!((a.get(name).unwrap() - b.get(name).unwrap()).abs() < 1e-12, "{name}");
            assert!((a.std_err[name] - b.std_err[name]).abs() < 1e-12, "{name}");
        }
        let authors = RankingAccumulator::new(NdcgNormaliser::Authors);
        assert!(left.merge(&authors).is_err());
    }
}
