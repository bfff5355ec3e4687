//! SASRec (Kang & McAuley, ICDM 2018): a small self-attentive sequential recommender, the
//! floor of the recommendation task that learns from the sequences but knows no text.
//!
//! The model: an item embedding table (row 0 pads, item `i` is row `i + 1`) plus a learned
//! position embedding, [`SasrecConfig::blocks`] pre-norm causal self-attention blocks (attention,
//! then a pointwise two-layer ReLU network, each with a residual connection and dropout), a
//! final layer norm; an item's score is the last position's hidden state dotted with the item's
//! embedding (the table is tied, as in the paper). Histories are left-padded per batch and
//! padded positions are masked out as attention keys, so a sequence's scores do not depend on
//! the other rows of its batch.
//!
//! Two departures from the paper, both deliberate:
//! - the loss is the full softmax cross-entropy over the catalogue on each training example's
//!   target, not the paper's binary cross-entropy against one sampled negative per position: a
//!   catalogue of a few thousand items makes the full softmax cheap, and it is the stronger
//!   objective for full-catalogue ranking;
//! - each training example (a history and its next item, [`crate::Sample`]) is one sequence whose
//!   last position is trained, rather than one sequence per user trained at every position.
//!   With the default task assignment (`gems-data`'s `TaskAssignment::Both`) the training
//!   split's rec examples are every prefix of every user, so the targets are the same; only the
//!   grouping into steps differs.
//!
//! Everything is seeded ([`SasrecConfig::seed`]): weights are drawn from `gems-rng` on the
//! host (Burn's initialisers draw from a process-wide backend generator), and so are the
//! epoch shuffles and the dropout masks. The optimizer is Burn's Adam (no weight decay). On
//! `flex`, the same corpus and seed give the same scores bit for bit
//! (`crates/gems-train/tests/sasrec.rs`).

use burn::module::{Module, Param};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::relu;
use burn::tensor::module::{attention, embedding, linear};
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Int, Tensor, TensorData};
use gems_data::{Split, Task};
use gems_rng::SplitMix64;

use crate::error::{Result, TrainError};
use crate::forward::{cross_entropy, read_f32};
use crate::progress::Reporter;
use crate::setup::{Corpus, Sample};

/// Attention bias of padded keys (finite, as in `gems-model`, so an all-padding row stays
/// finite).
const MASKED: f32 = -1.0e9;

/// Hyperparameters of the SASRec floor.
#[derive(Debug, Clone, PartialEq)]
pub struct SasrecConfig {
    /// Longest history read (older items are dropped): the data's `max_history`.
    pub max_len: usize,
    /// Width of embeddings and hidden states.
    pub hidden: usize,
    /// Self-attention blocks.
    pub blocks: usize,
    /// Attention heads (dividing `hidden`).
    pub heads: usize,
    /// Dropout probability on the embeddings and on each residual branch (training only).
    pub dropout: f64,
    /// Passes over the training examples.
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Seed of the weights, the shuffles and the dropout masks.
    pub seed: u64,
}

impl SasrecConfig {
    /// The floor's configuration for `corpus`: histories as long as the data's `max_history`,
    /// hidden 64, 2 blocks of 1 head, dropout 0.2, 5 epochs of batches of 128, Adam at 3e-3.
    ///
    /// The learning rate was chosen on Amazon Scientific's validation split at 5 epochs
    /// (Recall@10 over all 8317 validation users: 1e-3 0.074, 2e-3 0.097, 3e-3 0.105, 5e-3
    /// 0.107, 1e-2 0.101), and 5 epochs keep training near a minute on 2 cores.
    pub fn for_corpus(corpus: &Corpus, seed: u64) -> Self {
        Self {
            max_len: corpus.prepare.build.max_history.max(1),
            hidden: 64,
            blocks: 2,
            heads: 1,
            dropout: 0.2,
            epochs: 5,
            batch_size: 128,
            lr: 3e-3,
            seed,
        }
    }
}

/// Layer normalisation over the last axis.
#[derive(Module, Debug)]
struct LayerNorm {
    gamma: Param<Tensor<1>>,
    beta: Param<Tensor<1>>,
}

impl LayerNorm {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let mean = x.clone().mean_dim(2);
        let centred = x - mean;
        let var = centred.clone().powi_scalar(2).mean_dim(2);
        centred / var.add_scalar(1e-6).sqrt() * self.gamma.val().unsqueeze()
            + self.beta.val().unsqueeze()
    }
}

/// One pre-norm block: `x + attn(ln(x))`, then `x + ffn(ln(x))`.
#[derive(Module, Debug)]
struct Block {
    attn_norm: LayerNorm,
    wq: Param<Tensor<2>>,
    wk: Param<Tensor<2>>,
    wv: Param<Tensor<2>>,
    wo: Param<Tensor<2>>,
    ffn_norm: LayerNorm,
    w1: Param<Tensor<2>>,
    b1: Param<Tensor<1>>,
    w2: Param<Tensor<2>>,
    b2: Param<Tensor<1>>,
}

