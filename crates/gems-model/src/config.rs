//! Hugging Face `config.json` for the Llama family (Llama 2/3, SmolLM2, Qwen2).
//!
//! Field names are exactly those of `transformers` so a checkpoint's file deserialises as is;
//! fields this crate does not use are kept in [`LlamaConfig::extra`] and written back on save,
//! so an exported directory stays readable by other tools.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The configuration of a Llama-family decoder, with Hugging Face field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama` or `qwen2` (Qwen2 implies q/k/v bias); defaults to `llama`.
    #[serde(default)]
    pub model_type: ModelType,
    /// Vocabulary size, including added tokens such as items.
    pub vocab_size: usize,
    /// Model width `d_model`.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to `num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// Llama 3.1-style RoPE scaling (`rope_type = "llama3"`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the checkpoint was trained for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether the output head shares the token embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether q/k/v/o projections carry a bias (Llama); Qwen2 has q/k/v bias without this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Whether the MLP projections carry a bias (Llama option, almost always false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// Activation of the MLP; only `silu` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Beginning-of-sequence id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence id (an integer or a list of integers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<TokenIds>,
    /// Every other field of the file, kept for round trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// RoPE frequency scaling as Llama 3.1 defines it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `llama3` (or `default`, no scaling); any other type is an error when parsing.
    #[serde(alias = "type")]
    pub rope_type: RopeType,
    /// Scale factor.
    #[serde(default = "one")]
    pub factor: f64,
    /// Low-frequency factor.
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    /// High-frequency factor.
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    /// Context length of the original model.
    #[serde(default = "default_orig")]
    pub original_max_position_embeddings: usize,
}

/// A string-valued enum of `config.json`: (de)serialised as its name, and an unknown name is an
/// error that names the field and the value and lists the supported names.
macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident, $field:literal, { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// The name as `config.json` writes it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> std::result::Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!(
                        concat!($field, " `{}` is not supported (only {})"),
                        other,
                        [$($text),+].join(", ")
                    )),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

named_enum!(
    /// The architecture of `config.json`'s `model_type` (`llama` when absent).
    #[derive(Default)]
    ModelType, "model_type", {
        /// Llama 2/3, SmolLM2: optional `attention_bias` on q/k/v/o.
        #[default]
        Llama = "llama",
        /// Qwen2: q/k/v always have a bias, o does not.
        Qwen2 = "qwen2",
    }
);

named_enum!(
    /// The RoPE scaling of `rope_scaling.rope_type` (alias `type`).
    RopeType, "rope_scaling.rope_type", {
        /// No scaling.
        Default = "default",
        /// Llama 3.1 frequency-dependent scaling.
        Llama3 = "llama3",
    }
);

/// A token id field of `config.json` (`bos_token_id`, `eos_token_id`, `pad_token_id`): one
/// integer or a list of integers, written back in the form it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// A list of ids (several end-of-sequence tokens, as Llama 3 declares).
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids, in the order given.
    pub fn ids(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }

    /// The first id, if any.
    pub fn first(&self) -> Option<u32> {
        match self {
            Self::One(id) => Some(*id),
            Self::Many(ids) => ids.first().copied(),
        }
    }

    /// Reads an integer or a list of integers; anything else (a string, a negative or
    /// fractional number, an id above `u32::MAX`) is an error describing the value.
    fn from_value(v: &serde_json::Value) -> std::result::Result<Self, String> {
        let id = |x: &serde_json::Value| x.as_u64().and_then(|n| u32::try_from(n).ok());
        let bad = || format!("expected a token id or a list of token ids, got {}", describe(v));
        match v {
            serde_json::Value::Array(a) => {
                a.iter().map(id).collect::<Option<Vec<u32>>>().map(Self::Many).ok_or_else(bad)
            }
            x => id(x).map(Self::One).ok_or_else(bad),
        }
    }
}

impl Serialize for TokenIds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::One(id) => s.serialize_u32(*id),
            Self::Many(ids) => ids.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TokenIds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Self::from_value(&v).map_err(serde::de::Error::custom)
    }
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}
fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}
fn default_orig() -> usize {
    8192
}

