//! End to end on a tiny random model and a slice of Amazon Scientific: prepare, train with
//! each method, evaluate, checkpoint, kill-and-resume. Reads `../shared/data`; no network.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use gems_metrics::{MetricsLine, RunSummary};
use gems_optim::{Method, OptimizerConfig};
use gems_train::tiny::tiny_run_config;
use gems_train::{RunOptions, RunOutcome, TrainConfig, train};

fn data_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

fn options(resume: bool) -> RunOptions {
    RunOptions { device: Device::flex(), resume, progress: Default::default() }
}

fn finished(outcome: RunOutcome) -> RunSummary {
    match outcome {
        RunOutcome::Finished(s) => *s,
        RunOutcome::Stopped { step } => panic!("stopped at {step}"),
    }
}

/// A change to a configuration.
type Change = Box<dyn Fn(&mut TrainConfig)>;

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
    let conflict = std::fs::read_to_string(run.join("conflict.jsonl")).unwrap();
    assert_eq!(conflict.lines().count(), 6);
    let first: serde_json::Value = serde_json::from_str(conflict.lines().next().unwrap()).unwrap();
    let cosines = first["cosine_rec_search"].as_object().unwrap();
    assert_eq!(cosines.len(), 14);
    assert!(cosines.values().all(|c| c.as_f64().is_some_and(|c| (-1.0..=1.0).contains(&c))));
    for f in ["config.json", "nullspace.json", "before.json", "summary.json", "baselines.json"] {
        assert!(run.join(f).is_file(), "{f}");
    }
    // Floors on the same test examples: popularity for both tasks, BM25 for search only,
    // SASRec and ItemKNN for recommendation only.
    let floors: std::collections::BTreeMap<String, gems_metrics::EvalReport> =
        serde_json::from_str(&std::fs::read_to_string(run.join("baselines.json")).unwrap())
            .unwrap();
    assert_eq!(
        floors.keys().collect::<Vec<_>>(),
        ["bm25", "itemknn", "popular", "sasrec", "successors"]
    );
    assert_eq!(floors["sasrec"].full.keys().collect::<Vec<_>>(), ["rec"]);
    assert_eq!(floors["itemknn"].full.keys().collect::<Vec<_>>(), ["rec"]);
    assert_eq!(floors["popular"].full.keys().collect::<Vec<_>>(), ["rec", "search"]);
    assert_eq!(floors["bm25"].full.keys().collect::<Vec<_>>(), ["search"]);
    assert_eq!(floors["popular"].full["rec"].examples, 32);
    assert!(floors["popular"].loss.is_empty(), "no language model, no target loss");
    assert!(floors.values().all(|f| f.item_loss.is_empty() && f.catalogue_loss.is_empty()));
    // The popularity floor by hand: rank of each test target in the training-target counts.
    let loaded = gems_train::infer::load_run(&run, &Device::flex()).unwrap();
    let corpus = &loaded.setup.corpus;
    let counts = gems_train::baselines::popularity(corpus);
    let opts = gems_train::trainer::eval_options(
        &config,
        gems_data::Split::Test,
        "x",
        &[gems_data::Task::Rec],
        &Default::default(),
    );
    let chosen = gems_train::eval::select(
        corpus.get(gems_data::Split::Test, gems_data::Task::Rec),
        opts.max_examples,
        opts.seed,
    );
    let hits = chosen
        .iter()
        .filter(|s| counts.iter().filter(|&&c| c >= counts[s.target as usize]).count() <= 10)
        .count();
    let recall = floors["popular"].full["rec"].values["recall@10"];
    assert!((recall - hits as f64 / chosen.len() as f64).abs() < 1e-12, "{recall} vs {hits}");
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

#[test]
fn every_method_and_ablation_trains_evaluates_and_changes_the_weights() {
    let (root, base) = setup(3);
    let variants: Vec<(&str, Change)> = vec![
        ("gems", Box::new(|_| {})),
        ("galore", Box::new(|c| c.optimizer = OptimizerConfig::for_method(Method::Galore))),
        ("full", Box::new(|c| c.optimizer = OptimizerConfig::for_method(Method::Full))),
        ("lora", Box::new(|c| c.optimizer = OptimizerConfig::for_method(Method::Lora))),
        ("pcgrad", Box::new(|c| c.optimizer = OptimizerConfig::for_method(Method::PcGrad))),
        ("gems-single", Box::new(|c| c.optimizer.gems.single_subspace = true)),
        ("gems-complement", Box::new(|c| c.optimizer.gems.complement = true)),
        ("gems-no-null", Box::new(|c| c.optimizer.gems.null_space = false)),
        // The paper's projector side and its non-strict update (the defaults are input, strict).
        ("gems-output", Box::new(|c| c.null_space.side = gems_subspace::ProjectorSide::Output)),
        ("gems-not-strict", Box::new(|c| c.optimizer.gems.strict_null_space = false)),
        ("rec-only", Box::new(|c| c.data.tasks = gems_train::config::TaskSelection::Rec)),
    ];
    let mut weights: Vec<(&str, Vec<u8>)> = Vec::new();
    for (name, change) in variants {
        let mut config = base.clone();
        config.eval.before = false;
        config.eval.perplexity = false;
        change(&mut config);
        config.optimizer.gems.rank = 4;
        config.optimizer.gems.update_proj_gap = 2;
        let run = root.path().join("runs").join(name);
        let summary = finished(train(&config, &run, &options(false)).unwrap());
        assert_eq!(summary.steps, 3, "{name}");
        let after = summary.after.unwrap();
        let tasks: Vec<&String> = after.full.keys().collect();
        if name == "rec-only" {
            assert_eq!(tasks, ["rec"]);
        } else {
            assert_eq!(tasks, ["rec", "search"], "{name}");
        }
        if name == "lora" {
            assert!(run.join("checkpoint/adapter/adapter_config.json").is_file());
            assert!(summary.optimizer_state_bytes > 0);
        }
        // The tuned weights (LoRA merged), compared below.
        weights.push((name, std::fs::read(run.join("model/model.safetensors")).unwrap()));
    }
    // Every method and ablation changes what is trained: no two runs end with the same weights
    // (in particular gems and gems without the null-space projection, which a flag that is
    // read but not applied would leave equal). PCGrad is full fine-tuning until the two tasks'
    // gradients conflict (a negative dot product), which three steps here need not reach.
    for (i, (a, wa)) in weights.iter().enumerate() {
        for (b, wb) in &weights[i + 1..] {
            if [*a, *b] != ["full", "pcgrad"] {
                assert!(wa != wb, "{a} and {b} trained the same weights");
            }
        }
    }
}

