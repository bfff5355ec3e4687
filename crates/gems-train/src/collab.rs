//! The item-to-item signal of the training interactions: what users do with an item, beside
//! what its text says.
//!
//! [`CoOccurrence`] counts, over the training recommendation examples only, how often two items
//! occur within [`CoOccurrence::WINDOW`] events of each other (each training example adds its
//! target paired with the last `WINDOW` items of its history, both ways round; every position
//! of every training sequence is one training example, so every pair inside the window is
//! counted once). Validation and test events are never read, so neither the floor nor the item
//! rows built from it see what they are evaluated on.
//!
//! Two uses:
//! - [`CoOccurrence::knn_scores`]: the `itemknn` floor (item-to-item neighbours as RecBole's
//!   ItemKNN, by co-occurrence count, scored from the recent history with a recency decay, as
//!   sequential recommenders weigh it);
//! - [`collab_embeddings`]: unit-length item embeddings from a truncated eigendecomposition of
//!   the positive-PMI matrix of the counts (Levy & Goldberg 2014: item2vec's implicit
//!   factorisation), which [`collab_rows`] maps into the model's embedding space through a fixed
//!   seeded orthonormal map, scaled to the item rows' mean norm, to be added to each item's
//!   text row (`model.item_collab`). The tied head then scores an item by how well the last
//!   hidden state points at its collaborative direction, which the tuned layers can learn from
//!   the history items' rows in the prompt (LLaRA and CoLLM inject collaborative embeddings the
//!   same way, through a learned projector; here the map is fixed and the layers adapt).

use std::collections::HashMap;

use faer::Mat;
use gems_data::{Split, Task};
use gems_rng::SplitMix64;

use crate::error::{Result, TrainError};
use crate::setup::Corpus;

/// Symmetric item co-occurrence counts of the training interactions, sparse by rows.
#[derive(Debug, Clone, PartialEq)]
pub struct CoOccurrence {
    /// Per item, its co-occurring items (ascending) and counts.
    rows: Vec<Vec<(u32, f32)>>,
    /// Per item, the sum of its row.
    totals: Vec<f32>,
}

impl CoOccurrence {
    /// How far apart (in events) two items may be and still co-occur.
    pub const WINDOW: usize = 5;

