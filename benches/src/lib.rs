//! Criterion benchmarks live in `benches/benches/`; this library holds what more than one of
//! them counts or times: matrix-product flops of the Llama decoder and bare-GEMM GFLOP/s.

use std::hint::black_box;
use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor};
use gems_model::LlamaConfig;

/// Forward matmul flops (2 per multiply-add) of one decoder layer of `c` over `rows` x `width`
/// tokens: the seven projections and attention's two products over the full square.
pub fn layer_flops(c: &LlamaConfig, rows: usize, width: usize) -> f64 {
    let (d, f) = (c.hidden_size as f64, c.intermediate_size as f64);
    let (q, kv) =
        ((c.num_attention_heads * c.head_dim()) as f64, (c.n_kv_heads() * c.head_dim()) as f64);
    let tokens = (rows * width) as f64;
    let projections = 2.0 * tokens * (2.0 * d * q + 2.0 * d * kv + 3.0 * d * f);
    let attention = 4.0 * rows as f64 * (width * width) as f64 * q;
    projections + attention
}

/// Forward matmul flops of a head of `vocab` outputs over `head_rows` hidden states.
pub fn head_flops(c: &LlamaConfig, vocab: usize, head_rows: usize) -> f64 {
    2.0 * head_rows as f64 * c.hidden_size as f64 * vocab as f64
}

/// GFLOP/s of a bare `[m, k] x [k, n]` product on `device`: the median of `reps` timed
/// products after one warm-up.
pub fn bare_gemm_gflops(m: usize, k: usize, n: usize, reps: usize, device: &Device) -> f64 {
    let a: Tensor<2> = Tensor::random([m, k], Distribution::Default, device);
    let b: Tensor<2> = Tensor::random([k, n], Distribution::Default, device);
    black_box(a.clone().matmul(b.clone()).into_data());
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let c = Instant::now();
            black_box(a.clone().matmul(b.clone()).into_data());
            c.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let n_t = times.len();
    let median =
        if n_t % 2 == 1 { times[n_t / 2] } else { (times[n_t / 2 - 1] + times[n_t / 2]) / 2.0 };
    2.0 * (m * k * n) as f64 / median / 1e9
}