#[test]
fn a_killed_and_resumed_run_equals_an_uninterrupted_one() {
    let (root, mut config) = setup(6);
    config.eval.before = false;
    config.eval.perplexity = false;
    let whole = root.path().join("runs/whole");
    let a = finished(train(&config, &whole, &options(false)).unwrap());

    let parts = root.path().join("runs/parts");
    let mut first = config.clone();
    first.stop_after = Some(4);
    match train(&first, &parts, &options(false)).unwrap() {
        RunOutcome::Stopped { step } => assert_eq!(step, 4),
        RunOutcome::Finished(_) => panic!("should have stopped"),
    }
    // Starting again without --resume refuses to overwrite the run.
    let err = train(&config, &parts, &options(false)).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    let b = finished(train(&config, &parts, &options(true)).unwrap());

    assert_eq!(a.steps, b.steps);
    let (ra, rb) = (a.after.unwrap(), b.after.unwrap());
    for task in ["rec", "search"] {
        for (name, va) in &ra.full[task].values {
            let vb = rb.full[task].values[name];
            assert!((va - vb).abs() < 1e-9, "{task} {name}: {va} vs {vb}");
        }
        assert!(
            (ra.loss[task] - rb.loss[task]).abs() < 1e-5,
            "{task}: {:?} {:?}",
            ra.loss,
            rb.loss
        );
    }
    // The metrics file of the resumed run has each step exactly once.
    let steps: Vec<u64> = gems_metrics::read_metrics_lines(&parts.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|l| match l {
            MetricsLine::Train(t) => Some(t.step),
            MetricsLine::Valid(_) => None,
        })
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let (root, config) = setup(2);
    let mut missing = config.clone();
    missing.model.path = Some(root.path().join("no-such-model"));
    let err = train(&missing, &root.path().join("r1"), &options(false)).unwrap_err().to_string();
    assert!(err.contains("no-such-model"), "{err}");

    let mut bad_data = config.clone();
    bad_data.data.dataset = root.path().join("no-such-data").display().to_string();
    let err = train(&bad_data, &root.path().join("r2"), &options(false)).unwrap_err().to_string();
    assert!(err.contains("no-such-data"), "{err}");

    let mut bad_lr = config.clone();
    bad_lr.schedule.lr = -1.0;
    let err = train(&bad_lr, &root.path().join("r3"), &options(false)).unwrap_err().to_string();
    assert!(err.contains("schedule.lr"), "{err}");

    // Values that cannot work are refused before any work, with the limit they broke.
    let refused: [(&str, Change); 8] = [
        ("must be below the catalogue's", Box::new(|c| c.data.negatives = 1_000_000_000)),
        ("schedule.lr must be in (0, 1]", Box::new(|c| c.schedule.lr = 1e30)),
        ("1 - lr * weight_decay", Box::new(|c| c.optimizer.weight_decay = 1e30)),
        ("must be at most 65536", Box::new(|c| c.schedule.batch_size = 1_000_000_000_000)),
        (
            "lora.alpha must be finite",
            Box::new(|c| {
                c.optimizer = OptimizerConfig::for_method(Method::Lora);
                c.lora.alpha = f64::NAN;
            }),
        ),
        (
            "exceeds the smaller side",
            Box::new(|c| {
                c.optimizer = OptimizerConfig::for_method(Method::Lora);
                c.lora.rank = 1_000_000;
            }),
        ),
        ("gems.scale: must be finite and > 0", Box::new(|c| c.optimizer.gems.scale = -1.0)),
        (
            "`no_such_proj` matches no parameter",
            Box::new(|c| c.optimizer.targets.push("no_such_proj".into())),
        ),
    ];
    for (i, (want, change)) in refused.iter().enumerate() {
        let mut c = config.clone();
        change(&mut c);
        let dir = root.path().join(format!("refused{i}"));
        let err = train(&c, &dir, &options(false)).unwrap_err().to_string();
        assert!(err.contains(want), "{want}: {err}");
        assert!(!dir.join("metrics.jsonl").exists(), "{want}: training began");
    }

    // A model whose loss is NaN at every step is stopped with a message, not a panic.
    let mut poisoned = config.clone();
    poisoned.schedule.steps = 12;
    poisoned.optimizer = OptimizerConfig::for_method(Method::Full);
    poisoned.eval.before = false;
    poisoned.model.path = Some(nan_model(config.model.path.as_ref().unwrap(), root.path()));
    let msg = train(&poisoned, &root.path().join("r4"), &options(false)).unwrap_err().to_string();
    assert!(msg.contains("non-finite") || msg.contains("not finite"), "{msg}");
}

/// A copy of the model directory `model` with a NaN in its final norm's weight (written
/// directly: the library refuses to save non-finite weights).
fn nan_model(model: &Path, root: &Path) -> PathBuf {
    let out = root.join("nan-model");
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(model).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "checksums.json" {
            std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
        }
    }
    let mut w = gems_model::hf::read_hf_weights(&out).unwrap();
    w.tensors.get_mut(gems_model::llama::FINAL_NORM_KEY).unwrap().data[0] = f32::NAN;
    let file = out.join("model.safetensors");
    gems_model::weights::write_safetensors(&file, &w.tensors, &Default::default()).unwrap();
    out
}

