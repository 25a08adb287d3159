//! ram and ramplus_tl (mergekit 0.1.5, `merge_methods/ram.py`): Reinforced Agent Merging.
//!
//! Per element, the task vectors `tv_i = x_i - base` larger than `epsilon` in magnitude
//! count as contributions: a value only one model changes is kept whole, one several
//! change is averaged over them. ramplus_tl scales the unique contributions of each model
//! by `1 + r * clamp(shared_i / unique_i, 0, alpha)` (counts over the whole tensor) and,
//! as in mergekit, computes in float32 from that product on, writing float32 tensors
//! whatever the working dtype. ram is elementwise; ramplus_tl needs its counts first, so it
//! takes whole tensors.

use rayon::prelude::*;
use safetensors::Dtype;

use super::numeric::{decode, encode_with, Bf16, Round, F16, F32};
use super::{par_windows, torch, InputView, Kernel, Window, WorkDtype};
use crate::params::{Kind, ParamDef};

pub const RAM_PARAMS: &[ParamDef] = &[ParamDef::shared("epsilon", Kind::Float, 1e-5)];
pub const RAMPLUS_PARAMS: &[ParamDef] = &[
    ParamDef::shared("r", Kind::Float, 0.1),
    ParamDef::shared("alpha", Kind::Float, 0.2),
    ParamDef::shared("epsilon", Kind::Float, 1e-5),
];

const MICRO: usize = 512;

