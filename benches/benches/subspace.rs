//! Subspace math on the weight shapes of real models (SmolLM2-135M: 576x576, 576x1536,
//! 1536x576; Qwen2.5-0.5B: 896x4864).
//!
//! - `top_r/exact` vs `top_r/randomized` (oversampling 8, 2 power iterations) at r in
//!   {8, 32, 128}: the cost of one basis refresh of one matrix.
//! - `projection`: R = G Q then U = R Q^T (right side) or R = Q^T G, U = Q R (left side) on the
//!   flex device, next to the two bare matmuls of the same shapes, with a resident basis.
//!
//! Run: `cargo bench -p gems-benches --bench subspace`. Results: docs/benchmarks.md.

use burn::tensor::{Device, Tensor, TensorData};
use criterion::{BenchmarkId, Criterion, criterion_main};
use faer::Mat;
use gems_rng::SplitMix64;
use gems_subspace::{RandomizedSvdConfig, Side, SubspaceBasis, SvdMethod, top_singular_vectors};
use std::hint::black_box;
use std::time::Duration;

const SHAPES: &[(usize, usize)] = &[(576, 576), (576, 1536), (1536, 576), (896, 4864)];
const RANKS: &[usize] = &[8, 32, 128];

fn gaussian(rows: usize, cols: usize, seed: u64) -> Vec<f64> {
    let mut v = vec![0.0; rows * cols];
    SplitMix64::new(seed).fill_standard_normal(&mut v);
    v
}

fn host(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
    let v = gaussian(rows, cols, seed);
    Mat::from_fn(rows, cols, |i, j| v[i * cols + j])
}

fn device_tensor(rows: usize, cols: usize, seed: u64, device: &Device) -> Tensor<2> {
    let v: Vec<f32> = gaussian(rows, cols, seed).into_iter().map(|x| x as f32).collect();
    Tensor::from_data(TensorData::new(v, [rows, cols]), device)
}

fn top_r(c: &mut Criterion) {
    let device = Device::flex();
    let mut group = c.benchmark_group("top_r");
    group.sample_size(10).warm_up_time(Duration::from_secs(1));
    for &(m, n) in SHAPES {
        let a = host(m, n, 1);
        let g = device_tensor(m, n, 1, &device);
        let side = if m >= n { Side::Right } else { Side::Left };
        for &r in RANKS {
            let label = format!("{m}x{n}/r{r}");
            group.bench_with_input(BenchmarkId::new("exact", &label), &r, |b, &r| {
                b.iter(|| top_singular_vectors(black_box(a.as_ref()), r, side).unwrap())
            });
            let method = SvdMethod::Randomized(RandomizedSvdConfig::default());
            group.bench_with_input(BenchmarkId::new("randomized", &label), &r, |b, &r| {
                b.iter(|| {
                    SubspaceBasis::from_gradient(black_box(a.as_ref()), r, side, &method).unwrap()
                })
            });
            // What an optimizer refresh does: read an f32 gradient tensor, sketch in f32.
            group.bench_with_input(
                BenchmarkId::new("randomized_from_tensor", &label),
                &r,
                |b, &r| {
                    b.iter(|| {
                        SubspaceBasis::from_gradient_tensor(black_box(&g), r, side, &method)
                            .unwrap()
                    })
                },
            );
        }
    }
    group.finish();
}

fn projection(c: &mut Criterion) {
    let device = Device::flex();
    let mut group = c.benchmark_group("projection");
    group.sample_size(30).warm_up_time(Duration::from_secs(1));
    let (m, n) = (576, 1536);
    for side in [Side::Left, Side::Right] {
        for r in [32, 128] {
            let basis =
                SubspaceBasis::from_gradient(host(m, n, 2).as_ref(), r, side, &SvdMethod::Exact)
                    .unwrap();
            let g = device_tensor(m, n, 3, &device);
            let q = basis.device_matrix(&device);
            let label = format!("{m}x{n}/r{r}/{side:?}");
            group.bench_function(BenchmarkId::new("project+back", &label), |b| {
                b.iter(|| {
                    let r = basis.project_tensor(black_box(g.clone())).unwrap();
                    let u = basis.back_project_tensor(r, 1.0).unwrap();
                    u.into_data()
                })
            });
            // The same two products on plain tensors, with the transposes materialised ahead.
            let qt = Tensor::from_data(q.clone().transpose().into_data(), &device);
            group.bench_function(BenchmarkId::new("bare_matmuls", &label), |b| {
                b.iter(|| {
                    let u = match side {
                        Side::Left => q.clone().matmul(qt.clone().matmul(black_box(g.clone()))),
                        Side::Right => black_box(g.clone()).matmul(q.clone()).matmul(qt.clone()),
                    };
                    u.into_data()
                })
            });
        }
    }
    group.finish();
}

/// Criterion's macros emit an undocumented `pub fn`; a private module keeps `missing_docs` quiet.
mod group {
    criterion::criterion_group!(benches, super::top_r, super::projection);
}
criterion_main!(group::benches);
