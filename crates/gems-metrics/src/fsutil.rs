//! Atomic file writes: a reader (or a crash) never sees half a report. One implementation for
//! the workspace, in `gems-io`.

use std::path::Path;

use crate::error::{MetricsError, Result};

/// Writes `contents` to `path` atomically and durably ([`gems_io::write_atomic`]).
pub(crate) fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    gems_io::write_atomic(path, contents).map_err(|e| match e {
        gems_io::Error::Io { path, cause } => MetricsError::io(path, cause),
        other => MetricsError::io(path, std::io::Error::other(other.to_string())),
    })
}
