//! Integration tests of gems-optim: every method against an independent numpy reference
//! (`tests/fixtures/gen_reference.py`), identities, accumulation and resume equivalence,
//! non-finite handling, state accounting, and a toy two-task model trained by each method.

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use gems_optim::*;
use gems_subspace::{
    NullSpaceProjector, NullSpaceRule, ProjectionType, ProjectorSide, SecondMomentAccumulator,
    SvdMethod,
};
use serde_json::Value;

#[derive(Module, Debug)]
struct Toy {
    tall: Param<Tensor<2>>,
    wide: Param<Tensor<2>>,
    bias: Param<Tensor<1>>,
}

fn device() -> Device {
    Device::flex()
}

fn matrix(v: &Value) -> Tensor<2> {
    let rows: Vec<Vec<f32>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect();
    let (m, n) = (rows.len(), rows[0].len());
    Tensor::from_data(TensorData::new(rows.concat(), [m, n]), &device())
}

fn vector(v: &Value) -> Tensor<1> {
    let values: Vec<f32> =
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let n = values.len();
    Tensor::from_data(TensorData::new(values, [n]), &device())
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f64> {
    t.into_data().convert::<f64>().try_into_vec::<f64>().unwrap()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn flatten(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(flatten).collect(),
        other => vec![other.as_f64().unwrap()],
    }
}

fn reference() -> Value {
    let text = include_str!("fixtures/reference.json");
    serde_json::from_str(text).expect("fixture parses")
}

fn toy_from(init: &Value) -> Toy {
    Toy {
        tall: Param::from_tensor(matrix(&init["tall"])),
        wide: Param::from_tensor(matrix(&init["wide"])),
        bias: Param::from_tensor(vector(&init["bias"])),
    }
}

fn task_grads(toy: &Toy, g: &Value) -> GradientsParams {
    let mut grads = GradientsParams::new();
    grads.register(toy.tall.id, matrix(&g["tall"]));
    grads.register(toy.wide.id, matrix(&g["wide"]));
    grads.register(toy.bias.id, vector(&g["bias"]));
    grads
}

fn step_gradients(toy: &Toy, step: &Value) -> StepGradients {
    StepGradients {
        rec: Some(TaskGradient {
            grads: task_grads(toy, &step["rec"]),
            samples: step["n_rec"].as_u64().unwrap() as usize,
            loss: step["loss_rec"].as_f64().unwrap(),
        }),
        search: Some(TaskGradient {
            grads: task_grads(toy, &step["search"]),
            samples: step["n_src"].as_u64().unwrap() as usize,
            loss: step["loss_src"].as_f64().unwrap(),
        }),
        shared: None,
    }
}

fn config_for(case: &Value, hyper: &Value) -> OptimizerConfig {
    let method = match case["method"].as_str().unwrap() {
        "gems" => Method::Gems,
        "galore" => Method::Galore,
        "full" => Method::Full,
        "pcgrad" => Method::PcGrad,
        other => panic!("unknown method {other}"),
    };
    let mut c = OptimizerConfig::for_method(method);
    c.beta1 = hyper["beta1"].as_f64().unwrap();
    c.beta2 = hyper["beta2"].as_f64().unwrap();
    c.eps = hyper["eps"].as_f64().unwrap();
    c.weight_decay = hyper["weight_decay"].as_f64().unwrap();
    c.targets = vec!["tall".into(), "wide".into()];
    c.layout = WeightLayout::InOut;
    c.gems.rank = hyper["rank"].as_u64().unwrap() as usize;
    c.gems.update_proj_gap = hyper["update_proj_gap"].as_u64().unwrap();
    c.gems.svd = SvdMethod::Exact;
    let flag = |name: &str| case.get(name).and_then(Value::as_bool);
    if let Some(v) = flag("null_space") {
        c.gems.null_space = v;
    }
    c.gems.complement = flag("complement").unwrap_or(false);
    c.gems.strict_null_space = flag("strict").unwrap_or(false);
    if let Some(v) = flag("single_subspace") {
        c.gems.single_subspace = v;
    }
    if case.get("gates").and_then(Value::as_str) == Some("unit") {
        c.gems.gates = GatePolicy::Unit;
    }
    c.gems.moments = match case.get("moments").and_then(Value::as_str) {
        Some("reset") => MomentPolicy::Reset,
        Some("rotate") => MomentPolicy::Rotate,
        _ => MomentPolicy::Keep,
    };
    if let Some(p) = case.get("proj_type").and_then(Value::as_str) {
        c.gems.proj_type = p.parse::<ProjectionType>().unwrap();
    }
    if let Some(s) = case.get("scale").and_then(Value::as_f64) {
        c.gems.scale = s;
    }
    c
}

fn projector(acts: &Value, tau: f64) -> Arc<NullSpaceProjector> {
    let rows = matrix(acts);
    let [_, m] = rows.dims();
    let mut acc = SecondMomentAccumulator::new(m).unwrap();
    let host = gems_subspace::matrix_from_tensor(&rows).unwrap();
    // Accumulate from the f64 values of the fixture, not the f32 tensor, to match numpy.
    let exact = {
        let flat = flatten(acts);
        faer::Mat::from_fn(host.nrows(), m, |i, j| flat[i * m + j])
    };
    acc.add_rows(exact.as_ref()).unwrap();
    Arc::new(acc.projector(NullSpaceRule::Absolute { tau }, ProjectorSide::Output).unwrap())
}

#[test]
fn every_method_matches_the_numpy_reference() {
    let fixture = reference();
    let hyper = &fixture["hyper"];
    let lr = hyper["lr"].as_f64().unwrap();
    let tau = hyper["tau"].as_f64().unwrap();
    let mut failures = Vec::new();
    let cases = fixture["cases"].as_array().unwrap();
    let steps = fixture["steps"].as_array().unwrap();
    // An empty or truncated fixture would make the loop below pass without comparing anything.
    assert!(cases.len() >= 5, "the fixture has {} cases", cases.len());
    assert!(steps.len() >= 3, "the fixture has {} steps", steps.len());
    let mut compared = 0usize;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        assert_eq!(
            case["expected"].as_array().unwrap().len(),
            steps.len(),
            "{name}: expected values for every step"
        );
        let config = config_for(&case["config"], hyper);
        let mut optimizer = Optimizer::new(config).unwrap();
        for path in ["tall", "wide"] {
            optimizer.set_null_space_projector(path, projector(&fixture["activations"][path], tau));
        }
        let mut toy = toy_from(&fixture["init"]);
        for (i, (step, expected)) in fixture["steps"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["expected"].as_array().unwrap())
            .enumerate()
        {
            let grads = step_gradients(&toy, step);
            let (next, report) = optimizer.step(lr, &toy, grads).unwrap();
            assert!(report.skipped.is_none());
            toy = next;
            for (path, got) in [
                ("tall", values(toy.tall.val())),
                ("wide", values(toy.wide.val())),
                ("bias", values(toy.bias.val())),
            ] {
                let want = flatten(&expected[path]);
                assert_eq!(got.len(), want.len(), "{name}: `{path}` size");
                compared += 1;
                let diff = max_diff(&got, &want);
                if diff > 1e-5 {
                    failures.push(format!("{name}: step {} `{path}` differs by {diff:.2e}", i + 1));
                }
            }
        }
    }
    assert_eq!(compared, cases.len() * steps.len() * 3);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn null_space_projectors_of_the_fixture_keep_the_expected_directions() {
    let fixture = reference();
    // Activations are rank 3 plus 1e-3 noise: m - 3 directions fall below tau.
    assert_eq!(projector(&fixture["activations"]["tall"], 2e-2).null_directions(), 12 - 3);
    assert_eq!(projector(&fixture["activations"]["wide"], 2e-2).null_directions(), 6 - 3);
}

/// Identity projectors (all eigenvalues 0 < tau) for both matrices.
fn identity_projectors(optimizer: &mut Optimizer) {
    for (path, m) in [("tall", 12), ("wide", 6)] {
        let k = faer::Mat::<f64>::zeros(m, m);
        let p = NullSpaceProjector::from_second_moment(
            k.as_ref(),
            NullSpaceRule::default(),
            ProjectorSide::Output,
        )
        .unwrap();
        assert_eq!(p.null_directions(), m);
        optimizer.set_null_space_projector(path, Arc::new(p));
    }
}

#[test]
fn gems_with_identity_projector_and_zero_task_gradients_equals_galore() {
    let fixture = reference();
    let hyper = &fixture["hyper"];
    let gems_config = config_for(&serde_json::json!({"method": "gems"}), hyper);
    let galore_config = config_for(&serde_json::json!({"method": "galore"}), hyper);
    let mut gems = Optimizer::new(gems_config).unwrap();
    identity_projectors(&mut gems);
    let mut galore = Optimizer::new(galore_config).unwrap();
    let (mut a, mut b) = (toy_from(&fixture["init"]), toy_from(&fixture["init"]));
    for step in fixture["steps"].as_array().unwrap() {
        let zero = |toy: &Toy| {
            let mut g = GradientsParams::new();
            g.register(toy.tall.id, toy.tall.val().zeros_like());
            g.register(toy.wide.id, toy.wide.val().zeros_like());
            g.register(toy.bias.id, toy.bias.val().zeros_like());
            TaskGradient { grads: g, samples: 4, loss: 1.0 }
        };
        let grads_a = StepGradients {
            rec: Some(zero(&a)),
            search: Some(zero(&a)),
            shared: Some(task_grads(&a, &step["rec"])),
        };
        let grads_b =
            StepGradients { rec: None, search: None, shared: Some(task_grads(&b, &step["rec"])) };
        a = gems.step(1e-2, &a, grads_a).unwrap().0;
        b = galore.step(1e-2, &b, grads_b).unwrap().0;
    }
    assert!(max_diff(&values(a.tall.val()), &values(b.tall.val())) < 1e-6);
    assert!(max_diff(&values(a.wide.val()), &values(b.wide.val())) < 1e-6);
    assert!(max_diff(&values(a.bias.val()), &values(b.bias.val())) < 1e-6);
}

#[test]
fn full_rank_with_refresh_every_step_keeps_the_whole_gradient() {
    let fixture = reference();
    let mut config = config_for(&serde_json::json!({"method": "galore"}), &fixture["hyper"]);
    config.gems.rank = 64; // clipped to min(m, n)
    config.gems.update_proj_gap = 1;
    let mut optimizer = Optimizer::new(config).unwrap();
    let toy = toy_from(&fixture["init"]);
    let step = &fixture["steps"][0];
    optimizer
        .step(
            1e-2,
            &toy,
            StepGradients { shared: Some(task_grads(&toy, &step["rec"])), ..Default::default() },
        )
        .unwrap();
    for (path, stored) in
        [("tall", matrix(&step["rec"]["tall"])), ("wide", matrix(&step["rec"]["wide"]))]
    {
        let state = optimizer.matrix_state(path).unwrap();
        let basis = state.subspaces[0].basis.as_ref().unwrap();
        assert_eq!(basis.rank(), state.shape[0].min(state.shape[1]));
        let g = stored; // bases act on the matrix as stored
        let back =
            basis.back_project_tensor(basis.project_tensor(g.clone()).unwrap(), 1.0).unwrap();
        assert!(max_diff(&values(back), &values(g)) < 1e-5, "{path}");
    }
}

#[test]
fn non_finite_gradients_and_losses_skip_the_step_and_keep_state() {
    let fixture = reference();
    let config =
        config_for(&serde_json::json!({"method": "gems", "null_space": false}), &fixture["hyper"]);
    let mut optimizer = Optimizer::new(config).unwrap();
    let toy = toy_from(&fixture["init"]);
    let (toy, _) = optimizer.step(1e-2, &toy, step_gradients(&toy, &fixture["steps"][0])).unwrap();
    let before = values(toy.tall.val());
    let bytes = optimizer.state_bytes();

    let mut grads = step_gradients(&toy, &fixture["steps"][1]);
    let rec = grads.rec.as_mut().unwrap();
    let mut bad = values(toy.wide.val());
    bad[3] = f64::NAN;
    rec.grads.register(
        toy.wide.id,
        Tensor::<1>::from_data(TensorData::new(bad, [60]), &device()).reshape([10, 6]),
    );
    let (same, report) = optimizer.step(1e-2, &toy, grads).unwrap();
    assert_eq!(report.skipped.as_deref(), Some("non-finite gradient in `wide`"));
    assert_eq!((optimizer.steps(), optimizer.skipped_steps()), (1, 1));
    assert_eq!(values(same.tall.val()), before);
    assert_eq!(optimizer.state_bytes(), bytes);

    let mut grads = step_gradients(&toy, &fixture["steps"][1]);
    grads.search.as_mut().unwrap().loss = f64::INFINITY;
    let (_, report) = optimizer.step(1e-2, &toy, grads).unwrap();
    assert!(report.skipped.unwrap().contains("non-finite loss"));
    assert_eq!(optimizer.skipped_steps(), 2);
    // The next finite step proceeds as step 2.
    let (_, report) =
        optimizer.step(1e-2, &toy, step_gradients(&toy, &fixture["steps"][1])).unwrap();
    assert_eq!(report.step, 2);
}

#[test]
fn wrong_projector_is_an_error_and_leaves_state_unchanged() {
    let fixture = reference();
    let config = config_for(&serde_json::json!({"method": "gems"}), &fixture["hyper"]);
    let mut optimizer = Optimizer::new(config).unwrap();
    // The wide matrix is math 6 x 10: an output-side projector must be 6 x 6, not 10 x 10.
    let k = faer::Mat::<f64>::identity(10, 10);
    let p = NullSpaceProjector::from_second_moment(
        k.as_ref(),
        NullSpaceRule::default(),
        ProjectorSide::Output,
    )
    .unwrap();
    optimizer.set_null_space_projector("wide", Arc::new(p));
    let toy = toy_from(&fixture["init"]);
    let err = optimizer.step(1e-2, &toy, step_gradients(&toy, &fixture["steps"][0])).unwrap_err();
    assert!(err.to_string().contains("parameter `wide`"), "{err}");
    assert_eq!(optimizer.steps(), 0);
    assert_eq!(optimizer.state_bytes(), 0);
}

#[test]
fn state_bytes_match_the_analytic_count() {
    let fixture = reference();
    let toy = toy_from(&fixture["init"]);
    let run = |config: OptimizerConfig| {
        let mut optimizer = Optimizer::new(config).unwrap();
        optimizer.step(1e-2, &toy, step_gradients(&toy, &fixture["steps"][0])).unwrap();
        optimizer.state_bytes()
    };
    let hyper = &fixture["hyper"];
    // AdamW: 2 moments per element: tall 96, wide 60, bias 5.
    assert_eq!(
        run(config_for(&serde_json::json!({"method": "full"}), hyper)),
        4 * 2 * (96 + 60 + 5)
    );
    // GaLore rank 4: tall is math 12x8, right side: 2*m*r + r*n; wide is 6x10, left: 2*r*n + m*r.
    let galore = 4 * (2 * 12 * 4 + 4 * 8 + 2 * 4 * 10 + 6 * 4 + 2 * 5);
    assert_eq!(run(config_for(&serde_json::json!({"method": "galore"}), hyper)), galore);
    // GEMS adds two rank-2 task subspaces per matrix.
    let tasks = 2 * (2 * 12 * 2 + 2 * 8 + 2 * 2 * 10 + 6 * 2);
    assert_eq!(
        run(config_for(&serde_json::json!({"method": "gems", "null_space": false}), hyper)),
        galore + 4 * tasks
    );
}

#[test]
fn resumed_run_continues_exactly() {
    let fixture = reference();
    let config =
        config_for(&serde_json::json!({"method": "gems", "moments": "rotate"}), &fixture["hyper"]);
    let tau = fixture["hyper"]["tau"].as_f64().unwrap();
    let with_projectors = |mut o: Optimizer| {
        for path in ["tall", "wide"] {
            o.set_null_space_projector(path, projector(&fixture["activations"][path], tau));
        }
        o
    };
    let steps = fixture["steps"].as_array().unwrap();
    let mut straight = with_projectors(Optimizer::new(config.clone()).unwrap());
    let mut toy = toy_from(&fixture["init"]);
    for step in steps {
        toy = straight.step(1e-2, &toy, step_gradients(&toy, step)).unwrap().0;
    }

    let mut first = with_projectors(Optimizer::new(config).unwrap());
    let mut resumed_toy = toy_from(&fixture["init"]);
    for step in &steps[..2] {
        resumed_toy = first.step(1e-2, &resumed_toy, step_gradients(&resumed_toy, step)).unwrap().0;
    }
    let dir = std::env::temp_dir().join(format!("gems-optim-resume-{}", std::process::id()));
    first.save(&dir).unwrap();
    let mut second = with_projectors(Optimizer::load(&dir, &device()).unwrap());
    assert_eq!(second.steps(), 2);
    assert_eq!(second.config(), first.config());
    resumed_toy =
        second.step(1e-2, &resumed_toy, step_gradients(&resumed_toy, &steps[2])).unwrap().0;
    for (a, b) in [
        (values(toy.tall.val()), values(resumed_toy.tall.val())),
        (values(toy.wide.val()), values(resumed_toy.wide.val())),
        (values(toy.bias.val()), values(resumed_toy.bias.val())),
    ] {
        assert!(max_diff(&a, &b) <= 1e-6);
    }
    // A damaged state file is an error naming the file.
    std::fs::write(dir.join("optimizer.safetensors"), b"truncated").unwrap();
    let err = Optimizer::load(&dir, &device()).unwrap_err();
    assert!(err.to_string().contains("optimizer.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Rewrites the saved state's tensors through `edit(name, shape, bytes)`.
fn edit_state(dir: &std::path::Path, edit: impl Fn(&str, &mut Vec<usize>, &mut Vec<u8>)) {
    use safetensors::{SafeTensors, tensor::TensorView};
    let path = dir.join("optimizer.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| (name, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    for (name, _, shape, data) in owned.iter_mut() {
        edit(name, shape, data);
    }
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A restored state whose moments do not fit the gradients is an error naming the parameter
/// (it used to panic inside Burn), and a state holding NaN is never written.
#[test]
fn damaged_moments_are_errors_and_never_saved() {
    let fixture = reference();
    let config =
        config_for(&serde_json::json!({"method": "gems", "null_space": false}), &fixture["hyper"]);
    let steps = fixture["steps"].as_array().unwrap();
    let mut optimizer = Optimizer::new(config).unwrap();
    let toy = toy_from(&fixture["init"]);
    let toy = optimizer.step(1e-2, &toy, step_gradients(&toy, &steps[0])).unwrap().0;
    let dir = tempfile::tempdir().unwrap();
    optimizer.save(dir.path()).unwrap();

    let transposed = tempfile::tempdir().unwrap();
    optimizer.save(transposed.path()).unwrap();
    edit_state(transposed.path(), |name, shape, _| {
        if name.ends_with("/m1") && shape.len() == 2 && shape[0] != shape[1] {
            shape.swap(0, 1);
        }
    });
    let mut loaded = Optimizer::load(transposed.path(), &device()).unwrap();
    let err = loaded.step(1e-2, &toy, step_gradients(&toy, &steps[1])).unwrap_err().to_string();
    assert!(err.contains("saved Adam moment shape"), "{err}");

    edit_state(dir.path(), |name, _, data| {
        if name.ends_with("/m2") {
            data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        }
    });
    let loaded = Optimizer::load(dir.path(), &device()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = loaded.save(out.path()).unwrap_err().to_string();
    assert!(err.contains("/m2") && err.contains("non-finite"), "{err}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
    /// Hostile bytes in either state file (truncations, flips, huge shapes in the header):
    /// loading returns an error naming the file, or a state, never a panic.
    #[test]
    fn fuzz_saved_state_files(
        which in 0usize..2,
        cut in proptest::prelude::any::<proptest::sample::Index>(),
        flips in proptest::collection::vec(
            (proptest::prelude::any::<proptest::sample::Index>(), 1u8..=255), 0..8),
        truncate in proptest::prelude::any::<bool>(),
    ) {
        let dir = saved_state();
        let name = ["optimizer.safetensors", "optimizer.json"][which];
        let path = dir.path().join(name);
        let mut bytes = std::fs::read(&path).unwrap();
        for (at, x) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= x;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        std::fs::write(&path, &bytes).unwrap();
        if let Err(e) = Optimizer::load(dir.path(), &device()) {
            let msg = e.to_string();
            proptest::prop_assert!(msg.contains("optimizer"), "{}", msg);
            proptest::prop_assert!(msg.len() < 2000, "{} bytes", msg.len());
        }
    }
}

/// A small saved GEMS state (one step of the reference fixture).
fn saved_state() -> tempfile::TempDir {
    let fixture = reference();
    let config =
        config_for(&serde_json::json!({"method": "gems", "null_space": false}), &fixture["hyper"]);
    let mut optimizer = Optimizer::new(config).unwrap();
    let toy = toy_from(&fixture["init"]);
    optimizer.step(1e-2, &toy, step_gradients(&toy, &fixture["steps"][0])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    optimizer.save(dir.path()).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// Real backward passes: accumulation, and a toy two-task problem trained by every method.
// ---------------------------------------------------------------------------------------------

/// y = x W + b with W stored [d_in, d_out] as Burn's Linear does.
#[derive(Module, Debug)]
struct Regressor {
    layers: Vec<Dense>,
}

#[derive(Module, Debug)]
struct Dense {
    weight: Param<Tensor<2>>,
    bias: Param<Tensor<1>>,
}

fn seeded(rows: usize, cols: usize, seed: u64, scale: f64, device: &Device) -> Tensor<2> {
    let mut rng = gems_rng::SplitMix64::new(seed);
    let mut v = vec![0.0; rows * cols];
    rng.fill_standard_normal(&mut v);
    let v: Vec<f32> = v.into_iter().map(|x| (x * scale) as f32).collect();
    Tensor::from_data(TensorData::new(v, [rows, cols]), device)
}

fn regressor(device: &Device) -> Regressor {
    let dims = [(16, 12), (12, 8)];
    Regressor {
        layers: dims
            .iter()
            .enumerate()
            .map(|(i, &(d_in, d_out))| Dense {
                weight: Param::from_tensor(seeded(d_in, d_out, 10 + i as u64, 0.3, device))
                    .set_require_grad(true),
                bias: Param::from_tensor(Tensor::zeros([d_out], device)).set_require_grad(true),
            })
            .collect(),
    }
}

impl Regressor {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let mut h = x;
        for (i, layer) in self.layers.iter().enumerate() {
            h = h.matmul(layer.weight.val()).add(layer.bias.val().unsqueeze());
            if i + 1 < self.layers.len() {
                h = burn::tensor::activation::tanh(h);
            }
        }
        h
    }
}

/// Two regression tasks sharing inputs, with different random teachers.
struct Tasks {
    x: Tensor<2>,
    y_rec: Tensor<2>,
    y_src: Tensor<2>,
}

fn tasks(rows: usize, device: &Device) -> Tasks {
    let x = seeded(rows, 16, 1, 1.0, device);
    let y_rec = x.clone().matmul(seeded(16, 8, 2, 0.3, device));
    let y_src = x.clone().matmul(seeded(16, 8, 3, 0.3, device)).add(y_rec.clone().mul_scalar(0.5));
    Tasks { x, y_rec, y_src }
}

fn task_gradient(model: &Regressor, x: Tensor<2>, y: Tensor<2>) -> TaskGradient {
    let rows = x.dims()[0];
    let loss = model.forward(x).sub(y).square().mean();
    let value = loss.clone().into_scalar::<f32>() as f64;
    let grads = GradientsParams::from_grads(loss.backward(), model);
    TaskGradient { grads, samples: rows, loss: value }
}

fn loss_of(model: &Regressor, x: Tensor<2>, y: Tensor<2>) -> f64 {
    model.forward(x).sub(y).square().mean().into_scalar::<f32>() as f64
}

fn regressor_config(method: Method) -> OptimizerConfig {
    let mut c = OptimizerConfig::for_method(method);
    c.targets = vec!["layers.*.weight".into()];
    c.trainable = vec!["layers.1.*".into()];
    c.gems.rank = 4;
    c.gems.update_proj_gap = 5;
    c.gems.null_space = false;
    c
}

#[test]
fn accumulated_micro_batches_equal_one_large_batch() {
    let device = Device::flex().autodiff();
    let data = tasks(24, &device);
    let model = regressor(&device);
    let slice = |t: &Tensor<2>, a: usize, b: usize| t.clone().slice([a..b, 0..t.dims()[1]]);

    // One large batch per task.
    let big = StepGradients {
        rec: Some(task_gradient(&model, data.x.clone(), data.y_rec.clone())),
        search: Some(task_gradient(&model, data.x.clone(), data.y_src.clone())),
        shared: None,
    };
    // The same rows as micro-batches of unequal sizes.
    let mut rec = GradientWindow::new();
    let mut src = GradientWindow::new();
    for (a, b) in [(0, 5), (5, 16), (16, 24)] {
        rec.add(&model, task_gradient(&model, slice(&data.x, a, b), slice(&data.y_rec, a, b)));
        src.add(&model, task_gradient(&model, slice(&data.x, a, b), slice(&data.y_src, a, b)));
    }
    assert_eq!(rec.samples(), 24);
    let accumulated =
        StepGradients { rec: rec.finish(&model), search: src.finish(&model), shared: None };
    let window_loss = accumulated.rec.as_ref().unwrap().loss;
    assert!((window_loss - big.rec.as_ref().unwrap().loss).abs() < 1e-5);

    let mut config = regressor_config(Method::Gems);
    config.gems.svd = SvdMethod::Exact;
    let mut a = Optimizer::new(config.clone()).unwrap();
    let mut b = Optimizer::new(config).unwrap();
    let (one, _) = a.step(1e-2, &model, big).unwrap();
    let (many, _) = b.step(1e-2, &model, accumulated).unwrap();
    for (x, y) in one.layers.iter().zip(&many.layers) {
        assert!(max_diff(&values(x.weight.val()), &values(y.weight.val())) < 1e-5);
        assert!(max_diff(&values(x.bias.val()), &values(y.bias.val())) < 1e-5);
    }
}

#[test]
fn a_window_of_one_micro_batch_is_that_gradient_bit_for_bit() {
    let device = Device::flex().autodiff();
    let data = tasks(12, &device);
    let model = regressor(&device);
    let alone = task_gradient(&model, data.x.clone(), data.y_rec.clone());
    let mut window = GradientWindow::new();
    window.add(&model, task_gradient(&model, data.x.clone(), data.y_rec.clone()));
    let kept = window.finish(&model).unwrap();
    assert_eq!((kept.samples, kept.loss), (alone.samples, alone.loss));
    for layer in &model.layers {
        let (w, b) = (layer.weight.id, layer.bias.id);
        let weight = |g: &GradientsParams| values(g.get::<2>(w).unwrap());
        let bias = |g: &GradientsParams| values(g.get::<1>(b).unwrap());
        assert_eq!(weight(&alone.grads), weight(&kept.grads));
        assert_eq!(bias(&alone.grads), bias(&kept.grads));
    }
}

#[test]
fn every_method_lowers_both_task_losses_on_a_toy_problem() {
    let device = Device::flex().autodiff();
    let data = tasks(64, &device);
    for method in [Method::Gems, Method::Galore, Method::Full, Method::PcGrad, Method::Lora] {
        let mut model = regressor(&device);
        let start = (
            loss_of(&model, data.x.clone(), data.y_rec.clone()),
            loss_of(&model, data.x.clone(), data.y_src.clone()),
        );
        let mut optimizer = Optimizer::new(regressor_config(method)).unwrap();
        for _ in 0..60 {
            let grads = StepGradients {
                rec: Some(task_gradient(&model, data.x.clone(), data.y_rec.clone())),
                search: Some(task_gradient(&model, data.x.clone(), data.y_src.clone())),
                shared: None,
            };
            let (next, report) = optimizer.step(1e-2, &model, grads).unwrap();
            assert!(report.skipped.is_none());
            if method == Method::Gems {
                assert_eq!(report.matrices.len(), 2);
                assert!(report.mean_cosine.is_some());
                let (g_rec, g_src) = report.gates;
                assert!((g_rec + g_src - 1.0).abs() < 1e-9);
            }
            model = next;
        }
        let end = (
            loss_of(&model, data.x.clone(), data.y_rec.clone()),
            loss_of(&model, data.x.clone(), data.y_src.clone()),
        );
        assert!(
            end.0 < 0.8 * start.0 && end.1 < 0.8 * start.1,
            "{method:?}: rec {:.4} -> {:.4}, search {:.4} -> {:.4}",
            start.0,
            end.0,
            start.1,
            end.1
        );
        if method == Method::Lora {
            // Only layer 1 is trainable: layer 0 is untouched.
            let fresh = regressor(&device);
            assert_eq!(values(model.layers[0].weight.val()), values(fresh.layers[0].weight.val()));
        }
    }
}

/// `trained_rows`: only the trailing rows of a matched AdamW parameter move, exactly as a
/// whole-parameter step moves them; the rows before keep their values and get no moments; a
/// first row beyond the parameter is an error naming it.
#[test]
fn trained_rows_update_only_the_trailing_rows() {
    let device = Device::flex().autodiff();
    let data = tasks(24, &device);
    let model = regressor(&device);
    let gradients = || StepGradients {
        rec: Some(task_gradient(&model, data.x.clone(), data.y_rec.clone())),
        search: Some(task_gradient(&model, data.x.clone(), data.y_src.clone())),
        shared: None,
    };
    let whole_config = OptimizerConfig::for_method(Method::Full);
    let mut rows_config = whole_config.clone();
    rows_config.trained_rows = vec![TrainedRows { pattern: "layers.0.weight".into(), from: 10 }];
    let mut whole = Optimizer::new(whole_config).unwrap();
    let mut rows = Optimizer::new(rows_config.clone()).unwrap();
    let (a, _) = whole.step(1e-2, &model, gradients()).unwrap();
    let (b, _) = rows.step(1e-2, &model, gradients()).unwrap();
    let (start, a0, b0) = (
        values(model.layers[0].weight.val()),
        values(a.layers[0].weight.val()),
        values(b.layers[0].weight.val()),
    );
    let cut = 10 * 12; // layers.0.weight is [16, 12]
    assert_eq!(b0[..cut], start[..cut], "rows before `from` keep their values");
    assert_ne!(a0[..cut], start[..cut]);
    assert_eq!(b0[cut..], a0[cut..], "trained rows step as in a whole-parameter step");
    assert_eq!(values(b.layers[1].weight.val()), values(a.layers[1].weight.val()));
    assert_eq!(whole.state_bytes() - rows.state_bytes(), 2 * cut * 4, "no moments for frozen rows");

    // The frozen rows' gradients steer nothing: a NaN there neither skips the step nor reaches
    // the trained rows, whose step equals the clean one.
    let mut poisoned = gradients();
    let rec = poisoned.rec.as_mut().unwrap();
    let id = model.layers[0].weight.id;
    let g = rec.grads.remove::<2>(id).unwrap();
    let mut v = g.clone().into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    v[0] = f32::NAN;
    rec.grads.register(id, Tensor::<2>::from_data(TensorData::new(v, g.dims()), &g.device()));
    let (c, report) =
        Optimizer::new(rows_config.clone()).unwrap().step(1e-2, &model, poisoned).unwrap();
    assert!(report.skipped.is_none(), "{:?}", report.skipped);
    assert_eq!(values(c.layers[0].weight.val()), b0);

    rows_config.trained_rows[0].from = 16;
    let mut beyond = Optimizer::new(rows_config).unwrap();
    let err = beyond.step(1e-2, &model, gradients()).unwrap_err().to_string();
    assert!(err.contains("layers.0.weight") && err.contains("16"), "{err}");
    assert_eq!(beyond.steps(), 0);
}

/// `step_owned` (the trainer's: in place where the module holds a parameter alone) computes
/// what `step` computes, bit for bit, over steps with and without a refresh, for subspace
/// matrices, whole AdamW parameters and AdamW on trailing rows.
#[test]
fn owned_steps_equal_borrowed_steps_bit_for_bit() {
    let device = Device::flex().autodiff();
    let data = tasks(24, &device);
    let mut full = OptimizerConfig::for_method(Method::Full);
    full.trained_rows = vec![TrainedRows { pattern: "layers.0.weight".into(), from: 10 }];
    for config in [regressor_config(Method::Gems), full] {
        let (mut borrowed, mut owned) = (regressor(&device), regressor(&device));
        let mut a = Optimizer::new(config.clone()).unwrap();
        let mut b = Optimizer::new(config).unwrap();
        let gradients = |model: &Regressor| StepGradients {
            rec: Some(task_gradient(model, data.x.clone(), data.y_rec.clone())),
            search: Some(task_gradient(model, data.x.clone(), data.y_src.clone())),
            shared: None,
        };
        for step in 1..=7 {
            let grads = gradients(&borrowed);
            borrowed = a.step(1e-2, &borrowed, grads).unwrap().0;
            let grads = gradients(&owned);
            owned = b.step_owned(1e-2, owned, grads).unwrap().0;
            for (x, y) in borrowed.layers.iter().zip(&owned.layers) {
                assert_eq!(values(x.weight.val()), values(y.weight.val()), "step {step}");
                assert_eq!(values(x.bias.val()), values(y.bias.val()), "step {step}");
            }
        }
        assert_eq!(a.steps(), b.steps());
    }
}

/// The step report says what PCGrad's conflict test read and whether the surgery acted: on
/// opposed tasks the global cosine is negative, PCGrad reports (and applies) the surgery and so
/// steps differently from `full`, which reports the same cosine and no surgery; on one task's
/// gradient twice nothing conflicts and PCGrad is `full` bit for bit.
#[test]
fn pcgrad_reports_the_global_cosine_and_acts_only_on_conflict() {
    let device = Device::flex().autodiff();
    let data = tasks(64, &device);
    let opposed = data.y_rec.clone().mul_scalar(-3.0);
    let step = |method, y_src: Tensor<2>| {
        let model = regressor(&device);
        let grads = StepGradients {
            rec: Some(task_gradient(&model, data.x.clone(), data.y_rec.clone())),
            search: Some(task_gradient(&model, data.x.clone(), y_src)),
            shared: None,
        };
        let mut config = OptimizerConfig::for_method(method);
        config.targets = Vec::new();
        let (next, report) = Optimizer::new(config).unwrap().step(1e-2, &model, grads).unwrap();
        (values(next.layers[0].weight.val()), report)
    };
    let (full, full_report) = step(Method::Full, opposed.clone());
    let (pc, pc_report) = step(Method::PcGrad, opposed);
    let cosine = full_report.global_cosine.unwrap();
    assert!(cosine < 0.0, "the opposed tasks should conflict, cosine {cosine}");
    assert_eq!(pc_report.global_cosine, Some(cosine));
    assert!(pc_report.surgery && !full_report.surgery);
    assert!(full != pc, "PCGrad's surgery changed nothing");

    let (full, full_report) = step(Method::Full, data.y_rec.clone());
    let (pc, pc_report) = step(Method::PcGrad, data.y_rec.clone());
    assert!((full_report.global_cosine.unwrap() - 1.0).abs() < 1e-6);
    assert!(!pc_report.surgery);
    assert_eq!(full, pc);
}
