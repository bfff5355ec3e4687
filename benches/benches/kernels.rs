//! The fused host kernels of `gems_model::kernels` against the Burn ops they replace, on flex,
//! at the shapes of the CPU preset's frozen layers (a task batch of 16 rows x 37 tokens:
//! 592 positions; MLP width 1536).
//!
//! - `kernels/swiglu/burn`: `silu(gate) * up` as Burn ops (flex: sigmoid, two multiplications,
//!   three serial passes).
//! - `kernels/swiglu/fused`: [`gems_model::kernels::swiglu`] (one pass over both threads, same
//!   bits).
//!
//! - `kernels/rope/burn`: rotate-half RoPE of a query projection (9 heads x 64) as Burn ops
//!   (reshape, swap, narrow, negate, concatenate, two products and a sum, on strided views).
//! - `kernels/rope/fused`: [`gems_model::kernels::rope`] (one pass, same bits).
//!
//! - `kernels/attention/burn`: causal attention with a padding bias, 16 x 9 heads x 37 x 64, as
//!   `burn::tensor::module::attention` on an autodiff device (Burn's fallback: serial
//!   element-wise passes between the products), as a frozen layer ran it.
//! - `kernels/attention/fused`: [`gems_model::kernels::attention`] (same products and row sums,
//!   the element-wise chain fused; same bits).
//!
//! Inputs are rebuilt per iteration from host data (the fused kernel consumes its input's buffer),
//! the same for both cases. Run: `cargo bench -p gems-benches --bench kernels`.

use std::hint::black_box;

use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor, TensorData};
use criterion::{BatchSize, Criterion, criterion_main};
use gems_model::kernels::{RopeTables, apply_rope, attention, rope};

const DIMS: [usize; 3] = [16, 37, 1536];
const HEADS: usize = 9;
const HEAD_DIM: usize = 64;

fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let device = Device::flex();
    let n = DIMS.iter().product::<usize>();
    let (g, u) = (values(1, n), values(2, n));
    let inputs = || {
        (
            Tensor::<3>::from_data(TensorData::new(g.clone(), DIMS), &device),
            Tensor::<3>::from_data(TensorData::new(u.clone(), DIMS), &device),
        )
    };
    let sync = |t: Tensor<3>| black_box(t.slice([0..1, 0..1, 0..1]).into_data());
    let mut group = c.benchmark_group("kernels/swiglu");
    group.bench_function("burn", |b| {
        b.iter_batched(inputs, |(g, u)| sync(silu(g) * u), BatchSize::SmallInput)
    });
    group.bench_function("fused", |b| {
        b.iter_batched(
            inputs,
            |(g, u)| sync(gems_model::kernels::swiglu(g, u, true)),
            BatchSize::SmallInput,
        )
    });
    group.finish();

    let [b, t, _] = DIMS;
    let x = values(3, b * t * HEADS * HEAD_DIM);
    let tables = RopeTables::new(
        values(4, b * t * HEAD_DIM),
        values(5, b * t * HEAD_DIM),
        [b, t, HEAD_DIM],
        &device,
    );
    let input =
        || Tensor::<3>::from_data(TensorData::new(x.clone(), [b, t, HEADS * HEAD_DIM]), &device);
    let sync = |t: Tensor<4>| black_box(t.slice([0..1, 0..1, 0..1, 0..1]).into_data());
    let mut group = c.benchmark_group("kernels/rope");
    group.bench_function("burn", |bench| {
        bench.iter_batched(
            input,
            |x| {
                let x = x.reshape([b, t, HEADS, HEAD_DIM]).swap_dims(1, 2);
                sync(apply_rope(x, &tables.cos, &tables.sin))
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("fused", |bench| {
        bench.iter_batched(input, |x| sync(rope(x, HEADS, &tables, true)), BatchSize::SmallInput)
    });
    group.finish();

    let autodiff = device.clone().autodiff();
    let n = b * HEADS * t * HEAD_DIM;
    let (qv, kv, vv) = (values(6, n), values(7, n), values(8, n));
    let mut pad = vec![0.0f32; b * t];
    pad.iter_mut().skip(t - 5).step_by(t).for_each(|m| *m = -1e9); // padding in every row
    let qkv = || {
        let at = |v: &Vec<f32>| {
            Tensor::<4>::from_data(TensorData::new(v.clone(), [b, HEADS, t, HEAD_DIM]), &autodiff)
        };
        let bias = Tensor::<4>::from_data(TensorData::new(pad.clone(), [b, 1, 1, t]), &autodiff);
        (at(&qv), at(&kv), at(&vv), bias)
    };
    let mut group = c.benchmark_group("kernels/attention");
    for (name, fused) in [("burn", false), ("fused", true)] {
        group.bench_function(name, |bench| {
            bench.iter_batched(
                qkv,
                |(q, k, v, m)| sync(attention(q, k, v, Some(m), true, fused)),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

mod group {
    criterion::criterion_group!(benches, super::bench);
}
criterion_main!(group::benches);
