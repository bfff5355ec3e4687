//! The Llama-family decoder (Llama 2/3, SmolLM2, Qwen2) as Hugging Face defines it.
//!
//! RMSNorm, grouped-query attention with rotate-half RoPE, SwiGLU MLP, tied or untied output
//! head; Qwen2 adds q/k/v biases. Module fields carry the Hugging Face checkpoint names
//! (`embed_tokens`, `layers.N.self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, `norm`,
//! `lm_head`), so module paths read like checkpoint keys without the `model.` prefix.
//!
//! Padding: every forward takes a [`TokenBatch`] with an attention mask. Padded key positions get
//! a large finite negative attention bias (finite so a row that is all padding stays finite),
//! and RoPE positions count only the real tokens before each token, so a sequence's outputs do
//! not depend on the other rows of the batch nor on left or right padding.
//!
//! Linear weights are stored in Burn's `[d_in, d_out]` layout (the transpose of PyTorch's);
//! loading and saving transpose at the boundary.

use burn::module::{Module, Param};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use gems_rng::SplitMix64;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::kernels::{self, RopeTables};
use crate::weights::{HostTensor, WeightMap};

/// Attention bias given to padded key positions (finite: see the module docs).
const MASKED: f32 = -1.0e9;

/// A linear layer `y = x W + b`, optionally with a LoRA adapter `+ scale * (x A) B`.
#[derive(Module, Debug)]
pub struct Linear {
    /// Weight, `[d_in, d_out]` (PyTorch `weight` transposed).
    pub weight: Param<Tensor<2>>,
    /// Optional bias, `[d_out]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// Optional low-rank adapter.
    pub lora: Option<LoraAdapter>,
}

/// A LoRA adapter: `delta(x) = scale * (x A) B` with `A: [d_in, r]`, `B: [r, d_out]`.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// Down projection, `[d_in, r]` (PEFT `lora_A.weight` transposed).
    pub lora_a: Param<Tensor<2>>,
    /// Up projection, `[r, d_out]` (PEFT `lora_B.weight` transposed).
    pub lora_b: Param<Tensor<2>>,
    /// `alpha / r`.
    #[module(skip)]
    pub scale: f64,
}

impl Linear {
    /// Applies the layer to `[..., d_in]`, giving `[..., d_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let y = match &self.lora {
            Some(l) => {
                let down = burn::tensor::module::linear(x.clone(), l.lora_a.val(), None);
                let up = burn::tensor::module::linear(down, l.lora_b.val(), None);
                burn::tensor::module::linear(x, self.weight.val(), None) + up.mul_scalar(l.scale)
            }
            None => burn::tensor::module::linear(x, self.weight.val(), None),
        };
        match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        }
    }

    fn from_host(w: HostTensor, b: Option<HostTensor>, device: &Device) -> Self {
        let wt = w.transposed();
        Self {
            weight: Param::from_tensor(tensor2(wt, device)),
            bias: b.map(|b| Param::from_tensor(tensor1(b, device))),
            lora: None,
        }
    }
}

/// Token embedding table `[vocab, d_model]`.
#[derive(Module, Debug)]
pub struct Embedding {
    /// The table, `[vocab, d_model]` (same layout as PyTorch).
    pub weight: Param<Tensor<2>>,
}

/// Root-mean-square normalisation `x / sqrt(mean(x^2) + eps) * weight`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// Scale, `[d_model]`.
    pub weight: Param<Tensor<1>>,
    /// Epsilon.
    #[module(skip)]
    pub eps: f64,
}

impl RmsNorm {
    /// Normalises the last axis of `[b, t, d]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let ms = (x.clone() * x.clone()).mean_dim(2);
        let inv = ms.add_scalar(self.eps).sqrt().recip();
        x * inv * self.weight.val().unsqueeze()
    }
}

/// Grouped-query self-attention with rotate-half RoPE.
#[derive(Module, Debug)]
pub struct Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    /// Number of query heads.
    #[module(skip)]
    pub n_heads: usize,
    /// Number of key/value heads.
    #[module(skip)]
    pub n_kv_heads: usize,
    /// Per-head width.
    #[module(skip)]
    pub head_dim: usize,
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    /// Gate projection.
    pub gate_proj: Linear,
    /// Up projection.
    pub up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// Attention block.
    pub self_attn: Attention,
    /// MLP block.
    pub mlp: Mlp,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm,
}

/// The decoder with its output head.
#[derive(Module, Debug)]
pub struct Llama {
    /// Token embeddings (`model.embed_tokens`).
    pub embed_tokens: Embedding,
    /// Decoder layers (`model.layers`).
    pub layers: Vec<DecoderLayer>,
    /// Final norm (`model.norm`).
    pub norm: RmsNorm,
    /// Output head (`lm_head`); `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear>,
    /// The configuration the model was built from.
    #[module(skip)]
    pub config: LlamaConfig,
    /// How many of the lowest layers are frozen ([`Llama::freeze_lower_layers`]); 0 when all
    /// layers may train.
    #[module(skip)]
    pub frozen_layers: usize,
    /// RoPE cosines and sines per position, computed once and shared by clones.
    #[module(skip)]
    rope: RopeCache,
}

/// Host table of RoPE cosines and sines, one row of `head_dim` values per position, grown on
/// demand and shared by clones of a model: a forward pass copies the rows of its positions
/// instead of evaluating `head_dim` cosines and sines per token.
///
/// Row `p` holds `cos(p * inv_freq[j % (head_dim / 2)])` and the sine, evaluated in f64 and
/// rounded to f32, exactly as computing them per forward would. The table remembers the
/// inverse frequencies it was built from and starts over if the configuration's differ.
#[derive(Clone, Default)]
struct RopeCache(std::sync::Arc<std::sync::Mutex<RopeTable>>);

impl std::fmt::Debug for RopeCache {
    /// The number of positions computed, not the values.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows = self.0.lock().map_or(0, |t| t.rows);
        f.debug_struct("RopeCache").field("rows", &rows).finish()
    }
}

#[derive(Default)]
struct RopeTable {
    /// Inverse frequencies the rows were computed from.
    inv: Vec<f64>,
    /// Row width.
    head_dim: usize,
    /// Number of positions computed.
    rows: usize,
    /// `rows * head_dim` cosines.
    cos: Vec<f32>,
    /// `rows * head_dim` sines.
    sin: Vec<f32>,
}

impl RopeTable {
    /// Computes rows up to (not including) position `rows`.
    fn grow(&mut self, rows: usize) {
        let (hd, half) = (self.head_dim, self.head_dim / 2);
        self.cos.reserve((rows - self.rows) * hd);
        self.sin.reserve((rows - self.rows) * hd);
        for p in self.rows..rows {
            for j in 0..hd {
                let a = p as f64 * self.inv[j % half];
                self.cos.push(a.cos() as f32);
                self.sin.push(a.sin() as f32);
            }
        }
        self.rows = rows;
    }
}

