//! arcee_fusion (mergekit 0.1.5, `merge_methods/arcee_fusion.py`): keep the other model's
//! change only where it matters most, judged by a KL-weighted importance.
//!
//! Per row (the last axis; a 1-D tensor is one row), in the working dtype W:
//! `p = R(softmax(x) + R(1e-8))`, `q` likewise for the base, `kl = R(sum R(p R(ln R(p / q))))`
//! (a cascade sum), `imp = R(R(|R(x - base)|) kl)`. The threshold is `median + 1.5 (q3 - q1)`
//! of the importances (their order statistics at `floor(f32(q) f32(n - 1))`; over 2^20
//! elements, of 10^6 drawn with replacement by `torch.randint`, one mt19937 draw modulo `n`
//! each, replayed from the tensor's offset in the stream). The output is float32, as
//! mergekit's is: `f32(base) + f32(R(x - base)) * mask`, `mask = imp >= threshold`.
//!
//! Not bit-exact: torch's softmax is its own vectorised exp and sums, whose width follows the
//! CPU's dispatch (mergekit's result differs between AVX2 and AVX-512 machines); here it is
//! `exp(x - max)` (MKL's exp when loaded) summed in order, divided once. Elements whose
//! importance lies within that rounding of the threshold may be kept or dropped differently
//! (docs/numerics.md measures how many).

use rayon::prelude::*;

use super::mt19937::Mt19937;
use super::numeric::{Bf16, Round, F16, F32};
use super::torch::{sum_width, CascadeSum};
use super::{decode_whole, row_len, vml, InputView, Kernel, WorkDtype, BLOCK};
use crate::params::ParamDef;

pub const PARAMS: &[ParamDef] = &[];

/// mergekit samples this many importances for the quantiles of a larger tensor.
pub const SAMPLE: usize = 1_000_000;

/// Random draws the tensor takes from the stream.
pub fn draws(numel: usize) -> u64 {
    if numel > SAMPLE {
        SAMPLE as u64
    } else {
        0
    }
}

/// Memory besides the inputs and output: the importances (and the sample) as float32.
pub fn scratch_bytes(numel: usize) -> u64 {
    (4 * numel + 4 * SAMPLE.min(numel)) as u64
}

pub fn merge(
    k: &Kernel,
    seed: u64,
    offset: u64,
    shape: &[usize],
    inputs: &[InputView],
    out: &mut [u8],
) {
    match k.work {
        WorkDtype::BF16 => merge_r::<Bf16>(seed, offset, shape, inputs, out),
        WorkDtype::F16 => merge_r::<F16>(seed, offset, shape, inputs, out),
        _ => merge_r::<F32>(seed, offset, shape, inputs, out),
    }
}

/// `R(softmax(row) + R(1e-8))`.
fn softmax<R: Round>(row: &[f32], out: &mut [f32]) {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0f32;
    for (o, &x) in out.iter_mut().zip(row) {
        *o = vml::exp(x - m);
        s += *o;
    }
    let eps = R::round(1e-8);
    out.iter_mut()
        .for_each(|o| *o = R::round(R::round(*o / s) + eps));
}

fn merge_r<R: Round>(
    seed: u64,
    offset: u64,
    shape: &[usize],
    inputs: &[InputView],
    out: &mut [u8],
) {
    let numel: usize = shape.iter().product();
    let row = row_len(shape).max(1);
    if numel == 0 {
        return;
    }
    let (base, x) = (
        decode_whole::<R>(&inputs[0], numel),
        decode_whole::<R>(&inputs[1], numel),
    );
    // The importances, row by row.
    let mut imp = vec![0f32; numel];
    imp.par_chunks_mut(row)
        .zip(base.par_chunks(row).zip(x.par_chunks(row)))
        .for_each(|(imp, (b, x))| {
            let (mut p, mut q) = (vec![0f32; x.len()], vec![0f32; x.len()]);
            softmax::<R>(x, &mut p);
            softmax::<R>(b, &mut q);
            let mut kl = CascadeSum::new(x.len(), sum_width(R::DTYPE));
            for (pv, qv) in p.iter_mut().zip(&q) {
                *pv = R::round(*pv * R::round(vml::ln(R::round(*pv / qv))));
            }
            kl.feed(&p);
            let kl = R::round(kl.finish());
            for ((i, x), b) in imp.iter_mut().zip(x).zip(b) {
                *i = R::round(R::round(R::round(x - b).abs()) * kl);
            }
        });
    // The quantiles of the importances (or of a sample of them).
    let mut sample: Vec<f32> = if numel > SAMPLE {
        let mut g = Mt19937::at(seed, offset);
        (0..SAMPLE)
            .map(|_| imp[(g.next_u32() as u64 % numel as u64) as usize])
            .collect()
    } else {
        imp.clone()
    };
    let n = sample.len();
    let mut at = |q: f32| -> f32 {
        let k = (q * (n - 1) as f32) as usize;
        // torch sorts NaN last.
        *sample
            .select_nth_unstable_by(k, |a, b| {
                a.partial_cmp(b)
                    .unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
            })
            .1
    };
    let (q1, med, q3) = (at(0.25), at(0.5), at(0.75));
    let threshold = R::round(med + R::round(R::round(q3 - q1) * 1.5));
    out.par_chunks_mut(4 * BLOCK)
        .enumerate()
        .for_each(|(c, o)| {
            let s = c * BLOCK;
            for (j, o) in o.chunks_exact_mut(4).enumerate() {
                let i = s + j;
                let mask = if imp[i] >= threshold { 1.0f32 } else { 0.0 };
                let v = base[i] + R::round(x[i] - base[i]) * mask;
                o.copy_from_slice(&v.to_le_bytes());
            }
        });
}
