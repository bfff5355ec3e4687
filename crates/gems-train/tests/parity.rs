//! `backend_parity` on flex against flex: the same computation twice, so every difference is
//! exactly zero. A mismatch in how gradients travel between devices (ids, tasks, the shared
//! gradient) or in what the comparison reads shows up here as a non-zero difference or an error.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use gems_train::parity::backend_parity;
use gems_train::tiny::tiny_run_config;

fn data_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

#[test]
fn flex_against_flex_is_exact() {
    let root = tempfile::tempdir().unwrap();
    let config = tiny_run_config(root.path(), &data_root(), 3).unwrap();
    let out = root.path().join("parity");
    let report =
        backend_parity(&config, &Device::flex(), &Device::flex(), 3, &out, &Default::default())
            .unwrap();
    assert_eq!(report.steps, 3);
    assert_eq!(report.method, "gems");
    assert_eq!(report.losses.len(), 2, "{:?}", report.losses);
    for (task, (a, b)) in &report.losses {
        assert!(a.is_finite() && a == b, "{task}: {a} vs {b}");
    }
    assert_eq!(report.gradient_max_rel_diff, 0.0, "{}", report.gradient_worst);
    // Some parameter was updated, and identically.
    assert!(!report.update_worst.is_empty());
    assert_eq!(report.update_max_rel_diff, 0.0, "{}", report.update_worst);
    assert_eq!(report.eval_max_abs_diff, 0.0);
    assert!(!report.eval_reference.full.is_empty());
    assert!(out.join("parity.json").is_file());
}

#[test]
fn zero_steps_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let config = tiny_run_config(root.path(), &data_root(), 3).unwrap();
    let err = backend_parity(
        &config,
        &Device::flex(),
        &Device::flex(),
        0,
        root.path(),
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("at least one optimizer step"), "{err}");
}

/// Parity checks what training trains: with `--tune-layers 1` and LoRA, only the top layer's
/// adapters (and the item rows) move, on both devices alike.
#[test]
fn parity_trains_what_training_trains() {
    use gems_optim::{Method, OptimizerConfig};
    let root = tempfile::tempdir().unwrap();
    let mut config = tiny_run_config(root.path(), &data_root(), 2).unwrap();
    config.optimizer = OptimizerConfig::for_method(Method::Lora);
    config.model.tune_layers = Some(1);
    let out = root.path().join("parity");
    let report =
        backend_parity(&config, &Device::flex(), &Device::flex(), 2, &out, &Default::default())
            .unwrap();
    assert_eq!(report.method, "lora");
    assert_eq!(report.update_max_rel_diff, 0.0, "{}", report.update_worst);
    let updated = &report.updated;
    assert!(updated.iter().any(|p| p.contains("layers.1.") && p.contains("lora")), "{updated:?}");
    assert!(!updated.iter().any(|p| p.contains("layers.0.")), "{updated:?}");
    assert!(!updated.iter().any(|p| p.contains("layers.1.") && !p.contains("lora")), "{updated:?}");
}
