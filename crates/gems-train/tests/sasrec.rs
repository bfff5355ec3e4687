//! The SASRec floor: it learns a sequential rule that popularity cannot see, it is
//! deterministic, and it skips search. No network, no GPU; the ignored test measures it on
//! Amazon Scientific (`../shared/data`) and is meant for a release build:
//! `cargo test --release -p gems-train --test sasrec -- --ignored --nocapture`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::tensor::Device;
use gems_data::{
    BuildConfig, DataFormat, LoadOptions, PrepareConfig, QuerySynthesis, Split, Task,
    resolve_dataset,
};
use gems_metrics::{EvalReport, NdcgNormaliser};
use gems_rng::SplitMix64;
use gems_train::baselines::{Baseline, evaluate_baseline, evaluate_baselines};
use gems_train::eval::{EvalOptions, rank_samples};
use gems_train::sasrec::{self, SasrecConfig};
use gems_train::{Corpus, Event, Reporter, Sample, TrainConfig};

fn sample(user: u32, history: &[u32], target: u32, query: Option<String>) -> Sample {
    Sample {
        user,
        position: history.len() as u32,
        ids: Vec::new(),
        target_pos: 0,
        target,
        history: history.to_vec(),
        query,
        negatives: Vec::new(),
    }
}

fn corpus(n_items: usize, users: usize, samples: BTreeMap<(Split, Task), Vec<Sample>>) -> Corpus {
    let build = BuildConfig { max_history: 5, ..BuildConfig::default() };
    Corpus {
        dataset: "synthetic".into(),
        base_vocab: 0,
        eos_id: 0,
        titles: (0..n_items).map(|i| format!("item {i}")).collect(),
        categories: vec![Vec::new(); n_items],
        item_ids: (0..n_items).map(|i| i.to_string()).collect(),
        users: (0..users).map(|u| u.to_string()).collect(),
        sequences: gems_train::setup::user_sequences(users, &samples),
        samples,
        prepare: PrepareConfig {
            dataset: "synthetic".into(),
            format: DataFormat::Jsonl,
            load: LoadOptions::default(),
            query_synthesis: QuerySynthesis::Off,
            build,
        },
    }
}

/// Users walk the catalogue in steps of one (item i, then i + 1 mod n) from a random start, for
/// 4 to 8 events; leave-one-out splits as in `gems-data`. Every user also has one search
/// example at the test position, so the floors must skip it correctly. Popularity is nearly
/// flat; the next item is a function of the last one.
fn successor_corpus(n_items: usize, users: usize, seed: u64) -> Corpus {
    let mut rng = SplitMix64::new(seed);
    let mut samples: BTreeMap<(Split, Task), Vec<Sample>> = BTreeMap::new();
    for u in 0..users {
        let start = rng.below(n_items as u64) as u32;
        let len = 4 + rng.below(5) as usize;
        let events: Vec<u32> = (0..len).map(|j| (start + j as u32) % n_items as u32).collect();
        for position in 1..len {
            let split = match len - 1 - position {
                0 => Split::Test,
                1 => Split::Valid,
                _ => Split::Train,
            };
            let history = &events[position.saturating_sub(5)..position];
            let target = events[position];
            samples
                .entry((split, Task::Rec))
                .or_default()
                .push(sample(u as u32, history, target, None));
            if split == Split::Test {
                let query = Some(format!("item {target}"));
                samples
                    .entry((split, Task::Search))
                    .or_default()
                    .push(sample(u as u32, history, target, query));
            }
        }
    }
    corpus(n_items, users, samples)
}

fn options(tasks: &[Task]) -> EvalOptions {
    EvalOptions {
        label: "floor".into(),
        split: Split::Test,
        tasks: tasks.to_vec(),
        max_examples: 0,
        seed: 11,
        batch_size: 64,
        sampled: false,
        normaliser: NdcgNormaliser::Standard,
        exclude_history: true,
        progress: Reporter::silent(),
    }
}

fn metric(report: &EvalReport, task: &str, name: &str) -> f64 {
    report.full[task].get(name).unwrap()
}

