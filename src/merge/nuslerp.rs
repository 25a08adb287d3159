//! nuslerp (mergekit 0.1.5, `merge_methods/nuslerp.py`): spherical interpolation of two
//! models (or of their task vectors, with a base), by `t = w1 / (w0 + w1)` of their weights.
//!
//! Unlike slerp it runs op by op in the working dtype W, over the whole flattened tensor
//! (`nuslerp_flatten`, the default: two statistics passes, the norms then the cosine, then
//! an elementwise pass) or row by row along the last axis (each row on its own):
//! `u_i = R(v_i / max(R(|v_i|), R(1e-7)))` (torch's `norm` in W), `cos = clamp(R(sum
//! R(u_0 u_1)), -1, 1)` (a cascade sum), collinear where `R(1 - R(cos^2)) <= R(1e-16)`;
//! `th = R(acos(cos))`, `out = R(R(R(sin(R(th (1-t))) v_0) + R(sin(R(th t)) v_1)) / R(sin th))`,
//! or `R(R(v_0 (1-t)) + R(v_1 t))` when collinear; with a base `v_i = R(x_i - base)` and
//! `R(base + out)`. `nuslerp_row_wise` takes rows along the first axis (the columns),
//! through a transpose whose strided sums torch takes in their own orders (whole tensors).

use rayon::prelude::*;

use super::numeric::{decode, encode_with, Bf16, Round, F16, F32};
use super::torch::{outer_sum, CascadeSum, NormSum, LANES};
use super::{par_windows, row_len, vml, InputView, Kernel, Prepared, Streaming, WorkDtype};
use crate::params::{Kind, ParamDef, Scope};

pub const PARAMS: &[ParamDef] = &[
    ParamDef::per_input("weight", Scope::NonBase, None),
    ParamDef::shared("nuslerp_row_wise", Kind::Bool, 0.0),
    ParamDef::shared("nuslerp_flatten", Kind::Bool, 1.0),
];

const MICRO: usize = 512;

/// nuslerp for one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Nuslerp {
    /// `w1 / (w0 + w1)` (0.5 when the weights sum to about zero), in float64 as Python
    /// computes it.
    pub t: f64,
    /// One row of the whole tensor (else rows along an axis).
    pub flatten: bool,
    /// Without `flatten`: rows along the first axis (else the last).
    pub row_wise: bool,
}

/// A statistics pass over a flattened tensor: the two norms, then the cosine.
#[derive(Debug, Clone)]
pub enum Acc {
    Norms(NormSum, NormSum),
    Cos { n: (f32, f32), sum: Box<CascadeSum> },
}

/// torch's widths for W: the norm's (0: float16's sequential path) and the sum's.
fn widths(work: WorkDtype) -> (usize, usize) {
    match work {
        WorkDtype::F32 => (LANES, LANES),
        WorkDtype::BF16 => (2 * LANES, 2 * LANES),
        _ => (0, 2 * LANES),
    }
}

/// `v_0` and `v_1` of `len` elements from element `start` of `inputs` (the base first
/// when there are three): the models, or their task vectors `R(x_i - base)`.
fn values<R: Round>(inputs: &[InputView], start: usize, v0: &mut [f32], v1: &mut [f32]) {
    let m = v0.len();
    let first = inputs.len() - 2;
    decode::<R>(inputs[first].bytes, inputs[first].dtype, start, v0);
    decode::<R>(inputs[first + 1].bytes, inputs[first + 1].dtype, start, v1);
    if first == 1 {
        let mut b = [0f32; MICRO];
        decode::<R>(inputs[0].bytes, inputs[0].dtype, start, &mut b[..m]);
        for j in 0..m {
            v0[j] = R::round(v0[j] - b[j]);
            v1[j] = R::round(v1[j] - b[j]);
        }
    }
}

impl Nuslerp {
    pub fn values(&self) -> Vec<(&'static str, serde_json::Value)> {
        vec![
            ("t", serde_json::json!(self.t)),
            ("nuslerp_flatten", serde_json::json!(self.flatten)),
            ("nuslerp_row_wise", serde_json::json!(self.row_wise)),
        ]
    }

    pub fn streaming(&self, shape: &[usize]) -> Streaming {
        if self.flatten {
            Streaming::Statistics
        } else if self.row_wise && shape.len() > 1 {
            Streaming::Whole
        } else {
            Streaming::Rows(row_len(shape).max(1))
        }
    }

