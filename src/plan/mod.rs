//! Planning: headers + config -> tensors, output files and tasks. Pure: no I/O, no tokio.
//!
//! The plan fixes everything before a weight byte moves: which input ranges feed each output
//! tensor, how tensors are laid out in files exactly as mergekit lays them out (lexicographic
//! order, greedy sharding by bytes, safetensors' in-file order and header), and how the work
//! is cut into tasks. A [`Task`] is self-contained so it can run anywhere (this process, or a
//! worker on another machine).

use std::ops::Range;
use std::sync::Arc;

use safetensors::Dtype;

use crate::config::MergeConfig;
use crate::dtype::{self, is_float, is_low_precision_float, WorkDtype};
use crate::fp8::Blocks;
use crate::merge::{Kernel, Reductions, Streaming, BLOCK};
use crate::params::ParamError;
use crate::source::ModelSource;
use crate::vocab::{is_vocab_tensor, VocabError, VocabTensor, Vocabulary};

/// A merge that cannot be planned, naming the tensor and model at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error("tensor `{tensor}` is missing from `{model}`, which the merge takes it from")]
    MissingTensor { tensor: String, model: String },
    /// An output slice that cannot be planned (`slices[N]` of the config).
    #[error("config key `slices[{slice}]`: {message}")]
    Slice { slice: usize, message: String },
    #[error("tensor `{tensor}` has shape {shape:?} in `{model}`{via} but {base_shape:?} in the base model{hint}")]
    ShapeMismatch {
        tensor: String,
        model: String,
        /// Set when a tied model's embeddings stand in for its missing lm_head.
        via: &'static str,
        shape: Vec<usize>,
        base_shape: Vec<usize>,
        hint: &'static str,
    },
    #[error("tensor `{tensor}` is {dtype:?} in `{model}` but {base_dtype:?} in the base model; only floating-point tensors can be merged")]
    DtypeMismatch {
        tensor: String,
        model: String,
        dtype: Dtype,
        base_dtype: Dtype,
    },
    #[error("tensor `{tensor}` is {dtype:?}: mergefleet reads block-FP8 (F8_E4M3 with `_scale_inv` scales, `quant_method: fp8` in config.json) but not this format; convert the models to bfloat16 first")]
    LowPrecision { tensor: String, dtype: Dtype },
    /// A LoRA adapter that does not fit its model's weight.
    #[error("tensor `{tensor}` of `{model}`: {message}")]
    Lora {
        tensor: String,
        model: String,
        message: String,
    },
    /// A block-FP8 weight whose scales are missing or do not fit it.
    #[error("--quantize fp8: the base model `{0}` has no block-FP8 weights to write as FP8 again; drop --quantize to write {1}")]
    NothingToQuantize(String, &'static str),
    #[error("FP8 tensor `{tensor}` (F8_E4M3) of `{model}`: {message}")]
    Fp8 {
        tensor: String,
        model: String,
        message: String,
    },
    #[error("the base model `{0}` has no tensors")]
    Empty(String),
    #[error("{0}")]
    Layout(String),
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error(transparent)]
    Vocab(#[from] VocabError),
}

/// Sizes that shape the plan.
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    /// Largest output file, in bytes of tensor data (mergekit's `--out-shard-size`).
    pub out_shard_size: u64,
    /// Target bytes read per task; a larger tensor is a task of its own.
    pub task_size: u64,
    /// Smallest output of a task that is not the last of its file: every part of a
    /// multipart upload but the last must be at least 5 MiB on S3.
    pub min_part: u64,
    /// The order of model_stock's sums (`--reductions`).
    pub reductions: Reductions,
    /// `--quantize fp8`: write every tensor that is block-FP8 in the base as FP8 again,
    /// with its scales, in the base's block size.
    pub quantize_fp8: bool,
    /// The seed of the random stream (`--random-seed`) the random methods draw from.
    pub random_seed: u64,
    /// Whether the user chose the seed (else the plan says which one was drawn).
    pub random_seed_given: bool,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            out_shard_size: 5_000_000_000,
            task_size: 64 << 20,
            min_part: MIN_PART,
            reductions: Reductions::default(),
            quantize_fp8: false,
            random_seed: 0,
            random_seed_given: true,
        }
    }
}

