//! Host-side weights: a map from Hugging Face key to an f32 array in PyTorch layout, and the
//! safetensors reader and writer.
//!
//! Every loader (Hugging Face directory, GGUF) produces a [`WeightMap`], and the decoder is built
//! from one, so key checks, shape checks and error messages live in one place. Safetensors files
//! are read with the `safetensors` crate, which checks every offset against the file length and
//! the others; [`parse_safetensors`] adds a duplicate-key check and names the file and the tensor
//! in every error: a truncated, corrupted or hostile file is an error, never a panic, never data
//! read from the wrong bytes, and never an allocation larger than the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// One tensor on the host: PyTorch shape (outermost first) and row-major f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape, outermost dimension first (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
    /// Row-major values; `data.len()` is the product of `shape`.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Builds a tensor, checking that `data` fits `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(ModelError::input(
                "HostTensor::new",
                format!("shape {shape:?} holds {n} values, got {}", data.len()),
            ));
        }
        Ok(Self { shape, data })
    }

    /// The transpose of a 2-D tensor.
    pub fn transposed(&self) -> Self {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut out = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                out[j * r + i] = self.data[i * c + j];
            }
        }
        Self { shape: vec![c, r], data: out }
    }
}

/// Named tensors read from one source, with the source's path for error messages.
#[derive(Debug, Clone, Default)]
pub struct WeightMap {
    /// The file or directory the tensors came from.
    pub source: PathBuf,
    /// Tensors by Hugging Face key (with or without the `model.` prefix; see [`WeightMap::take`]).
    pub tensors: BTreeMap<String, HostTensor>,
}

impl WeightMap {
    /// An empty map labelled with `source`.
    pub fn new(source: impl Into<PathBuf>) -> Self {
        Self { source: source.into(), tensors: BTreeMap::new() }
    }

    /// Whether `key` (or `model.` + `key`) is present.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key) || self.tensors.contains_key(&format!("model.{key}"))
    }

    /// Removes `key` (also found under `model.` + `key`) and checks its shape.
    pub fn take(&mut self, key: &str, expected: &[usize]) -> Result<HostTensor> {
        let t = match self.tensors.remove(key) {
            Some(t) => t,
            None => self.tensors.remove(&format!("model.{key}")).ok_or_else(|| {
                ModelError::MissingTensor { path: self.source.clone(), key: key.to_string() }
            })?,
        };
        if t.shape != expected {
            return Err(ModelError::ShapeMismatch {
                path: self.source.clone(),
                key: key.to_string(),
                expected: expected.to_vec(),
                found: t.shape,
            });
        }
        Ok(t)
    }

    /// Reads every tensor of one safetensors file, casting F16/BF16/F64 to f32.
    pub fn read_safetensors(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        for (key, t) in parse_safetensors(path, &bytes)? {
            self.tensors.insert(key, t);
        }
        Ok(())
    }
}

/// Parses safetensors bytes into f32 tensors (F32, F16, BF16 and F64 are read, F16/BF16/F64
/// cast to f32), in data order; `path` labels errors.
///
/// The `safetensors` crate parses the header and checks the layout: the tensors' `data_offsets`
/// must cover the data section exactly, each range the byte size its dtype and shape imply, no
/// two ranges sharing a byte, no gap between them and nothing after the last. This function adds
/// a check the crate leaves out (a key that appears twice in the header, which a JSON map would
/// silently collapse to its last entry) and, when the crate rejects a file, works out which
/// tensor is at fault so that the error names the file and the tensor (overlapping, shifted or
/// reversed offsets, a dtype or shape that does not match the bytes, a truncated file). No
/// input panics, and nothing is allocated beyond the header and the returned values.
pub fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<Vec<(String, HostTensor)>> {
    if let Some(header) = header_bytes(bytes)
        && let Some(key) = duplicate_key(header)
    {
        return Err(ModelError::format(
            path,
            Some(&key),
            "duplicate tensor entry in the header".to_string(),
        ));
    }
    let (n, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| explain_safetensors_error(path, bytes, e))?;
    let data = &bytes[8 + n..];
    let mut out = Vec::new();
    for key in meta.offset_keys() {
        let Some(info) = meta.info(&key) else { continue };
        let (start, end) = info.data_offsets;
        let raw = &data[start..end];
        use safetensors::Dtype;
        let values: Vec<f32> = match info.dtype {
            Dtype::F32 => {
                raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            other => {
                return Err(ModelError::unsupported(
                    path,
                    Some(&key),
                    format!("dtype {other:?} (only F32, F16, BF16, F64)"),
                ));
            }
        };
        out.push((key, HostTensor { shape: info.shape.clone(), data: values }));
    }
    Ok(out)
}

/// The JSON header of safetensors bytes, when the length prefix fits the file.
fn header_bytes(bytes: &[u8]) -> Option<&[u8]> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = usize::try_from(n).ok()?.checked_add(8)?;
    bytes.get(8..end)
}