    pub fn begin(&self, k: &Kernel, prior: Prepared, numel: usize) -> Acc {
        let (nw, sw) = widths(k.work);
        match prior {
            Prepared::Norms(a, b) => Acc::Cos {
                n: (a, b),
                sum: Box::new(CascadeSum::new(numel, sw)),
            },
            _ => Acc::Norms(NormSum::new(numel, nw), NormSum::new(numel, nw)),
        }
    }

    pub fn finish(&self, k: &Kernel, acc: &Acc) -> Prepared {
        match k.work {
            WorkDtype::BF16 => self.finish_r::<Bf16>(acc),
            WorkDtype::F16 => self.finish_r::<F16>(acc),
            _ => self.finish_r::<F32>(acc),
        }
    }

    fn finish_r<R: Round>(&self, acc: &Acc) -> Prepared {
        match acc {
            Acc::Norms(a, b) => {
                let floor = R::round(1e-7);
                let n = |s: &NormSum| R::round(s.finish().sqrt()).max(floor);
                Prepared::Norms(n(a), n(b))
            }
            Acc::Cos { sum, .. } => self.coefficients::<R>(sum.finish()),
        }
    }

    /// The apply pass's values from the cosine's float32 sum.
    fn coefficients<R: Round>(&self, dot: f32) -> Prepared {
        let cos = R::round(dot).clamp(-1.0, 1.0);
        let colinear = R::round(1.0 - R::round(cos * cos)) <= R::round(1e-16);
        let th = R::round(vml::acos(if colinear { 0.0 } else { cos }));
        let (a, b) = ((1.0 - self.t) as f32, self.t as f32);
        Prepared::Nuslerp {
            s0: R::round(vml::sin(R::round(th * a))),
            s1: R::round(vml::sin(R::round(th * b))),
            sin: R::round(vml::sin(th)),
            a,
            b,
            colinear,
        }
    }

    pub fn apply(&self, k: &Kernel, p: Prepared, inputs: &[InputView], len: usize, out: &mut [u8]) {
        let od = k.out.st_dtype();
        par_windows(len, k.out.size(), out, |start, len, out| match k.work {
            WorkDtype::BF16 => apply_range::<Bf16>(p, inputs, start, len, od, out),
            WorkDtype::F16 => apply_range::<F16>(p, inputs, start, len, od, out),
            _ => apply_range::<F32>(p, inputs, start, len, od, out),
        })
    }

    /// `nuslerp_row_wise`: rows along the first axis, i.e. each column of the tensor seen as
    /// `[rows, numel / rows]`, on its own. torch reduces the transposed tensor strided: each
    /// column's norm is a sequential float32 sum of squares down the rows, its cosine
    /// torch's outer sum (`torch::outer_sum`: float32 by column group, 16-bit sequential).
    pub fn merge_columns(&self, k: &Kernel, shape: &[usize], inputs: &[InputView], out: &mut [u8]) {
        match k.work {
            WorkDtype::BF16 => self.columns_r::<Bf16>(k, shape, inputs, out),
            WorkDtype::F16 => self.columns_r::<F16>(k, shape, inputs, out),
            _ => self.columns_r::<F32>(k, shape, inputs, out),
        }
    }