impl RopeCache {
    /// The cosine and sine rows of `positions`, concatenated, for inverse frequencies `inv`
    /// and rows of `head_dim` values.
    fn gather(&self, inv: Vec<f64>, head_dim: usize, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        // A panic elsewhere while the lock was held leaves at worst a table whose `rows` lags
        // its vectors: `rows` is written last, so the table stays usable.
        let mut t = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if t.inv != inv || t.head_dim != head_dim {
            *t = RopeTable { inv, head_dim, ..RopeTable::default() };
        }
        let needed = positions.iter().max().map_or(0, |&p| p + 1);
        if needed > t.rows {
            let (cos, sin, rows) = (t.cos.len(), t.sin.len(), t.rows * head_dim);
            if cos != rows || sin != rows {
                t.cos.truncate(rows);
                t.sin.truncate(rows);
            }
            t.grow(needed.next_power_of_two().max(64));
        }
        let mut cos = Vec::with_capacity(positions.len() * head_dim);
        let mut sin = Vec::with_capacity(positions.len() * head_dim);
        for &p in positions {
            cos.extend_from_slice(&t.cos[p * head_dim..(p + 1) * head_dim]);
            sin.extend_from_slice(&t.sin[p * head_dim..(p + 1) * head_dim]);
        }
        (cos, sin)
    }
}

/// Token ids of a batch with its attention mask, row-major `[batch_size, seq_len]`.
///
/// `mask[i]` is true for a real token and false for padding. Padding may be on either side.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    /// Token ids, `batch_size * seq_len`.
    pub ids: Vec<u32>,
    /// Attention mask, same length as `ids`.
    pub mask: Vec<bool>,
    /// Number of rows.
    pub batch_size: usize,
    /// Length of every row (after padding).
    pub seq_len: usize,
}

impl TokenBatch {
    /// A batch from flat ids and mask, checked for size.
    pub fn new(ids: Vec<u32>, mask: Vec<bool>, batch_size: usize, seq_len: usize) -> Result<Self> {
        if ids.len() != batch_size * seq_len || mask.len() != ids.len() || ids.is_empty() {
            return Err(ModelError::input(
                "TokenBatch::new",
                format!(
                    "{} ids and {} mask values for batch {batch_size} x {seq_len} (must be equal and non-empty)",
                    ids.len(),
                    mask.len()
                ),
            ));
        }
        Ok(Self { ids, mask, batch_size, seq_len })
    }

    /// Pads sequences to the longest with `pad_id`, on the right (or the left if `left`).
    pub fn pad(seqs: &[Vec<u32>], pad_id: u32, left: bool) -> Result<Self> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * t);
        let mut mask = Vec::with_capacity(seqs.len() * t);
        for s in seqs {
            let pad = t - s.len();
            if left {
                ids.extend(std::iter::repeat_n(pad_id, pad));
                mask.extend(std::iter::repeat_n(false, pad));
            }
            ids.extend_from_slice(s);
            mask.extend(std::iter::repeat_n(true, s.len()));
            if !left {
                ids.extend(std::iter::repeat_n(pad_id, pad));
                mask.extend(std::iter::repeat_n(false, pad));
            }
        }
        Self::new(ids, mask, seqs.len(), t)
    }

    /// RoPE position of every token: the number of real tokens before it in its row.
    pub fn positions(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.ids.len());
        for r in 0..self.batch_size {
            let mut n = 0;
            for i in 0..self.seq_len {
                out.push(n);
                if self.mask[r * self.seq_len + i] {
                    n += 1;
                }
            }
        }
        out
    }

    /// Index of the last real token of each row.
    pub fn last_positions(&self) -> Vec<usize> {
        (0..self.batch_size)
            .map(|r| {
                (0..self.seq_len).rev().find(|&i| self.mask[r * self.seq_len + i]).unwrap_or(0)
            })
            .collect()
    }
}

/// Key/value cache of one layer: `[1, n_kv_heads, t, head_dim]` each.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    k: Option<Tensor<4>>,
    v: Option<Tensor<4>>,
}

/// Key/value cache of all layers, for incremental decoding of one sequence.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// Number of positions already cached.
    pub len: usize,
}

pub(crate) fn tensor1(t: HostTensor, device: &Device) -> Tensor<1> {
    let n = t.data.len();
    Tensor::from_data(TensorData::new(t.data, [n]), device)
}

pub(crate) fn tensor2(t: HostTensor, device: &Device) -> Tensor<2> {
    let (r, c) = (t.shape[0], t.shape[1]);
    Tensor::from_data(TensorData::new(t.data, [r, c]), device)
}

pub(crate) fn to_host<const D: usize>(t: Tensor<D>, op: &'static str) -> Result<HostTensor> {
    let shape = t.dims().to_vec();
    let data = t
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| ModelError::read(op, e))?;
    Ok(HostTensor { shape, data })
}

