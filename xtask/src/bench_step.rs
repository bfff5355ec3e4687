//! `cargo xtask bench-step`: our training step and the PyTorch peer's on the same batches,
//! alternating in one run, with the load average beside every round (docs/benchmarks.md).
//!
//! Each round runs `cargo bench -p gems-benches --bench step` once per method (its first run
//! dumps the model and batches) and `benches/peer/step_torch.py` once on that dump (our AdamW
//! form over the parameters the Rust side trains: the peer of `full`). `--preset` measures the
//! CPU preset as `gems train --preset cpu` trains it (30 layers, top 4 tuned, item rows only,
//! bucketed batches); without it the older shape (`--layers N`, everything trained). A method
//! written `gems+frozen` (with `--preset`) runs the bench's `--frozen-cache` shape: the untied
//! head and the kept states entering the first tuned layer, as `gems train --untie-head
//! --frozen-cache DIR` steps once its rows are kept. The table takes, per side, the median over
//! rounds of each run's median step (the first step of each run left out).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

struct Opts {
    rounds: usize,
    steps: u64,
    layers: usize,
    preset: bool,
    methods: Vec<String>,
    python: String,
    threads: usize,
    out: PathBuf,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        rounds: 3,
        steps: 6,
        layers: 8,
        preset: false,
        methods: vec!["full".into(), "gems".into()],
        python: "python3".into(),
        threads: 2,
        out: PathBuf::from("runs/bench-step"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |n: &str| it.next().cloned().with_context(|| format!("{n} needs a value"));
        match a.as_str() {
            "--rounds" => o.rounds = value("--rounds")?.parse().context("--rounds N")?,
            "--steps" => o.steps = value("--steps")?.parse().context("--steps N")?,
            "--layers" => o.layers = value("--layers")?.parse().context("--layers N")?,
            "--preset" => o.preset = true,
            "--methods" => o.methods = value("--methods")?.split(',').map(String::from).collect(),
            "--python" => o.python = value("--python")?,
            "--threads" => o.threads = value("--threads")?.parse().context("--threads N")?,
            "--out" => o.out = value("--out")?.into(),
            other => bail!(
                "unknown argument `{other}` (usage: cargo xtask bench-step [--rounds 3] [--steps 6] \
                 [--preset | --layers 8] [--methods full,gems,gems+frozen] [--python python3] [--threads 2] [--out DIR])"
            ),
        }
    }
    ensure!(
        o.rounds > 0 && o.steps >= 2,
        "need at least one round and two steps (the first is left out)"
    );
    Ok(o)
}

/// The last JSON line of a command's output that has `"summary": true`.
fn summary_of(stdout: &str) -> Result<Value> {
    stdout
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["summary"] == true)
        .context("no summary line in the output")
}

