//! Integration tests of `gems-metrics`: metrics against hand-computed rankings, record round
//! trips, the JSON-lines reader on damaged files, the report tables and the SVG plots.

use std::collections::BTreeMap;
use std::path::Path;

use gems_metrics::MetricsError;
use gems_metrics::ranking::{
    KS, METRIC_NAMES, NdcgNormaliser, RankingAccumulator, TaskMetrics, rank_of, ranks_of,
};
use gems_metrics::record::{
    EvalReport, MetricsLine, RunSummary, TrainRecord, ValidRecord, append_metrics_line,
    read_metrics_lines, read_summary, write_summary,
};
use gems_metrics::report::{
    PLOT_FILES, PointGroup, Reference, Scatter, Series, load_run, load_runs, markdown_floors,
    markdown_groups, markdown_losses, markdown_protocols, markdown_table, svg_line_plot,
    svg_scatter_plot, write_report,
};

const EPS: f64 = 1e-12;

fn close(actual: Option<f64>, expected: f64, what: &str) {
    let actual = actual.unwrap_or_else(|| panic!("{what} missing"));
    assert!((actual - expected).abs() < EPS, "{what}: {actual} != {expected}");
}

fn one_example(ranks: &[usize], n_relevant: usize, normaliser: NdcgNormaliser) -> TaskMetrics {
    let mut acc = RankingAccumulator::new(normaliser);
    acc.add(ranks, n_relevant).unwrap();
    acc.finish()
}

// ---------------------------------------------------------------- ranking

#[test]
fn single_target_at_rank_three() {
    let scores = [0.1, 0.9, 0.5, 0.7];
    assert_eq!(rank_of(&scores, 2).unwrap(), 3);
    assert_eq!(ranks_of(&scores, &[2]).unwrap(), vec![3]);
    let mut acc = RankingAccumulator::new(NdcgNormaliser::Standard);
    acc.add_scores(&scores, &[2]).unwrap();
    let m = acc.finish();
    assert_eq!(m.examples, 1);
    for k in KS {
        close(m.get(&format!("recall@{k}")), 1.0, "recall");
        close(m.get(&format!("ndcg@{k}")), 0.5, "ndcg"); // 1 / log2(4)
        close(m.get(&format!("mrr@{k}")), 1.0 / 3.0, "mrr");
    }
}

#[test]
fn target_at_rank_seven() {
    // Six items score above the target (index 0).
    let scores = [0.3, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.2, 0.1, 0.0];
    assert_eq!(rank_of(&scores, 0).unwrap(), 7);
    let mut acc = RankingAccumulator::new(NdcgNormaliser::Standard);
    acc.add_scores(&scores, &[0]).unwrap();
    let m = acc.finish();
    close(m.get("recall@5"), 0.0, "recall@5");
    close(m.get("recall@10"), 1.0, "recall@10");
    close(m.get("recall@20"), 1.0, "recall@20");
    close(m.get("ndcg@5"), 0.0, "ndcg@5");
    close(m.get("ndcg@10"), 1.0 / 3.0, "ndcg@10"); // 1 / log2(8)
    close(m.get("mrr@5"), 0.0, "mrr@5");
    close(m.get("mrr@10"), 1.0 / 7.0, "mrr@10");
}

#[test]
fn ties_count_against_the_target() {
    assert_eq!(rank_of(&[0.5, 0.5, 0.5, 0.1], 1).unwrap(), 3);
    assert_eq!(rank_of(&[0.5, 0.5, 0.5, 0.1], 3).unwrap(), 4);
    assert_eq!(rank_of(&[0.5], 0).unwrap(), 1);
    // A constant scorer gets the worst rank, never the best.
    assert_eq!(rank_of(&[0.0; 100], 0).unwrap(), 100);
    // Relevant item 2 is tied with non-relevant item 0: the tie counts against it.
    assert_eq!(ranks_of(&[0.5, 0.1, 0.5], &[2]).unwrap(), vec![2]);
    // Infinite scores (masked items) are ordinary values.
    assert_eq!(rank_of(&[f32::NEG_INFINITY, 0.2, 0.1], 2).unwrap(), 2);
}

