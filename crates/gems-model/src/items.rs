//! Item vocabulary: one atomic `<item_ID>` token per catalogue item (GEMS-SPEC §2).
//!
//! [`add_items`] adds the tokens to the tokenizer (as added tokens that are never split), grows
//! the embedding and, when the head is untied, the output head, and initialises the new rows:
//!
//! - [`ItemInit::TitleMean`] (default): the mean embedding (and head row) of the item title's
//!   tokens; an item without a title, or whose title tokenizes to nothing, gets the mean over
//!   the whole original vocabulary.
//! - [`ItemInit::TitleIdf`]: the same mean weighted by each token's inverse document frequency
//!   over the catalogue's titles, `ln(1 + N / df)` (N items, df of them containing the token),
//!   so tokens every title shares (`for`, `,`, a brand's category word) count least and the
//!   row leans towards what tells the item apart. Pass the item's descriptive text (e.g. title
//!   and category path) as its title to build the row from more than the title.
//! - [`ItemInit::Random`]: seeded normal rows with mean 0 and the standard deviation of the
//!   existing table, so the new rows match the embedding scale.
//!
//! Token ids are those the tokenizer assigns. When a checkpoint pads its embedding beyond the
//! tokenizer (Qwen2), the first items reuse the unused padding rows and the table grows only if
//! needed. A tied head stays tied and so grows with the embedding.

use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use tokenizers::AddedToken;

use crate::error::{ModelError, Result};
use crate::hf::Pretrained;
use gems_rng::SplitMix64;

use crate::llama::{init_rng, to_host};
use crate::weights::HostTensor;

/// How new item rows are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum ItemInit {
    /// Mean of the title's token rows (the default).
    #[default]
    TitleMean,
    /// Mean of the title's token rows weighted by inverse document frequency over the titles.
    TitleIdf,
    /// Seeded normal rows matched to the table's scale.
    Random {
        /// Seed of the generator.
        seed: u64,
    },
}

/// One catalogue item.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemSpec {
    /// The item id; its token is `<item_{id}>`.
    pub id: String,
    /// The title, for [`ItemInit::TitleMean`].
    pub title: Option<String>,
}

/// The token text of an item id.
pub fn item_token(id: &str) -> String {
    format!("<item_{id}>")
}

/// Adds one token per item; returns their token ids in `items` order.
///
/// Fails if an item token already exists (adding the same catalogue twice is a caller bug that
/// would silently alias rows) or if an id contains whitespace.
pub fn add_items(p: &mut Pretrained, items: &[ItemSpec], init: ItemInit) -> Result<Vec<u32>> {
    let op = "add_items";
    if items.is_empty() {
        return Ok(Vec::new());
    }
    check_new_items(p, items)?;
    let emb = to_host(p.model.embed_tokens.weight.val(), op)?;
    let (old_v, d) = (emb.shape[0], emb.shape[1]);
    let head = match &p.model.lm_head {
        Some(h) => Some(to_host(h.weight.val().transpose(), op)?), // [vocab, d]
        None => None,
    };
    // Title token ids before the tokenizer changes.
    let title_ids = title_token_ids(p, items, init, old_v)?;
    let weights = title_weights(&title_ids, init);
    let tokens: Vec<AddedToken> =
        items.iter().map(|it| AddedToken::from(item_token(&it.id), false)).collect();
    p.tokenizer.add_tokens(&tokens);
    let mut ids = Vec::with_capacity(items.len());
    for it in items {
        let id = p.tokenizer.token_to_id(&item_token(&it.id)).ok_or_else(|| {
            ModelError::tokenizer(None, format!("{} was not added", item_token(&it.id)))
        })?;
        ids.push(id);
    }
    let new_v = old_v.max(ids.iter().map(|&i| i as usize + 1).max().unwrap_or(0));
    let rows = NewRows { ids: &ids, title_ids: &title_ids, weights: &weights, init, new_v, d };
    let seed = match init {
        ItemInit::Random { seed } => seed,
        ItemInit::TitleMean | ItemInit::TitleIdf => 0,
    };
    let mut rng = init_rng(seed);
    let device = p.model.device();
    let new_emb = rows.grow(&emb.data, &mut rng);
    p.model.embed_tokens.weight =
        Param::from_tensor(Tensor::from_data(TensorData::new(new_emb, [new_v, d]), &device));
    if let (Some(h), Some(lm)) = (head, p.model.lm_head.as_mut()) {
        let new_head = rows.grow(&h.data, &mut rng);
        let t: Tensor<2> = Tensor::from_data(TensorData::new(new_head, [new_v, d]), &device);
        lm.weight = Param::from_tensor(t.transpose());
    }
    p.model.config.vocab_size = new_v;
    Ok(ids)
}

