//! mergekit's sparsifying task-arithmetic family (mergekit 0.1.5,
//! `merge_methods/generalized_task_arithmetic.py` and `sparsify.py`): ties, dare_ties,
//! dare_linear, breadcrumbs, breadcrumbs_ties, della, della_linear.
//!
//! Each is task_arithmetic with each task vector first sparsified (by magnitude, at random,
//! by magnitude rank band, or by a rank-dependent random draw) and, for the `_ties` ones
//! and della, a sign consensus: only the deltas agreeing with the sign of their sum count,
//! and the weights of those alone divide. Every step runs op by op in the working dtype W
//! as torch does (float32 arithmetic, one rounding), the random draws in mergekit's stream
//! order from the tensor's offset, the selections in libstdc++'s tie order
//! ([`super::stdsort`]). The sparsification needs the whole task vector, so these kernels
//! take whole tensors.

use rayon::prelude::*;
use safetensors::Dtype;

use super::mt19937;
use super::numeric::{encode_with, Bf16, Round, F16, F32};
use super::stdsort::{self, Order, Pair};
use super::{torch, InputView, Kernel, WorkDtype};
use crate::params::{Kind, ParamDef, Scope};

/// The family's members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Ties,
    DareTies,
    DareLinear,
    Breadcrumbs,
    BreadcrumbsTies,
    Della,
    DellaLinear,
}

/// How a member sparsifies a task vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sparsify {
    Magnitude,
    Random,
    MagnitudeOutliers,
    DellaMagprune,
}

impl Family {
    pub const ALL: &[Family] = &[
        Family::Ties,
        Family::DareTies,
        Family::DareLinear,
        Family::Breadcrumbs,
        Family::BreadcrumbsTies,
        Family::Della,
        Family::DellaLinear,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Family::Ties => "ties",
            Family::DareTies => "dare_ties",
            Family::DareLinear => "dare_linear",
            Family::Breadcrumbs => "breadcrumbs",
            Family::BreadcrumbsTies => "breadcrumbs_ties",
            Family::Della => "della",
            Family::DellaLinear => "della_linear",
        }
    }
    pub fn pretty_name(self) -> &'static str {
        match self {
            Family::Ties => "TIES",
            Family::DareTies => "DARE TIES",
            Family::DareLinear => "Linear DARE",
            Family::Breadcrumbs => "Model Breadcrumbs",
            Family::BreadcrumbsTies => "Model Breadcrumbs with TIES",
            Family::Della => "DELLA",
            Family::DellaLinear => "Linear DELLA",
        }
    }
    pub fn reference_url(self) -> &'static str {
        match self {
            Family::Ties => "https://arxiv.org/abs/2306.01708",
            Family::DareTies | Family::DareLinear => "https://arxiv.org/abs/2311.03099",
            Family::Breadcrumbs | Family::BreadcrumbsTies => "https://arxiv.org/abs/2312.06795",
            Family::Della | Family::DellaLinear => "https://arxiv.org/abs/2406.11617",
        }
    }
    fn sparsify(self) -> Sparsify {
        match self {
            Family::Ties => Sparsify::Magnitude,
            Family::DareTies | Family::DareLinear => Sparsify::Random,
            Family::Breadcrumbs | Family::BreadcrumbsTies => Sparsify::MagnitudeOutliers,
            Family::Della | Family::DellaLinear => Sparsify::DellaMagprune,
        }
    }
    /// The sign consensus of TIES.
    pub fn consensus(self) -> bool {
        matches!(
            self,
            Family::Ties | Family::DareTies | Family::BreadcrumbsTies | Family::Della
        )
    }
    /// Whether the member draws from the random stream.
    pub fn random(self) -> bool {
        matches!(self.sparsify(), Sparsify::Random | Sparsify::DellaMagprune)
    }
    /// The draws a tensor of `numel` elements takes for an input of this `density`.
    pub fn draws(self, density: f64, numel: usize) -> u64 {
        let draws = match self.sparsify() {
            Sparsify::Random => density < 1.0,
            Sparsify::DellaMagprune => density > 0.0 && density < 1.0,
            _ => false,
        };
        if draws {
            numel as u64
        } else {
            0
        }
    }
    pub fn params(self) -> &'static [ParamDef] {
        match self {
            Family::Ties => TIES,
            Family::DareTies | Family::DareLinear => DARE,
            Family::Breadcrumbs | Family::BreadcrumbsTies => BREADCRUMBS,
            Family::Della => DELLA,
            Family::DellaLinear => DELLA_LINEAR,
        }
    }
    /// The name of the member-specific per-input parameter (gamma or epsilon), if any.
    pub fn extra(self) -> Option<&'static str> {
        match self.sparsify() {
            Sparsify::MagnitudeOutliers => Some("gamma"),
            Sparsify::DellaMagprune => Some("epsilon"),
            _ => None,
        }
    }
}

