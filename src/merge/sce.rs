//! sce (mergekit 0.1.5, `merge_methods/sce.py`): Select, Calculate, Erase.
//!
//! Op by op in the working dtype W: the task vectors `tv_i = x_i - base`; with
//! `select_topk < 1`, only the elements whose variance across the models is among the
//! top `k = int(count_nonzero(var) * select_topk)` are kept (torch's `var` is Welford in
//! float64; its `topk` is libstdc++'s partial sort or nth_element, replayed); each model
//! weighs `mean(tv_i^2)` over the tensor, normalised by the weights' sum; only the deltas
//! agreeing with the sign of their sum count, and the result is the base plus their
//! weighted mean. The selection and the means need the whole tensor; the task vectors are
//! recomputed from the inputs for each of the three passes (variances, means, merge)
//! rather than held as float32 copies.

use rayon::prelude::*;

use super::numeric::{decode, encode_with, Bf16, Round, F16, F32};
use super::stdsort::{self, Order, Pair};
use super::{
    majority_signs, task_chunk, torch, ConsensusScratch, InputView, Kernel, TaskVector, WorkDtype,
    BLOCK,
};
use crate::params::{Kind, ParamDef};

pub const PARAMS: &[ParamDef] = &[
    ParamDef::shared("int8_mask", Kind::Bool, 0.0),
    ParamDef::shared("select_topk", Kind::Float, 1.0),
];

pub fn merge(k: &Kernel, select_topk: f64, numel: usize, inputs: &[InputView], out: &mut [u8]) {
    match k.work {
        WorkDtype::BF16 => merge_in::<Bf16>(k, select_topk, numel, inputs, out),
        WorkDtype::F16 => merge_in::<F16>(k, select_topk, numel, inputs, out),
        WorkDtype::F32 => merge_in::<F32>(k, select_topk, numel, inputs, out),
        WorkDtype::F64 => unreachable!("the plan refuses float64 for sce"),
    }
}

fn merge_in<R: Round>(
    k: &Kernel,
    select_topk: f64,
    numel: usize,
    inputs: &[InputView],
    out: &mut [u8],
) {
    let n = inputs.len() - 1;
    // The task vectors are computed where needed (the selection, the weights, the merge),
    // never held.
    let tv: Vec<TaskVector> = inputs[1..]
        .iter()
        .map(|model| TaskVector {
            base: &inputs[0],
            model,
            numel,
        })
        .collect();
    let keep = (select_topk < 1.0).then(|| topk_mask::<R>(&tv, select_topk));
    // Each model's weight: mean(tv^2) over the tensor, normalised by the weights' sum.
    let mut w: Vec<f32> = tv
        .par_iter()
        .map(|t| simd::mean_square::<R>(t, keep.as_deref()))
        .collect();
    let mut total = torch::CascadeSum::new(n, torch::sum_width(R::DTYPE));
    total.feed(&w);
    let ws = R::round(total.finish());
    if ws.abs() < 1e-6 {
        w.fill(R::round(1.0 / n as f32));
    } else {
        for x in &mut w {
            *x = R::round(*x / ws);
        }
    }
    let floor = R::round(1e-6);
    let od = k.out.st_dtype();
    let osz = k.out.size();
    // A run of elements per loop (see gta's combine): the sign consensus, then the kept
    // deltas weighted and their weights' sum, floored.
    let how = Combine {
        inputs,
        keep: keep.as_deref(),
        w: &w,
        floor,
        od,
        osz,
        numel,
    };
    out.par_chunks_mut(RUN * osz).enumerate().for_each_init(
        || ConsensusScratch::new(n, RUN),
        |sc, (c, out)| simd::combine_run::<R>(&how, c * RUN, sc, out),
    );
}

/// Elements merged together in one step.
const RUN: usize = 4096;

/// What [`combine_run`] needs of the merge.
struct Combine<'a> {
    inputs: &'a [InputView<'a>],
    keep: Option<&'a [bool]>,
    w: &'a [f32],
    floor: f32,
    od: safetensors::Dtype,
    osz: usize,
    numel: usize,
}

