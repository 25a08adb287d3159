//! ram and ramplus_tl (mergekit 0.1.5, `merge_methods/ram.py`): Reinforced Agent Merging.
//!
//! Per element, the task vectors `tv_i = x_i - base` larger than `epsilon` in magnitude
//! count as contributions: a value only one model changes is kept whole, one several
//! change is averaged over them. ramplus_tl scales the unique contributions of each model
//! by `1 + r * clamp(shared_i / unique_i, 0, alpha)` (counts over the whole tensor) and,
//! as in mergekit, computes in float32 from that product on, writing float32 tensors
//! whatever the working dtype. ram is elementwise; ramplus_tl needs its counts first, so it
//! takes whole tensors and reads them twice (counts, then the merge), holding no copy.

use rayon::prelude::*;
use safetensors::Dtype;

use super::numeric::{decode, encode_with, Bf16, Round, F16, F32};
use super::{par_windows, task_chunk, torch, InputView, Kernel, Window, WorkDtype};
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
    let mut run = Run::new(n, MICRO);
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        run.load::<R>(inputs, start + off, m, eps);
        let Run { tv, count, .. } = &mut run;
        let count = &count[..m];
        // Each loop runs over the run: the products by 0 or 1 are exact (no rounding), the
        // shares' division rounds once.
        for t in tv[..n * m].chunks_exact_mut(m) {
            for (t, &c) in t.iter_mut().zip(count) {
                let (unique, shared) = parts::<R>(*t, c, eps);
                *t = R::round(unique + shared);
            }
        }
        let res = &mut run.res[..m];
        torch::sum_models_run(R::DTYPE, &run.tv[..n * m], at.first + off, at.numel, res);
        for (r, b) in res.iter_mut().zip(&run.base[..m]) {
            *r = R::round(b + R::round(*r));
        }
        encode_with::<R>(res, od, &mut out[off * osz..(off + m) * osz]);
        off += m;
    }
}

/// One element's contribution from a task-vector value `t` that `c` models change by more
/// than `eps`: whole when only this model does (`unique`), else its share (`shared`).
#[inline(always)]
fn parts<R: Round>(t: f32, c: u16, eps: f32) -> (f32, f32) {
    let c = c as f32;
    let z = t * (t.abs() > eps) as u8 as f32;
    let unique = z * (c == 1.0) as u8 as f32;
    let shared = R::round(z * (c > 1.0) as u8 as f32 / c.max(1.0));
    (unique, shared)
}

/// A run of elements: the base, every model's task vector (model `i` at `i * len..`), how
/// many models change each element by more than epsilon, and room for the result.
struct Run {
    base: Vec<f32>,
    tv: Vec<f32>,
    count: Vec<u16>,
    res: Vec<f32>,
}

impl Run {
    fn new(models: usize, len: usize) -> Self {
        Run {
            base: vec![0f32; len],
            tv: vec![0f32; models * len],
            count: vec![0; len],
            res: vec![0f32; len],
        }
    }

    /// Elements `start..start + len` of the inputs.
    #[inline(always)]
    fn load<R: Round>(&mut self, inputs: &[InputView], start: usize, len: usize, eps: f32) {
        let base = &mut self.base[..len];
        decode::<R>(inputs[0].bytes, inputs[0].dtype, start, base);
        let count = &mut self.count[..len];
        count.fill(0);
        let models = inputs.len() - 1;
        for (t, model) in self.tv[..models * len]
            .chunks_exact_mut(len)
            .zip(&inputs[1..])
        {
            task_chunk::<R>(model, base, start, t);
            for (c, x) in count.iter_mut().zip(t.iter()) {
                *c += (x.abs() > eps) as u16;
            }
        }
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
    // Per model: its contributions shared with others, and unique to it (an element's
    // count needs every model's task vector there: a run of all of them at a time).
    let tally = (0..numel.div_ceil(RUN))
        .into_par_iter()
        .fold(
            || (Run::new(n, RUN), vec![(0u64, 0u64); n]),
            |(mut run, mut tally), c| {
                let start = c * RUN;
                let len = RUN.min(numel - start);
                run.load::<R>(inputs, start, len, eps);
                for (t, (shared, unique)) in run.tv[..n * len].chunks_exact(len).zip(&mut tally) {
                    for (x, &c) in t.iter().zip(&run.count[..len]) {
                        let counted = (x.abs() > eps) as u64;
                        *shared += counted & (c > 1) as u64;
                        *unique += counted & (c <= 1) as u64;
                    }
                }
                (run, tally)
            },
        )
        .map(|(_, tally)| tally)
        .reduce(
            || vec![(0, 0); n],
            |a, b| {
                a.iter()
                    .zip(&b)
                    .map(|(a, b)| (a.0 + b.0, a.1 + b.1))
                    .collect()
            },
        );
    let lambda: Vec<f32> = tally
        .iter()
        .map(|&(shared, unique)| {
            let rho = shared as f32 / (unique as f32).max(epsilon as f32);
            1.0 + r as f32 * rho.clamp(0.0, alpha as f32)
        })
        .collect();
    let od = k.out.st_dtype();
    let osz = k.out.size();
    out.par_chunks_mut(RUN * osz).enumerate().for_each_init(
        || Run::new(n, RUN),
        |run, (c, out)| {
            let start = c * RUN;
            let len = out.len() / osz;
            run.load::<R>(inputs, start, len, eps);
            let Run {
                base,
                tv,
                count,
                res,
            } = run;
            for (t, &l) in tv[..n * len].chunks_exact_mut(len).zip(&lambda) {
                for (t, &c) in t.iter_mut().zip(&count[..len]) {
                    let (unique, shared) = parts::<R>(*t, c, eps);
                    // From here on float32: the lambda tensor promotes.
                    *t = unique * l + shared;
                }
            }
            let res = &mut res[..len];
            torch::sum_models_run(Dtype::F32, &tv[..n * len], start, numel, res);
            for (r, b) in res.iter_mut().zip(&base[..len]) {
                *r += b;
            }
            encode_with::<F32>(res, od, out);
        },
    );
}

/// Elements of a step of [`ramplus`].
const RUN: usize = 4096;
