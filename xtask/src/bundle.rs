//! `cargo xtask gpu-bundle`: everything `cargo xtask gpu` needs on a GPU machine that has no
//! internet, no cargo and receives at most 64 MiB per call (docs/backends.md).
//!
//! Built here, on a CPU machine:
//! - the `gems` binary with `--features cuda,cpu` (the build `cargo xtask llvm` enables; cpu
//!   lets the GPU machine's cores try cubecl-cpu too) and the `xtask` binary, release, stripped and
//!   xz-compressed;
//! - `libdevice.10.bc` from the `nvidia-nvvm` wheel (cubecl's NVPTX path links it for math
//!   functions; used only when the machine's CUDA toolkit has none);
//! - the datasets the run reads (Amazon Scientific, WikiText-2);
//! - SmolLM2-135M-Instruct (98 MB, more than one call carries) cut into 16 MiB chunks;
//! - `run.sh`, which checks and reassembles all of it and runs `xtask gpu`.
//!
//! The files are packed into numbered folders `.gpu/1`, `.gpu/2`, ..., each small enough for
//! one call beside the working tree. Calls 1..n-1 only carry their folder; the last call
//! carries the last folder and runs `bash .gpu/1/run.sh`. Carried folders stay on a warm
//! machine between calls, and `run.sh` says which part is missing when one did not arrive.
//! `.gpu/` is ignored by git (.gitignore).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// Most bytes one folder holds: the 64 MiB per call less room for the working tree.
const FOLDER_BYTES: u64 = 56 * 1024 * 1024;
/// Model chunk size.
const CHUNK_BYTES: usize = 16 * 1024 * 1024;
/// The wheel that carries libdevice, pinned (PyPI, 2026-12-01).
const NVVM_WHEEL: (&str, &str) =
    ("nvidia-nvvm==13.5.37", "c41bfa362e407405163f103c2229f0765f8cc2ed7d148b754dc77f228bf7e070");
/// Datasets the GPU run reads, under the data root.
const DATASETS: &[&str] = &["amazon_scientific", "wikitext2_general_text"];

/// `cargo xtask gpu-bundle [--out DIR] [--data-root DIR] [--model GGUF]`.
pub fn bundle(args: &[String]) -> Result<()> {
    let mut out = PathBuf::from(".gpu");
    let mut data_root = PathBuf::from("../shared/data");
    let mut model: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |n: &str| it.next().cloned().with_context(|| format!("{n} needs a value"));
        match a.as_str() {
            "--out" => out = value("--out")?.into(),
            "--data-root" => data_root = value("--data-root")?.into(),
            "--model" => model = Some(value("--model")?.into()),
            other => bail!(
                "unknown argument `{other}` (usage: cargo xtask gpu-bundle [--out DIR] \
                 [--data-root DIR] [--model GGUF])"
            ),
        }
    }
    let started = std::time::Instant::now();
    crate::llvm::llvm(&[])?;
    crate::run("cargo", &["build", "--release", "-p", "gems-cli", "--features", "cuda,cpu"])?;
    crate::run("cargo", &["build", "--release", "-p", "xtask"])?;
    let model = match model {
        Some(m) => m,
        None => model_in_cache()?,
    };
    let staging = out.with_extension("partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let files = staging.join("files");
    std::fs::create_dir_all(&files)?;
    for bin in ["gems", "xtask"] {
        compress_binary(
            &PathBuf::from(format!("target/release/{bin}")),
            &files.join(format!("{bin}.xz")),
        )?;
    }
    for set in DATASETS {
        copy_dir(&data_root.join(set), &files.join("data").join(set))?;
    }
    libdevice(&staging, &files.join("cuda/nvvm/libdevice/libdevice.10.bc"))?;
    let chunks = split_model(&model, &files)?;
    let folders = pack(&files, &staging)?;
    std::fs::write(staging.join("1/run.sh"), run_script(folders, chunks))?;
    std::fs::remove_dir_all(&files)?;
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    std::fs::rename(&staging, &out)?;
    eprintln!(
        "xtask gpu-bundle: {} folders in {} ({:.0} s):",
        folders,
        out.display(),
        started.elapsed().as_secs_f64()
    );
    for k in 1..=folders {
        let bytes = dir_bytes(&out.join(k.to_string()))?;
        eprintln!("  {}/{k}: {:.1} MiB", out.display(), bytes as f64 / 1048576.0);
    }
    eprintln!(
        "calls: {}then the last carries `{}/{folders}` and runs `bash {}/1/run.sh` (docs/backends.md)",
        (1..folders)
            .map(|k| format!("carry `{}/{k}` (command `true`), ", out.display()))
            .collect::<String>(),
        out.display(),
        out.display()
    );
    Ok(())
}