#[test]
fn two_relevant_items() {
    // Relevant: 1 (0.8, beaten by item 0) and 4 (0.5, beaten by items 0, 2, 3).
    let scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4];
    let ranks = ranks_of(&scores, &[4, 1]).unwrap();
    assert_eq!(ranks, vec![2, 4]);
    // In the full list they stand at 2 and 5.
    assert_eq!(rank_of(&scores, 1).unwrap(), 2);
    assert_eq!(rank_of(&scores, 4).unwrap(), 5);
    let mut acc = RankingAccumulator::new(NdcgNormaliser::Standard);
    acc.add_scores(&scores, &[4, 1]).unwrap();
    let m = acc.finish();
    let dcg = 1.0 / 3f64.log2() + 1.0 / 6f64.log2();
    let ideal = 1.0 + 1.0 / 3f64.log2();
    close(m.get("recall@5"), 1.0, "recall@5");
    close(m.get("ndcg@5"), dcg / ideal, "ndcg@5");
    close(m.get("mrr@5"), 0.5, "mrr@5");
    assert!(m.get("ndcg@5").unwrap() <= 1.0);
    // Both relevant items on top: perfect, not above 1.
    let top =
        one_example(&ranks_of(&[0.9, 0.9, 0.1], &[0, 1]).unwrap(), 2, NdcgNormaliser::Standard);
    close(top.get("ndcg@5"), 1.0, "perfect ndcg");
    close(top.get("recall@5"), 1.0, "perfect recall");
}

#[test]
fn authors_normaliser_differs_from_standard_with_a_missed_item() {
    // Two relevant items; one at rank 2, the other far below every cut-off.
    let standard = one_example(&[2, 30], 2, NdcgNormaliser::Standard);
    let authors = one_example(&[2, 30], 2, NdcgNormaliser::Authors);
    let dcg = 1.0 / 3f64.log2();
    for k in KS {
        let name = format!("ndcg@{k}");
        close(standard.get(&name), dcg / (1.0 + 1.0 / 3f64.log2()), &name); // 0.3869
        close(authors.get(&name), dcg, &name); // ideal DCG of one hit = 1
        close(standard.get(&format!("recall@{k}")), 0.5, "recall");
        close(authors.get(&format!("recall@{k}")), 0.5, "recall");
    }
    // No hit: Authors gives 0, not 0/0.
    let none = one_example(&[50], 1, NdcgNormaliser::Authors);
    close(none.get("ndcg@20"), 0.0, "authors without hits");
    // Relevant items that were not ranked count as misses.
    let partial = one_example(&[1], 3, NdcgNormaliser::Standard);
    close(partial.get("recall@5"), 1.0 / 3.0, "recall with unranked items");
    close(partial.get("ndcg@5"), 1.0 / (1.0 + 1.0 / 3f64.log2() + 0.5), "ndcg, 3 relevant");
}

#[test]
fn means_and_standard_errors_over_examples() {
    let mut acc = RankingAccumulator::new(NdcgNormaliser::Standard);
    assert!(acc.is_empty());
    let empty = acc.finish();
    assert_eq!(empty.examples, 0);
    assert!(empty.values.is_empty() && empty.std_err.is_empty());
    acc.add(&[1], 1).unwrap();
    assert!(acc.finish().std_err.is_empty(), "one example has no sample std");
    acc.add(&[3], 1).unwrap();
    assert_eq!(acc.len(), 2);
    let m = acc.finish();
    let names: Vec<&str> = m.values.keys().map(String::as_str).collect();
    let mut expected: Vec<&str> = METRIC_NAMES.to_vec();
    expected.sort_unstable();
    assert_eq!(names, expected);
    close(m.get("mrr@5"), 2.0 / 3.0, "mean mrr");
    // Sample variance of {1, 1/3} is 2/9; std err = sqrt(2/9) / sqrt(2) = 1/3.
    close(m.std_err.get("mrr@5").copied(), 1.0 / 3.0, "std err mrr");
    close(m.std_err.get("recall@5").copied(), 0.0, "std err recall");
    assert_eq!(m.get("nope"), None);
}