const WEIGHT: ParamDef = ParamDef::per_input("weight", Scope::NonBase, None);
const DENSITY: ParamDef = ParamDef::per_input("density", Scope::NonBase, Some(1.0));
const GAMMA: ParamDef = ParamDef::per_input("gamma", Scope::NonBase, Some(0.01));
const EPSILON: ParamDef = ParamDef::per_input("epsilon", Scope::NonBase, Some(0.15));
const INT8_MASK: ParamDef = ParamDef::shared("int8_mask", Kind::Bool, 0.0);
const LAMBDA: ParamDef = ParamDef::shared("lambda", Kind::Float, 1.0);
const fn flag(name: &'static str, default: bool) -> ParamDef {
    ParamDef::shared(name, Kind::Bool, if default { 1.0 } else { 0.0 })
}
/// Each member's parameters: mergekit's table (`normalize` and `rescale` defaults differ).
const TIES: &[ParamDef] = &[
    WEIGHT,
    DENSITY,
    INT8_MASK,
    flag("normalize", true),
    flag("rescale", false),
    LAMBDA,
];
const DARE: &[ParamDef] = &[
    WEIGHT,
    DENSITY,
    INT8_MASK,
    flag("normalize", false),
    flag("rescale", true),
    LAMBDA,
];
const BREADCRUMBS: &[ParamDef] = &[
    WEIGHT,
    DENSITY,
    GAMMA,
    INT8_MASK,
    flag("normalize", false),
    flag("rescale", false),
    LAMBDA,
];
const DELLA: &[ParamDef] = &[
    WEIGHT,
    DENSITY,
    EPSILON,
    INT8_MASK,
    flag("normalize", true),
    flag("rescale", true),
    LAMBDA,
];
const DELLA_LINEAR: &[ParamDef] = &[
    WEIGHT,
    DENSITY,
    EPSILON,
    INT8_MASK,
    flag("normalize", false),
    flag("rescale", true),
    LAMBDA,
];

/// One tensor's resolved values. Per-input lists are in the kernel's input order (the
/// base first, its entries unused).
#[derive(Debug, Clone, PartialEq)]
pub struct Gta {
    pub family: Family,
    pub weights: Vec<f64>,
    pub densities: Vec<f64>,
    /// gamma (breadcrumbs) or epsilon (della) per input; empty for the others.
    pub extra: Vec<f64>,
    pub normalize: bool,
    pub rescale: bool,
    pub lambda: f64,
    /// The random stream: seed and this tensor's offset in it (draws before it).
    pub seed: u64,
    pub offset: u64,
}

impl Gta {
    /// Scratch memory for a tensor of `numel` elements and `inputs` inputs: every task
    /// vector as float32, the base's values, and each model's sort pairs (the models are
    /// sparsified in parallel).
    pub fn scratch_bytes(&self, numel: usize, inputs: usize) -> u64 {
        ((inputs + 1) * 4 * numel + 8 * numel * inputs.saturating_sub(1)) as u64
    }
}

pub fn merge(k: &Kernel, g: &Gta, shape: &[usize], inputs: &[InputView], out: &mut [u8]) {
    match k.work {
        WorkDtype::BF16 => merge_in::<Bf16>(k, g, shape, inputs, out),
        WorkDtype::F16 => merge_in::<F16>(k, g, shape, inputs, out),
        WorkDtype::F32 => merge_in::<F32>(k, g, shape, inputs, out),
        WorkDtype::F64 => unreachable!("the plan refuses float64 for {}", g.family.name()),
    }
}

