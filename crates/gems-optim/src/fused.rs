//! Fused element-wise passes of the optimizer step on the CPU.
//!
//! On burn-flex every element-wise op is its own serial pass, and most write a fresh buffer:
//! AdamW over one parameter took eight such passes, the step's statistics three more per
//! gradient, the weighted mean of the task gradients three, the update two (and a copy of the
//! trained rows). Where every tensor of a chain is f32 on flex, the functions here do the chain
//! in one pass split across the rayon pool, in place in the buffers the step holds alone
//! (fresh gradients, the moments, the parameters of [`crate::Optimizer::step_owned`]). A buffer
//! that something else still holds is copied first ([`gems_host::host_data`]), so nothing
//! outside the step ever changes. Anywhere else (another backend, another dtype) the callers
//! run the Burn ops.
//!
//! The moments, AdamW's normalised step, the weighted mean and the update are computed exactly
//! as the Burn ops they replace compute them: each scalar rounded to f32 first (as flex's
//! `mul_scalar` does), each operation rounded to f32 in the same order, no fused multiply-add.
//! The results are bit-identical, and the tests check that. The statistics are not: squared
//! norms and the rec/search dot product are summed in f64 over fixed chunks, in chunk order,
//! which is more accurate than flex's f32 sum and the same on every CPU and thread count
//! (flex's summation order follows the SIMD width).

use burn::tensor::{Tensor, TensorData};
use gems_host::{HOST_CHUNK, from_host, host_data, host_kernel_applies};
use rayon::prelude::*;

/// Whether every tensor may take a host kernel: f32 on flex, no autodiff wrapper.
pub(crate) fn applies<const D: usize>(tensors: &[&Tensor<D>]) -> bool {
    tensors.iter().all(|t| host_kernel_applies(t, false))
}

/// Squared norms of `rec`, `search`, `shared` and the dot product of `rec` and `search`
/// (0 for what is absent), summed in f64, and, when `mean_weights` (w_rec, w_src) is given and
/// both tasks are present, their weighted mean `rec * w_rec + search * w_src` in a new buffer
/// (Burn: `rec.mul_scalar(w_rec).add(search.mul_scalar(w_src))`, bit for bit), in the same pass
/// over the two gradients. The tensors are put back unchanged. `None` when a tensor is not on
/// flex in f32 or the lengths differ (the caller then uses the Burn ops).
pub(crate) fn task_sums(
    rec: &mut Option<Tensor<1>>,
    search: &mut Option<Tensor<1>>,
    shared: &mut Option<Tensor<1>>,
    mean_weights: Option<(f64, f64)>,
) -> Option<([f64; 4], Option<Tensor<1>>)> {
    let present: Vec<&Tensor<1>> = [&*rec, &*search, &*shared].into_iter().flatten().collect();
    let len = present.first().map_or(0, |t| t.dims()[0]);
    if !applies(&present) || present.iter().any(|t| t.dims()[0] != len) {
        return None;
    }
    let mut r = rec.take().map(host_data);
    let mut s = search.take().map(host_data);
    let mut sh = shared.take().map(host_data);
    let (sums, mean) = {
        let (rs, ss, shs) = (f32_slice(&r), f32_slice(&s), f32_slice(&sh));
        let sums_of = |c: usize| {
            let range = c * HOST_CHUNK..((c + 1) * HOST_CHUNK).min(len);
            let part = |x| chunk_of(x, &range);
            let [rr, ss, rs] = match (part(rs), part(ss)) {
                (Some(a), b) => products_f64(a, b),
                (None, Some(b)) => [0.0, products_f64(b, None)[0], 0.0],
                (None, None) => [0.0; 3],
            };
            [rr, ss, part(shs).map_or(0.0, |x| products_f64(x, None)[0]), rs]
        };
        let weighted = match (rs, ss, mean_weights) {
            (Some(a), Some(b), Some((wa, wb))) => Some((a, b, wa as f32, wb as f32)),
            _ => None,
        };
        // Each chunk's sums, in chunk order (an indexed parallel collect keeps it).
        let (partial, mean): (Vec<[f64; 4]>, _) = match weighted {
            Some((a, b, wa, wb)) => {
                let mut out = vec![0.0f32; len];
                let partial = out
                    .par_chunks_mut(HOST_CHUNK)
                    .enumerate()
                    .map(|(c, o)| {
                        let sums = sums_of(c);
                        let (a, b) = (&a[c * HOST_CHUNK..], &b[c * HOST_CHUNK..]);
                        for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                            *o = x * wa + y * wb;
                        }
                        sums
                    })
                    .collect();
                (partial, Some(out))
            }
            None => ((0..len.div_ceil(HOST_CHUNK)).into_par_iter().map(sums_of).collect(), None),
        };
        let sums = partial.iter().fold([0.0; 4], |acc, p| std::array::from_fn(|k| acc[k] + p[k]));
        (sums, mean)
    };
    let back = |d: &mut Option<TensorData>| d.take().map(|d| from_host(d, false));
    *rec = back(&mut r);
    *search = back(&mut s);
    *shared = back(&mut sh);
    Some((sums, mean.map(|m| from_host(TensorData::new(m, [len]), false))))
}