#[test]
fn bad_scores_are_errors_naming_the_value() {
    let nan = [0.1, f32::NAN, 0.3];
    match rank_of(&nan, 0) {
        Err(MetricsError::NanScore { index, .. }) => assert_eq!(index, 1),
        other => panic!("expected NaN error, got {other:?}"),
    }
    assert!(matches!(ranks_of(&nan, &[0]), Err(MetricsError::NanScore { index: 1, .. })));
    let mut acc = RankingAccumulator::new(NdcgNormaliser::Standard);
    assert!(acc.add_scores(&nan, &[0]).is_err());
    assert!(matches!(rank_of(&[], 0), Err(MetricsError::EmptyScores { .. })));
    assert!(matches!(ranks_of(&[], &[]), Err(MetricsError::EmptyScores { .. })));
    assert!(matches!(
        rank_of(&[0.1, 0.2], 2),
        Err(MetricsError::IndexOutOfRange { index: 2, len: 2, .. })
    ));
    assert!(matches!(ranks_of(&[0.1], &[5]), Err(MetricsError::IndexOutOfRange { index: 5, .. })));
    assert!(matches!(
        ranks_of(&[0.1, 0.2], &[1, 1]),
        Err(MetricsError::DuplicateRelevant { index: 1, .. })
    ));
    assert!(matches!(acc.add_scores(&[0.1], &[]), Err(MetricsError::InvalidRanks { .. })));
    assert!(acc.is_empty(), "failed adds leave the accumulator unchanged");
    let message = rank_of(&nan, 0).unwrap_err().to_string();
    assert!(message.contains("rank_of") && message.contains("score 1"), "{message}");
}

// ---------------------------------------------------------------- records

fn task_metrics(base: f64, examples: usize) -> TaskMetrics {
    let mut values = BTreeMap::new();
    let mut std_err = BTreeMap::new();
    for (i, name) in METRIC_NAMES.iter().enumerate() {
        values.insert((*name).to_owned(), base + i as f64 * 0.0625);
        std_err.insert((*name).to_owned(), 0.015625);
    }
    TaskMetrics { examples, values, std_err }
}

fn eval_report(label: &str, base: f64, perplexity: Option<f64>, search: bool) -> EvalReport {
    let mut full = BTreeMap::from([("rec".to_owned(), task_metrics(base, 100))]);
    let mut sampled = BTreeMap::from([("rec".to_owned(), task_metrics(base + 0.25, 100))]);
    if search {
        full.insert("search".to_owned(), task_metrics(base / 2.0, 50));
        sampled.insert("search".to_owned(), task_metrics(base / 2.0 + 0.25, 50));
    }
    EvalReport {
        label: label.to_owned(),
        split: "test".to_owned(),
        full,
        unseen: BTreeMap::new(),
        sampled,
        loss: BTreeMap::from([("rec".to_owned(), 2.5), ("search".to_owned(), 3.25)]),
        item_loss: BTreeMap::new(),
        catalogue_loss: BTreeMap::new(),
        perplexity,
        ndcg_normaliser: NdcgNormaliser::Standard,
        history_excluded: false,
        whole_history: true,
        seconds: 12.5,
    }
}

fn train_record(step: u64, loss: f64, cosine: Option<f64>) -> TrainRecord {
    TrainRecord {
        step,
        epoch: step as f64 / 8.0,
        lr: 1e-4,
        loss_rec: Some(loss),
        loss_search: Some(loss + 0.5),
        mean_cosine: cosine,
        global_cosine: cosine,
        surgery: false,
        tokens_per_s: 1500.0,
        step_seconds: 0.25,
        elapsed_seconds: step as f64 * 0.25,
        skipped: false,
    }
}

fn summary(label: &str, group: &str, seed: u64, base: f64) -> RunSummary {
    RunSummary {
        label: label.to_owned(),
        group: group.to_owned(),
        method: "gems".to_owned(),
        seed,
        steps: 4,
        train_seconds: 1.0,
        median_step_seconds: 0.25 * seed as f64,
        optimizer_state_bytes: 1_500_000 * seed,
        before: Some(eval_report("base", 0.0625, Some(20.0), true)),
        after: Some(eval_report(label, base, Some(20.0 + seed as f64), seed == 1)),
        best_step: Some(4),
    }
}

fn round_trip<T>(value: &T) -> String
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let json = serde_json::to_string(value).unwrap();
    let back: T = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, value, "{json}");
    json
}