/// Round to the working dtype `R`.
#[inline(always)]
fn r<R: Round>(x: f32) -> f32 {
    R::round(x)
}

fn merge_in<R: Round>(k: &Kernel, g: &Gta, shape: &[usize], inputs: &[InputView], out: &mut [u8]) {
    let numel: usize = shape.iter().product();
    let (base, tvs) = super::task_vectors::<R>(inputs, numel);
    // The task vectors, sparsified, then weighted: d_i = R(R(x_i - base) * w_i). Each
    // model's draws follow the previous models' in the stream, so each starts at its own
    // offset and the models run in parallel.
    let mut starts = Vec::with_capacity(inputs.len());
    let mut at = g.offset;
    for i in 1..inputs.len() {
        starts.push(at);
        at += g.family.draws(g.densities[i], numel);
    }
    let (deltas, w): (Vec<Vec<f32>>, Vec<f32>) = tvs
        .into_par_iter()
        .enumerate()
        .map(|(k, mut d)| {
            let i = k + 1;
            let draws = g.family.draws(g.densities[i], numel) > 0;
            let stream = draws.then_some(starts[i - 1]);
            let extra = g.extra.get(i).copied().unwrap_or(0.0);
            sparsify::<R>(g, &mut d, shape, g.densities[i], extra, stream);
            (d, R::round_f64(g.weights[i]))
        })
        .unzip();
    combine::<R>(k, g, &base, &deltas, &w, out);
}

/// The merge of the sparsified task vectors into `out`, a run of elements at a time so
/// each step is one loop over a run: weighted deltas `d_i = R(tv_i * w_i)`; with the sign
/// consensus, only the deltas agreeing with the sign of their sum count and their weights
/// alone divide; else the weights' sum divides. Then lambda and the base.
fn combine<R: Round>(
    k: &Kernel,
    g: &Gta,
    base: &[f32],
    tvs: &[Vec<f32>],
    w: &[f32],
    out: &mut [u8],
) {
    let (n, numel) = (tvs.len(), base.len());
    let dtype = R::DTYPE;
    let od = k.out.st_dtype();
    let osz = k.out.size();
    // Without consensus the divisor is one number: the weights' sum.
    let plain_div = {
        let mut s = torch::CascadeSum::new(n, torch::sum_width(dtype));
        s.feed(w);
        let div = r::<R>(s.finish());
        if div.abs() < r::<R>(1e-8) {
            1.0
        } else {
            div
        }
    };
    let lambda = (g.lambda != 1.0).then_some(g.lambda as f32);
    const RUN: usize = 1024;
    out.par_chunks_mut(RUN * osz)
        .enumerate()
        .for_each(|(c, out)| {
            let start = c * RUN;
            let len = out.len() / osz;
            let mut d = vec![0f32; n * len];
            for ((d, tv), &wi) in d.chunks_exact_mut(len).zip(tvs).zip(w) {
                for (d, &t) in d.iter_mut().zip(&tv[start..start + len]) {
                    *d = r::<R>(t * wi);
                }
            }
            let mut mixed = vec![0f32; len];
            let mut div = vec![plain_div; len];
            if g.family.consensus() {
                let mut majority = vec![0f32; len];
                torch::sum_models_run(dtype, &d, start, numel, &mut majority);
                for s in &mut majority {
                    *s = if r::<R>(*s) >= 0.0 { 1.0 } else { -1.0 };
                }
                // The kept deltas and their weights (`x * 0` keeps the sign of zero).
                let mut kept_w = vec![0f32; n * len];
                for ((d, kw), &wi) in d
                    .chunks_exact_mut(len)
                    .zip(kept_w.chunks_exact_mut(len))
                    .zip(w)
                {
                    for ((d, kw), &m) in d.iter_mut().zip(kw).zip(&majority) {
                        let keep = (torch::sign(*d) == m) as u8 as f32;
                        *d = r::<R>(*d * keep);
                        *kw = r::<R>(wi * keep);
                    }
                }
                torch::sum_models_run(dtype, &kept_w, start, numel, &mut div);
                for v in &mut div {
                    let s = r::<R>(*v);
                    *v = if s == 0.0 { 1.0 } else { s };
                }
            }
            torch::sum_models_run(dtype, &d, start, numel, &mut mixed);
            for ((m, &dv), &b) in mixed.iter_mut().zip(&div).zip(&base[start..start + len]) {
                let mut x = r::<R>(*m);
                if g.normalize {
                    x = r::<R>(x / dv);
                }
                if let Some(l) = lambda {
                    x = r::<R>(x * l);
                }
                *m = r::<R>(b + x);
            }
            encode_with::<R>(&mixed, od, out);
        });
}

