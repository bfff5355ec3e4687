//! GGUF v3 files: metadata, tensors dequantized to f32, Hugging Face key names, the Q/K row
//! permutation undone, and the tokenizer rebuilt from metadata.
//!
//! The parser is written here and bounds-checked: every count and length is checked against the
//! bytes that remain before anything is allocated, tensor data ranges are checked against the
//! file, and element counts are checked for overflow, so a truncated or hostile file gives a
//! [`ModelError`] naming the file and key, never a panic or an allocation larger than the file.
//!
//! Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K (the types real small
//! models use), dequantized as llama.cpp's `ggml-quants.c` does.
//!
//! llama.cpp's converter permutes the rows of `attn_q` and `attn_k` of `llama` models for its
//! interleaved RoPE: within each head, HF row `j * half + i` is stored at row `2 i + j`. We undo
//! that so the standard rotate-half RoPE applies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use tokenizers::Tokenizer;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::hf::Pretrained;
use crate::llama::Llama;
use crate::weights::{HostTensor, WeightMap};

/// A GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string (invalid bytes replaced).
    Str(String),
    /// Array of values.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// As an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U64(x) => Some(x),
            Self::I64(x) if x >= 0 => Some(x as u64),
            _ => None,
        }
    }
    /// As a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::U64(x) => Some(x as f64),
            Self::I64(x) => Some(x as f64),
            Self::F64(x) => Some(x),
            _ => None,
        }
    }
    /// As a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }
    /// As an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// GGML tensor types this crate dequantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
    /// 4-bit, blocks of 32 with an f16 scale.
    Q4_0,
    /// 4-bit, blocks of 32 with f16 scale and minimum.
    Q4_1,
    /// 8-bit, blocks of 32 with an f16 scale.
    Q8_0,
    /// 4-bit k-quant, super-blocks of 256.
    Q4K,
    /// 6-bit k-quant, super-blocks of 256.
    Q6K,
}

impl GgmlType {
    /// From the GGUF type id.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            12 => Self::Q4K,
            14 => Self::Q6K,
            30 => Self::Bf16,
            _ => return None,
        })
    }
    /// Elements per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q6K => (256, 210),
        }
    }
}

/// One tensor's directory entry.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// GGUF name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// GGML dimensions, fastest first (`[in, out]` for a linear weight).
    pub dims: Vec<usize>,
    /// The type id as stored.
    pub type_id: u32,
    /// Byte range of the data within the file.
    pub range: (usize, usize),
}

/// A parsed GGUF file held in memory.
#[derive(Debug)]
pub struct GgufFile {
    /// The file, for error messages.
    pub path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor directory in file order.
    pub tensors: Vec<GgufTensorInfo>,
    bytes: Vec<u8>,
}

struct Reader<'a> {
    path: &'a Path,
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.b.len() - self.pos < n {
            return Err(ModelError::format(
                self.path,
                Some(what),
                format!(
                    "truncated: need {n} bytes at offset {}, file has {}",
                    self.pos,
                    self.b.len()
                ),
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        if n > self.remaining() as u64 {
            return Err(ModelError::format(
                self.path,
                Some(what),
                format!("string length {n} exceeds the file"),
            ));
        }
        let s = self.take(n as usize, what)?;
        Ok(String::from_utf8_lossy(s).into_owned())
    }
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
        let mut fixed = |n: usize| -> Result<u64> {
            let s = self.take(n, key)?;
            let mut a = [0u8; 8];
            a[..n].copy_from_slice(s);
            Ok(u64::from_le_bytes(a))
        };
        Ok(match ty {
            0 => GgufValue::U64(fixed(1)?),
            1 => GgufValue::I64(fixed(1)? as u8 as i8 as i64),
            2 => GgufValue::U64(fixed(2)?),
            3 => GgufValue::I64(fixed(2)? as u16 as i16 as i64),
            4 => GgufValue::U64(fixed(4)?),
            5 => GgufValue::I64(fixed(4)? as u32 as i32 as i64),
            6 => GgufValue::F64(f32::from_bits(fixed(4)? as u32) as f64),
            7 => GgufValue::Bool(fixed(1)? != 0),
            8 => GgufValue::Str(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(ModelError::format(
                        self.path,
                        Some(key),
                        "arrays nested too deeply",
                    ));
                }
                let elem = self.u32(key)?;
                let n = self.u64(key)?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => {
                        return Err(ModelError::format(
                            self.path,
                            Some(key),
                            format!("unknown array element type {elem}"),
                        ));
                    }
                };
                if n.saturating_mul(min) > self.remaining() as u64 {
                    return Err(ModelError::format(
                        self.path,
                        Some(key),
                        format!("array of {n} elements exceeds the file"),
                    ));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, key, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(fixed(8)?),
            11 => GgufValue::I64(fixed(8)? as i64),
            12 => GgufValue::F64(f64::from_bits(fixed(8)?)),
            _ => {
                return Err(ModelError::format(
                    self.path,
                    Some(key),
                    format!("unknown value type {ty}"),
                ));
            }
        })
    }
}

