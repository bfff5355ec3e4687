//! The real training step, timed by phase, on prepared Amazon Scientific batches.
//!
//! What runs is what `gems train` runs for one step, in one of two shapes:
//!
//! - `--preset`: the CPU preset exactly as `gems train --preset cpu` trains it (all 30 layers
//!   of SmolLM2, the top 4 tuned and the 26 below run without an autodiff graph, only the item
//!   rows of the embedding trained, batches bucketed by length);
//! - otherwise the older shape of the first table in docs/benchmarks.md: SmolLM2 cut to
//!   `--layers`, every layer and embedding row trained, unbucketed batches.
//!
//! Both have item tokens with title-mean rows, 16 rows per task, right padding and the loss on
//! the target tokens, the trainer's own batch stream (`gems_train::peer`), per-task forward
//! and backward, the gradient window, and the chosen method's optimizer step (gems with its
//! null-space projectors). Phases per step:
//!
//! - `decoder`: embedding lookup and decoder layers (`Llama::hidden_states`), both tasks;
//! - `head`: gathering the target positions, the output head over the whole vocabulary and the
//!   cross-entropy, both tasks;
//! - `backward`: `loss.backward()`, both tasks;
//! - `grads`: collecting the gradients by parameter and the task window (host bookkeeping);
//! - `optimizer`: `Optimizer::step_owned` (updates in place where the model holds a parameter
//!   alone), or with `--borrowed` `Optimizer::step` (on a clone: every update copies);
//! - `head_backward` (measured apart, not part of the step): forward and backward of the head
//!   alone on detached hidden states, i.e. the dense 53,496 x 576 embedding gradient's share.
//!
//! `--frozen-cache` (with `--preset`) times the step as `gems train --untie-head
//! --frozen-cache DIR` runs it once its rows are kept: the untied head, and the decoder phase
//! reading every row's states entering the first tuned layer from the kept states
//! (`gems_train::frozen_cache`) instead of running the 26 frozen layers. The states of every
//! timed batch are computed (new rows by length, as a run's first epoch does) before the
//! timed steps; `frozen_fill` is that
//! time per step's rows, the extra cost of a row's first epoch.
//!
//! Tokens/s counts real (unpadded) tokens. Peak memory is the process's peak resident set.
//! Matrix-product work: the step's matmul flops are counted from the model's shape and each
//! batch's padded size (forward of every layer, backward of the trained layers at twice
//! their forward, the head over the target rows forward and backward, attention's two
//! products); `matmul_share` is those flops per second of the whole step over the bare-GEMM
//! GFLOP/s of one projection-shaped product (`[tokens of a task batch, d] x [d, intermediate]`)
//! timed in the same process.
//! `--dump DIR` (relative paths from the workspace root) also writes the model and batches for
//! the PyTorch peer
//! (benches/peer/step_torch.py), which times the same step on the same batches.
//!
//! `cargo bench -p gems-benches --bench step -- [--method gems] [--preset | --layers 8]
//! [--steps 6] [--warmup 1] [--borrowed] [--frozen-cache] [--dump runs/peer] [--json FILE]`; `cargo xtask bench-step` runs it beside
//! the peer, alternating, and writes the table (docs/benchmarks.md).

use std::path::PathBuf;
use std::time::Instant;

use burn::optim::GradientsParams;
use burn::tensor::Device;
use gems_data::Task;
use gems_model::{Llama, LlamaConfig};
use gems_optim::{GradientWindow, Method, Optimizer, StepGradients, TaskGradient};
use gems_train::forward::{
    cross_entropy, decoder_states, read_f32, sample_batch, target_positions,
};
use gems_train::frozen_cache::FrozenStates;
use gems_train::peer::{self, PeerBatches};
use gems_train::{Sample, TrainConfig};
use serde_json::json;

struct Args {
    method: Method,
    preset: bool,
    layers: usize,
    steps: u64,
    warmup: usize,
    dump: Option<PathBuf>,
    json: Option<PathBuf>,
    borrowed: bool,
    frozen_cache: bool,
}

