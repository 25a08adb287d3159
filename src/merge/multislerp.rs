//! multislerp (mergekit 0.1.5, `merge_methods/multislerp.py`): barycentric interpolation of
//! several models (or their task vectors, with a base) on the hypersphere.
//!
//! Op by op in the working dtype W: `T_i` the inputs (or `R(x_i - base)`), `w` the weights as
//! a W tensor (divided by their sum with `normalize_weights`); `n_i = R(|T_i|)`,
//! `U_i = R(T_i / R(n_i + R(eps)))`, `mean = R(sum_i R(U_i w_i))` (torch's sum over the
//! models), normalised by its norm; `d_i = R(sum R(U_i mean))`, the tangent
//! `tr = R(sum_i R(R(U_i - R(d_i mean)) w_i))`, `tn = R(R(|tr|) + R(eps))`;
//! `out = R(R(R(mean R(cos tn)) + R(tr R(R(sin tn) / tn))) R(sum R(n_i w_i)))`, plus the base.
//! A single model is returned as it is. Four full-tensor reductions, each needing the one
//! before: the kernel takes whole tensors and makes five passes over them, recomputing what
//! a pass needs rather than holding float32 copies.

use super::numeric::{decode, encode_with, Bf16, Round, F16, F32};
use super::torch::{sum_models_run, sum_width, CascadeSum, NormSum, LANES};
use super::{vml, InputView, Kernel, WorkDtype};
use crate::params::{Kind, ParamDef, Scope};

pub const PARAMS: &[ParamDef] = &[
    ParamDef::per_input("weight", Scope::NonBase, None),
    ParamDef::shared("normalize_weights", Kind::Bool, 1.0),
    ParamDef::shared("eps", Kind::Float, 1e-8),
];

const MICRO: usize = 512;

/// multislerp for one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Multislerp {
    /// The weights of the inputs besides the base, in their order.
    pub weights: Vec<f64>,
    pub normalize: bool,
    pub eps: f64,
}

impl Multislerp {
    pub fn values(&self) -> Vec<(&'static str, serde_json::Value)> {
        vec![
            ("weight", serde_json::json!(self.weights)),
            ("normalize_weights", serde_json::json!(self.normalize)),
            ("eps", serde_json::json!(self.eps)),
        ]
    }

    /// Merge a whole tensor of `numel` elements.
    pub fn merge(&self, k: &Kernel, numel: usize, inputs: &[InputView], out: &mut [u8]) {
        match k.work {
            WorkDtype::BF16 => self.merge_r::<Bf16>(k, numel, inputs, out),
            WorkDtype::F16 => self.merge_r::<F16>(k, numel, inputs, out),
            _ => self.merge_r::<F32>(k, numel, inputs, out),
        }
    }

