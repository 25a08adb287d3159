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
//! take whole tensors, in two steps that hold no task vector: each model's mask (and
//! rescale factor), made from its task vector computed a block at a time; then one pass
//! over the elements that computes the task vectors again, masks, weighs and merges them a
//! run at a time (recomputing `R(x - base)` costs less than writing and reading back a
//! float32 copy of every task vector).

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use rayon::prelude::*;
use safetensors::Dtype;

use super::bits;
use super::mt19937::{self, Mt19937, Probs};
use super::numeric::{decode, encode_with, Bf16, Round, F16, F32};
use super::stdsort::{self, Order, Pair};
use super::{
    majority_signs, task_chunk, torch, ConsensusScratch, InputView, Kernel, TaskVector, WorkDtype,
    BLOCK,
};
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
    /// Whether the member keeps a band of magnitude ranks (ties, breadcrumbs).
    fn selects(self) -> bool {
        matches!(
            self.sparsify(),
            Sparsify::Magnitude | Sparsify::MagnitudeOutliers
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
    /// Scratch memory for a tensor of `numel` elements and `inputs` inputs: each model's
    /// mask (a bit an element) and, while it is made, its sort pairs (the selecting
    /// members, one model at a time) or keep probabilities (della, the models in
    /// parallel). The task vectors are recomputed from the inputs where needed, never held.
    pub fn scratch_bytes(&self, numel: usize, inputs: usize) -> u64 {
        let models = inputs.saturating_sub(1);
        let making = match self.family.sparsify() {
            // One model's sort pairs and its marks (a byte an element) at a time.
            Sparsify::Magnitude | Sparsify::MagnitudeOutliers => 9,
            Sparsify::DellaMagprune => 4 * models,
            Sparsify::Random => 0,
        };
        (8 * models * bits::words(numel) + making * numel) as u64
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
    // Each model's sparsification (its draws follow the previous models' in the stream, so
    // each starts from its own generator, moved on from the previous one), then one pass
    // over the elements that recomputes the task vectors and merges them.
    let mut streams: Vec<Option<Mt19937>> = Vec::with_capacity(inputs.len());
    let mut at = g.offset;
    for i in 1..inputs.len() {
        let draws = g.family.draws(g.densities[i], numel);
        streams.push((draws > 0).then(|| Mt19937::at(g.seed, at)));
        at += draws;
    }
    let one = |i: usize| {
        let stream = streams[i - 1].as_ref();
        let extra = g.extra.get(i).copied().unwrap_or(0.0);
        let tv = TaskVector {
            base: &inputs[0],
            model: &inputs[i],
            numel,
        };
        sparsify::<R>(g, &tv, shape, g.densities[i], extra, stream)
    };
    // A selection runs on every thread, and its sort pairs are the largest scratch: one
    // model after another. The others draw or sum a model on one thread: in parallel.
    let sparse: Vec<Sparse> = if g.family.selects() {
        (1..inputs.len()).map(one).collect()
    } else {
        (1..inputs.len()).into_par_iter().map(one).collect()
    };
    let w: Vec<f32> = (1..inputs.len())
        .map(|i| R::round_f64(g.weights[i]))
        .collect();
    combine::<R>(k, g, inputs, &sparse, &w, out);
}

/// Which elements of a task vector a sparsifier keeps.
enum Keep {
    All,
    None,
    /// One bit an element ([`bits`]).
    Mask(Vec<u64>),
}

/// The dtype a sparsifier rescales in: the working dtype, or for the random ones bfloat16
/// (it stays) or float32 (the others), then `.to(W)`.
#[derive(Clone, Copy)]
enum RescaleIn {
    Work,
    Bf16,
    F32,
}

/// One model's sparsification: its task vector masked, then rescaled by `ratio` (rounded
/// in `dtype`) when the sums allow.
struct Sparse {
    keep: Keep,
    ratio: Option<f32>,
    dtype: RescaleIn,
}

impl Sparse {
    /// Sparsify task-vector values `x` (elements `start..`) in place.
    #[inline(always)]
    fn apply<R: Round>(&self, start: usize, x: &mut [f32]) {
        match &self.keep {
            Keep::All => {}
            Keep::None => x.fill(0.0),
            // `x * 1` and `x * 0` are exact (the latter keeps the sign of zero, as torch's
            // product does): no rounding.
            Keep::Mask(m) => {
                let mut k = [0f32; RUN];
                let k = &mut k[..x.len()];
                bits::expand(m, start, k);
                for (x, &k) in x.iter_mut().zip(k.iter()) {
                    *x *= k;
                }
            }
        }
        if let Some(ratio) = self.ratio {
            match self.dtype {
                // In W itself, or in float32 (no rounding) then `.to(W)`: the same steps.
                RescaleIn::Work | RescaleIn::F32 => {
                    x.iter_mut().for_each(|x| *x = r::<R>(*x * ratio))
                }
                RescaleIn::Bf16 => x
                    .iter_mut()
                    .for_each(|x| *x = r::<R>(Bf16::round(*x * ratio))),
            }
        }
    }
}

/// The merge of the sparsified task vectors into `out`, a run of elements at a time so
/// each step is one loop over a run: weighted deltas `d_i = R(tv_i * w_i)`; with the sign
/// consensus, only the deltas agreeing with the sign of their sum count and their weights
/// alone divide; else the weights' sum divides. Then lambda and the base.
fn combine<R: Round>(
    k: &Kernel,
    g: &Gta,
    inputs: &[InputView],
    sparse: &[Sparse],
    w: &[f32],
    out: &mut [u8],
) {
    let n = sparse.len();
    let dtype = R::DTYPE;
    let od = k.out.st_dtype();
    let osz = k.out.size();
    let numel = out.len() / osz;
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
    let how = Combine {
        g,
        inputs,
        sparse,
        w,
        plain_div,
        lambda,
        od,
        osz,
        numel,
    };
    out.par_chunks_mut(RUN * osz).enumerate().for_each_init(
        || ConsensusScratch::new(n, RUN),
        |sc, (c, out)| simd::combine_run::<R>(&how, c * RUN, sc, out),
    );
}

/// Elements merged together in one step of [`combine`].
const RUN: usize = 4096;

/// What [`combine_run`] needs of the merge.
struct Combine<'a> {
    g: &'a Gta,
    inputs: &'a [InputView<'a>],
    sparse: &'a [Sparse],
    w: &'a [f32],
    plain_div: f32,
    lambda: Option<f32>,
    od: Dtype,
    osz: usize,
    numel: usize,
}

