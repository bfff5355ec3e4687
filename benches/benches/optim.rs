//! Optimizer steps on the 210 tuned matrices of SmolLM2-135M (30 layers x q, k, v, o, gate,
//! up, down; Burn layout `[d_in, d_out]`), flex device, no forward or backward.
//!
//! - `step/{full,galore,gems}/r{32,128}`: one steady-state step (no refresh) from given rec and
//!   search gradients.
//! - `refresh/randomized/r32`: one `gems` step at t = 1, which computes all three bases of
//!   every matrix (630 randomized SVDs) and then steps; subtract `step/gems/r32` for the
//!   refresh alone. The exact-SVD refresh is timed by hand (median of 3) and printed.
//!
//! It also prints the optimizer-state bytes of each method (measured from the state held after
//! a step) next to AdamW's. Run: `cargo bench -p gems-benches --bench optim`.

use std::hint::black_box;
use std::time::Duration;

use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use criterion::{Criterion, criterion_main};
use gems_optim::{Method, Optimizer, OptimizerConfig, StepGradients, TaskGradient};
use gems_rng::SplitMix64;
use gems_subspace::{RandomizedSvdConfig, SvdMethod};

const LAYERS: usize = 30;
const D_MODEL: usize = 576;
const D_KV: usize = 192;
const D_MLP: usize = 1536;

#[derive(Module, Debug)]
struct Linear {
    weight: Param<Tensor<2>>,
}

#[derive(Module, Debug)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

#[derive(Module, Debug)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[derive(Module, Debug)]
struct Layer {
    self_attn: Attention,
    mlp: Mlp,
}

#[derive(Module, Debug)]
struct Decoder {
    layers: Vec<Layer>,
}