#[test]
fn every_record_round_trips_through_json() {
    assert_eq!(round_trip(&NdcgNormaliser::Standard), "\"standard\"");
    assert_eq!(round_trip(&NdcgNormaliser::Authors), "\"authors\"");
    round_trip(&task_metrics(0.125, 3));
    let report = eval_report("run", 0.125, Some(17.5), true);
    let json = round_trip(&report);
    assert!(json.contains("\"ndcg_normaliser\":\"standard\""), "{json}");
    round_trip(&EvalReport { perplexity: None, full: BTreeMap::new(), ..report.clone() });
    let both = EvalReport { unseen: report.full.clone(), ..report.clone() };
    assert!(round_trip(&both).contains("\"unseen\":{\"rec\":"));
    assert!(!json.contains("unseen"), "written only when measured: {json}");
    let losses = BTreeMap::from([("rec".to_owned(), 8.5)]);
    let model = EvalReport { item_loss: losses.clone(), catalogue_loss: losses, ..report.clone() };
    assert!(round_trip(&model).contains("\"catalogue_loss\":{\"rec\":8.5}"));
    assert!(!json.contains("item_loss") && !json.contains("catalogue_loss"), "{json}");
    round_trip(&train_record(3, 1.5, Some(-0.25)));
    round_trip(&ValidRecord { step: 8, report: report.clone(), best: true });
    let train = MetricsLine::Train(TrainRecord { loss_search: None, ..train_record(3, 1.5, None) });
    let json = round_trip(&train);
    assert!(json.starts_with("{\"kind\":\"train\",\"step\":3,"), "{json}");
    let valid = MetricsLine::Valid(ValidRecord { step: 8, report, best: false });
    assert!(round_trip(&valid).starts_with("{\"kind\":\"valid\",\"step\":8,"));
    assert_eq!(valid.step(), 8);
    round_trip(&summary("a-s1", "a", 1, 0.375));
    round_trip(&RunSummary {
        before: None,
        after: None,
        best_step: None,
        ..summary("b", "b", 2, 0.5)
    });
}

#[test]
fn non_finite_values_do_not_make_a_run_unreadable() {
    // serde_json writes NaN as null; it must read back, as NaN (plain f64) or None (Option).
    let record =
        TrainRecord { lr: f64::NAN, loss_rec: Some(f64::INFINITY), ..train_record(1, 1.0, None) };
    let json = serde_json::to_string(&MetricsLine::Train(record)).unwrap();
    let MetricsLine::Train(back) = serde_json::from_str(&json).unwrap() else {
        panic!("wrong kind");
    };
    assert!(back.lr.is_nan());
    assert_eq!(back.loss_rec, None);
    let mut metrics = task_metrics(0.5, 2);
    metrics.values.insert("ndcg@5".to_owned(), f64::NAN);
    let back: TaskMetrics =
        serde_json::from_str(&serde_json::to_string(&metrics).unwrap()).unwrap();
    assert!(back.get("ndcg@5").unwrap().is_nan());
}

fn write_lines(path: &Path, lines: &[MetricsLine]) {
    for line in lines {
        append_metrics_line(path, line).unwrap();
    }
}

#[test]
fn metrics_lines_survive_a_truncated_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    let lines = [
        MetricsLine::Train(train_record(1, 2.0, None)),
        MetricsLine::Train(train_record(2, 1.5, None)),
    ];
    write_lines(&path, &lines);
    assert_eq!(read_metrics_lines(&path).unwrap(), lines);
    // A crash mid-write leaves half a record and no newline.
    let full = serde_json::to_string(&MetricsLine::Train(train_record(3, 1.0, None))).unwrap();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&full[..full.len() / 2]);
    std::fs::write(&path, &text).unwrap();
    assert_eq!(read_metrics_lines(&path).unwrap(), lines);
    // Blank lines are fine.
    std::fs::write(&path, text.replacen('\n', "\n\n", 1)).unwrap();
    assert_eq!(read_metrics_lines(&path).unwrap(), lines);
}

#[test]
fn a_bad_line_is_an_error_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("metrics.jsonl");
    let good = serde_json::to_string(&MetricsLine::Train(train_record(1, 2.0, None))).unwrap();
    std::fs::write(&path, format!("{good}\n{{\"kind\":\"train\",\"step\":\n{good}\n")).unwrap();
    match read_metrics_lines(&path) {
        Err(MetricsError::Files(gems_io::Error::Malformed { line, path: p, .. })) => {
            assert_eq!(line, 2);
            assert_eq!(p, path);
        }
        other => panic!("expected a malformed-line error, got {other:?}"),
    }
    let message = read_metrics_lines(&path).unwrap_err().to_string();
    assert!(message.contains("metrics.jsonl:2:"), "{message}");
    // A complete but invalid last line is not a crash artefact: still an error.
    std::fs::write(&path, format!("{good}\n{{\"kind\":\"bogus\"}}\n")).unwrap();
    assert!(matches!(
        read_metrics_lines(&path),
        Err(MetricsError::Files(gems_io::Error::Malformed { line: 2, .. }))
    ));
    assert!(matches!(
        read_metrics_lines(&dir.path().join("missing.jsonl")),
        Err(MetricsError::Files(gems_io::Error::Io { .. }))
    ));
    assert!(matches!(
        read_summary(dir.path()),
        Err(MetricsError::Files(gems_io::Error::Io { .. }))
    ));
    std::fs::write(dir.path().join("summary.json"), "{\"label\": 3}").unwrap();
    assert!(matches!(read_summary(dir.path()), Err(MetricsError::Json { .. })));
}

