//! The method of each tensor: its parameters resolved as mergekit resolves them (the
//! input's own `parameters`, then the top level, then the default; gradients over the
//! layer position; filters on the tensor name), and its inputs put in the order the
//! kernel takes them. Pure, like the rest of the plan.

use crate::config::MergeConfig;
use crate::merge::{Family, Gta, Method, MethodName, WorkDtype};
use crate::params::{layer_of, resolve, ParamDef, ParamError, Scope};
use crate::source::ModelSource;

use super::sources::OutTensor;
use super::InputSlice;

/// The layers of a model whose tensors are `names`: one past the highest layer index.
pub(super) fn layer_count(names: &[&str]) -> usize {
    names
        .iter()
        .filter_map(|n| layer_of(n))
        .max()
        .map_or(0, |l| l + 1)
}

/// What resolving one tensor's method needs.
pub(super) struct TensorMerge<'a> {
    pub config: &'a MergeConfig,
    /// As [`MergeConfig::all_models`] numbers them.
    pub models: &'a [ModelSource],
    /// The output tensor: its inputs, their parameter levels, its layer position.
    pub tensor: &'a OutTensor<'a>,
    /// The kernel's inputs, as indices into the tensor's inputs.
    pub order: Vec<usize>,
    /// The random stream's seed (`--random-seed`), for the methods that draw.
    pub seed: u64,
}

