//! Atomic files and directories, and the trainer's own resumable state.
//!
//! A file is written to `name.tmp` and renamed. A directory is written to `name.tmp/`, then
//! the old `name/` is renamed to `name.old/`, the new one into place, and the old one removed:
//! at every instant either `name/` or `name.old/` holds a complete copy, so a crash while
//! saving never destroys the previous checkpoint. [`resolve_dir`] finds whichever survives.
//! Before the renames every file is flushed to disk (fsync) and listed with its size and
//! SHA-256 in `MANIFEST.json`; [`verify_dir`] checks a directory against it, so a damaged or
//! tampered checkpoint is refused on resume instead of loading silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Writes `bytes` to `path` atomically (temporary file in the same directory, then rename).
///
/// # Errors
/// I/O failures, naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = sibling(path, "tmp");
    std::fs::write(&tmp, bytes).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

/// Writes `value` as pretty JSON to `path` atomically.
///
/// # Errors
/// I/O failures, naming the file.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| TrainError::format(path, e.to_string()))?;
    write_atomic(path, text.as_bytes())
}

/// Reads JSON from `path`, naming the file in every error.
///
/// # Errors
/// Missing or malformed file.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| TrainError::format(path, e.to_string()))
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{suffix}"));
    path.with_file_name(name)
}

/// Replaces the directory `dir` with one written by `write` (given the temporary path),
/// keeping a complete copy on disk at every instant. The new directory is sealed (every file
/// fsynced and listed in [`MANIFEST`]) before it is renamed into place; when `write` fails
/// (a full disk, say), the partial copy is removed and the previous `dir` stays as it was.
///
/// # Errors
/// `write`'s error, or I/O failures naming the directory.
pub fn replace_dir(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = sibling(dir, "tmp");
    let old = sibling(dir, "old");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    if let Err(e) = write(&tmp).and_then(|()| seal_dir(&tmp)) {
        // Best effort: the partial copy must not hold the disk space a retry needs.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| TrainError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| TrainError::io(dir, e))?;
    sync_parent(dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
    }
    Ok(())
}

/// The file in every directory written by [`replace_dir`] that lists the others.
pub const MANIFEST: &str = "MANIFEST.json";

/// One file of a sealed directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256, lowercase hex.
    pub sha256: String,
}

/// Every file below `dir` (relative paths with `/`, sorted), except the manifest itself.
fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let here = dir.join(&rel);
        for entry in std::fs::read_dir(&here).map_err(|e| TrainError::io(&here, e))? {
            let entry = entry.map_err(|e| TrainError::io(&here, e))?;
            let name = rel.join(entry.file_name());
            let kind = entry.file_type().map_err(|e| TrainError::io(entry.path(), e))?;
            if kind.is_dir() {
                stack.push(name);
            } else if name != Path::new(MANIFEST) {
                out.push(name.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Size and SHA-256 of one file, read in blocks.
fn hash_file(path: &Path) -> Result<ManifestEntry> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| TrainError::io(path, e))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| TrainError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    let sha256 = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(ManifestEntry { bytes, sha256 })
}

/// Flushes every file of `dir` to disk, writes the manifest, and flushes the directories.
fn seal_dir(dir: &Path) -> Result<()> {
    let mut manifest = BTreeMap::new();
    for rel in list_files(dir)? {
        let path = dir.join(&rel);
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| TrainError::io(&path, e))?;
        manifest.insert(rel, hash_file(&path)?);
    }
    let path = dir.join(MANIFEST);
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| TrainError::format(&path, e.to_string()))?;
    let mut f = std::fs::File::create(&path).map_err(|e| TrainError::io(&path, e))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| TrainError::io(&path, e))?;
    f.sync_all().map_err(|e| TrainError::io(&path, e))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Directories can be opened and fsynced on Unix; elsewhere this is a no-op.
    #[cfg(unix)]
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| TrainError::io(dir, e))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn sync_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => Ok(()),
    }
}

/// Checks `dir` against its [`MANIFEST`]: every listed file present with its size and
/// SHA-256, and no file that the manifest does not list.
///
/// # Errors
/// A missing or unreadable manifest, or the first file that does not match, named.
pub fn verify_dir(dir: &Path) -> Result<()> {
    let path = dir.join(MANIFEST);
    if !path.is_file() {
        return Err(TrainError::format(
            dir,
            format!(
                "no {MANIFEST}: not a complete directory written by gems (damaged, or from an older version)"
            ),
        ));
    }
    let manifest: BTreeMap<String, ManifestEntry> = read_json(&path)?;
    let present = list_files(dir)?;
    if let Some(extra) = present.iter().find(|f| !manifest.contains_key(*f)) {
        return Err(TrainError::format(dir.join(extra), format!("not listed in {MANIFEST}")));
    }
    for (rel, want) in &manifest {
        let file = dir.join(rel);
        if !file.is_file() {
            return Err(TrainError::format(&file, format!("listed in {MANIFEST} but missing")));
        }
        let got = hash_file(&file)?;
        if got != *want {
            return Err(TrainError::format(
                &file,
                format!(
                    "does not match {MANIFEST} ({} bytes, sha256 {}; expected {} bytes, sha256 {}): \
                     the file was changed or damaged after it was written",
                    got.bytes, got.sha256, want.bytes, want.sha256
                ),
            ));
        }
    }
    Ok(())
}

