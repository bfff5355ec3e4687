//! The methods as types behind one trait.
//!
//! A method decides four things about a step and nothing else: which parameters it updates,
//! whether the tuned matrices step through low-rank subspaces (and which), whether the two
//! task gradients undergo surgery before they are combined, and whether a separately computed
//! shared gradient is taken as is. Everything else is common to every method and lives once:
//! the three passes of [`Optimizer::step`](crate::Optimizer::step), the Adam rule of
//! [`crate::adam`] (AdamW for parameters updated directly, and the moments of each subspace),
//! and the subspace step of [`MatrixState`](crate::MatrixState).
//!
//! The ablations of GEMS-SPEC §5 (no null space, one subspace, complement bases, strict mode)
//! are settings of [`GemsSettings`], not methods.

use std::fmt::Debug;

use crate::config::{GemsSettings, Method, OptimizerConfig, Subspace, path_matches};

/// Totals of a step's two task gradients over every parameter that has one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskTotals {
    /// Rows (rec, search) the gradients are means over.
    pub samples: (f64, f64),
    /// (|G_rec|², |G_src|²).
    pub squared_norms: (f64, f64),
    /// ⟨G_rec, G_src⟩.
    pub dot: f64,
}

impl TaskTotals {
    /// The cosine of G_rec and G_src over every parameter, when both have a non-zero norm.
    pub fn cosine(&self) -> Option<f64> {
        let (rec_sq, src_sq) = self.squared_norms;
        (rec_sq > 0.0 && src_sq > 0.0).then(|| self.dot / (rec_sq * src_sq).sqrt())
    }
}

/// What distinguishes one method from another (see the module documentation).
pub trait MethodRule: Debug + Send + Sync {
    /// The method, as named in configurations.
    fn method(&self) -> Method;

    /// Whether parameter `path` is updated when it has a gradient.
    fn updates(&self, config: &OptimizerConfig, path: &str) -> bool {
        let _ = (config, path);
        true
    }

    /// The subspaces a tuned matrix keeps; empty when tuned matrices get AdamW like every other
    /// parameter.
    fn subspaces(&self, settings: &GemsSettings) -> &'static [Subspace] {
        let _ = settings;
        &[]
    }

    /// Gradient surgery: (c_rec, c_src) such that the task gradients are replaced by
    /// G_rec - c_rec G_src and G_src - c_src G_rec before they are combined; (0, 0) for none.
    fn surgery(&self, totals: &TaskTotals) -> (f64, f64) {
        let _ = totals;
        (0.0, 0.0)
    }

    /// Whether a separately computed shared gradient (the authors' third backward pass) is used
    /// as is rather than recombined from the task gradients.
    fn accepts_shared_gradient(&self) -> bool {
        true
    }
}

/// AdamW on every parameter, on the shared gradient.
#[derive(Debug, Clone, Copy, Default)]
pub struct Full;

/// GaLore: one low-rank subspace of the shared gradient per tuned matrix.
#[derive(Debug, Clone, Copy, Default)]
pub struct Galore;

/// GEMS: shared, rec and search subspaces (one with `single_subspace`), GEMS-SPEC §3.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gems;

/// PCGrad with two tasks: when the global dot product is negative, each task gradient loses
/// its component along the other (both computed from the originals), then AdamW.
#[derive(Debug, Clone, Copy, Default)]
pub struct PcGrad;

/// The optimizer side of LoRA: AdamW on the parameters matched by
/// [`OptimizerConfig::trainable`] only.
#[derive(Debug, Clone, Copy, Default)]
pub struct Lora;

const SHARED: &[Subspace] = &[Subspace::Shared];
const ALL_THREE: &[Subspace] = &[Subspace::Shared, Subspace::Rec, Subspace::Search];

impl MethodRule for Full {
    fn method(&self) -> Method {
        Method::Full
    }
}

impl MethodRule for Galore {
    fn method(&self) -> Method {
        Method::Galore
    }
    fn subspaces(&self, _settings: &GemsSettings) -> &'static [Subspace] {
        SHARED
    }
}

impl MethodRule for Gems {
    fn method(&self) -> Method {
        Method::Gems
    }
    fn subspaces(&self, settings: &GemsSettings) -> &'static [Subspace] {
        if settings.single_subspace { SHARED } else { ALL_THREE }
    }
}

impl MethodRule for PcGrad {
    fn method(&self) -> Method {
        Method::PcGrad
    }
    fn surgery(&self, totals: &TaskTotals) -> (f64, f64) {
        let (rec_sq, src_sq) = totals.squared_norms;
        if totals.dot >= 0.0 {
            return (0.0, 0.0);
        }
        (
            if src_sq > 0.0 { totals.dot / src_sq } else { 0.0 },
            if rec_sq > 0.0 { totals.dot / rec_sq } else { 0.0 },
        )
    }
    fn accepts_shared_gradient(&self) -> bool {
        false
    }
}

impl MethodRule for Lora {
    fn method(&self) -> Method {
        Method::Lora
    }
    fn updates(&self, config: &OptimizerConfig, path: &str) -> bool {
        config.trainable.iter().any(|p| path_matches(p, path))
    }
}

impl Method {
    /// The rule that implements this method.
    pub fn rule(self) -> &'static dyn MethodRule {
        match self {
            Method::Full => &Full,
            Method::Galore => &Galore,
            Method::Gems => &Gems,
            Method::PcGrad => &PcGrad,
            Method::Lora => &Lora,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_has_its_rule() {
        for m in [Method::Full, Method::Galore, Method::Gems, Method::PcGrad, Method::Lora] {
            assert_eq!(m.rule().method(), m);
        }
    }

    #[test]
    fn pcgrad_surgery_only_on_conflict() {
        let totals = |dot| TaskTotals { samples: (1.0, 1.0), squared_norms: (4.0, 2.0), dot };
        assert_eq!(PcGrad.surgery(&totals(1.0)), (0.0, 0.0));
        assert_eq!(PcGrad.surgery(&totals(0.0)), (0.0, 0.0));
        assert_eq!(PcGrad.surgery(&totals(-1.0)), (-0.5, -0.25));
        assert_eq!(Gems.surgery(&totals(-1.0)), (0.0, 0.0));
    }

    #[test]
    fn subspaces_and_trainable() {
        let settings = GemsSettings::default();
        assert_eq!(Gems.subspaces(&settings).len(), 3);
        assert_eq!(Galore.subspaces(&settings), SHARED);
        assert!(Full.subspaces(&settings).is_empty());
        let single = GemsSettings { single_subspace: true, ..GemsSettings::default() };
        assert_eq!(Gems.subspaces(&single), SHARED);
        let config = OptimizerConfig {
            trainable: vec!["*.lora_a".into()],
            ..OptimizerConfig::for_method(Method::Lora)
        };
        assert!(Lora.updates(&config, "layers.0.q.lora_a"));
        assert!(!Lora.updates(&config, "layers.0.q.weight"));
        assert!(Full.updates(&config, "layers.0.q.weight"));
    }
}
