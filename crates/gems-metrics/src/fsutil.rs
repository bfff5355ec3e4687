//! Atomic file writes: a reader (or a crash) never sees half a report.

use std::io::Write;
use std::path::Path;

use crate::error::{MetricsError, Result};

/// Writes `contents` to `path` through a temporary file in the same directory and a rename,
/// so that `path` holds either its old contents or all of the new ones.
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(contents)?;
        file.sync_all()
    };
    if let Err(source) = write() {
        let _ = std::fs::remove_file(&temp);
        return Err(MetricsError::io(&temp, source));
    }
    std::fs::rename(&temp, path).map_err(|source| {
        let _ = std::fs::remove_file(&temp);
        MetricsError::io(path, source)
    })
}