/// The complete copy of `dir` that survives a crash during [`replace_dir`]: `dir` itself, or
/// `dir.old` when the crash hit between the two renames.
pub fn resolve_dir(dir: &Path) -> Option<PathBuf> {
    if dir.is_dir() {
        return Some(dir.to_path_buf());
    }
    let old = sibling(dir, "old");
    old.is_dir().then_some(old)
}

/// Position of one task's data stream: the epoch and the index within its permutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    /// Passes completed over the task's training samples.
    pub epoch: u64,
    /// Next index within the current epoch's permutation.
    pub index: usize,
}

/// Everything besides model and optimizer that a resumed run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done (applied or skipped).
    pub step: u64,
    /// Data cursors by task name.
    pub cursors: BTreeMap<String, Cursor>,
    /// Best validation value and its step.
    pub best: Option<(u64, f64)>,
    /// Validations since the best one.
    pub bad_validations: u32,
    /// Whether early stopping ended training.
    pub stopped_early: bool,
    /// Seconds spent in training steps so far (all processes).
    pub train_seconds: f64,
    /// Seconds of every step so far.
    pub step_seconds: Vec<f64>,
    /// Consecutive skipped (non-finite) steps.
    pub consecutive_skips: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacing_a_directory_keeps_a_complete_copy() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("checkpoint");
        replace_dir(&dir, |d| write_atomic(&d.join("a"), b"1")).unwrap();
        // A failing writer leaves the previous copy untouched.
        let err = replace_dir(&dir, |_| Err(TrainError::Training("disk full".into())));
        assert!(err.is_err());
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"1");
        replace_dir(&dir, |d| write_atomic(&d.join("a"), b"2")).unwrap();
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"2");
        // A crash between the renames leaves `checkpoint.old`, which is found.
        std::fs::rename(&dir, root.path().join("checkpoint.old")).unwrap();
        assert_eq!(resolve_dir(&dir).unwrap(), root.path().join("checkpoint.old"));
    }

    #[test]
    fn a_failed_write_leaves_no_partial_copy() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("checkpoint");
        let err = replace_dir(&dir, |d| {
            write_atomic(&d.join("half"), b"x")?;
            Err(TrainError::Training("No space left on device".into()))
        });
        assert!(err.is_err());
        assert!(!root.path().join("checkpoint.tmp").exists(), "the partial copy is removed");
        assert!(!dir.exists());
    }

    #[test]
    fn the_manifest_catches_changed_missing_and_extra_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("checkpoint");
        replace_dir(&dir, |d| {
            write_atomic(&d.join("a.bin"), &[7u8; 4096])?;
            std::fs::create_dir_all(d.join("sub")).map_err(|e| TrainError::io(d, e))?;
            write_atomic(&d.join("sub/b.json"), b"{}")
        })
        .unwrap();
        verify_dir(&dir).unwrap();
        let manifest: BTreeMap<String, ManifestEntry> = read_json(&dir.join(MANIFEST)).unwrap();
        assert_eq!(manifest.keys().collect::<Vec<_>>(), ["a.bin", "sub/b.json"]);
        assert_eq!(manifest["a.bin"].bytes, 4096);

        // One flipped bit.
        let mut bytes = std::fs::read(dir.join("a.bin")).unwrap();
        bytes[100] ^= 1;
        std::fs::write(dir.join("a.bin"), &bytes).unwrap();
        let err = verify_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("a.bin") && err.contains("does not match"), "{err}");
        bytes[100] ^= 1;
        std::fs::write(dir.join("a.bin"), &bytes).unwrap();
        verify_dir(&dir).unwrap();
        // A file the manifest does not list, then a listed file missing.
        std::fs::write(dir.join("stray"), b"").unwrap();
        assert!(verify_dir(&dir).unwrap_err().to_string().contains("not listed"));
        std::fs::remove_file(dir.join("stray")).unwrap();
        std::fs::remove_file(dir.join("sub/b.json")).unwrap();
        assert!(verify_dir(&dir).unwrap_err().to_string().contains("missing"));
        // No manifest at all.
        std::fs::remove_file(dir.join(MANIFEST)).unwrap();
        assert!(verify_dir(&dir).unwrap_err().to_string().contains("no MANIFEST.json"));
    }
}
