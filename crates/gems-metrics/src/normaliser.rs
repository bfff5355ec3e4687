//! How NDCG@k is normalised: the ideal DCG, standard or the GEMS authors' variant. Below
//! [`crate::ranking`] and the crate's error type, which both name it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How the ideal DCG that normalises NDCG@k is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NdcgNormaliser {
    /// The standard definition: the ideal DCG of `min(n_relevant, k)` items at the top.
    #[default]
    Standard,
    /// The GEMS authors' variant: the ideal DCG of the hits actually found in the top k (0, and
    /// NDCG 0, when there are none). It rewards a model that finds one of several relevant items
    /// as much as one that finds all of them; reported only as a labelled option.
    Authors,
}

impl NdcgNormaliser {
    /// The name used in JSON and on the command line: `"standard"` or `"authors"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Authors => "authors",
        }
    }

    /// The ideal DCG at cut-off `k` for an example with `n_relevant` relevant items, `hits` of
    /// which are in the top `k`.
    pub fn ideal_dcg(self, n_relevant: usize, hits: usize, k: usize) -> f64 {
        match self {
            Self::Standard => ideal_dcg(n_relevant.min(k)),
            Self::Authors => ideal_dcg(hits.min(k)),
        }
    }
}

impl fmt::Display for NdcgNormaliser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `sum_{i=1}^{m} 1 / log2(i + 1)`: the DCG of `m` relevant items at the top of the list.
pub(crate) fn ideal_dcg(m: usize) -> f64 {
    (1..=m).map(discount).sum()
}

/// The DCG gain of a relevant item at 1-based list position `position`.
pub(crate) fn discount(position: usize) -> f64 {
    1.0 / ((position as f64) + 1.0).log2()
}
