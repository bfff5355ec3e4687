//! `gems data prepare` then `gems train --data`, through the binary, on the tiny model and a
//! slice of Amazon Scientific. Reads `../shared/data`; no network.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gems_train::tiny::tiny_run_config;

fn data_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

fn gems(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gems")).args(args).output().expect("run gems")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn train_data_trains_on_what_data_prepare_wrote() {
    let root = tempfile::tempdir().unwrap();
    let mut config = tiny_run_config(root.path(), &data_root(), 1).unwrap();
    config.eval.before = false;
    config.eval.perplexity = false;
    config.eval.floors = false;
    config.eval.every = 0;
    config.eval.test_examples = 4;
    let cfg = root.path().join("tiny.json");
    std::fs::write(&cfg, config.to_json()).unwrap();
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

    // --data is one way to name the data, and a directory that is not there is named.
    let o = gems(&[&args[..], &["--data", &path(&prepared), "--dataset", "beauty"]].concat());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
    let missing = root.path().join("no-such-prepared");
    let o = gems(&[&args[..], &["--data", &path(&missing)]].concat());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no-such-prepared"), "{}", stderr(&o));
}
