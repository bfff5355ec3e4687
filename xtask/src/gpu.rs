//! `cargo xtask gpu`: one prepared command for a machine with one NVIDIA GPU, writing
//! everything it measures into one output directory (docs/backends.md).
//!
//! Parts, each timed and recorded (a failing part is recorded and the next one still runs; the
//! command fails at the end if any part failed):
//!
//! 1. `selftest`: `gems selftest --device D`.
//! 2. `model-check`: `gems model check --device D` against flex's reference cross-entropy
//!    (2.4608 nats, within 1e-3) and flex's greedy answer.
//! 3. `parity`: `gems parity --device D`: the same batches, two GEMS steps on the same real
//!    gradients and one evaluation, on D and on flex.
//! 4. `throughput`: `full` and `gems` training steps at the GPU preset's batch on the full
//!    model; median real tokens/s (from metrics.jsonl, first step left out) and peak memory
//!    (GPU memory in use from `nvidia-smi`, polled; resident memory of the process on a CPU
//!    backend).
//! 5. `compare`: gems, gems without null space, galore, full and lora on Amazon Scientific with
//!    as many steps as the measured step time fits in the budget, then `gems report` and a
//!    results table (`results-gpu.md`) labelled with the device and the budget.
//!
//! `--smoke` runs every part at toy size (2 layers, a few steps, small evaluations), so that CI
//! exercises the whole command on flex: `cargo xtask gpu --smoke --device flex`.
//!
//! On a GPU machine without cargo the command runs from a prebuilt bundle (`cargo xtask
//! gpu-bundle`, [`crate::bundle`]): `xtask gpu --gems PATH --model PATH --data-root DIR`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Flex's cross-entropy of the reference sentence (docs/models.md), nats.
const REFERENCE_CROSS_ENTROPY: f64 = 2.4608;
/// The methods of the comparison: label and `gems train` flags. `gems` is the default (input-side
/// null space, strict), `gems-paper` the paper's GEMS (output side, not strict).
const COMPARED: &[(&str, &[&str])] = &[
    ("gems", &["--method", "gems"]),
    ("gems-paper", &paper_gems!()),
    ("gems-no-null-space", &["--method", "gems", "--no-null-space"]),
    ("galore", &["--method", "galore"]),
    ("full", &["--method", "full"]),
    ("lora", &["--method", "lora"]),
];

/// Command-line options.
#[derive(Debug, Clone)]
struct Opts {
    smoke: bool,
    device: String,
    out: PathBuf,
    gems: Option<PathBuf>,
    model: Option<PathBuf>,
    data_root: Option<PathBuf>,
    minutes: f64,
    append_docs: bool,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        smoke: false,
        device: "cuda".into(),
        out: PathBuf::from("runs/gpu"),
        gems: None,
        model: None,
        data_root: None,
        minutes: 8.0,
        append_docs: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value =
            |name: &str| it.next().cloned().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--smoke" => o.smoke = true,
            "--append-docs" => o.append_docs = true,
            "--device" => o.device = value("--device")?,
            "--out" => o.out = value("--out")?.into(),
            "--gems" => o.gems = Some(value("--gems")?.into()),
            "--model" => o.model = Some(value("--model")?.into()),
            "--data-root" => o.data_root = Some(value("--data-root")?.into()),
            "--minutes" => {
                o.minutes = value("--minutes")?.parse().context("--minutes needs a number")?;
            }
            other => bail!(
                "unknown argument `{other}` (usage: cargo xtask gpu [--smoke] [--device cuda|flex|cpu] \
                 [--out DIR] [--gems BIN] [--model GGUF] [--data-root DIR] [--minutes M] [--append-docs])"
            ),
        }
    }
    if !["cuda", "flex", "cpu", "wgpu"].contains(&o.device.as_str()) {
        bail!("--device `{}`: expected cuda, flex, cpu or wgpu", o.device);
    }
    if o.minutes.is_nan() || o.minutes <= 0.0 {
        bail!("--minutes must be positive, not {}", o.minutes);
    }
    Ok(o)
}

