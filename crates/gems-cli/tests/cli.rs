//! The `gems` binary end to end on a tiny run: eval, recommend, search, report, export, `data
//! prepare` then `train --data`, and clear errors for bad arguments and missing files. Reads
//! `../shared/data`; no network.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::tensor::Device;
use gems_train::tiny::tiny_run_config;
use gems_train::{RunOptions, RunOutcome, train};

fn data_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

fn gems(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gems")).args(args).output().expect("run gems")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn commands_work_on_a_finished_run() {
    let root = tempfile::tempdir().unwrap();
    let mut config = tiny_run_config(root.path(), &data_root(), 3).unwrap();
    config.eval.perplexity = false;
    let run = root.path().join("run");
    let options =
        RunOptions { device: Device::flex(), resume: false, progress: Default::default() };
    assert!(matches!(train(&config, &run, &options).unwrap(), RunOutcome::Finished(_)));
    let run_s = run.to_str().unwrap();

    let o = gems(&["recommend", run_s, "--user", "0", "--top-k", "5", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> =
        stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["rank"], 1);
    assert!(lines[0]["log_prob"].as_f64().unwrap() >= lines[4]["log_prob"].as_f64().unwrap());
    assert!(lines[0]["title"].as_str().is_some());

    let o = gems(&["search", run_s, "--user", "0", "--query", "lab equipment", "--top-k", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("| 3 |"), "{}", stdout(&o));

    let o = gems(&["eval", run_s, "--examples", "8", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "", "--quiet prints no progress");
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(report["full"]["rec"]["examples"], 8);
    assert_eq!(report["whole_history"], true);

    // The floors on the same examples, without the model.
    let o = gems(&["eval", run_s, "--examples", "8", "--quiet", "--floors"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let floors: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(floors["popular"]["full"]["rec"]["examples"], 8);
    assert_eq!(floors["itemknn"]["full"]["rec"]["examples"], 8);
    // From config.json alone (a reproduction's record keeps no model), the floors training wrote
    // to baselines.json, the second time from the evaluation cache.
    let record = root.path().join("record");
    std::fs::create_dir_all(&record).unwrap();
    std::fs::copy(run.join("config.json"), record.join("config.json")).unwrap();
    let (cache, written) = (root.path().join("cache"), root.path().join("floors.json"));
    let floors_args = [
        "eval",
        record.to_str().unwrap(),
        "--floors",
        "--eval-cache",
        cache.to_str().unwrap(),
        "--out",
        written.to_str().unwrap(),
    ];
    let without_seconds = |path: &Path| {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        v.as_object_mut().unwrap().values_mut().for_each(|r| {
            r.as_object_mut().unwrap().remove("seconds");
        });
        v
    };
    for from_cache in [false, true] {
        let o = gems(&floors_args);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stderr(&o).contains("from the evaluation cache"), from_cache, "{}", stderr(&o));
        assert_eq!(without_seconds(&written), without_seconds(&run.join("baselines.json")));
    }
    let o = gems(&["eval", record.to_str().unwrap(), "--floors", "--eval-cache", "c"]);
    assert!(!o.status.success() && stderr(&o).contains("--out"), "{}", stderr(&o));

    let out = root.path().join("report");
    let o = gems(&["report", run_s, "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in ["report.md"].into_iter().chain(gems_metrics::PLOT_FILES) {
        assert!(out.join(f).is_file(), "{f}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("Floors without a language model") && md.contains("| bm25 |"), "{md}");
    assert!(md.contains("Protocol: every item of the catalogue is ranked"), "{md}");

    let exported = root.path().join("exported");
    let o = gems(&["export", run_s, exported.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(exported.join("model.safetensors").is_file());
    assert!(exported.join("tokenizer.json").is_file());

    // Errors that name what is wrong.
    // Flags that used to be capped or ignored silently (on the tiny model's configuration).
    let cfg = root.path().join("tiny.json");
    std::fs::write(&cfg, serde_json::to_string(&config).unwrap()).unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let out = root.path().join("refused");
    let out_s = out.to_str().unwrap();
    let o = gems(&[
        "train",
        "--preset",
        "default",
        "--config",
        cfg_s,
        "--out",
        out_s,
        "--keep-layers",
        "1000",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("keep_layers 1000 exceeds the 2 layers"), "{}", stderr(&o));
    let o = gems(&[
        "train", "--preset", "default", "--config", cfg_s, "--out", out_s, "--rank", "100000",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("rank 100000 exceeds the full rank"), "{}", stderr(&o));
    let o = gems(&["recommend", run_s, "--user", "0", "--top-k", "1000000000"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("exceeds the catalogue"), "{}", stderr(&o));
    let long = "a".repeat(5000);
    let o = gems(&["search", run_s, "--user", "0", "--query", &long]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("at most 1024"), "{}", stderr(&o));
    let o = gems(&["recommend", run_s, "--user", "no-such-user"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown user `no-such-user`"), "{}", stderr(&o));
    let o = gems(&["export", run_s, exported.to_str().unwrap(), "--adapter"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no PEFT adapter"), "{}", stderr(&o));
}

#[test]
fn bad_arguments_and_missing_files_give_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("r");
    let out_s = out.to_str().unwrap();

    let o = gems(&["train", "--out", out_s, "--steps", "0"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("schedule.steps"), "{}", stderr(&o));

    let o = gems(&["train", "--out", out_s, "--model", "/no/such/model.gguf"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/no/such/model.gguf"), "{}", stderr(&o));

    let o = gems(&["train", "--out", out_s, "--config", "/no/such/config.toml"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/no/such/config.toml"), "{}", stderr(&o));

    let bad = root.path().join("bad.toml");
    std::fs::write(&bad, "[schedule]\nsteps = \"many\"\n").unwrap();
    let o = gems(&["train", "--out", out_s, "--config", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad.toml"), "{}", stderr(&o));
    assert!(stderr(&o).contains("schedule.steps"), "the field is named: {}", stderr(&o));

    let o = gems(&["train", "--out", out_s, "--method", "sgd"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("invalid value 'sgd'"), "{}", stderr(&o));

    let o = gems(&["train", "--out", out_s, "--device", "cuda"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--features cuda"), "{}", stderr(&o));

    let o = gems(&["recommend", "/no/such/run", "--user", "1"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a run directory"), "{}", stderr(&o));

    let o = gems(&["report", "/no/such/run"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/no/such/run"), "{}", stderr(&o));

    // A missing file's OS error is stated once, whichever crate met it.
    let missing: [&[&str]; 4] = [
        &["model", "check", "--model", "/no/such/model.gguf"],
        &["train", "--out", out_s, "--model", "/no/such/model.gguf"],
        &["data", "stats", "/no/such/prepared"],
        &["train", "--out", out_s, "--config", "/no/such/config.toml"],
    ];
    for args in missing {
        let o = gems(args);
        let err = stderr(&o);
        assert!(!o.status.success() && err.contains("/no/such/"), "{args:?}: {err}");
        assert!(err.matches("os error").count() <= 1, "{args:?}: {err}");
    }
}

/// A user error prints its message chain once, with no backtrace even when RUST_BACKTRACE is
/// set (resolving one cost about 0.4 s and 158 MB per error).
#[test]
fn user_errors_print_the_message_chain_without_a_backtrace() {
    let o = Command::new(env!("CARGO_BIN_EXE_gems"))
        .args(["recommend", "/no/such/run", "--user", "1"])
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .expect("run gems");
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("/no/such/run"), "{err}");
    for noise in ["backtrace", "Backtrace", "Caused by", "Stack"] {
        assert!(!err.contains(noise), "{noise} in {err}");
    }
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// `gems data prepare` then `gems train --data` on what it wrote.
/// A one-step tiny run configuration that skips every evaluation but a 4-example test, and
/// the file it is written to under `root`.
fn quick_run_config(root: &Path) -> (gems_train::TrainConfig, PathBuf) {
    let mut config = tiny_run_config(root, &data_root(), 1).unwrap();
    config.eval.before = false;
    config.eval.perplexity = false;
    config.eval.floors = false;
    config.eval.every = 0;
    config.eval.test_examples = 4;
    let cfg = root.join("tiny.json");
    std::fs::write(&cfg, config.to_json()).unwrap();
    (config, cfg)
}

#[test]
fn train_data_trains_on_what_data_prepare_wrote() {
    let root = tempfile::tempdir().unwrap();
    let (config, cfg) = quick_run_config(root.path());
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let prepared = root.path().join("prepared");
    let tokenizer = config.model.path.as_ref().unwrap().join("tokenizer.json");

    let o = gems(&[
        "data",
        "prepare",
        "--dataset",
        &config.data.dataset,
        "--out",
        &path(&prepared),
        "--tokenizer",
        &path(&tokenizer),
        "--queries",
        "categories",
        "--assignment",
        "split",
        "--max-history",
        "6",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A reader that closes stdout early (`gems data stats DIR | head -1`) ends the program
    // quietly, where it used to panic with exit 101.
    let mut child = Command::new(env!("CARGO_BIN_EXE_gems"))
        .args(["data", "stats", &path(&prepared)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{:?}: {}", o.status, stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));

    let run = root.path().join("run");
    let args =
        ["train", "--preset", "default", "--config", &path(&cfg), "--out", &path(&run), "--quiet"];
    let o = gems(&[&args[..], &["--data", &path(&prepared)]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["data"]["prepared"], path(&prepared));
    assert_eq!(saved["data"]["max_history"], 6, "copied from the manifest");
    assert!(run.join("summary.json").is_file());
    // A finished `gems train` writes the run's report and says where.
    let report = std::fs::read_to_string(run.join("report/report.md")).unwrap();
    assert!(report.contains("## Runs"), "{report}");
    assert!(stderr(&o).contains("report/report.md"), "{}", stderr(&o));

    // --data is one way to name the data, and a directory that is not there is named.
    let o = gems(&[&args[..], &["--data", &path(&prepared), "--dataset", "beauty"]].concat());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
    let missing = root.path().join("no-such-prepared");
    let o = gems(&[&args[..], &["--data", &path(&missing)]].concat());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no-such-prepared"), "{}", stderr(&o));
}

/// The default null space is the input side with strict mode; `--null-space-side output
/// --no-strict-null-space` is the paper's. Both are recorded in config.json and decide the
/// statistics' dimensions; `gems drift` then measures the run's response change.
#[test]
fn null_space_defaults_and_the_papers_side_build_their_projectors() {
    let root = tempfile::tempdir().unwrap();
    let (_, cfg) = quick_run_config(root.path());
    let path = |p: &Path| p.to_str().unwrap().to_string();
    let train = |run: &Path, extra: &[&str]| {
        // Two steps: the cosine schedule's last step has learning rate 0, so a one-step run
        // leaves the weights as they were.
        let mut args =
            vec!["train", "--preset", "default", "--method", "gems", "--quiet", "--steps", "2"];
        let (cfg, run) = (path(&cfg), path(run));
        args.extend(["--config", cfg.as_str(), "--out", run.as_str()]);
        args.extend(extra);
        let o = gems(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let read = |run: &Path, name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(run.join(name)).unwrap()).unwrap()
    };
    let dims = |run: &Path| {
        let report = read(run, "nullspace.json");
        let dim = |suffix: &str| {
            let layers = report["layers"].as_array().unwrap();
            let l = layers.iter().find(|l| l["path"].as_str().unwrap().ends_with(suffix));
            l.unwrap()["dim"].as_u64().unwrap()
        };
        [dim("q_proj.weight"), dim("k_proj.weight"), dim("down_proj.weight")]
    };

    let default = root.path().join("default");
    train(&default, &[]);
    let saved = read(&default, "config.json");
    assert_eq!(saved["null_space"]["side"], "input");
    assert_eq!(saved["optimizer"]["null_space"]["side"], "input");
    assert_eq!(saved["optimizer"]["gems"]["strict_null_space"], true);
    // Inputs: q and k read the same hidden state, down_proj the MLP's wider activations.
    let [q, k, down] = dims(&default);
    assert!(q == k && down > q, "{q} {k} {down}");

    let paper = root.path().join("paper");
    train(&paper, &["--null-space-side", "output", "--no-strict-null-space"]);
    let saved = read(&paper, "config.json");
    assert_eq!(saved["null_space"]["side"], "output");
    assert_eq!(saved["optimizer"]["gems"]["strict_null_space"], false);
    // Outputs: q writes every head, k only the key-value heads.
    let [q, k, _] = dims(&paper);
    assert!(q > k, "{q} {k}");

    let text = data_root().join("wikitext2_general_text/test.txt");
    let drift = root.path().join("drift.json");
    let o = gems(&[
        "drift",
        &path(&paper),
        "--text",
        &path(&text),
        "--tokens",
        "300",
        "--quiet",
        "--out",
        &path(&drift),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&drift).unwrap()).unwrap();
    let projections = report["projections"].as_array().unwrap();
    assert!(!projections.is_empty(), "{report}");
    for p in projections {
        let change = p["relative_change"].as_f64().unwrap();
        assert!(change.is_finite() && change > 0.0, "{p}");
    }

    let o =
        gems(&["train", "--null-space-side", "sideways", "--out", &path(&root.path().join("x"))]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("sideways"), "{}", stderr(&o));
    let o = gems(&["drift", &path(&root.path().join("nowhere"))]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a run directory"), "{}", stderr(&o));
}
