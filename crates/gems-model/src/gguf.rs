//! GGUF v3 files: metadata, tensors dequantized to f32, Hugging Face key names, the Q/K row
//! permutation undone, and the tokenizer rebuilt from metadata.
//!
//! The parser is written here and bounds-checked: every count and length is checked against the
//! bytes that remain before anything is allocated, element counts are checked for overflow, and
//! the tensor directory must describe the data section exactly as llama.cpp writes it (unique
//! names; each tensor's data right after the previous one's, padded to the alignment, with the
//! byte size its type and shape imply; nothing left over). So a truncated, corrupted or hostile
//! file gives a [`ModelError`] naming the file and key, never a panic, never data read from the
//! wrong bytes, and never an allocation larger than a small multiple of the file: metadata
//! arrays are stored as typed vectors ([`GgufArray`]), not one enum value per element.
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

use crate::config::{LlamaConfig, ModelType, TokenIds};
use crate::error::{ModelError, Result};
use crate::hf::Pretrained;
use crate::llama::{self, Llama};
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
    /// Array of values, stored compactly by element type (boxed: scalars stay small).
    Array(Box<GgufArray>),
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
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            Self::Array(a) => Some(a.as_ref()),
            _ => None,
        }
    }
    /// Bytes this value holds on the heap (its own inline size not included).
    pub fn heap_bytes(&self) -> usize {
        match self {
            Self::Str(s) => s.capacity(),
            Self::Array(a) => std::mem::size_of::<GgufArray>() + a.heap_bytes(),
            _ => 0,
        }
    }
}

/// A GGUF metadata array, one typed vector per element type.
///
/// A file's array of `n` one-byte elements costs `n` bytes here, not `n` enum values: a
/// hostile array can cost no more memory than a small multiple of the bytes it occupies in the
/// file (strings: their text plus one `usize` each; nested arrays: one `GgufArray` per 12-byte
/// header).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    /// `uint8` elements.
    U8(Vec<u8>),
    /// `int8` elements.
    I8(Vec<i8>),
    /// `uint16` elements.
    U16(Vec<u16>),
    /// `int16` elements.
    I16(Vec<i16>),
    /// `uint32` elements.
    U32(Vec<u32>),
    /// `int32` elements.
    I32(Vec<i32>),
    /// `float32` elements.
    F32(Vec<f32>),
    /// `bool` elements.
    Bool(Vec<bool>),
    /// `string` elements.
    Str(GgufStrings),
    /// `uint64` elements.
    U64(Vec<u64>),
    /// `int64` elements.
    I64(Vec<i64>),
    /// `float64` elements.
    F64(Vec<f64>),
    /// Nested arrays.
    Array(Vec<GgufArray>),
}