/// A LoRA run exports a PEFT adapter of the evaluated model with its base beside it; the base
/// plus the adapter gives the merged export's logits (the tiny model ties its head, so this is
/// the tied-embedding layout), and the merged export carries no adapter.
#[test]
fn a_lora_run_exports_an_adapter_that_reproduces_the_merged_model() {
    use burn::tensor::Tensor;
    use gems_model::{TokenBatch, load_hf_dir, load_peft};
    let (root, mut config) = setup(3);
    config.eval.before = false;
    config.eval.perplexity = false;
    config.optimizer = OptimizerConfig::for_method(Method::Lora);
    let run = root.path().join("runs/lora");
    finished(train(&config, &run, &options(false)).unwrap());
    assert!(run.join("model/adapter/adapter_config.json").is_file());
    let merged_dir = root.path().join("out/merged");
    let adapter_dir = root.path().join("out/adapter");
    gems_train::export::export_model(&run, &merged_dir).unwrap();
    gems_train::export::export_adapter(&run, &adapter_dir, None).unwrap();
    assert!(!merged_dir.join("adapter").exists());
    assert!(adapter_dir.join("base/model.safetensors").is_file());
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    let base_path = std::path::absolute(adapter_dir.join("base")).unwrap();
    assert_eq!(cfg["base_model_name_or_path"], base_path.display().to_string());
    assert_eq!(cfg["ensure_weight_tying"], true);
    assert!(cfg.get("init_seed").is_none());
    // The tokenizer beside the adapter; the tiny config tunes every layer, so no layer list.
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        assert!(adapter_dir.join(f).is_file(), "{f}");
    }
    assert!(cfg.get("layers_to_transform").is_none());
    let named = root.path().join("out/named");
    gems_train::export::export_adapter(&run, &named, Some("org/base")).unwrap();
    let cfg_named = gems_model::read_adapter_config(&named.join("adapter_config.json")).unwrap();
    assert_eq!(cfg_named.base_model_name_or_path.as_deref(), Some("org/base"));

    let dev = Device::flex();
    let merged = load_hf_dir(&merged_dir, &dev).unwrap().model;
    let base = load_hf_dir(&adapter_dir.join("base"), &dev).unwrap().model;
    let vocab = merged.embed_tokens.weight.dims()[0] as u32;
    let (adapted, _) = load_peft(base, &adapter_dir).unwrap();
    let seq: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % vocab).chain([vocab - 1]).collect();
    let logits = |m: &gems_model::Llama| -> Vec<f32> {
        let batch = TokenBatch::pad(std::slice::from_ref(&seq), 0, false).unwrap();
        let t: Tensor<3> = m.forward(&batch).unwrap();
        t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
    };
    let (a, b) = (logits(&adapted), logits(&merged));
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(d < 1e-4, "adapter over base differs from the merged export by {d}");

    // Exporting again replaces the directory as a whole; a run without an adapter is refused.
    std::fs::write(adapter_dir.join("stale.txt"), "old").unwrap();
    gems_train::export::export_adapter(&run, &adapter_dir, None).unwrap();
    assert!(!adapter_dir.join("stale.txt").exists());
    let (root2, mut plain) = setup(1);
    plain.eval.before = false;
    plain.eval.perplexity = false;
    let other = root2.path().join("runs/full");
    finished(train(&plain, &other, &options(false)).unwrap());
    let err =
        gems_train::export::export_adapter(&other, &root2.path().join("a"), None).unwrap_err();
    assert!(err.to_string().contains("no PEFT adapter"), "{err}");
}

/// `--resume` never starts a different run, and a damaged or inconsistent checkpoint is refused
/// with the file named.
#[test]
fn resume_refuses_missing_damaged_and_mixed_checkpoints() {
    let (root, mut config) = setup(4);
    config.eval.before = false;
    config.eval.perplexity = false;
    config.eval.every = 0;

    // Nothing to resume: an empty directory, then one a run was started in.
    let empty = root.path().join("runs/empty");
    let err = train(&config, &empty, &options(true)).unwrap_err().to_string();
    assert!(err.contains("no checkpoint/") && err.contains("it is empty"), "{err}");
    std::fs::write(empty.join("config.json"), "{}").unwrap();
    let err = train(&config, &empty, &options(true)).unwrap_err().to_string();
    assert!(err.contains("it holds config.json"), "{err}");
    assert_eq!(std::fs::read_to_string(empty.join("config.json")).unwrap(), "{}");

    let run = root.path().join("runs/r");
    let mut first = config.clone();
    first.stop_after = Some(2);
    assert!(matches!(
        train(&first, &run, &options(false)).unwrap(),
        RunOutcome::Stopped { step: 2 }
    ));
    let ckpt = run.join("checkpoint");
    let weights = ckpt.join("model/model.safetensors");
    let good = std::fs::read(&weights).unwrap();

    // One flipped bit in the weights.
    let mut bad = good.clone();
    let at = bad.len() - 5;
    bad[at] ^= 0x10;
    std::fs::write(&weights, &bad).unwrap();
    let err = train(&config, &run, &options(true)).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("does not match"), "{err}");
    std::fs::write(&weights, &good).unwrap();

    // trainer.json from another step (re-sealed, so only the step check can catch it).
    let trainer = ckpt.join("trainer.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trainer).unwrap()).unwrap();
    state["step"] = serde_json::json!(100);
    let tmp = root.path().join("resealed");
    gems_train::checkpoint::replace_dir(&tmp, |d| -> gems_train::Result<()> {
        for entry in walk(&ckpt) {
            let rel = entry.strip_prefix(&ckpt).unwrap();
            if rel == std::path::Path::new("checksums.json") {
                continue;
            }
            std::fs::create_dir_all(d.join(rel).parent().unwrap()).unwrap();
            if rel == std::path::Path::new("trainer.json") {
                std::fs::write(d.join(rel), state.to_string()).unwrap();
            } else {
                std::fs::copy(&entry, d.join(rel)).unwrap();
            }
        }
        Ok(())
    })
    .unwrap();
    std::fs::rename(&ckpt, root.path().join("good-checkpoint")).unwrap();
    std::fs::rename(&tmp, &ckpt).unwrap();
    let err = train(&config, &run, &options(true)).unwrap_err().to_string();
    assert!(err.contains("trainer.json is at step 100"), "{err}");
    std::fs::remove_dir_all(&ckpt).unwrap();
    std::fs::rename(root.path().join("good-checkpoint"), &ckpt).unwrap();

    // An edited config.json is refused, naming what changed.
    let config_path = run.join("config.json");
    let text = std::fs::read_to_string(&config_path).unwrap();
    let mut edited: serde_json::Value = serde_json::from_str(&text).unwrap();
    edited["schedule"]["lr"] = serde_json::json!(0.5);
    std::fs::write(&config_path, edited.to_string()).unwrap();
    let err = train(&config, &run, &options(true)).unwrap_err().to_string();
    assert!(err.contains("schedule.lr") && err.contains("checkpoint was taken with"), "{err}");
    std::fs::write(&config_path, text).unwrap();

    // The intact checkpoint resumes and finishes.
    let summary = finished(train(&config, &run, &options(true)).unwrap());
    assert_eq!(summary.steps, 4);
}

