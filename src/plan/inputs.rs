//! Gathering each output tensor's inputs from the models' headers: which files, which byte
//! ranges, the FP8 scales and LoRA factors read with them, every mismatch refused naming
//! the tensor and model.

use safetensors::Dtype;

use super::sources::OutTensor;
use super::{InputFile, InputSlice, LoraSlice, PlanError, ScaleSlice};
use crate::dtype::is_float;
use crate::fp8::{Blocks, SCALE_SUFFIX};
use crate::source::ModelSource;

const VOCAB_HINT: &str =
    ": the vocabularies differ. Add `tokenizer_source: union` (or `base`, or a model) to the \
config to realign the embeddings by token, as mergekit does";

pub(super) const LM_HEAD: &str = "lm_head.weight";
const EMBED: &str = "model.embed_tokens.weight";

/// Every input file, numbered across models, and for each model its files' numbers (its
/// adapter's file last).
pub(super) fn input_files(models: &[ModelSource]) -> (Vec<InputFile>, Vec<Vec<usize>>) {
    let mut inputs = Vec::new();
    let mut file_ids: Vec<Vec<usize>> = Vec::new();
    for (mi, m) in models.iter().enumerate() {
        let adapter = m.adapter.as_ref().map(|a| &a.file);
        file_ids.push(
            m.files
                .iter()
                .chain(adapter)
                .map(|f| {
                    inputs.push(InputFile {
                        model: mi,
                        url: f.url.clone(),
                    });
                    inputs.len() - 1
                })
                .collect(),
        );
    }
    (inputs, file_ids)
}

/// The tensor set, sorted: the base's (without the scales of its FP8 weights, applied on
/// read), plus lm_head when any model has one (tied embeddings).
pub(super) fn tensor_names(models: &[ModelSource]) -> Vec<&str> {
    let base = &models[0];
    let mut names: Vec<&str> = base
        .tensors
        .keys()
        .map(String::as_str)
        .filter(|n| !super::sources::is_scale_of_fp8(base, n))
        .collect();
    if !base.tensors.contains_key(LM_HEAD) && models.iter().any(|m| m.tensors.contains_key(LM_HEAD))
    {
        names.push(LM_HEAD);
        names.sort_unstable();
    }
    names
}

/// The inputs of output tensor `out`, in its order, checked to agree with the base (else
/// the first input) in shape and in being a float; with the base's shape and dtype. A
/// model without lm_head lends its embedding (tied weights). With `realign` (a vocabulary
/// tensor of a merge that realigns vocabularies) the row counts may differ.
pub(super) fn input_slices<'a>(
    out: &OutTensor,
    models: &'a [ModelSource],
    file_ids: &[Vec<usize>],
    realign: bool,
) -> Result<(Vec<InputSlice>, &'a [usize], Dtype), PlanError> {
    let mut slices: Vec<Option<InputSlice>> = vec![None; out.inputs.len()];
    let mut base_meta: Option<(&[usize], Dtype)> = None;
    let first = out.base.unwrap_or(0);
    let order = std::iter::once(first).chain((0..out.inputs.len()).filter(|&k| k != first));
    for k in order {
        let input = &out.inputs[k];
        let (mi, name) = (input.model, input.tensor.as_str());
        let m = &models[mi];
        let tied = name == LM_HEAD && !m.tensors.contains_key(LM_HEAD);
        let t = m
            .tensors
            .get(if tied { EMBED } else { name })
            .ok_or_else(|| PlanError::MissingTensor {
                tensor: name.to_string(),
                model: m.reference.clone(),
            })?;
        let scale = fp8_scale(if tied { EMBED } else { name }, m, t, &file_ids[mi])?;
        // What the merge sees: an FP8 weight is bfloat16 once dequantized.
        let value_dtype = if scale.is_some() {
            Dtype::BF16
        } else {
            t.dtype
        };
        match base_meta {
            None => base_meta = Some((&t.shape, value_dtype)),
            Some((shape, bdt)) => {
                let same = if realign {
                    t.shape.len() == shape.len() && t.shape[1..] == shape[1..]
                } else {
                    t.shape == shape
                };
                if !same {
                    return Err(PlanError::ShapeMismatch {
                        tensor: name.to_string(),
                        model: m.reference.clone(),
                        via: if tied {
                            " (its model.embed_tokens.weight, standing in for the missing lm_head)"
                        } else {
                            ""
                        },
                        shape: t.shape.clone(),
                        base_shape: shape.to_vec(),
                        hint: if !realign && (name.contains("embed") || name.contains("lm_head")) {
                            VOCAB_HINT
                        } else {
                            ""
                        },
                    });
                }
                if is_float(bdt) != is_float(value_dtype) {
                    return Err(PlanError::DtypeMismatch {
                        tensor: name.to_string(),
                        model: m.reference.clone(),
                        dtype: t.dtype,
                        base_dtype: bdt,
                    });
                }
            }
        }
        let lora = lora_slice(if tied { EMBED } else { name }, m, t, &file_ids[mi])?;
        slices[k] = Some(InputSlice {
            file: file_ids[mi][t.file],
            range: t.start..t.end,
            dtype: t.dtype,
            scale,
            lora,
        });
    }
    let (shape, dtype) = base_meta.expect("at least one model");
    let slices = slices
        .into_iter()
        .map(|s| s.expect("every input"))
        .collect();
    Ok((slices, shape, dtype))
}

