//! Fused element-wise kernels for forward passes that record no autodiff graph, on the CPU.
//!
//! burn-flex runs every element-wise op as its own serial pass over a fresh buffer, and its
//! sigmoid calls the scalar `expf` once per element: in the frozen lower layers of the CPU
//! preset, `silu(gate) * up` alone took more time than the layers' matrix products. Where no
//! gradient flows (a frozen layer, or any pass on a device without autodiff) and the device is
//! flex, the kernels here do such a chain in one pass, split across the rayon pool, in place
//! in the buffer of an input that nothing else holds.
//!
//! Every kernel computes exactly what the Burn ops it replaces compute, operation for
//! operation in f32 (same `expf`, same rounding order, no fused multiply-add), so a model gives
//! bit-identical outputs with or without it; the tests compare the two bit for bit. Anywhere
//! else (a graph is recorded, another backend, another dtype, shapes that would broadcast) the
//! Burn ops run.

use burn::tensor::activation::silu;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor, TensorData};
use gems_host::{HOST_CHUNK, from_host, host_data, host_kernel_applies};
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = HOST_CHUNK;

/// The logistic function with burn-flex's values: it computes `1 / (1 + exp(-x))` for
/// `x >= 0` and `exp(x) / (1 + exp(x))` otherwise. Both exponentials are `exp(-|x|)`, so one
/// `expf` serves both sides and the sign only selects the formula: no branch to mispredict on
/// activations of random sign.
#[inline]
fn sigmoid(x: f32) -> f32 {
    let e = (-x.abs()).exp();
    let (num, den) = (if x >= 0.0 { 1.0 } else { e }, 1.0 + e);
    num / den
}

/// `silu(gate) * up`, the SwiGLU activation, i.e. `(gate * sigmoid(gate)) * up` with every
/// product rounded to f32 in that order, as `burn::tensor::activation::silu` followed by a
/// multiplication computes it.
///
/// `graph_free` says that no gradient is wanted through this call (the caller knows: a frozen
/// layer); on a device without autodiff that holds anyway.
pub fn swiglu(gate: Tensor<3>, up: Tensor<3>, graph_free: bool) -> Tensor<3> {
    let fused = host_kernel_applies(&gate, graph_free)
        && host_kernel_applies(&up, graph_free)
        && gate.dims() == up.dims();
    if !fused {
        return silu(gate) * up;
    }
    let autodiff = gate.is_autodiff();
    let mut g = host_data(gate);
    let u = host_data(up);
    match (g.as_mut_slice::<f32>(), u.as_slice::<f32>()) {
        (Ok(gs), Ok(us)) => {
            gs.par_chunks_mut(CHUNK).zip(us.par_chunks(CHUNK)).for_each(|(gs, us)| {
                for (g, &u) in gs.iter_mut().zip(us) {
                    let x = *g;
                    *g = (x * sigmoid(x)) * u;
                }
            });
            from_host(g, autodiff)
        }
        // Unreachable for f32 data; the Burn ops give the same values.
        _ => silu(from_host::<3>(g, autodiff)) * from_host::<3>(u, autodiff),
    }
}

/// Rotate-half RoPE tables of one batch: cosines and sines `[b, 1, t, head_dim]` on the
/// device, and the same values on the host (row `(b, t)` starting at `(b * t_len + t) *
/// head_dim`), which the fused kernel reads.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// Cosines on the device.
    pub cos: Tensor<4>,
    /// Sines on the device.
    pub sin: Tensor<4>,
    /// Cosines on the host.
    pub host_cos: Vec<f32>,
    /// Sines on the host.
    pub host_sin: Vec<f32>,
}

impl RopeTables {
    /// Tables from host rows of `b * t` positions, `head_dim` values each.
    pub fn new(
        cos: Vec<f32>,
        sin: Vec<f32>,
        [b, t, head_dim]: [usize; 3],
        device: &Device,
    ) -> Self {
        let shape = [b, 1, t, head_dim];
        Self {
            cos: Tensor::from_data(TensorData::new(cos.clone(), shape), device),
            sin: Tensor::from_data(TensorData::new(sin.clone(), shape), device),
            host_cos: cos,
            host_sin: sin,
        }
    }
}

/// `x * cos + rotate_half(x) * sin` on `[b, heads, t, head_dim]`, as Burn ops (the reference
/// of [`rope`], and its path where no kernel applies).
pub fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let hd = x.dims()[3];
    let half = hd / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

