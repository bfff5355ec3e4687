//! End to end on a tiny random model and a slice of Amazon Scientific: prepare, train with
//! each method, evaluate, checkpoint, kill-and-resume. Reads `../shared/data`; no network.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use gems_metrics::{MetricsLine, RunSummary};
use gems_optim::Method;
use gems_train::tiny::tiny_run_config;
use gems_train::{RunOptions, RunOutcome, TrainConfig, train};

fn data_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

fn options(resume: bool) -> RunOptions {
    RunOptions { device: Device::flex(), resume, progress: false }
}

fn finished(outcome: RunOutcome) -> RunSummary {
    match outcome {
        RunOutcome::Finished(s) => *s,
        RunOutcome::Stopped { step } => panic!("stopped at {step}"),
    }
}

fn setup(steps: u64) -> (tempfile::TempDir, TrainConfig) {
    let root = tempfile::tempdir().unwrap();
    let config = tiny_run_config(root.path(), &data_root(), steps).unwrap();
    (root, config)
}

#[test]
fn gems_trains_evaluates_and_writes_a_complete_run() {
    let (root, config) = setup(6);
    let run = root.path().join("runs/gems");
    let summary = finished(train(&config, &run, &options(false)).unwrap());
    assert_eq!(summary.steps, 6);
    assert_eq!(summary.method, "gems");
    let before = summary.before.as_ref().unwrap();
    let after = summary.after.as_ref().unwrap();
    for report in [before, after] {
        for task in ["rec", "search"] {
            let full = &report.full[task];
            assert_eq!(full.examples, 32);
            let r10 = full.get("recall@10").unwrap();
            assert!((0.0..=1.0).contains(&r10));
            assert!(report.sampled[task].get("ndcg@10").is_some());
            assert!(report.loss[task].is_finite());
        }
        assert!(report.perplexity.unwrap() > 1.0);
    }
    // Training lowered the target loss of both tasks on the test users.
    for task in ["rec", "search"] {
        assert!(
            after.loss[task] < before.loss[task],
            "{task}: {:?} -> {:?}",
            before.loss,
            after.loss
        );
    }
    let lines = gems_metrics::read_metrics_lines(&run.join("metrics.jsonl")).unwrap();
    let train_lines = lines.iter().filter(|l| matches!(l, MetricsLine::Train(_))).count();
    let valid_lines = lines.iter().filter(|l| matches!(l, MetricsLine::Valid(_))).count();
    assert_eq!((train_lines, valid_lines), (6, 2));
    for f in ["config.json", "nullspace.json", "before.json", "summary.json"] {
        assert!(run.join(f).is_file(), "{f}");
    }
    assert!(run.join("model/model.safetensors").is_file());
    assert!(run.join("checkpoint/optimizer/optimizer.json").is_file());
    let ns: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("nullspace.json")).unwrap())
            .unwrap();
    assert_eq!(ns["layers"].as_array().unwrap().len(), 14);
    // A second run reuses the cached projectors.
    let mut again = config.clone();
    again.schedule.steps = 1;
    again.eval.before = false;
    finished(train(&again, &root.path().join("runs/gems2"), &options(false)).unwrap());
    let ns: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.path().join("runs/gems2/nullspace.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(ns["from_cache"], true);
}
