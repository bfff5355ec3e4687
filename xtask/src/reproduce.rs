//! `cargo xtask reproduce`: every method and ablation of GEMS-SPEC §5 with the CPU preset, over
//! several seeds, in chunks that each land. The (seed, variant) pairs run in a fixed order:
//! the variants in tiers by priority, each tier seed by seed ([`TIERS`]), so that every chunk
//! fills the most-read cells first and the main comparison gets its spread across seeds early. With `--budget`, a pair starts only if it is estimated (from the runs already timed)
//! to finish within the budget. Finished runs are never redone, an interrupted one resumes,
//! and docs/results.md is regenerated from every finished run, the missing cells listed.
//!
//! Every run records what decides whether it may share a table (`reproduce.json`: the
//! [`RESULTS_EPOCH`], the preset, the extra flags, the commit and the date); the report refuses
//! runs of another epoch or flags. When the epoch changes, the same command archives the older
//! runs with their page (docs/results-EPOCH.md) and fills the tables again, chunk by chunk.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::run;

/// One configuration of the reproduction: a label and the `gems train` flags that make it,
/// in the order the reproduction runs them (most-read first). Every gems variant names its
/// null space explicitly, so a label means the same run whatever the defaults: `gems` is the
/// paper's GEMS (output-side projectors, not strict), and `gems-input-strict` is today's
/// default (input side, strict), the main job's method.
pub const VARIANTS: &[(&str, &[&str])] = &[
    (
        "gems-input-strict",
        &["--method", "gems", "--null-space-side", "input", "--strict-null-space"],
    ),
    ("gems", &paper_gems!()),
    ("gems-no-null-space", &["--method", "gems", "--no-null-space"]),
    ("full", &["--method", "full"]),
    ("lora", &["--method", "lora"]),
    ("galore", &["--method", "galore"]),
    ("pcgrad", &["--method", "pcgrad"]),
    // The single-task runs are of the default gems (input side, strict).
    ("gems-rec-only", &["--method", "gems", "--tasks", "rec"]),
    ("gems-search-only", &["--method", "gems", "--tasks", "search"]),
    // Step-size controls: the null space also shrinks the update, so these ask how much of its
    // retention a smaller learning rate alone buys (docs/results.md).
    ("gems-lr1.5e-3", &paper_gems!("--lr", "1.5e-3")),
    ("gems-no-null-space-lr1.5e-3", &["--method", "gems", "--no-null-space", "--lr", "1.5e-3"]),
    ("gems-single-subspace", &paper_gems!("--single-subspace")),
    ("gems-complement", &paper_gems!("--complement")),
    ("gems-strict", &["--method", "gems", "--null-space-side", "output", "--strict-null-space"]),
    // The AlphaEdit-style projector (statistics of each layer's inputs) without strict mode.
    ("gems-input", &["--method", "gems", "--null-space-side", "input", "--no-strict-null-space"]),
    ("gems-emb-all", &["--method", "gems", "--embeddings", "all"]),
];

/// The results a run of this code gives: runs of different epochs never share a table. Bump
/// it (to the date) in any commit that changes what the CPU preset trains or measures (the
/// preset, the optimizer, the data, the evaluation); a change that leaves the main job's
/// summary.json identical keeps it. After a bump, the next `cargo xtask reproduce` archives the
/// older epoch's runs and page ([`archive_other_epochs`]) and runs every pair again, and
/// docs/results-notes.md is left off the page until its first line names the new epoch
/// ([`notes_marker`]).
pub const RESULTS_EPOCH: &str = "2026-12-06";

/// The hand-written reading of the reproduction, inserted into docs/results.md after its
/// header (results.md itself is generated).
const RESULTS_NOTES: &str = "docs/results-notes.md";

/// The line by which docs/results-notes.md says which epoch's runs it reads.
fn notes_marker() -> String {
    format!("<!-- results epoch {RESULTS_EPOCH} -->")
}

/// Where the finished runs' records are committed (`docs/results/runs/<label>-seed<N>/`), so
/// that the chunks of a reproduction accumulate across machines: runs/ is not committed.
const RECORDS: &str = "docs/results/runs";

/// The files of a finished run that its report needs (a few hundred kB; the model is not kept).
const RECORD_FILES: [&str; 6] = [
    "summary.json",
    "metrics.jsonl",
    "baselines.json",
    "before.json",
    "config.json",
    "reproduce.json",
];