/// One run: elements `start..` into `out`.
#[inline(always)]
fn combine_run<R: Round>(how: &Combine, start: usize, sc: &mut ConsensusScratch, out: &mut [u8]) {
    let Combine {
        inputs,
        keep,
        w,
        floor,
        od,
        osz,
        numel,
    } = *how;
    let n = inputs.len() - 1;
    let len = out.len() / osz;
    let base = &mut sc.base[..len];
    decode::<R>(inputs[0].bytes, inputs[0].dtype, start, base);
    let d = &mut sc.d[..n * len];
    for (d, model) in d.chunks_exact_mut(len).zip(&inputs[1..]) {
        task_chunk::<R>(model, base, start, d);
        if let Some(k) = keep {
            for (x, &m) in d.iter_mut().zip(&k[start..start + len]) {
                *x = R::round(*x * f32::from(u8::from(m)));
            }
        }
    }
    let majority = &mut sc.majority[..len];
    majority_signs::<R>(d, start, numel, majority);
    let ew = &mut sc.kept_w[..n * len];
    for ((d, ew), &wi) in d.chunks_exact_mut(len).zip(ew.chunks_exact_mut(len)).zip(w) {
        for ((d, ew), &m) in d.iter_mut().zip(ew).zip(majority.iter()) {
            *ew = R::round(wi * (torch::sign(*d) == m) as u8 as f32);
            *d = R::round(*d * *ew);
        }
    }
    let (merged, div) = (&mut sc.merged[..len], &mut sc.div[..len]);
    torch::sum_models_run(R::DTYPE, d, start, numel, merged);
    torch::sum_models_run(R::DTYPE, ew, start, numel, div);
    for ((m, &dv), &b) in merged.iter_mut().zip(div.iter()).zip(base.iter()) {
        let dv = R::round(dv).max(floor);
        *m = R::round(b + R::round(R::round(*m) / dv));
    }
    encode_with::<R>(merged, od, out);
}

/// `mean((tv * keep)^2)` in W, the sum in torch's order.
#[inline(always)]
fn mean_square<R: Round>(t: &TaskVector, keep: Option<&[bool]>) -> f32 {
    let numel = t.numel;
    let mut s = torch::CascadeSum::new(numel, torch::sum_width(R::DTYPE));
    let (mut b, mut x) = (vec![0f32; BLOCK], vec![0f32; BLOCK]);
    // A plain loop (no closure) keeps it all in this function's vector code.
    for start in (0..numel).step_by(BLOCK) {
        let len = BLOCK.min(numel - start);
        let x = &mut x[..len];
        t.chunk::<R>(start, &mut b[..len], x);
        if let Some(k) = keep {
            for (x, &m) in x.iter_mut().zip(&k[start..start + len]) {
                *x = R::round(*x * f32::from(u8::from(m)));
            }
        }
        for x in x.iter_mut() {
            *x = R::round(*x * *x);
        }
        s.feed(x);
    }
    R::round(s.finish() / numel as f32)
}

/// The variances of elements `start..start + var.len()` across the task vectors: Welford
/// in float64, a model at a time over the run (each element's steps in torch's order), so
/// the loops are vector loops.
#[inline(always)]
fn variances<R: Round>(tv: &[TaskVector], start: usize, sc: &mut VarScratch, var: &mut [f32]) {
    let len = var.len();
    let (b, x) = (&mut sc.b[..len], &mut sc.x[..len]);
    let (mean, m2) = (&mut sc.mean[..len], &mut sc.m2[..len]);
    mean.fill(0.0);
    m2.fill(0.0);
    for (i, t) in tv.iter().enumerate() {
        t.chunk::<R>(start, b, x);
        let count = (i + 1) as f64;
        for ((&x, mean), m2) in x.iter().zip(mean.iter_mut()).zip(m2.iter_mut()) {
            let x = x as f64;
            let delta = x - *mean;
            *mean += delta / count;
            *m2 += delta * (x - *mean);
        }
    }
    let n = tv.len() as f64;
    for (v, &m2) in var.iter_mut().zip(m2.iter()) {
        *v = R::round((m2 / n) as f32);
    }
}

/// Per-thread scratch of [`variances`].
struct VarScratch {
    b: Vec<f32>,
    x: Vec<f32>,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

/// The hot loops compiled twice (see [`super::simd`]).
mod simd {
    use super::*;
    use crate::twice;

    twice!(generic combine_run(how: &Combine, start: usize, sc: &mut ConsensusScratch, out: &mut [u8]));
    twice!(generic mean_square(t: &TaskVector, keep: Option<&[bool]>) -> f32);
    twice!(generic variances(tv: &[TaskVector], start: usize, sc: &mut VarScratch, var: &mut [f32]));
}

/// The elements among the top `k` by the variance across models (`torch.var(dim=0,
/// unbiased=False)`: Welford in float64, rounded to W through float32), as torch's `topk`
/// picks them.
fn topk_mask<R: Round>(tv: &[TaskVector], select_topk: f64) -> Vec<bool> {
    let numel = tv[0].numel;
    let mut var = vec![0f32; numel];
    var.par_chunks_mut(RUN).enumerate().for_each_init(
        || VarScratch {
            b: vec![0f32; RUN],
            x: vec![0f32; RUN],
            mean: vec![0f64; RUN],
            m2: vec![0f64; RUN],
        },
        |sc, (c, var)| simd::variances::<R>(tv, c * RUN, sc, var),
    );
    let nonzero = var.iter().filter(|v| **v != 0.0).count();
    let k = (nonzero as f32 * select_topk as f32) as usize;
    let mut keep = vec![false; numel];
    if k == 0 {
        return keep;
    }
    let mut pairs: Vec<Pair> = var
        .par_iter()
        .enumerate()
        .map(|(i, v)| stdsort::pair(v.abs(), i, Order::Descending))
        .collect();
    for &p in stdsort::topk_set(&mut pairs, k) {
        keep[stdsort::index(p)] = true;
    }
    keep
}
