//! Configuration of every method, serialisable so a run's exact settings sit beside its outputs.
//!
//! One [`OptimizerConfig`] describes any method. The ablations of GEMS-SPEC §5 are settings,
//! not separate code: `galore` is GEMS with one subspace and no null space, `gems
//! --single-subspace` is GEMS with one subspace, `gems --complement` sets [`GemsSettings::complement`].

use gems_subspace::{NullSpaceRule, ProjectionType, ProjectorSide, SvdMethod};
use serde::{Deserialize, Serialize};

use crate::error::{OptimError, Result};

/// The optimisation method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// AdamW on every parameter, on the shared gradient.
    Full,
    /// GaLore: one low-rank subspace of the shared gradient per tuned matrix, no null space.
    Galore,
    /// GEMS: shared, rec and search subspaces after null-space projection (GEMS-SPEC §3).
    Gems,
    /// PCGrad: project each task gradient off the other when they conflict, then AdamW.
    // Saved as `pcgrad`, the command line's name (`pc_grad`, written before, still reads).
    #[serde(rename = "pcgrad", alias = "pc_grad")]
    #[cfg_attr(feature = "clap", value(name = "pcgrad"))]
    PcGrad,
    /// The optimizer side of LoRA: AdamW on the `trainable` parameters (adapters, item
    /// embeddings) only; every other parameter is left untouched even if it has a gradient.
    Lora,
}

impl Method {
    /// The name used on the command line and in saved configurations.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Galore => "galore",
            Method::Gems => "gems",
            Method::PcGrad => "pcgrad",
            Method::Lora => "lora",
        }
    }
}

/// What happens to a subspace's Adam moments when its basis is refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MomentPolicy {
    /// Keep the moments as they are, now read in the new basis (GaLore and the authors' code).
    #[default]
    Keep,
    /// Zero both moments.
    Reset,
    /// Re-express the moments in the new basis: with C = Q_old^T Q_new, M <- M C (right side)
    /// or C^T M (left side); the second moment uses the element-wise square of C, which keeps it
    /// non-negative and is exact when C is a signed permutation.
    Rotate,
}

/// How the rec and search updates are weighted (GEMS-SPEC §3 step 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatePolicy {
    /// w_k = 0.4 l_k + 0.4 q_k + 0.2 s_k (loss, gradient-norm and sample shares of task k over
    /// all tuned matrices in the step's window), g_k = w_k / (w_rec + w_src); 0.5 each when a
    /// denominator is 0. The authors' code default.
    #[default]
    Heuristic,
    /// g_rec = g_src = 1.
    Unit,
}

/// Which side of the stored parameter tensor is the math layout's output dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightLayout {
    /// Stored `[d_in, d_out]` (Burn's `Linear`): the math matrix W (m x n) is the transpose.
    #[default]
    InOut,
    /// Stored `[d_out, d_in]` (PyTorch): the stored tensor is W.
    OutIn,
}

/// Settings of the subspace methods (`gems`, `galore`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GemsSettings {
    /// Shared-subspace rank r (GaLore's `rank`); clipped per matrix to min(m, n).
    pub rank: usize,
    /// Rank of each task subspace; `None` means max(1, rank / 2).
    pub task_rank: Option<usize>,
    /// Steps between basis refreshes, T_svd (GaLore's `update_proj_gap`); bases are computed at
    /// t = 1, T, 2T, ... as in the authors' code ([`is_refresh_step`]).
    pub update_proj_gap: u64,
    /// Back-projection scale alpha (GaLore's `scale`).
    pub scale: f64,
    /// Side rule (GaLore's `proj_type`), applied to the math-layout shape m x n.
    pub proj_type: ProjectionType,
    /// Exact or randomized SVD for refreshes.
    pub svd: SvdMethod,
    /// Moments on refresh.
    pub moments: MomentPolicy,
    /// Gate policy.
    pub gates: GatePolicy,
    /// Project gradients onto the null space of general-domain activations. Projectors are
    /// supplied per matrix with [`crate::Optimizer::set_null_space_projector`]; a matrix without
    /// one is updated unprojected (and reported).
    pub null_space: bool,
    /// Re-apply the projector to the final update so it stays in the null space exactly (on
    /// by default since 2026-12-02: with input-side projectors it keeps general text far
    /// better at equal fit, docs/results.md; the paper's GEMS has it off).
    pub strict_null_space: bool,
    /// Task bases orthogonal to the shared basis (GEMS-SPEC §3 option "complement").
    pub complement: bool,
    /// Only the shared subspace (GaLore + null space when `null_space`).
    pub single_subspace: bool,
}

