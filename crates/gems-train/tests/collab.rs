//! The item-to-item signal of `gems_train::collab`: co-occurrence counts of the training
//! examples only, the `itemknn` scores, and the collaborative item rows.

use std::collections::BTreeMap;

use gems_data::{Split, Task};
use gems_train::collab::{Successors, collab_rows};
use gems_train::{Corpus, Sample};

fn sample(history: &[u32], target: u32) -> Sample {
    Sample {
        user: 0,
        position: history.len() as u32,
        ids: Vec::new(),
        target_pos: 0,
        target,
        history: history.to_vec(),
        query: None,
        negatives: Vec::new(),
    }
}

fn corpus(n: usize, samples: BTreeMap<(Split, Task), Vec<Sample>>) -> Corpus {
    Corpus {
        dataset: "t".into(),
        base_vocab: 0,
        eos_id: 0,
        titles: vec![String::new(); n],
        categories: vec![Vec::new(); n],
        item_ids: (0..n).map(|i| i.to_string()).collect(),
        users: vec!["u".into()],
        sequences: gems_train::setup::user_sequences(1, &samples),
        samples,
        prepare: gems_data::PrepareConfig {
            dataset: "t".into(),
            format: gems_data::DataFormat::Jsonl,
            load: gems_data::LoadOptions::default(),
            query_synthesis: gems_data::QuerySynthesis::Off,
            build: gems_data::BuildConfig::default(),
        },
    }
}

/// Sequences walking a ring of `n` items: item i is followed by i + 1.
fn ring(n: u32, users: u32) -> BTreeMap<(Split, Task), Vec<Sample>> {
    let mut m = BTreeMap::new();
    for u in 0..users {
        let seq: Vec<u32> = (0..8).map(|k| (u * 7 + k) % n).collect();
        for p in 1..seq.len() {
            let split = match seq.len() - p {
                1 => Split::Test,
                2 => Split::Valid,
                _ => Split::Train,
            };
            let s = sample(&seq[..p], seq[p]);
            m.entry((split, Task::Rec)).or_insert_with(Vec::new).push(s);
        }
    }
    m
}

#[test]
fn counts_pairs_within_the_window_both_ways() {
    let mut m = BTreeMap::new();
    m.insert(
        (Split::Train, Task::Rec),
        vec![sample(&[0], 1), sample(&[0, 1], 2), sample(&[0, 1, 2, 3, 4, 5, 6], 7)],
    );
    // A validation example is never counted.
    m.insert((Split::Valid, Task::Rec), vec![sample(&[0, 1, 2, 3, 4, 5, 6, 7], 8)]);
    let co = corpus(8, m).co_occurrence();
    assert_eq!(co.count(0, 1), 1.0); // each pair once: a target with the items before it
    assert_eq!(co.count(1, 0), 1.0);
    assert_eq!(co.count(0, 2), 1.0);
    assert_eq!(co.count(1, 2), 1.0);
    assert_eq!(co.count(2, 7), 1.0);
    assert_eq!(co.count(7, 2), 1.0);
    assert_eq!(co.count(1, 7), 0.0, "6 events apart: outside the window");
    assert_eq!(co.count(7, 7), 0.0);
    assert_eq!(co.count(7, 8), 0.0, "validation event");
}

#[test]
fn successors_count_adjacent_pairs_one_way_from_training_events_only() {
    let mut m = BTreeMap::new();
    m.insert(
        (Split::Train, Task::Rec),
        vec![sample(&[0], 1), sample(&[0, 1], 2), sample(&[3, 1], 2), sample(&[0, 1, 2], 2)],
    );
    m.insert((Split::Valid, Task::Rec), vec![sample(&[0, 1, 2], 3)]);
    let succ = corpus(4, m).successors();
    assert_eq!(succ.count(0, 1), 1.0);
    assert_eq!(succ.count(1, 0), 0.0, "one way: 0 came before 1, never after");
    assert_eq!(succ.count(1, 2), 2.0, "two histories end in 1 before 2");
    assert_eq!(succ.count(0, 2), 0.0, "not adjacent");
    assert_eq!(succ.count(2, 2), 0.0, "an item after itself is not counted");
    assert_eq!(succ.count(2, 3), 0.0, "validation event");
    // Scores: the last item's successors at weight 1, the one before at DECAY, plus the
    // popularity tie-break (targets: 1 once, 2 three times; the most frequent gets TIE_BREAK).
    let tie = |count: f32| Successors::TIE_BREAK * count / 3.0;
    let s = succ.scores(&[0, 1]);
    assert_eq!(s, vec![0.0, Successors::DECAY + tie(1.0), 2.0 + tie(3.0), 0.0]);
    assert_eq!(succ.scores(&[]), vec![0.0, tie(1.0), tie(3.0), 0.0]);
    assert!(Successors::TIE_BREAK < Successors::DECAY.powi(Successors::HISTORY as i32 - 1));
}