/// S3's smallest part (all but the last part of an upload).
pub const MIN_PART: u64 = 5 << 20;
/// The size a task's multipart parts aim at: small enough that a worker uploads several at
/// once within a small buffer, large enough for the store (AWS's own tools use 8 MiB).
pub const UPLOAD_PART: u64 = 8 << 20;
/// The most parts planned for one upload (S3 allows 10,000).
pub const MAX_PARTS: u64 = 9_000;
const _: () = assert!(UPLOAD_PART >= MIN_PART + MAX_PARTS);

/// The part size aimed at in a file of `size` bytes: [`UPLOAD_PART`], or more when the file
/// would otherwise need over [`MAX_PARTS`] parts.
pub fn part_target(size: u64) -> u64 {
    UPLOAD_PART.max(size.div_ceil(MAX_PARTS))
}

/// How a task's `len` output bytes are cut into multipart parts aiming at `target` bytes:
/// `(count, size)`, every part `size` bytes but the last. Equal cuts: a task shorter than
/// twice the target is one part; otherwise every part is in `[target - count, 2 * target)`,
/// so parts stay above S3's minimum and a file has at most `size / target` of them.
pub fn split_parts(len: u64, target: u64) -> (u32, u64) {
    let n = (len / target.max(1)).max(1);
    (n as u32, len.div_ceil(n).max(1))
}

/// An input file, referenced by index from [`InputSlice`].
#[derive(Debug, Clone, PartialEq)]
pub struct InputFile {
    /// Index of the model (0 = base, then fine-tunes in config order).
    pub model: usize,
    pub url: String,
}

/// One input tensor: a byte range of an input file.
#[derive(Debug, Clone, PartialEq)]
pub struct InputSlice {
    pub file: usize,
    pub range: Range<u64>,
    pub dtype: Dtype,
    /// For a block-FP8 weight: its scales, read with it and applied on read.
    pub scale: Option<ScaleSlice>,
    /// A LoRA adapter's factors for this weight, read with it and applied on read.
    pub lora: Option<LoraSlice>,
}

/// The two factors of a LoRA-adapted weight (`lora_A` [rank, in], `lora_B` [out, rank], in
/// one file of the adapter) and PEFT's scaling; see [`crate::lora`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSlice {
    pub file: usize,
    pub a: Range<u64>,
    pub a_dtype: Dtype,
    pub b: Range<u64>,
    pub b_dtype: Dtype,
    pub rank: usize,
    pub scaling: f64,
}

impl LoraSlice {
    /// Bytes of both factors (read whole for every window of the weight).
    pub fn bytes(&self) -> u64 {
        (self.a.end - self.a.start) + (self.b.end - self.b.start)
    }
}

/// The float32 block scales of an FP8 input (`<name>_scale_inv`, possibly in another file
/// of the model than the weight), and the weight's block layout.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleSlice {
    pub file: usize,
    pub range: Range<u64>,
    pub blocks: Blocks,
}