impl Default for GemsSettings {
    fn default() -> Self {
        Self {
            rank: 32,
            task_rank: None,
            update_proj_gap: 200,
            scale: 1.0,
            proj_type: ProjectionType::Std,
            svd: SvdMethod::default(),
            moments: MomentPolicy::Keep,
            gates: GatePolicy::Heuristic,
            null_space: true,
            strict_null_space: true,
            complement: false,
            single_subspace: false,
        }
    }
}

impl GemsSettings {
    /// The rank of the rec and search subspaces.
    pub fn task_rank(&self) -> usize {
        self.task_rank.unwrap_or((self.rank / 2).max(1))
    }
}

/// Settings of the null-space projectors a trainer builds for this optimizer (recorded here so
/// a run's configuration is complete; the optimizer itself receives ready projectors).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct NullSpaceSettings {
    /// Eigenvalue rule.
    pub rule: NullSpaceRule,
    /// Output side (GEMS) or input side (AlphaEdit).
    pub side: ProjectorSide,
}

/// Everything that defines an optimizer run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimizerConfig {
    /// The method.
    pub method: Method,
    /// Adam's beta1.
    pub beta1: f64,
    /// Adam's beta2.
    pub beta2: f64,
    /// Adam's epsilon, added to sqrt(V) (not bias-corrected, as in the authors' AdamW).
    pub eps: f64,
    /// Decoupled weight decay, applied to every updated parameter after its update.
    pub weight_decay: f64,
    /// Parameter-path patterns of the matrices updated through subspaces (`*` matches any run
    /// of characters). Default: every attention and MLP projection of every layer.
    pub targets: Vec<String>,
    /// Patterns of the parameters `lora` trains; ignored by other methods.
    pub trainable: Vec<String>,
    /// How tuned matrices are stored.
    pub layout: WeightLayout,
    /// Subspace settings (`gems`, `galore`).
    pub gems: GemsSettings,
    /// How the projectors were built (recorded for reproducibility).
    pub null_space: NullSpaceSettings,
    /// Base seed of randomized refreshes: each refresh uses a seed derived from it, the
    /// parameter path, the subspace and the step, so a resumed run draws the same sketches.
    pub seed: u64,
    /// Learning-rate multipliers of the parameters updated by plain AdamW (not the tuned
    /// matrices), by path pattern; the first match wins, unmatched parameters use 1. Empty by
    /// default (and then not written, so older configurations read and write unchanged).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lr_scales: Vec<LrScale>,
    /// AdamW parameters of which only the trailing rows train (e.g. the new item rows of a
    /// token embedding); the first match wins. Empty by default, and then not written.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trained_rows: Vec<TrainedRows>,
}

/// Only rows `from..` of the AdamW parameters whose path matches `pattern` train (stored
/// `[rows, cols]`, row-major): the rows before keep their values exactly (no update, no weight
/// decay) and get no moments, so the step and its state cost what the trained rows cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainedRows {
    /// Parameter-path pattern.
    pub pattern: String,
    /// The first trained row.
    pub from: usize,
}

/// A learning-rate multiplier for the AdamW parameters whose path matches `pattern` (`*`
/// matches any run of characters), e.g. `{"pattern": "*embed_tokens*", "scale": 10}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrScale {
    /// Parameter-path pattern.
    pub pattern: String,
    /// Multiplier of the step's learning rate (finite, > 0).
    pub scale: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            method: Method::Gems,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.01,
            targets: default_targets(),
            trainable: vec!["*lora_*".into(), "*item_embed*".into()],
            layout: WeightLayout::InOut,
            gems: GemsSettings::default(),
            null_space: NullSpaceSettings::default(),
            seed: 0,
            lr_scales: Vec::new(),
            trained_rows: Vec::new(),
        }
    }
}

