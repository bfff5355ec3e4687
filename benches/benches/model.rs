//! Decoder forward and training-step cost at the SmolLM2-135M shape (30 layers, d_model 576,
//! 9 heads / 3 KV heads, MLP 1536, vocabulary 49,152, tied head), batch 8 x 128 tokens, flex.
//!
//! - `model/forward`: logits at every position, no autodiff.
//! - `model/train_all`: forward + backward, mean cross-entropy over all 1,024 positions.
//! - `model/train_last2`: forward + backward, loss on the last 2 positions of each row only
//!   (hidden states gathered before the head, as GEMS' target-token loss does).
//!
//! Before Criterion runs, each case is timed by hand (median of 3) and printed with tokens/s and
//! effective GFLOP/s (2 flops per multiply-add, backward counted as 2x forward), next to the
//! bare-matmul GFLOP/s (1024^2 f32) of the same process. Weights are random (the shape is what
//! costs). Set `GEMS_BENCH_LAYERS` to run fewer layers. Run:
//! `cargo bench -p gems-benches --bench model`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use criterion::{Criterion, criterion_main};
use gems_model::{Llama, LlamaConfig, TokenBatch};

const BATCH: usize = 8;
const SEQ: usize = 128;

fn config() -> LlamaConfig {
    let layers = std::env::var("GEMS_BENCH_LAYERS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": layers, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true
    }))
    .expect("static config")
}

fn batch(vocab: usize) -> TokenBatch {
    let mut x = 12345u64;
    let ids = (0..BATCH * SEQ)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect();
    TokenBatch::new(ids, vec![true; BATCH * SEQ], BATCH, SEQ).expect("batch")
}

/// Mean cross-entropy of `logits [n, V]` against `targets`.
fn cross_entropy(logits: Tensor<2>, targets: &[u32]) -> Tensor<1> {
    let device = logits.device();
    let n = targets.len();
    let idx: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
    let idx = Tensor::<2, Int>::from_data(TensorData::new(idx, [n, 1]), &device);
    log_softmax(logits, 1).gather(1, idx).mean().neg()
}

fn train_step(model: &Llama, b: &TokenBatch, last: Option<usize>) -> f32 {
    let v = model.config.vocab_size;
    let (logits, targets) = match last {
        None => {
            let logits = model.forward(b).expect("forward").reshape([BATCH * SEQ, v]);
            (logits, b.ids.iter().map(|&t| (t + 1) % v as u32).collect::<Vec<_>>())
        }
        Some(k) => {
            let at: Vec<(usize, usize)> =
                (0..BATCH).flat_map(|r| (SEQ - k..SEQ).map(move |p| (r, p))).collect();
            let targets = at.iter().map(|&(r, p)| (b.ids[r * SEQ + p] + 1) % v as u32).collect();
            (model.logits_at(b, &at).expect("logits_at"), targets)
        }
    };
    let loss = cross_entropy(logits, &targets);
    let value = loss.clone().into_scalar::<f32>();
    let grads = loss.backward();
    black_box(grads);
    value
}

/// Forward flops: 2 per multiply-add over the projections, attention scores and the head.
fn forward_flops(c: &LlamaConfig, head_rows: usize) -> f64 {
    c.num_hidden_layers as f64 * gems_benches::layer_flops(c, BATCH, SEQ)
        + gems_benches::head_flops(c, c.vocab_size, head_rows)
}

fn median3(mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..3)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[1]
}

fn bench(c: &mut Criterion) {
    let cfg = config();
    let flex = Device::flex();
    let ad = Device::flex().autodiff();
    let model = Llama::init_random(&cfg, 1, &flex).expect("model");
    let train = Llama::init_random(&cfg, 1, &ad).expect("model");
    let b = batch(cfg.vocab_size);
    let tokens = (BATCH * SEQ) as f64;

    let mm = gems_benches::bare_gemm_gflops(1024, 1024, 1024, 3, &flex);
    let fwd = median3(|| {
        black_box(model.forward(&b).expect("forward").into_data());
    });
    let all = median3(|| {
        black_box(train_step(&train, &b, None));
    });
    let last2 = median3(|| {
        black_box(train_step(&train, &b, Some(2)));
    });
    let f_all = forward_flops(&cfg, BATCH * SEQ);
    let f_last2 = forward_flops(&cfg, BATCH * 2);
    println!("model bench, {} layers, batch {BATCH} x {SEQ}, flex", cfg.num_hidden_layers);
    println!("  bare matmul 1024^2: {mm:.1} GFLOP/s");
    for (name, secs, flops) in [
        ("forward (all logits)", fwd, f_all),
        ("train, loss on all positions", all, 3.0 * f_all),
        ("train, loss on last 2 positions", last2, 3.0 * f_last2),
    ] {
        let g = flops / secs / 1e9;
        println!(
            "  {name}: {secs:.3} s, {:.0} tokens/s, {g:.1} GFLOP/s ({:.0}% of matmul)",
            tokens / secs,
            100.0 * g / mm
        );
    }
    println!("  speed-up of last-2 over all positions: {:.2}x", all / last2);

    let mut g = c.benchmark_group("model");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20));
    g.bench_function("forward", |bch| {
        bch.iter(|| black_box(model.forward(&b).expect("forward").into_data()))
    });
    g.bench_function("train_all", |bch| bch.iter(|| train_step(&train, &b, None)));
    g.bench_function("train_last2", |bch| bch.iter(|| train_step(&train, &b, Some(2))));
    g.finish();
}

/// Criterion's macros emit an undocumented `pub fn`; a private module keeps `missing_docs` quiet.
mod group {
    criterion::criterion_group!(benches, super::bench);
}
criterion_main!(group::benches);