fn chunk_of<'a>(x: Option<&'a [f32]>, range: &std::ops::Range<usize>) -> Option<&'a [f32]> {
    x.map(|x| &x[range.clone()])
}

fn f32_slice(d: &Option<TensorData>) -> Option<&[f32]> {
    d.as_ref().and_then(|d| d.as_slice::<f32>().ok())
}

/// [a.a, b.b, a.b] in f64 (b.b and a.b are 0 without `b`), in one pass over both slices, with
/// eight interleaved accumulators per sum combined in a fixed order.
fn products_f64(a: &[f32], b: Option<&[f32]>) -> [f64; 3] {
    fn combine(acc: [f64; 8]) -> f64 {
        ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    }
    let mut aa = [0.0f64; 8];
    let Some(b) = b else {
        let a8 = a.chunks_exact(8);
        let tail: f64 = a8.remainder().iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        for x in a8 {
            let x: &[f32; 8] = x.try_into().unwrap_or(&[0.0; 8]);
            for k in 0..8 {
                let x = f64::from(x[k]);
                aa[k] += x * x;
            }
        }
        return [combine(aa) + tail, 0.0, 0.0];
    };
    let (mut bb, mut ab) = ([0.0f64; 8], [0.0f64; 8]);
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = [0.0f64; 3];
    for (&x, &y) in a8.remainder().iter().zip(b8.remainder()) {
        let (x, y) = (f64::from(x), f64::from(y));
        tail = [tail[0] + x * x, tail[1] + y * y, tail[2] + x * y];
    }
    for (x, y) in a8.zip(b8) {
        let x: &[f32; 8] = x.try_into().unwrap_or(&[0.0; 8]);
        let y: &[f32; 8] = y.try_into().unwrap_or(&[0.0; 8]);
        for k in 0..8 {
            let (x, y) = (f64::from(x[k]), f64::from(y[k]));
            aa[k] += x * x;
            bb[k] += y * y;
            ab[k] += x * y;
        }
    }
    [combine(aa) + tail[0], combine(bb) + tail[1], combine(ab) + tail[2]]
}

/// Adam's moments and normalised step (`AdamMoments::advance`'s Burn ops), bit for bit:
/// `M <- b1 M + (1 - b1) G`, `V <- b2 V + (1 - b2) G^2`, `N = M / (sqrt(V) + eps)`, written
/// into M's, V's and G's buffers (copied first where something else holds them). Returns
/// (M, V, N), or gives the three tensors back where no kernel applies.
// The error variant gives the caller its tensors back for the Burn-ops path: no allocation.
#[allow(clippy::type_complexity, clippy::result_large_err)]
pub(crate) fn adam_advance<const D: usize>(
    first: Tensor<D>,
    second: Tensor<D>,
    gradient: Tensor<D>,
    [beta1, beta2, eps]: [f64; 3],
) -> Result<(Tensor<D>, Tensor<D>, Tensor<D>), (Tensor<D>, Tensor<D>, Tensor<D>)> {
    if !applies(&[&first, &second, &gradient])
        || first.dims() != gradient.dims()
        || second.dims() != gradient.dims()
    {
        return Err((first, second, gradient));
    }
    let (b1, c1) = (beta1 as f32, (1.0 - beta1) as f32);
    let (b2, c2) = (beta2 as f32, (1.0 - beta2) as f32);
    let eps = eps as f32;
    let (mut m, mut v, mut g) = (host_data(first), host_data(second), host_data(gradient));
    if let (Ok(ms), Ok(vs), Ok(gs)) =
        (m.as_mut_slice::<f32>(), v.as_mut_slice::<f32>(), g.as_mut_slice::<f32>())
    {
        ms.par_chunks_mut(HOST_CHUNK)
            .zip(vs.par_chunks_mut(HOST_CHUNK).zip(gs.par_chunks_mut(HOST_CHUNK)))
            .for_each(|(ms, (vs, gs))| {
                for ((m, v), g) in ms.iter_mut().zip(vs.iter_mut()).zip(gs.iter_mut()) {
                    let grad = *g;
                    *m = *m * b1 + grad * c1;
                    *v = *v * b2 + (grad * grad) * c2;
                    *g = *m / (v.sqrt() + eps);
                }
            });
    }
    Ok((from_host(m, false), from_host(v, false), from_host(g, false)))
}