/// Every attention and MLP projection of a Llama-family decoder (Hugging Face names).
pub fn default_targets() -> Vec<String> {
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        .iter()
        .map(|name| format!("*.{name}.weight"))
        .collect()
}

impl OptimizerConfig {
    /// A configuration for `method` with every other setting at its default. `galore` turns
    /// off the null space and the task subspaces.
    pub fn for_method(method: Method) -> Self {
        let mut config = Self { method, ..Self::default() };
        if method == Method::Galore {
            config.gems.null_space = false;
            config.gems.single_subspace = true;
        }
        config
    }

    /// This configuration switched to `method`: that method's defaults ([`Self::for_method`])
    /// with the settings that do not depend on the method kept (subspace rank, refresh gap,
    /// weight decay, seed). A preset's tuned values thus survive `--method`.
    pub fn switch_method(&self, method: Method) -> Self {
        let mut config = Self::for_method(method);
        config.gems.rank = self.gems.rank;
        config.gems.update_proj_gap = self.gems.update_proj_gap;
        config.weight_decay = self.weight_decay;
        config.seed = self.seed;
        config.lr_scales = self.lr_scales.clone();
        config.trained_rows = self.trained_rows.clone();
        config
    }

    /// The first trained row of an AdamW parameter ([`Self::trained_rows`]); 0 when every row
    /// trains.
    pub fn first_trained_row(&self, path: &str) -> usize {
        self.trained_rows.iter().find(|r| path_matches(&r.pattern, path)).map_or(0, |r| r.from)
    }

    /// The learning-rate multiplier of an AdamW parameter: the first [`Self::lr_scales`] entry
    /// whose pattern matches `path`, else 1.
    pub fn lr_scale(&self, path: &str) -> f64 {
        self.lr_scales.iter().find(|s| path_matches(&s.pattern, path)).map_or(1.0, |s| s.scale)
    }

    /// Whether tuned matrices go through subspaces.
    pub fn uses_subspaces(&self) -> bool {
        !self.subspaces().is_empty()
    }

    /// The subspaces each tuned matrix keeps (none for the methods without subspaces).
    pub fn subspaces(&self) -> &'static [Subspace] {
        self.method.rule().subspaces(&self.gems)
    }

    /// Checks ranges; called by [`crate::Optimizer::new`].
    ///
    /// # Errors
    /// [`OptimError::InvalidConfig`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |field: &str, why: &str| Err(OptimError::InvalidConfig(format!("{field}: {why}")));
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", "must lie in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", "must lie in [0, 1)");
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return bad("eps", "must be finite and > 0");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", "must be finite and >= 0");
        }
        if self.uses_subspaces() {
            if self.gems.rank == 0 {
                return bad("gems.rank", "must be >= 1");
            }
            if self.gems.task_rank == Some(0) {
                return bad("gems.task_rank", "must be >= 1");
            }
            if self.gems.update_proj_gap == 0 {
                return bad("gems.update_proj_gap", "must be >= 1");
            }
            if !(self.gems.scale.is_finite() && self.gems.scale > 0.0) {
                return bad(
                    "gems.scale",
                    &format!("must be finite and > 0, got {}", self.gems.scale),
                );
            }
            if self.gems.complement && self.gems.single_subspace {
                return bad("gems.complement", "needs task subspaces (single_subspace is set)");
            }
        }
        if let Some(s) = self.lr_scales.iter().find(|s| !(s.scale > 0.0 && s.scale.is_finite())) {
            return bad(
                "lr_scales",
                &format!("scale {} of `{}` must be finite and > 0", s.scale, s.pattern),
            );
        }
        if self.method == Method::Lora && self.trainable.is_empty() {
            return bad("trainable", "lora needs at least one trainable pattern");
        }
        Ok(())
    }
}

/// One of the three subspaces of a tuned matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Subspace {
    /// The subspace of the shared (mixed-batch) gradient.
    Shared,
    /// The recommendation-task subspace.
    Rec,
    /// The search-task subspace.
    Search,
}