impl LlamaConfig {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(path, &text)
    }

    /// Parses and validates `config.json` text; `path` only labels errors.
    ///
    /// A value of the wrong type is an error naming the field (`hidden_size: expected an
    /// integer, got string "576"`), and [`LlamaConfig::validate`] names the field of a zero or
    /// absurd size. A leading UTF-8 byte-order mark is skipped.
    pub fn from_json(path: &Path, text: &str) -> Result<Self> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ModelError::config(path, e.to_string()))?;
        check_types(&value).map_err(|d| ModelError::config(path, d))?;
        let config: Self =
            serde_json::from_value(value).map_err(|e| ModelError::config(path, e.to_string()))?;
        config.validate(path)?;
        Ok(config)
    }

    /// Writes the configuration as pretty JSON.
    pub fn to_file(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| ModelError::config(path, e.to_string()))?;
        crate::error::write_file(path, text.as_ref())
    }

    /// Checks that every size is positive and plausible and that the sizes are consistent;
    /// `path` only labels the error, which names the field.
    ///
    /// The upper limits ([`SIZE_LIMITS`]) are far above any released model and far below sizes
    /// that would overflow or exhaust memory. `num_hidden_layers` has none: no allocation is sized
    /// from it, and a count larger than the file holds fails on the first missing layer.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |d: String| Err(ModelError::config(path, d));
        let sizes = [
            ("vocab_size", Some(self.vocab_size)),
            ("hidden_size", Some(self.hidden_size)),
            ("intermediate_size", Some(self.intermediate_size)),
            ("num_hidden_layers", Some(self.num_hidden_layers)),
            ("num_attention_heads", Some(self.num_attention_heads)),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", Some(self.max_position_embeddings)),
        ];
        for (name, value) in sizes {
            let Some(v) = value else { continue };
            if v == 0 {
                return err(format!("{name} = 0: must be positive"));
            }
            if let Some(&(_, max)) = SIZE_LIMITS.iter().find(|(n, _)| *n == name)
                && v > max
            {
                return err(format!("{name} = {v} is absurd (the limit is {max})"));
            }
        }
        let kv = self.n_kv_heads();
        if !self.num_attention_heads.is_multiple_of(kv) {
            return err(format!(
                "num_attention_heads = {} is not a multiple of num_key_value_heads = {kv}",
                self.num_attention_heads
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return err(format!(
                "hidden_size = {} is not a multiple of num_attention_heads = {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return err(format!("head_dim = {} must be even and positive", self.head_dim()));
        }
        if self.hidden_act != "silu" {
            return err(format!("hidden_act = {} is not supported (only silu)", self.hidden_act));
        }
        for (name, v) in [("rms_norm_eps", self.rms_norm_eps), ("rope_theta", self.rope_theta)] {
            if !v.is_finite() || v <= 0.0 {
                return err(format!("{name} = {v}: must be positive and finite"));
            }
        }
        if let Some(s) = &self.rope_scaling
            && s.rope_type == RopeType::Llama3
        {
            for (name, v) in [
                ("rope_scaling.factor", s.factor),
                ("rope_scaling.low_freq_factor", s.low_freq_factor),
                ("rope_scaling.high_freq_factor", s.high_freq_factor),
            ] {
                if !v.is_finite() || v <= 0.0 {
                    return err(format!("{name} = {v}: must be positive and finite"));
                }
            }
            if s.high_freq_factor <= s.low_freq_factor {
                return err(format!(
                    "rope_scaling.high_freq_factor = {} must exceed low_freq_factor = {}",
                    s.high_freq_factor, s.low_freq_factor
                ));
            }
            if s.original_max_position_embeddings == 0 {
                return err("rope_scaling.original_max_position_embeddings = 0: must be \
                            positive"
                    .into());
            }
        }
        Ok(())
    }

    /// Number of key/value heads.
    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v projections have a bias (Qwen2 always; Llama when `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        self.model_type == ModelType::Qwen2 || self.attention_bias.unwrap_or(false)
    }

    /// Whether the output projection `o_proj` has a bias (Llama `attention_bias` only).
    pub fn o_bias(&self) -> bool {
        self.model_type != ModelType::Qwen2 && self.attention_bias.unwrap_or(false)
    }

    /// Whether the MLP projections have a bias.
    pub fn mlp_bias(&self) -> bool {
        self.mlp_bias.unwrap_or(false)
    }

    /// The end-of-sequence ids declared by the config.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map(TokenIds::ids).unwrap_or_default()
    }

    /// Inverse RoPE frequencies, `head_dim / 2` values, with Llama 3 scaling applied.
    pub fn inv_freq(&self) -> Vec<f64> {
        let hd = self.head_dim();
        let mut f: Vec<f64> =
            (0..hd / 2).map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / hd as f64)).collect();
        if let Some(s) = &self.rope_scaling
            && s.rope_type == RopeType::Llama3
        {
            let old = s.original_max_position_embeddings as f64;
            let low_wavelen = old / s.low_freq_factor;
            let high_wavelen = old / s.high_freq_factor;
            for x in &mut f {
                let wavelen = 2.0 * std::f64::consts::PI / *x;
                if wavelen > low_wavelen {
                    *x /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    *x = (1.0 - smooth) * *x / s.factor + smooth * *x;
                }
            }
        }
        f
    }
}

/// The largest value [`LlamaConfig::validate`] accepts for each size field: 16 to 1000 times the
/// largest released Llama-family model, and small enough that products of two never overflow.
pub const SIZE_LIMITS: [(&str, usize); 7] = [
    ("vocab_size", 1 << 24),
    ("hidden_size", 1 << 18),
    ("intermediate_size", 1 << 20),
    ("num_attention_heads", 1 << 12),
    ("num_key_value_heads", 1 << 12),
    ("head_dim", 1 << 12),
    ("max_position_embeddings", 1 << 30),
];

/// What a field of `config.json` must hold.
#[derive(Clone, Copy)]
enum Kind {
    /// A non-negative integer.
    Size,
    /// A number.
    Number,
    /// `true` or `false`.
    Bool,
    /// A string.
    Str,
    /// A JSON object.
    Object,
    /// A token id or a list of token ids.
    TokenIds,
}

/// Whether a field may be absent or `null`.
#[derive(Clone, Copy, PartialEq)]
enum Presence {
    /// Must be present, not `null`.
    Required,
    /// May be absent (a default applies), not `null`.
    Defaulted,
    /// May be absent or `null`.
    Nullable,
}

/// The fields this crate reads, with their kinds.
const FIELDS: [(&str, Kind, Presence); 19] = [
    ("model_type", Kind::Str, Presence::Defaulted),
    ("vocab_size", Kind::Size, Presence::Required),
    ("hidden_size", Kind::Size, Presence::Required),
    ("intermediate_size", Kind::Size, Presence::Required),
    ("num_hidden_layers", Kind::Size, Presence::Required),
    ("num_attention_heads", Kind::Size, Presence::Required),
    ("num_key_value_heads", Kind::Size, Presence::Nullable),
    ("head_dim", Kind::Size, Presence::Nullable),
    ("rms_norm_eps", Kind::Number, Presence::Defaulted),
    ("rope_theta", Kind::Number, Presence::Defaulted),
    ("rope_scaling", Kind::Object, Presence::Nullable),
    ("max_position_embeddings", Kind::Size, Presence::Defaulted),
    ("tie_word_embeddings", Kind::Bool, Presence::Defaulted),
    ("attention_bias", Kind::Bool, Presence::Nullable),
    ("mlp_bias", Kind::Bool, Presence::Nullable),
    ("hidden_act", Kind::Str, Presence::Defaulted),
    ("bos_token_id", Kind::TokenIds, Presence::Nullable),
    ("eos_token_id", Kind::TokenIds, Presence::Nullable),
    ("pad_token_id", Kind::TokenIds, Presence::Nullable),
];

/// The fields of `rope_scaling`.
const ROPE_FIELDS: [(&str, Kind); 6] = [
    ("rope_type", Kind::Str),
    ("type", Kind::Str),
    ("factor", Kind::Number),
    ("low_freq_factor", Kind::Number),
    ("high_freq_factor", Kind::Number),
    ("original_max_position_embeddings", Kind::Size),
];

/// Checks the JSON types of the fields this crate reads, so that a wrong type is reported with
/// the field's name (serde's own message names only the type, and not at all through `flatten`).
fn check_types(v: &serde_json::Value) -> std::result::Result<(), String> {
    let obj =
        v.as_object().ok_or_else(|| format!("expected a JSON object, got {}", describe(v)))?;
    for (name, kind, presence) in FIELDS {
        match (obj.get(name), presence) {
            (None, Presence::Required) => return Err(format!("{name}: missing")),
            (None, _) | (Some(serde_json::Value::Null), Presence::Nullable) => {}
            (Some(x), _) => check_kind(name, x, kind)?,
        }
    }
    if let Some(rs) = obj.get("rope_scaling").and_then(|x| x.as_object()) {
        for (name, kind) in ROPE_FIELDS {
            if let Some(x) = rs.get(name) {
                check_kind(&format!("rope_scaling.{name}"), x, kind)?;
            }
        }
        if !rs.contains_key("rope_type") && !rs.contains_key("type") {
            return Err("rope_scaling.rope_type: missing".into());
        }
    }
    Ok(())
}

fn check_kind(name: &str, x: &serde_json::Value, kind: Kind) -> std::result::Result<(), String> {
    let (ok, want) = match kind {
        Kind::Size => (
            x.as_u64().is_some_and(|n| usize::try_from(n).is_ok()),
            if x.as_i64().is_some_and(|n| n < 0) { "a non-negative integer" } else { "an integer" },
        ),
        Kind::Number => (x.is_number(), "a number"),
        Kind::Bool => (x.is_boolean(), "true or false"),
        Kind::Str => (x.is_string(), "a string"),
        Kind::Object => (x.is_object(), "an object"),
        Kind::TokenIds => (TokenIds::from_value(x).is_ok(), "a token id or a list of token ids"),
    };
    if ok { Ok(()) } else { Err(format!("{name}: expected {want}, got {}", describe(x))) }
}

/// A JSON value's type and a short excerpt of it, for messages.
fn describe(x: &serde_json::Value) -> String {
    use serde_json::Value;
    let excerpt = |s: String| {
        if s.chars().count() > 40 {
            format!("{}...", s.chars().take(40).collect::<String>())
        } else {
            s
        }
    };
    match x {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {}", excerpt(format!("{s:?}"))),
        Value::Array(a) => format!("an array of {} elements", a.len()),
        Value::Object(o) => format!("an object of {} fields", o.len()),
    }
}
