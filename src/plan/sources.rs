//! Which input tensors make each output tensor, as mergekit 0.1.5 maps them.
//!
//! With `models:` an output tensor is the same tensor of every model. With `slices:` the
//! output layers are numbered over the slices and output layer `k` (offset `i` in slice
//! `s`) is layer `a + i` of each of the slice's sources, renamed; the tensors before the
//! layers (embeddings) come from the first slice's sources and the ones after them (final
//! norm, head) from the last slice's. The layer position `t` of a gradient restarts in each
//! slice. Layer tensors are recognised by name, whatever the architecture's prefix
//! (`model.layers.N.`, `transformer.h.N.`, `gpt_neox.layers.N.`): the first all-digit
//! component of a dotted name is its layer. Pure, like the rest of the plan.

use std::collections::BTreeSet;

use super::inputs::LM_HEAD;
use super::PlanError;
use crate::config::{MergeConfig, Slice};
use crate::params::{layer_t, Params};
use crate::source::ModelSource;

/// One input of an output tensor.
#[derive(Debug, Clone)]
pub(super) struct Input<'a> {
    /// The model, as [`MergeConfig::all_models`] numbers them.
    pub model: usize,
    /// The tensor's name in that model.
    pub tensor: String,
    /// Its parameter levels, highest precedence first.
    pub levels: Vec<&'a Params>,
}

/// One output tensor and where it comes from.
#[derive(Debug, Clone)]
pub(super) struct OutTensor<'a> {
    pub name: String,
    /// In mergekit's order for this tensor: the slice's sources as listed; with `models:`,
    /// as listed, the base last when not listed.
    pub inputs: Vec<Input<'a>>,
    /// Which of `inputs` is the base, when the method uses one.
    pub base: Option<usize>,
    /// Which of `inputs` is the base model named in the config (the slice's, else the
    /// top-level one), whatever the method: where a vocabulary merge takes missing rows.
    pub vocab_base: Option<usize>,
    /// The levels of the shared parameters, highest precedence first.
    pub shared: Vec<&'a Params>,
    /// The layer position for gradients.
    pub t: f64,
}

impl OutTensor<'_> {
    /// The key mergekit orders merges by (the largest input tensor name): the order the
    /// random methods draw in.
    pub fn draw_key(&self) -> &str {
        self.inputs
            .iter()
            .map(|i| i.tensor.as_str())
            .max()
            .unwrap_or(&self.name)
    }
}

/// A layer tensor's name cut around its layer number: `(prefix, layer, suffix)`, as in
/// `("model.layers.", 12, ".mlp.up_proj.weight")`.
pub(super) fn split_layer(name: &str) -> Option<(&str, usize, &str)> {
    let mut at = 0;
    for c in name.split('.') {
        if !c.is_empty() && c.bytes().all(|b| b.is_ascii_digit()) {
            let layer = c.parse().ok()?;
            return Some((&name[..at], layer, &name[at + c.len()..]));
        }
        at += c.len() + 1;
    }
    None
}

/// Whether a tensor outside the layers comes before them (embeddings): mergekit's
/// architecture files list the embeddings (`embed_tokens`, `wte`, `wpe`, `embed_in`,
/// `word_embeddings`, ...) before the layers and the final norms and heads (`norm`,
/// `ln_f`, `lm_head`, `embed_out`, `score`, ...) after them.
pub(super) fn is_pre_layer(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    (n.contains("embed") && !n.contains("embed_out"))
        || n.split('.').any(|c| c == "wte" || c == "wpe")
}

/// Every output tensor of the merge, in name order.
pub(super) fn output_tensors<'a>(
    config: &'a MergeConfig,
    models: &[ModelSource],
    names: &[&str],
) -> Result<Vec<OutTensor<'a>>, PlanError> {
    if config.slices.is_empty() {
        return Ok(whole_models(config, names));
    }
    sliced(config, models)
}

/// `models:`: each tensor of the base (see `tensor_names`) from every model.
fn whole_models<'a>(config: &'a MergeConfig, names: &[&str]) -> Vec<OutTensor<'a>> {
    let order = config.mergekit_order();
    let base = match config.base_model {
        Some(_) => order.iter().position(|&i| i == 0),
        None => None,
    };
    let layers = super::method::layer_count(names);
    names
        .iter()
        .map(|name| OutTensor {
            name: name.to_string(),
            vocab_base: base,
            inputs: order
                .iter()
                .map(|&m| Input {
                    model: m,
                    tensor: name.to_string(),
                    levels: config.levels(m).to_vec(),
                })
                .collect(),
            base,
            shared: vec![&config.parameters],
            t: layer_t(crate::params::layer_of(name), layers),
        })
        .collect()
}

