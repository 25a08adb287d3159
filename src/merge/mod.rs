//! The merge kernels: pure arithmetic on byte slices, no I/O. One file per method.
//!
//! This module is the seam between the engine and the methods. The plan resolves a
//! method's parameters per tensor and input into a [`Kernel`] (plain numbers that travel
//! in tasks); the executor asks the kernel how it can stream ([`Streaming`]) and schedules
//! by that answer, never by the method's name. A method is one file here, one row in
//! [`MethodName`]'s tables and one message in the proto's `oneof method`.

pub(crate) mod numeric;
pub(crate) mod simd;
pub mod torch;

mod arcee_fusion;
mod bits;
mod gta;
mod karcher;
mod linear;
mod model_stock;
pub mod mt19937;
mod multislerp;
mod nearswap;
mod nuslerp;
mod passthrough;
mod ram;
mod sce;
mod slerp;
pub mod stdsort;
mod task_arithmetic;
pub mod vml;
mod wide;

pub use arcee_fusion::draws as arcee_fusion_draws;
pub use gta::{Family, Gta};
pub use multislerp::Multislerp;
pub use nuslerp::Nuslerp;

pub use crate::dtype::WorkDtype;
pub use model_stock::{ModelStock, Stats};
/// Encode float values to a dtype's little-endian bytes (round to nearest even).
pub use numeric::encode;

use crate::params::ParamDef;

/// Elements per block: the unit of parallel work, of statistics and of streamed windows.
pub const BLOCK: usize = 1 << 16;

/// One input tensor (or a window of it): raw little-endian bytes and their dtype.
#[derive(Clone, Copy)]
pub struct InputView<'a> {
    pub bytes: &'a [u8],
    pub dtype: Dtype,
}

use safetensors::Dtype;

/// How reductions (norms, sums, means) are summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Reductions {
    /// In torch's CPU order (one thread), as `mergekit-yaml -j 1` sums: its bits.
    #[default]
    Torch,
    /// Accumulated in float64 and rounded once: the correctly rounded result.
    Exact,
}

impl Reductions {
    pub fn from_name(s: &str) -> Option<Self> {
        match s.trim() {
            "torch" => Some(Self::Torch),
            "exact" => Some(Self::Exact),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Torch => "torch",
            Self::Exact => "exact",
        }
    }
}

/// Elements per filter_wise row: the last axis; a 1-D tensor is one row.
pub fn row_len(shape: &[usize]) -> usize {
    match shape {
        [] => 1,
        [n] => *n,
        [.., last] => *last,
    }
}

/// Every method mergekit 0.1.5 registers, by name.
pub const MERGEKIT_METHODS: &[&str] = &[
    "arcee_fusion",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "karcher",
    "linear",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "ram",
    "ramplus_tl",
    "sce",
    "slerp",
    "task_arithmetic",
    "ties",
];

/// The methods mergefleet runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodName {
    ModelStock,
    Linear,
    TaskArithmetic,
    /// ties, dare, breadcrumbs, della and their variants.
    Gta(Family),
    Nearswap,
    Ram,
    RamplusTl,
    Sce,
    Slerp,
    Nuslerp,
    Multislerp,
    Karcher,
    ArceeFusion,
    Passthrough,
}

/// What a method does with `base_model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseUse {
    /// Required, and merged apart from the other inputs (task vectors are taken from it).
    Required,
    /// Optional; when set and not listed under `models`, mergekit adds it as one more input
    /// like the others.
    Input,
    /// Optional; when set, merged apart from the others (task vectors are taken from it).
    Optional,
}

impl BaseUse {
    /// Whether the base, when there is one, is apart from the other inputs (first in the
    /// kernel's order, not counted among the models).
    pub fn apart(self) -> bool {
        matches!(self, BaseUse::Required | BaseUse::Optional)
    }
}

