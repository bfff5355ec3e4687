//! End-to-end tests of the `gems` binary's `data` commands: what a user types, what they get.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gems_data::HfTokenizer;

fn gems(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gems"))
        .args(args)
        .env_remove("GEMS_DATA_DIR")
        .output()
        .expect("running the gems binary")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../gems-data/tests/fixtures").join(name)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn read_dir_sorted(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn prepare_with_a_tokenizer_is_deterministic_and_stats_reads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer_path = tmp.path().join("tokenizer.json");
    let tok = HfTokenizer::word_level(["Below is the user's interaction history: , . Please tea"])
        .unwrap();
    tok.inner().save(&tokenizer_path, false).unwrap();
    let dataset = fixture("jsonl_ok");
    let mut outputs = Vec::new();
    for run in ["a", "b"] {
        let out = tmp.path().join(run);
        let result = gems(&[
            "data",
            "prepare",
            "--dataset",
            dataset.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--tokenizer",
            tokenizer_path.to_str().unwrap(),
            "--negatives",
            "2",
        ]);
        assert!(result.status.success(), "{}", text(&result.stderr));
        assert!(text(&result.stderr).contains("prepared"), "{}", text(&result.stderr));
        outputs.push(read_dir_sorted(&out));
    }
    assert_eq!(outputs[0], outputs[1]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&outputs[0].iter().find(|(n, _)| n == "manifest.json").unwrap().1)
            .unwrap();
    assert_eq!(manifest["tokenized"], true);
    assert_eq!(manifest["config"]["format"], "jsonl");
    assert_eq!(manifest["tokenizer"]["eos_id"], 1);

    let stats = gems(&["data", "stats", tmp.path().join("a").to_str().unwrap()]);
    assert!(stats.status.success(), "{}", text(&stats.stderr));
    let out = text(&stats.stdout);
    assert!(out.contains("users                3"), "{out}");
    assert!(out.contains("prompt tokens"), "{out}");
}

#[test]
fn prepare_without_a_tokenizer_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("p");
    let dataset = fixture("sasrec_ok");
    let result = gems(&[
        "data",
        "prepare",
        "--dataset",
        dataset.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", text(&result.stderr));
    assert!(text(&result.stderr).contains("no --tokenizer"), "{}", text(&result.stderr));
    let manifest = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(manifest.contains("\"tokenized\": false"), "{manifest}");
}

#[test]
fn malformed_input_fails_with_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dataset = fixture("lcrec_unknown_item");
    let result = gems(&[
        "data",
        "prepare",
        "--dataset",
        dataset.to_str().unwrap(),
        "--out",
        tmp.path().join("p").to_str().unwrap(),
    ]);
    assert!(!result.status.success());
    let err = text(&result.stderr);
    assert!(err.contains("Tiny.inter.json:3: unknown item id \"99\""), "{err}");
}

#[test]
fn unknown_dataset_name_is_explained() {
    let result = gems(&["data", "prepare", "--dataset", "nope", "--out", "/tmp/unused-gems"]);
    assert!(!result.status.success());
    assert!(
        text(&result.stderr).contains("neither a known dataset name"),
        "{}",
        text(&result.stderr)
    );
}

#[test]
fn scientific_stats_report_search_examples_and_queries() {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data"));
    assert!(
        root.join("amazon_scientific").is_dir(),
        "shared data not found at {}: this test needs ../shared/data beside the checkout",
        root.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sci");
    let result = gems(&[
        "data",
        "prepare",
        "--dataset",
        "scientific",
        "--data-root",
        root.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", text(&result.stderr));
    let stats = gems(&["data", "stats", out.to_str().unwrap(), "--json"]);
    assert!(stats.status.success(), "{}", text(&stats.stderr));
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["counts"]["users"], 8317);
    assert_eq!(stats["counts"]["items"], 4344);
    assert_eq!(stats["search_examples"], 48_849);
    assert_eq!(stats["distinct_search_queries"], 754);
    assert_eq!(stats["counts"]["examples"]["test"]["rec"], 8317);
    assert_eq!(stats["counts"]["examples"]["valid"]["rec"], 8317);
}
