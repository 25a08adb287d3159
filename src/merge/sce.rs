//! sce (mergekit 0.1.5, `merge_methods/sce.py`): Select, Calculate, Erase.
//!
//! Op by op in the working dtype W: the task vectors `tv_i = x_i - base`; with
//! `select_topk < 1`, only the elements whose variance across the models is among the
//! top `k = int(count_nonzero(var) * select_topk)` are kept (torch's `var` is Welford in
//! float64; its `topk` is libstdc++'s partial sort or nth_element, replayed); each model
//! weighs `mean(tv_i^2)` over the tensor, normalised by the weights' sum; only the deltas
//! agreeing with the sign of their sum count, and the result is the base plus their
//! weighted mean. The selection and the means need the whole tensor.

use rayon::prelude::*;

use super::numeric::{encode_with, Bf16, Round, F16, F32};
use super::stdsort::{self, Order, Pair};
use super::{torch, InputView, Kernel, WorkDtype};
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
    let (base, mut tv) = super::task_vectors::<R>(inputs, numel);
    if select_topk < 1.0 {
        let keep = topk_mask::<R>(&tv, select_topk);
        for t in &mut tv {
            t.par_iter_mut()
                .zip(keep.par_iter())
                .for_each(|(x, &m)| *x = R::round(*x * f32::from(u8::from(m))));
        }
    }
    // Each model's weight: mean(tv^2) over the tensor, normalised by the weights' sum.
    let mut w: Vec<f32> = tv
        .par_iter()
        .map(|t| {
            let mut s = torch::CascadeSum::new(numel, torch::sum_width(R::DTYPE));
            let mut sq = Vec::with_capacity(4096);
            for c in t.chunks(4096) {
                sq.clear();
                sq.extend(c.iter().map(|x| R::round(x * x)));
                s.feed(&sq);
            }
            R::round(s.finish() / numel as f32)
        })
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
    const RUN: usize = 1024;
    out.par_chunks_mut(RUN * osz)
        .enumerate()
        .for_each(|(c, out)| {
            let start = c * RUN;
            let len = out.len() / osz;
            let mut d = vec![0f32; n * len];
            for (d, t) in d.chunks_exact_mut(len).zip(&tv) {
                d.copy_from_slice(&t[start..start + len]);
            }
            let mut majority = vec![0f32; len];
            torch::sum_models_run(R::DTYPE, &d, start, numel, &mut majority);
            for s in &mut majority {
                *s = if R::round(*s) >= 0.0 { 1.0 } else { -1.0 };
            }
            let mut ew = vec![0f32; n * len];
            for ((d, ew), &wi) in d
                .chunks_exact_mut(len)
                .zip(ew.chunks_exact_mut(len))
                .zip(&w)
            {
                for ((d, ew), &m) in d.iter_mut().zip(ew).zip(&majority) {
                    *ew = R::round(wi * (torch::sign(*d) == m) as u8 as f32);
                    *d = R::round(*d * *ew);
                }
            }
            let (mut merged, mut div) = (vec![0f32; len], vec![0f32; len]);
            torch::sum_models_run(R::DTYPE, &d, start, numel, &mut merged);
            torch::sum_models_run(R::DTYPE, &ew, start, numel, &mut div);
            for ((m, &dv), &b) in merged.iter_mut().zip(&div).zip(&base[start..start + len]) {
                let dv = R::round(dv).max(floor);
                *m = R::round(b + R::round(R::round(*m) / dv));
            }
            encode_with::<R>(&merged, od, out);
        });
}

/// The elements among the top `k` by the variance across models (`torch.var(dim=0,
/// unbiased=False)`: Welford in float64, rounded to W through float32), as torch's `topk`
/// picks them.
fn topk_mask<R: Round>(tv: &[Vec<f32>], select_topk: f64) -> Vec<bool> {
    let numel = tv[0].len();
    let var: Vec<f32> = (0..numel)
        .into_par_iter()
        .map(|e| {
            let (mut mean, mut m2) = (0f64, 0f64);
            for (i, t) in tv.iter().enumerate() {
                let x = t[e] as f64;
                let delta = x - mean;
                mean += delta / (i + 1) as f64;
                m2 += delta * (x - mean);
            }
            R::round((m2 / tv.len() as f64) as f32)
        })
        .collect();
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