#[test]
fn knn_ranks_the_neighbours_of_the_recent_items_first() {
    let co = corpus(40, ring(40, 60)).co_occurrence();
    let s = co.knn_scores(&[10, 11, 12]);
    // Counts are symmetric: the nearest items outside the history, on either side, lead.
    let unseen = (0..40).filter(|i| ![10, 11, 12].contains(i));
    let best = unseen.max_by(|&a, &b| s[a].total_cmp(&s[b])).unwrap();
    assert!([9, 13].contains(&best), "best {best}");
    assert!(s[13] > s[20] && s[20] == 0.0);
}

#[test]
fn validation_and_test_events_change_no_row() {
    let base = ring(40, 60);
    let mut changed = base.clone();
    for split in [Split::Valid, Split::Test] {
        for s in changed.get_mut(&(split, Task::Rec)).unwrap() {
            s.target = (s.target + 17) % 40;
            s.history.iter_mut().for_each(|h| *h = (*h + 5) % 40);
        }
    }
    let rows = |m| {
        let co = corpus(40, m).co_occurrence();
        collab_rows(&co, 8, 16, 2.0, 3).unwrap()
    };
    let a = rows(base);
    assert_eq!(a, rows(changed));
    // ...while a training event does change them.
    let mut train = ring(40, 60);
    train.get_mut(&(Split::Train, Task::Rec)).unwrap()[0].target = 33;
    assert_ne!(a, rows(train));
}

#[test]
fn collab_rows_have_the_scale_and_neighbours_are_close() {
    let co = corpus(40, ring(40, 60)).co_occurrence();
    let (dims, hidden) = (8, 16);
    let rows = collab_rows(&co, dims, hidden, 2.0, 3).unwrap();
    let row = |i: usize| &rows[i * hidden..(i + 1) * hidden];
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for i in 0..40 {
        assert!((dot(row(i), row(i)).sqrt() - 2.0).abs() < 1e-4, "item {i}");
    }
    // Ring neighbours share more direction than items half the ring apart.
    assert!(dot(row(5), row(6)) > dot(row(5), row(25)));
    assert!(collab_rows(&co, 0, hidden, 1.0, 3).is_err());
    assert!(collab_rows(&co, 32, hidden, 1.0, 3).is_err());
}

#[test]
fn mapped_rows_keep_the_rows_geometry_at_the_scale() {
    use gems_train::collab::{mapped_rows, unit_rows};
    let raw =
        vec![vec![3.0, 4.0, 0.0], vec![0.0, 0.0, 0.0], vec![1.0, 1.0, 1.0], vec![0.0, 2.0, 0.0]];
    let unit = unit_rows(raw);
    assert_eq!(unit[0], [0.6, 0.8, 0.0]);
    assert_eq!(unit[1], [0.0, 0.0, 0.0]);
    let hidden = 8;
    let rows = mapped_rows(&unit, hidden, 2.0, 3).unwrap();
    let row = |i: usize| &rows[i * hidden..(i + 1) * hidden];
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for i in 0..4 {
        for j in 0..4 {
            let want = 4.0 * dot(&unit[i], &unit[j]);
            assert!((dot(row(i), row(j)) - want).abs() < 1e-5, "({i}, {j})");
        }
    }
    assert!(mapped_rows(&unit, 2, 1.0, 3).is_err(), "wider than hidden");
    assert!(mapped_rows(&[vec![1.0], vec![1.0, 0.0]], hidden, 1.0, 3).is_err(), "unequal widths");
}