impl GgufFile {
    /// Reads and parses a GGUF file (v2 or v3).
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        Self::parse(path, bytes)
    }

    /// Parses GGUF bytes; `path` labels errors.
    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let mut r = Reader { path, b: &bytes, pos: 0 };
        let magic = r.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(ModelError::format(
                path,
                Some("magic"),
                format!("expected GGUF, found {magic:?}"),
            ));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::unsupported(
                path,
                Some("version"),
                format!("GGUF version {version} (2 and 3 are read)"),
            ));
        }
        let n_tensors = r.u64("tensor_count")?;
        let n_kv = r.u64("metadata_kv_count")?;
        if n_kv.saturating_mul(13) > r.remaining() as u64
            || n_tensors.saturating_mul(24) > r.remaining() as u64
        {
            return Err(ModelError::format(
                path,
                Some("header"),
                format!("{n_kv} metadata entries / {n_tensors} tensors cannot fit in the file"),
            ));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32(&key)?;
            let v = r.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let nd = r.u32(&name)?;
            if nd == 0 || nd > 4 {
                return Err(ModelError::format(
                    path,
                    Some(&name),
                    format!("{nd} dimensions (1 to 4 allowed)"),
                ));
            }
            let mut dims = Vec::new();
            for _ in 0..nd {
                let d = r.u64(&name)?;
                dims.push(
                    usize::try_from(d).map_err(|_| {
                        ModelError::format(path, Some(&name), "dimension too large")
                    })?,
                );
            }
            let ty = r.u32(&name)?;
            let off = r.u64(&name)?;
            raw.push((name, dims, ty, off));
        }
        let align =
            metadata.get("general.alignment").and_then(|v| v.as_u64()).unwrap_or(32) as usize;
        if align == 0 || !align.is_power_of_two() || align > 1 << 16 {
            return Err(ModelError::format(
                path,
                Some("general.alignment"),
                format!("alignment {align} is not a power of two"),
            ));
        }
        let data_start = r.pos.div_ceil(align) * align;
        let mut tensors = Vec::with_capacity(raw.len());
        for (name, dims, ty, off) in raw {
            let count =
                dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| {
                    ModelError::format(path, Some(&name), format!("dims {dims:?} overflow"))
                })?;
            let size = match GgmlType::from_id(ty) {
                Some(t) => {
                    let (be, bb) = t.block();
                    if dims[0] % be != 0 {
                        return Err(ModelError::format(
                            path,
                            Some(&name),
                            format!(
                                "row length {} is not a multiple of the block size {be}",
                                dims[0]
                            ),
                        ));
                    }
                    (count / be).checked_mul(bb)
                }
                None => None,
            };
            let (start, end) = match size {
                Some(size) => {
                    let start = usize::try_from(off).ok().and_then(|o| o.checked_add(data_start));
                    match start.and_then(|s| s.checked_add(size).map(|e| (s, e))) {
                        Some((s, e)) if e <= bytes.len() => (s, e),
                        _ => {
                            return Err(ModelError::format(
                                path,
                                Some(&name),
                                format!(
                                    "tensor data (offset {off}, {size} bytes) runs past the end of the file ({} bytes): truncated?",
                                    bytes.len()
                                ),
                            ));
                        }
                    }
                }
                None => (0, 0),
            };
            tensors.push(GgufTensorInfo { name, dims, type_id: ty, range: (start, end) });
        }
        Ok(Self { path: path.to_path_buf(), version, metadata, tensors, bytes })
    }

    /// A metadata value, or an error naming the key.
    pub fn meta(&self, key: &str) -> Result<&GgufValue> {
        self.metadata
            .get(key)
            .ok_or_else(|| ModelError::format(&self.path, Some(key), "metadata key missing"))
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        self.meta(key)?
            .as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| ModelError::format(&self.path, Some(key), "not an unsigned integer"))
    }

    fn meta_f64(&self, key: &str) -> Result<f64> {
        self.meta(key)?
            .as_f64()
            .ok_or_else(|| ModelError::format(&self.path, Some(key), "not a number"))
    }

    /// Dequantizes one tensor to f32; the shape is PyTorch order (GGML dims reversed).
    pub fn tensor(&self, info: &GgufTensorInfo) -> Result<HostTensor> {
        let t = GgmlType::from_id(info.type_id).ok_or_else(|| {
            ModelError::unsupported(
                &self.path,
                Some(&info.name),
                format!("tensor type {}", info.type_id),
            )
        })?;
        let data = dequantize(t, &self.bytes[info.range.0..info.range.1]);
        let shape: Vec<usize> = info.dims.iter().rev().copied().collect();
        Ok(HostTensor { shape, data })
    }

    /// The configuration implied by the metadata (`general.architecture` = `llama` or `qwen2`).
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self
            .meta("general.architecture")?
            .as_str()
            .ok_or_else(|| {
                ModelError::format(&self.path, Some("general.architecture"), "not a string")
            })?
            .to_string();
        if arch != "llama" && arch != "qwen2" {
            return Err(ModelError::unsupported(
                &self.path,
                Some("general.architecture"),
                format!("architecture `{arch}` (llama, qwen2)"),
            ));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let embd = self.find("token_embd.weight")?;
        let vocab_size = *embd
            .dims
            .get(1)
            .ok_or_else(|| ModelError::format(&self.path, Some("token_embd.weight"), "not 2-D"))?;
        let hidden_size = self.meta_usize(&k("embedding_length"))?;
        let n_heads = self.meta_usize(&k("attention.head_count"))?;
        let n_kv = self.meta_usize(&k("attention.head_count_kv")).unwrap_or(n_heads);
        let head_dim = self.meta_usize(&k("attention.key_length")).ok();
        let mut config = LlamaConfig {
            model_type: arch.clone(),
            vocab_size,
            hidden_size,
            intermediate_size: self.meta_usize(&k("feed_forward_length"))?,
            num_hidden_layers: self.meta_usize(&k("block_count"))?,
            num_attention_heads: n_heads,
            num_key_value_heads: Some(n_kv),
            head_dim,
            rms_norm_eps: self.meta_f64(&k("attention.layer_norm_rms_epsilon"))?,
            rope_theta: self.meta_f64(&k("rope.freq_base")).unwrap_or(10_000.0),
            rope_scaling: None,
            max_position_embeddings: self.meta_usize(&k("context_length")).unwrap_or(2048),
            tie_word_embeddings: !self.tensors.iter().any(|t| t.name == "output.weight"),
            attention_bias: None,
            mlp_bias: None,
            hidden_act: "silu".into(),
            bos_token_id: self
                .metadata
                .get("tokenizer.ggml.bos_token_id")
                .and_then(|v| v.as_u64())
                .map(|x| x.into()),
            eos_token_id: self
                .metadata
                .get("tokenizer.ggml.eos_token_id")
                .and_then(|v| v.as_u64())
                .map(|x| x.into()),
            pad_token_id: self
                .metadata
                .get("tokenizer.ggml.padding_token_id")
                .and_then(|v| v.as_u64())
                .map(|x| x.into()),
            extra: serde_json::Map::new(),
        };
        // Round-trip f32 metadata to the decimal value a config.json would hold.
        config.rms_norm_eps =
            (config.rms_norm_eps as f32).to_string().parse().unwrap_or(config.rms_norm_eps);
        config.validate(&self.path)?;
        Ok(config)
    }

    fn find(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name).ok_or_else(|| ModelError::MissingTensor {
            path: self.path.clone(),
            key: name.to_string(),
        })
    }

    /// All tensors dequantized, renamed to Hugging Face keys, Q/K rows un-permuted (llama).
    pub fn weights(&self, config: &LlamaConfig) -> Result<WeightMap> {
        let mut w = WeightMap::new(&self.path);
        let unpermute = config.model_type == "llama";
        for info in &self.tensors {
            let Some(key) = hf_key(&info.name) else { continue };
            let mut t = self.tensor(info)?;
            if unpermute {
                let heads = if key.ends_with("q_proj.weight") || key.ends_with("q_proj.bias") {
                    Some(config.num_attention_heads)
                } else if key.ends_with("k_proj.weight") || key.ends_with("k_proj.bias") {
                    Some(config.n_kv_heads())
                } else {
                    None
                };
                if let Some(h) = heads {
                    t = unpermute_rows(&t, h)
                        .map_err(|d| ModelError::format(&self.path, Some(&info.name), d))?;
                }
            }
            w.tensors.insert(key, t);
        }
        Ok(w)
    }

    /// Rebuilds a `tokenizers` tokenizer from `tokenizer.ggml.*` metadata (BPE / `gpt2` only).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let json = self.tokenizer_json()?;
        json.parse::<Tokenizer>().map_err(|e| ModelError::tokenizer(Some(&self.path), e))
    }

    /// The `tokenizer.json` text equivalent to the GGUF's tokenizer metadata.
    pub fn tokenizer_json(&self) -> Result<String> {
        let model = self.meta("tokenizer.ggml.model")?.as_str().unwrap_or("");
        if model != "gpt2" {
            return Err(ModelError::unsupported(
                &self.path,
                Some("tokenizer.ggml.model"),
                format!("tokenizer model `{model}` (only byte-level BPE `gpt2`)"),
            ));
        }
        let tokens = self.meta("tokenizer.ggml.tokens")?.as_array().ok_or_else(|| {
            ModelError::format(&self.path, Some("tokenizer.ggml.tokens"), "not an array")
        })?;
        let merges = self.meta("tokenizer.ggml.merges")?.as_array().ok_or_else(|| {
            ModelError::format(&self.path, Some("tokenizer.ggml.merges"), "not an array")
        })?;
        let types = self.metadata.get("tokenizer.ggml.token_type").and_then(|v| v.as_array());
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let s = t.as_str().ok_or_else(|| {
                ModelError::format(
                    &self.path,
                    Some("tokenizer.ggml.tokens"),
                    format!("entry {i} is not a string"),
                )
            })?;
            vocab.insert(s.to_string(), serde_json::json!(i));
            let ty = types.and_then(|a| a.get(i)).and_then(|v| v.as_u64()).unwrap_or(1);
            // 3 = control, 4 = user-defined: both are added tokens that are never split.
            if ty == 3 || ty == 4 {
                added.push(
                    serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == 3}),
                );
            }
        }
        let merges: Vec<&str> = merges.iter().filter_map(|m| m.as_str()).collect();
        let pre =
            self.metadata.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
        let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let pre_tokenizer = match pre {
            "smollm" | "default" | "gpt-2" | "gpt2" => {
                serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": pre == "smollm"}, byte_level]})
            }
            "llama-bpe" | "llama3" | "qwen2" => {
                let re = if pre == "qwen2" {
                    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
                } else {
                    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
                };
                serde_json::json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
            }
            other => {
                return Err(ModelError::unsupported(
                    &self.path,
                    Some("tokenizer.ggml.pre"),
                    format!("pre-tokenizer `{other}`"),
                ));
            }
        };
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges}
        });
        Ok(json.to_string())
    }
}