// ---------------------------------------------------------------- reports

/// Two runs of one group (seeds 1 and 2); seed 2 has no search metrics after tuning and no
/// metrics.jsonl.
fn write_runs(root: &Path) -> Vec<std::path::PathBuf> {
    let a = root.join("a-s1");
    let b = root.join("a-s2");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    write_summary(&a, &summary("a-s1", "a", 1, 0.25)).unwrap();
    write_summary(&b, &summary("a-s2", "a", 2, 0.375)).unwrap();
    let mut valid = eval_report("a-s1", 0.125, None, true);
    valid.split = "valid".to_owned();
    write_lines(
        &a.join("metrics.jsonl"),
        &[
            MetricsLine::Train(train_record(1, 2.0, Some(0.5))),
            MetricsLine::Train(train_record(2, 1.5, Some(0.25))),
            MetricsLine::Valid(ValidRecord { step: 2, report: valid, best: true }),
        ],
    );
    vec![a, b]
}

const TABLE: &str = "\
| run | method | seed | steps | rec Recall@10 | rec NDCG@10 | rec MRR@10 | search Recall@10 | search NDCG@10 | search MRR@10 | rec sampled NDCG@10 | search sampled NDCG@10 | perplexity | state MB | step s |
|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| a-s1 | gems | 1 | 4 | 0.1250 → 0.3125 | 0.3125 → 0.5000 | 0.5000 → 0.6875 | 0.0938 → 0.1875 | 0.2812 → 0.3750 | 0.4688 → 0.5625 | 0.7500 | 0.6250 | 20.00 → 21.00 | 1.50 | 0.250 |
| a-s2 | gems | 2 | 4 | 0.1250 → 0.4375 | 0.3125 → 0.6250 | 0.5000 → 0.8125 | 0.0938 → – | 0.2812 → – | 0.4688 → – | 0.8750 | – | 20.00 → 22.00 | 3.00 | 0.500 |
";

const GROUPS: &str = "\
| group | method | seeds | rec Recall@10 | rec NDCG@10 | rec MRR@10 | search Recall@10 | search NDCG@10 | search MRR@10 | rec sampled NDCG@10 | search sampled NDCG@10 | perplexity after | Δ perplexity | state MB | step s |
|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| a | gems | 2 | 0.3750 ± 0.0884 | 0.5625 ± 0.0884 | 0.7500 ± 0.0884 | 0.1875 (n=1) | 0.3750 (n=1) | 0.5625 (n=1) | 0.8125 ± 0.0884 | 0.6250 (n=1) | 21.50 ± 0.71 | 1.50 ± 0.71 | 2.25 ± 1.06 | 0.375 ± 0.177 |
";

#[test]
fn markdown_tables_of_two_runs() {
    let dir = tempfile::tempdir().unwrap();
    let dirs = write_runs(dir.path());
    let runs = load_runs(dir.path()).unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0], load_run(&dirs[0]).unwrap());
    assert_eq!(runs[0].lines.len(), 3);
    assert!(runs[1].lines.is_empty());
    assert_eq!(markdown_table(&runs), TABLE);
    assert_eq!(markdown_groups(&runs), GROUPS);
}

/// Floors shared by runs (same examples; only the duration differs) are one row naming those
/// runs; a floor evaluated on other examples (another seed) is a row of its own.
#[test]
fn floors_table_has_one_row_per_distinct_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    write_runs(dir.path());
    let mut runs = load_runs(dir.path()).unwrap();
    assert!(markdown_floors(&runs).is_empty());
    let popular = eval_report("popular", 0.125, None, true);
    for (run, seconds) in runs.iter_mut().zip([1.0, 2.5]) {
        let report = EvalReport { seconds, ..popular.clone() };
        run.summary.label = format!("{}-x", run.summary.label);
        run.floors.insert("popular".to_owned(), report);
    }
    let shared = markdown_floors(&runs);
    assert_eq!(shared.lines().count(), 3, "{shared}");
    assert!(shared.lines().next().unwrap().ends_with("| runs |"), "{shared}");
    assert!(shared.contains("| a-s1-x, a-s2-x |"), "{shared}");
    runs[1].floors.insert("popular".to_owned(), eval_report("popular", 0.25, None, true));
    let apart = markdown_floors(&runs);
    assert_eq!(apart.lines().count(), 4, "{apart}");
    assert!(apart.contains("| a-s1-x |") && apart.contains("| a-s2-x |"), "{apart}");
    // A floor that ranks no task (a one-task run's other floors) is no row; past three runs
    // sharing a row, the cell counts them with their seeds.
    runs[1].floors.insert("bm25".to_owned(), EvalReport { full: BTreeMap::new(), ..popular });
    assert_eq!(markdown_floors(&runs), apart);
    let many: Vec<_> = (0..4)
        .map(|i| {
            let mut run = runs[0].clone();
            run.summary.label = format!("m{i}");
            run.summary.seed = i % 2;
            run
        })
        .collect();
    let counted = markdown_floors(&many);
    assert!(counted.contains("| 4 runs, seeds 0, 1 |"), "{counted}");
}