    fn merge_r<R: Round>(&self, k: &Kernel, numel: usize, inputs: &[InputView], out: &mut [u8]) {
        let od = k.out.st_dtype();
        let osz = k.out.size();
        let n = self.weights.len();
        let base = inputs.len() > n;
        let models = &inputs[usize::from(base)..];
        let (norm_w, sum_w) = match k.work {
            WorkDtype::F32 => (LANES, LANES),
            WorkDtype::BF16 => (2 * LANES, 2 * LANES),
            _ => (0, sum_width(R::DTYPE)),
        };
        let small_sum = |v: &[f32]| {
            let mut s = CascadeSum::new(v.len(), sum_width(R::DTYPE));
            s.feed(v);
            R::round(s.finish())
        };
        let mut buf = vec![0f32; MICRO];
        if n == 1 {
            for off in (0..numel).step_by(MICRO) {
                let m = MICRO.min(numel - off);
                decode::<R>(models[0].bytes, models[0].dtype, off, &mut buf[..m]);
                encode_with::<R>(&buf[..m], od, &mut out[off * osz..(off + m) * osz]);
            }
            return;
        }
        // The weights as a W tensor, normalised by their sum.
        let mut w: Vec<f32> = self.weights.iter().map(|&x| R::round(x as f32)).collect();
        if self.normalize {
            let s = small_sum(&w);
            w.iter_mut().for_each(|x| *x = R::round(*x / s));
        }
        let eps = R::round(self.eps as f32);
        // The task vectors of a run of `m` elements from `off`, model by model.
        let mut t = vec![0f32; n * MICRO];
        let mut b = vec![0f32; MICRO];
        let load = |off: usize, m: usize, t: &mut [f32], b: &mut [f32]| {
            if base {
                decode::<R>(inputs[0].bytes, inputs[0].dtype, off, &mut b[..m]);
            }
            for (i, x) in models.iter().enumerate() {
                let row = &mut t[i * m..(i + 1) * m];
                decode::<R>(x.bytes, x.dtype, off, row);
                if base {
                    row.iter_mut()
                        .zip(&b[..m])
                        .for_each(|(v, b)| *v = R::round(*v - b));
                }
            }
        };
        let runs = || {
            (0..numel)
                .step_by(MICRO)
                .map(move |off| (off, MICRO.min(numel - off)))
        };
        // Pass 1: the norms.
        let mut norms: Vec<NormSum> = (0..n).map(|_| NormSum::new(numel, norm_w)).collect();
        for (off, m) in runs() {
            load(off, m, &mut t, &mut b);
            for (i, s) in norms.iter_mut().enumerate() {
                s.feed(&t[i * m..(i + 1) * m]);
            }
        }
        let nrm: Vec<f32> = norms.iter().map(|s| R::round(s.finish().sqrt())).collect();
        let denom: Vec<f32> = nrm.iter().map(|&x| R::round(x + eps)).collect();
        // U_i in place of T_i, and R(U_i w_i) into `p`.
        let unit_mean = |t: &mut [f32], m: usize, p: &mut [f32]| {
            for i in 0..n {
                for j in 0..m {
                    let u = R::round(t[i * m + j] / denom[i]);
                    t[i * m + j] = u;
                    p[i * m + j] = R::round(u * w[i]);
                }
            }
        };
        let mut p = vec![0f32; n * MICRO];
        let mut mean = vec![0f32; MICRO];
        let sum_models = |rows: &[f32], off: usize, out: &mut [f32]| {
            sum_models_run(R::DTYPE, rows, off, numel, out);
            out.iter_mut().for_each(|x| *x = R::round(*x));
        };
        // Pass 2: the mean's norm.
        let mut mn = NormSum::new(numel, norm_w);
        for (off, m) in runs() {
            load(off, m, &mut t, &mut b);
            unit_mean(&mut t, m, &mut p);
            sum_models(&p[..n * m], off, &mut mean[..m]);
            mn.feed(&mean[..m]);
        }
        let mn = R::round(mn.finish().sqrt());
        if mn < eps {
            // mergekit interpolates linearly for two models and raises for more: linearly
            // here for any number (documented).
            for (off, m) in runs() {
                load(off, m, &mut t, &mut b);
                for i in 0..n {
                    for j in 0..m {
                        p[i * m + j] = R::round(t[i * m + j] * w[i]);
                    }
                }
                sum_models(&p[..n * m], off, &mut mean[..m]);
                if base {
                    mean[..m]
                        .iter_mut()
                        .zip(&b[..m])
                        .for_each(|(r, b)| *r = R::round(*r + b));
                }
                encode_with::<R>(&mean[..m], od, &mut out[off * osz..(off + m) * osz]);
            }
            return;
        }
        let normalized = |t: &mut [f32], m: usize, off: usize, mean: &mut [f32], p: &mut [f32]| {
            unit_mean(t, m, p);
            sum_models(&p[..n * m], off, &mut mean[..m]);
            mean[..m].iter_mut().for_each(|x| *x = R::round(*x / mn));
        };
        // Pass 3: the dots of each unit vector with the mean.
        let mut dots: Vec<CascadeSum> = (0..n).map(|_| CascadeSum::new(numel, sum_w)).collect();
        for (off, m) in runs() {
            load(off, m, &mut t, &mut b);
            normalized(&mut t, m, off, &mut mean, &mut p);
            for (i, d) in dots.iter_mut().enumerate() {
                for j in 0..m {
                    buf[j] = R::round(t[i * m + j] * mean[j]);
                }
                d.feed(&buf[..m]);
            }
        }
        let d: Vec<f32> = dots.iter().map(|s| R::round(s.finish())).collect();
        // The tangent result of a run, into `tr`.
        let mut tr = vec![0f32; MICRO];
        let tangent = |t: &mut [f32],
                       m: usize,
                       off: usize,
                       mean: &mut [f32],
                       p: &mut [f32],
                       tr: &mut [f32]| {
            normalized(t, m, off, mean, p);
            for i in 0..n {
                for j in 0..m {
                    let g = R::round(t[i * m + j] - R::round(d[i] * mean[j]));
                    p[i * m + j] = R::round(g * w[i]);
                }
            }
            sum_models(&p[..n * m], off, &mut tr[..m]);
        };
        // Pass 4: the tangent's norm.
        let mut tn = NormSum::new(numel, norm_w);
        for (off, m) in runs() {
            load(off, m, &mut t, &mut b);
            tangent(&mut t, m, off, &mut mean, &mut p, &mut tr);
            tn.feed(&tr[..m]);
        }
        let tn = R::round(R::round(tn.finish().sqrt()) + eps);
        let c = R::round(vml::cos(tn));
        let sf = R::round(R::round(vml::sin(tn)) / tn);
        let nw: Vec<f32> = nrm.iter().zip(&w).map(|(a, b)| R::round(a * b)).collect();
        let avg = small_sum(&nw);
        // The output.
        for (off, m) in runs() {
            load(off, m, &mut t, &mut b);
            tangent(&mut t, m, off, &mut mean, &mut p, &mut tr);
            for j in 0..m {
                let r = R::round(R::round(mean[j] * c) + R::round(tr[j] * sf));
                let r = R::round(r * avg);
                buf[j] = if base { R::round(r + b[j]) } else { r };
            }
            encode_with::<R>(&buf[..m], od, &mut out[off * osz..(off + m) * osz]);
        }
    }
}
