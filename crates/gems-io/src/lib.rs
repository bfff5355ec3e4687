//! Crash-safe files and directories, the one implementation every gems crate uses.
//!
//! - [`write_atomic`]: a file is written to `name.tmp`, flushed to disk (fsync), renamed over
//!   `name`, and the directory entry flushed: a reader sees the old file or the new one, never
//!   a part of either.
//! - [`replace_dir`]: a whole directory is written to `name.tmp/`, every file fsynced and listed
//!   with its size and SHA-256 in `checksums.json`; then the old `name/` is renamed to
//!   `name.old/`, the new one into place, and the old one removed. At every instant either
//!   `name/` or `name.old/` holds a complete copy, which [`resolve_dir`] finds. A failed write
//!   (a full disk) removes its partial copy and leaves `name/` as it was.
//! - [`verify_dir`]: checks a directory against its manifest, so a damaged, tampered or mixed
//!   directory is refused instead of read silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What went wrong, always with the path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing failed.
    #[error("{path}: {cause}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error (shown in the message, so not also a `source()`).
        cause: std::io::Error,
    },
    /// A text file is not well formed at one line (truncated JSON, a bad CSV cell, a missing
    /// field...).
    #[error("{path}:{line}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A directory does not match its manifest, or a manifest is unreadable.
    #[error("{path}: {detail}")]
    Corrupt {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

impl Error {
    /// Reading or writing `path` failed with `cause`: the file error every crate of the
    /// workspace wraps as it is.
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Self::Io { path: path.into(), cause }
    }
    /// `path` is not well formed at 1-based `line`.
    pub fn malformed(path: impl Into<PathBuf>, line: usize, message: impl Into<String>) -> Self {
        Self::Malformed { path: path.into(), line, message: message.into() }
    }
    /// `path` is not what it should be (`detail` says how).
    pub fn corrupt(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        Self::Corrupt { path: path.into(), detail: detail.into() }
    }
}

/// This crate's result.
pub type Result<T> = std::result::Result<T, Error>;

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{suffix}"));
    path.with_file_name(name)
}

/// Writes `bytes` to `path` atomically and durably (temporary sibling, fsync, rename, fsync of
/// the directory). A failed write removes the temporary file.
///
/// # Errors
/// I/O failures, naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] of what `write` writes, streamed through a buffer (for files too large
/// to hold twice in memory).
///
/// # Errors
/// I/O failures, naming the file.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<()> {
    use std::io::Write;
    let tmp = sibling(path, "tmp");
    let written = std::fs::File::create(&tmp)
        .and_then(|f| {
            let mut w = std::io::BufWriter::new(f);
            write(&mut w)?;
            w.flush()?;
            w.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()
        })
        .map_err(|e| Error::io(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path)
}

/// Appends `line` and a newline to the text file `path` (created if missing) in one write:
/// the log files of a run (`metrics.jsonl`, `conflict.jsonl`), whose torn last line after a
/// crash the reader drops.
///
/// # Errors
/// The file cannot be opened or written, naming it.
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    let mut text = String::with_capacity(line.len() + 1);
    text.push_str(line);
    text.push('\n');
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    file.write_all(text.as_bytes()).map_err(|e| Error::io(path, e))
}

