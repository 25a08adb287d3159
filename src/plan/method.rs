//! The method of each tensor: its parameters resolved as mergekit resolves them (the
//! input's own `parameters`, then the top level, then the default; gradients over the
//! layer position; filters on the tensor name), and its inputs put in the order the
//! kernel takes them. Pure, like the rest of the plan.

use crate::config::MergeConfig;
use crate::merge::{BaseUse, Method, MethodName};
use crate::params::{layer_of, resolve, ParamDef, ParamError, Scope};
use crate::source::ModelSource;

use super::InputSlice;

/// The layers of a model whose tensors are `names`: one past the highest layer index.
pub(super) fn layer_count(names: &[&str]) -> usize {
    names
        .iter()
        .filter_map(|n| layer_of(n))
        .max()
        .map_or(0, |l| l + 1)
}

/// The kernel's inputs as indices into [`MergeConfig::all_models`]: the base first, then
/// the others, for methods that take task vectors from the base; mergekit's own order
/// (as listed, the base last when not listed) for the others.
pub(super) fn input_order(config: &MergeConfig) -> Vec<usize> {
    match config.method.base_use() {
        BaseUse::Required => (0..=config.models.len()).collect(),
        BaseUse::Input => config.mergekit_order(),
    }
}

/// What resolving one tensor's method needs.
pub(super) struct TensorMerge<'a> {
    pub config: &'a MergeConfig,
    /// As [`MergeConfig::all_models`] numbers them.
    pub models: &'a [ModelSource],
    pub order: &'a [usize],
    /// The tensor's layer position, for gradients.
    pub t: f64,
}

impl TensorMerge<'_> {
    /// The input slices (in model order) in the kernel's order.
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
        let levels = [&self.config.parameters];
        Ok(resolve(self.def(param), &levels, tensor, self.t, "")?.0)
    }

    /// A per-input parameter for each input, in the kernel's order (0 for the base of a
    /// parameter that skips it).
    fn per_input(&self, param: &str, tensor: &str) -> Result<Vec<f64>, ParamError> {
        let def = self.def(param);
        let has_base = self.config.base_model.is_some();
        self.order
            .iter()
            .map(|&i| {
                if def.scope == Scope::NonBase && has_base && i == 0 {
                    return Ok(0.0);
                }
                let levels = self.config.levels(i);
                let model = &self.models[i].reference;
                Ok(resolve(def, &levels, tensor, self.t, model)?.0)
            })
            .collect()
    }

    /// The method of tensor `tensor`, its parameters resolved.
    pub fn method(&self, tensor: &str) -> Result<Method, ParamError> {
        let flag = |p: &str| self.shared(p, tensor).map(|v| v != 0.0);
        Ok(match self.config.method {
            MethodName::ModelStock => Method::ModelStock {
                filter_wise: flag("filter_wise")?,
            },
            MethodName::Linear => Method::Linear {
                weights: self.per_input("weight", tensor)?,
                normalize: flag("normalize")?,
            },
            MethodName::TaskArithmetic => Method::TaskArithmetic {
                weights: self.per_input("weight", tensor)?,
                normalize: flag("normalize")?,
                lambda: self.shared("lambda", tensor)?,
            },
        })
    }
}