/// The first key that appears twice in a JSON object header; `None` for a header without
/// duplicates or one that is not a JSON object (the crate then reports it).
fn duplicate_key(header: &[u8]) -> Option<String> {
    struct Keys(Option<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
            struct Visit;
            impl<'de> serde::de::Visitor<'de> for Visit {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> std::result::Result<Keys, A::Error> {
                    let mut seen = std::collections::HashSet::new();
                    while let Some(key) = map.next_key::<String>()? {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        if let Some(k) = seen.replace(key) {
                            return Ok(Keys(Some(k)));
                        }
                    }
                    Ok(Keys(None))
                }
            }
            d.deserialize_map(Visit)
        }
    }
    serde_json::from_slice::<Keys>(header).ok().and_then(|k| k.0)
}

/// One tensor entry of a header the crate rejected, read leniently to name the culprit.
struct Entry {
    key: String,
    dtype: String,
    shape: Vec<u64>,
    start: u64,
    end: u64,
}

/// Turns the crate's error into one naming the file and, where one is at fault, the tensor.
fn explain_safetensors_error(
    path: &Path,
    bytes: &[u8],
    e: safetensors::SafeTensorError,
) -> ModelError {
    use safetensors::SafeTensorError as E;
    let fmt = |key: Option<&str>, d: String| ModelError::format(path, key, d);
    let len = bytes.len();
    if let Some(err) = header_length_error(path, bytes, &e) {
        return err;
    }
    let Some(header) = header_bytes(bytes) else {
        return fmt(None, format!("header: {e}"));
    };
    let entries = match header_entries(header) {
        Ok(entries) => entries,
        Err((key, detail)) => return fmt(key.as_deref(), detail),
    };
    let data_len = (len - 8 - header.len()) as u64;
    if let Some(err) = entries.iter().find_map(|x| entry_error(path, x)) {
        return err;
    }
    if let Some(err) = layout_error(path, &entries, data_len) {
        return err;
    }
    let key = match &e {
        E::InvalidOffset(k) => Some(k.as_str()),
        _ => None,
    };
    fmt(key, e.to_string())
}

/// The crate's errors about the 8-byte header length, explained.
fn header_length_error(
    path: &Path,
    bytes: &[u8],
    e: &safetensors::SafeTensorError,
) -> Option<ModelError> {
    use safetensors::SafeTensorError as E;
    let fmt = |d: String| Some(ModelError::format(path, None, d));
    let len = bytes.len();
    let declared =
        || bytes.get(..8).map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    match e {
        E::HeaderTooSmall => fmt(format!("{len} bytes, shorter than the 8-byte header length")),
        E::InvalidHeaderLength => {
            let n = declared();
            fmt(format!("header length {n} exceeds the file ({len} bytes): truncated file?"))
        }
        E::HeaderTooLarge => {
            let n = declared();
            fmt(format!("header length {n} is over the safetensors limit (100 MB)"))
        }
        _ => None,
    }
}

/// An entry's own fault: an unknown dtype, reversed offsets, or a size that does not match its
/// dtype and shape.
fn entry_error(path: &Path, x: &Entry) -> Option<ModelError> {
    let fmt = |key: Option<&str>, d: String| Some(ModelError::format(path, key, d));
    let k = Some(x.key.as_str());
    let Ok(dtype) = serde_json::from_value::<safetensors::Dtype>(x.dtype.clone().into()) else {
        return Some(ModelError::unsupported(path, k, format!("dtype {}", x.dtype)));
    };
    if x.start > x.end {
        return fmt(k, format!("data_offsets [{}, {}] are reversed (begin > end)", x.start, x.end));
    }
    let bits = x
        .shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.bitsize() as u64));
    let Some(bits) = bits.filter(|b| usize::try_from(*b).is_ok()) else {
        return fmt(k, format!("shape {:?} overflows", x.shape));
    };
    if bits % 8 != 0 || bits / 8 != x.end - x.start {
        return fmt(
            k,
            format!(
                "shape {:?} of {} needs {} bytes, data_offsets [{}, {}] hold {}",
                x.shape,
                x.dtype,
                bits.div_ceil(8),
                x.start,
                x.end,
                x.end - x.start
            ),
        );
    }
    None
}