#[test]
fn sasrec_learns_the_successor_rule_that_popularity_cannot_see() {
    let corpus = successor_corpus(40, 500, 3);
    let floors = evaluate_baselines(&corpus, &options(&Task::ALL)).unwrap();
    assert_eq!(
        floors.keys().collect::<Vec<_>>(),
        ["bm25", "itemknn", "popular", "sasrec", "successors"]
    );
    assert_eq!(floors["itemknn"].full.keys().collect::<Vec<_>>(), ["rec"]);
    let itemknn = metric(&floors["itemknn"], "rec", "recall@10");
    // SASRec ranks recommendation only, as BM25 ranks search only.
    assert_eq!(floors["sasrec"].full.keys().collect::<Vec<_>>(), ["rec"]);
    assert_eq!(floors["sasrec"].full["rec"].examples, 500);
    assert!(floors["sasrec"].loss.is_empty());
    let popular = metric(&floors["popular"], "rec", "recall@10");
    let sasrec = metric(&floors["sasrec"], "rec", "recall@10");
    let sasrec_ndcg = metric(&floors["sasrec"], "rec", "ndcg@10");
    // 10 of 40 nearly equally popular items: popularity finds the target about a quarter of
    // the time; the successor rule puts it first.
    assert!(popular < 0.45, "popular recall@10 {popular}");
    assert!(sasrec > 0.9 && sasrec > popular + 0.4, "sasrec {sasrec} vs popular {popular}");
    assert!(sasrec_ndcg > 0.7, "sasrec ndcg@10 {sasrec_ndcg}");
    // The successor co-occurs with the recent items: ItemKNN sees the rule without learning.
    assert!(itemknn > 0.9, "itemknn {itemknn}");
}

#[test]
fn sasrec_is_deterministic_and_follows_the_seed() {
    let corpus = successor_corpus(30, 150, 5);
    let opts = options(&[Task::Rec]);
    let report = |opts: &EvalOptions| {
        let mut r = evaluate_baseline(&corpus, Baseline::Sasrec, opts).unwrap();
        r.seconds = 0.0; // wall time is the one field allowed to differ
        serde_json::to_string(&r).unwrap()
    };
    assert_eq!(report(&opts), report(&opts));
    // Observed, the same report; only SASRec's training is a phase (the ranking is not).
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let observed = EvalOptions {
        progress: Reporter::new(move |e: &Event| sink.lock().unwrap().push(e.clone())),
        ..opts.clone()
    };
    assert_eq!(report(&observed), report(&opts));
    let events = events.lock().unwrap();
    assert!(matches!(&events[0], Event::PhaseStarted { phase, .. } if phase == "sasrec"));
    assert!(
        matches!(events.last(), Some(Event::PhaseFinished { phase, summary: Some(s), .. })
            if phase == "sasrec" && s.ends_with(" steps")),
        "{:?}",
        events.last()
    );
    assert!(events[1..events.len() - 1].iter().all(|e| matches!(e, Event::Progress { .. })));
    // The scores themselves, bit for bit; another seed draws other weights and masks.
    let test: Vec<&Sample> = corpus.get(Split::Test, Task::Rec).iter().collect();
    let scores = |seed: u64| -> Vec<u32> {
        let config = SasrecConfig { epochs: 2, ..SasrecConfig::for_corpus(&corpus, seed) };
        let model = sasrec::train(&corpus, &config, &Device::flex(), &Reporter::silent()).unwrap();
        model.score(&test).unwrap().into_iter().map(f32::to_bits).collect()
    };
    let seed = gems_train::baselines::sasrec_seed(&opts);
    let first = scores(seed);
    assert_eq!(first.len(), test.len() * corpus.n_items());
    assert_eq!(first, scores(seed));
    assert_ne!(first, scores(seed + 1));
}

#[test]
fn sasrec_skips_search_and_corpora_without_training_sequences() {
    let corpus = successor_corpus(20, 30, 9);
    let report = evaluate_baseline(&corpus, Baseline::Sasrec, &options(&[Task::Search])).unwrap();
    assert!(report.full.is_empty());
    let mut empty = corpus.clone();
    empty.samples.retain(|&(split, _), _| split != Split::Train);
    let report = evaluate_baseline(&empty, Baseline::Sasrec, &options(&Task::ALL)).unwrap();
    assert!(report.full.is_empty());
}

