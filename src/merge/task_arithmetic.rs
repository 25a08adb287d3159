//! task_arithmetic (mergekit 0.1.5, `merge_methods/generalized_task_arithmetic.py` with no
//! sparsification and no sign consensus): the base plus a weighted sum of task vectors.
//!
//! mergekit's group kernel runs op by op in the working dtype W, each op computed in
//! float32 and rounded once to W: `d_i = R(x_i - base)`, `w_i = R(weight_i)` (a W tensor),
//! `d_i = R(d_i * w_i)`, `mixed = R(sum_i d_i)` (torch's outer sum over the model axis),
//! `div = R(sum_i w_i)` (1 where `|div| < 1e-8`), with `normalize` `mixed = R(mixed / div)`,
//! with `lambda != 1` `mixed = R(mixed * f32(lambda))`, and `out = R(base + mixed)`.

use super::numeric::{decode, encode_with, Bf16, Round, F16, F32};
use super::{par_windows, torch, wide, InputView, Kernel, Window, WorkDtype};
use crate::params::{Kind, ParamDef, Scope};
use safetensors::Dtype;

pub const PARAMS: &[ParamDef] = &[
    ParamDef::per_input("weight", Scope::NonBase, None),
    ParamDef::shared("normalize", Kind::Bool, 0.0),
    ParamDef::shared("lambda", Kind::Float, 1.0),
    // Declared by mergekit's task-arithmetic family; no effect without sparsification or
    // consensus, but accepted so configs that set them need no warning.
    ParamDef::per_input("density", Scope::NonBase, Some(1.0)),
    ParamDef::shared("rescale", Kind::Bool, 0.0),
    ParamDef::shared("int8_mask", Kind::Bool, 0.0),
];

const MICRO: usize = 512;

/// The per-tensor constants: each weight in W, the divisor, and the lambda factor.
struct Coefficients<T> {
    weights: Vec<T>,
    divisor: Option<T>,
    lambda: Option<T>,
}

#[allow(clippy::too_many_arguments)]
pub fn apply(
    k: &Kernel,
    weights: &[f64],
    normalize: bool,
    lambda: f64,
    inputs: &[InputView],
    at: Window,
    len: usize,
    out: &mut [u8],
) {
    let od = k.out.st_dtype();
    let osz = k.out.size();
    // Inputs: the base, then one per weight.
    let others = &weights[1..];
    if k.work == WorkDtype::F64 {
        let div: f64 = others.iter().sum();
        let c = Coefficients {
            weights: others.to_vec(),
            divisor: normalize.then_some(if div.abs() < 1e-8 { 1.0 } else { div }),
            lambda: (lambda != 1.0).then_some(lambda),
        };
        return par_windows(len, osz, out, |start, len, out| {
            apply_f64(inputs, start, len, &c, od, out)
        });
    }
    let c = match k.work {
        WorkDtype::BF16 => coefficients::<Bf16>(others, normalize, lambda),
        WorkDtype::F16 => coefficients::<F16>(others, normalize, lambda),
        _ => coefficients::<F32>(others, normalize, lambda),
    };
    par_windows(len, osz, out, |start, len, out| {
        let w = Window {
            first: at.first + start,
            numel: at.numel,
        };
        match k.work {
            WorkDtype::BF16 => simd::apply_range::<Bf16>(inputs, start, len, w, &c, od, out),
            WorkDtype::F16 => simd::apply_range::<F16>(inputs, start, len, w, &c, od, out),
            _ => simd::apply_range::<F32>(inputs, start, len, w, &c, od, out),
        }
    })
}

/// The weights as a W tensor, their sum (a short row, summed as torch sums one), and
/// lambda as the float32 scalar torch multiplies by.
fn coefficients<R: Round>(weights: &[f64], normalize: bool, lambda: f64) -> Coefficients<f32> {
    let w: Vec<f32> = weights.iter().map(|&w| R::round_f64(w)).collect();
    let mut s = torch::CascadeSum::new(w.len(), torch::sum_width(R::DTYPE));
    s.feed(&w);
    let div = R::round(s.finish());
    Coefficients {
        weights: w,
        divisor: normalize.then_some(if div.abs() < R::round(1e-8) { 1.0 } else { div }),
        lambda: (lambda != 1.0).then_some(lambda as f32),
    }
}

mod simd {
    use super::*;
    use crate::twice;

    twice!(generic apply_range(inputs: &[InputView], start: usize, len: usize, at: Window, c: &Coefficients<f32>, od: Dtype, out: &mut [u8]));
}

#[inline(always)]
fn apply_range<R: Round>(
    inputs: &[InputView],
    start: usize,
    len: usize,
    at: Window,
    c: &Coefficients<f32>,
    od: Dtype,
    out: &mut [u8],
) {
    let n = c.weights.len();
    let osz = out.len() / len.max(1);
    let mut base = [0f32; MICRO];
    let mut x = [0f32; MICRO];
    // The weighted task vectors, model `i` at `i * m..(i + 1) * m`.
    let mut d = vec![0f32; n * MICRO];
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        decode::<R>(
            inputs[0].bytes,
            inputs[0].dtype,
            start + off,
            &mut base[..m],
        );
        for (i, di) in d[..n * m].chunks_exact_mut(m).enumerate() {
            let inp = &inputs[i + 1];
            decode::<R>(inp.bytes, inp.dtype, start + off, &mut x[..m]);
            let w = c.weights[i];
            for ((d, x), b) in di.iter_mut().zip(&x[..m]).zip(&base[..m]) {
                *d = R::round(R::round(x - b) * w);
            }
        }
        torch::sum_models_run(R::DTYPE, &d[..n * m], at.first + off, at.numel, &mut x[..m]);
        for (x, b) in x[..m].iter_mut().zip(&base[..m]) {
            let mut mixed = R::round(*x);
            if let Some(div) = c.divisor {
                mixed = R::round(mixed / div);
            }
            if let Some(l) = c.lambda {
                mixed = R::round(mixed * l);
            }
            *x = R::round(b + mixed);
        }
        encode_with::<R>(&x[..m], od, &mut out[off * osz..(off + m) * osz]);
        off += m;
    }
}

fn apply_f64(
    inputs: &[InputView],
    start: usize,
    len: usize,
    c: &Coefficients<f64>,
    od: Dtype,
    out: &mut [u8],
) {
    let osz = out.len() / len.max(1);
    let mut base = [0f64; MICRO];
    let mut x = [0f64; MICRO];
    let mut mixed = [0f64; MICRO];
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        wide::decode(
            inputs[0].bytes,
            inputs[0].dtype,
            start + off,
            &mut base[..m],
        );
        mixed[..m].fill(0.0);
        for (inp, &w) in inputs[1..].iter().zip(&c.weights) {
            wide::decode(inp.bytes, inp.dtype, start + off, &mut x[..m]);
            for k in 0..m {
                mixed[k] += (x[k] - base[k]) * w;
            }
        }
        for k in 0..m {
            let mut v = mixed[k];
            if let Some(div) = c.divisor {
                v /= div;
            }
            if let Some(l) = c.lambda {
                v *= l;
            }
            x[k] = base[k] + v;
        }
        wide::encode(&x[..m], od, &mut out[off * osz..(off + m) * osz]);
        off += m;
    }
}