/// A model's layer stack: its prefix and its number of layers. A model with several stacks
/// (a vision tower beside the language model, an encoder and a decoder) needs mergekit's
/// `modules:`, refused naming the stacks.
fn layer_stack(m: &ModelSource, slice: usize) -> Result<(&str, usize), PlanError> {
    let mut prefixes = BTreeSet::new();
    let mut layers = 0;
    for name in m.tensors.keys() {
        if let Some((prefix, layer, _)) = split_layer(name) {
            prefixes.insert(prefix);
            layers = layers.max(layer + 1);
        }
    }
    match prefixes.len() {
        1 => Ok((prefixes.pop_first().expect("one"), layers)),
        0 => Err(PlanError::Slice {
            slice,
            message: format!("`{}` has no numbered layers to slice", m.reference),
        }),
        _ => Err(PlanError::Slice {
            slice,
            message: format!(
                "`{}` has several layer stacks ({}); slicing them needs mergekit's `modules:`, which mergefleet does not support",
                m.reference,
                prefixes.iter().map(|p| format!("`{p}N`")).collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

/// `slices:`: the tensors before the layers from the first slice, each slice's layers
/// renumbered, the tensors after the layers from the last slice.
fn sliced<'a>(
    config: &'a MergeConfig,
    models: &[ModelSource],
) -> Result<Vec<OutTensor<'a>>, PlanError> {
    let slices = &config.slices;
    // Every source's stack, checked to hold its layer range.
    let mut stacks = Vec::with_capacity(slices.len());
    for (s, slice) in slices.iter().enumerate() {
        let mut per_source = Vec::with_capacity(slice.sources.len());
        for src in &slice.sources {
            let m = &models[src.model];
            let (prefix, layers) = layer_stack(m, s)?;
            if src.layers.end > layers {
                return Err(PlanError::Slice {
                    slice: s,
                    message: format!(
                        "layer_range [{}, {}] of `{}` goes past its {layers} layers",
                        src.layers.start, src.layers.end, m.reference
                    ),
                });
            }
            per_source.push(prefix);
        }
        stacks.push(per_source);
    }
    let mut out = Vec::new();
    edge(
        config,
        models,
        &slices[0],
        slices[0].sources.len(),
        false,
        &mut out,
    );
    let mut k = 0;
    for (s, slice) in slices.iter().enumerate() {
        let len = slice.len();
        for i in 0..len {
            let t = if len > 1 {
                i as f64 / (len - 1) as f64
            } else {
                1.0
            };
            let first = &slice.sources[0];
            let template = &models[first.model];
            let mut suffixes: Vec<&str> = template
                .tensors
                .keys()
                .filter_map(|n| split_layer(n))
                .filter(|(_, l, _)| *l == first.layers.start + i)
                .map(|(_, _, suffix)| suffix)
                .filter(|suffix| {
                    let name = format!("{}{}{suffix}", stacks[s][0], first.layers.start + i);
                    !is_scale_of_fp8(template, &name)
                })
                .collect();
            suffixes.sort_unstable();
            for suffix in suffixes {
                out.push(OutTensor {
                    name: format!("{}{k}{suffix}", stacks[s][0]),
                    inputs: slice
                        .sources
                        .iter()
                        .zip(&stacks[s])
                        .map(|(src, prefix)| {
                            let name = format!("{prefix}{}{suffix}", src.layers.start + i);
                            source_input(config, slice, src, name)
                        })
                        .collect(),
                    base: slice.base,
                    vocab_base: slice.vocab_base,
                    shared: vec![&slice.parameters, &config.parameters],
                    t,
                });
            }
            k += 1;
        }
    }
    // mergekit takes the tensors after the layers from as many of the last slice's
    // sources as the first slice has.
    let last = &slices[slices.len() - 1];
    edge(
        config,
        models,
        last,
        slices[0].sources.len(),
        true,
        &mut out,
    );
    out.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = out.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(PlanError::Layout(format!(
            "two output tensors are both named `{}`: the models name their tensors differently",
            w[0].name
        )));
    }
    Ok(out)
}

/// The tensors before the layers (`post` false) or after them (`post` true), from the
/// first `take` sources of `slice`; named as in its first source, plus a head some source
/// has when the first ties it to its embeddings.
fn edge<'a>(
    config: &'a MergeConfig,
    models: &[ModelSource],
    slice: &'a Slice,
    take: usize,
    post: bool,
    out: &mut Vec<OutTensor<'a>>,
) {
    let sources = &slice.sources[..take.min(slice.sources.len())];
    let first = &models[sources[0].model];
    let mut names: BTreeSet<&str> = first
        .tensors
        .keys()
        .map(String::as_str)
        .filter(|n| split_layer(n).is_none() && is_pre_layer(n) != post)
        .filter(|n| !is_scale_of_fp8(first, n))
        .collect();
    if post
        && sources
            .iter()
            .any(|s| models[s.model].tensors.contains_key(LM_HEAD))
    {
        names.insert(LM_HEAD);
    }
    for name in names {
        out.push(OutTensor {
            name: name.to_string(),
            inputs: sources
                .iter()
                .map(|src| source_input(config, slice, src, name.to_string()))
                .collect(),
            base: slice.base.filter(|&b| b < sources.len()),
            vocab_base: slice.vocab_base.filter(|&b| b < sources.len()),
            shared: vec![&slice.parameters, &config.parameters],
            t: 0.0,
        });
    }
}

fn source_input<'a>(
    config: &'a MergeConfig,
    slice: &'a Slice,
    src: &'a crate::config::SliceSource,
    tensor: String,
) -> Input<'a> {
    Input {
        model: src.model,
        tensor,
        levels: vec![&src.parameters, &slice.parameters, &config.parameters],
    }
}

/// The float32 scales of a block-FP8 weight, read with the weight rather than merged.
pub(super) fn is_scale_of_fp8(m: &ModelSource, name: &str) -> bool {
    name.strip_suffix(crate::fp8::SCALE_SUFFIX)
        .is_some_and(|w| {
            m.fp8_block.is_some()
                && m.tensors
                    .get(w)
                    .is_some_and(|t| t.dtype == safetensors::Dtype::F8_E4M3)
        })
}

/// The kernel's order of a tensor's inputs (indices into [`OutTensor::inputs`]): the base
/// first for the methods that take task vectors from it, else mergekit's order.
pub(super) fn kernel_order(config: &MergeConfig, t: &OutTensor) -> Vec<usize> {
    let n = t.inputs.len();
    match (config.method.base_use().apart(), t.base) {
        (true, Some(b)) => std::iter::once(b)
            .chain((0..n).filter(|&i| i != b))
            .collect(),
        _ => (0..n).collect(),
    }
}
