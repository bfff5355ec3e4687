//! glibc's allocator settings for the workspace's binaries.
//!
//! A forward pass on flex allocates a fresh buffer for nearly every op output (megabytes each at
//! an evaluation batch) and frees it soon after. With glibc's defaults the heap's free top is
//! given back to the kernel as soon as it passes a threshold of a few megabytes, and the next
//! batch faults the same pages in again: `gems eval` of 400 test examples took 3.4 million page
//! faults, and a quarter of its time (docs/benchmarks.md, "Evaluation beside PyTorch").
//! [`TUNABLES`] keep freed memory in the process instead (the heap is trimmed only past 1 GiB,
//! grown 64 MiB at a time, and buffers up to 32 MiB come from the heap, not from their own
//! mappings): the results are the same to the bit, the peak resident memory rises by about
//! 0.1 GB.
//!
//! glibc reads its tunables once, when the process starts, so [`retain_freed_memory`]
//! re-executes the binary with them in its environment. Binaries call it first thing in
//! `main`; a library never does (it would change its host process).

use std::ffi::OsString;

/// The environment variable glibc reads its tunables from.
pub const TUNABLES_VAR: &str = "GLIBC_TUNABLES";

/// What the workspace's binaries set in [`TUNABLES_VAR`]: trim the heap only past 1 GiB, grow
/// it 64 MiB at a time, and serve every buffer up to 32 MiB (glibc's largest allowed) from it.
pub const TUNABLES: &str = "glibc.malloc.trim_threshold=1073741824:glibc.malloc.top_pad=67108864:\
                            glibc.malloc.mmap_threshold=33554432";

/// Why [`retain_freed_memory`] left the process as it was.
#[derive(Debug)]
pub enum Untuned {
    /// The user set [`TUNABLES_VAR`] or a variable whose name starts with `MALLOC_`: their
    /// settings stand (an empty `GLIBC_TUNABLES=` turns this tuning off).
    UserSettings(String),
    /// Not a glibc Linux build: nothing to tune.
    NotGlibc,
    /// The re-execution failed (the binary's path unknown, or `exec` refused): the process goes
    /// on with glibc's defaults, which only costs time.
    ReexecFailed(std::io::Error),
}

impl std::fmt::Display for Untuned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Untuned::UserSettings(var) => write!(f, "{var} is set: the allocator is left as given"),
            Untuned::NotGlibc => write!(f, "not a glibc build: the allocator is left as it is"),
            Untuned::ReexecFailed(e) => {
                write!(f, "re-executing with {TUNABLES_VAR} failed ({e}): glibc's defaults stay")
            }
        }
    }
}

/// The variable among `vars` that means the user chose the allocator's settings, if any.
pub fn user_setting(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Option<String> {
    vars.into_iter()
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .find(|k| k == TUNABLES_VAR || k.starts_with("MALLOC_"))
}

/// Re-executes the running binary, with the same arguments, under [`TUNABLES`]: on success it
/// does not return. It returns (and the process goes on untuned) when the user set the
/// allocator's variables, on other platforms than glibc Linux, and when the re-execution fails.
/// Call it first thing in a binary's `main`, before any thread starts or output is written.
pub fn retain_freed_memory() -> Untuned {
    if let Some(var) = user_setting(std::env::vars_os()) {
        return Untuned::UserSettings(var);
    }
    reexec()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn reexec() -> Untuned {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return Untuned::ReexecFailed(e),
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    Untuned::ReexecFailed(command.args(args).env(TUNABLES_VAR, TUNABLES).exec())
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn reexec() -> Untuned {
    Untuned::NotGlibc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(names: &[&str]) -> Vec<(OsString, OsString)> {
        names.iter().map(|n| (OsString::from(n), OsString::from("1"))).collect()
    }

    #[test]
    fn the_users_allocator_variables_are_respected() {
        assert_eq!(user_setting(vars(&["PATH", "HOME"])), None);
        assert_eq!(
            user_setting(vars(&["PATH", "GLIBC_TUNABLES"])).as_deref(),
            Some("GLIBC_TUNABLES")
        );
        assert_eq!(user_setting(vars(&["MALLOC_ARENA_MAX"])).as_deref(), Some("MALLOC_ARENA_MAX"));
        assert_eq!(user_setting(vars(&["GEMS_MALLOC"])), None);
    }

    #[test]
    fn the_tunables_are_within_glibcs_limits() {
        let value = |name: &str| -> u64 {
            let key = format!("glibc.malloc.{name}=");
            let rest = &TUNABLES[TUNABLES.find(&key).unwrap() + key.len()..];
            rest.split(':').next().unwrap().parse().unwrap()
        };
        // glibc refuses an mmap threshold above half its largest heap (32 MiB on 64-bit).
        assert!(value("mmap_threshold") <= 32 << 20);
        assert!(value("trim_threshold") >= value("mmap_threshold"));
        assert!(value("top_pad") > 0);
        assert_eq!(TUNABLES.split(':').count(), 3);
    }
}