impl MethodName {
    pub const ALL: &[MethodName] = &[
        Self::ModelStock,
        Self::Linear,
        Self::TaskArithmetic,
        Self::Gta(Family::Ties),
        Self::Gta(Family::DareTies),
        Self::Gta(Family::DareLinear),
        Self::Gta(Family::Breadcrumbs),
        Self::Gta(Family::BreadcrumbsTies),
        Self::Gta(Family::Della),
        Self::Gta(Family::DellaLinear),
        Self::Nearswap,
        Self::Ram,
        Self::RamplusTl,
        Self::Sce,
        Self::Slerp,
        Self::Nuslerp,
        Self::Multislerp,
        Self::Karcher,
        Self::ArceeFusion,
        Self::Passthrough,
    ];

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|m| m.name() == s)
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::ModelStock => "model_stock",
            Self::Linear => "linear",
            Self::TaskArithmetic => "task_arithmetic",
            Self::Gta(f) => f.name(),
            Self::Nearswap => "nearswap",
            Self::Ram => "ram",
            Self::RamplusTl => "ramplus_tl",
            Self::Sce => "sce",
            Self::Slerp => "slerp",
            Self::Nuslerp => "nuslerp",
            Self::Multislerp => "multislerp",
            Self::Karcher => "karcher",
            Self::ArceeFusion => "arcee_fusion",
            Self::Passthrough => "passthrough",
        }
    }
    /// The name mergekit's model card gives the method.
    pub fn pretty_name(self) -> &'static str {
        match self {
            Self::ModelStock => "Model Stock",
            Self::Linear => "Linear",
            Self::TaskArithmetic => "Task Arithmetic",
            Self::Gta(f) => f.pretty_name(),
            Self::Nearswap => "NearSwap",
            Self::Ram => "Reinforced Agent Merging",
            Self::RamplusTl => "Reinforced Agent Merging Plus (Tensor-Local)",
            Self::Sce => "SCE",
            Self::Slerp => "SLERP",
            Self::Nuslerp => "NuSLERP",
            Self::Multislerp => "Multi-SLERP",
            Self::Karcher => "Karcher Mean",
            Self::ArceeFusion => "Arcee Fusion",
            Self::Passthrough => "Passthrough",
        }
    }
    /// The paper mergekit's model card links, if any.
    pub fn reference_url(self) -> Option<&'static str> {
        Some(match self {
            Self::ModelStock => "https://arxiv.org/abs/2403.19522",
            Self::Linear => "https://arxiv.org/abs/2203.05482",
            Self::TaskArithmetic => "https://arxiv.org/abs/2212.04089",
            Self::Gta(f) => f.reference_url(),
            Self::Nearswap => "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
            Self::Ram | Self::RamplusTl => "https://arxiv.org/abs/2601.13572",
            Self::Sce => "https://arxiv.org/abs/2408.07990",
            Self::Slerp => "https://en.wikipedia.org/wiki/Slerp",
            Self::Multislerp => "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
            Self::Karcher => "https://arxiv.org/abs/2603.04972",
            Self::ArceeFusion => "https://arcee.ai",
            Self::Nuslerp | Self::Passthrough => return None,
        })
    }
    /// The parameters the method declares, with their types, scopes and defaults.
    pub fn params(self) -> &'static [ParamDef] {
        match self {
            Self::ModelStock => model_stock::PARAMS,
            Self::Linear => linear::PARAMS,
            Self::TaskArithmetic => task_arithmetic::PARAMS,
            Self::Gta(f) => f.params(),
            Self::Nearswap => nearswap::PARAMS,
            Self::Ram => ram::RAM_PARAMS,
            Self::RamplusTl => ram::RAMPLUS_PARAMS,
            Self::Sce => sce::PARAMS,
            Self::Slerp => slerp::PARAMS,
            Self::Nuslerp => nuslerp::PARAMS,
            Self::Multislerp => multislerp::PARAMS,
            Self::Karcher => karcher::PARAMS,
            Self::ArceeFusion => arcee_fusion::PARAMS,
            Self::Passthrough => passthrough::PARAMS,
        }
    }
    pub fn base_use(self) -> BaseUse {
        match self {
            Self::ModelStock
            | Self::TaskArithmetic
            | Self::Gta(_)
            | Self::Nearswap
            | Self::Ram
            | Self::RamplusTl
            | Self::Sce
            | Self::Slerp
            | Self::ArceeFusion => BaseUse::Required,
            Self::Linear | Self::Passthrough | Self::Karcher => BaseUse::Input,
            Self::Nuslerp | Self::Multislerp => BaseUse::Optional,
        }
    }
    /// The fewest inputs besides a required base (every input for the others).
    pub fn min_inputs(self) -> usize {
        match self {
            Self::ModelStock | Self::Nuslerp => 2,
            _ => 1,
        }
    }
    /// The most inputs besides a required base, when limited.
    pub fn max_inputs(self) -> Option<usize> {
        match self {
            Self::Nearswap | Self::Slerp | Self::Passthrough | Self::ArceeFusion => Some(1),
            Self::Nuslerp => Some(2),
            _ => None,
        }
    }
    /// Whether the method runs in float64 here (the others are refused in float64).
    pub fn takes_float64(self) -> bool {
        matches!(
            self,
            Self::ModelStock | Self::Linear | Self::TaskArithmetic | Self::Passthrough
        )
    }
    /// The dtype of the method's result in working dtype `work`, before `out_dtype`:
    /// `work`, except for ramplus_tl, whose float32 factors promote its result (mergekit
    /// writes float32 tensors for it even with `dtype: bfloat16`).
    pub fn result_dtype(self, work: WorkDtype) -> WorkDtype {
        match self {
            Self::RamplusTl | Self::ArceeFusion => WorkDtype::F32,
            _ => work,
        }
    }
}