    fn columns_r<R: Round>(
        &self,
        k: &Kernel,
        shape: &[usize],
        inputs: &[InputView],
        out: &mut [u8],
    ) {
        let numel: usize = shape.iter().product();
        if numel == 0 {
            return;
        }
        let rows = shape[0].max(1);
        let cols = numel / rows;
        let (mut v0, mut v1) = (vec![0f32; numel], vec![0f32; numel]);
        v0.par_chunks_mut(MICRO)
            .zip(v1.par_chunks_mut(MICRO))
            .enumerate()
            .for_each(|(c, (a, b))| values::<R>(inputs, c * MICRO, a, b));
        let floor = R::round(1e-7);
        let prepared: Vec<Prepared> = (0..cols)
            .into_par_iter()
            .map(|c| {
                let col = |v: &[f32]| (0..rows).map(|r| v[r * cols + c]).collect::<Vec<f32>>();
                let (a, b) = (col(&v0), col(&v1));
                let norm = |x: &[f32]| {
                    let s = x.iter().fold(0f32, |s, v| s + v * v);
                    R::round(s.sqrt()).max(floor)
                };
                let (na, nb) = (norm(&a), norm(&b));
                let p: Vec<f32> = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| R::round(R::round(x / na) * R::round(y / nb)))
                    .collect();
                let dot = if R::DTYPE == safetensors::Dtype::F32 {
                    outer_sum(&p, c, cols)
                } else {
                    p.iter().fold(0f32, |s, v| s + v)
                };
                self.coefficients::<R>(dot)
            })
            .collect();
        let od = k.out.st_dtype();
        let osz = k.out.size();
        out.par_chunks_mut(cols * osz)
            .enumerate()
            .for_each(|(r, o)| {
                let start = r * cols;
                for (c, p) in prepared.iter().enumerate() {
                    apply_range::<R>(*p, inputs, start + c, 1, od, &mut o[c * osz..(c + 1) * osz]);
                }
            });
    }

    /// Rows of `row` elements, each on its own (`inputs` and `out` hold whole rows).
    pub fn merge_rows(&self, k: &Kernel, row: usize, inputs: &[InputView], out: &mut [u8]) {
        let osz = k.out.size();
        let od = k.out.st_dtype();
        out.par_chunks_mut(row * osz)
            .enumerate()
            .with_min_len((super::BLOCK / row).max(1))
            .for_each(|(r, out)| {
                let (start, len) = (r * row, out.len() / osz);
                let mut p = Prepared::Nothing;
                for _pass in 0..2 {
                    let mut acc = self.begin(k, p, len);
                    feed_at(k, &mut acc, inputs, start, len);
                    p = self.finish(k, &acc);
                }
                match k.work {
                    WorkDtype::BF16 => apply_range::<Bf16>(p, inputs, start, len, od, out),
                    WorkDtype::F16 => apply_range::<F16>(p, inputs, start, len, od, out),
                    _ => apply_range::<F32>(p, inputs, start, len, od, out),
                }
            });
    }
}

impl Acc {
    /// The next `len` elements (`inputs` hold exactly them), in order.
    pub fn feed(&mut self, k: &Kernel, inputs: &[InputView], len: usize) {
        feed_at(k, self, inputs, 0, len)
    }
}

fn feed_at(k: &Kernel, acc: &mut Acc, inputs: &[InputView], start: usize, len: usize) {
    match k.work {
        WorkDtype::BF16 => feed_r::<Bf16>(acc, inputs, start, len),
        WorkDtype::F16 => feed_r::<F16>(acc, inputs, start, len),
        _ => feed_r::<F32>(acc, inputs, start, len),
    }
}

fn feed_r<R: Round>(acc: &mut Acc, inputs: &[InputView], start: usize, len: usize) {
    let (mut v0, mut v1) = ([0f32; MICRO], [0f32; MICRO]);
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        values::<R>(inputs, start + off, &mut v0[..m], &mut v1[..m]);
        match acc {
            Acc::Norms(a, b) => {
                a.feed(&v0[..m]);
                b.feed(&v1[..m]);
            }
            Acc::Cos { n, sum } => {
                for j in 0..m {
                    v0[j] = R::round(R::round(v0[j] / n.0) * R::round(v1[j] / n.1));
                }
                sum.feed(&v0[..m]);
            }
        }
        off += m;
    }
}

fn apply_range<R: Round>(
    p: Prepared,
    inputs: &[InputView],
    start: usize,
    len: usize,
    od: safetensors::Dtype,
    out: &mut [u8],
) {
    let Prepared::Nuslerp {
        s0,
        s1,
        sin,
        a,
        b,
        colinear,
    } = p
    else {
        unreachable!("nuslerp's apply pass needs its coefficients")
    };
    let osz = out.len() / len.max(1);
    let base = inputs.len() == 3;
    let (mut v0, mut v1, mut x) = ([0f32; MICRO], [0f32; MICRO], [0f32; MICRO]);
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        values::<R>(inputs, start + off, &mut v0[..m], &mut v1[..m]);
        for j in 0..m {
            v0[j] = if colinear {
                R::round(R::round(v0[j] * a) + R::round(v1[j] * b))
            } else {
                R::round(R::round(R::round(s0 * v0[j]) + R::round(s1 * v1[j])) / sin)
            };
        }
        if base {
            decode::<R>(inputs[0].bytes, inputs[0].dtype, start + off, &mut x[..m]);
            for j in 0..m {
                v0[j] = R::round(x[j] + v0[j]);
            }
        }
        encode_with::<R>(&v0[..m], od, &mut out[off * osz..(off + m) * osz]);
        off += m;
    }
}