impl InputSlice {
    pub fn len(&self) -> u64 {
        self.range.end - self.range.start
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The dtype the kernel sees: bfloat16 for a dequantized FP8 weight, else the stored one.
    pub fn value_dtype(&self) -> Dtype {
        if self.scale.is_some() {
            Dtype::BF16
        } else {
            self.dtype
        }
    }
    /// Bytes read for this input: the tensor, its scales, its LoRA factors.
    pub fn read_bytes(&self) -> u64 {
        self.len()
            + self
                .scale
                .as_ref()
                .map_or(0, |s| s.range.end - s.range.start)
            + self.lora.as_ref().map_or(0, LoraSlice::bytes)
    }
}

/// What produces one output tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// A merge of `inputs`, in the order the kernel takes them (see [`crate::merge::Method`]).
    Merge {
        kernel: Kernel,
        inputs: Vec<InputSlice>,
    },
    /// Copied byte for byte from the base (non-float tensors).
    Copy { input: InputSlice },
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorJob {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    /// Absolute byte range in its output file.
    pub out: Range<u64>,
    pub op: Op,
    /// `--quantize fp8`: the merged values (the kernel's output dtype) are quantized into
    /// `out` (F8_E4M3), their scales written right after it.
    pub requant: Option<Requant>,
    /// A vocabulary tensor of a merge that realigns vocabularies: how each input's rows are
    /// gathered into the output's token order before the kernel sees them (whole tensors).
    pub vocab: Option<Arc<VocabTensor>>,
}

/// How a merged tensor is written as block FP8.
#[derive(Debug, Clone, PartialEq)]
pub struct Requant {
    pub blocks: Blocks,
    /// Absolute byte range of `<name>_scale_inv` (float32), right after the weight.
    pub scales: Range<u64>,
}

impl TensorJob {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes read for this tensor.
    pub fn input_bytes(&self) -> u64 {
        self.inputs().iter().map(|s| s.read_bytes()).sum()
    }
    /// Bytes of bfloat16 values dequantized from FP8 inputs (held while merging).
    pub fn dequantized_bytes(&self) -> u64 {
        let fp8 = self.inputs().iter().filter(|s| s.scale.is_some()).count();
        (fp8 * 2 * self.numel()) as u64
    }
    /// Memory to merge this tensor in one pass: all inputs, their dequantized values, and
    /// the output.
    pub fn working_set(&self) -> u64 {
        let written = self.written();
        self.input_bytes()
            + self.dequantized_bytes()
            + self.requant_bytes()
            + self.scratch_bytes()
            + (written.end - written.start)
    }
    /// Memory the kernel works in besides its inputs and output (whole-tensor methods), and
    /// the realigned copies of a vocabulary tensor's inputs.
    pub fn scratch_bytes(&self) -> u64 {
        let realigned = self
            .vocab
            .as_ref()
            .map_or(0, |v| v.gathered_bytes(self.numel() / v.padded.max(1)));
        realigned
            + match &self.op {
                Op::Merge { kernel, inputs } => kernel.scratch_bytes(self.numel(), inputs.len()),
                Op::Copy { .. } => 0,
            }
    }
    /// Whether the tensor is merged in one piece: a whole-tensor method, or realigned rows.
    pub fn whole(&self) -> bool {
        self.vocab.is_some()
            || matches!(&self.op, Op::Merge { kernel, .. } if kernel.streaming(&self.shape) == Streaming::Whole)
    }
    /// Every byte this tensor writes: the tensor, and its scales when requantized.
    pub fn written(&self) -> Range<u64> {
        self.out.start..self.requant.as_ref().map_or(self.out.end, |r| r.scales.end)
    }
    /// Bytes of the kernel's output held before requantizing (0 when not requantized).
    pub fn requant_bytes(&self) -> u64 {
        match (&self.requant, &self.op) {
            (Some(_), Op::Merge { kernel, .. }) => (self.numel() * kernel.out.size()) as u64,
            _ => 0,
        }
    }
    /// The input slices, base first.
    pub fn inputs(&self) -> Vec<&InputSlice> {
        match &self.op {
            Op::Merge { inputs, .. } => inputs.iter().collect(),
            Op::Copy { input } => vec![input],
        }
    }
    /// The streaming granularity of this tensor (elements: a block, or a row)
    /// and the bytes one element costs (every input plus the output).
    pub fn window_unit(&self) -> (usize, u64) {
        let size = |d| dtype::size(d).expect("whole-byte dtype") as u64;
        // A dequantized FP8 weight, or a LoRA-adapted one, is held once more as the kernel
        // reads it.
        let per_input = |s: &&InputSlice| {
            size(s.dtype)
                + if s.scale.is_some() { 2 } else { 0 }
                + if s.lora.is_some() { size(s.dtype) } else { 0 }
        };
        let mut per_elem = self.inputs().iter().map(per_input).sum::<u64>() + size(self.dtype);
        let mut unit = match &self.op {
            _ if self.vocab.is_some() => self.numel().max(1),
            Op::Merge { kernel, .. } => match kernel.streaming(&self.shape) {
                Streaming::Rows(row) => row,
                Streaming::Elementwise | Streaming::Statistics => BLOCK,
                Streaming::Whole => self.numel().max(1),
            },
            Op::Copy { .. } => BLOCK,
        };
        if let (Some(r), Op::Merge { kernel, .. }) = (&self.requant, &self.op) {
            // Quantizing needs whole rows of blocks.
            per_elem += kernel.out.size() as u64;
            let rows = r.blocks.block[0] * r.blocks.cols;
            unit = unit / gcd(unit, rows) * rows;
        }
        (unit, per_elem)
    }
    /// Bytes held whole for every window: the FP8 inputs' scale tensors, and the LoRA
    /// factors (as read, and widened to float32 to apply them).
    pub fn scale_bytes(&self) -> u64 {
        let scales: u64 = self
            .inputs()
            .iter()
            .filter_map(|s| s.scale.as_ref())
            .map(|s| s.range.end - s.range.start)
            .sum();
        let lora: u64 = self
            .inputs()
            .iter()
            .filter_map(|s| s.lora.as_ref())
            .map(|l| {
                let elems =
                    |r: &Range<u64>, d| (r.end - r.start) / dtype::size(d).unwrap_or(1) as u64;
                l.bytes() + 4 * (elems(&l.a, l.a_dtype) + elems(&l.b, l.b_dtype))
            })
            .sum();
        scales + lora
    }
    /// The least memory that can merge this tensor: all of it, or two windows when streamed.
    pub fn min_memory(&self) -> u64 {
        if self.whole() {
            return self.working_set();
        }
        let (unit, per_elem) = self.window_unit();
        let scales_out = self
            .requant
            .as_ref()
            .map_or(0, |r| r.scales.end - r.scales.start);
        self.working_set()
            .min(2 * unit as u64 * per_elem + self.scale_bytes() + scales_out)
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

/// One output file.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputFile {
    pub name: String,
    /// The 8-byte length prefix and the padded JSON header.
    pub header: Vec<u8>,
    /// Total size in bytes (header + data).
    pub size: u64,
    /// Indices of this file's tasks in [`MergePlan::tasks`], in byte order.
    pub tasks: Range<usize>,
}

/// A unit of work: consecutive tensors of one output file.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: usize,
    /// Index into [`MergePlan::files`].
    pub file: usize,
    /// Absolute byte range of the output file this task writes. The first task of a file
    /// starts at 0 and writes the header too.
    pub out: Range<u64>,
    pub tensors: Vec<TensorJob>,
}

impl Task {
    pub fn input_bytes(&self) -> u64 {
        self.tensors.iter().map(TensorJob::input_bytes).sum()
    }
    pub fn working_set(&self) -> u64 {
        self.tensors.iter().map(TensorJob::working_set).sum()
    }
    /// The least memory that can run this task (streaming its largest tensor).
    pub fn min_memory(&self) -> u64 {
        self.tensors
            .iter()
            .map(TensorJob::min_memory)
            .max()
            .unwrap_or(0)
    }
}

/// The whole merge, decided before any weight is read.
#[derive(Debug, Clone)]
pub struct MergePlan {
    pub inputs: Vec<InputFile>,
    pub files: Vec<OutputFile>,
    pub tasks: Vec<Task>,
    /// Tensor name -> output file name (the index's `weight_map`).
    pub weight_map: Vec<(String, String)>,
    /// Sum of tensor data bytes (the index's `total_size`).
    pub total_size: u64,
    pub warnings: Vec<String>,
    /// A sliced merge's output layers, in order (empty for a `models:` merge).
    pub layers: Vec<OutLayer>,
}

/// One output layer of a sliced merge: the slice it belongs to and, for each of the slice's
/// sources, the model (as [`MergeConfig::all_models`] numbers them) and its input layer.
#[derive(Debug, Clone, PartialEq)]
pub struct OutLayer {
    pub slice: usize,
    pub sources: Vec<(usize, usize)>,
}

impl MergePlan {
    /// How many block-FP8 inputs are read with their scales and dequantized.
    pub fn fp8_inputs(&self) -> usize {
        self.tasks
            .iter()
            .flat_map(|t| &t.tensors)
            .flat_map(|j| j.inputs())
            .filter(|s| s.scale.is_some())
            .count()
    }
    /// Whether tensors are written as block FP8 (`--quantize fp8`).
    pub fn writes_fp8(&self) -> bool {
        self.tasks
            .iter()
            .flat_map(|t| &t.tensors)
            .any(|j| j.requant.is_some())
    }
    /// Task `id`'s share of its file's multipart upload: its first part number (0-based)
    /// and its part size.
    pub fn parts_of(&self, id: usize) -> (u32, u64) {
        let task = &self.tasks[id];
        let file = &self.files[task.file];
        let target = part_target(file.size);
        let first: u32 = self.tasks[file.tasks.start..id]
            .iter()
            .map(|t| split_parts(t.out.end - t.out.start, target).0)
            .sum();
        (first, split_parts(task.out.end - task.out.start, target).1)
    }

