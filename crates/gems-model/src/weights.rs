//! Host-side weights: a map from Hugging Face key to an f32 array in PyTorch layout, and the
//! safetensors reader and writer.
//!
//! Every loader (Hugging Face directory, GGUF) produces a [`WeightMap`], and the decoder is built
//! from one, so key checks, shape checks and error messages live in one place. The safetensors
//! parser is written here (the format is an 8-byte header length, a JSON header and raw data) so
//! that every offset is checked against the file length: a truncated or hostile file is an error
//! naming the file and key, never a panic or an allocation larger than the file.

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

/// Parses safetensors bytes into f32 tensors; `path` labels errors.
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
        fmt(None, format!("header length {n} exceeds the file ({} bytes)", bytes.len()))
    })? as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..header_end])
            .map_err(|e| fmt(None, format!("header is not a JSON object: {e}")))?;
    let data = &bytes[header_end..];
    let mut out = Vec::new();
    for (key, info) in header {
        if key == "__metadata__" {
            continue;
        }
        let k = Some(key.as_str());
        let dtype =
            info.get("dtype").and_then(|v| v.as_str()).ok_or_else(|| fmt(k, "no dtype".into()))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|v| v.as_array())
            .ok_or_else(|| fmt(k, "no shape".into()))?
            .iter()
            .map(|d| d.as_u64().map(|x| x as usize).ok_or_else(|| fmt(k, "bad shape entry".into())))
            .collect::<Result<_>>()?;
        let offs = info
            .get("data_offsets")
            .and_then(|v| v.as_array())
            .filter(|a| a.len() == 2)
            .ok_or_else(|| fmt(k, "no data_offsets".into()))?;
        let (start, end) = match (offs[0].as_u64(), offs[1].as_u64()) {
            (Some(s), Some(e)) if s <= e && e <= data.len() as u64 => (s as usize, e as usize),
            _ => {
                return Err(fmt(
                    k,
                    format!(
                        "data_offsets {offs:?} outside the data section ({} bytes): truncated file?",
                        data.len()
                    ),
                ));
            }
        };
        let count = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| fmt(k, format!("shape {shape:?} overflows")))?;
        let width = match dtype {
            "F32" => 4,
            "F16" | "BF16" => 2,
            "F64" => 8,
            other => {
                return Err(ModelError::unsupported(
                    path,
                    k,
                    format!("dtype {other} (only F32, F16, BF16, F64)"),
                ));
            }
        };
        let raw = &data[start..end];
        if count.checked_mul(width) != Some(raw.len()) {
            return Err(fmt(
                k,
                format!(
                    "shape {shape:?} of {dtype} needs {} bytes, found {}",
                    count.saturating_mul(width),
                    raw.len()
                ),
            ));
        }
        let values: Vec<f32> = match dtype {
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
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
        };
        out.push((key, HostTensor { shape, data: values }));
    }
    Ok(out)
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
    std::fs::write(path, buf).map_err(|e| ModelError::io(path, e))
}
