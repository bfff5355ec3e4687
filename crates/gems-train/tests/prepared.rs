//! `gems train --data DIR`: training on a directory written by `gems data prepare`, on the tiny
//! random model and a slice of Amazon Scientific. Reads `../shared/data`; no network.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use gems_data::{
    HfTokenizer, PrepareConfig, TaskAssignment, TextTokenizer, prepare, resolve_dataset,
    write_prepared,
};
use gems_optim::{Method, OptimizerConfig};
use gems_train::setup::{Corpus, adopt_prepared, build, load_model};
use gems_train::tiny::tiny_run_config;
use gems_train::{RunOptions, RunOutcome, TrainConfig, train};

fn data_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

/// The tiny model's tokenizer, as `gems data prepare --tokenizer` would load it.
fn model_tokenizer(config: &TrainConfig) -> HfTokenizer {
    let p = load_model(config.model.path.as_ref().unwrap(), None, &Device::flex()).unwrap();
    HfTokenizer::new(p.tokenizer, None).unwrap()
}

/// What `gems data prepare --dataset <tiny data> --max-history 8 [--tokenizer]` writes, with
/// `change` applied to the preparation settings.
fn prepare_dir(
    config: &TrainConfig,
    tokenizer: Option<&dyn TextTokenizer>,
    change: impl Fn(&mut PrepareConfig),
    out: &Path,
) {
    let spec = resolve_dataset(&config.data.dataset, &config.data.data_root, None).unwrap();
    let mut prep = PrepareConfig::from_spec(&spec);
    prep.build.max_history = config.data.max_history;
    change(&mut prep);
    let prepared = prepare(&spec.dir, &prep, tokenizer).unwrap();
    write_prepared(&prepared, &spec.dir, &prep, tokenizer, None, out).unwrap();
}

fn corpus(config: &TrainConfig) -> gems_train::Result<Corpus> {
    let p = load_model(config.model.path.as_ref().unwrap(), None, &Device::flex()).unwrap();
    build(p, config).map(|s| s.corpus)
}

fn with_prepared(config: &TrainConfig, dir: &Path) -> TrainConfig {
    let mut c = config.clone();
    adopt_prepared(&mut c.data, dir).unwrap();
    c
}

fn assert_same(a: &Corpus, b: &Corpus) {
    assert_eq!(a.dataset, b.dataset);
    assert_eq!((a.base_vocab, a.eos_id), (b.base_vocab, b.eos_id));
    assert_eq!(a.titles, b.titles);
    assert_eq!(a.categories, b.categories);
    assert_eq!(a.item_ids, b.item_ids);
    assert_eq!(a.users, b.users);
    assert_eq!(a.prepare, b.prepare);
    assert_eq!(a.samples, b.samples);
}

#[test]
fn a_prepared_directory_gives_the_corpus_of_the_dataset() {
    let root = tempfile::tempdir().unwrap();
    let config = tiny_run_config(root.path(), &data_root(), 2).unwrap();
    let direct = corpus(&config).unwrap();
    assert!(direct.samples.values().map(Vec::len).sum::<usize>() > 0);

    // Untokenised (no --tokenizer) and tokenised with the model's tokenizer: the same samples
    // as preparing the dataset in the run.
    let tokenizer = model_tokenizer(&config);
    for (name, tok) in [("plain", None), ("tokenized", Some(&tokenizer as &dyn TextTokenizer))] {
        let dir = root.path().join(name);
        prepare_dir(&config, tok, |_| {}, &dir);
        let from_dir = corpus(&with_prepared(&config, &dir)).unwrap();
        assert_same(&direct, &from_dir);
    }
}