/// Refuses an empty id, an id with whitespace, and an item whose token already exists.
fn check_new_items(p: &Pretrained, items: &[ItemSpec]) -> Result<()> {
    let op = "add_items";
    for it in items {
        if it.id.is_empty() || it.id.chars().any(char::is_whitespace) {
            return Err(ModelError::input(
                op,
                format!("item id `{}` is empty or has whitespace", it.id),
            ));
        }
        if p.tokenizer.token_to_id(&item_token(&it.id)).is_some() {
            return Err(ModelError::input(
                op,
                format!("token {} already exists", item_token(&it.id)),
            ));
        }
    }
    Ok(())
}

/// Each item's title tokens among the first `old_v` (the vocabulary before the item tokens);
/// empty without a title or when `init` does not use titles.
fn title_token_ids(
    p: &Pretrained,
    items: &[ItemSpec],
    init: ItemInit,
    old_v: usize,
) -> Result<Vec<Vec<u32>>> {
    let mut title_ids = Vec::with_capacity(items.len());
    for it in items {
        let ids = match (&it.title, init) {
            (Some(t), ItemInit::TitleMean | ItemInit::TitleIdf) => p
                .tokenizer
                .encode(t.as_str(), false)
                .map_err(|e| ModelError::tokenizer(None, e))?
                .get_ids()
                .iter()
                .copied()
                .filter(|&i| (i as usize) < old_v)
                .collect(),
            _ => Vec::new(),
        };
        title_ids.push(ids);
    }
    Ok(title_ids)
}

/// The rows the new item tokens get in a `[vocab, d]` table.
struct NewRows<'a> {
    ids: &'a [u32],
    title_ids: &'a [Vec<u32>],
    weights: &'a [Vec<f64>],
    init: ItemInit,
    new_v: usize,
    d: usize,
}

impl NewRows<'_> {
    /// `table` (`[old_v, d]`, row-major) grown to `new_v` rows, the item rows set by `init`:
    /// seeded normal at the table's standard deviation, the (weighted) mean of the title's
    /// token rows, or the mean row for an item without title tokens.
    fn grow(&self, table: &[f32], rng: &mut SplitMix64) -> Vec<f32> {
        let d = self.d;
        let mut out = table.to_vec();
        out.resize(self.new_v * d, 0.0);
        let (mean, std) = mean_and_std(table, d);
        for (k, &id) in self.ids.iter().enumerate() {
            let row = &mut out[id as usize * d..(id as usize + 1) * d];
            match self.init {
                ItemInit::Random { .. } => {
                    row.iter_mut().for_each(|x| *x = (std * rng.normal()) as f32)
                }
                ItemInit::TitleMean | ItemInit::TitleIdf if self.title_ids[k].is_empty() => {
                    row.iter_mut().zip(&mean).for_each(|(x, m)| *x = *m as f32)
                }
                ItemInit::TitleMean | ItemInit::TitleIdf => {
                    let (t, w) = (&self.title_ids[k], &self.weights[k]);
                    let total: f64 = w.iter().sum();
                    for j in 0..d {
                        let s: f64 = t
                            .iter()
                            .zip(w)
                            .map(|(&i, &w)| w * table[i as usize * d + j] as f64)
                            .sum();
                        row[j] = (s / total) as f32;
                    }
                }
            }
        }
        out
    }
}

