//! Saving and restoring optimizer state, keyed by parameter path.
//!
//! Two files in a directory, both written atomically (temporary file, then rename):
//!
//! - `optimizer.json`: format tag, the full [`OptimizerConfig`], step and skip counters, and per
//!   matrix its math shape, side and subspaces;
//! - `optimizer.safetensors`: Adam moments (f32) and bases (f64, `dim x rank`) under
//!   `matrix/{path}/{subspace}/{m1|m2|basis}` and `adam/{path}/{m1|m2}`.
//!
//! Randomized refreshes draw their seeds from (run seed, path, subspace, step), so no RNG
//! stream needs saving. Null-space projectors are not saved: they are a function of the
//! pretrained model and the general text, cached by the trainer, and re-registered on resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use faer::Mat;
use gems_subspace::{Side, SubspaceBasis};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::adam::AdamMoments;
use crate::config::{OptimizerConfig, Subspace};
use crate::error::{OptimError, Result};
use crate::matrix::{MatrixState, SubspaceState};
use crate::optimizer::Optimizer;

const FORMAT: &str = "gems-optim-state/1";
const JSON: &str = "optimizer.json";
const TENSORS: &str = "optimizer.safetensors";

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: String,
    config: OptimizerConfig,
    step: u64,
    skipped: u64,
    matrices: BTreeMap<String, MatrixManifest>,
    adam: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct MatrixManifest {
    shape: [usize; 2],
    side: Side,
    transposed: bool,
    subspaces: Vec<SubspaceManifest>,
}

#[derive(Serialize, Deserialize)]
struct SubspaceManifest {
    kind: Subspace,
    has_basis: bool,
    has_moments: bool,
}

/// Owned bytes of one tensor before serialisation.
struct Blob {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// The bytes of a moment, refusing non-finite values: a corrupted state must never replace the
/// last good one on disk.
fn f32_blob<const D: usize>(key: &str, tensor: &Tensor<D>) -> Result<Blob> {
    let shape = tensor.dims().to_vec();
    let values = tensor
        .to_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| OptimError::TensorRead(format!("{e:?}")))?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(OptimError::State {
            file: key.to_string(),
            detail: format!(
                "holds a non-finite value ({} at index {i}); refusing to save a corrupted state",
                values[i]
            ),
        });
    }
    Ok(Blob {
        dtype: Dtype::F32,
        shape,
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    })
}

fn basis_blob(basis: &SubspaceBasis) -> Blob {
    let q = basis.matrix();
    let mut bytes = Vec::with_capacity(q.nrows() * q.ncols() * 8);
    for i in 0..q.nrows() {
        for j in 0..q.ncols() {
            bytes.extend_from_slice(&q[(i, j)].to_le_bytes());
        }
    }
    Blob { dtype: Dtype::F64, shape: vec![q.nrows(), q.ncols()], bytes }
}