/// The LoRA factors of tensor `t` (named `name`) of model `m`, when its adapter changes it,
/// checked to fit the weight: `lora_B @ lora_A` has its shape, and it is a bfloat16,
/// float16 or float32 matrix.
fn lora_slice(
    name: &str,
    m: &ModelSource,
    t: &crate::source::TensorLoc,
    file_ids: &[usize],
) -> Result<Option<LoraSlice>, PlanError> {
    let Some(adapter) = &m.adapter else {
        return Ok(None);
    };
    let Some(pair) = adapter.pairs.get(name) else {
        return Ok(None);
    };
    let bad = |message: String| PlanError::Lora {
        tensor: name.to_string(),
        model: m.reference.clone(),
        message,
    };
    let (rank, fan_in, fan_out) = (pair.a.shape[0], pair.a.shape[1], pair.b.shape[0]);
    let want = vec![fan_out, fan_in];
    if t.shape != want {
        return Err(bad(format!(
            "the adapter's factors make a {want:?} update for a {:?} weight: the adapter was trained for another model",
            t.shape
        )));
    }
    if !matches!(t.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
        return Err(bad(format!(
            "the weight is {:?}; LoRA is applied to bfloat16, float16 and float32 weights",
            t.dtype
        )));
    }
    Ok(Some(LoraSlice {
        file: *file_ids.last().expect("the adapter's file is listed last"),
        a: pair.a.start..pair.a.end,
        a_dtype: pair.a.dtype,
        b: pair.b.start..pair.b.end,
        b_dtype: pair.b.dtype,
        rank,
        scaling: pair.scaling,
    }))
}

/// The scales of tensor `t` (named `name`) of model `m` when it is a block-FP8 weight:
/// F8_E4M3, in a checkpoint whose config says `quant_method: fp8`, with a float32
/// `<name>_scale_inv` of shape `[ceil(rows / block), ceil(cols / block)]` in any of the
/// model's files. Anything else FP8 is refused here, naming the tensor.
fn fp8_scale(
    name: &str,
    m: &ModelSource,
    t: &crate::source::TensorLoc,
    file_ids: &[usize],
) -> Result<Option<ScaleSlice>, PlanError> {
    if t.dtype != Dtype::F8_E4M3 {
        return Ok(None);
    }
    let bad = |message: String| PlanError::Fp8 {
        tensor: name.to_string(),
        model: m.reference.clone(),
        message,
    };
    let Some(block) = m.fp8_block else {
        return Err(bad(
            "the model's config.json has no `quantization_config` with `quant_method: fp8`, so the block size of its scales is unknown: add the quantization_config the model was released with, or convert it to bfloat16 first".into(),
        ));
    };
    let &[rows, cols] = t.shape.as_slice() else {
        return Err(bad(format!(
            "shape {:?}: block FP8 weights are matrices",
            t.shape
        )));
    };
    if rows == 0 || cols == 0 {
        return Err(bad(format!("shape {:?}: an empty FP8 matrix", t.shape)));
    }
    let blocks = Blocks { rows, cols, block };
    let scale_name = format!("{name}{SCALE_SUFFIX}");
    let Some(s) = m.tensors.get(&scale_name) else {
        return Err(bad(format!(
            "its scales `{scale_name}` are missing (a block-FP8 weight needs them to be read)"
        )));
    };
    let want = blocks.scale_shape();
    if s.dtype != Dtype::F32 || s.shape != want {
        return Err(bad(format!(
            "its scales `{scale_name}` are {:?} {:?}, but {block:?} blocks of a {rows}x{cols} matrix need F32 {want:?}",
            s.dtype, s.shape
        )));
    }
    Ok(Some(ScaleSlice {
        file: file_ids[s.file],
        range: s.start..s.end,
        blocks,
    }))
}
