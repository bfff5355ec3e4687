//! Floors that need no language model, evaluated on the same examples with the same protocol
//! and metrics as a tuned model ([`crate::eval::rank_samples`]):
//!
//! - `popular`: every item scored by how often it is the target of a training example (both
//!   tasks), the same list for every user and query;
//! - `bm25`: search only, Okapi BM25 (k1 = 1.2, b = 0.75) of the query against each item's text
//!   (title and category path), lowercased alphanumeric words;
//! - `sasrec`: recommendation only, SASRec ([`crate::sasrec`], Kang & McAuley 2018) trained on
//!   the training rec examples with [`SasrecConfig::for_corpus`], on `flex`, seeded from the
//!   evaluation seed ([`sasrec_seed`]). It is trained on the CPU backend whatever device the
//!   run uses, so a run's floors are the same numbers on every machine;
//! - `itemknn`: recommendation only, the items that co-occur most with the last few history
//!   items in the training sequences, weighted by recency
//!   ([`crate::collab::CoOccurrence::knn_scores`]); no learning, a few seconds;
//! - `successors`: recommendation only, the items that came right after the last few history
//!   items in the training sequences, weighted by recency ([`crate::collab::Successors::scores`]);
//!   no learning. On Scientific it and `itemknn` are the strongest rec floors (docs/training.md).
//!
//! BM25 is implemented here rather than taken from a search library: the catalogue is a few
//! thousand short documents held in memory, and thirty lines keep the tokenisation and the
//! scoring visible next to the protocol.
//!
//! Ties count against the target, as for every method, so an item with the same score as many
//! others (a BM25 score of 0, say) ranks behind all of them.

use std::collections::{BTreeMap, HashMap};

use burn::tensor::Device;
use gems_data::{Split, Task};
use gems_metrics::EvalReport;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::eval::{EvalOptions, rank_samples};
use crate::sasrec::SasrecConfig;
use crate::setup::Corpus;

/// A floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Baseline {
    /// Most popular training targets first.
    Popular,
    /// BM25 of the query against item title and categories (search only).
    Bm25,
    /// SASRec on the item history (recommendation only).
    Sasrec,
    /// Item-to-item co-occurrence of the recent history (recommendation only).
    ItemKnn,
    /// What came right after the recent history items (recommendation only).
    Successors,
}

impl Baseline {
    /// Every floor.
    pub const ALL: [Baseline; 5] = [
        Baseline::Popular,
        Baseline::Bm25,
        Baseline::Sasrec,
        Baseline::ItemKnn,
        Baseline::Successors,
    ];

    /// Its name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Popular => "popular",
            Self::Bm25 => "bm25",
            Self::Sasrec => "sasrec",
            Self::ItemKnn => "itemknn",
            Self::Successors => "successors",
        }
    }
}

/// How often each item is the target of a training example (rec and search).
pub fn popularity(corpus: &Corpus) -> Vec<f32> {
    let mut counts = vec![0f32; corpus.n_items()];
    for task in Task::ALL {
        for s in corpus.get(Split::Train, task) {
            if let Some(c) = counts.get_mut(s.target as usize) {
                *c += 1.0;
            }
        }
    }
    counts
}

fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase)
}

/// An Okapi BM25 index over one document per item.
#[derive(Debug, Clone)]
pub struct Bm25 {
    postings: HashMap<String, Vec<(u32, f32)>>,
    lengths: Vec<f32>,
    average: f32,
}

impl Bm25 {
    const K1: f32 = 1.2;
    const B: f32 = 0.75;

    /// Indexes `docs` (document `i` is item `i`).
    pub fn new(docs: &[String]) -> Self {
        let mut postings: HashMap<String, Vec<(u32, f32)>> = HashMap::new();
        let mut lengths = Vec::with_capacity(docs.len());
        for (i, doc) in docs.iter().enumerate() {
            let mut tf: BTreeMap<String, f32> = BTreeMap::new();
            let mut n = 0.0;
            for w in words(doc) {
                *tf.entry(w).or_default() += 1.0;
                n += 1.0;
            }
            lengths.push(n);
            for (w, f) in tf {
                postings.entry(w).or_default().push((i as u32, f));
            }
        }
        let average = lengths.iter().sum::<f32>() / lengths.len().max(1) as f32;
        Self { postings, lengths, average: average.max(1e-6) }
    }

    /// The item documents of a corpus: title and category path.
    pub fn for_corpus(corpus: &Corpus) -> Self {
        let docs: Vec<String> = corpus
            .titles
            .iter()
            .zip(&corpus.categories)
            .map(|(t, c)| format!("{t} {}", c.join(" ")))
            .collect();
        Self::new(&docs)
    }

    /// BM25 score of every document for `query` (each distinct query word counted once).
    pub fn scores(&self, query: &str) -> Vec<f32> {
        let n = self.lengths.len() as f32;
        let mut out = vec![0f32; self.lengths.len()];
        let mut seen: Vec<String> = words(query).collect();
        seen.sort();
        seen.dedup();
        for w in seen {
            let Some(list) = self.postings.get(&w) else { continue };
            let df = list.len() as f32;
            let idf = ((n - df + 0.5) / (df + 0.5) + 1.0).ln();
            for &(doc, tf) in list {
                let len = self.lengths[doc as usize];
                let norm = Self::K1 * (1.0 - Self::B + Self::B * len / self.average);
                out[doc as usize] += idf * tf * (Self::K1 + 1.0) / (tf + norm);
            }
        }
        out
    }
}