/// A part: what it measured (JSON) and a one-line note, from the parts before it.
type PartFn = fn(&Env<'_>, &[Part]) -> Result<(Value, String)>;

/// One part's outcome.
struct Part {
    name: &'static str,
    ok: bool,
    seconds: f64,
    detail: Value,
    note: String,
}

/// `cargo xtask gpu`.
pub fn gpu(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let started = Instant::now();
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    let gems = gems_binary(&o)?;
    eprintln!("xtask gpu: {} on {}, out {}", gems.display(), o.device, o.out.display());
    let env = Env { o: &o, gems: &gems };
    let mut parts: Vec<Part> = Vec::new();
    let steps: [(&'static str, PartFn); 5] = [
        ("selftest", selftest),
        ("model-check", model_check),
        ("parity", parity),
        ("throughput", throughput),
        ("compare", compare),
    ];
    for (name, step) in steps {
        eprintln!("xtask gpu: part {name} ({:.0} s so far)", started.elapsed().as_secs_f64());
        let t = Instant::now();
        let (ok, detail, note) = match step(&env, &parts) {
            Ok((detail, note)) => (true, detail, note),
            Err(e) => (false, Value::Null, format!("{e:#}")),
        };
        let seconds = t.elapsed().as_secs_f64();
        eprintln!(
            "xtask gpu: part {name}: {} in {seconds:.1} s: {note}",
            if ok { "ok" } else { "FAILED" }
        );
        parts.push(Part { name, ok, seconds, detail, note });
        write_summary(&o, &parts, started.elapsed().as_secs_f64())?;
    }
    let failed: Vec<&str> = parts.iter().filter(|p| !p.ok).map(|p| p.name).collect();
    eprintln!(
        "xtask gpu: {:.0} s in all; summary in {}",
        started.elapsed().as_secs_f64(),
        o.out.join("gpu.md").display()
    );
    if !failed.is_empty() {
        bail!("parts failed: {} (see {})", failed.join(", "), o.out.join("gpu.md").display());
    }
    Ok(())
}

/// What every part needs.
struct Env<'a> {
    o: &'a Opts,
    gems: &'a Path,
}

impl Env<'_> {
    /// `gems ARGS` with the shared options, stdout returned, stderr into `OUT/logs/<log>.log`;
    /// with the peak memory polled while it runs.
    fn gems(&self, log: &str, args: &[&str]) -> Result<(String, Option<u64>)> {
        let logs = self.o.out.join("logs");
        std::fs::create_dir_all(&logs)?;
        let log_path = logs.join(format!("{log}.log"));
        let stderr = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = Command::new(self.gems);
        cmd.args(args).stdout(Stdio::piped()).stderr(stderr);
        if let Some(root) = &self.o.data_root {
            cmd.env("GEMS_DATA_DIR", root);
        }
        eprintln!("$ gems {}", args.join(" "));
        let mut child =
            cmd.spawn().with_context(|| format!("could not start {}", self.gems.display()))?;
        let probe = MemoryProbe::start(&self.o.device, child.id());
        let mut stdout = String::new();
        if let Some(mut out) = child.stdout.take() {
            out.read_to_string(&mut stdout)?;
        }
        let status = child.wait()?;
        let peak = probe.finish();
        if !status.success() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            bail!(
                "`gems {}` failed with {status}: {} (log {})",
                args.join(" "),
                tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
                log_path.display()
            );
        }
        Ok((stdout, peak))
    }

    /// `--model` for commands that take one, when given.
    fn model_args(&self) -> Vec<String> {
        match &self.o.model {
            Some(m) => vec!["--model".into(), m.display().to_string()],
            None => Vec::new(),
        }
    }

    /// The model's depth and evaluation sizes: 2 layers and tiny evaluations in smoke mode,
    /// the full model otherwise; every layer trained (the CPU preset, which `parity` starts
    /// from, tunes only the top 4).
    fn size_args(&self) -> Vec<String> {
        let v: &[&str] = if self.o.smoke {
            &["--keep-layers", "2", "--tune-all-layers", "--batch-size", "2", "--grad-accum", "1"]
        } else {
            &["--all-layers", "--tune-all-layers"]
        };
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A configuration file over the GPU preset that sizes the evaluations to the budget
    /// (smoke: tiny), written once into OUT.
    fn budget_config(&self) -> Result<String> {
        let path = self.o.out.join("budget.toml");
        let text = if self.o.smoke {
            "[eval]\nvalid_examples = 16\ntest_examples = 16\nperplexity_tokens = 256\n\
             every = 0\nfloors = false\n\n[null_space]\nmax_tokens = 512\n"
        } else {
            "[eval]\nvalid_examples = 500\ntest_examples = 1000\nperplexity_tokens = 65536\n\n\
             [null_space]\nmax_tokens = 32768\n"
        };
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path.display().to_string())
    }
}