impl TensorMerge<'_> {
    /// The input slices (in the tensor's order) in the kernel's order.
    pub fn ordered(&self, slices: Vec<InputSlice>) -> Vec<InputSlice> {
        let mut slices: Vec<Option<InputSlice>> = slices.into_iter().map(Some).collect();
        self.order
            .iter()
            .map(|&i| slices[i].take().expect("each model once"))
            .collect()
    }

    fn def(&self, name: &str) -> &'static ParamDef {
        self.config
            .method
            .params()
            .iter()
            .find(|d| d.name == name)
            .expect("a parameter the method declares")
    }

    /// A shared parameter for the output tensor `tensor`.
    fn shared(&self, param: &str, tensor: &str) -> Result<f64, ParamError> {
        let t = self.tensor;
        Ok(resolve(self.def(param), &t.shared, tensor, t.t, "")?.0)
    }

    /// Whether kernel input `k` is the base.
    fn is_base(&self, k: usize) -> bool {
        self.tensor.base == Some(self.order[k])
    }

    /// A per-input parameter of the inputs besides the base, in the kernel's order.
    fn non_base(&self, param: &str) -> Result<Vec<f64>, ParamError> {
        let all = self.per_input(param)?;
        Ok((0..all.len())
            .filter(|&k| !self.is_base(k))
            .map(|k| all[k])
            .collect())
    }

    /// A per-input parameter for each input, in the kernel's order (0 for the base of a
    /// parameter that skips it). Each input's value sees that input's tensor name.
    fn per_input(&self, param: &str) -> Result<Vec<f64>, ParamError> {
        let def = self.def(param);
        let t = self.tensor;
        (0..self.order.len())
            .map(|k| {
                if def.scope == Scope::NonBase && self.is_base(k) {
                    return Ok(0.0);
                }
                let input = &t.inputs[self.order[k]];
                let model = &self.models[input.model].reference;
                Ok(resolve(def, &input.levels, &input.tensor, t.t, model)?.0)
            })
            .collect()
    }

    /// The method of tensor `tensor`, merged in `work`, its parameters resolved and
    /// checked. A random method's offset in the stream is set later, by [`set_offsets`].
    pub fn method(&self, tensor: &str, work: WorkDtype) -> Result<Method, ParamError> {
        let name = self.config.method;
        if work == WorkDtype::F64 && !name.takes_float64() {
            return Err(ParamError::Invalid {
                param: "dtype",
                tensor: tensor.to_string(),
                message: format!("{} runs in bfloat16, float16 or float32 here (mergekit computes parts of it in float32 even for float64 tensors); set `dtype` to one of them", name.name()),
            });
        }
        let flag = |p: &str| self.shared(p, tensor).map(|v| v != 0.0);
        let value = |p: &str| self.shared(p, tensor);
        Ok(match self.config.method {
            MethodName::ModelStock => Method::ModelStock {
                filter_wise: flag("filter_wise")?,
            },
            MethodName::Linear => self.linear(tensor)?,
            MethodName::TaskArithmetic => Method::TaskArithmetic {
                weights: self.per_input("weight")?,
                normalize: flag("normalize")?,
                lambda: self.shared("lambda", tensor)?,
            },
            MethodName::Gta(family) => Method::Gta(self.gta(family, tensor)?),
            MethodName::Nearswap => Method::Nearswap { t: value("t")? },
            MethodName::Ram => Method::Ram {
                epsilon: value("epsilon")?,
            },
            MethodName::RamplusTl => Method::RamplusTl {
                r: value("r")?,
                alpha: value("alpha")?,
                epsilon: value("epsilon")?,
            },
            MethodName::Sce => Method::Sce {
                select_topk: value("select_topk")?,
            },
            MethodName::Slerp => Method::Slerp { t: value("t")? },
            MethodName::Nuslerp => self.nuslerp(tensor)?,
            MethodName::ArceeFusion => Method::ArceeFusion {
                seed: self.seed,
                offset: 0,
            },
            MethodName::Karcher => Method::Karcher {
                max_iter: value("max_iter")?.max(0.0) as usize,
                tol: value("tol")?,
            },
            MethodName::Multislerp => Method::Multislerp(crate::merge::Multislerp {
                weights: self.non_base("weight")?,
                normalize: flag("normalize_weights")?,
                eps: value("eps")?,
            }),
            // NaN stands for an unset scale (mergekit's None).
            MethodName::Passthrough => Method::Passthrough {
                scale: Some(self.per_input("scale")?[0]).filter(|s| !s.is_nan()),
            },
        })
    }

    /// linear: with `normalize`, weights summing to zero would divide by zero (mergekit
    /// writes inf and NaN): refused. The sum is the kernel's (float32, torch's order).
    fn linear(&self, tensor: &str) -> Result<Method, ParamError> {
        let weights = self.per_input("weight")?;
        let normalize = self.shared("normalize", tensor)? != 0.0;
        let w32: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
        let mut sum = crate::merge::torch::CascadeSum::new(w32.len(), crate::merge::torch::LANES);
        sum.feed(&w32);
        if normalize && sum.finish() == 0.0 {
            return Err(ParamError::Invalid {
                param: "weight",
                tensor: tensor.to_string(),
                message: format!(
                    "the weights {weights:?} sum to zero and `normalize` divides by their sum; set other weights or `normalize: false`"
                ),
            });
        }
        Ok(Method::Linear { weights, normalize })
    }

    /// nuslerp: `t` from the two non-base weights as mergekit computes it (Python floats);
    /// `nuslerp_row_wise` counts only without `nuslerp_flatten`, as in mergekit.
    fn nuslerp(&self, tensor: &str) -> Result<Method, ParamError> {
        let w = self.non_base("weight")?;
        let total = w[0] + w[1];
        let t = if total.abs() < 1e-6 {
            0.5
        } else {
            w[1] / total
        };
        let flatten = self.shared("nuslerp_flatten", tensor)? != 0.0;
        let row_wise = !flatten && self.shared("nuslerp_row_wise", tensor)? != 0.0;
        Ok(Method::Nuslerp(crate::merge::Nuslerp {
            t,
            flatten,
            row_wise,
        }))
    }

    fn gta(&self, family: Family, tensor: &str) -> Result<Gta, ParamError> {
        let bad = |param: &'static str, message: String| ParamError::Invalid {
            param,
            tensor: tensor.to_string(),
            message,
        };
        let densities = self.per_input("density")?;
        let extra = match family.extra() {
            Some(p) => self.per_input(p)?,
            None => Vec::new(),
        };
        for k in 0..self.order.len() {
            if self.is_base(k) {
                continue;
            }
            let model = &self.models[self.tensor.inputs[self.order[k]].model].reference;
            let d = densities[k];
            if !(d > 0.0 && d <= 1.0) {
                return Err(bad(
                    "density",
                    format!("{d} for `{model}`: a density is the fraction of the task vector kept, in (0, 1]"),
                ));
            }
            match family.extra() {
                Some("epsilon") if d < 1.0 && (d + extra[k] >= 1.0 || d - extra[k] <= 0.0) => {
                    return Err(bad(
                        "epsilon",
                        format!(
                            "{} with density {d} for `{model}`: density +- epsilon must stay inside (0, 1), as mergekit requires",
                            extra[k]
                        ),
                    ))
                }
                Some("gamma") if !(0.0..=1.0).contains(&extra[k]) => {
                    return Err(bad(
                        "gamma",
                        format!("{} for `{model}`: the fraction of largest deltas removed, in [0, 1]", extra[k]),
                    ))
                }
                _ => {}
            }
        }
        let flag = |p: &str| self.shared(p, tensor).map(|v| v != 0.0);
        Ok(Gta {
            family,
            weights: self.per_input("weight")?,
            densities,
            extra,
            normalize: flag("normalize")?,
            rescale: flag("rescale")?,
            lambda: self.shared("lambda", tensor)?,
            seed: self.seed,
            offset: 0,
        })
    }
}

/// Give each tensor of a random method its offset in the random stream: mergekit draws
/// for tensors in the order of their largest input name (`order`, indices into `jobs`),
/// for each input in turn. Whether any tensor draws.
pub(super) fn set_offsets(jobs: &mut [super::TensorJob], order: &[usize]) -> bool {
    let mut offset = 0u64;
    let mut draws = false;
    for &i in order {
        let j = &mut jobs[i];
        let numel = j.numel();
        if let super::Op::Merge { kernel, .. } = &mut j.op {
            match &mut kernel.method {
                Method::Gta(g) if g.family.random() => {
                    draws = true;
                    g.offset = offset;
                    offset += g.densities[1..]
                        .iter()
                        .map(|&d| g.family.draws(d, numel))
                        .sum::<u64>();
                }
                Method::ArceeFusion { offset: at, .. } => {
                    let n = crate::merge::arcee_fusion_draws(numel);
                    draws |= n > 0;
                    *at = offset;
                    offset += n;
                }
                _ => {}
            }
        }
    }
    draws
}
