//! kill -9 at seeded random moments of `train` (checkpoints are written every step, so many
//! kills land inside one), `data prepare` and `export`: the previous complete state always
//! survives and verifies against its checksums, and a run resumed after every kill ends with
//! the summary of an uninterrupted run. Reads `../shared/data`; no network.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use gems_rng::SplitMix64;
use gems_train::checkpoint::{resolve_dir, verify_dir};
use gems_train::tiny::tiny_run_config;

fn data_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

fn gems() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_gems"));
    c.stdout(Stdio::null()).stderr(Stdio::null());
    c
}

/// Runs `cmd`, SIGKILLs it after `delay` if it is still running; whether it finished.
fn run_and_kill(cmd: &mut Command, delay: Duration) -> bool {
    let mut child = cmd.spawn().expect("spawn gems");
    let start = std::time::Instant::now();
    while start.elapsed() < delay {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "gems failed: {status}");
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    false
}

fn delay(rng: &mut SplitMix64, max_ms: u64) -> Duration {
    Duration::from_millis(20 + rng.below(max_ms))
}

/// The survivor of a killed directory write, which must verify.
fn check_survivor(dir: &Path) {
    if let Some(d) = resolve_dir(dir) {
        verify_dir(&d).unwrap_or_else(|e| panic!("{} after a kill: {e}", d.display()));
    }
}

fn after_metrics(run: &Path) -> serde_json::Value {
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert!(s["steps"].as_u64().unwrap() > 0);
    serde_json::json!({"steps": s["steps"], "after": s["after"]["full"], "loss": s["after"]["loss"]})
}

#[test]
fn train_killed_at_random_moments_resumes_to_the_uninterrupted_result() {
    let root = tempfile::tempdir().unwrap();
    let mut config = tiny_run_config(root.path(), &data_root(), 8).unwrap();
    config.eval.before = false;
    config.eval.perplexity = false;
    config.checkpoint_every = 1;
    let cfg = root.path().join("tiny.json");
    std::fs::write(&cfg, serde_json::to_string(&config).unwrap()).unwrap();
    let train = |out: &Path, resume: bool| {
        let mut c = gems();
        c.args(["train", "--preset", "default", "--quiet", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(out);
        if resume {
            c.arg("--resume");
        }
        c
    };
    let whole = root.path().join("whole");
    assert!(train(&whole, false).status().unwrap().success());
    let expected = after_metrics(&whole);
    // A flag that would change a resumed run is refused, naming the setting; the run's own
    // flags are accepted (every resume below repeats them).
    let o = train(&whole, true).args(["--lr", "0.5"]).stderr(Stdio::piped()).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("schedule.lr") && err.contains("refused"), "{err}");
    // Cached projectors and model setup make a run take a second or two; kill within 1.5 s.
    let parts = root.path().join("parts");
    let mut rng = SplitMix64::new(20261130);
    let mut kills = 0;
    for _ in 0..12 {
        let resume = parts.join("checkpoint").exists() || parts.join("checkpoint.old").exists();
        if run_and_kill(&mut train(&parts, resume), delay(&mut rng, 1500)) {
            break;
        }
        kills += 1;
        check_survivor(&parts.join("checkpoint"));
        check_survivor(&parts.join("model"));
    }
    if !parts.join("summary.json").exists() {
        let resume = parts.join("checkpoint").exists() || parts.join("checkpoint.old").exists();
        assert!(train(&parts, resume).status().unwrap().success());
    }
    assert!(kills > 0, "no kill landed; the delays are too long for this machine");
    assert_eq!(after_metrics(&parts), expected, "after {kills} kills");
}

#[test]
fn prepare_and_export_killed_at_random_moments_leave_a_complete_directory() {
    let root = tempfile::tempdir().unwrap();
    let mut rng = SplitMix64::new(7);
    // data prepare over a real dataset, into a directory that already holds a prepared one.
    let out = root.path().join("scientific");
    let prepare = || {
        let mut c = gems();
        c.args(["data", "prepare", "--dataset", "scientific", "--data-root"])
            .arg(data_root())
            .arg("--out")
            .arg(&out);
        c
    };
    assert!(prepare().status().unwrap().success());
    for _ in 0..6 {
        run_and_kill(&mut prepare(), delay(&mut rng, 1500));
        let survivor = resolve_dir(&out).expect("a complete prepared directory survives");
        let stats = gems().args(["data", "stats"]).arg(&survivor).status().unwrap();
        assert!(stats.success(), "data stats on {} after a kill", survivor.display());
    }

    // export of a finished tiny run.
    let mut config = tiny_run_config(root.path(), &data_root(), 2).unwrap();
    config.eval.before = false;
    config.eval.perplexity = false;
    let run = root.path().join("run");
    let options = gems_train::RunOptions {
        device: burn::tensor::Device::flex(),
        resume: false,
        progress: Default::default(),
    };
    gems_train::train(&config, &run, &options).unwrap();
    let exported = root.path().join("exported");
    assert!(gems().arg("export").arg(&run).arg(&exported).status().unwrap().success());
    for _ in 0..6 {
        run_and_kill(gems().arg("export").arg(&run).arg(&exported), delay(&mut rng, 300));
        let survivor = resolve_dir(&exported).expect("a complete export survives");
        verify_dir(&survivor).unwrap();
        assert!(survivor.join("model.safetensors").is_file());
    }
}