/// Receives `(projection, input, output)` of every projection of one layer during a traced
/// forward; `projection` is the path relative to the layer, e.g. `self_attn.q_proj`.
pub type LayerTrace<'a> = &'a mut dyn FnMut(&'static str, &Tensor<3>, &Tensor<3>);

/// `linear(x)`, reporting input and output to the trace when there is one.
fn traced(
    linear: &Linear,
    name: &'static str,
    x: Tensor<3>,
    trace: &mut Option<LayerTrace<'_>>,
) -> Tensor<3> {
    match trace {
        None => linear.forward(x),
        Some(t) => {
            let y = linear.forward(x.clone());
            t(name, &x, &y);
            y
        }
    }
}

impl Attention {
    fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        bias: Option<Tensor<4>>,
        cache: Option<&mut LayerCache>,
        trace: &mut Option<LayerTrace<'_>>,
        graph_free: bool,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let (h, kv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let [q_path, k_path, v_path, o_path, ..] = PROJECTION_PATHS;
        let q = kernels::rope(traced(&self.q_proj, q_path, x.clone(), trace), h, rope, graph_free);
        let k = traced(&self.k_proj, k_path, x.clone(), trace);
        let mut k = kernels::rope(k, kv, rope, graph_free);
        let v = traced(&self.v_proj, v_path, x, trace);
        let mut v = v.reshape([b, t, kv, hd]).swap_dims(1, 2);
        if let Some(c) = cache {
            if let (Some(ck), Some(cv)) = (c.k.take(), c.v.take()) {
                k = Tensor::cat(vec![ck, k], 2);
                v = Tensor::cat(vec![cv, v], 2);
            }
            c.k = Some(k.clone());
            c.v = Some(v.clone());
        }
        let tk = k.dims()[2];
        let (k, v) = if h != kv {
            let rep = h / kv;
            (
                k.unsqueeze_dim::<5>(2).expand([b, kv, rep, tk, hd]).reshape([b, h, tk, hd]),
                v.unsqueeze_dim::<5>(2).expand([b, kv, rep, tk, hd]).reshape([b, h, tk, hd]),
            )
        } else {
            (k, v)
        };
        let out = kernels::attention(q, k, v, bias, t > 1, graph_free);
        traced(&self.o_proj, o_path, out.swap_dims(1, 2).reshape([b, t, h * hd]), trace)
    }
}

impl Mlp {
    /// `graph_free`: no gradient is wanted (a frozen layer), so the activation may run as a
    /// fused host kernel ([`crate::kernels::swiglu`], same values).
    fn forward(
        &self,
        x: Tensor<3>,
        trace: &mut Option<LayerTrace<'_>>,
        graph_free: bool,
    ) -> Tensor<3> {
        let [.., gate_path, up_path, down_path] = PROJECTION_PATHS;
        let g = traced(&self.gate_proj, gate_path, x.clone(), trace);
        let u = traced(&self.up_proj, up_path, x, trace);
        traced(&self.down_proj, down_path, kernels::swiglu(g, u, graph_free), trace)
    }
}

/// Hugging Face key of the token embedding.
pub const EMBED_TOKENS_KEY: &str = "model.embed_tokens.weight";
/// Hugging Face key of the final norm.
pub const FINAL_NORM_KEY: &str = "model.norm.weight";
/// Hugging Face key of the untied output head.
pub const LM_HEAD_KEY: &str = "lm_head.weight";
/// Paths of a decoder layer's seven projections relative to the layer, in the fixed order of
/// [`DecoderLayer::projections`] (attention q, k, v, o, then MLP gate, up, down).
pub const PROJECTION_PATHS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];
/// Paths of a decoder layer's two norms relative to the layer (before attention, before MLP).
pub const LAYER_NORM_PATHS: [&str; 2] = ["input_layernorm", "post_attention_layernorm"];

/// Hugging Face key prefix of decoder layer `i`, `model.layers.{i}`.
pub fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

/// One projection of a decoder layer as the checkpoint stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectionSpec {
    /// Path relative to the layer, e.g. `self_attn.q_proj` (one of [`PROJECTION_PATHS`]).
    pub path: &'static str,
    /// PyTorch shape of `weight`, `[out, in]`.
    pub shape: [usize; 2],
    /// Whether the checkpoint has a `bias` of shape `[out]`.
    pub bias: bool,
}

/// The checkpoint schema of one decoder layer: its seven projections in [`PROJECTION_PATHS`]
/// order with their PyTorch shapes and biases (Qwen2 q/k/v bias, Llama `attention_bias`,
/// `mlp_bias`). With [`LAYER_NORM_PATHS`] (each `[hidden_size]`) this is every tensor of a
/// layer; [`layer_tensors`] lists them with full keys.
pub fn layer_projections(config: &LlamaConfig) -> [ProjectionSpec; 7] {
    let d = config.hidden_size;
    let (h, kv, hd, ff) = (
        config.num_attention_heads,
        config.n_kv_heads(),
        config.head_dim(),
        config.intermediate_size,
    );
    let (qkv, o, mlp) = (config.qkv_bias(), config.o_bias(), config.mlp_bias());
    let shapes = [
        ([h * hd, d], qkv),
        ([kv * hd, d], qkv),
        ([kv * hd, d], qkv),
        ([d, h * hd], o),
        ([ff, d], mlp),
        ([ff, d], mlp),
        ([d, ff], mlp),
    ];
    let mut i = 0;
    shapes.map(|(shape, bias)| {
        let path = PROJECTION_PATHS[i];
        i += 1;
        ProjectionSpec { path, shape, bias }
    })
}

/// Every tensor of decoder layer `i` as `(Hugging Face key, PyTorch shape)`, in checkpoint
/// order: each projection's `weight` then its `bias` if any, then the two norms.
pub fn layer_tensors(config: &LlamaConfig, i: usize) -> Vec<(String, Vec<usize>)> {
    let p = layer_prefix(i);
    let mut out = Vec::with_capacity(16);
    for spec in layer_projections(config) {
        out.push((format!("{p}.{}.weight", spec.path), spec.shape.to_vec()));
        if spec.bias {
            out.push((format!("{p}.{}.bias", spec.path), vec![spec.shape[0]]));
        }
    }
    for norm in LAYER_NORM_PATHS {
        out.push((format!("{p}.{norm}.weight"), vec![config.hidden_size]));
    }
    out
}

impl DecoderLayer {
    /// The seven projections with their checkpoint paths relative to the layer, in a fixed
    /// order (attention q, k, v, o, then MLP gate, up, down).
    pub fn projections(&self) -> [(&'static str, &Linear); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        let [q, k, v, o, gate, up, down] = PROJECTION_PATHS;
        [
            (q, &a.q_proj),
            (k, &a.k_proj),
            (v, &a.v_proj),
            (o, &a.o_proj),
            (gate, &m.gate_proj),
            (up, &m.up_proj),
            (down, &m.down_proj),
        ]
    }

    /// [`projections`](Self::projections), mutable.
    pub fn projections_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        let [q, k, v, o, gate, up, down] = PROJECTION_PATHS;
        [
            (q, &mut a.q_proj),
            (k, &mut a.k_proj),
            (v, &mut a.v_proj),
            (o, &mut a.o_proj),
            (gate, &mut m.gate_proj),
            (up, &mut m.up_proj),
            (down, &mut m.down_proj),
        ]
    }

    fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        bias: Option<Tensor<4>>,
        cache: Option<&mut LayerCache>,
        mut trace: Option<LayerTrace<'_>>,
        graph_free: bool,
    ) -> Tensor<3> {
        let a = self.self_attn.forward(
            self.input_layernorm.forward(x.clone()),
            rope,
            bias,
            cache,
            &mut trace,
            graph_free,
        );
        let h = x + a;
        h.clone()
            + self.mlp.forward(self.post_attention_layernorm.forward(h), &mut trace, graph_free)
    }
}