/// Both full-catalogue protocols of one evaluation side by side: a run's `after` and each
/// distinct floor; an evaluation whose `full` already left the history out has no "every item"
/// value; evaluations without the second protocol (older reports) are not rows.
#[test]
fn protocols_table_shows_both_rankings_of_one_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    write_runs(dir.path());
    let mut runs = load_runs(dir.path()).unwrap();
    assert!(markdown_protocols(&runs).is_empty(), "no evaluation has the second protocol");
    let after = runs[0].summary.after.as_mut().unwrap();
    after.unseen = BTreeMap::from([("rec".to_owned(), task_metrics(0.5, 100))]);
    let all = after.full_metric("rec", "recall@10").unwrap();
    let unseen = after.without_history_metric("rec", "recall@10").unwrap();
    assert_ne!(all, unseen);
    let mut popular = eval_report("popular", 0.125, None, true);
    popular.history_excluded = true;
    let excluded = popular.without_history_metric("search", "ndcg@10").unwrap();
    assert_eq!(Some(excluded), popular.full_metric("search", "ndcg@10"));
    for run in &mut runs {
        run.floors.insert("popular".to_owned(), popular.clone());
    }
    let table = markdown_protocols(&runs);
    assert_eq!(table.lines().count(), 4, "header, alignment, a-s1, one popular: {table}");
    assert!(table.contains(&format!("| a-s1 | {all:.4} / {unseen:.4} |")), "{table}");
    assert!(table.contains(&format!("| – / {excluded:.4} |")), "{table}");
    assert!(table.contains("| floor: popular (a-s1, a-s2) | – / "), "{table}");
    assert!(!table.contains("| a-s2 |"), "a-s2 has no second protocol: {table}");
    let md = std::fs::read_to_string(write_report(&runs, &dir.path().join("r")).unwrap()).unwrap();
    assert!(md.contains("## With and without the history items") && md.contains(&table));
}

/// The losses table: before → after per task for the target, item and catalogue losses;
/// a run without item losses in either evaluation (older reports) is not a row.
#[test]
fn losses_table_shows_item_and_catalogue_losses_before_and_after() {
    let dir = tempfile::tempdir().unwrap();
    write_runs(dir.path());
    let mut runs = load_runs(dir.path()).unwrap();
    assert!(markdown_losses(&runs).is_empty(), "no evaluation has item losses");
    let after = runs[0].summary.after.as_mut().unwrap();
    after.item_loss = BTreeMap::from([("rec".to_owned(), 5.0), ("search".to_owned(), 6.5)]);
    after.catalogue_loss = BTreeMap::from([("rec".to_owned(), 4.25), ("search".to_owned(), 6.0)]);
    let before = runs[0].summary.before.as_mut().unwrap();
    before.catalogue_loss = BTreeMap::from([("rec".to_owned(), 8.125)]);
    let table = markdown_losses(&runs);
    assert_eq!(table.lines().count(), 3, "header, alignment, a-s1 only: {table}");
    assert!(table.starts_with("| run | rec target loss | rec item loss | rec catalogue loss |"));
    assert!(
        table.contains(
            "| a-s1 | 2.500 → 2.500 | – → 5.000 | 8.125 → 4.250 | 3.250 → 3.250 | – → 6.500 | \
             – → 6.000 |"
        ),
        "{table}"
    );
    let md = std::fs::read_to_string(write_report(&runs, &dir.path().join("r")).unwrap()).unwrap();
    assert!(md.contains("## Losses (nats, before → after tuning)") && md.contains(&table));
}