    /// Counts the training rec examples of `corpus`; items out of range are ignored (a corpus
    /// is validated where it is built).
    pub fn from_corpus(corpus: &Corpus) -> Self {
        let n = corpus.n_items();
        let mut pairs: HashMap<(u32, u32), f32> = HashMap::new();
        for s in corpus.get(Split::Train, Task::Rec) {
            for &h in s.history.iter().rev().take(Self::WINDOW) {
                if h == s.target || h as usize >= n || s.target as usize >= n {
                    continue;
                }
                *pairs.entry((h, s.target)).or_default() += 1.0;
                *pairs.entry((s.target, h)).or_default() += 1.0;
            }
        }
        let mut rows: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n];
        for ((i, j), c) in pairs {
            rows[i as usize].push((j, c));
        }
        for row in &mut rows {
            row.sort_unstable_by_key(|&(j, _)| j);
        }
        let totals = rows.iter().map(|r| r.iter().map(|&(_, c)| c).sum()).collect();
        Self { rows, totals }
    }

    /// Number of items.
    pub fn n_items(&self) -> usize {
        self.rows.len()
    }

    /// The count of the pair `(i, j)` (0 when they never co-occur or are out of range).
    pub fn count(&self, i: u32, j: u32) -> f32 {
        self.rows.get(i as usize).map_or(0.0, |row| {
            row.binary_search_by_key(&j, |&(k, _)| k).map_or(0.0, |at| row[at].1)
        })
    }

    /// How many recent history items the `itemknn` floor scores from.
    pub const KNN_HISTORY: usize = 5;
    /// The weight of the k-th most recent of them is `KNN_DECAY^k`.
    pub const KNN_DECAY: f32 = 0.7;

    /// The `itemknn` floor's score of every item for a history (oldest first): the sum over the
    /// last [`Self::KNN_HISTORY`] items h, weighted `KNN_DECAY^k` from the most recent, of the
    /// co-occurrence count `c(h, j)`. Chosen on Scientific's validation users (Recall@10 of all
    /// 8,317, history excluded): counts with decay 0.7 0.120, with 0.5 0.114; RecBole's cosine
    /// `c(h, j) / sqrt(c(h) c(j))` with 0.5 0.106 (docs/training.md).
    pub fn knn_scores(&self, history: &[u32]) -> Vec<f32> {
        let mut out = vec![0f32; self.n_items()];
        let mut weight = 1.0f32;
        for &h in history.iter().rev().take(Self::KNN_HISTORY) {
            if let Some(row) = self.rows.get(h as usize) {
                for &(j, c) in row {
                    out[j as usize] += weight * c;
                }
            }
            weight *= Self::KNN_DECAY;
        }
        out
    }

    /// The positive pointwise mutual information of every counted pair,
    /// `max(0, ln(c(i, j) T / (c(i) c(j))))` with `T` the sum of all counts, sparse by rows.
    fn ppmi(&self) -> Vec<Vec<(u32, f64)>> {
        let total: f64 = self.totals.iter().map(|&t| f64::from(t)).sum();
        self.rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let ti = f64::from(self.totals[i]);
                row.iter()
                    .filter_map(|&(j, c)| {
                        let tj = f64::from(self.totals[j as usize]);
                        let pmi = (f64::from(c) * total / (ti * tj)).ln();
                        (pmi > 0.0).then_some((j, pmi))
                    })
                    .collect()
            })
            .collect()
    }
}

/// `A X` for a sparse symmetric `A` given by rows.
fn sparse_times(a: &[Vec<(u32, f64)>], x: &Mat<f64>) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(a.len(), x.ncols());
    for (i, row) in a.iter().enumerate() {
        for &(j, v) in row {
            for c in 0..x.ncols() {
                out[(i, c)] += v * x[(j as usize, c)];
            }
        }
    }
    out
}

/// Seeded standard normal `rows x cols` matrix.
fn gaussian(rows: usize, cols: usize, rng: &mut SplitMix64) -> Mat<f64> {
    let mut draws = vec![0.0; rows * cols];
    rng.fill_standard_normal(&mut draws);
    Mat::from_fn(rows, cols, |i, j| draws[j * rows + i])
}

/// Unit-length `dims`-dimensional item embeddings (one row of the result per item) from the
/// top `dims` eigenpairs of the PPMI matrix of `co`: row i is `U_i sqrt(lambda)`, normalised;
/// items that never co-occur get a zero row. The eigenpairs come from seeded subspace iteration
/// (6 rounds, 10 extra columns) on the sparse matrix, so time and memory grow with the number
/// of counted pairs and items, not with the square of the catalogue.
///
/// # Errors
/// `dims` is 0 or not below the number of items; the small eigenproblem fails to converge.
pub fn collab_embeddings(co: &CoOccurrence, dims: usize, seed: u64) -> Result<Vec<Vec<f32>>> {
    let n = co.n_items();
    if dims == 0 || dims + 10 > n {
        return Err(TrainError::Config(format!(
            "model.item_collab {dims}: a catalogue of {n} items allows 1 to {} dimensions of \
             collaborative item rows; set --item-collab to at most that, or 0 for none (the CPU \
             preset uses 64)",
            n.saturating_sub(10)
        )));
    }
    let a = co.ppmi();
    let sketch = dims + 10;
    let mut rng = SplitMix64::for_stream(seed, &[0xc011ab, 1]);
    let mut q = gaussian(n, sketch, &mut rng).qr().compute_thin_Q();
    for _ in 0..6 {
        q = sparse_times(&a, &q).qr().compute_thin_Q();
    }
    let aq = sparse_times(&a, &q);
    let small = q.transpose() * &aq; // sketch x sketch, symmetric
    let small = Mat::from_fn(sketch, sketch, |i, j| 0.5 * (small[(i, j)] + small[(j, i)]));
    let eig = gems_subspace::symmetric_eigen(small.as_ref())
        .map_err(|e| TrainError::Training(format!("collaborative embedding: {e}")))?;
    // Eigenvalues ascending: the top `dims` are the last ones.
    let top: Vec<usize> = (sketch - dims..sketch).rev().collect();
    let u = &q * &eig.vectors;
    Ok((0..n)
        .map(|i| {
            let mut row: Vec<f64> =
                top.iter().map(|&k| u[(i, k)] * eig.values[k].max(0.0).sqrt()).collect();
            let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
            if norm > 1e-12 {
                row.iter_mut().for_each(|x| *x /= norm);
            } else {
                row.iter_mut().for_each(|x| *x = 0.0);
            }
            row.into_iter().map(|x| x as f32).collect()
        })
        .collect())
}