/// RoPE of a projection's output: `x` is `[b, t, heads * head_dim]`, the result
/// `[b, heads, t, head_dim]`, equal bit for bit to
/// `apply_rope(x.reshape([b, t, heads, head_dim]).swap_dims(1, 2), cos, sin)` (each product
/// rounded, then the sum; the negation is exact). The fused kernel reads `x` in place and
/// writes the result once, instead of five strided passes.
pub fn rope(x: Tensor<3>, heads: usize, tables: &RopeTables, graph_free: bool) -> Tensor<4> {
    let [b, t, width] = x.dims();
    let hd = tables.cos.dims()[3];
    let fits = width == heads * hd
        && hd.is_multiple_of(2)
        && tables.cos.dims() == [b, 1, t, hd]
        && tables.host_cos.len() == b * t * hd
        && tables.host_sin.len() == b * t * hd;
    if !(fits && host_kernel_applies(&x, graph_free)) {
        let x = x.reshape([b, t, heads, hd]).swap_dims(1, 2);
        return apply_rope(x, &tables.cos, &tables.sin);
    }
    let autodiff = x.is_autodiff();
    let data = host_data(x);
    let Ok(src) = data.as_slice::<f32>() else {
        // Unreachable for f32 data; the Burn ops give the same values.
        let x = from_host::<3>(data, autodiff).reshape([b, t, heads, hd]).swap_dims(1, 2);
        return apply_rope(x, &tables.cos, &tables.sin);
    };
    let (cos, sin, half) = (&tables.host_cos, &tables.host_sin, hd / 2);
    let mut out = vec![0f32; b * heads * t * hd];
    out.par_chunks_mut(t * hd).enumerate().for_each(|(bh, block)| {
        let (bi, hi) = (bh / heads, bh % heads);
        for (ti, o) in block.chunks_exact_mut(hd).enumerate() {
            let x = &src[((bi * t + ti) * heads + hi) * hd..][..hd];
            let at = (bi * t + ti) * hd;
            let (c, s) = (&cos[at..at + hd], &sin[at..at + hd]);
            for j in 0..half {
                o[j] = x[j] * c[j] + (-x[j + half]) * s[j];
            }
            for j in half..hd {
                o[j] = x[j] * c[j] + x[j - half] * s[j];
            }
        }
    });
    from_host(TensorData::new(out, [b, heads, t, hd]), autodiff)
}