fn data_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

/// Amazon Scientific as a run builds it with the default configuration (history 20, the
/// run's seed), without a tokenizer: the floors read item indices only.
fn scientific(config: &TrainConfig) -> Corpus {
    let d = &config.data;
    let spec = resolve_dataset("scientific", &data_root(), None).unwrap();
    let mut prep = PrepareConfig::from_spec(&spec);
    prep.build.max_history = d.max_history;
    prep.build.n_negatives = d.negatives;
    prep.build.seed = d.seed;
    let prepared = gems_data::prepare(&spec.dir, &prep, None).unwrap();
    let mut samples: BTreeMap<(Split, Task), Vec<Sample>> = BTreeMap::new();
    for e in &prepared.examples {
        let mut s = sample(e.user, &e.history, e.target, e.query.clone());
        s.negatives = e.negatives.clone();
        samples.entry((e.split, e.task)).or_default().push(s);
    }
    let mut c = corpus(prepared.dataset.catalogue.len(), prepared.dataset.users.len(), samples);
    c.dataset = spec.name.clone();
    c.prepare = prep;
    c
}

/// The CPU preset, Amazon Scientific as it builds it, and its evaluation options for a rec
/// floor on the test split.
fn preset_floor_setup() -> (TrainConfig, Corpus, EvalOptions) {
    let config = TrainConfig::cpu_preset();
    let corpus = scientific(&config);
    let opts = gems_train::trainer::eval_options(
        &config,
        Split::Test,
        "floor",
        &[Task::Rec],
        &Reporter::silent(),
    );
    (config, corpus, opts)
}

/// The floor on Amazon Scientific as the main job's run trains it (the CPU preset: history 20,
/// its seed and test sample), ranked on every validation user, on those test examples
/// and on every test user, with and without history exclusion: prints the training and
/// ranking times and the metrics of `popular` and `sasrec`.
#[test]
#[ignore = "minutes in a debug build; run with --release --ignored --nocapture"]
fn sasrec_on_amazon_scientific() {
    let (_, corpus, opts) = preset_floor_setup();
    let train_examples = corpus.get(Split::Train, Task::Rec).len();
    let sasrec_config =
        SasrecConfig::for_corpus(&corpus, gems_train::baselines::sasrec_seed(&opts));
    let started = Instant::now();
    let model =
        sasrec::train(&corpus, &sasrec_config, &Device::flex(), &Reporter::silent()).unwrap();
    eprintln!(
        "sasrec: {train_examples} training rec examples, {} items, {sasrec_config:?}: trained \
         in {:.1} s",
        corpus.n_items(),
        started.elapsed().as_secs_f64()
    );
    // Validation (every user's second-last target): where the learning rate was chosen.
    let valid = [(Split::Valid, 0, false)];
    let test =
        [(Split::Test, opts.max_examples, false), (Split::Test, 0, false), (Split::Test, 0, true)];
    for (split, max_examples, exclude) in valid.into_iter().chain(test) {
        let o = EvalOptions { split, max_examples, exclude_history: exclude, ..opts.clone() };
        let popular = evaluate_baseline(&corpus, Baseline::Popular, &o).unwrap();
        let sasrec = rank_samples(&corpus, &o, |_, chunk| Ok((model.score(chunk)?, None))).unwrap();
        for (name, r) in [("popular", popular), ("sasrec", sasrec)] {
            let m = &r.full["rec"];
            eprintln!(
                "{name} {} exclude_history={exclude}: {} examples, ranked in {:.1} s: \
                 recall@10 {:.4} ndcg@10 {:.4} recall@20 {:.4} ndcg@20 {:.4}",
                split.name(),
                m.examples,
                r.seconds,
                m.get("recall@10").unwrap(),
                m.get("ndcg@10").unwrap(),
                m.get("recall@20").unwrap(),
                m.get("ndcg@20").unwrap(),
            );
        }
    }
}