/// The SASRec network.
#[derive(Module, Debug)]
pub struct Sasrec {
    items: Param<Tensor<2>>,
    positions: Param<Tensor<2>>,
    blocks: Vec<Block>,
    norm: LayerNorm,
    #[module(skip)]
    heads: usize,
}

/// Seeded host-side draws: initial weights and dropout masks.
struct Draws {
    rng: SplitMix64,
    device: Device,
}

impl Draws {
    fn normal(&mut self, shape: [usize; 2], std: f64) -> Param<Tensor<2>> {
        let mut v = vec![0f64; shape[0] * shape[1]];
        self.rng.fill_standard_normal(&mut v);
        let v: Vec<f32> = v.into_iter().map(|x| (x * std) as f32).collect();
        Param::from_tensor(Tensor::from_data(TensorData::new(v, shape), &self.device))
    }

    fn constant(&self, n: usize, value: f32) -> Param<Tensor<1>> {
        Param::from_tensor(Tensor::from_data(TensorData::new(vec![value; n], [n]), &self.device))
    }

    fn norm(&self, n: usize) -> LayerNorm {
        LayerNorm { gamma: self.constant(n, 1.0), beta: self.constant(n, 0.0) }
    }

    /// Inverted dropout: `x` with each entry zeroed with probability `p` (rounded to a multiple
    /// of 2^-16: four entries per 64-bit draw), the rest scaled by `1 / (1 - p)`.
    fn dropout(&mut self, x: Tensor<3>, p: f64) -> Tensor<3> {
        let threshold = (p.clamp(0.0, 1.0) * 65536.0).round() as u64;
        if threshold == 0 {
            return x;
        }
        let dims = x.dims();
        let n = dims.iter().product::<usize>();
        let keep = (65536.0 / (65536 - threshold.min(65535)) as f64) as f32;
        let mut mask = Vec::with_capacity(n + 3);
        while mask.len() < n {
            let r = self.rng.next_u64();
            mask.extend(
                (0..4).map(|k| if (r >> (16 * k)) & 0xffff < threshold { 0.0 } else { keep }),
            );
        }
        mask.truncate(n);
        x * Tensor::from_data(TensorData::new(mask, dims), &self.device)
    }
}

impl Sasrec {
    fn init(n_items: usize, config: &SasrecConfig, draws: &mut Draws) -> Self {
        let h = config.hidden;
        let emb = 1.0 / (h as f64).sqrt();
        let xavier = (1.0 / h as f64).sqrt(); // sqrt(2 / (fan_in + fan_out)), square layers
        let blocks = (0..config.blocks)
            .map(|_| Block {
                attn_norm: draws.norm(h),
                wq: draws.normal([h, h], xavier),
                wk: draws.normal([h, h], xavier),
                wv: draws.normal([h, h], xavier),
                wo: draws.normal([h, h], xavier),
                ffn_norm: draws.norm(h),
                w1: draws.normal([h, h], xavier),
                b1: draws.constant(h, 0.0),
                w2: draws.normal([h, h], xavier),
                b2: draws.constant(h, 0.0),
            })
            .collect();
        Self {
            items: draws.normal([n_items + 1, h], emb),
            positions: draws.normal([config.max_len, h], emb),
            blocks,
            norm: draws.norm(h),
            heads: config.heads,
        }
    }

    /// Scores of every item (`[rows, n_items]`) after each history, with dropout when `drop`
    /// is given.
    fn scores(&self, histories: &[&[u32]], mut drop: Option<(&mut Draws, f64)>) -> Tensor<2> {
        let device = self.items.val().device();
        let [rows, h] = self.items.val().dims();
        let max_len = self.positions.val().dims()[0];
        let t = histories.iter().map(|s| s.len().min(max_len)).max().unwrap_or(0).max(1);
        let (b, heads) = (histories.len(), self.heads);
        // Left padding: the most recent item always sits at the last position.
        let mut ids = vec![0i64; b * t];
        let mut bias = vec![MASKED; b * t];
        for (r, s) in histories.iter().enumerate() {
            let s = &s[s.len().saturating_sub(t)..];
            for (j, &item) in s.iter().enumerate() {
                let at = r * t + t - s.len() + j;
                ids[at] = i64::from(item) + 1;
                bias[at] = 0.0;
            }
        }
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
        let bias = Tensor::<4>::from_data(TensorData::new(bias, [b, 1, 1, t]), &device)
            .expand([b, heads, t, t]);
        let pos = self.positions.val().slice([max_len - t..max_len, 0..h]).unsqueeze::<3>();
        let mut x = embedding(self.items.val(), ids) + pos;
        let mut dropped = |x: Tensor<3>| match drop.as_mut() {
            Some((d, p)) => d.dropout(x, *p),
            None => x,
        };
        x = dropped(x);
        let hd = h / heads;
        for block in &self.blocks {
            let y = block.attn_norm.forward(x.clone());
            let split = |w: &Param<Tensor<2>>| {
                linear(y.clone(), w.val(), None).reshape([b, t, heads, hd]).swap_dims(1, 2)
            };
            let (q, k, v) = (split(&block.wq), split(&block.wk), split(&block.wv));
            let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: t > 1 };
            let a = attention(q, k, v, None, Some(bias.clone()), options);
            let a = linear(a.swap_dims(1, 2).reshape([b, t, h]), block.wo.val(), None);
            x = x + dropped(a);
            let y = block.ffn_norm.forward(x.clone());
            let y = relu(linear(y, block.w1.val(), Some(block.b1.val())));
            x = x + dropped(linear(y, block.w2.val(), Some(block.b2.val())));
        }
        let last = self.norm.forward(x).slice([0..b, t - 1..t, 0..h]).reshape([b, h]);
        let items = self.items.val().slice([1..rows, 0..h]);
        last.matmul(items.transpose())
    }
}

