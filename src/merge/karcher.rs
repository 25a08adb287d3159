//! karcher (mergekit 0.1.5, `merge_methods/karcher.py`): the Karcher (Riemannian) mean of
//! the inputs on the unit hypersphere, scaled back by their mean norm.
//!
//! Each input weighs `1/N`. Norms are float32 (`vector_norm` of the float32 values, 8
//! lanes, not rounded); everything else runs op by op in the working dtype W: units
//! `R(x_i / n_i)`, the start `R(sum R(u_i a_i))` normalised, then up to `max_iter` steps:
//! for each unit, `dot = clamp(R(sum R(mean u_i)), -1, 1)`, `th = R(acos dot)` (skipped below
//! `tol`), `tangent += R(R(R(a_i) (th / R(sin th))) R(u_i - R(dot mean)))`; stop when the
//! tangent's float32 norm is below `tol`, else `mean = R(R(R(cos tn) mean) + R(R(sin tn)
//! R(tangent / tn)))`, renormalised. Output `R(R(scale) mean)` with `scale` the float32 sum
//! of `f32(a_i) n_i`. torch's `dot` sums in an order of its own (float32: MKL's `sdot`,
//! which also changes with the thread count); here it is the float32 cascade sum of the
//! products, rounded once (see docs/numerics.md for what that reproduces).

use rayon::prelude::*;

use super::numeric::{encode_with, Bf16, Round, F16, F32};
use super::torch::{CascadeSum, NormSum, LANES};
use super::{decode_whole, vml, InputView, Kernel, WorkDtype, BLOCK};
use crate::params::{Kind, ParamDef};

pub const PARAMS: &[ParamDef] = &[
    ParamDef::shared("max_iter", Kind::Int, 10.0),
    ParamDef::shared("tol", Kind::Float, 1e-5),
];

/// float32 `vector_norm`, not rounded.
fn norm(x: &[f32]) -> f32 {
    let mut s = NormSum::new(x.len(), LANES);
    s.feed(x);
    s.finish().sqrt()
}

/// `R(torch.dot(a, b))` as the float32 cascade sum of the float32 products: what torch's
/// bfloat16 `dot` gave on every one of 116 pairs of mergekit's iterations measured (the
/// products rounded to bfloat16 first: 113).
fn dot<R: Round>(a: &[f32], b: &[f32]) -> f32 {
    let mut s = CascadeSum::new(a.len(), LANES);
    let mut buf = [0f32; 512];
    for (ca, cb) in a.chunks(512).zip(b.chunks(512)) {
        for j in 0..ca.len() {
            buf[j] = ca[j] * cb[j];
        }
        s.feed(&buf[..ca.len()]);
    }
    R::round(s.finish())
}

/// Memory besides the inputs and output: the units, the mean and the tangent as float32.
pub fn scratch_bytes(numel: usize, inputs: usize) -> u64 {
    ((inputs + 2) * 4 * numel) as u64
}

pub fn merge(
    k: &Kernel,
    max_iter: usize,
    tol: f64,
    numel: usize,
    inputs: &[InputView],
    out: &mut [u8],
) {
    match k.work {
        WorkDtype::BF16 => merge_r::<Bf16>(k, max_iter, tol, numel, inputs, out),
        WorkDtype::F16 => merge_r::<F16>(k, max_iter, tol, numel, inputs, out),
        _ => merge_r::<F32>(k, max_iter, tol, numel, inputs, out),
    }
}

fn merge_r<R: Round>(
    k: &Kernel,
    max_iter: usize,
    tol: f64,
    numel: usize,
    inputs: &[InputView],
    out: &mut [u8],
) {
    let od = k.out.st_dtype();
    let decode_all = |x: &InputView| decode_whole::<R>(x, numel);
    let write = |v: &[f32], out: &mut [u8]| {
        let osz = out.len() / numel.max(1);
        out.par_chunks_mut(BLOCK * osz)
            .zip(v.par_chunks(BLOCK))
            .for_each(|(o, v)| encode_with::<R>(v, od, o));
    };
    let n = inputs.len();
    if numel == 0 {
        return;
    }
    if n == 1 {
        return write(&decode_all(&inputs[0]), out);
    }
    let alpha = 1.0 / n as f64;
    let mut norms = Vec::with_capacity(n);
    let mut units = Vec::with_capacity(n);
    for x in inputs {
        let mut v = decode_all(x);
        let nrm = norm(&v);
        if nrm == 0.0 {
            v.iter_mut().for_each(|x| *x = 0.0);
        } else {
            v.par_iter_mut().for_each(|x| *x = R::round(*x / nrm));
        }
        norms.push(nrm);
        units.push(v);
    }
    let valid: Vec<usize> = (0..n).filter(|&i| norms[i] as f64 > tol).collect();
    if valid.is_empty() {
        // `sum(x * 0)`: zeros keeping the sign of each product, added to the int 0.
        let mut acc = vec![0f32; numel];
        for x in inputs {
            let v = decode_all(x);
            acc.par_iter_mut()
                .zip(&v)
                .for_each(|(a, x)| *a = R::round(*a + R::round(x * 0.0)));
        }
        return write(&acc, out);
    }
    let sum: f64 = valid.iter().map(|_| alpha).sum();
    let a: Vec<f64> = valid.iter().map(|_| alpha / sum).collect();
    let mut mean = vec![0f32; numel];
    for (ai, &i) in a.iter().zip(&valid) {
        let s = *ai as f32;
        mean.par_iter_mut()
            .zip(&units[i])
            .for_each(|(m, u)| *m = R::round(*m + R::round(u * s)));
    }
    let mn = norm(&mean);
    if (mn as f64) < tol {
        mean.copy_from_slice(&units[valid[0]]);
    } else {
        mean.par_iter_mut().for_each(|m| *m = R::round(*m / mn));
    }
    let mut tangent = vec![0f32; numel];
    for _ in 0..max_iter {
        tangent.iter_mut().for_each(|t| *t = 0.0);
        for (ai, &i) in a.iter().zip(&valid) {
            let u = &units[i];
            let d = dot::<R>(&mean, u).clamp(-1.0, 1.0);
            let th = R::round(vml::acos(d));
            if (th as f64) < tol {
                continue;
            }
            let c = R::round(R::round(th / R::round(vml::sin(th))) * *ai as f32);
            tangent
                .par_iter_mut()
                .zip(u.par_iter().zip(mean.par_iter()))
                .for_each(|(t, (u, m))| {
                    *t = R::round(*t + R::round(c * R::round(u - R::round(d * m))));
                });
        }
        let tn = norm(&tangent);
        if (tn as f64) < tol {
            break;
        }
        let (c, s) = (R::round(vml::cos(tn)), R::round(vml::sin(tn)));
        mean.par_iter_mut()
            .zip(tangent.par_iter())
            .for_each(|(m, t)| *m = R::round(R::round(c * *m) + R::round(s * R::round(t / tn))));
        let un = norm(&mean);
        if un as f64 > tol {
            mean.par_iter_mut().for_each(|m| *m = R::round(*m / un));
        }
    }
    let scale = R::round(norms.iter().fold(0f32, |acc, &n| acc + alpha as f32 * n));
    mean.par_iter_mut().for_each(|m| *m = R::round(scale * *m));
    write(&mean, out);
}
