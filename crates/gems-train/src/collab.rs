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
//! [`Successors`] counts, over the same examples, which item came right after which: the
//! `successors` floor ([`Successors::scores`]), the directed, adjacent-only sibling of ItemKNN.
//!
//! Two uses of the co-occurrences:
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
use gems_rng::SplitMix64;

use crate::error::{Result, TrainError};

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

    /// Counts `examples` (history oldest first, target) over a catalogue of `n` items: each
    /// target with the last [`Self::WINDOW`] items of its history, both ways round. Pass the
    /// training examples only (`Corpus::co_occurrence` does); items out of range are ignored.
    pub fn from_examples<'a>(
        n: usize,
        examples: impl IntoIterator<Item = (&'a [u32], u32)>,
    ) -> Self {
        let mut pairs: HashMap<(u32, u32), f32> = HashMap::new();
        for (history, target) in examples {
            for &h in history.iter().rev().take(Self::WINDOW) {
                if h == target || h as usize >= n || target as usize >= n {
                    continue;
                }
                *pairs.entry((h, target)).or_default() += 1.0;
                *pairs.entry((target, h)).or_default() += 1.0;
            }
        }
        let rows = sparse_rows(n, pairs);
        let totals = rows.iter().map(|r| r.iter().map(|&(_, c)| c).sum()).collect();
        Self { rows, totals }
    }

    /// Number of items.
    pub fn n_items(&self) -> usize {
        self.rows.len()
    }

    /// The count of the pair `(i, j)` (0 when they never co-occur or are out of range).
    pub fn count(&self, i: u32, j: u32) -> f32 {
        sparse_count(&self.rows, i, j)
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
        recent_scores(&self.rows, history, Self::KNN_HISTORY, Self::KNN_DECAY)
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

/// Directed successor counts of the training interactions: how often item `j` came right after
/// item `i` in a training sequence, sparse by rows. The `successors` floor
/// ([`Successors::scores`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Successors {
    /// Per item, the items that followed it (ascending) and how often.
    rows: Vec<Vec<(u32, f32)>>,
    /// Per item, [`Self::TIE_BREAK`] times its share of the most frequent training target's
    /// count: what orders the items no recent item was followed by.
    popularity: Vec<f32>,
}

impl Successors {
    /// How many recent history items the `successors` floor scores from.
    pub const HISTORY: usize = 5;
    /// The weight of the k-th most recent of them is `DECAY^k`.
    pub const DECAY: f32 = 0.5;
    /// The most a popularity tie-break adds to a score: below the smallest difference counts
    /// can make (`DECAY^(HISTORY - 1)`), so it only orders items of equal counts.
    pub const TIE_BREAK: f32 = 0.01;

    /// Counts `examples` (history oldest first, target) over a catalogue of `n` items: each
    /// target after the last item of its history. Every position of every training sequence is
    /// one training example, so every adjacent pair is counted once. Pass the training examples
    /// only (`Corpus::successors` does); items out of range are ignored.
    pub fn from_examples<'a>(
        n: usize,
        examples: impl IntoIterator<Item = (&'a [u32], u32)>,
    ) -> Self {
        let mut pairs: HashMap<(u32, u32), f32> = HashMap::new();
        let mut popularity = vec![0f32; n];
        for (history, target) in examples {
            if let Some(p) = popularity.get_mut(target as usize) {
                *p += 1.0;
            }
            match history.last() {
                Some(&h) if h != target && (h as usize) < n && (target as usize) < n => {
                    *pairs.entry((h, target)).or_default() += 1.0;
                }
                _ => {}
            }
        }
        let most = popularity.iter().copied().fold(0f32, f32::max);
        if most > 0.0 {
            popularity.iter_mut().for_each(|p| *p *= Self::TIE_BREAK / most);
        }
        Self { rows: sparse_rows(n, pairs), popularity }
    }

    /// How often `j` came right after `i` (0 when never, or out of range).
    pub fn count(&self, i: u32, j: u32) -> f32 {
        sparse_count(&self.rows, i, j)
    }

    /// The `successors` floor's score of every item for a history (oldest first): the sum over
    /// the last [`Self::HISTORY`] items h, weighted `DECAY^k` from the most recent, of how
    /// often the item followed h; items of equal sums ordered by how often they are a training
    /// target ([`Self::TIE_BREAK`]). Measured on Scientific by the ignored test
    /// `item_to_item_on_amazon_scientific` (docs/training.md).
    pub fn scores(&self, history: &[u32]) -> Vec<f32> {
        let mut out = recent_scores(&self.rows, history, Self::HISTORY, Self::DECAY);
        out.iter_mut().zip(&self.popularity).for_each(|(s, p)| *s += p);
        out
    }
}

/// Sparse rows (ascending columns) of `n` items from counted pairs.
fn sparse_rows(n: usize, pairs: HashMap<(u32, u32), f32>) -> Vec<Vec<(u32, f32)>> {
    let mut rows: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n];
    for ((i, j), c) in pairs {
        rows[i as usize].push((j, c));
    }
    for row in &mut rows {
        row.sort_unstable_by_key(|&(j, _)| j);
    }
    rows
}

/// The entry `(i, j)` of sparse rows (0 where absent or out of range).
fn sparse_count(rows: &[Vec<(u32, f32)>], i: u32, j: u32) -> f32 {
    rows.get(i as usize)
        .map_or(0.0, |row| row.binary_search_by_key(&j, |&(k, _)| k).map_or(0.0, |at| row[at].1))
}

/// Every item's score for a history (oldest first): the rows of its last `last` items summed,
/// the k-th most recent weighted `decay^k`.
fn recent_scores(rows: &[Vec<(u32, f32)>], history: &[u32], last: usize, decay: f32) -> Vec<f32> {
    let mut out = vec![0f32; rows.len()];
    let mut weight = 1.0f32;
    for &h in history.iter().rev().take(last) {
        if let Some(row) = rows.get(h as usize) {
            for &(j, c) in row {
                out[j as usize] += weight * c;
            }
        }
        weight *= decay;
    }
    out
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
    check_width(dims, hidden)?;
    mapped_rows(&collab_embeddings(co, dims, seed)?, hidden, scale, seed)
}

fn check_width(dims: usize, hidden: usize) -> Result<()> {
    if dims > hidden {
        return Err(TrainError::Config(format!(
            "model.item_collab {dims} exceeds the model's hidden size {hidden}"
        )));
    }
    Ok(())
}

/// `scale * M e_i` for unit (or zero) rows `e` of one width `dims <= hidden`, `M` the seeded
/// `hidden x dims` map with orthonormal columns of [`collab_rows`]: `e.len() * hidden` values.
///
/// # Errors
/// Rows of unequal widths, or wider than `hidden`.
pub fn mapped_rows(e: &[Vec<f32>], hidden: usize, scale: f32, seed: u64) -> Result<Vec<f32>> {
    let dims = e.first().map_or(0, Vec::len);
    check_width(dims, hidden)?;
    if e.iter().any(|r| r.len() != dims) {
        return Err(TrainError::Config("collaborative rows of unequal widths".into()));
    }
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

/// Rows scaled to unit length (a row of length below 1e-12 becomes zero), as
/// [`collab_embeddings`] gives them.
pub fn unit_rows(rows: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
    rows.into_iter()
        .map(|mut row| {
            let norm = row.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
            let k = if norm > 1e-12 { (1.0 / norm) as f32 } else { 0.0 };
            row.iter_mut().for_each(|x| *x *= k);
            row
        })
        .collect()
}