/// A method with its parameters resolved for one tensor: plain data, per-input values in
/// the order of the kernel's inputs.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// Inputs: base, then the fine-tunes.
    ModelStock {
        filter_wise: bool,
    },
    /// Inputs in mergekit's order, each with its weight.
    Linear {
        weights: Vec<f64>,
        normalize: bool,
    },
    /// Inputs: base, then the others, each with its weight.
    TaskArithmetic {
        weights: Vec<f64>,
        normalize: bool,
        lambda: f64,
    },
    /// Inputs: base, then the others.
    Gta(Gta),
    /// Inputs: base, then one other.
    Nearswap {
        t: f64,
    },
    /// Inputs: base, then the others.
    Ram {
        epsilon: f64,
    },
    RamplusTl {
        r: f64,
        alpha: f64,
        epsilon: f64,
    },
    Sce {
        select_topk: f64,
    },
    /// Inputs: base, then the other.
    Slerp {
        t: f64,
    },
    /// Inputs: the base when there is one, then the two others.
    Nuslerp(nuslerp::Nuslerp),
    /// Inputs: the base when there is one, then the others.
    Multislerp(multislerp::Multislerp),
    /// Inputs: base, then the other. Tensors over 2^20 elements draw from the random
    /// stream at `offset`.
    ArceeFusion {
        seed: u64,
        offset: u64,
    },
    /// Inputs in mergekit's order, each weighing the same.
    Karcher {
        max_iter: usize,
        tol: f64,
    },
    /// One input, scaled when `scale` is set.
    Passthrough {
        scale: Option<f64>,
    },
}

impl Method {
    /// The resolved values, for `plan`: per-input values as lists in the inputs' order.
    pub fn values(&self) -> Vec<(&'static str, serde_json::Value)> {
        use serde_json::json;
        match self {
            Method::ModelStock { filter_wise } => vec![("filter_wise", json!(filter_wise))],
            Method::Linear { weights, normalize } => {
                vec![("weight", json!(weights)), ("normalize", json!(normalize))]
            }
            Method::TaskArithmetic {
                weights,
                normalize,
                lambda,
            } => vec![
                ("weight", json!(weights)),
                ("normalize", json!(normalize)),
                ("lambda", json!(lambda)),
            ],
            Method::Gta(g) => {
                let mut v = vec![
                    ("weight", json!(g.weights)),
                    ("density", json!(g.densities)),
                ];
                if let Some(extra) = g.family.extra() {
                    v.push((extra, json!(g.extra)));
                }
                v.extend([
                    ("normalize", json!(g.normalize)),
                    ("rescale", json!(g.rescale)),
                    ("lambda", json!(g.lambda)),
                ]);
                if g.family.random() {
                    v.push(("random_offset", json!(g.offset)));
                }
                v
            }
            Method::Nearswap { t } => vec![("t", json!(t))],
            Method::Ram { epsilon } => vec![("epsilon", json!(epsilon))],
            Method::RamplusTl { r, alpha, epsilon } => vec![
                ("r", json!(r)),
                ("alpha", json!(alpha)),
                ("epsilon", json!(epsilon)),
            ],
            Method::Sce { select_topk } => vec![("select_topk", json!(select_topk))],
            Method::Slerp { t } => vec![("t", json!(t))],
            Method::Nuslerp(n) => n.values(),
            Method::Multislerp(m) => m.values(),
            Method::Karcher { max_iter, tol } => {
                vec![("max_iter", json!(max_iter)), ("tol", json!(tol))]
            }
            Method::ArceeFusion { offset, .. } => vec![("random_offset", json!(offset))],
            Method::Passthrough { scale } => vec![("scale", json!(scale))],
        }
    }