/// `cargo gems model fetch` (idempotent, checksummed) and the path it prints.
fn model_in_cache() -> Result<PathBuf> {
    let out = Command::new("cargo").args(["gems", "model", "fetch"]).output()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        out.status.success() && Path::new(&path).is_file(),
        "`cargo gems model fetch` gave no model path"
    );
    Ok(PathBuf::from(path))
}

fn compress_binary(bin: &Path, out: &Path) -> Result<()> {
    ensure!(bin.is_file(), "{} was not built", bin.display());
    let stripped = out.with_extension("stripped");
    crate::run("strip", &["-o", &stripped.display().to_string(), &bin.display().to_string()])?;
    crate::run("xz", &["-6", "-T2", "-f", &stripped.display().to_string()])?;
    std::fs::rename(stripped.with_extension("stripped.xz"), out)?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// libdevice.10.bc out of the pinned nvidia-nvvm wheel.
fn libdevice(staging: &Path, out: &Path) -> Result<()> {
    let wheels = staging.join("wheels");
    std::fs::create_dir_all(&wheels)?;
    let wheels_text = wheels.display().to_string();
    crate::run(
        "python3",
        &[
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            "manylinux_2_12_x86_64",
            "--platform",
            "manylinux2010_x86_64",
            "--python-version",
            "3.11",
            "-d",
            &wheels_text,
            NVVM_WHEEL.0,
        ],
    )?;
    let wheel = std::fs::read_dir(&wheels)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no nvidia-nvvm wheel")?;
    let sha = Command::new("sha256sum").arg(&wheel).output()?;
    let sha = String::from_utf8_lossy(&sha.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    ensure!(sha == NVVM_WHEEL.1, "{} has sha256 {sha}, expected {}", wheel.display(), NVVM_WHEEL.1);
    std::fs::create_dir_all(out.parent().context("no parent")?)?;
    let script = "import sys, zipfile\nz = zipfile.ZipFile(sys.argv[1])\nname = [n for n in z.namelist() if n.endswith('nvvm/libdevice/libdevice.10.bc')][0]\nopen(sys.argv[2], 'wb').write(z.read(name))\n";
    crate::run(
        "python3",
        &["-c", script, &wheel.display().to_string(), &out.display().to_string()],
    )?;
    std::fs::remove_dir_all(&wheels)?;
    Ok(())
}

/// Cuts the model into `model.NN` chunks and writes `model.sha256` (of the whole file).
fn split_model(model: &Path, files: &Path) -> Result<usize> {
    let bytes = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
    let sha = Command::new("sha256sum").arg(model).output()?;
    let sha = String::from_utf8_lossy(&sha.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    std::fs::write(files.join("model.sha256"), format!("{sha}\n"))?;
    let chunks: Vec<&[u8]> = bytes.chunks(CHUNK_BYTES).collect();
    for (k, chunk) in chunks.iter().enumerate() {
        std::fs::write(files.join(format!("model.{k:02}")), chunk)?;
    }
    Ok(chunks.len())
}

/// Moves the files into numbered folders of at most [`FOLDER_BYTES`]: folder 1 gets the
/// binaries, libdevice and data first (run.sh lives there), then the model chunks fill up.
fn pack(files: &Path, staging: &Path) -> Result<usize> {
    let mut items: Vec<(PathBuf, u64)> = Vec::new();
    for entry in std::fs::read_dir(files)? {
        let entry = entry?;
        let path = entry.path();
        let bytes = if path.is_dir() { dir_bytes(&path)? } else { entry.metadata()?.len() };
        items.push((path, bytes));
    }
    // Everything but the model chunks first, then the chunks in order.
    items.sort_by_key(|(p, _)| {
        let name = p.file_name().unwrap_or_default().to_string_lossy().to_string();
        (name.starts_with("model.") && name != "model.sha256", name)
    });
    let mut folder = 1usize;
    let mut used = 0u64;
    for (path, bytes) in items {
        ensure!(bytes <= FOLDER_BYTES, "{} ({bytes} bytes) does not fit one call", path.display());
        if used + bytes > FOLDER_BYTES {
            folder += 1;
            used = 0;
        }
        let dest = staging.join(folder.to_string());
        std::fs::create_dir_all(&dest)?;
        std::fs::rename(&path, dest.join(path.file_name().context("no name")?))?;
        used += bytes;
    }
    Ok(folder)
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        total += if entry.file_type()?.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            entry.metadata()?.len()
        };
    }
    Ok(total)
}

/// The script the last call runs, from the repository root on the GPU machine.
fn run_script(folders: usize, chunks: usize) -> String {
    format!(
        r#"#!/usr/bin/env bash
# Written by `cargo xtask gpu-bundle`: reassembles the bundle in .gpu/1..{folders} and runs
# `xtask gpu` on the GPU. Output: $OUT (or ./gpu-out) gets gpu.md, gpu.json, results-gpu.md,
# parity.json, model-check.json and gpu-all.tar.gz (every log, metrics and summary).
set -euo pipefail
cd "$(dirname "$0")/../.."
for k in $(seq 1 {folders}); do
  [ -d .gpu/$k ] || {{ echo "bundle part .gpu/$k is missing: carry it in an earlier call (docs/backends.md)"; exit 1; }}
done
work=/tmp/gems-gpu
mkdir -p "$work"
unxz() {{ if command -v xz >/dev/null; then xz -dc "$1"; else python3 -c 'import lzma,sys,shutil; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$1"; fi; }}
for bin in gems xtask; do
  src=$(ls .gpu/*/$bin.xz | head -1)
  unxz "$src" > "$work/$bin"; chmod +x "$work/$bin"
done
cat $(for k in $(seq 0 {last}); do ls .gpu/*/model.$(printf %02d $k); done) > "$work/model.gguf"
want=$(cat .gpu/*/model.sha256 | head -1)
got=$(sha256sum "$work/model.gguf" | cut -d' ' -f1)
[ "$want" = "$got" ] || {{ echo "model.gguf sha256 $got, expected $want"; exit 1; }}
data=$(dirname $(ls -d .gpu/*/data/amazon_scientific))
if ! ls /usr/local/cuda/nvvm/libdevice/libdevice.10.bc >/dev/null 2>&1 && [ -z "${{CUDA_PATH:-}}" ]; then
  export CUDA_PATH=$(cd $(dirname $(ls .gpu/*/cuda/nvvm/libdevice/libdevice.10.bc))/../.. && pwd)
  echo "no CUDA toolkit libdevice: CUDA_PATH=$CUDA_PATH (the bundle's)"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out=${{OUT:-$PWD/gpu-out}}
mkdir -p "$out"
status=0
# Stop a little before the device call's own limit, so the results below are still copied back.
timeout "${{GEMS_GPU_SECONDS:-540}}" "$work/xtask" gpu --gems "$work/gems" --model "$work/model.gguf" \
  --data-root "$data" --out "$work/out" --device cuda "$@" || status=$?
for f in gpu.md gpu.json results-gpu.md parity.json model-check.json; do
  [ -f "$work/out/$f" ] && cp "$work/out/$f" "$out/"
done
# Text only (logs, metrics, summaries, reports, plots): models, checkpoints and the null-space
# cache stay behind (one file back may hold 16 MiB).
(cd "$work" && find out -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.log' \
  -o -name '*.svg' -o -name '*.toml' \) -not -path '*/model/*' -not -path '*/checkpoint/*' \
  -not -path '*/nullspace-cache/*' -print0 | tar czf "$out/gpu-all.tar.gz" --null -T -)
exit $status
"#,
        last = chunks - 1
    )
}