/// The dtype mergekit's random sparsifiers work in: bfloat16 stays, others are float32.
fn random_in_bf16<R: Round>() -> bool {
    R::DTYPE == Dtype::BF16
}

/// Round to the random sparsifiers' working dtype.
#[inline(always)]
fn rd<R: Round>(x: f32) -> f32 {
    if random_in_bf16::<R>() {
        Bf16::round(x)
    } else {
        x
    }
}

/// Sparsify one task vector in place (values of W).
fn sparsify<R: Round>(
    g: &Gta,
    d: &mut [f32],
    shape: &[usize],
    density: f64,
    extra: f64,
    stream: Option<u64>,
) {
    let n = d.len();
    match g.family.sparsify() {
        Sparsify::Magnitude => {
            if density >= 1.0 {
                return;
            }
            if density <= 0.0 || n == 0 {
                d.fill(0.0);
                return;
            }
            let k = ((density * n as f64) as usize).max(1);
            let keep = selected(d, Order::Descending, 0, k);
            mask_and_rescale::<R>(d, |i| keep[i], g.rescale, torch::sum_width(R::DTYPE));
        }
        Sparsify::MagnitudeOutliers => {
            if density >= 1.0 {
                return;
            }
            let target = (density * n as f64) as usize;
            let top = (extra * n as f64) as usize;
            let bottom = n.saturating_sub(target + top);
            let keep = selected(d, Order::Ascending, bottom, (bottom + target).min(n));
            mask_and_rescale::<R>(d, |i| keep[i], g.rescale, torch::sum_width(R::DTYPE));
        }
        Sparsify::Random => {
            if density >= 1.0 {
                return;
            }
            let start = stream.expect("a random sparsifier has its stream");
            let p = if random_in_bf16::<R>() {
                Bf16::round_f64(density)
            } else {
                density as f32
            };
            let mut keep = vec![false; n];
            mt19937::bernoulli_par(g.seed, start, &mut keep, |_| p);
            mask_and_rescale_random::<R>(d, &keep, g.rescale);
        }
        Sparsify::DellaMagprune => {
            if density >= 1.0 {
                return;
            }
            if density <= 0.0 {
                d.fill(0.0);
                return;
            }
            let start = stream.expect("a random sparsifier has its stream");
            let keep = della_mask::<R>(d, shape, density, extra, (g.seed, start));
            mask_and_rescale_random::<R>(d, &keep, g.rescale);
        }
    }
}

/// A random sparsifier's mask and rescale, in its working dtype (bfloat16 stays, the
/// others work in float32), then `.to(W)`.
fn mask_and_rescale_random<R: Round>(d: &mut [f32], keep: &[bool], rescale: bool) {
    if random_in_bf16::<R>() {
        mask_and_rescale::<Bf16>(d, |i| keep[i], rescale, torch::sum_width(Dtype::BF16));
    } else {
        mask_and_rescale::<F32>(d, |i| keep[i], rescale, torch::sum_width(Dtype::F32));
    }
    d.par_iter_mut().for_each(|x| *x = r::<R>(*x));
}

