//! A basis is uploaded to the device once, at the refresh that made it; the steps until the
//! next refresh reuse that copy. (`Optimizer::step` used to clone every matrix's state, which
//! emptied each basis's device copy, so every step uploaded every basis again: one host round
//! trip per matrix per step on a GPU.)
//!
//! Its own test binary: the upload count is process-wide, and tests in one binary run in
//! parallel threads.

use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use gems_optim::{Method, Optimizer, OptimizerConfig, StepGradients, TaskGradient, WeightLayout};

#[derive(Module, Debug)]
struct Two {
    tall: Param<Tensor<2>>,
    wide: Param<Tensor<2>>,
}

fn random(shape: [usize; 2], seed: u64) -> Tensor<2> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f32> = (0..shape[0] * shape[1])
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), &Device::flex())
}

fn task(model: &Two, seed: u64) -> TaskGradient {
    let mut grads = GradientsParams::new();
    grads.register(model.tall.id, random([12, 5], seed));
    grads.register(model.wide.id, random([5, 12], seed + 1));
    TaskGradient { grads, samples: 4, loss: 1.0 }
}

#[test]
fn steps_between_refreshes_do_not_upload_bases_again() {
    let mut config = OptimizerConfig::for_method(Method::Gems);
    config.targets = vec!["tall".into(), "wide".into()];
    config.layout = WeightLayout::InOut;
    config.gems.rank = 4;
    config.gems.update_proj_gap = 1000;
    config.gems.null_space = false;
    let mut optimizer = Optimizer::new(config).unwrap();
    let mut model = Two {
        tall: Param::from_tensor(random([12, 5], 1)),
        wide: Param::from_tensor(random([5, 12], 2)),
    };
    let grads = |m: &Two, step: u64| StepGradients {
        rec: Some(task(m, 10 * step)),
        search: Some(task(m, 10 * step + 5)),
        shared: None,
    };
    let before = gems_subspace::device_uploads();
    model = optimizer.step(1e-2, &model, grads(&model, 1)).unwrap().0;
    let at_refresh = gems_subspace::device_uploads() - before;
    // Two matrices x three subspaces, each uploaded once to be used.
    assert_eq!(at_refresh, 6);
    for step in 2..=5 {
        model = optimizer.step(1e-2, &model, grads(&model, step)).unwrap().0;
    }
    assert_eq!(gems_subspace::device_uploads() - before, at_refresh, "steps 2-5 uploaded bases");
    assert_eq!(optimizer.steps(), 5);
}
