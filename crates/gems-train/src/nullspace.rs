//! Null-space projectors from general-domain text (GEMS-SPEC §4).
//!
//! The pretrained model (plain device, no gradients) runs over WikiText-2 valid; every tuned
//! projection's outputs (or inputs, for the AlphaEdit variant) at real tokens are accumulated
//! into K = (1/N) sum y y^T in f64; K's eigendecomposition gives P = U_null U_null^T.
//! Projectors are cached in one safetensors file per (model, text, settings) key: the
//! eigenvalues and the stored orthonormal basis in f64, so a cached projector is bit-identical.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::{Device, Int, Tensor, TensorData};
use faer::Mat;
use gems_data::TextTokenizer;
use gems_model::{Llama, TokenBatch};
use gems_optim::path_matches;
use gems_subspace::{NullSpaceProjector, ProjectorSide, SecondMomentAccumulator};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::NullSpaceBuild;
use crate::error::{Result, TrainError};
use crate::eval::text_windows;
use crate::progress::Reporter;

/// Directions kept for one tuned matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerNullSpace {
    /// Parameter path.
    pub path: String,
    /// Dimension of the statistics (m for the output side).
    pub dim: usize,
    /// Null (free) directions kept: the rank of P.
    pub null_directions: usize,
    /// Whether the fallback (smallest max(1, dim/20)) was used.
    pub used_fallback: bool,
    /// Largest eigenvalue of K.
    pub max_eigenvalue: f64,
}

/// What building (or loading) the projectors did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NullSpaceReport {
    /// The cache file.
    pub cache_file: PathBuf,
    /// Whether the projectors came from the cache.
    pub from_cache: bool,
    /// Text tokens run through the model (0 when cached).
    pub tokens: usize,
    /// Seconds spent.
    pub seconds: f64,
    /// Per tuned matrix, in path order.
    pub layers: Vec<LayerNullSpace>,
}

/// Projectors keyed by parameter path.
pub type Projectors = BTreeMap<String, Arc<NullSpaceProjector>>;

/// The parameter paths of a decoder's projections that match `targets`, with
/// `(layer, projection name)`; layers frozen by [`Llama::freeze_lower_layers`] are left out.
pub fn tuned_projections(model: &Llama, targets: &[String]) -> Vec<(String, usize, &'static str)> {
    let mut out = Vec::new();
    for (i, layer) in model.layers.iter().enumerate().skip(model.frozen_layers) {
        for (name, _) in layer.projections() {
            let path = format!("layers.{i}.{name}.weight");
            if targets.iter().any(|t| path_matches(t, &path)) {
                out.push((path, i, name));
            }
        }
    }
    out
}

/// Where the statistics come from and where they are cached.
pub struct GeneralText<'a> {
    /// Tokenizer of the text (the model's text vocabulary).
    pub tokenizer: &'a dyn TextTokenizer,
    /// The general-domain text file.
    pub text: &'a Path,
    /// A key of the model the statistics describe (part of the cache key).
    pub model_key: &'a str,
    /// Cache directory.
    pub cache_dir: &'a Path,
}

impl std::fmt::Debug for GeneralText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneralText")
            .field("text", &self.text)
            .field("model_key", &self.model_key)
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

/// The flat positions (`b * seq_len + t`) of a padded batch's real tokens, as an index tensor
/// for `select(0, ..)` on `[b * seq_len, d]` rows, and their count.
pub(crate) fn real_rows(batch: &TokenBatch, device: &Device) -> (Tensor<1, Int>, usize) {
    let real: Vec<i64> =
        batch.mask.iter().enumerate().filter_map(|(i, &m)| m.then_some(i as i64)).collect();
    let n = real.len();
    (Tensor::<1, Int>::from_data(TensorData::new(real, [n]), device), n)
}