/// One run of [`combine`]: elements `start..` into `out`.
#[inline(always)]
fn combine_run<R: Round>(how: &Combine, start: usize, sc: &mut ConsensusScratch, out: &mut [u8]) {
    let Combine {
        g,
        inputs,
        sparse,
        w,
        plain_div,
        lambda,
        od,
        osz,
        numel,
    } = *how;
    let (n, dtype) = (sparse.len(), R::DTYPE);
    let len = out.len() / osz;
    let base = &mut sc.base[..len];
    decode::<R>(inputs[0].bytes, inputs[0].dtype, start, base);
    let d = &mut sc.d[..n * len];
    for (i, (d, s)) in d.chunks_exact_mut(len).zip(sparse).enumerate() {
        task_chunk::<R>(&inputs[i + 1], base, start, d);
        s.apply::<R>(start, d);
        for d in d.iter_mut() {
            *d = r::<R>(*d * w[i]);
        }
    }
    let mixed = &mut sc.merged[..len];
    let div = &mut sc.div[..len];
    div.fill(plain_div);
    if g.family.consensus() {
        let majority = &mut sc.majority[..len];
        majority_signs::<R>(d, start, numel, majority);
        // The kept deltas and their weights (`x * 0` keeps the sign of zero).
        let kept_w = &mut sc.kept_w[..n * len];
        for ((d, kw), &wi) in d
            .chunks_exact_mut(len)
            .zip(kept_w.chunks_exact_mut(len))
            .zip(w)
        {
            for ((d, kw), &m) in d.iter_mut().zip(kw).zip(majority.iter()) {
                let keep = (torch::sign(*d) == m) as u8 as f32;
                *d = r::<R>(*d * keep);
                *kw = r::<R>(wi * keep);
            }
        }
        torch::sum_models_run(dtype, kept_w, start, numel, div);
        for v in div.iter_mut() {
            let s = r::<R>(*v);
            *v = if s == 0.0 { 1.0 } else { s };
        }
    }
    torch::sum_models_run(dtype, d, start, numel, mixed);
    for ((m, &dv), &b) in mixed.iter_mut().zip(div.iter()).zip(base.iter()) {
        let mut x = r::<R>(*m);
        if g.normalize {
            x = r::<R>(x / dv);
        }
        if let Some(l) = lambda {
            x = r::<R>(x * l);
        }
        *m = r::<R>(b + x);
    }
    encode_with::<R>(mixed, od, out);
}

/// Per-thread scratch of [`della_row`].
struct DellaRow {
    pairs: Vec<Pair>,
    keys: Vec<u32>,
    places: Vec<u32>,
    b: Vec<f32>,
    row: Vec<f32>,
}