/// Writes `bytes` to `path` atomically (a reader sees the old file or the new one, never a
/// part): what the reproduction writes into the repository and its run directories.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    gems_io::write_atomic(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Copies `from` to `to` atomically ([`write_file`]).
fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    write_file(to, &bytes)
}

/// Copies `files` that exist from `from` into `to` (created).
fn copy_records(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for f in RECORD_FILES {
        if from.join(f).is_file() {
            copy_file(&from.join(f), &to.join(f))?;
        }
    }
    Ok(())
}

/// Brings the committed records of finished runs into `out` where `out` lacks them (a fresh
/// clone), and copies into `records` (to be committed) those of runs finished in `out` that
/// it lacks.
/// Returns how many runs were restored.
fn sync_records(o: &Options, records: &Path) -> Result<usize> {
    let mut restored = 0;
    for (label, _, seed) in pairs(o) {
        let name = format!("{label}-seed{seed}");
        let (run, kept) = (Path::new(&o.out).join(&name), records.join(&name));
        let run_done = run.join("summary.json").is_file();
        if !run_done && kept.join("summary.json").is_file() && !run.join("checkpoint").exists() {
            copy_records(&kept, &run)?;
            restored += 1;
        } else if run_done && !kept.join("summary.json").is_file() {
            copy_records(&run, &kept)?;
        }
    }
    Ok(restored)
}

/// The estimate of a run's wall time before any run was timed: the preset's run took 10-14
/// minutes on the 2-core machines of 2026-12-06 (docs/training.md).
const FIRST_ESTIMATE_S: f64 = 15.0 * 60.0;

/// The reproduction's options.
struct Options {
    seeds: u64,
    out: String,
    only: Option<Vec<String>>,
    budget_s: Option<f64>,
    extra: Vec<String>,
    refresh_floors: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        seeds: 3,
        out: "runs/reproduce".into(),
        only: None,
        budget_s: None,
        extra: Vec::new(),
        refresh_floors: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seeds" => o.seeds = it.next().context("--seeds needs a number")?.parse()?,
            "--out" => o.out = it.next().context("--out needs a directory")?.clone(),
            "--budget" => o.budget_s = Some(duration(it.next().context("--budget needs a time")?)?),
            "--only" => {
                let labels = it.next().context("--only needs labels")?;
                o.only = Some(labels.split(',').map(String::from).collect());
            }
            "--refresh-floors" => o.refresh_floors = true,
            "--" => o.extra.extend(it.by_ref().cloned()),
            other => bail!("unknown argument `{other}` (see `cargo xtask`)"),
        }
    }
    if let Some(bad) = o.only.iter().flatten().find(|x| !VARIANTS.iter().any(|(l, _)| l == x)) {
        bail!(
            "unknown variant `{bad}`; known: {:?}",
            VARIANTS.iter().map(|v| v.0).collect::<Vec<_>>()
        );
    }
    Ok(o)
}

/// Seconds of a duration written `90m`, `2h`, `1h30m` or `5400s` (a bare number is minutes).
fn duration(text: &str) -> Result<f64> {
    let mut total = 0.0;
    let mut number = String::new();
    for c in text.chars() {
        match c {
            '0'..='9' | '.' => number.push(c),
            'h' | 'm' | 's' => {
                let v: f64 = number.parse().with_context(|| format!("--budget {text}"))?;
                total += v * match c {
                    'h' => 3600.0,
                    'm' => 60.0,
                    _ => 1.0,
                };
                number.clear();
            }
            _ => bail!("--budget {text}: write a time such as 100m, 2h or 1h30m"),
        }
    }
    if !number.is_empty() {
        total += number.parse::<f64>().with_context(|| format!("--budget {text}"))? * 60.0;
    }
    if total.is_nan() || total <= 0.0 {
        bail!("--budget {text}: must be a positive time");
    }
    Ok(total)
}

/// How many of [`VARIANTS`], from the first, form each tier. A tier runs all its seeds before
/// the next one starts, so that the main comparison (today's default, the paper's GEMS,
/// without the null space, full, LoRA, GaLore) has its three seeds, and with them the spread
/// that says which differences are real, before the ablations and controls take machine time.
const TIERS: [usize; 3] = [6, 5, 5];

