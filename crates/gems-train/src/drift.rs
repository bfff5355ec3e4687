//! How much tuning changed each projection's response to general text: the direct check of
//! what a null space promises.
//!
//! For every projection W that differs between a pretrained model and its tuned copy W', the
//! pretrained model runs over general text and, at every real token, the input x that W sees is
//! pushed through both: the relative change is ||(W' - W) x|| / ||W x||, summed in f64 over all
//! tokens (root of the summed squares over root of the summed squares). The inputs are the
//! pretrained model's, so the number isolates each matrix's own change from the changes of the
//! layers below it.
//!
//! With input-side projectors and strict mode the update satisfies ΔW x = 0 for x in the
//! calibration text's span, so the change on that text is near zero by construction; on
//! held-out text it says how far the span generalises. An output-side projector promises
//! nothing about ΔW x, which is what this measures.

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use gems_model::{Llama, TokenBatch};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::eval::TextWindows;
use crate::forward::read_f32;
use crate::nullspace::real_rows;
use crate::progress::Reporter;

/// The change of one projection's response to the text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionDrift {
    /// Parameter path (`layers.{i}.{name}.weight`).
    pub path: String,
    /// ||ΔW x|| / ||W x|| over every real token of the text.
    pub relative_change: f64,
    /// ||ΔW||_F / ||W||_F: the size of the update itself, for comparison.
    pub relative_weight_change: f64,
}

/// The drift of every changed projection, in layer and projection order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftReport {
    /// Real tokens the inputs were taken at.
    pub tokens: usize,
    /// One entry per projection whose weight changed.
    pub projections: Vec<ProjectionDrift>,
}

/// Squared norms accumulated for one projection.
#[derive(Default)]
struct Sums {
    delta: f64,
    base: f64,
}

/// Measures [`ProjectionDrift`] for every projection whose weight differs between `base` and
/// `tuned`, on the inputs `base` feeds it over `text`.
///
/// # Errors
/// The two models have different layer counts or projection shapes (naming the projection),
/// no projection changed, a forward pass fails, or a norm is not finite.
pub fn projection_drift(
    base: &Llama,
    tuned: &Llama,
    text: &TextWindows,
    progress: &Reporter,
) -> Result<DriftReport> {
    let deltas = weight_deltas(base, tuned)?;
    if deltas.is_empty() {
        return Err(TrainError::Config("no projection differs between the two models".into()));
    }
    let mut sums: BTreeMap<(usize, &'static str), Sums> = BTreeMap::new();
    let device = base.device();
    let phase = progress.phase("projection drift", text.windows.len() as u64);
    let (mut done, mut tokens) = (0, 0);
    let mut failure: Option<TrainError> = None;
    for chunk in text.windows.chunks(8) {
        let batch = TokenBatch::pad(chunk, 0, false)?;
        let (index, n_real) = real_rows(&batch, &device);
        tokens += n_real;
        let mut hook = |layer: usize, name: &'static str, x: &Tensor<3>, y: &Tensor<3>| {
            let Some((delta, _)) = deltas.get(&(layer, name)) else { return };
            if failure.is_some() {
                return;
            }
            let rows = |t: &Tensor<3>| {
                let [b, s, d] = t.dims();
                t.clone().reshape([b * s, d]).select(0, index.clone())
            };
            let change = rows(x).matmul(delta.clone());
            let squared = |t: Tensor<2>| read_f32(t.square().sum(), "projection drift");
            match (squared(change), squared(rows(y))) {
                (Ok(d), Ok(b)) => {
                    let s = sums.entry((layer, name)).or_default();
                    s.delta += d[0] as f64;
                    s.base += b[0] as f64;
                }
                (Err(e), _) | (_, Err(e)) => failure = Some(e),
            }
        };
        base.trace_projections(&batch, &mut hook)?;
        if let Some(err) = failure.take() {
            return Err(err);
        }
        done += chunk.len() as u64;
        phase.update(done, "windows");
    }
    phase.finish(None);
    Ok(DriftReport { tokens, projections: relative_changes(&deltas, &sums)? })
}