fn selftest(env: &Env<'_>, _: &[Part]) -> Result<(Value, String)> {
    let steps = if env.o.smoke { "2" } else { "6" };
    let (stdout, _) =
        env.gems("selftest", &["selftest", "--device", &env.o.device, "--steps", steps])?;
    let last = stdout.lines().last().unwrap_or_default().to_string();
    Ok((json!({ "stdout": stdout }), last))
}

fn model_check(env: &Env<'_>, _: &[Part]) -> Result<(Value, String)> {
    let mut args =
        vec!["model".to_string(), "check".into(), "--device".into(), env.o.device.clone()];
    args.extend(env.model_args());
    let read = |log: &str, args: &[String]| -> Result<Value> {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (stdout, _) = env.gems(log, &a)?;
        serde_json::from_str(stdout.trim())
            .with_context(|| format!("`gems model check` printed `{stdout}`"))
    };
    let on_device = read("model-check", &args)?;
    let reference = if env.o.device == "flex" {
        on_device.clone()
    } else {
        args[3] = "flex".into();
        read("model-check-flex", &args)?
    };
    std::fs::write(
        env.o.out.join("model-check.json"),
        serde_json::to_string_pretty(&json!({"device": on_device, "flex": reference}))?,
    )?;
    let ce = on_device["cross_entropy"].as_f64().context("no cross_entropy")?;
    let answer = on_device["answer"].as_str().unwrap_or_default();
    let flex_answer = reference["answer"].as_str().unwrap_or_default();
    let ce_ok = (ce - REFERENCE_CROSS_ENTROPY).abs() <= 1e-3;
    let answer_ok = answer == flex_answer;
    let note = format!(
        "cross-entropy {ce:.5} (flex reference {REFERENCE_CROSS_ENTROPY}, {}); answer {answer:?} ({})",
        if ce_ok { "within 1e-3" } else { "OFF by more than 1e-3" },
        if answer_ok { "same as flex" } else { "DIFFERS from flex" }
    );
    if !(ce_ok && answer_ok) {
        bail!(note);
    }
    Ok((json!({"cross_entropy": ce, "answer": answer, "flex_answer": flex_answer}), note))
}