impl Llama {
    /// Builds the decoder from host weights with Hugging Face keys (with or without `model.`).
    ///
    /// Every tensor the configuration requires must be present with the PyTorch shape; a
    /// missing or mis-shaped tensor is an error naming the source and the key. `lm_head.weight`
    /// is read only when `tie_word_embeddings` is false.
    pub fn from_weights(config: &LlamaConfig, w: &mut WeightMap, device: &Device) -> Result<Self> {
        config.validate(&w.source)?;
        let d = config.hidden_size;
        // `take` finds a key with or without `model.`; asking without it keeps the error's key
        // as short as the checkpoint's own.
        let rel = |key: &str| key.strip_prefix("model.").unwrap_or(key).to_string();
        let embed = w.take(&rel(EMBED_TOKENS_KEY), &[config.vocab_size, d])?;
        let norm_of = |w: &mut WeightMap, key: String| -> Result<RmsNorm> {
            let t = w.take(&key, &[d])?;
            Ok(RmsNorm { weight: Param::from_tensor(tensor1(t, device)), eps: config.rms_norm_eps })
        };
        let lin = |w: &mut WeightMap, key: &str, shape: [usize; 2], bias: bool| -> Result<Linear> {
            let wt = w.take(&format!("{key}.weight"), &shape)?;
            let b = if bias { Some(w.take(&format!("{key}.bias"), &shape[..1])?) } else { None };
            Ok(Linear::from_host(wt, b, device))
        };
        let specs = layer_projections(config);
        let (h, kv, hd) = (config.num_attention_heads, config.n_kv_heads(), config.head_dim());
        // No capacity from the file: a hostile layer count must fail on a missing tensor, not allocate.
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let p = rel(&layer_prefix(i));
            // All seven are taken before the first error is reported: the same error as
            // stopping at it, since they are checked in order.
            let [q, k, v, o, gate, up, down] =
                specs.map(|spec| lin(w, &format!("{p}.{}", spec.path), spec.shape, spec.bias));
            let (q_proj, k_proj, v_proj, o_proj) = (q?, k?, v?, o?);
            let (gate_proj, up_proj, down_proj) = (gate?, up?, down?);
            let [input_norm, post_attention_norm] = LAYER_NORM_PATHS;
            layers.push(DecoderLayer {
                self_attn: Attention {
                    q_proj,
                    k_proj,
                    v_proj,
                    o_proj,
                    n_heads: h,
                    n_kv_heads: kv,
                    head_dim: hd,
                },
                mlp: Mlp { gate_proj, up_proj, down_proj },
                input_layernorm: norm_of(w, format!("{p}.{input_norm}.weight"))?,
                post_attention_layernorm: norm_of(w, format!("{p}.{post_attention_norm}.weight"))?,
            });
        }
        // Weights for a layer past the declared count mean the configuration does not describe
        // this checkpoint (loading only the first layers silently would be a different model).
        let next = format!("{}.", rel(&layer_prefix(config.num_hidden_layers)));
        if let Some(k) =
            w.tensors.keys().find(|k| k.starts_with(&next) || k.contains(&format!(".{next}")))
        {
            return Err(ModelError::config(
                &w.source,
                format!(
                    "num_hidden_layers = {} but the weights hold `{k}`: the configuration does not \
                     describe these weights",
                    config.num_hidden_layers
                ),
            ));
        }
        let norm = norm_of(w, rel(FINAL_NORM_KEY))?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            let wt = w.take(LM_HEAD_KEY, &[config.vocab_size, d])?;
            Some(Linear::from_host(wt, None, device))
        };
        Ok(Self {
            embed_tokens: Embedding { weight: Param::from_tensor(tensor2(embed, device)) },
            layers,
            norm,
            lm_head,
            config: config.clone(),
            frozen_layers: 0,
            rope: RopeCache::default(),
        })
    }

    /// A randomly initialised decoder (normal(0, 0.02) matrices, unit norms), seeded.
    pub fn init_random(config: &LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut w = random_weights(config, seed);
        Self::from_weights(config, &mut w, device)
    }

    /// Reads all weights back to the host with Hugging Face keys and PyTorch layout.
    ///
    /// LoRA adapters are not included (merge them first, or save them with the PEFT writer).
    pub fn to_weights(&self) -> Result<WeightMap> {
        let mut w = WeightMap::new("<memory>");
        let op = "Llama::to_weights";
        let mut put = |k: String, t: HostTensor| {
            w.tensors.insert(k, t);
        };
        put(EMBED_TOKENS_KEY.into(), to_host(self.embed_tokens.weight.val(), op)?);
        let lin = |l: &Linear| -> Result<(HostTensor, Option<HostTensor>)> {
            let wt = to_host(l.weight.val(), op)?.transposed();
            let b = match &l.bias {
                Some(b) => Some(to_host(b.val(), op)?),
                None => None,
            };
            Ok((wt, b))
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let p = layer_prefix(i);
            for (name, l) in layer.projections() {
                let (wt, b) = lin(l)?;
                put(format!("{p}.{name}.weight"), wt);
                if let Some(b) = b {
                    put(format!("{p}.{name}.bias"), b);
                }
            }
            let norms = [&layer.input_layernorm, &layer.post_attention_layernorm];
            for (name, norm) in LAYER_NORM_PATHS.into_iter().zip(norms) {
                put(format!("{p}.{name}.weight"), to_host(norm.weight.val(), op)?);
            }
        }
        put(FINAL_NORM_KEY.into(), to_host(self.norm.weight.val(), op)?);
        if let Some(head) = &self.lm_head {
            put(LM_HEAD_KEY.into(), lin(head)?.0);
        }
        Ok(w)
    }

    /// Unties a tied output head: the head becomes a copy of the token embedding (`lm_head`,
    /// stored `[d_model, vocab]`) and `config.tie_word_embeddings` turns false, so that the
    /// input rows and the output rows can then differ (and a saved model keeps both). Logits
    /// are unchanged. A model with an untied head is returned as it is.
    pub fn untie_head(mut self) -> Self {
        if self.lm_head.is_none() {
            // A leaf of its own (a fresh parameter), not a view of the embedding's.
            let weight = self.embed_tokens.weight.val().transpose().detach();
            self.lm_head =
                Some(Linear { weight: Param::from_tensor(weight), bias: None, lora: None });
            self.config.tie_word_embeddings = false;
        }
        self
    }

    /// Freezes the lowest `k` decoder layers: their parameters stop requiring gradients, and
    /// every forward pass runs the embedding lookup and those layers outside the autodiff graph
    /// (the embedding's output is detached), so training records a graph, and keeps
    /// activations, for the upper layers only. The token embedding then receives gradients only
    /// through a tied output head, never through the input side. `k = 0` changes nothing.
    ///
    /// # Errors
    /// `k` is more than the model's layers.
    pub fn freeze_lower_layers(mut self, k: usize) -> Result<Self> {
        let n = self.layers.len();
        if k > n {
            return Err(ModelError::input(
                "Llama::freeze_lower_layers",
                format!("cannot freeze {k} layers of a model with {n}"),
            ));
        }
        self.layers = self
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, layer)| if i < k { layer.no_grad() } else { layer })
            .collect();
        self.frozen_layers = k;
        Ok(self)
    }

    /// The device holding the weights.
    pub fn device(&self) -> Device {
        self.embed_tokens.weight.val().device()
    }

    /// Number of parameters (a tied head counted once).
    pub fn num_params(&self) -> usize {
        self.num_params_module()
    }

    fn num_params_module(&self) -> usize {
        Module::num_params(self)
    }

    fn check_batch(&self, batch: &TokenBatch, op: &'static str) -> Result<()> {
        if batch.ids.len() != batch.batch_size * batch.seq_len
            || batch.mask.len() != batch.ids.len()
            || batch.ids.is_empty()
        {
            return Err(ModelError::input(op, "batch ids/mask do not match batch_size x seq_len"));
        }
        let v = self.config.vocab_size;
        if let Some(&bad) = batch.ids.iter().find(|&&id| id as usize >= v) {
            return Err(ModelError::input(op, format!("token id {bad} >= vocab_size {v}")));
        }
        Ok(())
    }

    /// RoPE cosines and sines of `positions` (`b * t` of them), `[b, 1, t, head_dim]` each,
    /// gathered from the model's table (computed once per position, see [`RopeCache`]).
    fn rope_tables(&self, positions: &[usize], b: usize, t: usize) -> RopeTables {
        let hd = self.config.head_dim();
        let (cos, sin) = self.rope.gather(self.config.inv_freq(), hd, positions);
        RopeTables::new(cos, sin, [b, t, hd], &self.device())
    }

    /// Additive attention bias that hides padded keys, `[b, 1, 1, t]`; `None` without padding.
    fn padding_bias(&self, batch: &TokenBatch) -> Option<Tensor<4>> {
        if batch.mask.iter().all(|&m| m) {
            return None;
        }
        let vals: Vec<f32> = batch.mask.iter().map(|&m| if m { 0.0 } else { MASKED }).collect();
        let shape = [batch.batch_size, 1, 1, batch.seq_len];
        Some(Tensor::<4>::from_data(TensorData::new(vals, shape), &self.device()))
    }

    fn embed(&self, ids: &[u32], b: usize, t: usize) -> Tensor<3> {
        let device = self.device();
        let ids: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), &device);
        burn::tensor::module::embedding(self.embed_tokens.weight.val(), ids)
    }

    /// Final hidden states (after the last norm), `[batch, seq_len, d_model]`.
    ///
    /// Rows are independent: padded positions are never attended to, and positions count only
    /// real tokens. Outputs at padded positions are finite but meaningless.
    pub fn hidden_states(&self, batch: &TokenBatch) -> Result<Tensor<3>> {
        self.check_batch(batch, "Llama::hidden_states")?;
        let context = self.attention_context(batch);
        let frozen = self.run_frozen(batch, &context);
        Ok(self.run_trainable(frozen, &context))
    }

    /// The hidden states entering the first trainable layer, `[batch, seq_len, d_model]`: the
    /// embedding and the frozen layers ([`Llama::freeze_lower_layers`]), outside any autodiff
    /// graph (the embedding alone when no layer is frozen). With the embedding fixed too, they
    /// depend on the tokens alone, so a caller may keep and reuse them
    /// ([`Llama::hidden_states_from`]).
    ///
    /// # Errors
    /// A malformed batch.
    pub fn frozen_states(&self, batch: &TokenBatch) -> Result<Tensor<3>> {
        self.check_batch(batch, "Llama::frozen_states")?;
        Ok(self.run_frozen(batch, &self.attention_context(batch)))
    }

    /// Final hidden states (as [`Llama::hidden_states`]) from `frozen`, the states entering the
    /// first trainable layer as [`Llama::frozen_states`] gives them for `batch`: the trainable
    /// layers and the last norm. `hidden_states` is exactly this after `frozen_states`.
    ///
    /// # Errors
    /// A malformed batch, or `frozen` not `[batch, seq_len, d_model]`.
    pub fn hidden_states_from(&self, batch: &TokenBatch, frozen: Tensor<3>) -> Result<Tensor<3>> {
        self.check_batch(batch, "Llama::hidden_states_from")?;
        let (b, t) = (batch.batch_size, batch.seq_len);
        if frozen.dims() != [b, t, self.config.hidden_size] {
            return Err(ModelError::input(
                "Llama::hidden_states_from",
                format!(
                    "frozen states of shape {:?} for a batch of {b} x {t} (hidden size {})",
                    frozen.dims(),
                    self.config.hidden_size
                ),
            ));
        }
        Ok(self.run_trainable(frozen, &self.attention_context(batch)))
    }

    /// What every layer's attention reads for `batch`: the RoPE tables of its positions and the
    /// padding bias, computed once per forward pass.
    fn attention_context(&self, batch: &TokenBatch) -> (RopeTables, Option<Tensor<4>>) {
        let (b, t) = (batch.batch_size, batch.seq_len);
        (self.rope_tables(&batch.positions(), b, t), self.padding_bias(batch))
    }

    /// The embedding of `batch` through the frozen layers, without a graph.
    fn run_frozen(
        &self,
        batch: &TokenBatch,
        context: &(RopeTables, Option<Tensor<4>>),
    ) -> Tensor<3> {
        let mut x = self.embed(&batch.ids, batch.batch_size, batch.seq_len);
        if self.frozen_layers == 0 {
            return x;
        }
        // Nothing below the first trainable layer needs a graph (see freeze_lower_layers).
        x = x.detach();
        let (rope, bias) = context;
        for layer in &self.layers[..self.frozen_layers] {
            x = layer.forward(x, rope, bias.clone(), None, None, true);
        }
        x
    }

    /// `x` through the trainable layers and the last norm.
    fn run_trainable(
        &self,
        mut x: Tensor<3>,
        context: &(RopeTables, Option<Tensor<4>>),
    ) -> Tensor<3> {
        let (rope, bias) = context;
        for layer in &self.layers[self.frozen_layers..] {
            x = layer.forward(x, rope, bias.clone(), None, None, false);
        }
        self.norm.forward(x)
    }

    /// Runs the decoder over `batch` (no head) and reports every projection's input and output
    /// to `hook(layer_index, projection, input, output)`, in forward order. Inputs and outputs
    /// are `[batch, seq_len, features]` and include padded positions: use `batch.mask` to drop
    /// them. Used to collect activation statistics (null-space projectors).
    pub fn trace_projections(
        &self,
        batch: &TokenBatch,
        hook: &mut dyn FnMut(usize, &'static str, &Tensor<3>, &Tensor<3>),
    ) -> Result<()> {
        self.check_batch(batch, "Llama::trace_projections")?;
        let (b, t) = (batch.batch_size, batch.seq_len);
        let rope = self.rope_tables(&batch.positions(), b, t);
        let bias = self.padding_bias(batch);
        let mut x = self.embed(&batch.ids, b, t);
        for (i, layer) in self.layers.iter().enumerate() {
            let mut per_layer = |name: &'static str, input: &Tensor<3>, output: &Tensor<3>| {
                hook(i, name, input, output)
            };
            x = layer.forward(x, &rope, bias.clone(), None, Some(&mut per_layer), false);
        }
        Ok(())
    }

    /// Applies the output head to hidden states `[..., d_model]`, giving `[..., vocab]`.
    pub fn head<const D: usize>(&self, hidden: Tensor<D>) -> Tensor<D> {
        match &self.lm_head {
            Some(l) => l.forward(hidden),
            None => burn::tensor::module::linear(
                hidden,
                self.embed_tokens.weight.val().transpose(),
                None,
            ),
        }
    }

    /// Logits of the token block `[first, first + count)` only, for hidden states `[n, d_model]`:
    /// `[n, count]`, the same values as columns `first..first + count` of
    /// [`head`](Self::head)`(hidden)` without computing the rest of the vocabulary (item scores
    /// over the item tokens, text likelihood over the original vocabulary).
    ///
    /// Works for both head layouts: a tied head multiplies by rows of the token embedding
    /// (`[vocab, d_model]`), an untied one by columns of `lm_head` (stored `[d_model, vocab]`)
    /// plus the matching slice of its bias.
    ///
    /// # Panics
    /// If `first + count` exceeds the vocabulary (a caller's bug).
    pub fn head_logits(&self, hidden: Tensor<2>, first: usize, count: usize) -> Tensor<2> {
        match &self.lm_head {
            None => {
                let w = self.embed_tokens.weight.val().narrow(0, first, count);
                hidden.matmul(w.transpose())
            }
            Some(head) => {
                let w = head.weight.val().narrow(1, first, count);
                let out = hidden.matmul(w);
                match &head.bias {
                    Some(b) => out + b.val().narrow(0, first, count).unsqueeze_dim(0),
                    None => out,
                }
            }
        }
    }

    /// Logits at every position, `[batch, seq_len, vocab]`.
    pub fn forward(&self, batch: &TokenBatch) -> Result<Tensor<3>> {
        Ok(self.head(self.hidden_states(batch)?))
    }

    /// Logits only at the chosen `(row, position)` pairs, `[n, vocab]`.
    ///
    /// Hidden states are gathered before the output head, so the head costs `n` rows instead of
    /// `batch * seq_len`; this is what makes a loss on a few target positions cheap.
    pub fn logits_at(&self, batch: &TokenBatch, at: &[(usize, usize)]) -> Result<Tensor<2>> {
        let hidden = self.hidden_states(batch)?;
        let rows = gather_rows(hidden, at, "Llama::logits_at")?;
        Ok(self.head(rows))
    }

    /// Log-probabilities of `candidates` at one position per row, `[batch, candidates]`.
    ///
    /// `positions[r]` is the position in row `r` whose next-token distribution is scored
    /// (usually [`TokenBatch::last_positions`]). The softmax runs over the whole vocabulary.
    pub fn candidate_log_probs(
        &self,
        batch: &TokenBatch,
        positions: &[usize],
        candidates: &[u32],
    ) -> Result<Tensor<2>> {
        let op = "Llama::candidate_log_probs";
        if positions.len() != batch.batch_size {
            return Err(ModelError::input(
                op,
                format!("{} positions for {} rows", positions.len(), batch.batch_size),
            ));
        }
        if let Some(&c) = candidates.iter().find(|&&c| c as usize >= self.config.vocab_size) {
            return Err(ModelError::input(
                op,
                format!("candidate id {c} >= vocab_size {}", self.config.vocab_size),
            ));
        }
        if candidates.is_empty() {
            return Err(ModelError::input(op, "no candidates"));
        }
        let at: Vec<(usize, usize)> = positions.iter().copied().enumerate().collect();
        let logits = self.logits_at(batch, &at)?;
        let lp = log_softmax(logits, 1);
        let idx: Vec<i64> = candidates.iter().map(|&c| c as i64).collect();
        let n = idx.len();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &self.device());
        Ok(lp.select(1, idx))
    }

    /// A fresh key/value cache for [`Llama::forward_cached`].
    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: vec![LayerCache::default(); self.layers.len()], len: 0 }
    }

    /// Runs `ids` (one sequence, no padding) after the cached prefix and returns the logits of
    /// the last position, `[vocab]`. The cache grows by `ids.len()`.
    ///
    /// The first call may pass the whole prompt; later calls pass one token at a time.
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor<1>> {
        let op = "Llama::forward_cached";
        if ids.is_empty() {
            return Err(ModelError::input(op, "no tokens"));
        }
        if ids.len() > 1 && cache.len > 0 {
            return Err(ModelError::input(op, "after the prompt, pass one token per call"));
        }
        if cache.layers.len() != self.layers.len() {
            return Err(ModelError::input(op, "cache belongs to another model"));
        }
        let batch = TokenBatch::new(ids.to_vec(), vec![true; ids.len()], 1, ids.len())?;
        self.check_batch(&batch, op)?;
        let t = ids.len();
        let positions: Vec<usize> = (cache.len..cache.len + t).collect();
        let rope = self.rope_tables(&positions, 1, t);
        let mut x = self.embed(ids, 1, t);
        for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(x, &rope, None, Some(c), None, false);
        }
        cache.len += t;
        let x = self.norm.forward(x.narrow(1, t - 1, 1));
        let d = self.config.hidden_size;
        Ok(self.head(x.reshape([d])))
    }

    /// Greedy decoding with a key/value cache: up to `max_new_tokens` tokens after `prompt`,
    /// stopping after any of `stop` (which is included in the output).
    pub fn generate_greedy(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        stop: &[u32],
    ) -> Result<Vec<u32>> {
        let mut cache = self.new_cache();
        let mut out = Vec::new();
        let mut logits = self.forward_cached(prompt, &mut cache)?;
        for _ in 0..max_new_tokens {
            let next = argmax(logits)?;
            out.push(next);
            if stop.contains(&next) {
                break;
            }
            logits = self.forward_cached(&[next], &mut cache)?;
        }
        Ok(out)
    }
}