/// A new run in a directory where an earlier start was killed before its first checkpoint
/// writes every file itself: nothing of the earlier start (a tuned model, floors of other test
/// examples) survives into its results. Files the run does not write are left alone.
#[test]
fn a_new_run_never_keeps_an_earlier_starts_outputs() {
    let (root, mut config) = setup(1);
    config.eval.before = false;
    config.eval.perplexity = false;
    let run = root.path().join("runs/k");
    for dir in ["model", "model.tmp"] {
        std::fs::create_dir_all(run.join(dir)).unwrap();
        std::fs::write(run.join(dir).join("model.safetensors"), b"earlier").unwrap();
    }
    for file in ["baselines.json", "before.json", "config.json", "metrics.jsonl"] {
        std::fs::write(run.join(file), b"{\"earlier\": true}").unwrap();
    }
    std::fs::write(run.join("notes.txt"), b"mine").unwrap();
    let summary = finished(train(&config, &run, &options(false)).unwrap());
    assert_eq!(summary.steps, 1);
    assert!(!run.join("model.tmp").exists() && !run.join("before.json").exists());
    let weights = std::fs::read(run.join("model/model.safetensors")).unwrap();
    assert_ne!(weights, b"earlier");
    for file in ["baselines.json", "config.json", "metrics.jsonl"] {
        let text = std::fs::read_to_string(run.join(file)).unwrap();
        assert!(!text.contains("earlier"), "{file} kept the earlier start's content");
    }
    assert_eq!(std::fs::read(run.join("notes.txt")).unwrap(), b"mine");
    // A finished run is refused, not cleared.
    let err = train(&config, &run, &options(false)).unwrap_err().to_string();
    assert!(err.contains("already holds a run"), "{err}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The common protocol: history items out of the ranking, the user's whole history and not
/// only the prompt's. `recommend` never lists them, and the evaluation with them left out
/// ranks every target at least as high.
#[test]
fn history_items_can_be_left_out_of_rankings() {
    use gems_train::eval::evaluate;
    use gems_train::infer::{load_run, top_items, user_history, user_items};
    use gems_train::trainer::eval_options;
    let (root, mut config) = setup(1);
    config.eval.before = false;
    config.eval.perplexity = false;
    // Prompts of 3 items, so that many users have more history than their prompt shows.
    config.data.max_history = 3;
    let run = root.path().join("runs/h");
    finished(train(&config, &run, &options(false)).unwrap());
    let loaded = load_run(&run, &Device::flex()).unwrap();
    let setup = &loaded.setup;
    let corpus = &setup.corpus;
    let n = corpus.n_items();
    let long = corpus.sequences.iter().position(|s| s.len() > 5).expect("a user of 6+ events");
    let user = corpus.users[long].clone();
    let known = user_items(setup, &user).unwrap();
    let history = user_history(setup, &user, config.data.max_history).unwrap();
    assert_eq!(history, known[known.len() - 3..]);
    let all = top_items(setup, &history, None, n, &[]).unwrap();
    assert_eq!(all.len(), n);
    let fresh = top_items(setup, &history, None, n, &known).unwrap();
    assert!(fresh.iter().all(|it| !known.contains(&it.index)));
    let distinct: std::collections::BTreeSet<u32> = known.iter().copied().collect();
    assert_eq!(fresh.len(), n - distinct.len());
    // The evaluation leaves out every item before the target, beyond the prompt's 3.
    let test = corpus.get(gems_data::Split::Test, gems_data::Task::Rec);
    let s = test.iter().find(|s| s.user as usize == long).expect("the user's test example");
    assert_eq!(s.history, known[s.position as usize - 3..s.position as usize]);
    assert_eq!(corpus.seen(s), &known[..s.position as usize]);

    let tasks = [gems_data::Task::Rec, gems_data::Task::Search];
    let mut opts = eval_options(&config, gems_data::Split::Test, "t", &tasks, &Default::default());
    let plain = evaluate(&setup.pretrained.model, &setup.corpus, &opts).unwrap();
    opts.exclude_history = true;
    let excluded = evaluate(&setup.pretrained.model, &setup.corpus, &opts).unwrap();
    assert!(excluded.history_excluded && !plain.history_excluded);
    // The default evaluation ranks both ways from the same scores: its second protocol is
    // exactly what an evaluation that leaves the history out reports.
    assert_eq!(plain.unseen, excluded.full);
    assert!(excluded.unseen.is_empty());
    assert_eq!(plain.without_history(), excluded.without_history());
    // The item token's own losses: the full-vocabulary one is the catalogue softmax's plus the
    // mass on text tokens, and the target loss averages it with end-of-sequence.
    for task in ["rec", "search"] {
        let (item, catalogue) = (plain.item_loss[task], plain.catalogue_loss[task]);
        assert!(catalogue > 0.0 && item >= catalogue - 1e-4, "{task}: {item} < {catalogue}");
        assert!(plain.loss[task] >= item / 2.0 - 1e-4, "{task}: {}", plain.loss[task]);
    }
    for task in ["rec", "search"] {
        for k in ["recall@20", "mrr@20"] {
            let (a, b) = (plain.full[task].values[k], excluded.full[task].values[k]);
            assert!(b >= a - 1e-12, "{task} {k}: {a} -> {b}");
        }
    }
    // Reports of the default protocol do not mention it (summary.json unchanged).
    let json = serde_json::to_string(&plain).unwrap();
    assert!(!json.contains("history_excluded"));
}

/// `--embeddings`: `items` leaves every text-token row (the tied head's too) as pretrained and
/// trains the item rows; `none` trains no row; `all` trains both.
#[test]
fn embedding_policies_touch_only_what_they_say() {
    use gems_train::config::EmbeddingPolicy;
    use gems_train::setup::{build, load_model};
    let (root, base_config) = setup(2);
    let host = |m: &gems_model::Llama| -> (Vec<f32>, usize) {
        let w = m.embed_tokens.weight.val();
        let d = w.dims()[1];
        (w.into_data().convert::<f32>().try_into_vec::<f32>().unwrap(), d)
    };
    let dev = Device::flex();
    let pretrained = load_model(base_config.model.path.as_ref().unwrap(), None, &dev).unwrap();
    let untuned = build(pretrained, &base_config).unwrap();
    let base = untuned.corpus.base_vocab as usize;
    let (before, d) = host(&untuned.pretrained.model);
    assert!(untuned.pretrained.model.lm_head.is_none(), "the tiny model ties its head");
    for policy in [EmbeddingPolicy::All, EmbeddingPolicy::Items, EmbeddingPolicy::None] {
        let mut config = base_config.clone();
        config.eval.before = false;
        config.eval.perplexity = false;
        config.model.embeddings = policy;
        let run = root.path().join(format!("runs/emb-{}", policy.as_str()));
        let summary = finished(train(&config, &run, &options(false)).unwrap());
        assert!(
            summary.label.contains(&format!("emb-{}", policy.as_str()))
                || policy == EmbeddingPolicy::All
        );
        let tuned = gems_model::load_hf_dir(&run.join("model"), &dev).unwrap().model;
        let (after, _) = host(&tuned);
        let text_same = before[..base * d] == after[..base * d];
        let items_same = before[base * d..] == after[base * d..];
        let want = match policy {
            EmbeddingPolicy::All => (false, false),
            EmbeddingPolicy::Items => (true, false),
            EmbeddingPolicy::None => (true, true),
        };
        assert_eq!((text_same, items_same), want, "{policy:?}: (text rows kept, item rows kept)");
    }
    // `set_embedding_lr_scale`: the item rows move about `scale` times as far (Adam's steps
    // are scale-free, the multiplier is not), the text rows still not at all.
    let drift = |scale: f64| -> (bool, f64) {
        let mut config = base_config.clone();
        config.eval.before = false;
        config.eval.perplexity = false;
        config.eval.every = 0;
        config.model.embeddings = EmbeddingPolicy::Items;
        config.set_embedding_lr_scale(scale);
        let run = root.path().join(format!("runs/emb-scale-{scale}"));
        finished(train(&config, &run, &options(false)).unwrap());
        let saved: TrainConfig =
            serde_json::from_slice(&std::fs::read(run.join("config.json")).unwrap()).unwrap();
        assert_eq!(
            saved.optimizer.lr_scale("embed_tokens.weight"),
            scale,
            "recorded in config.json"
        );
        let (after, _) = host(&gems_model::load_hf_dir(&run.join("model"), &dev).unwrap().model);
        let moved: f64 = before[base * d..]
            .iter()
            .zip(&after[base * d..])
            .map(|(a, b)| f64::from((a - b).abs()))
            .sum();
        (before[..base * d] == after[..base * d], moved)
    };
    let (text_kept_1, moved_1) = drift(1.0);
    let (text_kept_10, moved_10) = drift(10.0);
    assert!(text_kept_1 && text_kept_10, "text rows must stay as pretrained");
    assert!(
        moved_10 > 4.0 * moved_1 && moved_1 > 0.0,
        "item rows moved {moved_1} at 1x, {moved_10} at 10x"
    );
}

/// `--tune-layers 1` on the 2-layer model: the lower layer stays exactly as pretrained (no
/// gradient, no weight decay), the top layer and the item rows (through the tied head) train,
/// for a subspace method and for LoRA; more layers than the model has is refused.
#[test]
fn tune_layers_trains_only_the_top_layers() {
    use gems_train::setup::{build, load_model};
    let (root, base_config) = setup(2);
    let dev = Device::flex();
    let host = |t: burn::tensor::Tensor<2>| -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
    };
    let layer_weights = |m: &gems_model::Llama, i: usize| -> Vec<Vec<f32>> {
        m.layers[i].projections().iter().map(|(_, l)| host(l.weight.val())).collect()
    };
    let pretrained = load_model(base_config.model.path.as_ref().unwrap(), None, &dev).unwrap();
    let untuned = build(pretrained, &base_config).unwrap();
    let base = untuned.corpus.base_vocab as usize;
    let before = &untuned.pretrained.model;
    for method in [Method::Gems, Method::Lora] {
        let mut config = base_config.clone();
        config.eval.before = false;
        config.eval.perplexity = false;
        if method == Method::Lora {
            config.optimizer = OptimizerConfig::for_method(method);
        }
        config.model.tune_layers = Some(1);
        let run = root.path().join(format!("runs/top1-{}", method.as_str()));
        finished(train(&config, &run, &options(false)).unwrap());
        // A LoRA run keeps base and adapter apart: compare the merged export.
        let dir = if method == Method::Lora {
            let merged = root.path().join("out/top1-lora");
            gems_train::export::export_model(&run, &merged).unwrap();
            // The adapter names its one layer for PEFT, and loads onto exactly that layer.
            let adapter = root.path().join("out/top1-adapter");
            gems_train::export::export_adapter(&run, &adapter, None).unwrap();
            let cfg =
                gems_model::read_adapter_config(&adapter.join("adapter_config.json")).unwrap();
            assert_eq!(cfg.layers_to_transform, Some(gems_model::OneOrMany::Many(vec![1])));
            assert_eq!(cfg.layers_pattern, Some(gems_model::OneOrMany::One("layers".into())));
            let base = gems_model::load_hf_dir(&adapter.join("base"), &dev).unwrap().model;
            let (adapted, _) = gems_model::load_peft(base, &adapter).unwrap();
            assert!(adapted.layers[0].projections().iter().all(|(_, l)| l.lora.is_none()));
            assert!(adapted.layers[1].projections().iter().any(|(_, l)| l.lora.is_some()));
            merged
        } else {
            run.join("model")
        };
        let tuned = gems_model::load_hf_dir(&dir, &dev).unwrap().model;
        assert_eq!(layer_weights(&tuned, 0), layer_weights(before, 0), "{method:?}: layer 0 moved");
        assert_ne!(layer_weights(&tuned, 1), layer_weights(before, 1), "{method:?}: layer 1 kept");
        let (e0, e1) =
            (host(before.embed_tokens.weight.val()), host(tuned.embed_tokens.weight.val()));
        let d = before.config.hidden_size;
        assert_ne!(e0[base * d..], e1[base * d..], "{method:?}: item rows did not train");
    }
    let mut config = base_config.clone();
    config.model.tune_layers = Some(3);
    let err = train(&config, &root.path().join("runs/top3"), &options(false)).unwrap_err();
    assert!(err.to_string().contains("tune_layers 3"), "{err}");
}

#[test]
fn collaborative_rows_every_rec_target_and_the_history_last_train_and_are_recorded() {
    let (root, mut config) = setup(3);
    config.model.item_collab = 8;
    config.data.rec_targets = gems_train::config::RecTargets::All;
    config.data.rec_prompt = gems_train::config::RecPrompt::HistoryLast;
    config.eval.floors = false;
    let run = root.path().join("runs/collab");
    let summary = finished(train(&config, &run, &options(false)).unwrap());
    assert_eq!(summary.steps, 3);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["model"]["item_collab"], 8);
    assert_eq!(saved["data"]["rec_targets"], "all");
    assert_eq!(saved["data"]["rec_prompt"], "history-last");
    // One rec row per stretch of a user's training sequence: fewer rows than examples, so a
    // step is a larger part of an epoch than the same batch of one-target examples.
    let loaded = gems_train::infer::load_run(&run, &Device::flex()).unwrap();
    let examples = loaded.setup.corpus.get(gems_data::Split::Train, gems_data::Task::Rec).len();
    let rows = gems_train::setup::stretch_rows(
        loaded.setup.corpus.get(gems_data::Split::Train, gems_data::Task::Rec),
    );
    assert!(!rows.is_empty() && rows.len() < examples, "{} rows, {examples} examples", rows.len());
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().next().unwrap(),
    )
    .unwrap();
    let per_step = config.schedule.batch_size * config.schedule.grad_accum;
    let want = per_step as f64 / rows.len() as f64;
    assert!((first["epoch"].as_f64().unwrap() - want).abs() < 1e-9, "{first}");
    // The loaded run asks in the form it trained and evaluated: a test example's prompt, the
    // prompt `recommend` builds for its history, ends with the separator its items follow.
    use gems_data::TextTokenizer as _;
    let sep = loaded.setup.text.encode(gems_data::prompt::HISTORY_SEPARATOR).unwrap();
    for split in [gems_data::Split::Train, gems_data::Split::Test] {
        for s in loaded.setup.corpus.get(split, gems_data::Task::Rec).iter().take(5) {
            let prompt = &s.ids[..s.target_pos];
            assert_eq!(loaded.setup.prompt_ids(&s.history, None).unwrap(), prompt);
            assert!(prompt.ends_with(&sep), "{prompt:?} does not end with {sep:?}");
        }
    }
    // The default records none of the options.
    let text = serde_json::to_string(&setup(1).1).unwrap();
    assert!(
        !text.contains("item_collab")
            && !text.contains("rec_targets")
            && !text.contains("rec_prompt"),
        "{text}"
    );
}