/// The update of the flattened `weight` from element `start` on (Burn:
/// `adam::apply_scaled_update` on that slice, after `update.mul_scalar(factor)` when `factor`
/// is given), bit for bit, in `weight`'s buffer (copied first where something else holds it):
/// `W <- W (1 - lr wd) - U'` (`W - U'` when `weight_decay` is 0). Gives the tensors back
/// where no kernel applies.
#[allow(clippy::result_large_err)] // the tensors come back for the Burn-ops path
pub(crate) fn apply_update(
    weight: Tensor<1>,
    start: usize,
    update: Tensor<1>,
    factor: Option<f64>,
    [lr, weight_decay]: [f64; 2],
) -> Result<Tensor<1>, (Tensor<1>, Tensor<1>)> {
    let total = weight.dims()[0];
    if !applies(&[&weight, &update]) || start + update.dims()[0] != total {
        return Err((weight, update));
    }
    let keep = (1.0 - lr * weight_decay) as f32;
    let decay = weight_decay != 0.0;
    let factor = factor.map(|f| f as f32);
    let mut w = host_data(weight);
    let u = host_data(update);
    if let (Ok(ws), Ok(us)) = (w.as_mut_slice::<f32>(), u.as_slice::<f32>()) {
        // One loop per case, so that no branch is left inside a loop.
        let ws = &mut ws[start..];
        match (factor, decay) {
            (Some(f), true) => update_loop(ws, us, |w, u| w * keep - u * f),
            (Some(f), false) => update_loop(ws, us, |w, u| w - u * f),
            (None, true) => update_loop(ws, us, |w, u| w * keep - u),
            (None, false) => update_loop(ws, us, |w, u| w - u),
        }
    }
    Ok(from_host(w, false))
}

