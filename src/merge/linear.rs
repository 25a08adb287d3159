//! linear (mergekit 0.1.5, `merge_methods/linear.py`): a weighted sum of the inputs.
//!
//! mergekit's batched kernel computes in float32 (float64 for float64 inputs), one rounding
//! at the end: the weights arrive as float32, `acc = fma(x_i, w_i, acc)` over the inputs in
//! order (torch's `addcmul_` is fused on its AVX2 and AVX-512 kernels), then, with
//! `normalize` (the default), `acc / sum(w)` with the weights summed as torch sums a short
//! row. Weights summing to zero under `normalize` (mergekit writes inf/NaN) are refused by
//! the plan.

use super::numeric::{decode, encode_with, map_round, Bf16, Round, F16, F32};
use super::{par_windows, torch, wide, InputView, Kernel, WorkDtype};
use crate::params::{Kind, ParamDef, Scope};
use safetensors::Dtype;

pub const PARAMS: &[ParamDef] = &[
    ParamDef::per_input("weight", Scope::Input, None),
    ParamDef::shared("normalize", Kind::Bool, 1.0),
];

const MICRO: usize = 512;

pub fn apply(
    k: &Kernel,
    weights: &[f64],
    normalize: bool,
    inputs: &[InputView],
    len: usize,
    out: &mut [u8],
) {
    // The weights as mergekit's float32 parameter tensor holds them.
    let w: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let od = k.out.st_dtype();
    if k.work == WorkDtype::F64 {
        let w64: Vec<f64> = w.iter().map(|&w| w as f64).collect();
        let denom = normalize.then(|| w64.iter().sum::<f64>());
        return par_windows(len, k.out.size(), out, |start, len, out| {
            apply_f64(inputs, start, len, &w64, denom, od, out)
        });
    }
    let denom = normalize.then(|| {
        let mut s = torch::CascadeSum::new(w.len(), torch::LANES);
        s.feed(&w);
        s.finish()
    });
    par_windows(len, k.out.size(), out, |start, len, out| match k.work {
        WorkDtype::BF16 => simd::apply_range::<Bf16>(inputs, start, len, &w, denom, od, out),
        WorkDtype::F16 => simd::apply_range::<F16>(inputs, start, len, &w, denom, od, out),
        _ => simd::apply_range::<F32>(inputs, start, len, &w, denom, od, out),
    })
}

mod simd {
    use super::*;
    use crate::twice;

    twice!(generic apply_range(inputs: &[InputView], start: usize, len: usize, w: &[f32], denom: Option<f32>, od: Dtype, out: &mut [u8]));
}

#[inline(always)]
fn apply_range<R: Round>(
    inputs: &[InputView],
    start: usize,
    len: usize,
    w: &[f32],
    denom: Option<f32>,
    od: Dtype,
    out: &mut [u8],
) {
    let osz = out.len() / len.max(1);
    let mut acc = [0f32; MICRO];
    let mut x = [0f32; MICRO];
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        acc[..m].fill(0.0);
        for (inp, &wi) in inputs.iter().zip(w) {
            decode::<R>(inp.bytes, inp.dtype, start + off, &mut x[..m]);
            for k in 0..m {
                acc[k] = x[k].mul_add(wi, acc[k]);
            }
        }
        if let Some(d) = denom {
            for a in &mut acc[..m] {
                *a /= d;
            }
        }
        map_round::<R>(&mut x[..m], |k| acc[k]);
        encode_with::<R>(&x[..m], od, &mut out[off * osz..(off + m) * osz]);
        off += m;
    }
}

fn apply_f64(
    inputs: &[InputView],
    start: usize,
    len: usize,
    w: &[f64],
    denom: Option<f64>,
    od: Dtype,
    out: &mut [u8],
) {
    let osz = out.len() / len.max(1);
    let mut acc = [0f64; MICRO];
    let mut x = [0f64; MICRO];
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        acc[..m].fill(0.0);
        for (inp, &wi) in inputs.iter().zip(w) {
            wide::decode(inp.bytes, inp.dtype, start + off, &mut x[..m]);
            for k in 0..m {
                acc[k] = x[k].mul_add(wi, acc[k]);
            }
        }
        if let Some(d) = denom {
            for a in &mut acc[..m] {
                *a /= d;
            }
        }
        wide::encode(&acc[..m], od, &mut out[off * osz..(off + m) * osz]);
        off += m;
    }
}