#[test]
fn authors_ndcg_is_labelled_in_tables() {
    let dir = tempfile::tempdir().unwrap();
    write_runs(dir.path());
    let mut runs = load_runs(dir.path()).unwrap();
    runs[0].summary.after.as_mut().unwrap().ndcg_normaliser = NdcgNormaliser::Authors;
    runs[0].summary.label = "x|y".to_owned();
    let table = markdown_table(&runs);
    assert!(table.contains("| x\\|y (authors NDCG) | gems |"), "{table}");
    assert!(markdown_groups(&runs).contains("| a (authors NDCG) |"));
}

#[test]
fn write_report_writes_markdown_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    write_runs(&dir.path().join("runs"));
    let runs = load_runs(&dir.path().join("runs")).unwrap();
    let out = dir.path().join("report");
    let path = write_report(&runs, &out).unwrap();
    assert_eq!(path, out.join("report.md"));
    let md = std::fs::read_to_string(&path).unwrap();
    assert!(md.starts_with("# gems run report\n"));
    assert!(md.contains(TABLE) && md.contains(GROUPS));
    for file in PLOT_FILES {
        assert!(md.contains(&format!("]({file})")), "no link to {file}");
        let svg = std::fs::read_to_string(out.join(file)).unwrap();
        assert!(svg.starts_with("<svg"), "{file}");
        assert_well_formed(&svg);
    }
    let loss = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert_eq!(loss.matches("<polyline").count(), 2, "rec and search of run a-s1");
    let valid = std::fs::read_to_string(out.join("valid.svg")).unwrap();
    assert_eq!(valid.matches("<polyline").count(), 2);
    let cosine = std::fs::read_to_string(out.join("cosine.svg")).unwrap();
    assert_eq!(cosine.matches("<polyline").count(), 1);
    // One group per configuration: a-s1 and a-s2 are two seeds of group `a` (perplexity 21
    // and 22): two hollow markers, the median filled, whiskers over their range, the group in
    // the legend; the untuned model (perplexity 20) as a vertical reference.
    // a-s2 has no search metrics: one seed, so no whiskers there.
    for (file, task, seeds) in
        [("tradeoff-rec.svg", "rec", 2), ("tradeoff-search.svg", "search", 1)]
    {
        let svg = std::fs::read_to_string(out.join(file)).unwrap();
        assert_eq!(svg.matches("<circle").count(), seeds + 2, "seeds, median, legend: {svg}");
        assert_eq!(svg.matches(r##"fill="none" stroke="#4e79a7""##).count(), seeds, "{svg}");
        assert_eq!(svg.matches("<path").count(), seeds - 1, "whiskers: {svg}");
        assert!(svg.contains(&format!("{task} Recall@10")) && svg.contains(">a</text>"));
        // Perplexities 20-22 span less than a decade: a linear axis.
        assert!(!svg.contains("(log scale)") && svg.contains("untuned 20.0"), "{svg}");
    }
    let fit = std::fs::read_to_string(out.join("fit.svg")).unwrap();
    assert_eq!(fit.matches("<circle").count(), 4, "{fit}");
    assert!(fit.contains("test target loss, mean of the tasks") && fit.contains(">a</text>"));
    // Atomic writes leave no temporary files behind; a second report overwrites the first.
    write_report(&runs, &out).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "cosine.svg",
            "fit.svg",
            "loss.svg",
            "report.md",
            "tradeoff-rec.svg",
            "tradeoff-search.svg",
            "valid.svg"
        ]
    );
    // No runs: still a report, with "no data" plots.
    let empty = write_report(&[], &dir.path().join("empty")).unwrap();
    assert!(std::fs::read_to_string(empty).unwrap().contains("0 runs in 0 groups"));
}

/// Floors become horizontal references at their mean over seeds (each seed once, however many
/// runs share it), in the plot of each task they rank.
#[test]
fn tradeoff_plots_mark_the_floors_per_task() {
    let dir = tempfile::tempdir().unwrap();
    write_runs(dir.path());
    let mut runs = load_runs(dir.path()).unwrap();
    for (run, recall) in runs.iter_mut().zip([0.25, 0.125]) {
        let report = eval_report("floor", recall, None, false);
        run.floors.insert("sasrec".to_owned(), report);
    }
    let out = dir.path().join("report");
    write_report(&runs, &out).unwrap();
    let rec = std::fs::read_to_string(out.join("tradeoff-rec.svg")).unwrap();
    let recall = runs[0].floors["sasrec"].full_metric("rec", "recall@10").unwrap();
    let other = runs[1].floors["sasrec"].full_metric("rec", "recall@10").unwrap();
    let label = format!("sasrec {:.3}, mean of 2 seeds", (recall + other) / 2.0);
    assert!(rec.contains(&label), "{label} in {rec}");
    let search = std::fs::read_to_string(out.join("tradeoff-search.svg")).unwrap();
    assert!(!search.contains("sasrec"), "a rec floor is not a search reference");
}