impl GgufArray {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::Str(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F64(v) => v.len(),
            Self::Array(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as an unsigned integer, if the elements are integers and this one is
    /// non-negative.
    pub fn get_u64(&self, i: usize) -> Option<u64> {
        match self {
            Self::U8(v) => v.get(i).map(|&x| x.into()),
            Self::U16(v) => v.get(i).map(|&x| x.into()),
            Self::U32(v) => v.get(i).map(|&x| x.into()),
            Self::U64(v) => v.get(i).copied(),
            Self::I8(v) => v.get(i).and_then(|&x| u64::try_from(x).ok()),
            Self::I16(v) => v.get(i).and_then(|&x| u64::try_from(x).ok()),
            Self::I32(v) => v.get(i).and_then(|&x| u64::try_from(x).ok()),
            Self::I64(v) => v.get(i).and_then(|&x| u64::try_from(x).ok()),
            _ => None,
        }
    }

    /// Element `i` as a string, if the elements are strings.
    pub fn get_str(&self, i: usize) -> Option<&str> {
        self.as_strings().and_then(|s| s.get(i))
    }

    /// The elements as strings, if they are strings.
    pub fn as_strings(&self) -> Option<&GgufStrings> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Bytes this array holds on the heap (its own inline size not included).
    pub fn heap_bytes(&self) -> usize {
        fn cap<T>(v: &Vec<T>) -> usize {
            v.capacity() * std::mem::size_of::<T>()
        }
        match self {
            Self::U8(v) => cap(v),
            Self::I8(v) => cap(v),
            Self::U16(v) => cap(v),
            Self::I16(v) => cap(v),
            Self::U32(v) => cap(v),
            Self::I32(v) => cap(v),
            Self::F32(v) => cap(v),
            Self::Bool(v) => cap(v),
            Self::Str(v) => v.heap_bytes(),
            Self::U64(v) => cap(v),
            Self::I64(v) => cap(v),
            Self::F64(v) => cap(v),
            Self::Array(v) => cap(v) + v.iter().map(GgufArray::heap_bytes).sum::<usize>(),
        }
    }
}

/// The strings of a GGUF string array, concatenated in one buffer with their end offsets, so a
/// vocabulary of 50,000 tokens is two allocations rather than 50,000.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GgufStrings {
    text: String,
    ends: Vec<usize>,
}

impl GgufStrings {
    /// An empty list with room for `n` strings.
    fn with_capacity(n: usize) -> Self {
        Self { text: String::new(), ends: Vec::with_capacity(n) }
    }

    fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(self.text.len());
    }

    /// Number of strings.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are no strings.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// String `i`.
    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.text.get(start..end)
    }

    /// The strings in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    /// Bytes held on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.text.capacity() + self.ends.capacity() * std::mem::size_of::<usize>()
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