/// Maps a GGUF tensor name to its Hugging Face key; `None` for tensors the decoder ignores.
pub fn hf_key(name: &str) -> Option<String> {
    let simple = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, suffix) = part.rsplit_once('.')?;
    let hf = match base {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undoes llama.cpp's Q/K permutation: GGUF row `h*hd + 2i + j` holds HF row `h*hd + j*hd/2 + i`.
pub fn unpermute_rows(t: &HostTensor, heads: usize) -> std::result::Result<HostTensor, String> {
    let rows = t.shape[0];
    let cols: usize = t.shape[1..].iter().product();
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(format!("{rows} rows cannot be split into {heads} heads of even width"));
    }
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0.0; t.data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * hd + 2 * i + j;
                let dst = h * hd + j * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&t.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(HostTensor { shape: t.shape.clone(), data: out })
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantizes raw GGML data of type `t` (length already checked to be whole blocks).
pub fn dequantize(t: GgmlType, raw: &[u8]) -> Vec<f32> {
    let (be, bb) = t.block();
    let mut out = Vec::with_capacity(raw.len() / bb * be);
    match t {
        GgmlType::F32 => {
            out.extend(raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        }
        GgmlType::F16 => out.extend(raw.chunks_exact(2).map(f16)),
        GgmlType::Bf16 => out
            .extend(raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::Q8_0 => {
            for blk in raw.chunks_exact(bb) {
                let d = f16(&blk[0..2]);
                out.extend(blk[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        GgmlType::Q4_0 => {
            for blk in raw.chunks_exact(bb) {
                let d = f16(&blk[0..2]);
                let qs = &blk[2..18];
                out.extend(qs.iter().map(|&q| ((q & 0x0F) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        GgmlType::Q4_1 => {
            for blk in raw.chunks_exact(bb) {
                let d = f16(&blk[0..2]);
                let m = f16(&blk[2..4]);
                let qs = &blk[4..20];
                out.extend(qs.iter().map(|&q| (q & 0x0F) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
        GgmlType::Q4K => {
            for blk in raw.chunks_exact(bb) {
                let d = f16(&blk[0..2]);
                let dmin = f16(&blk[2..4]);
                let scales = &blk[4..16];
                let qs = &blk[16..144];
                let scale_min = |j: usize| -> (u8, u8) {
                    if j < 4 {
                        (scales[j] & 63, scales[j + 4] & 63)
                    } else {
                        (
                            (scales[j + 4] & 0x0F) | ((scales[j - 4] >> 6) << 4),
                            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
                        )
                    }
                };
                for (chunk, q) in qs.chunks_exact(32).enumerate() {
                    let (s1, m1) = scale_min(2 * chunk);
                    let (s2, m2) = scale_min(2 * chunk + 1);
                    let (d1, min1) = (d * s1 as f32, dmin * m1 as f32);
                    let (d2, min2) = (d * s2 as f32, dmin * m2 as f32);
                    out.extend(q.iter().map(|&x| d1 * (x & 0x0F) as f32 - min1));
                    out.extend(q.iter().map(|&x| d2 * (x >> 4) as f32 - min2));
                }
            }
        }
        GgmlType::Q6K => {
            for blk in raw.chunks_exact(bb) {
                let d = f16(&blk[208..210]);
                let mut y = [0f32; 256];
                for n in 0..2 {
                    let ql = &blk[n * 64..n * 64 + 64];
                    let qh = &blk[128 + n * 32..128 + n * 32 + 32];
                    let sc = &blk[192 + n * 8..192 + n * 8 + 8];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let base = n * 128;
                        y[base + l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[base + l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[base + l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[base + l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
                out.extend_from_slice(&y);
            }
        }
    }
    out
}

/// Loads a GGUF model file (weights, configuration, tokenizer, chat template) onto `device`.
pub fn load_gguf(path: &Path, device: &Device) -> Result<Pretrained> {
    let file = GgufFile::open(path)?;
    let config = file.config()?;
    let mut w = file.weights(&config)?;
    let model = Llama::from_weights(&config, &mut w, device)?;
    let tokenizer = file.tokenizer()?;
    let chat_template =
        file.metadata.get("tokenizer.chat_template").and_then(|v| v.as_str()).map(str::to_string);
    Ok(Pretrained { model, tokenizer, chat_template })
}