/// `w <- op(w, u)` element-wise over the rayon pool.
fn update_loop(ws: &mut [f32], us: &[f32], op: impl Fn(f32, f32) -> f32 + Sync) {
    ws.par_chunks_mut(HOST_CHUNK).zip(us.par_chunks(HOST_CHUNK)).for_each(|(ws, us)| {
        for (w, &u) in ws.iter_mut().zip(us) {
            *w = op(*w, u);
        }
    });
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Tensor, TensorData};

    use super::*;
    use crate::adam::{AdamMoments, apply_scaled_update};

    /// Values spread over several binades, of both signs (length not a multiple of a chunk).
    fn random(n: usize, seed: u64) -> Tensor<1> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let values: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                u * 10f32.powi((x % 7) as i32 - 4)
            })
            .collect();
        Tensor::from_data(TensorData::new(values, [n]), &Device::flex())
    }

    fn bits<const D: usize>(t: &Tensor<D>) -> Vec<u32> {
        t.to_data().try_to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    const N: usize = 3 * HOST_CHUNK + 77;

    #[test]
    fn adam_advance_is_the_burn_ops_bit_for_bit_and_leaves_other_handles_alone() {
        let (m, v, g) = (random(N, 1), random(N, 2).abs(), random(N, 3));
        let hyper = [0.9, 0.999, 1e-8];
        let reference = AdamMoments { first: m.clone(), second: v.clone() }.advance_ops(
            g.clone(),
            hyper[0],
            hyper[1],
            hyper[2],
        );
        let before = (bits(&m), bits(&v), bits(&g));
        // The clones are held here, so the kernel must copy before writing.
        let (m2, v2, n2) = adam_advance(m.clone(), v.clone(), g.clone(), hyper).ok().unwrap();
        assert_eq!(bits(&m2), bits(&reference.0.first));
        assert_eq!(bits(&v2), bits(&reference.0.second));
        assert_eq!(bits(&n2), bits(&reference.1));
        assert_eq!((bits(&m), bits(&v), bits(&g)), before);
        // Held once: in place, same values.
        let (m3, v3, n3) = adam_advance(m, v, g, hyper).ok().unwrap();
        assert_eq!((bits(&m3), bits(&v3), bits(&n3)), (bits(&m2), bits(&v2), bits(&n2)));
    }

    #[test]
    fn adam_advance_of_matrices_keeps_their_shape() {
        let m = random(6 * 5, 4).reshape([6, 5]);
        let g = random(6 * 5, 5).reshape([6, 5]);
        let (first, second, step) =
            adam_advance(m.clone(), m.zeros_like(), g.clone(), [0.9, 0.99, 1e-6]).ok().unwrap();
        let reference = AdamMoments { first: m.clone(), second: m.zeros_like() }
            .advance_ops(g, 0.9, 0.99, 1e-6);
        assert_eq!(step.dims(), [6, 5]);
        assert_eq!(bits(&step), bits(&reference.1));
        assert_eq!(bits(&first), bits(&reference.0.first));
        assert_eq!(bits(&second), bits(&reference.0.second));
    }

    #[test]
    fn apply_update_is_the_burn_ops_bit_for_bit_on_all_rows_and_on_trailing_rows() {
        for (start, factor, decay) in
            [(0, None, 0.0), (0, Some(0.37), 0.01), (1000, Some(1e-3), 0.1), (N - 5, None, 0.1)]
        {
            let (w, u) = (random(N, 8), random(N - start, 9));
            let lr = 3e-3;
            let scaled = factor.map_or(u.clone(), |f| u.clone().mul_scalar(f));
            let tail = apply_scaled_update(w.clone().slice(start..N), scaled, lr, decay);
            let reference = w.clone().slice_assign(start..N, tail);
            let before = bits(&w);
            let updated = apply_update(w.clone(), start, u.clone(), factor, [lr, decay]).ok();
            assert_eq!(bits(&updated.unwrap()), bits(&reference), "start {start}");
            assert_eq!(bits(&w), before, "a weight held elsewhere is copied, not written");
        }
        let (w, u) = (random(10, 1), random(4, 2));
        assert!(apply_update(w, 3, u, None, [1e-3, 0.0]).is_err(), "lengths that do not fit");
    }

    #[test]
    fn task_sums_are_f64_sums_in_a_fixed_order() {
        let (a, b, c) = (random(N, 10), random(N, 11), random(N, 12));
        let f64s = |t: &Tensor<1>| -> Vec<f64> {
            t.to_data().try_to_vec::<f32>().unwrap().iter().map(|&v| f64::from(v)).collect()
        };
        let (x, y, z) = (f64s(&a), f64s(&b), f64s(&c));
        let dot = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(u, v)| u * v).sum::<f64>();
        let (mut ra, mut rb, mut rc) = (Some(a.clone()), Some(b.clone()), Some(c.clone()));
        let (sums, mean) = task_sums(&mut ra, &mut rb, &mut rc, None).unwrap();
        assert!(mean.is_none(), "no weights, no mean");
        let want = [dot(&x, &x), dot(&y, &y), dot(&z, &z), dot(&x, &y)];
        for (got, want) in sums.iter().zip(want) {
            assert!((got - want).abs() <= 1e-12 * want.abs().max(1e-30), "{got} vs {want}");
        }
        assert_eq!(bits(&ra.clone().unwrap()), bits(&a));
        // With weights, the same sums and the Burn ops' weighted mean, bit for bit.
        let (weighted, mean) = task_sums(&mut ra, &mut rb, &mut rc, Some((0.3, 0.7))).unwrap();
        assert_eq!(weighted, sums);
        let reference = a.clone().mul_scalar(0.3).add(b.clone().mul_scalar(0.7));
        assert_eq!(bits(&mean.unwrap()), bits(&reference));
        assert_eq!((bits(&ra.unwrap()), bits(&rb.unwrap())), (bits(&a), bits(&b)));
        // Repeatable, and a missing task counts as zero (and leaves no mean).
        let (mut ra, mut none, mut none2) = (Some(a), None, None);
        let (again, mean) = task_sums(&mut ra, &mut none, &mut none2, Some((0.5, 0.5))).unwrap();
        assert!(mean.is_none());
        assert_eq!(again, [sums[0], 0.0, 0.0, 0.0]);
    }
}