    /// [`Self::values`] on one line, without the random stream's offset (which differs
    /// for every tensor).
    pub fn describe(&self) -> String {
        self.values()
            .iter()
            .filter(|(k, _)| *k != "random_offset")
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn name(&self) -> MethodName {
        match self {
            Method::ModelStock { .. } => MethodName::ModelStock,
            Method::Linear { .. } => MethodName::Linear,
            Method::TaskArithmetic { .. } => MethodName::TaskArithmetic,
            Method::Gta(g) => MethodName::Gta(g.family),
            Method::Nearswap { .. } => MethodName::Nearswap,
            Method::Ram { .. } => MethodName::Ram,
            Method::RamplusTl { .. } => MethodName::RamplusTl,
            Method::Sce { .. } => MethodName::Sce,
            Method::Slerp { .. } => MethodName::Slerp,
            Method::Nuslerp(_) => MethodName::Nuslerp,
            Method::Multislerp(_) => MethodName::Multislerp,
            Method::Karcher { .. } => MethodName::Karcher,
            Method::ArceeFusion { .. } => MethodName::ArceeFusion,
            Method::Passthrough { .. } => MethodName::Passthrough,
        }
    }
}

/// How a kernel can run over a tensor too large to hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streaming {
    /// Each output element depends only on the inputs' same element: any block-aligned
    /// windows, one pass.
    Elementwise,
    /// Rows of this many elements are independent: windows of whole rows, one pass.
    Rows(usize),
    /// Statistics passes over the whole tensor ([`Kernel::stats_passes`]), then an
    /// elementwise pass.
    Statistics,
    /// Only whole tensors (a selection or a random draw over the whole task vector).
    Whole,
}

/// What a statistics pass leaves for the apply pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Prepared {
    /// Nothing: an elementwise kernel.
    Nothing,
    /// model_stock's interpolation ratio.
    Ratio(f64),
    /// slerp's first pass: the norms of the base and the other input.
    SlerpNorms(f32, f32),
    /// slerp's second pass: the coefficients of the base and the other input.
    Coefficients(f32, f32),
    /// nuslerp's first pass: the norms of its two inputs (task vectors), in W.
    Norms(f32, f32),
    /// nuslerp's second pass: the sines of its two coefficients and of the angle, the
    /// weights `1 - t` and `t` as float32, and whether the inputs are collinear.
    Nuslerp {
        s0: f32,
        s1: f32,
        sin: f32,
        a: f32,
        b: f32,
        colinear: bool,
    },
}

/// A statistics pass in progress.
pub enum StatsAcc {
    ModelStock(model_stock::StatsAcc),
    Slerp(slerp::Acc),
    Nuslerp(Box<nuslerp::Acc>),
}

/// Where a window lies in its tensor (some of torch's sums treat the last elements apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The tensor's element index of the window's first element.
    pub first: usize,
    /// The tensor's element count.
    pub numel: usize,
}

/// One tensor's merge: the method with its values, the working and output dtypes, and the
/// reduction order.
#[derive(Debug, Clone, PartialEq)]
pub struct Kernel {
    pub method: Method,
    pub work: WorkDtype,
    pub out: WorkDtype,
    pub reductions: Reductions,
}

impl Kernel {
    fn model_stock(&self) -> Option<ModelStock> {
        match &self.method {
            Method::ModelStock { filter_wise } => Some(ModelStock {
                work: self.work,
                out: self.out,
                filter_wise: *filter_wise,
                reductions: self.reductions,
            }),
            _ => None,
        }
    }

    /// How this kernel streams a tensor of `shape`.
    pub fn streaming(&self, shape: &[usize]) -> Streaming {
        match &self.method {
            Method::ModelStock { filter_wise: true } => Streaming::Rows(row_len(shape).max(1)),
            Method::ModelStock { .. } => Streaming::Statistics,
            Method::Slerp { .. } => Streaming::Statistics,
            Method::Nuslerp(n) => n.streaming(shape),
            Method::Linear { .. }
            | Method::TaskArithmetic { .. }
            | Method::Nearswap { .. }
            | Method::Ram { .. }
            | Method::Passthrough { .. } => Streaming::Elementwise,
            Method::Gta(_)
            | Method::RamplusTl { .. }
            | Method::Sce { .. }
            | Method::Multislerp(_)
            | Method::Karcher { .. }
            | Method::ArceeFusion { .. } => Streaming::Whole,
        }
    }