#[test]
fn scatter_plot_is_well_formed_and_skips_what_it_cannot_show() {
    let mut groups = vec![
        PointGroup {
            name: "seeds <a&b>".into(),
            points: vec![(48.0, 0.06), (106.0, 0.05), (900.0, 0.02)],
        },
        PointGroup { name: "empty".into(), points: vec![] },
        PointGroup { name: "unshowable".into(), points: vec![(0.0, 0.1), (f64::NAN, 0.1)] },
    ];
    // More groups than colours: the eleventh and later change marker shape.
    groups.extend((0..10).map(|i| PointGroup {
        name: format!("g{i}"),
        points: vec![(50.0 + f64::from(i), 0.01 * f64::from(i))],
    }));
    let plot = Scatter {
        title: "Ranking & retention".into(),
        x_label: "perplexity".into(),
        y_label: "Recall@10".into(),
        log_x: true,
        groups,
        references: vec![
            Reference { label: "floor".into(), value: 0.3, vertical: false },
            Reference { label: "untuned".into(), value: 35.3, vertical: true },
            Reference { label: "not on a log axis".into(), value: -1.0, vertical: true },
        ],
    };
    let svg = svg_scatter_plot(&plot);
    assert_well_formed(&svg);
    assert!(svg.contains("seeds &lt;a&amp;b&gt;") && svg.contains("Ranking &amp; retention"));
    assert!(svg.contains("empty (no data)") && svg.contains("unshowable (no data)"));
    assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    assert!(svg.contains(">floor</text>") && svg.contains(">untuned</text>"));
    assert!(svg.contains("perplexity (log scale)"), "35.3 to 900 spans more than a decade");
    assert!(!svg.contains("not on a log axis"), "{svg}");
    assert_eq!(svg.matches("stroke-dasharray").count(), 2, "two drawable references");
    // The references widen the axes: the floor's 0.3 is above every point.
    assert!(svg.contains(">0.30</text>") || svg.contains(">0.3</text>"), "{svg}");
    assert!(svg.contains("<polygon"), "a second marker shape past ten groups");
    let nothing = svg_scatter_plot(&Scatter { title: "t".into(), ..Scatter::default() });
    assert!(nothing.contains("no data"));
    assert_well_formed(&nothing);
}

/// Every opened element is closed, in order (a small check, enough for this generator).
fn assert_well_formed(svg: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').expect("unclosed tag") + start;
        let tag = &rest[start + 1..end];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name), "mismatched </{name}>");
        } else if !tag.ends_with('/') {
            stack.push(tag.split_whitespace().next().unwrap().to_owned());
        }
        rest = &rest[end + 1..];
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
}

#[test]
fn svg_plot_is_well_formed() {
    let series = vec![
        Series { name: "rec <a&b>".into(), points: vec![(1.0, 2.0), (2.0, f64::NAN), (3.0, 1.0)] },
        Series { name: "empty".into(), points: vec![] },
        Series { name: "bad points".into(), points: vec![(f64::NAN, 1.0), (1.0, f64::INFINITY)] },
        Series { name: "single".into(), points: vec![(2.0, 1.5)] },
    ];
    let svg = svg_line_plot("Loss & more", "step", "loss", &series);
    assert!(svg.starts_with("<svg"));
    assert!(svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
    assert!(svg.contains("rec &lt;a&amp;b&gt;") && svg.contains("Loss &amp; more"));
    assert!(svg.contains("empty (no data)"));
    assert!(!svg.contains("NaN") && !svg.contains("inf"));
    assert!(svg.matches("<text").count() >= 10, "tick labels present");
    assert_well_formed(&svg);

    let nothing = svg_line_plot("t", "x", "y", &[]);
    assert!(nothing.starts_with("<svg") && nothing.contains("no data"));
    assert_eq!(nothing.matches("<polyline").count(), 0);
    assert_well_formed(&nothing);

    // Many series get distinct styles; a constant series still draws.
    let many: Vec<Series> = (0..12)
        .map(|i| Series { name: format!("s{i}"), points: vec![(0.0, 1.0), (1.0, 1.0)] })
        .collect();
    let svg = svg_line_plot("many", "x", "y", &many);
    assert_eq!(svg.matches("<polyline").count(), 12);
    assert!(svg.contains("stroke-dasharray"));
    assert_well_formed(&svg);
}