/// The seed of the SASRec floor: a stream of `options.seed` (the seed of the evaluation's
/// example sample, itself derived from the run's seed), so the floor changes with the run's
/// seed and never shares random numbers with the sample.
pub fn sasrec_seed(options: &EvalOptions) -> u64 {
    gems_rng::SplitMix64::for_stream(options.seed, &[0x5a5_4ec]).next_u64()
}

/// Evaluates `baseline` with `options` (the same examples a model's evaluation ranks). BM25
/// ranks only search examples and SASRec only recommendation examples; the other task is
/// absent from their reports. SASRec is trained first (on `flex`; its training reported to
/// `options.progress`, the rankings not), unless no rec task is evaluated; a corpus without training rec
/// examples gives it nothing to learn from, and its report has no task.
///
/// # Errors
/// Ranking failures (none expected for finite scores); a non-finite SASRec training loss.
pub fn evaluate_baseline(
    corpus: &Corpus,
    baseline: Baseline,
    options: &EvalOptions,
) -> Result<EvalReport> {
    let mut options = options.clone();
    let progress = std::mem::take(&mut options.progress);
    options.label = baseline.as_str().to_string();
    match baseline {
        Baseline::Popular => {
            let row = popularity(corpus);
            rank_samples(corpus, &options, |_, chunk| {
                Ok((chunk.iter().flat_map(|_| row.iter().copied()).collect(), None))
            })
        }
        Baseline::Bm25 => {
            options.tasks.retain(|&t| t == Task::Search);
            let index = Bm25::for_corpus(corpus);
            rank_samples(corpus, &options, |_, chunk| {
                let mut out = Vec::with_capacity(chunk.len() * corpus.n_items());
                for s in chunk {
                    out.extend(index.scores(s.query.as_deref().unwrap_or("")));
                }
                Ok((out, None))
            })
        }
        Baseline::Sasrec => {
            options.tasks.retain(|&t| t == Task::Rec);
            if options.tasks.is_empty() || corpus.get(Split::Train, Task::Rec).is_empty() {
                // Nothing to rank, or nothing to learn from: a report without tasks.
                options.tasks.clear();
                return rank_samples(corpus, &options, |_, _| Ok((Vec::new(), None)));
            }
            let config = SasrecConfig::for_corpus(corpus, sasrec_seed(&options));
            let model = crate::sasrec::train(corpus, &config, &Device::flex(), &progress)?;
            rank_samples(corpus, &options, |_, chunk| Ok((model.score(chunk)?, None)))
        }
        Baseline::ItemKnn => {
            options.tasks.retain(|&t| t == Task::Rec);
            let co = corpus.co_occurrence();
            rank_samples(corpus, &options, |_, chunk| {
                Ok((chunk.iter().flat_map(|s| co.knn_scores(&s.history)).collect(), None))
            })
        }
        Baseline::Successors => {
            options.tasks.retain(|&t| t == Task::Rec);
            let successors = corpus.successors();
            rank_samples(corpus, &options, |_, chunk| {
                Ok((chunk.iter().flat_map(|s| successors.scores(&s.history)).collect(), None))
            })
        }
    }
}

/// Every floor on `options`' examples, by name.
///
/// # Errors
/// As [`evaluate_baseline`].
pub fn evaluate_baselines(
    corpus: &Corpus,
    options: &EvalOptions,
) -> Result<BTreeMap<String, EvalReport>> {
    Baseline::ALL
        .into_iter()
        .map(|b| Ok((b.as_str().to_string(), evaluate_baseline(corpus, b, options)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bm25_matches_a_hand_computation() {
        let docs =
            vec!["red tea pot".to_string(), "green tea".to_string(), "lab glass".to_string()];
        let index = Bm25::new(&docs);
        let s = index.scores("Tea, tea; RED!");
        // avgdl = 7/3; "tea": df 2, idf = ln((3 - 2 + 0.5) / 2.5 + 1) = ln 1.6;
        // "red": df 1, idf = ln(2.5 / 1.5 + 1) = ln(8/3).
        let (k1, b, avg) = (1.2f32, 0.75f32, 7.0f32 / 3.0);
        let part = |idf: f32, len: f32| idf * 2.2 / (1.0 + k1 * (1.0 - b + b * len / avg));
        let want0 = part(1.6f32.ln(), 3.0) + part((8.0f32 / 3.0).ln(), 3.0);
        let want1 = part(1.6f32.ln(), 2.0);
        assert!((s[0] - want0).abs() < 1e-5, "{} vs {want0}", s[0]);
        assert!((s[1] - want1).abs() < 1e-5, "{} vs {want1}", s[1]);
        assert_eq!(s[2], 0.0);
        assert!(index.scores("").iter().all(|&x| x == 0.0));
    }
}
