//! Integration tests of `gems-data`: fixtures with known errors, properties of example
//! construction (no leakage, clean negatives, determinism), and the real datasets in
//! `../shared/data`, whose counts are pinned.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use gems_data::load::resolve_dataset;
use gems_data::prepare::read_stats;
use gems_data::{
    BehaviourSequence, BuildConfig, Catalogue, DataFormat, Dataset, Event, EventKind, Example,
    HfTokenizer, Item, LoadOptions, PrepareConfig, Split, Task, TaskAssignment, TextTokenizer,
    build_examples, detect_format, load_dataset, prepare, tokenize_examples, write_prepared,
};
use proptest::prelude::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The shared data root; a missing one fails loudly rather than skipping.
fn data_root() -> PathBuf {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data"));
    assert!(
        root.join("amazon_scientific").is_dir(),
        "shared data not found at {}: these tests need ../shared/data beside the checkout",
        root.display()
    );
    root
}

fn load_err(name: &str, format: DataFormat) -> String {
    match load_dataset(&fixture(name), format, &LoadOptions::default()) {
        Ok(_) => panic!("{name} loaded but should fail"),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------- fixtures

#[test]
fn lcrec_fixture_loads_cleans_and_synthesises_queries() {
    let spec =
        resolve_dataset(fixture("lcrec_ok").to_str().unwrap(), Path::new("."), None).unwrap();
    assert_eq!(spec.format, DataFormat::LcRec);
    let config = PrepareConfig::from_spec(&spec);
    let prepared = prepare(&spec.dir, &config, None).unwrap();
    let d = &prepared.dataset;
    assert_eq!(d.catalogue.len(), 5);
    assert_eq!(d.users.len(), 4);
    let item0 = d.catalogue.get(0).unwrap();
    assert_eq!(item0.title, "Nitrile Gloves & Liners, Large");
    assert_eq!(
        item0.text,
        vec![
            ("brand".to_string(), "Acme".to_string()),
            ("description".to_string(), "Box of 100 powder-free gloves.".to_string()),
        ]
    );
    // Item 3 has no categories: no query, so no search example for it.
    let queries: Vec<Option<&str>> = d.users[0].events.iter().map(|e| e.query.as_deref()).collect();
    assert_eq!(
        queries,
        vec![
            Some("lab scientific products supplies consumables gloves"),
            Some("fasteners collated staples"),
            Some("test measure inspect dimensional measurement calipers"),
            None,
            Some("occupational health safety products personal protective equipment glasses"),
        ]
    );
    // User "3" has a single event: no example at all. User "2": only a test example.
    let count = |split, task| {
        prepared.examples.iter().filter(|e| e.split == split && e.task == task).count()
    };
    assert_eq!(count(Split::Test, Task::Rec), 3);
    assert_eq!(count(Split::Valid, Task::Rec), 2);
    assert_eq!(count(Split::Train, Task::Rec), 2);
    assert_eq!(count(Split::Test, Task::Search), 3);
    // Both valid targets (user "0" position 3, user "1" position 1) are item 3, which has no
    // categories and so no query.
    assert_eq!(count(Split::Valid, Task::Search), 0);
    assert_eq!(count(Split::Train, Task::Search), 2);
}

#[test]
fn truncated_json_names_file_and_line() {
    let err = load_err("lcrec_truncated", DataFormat::LcRec);
    assert!(err.contains("Tiny.inter.json:3:"), "{err}");
    assert!(err.contains("truncated"), "{err}");
    let err = load_err("jsonl_truncated", DataFormat::Jsonl);
    assert!(err.contains("events.jsonl:2:"), "{err}");
}

#[test]
fn unknown_item_names_file_and_line() {
    let err = load_err("lcrec_unknown_item", DataFormat::LcRec);
    assert!(err.contains("Tiny.inter.json:3: unknown item id \"99\""), "{err}");
    let err = load_err("jsonl_unknown_item", DataFormat::Jsonl);
    assert!(err.contains("events.jsonl:2: unknown item id \"zz\""), "{err}");
}

#[test]
fn empty_and_duplicate_users_name_file_and_line() {
    let err = load_err("lcrec_empty_user", DataFormat::LcRec);
    assert!(err.contains("Tiny.inter.json:3: user \"1\" has no events"), "{err}");
    let err = load_err("lcrec_duplicate_user", DataFormat::LcRec);
    assert!(
        err.contains("Tiny.inter.json:4: duplicate user \"0\" (first seen on line 2)"),
        "{err}"
    );
    let err = load_err("sasrec_duplicate_user", DataFormat::Sasrec);
    assert!(err.contains("Tiny.txt:3: duplicate user \"1\" (first seen on line 1)"), "{err}");
}

#[test]
fn bad_csv_cells_name_file_and_line() {
    // The bad record starts on line 5: the first record spans lines 2 and 3.
    let err = load_err("qilin_bad_cell", DataFormat::Qilin);
    assert!(err.contains("notes.csv:5: bad cell in column \"note_idx\""), "{err}");
    let err = load_err("qilin_bad_list", DataFormat::Qilin);
    assert!(
        err.contains("search_train.csv:3: bad cell in column \"search_result_details_with_idx\""),
        "{err}"
    );
}

#[test]
fn qilin_fixture_orders_clicks_by_time_after_the_earliest_history() {
    assert_eq!(detect_format(&fixture("qilin_ok")).unwrap(), DataFormat::Qilin);
    let d = load_dataset(&fixture("qilin_ok"), DataFormat::Qilin, &LoadOptions::default()).unwrap();
    assert_eq!(d.catalogue.len(), 2);
    assert_eq!(d.users.len(), 1, "user 6 clicked nothing and has no history");
    let u = &d.users[0];
    assert_eq!(u.user, "5");
    let got: Vec<(u32, Option<&str>, EventKind)> =
        u.events.iter().map(|e| (e.item, e.query.as_deref(), e.kind)).collect();
    assert_eq!(
        got,
        vec![
            (0, None, EventKind::Rec),
            (1, Some("green tea"), EventKind::Search),
            (0, Some("tea pot"), EventKind::Search),
            (0, None, EventKind::Rec),
        ]
    );
}

#[test]
fn sasrec_and_jsonl_fixtures_load() {
    assert_eq!(detect_format(&fixture("sasrec_ok")).unwrap(), DataFormat::Sasrec);
    let d =
        load_dataset(&fixture("sasrec_ok"), DataFormat::Sasrec, &LoadOptions::default()).unwrap();
    assert_eq!(d.catalogue.len(), 13);
    assert_eq!(d.catalogue.index_of("1"), Some(0));
    assert_eq!(d.catalogue.index_of("13"), Some(12));
    assert_eq!(d.catalogue.get(12).unwrap().title, "13");
    assert_eq!(d.users[2].events.iter().map(|e| e.item).collect::<Vec<_>>(), vec![3, 11, 12]);

    assert_eq!(detect_format(&fixture("jsonl_ok")).unwrap(), DataFormat::Jsonl);
    let d = load_dataset(&fixture("jsonl_ok"), DataFormat::Jsonl, &LoadOptions::default()).unwrap();
    assert_eq!(d.catalogue.len(), 5);
    assert_eq!(d.catalogue.get(2).unwrap().title, "Tea leaves");
    assert_eq!(d.users.len(), 3);
    assert_eq!(d.users[2].user, "3");
    let kinds: Vec<EventKind> = d.users[0].events.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, vec![EventKind::Rec, EventKind::Search, EventKind::Search, EventKind::Rec]);
}

// ---------------------------------------------------------------- properties

/// A random dataset: `n_items` items, users with 1..12 events, some queries, mixed kinds.
fn arb_dataset() -> impl Strategy<Value = Dataset> {
    (2usize..40).prop_flat_map(|n_items| {
        let event = (0..n_items as u32, proptest::option::of(0u8..4), any::<bool>());
        let user = proptest::collection::vec(event, 1..12);
        proptest::collection::vec(user, 1..10).prop_map(move |users| {
            let mut catalogue = Catalogue::new();
            for i in 0..n_items {
                let item = Item {
                    id: format!("i{i}"),
                    title: format!("item {i}"),
                    text: vec![],
                    categories: vec![],
                };
                catalogue.push(item).unwrap();
            }
            let users = users
                .into_iter()
                .enumerate()
                .map(|(u, events)| BehaviourSequence {
                    user: format!("u{u}"),
                    events: events
                        .into_iter()
                        .map(|(item, q, search)| Event {
                            item,
                            timestamp: None,
                            query: q.map(|q| format!("query {q}")),
                            kind: if search { EventKind::Search } else { EventKind::Rec },
                        })
                        .collect(),
                })
                .collect();
            Dataset { catalogue, users, inputs: vec![] }
        })
    })
}

fn arb_config() -> impl Strategy<Value = BuildConfig> {
    (any::<bool>(), 0.0f64..=1.0, 1usize..6, 0usize..30, any::<u64>()).prop_map(
        |(both, p, max_history, n_negatives, seed)| BuildConfig {
            assignment: if both {
                TaskAssignment::Both
            } else {
                TaskAssignment::Split { search_probability: p }
            },
            max_history,
            n_negatives,
            seed,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn no_leakage(dataset in arb_dataset(), config in arb_config()) {
        let examples = build_examples(&dataset, &config).unwrap();
        for ex in &examples {
            let events = &dataset.users[ex.user as usize].events;
            let p = ex.position as usize;
            prop_assert!(p >= 1 && p < events.len());
            // History: exactly the items of the last <= H events strictly before the target.
            let start = p.saturating_sub(config.max_history);
            let expected: Vec<u32> = events[start..p].iter().map(|e| e.item).collect();
            prop_assert_eq!(&ex.history, &expected);
            prop_assert_eq!(ex.target, events[p].item);
            let n = events.len();
            let split = if p == n - 1 { Split::Test } else if p + 2 == n { Split::Valid } else { Split::Train };
            prop_assert_eq!(ex.split, split);
            if ex.task == Task::Search {
                prop_assert!(ex.query.is_some());
            }
        }
        // Valid and test targets are never train targets of that user at or after their position.
        let mut held_out: BTreeMap<u32, u32> = BTreeMap::new();
        for ex in examples.iter().filter(|e| e.split != Split::Train) {
            let first = held_out.entry(ex.user).or_insert(ex.position);
            *first = (*first).min(ex.position);
        }
        for ex in examples.iter().filter(|e| e.split == Split::Train) {
            if let Some(&p) = held_out.get(&ex.user) {
                prop_assert!(ex.position < p);
            }
        }
        // One test example per user with >= 2 events, for every task the target allows.
        for (u, user) in dataset.users.iter().enumerate() {
            let tests = examples.iter().filter(|e| e.user as usize == u && e.split == Split::Test && e.task == Task::Rec).count();
            if config.assignment == TaskAssignment::Both {
                prop_assert_eq!(tests, usize::from(user.events.len() >= 2));
            }
        }
    }

    #[test]
    fn negatives_exclude_history_and_positives(dataset in arb_dataset(), config in arb_config()) {
        let examples = build_examples(&dataset, &config).unwrap();
        for ex in &examples {
            let touched: BTreeSet<u32> =
                dataset.users[ex.user as usize].events.iter().map(|e| e.item).collect();
            if ex.split == Split::Train {
                prop_assert!(ex.negatives.is_empty());
                continue;
            }
            let eligible = dataset.catalogue.len() - touched.len();
            prop_assert_eq!(ex.negatives.len(), config.n_negatives.min(eligible));
            let distinct: BTreeSet<u32> = ex.negatives.iter().copied().collect();
            prop_assert_eq!(distinct.len(), ex.negatives.len());
            for n in &ex.negatives {
                prop_assert!(!touched.contains(n), "negative {} is in the user's items", n);
                prop_assert!(!ex.history.contains(n) && *n != ex.target);
                prop_assert!((*n as usize) < dataset.catalogue.len());
            }
        }
    }

    #[test]
    fn deterministic_under_a_seed(dataset in arb_dataset(), config in arb_config()) {
        let a = build_examples(&dataset, &config).unwrap();
        let b = build_examples(&dataset, &config).unwrap();
        prop_assert_eq!(&a, &b);
        let tok = HfTokenizer::word_level(["Below is the user's interaction history: , . The search query is: Please"]).unwrap();
        let ta = tokenize_examples(&a, gems_data::RecPrompt::Paper, &tok).unwrap();
        prop_assert_eq!(&ta, &tokenize_examples(&b, gems_data::RecPrompt::Paper, &tok).unwrap());
        // Items are single spliced ids in history order; the target span is [item, eos].
        let base = tok.vocab_size();
        for (ex, t) in a.iter().zip(&ta) {
            let [start, end] = t.target_span.map(|x| x as usize);
            prop_assert_eq!(end, t.input_ids.len());
            prop_assert_eq!(&t.input_ids[start..end], &[base + ex.target, tok.eos_id()][..]);
            let items: Vec<u32> =
                t.input_ids[..start].iter().filter(|&&id| id >= base).map(|id| id - base).collect();
            prop_assert_eq!(&items, &ex.history);
        }
    }
}

#[test]
fn different_seeds_give_different_negatives() {
    let d =
        load_dataset(&fixture("sasrec_ok"), DataFormat::Sasrec, &LoadOptions::default()).unwrap();
    let a = build_examples(&d, &BuildConfig { n_negatives: 3, seed: 1, ..BuildConfig::default() })
        .unwrap();
    let b = build_examples(&d, &BuildConfig { n_negatives: 3, seed: 2, ..BuildConfig::default() })
        .unwrap();
    let negs = |x: &[Example]| x.iter().map(|e| e.negatives.clone()).collect::<Vec<_>>();
    assert_ne!(negs(&a), negs(&b));
}

#[test]
fn prepared_directory_is_byte_identical_across_runs() {
    let spec =
        resolve_dataset(fixture("jsonl_ok").to_str().unwrap(), Path::new("."), None).unwrap();
    let mut config = PrepareConfig::from_spec(&spec);
    config.build.n_negatives = 2;
    let tok = HfTokenizer::word_level(["Below is the user's interaction history: , . Please recommend \
        the next item the user is likely to click. The search query is: predict might green tea teapot kettle"]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut digests = Vec::new();
    for run in 0..2 {
        let out = tmp.path().join(format!("run{run}"));
        let prepared = prepare(&spec.dir, &config, Some(&tok)).unwrap();
        write_prepared(&prepared, &spec.dir, &config, Some(&tok), None, &out).unwrap();
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(&out).unwrap() {
            let path = entry.unwrap().path();
            files.insert(
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            );
        }
        digests.push(files);
    }
    assert_eq!(
        digests[0].len(),
        9,
        "6 example files, items.json, manifest.json, checksums.json, no temp files"
    );
    assert_eq!(digests[0], digests[1]);
    // Tokenised: the target span is [item token, eos].
    let text = String::from_utf8(digests[0]["test.search.jsonl"].clone()).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let ids: Vec<u32> = serde_json::from_value(first["input_ids"].clone()).unwrap();
    let span: [usize; 2] = serde_json::from_value(first["target_span"].clone()).unwrap();
    assert_eq!(span[1], ids.len());
    assert_eq!(ids[span[0]], tok.vocab_size() + first["target"].as_u64().unwrap() as u32);
    assert_eq!(ids[span[0] + 1], tok.eos_id());
}

// ---------------------------------------------------------------- real data

#[test]
fn amazon_scientific_counts() {
    let spec = resolve_dataset("scientific", &data_root(), None).unwrap();
    let config = PrepareConfig::from_spec(&spec);
    let prepared = prepare(&spec.dir, &config, None).unwrap();
    let d = &prepared.dataset;
    assert_eq!(d.users.len(), 8317);
    assert_eq!(d.catalogue.len(), 4344);
    assert_eq!(d.n_events(), 58_492);
    // One test and one valid rec example per user (every user has >= 5 events).
    for split in [Split::Test, Split::Valid] {
        let per_user: BTreeSet<u32> = prepared
            .examples
            .iter()
            .filter(|e| e.split == split && e.task == Task::Rec)
            .map(|e| e.user)
            .collect();
        let n =
            prepared.examples.iter().filter(|e| e.split == split && e.task == Task::Rec).count();
        assert_eq!((per_user.len(), n), (8317, 8317));
    }
    // 131 items lack categories; their 1,542 events get no query, so no search example.
    let no_query_items = d.catalogue.items().iter().filter(|i| i.categories.is_empty()).count();
    assert_eq!(no_query_items, 131);

    let tmp = tempfile::tempdir().unwrap();
    write_prepared(&prepared, &spec.dir, &config, None, None, tmp.path()).unwrap();
    let stats = read_stats(tmp.path()).unwrap();
    assert_eq!(stats.counts.users, 8317);
    assert_eq!(stats.counts.items, 4344);
    assert_eq!(stats.counts.events_with_query, 56_950);
    // 765 category paths: minus the empty one, minus 10 that collapse onto another path's
    // query once stop words and repeated words go (DATA-AND-MODELS says "about 755").
    assert_eq!(stats.counts.distinct_queries, 754);
    assert_eq!(stats.distinct_search_queries, 754);
    assert_eq!(stats.search_examples, 48_849);
    let n = |split: &str, task: &str| stats.counts.examples[split][task];
    assert_eq!((n("train", "rec"), n("valid", "rec"), n("test", "rec")), (33_541, 8317, 8317));
    assert_eq!(
        (n("train", "search"), n("valid", "search"), n("test", "search")),
        (32_656, 8077, 8116)
    );
}

#[test]
fn amazon_beauty_and_qilin_toy_load() {
    let root = data_root();
    let spec = resolve_dataset("beauty", &root, None).unwrap();
    let d = load_dataset(&spec.dir, spec.format, &spec.load).unwrap();
    assert_eq!((d.users.len(), d.catalogue.len(), d.n_events()), (22_363, 12_101, 198_502));
    assert_eq!(d.catalogue.get(0).unwrap().title, "1");

    let spec = resolve_dataset("qilin_toy", &root, None).unwrap();
    let d = load_dataset(&spec.dir, spec.format, &spec.load).unwrap();
    assert_eq!(d.catalogue.get(0).unwrap().id, "0");
    assert!(d.users.iter().any(|u| u.events.iter().any(|e| e.kind == EventKind::Search)));
    // The toy's events point at notes the 10-row sample lacks: strict loading says so.
    let err =
        load_dataset(&spec.dir, spec.format, &LoadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("unknown item id"), "{err}");
}

/// A prepared directory is replaced whole, never mixed with the dataset it replaces; damage
/// after the write is noticed by `data stats`; a directory that is not a prepared dataset is
/// never replaced.
#[test]
fn prepared_directories_are_replaced_whole_and_verified() {
    let spec =
        resolve_dataset(fixture("jsonl_ok").to_str().unwrap(), Path::new("."), None).unwrap();
    let mut config = PrepareConfig::from_spec(&spec);
    config.build.n_negatives = 2;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("prepared");
    let prepared = prepare(&spec.dir, &config, None).unwrap();
    write_prepared(&prepared, &spec.dir, &config, None, None, &out).unwrap();
    read_stats(&out).unwrap();
    // A stale file of an earlier dataset does not survive a new prepare into the directory.
    std::fs::write(out.join("stale.jsonl"), "old").unwrap();
    config.build.n_negatives = 3;
    let prepared = prepare(&spec.dir, &config, None).unwrap();
    write_prepared(&prepared, &spec.dir, &config, None, None, &out).unwrap();
    assert!(!out.join("stale.jsonl").exists());
    assert!(!tmp.path().join("prepared.tmp").exists() && !tmp.path().join("prepared.old").exists());
    read_stats(&out).unwrap();
    // Damage after the write.
    let file = out.join("test.rec.jsonl");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[0] ^= 0x20;
    std::fs::write(&file, bytes).unwrap();
    let err = read_stats(&out).unwrap_err().to_string();
    assert!(err.contains("test.rec.jsonl") && err.contains("does not match"), "{err}");
    // Someone else's directory is not replaced.
    let other = tmp.path().join("mine");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), "keep me").unwrap();
    let err =
        write_prepared(&prepared, &spec.dir, &config, None, None, &other).unwrap_err().to_string();
    assert!(err.contains("not a prepared dataset"), "{err}");
    assert_eq!(std::fs::read_to_string(other.join("notes.txt")).unwrap(), "keep me");
}