/// Builds the projectors of every tuned projection, or loads them from `cache_dir` when a
/// file for the same model key, text and settings exists.
///
/// # Errors
/// The text cannot be read, a forward pass fails, the cache is malformed.
pub fn projectors(
    model: &Llama,
    source: &GeneralText<'_>,
    targets: &[String],
    settings: &NullSpaceBuild,
    progress: &Reporter,
) -> Result<(Projectors, NullSpaceReport)> {
    let (tokenizer, text_path, model_key, cache_dir) =
        (source.tokenizer, source.text, source.model_key, source.cache_dir);
    let started = Instant::now();
    let tuned = tuned_projections(model, targets);
    if tuned.is_empty() {
        return Err(TrainError::Config(format!("no projection matches the targets {targets:?}")));
    }
    let key = cache_key(model_key, settings, text_path, &tuned)?;
    let cache_file = cache_dir.join(format!("nullspace-{}.safetensors", &key[..16]));
    if cache_file.is_file() {
        let projectors = read_cache(&cache_file, settings.side, &tuned)?;
        let report = report(cache_file, true, 0, started, &projectors);
        return Ok((projectors, report));
    }

    let text = text_windows(text_path, tokenizer, settings.max_tokens, settings.window)?;
    let wanted: BTreeMap<(usize, &'static str), String> =
        tuned.iter().map(|(p, i, n)| ((*i, *n), p.clone())).collect();
    let accumulators = second_moments(model, &text.windows, &wanted, settings.side, progress)?;
    let mut projectors = Projectors::new();
    let phase = progress.phase("null-space eigendecompositions", tuned.len() as u64);
    for (k, ((layer, name), acc)) in accumulators.iter().enumerate() {
        let path = &wanted[&(*layer, *name)];
        let p = acc.projector(settings.rule, settings.side)?;
        projectors.insert(path.clone(), Arc::new(p));
        phase.update(k as u64 + 1, path);
    }
    phase.finish(None);
    std::fs::create_dir_all(cache_dir).map_err(|e| TrainError::io(cache_dir, e))?;
    write_cache(&cache_file, &projectors)?;
    let report = report(cache_file, false, text.tokens, started, &projectors);
    Ok((projectors, report))
}

/// The second moments of the `wanted` projections' inputs or outputs (`side`) over the real
/// tokens of `windows`, run through `model` in batches of 8.
fn second_moments(
    model: &Llama,
    windows: &[Vec<u32>],
    wanted: &BTreeMap<(usize, &'static str), String>,
    side: ProjectorSide,
    progress: &Reporter,
) -> Result<BTreeMap<(usize, &'static str), SecondMomentAccumulator>> {
    let mut accumulators: BTreeMap<(usize, &'static str), SecondMomentAccumulator> =
        BTreeMap::new();
    let phase = progress.phase("null-space statistics", windows.len() as u64);
    let device = model.device();
    let batch_rows = 8;
    let mut done = 0;
    let mut failure: Option<TrainError> = None;
    for chunk in windows.chunks(batch_rows) {
        let batch = TokenBatch::pad(chunk, 0, false)?;
        let (index, _) = real_rows(&batch, &device);
        let mut hook = |layer: usize, name: &'static str, x: &Tensor<3>, y: &Tensor<3>| {
            if failure.is_some() || !wanted.contains_key(&(layer, name)) {
                return;
            }
            let t = match side {
                ProjectorSide::Output => y,
                ProjectorSide::Input => x,
            };
            let [b, s, d] = t.dims();
            let rows = t.clone().reshape([b * s, d]).select(0, index.clone());
            let acc = match accumulators.entry((layer, name)) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => {
                    match SecondMomentAccumulator::new(d) {
                        Ok(a) => e.insert(a),
                        Err(err) => {
                            failure = Some(err.into());
                            return;
                        }
                    }
                }
            };
            if let Err(err) = acc.add_tensor_rows(rows) {
                failure = Some(err.into());
            }
        };
        model.trace_projections(&batch, &mut hook)?;
        if let Some(err) = failure.take() {
            return Err(err);
        }
        done += chunk.len() as u64;
        phase.update(done, "windows");
    }
    phase.finish(None);
    Ok(accumulators)
}

fn report(
    cache_file: PathBuf,
    from_cache: bool,
    tokens: usize,
    started: Instant,
    projectors: &Projectors,
) -> NullSpaceReport {
    let layers = projectors
        .iter()
        .map(|(path, p)| LayerNullSpace {
            path: path.clone(),
            dim: p.dim(),
            null_directions: p.null_directions(),
            used_fallback: p.used_fallback(),
            max_eigenvalue: p.eigenvalues().last().copied().unwrap_or(0.0),
        })
        .collect();
    NullSpaceReport {
        cache_file,
        from_cache,
        tokens,
        seconds: started.elapsed().as_secs_f64(),
        layers,
    }
}

fn cache_key(
    model_key: &str,
    settings: &NullSpaceBuild,
    text_path: &Path,
    tuned: &[(String, usize, &'static str)],
) -> Result<String> {
    let text_meta = std::fs::metadata(text_path).map_err(|e| TrainError::io(text_path, e))?;
    let mut h = Sha256::new();
    h.update(model_key.as_bytes());
    h.update(serde_json::to_vec(settings).unwrap_or_default());
    h.update(text_path.display().to_string().as_bytes());
    h.update(text_meta.len().to_le_bytes());
    for (p, _, _) in tuned {
        h.update(p.as_bytes());
    }
    Ok(format!("{:x}", h.finalize()))
}

fn f64_bytes(values: impl Iterator<Item = f64>) -> Vec<u8> {
    values.flat_map(f64::to_le_bytes).collect()
}

fn write_cache(path: &Path, projectors: &Projectors) -> Result<()> {
    let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut meta = BTreeMap::new();
    for (name, p) in projectors {
        let (values, null, fallback, basis) = p.parts();
        blobs.push((
            format!("{name}/eigenvalues"),
            vec![values.len()],
            f64_bytes(values.iter().copied()),
        ));
        let (r, c) = (basis.nrows(), basis.ncols());
        let data = f64_bytes((0..r).flat_map(|i| (0..c).map(move |j| basis[(i, j)])));
        blobs.push((format!("{name}/basis"), vec![r, c], data));
        meta.insert(name.clone(), format!("{null},{fallback}"));
    }
    let views: Vec<(String, TensorView<'_>)> = blobs
        .iter()
        .map(|(k, shape, bytes)| {
            TensorView::new(Dtype::F64, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| TrainError::format(path, e.to_string()))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, Some(meta.into_iter().collect()))
        .map_err(|e| TrainError::format(path, e.to_string()))?;
    Ok(crate::checkpoint::write_atomic(path, &bytes)?)
}

fn read_cache(
    path: &Path,
    side: ProjectorSide,
    tuned: &[(String, usize, &'static str)],
) -> Result<Projectors> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let (_, header) =
        SafeTensors::read_metadata(&bytes).map_err(|e| TrainError::format(path, e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors =
        SafeTensors::deserialize(&bytes).map_err(|e| TrainError::format(path, e.to_string()))?;
    let read = |key: &str| -> Result<(Vec<usize>, Vec<f64>)> {
        let t = tensors
            .tensor(key)
            .map_err(|e| TrainError::format(path, format!("tensor `{key}`: {e}")))?;
        if t.dtype() != Dtype::F64 {
            return Err(TrainError::format(path, format!("tensor `{key}` is not f64")));
        }
        let values =
            t.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        Ok((t.shape().to_vec(), values.collect()))
    };
    let mut out = Projectors::new();
    for (name, _, _) in tuned {
        let m = meta
            .get(name)
            .ok_or_else(|| TrainError::format(path, format!("no entry for `{name}`")))?;
        let (null, fallback) = m
            .split_once(',')
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<bool>().ok()?)))
            .ok_or_else(|| TrainError::format(path, format!("bad metadata `{m}` for `{name}`")))?;
        let (_, values) = read(&format!("{name}/eigenvalues"))?;
        let (shape, data) = read(&format!("{name}/basis"))?;
        if shape.len() != 2 || shape[0] * shape[1] != data.len() {
            return Err(TrainError::format(path, format!("basis of `{name}` has shape {shape:?}")));
        }
        let basis = Mat::from_fn(shape[0], shape[1], |i, j| data[i * shape[1] + j]);
        let p = NullSpaceProjector::from_parts(side, values, null, fallback, basis)?;
        out.insert(name.clone(), Arc::new(p));
    }
    Ok(out)
}