    /// Memory the kernel needs besides its inputs and output, merging `inputs` inputs of
    /// `numel` elements whole.
    pub fn scratch_bytes(&self, numel: usize, inputs: usize) -> u64 {
        match &self.method {
            Method::Gta(g) => g.scratch_bytes(numel, inputs),
            // The variances, their sort pairs and the mask (the task vectors recomputed).
            Method::Sce { .. } => (13 * numel) as u64,
            Method::Karcher { .. } => karcher::scratch_bytes(numel, inputs),
            Method::ArceeFusion { .. } => arcee_fusion::scratch_bytes(numel),
            // Rows along the first axis: both inputs as float32, whole.
            Method::Nuslerp(n) if n.row_wise => (8 * numel) as u64,
            _ => 0,
        }
    }

    /// Merge a whole tensor held in memory; `out` receives `numel * out.size()` bytes.
    pub fn merge(&self, shape: &[usize], inputs: &[InputView], out: &mut [u8]) {
        let numel = shape.iter().product();
        match self.streaming(shape) {
            Streaming::Elementwise => {
                self.apply(inputs, Window { first: 0, numel }, Prepared::Nothing, out)
            }
            Streaming::Whole => match &self.method {
                Method::Gta(g) => gta::merge(self, g, shape, inputs, out),
                Method::RamplusTl { r, alpha, epsilon } => {
                    ram::merge_ramplus(self, (*r, *alpha, *epsilon), numel, inputs, out)
                }
                Method::Sce { select_topk } => sce::merge(self, *select_topk, numel, inputs, out),
                Method::Multislerp(m) => m.merge(self, numel, inputs, out),
                Method::Karcher { max_iter, tol } => {
                    karcher::merge(self, *max_iter, *tol, numel, inputs, out)
                }
                Method::ArceeFusion { seed, offset } => {
                    arcee_fusion::merge(self, *seed, *offset, shape, inputs, out)
                }
                Method::Nuslerp(n) => n.merge_columns(self, shape, inputs, out),
                _ => unreachable!("the whole-tensor kernels are listed here"),
            },
            Streaming::Rows(row) if self.model_stock().is_none() => {
                self.merge_rows(row, 0, numel / row.max(1), inputs, out)
            }
            Streaming::Statistics if self.model_stock().is_none() => {
                let mut prepared = Prepared::Nothing;
                for pass in 0..self.stats_passes() {
                    let mut acc = self.begin_stats(pass, prepared, inputs.len(), numel);
                    self.feed_stats(&mut acc, inputs, numel);
                    prepared = self.finish_stats(&acc);
                }
                self.apply(inputs, Window { first: 0, numel }, prepared, out)
            }
            Streaming::Rows(_) | Streaming::Statistics => self
                .model_stock()
                .expect("model_stock merges by rows")
                .merge(shape, inputs, out),
        }
    }

    /// Merge a window of an elementwise kernel, or apply a statistics kernel's prepared
    /// values to a window. `inputs` and `out` hold exactly the window.
    pub fn apply(&self, inputs: &[InputView], at: Window, prepared: Prepared, out: &mut [u8]) {
        let len = out.len() / self.out.size();
        match (&self.method, prepared) {
            (Method::ModelStock { .. }, Prepared::Ratio(t)) => self
                .model_stock()
                .expect("model_stock")
                .apply(inputs, 0, len, t, out),
            (Method::Linear { weights, normalize }, _) => {
                linear::apply(self, weights, *normalize, inputs, len, out)
            }
            (
                Method::TaskArithmetic {
                    weights,
                    normalize,
                    lambda,
                },
                _,
            ) => task_arithmetic::apply(self, weights, *normalize, *lambda, inputs, at, len, out),
            (Method::ModelStock { .. }, _) => {
                unreachable!("model_stock's apply pass needs its ratio")
            }
            (Method::Nearswap { t }, _) => nearswap::apply(self, *t, inputs, len, out),
            (Method::Passthrough { scale }, _) => {
                passthrough::apply(self, *scale, inputs, len, out)
            }
            (Method::Slerp { .. }, Prepared::Coefficients(ca, cb)) => {
                slerp::apply(self, (ca, cb), inputs, len, out)
            }
            (Method::Slerp { .. }, _) => unreachable!("slerp's apply pass needs its coefficients"),
            (Method::Nuslerp(n), Prepared::Nuslerp { .. }) => {
                n.apply(self, prepared, inputs, len, out)
            }
            (Method::Nuslerp(_), _) => unreachable!("nuslerp's apply pass needs its coefficients"),
            (Method::Ram { epsilon }, _) => ram::apply_ram(self, *epsilon, inputs, at, len, out),
            (
                Method::Gta(_)
                | Method::RamplusTl { .. }
                | Method::Sce { .. }
                | Method::Multislerp(_)
                | Method::Karcher { .. }
                | Method::ArceeFusion { .. },
                _,
            ) => unreachable!("whole-tensor kernels are merged whole"),
        }
    }

