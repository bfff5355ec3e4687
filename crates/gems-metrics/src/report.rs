//! Run reports: markdown tables per run and per seed group, and SVG curves.
//!
//! A report reads finished run directories ([`load_run`]) and writes one directory with
//! `report.md` and five plots ([`write_report`]). Tables compare the `before` and `after`
//! evaluations of each [`RunSummary`] at k = 10; the group table averages seeds of one
//! configuration (runs sharing [`RunSummary::group`]) as mean ± sample standard deviation.
//! Missing values print as "–", so a run without search data or perplexity still fits.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{MetricsError, Result};
use crate::ranking::NdcgNormaliser;
use crate::record::{
    EvalReport, METRICS_FILE, MetricsLine, RunSummary, SUMMARY_FILE, read_metrics_lines,
    read_summary,
};
use gems_io::write_atomic;

pub use crate::plot::{PointGroup, Reference, Scatter, Series, svg_line_plot, svg_scatter_plot};

/// The tasks a report shows, in column order.
pub const TASKS: [&str; 2] = ["rec", "search"];

/// The metrics at k = 10 the tables show per task, with their column titles.
const TABLE_METRICS: [(&str, &str); 3] =
    [("recall@10", "Recall@10"), ("ndcg@10", "NDCG@10"), ("mrr@10", "MRR@10")];

/// Printed for a missing value.
const MISSING: &str = "–";

/// A finished (or interrupted) run read back from its directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// The run directory.
    pub dir: PathBuf,
    /// `summary.json`.
    pub summary: RunSummary,
    /// `metrics.jsonl`, empty when the run has none.
    pub lines: Vec<MetricsLine>,
    /// `baselines.json`: floors that need no language model (most popular, BM25, SASRec, ItemKNN) evaluated on
    /// the run's own test examples, by name; empty when the run has none.
    pub floors: BTreeMap<String, EvalReport>,
}

/// The file of a run directory that holds its floors.
pub const BASELINES_FILE: &str = "baselines.json";

/// Reads a run directory: `summary.json` (required) and `metrics.jsonl` (optional).
///
/// # Errors
/// Those of [`read_summary`], and of [`read_metrics_lines`] when `metrics.jsonl` exists.
pub fn load_run(dir: &Path) -> Result<Run> {
    let summary = read_summary(dir)?;
    let metrics = dir.join(METRICS_FILE);
    let lines = if metrics.is_file() { read_metrics_lines(&metrics)? } else { Vec::new() };
    let floors_path = dir.join(BASELINES_FILE);
    let floors = if floors_path.is_file() {
        let text = std::fs::read_to_string(&floors_path)
            .map_err(|source| MetricsError::io(&floors_path, source))?;
        serde_json::from_str(&text)
            .map_err(|source| MetricsError::Json { path: floors_path.clone(), source })?
    } else {
        BTreeMap::new()
    };
    Ok(Run { dir: dir.to_owned(), summary, lines, floors })
}

/// Reads every run directory directly under `root` (those holding `summary.json`), sorted by
/// directory name; other entries are ignored.
///
/// # Errors
/// [`MetricsError::Files`] (`gems_io::Error::Io`) when `root` cannot be listed, and those of [`load_run`].
pub fn load_runs(root: &Path) -> Result<Vec<Run>> {
    let entries = std::fs::read_dir(root).map_err(|source| MetricsError::io(root, source))?;
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| MetricsError::io(root, source))?;
        let path = entry.path();
        if path.join(SUMMARY_FILE).is_file() {
            dirs.push(path);
        }
    }
    dirs.sort();
    dirs.iter().map(|dir| load_run(dir)).collect()
}

/// A value with `decimals` decimals, or "–".
fn number(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| MISSING.to_owned(), |v| format!("{v:.decimals$}"))
}

/// "before → after", or "–" when both are missing.
fn before_after(before: Option<f64>, after: Option<f64>, decimals: usize) -> String {
    if before.is_none() && after.is_none() {
        return MISSING.to_owned();
    }
    format!("{} → {}", number(before, decimals), number(after, decimals))
}

/// Escapes text for a markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn uses_authors_ndcg(summary: &RunSummary) -> bool {
    [&summary.before, &summary.after]
        .into_iter()
        .flatten()
        .any(|report| report.ndcg_normaliser == NdcgNormaliser::Authors)
}