/// The (variant, seed) pairs in the order they run: tier by tier ([`TIERS`]), within a tier
/// seed by seed, the variants by priority.
fn pairs(o: &Options) -> Vec<(&'static str, &'static [&'static str], u64)> {
    let mut out = Vec::new();
    let mut start = 0;
    for n in TIERS {
        let tier = &VARIANTS[start..(start + n).min(VARIANTS.len())];
        for seed in 0..o.seeds {
            out.extend(tier.iter().map(|&(label, flags)| (label, flags, seed)));
        }
        start += n;
    }
    out.retain(|(label, _, _)| o.only.as_ref().is_none_or(|only| only.iter().any(|x| x == label)));
    out
}

/// What a run of the reproduction records beside its outputs (`reproduce.json`).
fn run_record(o: &Options) -> serde_json::Value {
    serde_json::json!({
        "results_epoch": RESULTS_EPOCH,
        "preset": "cpu",
        "extra_flags": o.extra,
        "commit": commit(),
        "started": date(),
    })
}

fn commit() -> String {
    let out = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = out(&["rev-parse", "--short=10", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        out(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty { format!("{head}-dirty") } else { head }
}

fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The median of the wall times in `{out}/timings.jsonl`, of `label` when it has any, else of
/// every variant, else [`FIRST_ESTIMATE_S`].
fn estimate(out: &str, label: &str) -> f64 {
    let lines = std::fs::read_to_string(format!("{out}/timings.jsonl")).unwrap_or_default();
    let timed: Vec<(String, f64)> = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["label"].as_str()?.to_string(), v["seconds"].as_f64()?)))
        .collect();
    let median = |mut v: Vec<f64>| -> Option<f64> {
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| v[v.len() / 2])
    };
    median(timed.iter().filter(|(l, _)| l == label).map(|(_, s)| *s).collect())
        .or_else(|| median(timed.iter().map(|(_, s)| *s).collect()))
        .unwrap_or(FIRST_ESTIMATE_S)
}

/// `cargo xtask reproduce [--seeds N] [--only LABEL,...] [--budget TIME] [--out DIR] [-- extra
/// train flags]`.
pub fn reproduce(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    run("cargo", &["gems", "model", "fetch"])?;
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out))?;
    for epoch in archive_other_epochs(Path::new(&o.out), Path::new("docs"))? {
        eprintln!(
            "xtask reproduce: the runs of results epoch {epoch} are archived in \
             docs/results-{epoch}.md and docs/results-{epoch}/; this code ({RESULTS_EPOCH}) \
             runs them again"
        );
    }
    let restored = sync_records(&o, Path::new(RECORDS))?;
    if restored > 0 {
        eprintln!("xtask reproduce: {restored} finished runs restored from {RECORDS}");
    }
    if o.refresh_floors {
        refresh_floors(&o)?;
    }
    let started = Instant::now();
    let mut stopped_at = None;
    for (label, flags, seed) in pairs(&o) {
        let dir = format!("{}/{label}-seed{seed}", o.out);
        if Path::new(&dir).join("summary.json").is_file() {
            continue;
        }
        let guess = estimate(&o.out, label);
        if let Some(budget) = o.budget_s
            && started.elapsed().as_secs_f64() + guess > budget
        {
            stopped_at = Some(format!(
                "{label}-seed{seed} (estimated {:.0} min) would not fit the {:.0} min left of the \
                 budget",
                guess / 60.0,
                (budget - started.elapsed().as_secs_f64()).max(0.0) / 60.0
            ));
            break;
        }
        train_one(&o, label, flags, seed, &dir)?;
    }
    if let Some(why) = &stopped_at {
        eprintln!("xtask reproduce: stopped: {why}; run the same command again to go on");
    }
    write_results(&o)
}

/// The results epoch a run directory's `reproduce.json` records, if it has one.
fn epoch_of(dir: &Path) -> Option<String> {
    let record = read_record(dir).ok()?;
    record["results_epoch"].as_str().map(String::from)
}

/// Moves every run of another results epoch out of the way, so that the same command brings
/// the tables to this code's epoch: the committed records (`docs/results/runs/NAME`) to
/// `docs/results-EPOCH/runs/NAME`, the page of that epoch (docs/results.md, when it is of that
/// epoch) to `docs/results-EPOCH.md` with its plots in `docs/results-EPOCH/` and a note that it
/// is archived, and the local run directories (`OUT/NAME`) to `OUT/epoch-EPOCH/NAME`. Those runs
/// then count as missing and run again. Returns the epochs archived.
fn archive_other_epochs(out: &Path, docs: &Path) -> Result<Vec<String>> {
    let mut archived = std::collections::BTreeSet::new();
    let records = docs.join("results/runs");
    archive_runs(&records, &|e| docs.join(format!("results-{e}/runs")), &mut archived)?;
    archive_runs(out, &|e| out.join(format!("epoch-{e}")), &mut archived)?;
    for epoch in &archived {
        archive_page(docs, epoch)?;
    }
    Ok(archived.into_iter().collect())
}