impl Optimizer {
    /// Writes the state into `dir` (created if missing); see the module docs for the layout.
    ///
    /// # Errors
    /// I/O failures or a failed device read, naming the file.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| OptimError::state(dir.display(), e))?;
        let mut blobs: BTreeMap<String, Blob> = BTreeMap::new();
        let mut matrices = BTreeMap::new();
        for (path, state) in &self.matrices {
            let mut subspaces = Vec::new();
            for s in &state.subspaces {
                let key = format!("matrix/{path}/{}", s.kind.as_str());
                if let Some(b) = &s.basis {
                    blobs.insert(format!("{key}/basis"), basis_blob(b));
                }
                if let Some(m) = &s.moments {
                    for (name, t) in [("m1", &m.first), ("m2", &m.second)] {
                        let k = format!("{key}/{name}");
                        blobs.insert(k.clone(), f32_blob(&k, t)?);
                    }
                }
                subspaces.push(SubspaceManifest {
                    kind: s.kind,
                    has_basis: s.basis.is_some(),
                    has_moments: s.moments.is_some(),
                });
            }
            matrices.insert(
                path.clone(),
                MatrixManifest {
                    shape: state.shape,
                    side: state.side,
                    transposed: state.transposed,
                    subspaces,
                },
            );
        }
        for (path, m) in &self.adam {
            for (name, t) in [("m1", &m.first), ("m2", &m.second)] {
                let k = format!("adam/{path}/{name}");
                blobs.insert(k.clone(), f32_blob(&k, t)?);
            }
        }
        let tensors_path = dir.join(TENSORS);
        let views: Vec<(String, TensorView<'_>)> = blobs
            .iter()
            .map(|(k, b)| {
                TensorView::new(b.dtype, b.shape.clone(), &b.bytes)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| OptimError::state(tensors_path.display(), e))
            })
            .collect::<Result<_>>()?;
        let bytes = safetensors::serialize(views, None)
            .map_err(|e| OptimError::state(tensors_path.display(), e))?;
        gems_io::write_atomic(&tensors_path, &bytes)?;
        let manifest = Manifest {
            format: FORMAT.into(),
            config: self.config.clone(),
            step: self.step,
            skipped: self.skipped,
            matrices,
            adam: self.adam.keys().cloned().collect(),
        };
        let json_path = dir.join(JSON);
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| OptimError::state(json_path.display(), e))?;
        Ok(gems_io::write_atomic(&json_path, &json)?)
    }

    /// Restores a state saved by [`save`](Self::save), with tensors on `device`. Null-space
    /// projectors must be registered again.
    ///
    /// # Errors
    /// Missing or malformed files, naming the file and the key.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let json_path = dir.join(JSON);
        let json =
            std::fs::read(&json_path).map_err(|e| OptimError::state(json_path.display(), e))?;
        let manifest: Manifest =
            serde_json::from_slice(&json).map_err(|e| OptimError::state(json_path.display(), e))?;
        if manifest.format != FORMAT {
            return Err(OptimError::state(
                json_path.display(),
                format!("format `{}`, expected `{FORMAT}`", manifest.format),
            ));
        }
        let tensors_path = dir.join(TENSORS);
        let bytes = std::fs::read(&tensors_path)
            .map_err(|e| OptimError::state(tensors_path.display(), e))?;
        let tensors = SafeTensors::deserialize(&bytes)
            .map_err(|e| OptimError::state(tensors_path.display(), e))?;
        let reader = Reader { tensors: &tensors, file: tensors_path, device };

        let mut optimizer = Optimizer::new(manifest.config)?;
        optimizer.step = manifest.step;
        optimizer.skipped = manifest.skipped;
        for (path, m) in manifest.matrices {
            let mut subspaces = Vec::new();
            for s in m.subspaces {
                let key = format!("matrix/{path}/{}", s.kind.as_str());
                let basis = if s.has_basis {
                    Some(reader.basis(&format!("{key}/basis"), m.side)?)
                } else {
                    None
                };
                let moments = if s.has_moments {
                    Some(AdamMoments {
                        first: reader.f32::<2>(&format!("{key}/m1"))?,
                        second: reader.f32::<2>(&format!("{key}/m2"))?,
                    })
                } else {
                    None
                };
                subspaces.push(SubspaceState { kind: s.kind, basis, moments });
            }
            optimizer.matrices.insert(
                path,
                MatrixState {
                    shape: m.shape,
                    side: m.side,
                    transposed: m.transposed,
                    subspaces,
                    combined_basis: None,
                    projected_basis: None,
                    projected_each: Vec::new(),
                },
            );
        }
        for path in manifest.adam {
            let moments = AdamMoments {
                first: reader.f32::<1>(&format!("adam/{path}/m1"))?,
                second: reader.f32::<1>(&format!("adam/{path}/m2"))?,
            };
            optimizer.adam.insert(path, moments);
        }
        Ok(optimizer)
    }
}

struct Reader<'a> {
    tensors: &'a SafeTensors<'a>,
    file: PathBuf,
    device: &'a Device,
}

impl Reader<'_> {
    fn view(&self, key: &str, dtype: Dtype, rank: usize) -> Result<TensorView<'_>> {
        let view = self
            .tensors
            .tensor(key)
            .map_err(|e| OptimError::state(self.file.display(), format!("key `{key}`: {e}")))?;
        if view.dtype() != dtype || view.shape().len() != rank {
            return Err(OptimError::state(
                self.file.display(),
                format!(
                    "key `{key}`: {:?} {:?}, expected {dtype:?} of rank {rank}",
                    view.dtype(),
                    view.shape()
                ),
            ));
        }
        Ok(view)
    }

    fn f32<const D: usize>(&self, key: &str) -> Result<Tensor<D>> {
        let view = self.view(key, Dtype::F32, D)?;
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Tensor::from_data(TensorData::new(values, view.shape().to_vec()), self.device))
    }

    fn basis(&self, key: &str, side: Side) -> Result<SubspaceBasis> {
        let view = self.view(key, Dtype::F64, 2)?;
        let (rows, cols) = (view.shape()[0], view.shape()[1]);
        let values: Vec<f64> = view
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let q = Mat::from_fn(rows, cols, |i, j| values[i * cols + j]);
        SubspaceBasis::from_orthonormal(side, q)
            .map_err(|e| OptimError::state(self.file.display(), format!("key `{key}`: {e}")))
    }
}