impl Subspace {
    /// Short name used in saved-state keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Subspace::Shared => "sh",
            Subspace::Rec => "rec",
            Subspace::Search => "src",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Whether optimizer step `t` (1-based) recomputes the subspace bases: t = 1, then every
/// multiple of `gap` (t = 1, T, 2T, ...). This is the authors' schedule: their step counter is
/// incremented before the projector's `iter % update_proj_gap == 0` test, so the first basis
/// comes from step 1 and the next ones from steps T, 2T; until 2026-11 gems refreshed at
/// t = 1, 1 + T, 1 + 2T.
pub fn is_refresh_step(t: u64, gap: u64) -> bool {
    t == 1 || (gap > 0 && t.is_multiple_of(gap))
}

/// Glob match of a parameter path: `*` matches any (possibly empty) run of characters.
pub fn path_matches(pattern: &str, path: &str) -> bool {
    let (p, s) = (pattern.as_bytes(), path.as_bytes());
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(star_at) = star {
            pi = star_at + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_follow_the_authors_schedule() {
        let at = |gap| (1..=12).filter(|&t| is_refresh_step(t, gap)).collect::<Vec<u64>>();
        assert_eq!(at(5), [1, 5, 10]);
        assert_eq!(at(1), (1..=12).collect::<Vec<_>>());
        assert_eq!(at(50), [1]);
    }

    #[test]
    fn globs() {
        assert!(path_matches("*.q_proj.weight", "layers.3.self_attn.q_proj.weight"));
        assert!(!path_matches("*.q_proj.weight", "layers.3.self_attn.q_proj.bias"));
        assert!(path_matches("*", ""));
        assert!(path_matches("layers.*.mlp.*", "layers.10.mlp.up_proj.weight"));
        assert!(!path_matches("layers.*.mlp.*", "norm.weight"));
        assert!(path_matches("*lora_*", "layers.0.self_attn.q_proj.lora_a"));
    }

    #[test]
    fn lr_scales_take_the_first_match_and_must_be_positive() {
        let mut c = OptimizerConfig::default();
        assert_eq!(c.lr_scale("embed_tokens.weight"), 1.0);
        c.lr_scales = vec![
            LrScale { pattern: "embed_tokens.*".into(), scale: 10.0 },
            LrScale { pattern: "*".into(), scale: 0.5 },
        ];
        assert_eq!(c.lr_scale("embed_tokens.weight"), 10.0);
        assert_eq!(c.lr_scale("norm.weight"), 0.5);
        assert!(c.validate().is_ok());
        assert_eq!(c.switch_method(Method::Full).lr_scales, c.lr_scales);
        c.lr_scales[1].scale = f64::NAN;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("lr_scales") && err.contains('*'), "{err}");
        // Not written when empty: configurations of earlier runs serialise unchanged.
        let json = serde_json::to_string(&OptimizerConfig::default()).unwrap();
        assert!(!json.contains("lr_scales"));
    }

    #[test]
    fn switching_method_keeps_the_method_independent_settings() {
        let mut tuned = OptimizerConfig::for_method(Method::Gems);
        tuned.gems.rank = 7;
        tuned.gems.update_proj_gap = 9;
        tuned.weight_decay = 0.25;
        tuned.seed = 3;
        tuned.gems.null_space = true;
        let galore = tuned.switch_method(Method::Galore);
        assert_eq!(galore.method, Method::Galore);
        assert_eq!((galore.gems.rank, galore.gems.update_proj_gap), (7, 9));
        assert_eq!((galore.weight_decay, galore.seed), (0.25, 3));
        // ...and the method's own defaults: GaLore has no null space.
        assert!(!galore.gems.null_space && galore.gems.single_subspace);
    }

    #[test]
    fn defaults_validate_and_galore_is_single_subspace() {
        OptimizerConfig::default().validate().unwrap();
        let galore = OptimizerConfig::for_method(Method::Galore);
        assert_eq!(galore.subspaces(), &[Subspace::Shared]);
        assert!(!galore.gems.null_space);
        let mut bad = OptimizerConfig::default();
        bad.gems.rank = 0;
        assert!(bad.validate().unwrap_err().to_string().contains("gems.rank"));
        assert_eq!(GemsSettings::default().task_rank(), 16);
        assert_eq!(GemsSettings { rank: 1, ..Default::default() }.task_rank(), 1);
    }
}