    /// A [`Streaming::Rows`] kernel over whole rows of `row` elements, the first of them row
    /// `first_row` of the tensor's `rows`.
    pub fn merge_rows(
        &self,
        row: usize,
        first_row: usize,
        rows: usize,
        inputs: &[InputView],
        out: &mut [u8],
    ) {
        match &self.method {
            Method::Nuslerp(n) => n.merge_rows(self, row, inputs, out),
            _ => self
                .model_stock()
                .expect("model_stock merges by rows")
                .merge_rows(row, first_row, rows, inputs, out),
        }
    }

    /// How many statistics passes a [`Streaming::Statistics`] kernel makes before its
    /// output pass (each pass reads the whole tensor in element order).
    pub fn stats_passes(&self) -> usize {
        match &self.method {
            Method::Slerp { .. } | Method::Nuslerp(_) => 2,
            _ => 1,
        }
    }

    /// Start statistics pass `pass` over `inputs` inputs of `numel` elements; `prior` is
    /// the previous pass's result.
    pub fn begin_stats(
        &self,
        pass: usize,
        prior: Prepared,
        inputs: usize,
        numel: usize,
    ) -> StatsAcc {
        match (&self.method, self.model_stock()) {
            (_, Some(ms)) => StatsAcc::ModelStock(ms.begin_stats(inputs - 1, numel)),
            (Method::Slerp { .. }, None) => {
                debug_assert_eq!(pass == 0, prior == Prepared::Nothing);
                StatsAcc::Slerp(slerp::begin(prior, numel))
            }
            (Method::Nuslerp(n), None) => StatsAcc::Nuslerp(Box::new(n.begin(self, prior, numel))),
            _ => unreachable!("only the statistics kernels gather statistics"),
        }
    }

    /// The next `len` elements of a statistics pass, in order.
    pub fn feed_stats(&self, acc: &mut StatsAcc, inputs: &[InputView], len: usize) {
        match acc {
            StatsAcc::ModelStock(a) => self
                .model_stock()
                .expect("model_stock's statistics")
                .feed_stats(a, inputs, 0, len),
            StatsAcc::Slerp(a) => slerp::feed(self, a, inputs, len),
            StatsAcc::Nuslerp(a) => a.feed(self, inputs, len),
        }
    }

    /// The statistics pass's result, for the next pass.
    pub fn finish_stats(&self, acc: &StatsAcc) -> Prepared {
        match (acc, &self.method) {
            (StatsAcc::ModelStock(a), _) => Prepared::Ratio(
                self.model_stock()
                    .expect("model_stock's statistics")
                    .finish_ratio(a, 0, 1),
            ),
            (StatsAcc::Slerp(a), Method::Slerp { t }) => slerp::finish(a, *t),
            (StatsAcc::Slerp(_), _) => unreachable!("slerp's statistics"),
            (StatsAcc::Nuslerp(a), Method::Nuslerp(n)) => n.finish(self, a),
            (StatsAcc::Nuslerp(_), _) => unreachable!("nuslerp's statistics"),
        }
    }
}

/// Run `f(start, len, out)` over [`BLOCK`]-element windows of `len` elements whose output
/// is `out` (`size` bytes an element), in parallel.
fn par_windows(
    len: usize,
    size: usize,
    out: &mut [u8],
    f: impl Fn(usize, usize, &mut [u8]) + Sync,
) {
    use rayon::prelude::*;
    debug_assert_eq!(out.len(), len * size);
    out.par_chunks_mut(BLOCK * size)
        .enumerate()
        .for_each(|(b, out)| f(b * BLOCK, out.len() / size, out));
}