fn argmax(logits: Tensor<1>) -> Result<u32> {
    let v = to_host(logits, "argmax")?.data;
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    Ok(best as u32)
}

/// Gathers `hidden[row, pos, :]` for each pair into `[n, d]`, differentiably.
pub fn gather_rows(
    hidden: Tensor<3>,
    at: &[(usize, usize)],
    op: &'static str,
) -> Result<Tensor<2>> {
    let [b, t, d] = hidden.dims();
    if at.is_empty() {
        return Err(ModelError::input(op, "no positions"));
    }
    if let Some(&(r, p)) = at.iter().find(|&&(r, p)| r >= b || p >= t) {
        return Err(ModelError::input(op, format!("position ({r}, {p}) outside batch {b} x {t}")));
    }
    let idx: Vec<i64> = at.iter().map(|&(r, p)| (r * t + p) as i64).collect();
    let n = idx.len();
    let device = hidden.device();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &device);
    Ok(hidden.reshape([b * t, d]).select(0, idx))
}

/// The workspace generator seeded for model initialisation (random weights, new item rows,
/// LoRA `A` matrices). The seed is offset by the SplitMix64 increment, as the crate's former
/// private generator did, so a recorded seed keeps giving the same values.
pub(crate) fn init_rng(seed: u64) -> SplitMix64 {
    SplitMix64::new(seed ^ 0x9E37_79B9_7F4A_7C15)
}