/// The item-to-item signal on Amazon Scientific (CPU preset's data and test sample): the
/// `itemknn` and `successors` floors, and the collaborative embeddings of `gems_train::collab` ranked on their
/// own (dot product with the recency-weighted sum of the last five history items'
/// embeddings), on every validation user and every test user, history excluded, and on the
/// preset's test sample with and without exclusion. The embeddings are what `--item-collab`
/// adds to the item rows, so this says how much ranking signal the rows carry before any
/// training.
#[test]
#[ignore = "a minute in a release build; run with --release --ignored --nocapture"]
fn item_to_item_on_amazon_scientific() {
    use gems_train::collab::collab_embeddings;
    let (config, corpus, opts) = preset_floor_setup();
    let started = Instant::now();
    let co = corpus.co_occurrence();
    let counted = started.elapsed().as_secs_f64();
    let mut runs = Vec::new();
    for dims in [64, 128] {
        let started = Instant::now();
        let e = collab_embeddings(&co, dims, config.seed).unwrap();
        runs.push((dims, e, started.elapsed().as_secs_f64()));
    }
    eprintln!("co-occurrence counted in {counted:.2} s");
    let cases = [
        (Split::Valid, 0, true),
        (Split::Test, 0, true),
        (Split::Test, opts.max_examples, false),
        (Split::Test, opts.max_examples, true),
    ];
    for (split, max_examples, exclude) in cases {
        let o = EvalOptions { split, max_examples, exclude_history: exclude, ..opts.clone() };
        let mut reports = vec![
            ("itemknn".to_string(), evaluate_baseline(&corpus, Baseline::ItemKnn, &o).unwrap()),
            (
                "successors".to_string(),
                evaluate_baseline(&corpus, Baseline::Successors, &o).unwrap(),
            ),
        ];
        for (dims, e, secs) in &runs {
            let r = rank_samples(&corpus, &o, |_, chunk| {
                let mut out = Vec::with_capacity(chunk.len() * e.len());
                for s in chunk {
                    let mut q = vec![0f32; *dims];
                    let mut w = 1.0f32;
                    for &h in s.history.iter().rev().take(5) {
                        q.iter_mut().zip(&e[h as usize]).for_each(|(a, b)| *a += w * b);
                        w *= 0.7;
                    }
                    out.extend(
                        e.iter().map(|ej| ej.iter().zip(&q).map(|(a, b)| a * b).sum::<f32>()),
                    );
                }
                Ok((out, None))
            })
            .unwrap();
            reports.push((format!("ppmi-svd d={dims} (built in {secs:.1} s)"), r));
        }
        for (name, r) in reports {
            let m = &r.full["rec"];
            eprintln!(
                "{name} {} exclude_history={exclude}: {} examples: recall@10 {:.4} ndcg@10 {:.4}",
                split.name(),
                m.examples,
                m.get("recall@10").unwrap(),
                m.get("ndcg@10").unwrap(),
            );
        }
    }
}

#[test]
fn sasrec_item_embeddings_come_from_the_training_events_only() {
    // `model.item_collab_source = "sasrec"` puts these rows into the item tokens: one per item,
    // `hidden` wide, and validation or test events must not move them.
    let base = successor_corpus(30, 150, 5);
    let embeddings = |corpus: &Corpus| -> Vec<Vec<u32>> {
        let config = SasrecConfig { epochs: 2, hidden: 16, ..SasrecConfig::for_corpus(corpus, 9) };
        let model = sasrec::train(corpus, &config, &Device::flex(), &Reporter::silent()).unwrap();
        let rows = model.item_embeddings().unwrap();
        rows.into_iter().map(|r| r.into_iter().map(f32::to_bits).collect()).collect()
    };
    let first = embeddings(&base);
    assert_eq!((first.len(), first[0].len()), (30, 16));
    let mut changed = base.clone();
    for split in [Split::Valid, Split::Test] {
        for s in changed.samples.get_mut(&(split, Task::Rec)).unwrap() {
            s.target = (s.target + 7) % 30;
            s.history.iter_mut().for_each(|h| *h = (*h + 3) % 30);
        }
    }
    assert_eq!(first, embeddings(&changed));
    let mut train = base.clone();
    train.samples.get_mut(&(Split::Train, Task::Rec)).unwrap()[0].target = 29;
    assert_ne!(first, embeddings(&train));
}