/// Writes a header row and its alignment row: the first `left` columns left-aligned, the
/// rest right-aligned.
fn header(out: &mut String, columns: &[String], left: usize) {
    let _ = writeln!(out, "| {} |", columns.join(" | "));
    let align: Vec<&str> =
        (0..columns.len()).map(|i| if i < left { "---" } else { "---:" }).collect();
    let _ = writeln!(out, "|{}|", align.join("|"));
}

fn metric_columns(out: &mut Vec<String>) {
    for task in TASKS {
        for (_, title) in TABLE_METRICS {
            out.push(format!("{task} {title}"));
        }
    }
    for task in TASKS {
        out.push(format!("{task} sampled NDCG@10"));
    }
}

/// One row per run: label, method, seed, steps; per task the full-catalogue Recall, NDCG and
/// MRR at 10 as before → after (4 decimals); the sampled-protocol NDCG@10 after tuning;
/// perplexity before → after; optimizer state in MB (10^6 bytes); median step seconds.
///
/// A label marked "(authors NDCG)" has NDCG values under the authors' normaliser.
pub fn markdown_table(runs: &[Run]) -> String {
    let mut columns: Vec<String> =
        ["run", "method", "seed", "steps"].into_iter().map(String::from).collect();
    metric_columns(&mut columns);
    columns.extend(["perplexity", "state MB", "step s"].into_iter().map(String::from));
    let mut out = String::new();
    header(&mut out, &columns, 2);
    for run in runs {
        let s = &run.summary;
        let (before, after) = (s.before.as_ref(), s.after.as_ref());
        let mut label = cell(&s.label);
        if uses_authors_ndcg(s) {
            label.push_str(" (authors NDCG)");
        }
        let mut row = vec![label, cell(&s.method), s.seed.to_string(), s.steps.to_string()];
        for task in TASKS {
            for (name, _) in TABLE_METRICS {
                row.push(before_after(
                    before.and_then(|r| r.full_metric(task, name)),
                    after.and_then(|r| r.full_metric(task, name)),
                    4,
                ));
            }
        }
        for task in TASKS {
            row.push(number(after.and_then(|r| r.sampled_metric(task, "ndcg@10")), 4));
        }
        row.push(before_after(
            before.and_then(|r| r.perplexity),
            after.and_then(|r| r.perplexity),
            2,
        ));
        row.push(format!("{:.2}", megabytes(s.optimizer_state_bytes)));
        row.push(format!("{:.3}", s.median_step_seconds));
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

/// The floors of the runs (most popular, BM25, SASRec, ItemKNN, successors) as a table, one row
/// per distinct evaluation with any metric, full-catalogue metrics at k = 10. Runs on the same
/// data and test examples share a row: evaluations that differ only in how long they took count
/// as the same, and the last column names the runs that share it, or when more than three do,
/// counts them with their seeds ("15 runs, seed 0": the seeds of a reproduction give one row
/// each). Empty when no run has floors.
pub fn markdown_floors(runs: &[Run]) -> String {
    let seen = distinct_floors(runs);
    if seen.is_empty() {
        return String::new();
    }
    let mut columns: Vec<String> =
        ["floor", "examples per task"].into_iter().map(String::from).collect();
    metric_columns(&mut columns);
    columns.push("runs".to_owned());
    let mut out = String::new();
    header(&mut out, &columns, 1);
    for (name, report, sharing) in seen {
        let examples: Vec<String> = TASKS
            .iter()
            .map(|t| report.full.get(*t).map_or(MISSING.to_owned(), |m| m.examples.to_string()))
            .collect();
        let mut row = vec![cell(&name), examples.join(" / ")];
        for task in TASKS {
            for (metric, _) in TABLE_METRICS {
                row.push(number(report.full_metric(task, metric), 4));
            }
        }
        for task in TASKS {
            row.push(number(report.sampled_metric(task, "ndcg@10"), 4));
        }
        row.push(cell(&runs_cell(&sharing)));
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

/// The runs sharing a floor: their labels, or past three, how many and of which seeds.
fn runs_cell(sharing: &[&RunSummary]) -> String {
    if sharing.len() <= 3 {
        return sharing.iter().map(|s| s.label.as_str()).collect::<Vec<_>>().join(", ");
    }
    let seeds: std::collections::BTreeSet<u64> = sharing.iter().map(|s| s.seed).collect();
    let seeds: Vec<String> = seeds.iter().map(u64::to_string).collect();
    let noun = if seeds.len() == 1 { "seed" } else { "seeds" };
    format!("{} runs, {noun} {}", sharing.len(), seeds.join(", "))
}

/// The runs' floors, one entry per distinct evaluation (same name; equal but for the
/// duration) that ranks any task, in order of first appearance, with the runs that share it.
/// (A run of one task records the other task's floors empty.)
fn distinct_floors(runs: &[Run]) -> Vec<(String, &EvalReport, Vec<&RunSummary>)> {
    let mut seen: Vec<(String, &EvalReport, Vec<&RunSummary>)> = Vec::new();
    for run in runs {
        for (name, report) in run.floors.iter().filter(|(_, r)| !r.full.is_empty()) {
            match seen.iter_mut().find(|(n, r, _)| n == name && same_evaluation(r, report)) {
                Some((_, _, sharing)) => sharing.push(&run.summary),
                None => seen.push((name.clone(), report, vec![&run.summary])),
            }
        }
    }
    seen
}

/// Both full-catalogue protocols side by side, at k = 10: one row per run (its `after`
/// evaluation) and one per distinct floor, Recall@10 and NDCG@10 per task with every item
/// ranked and with the items each example's user had before its target left out (the target
/// kept; only the prompt's items in evaluations without `whole_history`). Empty when no
/// evaluation has the second protocol (reports written before 2026-12-03).
pub fn markdown_protocols(runs: &[Run]) -> String {
    let mut rows: Vec<(String, &EvalReport)> = runs
        .iter()
        .filter_map(|run| Some((run.summary.label.clone(), run.summary.after.as_ref()?)))
        .collect();
    rows.extend(
        distinct_floors(runs)
            .into_iter()
            .map(|(n, r, sharing)| (format!("floor: {n} ({})", runs_cell(&sharing)), r)),
    );
    rows.retain(|(_, r)| !r.without_history().is_empty());
    if rows.is_empty() {
        return String::new();
    }
    let mut columns = vec!["evaluation".to_owned()];
    for task in TASKS {
        for title in ["Recall@10", "NDCG@10"] {
            columns.push(format!("{task} {title} all / without history"));
        }
    }
    let mut out = String::new();
    header(&mut out, &columns, 1);
    for (label, report) in rows {
        let label = if report.whole_history { label } else { format!("{label} (prompt only)") };
        let mut row = vec![cell(&label)];
        for task in TASKS {
            for metric in ["recall@10", "ndcg@10"] {
                let all =
                    if report.history_excluded { None } else { report.full_metric(task, metric) };
                let unseen = report.without_history_metric(task, metric);
                row.push(format!("{} / {}", number(all, 4), number(unseen, 4)));
            }
        }
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

/// The losses of every run's model, before → after tuning (nats), per task: the target
/// loss (the mean over the target span that training lowers), the item token's own loss
/// (`item_loss`) and the target's cross-entropy among the catalogue's items only
/// (`catalogue_loss`, the ranking's loss: ln(number of items) for a uniform ranking). Empty
/// when no evaluation has the item losses (reports written before 2026-12-03).
pub fn markdown_losses(runs: &[Run]) -> String {
    type Field = fn(&EvalReport) -> &BTreeMap<String, f64>;
    const LOSSES: [(&str, Field); 3] = [
        ("target loss", |r| &r.loss),
        ("item loss", |r| &r.item_loss),
        ("catalogue loss", |r| &r.catalogue_loss),
    ];
    let has_items = |r: Option<&EvalReport>| r.is_some_and(|r| !r.catalogue_loss.is_empty());
    let shown: Vec<&RunSummary> = runs
        .iter()
        .map(|run| &run.summary)
        .filter(|s| has_items(s.before.as_ref()) || has_items(s.after.as_ref()))
        .collect();
    if shown.is_empty() {
        return String::new();
    }
    let mut columns = vec!["run".to_owned()];
    for task in TASKS {
        columns.extend(LOSSES.iter().map(|(title, _)| format!("{task} {title}")));
    }
    let mut out = String::new();
    header(&mut out, &columns, 1);
    for s in shown {
        let mut row = vec![cell(&s.label)];
        for task in TASKS {
            for (_, field) in LOSSES {
                let value = |r: Option<&EvalReport>| r.and_then(|r| field(r).get(task).copied());
                row.push(before_after(value(s.before.as_ref()), value(s.after.as_ref()), 3));
            }
        }
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

/// Whether two evaluations agree in everything but their duration.
fn same_evaluation(a: &EvalReport, b: &EvalReport) -> bool {
    EvalReport { seconds: 0.0, ..a.clone() } == EvalReport { seconds: 0.0, ..b.clone() }
}

/// Mean and sample standard deviation of the finite values; the standard deviation is `None`
/// with fewer than two values.
fn mean_std(values: &[f64]) -> Option<(f64, Option<f64>, usize)> {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let n = finite.len();
    if n == 0 {
        return None;
    }
    let mean = finite.iter().sum::<f64>() / n as f64;
    let std = (n >= 2).then(|| {
        let squares: f64 = finite.iter().map(|v| (v - mean) * (v - mean)).sum();
        (squares / (n as f64 - 1.0)).sqrt()
    });
    Some((mean, std, n))
}

/// "mean ± std", with "(n=k)" when only `k` of the group's `size` runs have the value.
fn mean_std_cell(values: &[f64], size: usize, decimals: usize) -> String {
    match mean_std(values) {
        None => MISSING.to_owned(),
        Some((mean, std, n)) => {
            let mut text = match std {
                Some(std) => format!("{mean:.decimals$} ± {std:.decimals$}"),
                None => format!("{mean:.decimals$}"),
            };
            if n < size {
                let _ = write!(text, " (n={n})");
            }
            text
        }
    }
}

/// One row per group ([`RunSummary::group`], sorted): method, number of seeds, then
/// mean ± sample std over the seeds of every after-tuning full-catalogue metric at 10 per
/// task, the sampled NDCG@10 per task, the perplexity after tuning and its change (after −
/// before; it needs the run's `before` evaluation), optimizer state
/// in MB and median step seconds. Non-finite values are left out of a mean; a cell with fewer
/// values than seeds says "(n=k)".
pub fn markdown_groups(runs: &[Run]) -> String {
    let mut groups: BTreeMap<&str, Vec<&RunSummary>> = BTreeMap::new();
    for run in runs {
        groups.entry(run.summary.group.as_str()).or_default().push(&run.summary);
    }
    let mut columns: Vec<String> =
        ["group", "method", "seeds"].into_iter().map(String::from).collect();
    metric_columns(&mut columns);
    columns.extend(
        ["perplexity after", "Δ perplexity", "state MB", "step s"].into_iter().map(String::from),
    );
    let mut out = String::new();
    header(&mut out, &columns, 2);
    for (group, summaries) in groups {
        let size = summaries.len();
        let collect = |f: &dyn Fn(&RunSummary) -> Option<f64>| -> Vec<f64> {
            summaries.iter().filter_map(|s| f(s)).collect()
        };
        let mut methods: Vec<&str> = summaries.iter().map(|s| s.method.as_str()).collect();
        methods.sort_unstable();
        methods.dedup();
        let mut label = cell(group);
        if summaries.iter().any(|s| uses_authors_ndcg(s)) {
            label.push_str(" (authors NDCG)");
        }
        let mut row = vec![label, cell(&methods.join(", ")), size.to_string()];
        for task in TASKS {
            for (name, _) in TABLE_METRICS {
                let values = collect(&|s| s.after.as_ref().and_then(|r| r.full_metric(task, name)));
                row.push(mean_std_cell(&values, size, 4));
            }
        }
        for task in TASKS {
            let values =
                collect(&|s| s.after.as_ref().and_then(|r| r.sampled_metric(task, "ndcg@10")));
            row.push(mean_std_cell(&values, size, 4));
        }
        row.push(mean_std_cell(&collect(&|s| s.after.as_ref()?.perplexity), size, 2));
        let change = collect(&|s| {
            let before = s.before.as_ref()?.perplexity?;
            let after = s.after.as_ref()?.perplexity?;
            Some(after - before)
        });
        row.push(mean_std_cell(&change, size, 2));
        row.push(mean_std_cell(&collect(&|s| Some(megabytes(s.optimizer_state_bytes))), size, 2));
        row.push(mean_std_cell(&collect(&|s| Some(s.median_step_seconds)), size, 3));
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

/// Training loss per run and task over steps.
fn loss_series(runs: &[Run]) -> Vec<Series> {
    let mut series = Vec::new();
    for run in runs {
        for task in TASKS {
            let points: Vec<(f64, f64)> = run
                .lines
                .iter()
                .filter_map(|line| match line {
                    MetricsLine::Train(r) => {
                        let loss = if task == "rec" { r.loss_rec } else { r.loss_search };
                        loss.map(|loss| (r.step as f64, loss))
                    }
                    MetricsLine::Valid(_) => None,
                })
                .collect();
            if !points.is_empty() {
                series.push(Series { name: format!("{} {task}", run.summary.label), points });
            }
        }
    }
    series
}

/// Validation full-catalogue NDCG@10 per run and task over steps.
fn valid_series(runs: &[Run]) -> Vec<Series> {
    let mut series = Vec::new();
    for run in runs {
        for task in TASKS {
            let points: Vec<(f64, f64)> = run
                .lines
                .iter()
                .filter_map(|line| match line {
                    MetricsLine::Valid(v) => {
                        v.report.full_metric(task, "ndcg@10").map(|value| (v.step as f64, value))
                    }
                    MetricsLine::Train(_) => None,
                })
                .collect();
            if !points.is_empty() {
                series.push(Series { name: format!("{} {task}", run.summary.label), points });
            }
        }
    }
    series
}

/// Mean rec/search gradient cosine per run over steps.
fn cosine_series(runs: &[Run]) -> Vec<Series> {
    runs.iter()
        .filter_map(|run| {
            let points: Vec<(f64, f64)> = run
                .lines
                .iter()
                .filter_map(|line| match line {
                    MetricsLine::Train(r) => r.mean_cosine.map(|c| (r.step as f64, c)),
                    MetricsLine::Valid(_) => None,
                })
                .collect();
            (!points.is_empty()).then(|| Series { name: run.summary.label.clone(), points })
        })
        .collect()
}

/// One group of points per configuration ([`RunSummary::group`]) against retention: x the
/// perplexity after tuning, y `value` of the same `after` evaluation, one point per run (seed).
/// Runs without either are left out; so is a group with no such run.
fn retention_groups(runs: &[Run], value: impl Fn(&EvalReport) -> Option<f64>) -> Vec<PointGroup> {
    let mut groups: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for run in runs {
        let Some(after) = run.summary.after.as_ref() else { continue };
        if let (Some(perplexity), Some(y)) = (after.perplexity, value(after)) {
            groups.entry(run.summary.group.as_str()).or_default().push((perplexity, y));
        }
    }
    groups.into_iter().map(|(name, points)| PointGroup { name: name.to_owned(), points }).collect()
}

/// The mean of the values, or None when there are none.
fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// The untuned model's perplexity as a vertical reference: the median over the runs' `before`
/// evaluations (one value when they share the model and text, as a reproduction's do).
fn untuned_reference(runs: &[Run]) -> Option<Reference> {
    let mut values: Vec<f64> =
        runs.iter().filter_map(|r| r.summary.before.as_ref()?.perplexity).collect();
    if values.is_empty() {
        return None;
    }
    let value = crate::plot::median(&mut values);
    Some(Reference { label: format!("untuned {value:.1}"), value, vertical: true })
}

/// Each floor's full-catalogue `metric` for `task` as a horizontal reference: the mean over
/// seeds, each seed's value taken once (the runs of one seed share their test examples).
fn floor_references(runs: &[Run], task: &str, metric: &str) -> Vec<Reference> {
    let mut by_floor: BTreeMap<&str, BTreeMap<u64, f64>> = BTreeMap::new();
    for run in runs {
        for (name, report) in &run.floors {
            if let Some(value) = report.full_metric(task, metric) {
                by_floor.entry(name).or_default().entry(run.summary.seed).or_insert(value);
            }
        }
    }
    by_floor
        .into_iter()
        .filter_map(|(name, seeds)| {
            let value = mean(seeds.values().copied())?;
            let over = if seeds.len() > 1 {
                format!(", mean of {} seeds", seeds.len())
            } else {
                String::new()
            };
            Some(Reference { label: format!("{name} {value:.3}{over}"), value, vertical: false })
        })
        .collect()
}

/// Full-catalogue Recall@10 of `task` after tuning against the perplexity after tuning, per
/// configuration, with the floors and the untuned model as references: the trade-off GEMS
/// claims to win (higher and further left is better).
fn tradeoff_plot(runs: &[Run], task: &str) -> Scatter {
    let what = if task == "rec" { "Recommendation" } else { "Search" };
    let mut references = floor_references(runs, task, "recall@10");
    references.extend(untuned_reference(runs));
    Scatter {
        title: format!("{what} against retention, by configuration"),
        x_label: "WikiText-2 perplexity after tuning".into(),
        y_label: format!("{task} Recall@10 (full catalogue)"),
        log_x: true,
        groups: retention_groups(runs, |after| after.full_metric(task, "recall@10")),
        references,
    }
}

/// Fit against retention: the test target loss after tuning (nats per target token), mean over
/// the tasks a run has, per configuration. Where ranking is a few hits, this is the finer
/// measure of how much a run learnt for what it forgot.
fn fit_plot(runs: &[Run]) -> Scatter {
    Scatter {
        title: "Fit against retention, by configuration".into(),
        x_label: "WikiText-2 perplexity after tuning".into(),
        y_label: "test target loss, mean of the tasks".into(),
        log_x: true,
        groups: retention_groups(runs, |after| {
            mean(TASKS.iter().filter_map(|t| after.loss.get(*t).copied()))
        }),
        references: untuned_reference(runs).into_iter().collect(),
    }
}

/// The report's plot files in the order they are written and listed.
pub const PLOT_FILES: [&str; 6] =
    ["loss.svg", "valid.svg", "cosine.svg", "tradeoff-rec.svg", "tradeoff-search.svg", "fit.svg"];

/// Writes a report of `runs` into `out_dir` (created if missing) and returns the path of
/// `report.md`.
///
/// Files: `report.md` (title, the run table of [`markdown_table`], the group table of
/// [`markdown_groups`], links to the plots), and the plots of [`PLOT_FILES`]: `loss.svg`
/// (training loss per run and task over steps), `valid.svg` (validation full-catalogue NDCG@10
/// per run and task over steps), `cosine.svg` (mean rec/search gradient cosine per run over
/// steps), `tradeoff-rec.svg` and `tradeoff-search.svg` (each task's Recall@10 against the
/// perplexity after tuning, per configuration, with the floors and the untuned model) and
/// `fit.svg` (test target loss against perplexity after tuning, per configuration). Each file
/// is written to a temporary name in `out_dir` and renamed, so no reader sees a partial file.
///
/// # Errors
/// [`MetricsError::Files`] (`gems_io::Error::Io`) when the directory or a file cannot be written.
pub fn write_report(runs: &[Run], out_dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).map_err(|source| MetricsError::io(out_dir, source))?;
    let plots = report_plots(runs);
    for (file, _, svg) in &plots {
        write_atomic(&out_dir.join(file), svg.as_bytes())?;
    }
    let md = report_markdown(runs, &plots);
    let path = out_dir.join("report.md");
    write_atomic(&path, md.as_bytes())?;
    Ok(path)
}

/// One plot of the report: file name, title and the SVG document.
type Plot = (&'static str, String, String);

/// The report's plots of `runs`, rendered, in the order of [`PLOT_FILES`].
fn report_plots(runs: &[Run]) -> Vec<Plot> {
    let lines = |title: &str, y_label: &str, series: Vec<Series>| {
        (title.to_owned(), svg_line_plot(title, "step", y_label, &series))
    };
    let scatter = |plot: Scatter| (plot.title.clone(), svg_scatter_plot(&plot));
    let rendered = [
        lines("Training loss", "loss", loss_series(runs)),
        lines("Validation NDCG@10 (full catalogue)", "NDCG@10", valid_series(runs)),
        lines("Gradient cosine (rec vs search)", "mean cosine", cosine_series(runs)),
        scatter(tradeoff_plot(runs, "rec")),
        scatter(tradeoff_plot(runs, "search")),
        scatter(fit_plot(runs)),
    ];
    PLOT_FILES.into_iter().zip(rendered).map(|(file, (title, svg))| (file, title, svg)).collect()
}

/// The text of `report.md`: title, introduction, the tables and links to `plots`.
fn report_markdown(runs: &[Run], plots: &[Plot]) -> String {
    let mut md = String::from("# gems run report\n\n");
    write_introduction(&mut md, runs);
    md.push_str("## Runs\n\n");
    md.push_str(&markdown_table(runs));
    write_optional_sections(&mut md, runs);
    md.push_str("\n## Groups (mean ± sample std over seeds)\n\n");
    md.push_str(&markdown_groups(runs));
    md.push_str(
        "\n## Plots\n\nAgainst retention, each configuration is one large marker at the median \
         of its seeds, with whiskers over their range and a small hollow marker per seed; \
         perplexity on a log scale where it spans a decade or more, the floors and the \
         untuned model dashed.\n\n",
    );
    // `write!` into a String cannot fail.
    for (file, title, _) in plots {
        let _ = writeln!(md, "- [{title}]({file})");
    }
    md.push('\n');
    for (file, title, _) in plots {
        let _ = writeln!(md, "![{title}]({file})\n");
    }
    md
}

/// Writes the report's opening paragraphs: how many runs and groups, what the metrics are, and
/// which ranking protocol each run used.
fn write_introduction(md: &mut String, runs: &[Run]) {
    let n_groups = runs
        .iter()
        .map(|r| r.summary.group.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    // `write!` into a String cannot fail.
    let _ = writeln!(
        md,
        "{} runs in {} groups. Ranking metrics are at k = 10 on each run's `before` and `after` \
         evaluations: full = ranking over the whole catalogue, sampled = the positives plus 99 \
         sampled negatives. NDCG uses the standard ideal DCG unless marked \"(authors NDCG)\".\n",
        runs.len(),
        n_groups
    );
    let excluded: Vec<&str> = runs
        .iter()
        .filter(|r| r.summary.after.as_ref().is_some_and(|a| a.history_excluded))
        .map(|r| r.summary.label.as_str())
        .collect();
    if excluded.is_empty() {
        md.push_str(
            "Protocol: every item of the catalogue is ranked, including those already in the \
             user's history.\n\n",
        );
    } else {
        let _ = writeln!(
            md,
            "Protocol: the full-catalogue ranking leaves out the items each example's user had \
             before its target (the target kept) for {}; the other runs rank every item.\n",
            excluded.join(", ")
        );
    }
}

/// Writes the floors, protocol and loss sections, each only when it has rows.
fn write_optional_sections(md: &mut String, runs: &[Run]) {
    let floors = markdown_floors(runs);
    if !floors.is_empty() {
        md.push_str(
            "\n## Floors without a language model (same test examples and protocol)\n\n\
             `popular`: the most frequent training targets first, for every user and query; \
             `bm25`: the search query against each item's title and category path (search \
             only); `sasrec`: a self-attentive sequential recommender trained on the run's \
             training histories (recommendation only); `itemknn`: items that co-occur with \
             the user's recent items in the training histories, by count \
             (recommendation only, no learning); `successors`: items that came right after \
             the user's recent items in the training histories, by count (recommendation \
             only, no learning).\n\n",
        );
        md.push_str(&floors);
    }
    let protocols = markdown_protocols(runs);
    if !protocols.is_empty() {
        md.push_str(
            "\n## With and without the history items\n\n\
             The full-catalogue ranking after tuning and of the floors, every item ranked / \
             the items each example's user had before its target left out (the whole known \
             history, not only the prompt's; the target kept: the common protocol of \
             sequential recommendation), from the same scores. Rows marked \"(prompt only)\" \
             come from evaluations written before 2026-12-06, which left out only the items \
             in the prompt.\n\n",
        );
        md.push_str(&protocols);
    }
    let losses = markdown_losses(runs);
    if !losses.is_empty() {
        md.push_str(
            "\n## Losses (nats, before → after tuning)\n\n\
             On the test examples: the target loss (item token and end-of-sequence, the mean \
             that training lowers), the item token's own loss over the whole vocabulary, and \
             the target's cross-entropy among the catalogue's items only, the ranking's own \
             loss: a uniform ranking scores ln(number of items) there, so a catalogue loss \
             above it ranks worse than chance on average however low the target loss is.\n\n",
        );
        md.push_str(&losses);
    }
}