/// The collaborative part of every item row: `scale * M e_i` with `e_i` from
/// [`collab_embeddings`] and `M` a seeded `hidden x dims` matrix with orthonormal columns, so
/// each non-zero part has length `scale`. Returns `n_items * hidden` values, row-major.
///
/// # Errors
/// As [`collab_embeddings`]; `dims` above `hidden`.
pub fn collab_rows(
    co: &CoOccurrence,
    dims: usize,
    hidden: usize,
    scale: f32,
    seed: u64,
) -> Result<Vec<f32>> {
    if dims > hidden {
        return Err(TrainError::Config(format!(
            "model.item_collab {dims} exceeds the model's hidden size {hidden}"
        )));
    }
    let e = collab_embeddings(co, dims, seed)?;
    let mut rng = SplitMix64::for_stream(seed, &[0xc011ab, 2]);
    let map = gaussian(hidden, dims, &mut rng).qr().compute_thin_Q();
    let mut out = vec![0f32; e.len() * hidden];
    for (i, ei) in e.iter().enumerate() {
        for (r, x) in out[i * hidden..(i + 1) * hidden].iter_mut().enumerate() {
            let v: f64 = ei.iter().enumerate().map(|(k, &w)| map[(r, k)] * f64::from(w)).sum();
            *x = scale * v as f32;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::setup::Sample;
    use std::collections::BTreeMap;

    fn sample(history: &[u32], target: u32) -> Sample {
        Sample {
            user: 0,
            position: history.len() as u32,
            ids: Vec::new(),
            target_pos: 0,
            target,
            history: history.to_vec(),
            query: None,
            negatives: Vec::new(),
        }
    }

    fn corpus(n: usize, samples: BTreeMap<(Split, Task), Vec<Sample>>) -> Corpus {
        Corpus {
            dataset: "t".into(),
            base_vocab: 0,
            eos_id: 0,
            titles: vec![String::new(); n],
            categories: vec![Vec::new(); n],
            item_ids: (0..n).map(|i| i.to_string()).collect(),
            users: vec!["u".into()],
            samples,
            prepare: gems_data::PrepareConfig {
                dataset: "t".into(),
                format: gems_data::DataFormat::Jsonl,
                load: gems_data::LoadOptions::default(),
                query_synthesis: gems_data::QuerySynthesis::Off,
                build: gems_data::BuildConfig::default(),
            },
        }
    }

    /// Sequences walking a ring of `n` items: item i is followed by i + 1.
    fn ring(n: u32, users: u32) -> BTreeMap<(Split, Task), Vec<Sample>> {
        let mut m = BTreeMap::new();
        for u in 0..users {
            let seq: Vec<u32> = (0..8).map(|k| (u * 7 + k) % n).collect();
            for p in 1..seq.len() {
                let split = match seq.len() - p {
                    1 => Split::Test,
                    2 => Split::Valid,
                    _ => Split::Train,
                };
                let s = sample(&seq[..p], seq[p]);
                m.entry((split, Task::Rec)).or_insert_with(Vec::new).push(s);
            }
        }
        m
    }

    #[test]
    fn counts_pairs_within_the_window_both_ways() {
        let mut m = BTreeMap::new();
        m.insert(
            (Split::Train, Task::Rec),
            vec![sample(&[0], 1), sample(&[0, 1], 2), sample(&[0, 1, 2, 3, 4, 5, 6], 7)],
        );
        // A validation example is never counted.
        m.insert((Split::Valid, Task::Rec), vec![sample(&[0, 1, 2, 3, 4, 5, 6, 7], 8)]);
        let co = CoOccurrence::from_corpus(&corpus(8, m));
        assert_eq!(co.count(0, 1), 1.0); // each pair once: a target with the items before it
        assert_eq!(co.count(1, 0), 1.0);
        assert_eq!(co.count(0, 2), 1.0);
        assert_eq!(co.count(1, 2), 1.0);
        assert_eq!(co.count(2, 7), 1.0);
        assert_eq!(co.count(7, 2), 1.0);
        assert_eq!(co.count(1, 7), 0.0, "6 events apart: outside the window");
        assert_eq!(co.count(7, 7), 0.0);
        assert_eq!(co.count(7, 8), 0.0, "validation event");
    }

    #[test]
    fn knn_ranks_the_neighbours_of_the_recent_items_first() {
        let co = CoOccurrence::from_corpus(&corpus(40, ring(40, 60)));
        let s = co.knn_scores(&[10, 11, 12]);
        // Counts are symmetric: the nearest items outside the history, on either side, lead.
        let unseen = (0..40).filter(|i| ![10, 11, 12].contains(i));
        let best = unseen.max_by(|&a, &b| s[a].total_cmp(&s[b])).unwrap();
        assert!([9, 13].contains(&best), "best {best}");
        assert!(s[13] > s[20] && s[20] == 0.0);
    }

    #[test]
    fn validation_and_test_events_change_no_row() {
        let base = ring(40, 60);
        let mut changed = base.clone();
        for split in [Split::Valid, Split::Test] {
            for s in changed.get_mut(&(split, Task::Rec)).unwrap() {
                s.target = (s.target + 17) % 40;
                s.history.iter_mut().for_each(|h| *h = (*h + 5) % 40);
            }
        }
        let rows = |m| {
            let co = CoOccurrence::from_corpus(&corpus(40, m));
            collab_rows(&co, 8, 16, 2.0, 3).unwrap()
        };
        let a = rows(base);
        assert_eq!(a, rows(changed));
        // ...while a training event does change them.
        let mut train = ring(40, 60);
        train.get_mut(&(Split::Train, Task::Rec)).unwrap()[0].target = 33;
        assert_ne!(a, rows(train));
    }

    #[test]
    fn collab_rows_have_the_scale_and_neighbours_are_close() {
        let co = CoOccurrence::from_corpus(&corpus(40, ring(40, 60)));
        let (dims, hidden) = (8, 16);
        let rows = collab_rows(&co, dims, hidden, 2.0, 3).unwrap();
        let row = |i: usize| &rows[i * hidden..(i + 1) * hidden];
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        for i in 0..40 {
            assert!((dot(row(i), row(i)).sqrt() - 2.0).abs() < 1e-4, "item {i}");
        }
        // Ring neighbours share more direction than items half the ring apart.
        assert!(dot(row(5), row(6)) > dot(row(5), row(25)));
        assert!(collab_rows(&co, 0, hidden, 1.0, 3).is_err());
        assert!(collab_rows(&co, 32, hidden, 1.0, 3).is_err());
    }
}