/// An ID-only catalogue (no titles, no queries): the run trains rec only and records it in
/// config.json; the ids are not used as text (untitled rows start from the mean item row, so
/// they are all alike before training); `recommend` lists no title.
#[test]
fn id_only_data_trains_rec_and_says_so() {
    use gems_train::infer::{load_run, top_items, user_history};
    let (root, mut config) = setup(2);
    config.eval.before = false;
    config.eval.perplexity = false;
    config.eval.every = 0;
    let data = root.path().join("id-only");
    std::fs::create_dir_all(&data).unwrap();
    let items: String = (0..40).map(|i| format!("{{\"id\": \"{}\"}}\n", 1000 + i)).collect();
    std::fs::write(data.join("items.jsonl"), items).unwrap();
    let events: String = (0..30)
        .map(|u| {
            let seq: Vec<String> = (0..7)
                .map(|k| format!("{{\"item\": \"{}\"}}", 1000 + (u * 3 + k * 5) % 40))
                .collect();
            format!("{{\"user\": \"u{u}\", \"events\": [{}]}}\n", seq.join(", "))
        })
        .collect();
    std::fs::write(data.join("events.jsonl"), events).unwrap();
    config.data.dataset = data.display().to_string();
    config.data.negatives = 9; // at most 39 other items
    let run = root.path().join("runs/id-only");
    let summary = finished(train(&config, &run, &options(false)).unwrap());
    assert!(summary.after.as_ref().unwrap().full.contains_key("rec"));
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["data"]["tasks"], "rec", "the tasks trained are recorded");

    // Before training every untitled row is the same (the mean item row), not one built from
    // the digits of its id.
    let base_model =
        gems_train::setup::load_model(config.model.path.as_ref().unwrap(), None, &Device::flex())
            .unwrap();
    let untuned = gems_train::setup::build(base_model, &config).unwrap();
    let w = untuned.pretrained.model.embed_tokens.weight.val();
    let d = w.dims()[1];
    let rows = w.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    let first = untuned.corpus.base_vocab as usize * d;
    let item = |k: usize| &rows[first + k * d..first + (k + 1) * d];
    assert!((1..40).all(|k| item(k) == item(0)), "untitled rows differ");

    let loaded = load_run(&run, &Device::flex()).unwrap();
    let setup = &loaded.setup;
    assert_eq!(setup.corpus.untitled(), 40);
    let history = user_history(setup, "u0", 8).unwrap();
    let top = top_items(setup, &history, None, 3, &[]).unwrap();
    assert!(top.iter().all(|it| it.title.is_none()), "{top:?}");
}

