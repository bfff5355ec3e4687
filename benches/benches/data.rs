//! Preparing Amazon Scientific end to end: load the LC-Rec JSON, clean text, synthesise
//! queries, build leave-one-out rec and search examples with 99 negatives, tokenise.
//!
//! - `data/scientific/prepare`: all of the above in memory (the target: under 5 s
//!   median); throughput is reported in examples per second.
//! - `data/scientific/prepare_and_write`: the same plus writing the prepared directory.
//!
//! The tokenizer is a word-level vocabulary built in code from the catalogue (no network, no
//! model files). Prompts repeat their text segments, and encodings are memoised, so the text
//! tokenizer's speed barely matters; a BPE tokenizer gives the same shape of cost.
//!
//! Data: `$GEMS_DATA_DIR` or `../shared/data` beside the checkout.
//! Run: `cargo bench -p gems-benches --bench data`.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_main};
use gems_data::load::resolve_dataset;
use gems_data::prompt::{PREFIX, REC_SUFFIX, SEARCH_QUERY_INTRO, SEARCH_SUFFIX};
use gems_data::{HfTokenizer, PrepareConfig, TextTokenizer, prepare, write_prepared};

fn data_root() -> PathBuf {
    let root = std::env::var_os("GEMS_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data"))
    });
    assert!(
        root.join("amazon_scientific").is_dir(),
        "Amazon Scientific not found under {} (set GEMS_DATA_DIR)",
        root.display()
    );
    root
}

fn bench_scientific(c: &mut Criterion) {
    let spec = resolve_dataset("scientific", &data_root(), None).expect("resolving scientific");
    let config = PrepareConfig::from_spec(&spec);
    // Vocabulary: the prompt templates plus every title and query of the catalogue.
    let untokenized = prepare(&spec.dir, &config, None).expect("preparing scientific");
    let mut corpus: Vec<String> =
        [PREFIX, REC_SUFFIX, SEARCH_QUERY_INTRO, SEARCH_SUFFIX].map(String::from).to_vec();
    corpus.extend(untokenized.dataset.catalogue.items().iter().map(|i| i.title.clone()));
    corpus.extend(
        untokenized.dataset.users.iter().flat_map(|u| &u.events).filter_map(|e| e.query.clone()),
    );
    let tokenizer =
        HfTokenizer::word_level(corpus.iter().map(String::as_str)).expect("building the tokenizer");
    let tok: &dyn TextTokenizer = &tokenizer;
    let n_examples = untokenized.examples.len() as u64;

    let mut group = c.benchmark_group("data/scientific");
    // Each iteration takes 0.1 to 1 s: flat sampling, few samples.
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(15));
    group.throughput(Throughput::Elements(n_examples));
    group.bench_function("prepare", |b| {
        b.iter(|| black_box(prepare(&spec.dir, &config, Some(tok)).expect("prepare")))
    });
    let out = std::env::temp_dir().join(format!("gems-bench-data-{}", std::process::id()));
    group.bench_function("prepare_and_write", |b| {
        b.iter(|| {
            let prepared = prepare(&spec.dir, &config, Some(tok)).expect("prepare");
            black_box(
                write_prepared(&prepared, &spec.dir, &config, Some(tok), None, &out)
                    .expect("write"),
            )
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&out);
}

/// Criterion's macros emit an undocumented `pub fn`; a private module keeps `missing_docs` quiet.
mod group {
    criterion::criterion_group!(benches, super::bench_scientific);
}
criterion_main!(group::benches);