/// The mean row of a `[rows, d]` table and the standard deviation of all its entries (in f64).
fn mean_and_std(table: &[f32], d: usize) -> (Vec<f64>, f64) {
    let old_v = table.len() / d;
    let n = old_v as f64;
    let mut mean = vec![0f64; d];
    let mut sq = 0f64;
    for r in 0..old_v {
        for j in 0..d {
            let x = table[r * d + j] as f64;
            mean[j] += x / n;
            sq += x * x;
        }
    }
    let var = (sq / (n * d as f64) - mean.iter().map(|m| m * m).sum::<f64>() / d as f64).max(0.0);
    (mean, var.sqrt())
}

/// Adds `parts` (one row of the hidden size per id, row-major) to the rows of `ids` in the
/// token embedding and, when the head is untied, in the output head; a tied head follows the
/// embedding. [`item_row_norm`] gives the scale of the rows it adds to.
///
/// # Errors
/// `parts` is not `ids.len()` rows of the hidden size, or an id is past the table.
pub fn add_to_item_rows(p: &mut Pretrained, ids: &[u32], parts: &[f32]) -> Result<()> {
    let op = "add_to_item_rows";
    let device = p.model.device();
    let add = |table: HostTensor| -> Result<Vec<f32>> {
        let (v, d) = (table.shape[0], table.shape[1]);
        if parts.len() != ids.len() * d {
            return Err(ModelError::input(
                op,
                format!("{} values for {} rows of size {d}", parts.len(), ids.len()),
            ));
        }
        let mut out = table.data;
        for (k, &id) in ids.iter().enumerate() {
            if id as usize >= v {
                return Err(ModelError::input(op, format!("row {id} past a table of {v}")));
            }
            let row = &mut out[id as usize * d..(id as usize + 1) * d];
            row.iter_mut().zip(&parts[k * d..(k + 1) * d]).for_each(|(x, a)| *x += a);
        }
        Ok(out)
    };
    let emb = to_host(p.model.embed_tokens.weight.val(), op)?;
    let shape = [emb.shape[0], emb.shape[1]];
    let new_emb = add(emb)?;
    p.model.embed_tokens.weight =
        Param::from_tensor(Tensor::from_data(TensorData::new(new_emb, shape), &device));
    if let Some(lm) = p.model.lm_head.as_mut() {
        let head = to_host(lm.weight.val().transpose(), op)?; // [vocab, d]
        let shape = [head.shape[0], head.shape[1]];
        let t: Tensor<2> = Tensor::from_data(TensorData::new(add(head)?, shape), &device);
        lm.weight = Param::from_tensor(t.transpose());
    }
    Ok(())
}

/// The mean Euclidean norm of the token-embedding rows of `ids` (0 for no ids).
///
/// # Errors
/// An id is past the table; the embedding cannot be read.
pub fn item_row_norm(p: &Pretrained, ids: &[u32]) -> Result<f32> {
    let op = "item_row_norm";
    let emb = to_host(p.model.embed_tokens.weight.val(), op)?;
    let (v, d) = (emb.shape[0], emb.shape[1]);
    let mut sum = 0f64;
    for &id in ids {
        if id as usize >= v {
            return Err(ModelError::input(op, format!("row {id} past a table of {v}")));
        }
        let row = &emb.data[id as usize * d..(id as usize + 1) * d];
        sum += row.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
    }
    Ok(if ids.is_empty() { 0.0 } else { (sum / ids.len() as f64) as f32 })
}

/// The weight of each title token in its item's row: 1 for [`ItemInit::TitleMean`], the
/// token's `ln(1 + N / df)` over the `N` titles for [`ItemInit::TitleIdf`] (df counts the
/// titles holding the token at least once). Linear in the number of title tokens.
fn title_weights(title_ids: &[Vec<u32>], init: ItemInit) -> Vec<Vec<f64>> {
    let mut df: std::collections::HashMap<u32, f64> = std::collections::HashMap::new();
    if init == ItemInit::TitleIdf {
        for ids in title_ids {
            let mut distinct = ids.clone();
            distinct.sort_unstable();
            distinct.dedup();
            for t in distinct {
                *df.entry(t).or_default() += 1.0;
            }
        }
    }
    let n = title_ids.len() as f64;
    title_ids
        .iter()
        .map(|ids| match init {
            ItemInit::TitleIdf => ids.iter().map(|t| (1.0 + n / df[t]).ln()).collect(),
            _ => vec![1.0; ids.len()],
        })
        .collect()
}