/// One seed: a configuration that sets only `seed` (a TOML file, say) seeds the optimizer's
/// sketches with it too, and an optimizer seed set apart from it is refused.
#[test]
fn the_optimizer_follows_the_run_seed() {
    use gems_train::trainer::resolved_config;
    let (_root, mut config) = setup(1);
    config.seed = 3;
    let (resolved, _) = resolved_config(config.clone()).unwrap();
    assert_eq!(resolved.optimizer.seed, 3);
    config.seed = 0;
    config.optimizer.seed = 5;
    let err = resolved_config(config).unwrap_err().to_string();
    assert!(err.contains("optimizer.seed 5 differs from seed 0"), "{err}");
}

/// [`setup`] built (the real model with its item tokens, the tiny corpus), for the loss tests.
fn built_setup() -> (tempfile::TempDir, TrainConfig, gems_train::setup::Setup) {
    use gems_train::setup::{build, load_model};
    let (root, config) = setup(2);
    let model = load_model(config.model.path.as_ref().unwrap(), None, &Device::flex()).unwrap();
    let built = build(model, &config).unwrap();
    (root, config, built)
}

/// A one-value tensor's value.
fn scalar(t: burn::tensor::Tensor<1>) -> f64 {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()[0] as f64
}

/// Trains `config` (no untuned evaluation, no perplexity) into `root/runs/name` and returns
/// the run's config.json.
fn trained_config(root: &Path, mut config: TrainConfig, name: &str) -> serde_json::Value {
    config.eval.before = false;
    config.eval.perplexity = false;
    let run = root.join("runs").join(name);
    finished(train(&config, &run, &options(false)).unwrap());
    serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap()
}