/// Which elements sit at ranks `from..to` of `|d|` (float32) sorted in `order` by torch's
/// `sort`/`argsort`.
fn selected(d: &[f32], order: Order, from: usize, to: usize) -> Vec<bool> {
    let mut pairs: Vec<Pair> = d
        .par_iter()
        .enumerate()
        .map(|(i, x)| stdsort::pair(x.abs(), i, order))
        .collect();
    stdsort::select(&mut pairs, &[from, to]);
    let mut keep = vec![false; d.len()];
    for &p in &pairs[from..to] {
        keep[stdsort::index(p)] = true;
    }
    keep
}

/// `rescaled_masked_tensor(d, mask, l1 if rescale)`, in a working dtype rounded by
/// `round` whose full sums take vectors of `width`: `masked = d * mask`; with rescale,
/// `masked * (sum|d| / sum|masked|)` unless either sum is below 1e-7.
fn mask_and_rescale<W: Round>(
    d: &mut [f32],
    keep: impl Fn(usize) -> bool + Sync,
    rescale: bool,
    width: usize,
) {
    let round = W::round;
    let full = |v: &[f32]| {
        let mut s = torch::CascadeSum::new(v.len(), width);
        let mut buf = Vec::with_capacity(4096);
        for c in v.chunks(4096) {
            buf.clear();
            buf.extend(c.iter().map(|x| x.abs()));
            s.feed(&buf);
        }
        round(s.finish())
    };
    let before = if rescale { full(d) } else { 0.0 };
    // `x * 1` and `x * 0` are exact (the latter keeps the sign of zero, as torch's product
    // does): no rounding.
    d.par_chunks_mut(4096).enumerate().for_each(|(c, xs)| {
        for (j, x) in xs.iter_mut().enumerate() {
            *x *= keep(c * 4096 + j) as u8 as f32;
        }
    });
    if !rescale {
        return;
    }
    let after = full(d);
    let eps = round(1e-7);
    if before < eps || after < eps {
        return;
    }
    let ratio = round(before / after);
    d.par_iter_mut().for_each(|x| *x = round(*x * ratio));
}

/// della's mask: per row (the last axis; a 1-D tensor is one row), the magnitudes' ranks
/// (an ascending argsort's inverse, in the working dtype, from 1), normalised to [0, 1],
/// make the keep probabilities `density - epsilon + rank_norm * 2 * epsilon`; one draw per
/// element in row-major order.
fn della_mask<R: Round>(
    d: &[f32],
    shape: &[usize],
    density: f64,
    epsilon: f64,
    (seed, start): (u64, u64),
) -> Vec<bool> {
    let cols = match shape {
        [] => 1,
        [n] => *n,
        [.., last] => *last,
    }
    .max(1);
    let base_p = rd::<R>(if random_in_bf16::<R>() {
        Bf16::round_f64(density - epsilon)
    } else {
        (density - epsilon) as f32
    });
    let eps = epsilon as f32;
    // The probabilities of every row (sorting is per row and independent: in parallel),
    // each row's ranks first, in place.
    let mut probs = vec![0f32; d.len()];
    probs
        .par_chunks_mut(cols)
        .zip(d.par_chunks(cols))
        .for_each_init(Vec::new, |pairs: &mut Vec<Pair>, (prob, row)| {
            pairs.clear();
            pairs.extend(
                row.iter()
                    .enumerate()
                    .map(|(i, x)| stdsort::pair(x.abs(), i, Order::Ascending)),
            );
            stdsort::sort(pairs);
            for (pos, &p) in pairs.iter().enumerate() {
                prob[stdsort::index(p)] = rd::<R>(rd::<R>(pos as f32) + 1.0);
            }
            let min = prob.iter().copied().fold(f32::INFINITY, f32::min);
            let max = prob.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let span = rd::<R>(max - min);
            for p in prob.iter_mut() {
                let norm = rd::<R>(rd::<R>(*p - min) / span).clamp(0.0, 1.0);
                *p = rd::<R>(base_p + rd::<R>(rd::<R>(norm * 2.0) * eps));
            }
        });
    let mut keep = vec![false; probs.len()];
    mt19937::bernoulli_par(seed, start, &mut keep, |i| probs[i]);
    keep
}