/// Random host weights for `config` with Hugging Face keys (for tests and benchmarks).
pub fn random_weights(config: &LlamaConfig, seed: u64) -> WeightMap {
    let mut rng = init_rng(seed);
    let mut w = WeightMap::new("<random>");
    let d = config.hidden_size;
    let mut put = |k: String, shape: Vec<usize>, std: f64, mean: f64, rng: &mut SplitMix64| {
        let n: usize = shape.iter().product();
        let data = (0..n).map(|_| (mean + std * rng.normal()) as f32).collect();
        w.tensors.insert(k, HostTensor { shape, data });
    };
    put(EMBED_TOKENS_KEY.into(), vec![config.vocab_size, d], 0.02, 0.0, &mut rng);
    let specs = layer_projections(config);
    for i in 0..config.num_hidden_layers {
        let p = layer_prefix(i);
        for spec in &specs {
            let (name, [out, inp]) = (spec.path, spec.shape);
            put(format!("{p}.{name}.weight"), vec![out, inp], 0.02, 0.0, &mut rng);
            if spec.bias {
                put(format!("{p}.{name}.bias"), vec![out], 0.02, 0.0, &mut rng);
            }
        }
        for name in LAYER_NORM_PATHS {
            put(format!("{p}.{name}.weight"), vec![d], 0.0, 1.0, &mut rng);
        }
    }
    put(FINAL_NORM_KEY.into(), vec![d], 0.0, 1.0, &mut rng);
    if !config.tie_word_embeddings {
        put(LM_HEAD_KEY.into(), vec![config.vocab_size, d], 0.02, 0.0, &mut rng);
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generator this crate used before it drew from `gems_rng`, kept to prove the streams
    /// (and so random weights, new item rows and LoRA initialisations) did not change.
    struct FormerRng(u64);

    impl FormerRng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn uniform(&mut self) -> f64 {
            ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            let (u1, u2) = (self.uniform(), self.uniform());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        }
    }

    #[test]
    fn init_rng_reproduces_the_former_stream_bit_for_bit() {
        for seed in [0, 1, 3, 42, u64::MAX] {
            let mut old = FormerRng(seed ^ 0x9E37_79B9_7F4A_7C15);
            let mut new = init_rng(seed);
            for _ in 0..1000 {
                assert_eq!(old.normal().to_bits(), new.normal().to_bits());
                assert_eq!(old.uniform().to_bits(), new.next_open01().to_bits());
            }
        }
    }
}