#[test]
fn training_runs_on_a_prepared_directory_with_its_own_options() {
    let root = tempfile::tempdir().unwrap();
    let mut config = tiny_run_config(root.path(), &data_root(), 2).unwrap();
    config.optimizer = OptimizerConfig::for_method(Method::Full);
    config.eval.before = false;
    config.eval.perplexity = false;
    config.eval.floors = false;
    config.eval.every = 0;
    config.eval.test_examples = 8;
    let dir = root.path().join("prepared");
    // Options the run's own preparation does not have: one task per target, other negatives.
    prepare_dir(
        &config,
        None,
        |p| {
            p.build.assignment = TaskAssignment::Split { search_probability: 0.5 };
            p.build.n_negatives = 19;
        },
        &dir,
    );
    let config = with_prepared(&config, &dir);
    assert_eq!(config.data.negatives, 19);
    let c = corpus(&config).unwrap();
    assert!(matches!(c.prepare.build.assignment, TaskAssignment::Split { .. }));
    let options =
        RunOptions { device: Device::flex(), resume: false, progress: Default::default() };
    let run = root.path().join("run");
    match train(&config, &run, &options).unwrap() {
        RunOutcome::Finished(s) => assert_eq!(s.steps, 2),
        RunOutcome::Stopped { step } => panic!("stopped at {step}"),
    }
    let saved = std::fs::read_to_string(run.join("config.json")).unwrap();
    assert!(saved.contains("\"prepared\""), "{saved}");
    // Without a prepared directory the field is not written at all.
    assert!(!TrainConfig::default().to_json().contains("prepared"));
}

#[test]
fn damaged_or_foreign_prepared_directories_are_refused_naming_the_file() {
    let root = tempfile::tempdir().unwrap();
    let config = tiny_run_config(root.path(), &data_root(), 2).unwrap();
    let dir = root.path().join("prepared");
    let error = |c: &TrainConfig| corpus(c).unwrap_err().to_string();

    let mut missing = config.clone();
    missing.data.prepared = Some(root.path().join("no-such-dir"));
    assert!(error(&missing).contains("no-such-dir"), "{}", error(&missing));

    prepare_dir(&config, None, |_| {}, &dir);
    let good = with_prepared(&config, &dir);

    // A setting that disagrees with the manifest.
    let mut other = good.clone();
    other.data.max_history = 5;
    let e = error(&other);
    assert!(e.contains("data.max_history") && e.contains("manifest.json"), "{e}");

    // A tampered example file.
    let file = dir.join("train.rec.jsonl");
    let original = std::fs::read(&file).unwrap();
    let mut tampered = original.clone();
    let at = tampered.iter().position(|&b| b == b'5').unwrap();
    tampered[at] = b'6';
    std::fs::write(&file, &tampered).unwrap();
    let e = error(&good);
    assert!(e.contains("train.rec.jsonl") && e.contains("checksums.json"), "{e}");
    std::fs::write(&file, &original).unwrap();
    corpus(&good).unwrap();

    // Another format version.
    let manifest = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("\"format_version\": 1", "\"format_version\": 99"))
        .unwrap();
    let e = error(&good);
    assert!(e.contains("manifest.json") && e.contains("format_version 99"), "{e}");

    // No manifest.
    std::fs::remove_file(&manifest).unwrap();
    let e = error(&good);
    assert!(e.contains("manifest.json") && e.contains("missing"), "{e}");

    // Tokenised with a tokenizer that is not the model's.
    let shifted = root.path().join("shifted");
    prepare_dir(&config, Some(&Shifted(model_tokenizer(&config))), |_| {}, &shifted);
    let e = error(&with_prepared(&config, &shifted));
    assert!(e.contains("manifest.json") && e.contains("tokenizer"), "{e}");
}

/// The model's tokenizer with a different text vocabulary size (so other item ids).
struct Shifted(HfTokenizer);

impl TextTokenizer for Shifted {
    fn encode(&self, text: &str) -> gems_data::Result<Vec<u32>> {
        self.0.encode(text)
    }
    fn vocab_size(&self) -> u32 {
        self.0.vocab_size() + 1
    }
    fn eos_id(&self) -> u32 {
        self.0.eos_id()
    }
}

#[test]
fn run_time_prompts_are_the_samples_before_their_targets() {
    let root = tempfile::tempdir().unwrap();
    let config = tiny_run_config(root.path(), &data_root(), 2).unwrap();
    let p = load_model(config.model.path.as_ref().unwrap(), None, &Device::flex()).unwrap();
    let setup = build(p, &config).unwrap();
    let mut checked = 0;
    for ((_, task), samples) in &setup.corpus.samples {
        for s in samples {
            let query = (*task == gems_data::Task::Search).then_some(s.query.as_deref()).flatten();
            let ids = setup.prompt_ids(&s.history, query).unwrap();
            assert_eq!(ids, s.ids[..s.target_pos]);
            checked += 1;
        }
    }
    assert!(checked > 100);
}