fn args() -> Args {
    let mut a = Args {
        method: Method::Gems,
        preset: false,
        layers: 8,
        steps: 6,
        warmup: 1,
        dump: None,
        json: None,
        borrowed: false,
        frozen_cache: false,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(x) = it.next() {
        let mut v = || it.next().cloned().unwrap_or_else(|| panic!("{x} needs a value"));
        match x.as_str() {
            "--method" => {
                a.method = serde_json::from_value(json!(v()))
                    .expect("--method: gems, galore, full, lora, pcgrad")
            }
            "--preset" => a.preset = true,
            "--layers" => a.layers = v().parse().expect("--layers N"),
            "--steps" => a.steps = v().parse().expect("--steps N"),
            "--warmup" => a.warmup = v().parse().expect("--warmup N"),
            "--dump" => a.dump = Some(from_workspace(v())),
            "--json" => a.json = Some(from_workspace(v())),
            "--borrowed" => a.borrowed = true,
            "--frozen-cache" => a.frozen_cache = true,
            "--bench" => {} // passed by `cargo bench`
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// A relative path taken from the workspace root: `cargo bench` runs this binary in benches/.
fn from_workspace(path: String) -> PathBuf {
    let p = PathBuf::from(path);
    if p.is_absolute() { p } else { PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(p) }
}

fn data_root() -> PathBuf {
    std::env::var_os("GEMS_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Matmul flops of one task batch of `rows` x `width` (padded) tokens with `targets` target
/// positions (see the module documentation for what is counted); `forward_layers` is how many
/// layers run forward (all, or the trained ones when the frozen states are kept).
fn batch_matmul_flops(
    cfg: &gems_model::LlamaConfig,
    vocab: usize,
    (forward_layers, trained_layers): (usize, usize),
    rows: usize,
    width: usize,
    targets: usize,
) -> f64 {
    let layer = gems_benches::layer_flops(cfg, rows, width);
    let forward_and_backward = (forward_layers + 2 * trained_layers) as f64;
    layer * forward_and_backward + 3.0 * gems_benches::head_flops(cfg, vocab, targets)
}

fn main() {
    // As the gems binary does, so that the bench times the allocator it runs with.
    let _ = gems_host::allocator::retain_freed_memory();
    let a = args();
    let config = bench_config(&a);
    let dump = a.dump.clone().unwrap_or_else(|| std::env::temp_dir().join("gems-bench-step"));
    let started = Instant::now();
    let (run, batches) = peer::dump(&config, &dump, a.steps).expect("model and data");
    eprintln!("setup {:.1} s; dumped to {}", started.elapsed().as_secs_f64(), dump.display());
    let plain = Device::flex();
    let device = plain.clone().autodiff();
    // The optimizer (with its null space) and the model as the trainer starts them: lower
    // layers frozen, LoRA adapters, embedding policy.
    let mut optimizer =
        run.optimizer(None, &dump, &device, &Default::default()).expect("optimizer");
    let mut model = run.model_to_train(None, &device).expect("model to train");
    let samples = peer::sample_steps(&run, a.steps);
    let setup = &run.setup;
    let cfg = &setup.pretrained.model.config;
    let frozen = run.frozen_states(&model, &Default::default()).expect("frozen states");
    let frozen_fill = frozen.as_ref().map(|f| fill_frozen(f, &model, &samples, setup));
    let bench = StepBench {
        config: &config,
        cfg,
        vocab: batches.vocab,
        trained_layers: batches.layers - batches.frozen_layers,
        pad: setup.corpus.eos_id,
        borrowed: a.borrowed,
        frozen: frozen.as_ref(),
    };
    let mut rows = Vec::new();
    for (step, batches) in samples.iter().enumerate() {
        let (next, row) = bench.step(step, batches, model, &mut optimizer);
        model = next;
        println!("{row}");
        rows.push(row);
    }
    // The head and its dense embedding gradient alone, on detached hidden states of the first
    // batch (what the tied 53,496-row table costs per task pass).
    let head_backward = head_backward(&model, &samples[0][0].1, bench.pad);
    let measured = Measured {
        batches: &batches,
        tasks_per_step: samples[0].len(),
        cfg,
        plain: &plain,
        head_backward,
        optimizer: &optimizer,
    };
    let mut summary = summary(&a, &rows, &measured);
    summary["frozen_fill"] = json!(frozen_fill);
    println!("{summary}");
    if let Some(path) = a.json {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&json!({"steps": rows, "summary": summary}))
                .expect("json"),
        )
        .expect("writing --json");
    }
}

/// The training configuration of the bench: the CPU preset, or with `--layers` the older shape
/// of the first table of docs/benchmarks.md.
fn bench_config(a: &Args) -> TrainConfig {
    let mut config = TrainConfig::cpu_preset();
    if a.frozen_cache {
        assert!(a.preset, "--frozen-cache needs --preset (frozen lower layers)");
        config.model.untie_head = true;
        let dir = std::env::temp_dir().join(format!("gems-bench-frozen-{}", std::process::id()));
        config.model.frozen_cache = Some(dir);
    }
    if !a.preset {
        // The first table of docs/benchmarks.md: every kept layer and embedding row trained,
        // unbucketed batches (it predates the full-depth preset and length bucketing).
        config.model.keep_layers = (a.layers < 30).then_some(a.layers);
        config.model.tune_layers = None;
        config.model.embeddings = gems_train::config::EmbeddingPolicy::All;
        config.schedule.bucket = None;
    }
    config.data.data_root = data_root();
    config.optimizer.method = a.method;
    // The PyTorch peer (benches/peer/step_torch.py) computes the loss at the answer only, so
    // the bench trains one-target rows; `--rec-targets all` costs the same per step
    // (docs/training.md, "Recommendation from the interactions").
    config.data.rec_targets = gems_train::config::RecTargets::Last;
    config
}

/// What a timed step needs besides the model and the optimizer: the learning-rate schedule,
/// the model's shape for the flop count, the padding id and how the optimizer steps.
struct StepBench<'a> {
    config: &'a TrainConfig,
    cfg: &'a LlamaConfig,
    vocab: usize,
    trained_layers: usize,
    pad: u32,
    borrowed: bool,
    /// The kept frozen states (`--frozen-cache`), filled for every timed batch.
    frozen: Option<&'a FrozenStates>,
}

/// The running totals of one step: phase seconds (decoder, head, backward, grads, optimizer),
/// real and padded tokens, matmul flops and each task's loss.
#[derive(Default)]
struct StepTally {
    t: [f64; 5],
    real: usize,
    padded: usize,
    flops: f64,
    losses: serde_json::Map<String, serde_json::Value>,
}

impl StepBench<'_> {
    /// Runs and times training step `step` (0-based) on `batches`; returns the updated model
    /// and the step's row.
    fn step(
        &self,
        step: usize,
        batches: &[(Task, Vec<&Sample>)],
        model: Llama,
        optimizer: &mut Optimizer,
    ) -> (Llama, serde_json::Value) {
        let mut tally = StepTally::default();
        let mut windows = [GradientWindow::new(), GradientWindow::new()];
        let step_started = Instant::now();
        for (task, batch) in batches {
            self.task_pass(&model, *task, batch, &mut tally, &mut windows);
        }
        let StepTally { mut t, real, padded, flops, losses } = tally;
        let c = Instant::now();
        let [w_rec, w_src] = windows;
        let grads =
            StepGradients { rec: w_rec.finish(&model), search: w_src.finish(&model), shared: None };
        t[3] += c.elapsed().as_secs_f64();
        let c = Instant::now();
        let lr = self.config.schedule.lr_at(step as u64 + 1);
        let model = if self.borrowed {
            optimizer.step(lr, &model, grads)
        } else {
            optimizer.step_owned(lr, model, grads)
        }
        .expect("optimizer step")
        .0;
        t[4] += c.elapsed().as_secs_f64();
        let total = step_started.elapsed().as_secs_f64();
        let row = json!({
            "step": step + 1, "losses": losses, "decoder": t[0], "head": t[1], "backward": t[2],
            "grads": t[3], "optimizer": t[4], "total": total, "real_tokens": real,
            "padded_tokens": padded, "tokens_per_s": real as f64 / total,
            "matmul_gflop": flops / 1e9, "matmul_gflops": flops / total / 1e9,
        });
        (model, row)
    }

    /// Forward and backward of one task batch, timed by phase into `tally`; its gradient joins
    /// the task's window.
    fn task_pass(
        &self,
        model: &Llama,
        task: Task,
        batch: &[&Sample],
        tally: &mut StepTally,
        windows: &mut [GradientWindow; 2],
    ) {
        let t = &mut tally.t;
        tally.real += batch.iter().map(|s| s.ids.len()).sum::<usize>();
        let tb = sample_batch(batch, self.pad).expect("batch");
        tally.padded += tb.batch_size * tb.seq_len;
        let (at, ids) = target_positions(batch);
        let forward_layers =
            if self.frozen.is_some() { self.trained_layers } else { self.cfg.num_hidden_layers };
        tally.flops += batch_matmul_flops(
            self.cfg,
            self.vocab,
            (forward_layers, self.trained_layers),
            tb.batch_size,
            tb.seq_len,
            at.len(),
        );
        let c = Instant::now();
        let hidden = decoder_states(model, &tb, self.frozen).expect("forward");
        let _ = read_f32(hidden.clone().slice([0..1, 0..1, 0..1]), "sync");
        t[0] += c.elapsed().as_secs_f64();
        let c = Instant::now();
        let picked = gems_model::llama::gather_rows(hidden, &at, "bench").expect("gather");
        let loss = cross_entropy(model.head(picked), &ids);
        let value = read_f32(loss.clone(), "loss").expect("loss")[0] as f64;
        t[1] += c.elapsed().as_secs_f64();
        tally.losses.insert(task.name().into(), json!(value));
        let c = Instant::now();
        let grads = loss.backward();
        t[2] += c.elapsed().as_secs_f64();
        let c = Instant::now();
        let grads = GradientsParams::from_grads(grads, model);
        windows[task as usize]
            .add(model, TaskGradient { grads, samples: batch.len(), loss: value });
        t[3] += c.elapsed().as_secs_f64();
    }
}

/// Computes the kept states of every row of `samples` (each row alone, as a run's first epoch
/// does); returns the seconds per step.
fn fill_frozen(
    frozen: &FrozenStates,
    model: &Llama,
    samples: &[Vec<(Task, Vec<&Sample>)>],
    setup: &gems_train::setup::Setup,
) -> f64 {
    let started = Instant::now();
    for (_, batch) in samples.iter().flatten() {
        let tb = sample_batch(batch, setup.corpus.eos_id).expect("batch");
        frozen.keep(model, &tb).expect("frozen states");
    }
    started.elapsed().as_secs_f64() / samples.len().max(1) as f64
}

/// Seconds of forward and backward of the head alone on detached hidden states of `batch`.
fn head_backward(model: &Llama, batch: &[&Sample], pad: u32) -> f64 {
    let tb = sample_batch(batch, pad).expect("batch");
    let (at, ids) = target_positions(batch);
    let hidden = model.hidden_states(&tb).expect("forward").detach();
    let picked = gems_model::llama::gather_rows(hidden, &at, "bench").expect("gather");
    let c = Instant::now();
    let loss = cross_entropy(model.head(picked), &ids);
    let _ = loss.backward();
    c.elapsed().as_secs_f64()
}

/// What the summary reports besides the steps' rows.
struct Measured<'a> {
    batches: &'a PeerBatches,
    /// Task batches of the first step.
    tasks_per_step: usize,
    cfg: &'a LlamaConfig,
    /// The device without autodiff, for the bare GEMM.
    plain: &'a Device,
    /// Seconds of [`head_backward`].
    head_backward: f64,
    optimizer: &'a Optimizer,
}

/// The summary line: medians of the rows after the warm-up, the bare GEMM rate at the shape of
/// a projection over a median task batch, and the run's settings, state and peak memory.
fn summary(a: &Args, rows: &[serde_json::Value], m: &Measured) -> serde_json::Value {
    let after: Vec<&serde_json::Value> = rows.iter().skip(a.warmup).collect();
    let med = |k: &str| median(after.iter().filter_map(|r| r[k].as_f64()).collect());
    // Bare GEMM at the shape of a projection over a task batch of median size.
    let per_task = med("padded_tokens") / m.tasks_per_step.max(1) as f64;
    let bare = gems_benches::bare_gemm_gflops(
        per_task.round().max(1.0) as usize,
        m.cfg.hidden_size,
        m.cfg.intermediate_size,
        5,
        m.plain,
    );
    json!({
        "summary": true, "method": a.method.as_str(), "layers": m.batches.layers,
        "preset": a.preset, "frozen_layers": m.batches.frozen_layers,
        "steps": a.steps, "warmup": a.warmup,
        "median": {
            "decoder": med("decoder"), "head": med("head"), "backward": med("backward"),
            "grads": med("grads"), "optimizer": med("optimizer"), "total": med("total"),
            "tokens_per_s": med("tokens_per_s"), "matmul_gflop": med("matmul_gflop"),
            "matmul_gflops": med("matmul_gflops"),
        },
        "bare_gemm_gflops": bare,
        "matmul_share": med("matmul_gflops") / bare,
        "head_backward_one_task": m.head_backward,
        "optimizer_state_bytes": m.optimizer.state_bytes(),
        "peak_rss_bytes": peak_rss(),
        "threads": std::thread::available_parallelism().map_or(0, |n| n.get()),
    })
}