#[cfg(test)]
mod schema_tests {
    use super::*;

    /// The tables as every forward computed them before they were cached.
    fn rope_per_forward(c: &LlamaConfig, positions: &[usize]) -> (Vec<u32>, Vec<u32>) {
        let (inv, hd) = (c.inv_freq(), c.head_dim());
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &p in positions {
            for j in 0..hd {
                let a = p as f64 * inv[j % (hd / 2)];
                cos.push((a.cos() as f32).to_bits());
                sin.push((a.sin() as f32).to_bits());
            }
        }
        (cos, sin)
    }

    #[test]
    fn head_logits_are_a_block_of_the_full_head() {
        for extra in [r#", "tie_word_embeddings": true"#, r#", "tie_word_embeddings": false"#] {
            let c = config(extra);
            let mut model = Llama::init_random(&c, 2, &Device::flex()).unwrap();
            if let Some(head) = model.lm_head.as_mut() {
                let b: Vec<f32> = (0..16).map(|i| i as f32 * 0.1).collect();
                let bias = Tensor::<1>::from_data(TensorData::new(b, [16]), &Device::flex());
                head.bias = Some(Param::from_tensor(bias));
            }
            let data: Vec<f32> = (0..3 * 8).map(|i| (i as f32 * 0.37).sin()).collect();
            let hidden = Tensor::<2>::from_data(TensorData::new(data, [3, 8]), &Device::flex());
            let full = to_host(model.head(hidden.clone()), "test").unwrap();
            let block = to_host(model.head_logits(hidden, 5, 7), "test").unwrap();
            assert_eq!(block.shape, [3, 7]);
            for r in 0..3 {
                for j in 0..7 {
                    let (a, b) = (block.data[r * 7 + j], full.data[r * 16 + 5 + j]);
                    assert!((a - b).abs() < 1e-6, "{extra}: row {r} token {}: {a} vs {b}", 5 + j);
                }
            }
        }
    }

    #[test]
    fn cached_rope_tables_are_bit_identical_to_per_forward_ones() {
        let scaled = r#", "rope_theta": 500000.0, "max_position_embeddings": 4096,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}"#;
        for extra in ["", scaled] {
            let c = config(extra);
            let mut model = Llama::init_random(&c, 1, &Device::flex()).unwrap();
            let shared = model.clone();
            // Small positions first, then ones that grow the table, then a changed config.
            let batches: [&[usize]; 4] = [&[0, 1, 2, 3], &[5, 0, 63, 2], &[1000, 7], &[64, 4095]];
            for (k, positions) in batches.into_iter().enumerate() {
                if k == 3 {
                    model.config.rope_theta = 1234.5;
                }
                for m in [&model, &shared] {
                    let RopeTables { cos, sin, .. } = m.rope_tables(positions, 1, positions.len());
                    let bits = |t: Tensor<4>| -> Vec<u32> {
                        to_host(t, "test").unwrap().data.iter().map(|v| v.to_bits()).collect()
                    };
                    let want = rope_per_forward(&m.config, positions);
                    assert_eq!((bits(cos), bits(sin)), want, "{extra} {positions:?}");
                }
            }
        }
    }

    fn config(extra: &str) -> LlamaConfig {
        let text = format!(
            r#"{{"vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1{extra}}}"#
        );
        LlamaConfig::from_json(std::path::Path::new("config.json"), &text).unwrap()
    }