/// A whole input of `numel` elements decoded to the working dtype `R`, in parallel.
fn decode_whole<R: numeric::Round>(input: &InputView, numel: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut v = vec![0f32; numel];
    v.par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(c, o)| numeric::decode::<R>(input.bytes, input.dtype, c * BLOCK, o));
    v
}

/// One model's task vector `R(x - base)`, computed where it is needed rather than held.
pub(crate) struct TaskVector<'a> {
    pub base: &'a InputView<'a>,
    pub model: &'a InputView<'a>,
    pub numel: usize,
}

impl TaskVector<'_> {
    /// Elements `start..start + out.len()` into `out` (`b` is scratch of the same length).
    #[inline(always)]
    pub fn chunk<R: numeric::Round>(&self, start: usize, b: &mut [f32], out: &mut [f32]) {
        numeric::decode::<R>(self.base.bytes, self.base.dtype, start, b);
        task_chunk::<R>(self.model, b, start, out);
    }
}

/// Per-thread scratch of a sign-consensus merge (gta's and sce's runs) of up to `run`
/// elements: the base, every model's deltas and kept weights (model `i` at `i * len..`),
/// the majority signs, the merged sums and their divisors.
pub(crate) struct ConsensusScratch {
    pub base: Vec<f32>,
    pub d: Vec<f32>,
    pub kept_w: Vec<f32>,
    pub majority: Vec<f32>,
    pub merged: Vec<f32>,
    pub div: Vec<f32>,
}

impl ConsensusScratch {
    pub fn new(models: usize, run: usize) -> Self {
        ConsensusScratch {
            base: vec![0f32; run],
            d: vec![0f32; models * run],
            kept_w: vec![0f32; models * run],
            majority: vec![0f32; run],
            merged: vec![0f32; run],
            div: vec![0f32; run],
        }
    }
}

/// TIES' majority sign of elements `start..start + majority.len()` of `numel`: the sign of
/// the models' deltas summed in torch's order and rounded to R, zero counting as positive.
#[inline(always)]
pub(crate) fn majority_signs<R: numeric::Round>(
    d: &[f32],
    start: usize,
    numel: usize,
    majority: &mut [f32],
) {
    torch::sum_models_run(R::DTYPE, d, start, numel, majority);
    for s in majority.iter_mut() {
        *s = if R::round(*s) >= 0.0 { 1.0 } else { -1.0 };
    }
}

/// `R(x - base)` for elements `start..start + out.len()` of `model`, the base's values
/// (already in R) in `base`.
#[inline(always)]
pub(crate) fn task_chunk<R: numeric::Round>(
    model: &InputView,
    base: &[f32],
    start: usize,
    out: &mut [f32],
) {
    numeric::decode::<R>(model.bytes, model.dtype, start, out);
    for (o, &b) in out.iter_mut().zip(base) {
        *o = R::round(*o - b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty tensor (a zero-length axis, first or last) merges to nothing, never a panic,
    /// whatever the method and however it streams.
    #[test]
    fn empty_tensors_merge_to_nothing() {
        let methods = [
            Method::Slerp { t: 0.3 },
            Method::Nuslerp(Nuslerp {
                t: 0.5,
                flatten: true,
                row_wise: false,
            }),
            Method::Nuslerp(Nuslerp {
                t: 0.5,
                flatten: false,
                row_wise: false,
            }),
            Method::Nuslerp(Nuslerp {
                t: 0.5,
                flatten: false,
                row_wise: true,
            }),
            Method::Multislerp(Multislerp {
                weights: vec![0.5, 0.5],
                normalize: true,
                eps: 1e-8,
            }),
            Method::Karcher {
                max_iter: 10,
                tol: 1e-5,
            },
            Method::ArceeFusion { seed: 0, offset: 0 },
            Method::Passthrough { scale: Some(0.5) },
        ];
        for method in methods {
            let kernel = Kernel {
                out: method.name().result_dtype(WorkDtype::BF16),
                method,
                work: WorkDtype::BF16,
                reductions: Reductions::Torch,
            };
            let view = InputView {
                bytes: &[],
                dtype: Dtype::BF16,
            };
            let inputs = [view, view, view];
            let n = match &kernel.method {
                Method::Passthrough { .. } => 1,
                Method::Slerp { .. } | Method::ArceeFusion { .. } => 2,
                _ => 3,
            };
            for shape in [[0usize, 4], [4, 0]] {
                kernel.merge(&shape, &inputs[..n], &mut []);
            }
        }
    }
}