/// della's keep probabilities for the row of `prob.len()` elements at `start`: the
/// magnitudes' places in `std::sort`'s order ([`stdsort::sort_places`]), as ranks in R from
/// 1, normalised to [0, 1], then `base_p + rank_norm * 2 * epsilon`.
#[inline(always)]
fn della_row<R: Round>(
    tv: &TaskVector,
    start: usize,
    base_p: f32,
    eps: f32,
    s: &mut DellaRow,
    prob: &mut [f32],
) {
    let len = prob.len();
    let row = &mut s.row[..len];
    tv.chunk::<R>(start, &mut s.b[..len], row);
    s.pairs.clear();
    s.pairs.extend(
        row.iter()
            .enumerate()
            .map(|(i, x)| stdsort::pair(x.abs(), i, Order::Ascending)),
    );
    stdsort::sort_places(&mut s.pairs, &mut s.keys, &mut s.places);
    for (&p, &at) in s.pairs.iter().zip(&s.places) {
        prob[stdsort::index(p)] = rd::<R>(rd::<R>(at as f32) + 1.0);
    }
    let min = prob.iter().copied().fold(f32::INFINITY, f32::min);
    let max = prob.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let span = rd::<R>(max - min);
    for p in prob.iter_mut() {
        let norm = rd::<R>(rd::<R>(*p - min) / span).clamp(0.0, 1.0);
        *p = rd::<R>(base_p + rd::<R>(rd::<R>(norm * 2.0) * eps));
    }
}

/// The hot loops compiled twice (see [`super::simd`]).
mod simd {
    use super::*;
    use crate::twice;