/// Name, elements per block and bytes per block of every GGML tensor type a GGUF file may
/// hold (ggml's `type_traits`), dequantizable or not: the data layout is checked for all of
/// them. `None` for ids that are no type.
pub fn ggml_type_layout(id: u32) -> Option<(&'static str, usize, usize)> {
    Some(match id {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        _ => return None,
    })
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
            9 => GgufValue::Array(Box::new(self.array(key, depth)?)),
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

    /// An array value (element type, count, elements); `depth` counts enclosing arrays.
    fn array(&mut self, key: &str, depth: usize) -> Result<GgufArray> {
        if depth > 2 {
            return Err(ModelError::format(self.path, Some(key), "arrays nested too deeply"));
        }
        let elem = self.u32(key)?;
        let n = self.u64(key)?;
        // The fewest bytes one element can occupy in the file.
        let min: u64 = match elem {
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
        // Checked before anything is allocated: every allocation below is at most a small
        // multiple of bytes the file really has.
        if n.saturating_mul(min) > self.remaining() as u64 {
            return Err(ModelError::format(
                self.path,
                Some(key),
                format!("array of {n} elements exceeds the file ({} bytes left)", self.remaining()),
            ));
        }
        let n = n as usize;
        fn le<const W: usize, T>(raw: &[u8], f: impl Fn([u8; W]) -> T) -> Vec<T> {
            raw.chunks_exact(W).map(|c| f(c.try_into().unwrap_or([0; W]))).collect()
        }
        Ok(match elem {
            0 => GgufArray::U8(self.take(n, key)?.to_vec()),
            1 => GgufArray::I8(self.take(n, key)?.iter().map(|&b| b as i8).collect()),
            2 => GgufArray::U16(le(self.take(2 * n, key)?, u16::from_le_bytes)),
            3 => GgufArray::I16(le(self.take(2 * n, key)?, i16::from_le_bytes)),
            4 => GgufArray::U32(le(self.take(4 * n, key)?, u32::from_le_bytes)),
            5 => GgufArray::I32(le(self.take(4 * n, key)?, i32::from_le_bytes)),
            6 => GgufArray::F32(le(self.take(4 * n, key)?, f32::from_le_bytes)),
            7 => GgufArray::Bool(self.take(n, key)?.iter().map(|&b| b != 0).collect()),
            8 => {
                let mut v = GgufStrings::with_capacity(n);
                for _ in 0..n {
                    let len = self.u64(key)?;
                    if len > self.remaining() as u64 {
                        return Err(ModelError::format(
                            self.path,
                            Some(key),
                            format!("string length {len} exceeds the file"),
                        ));
                    }
                    v.push(&String::from_utf8_lossy(self.take(len as usize, key)?));
                }
                GgufArray::Str(v)
            }
            9 => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.array(key, depth + 1)?);
                }
                GgufArray::Array(v)
            }
            10 => GgufArray::U64(le(self.take(8 * n, key)?, u64::from_le_bytes)),
            11 => GgufArray::I64(le(self.take(8 * n, key)?, i64::from_le_bytes)),
            _ => GgufArray::F64(le(self.take(8 * n, key)?, f64::from_le_bytes)),
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
            || n_tensors.saturating_mul(32) > r.remaining() as u64
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
            if metadata.contains_key(&key) {
                return Err(ModelError::format(path, Some(&key), "duplicate metadata key"));
            }
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
        let tensors = tensor_layout(path, raw, align, data_start, bytes.len())?;
        Ok(Self { path: path.to_path_buf(), version, metadata, tensors, bytes })
    }

    /// Approximate bytes of memory the parsed metadata and tensor directory hold, the file's
    /// own bytes (kept for the tensor data) not counted.
    ///
    /// Every element is stored compactly (see [`GgufArray`]), so this is at most a small
    /// multiple of the header's size in the file, however hostile its counts: a GGUF header
    /// cannot make the reader allocate much more memory than the file occupies.
    pub fn parsed_bytes(&self) -> usize {
        use std::mem::size_of;
        // A B-tree entry: key and value inline, plus a share of the node (edges, lengths).
        let entry = size_of::<String>() + size_of::<GgufValue>() + 16;
        let meta: usize =
            self.metadata.iter().map(|(k, v)| entry + k.capacity() + v.heap_bytes()).sum();
        let dir: usize = self.tensors.capacity() * size_of::<GgufTensorInfo>()
            + self
                .tensors
                .iter()
                .map(|t| t.name.capacity() + t.dims.capacity() * size_of::<usize>())
                .sum::<usize>();
        size_of::<Self>() + meta + dir
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
        let model_type: ModelType = arch.parse().map_err(|_| {
            ModelError::unsupported(
                &self.path,
                Some("general.architecture"),
                format!("architecture `{arch}` (llama, qwen2)"),
            )
        })?;
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
            model_type,
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
                .and_then(|x| u32::try_from(x).ok())
                .map(TokenIds::One),
            eos_token_id: self
                .metadata
                .get("tokenizer.ggml.eos_token_id")
                .and_then(|v| v.as_u64())
                .and_then(|x| u32::try_from(x).ok())
                .map(TokenIds::One),
            pad_token_id: self
                .metadata
                .get("tokenizer.ggml.padding_token_id")
                .and_then(|v| v.as_u64())
                .and_then(|x| u32::try_from(x).ok())
                .map(TokenIds::One),
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
        let unpermute = config.model_type == ModelType::Llama;
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
        let strings = |key: &str| -> Result<&GgufStrings> {
            self.meta(key)?
                .as_array()
                .and_then(GgufArray::as_strings)
                .ok_or_else(|| ModelError::format(&self.path, Some(key), "not an array of strings"))
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types = self.metadata.get("tokenizer.ggml.token_type").and_then(|v| v.as_array());
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (i, s) in tokens.iter().enumerate() {
            vocab.insert(s.to_string(), serde_json::json!(i));
            let ty = types.and_then(|a| a.get_u64(i)).unwrap_or(1);
            // 3 = control, 4 = user-defined: both are added tokens that are never split.
            if ty == 3 || ty == 4 {
                added.push(
                    serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": ty == 3}),
                );
            }
        }
        let merges: Vec<&str> = merges.iter().collect();
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

/// Checks the tensor directory against the data section and returns it with byte ranges.
///
/// As llama.cpp's reader requires, names are unique and the tensors' data lie one after the
/// other in directory order, each starting at the previous one's end rounded up to `align`, the
/// first at offset 0, the last ending the file (up to its padding). So a duplicated entry, two
/// tensors sharing bytes, a gap, or a type or shape whose byte size differs from what the file
/// holds for that tensor is an error naming the tensor, never data read from the wrong bytes.
fn tensor_layout(
    path: &Path,
    raw: Vec<(String, Vec<usize>, u32, u64)>,
    align: usize,
    data_start: usize,
    file_len: usize,
) -> Result<Vec<GgufTensorInfo>> {
    let mut names = std::collections::HashSet::with_capacity(raw.len());
    for (name, ..) in &raw {
        if !names.insert(name.as_str()) {
            return Err(ModelError::format(path, Some(name), "duplicate tensor entry".to_string()));
        }
    }
    drop(names);
    let mut layout = Layout {
        path,
        data_start,
        file_len,
        align: align as u64,
        data_len: (file_len as u64).saturating_sub(data_start as u64),
        tensors: Vec::with_capacity(raw.len()),
        next: 0,
        prev: None,
    };
    for (name, dims, ty, off) in raw {
        layout.place(name, dims, ty, off)?;
    }
    layout.finish()
}

/// The tensors of a GGUF directory placed so far by [`tensor_layout`], and where the next one
/// must start.
struct Layout<'p> {
    /// The file, for errors.
    path: &'p Path,
    /// Byte offset of the data section in the file.
    data_start: usize,
    /// Length of the file in bytes.
    file_len: usize,
    /// Alignment of each tensor's data.
    align: u64,
    /// Length of the data section in bytes.
    data_len: u64,
    /// The tensors placed so far, with absolute byte ranges.
    tensors: Vec<GgufTensorInfo>,
    /// Where the next tensor must start, relative to the data section.
    next: u64,
    /// The previous tensor's type name and data range relative to the data section.
    prev: Option<(&'static str, u64, u64)>,
}

impl Layout<'_> {
    /// A format error naming tensor `name`.
    fn error(&self, name: &str, d: String) -> ModelError {
        ModelError::format(self.path, Some(name), d)
    }

    /// Places tensor `name` of GGML type `ty` and shape `dims` at offset `off` of the data
    /// section, checking that it starts where the previous one ends and lies within the file.
    fn place(&mut self, name: String, dims: Vec<usize>, ty: u32, off: u64) -> Result<()> {
        let (tname, size) = self.tensor_size(&name, &dims, ty)?;
        let end = off.checked_add(size).ok_or_else(|| {
            self.error(&name, format!("offset {off} plus {size} bytes overflows"))
        })?;
        if off != self.next {
            return Err(self.misplaced(&name, off, end));
        }
        if end > self.data_len {
            let (data_start, file_len) = (self.data_start, self.file_len);
            return Err(self.error(
                &name,
                format!(
                    "tensor data ({tname} {dims:?}: {size} bytes at offset {off} of the data \
                     section, which starts at byte {data_start}) runs past the end of the file \
                     ({file_len} bytes): truncated?"
                ),
            ));
        }
        self.next = end.div_ceil(self.align) * self.align;
        let data_start = self.data_start as u64;
        let range = ((data_start + off) as usize, (data_start + end) as usize);
        self.tensors.push(GgufTensorInfo { name, dims, type_id: ty, range });
        self.prev = Some((tname, off, end));
        Ok(())
    }

    /// The type name and byte size of tensor `name` of GGML type `ty` and shape `dims`.
    fn tensor_size(&self, name: &str, dims: &[usize], ty: u32) -> Result<(&'static str, u64)> {
        let (tname, be, bb) = ggml_type_layout(ty).ok_or_else(|| {
            ModelError::unsupported(self.path, Some(name), format!("tensor type {ty}"))
        })?;
        let count = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| self.error(name, format!("dims {dims:?} overflow")))?;
        if !dims[0].is_multiple_of(be) {
            return Err(self.error(
                name,
                format!("row length {} is not a multiple of the {tname} block size {be}", dims[0]),
            ));
        }
        let size = (count / be)
            .checked_mul(bb)
            .and_then(|x| u64::try_from(x).ok())
            .ok_or_else(|| self.error(name, format!("{tname} dims {dims:?} overflow")))?;
        Ok((tname, size))
    }

    /// The error for tensor `name` whose data (bytes `off..end` of the data section) does not
    /// start where the previous tensor puts it: the tensor it overlaps, or the gap.
    fn misplaced(&self, name: &str, off: u64, end: u64) -> ModelError {
        let (data_start, next) = (self.data_start, self.next);
        let abs_off = (data_start as u64).saturating_add(off);
        let abs_end = (data_start as u64).saturating_add(end).max(abs_off.saturating_add(1));
        let overlapped = self.tensors.iter().find(|t| {
            t.range.0 < t.range.1 && (t.range.0 as u64) < abs_end && abs_off < t.range.1 as u64
        });
        let (p, pd) = self.tensors.last().map_or(("", &[][..]), |t| (t.name.as_str(), &t.dims[..]));
        let d = match (&self.prev, overlapped) {
            (_, Some(t)) => format!(
                "data (bytes {off}..{end} of the data section) overlaps tensor `{}` (bytes \
                 {}..{})",
                t.name,
                t.range.0 - data_start,
                t.range.1 - data_start
            ),
            (None, None) => {
                format!(
                    "data of the first tensor starts at offset {off} of the data section, not 0"
                )
            }
            (Some((pt, ps, pe)), None) => format!(
                "data starts at offset {off} of the data section, but the previous tensor \
                 `{p}` ({pt} {pd:?}, bytes {ps}..{pe}) puts the next one at {next}: {} \
                 (a wrong type or shape for `{p}`, or a shifted offset)",
                if off > next {
                    format!("{} bytes belong to no tensor", off - next)
                } else {
                    "tensor data must follow the directory order".to_string()
                }
            ),
        };
        self.error(name, d)
    }

    /// The placed tensors, after checking that no bytes follow the last one's padding.
    fn finish(self) -> Result<Vec<GgufTensorInfo>> {
        let (next, data_len) = (self.next, self.data_len);
        if let (Some((pt, ps, pe)), Some(last)) = (self.prev, self.tensors.last())
            && data_len > next
        {
            let (p, pd) = (&last.name, &last.dims);
            return Err(self.error(
                p,
                format!(
                    "the data section has {} bytes after the last tensor `{p}` ({pt} {pd:?}, \
                     bytes {ps}..{pe}, padded to {next}) that belong to no tensor (a wrong type \
                     or shape for `{p}`?)",
                    data_len - next
                ),
            ));
        }
        Ok(self.tensors)
    }
}

/// Maps a GGUF tensor name to its Hugging Face key; `None` for tensors the decoder ignores.
pub fn hf_key(name: &str) -> Option<String> {
    let simple = match name {
        "token_embd.weight" => Some(llama::EMBED_TOKENS_KEY),
        "output_norm.weight" => Some(llama::FINAL_NORM_KEY),
        "output.weight" => Some(llama::LM_HEAD_KEY),
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
    Some(format!("{}.{hf}.{suffix}", llama::layer_prefix(layer)))
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
        GgmlType::Q4K => dequantize_q4k(raw, bb, &mut out),
        GgmlType::Q6K => dequantize_q6k(raw, bb, &mut out),
    }
    out
}

/// Dequantizes Q4_K blocks of `bb` bytes from `raw`, appending to `out`.
fn dequantize_q4k(raw: &[u8], bb: usize, out: &mut Vec<f32>) {
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

/// Dequantizes Q6_K blocks of `bb` bytes from `raw`, appending to `out`.
fn dequantize_q6k(raw: &[u8], bb: usize, out: &mut Vec<f32>) {
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