    pub fn tensor_count(&self) -> usize {
        self.tasks.iter().map(|t| t.tensors.len()).sum()
    }
    pub fn bytes_read(&self) -> u64 {
        self.tasks.iter().map(Task::input_bytes).sum()
    }
    pub fn bytes_written(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
    /// The tensor with the largest one-pass working set.
    pub fn largest_tensor(&self) -> Option<&TensorJob> {
        self.tasks
            .iter()
            .flat_map(|t| &t.tensors)
            .max_by_key(|t| t.working_set())
    }
    /// Output file name of the file of `task`.
    pub fn file_of(&self, task: &Task) -> &OutputFile {
        &self.files[task.file]
    }
}

/// Plan a merge. `models[0]` is the base, then the fine-tunes in config order.
pub fn plan(
    config: &MergeConfig,
    models: &[ModelSource],
    opts: PlanOptions,
) -> Result<MergePlan, PlanError> {
    plan_with_vocab(config, models, None, opts)
}

/// Plan a merge whose vocabulary tensors are realigned to `vocab` (`tokenizer_source`).
pub fn plan_with_vocab(
    config: &MergeConfig,
    models: &[ModelSource],
    vocab: Option<&Vocabulary>,
    opts: PlanOptions,
) -> Result<MergePlan, PlanError> {
    let base = &models[0];
    if base.tensors.is_empty() {
        return Err(PlanError::Empty(base.reference.clone()));
    }
    let (inputs, file_ids) = input_files(models);
    let names = tensor_names(models);
    let outputs = sources::output_tensors(config, models, &names)?;
    let mut jobs: Vec<TensorJob> = Vec::new();
    for out in &outputs {
        let vocab = vocab.filter(|_| is_vocab_tensor(&out.name));
        let (slices, shape, base_dtype) = input_slices(out, models, &file_ids, vocab.is_some())?;
        let merge = method::TensorMerge {
            config,
            models,
            tensor: out,
            order: sources::kernel_order(config, out),
            seed: opts.random_seed,
        };
        let realigned = match vocab {
            Some(v) if is_float(base_dtype) => realign(v, out, &slices, shape, models, config)?,
            _ => None,
        };
        let shape = match &realigned {
            Some(r) => std::iter::once(r.padded)
                .chain(shape[1..].iter().copied())
                .collect(),
            None => shape.to_vec(),
        };
        let mut job = tensor_job(&out.name, slices, &shape, base_dtype, &merge, opts)?;
        if let Some(r) = realigned {
            if job.requant.is_some() {
                return Err(PlanError::Fp8 {
                    tensor: out.name.clone(),
                    model: base.reference.clone(),
                    message: "--quantize fp8 cannot requantize a vocabulary tensor whose rows are realigned; it is not FP8 in any checkpoint mergefleet knows".into(),
                });
            }
            job.vocab = Some(Arc::new(r.reorder(&merge.order)));
        }
        jobs.push(job);
    }
    let mut warnings = config.warnings.clone();
    let draw_order = {
        let mut o: Vec<usize> = (0..outputs.len()).collect();
        o.sort_by(|&a, &b| outputs[a].draw_key().cmp(outputs[b].draw_key()));
        o
    };
    if method::set_offsets(&mut jobs, &draw_order) && !opts.random_seed_given {
        warnings.push(format!(
            "{} draws random numbers and no --random-seed was given: drew seed {s}; pass --random-seed {s} to repeat this merge",
            config.method.name(),
            s = opts.random_seed
        ));
    }
    if opts.quantize_fp8 && jobs.iter().all(|j| j.requant.is_none()) {
        let out = jobs
            .iter()
            .find_map(|j| match &j.op {
                Op::Merge { kernel, .. } => Some(kernel.out.name()),
                Op::Copy { .. } => None,
            })
            .unwrap_or("the configured dtype");
        return Err(PlanError::NothingToQuantize(base.reference.clone(), out));
    }
    let mut plan = layout(jobs, inputs, warnings, opts)?;
    plan.layers = config
        .slices
        .iter()
        .enumerate()
        .flat_map(|(s, slice)| {
            (0..slice.len()).map(move |i| OutLayer {
                slice: s,
                sources: slice
                    .sources
                    .iter()
                    .map(|src| (src.model, src.layers.start + i))
                    .collect(),
            })
        })
        .collect();
    Ok(plan)
}

/// What to do with one tensor: merge floats in the working dtype (the config's, else the
/// inputs' common dtype, else float32), copy anything else from the base.
fn tensor_job(
    name: &str,
    mut slices: Vec<InputSlice>,
    shape: &[usize],
    base_dtype: Dtype,
    merge: &method::TensorMerge,
    opts: PlanOptions,
) -> Result<TensorJob, PlanError> {
    let config = merge.config;
    let base = merge.tensor.base.unwrap_or(0);
    let slices_base_scale = slices[base].scale.as_ref().map(|s| s.blocks);
    // Low-precision floats are weights, not integers to copy; merging them needs their
    // block scales, which model_stock here does not apply. Refuse rather than copy
    // the base's bytes and call it a merge.
    if let Some(d) = slices
        .iter()
        .filter(|s| s.scale.is_none())
        .map(|s| s.dtype)
        .find(|d| is_low_precision_float(*d))
    {
        return Err(PlanError::LowPrecision {
            tensor: name.to_string(),
            dtype: d,
        });
    }
    let (dtype, op) = if is_float(base_dtype) {
        let first = slices[base].value_dtype();
        let work = config
            .dtype
            .unwrap_or_else(|| match WorkDtype::from_st(first) {
                Some(w) if slices.iter().all(|s| s.value_dtype() == first) => w,
                _ => WorkDtype::F32,
            });
        let out = config.out_dtype.unwrap_or(config.method.result_dtype(work));
        let kernel = Kernel {
            method: merge.method(name, work)?,
            work,
            out,
            reductions: opts.reductions,
        };
        // The whole-tensor methods index a tensor's elements with 32 bits (sort pairs).
        let numel: usize = shape.iter().product();
        if kernel.streaming(shape) == Streaming::Whole && numel > u32::MAX as usize {
            return Err(ParamError::Invalid {
                param: "merge_method",
                tensor: name.to_string(),
                message: format!(
                    "{} takes whole tensors of at most 2^32 elements here; this one has {numel}",
                    config.method.name()
                ),
            }
            .into());
        }
        (
            out.st_dtype(),
            Op::Merge {
                kernel,
                inputs: merge.ordered(slices),
            },
        )
    } else {
        // Not a float: copied from the base, else the first input.
        let input = slices.swap_remove(base);
        (base_dtype, Op::Copy { input })
    };
    // --quantize fp8: what is FP8 in the base is written as FP8, in the base's blocks.
    let requant = match (&op, slices_base_scale) {
        (Op::Merge { kernel, .. }, Some(blocks)) if opts.quantize_fp8 => {
            if kernel.out == WorkDtype::F64 {
                return Err(PlanError::Fp8 {
                    tensor: name.to_string(),
                    model: merge.models[0].reference.clone(),
                    message: "--quantize fp8 quantizes bfloat16, float16 or float32 values; set `dtype` (or `out_dtype`) to one of them".into(),
                });
            }
            Some(Requant {
                blocks,
                scales: 0..0,
            })
        }
        _ => None,
    };
    Ok(TensorJob {
        name: name.to_string(),
        shape: shape.to_vec(),
        dtype: if requant.is_some() {
            Dtype::F8_E4M3
        } else {
            dtype
        },
        out: 0..0,
        op,
        requant,
        vocab: None,
    })
}

/// How output tensor `out`'s inputs (`slices`, in mergekit's order; `shape` the base's) are
/// realigned to the vocabulary: rows per input, gathered in the dtype mergekit gathers them
/// in (the config's `dtype`, else the inputs' common one). None when that changes nothing.
fn realign(
    v: &Vocabulary,
    out: &sources::OutTensor,
    slices: &[InputSlice],
    shape: &[usize],
    models: &[ModelSource],
    config: &MergeConfig,
) -> Result<Option<VocabTensor>, PlanError> {
    let cols: usize = shape[1..].iter().product();
    let names: Vec<String> = models.iter().map(|m| m.reference.clone()).collect();
    let mut rows = Vec::with_capacity(slices.len());
    for (s, input) in slices.iter().zip(&out.inputs) {
        if s.scale.is_some() {
            return Err(PlanError::Fp8 {
                tensor: out.name.clone(),
                model: names[input.model].clone(),
                message: "a block-FP8 vocabulary tensor cannot be realigned; convert the model to bfloat16 first".into(),
            });
        }
        let size = dtype::size(s.dtype).unwrap_or(1) as u64;
        rows.push((s.len() / size / cols.max(1) as u64) as usize);
    }
    let g = match config.dtype {
        Some(w) => w.st_dtype(),
        None => promote(slices.iter().map(|s| s.dtype)),
    };
    let model_of: Vec<usize> = out.inputs.iter().map(|i| i.model).collect();
    let r =
        crate::vocab::rows::tensor_rows(v, &out.name, &model_of, &names, &rows, out.vocab_base, g)?;
    let dtypes: Vec<Dtype> = slices.iter().map(|s| s.dtype).collect();
    Ok((!r.is_identity(&rows, &dtypes)).then_some(r))
}

/// torch's `promote_types` over float dtypes: the widest; bfloat16 with float16 is float32.
fn promote(dtypes: impl Iterator<Item = Dtype>) -> Dtype {
    dtypes
        .reduce(|a, b| match (a, b) {
            (a, b) if a == b => a,
            (Dtype::F64, _) | (_, Dtype::F64) => Dtype::F64,
            _ => Dtype::F32,
        })
        .unwrap_or(Dtype::F32)
}

mod check;
mod inputs;
mod layout;
mod method;
mod sources;

use inputs::{input_files, input_slices, tensor_names};
use layout::layout;

#[cfg(test)]
mod tests;