/// Moves each run directory in `root` of another results epoch E into `archive(E)`, adding E to
/// `archived`. A directory without a record (not a run) stays.
fn archive_runs(
    root: &Path,
    archive: &dyn Fn(&str) -> std::path::PathBuf,
    archived: &mut std::collections::BTreeSet<String>,
) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(root) else { return Ok(()) };
    for entry in entries {
        let dir = entry.with_context(|| format!("listing {}", root.display()))?.path();
        let Some(epoch) = epoch_of(&dir).filter(|e| e != RESULTS_EPOCH) else { continue };
        let to = archive(&epoch).join(dir.file_name().unwrap_or_default());
        if to.exists() {
            bail!("{} would replace {}: move one of them away", dir.display(), to.display());
        }
        std::fs::create_dir_all(archive(&epoch))
            .with_context(|| format!("creating {}", archive(&epoch).display()))?;
        std::fs::rename(&dir, &to)
            .with_context(|| format!("moving {} to {}", dir.display(), to.display()))?;
        archived.insert(epoch);
    }
    Ok(())
}

/// Copies docs/results.md, when it is the page of `epoch` and not archived yet, to
/// docs/results-EPOCH.md (its plot links pointing to docs/results-EPOCH/, where its plots are
/// copied), under a note that it is archived.
fn archive_page(docs: &Path, epoch: &str) -> Result<()> {
    let (page, kept) = (docs.join("results.md"), docs.join(format!("results-{epoch}.md")));
    let Ok(text) = std::fs::read_to_string(&page) else { return Ok(()) };
    if kept.exists() || !text.contains(&format!("results epoch {epoch} ")) {
        return Ok(());
    }
    let plots = docs.join(format!("results-{epoch}"));
    if docs.join("results").is_dir() {
        copy_plots(&docs.join("results"), &plots)?;
    }
    let note = format!(
        "> **Archived.** The method comparison of results epoch {epoch}, kept as it was \
         generated, with its plots and run records in `results-{epoch}/`. The current \
         comparison, of results epoch {RESULTS_EPOCH}, is [results.md](results.md).\n\n"
    );
    let body = text.replace("](results/", &format!("](results-{epoch}/"));
    write_file(&kept, (note + &body).as_bytes())
}

/// Runs (or resumes) one pair and appends its wall time to `{out}/timings.jsonl`.
fn train_one(o: &Options, label: &str, flags: &[&str], seed: u64, dir: &str) -> Result<()> {
    let record_path = format!("{dir}/reproduce.json");
    let resuming = Path::new(dir).join("checkpoint").exists();
    if resuming {
        let saved = read_record(Path::new(dir))?;
        if saved["results_epoch"] != RESULTS_EPOCH {
            bail!(
                "{dir} was started by code of results epoch {} (this code: {RESULTS_EPOCH}): \
                 move it away to run it again",
                saved["results_epoch"]
            );
        }
    } else {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {dir}"))?;
        let text = serde_json::to_string_pretty(&run_record(o))?;
        write_file(Path::new(&record_path), text.as_bytes())?;
    }
    let seed_text = seed.to_string();
    let eval_cache = eval_cache(o);
    let mut a: Vec<&str> = vec![
        "gems",
        "train",
        "--preset",
        "cpu",
        "--out",
        dir,
        "--seed",
        &seed_text,
        "--label",
        label,
        "--quiet",
        "--eval-cache",
        &eval_cache,
    ];
    a.extend(flags.iter());
    a.extend(o.extra.iter().map(String::as_str));
    if resuming {
        a.push("--resume");
    }
    let t0 = Instant::now();
    run("cargo", &a)?;
    if Path::new(dir).join("summary.json").is_file() {
        // A finished run's checkpoint is only a resume point (about 650 MB at the preset).
        let _ = std::fs::remove_dir_all(Path::new(dir).join("checkpoint"));
    }
    let line = serde_json::json!({
        "label": label, "seed": seed, "seconds": t0.elapsed().as_secs_f64(),
        "resumed": resuming, "commit": commit(), "finished": date(),
    });
    let path = format!("{}/timings.jsonl", o.out);
    gems_io::append_line(Path::new(&path), &line.to_string())
        .with_context(|| format!("writing {path}"))
}