fn random(shape: [usize; 2], seed: u64, scale: f64, device: &Device) -> Tensor<2> {
    let mut v = vec![0.0; shape[0] * shape[1]];
    SplitMix64::new(seed).fill_standard_normal(&mut v);
    let v: Vec<f32> = v.into_iter().map(|x| (x * scale) as f32).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

fn linear(d_in: usize, d_out: usize, seed: u64, device: &Device) -> Linear {
    Linear { weight: Param::from_tensor(random([d_in, d_out], seed, 0.02, device)) }
}

fn decoder(device: &Device) -> Decoder {
    let layers = (0..LAYERS as u64)
        .map(|i| Layer {
            self_attn: Attention {
                q_proj: linear(D_MODEL, D_MODEL, 10 * i, device),
                k_proj: linear(D_MODEL, D_KV, 10 * i + 1, device),
                v_proj: linear(D_MODEL, D_KV, 10 * i + 2, device),
                o_proj: linear(D_MODEL, D_MODEL, 10 * i + 3, device),
            },
            mlp: Mlp {
                gate_proj: linear(D_MODEL, D_MLP, 10 * i + 4, device),
                up_proj: linear(D_MODEL, D_MLP, 10 * i + 5, device),
                down_proj: linear(D_MLP, D_MODEL, 10 * i + 6, device),
            },
        })
        .collect();
    Decoder { layers }
}

/// Per-parameter gradients for both tasks, made once and re-registered per step (cheap clones).
struct Grads {
    rec: Vec<(burn::module::ParamId, Tensor<2>)>,
    search: Vec<(burn::module::ParamId, Tensor<2>)>,
}

impl Grads {
    fn new(model: &Decoder, device: &Device) -> Self {
        let mut rec = Vec::new();
        let mut search = Vec::new();
        for (i, layer) in model.layers.iter().enumerate() {
            let params = [
                &layer.self_attn.q_proj,
                &layer.self_attn.k_proj,
                &layer.self_attn.v_proj,
                &layer.self_attn.o_proj,
                &layer.mlp.gate_proj,
                &layer.mlp.up_proj,
                &layer.mlp.down_proj,
            ];
            for (j, p) in params.into_iter().enumerate() {
                let shape = p.weight.val().dims();
                let seed = 1000 + 10 * i as u64 + j as u64;
                rec.push((p.weight.id, random(shape, seed, 1e-3, device)));
                search.push((p.weight.id, random(shape, seed + 500_000, 1e-3, device)));
            }
        }
        Self { rec, search }
    }

    fn step(&self) -> StepGradients {
        let task = |list: &[(burn::module::ParamId, Tensor<2>)], loss| {
            let mut grads = GradientsParams::new();
            for (id, g) in list {
                grads.register(*id, g.clone());
            }
            TaskGradient { grads, samples: 16, loss }
        };
        StepGradients {
            rec: Some(task(&self.rec, 2.1)),
            search: Some(task(&self.search, 1.7)),
            shared: None,
        }
    }
}

fn config(method: Method, rank: usize, svd: SvdMethod) -> OptimizerConfig {
    let mut c = OptimizerConfig::for_method(method);
    c.gems.rank = rank;
    c.gems.svd = svd;
    c.gems.null_space = false; // no projectors registered: the step cost without them
    c.gems.update_proj_gap = 1_000_000;
    c
}

fn steps(c: &mut Criterion) {
    let device = Device::flex();
    let model = decoder(&device);
    let grads = Grads::new(&model, &device);
    let params: usize = model.num_params();
    eprintln!("decoder matrices: {} parameters in {} matrices", params, 7 * LAYERS);
    let mut group = c.benchmark_group("step");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20));
    let randomized = SvdMethod::Randomized(RandomizedSvdConfig::default());
    let cases = [
        ("full", Method::Full, 0),
        ("galore/r32", Method::Galore, 32),
        ("galore/r128", Method::Galore, 128),
        ("gems/r32", Method::Gems, 32),
        ("gems/r128", Method::Gems, 128),
    ];
    for (name, method, rank) in cases {
        let mut optimizer = Optimizer::new(config(method, rank.max(1), randomized)).unwrap();
        // The first step computes the bases; time the steady state.
        let (warm, _) = optimizer.step(1e-4, &model, grads.step()).unwrap();
        eprintln!(
            "state bytes {name}: {} ({:.1} MB; AdamW on the same matrices: {:.1} MB)",
            optimizer.state_bytes(),
            optimizer.state_bytes() as f64 / 1e6,
            (8 * params) as f64 / 1e6
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                let (next, _) = optimizer.step(1e-4, black_box(&warm), grads.step()).unwrap();
                // Force the lazy device work to finish inside the timing.
                next.layers[LAYERS - 1].mlp.down_proj.weight.val().into_data()
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("refresh");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(30));
    group.bench_function("randomized/r32", |b| {
        b.iter(|| {
            let mut optimizer = Optimizer::new(config(Method::Gems, 32, randomized)).unwrap();
            let (next, _) = optimizer.step(1e-4, black_box(&model), grads.step()).unwrap();
            next.layers[LAYERS - 1].mlp.down_proj.weight.val().into_data()
        })
    });
    group.finish();

    // An exact refresh is 630 f64 SVDs (tens of seconds): timed by hand, median of 3, instead
    // of criterion's minimum of 10 samples.
    let mut times: Vec<f64> = (0..3)
        .map(|_| {
            let started = std::time::Instant::now();
            let mut optimizer = Optimizer::new(config(Method::Gems, 32, SvdMethod::Exact)).unwrap();
            let (next, _) = optimizer.step(1e-4, &model, grads.step()).unwrap();
            next.layers[LAYERS - 1].mlp.down_proj.weight.val().into_data();
            started.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    eprintln!(
        "refresh/exact/r32 (first gems step, 3 runs): median {:.2} s, min {:.2} s, max {:.2} s",
        times[1], times[0], times[2]
    );
}

/// Criterion's macros emit an undocumented `pub fn`; a private module keeps `missing_docs` quiet.
mod group {
    criterion::criterion_group!(benches, super::steps);
}
criterion_main!(group::benches);
