//! Host-side weights: a map from Hugging Face key to an f32 array in PyTorch layout, and the
//! safetensors reader and writer.
//!
//! Every loader (Hugging Face directory, GGUF) produces a [`WeightMap`], and the decoder is built
//! from one, so key checks, shape checks and error messages live in one place. The safetensors
//! parser is written here (the format is an 8-byte header length, a JSON header and raw data) so
//! that every offset is checked against the file length and the others: a truncated, corrupted
//! or hostile file is an error naming the file and key, never a panic, never data read from the
//! wrong bytes, and never an allocation larger than the file.

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

/// One tensor's header entry as written; unknown fields are skipped without being stored.
#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The header's tensor entries in file order, duplicates kept (a JSON map would keep only the
/// last) and `__metadata__` skipped without being stored, so a hostile header costs memory only
/// for what this reader uses.
struct HeaderEntries(Vec<(String, RawEntry)>);

impl<'de> serde::Deserialize<'de> for HeaderEntries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = HeaderEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<HeaderEntries, A::Error> {
                use serde::de::Error as _;
                let mut v = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "__metadata__" {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        continue;
                    }
                    let entry = map
                        .next_value::<RawEntry>()
                        .map_err(|e| A::Error::custom(format!("tensor `{key}`: {e}")))?;
                    v.push((key, entry));
                }
                Ok(HeaderEntries(v))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// One header entry of a safetensors file, checked on its own.
struct SafetensorsEntry {
    key: String,
    dtype: &'static str,
    width: usize,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// Parses safetensors bytes into f32 tensors; `path` labels errors.
///
/// As the safetensors specification requires, the tensors' `data_offsets` must cover the data
/// section exactly: each range `[begin, end)` with `begin <= end` and the byte size its dtype and
/// shape imply, no two ranges sharing a byte, no gap between them and nothing after the last.
/// Any other layout (overlapping, shifted or reversed offsets, a wrong dtype or shape, a
/// duplicated key) is an error naming the file and the tensor; "truncated file?" is suggested
/// only when the file really ends before the data the header describes.
pub fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<Vec<(String, HostTensor)>> {
    let fmt = |key: Option<&str>, d: String| ModelError::format(path, key, d);
    if bytes.len() < 8 {
        return Err(fmt(
            None,
            format!("{} bytes, shorter than the 8-byte header length", bytes.len()),
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
    let header_end = 8u64.checked_add(n).filter(|&e| e <= bytes.len() as u64).ok_or_else(|| {
        fmt(
            None,
            format!("header length {n} exceeds the file ({} bytes): truncated file?", bytes.len()),
        )
    })? as usize;
    let HeaderEntries(header) = serde_json::from_slice(&bytes[8..header_end])
        .map_err(|e| fmt(None, format!("header: {e}")))?;
    let data = &bytes[header_end..];
    let mut entries = Vec::with_capacity(header.len());
    let mut seen = std::collections::HashSet::with_capacity(header.len());
    for (key, _) in &header {
        if !seen.insert(key.as_str()) {
            return Err(fmt(Some(key), "duplicate tensor entry in the header".into()));
        }
    }
    drop(seen);
    for (key, info) in header {
        let k = Some(key.as_str());
        let (dtype, width) = match info.dtype.as_str() {
            "F32" => ("F32", 4),
            "F16" => ("F16", 2),
            "BF16" => ("BF16", 2),
            "F64" => ("F64", 8),
            other => {
                return Err(ModelError::unsupported(
                    path,
                    k,
                    format!("dtype {other} (only F32, F16, BF16, F64)"),
                ));
            }
        };
        let shape: Vec<usize> = info
            .shape
            .iter()
            .map(|&d| {
                usize::try_from(d).map_err(|_| fmt(k, format!("shape entry {d} is too large")))
            })
            .collect::<Result<_>>()?;
        let (start, end) = match info.data_offsets.map(usize::try_from) {
            [Ok(s), Ok(e)] if s <= e => (s, e),
            [Ok(s), Ok(e)] => {
                return Err(fmt(k, format!("data_offsets [{s}, {e}] are reversed (begin > end)")));
            }
            _ => {
                return Err(fmt(k, format!("data_offsets {:?} are too large", info.data_offsets)));
            }
        };
        let count = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| fmt(k, format!("shape {shape:?} overflows")))?;
        if count.checked_mul(width) != Some(end - start) {
            return Err(fmt(
                k,
                format!(
                    "shape {shape:?} of {dtype} needs {} bytes, data_offsets [{start}, {end}] hold {}",
                    count.saturating_mul(width),
                    end - start
                ),
            ));
        }
        entries.push(SafetensorsEntry { key, dtype, width, shape, start, end });
    }
    check_safetensors_layout(path, &mut entries, data.len())?;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let raw = &data[e.start..e.end];
        let values: Vec<f32> = match e.dtype {
            "F32" => {
                raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
            }
            "F16" => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            "BF16" => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => raw
                .chunks_exact(e.width)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
        };
        out.push((e.key, HostTensor { shape: e.shape, data: values }));
    }
    Ok(out)
}

/// Checks that the entries' ranges tile `[0, data_len)` exactly; sorts them by offset.
fn check_safetensors_layout(
    path: &Path,
    entries: &mut [SafetensorsEntry],
    data_len: usize,
) -> Result<()> {
    let fmt = |key: &str, d: String| ModelError::format(path, Some(key), d);
    entries.sort_by_key(|e| (e.start, e.end));
    let mut covered = 0usize;
    let mut prev: Option<&SafetensorsEntry> = None;
    for e in entries.iter() {
        if e.start < covered {
            let p = prev.map_or("", |p| p.key.as_str());
            let (ps, pe) = prev.map_or((0, 0), |p| (p.start, p.end));
            return Err(fmt(
                &e.key,
                format!(
                    "data_offsets [{}, {}] overlap tensor `{p}` at [{ps}, {pe}]",
                    e.start, e.end
                ),
            ));
        }
        if e.start > covered {
            let after = prev.map_or("the start of the data section".to_string(), |p| {
                format!("tensor `{}` at [{}, {}]", p.key, p.start, p.end)
            });
            return Err(fmt(
                &e.key,
                format!(
                    "data_offsets [{}, {}] leave bytes {covered}..{} after {after} covered by no \
                     tensor (shifted offsets?)",
                    e.start, e.end, e.start
                ),
            ));
        }
        covered = e.end;
        if e.end > e.start {
            prev = Some(e);
        }
    }
    if covered > data_len {
        // The offsets tile a range longer than the file holds: the file was cut short.
        let e = entries.iter().find(|e| e.end > data_len).map_or("", |e| e.key.as_str());
        return Err(fmt(
            e,
            format!(
                "the header describes {covered} bytes of tensor data, the file holds {data_len}: \
                 truncated file?"
            ),
        ));
    }
    if covered < data_len {
        let after = prev.map_or(String::new(), |p| format!(" after tensor `{}`", p.key));
        return Err(ModelError::format(
            path,
            prev.map(|p| p.key.as_str()),
            format!(
                "{} bytes at the end of the data section{after} are covered by no tensor \
                 (data section {data_len} bytes, tensors end at {covered})",
                data_len - covered
            ),
        ));
    }
    Ok(())
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