/// Where the variants of one seed share the untuned model's evaluation and the floors: one
/// cache per results epoch, since its key does not cover the code.
fn eval_cache(o: &Options) -> String {
    format!("{}/eval-cache/{RESULTS_EPOCH}", o.out)
}

/// `--refresh-floors`: every finished run's floors (baselines.json, here and in the committed
/// records) become what this code evaluates on the run's test examples, so that a floor added
/// after the runs (as `successors` was) reaches the tables without training anything again.
/// The floors the run already had must come out equal (their durations aside): otherwise the
/// code evaluates differently, which is a new results epoch, and nothing is replaced. The
/// epoch's cached floors are dropped first and evaluated again once per seed and setting.
fn refresh_floors(o: &Options) -> Result<()> {
    let cache = eval_cache(o);
    if let Ok(entries) = std::fs::read_dir(&cache) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".baselines.json") {
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("removing {}", entry.path().display()))?;
            }
        }
    }
    for (label, _, seed) in pairs(o) {
        let name = format!("{label}-seed{seed}");
        let dir = Path::new(&o.out).join(&name);
        if !dir.join("summary.json").is_file() {
            continue;
        }
        let (old, fresh) = (dir.join("baselines.json"), dir.join("baselines.refresh.json"));
        let (dir_text, fresh_text) = (dir.display().to_string(), fresh.display().to_string());
        run(
            "cargo",
            &[
                "gems",
                "eval",
                &dir_text,
                "--floors",
                "--quiet",
                "--eval-cache",
                &cache,
                "--out",
                &fresh_text,
            ],
        )?;
        let added = added_floors(&old, &fresh)?;
        std::fs::rename(&fresh, &old).with_context(|| format!("replacing {}", old.display()))?;
        copy_file(&old, &Path::new(RECORDS).join(&name).join("baselines.json"))?;
        eprintln!("xtask reproduce: {name}: floors refreshed, added: {added:?}");
    }
    Ok(())
}

/// The floors in `fresh` that `old` lacks, after checking that every floor of `old` (when it
/// exists) is in `fresh` with the same values, its `seconds` aside.
fn added_floors(old: &Path, fresh: &Path) -> Result<Vec<String>> {
    let read = |path: &Path| -> Result<serde_json::Map<String, serde_json::Value>> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut floors: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        for report in floors.values_mut() {
            if let Some(fields) = report.as_object_mut() {
                fields.remove("seconds");
            }
        }
        Ok(floors)
    };
    let fresh_floors = read(fresh)?;
    let old_floors = if old.is_file() { read(old)? } else { serde_json::Map::new() };
    for (name, report) in &old_floors {
        if fresh_floors.get(name) != Some(report) {
            bail!(
                "floor `{name}` of {} evaluates differently with this code ({} has it otherwise \
                 or not at all): that is a new results epoch, not a refresh; nothing replaced",
                old.display(),
                fresh.display()
            );
        }
    }
    Ok(fresh_floors.keys().filter(|k| !old_floors.contains_key(*k)).cloned().collect())
}

fn read_record(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join("reproduce.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("{} has no reproduce.json (a run from before runs recorded it)", dir.display())
    })?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// A finished run's name (`label-seedN`) and its `reproduce.json`.
type Finished = (String, serde_json::Value);

/// The finished runs of the reproduction with their records, refusing any of another results
/// epoch, preset or extra flags than this invocation's; and the pairs not finished.
fn finished_runs(o: &Options) -> Result<(Vec<Finished>, Vec<String>)> {
    let want = run_record(o);
    let (mut done, mut missing, mut foreign) = (Vec::new(), Vec::new(), Vec::new());
    for (label, _, seed) in pairs(o) {
        let name = format!("{label}-seed{seed}");
        let dir = Path::new(&o.out).join(&name);
        if !dir.join("summary.json").is_file() {
            missing.push(name);
            continue;
        }
        let record = read_record(&dir)?;
        let same = ["results_epoch", "preset", "extra_flags"].iter().all(|k| record[k] == want[k]);
        if !same {
            foreign.push(format!(
                "{name} (epoch {}, preset {}, flags {})",
                record["results_epoch"], record["preset"], record["extra_flags"]
            ));
        }
        done.push((name, record));
    }
    if !foreign.is_empty() {
        bail!(
            "these runs in {} are of another results epoch, preset or flags than this code's \
             ({RESULTS_EPOCH}, cpu, {:?}) and cannot share its tables: {}; move them away",
            o.out,
            o.extra,
            foreign.join(", ")
        );
    }
    Ok((done, missing))
}