    twice!(generic combine_run(how: &Combine, start: usize, sc: &mut ConsensusScratch, out: &mut [u8]));
    twice!(generic abs_sums(tv: &TaskVector, keep: &[u64], width: usize) -> (f32, f32));
    twice!(generic pairs(tv: &TaskVector, start: usize, order: Order, out: &mut [MaybeUninit<Pair>]));
    twice!(generic della_row(tv: &TaskVector, start: usize, base_p: f32, eps: f32, s: &mut DellaRow, prob: &mut [f32]));
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

/// Sparsify one model's task vector (values of W): what stays and the rescale.
fn sparsify<R: Round>(
    g: &Gta,
    tv: &TaskVector,
    shape: &[usize],
    density: f64,
    extra: f64,
    stream: Option<&Mt19937>,
) -> Sparse {
    let n = tv.numel;
    let random = if random_in_bf16::<R>() {
        RescaleIn::Bf16
    } else {
        RescaleIn::F32
    };
    let (keep, dtype) = match g.family.sparsify() {
        _ if density >= 1.0 => (Keep::All, RescaleIn::Work),
        Sparsify::Magnitude if density <= 0.0 || n == 0 => (Keep::None, RescaleIn::Work),
        Sparsify::DellaMagprune if density <= 0.0 => (Keep::None, random),
        Sparsify::Magnitude => {
            let k = ((density * n as f64) as usize).max(1);
            (selected::<R>(tv, Order::Descending, 0, k), RescaleIn::Work)
        }
        Sparsify::MagnitudeOutliers => {
            let target = (density * n as f64) as usize;
            let top = (extra * n as f64) as usize;
            let bottom = n.saturating_sub(target + top);
            let to = (bottom + target).min(n);
            (
                selected::<R>(tv, Order::Ascending, bottom, to),
                RescaleIn::Work,
            )
        }
        Sparsify::Random => {
            let stream = stream.expect("a random sparsifier has its stream");
            let p = if random_in_bf16::<R>() {
                Bf16::round_f64(density)
            } else {
                density as f32
            };
            let mut keep = vec![0u64; bits::words(n)];
            mt19937::bernoulli_par(stream, n, &mut keep, Probs::All(p));
            (Keep::Mask(keep), random)
        }
        Sparsify::DellaMagprune => {
            let stream = stream.expect("a random sparsifier has its stream");
            let keep = della_mask::<R>(tv, shape, density, extra, stream);
            (Keep::Mask(keep), random)
        }
    };
    let ratio = match (&keep, g.rescale) {
        (Keep::Mask(m), true) => match dtype {
            RescaleIn::Work => rescale::<R, R>(tv, m),
            RescaleIn::Bf16 => rescale::<R, Bf16>(tv, m),
            RescaleIn::F32 => rescale::<R, F32>(tv, m),
        },
        _ => None,
    };
    Sparse { keep, ratio, dtype }
}

/// Which elements sit at ranks `from..to` of `|tv|` (float32) sorted in `order` by torch's
/// `sort`/`argsort`.
fn selected<R: Round>(tv: &TaskVector, order: Order, from: usize, to: usize) -> Keep {
    let mut pairs: Vec<Pair> = Vec::with_capacity(tv.numel);
    pairs.spare_capacity_mut()[..tv.numel]
        .par_chunks_mut(RUN)
        .enumerate()
        .for_each(|(c, p)| simd::pairs::<R>(tv, c * RUN, order, p));
    // SAFETY: the loop above wrote every one of the `numel` elements (the memory was not
    // zeroed first: a tensor's pairs are hundreds of megabytes).
    unsafe { pairs.set_len(tv.numel) };
    stdsort::select(&mut pairs, &[from, to]);
    // Each index appears once: the marks are set in parallel, no two on one flag.
    let keep: Vec<AtomicBool> = (0..tv.numel).map(|_| AtomicBool::new(false)).collect();
    pairs[from..to].par_chunks(RUN).for_each(|c| {
        for &p in c {
            keep[stdsort::index(p)].store(true, Relaxed);
        }
    });
    let keep: Vec<bool> = keep.into_iter().map(AtomicBool::into_inner).collect();
    let mut mask = vec![0u64; bits::words(tv.numel)];
    mask.par_chunks_mut(RUN / 64)
        .zip(keep.par_chunks(RUN))
        .for_each(|(m, k)| bits::pack(k, m));
    Keep::Mask(mask)
}

/// The sort pairs of `|tv|` for elements `start..start + out.len()`.
#[inline(always)]
fn pairs<R: Round>(tv: &TaskVector, start: usize, order: Order, out: &mut [MaybeUninit<Pair>]) {
    let len = out.len();
    let (mut b, mut t) = ([0f32; RUN], [0f32; RUN]);
    tv.chunk::<R>(start, &mut b[..len], &mut t[..len]);
    for (j, (p, x)) in out.iter_mut().zip(&t[..len]).enumerate() {
        p.write(stdsort::pair(x.abs(), start + j, order));
    }
}

/// `rescaled_masked_tensor`'s factor for a task vector (values of R) masked by `keep`, in
/// the sparsifier's dtype W, whose full sums take W's vectors: `sum|tv| / sum|masked|`
/// (each sum in torch's order, rounded to W), none when either sum is below 1e-7.
fn rescale<R: Round, W: Round>(tv: &TaskVector, keep: &[u64]) -> Option<f32> {
    let (before, after) = simd::abs_sums::<R>(tv, keep, torch::sum_width(W::DTYPE));
    let (before, after) = (W::round(before), W::round(after));
    let eps = W::round(1e-7);
    (before >= eps && after >= eps).then(|| W::round(before / after))
}

/// `sum|tv|` and `sum|tv * keep|` in torch's order for vectors of `width` elements.
#[inline(always)]
fn abs_sums<R: Round>(tv: &TaskVector, keep: &[u64], width: usize) -> (f32, f32) {
    let mut before = torch::CascadeSum::new(tv.numel, width);
    let mut after = torch::CascadeSum::new(tv.numel, width);
    let (mut b, mut t) = (vec![0f32; BLOCK], vec![0f32; BLOCK]);
    let (mut abs, mut masked) = (vec![0f32; BLOCK], vec![0f32; BLOCK]);
    // A plain loop (no closure) keeps it all in this function's vector code.
    for start in (0..tv.numel).step_by(BLOCK) {
        let len = BLOCK.min(tv.numel - start);
        tv.chunk::<R>(start, &mut b[..len], &mut t[..len]);
        // The mask as 0.0 or 1.0, in `b` (the base's values are done with).
        bits::expand(keep, start, &mut b[..len]);
        for (((a, m), &x), &k) in abs
            .iter_mut()
            .zip(masked.iter_mut())
            .zip(&t[..len])
            .zip(&b[..len])
        {
            *a = x.abs();
            *m = (x * k).abs();
        }
        before.feed(&abs[..len]);
        after.feed(&masked[..len]);
    }
    (before.finish(), after.finish())
}

/// della's mask: per row (the last axis; a 1-D tensor is one row), the magnitudes' ranks
/// (an ascending argsort's inverse, in the working dtype, from 1), normalised to [0, 1],
/// make the keep probabilities `density - epsilon + rank_norm * 2 * epsilon`; one draw per
/// element in row-major order.
fn della_mask<R: Round>(
    tv: &TaskVector,
    shape: &[usize],
    density: f64,
    epsilon: f64,
    stream: &Mt19937,
) -> Vec<u64> {
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
    // The probabilities of every row (sorting is per row and independent: in parallel).
    let mut probs = vec![0f32; tv.numel];
    probs.par_chunks_mut(cols).enumerate().for_each_init(
        || DellaRow {
            pairs: Vec::new(),
            keys: Vec::new(),
            places: Vec::new(),
            b: vec![0f32; cols],
            row: vec![0f32; cols],
        },
        |scratch, (r, prob)| simd::della_row::<R>(tv, r * cols, base_p, eps, scratch, prob),
    );
    let mut keep = vec![0u64; bits::words(probs.len())];
    mt19937::bernoulli_par(stream, probs.len(), &mut keep, Probs::Each(&probs));
    keep
}