fn capture(program: &str, args: &[&str]) -> Result<String> {
    eprintln!("$ {program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("could not start `{program}`"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// One side's numbers from one run: tokens/s, step, forward, backward, optimizer, peak, and
/// (Rust only) the step's matmul GFLOP/s over bare GEMM's.
fn row_of(summary: &Value, rust: bool) -> [f64; 7] {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    if rust {
        let m = &summary["median"];
        [
            f(&m["tokens_per_s"]),
            f(&m["total"]),
            f(&m["decoder"]) + f(&m["head"]),
            f(&m["backward"]),
            f(&m["optimizer"]),
            f(&summary["peak_rss_bytes"]),
            f(&summary["matmul_share"]),
        ]
    } else {
        [
            f(&summary["median_tokens_per_s"]),
            f(&summary["median_step_s"]),
            f(&summary["median_forward_s"]),
            f(&summary["median_backward_s"]),
            f(&summary["median_optimizer_s"]),
            f(&summary["peak_rss_bytes"]),
            f64::NAN,
        ]
    }
}

/// `cargo xtask bench-step`.
pub fn bench_step(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    std::fs::create_dir_all(&o.out)?;
    crate::run("cargo", &["bench", "-p", "gems-benches", "--bench", "step", "--no-run"])?;
    // Absolute: `cargo bench` runs the bench binary in the package directory (benches/).
    let out =
        std::fs::canonicalize(&o.out).with_context(|| format!("resolving {}", o.out.display()))?;
    let shape = shape_args(&o);
    let dump =
        out.join(if o.preset { "peer-preset".to_string() } else { format!("peer-{}", o.layers) });
    let (steps, threads) = (o.steps.to_string(), o.threads.to_string());
    let dump_text = dump.display().to_string();
    let mut sides: Vec<(String, Vec<[f64; 7]>)> = o
        .methods
        .iter()
        .map(|m| (side_name(m), Vec::new()))
        .chain(std::iter::once(("PyTorch peer (AdamW, our form)".to_string(), Vec::new())))
        .collect();
    let mut loads = Vec::new();
    for round in 1..=o.rounds {
        for (k, method) in o.methods.iter().enumerate() {
            loads.push(format!("round {round} {method}: {}", load_average()));
            let mut args: Vec<&str> = vec!["bench", "-p", "gems-benches", "--bench", "step", "--"];
            let (name, frozen) = match method.strip_suffix("+frozen") {
                Some(name) => (name, true),
                None => (method.as_str(), false),
            };
            ensure!(!frozen || o.preset, "{method}: kept frozen states need --preset");
            args.extend(["--method", name, "--steps", &steps, "--dump", &dump_text]);
            if frozen {
                args.push("--frozen-cache");
            }
            args.extend(shape.iter().map(String::as_str));
            let stdout = capture("cargo", &args)?;
            std::fs::write(o.out.join(format!("rust-{method}-{round}.jsonl")), &stdout)?;
            sides[k].1.push(row_of(&summary_of(&stdout)?, true));
        }
        loads.push(format!("round {round} peer: {}", load_average()));
        let script = Path::new("benches/peer/step_torch.py").display().to_string();
        let stdout = capture(
            &o.python,
            &[&script, "--dir", &dump_text, "--steps", &steps, "--threads", &threads],
        )?;
        std::fs::write(o.out.join(format!("torch-{round}.jsonl")), &stdout)?;
        let last = sides.len() - 1;
        sides[last].1.push(row_of(&summary_of(&stdout)?, false));
    }
    let table = table(&o, &sides, &loads);
    std::fs::write(o.out.join("table.md"), &table)?;
    println!("{table}");
    Ok(())
}

/// A side's row name: `gems+frozen` is the untied head with the kept frozen states.
fn side_name(method: &str) -> String {
    match method.strip_suffix("+frozen") {
        Some(m) => format!("gems train --method {m} --untie-head --frozen-cache (rows kept)"),
        None => format!("gems train --method {method}"),
    }
}

/// The step bench's arguments that choose what is measured.
fn shape_args(o: &Opts) -> Vec<String> {
    if o.preset { vec!["--preset".into()] } else { vec!["--layers".into(), o.layers.to_string()] }
}

fn table(o: &Opts, sides: &[(String, Vec<[f64; 7]>)], loads: &[String]) -> String {
    let peer = sides.last().map(|s| median(s.1.iter().map(|r| r[0]).collect())).unwrap_or(f64::NAN);
    let shape = if o.preset {
        "The CPU preset (30 layers, top 4 tuned, item rows only, bucketed batches)".to_string()
    } else {
        format!("{} layers, every layer and embedding row trained, unbucketed batches", o.layers)
    };
    let mut t = format!(
        "{shape}; {} steps per run (first left out), {} rounds alternating, {} threads; medians over \
         rounds of each run's median.\n\n| step | real tokens/s | vs PyTorch | step s | forward s | backward s \
         | optimizer s | peak RSS GB | matmul share |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        o.steps, o.rounds, o.threads
    );
    for (name, rows) in sides {
        let col = |i: usize| median(rows.iter().map(|r| r[i]).collect());
        t.push_str(&format!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
            col(0),
            col(0) / peer,
            col(1),
            col(2),
            col(3),
            col(4),
            col(5) / 1e9,
            if col(6).is_finite() { format!("{:.0}%", 100.0 * col(6)) } else { "–".into() }
        ));
    }
    t.push_str("\nLoad average (1, 5, 15 min) before each run:\n\n");
    for l in loads {
        t.push_str(&format!("- {l}\n"));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_are_found_and_read_per_side() {
        let rust = "{\"step\":1}\n{\"summary\":true,\"median\":{\"tokens_per_s\":300.0,\"total\":4.0,\
                    \"decoder\":1.0,\"head\":0.1,\"backward\":2.0,\"optimizer\":0.5},\"peak_rss_bytes\":2e9}\n";
        let s = summary_of(rust).unwrap();
        let row = row_of(&s, true);
        assert_eq!(row[..6], [300.0, 4.0, 1.1, 2.0, 0.5, 2e9]);
        assert!(row[6].is_nan(), "no matmul share in this summary");
        assert!(summary_of("{\"step\":1}\n").is_err());
        assert_eq!(median(vec![3.0, f64::NAN, 1.0, 2.0]), 2.0);
    }
}