/// docs/results.md from every finished run: the header, the runs used (commit and date), the
/// missing cells, the notes, then the report of `gems report`.
fn write_results(o: &Options) -> Result<()> {
    sync_records(o, Path::new(RECORDS))?;
    let (done, missing) = finished_runs(o)?;
    if done.is_empty() {
        eprintln!("xtask reproduce: no finished run yet; docs/results.md left as it is");
        return Ok(());
    }
    // Only this reproduction's finished runs go into the report.
    let dirs: Vec<String> = done.iter().map(|(n, _)| format!("{}/{n}", o.out)).collect();
    let report_dir = format!("{}/report", o.out);
    let mut report_args = vec!["gems", "report"];
    report_args.extend(dirs.iter().map(String::as_str));
    report_args.extend(["--out", &report_dir]);
    run("cargo", &report_args)?;
    let report = std::fs::read_to_string(format!("{report_dir}/report.md"))
        .with_context(|| format!("reading {report_dir}/report.md"))?;
    let mut doc = header(o);
    doc.push_str(&format!(
        "Finished: {} of {} runs ({} variants x {} seeds). Each run's commit and start:\n\n",
        done.len(),
        done.len() + missing.len(),
        pairs(o).len() as u64 / o.seeds.max(1),
        o.seeds
    ));
    doc.push_str("| run | commit | started |\n|---|---|---|\n");
    for (name, record) in &done {
        doc.push_str(&format!(
            "| {name} | {} | {} |\n",
            record["commit"].as_str().unwrap_or("?"),
            record["started"].as_str().unwrap_or("?")
        ));
    }
    if !missing.is_empty() {
        doc.push_str(&format!(
            "\n**Missing** (not run yet; rerun the command to add them): {}.\n",
            missing.join(", ")
        ));
    }
    doc.push('\n');
    // What the numbers show is written by a person, in its own file, and placed here when it
    // was written for this epoch's runs.
    if let Ok(notes) = std::fs::read_to_string(RESULTS_NOTES) {
        if notes.contains(&notes_marker()) {
            doc.push_str(&format!("<!-- from {RESULTS_NOTES} -->\n\n{}\n\n", notes.trim_end()));
        } else {
            doc.push_str(&format!(
                "The reading of these runs is not written yet: {RESULTS_NOTES} is of another \
                 results epoch (it says so in its first line, `{}`, when it is of this one).\n\n",
                notes_marker()
            ));
        }
    }
    copy_plots(Path::new(&report_dir), Path::new("docs/results"))?;
    doc.push_str(&report.replace("](", "](results/"));
    write_file(Path::new("docs/results.md"), doc.as_bytes())?;
    eprintln!("xtask reproduce: report in {report_dir}/report.md, docs/results.md updated");
    Ok(())
}

/// The plots travel with the document (runs/ is not committed): every SVG of the report in
/// `report_dir` is copied into `docs`, and an SVG there that the report no longer draws (a plot
/// renamed or dropped) is removed, so the page links only what is current.
fn copy_plots(report_dir: &Path, docs: &Path) -> Result<()> {
    let svgs = |dir: &Path| -> Result<Vec<std::ffi::OsString>> {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
        let mut names = Vec::new();
        for entry in entries {
            let name = entry.with_context(|| format!("listing {}", dir.display()))?.file_name();
            if Path::new(&name).extension().is_some_and(|e| e == "svg") {
                names.push(name);
            }
        }
        Ok(names)
    };
    std::fs::create_dir_all(docs).with_context(|| format!("creating {}", docs.display()))?;
    let drawn = svgs(report_dir)?;
    for name in svgs(docs)?.into_iter().filter(|n| !drawn.contains(n)) {
        std::fs::remove_file(docs.join(&name))
            .with_context(|| format!("removing {}", docs.join(&name).display()))?;
    }
    for name in &drawn {
        copy_file(&report_dir.join(name), &docs.join(name))?;
    }
    Ok(())
}