/// `logits` as host values, row-major, with the row width.
fn host_rows(logits: burn::tensor::Tensor<2>) -> (Vec<f32>, usize) {
    let v = logits.dims()[1];
    (logits.into_data().convert::<f32>().try_into_vec::<f32>().unwrap(), v)
}

/// log-sum-exp of `row` over `columns`, in f64.
fn lse(row: &[f32], columns: impl Iterator<Item = usize> + Clone) -> f64 {
    let m = columns.clone().map(|c| row[c]).fold(f32::MIN, f32::max) as f64;
    m + columns.map(|c| (row[c] as f64 - m).exp()).sum::<f64>().ln()
}

/// `data.train_exclude_history`: an item target's loss leaves out of its softmax every item its
/// user had before the event it predicts (computed by hand here from the full logits), in the
/// vocabulary softmax, with history targets, and in the catalogue softmax; a run with it
/// trains and records it.
#[test]
fn training_without_the_history_leaves_each_targets_past_out_of_its_softmax() {
    use gems_train::forward::{TrainingTargets, sample_batch, target_loss, training_targets};
    use gems_train::setup::{LossTargets, SeenItems};
    let (root, mut config, built) = built_setup();
    let corpus = &built.corpus;
    let (base, n) = (corpus.base_vocab, corpus.n_items());
    let samples: Vec<_> = corpus
        .get(gems_data::Split::Train, gems_data::Task::Rec)
        .iter()
        .filter(|s| s.position >= 2)
        .take(6)
        .collect();
    let model = &built.pretrained.model;
    let seen = SeenItems { sequences: &corpus.sequences, base, n_items: n };
    let batch = sample_batch(&samples, corpus.eos_id).unwrap();
    for (history_from, catalogue) in
        [(None, None), (Some(base), None), (Some(base), Some((base, n)))]
    {
        let plain = LossTargets { history_from, catalogue, exclude_seen: None };
        let left_out = LossTargets { exclude_seen: Some(seen), ..plain };
        let plain = scalar(target_loss(model, &samples, corpus.eos_id, plain, None).unwrap());
        let got = scalar(target_loss(model, &samples, corpus.eos_id, left_out, None).unwrap());
        let TrainingTargets { at, ids, events } = training_targets(&samples, history_from);
        let (z, v) = host_rows(model.logits_at(&batch, &at).unwrap());
        let mut want = 0.0;
        let mut left = 0;
        for (k, &t) in ids.iter().enumerate() {
            let row = &z[k * v..(k + 1) * v];
            let mut keep: Vec<usize> = match catalogue {
                Some(_) if t >= base => (base as usize..base as usize + n).collect(),
                _ => (0..v).collect(),
            };
            if let Some(e) = events[k].filter(|_| t >= base) {
                let seq = &corpus.sequences[samples[at[k].0].user as usize];
                // The event is the target's own: what the user had before it is left out.
                assert_eq!(seq[e as usize] + base, t, "target {k}");
                let past: Vec<usize> =
                    seq[..e as usize].iter().map(|&i| (base + i) as usize).collect();
                let before = keep.len();
                keep.retain(|c| *c == t as usize || !past.contains(c));
                left += before - keep.len();
            }
            want += lse(row, keep.iter().copied()) - row[t as usize] as f64;
        }
        want /= ids.len() as f64;
        assert!(left > 0, "the batch's targets have a past");
        assert!((got - want).abs() < 1e-4, "{history_from:?} {catalogue:?}: {got} vs {want}");
        assert!(got < plain, "{got} !< {plain}");
    }

    config.data.train_exclude_history = true;
    let saved = trained_config(root.path(), config, "left-out");
    assert_eq!(saved["data"]["train_exclude_history"], true);
}

/// `data.item_softmax = "catalogue"`: an item target's loss is its cross-entropy among the
/// item tokens (computed by hand here from the full logits), end-of-sequence keeps the whole
/// vocabulary, and the mean is over every target; a run with it trains and records it.
#[test]
fn the_catalogue_softmax_is_the_rankings_cross_entropy() {
    use gems_train::forward::{sample_batch, target_loss, target_positions};
    use gems_train::setup::LossTargets;
    let (root, mut config, built) = built_setup();
    let corpus = &built.corpus;
    let (base, n) = (corpus.base_vocab, corpus.n_items());
    let samples: Vec<_> =
        corpus.get(gems_data::Split::Train, gems_data::Task::Rec).iter().take(5).collect();
    let model = &built.pretrained.model;
    let vocabulary =
        scalar(target_loss(model, &samples, corpus.eos_id, LossTargets::default(), None).unwrap());
    let targets = LossTargets { catalogue: Some((base, n)), ..LossTargets::default() };
    let catalogue = scalar(target_loss(model, &samples, corpus.eos_id, targets, None).unwrap());

    let batch = sample_batch(&samples, corpus.eos_id).unwrap();
    let (at, ids) = target_positions(&samples);
    let (z, v) = host_rows(model.logits_at(&batch, &at).unwrap());
    let mut want = 0.0;
    for (k, &t) in ids.iter().enumerate() {
        let row = &z[k * v..(k + 1) * v];
        let span = if t >= base { base as usize..base as usize + n } else { 0..v };
        want += lse(row, span) - row[t as usize] as f64;
    }
    want /= ids.len() as f64;
    assert!((catalogue - want).abs() < 1e-4, "{catalogue} vs {want}");
    assert!(catalogue < vocabulary, "{catalogue} !< {vocabulary}");

    config.data.item_softmax = gems_train::config::ItemSoftmax::Catalogue;
    let saved = trained_config(root.path(), config, "catalogue");
    assert_eq!(saved["data"]["item_softmax"], "catalogue");
}

#[test]
fn runs_that_differ_only_in_training_share_the_untuned_evaluation_and_the_floors() {
    let (root, mut config) = setup(1);
    config.eval.every = 0;
    config.eval.cache = Some(root.path().join("eval-cache"));
    let first = root.path().join("runs/gems");
    finished(train(&config, &first, &options(false)).unwrap());

    let mut other = config.clone();
    other.optimizer = other.optimizer.switch_method(Method::Full);
    other.schedule.lr = 1e-3;
    other.label = Some("full".into());
    let second = root.path().join("runs/full");
    finished(train(&other, &second, &options(false)).unwrap());
    let bytes = |dir: &Path, f: &str| std::fs::read(dir.join(f)).unwrap();
    // Byte for byte, timings included: the second run computed neither.
    for f in ["before.json", "baselines.json"] {
        assert_eq!(bytes(&first, f), bytes(&second, f), "{f}");
    }
    let cached = std::fs::read_dir(root.path().join("eval-cache")).unwrap().count();
    assert_eq!(cached, 3, "before, baselines and the keyed settings");

    // Another test sample is another key: that run evaluates its own.
    let mut fewer = config.clone();
    fewer.eval.test_examples = 16;
    let third = root.path().join("runs/fewer");
    let summary = finished(train(&fewer, &third, &options(false)).unwrap());
    assert_eq!(summary.before.unwrap().full["rec"].examples, 16);
    assert_ne!(bytes(&first, "baselines.json"), bytes(&third, "baselines.json"));
}