/// Replaces the directory `dir` with one written by `write` (given the temporary path),
/// keeping a complete copy on disk at every instant. The new directory is sealed (every file
/// fsynced and listed in [`MANIFEST`]) before it is renamed into place; when `write` fails
/// (a full disk, say), the partial copy is removed and the previous `dir` stays as it was.
///
/// # Errors
/// `dir` is a file (refused before anything is written); `write`'s error, or I/O failures
/// naming the directory.
pub fn replace_dir<E: From<Error>>(
    dir: &Path,
    write: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    if dir.exists() && !dir.is_dir() {
        // Checked before anything is written or moved: the file stays as it was.
        return Err(Error::corrupt(
            dir,
            "exists and is not a directory; choose another path or remove the file",
        )
        .into());
    }
    let tmp = sibling(dir, "tmp");
    let old = sibling(dir, "old");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = write(&tmp).and_then(|()| seal_dir(&tmp).map_err(E::from)) {
        // Best effort: the partial copy must not hold the disk space a retry needs.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    sync_parent(dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// The file in every directory written by [`replace_dir`] that lists the others.
pub const MANIFEST: &str = "checksums.json";

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
        for entry in std::fs::read_dir(&here).map_err(|e| Error::io(&here, e))? {
            let entry = entry.map_err(|e| Error::io(&here, e))?;
            let name = rel.join(entry.file_name());
            let kind = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
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
///
/// # Errors
/// The file cannot be read.
pub fn hash_file(path: &Path) -> Result<ManifestEntry> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
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
        std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(|e| Error::io(&path, e))?;
        manifest.insert(rel, hash_file(&path)?);
    }
    let path = dir.join(MANIFEST);
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| Error::corrupt(&path, e.to_string()))?;
    let mut f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| Error::io(&path, e))?;
    f.sync_all().map_err(|e| Error::io(&path, e))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Directories can be opened and fsynced on Unix; elsewhere this is a no-op.
    #[cfg(unix)]
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(|e| Error::io(dir, e))?;
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
        return Err(Error::corrupt(
            dir,
            format!(
                "no {MANIFEST}: not a complete directory written by gems (damaged, or from an older version)"
            ),
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let manifest: BTreeMap<String, ManifestEntry> =
        serde_json::from_str(&text).map_err(|e| Error::corrupt(&path, e.to_string()))?;
    let present = list_files(dir)?;
    if let Some(extra) = present.iter().find(|f| !manifest.contains_key(*f)) {
        return Err(Error::corrupt(dir.join(extra), format!("not listed in {MANIFEST}")));
    }
    for (rel, want) in &manifest {
        let file = dir.join(rel);
        if !file.is_file() {
            return Err(Error::corrupt(&file, format!("listed in {MANIFEST} but missing")));
        }
        let got = hash_file(&file)?;
        if got != *want {
            return Err(Error::corrupt(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacing_a_directory_keeps_a_complete_copy() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("checkpoint");
        replace_dir(&dir, |d| write_atomic(&d.join("a"), b"1")).unwrap();
        // A failing writer leaves the previous copy untouched.
        let err = replace_dir(&dir, |_| Err(Error::corrupt("x", "disk full")));
        assert!(err.is_err());
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"1");
        replace_dir(&dir, |d| write_atomic(&d.join("a"), b"2")).unwrap();
        assert_eq!(std::fs::read(dir.join("a")).unwrap(), b"2");
        // A crash between the renames leaves `checkpoint.old`, which is found.
        std::fs::rename(&dir, root.path().join("checkpoint.old")).unwrap();
        assert_eq!(resolve_dir(&dir).unwrap(), root.path().join("checkpoint.old"));
    }

    #[test]
    fn a_file_in_the_way_is_refused_before_anything_moves() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("out");
        std::fs::write(&file, b"keep me").unwrap();
        let err = replace_dir(&file, |d| write_atomic(&d.join("a"), b"1")).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let names: Vec<_> =
            std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out")], "no .tmp or .old left");
    }

    #[test]
    fn a_failed_write_leaves_no_partial_copy() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("checkpoint");
        let err = replace_dir(&dir, |d| {
            write_atomic(&d.join("half"), b"x")?;
            Err(Error::corrupt("x", "No space left on device"))
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
            std::fs::create_dir_all(d.join("sub")).map_err(|e| Error::io(d, e))?;
            write_atomic(&d.join("sub/b.json"), b"{}")
        })
        .unwrap();
        verify_dir(&dir).unwrap();
        let manifest: BTreeMap<String, ManifestEntry> =
            serde_json::from_str(&std::fs::read_to_string(dir.join(MANIFEST)).unwrap()).unwrap();
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
        assert!(verify_dir(&dir).unwrap_err().to_string().contains("no checksums.json"));
    }
}