    #[test]
    fn random_weights_and_to_weights_follow_the_schema() {
        for extra in [r#", "tie_word_embeddings": true"#, r#", "model_type": "qwen2""#] {
            let c = config(extra);
            let mut want: Vec<(String, Vec<usize>)> = vec![(EMBED_TOKENS_KEY.into(), vec![16, 8])];
            for i in 0..2 {
                want.extend(layer_tensors(&c, i));
            }
            want.push((FINAL_NORM_KEY.into(), vec![8]));
            if !c.tie_word_embeddings {
                want.push((LM_HEAD_KEY.into(), vec![16, 8]));
            }
            want.sort();
            let w = random_weights(&c, 1);
            let got: Vec<(String, Vec<usize>)> =
                w.tensors.iter().map(|(k, t)| (k.clone(), t.shape.clone())).collect();
            assert_eq!(got, want, "{extra}");
            let model = Llama::init_random(&c, 1, &Device::flex()).unwrap();
            let back = model.to_weights().unwrap();
            assert_eq!(back.tensors, w.tensors, "{extra}: round trip");
        }
    }

    #[test]
    fn frozen_layers_give_the_graphs_bits_through_the_fused_kernels() {
        // Frozen layers run the fused host kernels (kernels::swiglu, kernels::rope,
        // kernels::attention); the same layers with a graph run the Burn ops. Hidden states must agree bit for bit, with
        // padding on either side and grouped-query attention.
        let c = config(
            r#", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2"#,
        );
        let device = Device::flex().autodiff();
        let model = Llama::init_random(&c, 3, &device).unwrap();
        let seqs = vec![vec![1, 2, 3, 4, 5], vec![6, 7], vec![8, 9, 10, 11, 12, 13, 14]];
        for left in [false, true] {
            let batch = TokenBatch::pad(&seqs, 0, left).unwrap();
            let bits = |m: &Llama| -> Vec<u32> {
                let h = m.hidden_states(&batch).unwrap();
                to_host(h, "test").unwrap().data.iter().map(|v| v.to_bits()).collect()
            };
            let with_graph = bits(&model);
            for k in [1, 3] {
                let frozen = model.clone().freeze_lower_layers(k).unwrap();
                assert_eq!(bits(&frozen), with_graph, "{k} frozen layers, left padding {left}");
            }
        }
    }

    #[test]
    fn frozen_states_of_a_row_do_not_depend_on_its_batch() {
        // What a cache of the frozen part relies on. `hidden_states` is `hidden_states_from`
        // after `frozen_states`, bit for bit. A row's frozen states at its real positions,
        // computed alone or beside longer rows (right padding, causal attention), agree to
        // float rounding but not bit for bit (the kernels take other paths at other shapes:
        // about 1e-7 of the values' scale here), so a cache of them changes a run's numbers
        // in the last bits, not its computation; per-row states assembled into a batch give
        // the batch's hidden states to the same tolerance.
        let c = config(
            r#", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2"#,
        );
        let device = Device::flex().autodiff();
        let model = Llama::init_random(&c, 5, &device).unwrap().freeze_lower_layers(2).unwrap();
        let seqs = vec![vec![1, 2, 3, 4, 5], vec![6, 7], vec![8, 9, 10, 11, 12, 13, 14]];
        let batch = TokenBatch::pad(&seqs, 0, false).unwrap();
        let (d, t) = (32, batch.seq_len);
        let host = |x: Tensor<3>| to_host(x, "test").unwrap().data;
        let close = |a: &[f32], b: &[f32]| {
            let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
            a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-6 * scale)
        };
        let together = model.frozen_states(&batch).unwrap();
        let direct = host(model.hidden_states(&batch).unwrap());
        let exact = host(model.hidden_states_from(&batch, together.clone()).unwrap());
        assert!(exact.iter().zip(&direct).all(|(a, b)| a.to_bits() == b.to_bits()));
        let together = host(together);
        let mut assembled = vec![0f32; seqs.len() * t * d];
        for (r, seq) in seqs.iter().enumerate() {
            let one = TokenBatch::pad(std::slice::from_ref(seq), 0, false).unwrap();
            let alone = host(model.frozen_states(&one).unwrap());
            let at = r * t * d..r * t * d + seq.len() * d;
            assert!(close(&alone, &together[at.clone()]), "row {r}");
            // Padded positions get zeros: no real position attends to them.
            assembled[at].copy_from_slice(&alone);
        }
        let frozen =
            Tensor::<3>::from_data(TensorData::new(assembled, [seqs.len(), t, d]), &device);
        let from_rows = host(model.hidden_states_from(&batch, frozen).unwrap());
        for (r, seq) in seqs.iter().enumerate() {
            let at = r * t * d..r * t * d + seq.len() * d;
            assert!(close(&direct[at.clone()], &from_rows[at]), "row {r}");
        }
        let wrong = Tensor::<3>::zeros([1, t, d], &device);
        assert!(model.hidden_states_from(&batch, wrong).is_err());
    }

    #[test]
    fn rows_of_one_length_batched_without_padding_are_each_row_alone_to_the_bit() {
        // What the frozen-states cache (gems_train::frozen_cache) computes its missing rows
        // with: rows of one length stacked without padding give every row exactly the states
        // it has alone, whatever the number of rows beside it, at SmolLM2-135M's widths.
        let c = config(
            r#", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 2,
            "num_attention_heads": 9, "num_key_value_heads": 3"#,
        );
        let device = Device::flex().autodiff();
        let model = Llama::init_random(&c, 7, &device).unwrap().freeze_lower_layers(1).unwrap();
        let host = |x: Tensor<3>| to_host(x, "test").unwrap().data;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for len in [3usize, 37] {
            let rows: Vec<Vec<u32>> = (0..17u32)
                .map(|r| (0..len as u32).map(|i| (r * 7 + i * 3) % 16).collect())
                .collect();
            let alone: Vec<Vec<f32>> = rows
                .iter()
                .map(|row| {
                    let one = TokenBatch::new(row.clone(), vec![true; len], 1, len).unwrap();
                    host(model.frozen_states(&one).unwrap())
                })
                .collect();
            for n in [2usize, 3, 5, 17] {
                let ids: Vec<u32> = rows[..n].iter().flatten().copied().collect();
                let batch = TokenBatch::new(ids, vec![true; n * len], n, len).unwrap();
                let together = host(model.frozen_states(&batch).unwrap());
                for (r, want) in alone[..n].iter().enumerate() {
                    let got = &together[r * len * 576..(r + 1) * len * 576];
                    assert_eq!(bits(got), bits(want), "length {len}, {n} rows, row {r}");
                }
            }
        }
    }
}