/// SASRec trained on a corpus, ready to score histories.
#[derive(Debug)]
pub struct TrainedSasrec {
    model: Sasrec,
    n_items: usize,
}

/// Trains SASRec on the training rec examples of `corpus` on `device` (a plain device: the
/// autodiff wrapper is added here), reporting its progress to `progress` (phase `sasrec`).
///
/// # Errors
/// No training rec examples; a non-finite loss.
pub fn train(
    corpus: &Corpus,
    config: &SasrecConfig,
    device: &Device,
    progress: &Reporter,
) -> Result<TrainedSasrec> {
    let samples: Vec<&Sample> = corpus.get(Split::Train, Task::Rec).iter().collect();
    if samples.is_empty() {
        return Err(TrainError::Training("SASRec: no training rec examples".into()));
    }
    let sizes = [config.max_len, config.hidden, config.heads, config.batch_size];
    if sizes.contains(&0) || !config.hidden.is_multiple_of(config.heads) {
        return Err(TrainError::Config(format!("SASRec: invalid configuration {config:?}")));
    }
    let n_items = corpus.n_items();
    let mut draws = Draws { rng: SplitMix64::new(config.seed), device: device.clone().autodiff() };
    let mut model = Sasrec::init(n_items, config, &mut draws);
    let mut optim = AdamConfig::new().init();
    let mut order: Vec<usize> = (0..samples.len()).collect();
    let steps = samples.len().div_ceil(config.batch_size) * config.epochs;
    let progress = progress.phase("sasrec", steps as u64);
    let mut done = 0;
    for _ in 0..config.epochs {
        draws.rng.shuffle(&mut order);
        let mut loss_sum = 0.0;
        for chunk in order.chunks(config.batch_size) {
            let histories: Vec<&[u32]> =
                chunk.iter().map(|&i| samples[i].history.as_slice()).collect();
            let targets: Vec<u32> = chunk.iter().map(|&i| samples[i].target).collect();
            let scores = model.scores(&histories, Some((&mut draws, config.dropout)));
            let loss = cross_entropy(scores, &targets);
            let value = read_f32(loss.clone(), "sasrec loss")?[0];
            if !value.is_finite() {
                return Err(TrainError::Training(format!("SASRec: loss {value} at step {done}")));
            }
            loss_sum += f64::from(value);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(config.lr, model, grads);
            done += 1;
            progress.update(done as u64, "");
        }
        let batches = samples.len().div_ceil(config.batch_size) as f64;
        progress.update(done as u64, &format!("loss {:.4}", loss_sum / batches));
    }
    progress.finish(Some(format!("{steps} steps")));
    Ok(TrainedSasrec { model: model.valid(), n_items })
}

impl TrainedSasrec {
    /// The learnt item embeddings, one row per catalogue item (the padding row left out).
    ///
    /// # Errors
    /// A tensor read failure.
    pub fn item_embeddings(&self) -> Result<Vec<Vec<f32>>> {
        let w = self.model.items.val();
        let [rows, h] = w.dims();
        let values = read_f32(w.slice([1..rows, 0..h]), "sasrec item embeddings")?;
        Ok(values.chunks(h).map(<[f32]>::to_vec).collect())
    }

    /// Scores of every item after each sample's history, `samples.len() x n_items`, row-major.
    ///
    /// # Errors
    /// A tensor read failure.
    pub fn score(&self, samples: &[&Sample]) -> Result<Vec<f32>> {
        if samples.is_empty() {
            return Ok(Vec::new());
        }
        let histories: Vec<&[u32]> = samples.iter().map(|s| s.history.as_slice()).collect();
        let out = read_f32(self.model.scores(&histories, None), "sasrec scores")?;
        debug_assert_eq!(out.len(), samples.len() * self.n_items);
        Ok(out)
    }
}