/// [`setup`] with the top layer tuned, an untied head whose item columns train, and only the
/// test evaluation (no untuned evaluation, perplexity or validation).
fn untied_top_layer(steps: u64) -> (tempfile::TempDir, TrainConfig) {
    let (root, mut config) = setup(steps);
    config.eval.before = false;
    config.eval.perplexity = false;
    config.eval.every = 0;
    config.model.tune_layers = Some(1);
    config.model.embeddings = gems_train::config::EmbeddingPolicy::Items;
    config.model.untie_head = true;
    (root, config)
}

/// `model.untie_head`: the input rows stay exactly as they started, the head's item columns
/// train and its text columns do not (`--embeddings items`), the saved model keeps both, and
/// it resumes.
#[test]
fn an_untied_head_trains_its_item_columns_and_leaves_the_input_rows() {
    let (root, mut config) = untied_top_layer(2);
    let dev = Device::flex();
    let untuned = gems_train::RunSetup::load(&config, &dev, &Default::default()).unwrap();
    let base = untuned.setup.corpus.base_vocab as usize;
    let host = |t: burn::tensor::Tensor<2>| -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
    };
    let start = untuned.setup.pretrained.model.clone();
    assert!(start.lm_head.is_none(), "the tiny model ties its head");
    let embed_before = host(start.embed_tokens.weight.val());
    // Untying changes no logit.
    let untied = start.clone().untie_head();
    let batch = gems_model::TokenBatch::pad(&[vec![5, 9, 2]], 0, false).unwrap();
    let (a, b) = (
        host(start.forward(&batch).unwrap().flatten(0, 1)),
        host(untied.forward(&batch).unwrap().flatten(0, 1)),
    );
    assert_eq!(a, b);
    let head_before = host(untied.lm_head.as_ref().unwrap().weight.val());

    let run = root.path().join("runs/untied");
    config.stop_after = Some(1);
    assert!(matches!(train(&config, &run, &options(false)).unwrap(), RunOutcome::Stopped { .. }));
    config.stop_after = None;
    finished(train(&config, &run, &options(true)).unwrap());
    let tuned = gems_model::load_hf_dir(&run.join("model"), &dev).unwrap().model;
    assert!(!tuned.config.tie_word_embeddings);
    assert_eq!(host(tuned.embed_tokens.weight.val()), embed_before, "input rows unchanged");
    let head_after = host(tuned.lm_head.as_ref().unwrap().weight.val());
    let vocab = head_before.len() / tuned.config.hidden_size;
    let (mut text_moved, mut items_moved) = (false, false);
    for (k, (x, y)) in head_before.iter().zip(&head_after).enumerate() {
        if x != y {
            if k % vocab < base { text_moved = true } else { items_moved = true }
        }
    }
    assert!(items_moved && !text_moved, "item columns train, text columns stay");
}

/// `model.frozen_cache`: training from kept frozen states follows training without them to
/// rounding, gives the same run whether the cache file was empty or full (each row's states
/// are those of the row alone), is shared by a later run, and refuses a damaged file and a tied head.
#[test]
fn kept_frozen_states_train_as_the_full_forward_does_and_are_shared() {
    use gems_metrics::MetricsLine;
    let (root, mut config) = untied_top_layer(3);
    let losses = |run: &Path| -> Vec<f64> {
        let lines = gems_metrics::read_metrics_lines(&run.join("metrics.jsonl")).unwrap();
        let train = lines.into_iter().filter_map(|l| match l {
            MetricsLine::Train(t) => Some([t.loss_rec, t.loss_search]),
            _ => None,
        });
        train.flatten().map(Option::unwrap).collect()
    };
    let after = |s: &RunSummary| {
        let mut v = serde_json::to_value(s.after.as_ref().unwrap()).unwrap();
        v["seconds"] = serde_json::Value::Null;
        v
    };
    let plain = root.path().join("runs/plain");
    let plain_summary = finished(train(&config, &plain, &options(false)).unwrap());

    let cache = root.path().join("frozen-cache");
    config.model.frozen_cache = Some(cache.clone());
    let cold = root.path().join("runs/cold");
    let cold_summary = finished(train(&config, &cold, &options(false)).unwrap());
    let files: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "one cache file: {files:?}");
    let file_bytes = std::fs::read(&files[0]).unwrap();
    assert!(file_bytes.len() > 1000);

    // The same rows from the file: the same run to the last bit.
    let warm = root.path().join("runs/warm");
    let warm_summary = finished(train(&config, &warm, &options(false)).unwrap());
    assert_eq!(losses(&cold), losses(&warm));
    assert_eq!(after(&cold_summary), after(&warm_summary));
    assert_eq!(std::fs::read(&files[0]).unwrap(), file_bytes, "nothing new to keep");

    // Against every layer at every step: rounding apart, the same losses.
    let (a, b) = (losses(&plain), losses(&cold));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "{a:?} against {b:?}");
    }
    let (pa, pb) = (after(&plain_summary), after(&cold_summary));
    assert_eq!(pa["full"]["rec"]["examples"], pb["full"]["rec"]["examples"]);

    // A damaged file is named, not rebuilt behind the user's back.
    let mut bad = file_bytes.clone();
    bad[30] ^= 0xff;
    std::fs::write(&files[0], &bad).unwrap();
    let err = train(&config, &root.path().join("runs/damaged"), &options(false)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("frozen-") && msg.contains("checksum"), "{msg}");

    // A tied head trains the rows the frozen layers read: refused.
    config.model.untie_head = false;
    let err = train(&config, &root.path().join("runs/tied"), &options(false)).unwrap_err();
    assert!(err.to_string().contains("model.frozen_cache needs input rows"), "{err}");
}