pub fn apply_ram(
    k: &Kernel,
    epsilon: f64,
    inputs: &[InputView],
    at: Window,
    len: usize,
    out: &mut [u8],
) {
    let od = k.out.st_dtype();
    par_windows(len, k.out.size(), out, |start, len, out| {
        let at = Window {
            first: at.first + start,
            numel: at.numel,
        };
        match k.work {
            WorkDtype::BF16 => ram_range::<Bf16>(inputs, start, len, at, epsilon, od, out),
            WorkDtype::F16 => ram_range::<F16>(inputs, start, len, at, epsilon, od, out),
            WorkDtype::F32 => ram_range::<F32>(inputs, start, len, at, epsilon, od, out),
            WorkDtype::F64 => unreachable!("the plan refuses float64 for ram"),
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn ram_range<R: Round>(
    inputs: &[InputView],
    start: usize,
    len: usize,
    at: Window,
    epsilon: f64,
    od: Dtype,
    out: &mut [u8],
) {
    let n = inputs.len() - 1;
    let osz = out.len() / len.max(1);
    let eps = R::round_f64(epsilon);
    let mut base = [0f32; MICRO];
    // The models' task vectors, then their parts, model `i` at `i * m..(i + 1) * m`.
    let mut tv = vec![0f32; n * MICRO];
    let mut count = [0f32; MICRO];
    let mut res = [0f32; MICRO];
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        decode::<R>(
            inputs[0].bytes,
            inputs[0].dtype,
            start + off,
            &mut base[..m],
        );
        count[..m].fill(0.0);
        for (i, t) in tv[..n * m].chunks_exact_mut(m).enumerate() {
            decode::<R>(inputs[i + 1].bytes, inputs[i + 1].dtype, start + off, t);
            for ((t, b), c) in t.iter_mut().zip(&base[..m]).zip(&mut count[..m]) {
                *t = R::round(*t - b);
                *c += (t.abs() > eps) as u8 as f32;
            }
        }
        // Each loop runs over the run: the products by 0 or 1 are exact (no rounding), the
        // shares' division rounds once.
        for t in tv[..n * m].chunks_exact_mut(m) {
            for (t, &c) in t.iter_mut().zip(&count[..m]) {
                let z = *t * (t.abs() > eps) as u8 as f32;
                let unique = z * (c == 1.0) as u8 as f32;
                let shared = R::round(z * (c > 1.0) as u8 as f32 / c.max(1.0));
                *t = R::round(unique + shared);
            }
        }
        torch::sum_models_run(
            R::DTYPE,
            &tv[..n * m],
            at.first + off,
            at.numel,
            &mut res[..m],
        );
        for (r, b) in res[..m].iter_mut().zip(&base[..m]) {
            *r = R::round(b + R::round(*r));
        }
        encode_with::<R>(&res[..m], od, &mut out[off * osz..(off + m) * osz]);
        off += m;
    }
}

/// ramplus_tl over a whole tensor; its values are float32 (the output dtype the plan
/// chose: float32, or `out_dtype`).
pub fn merge_ramplus(
    k: &Kernel,
    (r, alpha, epsilon): (f64, f64, f64),
    numel: usize,
    inputs: &[InputView],
    out: &mut [u8],
) {
    match k.work {
        WorkDtype::BF16 => ramplus::<Bf16>(k, (r, alpha, epsilon), numel, inputs, out),
        WorkDtype::F16 => ramplus::<F16>(k, (r, alpha, epsilon), numel, inputs, out),
        WorkDtype::F32 => ramplus::<F32>(k, (r, alpha, epsilon), numel, inputs, out),
        WorkDtype::F64 => unreachable!("the plan refuses float64 for ramplus_tl"),
    }
}

fn ramplus<R: Round>(
    k: &Kernel,
    (r, alpha, epsilon): (f64, f64, f64),
    numel: usize,
    inputs: &[InputView],
    out: &mut [u8],
) {
    let n = inputs.len() - 1;
    let eps = R::round_f64(epsilon);
    let (base, tv) = super::task_vectors::<R>(inputs, numel);
    // How many models change each element by more than epsilon.
    let mut counts = vec![0u16; numel];
    counts
        .par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, counts)| {
            let start = c << 16;
            for t in &tv {
                for (n, x) in counts.iter_mut().zip(&t[start..]) {
                    *n += (x.abs() > eps) as u16;
                }
            }
        });
    // Per model: its contributions shared with others, and unique to it.
    let lambda: Vec<f32> = tv
        .par_iter()
        .map(|t| {
            let (shared, unique) = t
                .par_chunks(1 << 16)
                .zip(counts.par_chunks(1 << 16))
                .map(|(t, c)| {
                    let (mut shared, mut unique) = (0u64, 0u64);
                    for (x, &c) in t.iter().zip(c) {
                        let counted = (x.abs() > eps) as u64;
                        shared += counted & (c > 1) as u64;
                        unique += counted & (c <= 1) as u64;
                    }
                    (shared, unique)
                })
                .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            let rho = shared as f32 / (unique as f32).max(epsilon as f32);
            1.0 + r as f32 * rho.clamp(0.0, alpha as f32)
        })
        .collect();
    let od = k.out.st_dtype();
    let osz = k.out.size();
    const RUN: usize = 1024;
    out.par_chunks_mut(RUN * osz)
        .enumerate()
        .for_each(|(c, out)| {
            let start = c * RUN;
            let len = out.len() / osz;
            let counts = &counts[start..start + len];
            let mut parts = vec![0f32; n * len];
            for ((p, t), &l) in parts.chunks_exact_mut(len).zip(&tv).zip(&lambda) {
                for ((p, &t), &cnt) in p.iter_mut().zip(&t[start..start + len]).zip(counts) {
                    let cnt = cnt as f32;
                    let z = t * (t.abs() > eps) as u8 as f32;
                    let unique = z * (cnt == 1.0) as u8 as f32;
                    let shared = R::round(z * (cnt > 1.0) as u8 as f32 / cnt.max(1.0));
                    // From here on float32: the lambda tensor promotes.
                    *p = unique * l + shared;
                }
            }
            let mut res = vec![0f32; len];
            torch::sum_models_run(Dtype::F32, &parts, start, numel, &mut res);
            for (r, b) in res.iter_mut().zip(&base[start..start + len]) {
                *r += b;
            }
            encode_with::<F32>(&res, od, out);
        });
}