fn header(o: &Options) -> String {
    let mut doc = format!(
        "# Results\n\nWritten by `cargo xtask reproduce` (do not edit by hand). Every method and \
         ablation of GEMS-SPEC §5 runs with the CPU preset of `gems train` (docs/training.md) on \
         Amazon Scientific, with the same data, steps and seeds, results epoch {RESULTS_EPOCH} \
         (runs of another epoch are refused). Rerun with\n\n```\ncargo xtask reproduce \
         --budget 100m\n```\n\nwhich skips finished runs, resumes an interrupted one, starts a \
         run only if it is estimated to finish within the budget, and rewrites this page. The \
         records of the finished runs (not their models) are committed in `results/runs/`, so \
         the chunks accumulate from one machine to the next. \
         Measurements outside this reproduction, each with its command: \
         [retention.md](retention.md) (embedding policy, strict null space and perplexity on \
         the full 30-layer model), [training.md](training.md) (the preset's choices).\n\n"
    );
    doc.push_str(&format!(
        "Flags added to every run: `{}`\n\n",
        if o.extra.is_empty() { "(none)".to_string() } else { o.extra.join(" ") }
    ));
    doc.push_str(&format!("Seeds per configuration: {}.\n\n", o.seeds));
    if let Some(only) = &o.only {
        doc.push_str(&format!(
            "Variants run (`--only`): {}; the others of `cargo xtask reproduce` were not run for \
             these tables.\n\n",
            only.join(", ")
        ));
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_parse_and_bad_ones_are_refused() {
        assert_eq!(duration("100m").unwrap(), 6000.0);
        assert_eq!(duration("2h").unwrap(), 7200.0);
        assert_eq!(duration("1h30m").unwrap(), 5400.0);
        assert_eq!(duration("90").unwrap(), 5400.0);
        assert_eq!(duration("45s").unwrap(), 45.0);
        for bad in ["", "0m", "two hours", "5d"] {
            assert!(duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pairs_run_tier_by_tier_then_seed_by_seed_with_the_default_first() {
        assert_eq!(TIERS.iter().sum::<usize>(), VARIANTS.len(), "every variant in one tier");
        let o = Options {
            seeds: 2,
            out: String::new(),
            only: None,
            budget_s: None,
            extra: vec![],
            refresh_floors: false,
        };
        let p = pairs(&o);
        assert_eq!(p.len(), 2 * VARIANTS.len());
        assert_eq!((p[0].0, p[0].2), ("gems-input-strict", 0));
        // The first tier's second seed comes before the second tier.
        assert_eq!((p[TIERS[0]].0, p[TIERS[0]].2), ("gems-input-strict", 1));
        assert_eq!((p[2 * TIERS[0]].0, p[2 * TIERS[0]].2), (VARIANTS[TIERS[0]].0, 0));
        let only = Options { only: Some(vec!["full".into()]), ..o };
        assert_eq!(pairs(&only).iter().map(|p| p.2).collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn finished_runs_are_kept_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("runs");
        let records = dir.path().join("records");
        let o = Options {
            seeds: 1,
            out: out.display().to_string(),
            only: Some(vec!["full".into(), "lora".into()]),
            budget_s: None,
            extra: vec![],
            refresh_floors: false,
        };
        // A run finished here is kept (its records, not its model).
        let run = out.join("full-seed0");
        std::fs::create_dir_all(run.join("model")).unwrap();
        for f in ["summary.json", "reproduce.json", "metrics.jsonl"] {
            std::fs::write(run.join(f), f).unwrap();
        }
        assert_eq!(sync_records(&o, &records).unwrap(), 0);
        assert!(records.join("full-seed0/summary.json").is_file());
        assert!(!records.join("full-seed0/model").exists());
        // On a fresh clone (no runs/), it comes back as finished; nothing else is invented.
        std::fs::remove_dir_all(&out).unwrap();
        assert_eq!(sync_records(&o, &records).unwrap(), 1);
        assert_eq!(std::fs::read_to_string(run.join("summary.json")).unwrap(), "summary.json");
        assert!(!out.join("lora-seed0").exists());
    }

    #[test]
    fn a_refresh_adds_floors_and_refuses_changed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (old, fresh) = (dir.path().join("old.json"), dir.path().join("fresh.json"));
        let write = |path: &Path, text: &str| std::fs::write(path, text).unwrap();
        write(&old, r#"{"popular": {"full": {"rec": 0.25}, "seconds": 1.0}}"#);
        write(
            &fresh,
            r#"{"popular": {"full": {"rec": 0.25}, "seconds": 2.5}, "successors": {"full": {}}}"#,
        );
        assert_eq!(added_floors(&old, &fresh).unwrap(), vec!["successors".to_string()]);
        // No floors before: every one is added.
        assert_eq!(added_floors(&dir.path().join("none.json"), &fresh).unwrap().len(), 2);
        write(&fresh, r#"{"popular": {"full": {"rec": 0.5}, "seconds": 1.0}}"#);
        let err = added_floors(&old, &fresh).unwrap_err().to_string();
        assert!(err.contains("`popular`") && err.contains("new results epoch"), "{err}");
        write(&fresh, r#"{"successors": {"full": {}}}"#);
        assert!(added_floors(&old, &fresh).is_err(), "a floor that went missing");
        write(&fresh, "not json");
        assert!(added_floors(&old, &fresh).unwrap_err().to_string().contains("parsing"));
    }

    #[test]
    fn runs_of_another_epoch_are_archived_with_their_page() {
        let dir = tempfile::tempdir().unwrap();
        let (docs, out) = (dir.path().join("docs"), dir.path().join("runs"));
        let run = |root: &Path, name: &str, epoch: &str| {
            std::fs::create_dir_all(root.join(name)).unwrap();
            let record = format!(r#"{{"results_epoch": "{epoch}"}}"#);
            std::fs::write(root.join(name).join("reproduce.json"), record).unwrap();
        };
        run(&docs.join("results/runs"), "a-seed0", "old");
        run(&docs.join("results/runs"), "b-seed0", RESULTS_EPOCH);
        run(&out, "a-seed0", "old");
        run(&out, "c-seed0", RESULTS_EPOCH);
        std::fs::create_dir_all(out.join("eval-cache")).unwrap();
        std::fs::write(docs.join("results/x.svg"), "<svg/>").unwrap();
        let page = "# Results\n\nresults epoch old (runs of another epoch are refused)\n\n\
                    ![x](results/x.svg)\n";
        std::fs::write(docs.join("results.md"), page).unwrap();

        assert_eq!(archive_other_epochs(&out, &docs).unwrap(), vec!["old".to_string()]);
        assert!(docs.join("results-old/runs/a-seed0/reproduce.json").is_file());
        assert!(!docs.join("results/runs/a-seed0").exists());
        assert!(docs.join("results/runs/b-seed0").is_dir() && out.join("c-seed0").is_dir());
        assert!(out.join("epoch-old/a-seed0").is_dir() && !out.join("a-seed0").exists());
        assert!(out.join("eval-cache").is_dir(), "not a run: left alone");
        let kept = std::fs::read_to_string(docs.join("results-old.md")).unwrap();
        assert!(kept.starts_with("> **Archived.**") && kept.contains("](results-old/x.svg)"));
        assert!(docs.join("results-old/x.svg").is_file());
        assert_eq!(std::fs::read_to_string(docs.join("results.md")).unwrap(), page);
        // Nothing left to archive; a clash is refused rather than overwritten.
        assert!(archive_other_epochs(&out, &docs).unwrap().is_empty());
        run(&out, "a-seed0", "old");
        let err = archive_other_epochs(&out, &docs).unwrap_err().to_string();
        assert!(err.contains("would replace"), "{err}");
    }

    #[test]
    fn plots_are_copied_and_stale_ones_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (report, docs) = (dir.path().join("report"), dir.path().join("docs"));
        std::fs::create_dir_all(&report).unwrap();
        std::fs::create_dir_all(docs.join("runs")).unwrap();
        for (d, name) in [(&report, "fit.svg"), (&report, "report.md"), (&docs, "old.svg")] {
            std::fs::write(d.join(name), name).unwrap();
        }
        std::fs::write(docs.join("fit.svg"), "stale").unwrap();
        copy_plots(&report, &docs).unwrap();
        assert_eq!(std::fs::read_to_string(docs.join("fit.svg")).unwrap(), "fit.svg");
        assert!(!docs.join("old.svg").exists() && !docs.join("report.md").exists());
        assert!(docs.join("runs").is_dir(), "the records are left alone");
    }

    #[test]
    fn estimates_come_from_the_timed_runs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().to_str().unwrap();
        assert_eq!(estimate(out, "full"), FIRST_ESTIMATE_S);
        let lines = "{\"label\":\"full\",\"seconds\":600}\n{\"label\":\"lora\",\"seconds\":300}\n\
                     {\"label\":\"full\",\"seconds\":700}\n";
        std::fs::write(dir.path().join("timings.jsonl"), lines).unwrap();
        assert_eq!(estimate(out, "full"), 700.0);
        assert_eq!(estimate(out, "pcgrad"), 600.0);
    }
}