fn parity(env: &Env<'_>, _: &[Part]) -> Result<(Value, String)> {
    let out = env.o.out.join("parity");
    let _ = std::fs::remove_dir_all(&out);
    let out_text = out.display().to_string();
    let mut args: Vec<String> = [
        "parity",
        "--preset",
        "cpu",
        "--method",
        "gems",
        "--device",
        &env.o.device,
        "--out",
        &out_text,
        "--valid-examples",
        if env.o.smoke { "16" } else { "64" },
        "--parity-steps",
        "2",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(env.size_args());
    args.extend(env.model_args());
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (stdout, _) = env.gems("parity", &a)?;
    let report: Value = read_json(&out.join("parity.json"))?;
    std::fs::copy(out.join("parity.json"), env.o.out.join("parity.json"))?;
    let update = report["update_max_rel_diff"].as_f64().unwrap_or(f64::INFINITY);
    let grads = report["gradient_max_rel_diff"].as_f64().unwrap_or(f64::INFINITY);
    let eval = report["eval_max_abs_diff"].as_f64().unwrap_or(f64::INFINITY);
    let note = stdout.lines().collect::<Vec<_>>().join("; ");
    // float32 kernels with another summation order: differences of 1e-3 and below are rounding.
    if !(update <= 1e-2 && grads <= 1e-2) {
        bail!("parity beyond 1e-2: {note}");
    }
    Ok((
        json!({"gradient_max_rel_diff": grads, "update_max_rel_diff": update, "eval_max_abs_diff": eval, "losses": report["losses"]}),
        note,
    ))
}

fn throughput(env: &Env<'_>, _: &[Part]) -> Result<(Value, String)> {
    let steps = if env.o.smoke { "2" } else { "12" };
    let config = env.budget_config()?;
    let mut rows = Vec::new();
    for method in ["full", "gems"] {
        let dir = env.o.out.join("throughput").join(method);
        let _ = std::fs::remove_dir_all(&dir);
        let dir_text = dir.display().to_string();
        let mut args: Vec<String> = [
            "train",
            "--preset",
            "gpu",
            "--config",
            &config,
            "--method",
            method,
            "--steps",
            steps,
            "--device",
            &env.o.device,
            "--out",
            &dir_text,
            "--no-before",
            "--no-perplexity",
            "--eval-every",
            "0",
            "--test-examples",
            "16",
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(env.size_args());
        args.extend(env.model_args());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (_, peak) = env.gems(&format!("throughput-{method}"), &a)?;
        let (tokens_per_s, step_seconds) = median_step(&dir.join("metrics.jsonl"))?;
        rows.push(json!({
            "method": method,
            "median_tokens_per_s": tokens_per_s,
            "median_step_seconds": step_seconds,
            "peak_memory_bytes": peak,
        }));
    }
    let note = rows
        .iter()
        .map(|r| {
            format!(
                "{}: {:.0} tokens/s, {:.3} s/step, peak {}",
                r["method"].as_str().unwrap_or_default(),
                r["median_tokens_per_s"].as_f64().unwrap_or(0.0),
                r["median_step_seconds"].as_f64().unwrap_or(0.0),
                r["peak_memory_bytes"]
                    .as_u64()
                    .map_or("unmeasured".into(), |b| format!("{:.2} GB", b as f64 / 1e9))
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Ok((json!({ "steps": steps, "rows": rows }), note))
}

fn compare(env: &Env<'_>, parts: &[Part]) -> Result<(Value, String)> {
    let steps = compare_steps(env, parts);
    let root = env.o.out.join("compare");
    train_compared(env, &root, steps)?;
    let report_dir = root.join("report");
    let (root_text, report_text) = (root.display().to_string(), report_dir.display().to_string());
    env.gems("report", &["report", &root_text, "--out", &report_text])?;
    let table = std::fs::read_to_string(report_dir.join("report.md"))
        .with_context(|| format!("reading {}", report_dir.join("report.md").display()))?;
    let device = device_name(&env.o.device);
    let fragment = format!(
        "\n## GPU: {device}, {steps} steps per method{}\n\nWritten by `cargo xtask gpu` (docs/backends.md): the GPU preset of `gems train` \
         on the full model, evaluations sized by {}, {steps} optimizer steps per method (as many as the \
         measured step time fitted into a {:.0}-minute budget), seed 0, one run each.\n\n{}\n",
        if env.o.smoke { " (smoke: toy size, not a result)" } else { "" },
        "`budget.toml` (500 validation and 1,000 test examples per task, 65,536 WikiText-2 tokens of perplexity, null space from 32,768 tokens)",
        env.o.minutes,
        demote_headings(&table.replace("](", "](gpu/"))
    );
    std::fs::write(env.o.out.join("results-gpu.md"), &fragment)?;
    if env.o.append_docs {
        let mut doc =
            std::fs::read_to_string("docs/results.md").context("reading docs/results.md")?;
        doc.push_str(&fragment);
        std::fs::write("docs/results.md", doc).context("writing docs/results.md")?;
    }
    Ok((
        json!({"steps": steps, "device": device}),
        format!("{} methods, {steps} steps each; table in results-gpu.md", COMPARED.len()),
    ))
}

/// Optimizer steps per compared method: 2 in a smoke run, else as many as fit (10 to 3000; 20
/// when the throughput part measured no step time).
fn compare_steps(env: &Env<'_>, parts: &[Part]) -> u64 {
    // Steps that fit: the budget left for this part, split over the methods, of which about
    // half goes to training (the rest: loading, null space, evaluations, perplexity).
    let step_seconds = parts
        .iter()
        .find(|p| p.name == "throughput")
        .and_then(|p| p.detail["rows"].as_array().cloned())
        .and_then(|rows| {
            rows.iter().filter_map(|r| r["median_step_seconds"].as_f64()).reduce(f64::max)
        })
        .filter(|s| *s > 0.0);
    let spent: f64 = parts.iter().map(|p| p.seconds).sum();
    let left = (env.o.minutes * 60.0 - spent).max(60.0);
    if env.o.smoke {
        2
    } else {
        let per_method = left / COMPARED.len() as f64 * 0.5;
        step_seconds.map_or(20, |s| ((per_method / s) as u64).clamp(10, 3000))
    }
}

/// Trains every compared method for `steps` steps into `root/<label>`, skipping those already
/// finished (with a `summary.json`).
fn train_compared(env: &Env<'_>, root: &Path, steps: u64) -> Result<()> {
    let config = env.budget_config()?;
    let steps_text = steps.to_string();
    for (label, flags) in COMPARED {
        let dir = root.join(label);
        if dir.join("summary.json").is_file() {
            continue;
        }
        let _ = std::fs::remove_dir_all(&dir);
        let dir_text = dir.display().to_string();
        let mut args: Vec<String> = [
            "train",
            "--preset",
            "gpu",
            "--config",
            &config,
            "--steps",
            &steps_text,
            "--device",
            &env.o.device,
            "--out",
            &dir_text,
            "--label",
            label,
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(flags.iter().map(|s| s.to_string()));
        args.extend(env.size_args());
        args.extend(env.model_args());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        env.gems(&format!("compare-{label}"), &a)?;
    }
    Ok(())
}

/// Every Markdown heading two levels down, to sit under this section's `##` heading.
fn demote_headings(text: &str) -> String {
    text.lines()
        .map(|l| if l.starts_with('#') { format!("##{l}") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The GPU's name and driver from `nvidia-smi`, else the backend's name.
fn device_name(device: &str) -> String {
    if device == "cuda"
        && let Ok(out) = Command::new("nvidia-smi")
            .args(["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
            .output()
        && out.status.success()
    {
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(line) = text.lines().next() {
            return line.trim().to_string();
        }
    }
    match device {
        "flex" => "flex (CPU)".into(),
        other => other.into(),
    }
}

/// Median real tokens/s and step seconds of a run's train lines, the first step left out when
/// there are more (it holds the first refresh and the backend's warm-up).
fn median_step(metrics: &Path) -> Result<(f64, f64)> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .collect();
    let skip = usize::from(lines.len() > 1);
    let mut tokens: Vec<f64> =
        lines.iter().skip(skip).filter_map(|v| v["tokens_per_s"].as_f64()).collect();
    let mut seconds: Vec<f64> =
        lines.iter().skip(skip).filter_map(|v| v["step_seconds"].as_f64()).collect();
    if tokens.is_empty() || seconds.is_empty() {
        bail!("{} has no training steps", metrics.display());
    }
    Ok((median(&mut tokens), median(&mut seconds)))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// `gpu.json` (every part's numbers) and `gpu.md` (a table), rewritten after each part so an
/// interrupted run keeps what it measured.
fn write_summary(o: &Opts, parts: &[Part], seconds: f64) -> Result<()> {
    let json = json!({
        "device": o.device,
        "device_name": device_name(&o.device),
        "smoke": o.smoke,
        "minutes": o.minutes,
        "seconds": seconds,
        "parts": parts.iter().map(|p| json!({
            "name": p.name, "ok": p.ok, "seconds": p.seconds, "detail": p.detail, "note": p.note,
        })).collect::<Vec<_>>(),
    });
    write_file(&o.out.join("gpu.json"), &serde_json::to_string_pretty(&json)?)?;
    let mut md = format!(
        "# cargo xtask gpu: {}{}\n\n| part | result | seconds | what it measured |\n|---|---|---|---|\n",
        device_name(&o.device),
        if o.smoke { " (smoke)" } else { "" }
    );
    for p in parts {
        md.push_str(&format!(
            "| {} | {} | {:.1} | {} |\n",
            p.name,
            if p.ok { "ok" } else { "FAILED" },
            p.seconds,
            p.note.replace('|', "/").replace('\n', " ")
        ));
    }
    md.push_str(&format!("\n{seconds:.0} s in all.\n"));
    write_file(&o.out.join("gpu.md"), &md)
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
fn write_file(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}

/// The `gems` binary: `--gems`, else built here (release with the backend's feature; a debug
/// build for flex smoke runs, which `cargo test` has built already).
fn gems_binary(o: &Opts) -> Result<PathBuf> {
    if let Some(g) = &o.gems {
        if !g.is_file() {
            bail!("--gems {}: no such file", g.display());
        }
        return Ok(g.clone());
    }
    let mut args = vec!["build", "--quiet", "-p", "gems-cli"];
    let release = !(o.smoke && o.device == "flex");
    if release {
        args.push("--release");
    }
    if o.device != "flex" {
        args.extend(["--features", o.device.as_str()]);
    }
    crate::run("cargo", &args)?;
    let path = PathBuf::from(format!("target/{}/gems", if release { "release" } else { "debug" }));
    if !path.is_file() {
        bail!("built gems-cli but found no {}", path.display());
    }
    Ok(path)
}

/// Polls the peak memory of a running command: GPU memory in use (`nvidia-smi`) for cuda, the
/// process's peak resident set (`VmHWM`) otherwise.
struct MemoryProbe {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MemoryProbe {
    fn start(device: &str, pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let gpu = device == "cuda";
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let now = if gpu { gpu_memory_used() } else { process_peak_rss(pid) };
                if let Some(bytes) = now {
                    p.fetch_max(bytes, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        Self { stop, peak, thread: Some(thread) }
    }

    fn finish(mut self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Some(self.peak.load(Ordering::Relaxed)).filter(|b| *b > 0)
    }
}

fn gpu_memory_used() -> Option<u64> {
    let out = Command::new("nvidia-smi")
        .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mib: u64 = text.lines().next()?.trim().parse().ok()?;
    Some(mib * 1024 * 1024)
}

fn process_peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headings_go_two_levels_down() {
        assert_eq!(demote_headings("# a\ntext #1\n## b"), "### a\ntext #1\n#### b");
    }

    #[test]
    fn options_are_checked() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let o = parse(&s(&["--smoke", "--device", "flex", "--minutes", "2"])).unwrap();
        assert!(o.smoke && o.device == "flex" && o.minutes == 2.0);
        assert!(parse(&s(&["--device", "tpu"])).unwrap_err().to_string().contains("tpu"));
        assert!(parse(&s(&["--minutes", "0"])).is_err());
        assert!(parse(&s(&["--bogus"])).unwrap_err().to_string().contains("--bogus"));
    }

    #[test]
    fn the_median_step_leaves_the_first_out() {
        let dir = std::env::temp_dir().join(format!("xtask-gpu-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        std::fs::write(
            &path,
            "{\"kind\":\"train\",\"tokens_per_s\":1.0,\"step_seconds\":9.0}\n\
             {\"kind\":\"valid\",\"tokens_per_s\":50.0}\n\
             {\"kind\":\"train\",\"tokens_per_s\":10.0,\"step_seconds\":2.0}\n\
             {\"kind\":\"train\",\"tokens_per_s\":30.0,\"step_seconds\":1.0}\n\
             {\"kind\":\"train\",\"tokens_per_s\":20.0,\"step_seconds\":3.0}\n",
        )
        .unwrap();
        assert_eq!(median_step(&path).unwrap(), (20.0, 2.0));
        std::fs::write(&path, "{\"kind\":\"valid\"}\n").unwrap();
        assert!(median_step(&path).unwrap_err().to_string().contains("no training steps"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