/// The ranges in data order must tile the data section: an overlap, a gap, or a header that
/// describes more or fewer bytes than the file holds.
fn layout_error(path: &Path, entries: &[Entry], data_len: u64) -> Option<ModelError> {
    let fmt = |key: Option<&str>, d: String| Some(ModelError::format(path, key, d));
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| (a.start, a.end, &a.key).cmp(&(b.start, b.end, &b.key)));
    let mut covered = 0u64;
    let mut prev: Option<&Entry> = None;
    for x in &sorted {
        let at = |p: Option<&Entry>| {
            p.map(|p| format!("tensor `{}` at [{}, {}]", p.key, p.start, p.end))
        };
        if x.start < covered {
            return fmt(
                Some(&x.key),
                format!(
                    "data_offsets [{}, {}] overlap {}",
                    x.start,
                    x.end,
                    at(prev).unwrap_or_default()
                ),
            );
        }
        if x.start > covered {
            return fmt(
                Some(&x.key),
                format!(
                    "data_offsets [{}, {}] leave bytes {covered}..{} after {} covered by no \
                     tensor (shifted offsets?)",
                    x.start,
                    x.end,
                    x.start,
                    at(prev).unwrap_or_else(|| "the start of the data section".into())
                ),
            );
        }
        covered = x.end;
        if x.end > x.start {
            prev = Some(x);
        }
    }
    if covered > data_len {
        let k = sorted.iter().find(|x| x.end > data_len).map(|x| x.key.as_str());
        return fmt(
            k,
            format!(
                "the header describes {covered} bytes of tensor data, the file holds {data_len}: \
                 truncated file?"
            ),
        );
    }
    if covered < data_len {
        let after = prev.map_or(String::new(), |p| format!(" after tensor `{}`", p.key));
        return fmt(
            prev.map(|p| p.key.as_str()),
            format!(
                "{} bytes at the end of the data section{after} are covered by no tensor \
                 (data section {data_len} bytes, tensors end at {covered})",
                data_len - covered
            ),
        );
    }
    None
}

/// The tensor entries of a header, or the key (if any) and a description of what is malformed.
fn header_entries(header: &[u8]) -> std::result::Result<Vec<Entry>, (Option<String>, String)> {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| (None, format!("header: {e}")))?;
    let mut entries = Vec::new();
    for (key, v) in map {
        if key == "__metadata__" {
            continue;
        }
        let bad = |what: &str| (Some(key.clone()), format!("header entry: {what}"));
        let dtype =
            v.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no dtype string"))?;
        let shape = v
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(serde_json::Value::as_u64).collect::<Option<Vec<u64>>>())
            .ok_or_else(|| bad("shape is not a list of non-negative integers"))?;
        let offsets = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(serde_json::Value::as_u64).collect::<Option<Vec<u64>>>())
            .filter(|o| o.len() == 2)
            .ok_or_else(|| bad("data_offsets is not a pair of non-negative integers"))?;
        entries.push(Entry {
            dtype: dtype.to_string(),
            shape,
            start: offsets[0],
            end: offsets[1],
            key,
        });
    }
    Ok(entries)
}

/// Serialises f32 tensors as a safetensors file (keys sorted, 8-byte aligned header).
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).unwrap_or_default());
    }
    let mut offset = 0usize;
    for (k, t) in tensors {
        let len = t.data.len() * 4;
        header.insert(
            k.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut h =
        serde_json::to_vec(&header).map_err(|e| ModelError::format(path, None, e.to_string()))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut buf = Vec::with_capacity(8 + h.len() + offset);
    buf.extend_from_slice(&(h.len() as u64).to_le_bytes());
    buf.extend_from_slice(&h);
    for t in tensors.values() {
        for v in &t.data {
            buf.extend_from_slice(&v.to_le_bytes());
        }
    }
    crate::error::write_file(path, buf.as_ref())
}