/// The drift of every changed projection from its accumulated squared norms.
fn relative_changes(
    deltas: &Deltas,
    sums: &BTreeMap<(usize, &'static str), Sums>,
) -> Result<Vec<ProjectionDrift>> {
    let mut projections = Vec::with_capacity(deltas.len());
    for ((layer, name), (_, weight_change)) in deltas {
        let path = format!("layers.{layer}.{name}.weight");
        let s = sums.get(&(*layer, *name)).ok_or_else(|| {
            TrainError::Training(format!("{path} was never reached by the forward pass"))
        })?;
        let relative_change = (s.delta / s.base).sqrt();
        if !relative_change.is_finite() {
            return Err(TrainError::Training(format!(
                "{path}: the change of its response is not finite ({} over {})",
                s.delta, s.base
            )));
        }
        projections.push(ProjectionDrift {
            path,
            relative_change,
            relative_weight_change: *weight_change,
        });
    }
    Ok(projections)
}

/// The weight differences W' - W (Burn layout, `[d_in, d_out]`) of every projection that
/// changed, with ||ΔW||_F / ||W||_F.
type Deltas = BTreeMap<(usize, &'static str), (Tensor<2>, f64)>;

fn weight_deltas(base: &Llama, tuned: &Llama) -> Result<Deltas> {
    if base.layers.len() != tuned.layers.len() {
        return Err(TrainError::Config(format!(
            "the tuned model has {} layers, the pretrained one {}",
            tuned.layers.len(),
            base.layers.len()
        )));
    }
    let norm = |t: Tensor<2>| -> Result<f64> {
        Ok((read_f32(t.square().sum(), "projection drift")?[0] as f64).sqrt())
    };
    let mut deltas = Deltas::new();
    for (i, (b, t)) in base.layers.iter().zip(&tuned.layers).enumerate() {
        for ((name, wb), (_, wt)) in b.projections().into_iter().zip(t.projections()) {
            let (wb, wt) = (wb.weight.val(), wt.weight.val());
            if wb.dims() != wt.dims() {
                return Err(TrainError::Config(format!(
                    "layers.{i}.{name}.weight: shape {:?} in the tuned model, {:?} in the \
                     pretrained one",
                    wt.dims(),
                    wb.dims()
                )));
            }
            let delta = wt.sub(wb.clone());
            let delta_norm = norm(delta.clone())?;
            if delta_norm > 0.0 {
                deltas.insert((i, name), (delta, delta_norm / norm(wb)?));
            }
        }
    }
    Ok(deltas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::tensor::Device;
    use gems_model::LlamaConfig;

    fn model(seed: u64) -> Llama {
        let text = r#"{"vocab_size": 16, "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}"#;
        let config = LlamaConfig::from_json(std::path::Path::new("config.json"), text).unwrap();
        Llama::init_random(&config, seed, &Device::flex()).unwrap()
    }

    fn text() -> TextWindows {
        let windows: Vec<Vec<u32>> =
            (0..3).map(|w| (0..10).map(|i| (w * 5 + i) % 16).collect()).collect();
        TextWindows { tokens: 30, windows }
    }

    /// Scaling one projection by 1 + e changes its response by exactly e (ΔW x = e W x) and its
    /// weight by e; no other projection is listed.
    #[test]
    fn a_scaled_projection_drifts_by_its_scale_and_alone() {
        let base = model(3);
        let mut tuned = base.clone();
        let w = &mut tuned.layers[1].mlp.up_proj.weight;
        *w = Param::from_tensor(w.val().mul_scalar(1.25));
        let report = projection_drift(&base, &tuned, &text(), &Reporter::silent()).unwrap();
        assert_eq!(report.tokens, 30);
        assert_eq!(report.projections.len(), 1);
        let p = &report.projections[0];
        assert_eq!(p.path, "layers.1.mlp.up_proj.weight");
        assert!((p.relative_change - 0.25).abs() < 1e-5, "{p:?}");
        assert!((p.relative_weight_change - 0.25).abs() < 1e-5, "{p:?}");
    }

    #[test]
    fn identical_models_and_other_shapes_are_errors() {
        let base = model(3);
        let err = projection_drift(&base, &base.clone(), &text(), &Reporter::silent());
        assert!(err.unwrap_err().to_string().contains("no projection differs"));
        let mut short = base.clone();
        short.layers.truncate(1);
        let err = projection_drift(&base, &short, &text(), &Reporter::silent());
        assert!(err.unwrap_err().to_string().contains("1 layers"));
    }
}