/// Causal scaled dot-product attention with an additive key bias, `q [b, h, t, d]` against
/// `k`, `v [b, h, tk, d]`; `key_bias` is `[b, 1, 1, tk]` (or absent).
///
/// Equal bit for bit to `burn::tensor::module::attention(q, k, v, None, bias, causal)` on an
/// autodiff device, which runs Burn's `attention_fallback`: scores `Q K^T * scale`, the causal
/// mask, the bias, a NaN-safe softmax (row maxima clamped to the smallest finite f32, sums to the
/// smallest positive normal), times V. Where the kernel applies (a graph-free pass on an
/// autodiff flex device), the products and the row sums still run as Burn ops (their summation
/// order is the backend's), and the element-wise chain between them (scale, mask, bias, maximum,
/// shift, exp; then the division) runs in two parallel passes in place instead of about ten
/// serial ones. A device without autodiff keeps the backend's own attention (flex: a fused
/// kernel with other rounding), as before.
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    key_bias: Option<Tensor<4>>,
    causal: bool,
    graph_free: bool,
) -> Tensor<4> {
    let [b, h, t, d] = q.dims();
    let tk = k.dims()[2];
    let fits = key_bias.as_ref().is_none_or(|m| m.dims() == [b, 1, 1, tk]) && t > 0 && tk > 0;
    if !(fits && graph_free && q.is_autodiff() && host_kernel_applies(&q, true)) {
        let bias = key_bias.map(|m| m.expand([b, h, t, tk]));
        let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: causal };
        return burn::tensor::module::attention(q, k, v, None, bias, options);
    }
    let autodiff = q.is_autodiff();
    let bias: Option<Vec<f32>> = key_bias.and_then(|m| host_data(m).try_into_vec::<f32>().ok());
    // As the fallback: scale 1 / sqrt(d) in f64, applied as an f32 scalar.
    let scale = (1.0 / (d as f64).sqrt()) as f32;
    let offset = tk as i64 - t as i64;
    let mut scores = host_data(q.matmul(k.transpose()));
    let Ok(s) = scores.as_mut_slice::<f32>() else {
        unreachable!("f32 checked by host_kernel_applies")
    };
    s.par_chunks_mut(t * tk).enumerate().for_each(|(bh, block)| {
        let bias = bias.as_ref().map(|m| &m[(bh / h) * tk..][..tk]);
        for (i, row) in block.chunks_exact_mut(tk).enumerate() {
            let mut max = f32::NEG_INFINITY;
            for (j, x) in row.iter_mut().enumerate() {
                let mut y = *x * scale;
                if causal && j as i64 > i as i64 + offset {
                    y = f32::NEG_INFINITY;
                }
                if let Some(m) = bias {
                    y += m[j];
                }
                *x = y;
                max = max.max(y);
            }
            let max = max.max(f32::MIN);
            for x in row.iter_mut() {
                *x = (*x - max).exp();
            }
        }
    });
    let numerator = from_host::<4>(scores, autodiff);
    let Ok(sums) = host_data(numerator.clone().sum_dim(3)).try_into_vec::<f32>() else {
        unreachable!("f32 checked by host_kernel_applies")
    };
    let mut numerator = host_data(numerator);
    let Ok(e) = numerator.as_mut_slice::<f32>() else {
        unreachable!("f32 checked by host_kernel_applies")
    };
    e.par_chunks_mut(tk).zip(sums.par_iter()).for_each(|(row, &sum)| {
        let sum = sum.max(f32::MIN_POSITIVE);
        for x in row {
            *x /= sum;
        }
    });
    from_host::<4>(numerator, autodiff).matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // A spread of magnitudes and both signs, including the branch point and large inputs.
        let mut v: Vec<f32> = (0..n)
            .map(|i| {
                let k = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
                ((k >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 24.0
            })
            .collect();
        v[..6].copy_from_slice(&[0.0, -0.0, 88.0, -88.0, 1e-30, -104.0]);
        v
    }

    fn bits<const D: usize>(t: Tensor<D>) -> Vec<u32> {
        t.into_data().try_to_vec::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn swiglu_is_bit_identical_to_the_burn_ops_on_both_devices() {
        let dims = [3, 7, 5000]; // more than one chunk
        let n = dims.iter().product();
        for device in [Device::flex(), Device::flex().autodiff()] {
            let t = |seed| Tensor::<3>::from_data(TensorData::new(values(n, seed), dims), &device);
            let reference = silu(t(1)) * t(2);
            let fused = swiglu(t(1), t(2), true);
            assert_eq!(fused.is_autodiff(), device.is_autodiff());
            assert_eq!(bits(fused), bits(reference));
        }
    }

    #[test]
    fn rope_is_bit_identical_to_the_burn_ops_on_both_devices() {
        let (b, t, heads, hd) = (3, 5, 4, 16);
        let angles = values(b * t * hd, 7);
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        for device in [Device::flex(), Device::flex().autodiff()] {
            let tables = RopeTables::new(cos.clone(), sin.clone(), [b, t, hd], &device);
            let x = || {
                let v = values(b * t * heads * hd, 8);
                Tensor::<3>::from_data(TensorData::new(v, [b, t, heads * hd]), &device)
            };
            let reference = apply_rope(
                x().reshape([b, t, heads, hd]).swap_dims(1, 2),
                &tables.cos,
                &tables.sin,
            );
            let fused = rope(x(), heads, &tables, true);
            assert_eq!(fused.dims(), [b, heads, t, hd]);
            assert_eq!(bits(fused), bits(reference));
            // Tables that do not fit the input fall back to the Burn ops (which then fail
            // loudly on a real mismatch rather than reading the wrong rows).
            let short = RopeTables { host_cos: cos[..hd].to_vec(), ..tables.clone() };
            assert_eq!(
                bits(rope(x(), heads, &short, true)),
                bits(rope(x(), heads, &tables, false))
            );
        }
    }

    #[test]
    fn attention_is_bit_identical_to_burns_on_an_autodiff_device() {
        let device = Device::flex().autodiff();
        let (b, h, d) = (2, 3, 8);
        // (query length, key length, causal): a prompt, one cached step, a non-causal row.
        for (t, tk, causal) in [(6, 6, true), (1, 7, false), (4, 9, true)] {
            let x = |n, seed, dims| {
                Tensor::<4>::from_data(TensorData::new(values(n, seed), dims), &device)
            };
            let q = || x(b * h * t * d, 11, [b, h, t, d]).mul_scalar(0.2);
            let k = || x(b * h * tk * d, 12, [b, h, tk, d]).mul_scalar(0.2);
            let v = || x(b * h * tk * d, 13, [b, h, tk, d]);
            let mut pad = vec![0.0f32; b * tk];
            pad[0] = -1e9; // a padded key in the first row
            let bias =
                || Tensor::<4>::from_data(TensorData::new(pad.clone(), [b, 1, 1, tk]), &device);
            for with_bias in [false, true] {
                let m = || with_bias.then(bias);
                let reference = attention(q(), k(), v(), m(), causal, false);
                let fused = attention(q(), k(), v(), m(), causal, true);
                assert_eq!(bits(fused), bits(reference), "t {t} tk {tk} bias {with_bias}");
            }
        }
    }

    #[test]
    fn swiglu_keeps_the_graph_where_one_is_wanted() {
        let device = Device::flex().autodiff();
        let dims = [2, 3, 4];
        let gate =
            Tensor::<3>::from_data(TensorData::new(values(24, 3), dims), &device).require_grad();
        let up = Tensor::<3>::from_data(TensorData::new(values(24, 4), dims), &device);
        let grads = swiglu(gate.clone(), up, false).sum().backward();
        assert!(gate.grad(&grads).is_some(), "a tracked gate must receive its gradient");
    }

    #[test]
    fn swiglu_of_a_shared_input_leaves_the_input_alone() {
        let device = Device::flex();
        let dims = [1, 2, 8];
        let gate = Tensor::<3>::from_data(TensorData::new(values(16, 5), dims), &device);
        let before = bits(gate.clone());
        let up = gate.clone();
        let _ = swiglu(gate.clone(), up, true);
        assert_eq!(bits(gate), before);
    }
}
