//! Planning: headers + config -> tensors, output files and tasks. Pure: no I/O, no tokio.
//!
//! The plan fixes everything before a weight byte moves: which input ranges feed each output
//! tensor, how tensors are laid out in files exactly as mergekit lays them out (lexicographic
//! order, greedy sharding by bytes, safetensors' in-file order and header), and how the work
//! is cut into tasks. A [`Task`] is self-contained so it can run anywhere (this process, or a
//! worker on another machine).

use std::ops::Range;

use safetensors::tensor::TensorInfo;
use safetensors::Dtype;

use crate::config::MergeConfig;
use crate::dtype::{self, is_float, is_low_precision_float, WorkDtype};
use crate::fp8::{Blocks, SCALE_SUFFIX};
use crate::merge::{Kernel, Reductions, Streaming, BLOCK};
use crate::params::ParamError;
use crate::source::ModelSource;

/// A merge that cannot be planned, naming the tensor and model at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error("tensor `{tensor}` is in the base model but missing from `{model}`")]
    MissingTensor { tensor: String, model: String },
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
}

const VOCAB_HINT: &str =
    ": the vocabularies differ. mergekit refuses this too; align the vocabularies \
(mergekit's `tokenizer` config resizes embeddings) before merging";

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
    /// Memory the kernel works in besides its inputs and output (whole-tensor methods).
    pub fn scratch_bytes(&self) -> u64 {
        match &self.op {
            Op::Merge { kernel, inputs } => kernel.scratch_bytes(self.numel(), inputs.len()),
            Op::Copy { .. } => 0,
        }
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
        if let Op::Merge { kernel, .. } = &self.op {
            if kernel.streaming(&self.shape) == Streaming::Whole {
                return self.working_set();
            }
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

    /// The invariants every plan keeps, or the first one broken: tasks tile their files
    /// byte for byte after the header, every tensor is in exactly one task and one file
    /// (as the weight map says), sizes equal shape x dtype, input ranges lie inside their
    /// files (`input_size` gives a file's size), tasks are at least `opts.min_part` but a
    /// file's last, multipart parts tile each task and are at least S3's minimum (or
    /// `opts.min_part`, when smaller) but a file's last, at most [`MAX_PARTS`] a file, and files stay within `opts.out_shard_size` unless one tensor is
    /// bigger. Property tests and the 671B-scale test check plans with it.
    pub fn check(
        &self,
        opts: &PlanOptions,
        input_size: impl Fn(usize) -> u64,
    ) -> Result<(), String> {
        let bytes = |shape: &[usize], d: Dtype| -> u64 {
            shape.iter().product::<usize>() as u64 * (d.bitsize() / 8) as u64
        };
        let mut next_task = 0;
        let mut names = std::collections::HashMap::new();
        let mut total = 0;
        for (fi, f) in self.files.iter().enumerate() {
            if f.tasks.start != next_task || f.tasks.is_empty() {
                return Err(format!("{}: tasks {:?} do not follow on", f.name, f.tasks));
            }
            next_task = f.tasks.end;
            let mut at = 0;
            let mut parts = 0;
            for t in &self.tasks[f.tasks.clone()] {
                if t.file != fi || t.out.start != at || t.out.end <= t.out.start {
                    return Err(format!(
                        "task {} of {}: range {:?}, expected from {at}",
                        t.id, f.name, t.out
                    ));
                }
                let last = t.out.end == f.size;
                if !last && t.out.end - t.out.start < opts.min_part {
                    return Err(format!(
                        "task {}: a {}-byte part that is not its file's last",
                        t.id,
                        t.out.end - t.out.start
                    ));
                }
                let len = t.out.end - t.out.start;
                let (n, size) = split_parts(len, part_target(f.size));
                let tail = len - (n as u64 - 1) * size;
                let smallest = if n > 1 { tail.min(size) } else { len };
                if (n as u64 - 1) * size >= len || (!last && smallest < opts.min_part.min(MIN_PART))
                {
                    return Err(format!(
                        "task {}: {n} parts of {size} bytes for {len}",
                        t.id
                    ));
                }
                parts += n as u64;
                let mut pos = if at == 0 { f.header.len() as u64 } else { at };
                for j in &t.tensors {
                    let scales_ok = j.requant.as_ref().is_none_or(|r| {
                        r.scales.start == j.out.end
                            && r.scales.end - r.scales.start == r.blocks.scale_bytes()
                    });
                    if j.out.start != pos
                        || j.out.end - j.out.start != bytes(&j.shape, j.dtype)
                        || !scales_ok
                    {
                        return Err(format!(
                            "{}: output range {:?}, expected {} bytes from {pos}",
                            j.name,
                            j.out,
                            bytes(&j.shape, j.dtype)
                        ));
                    }
                    pos = j.written().end;
                    total += j.written().end - j.written().start;
                    if names.insert(j.name.clone(), f.name.as_str()).is_some() {
                        return Err(format!("{} is in two tasks", j.name));
                    }
                    if j.requant.is_some() {
                        names.insert(format!("{}{SCALE_SUFFIX}", j.name), f.name.as_str());
                    }
                    let inputs: Vec<&InputSlice> = match &j.op {
                        Op::Merge { inputs, .. } => inputs.iter().collect(),
                        Op::Copy { input } => vec![input],
                    };
                    for s in inputs {
                        let file = self
                            .inputs
                            .get(s.file)
                            .ok_or(format!("{}: no input file {}", j.name, s.file))?;
                        if s.range.end > input_size(s.file) || s.len() != bytes(&j.shape, s.dtype) {
                            return Err(format!("{}: input range {:?} of {} is outside the file or not shape x dtype", j.name, s.range, file.url));
                        }
                    }
                }
                if pos != t.out.end {
                    return Err(format!(
                        "task {}: tensors end at {pos}, the task at {}",
                        t.id, t.out.end
                    ));
                }
                at = t.out.end;
            }
            if at != f.size {
                return Err(format!("{}: tasks end at {at} of {} bytes", f.name, f.size));
            }
            if parts > MAX_PARTS {
                return Err(format!("{}: {parts} multipart parts", f.name));
            }
            let data = f.size - f.header.len() as u64;
            let tensors: usize = self.tasks[f.tasks.clone()]
                .iter()
                .map(|t| t.tensors.len())
                .sum();
            if data > opts.out_shard_size && tensors > 1 {
                return Err(format!(
                    "{}: {data} bytes of data in {tensors} tensors, over the shard size",
                    f.name
                ));
            }
        }
        if next_task != self.tasks.len() || self.tasks.iter().enumerate().any(|(i, t)| t.id != i) {
            return Err("task ids are not 0..n in file order".into());
        }
        if total != self.total_size {
            return Err(format!(
                "total_size {} but the tensors hold {total} bytes",
                self.total_size
            ));
        }
        let mapped: std::collections::HashMap<String, &str> = self
            .weight_map
            .iter()
            .map(|(t, f)| (t.clone(), f.as_str()))
            .collect();
        if mapped != names || mapped.len() != self.weight_map.len() {
            return Err("the weight map does not list each tensor once, in its file".into());
        }
        Ok(())
    }
}

/// Plan a merge. `models[0]` is the base, then the fine-tunes in config order.
pub fn plan(
    config: &MergeConfig,
    models: &[ModelSource],
    opts: PlanOptions,
) -> Result<MergePlan, PlanError> {
    let base = &models[0];
    if base.tensors.is_empty() {
        return Err(PlanError::Empty(base.reference.clone()));
    }
    let (inputs, file_ids) = input_files(models);
    let names = tensor_names(models);
    let layers = method::layer_count(&names);
    let order = method::input_order(config);
    let mut jobs: Vec<TensorJob> = Vec::new();
    for name in names {
        let (slices, shape, base_dtype) = input_slices(name, models, &file_ids)?;
        let merge = method::TensorMerge {
            config,
            models,
            order: &order,
            t: crate::params::layer_t(crate::params::layer_of(name), layers),
            seed: opts.random_seed,
        };
        jobs.push(tensor_job(name, slices, shape, base_dtype, &merge, opts)?);
    }
    let mut warnings = config.warnings.clone();
    if method::set_offsets(&mut jobs) && !opts.random_seed_given {
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
    layout(jobs, inputs, warnings, opts)
}

const LM_HEAD: &str = "lm_head.weight";
const EMBED: &str = "model.embed_tokens.weight";

/// Every input file, numbered across models, and for each model its files' numbers (its
/// adapter's file last).
fn input_files(models: &[ModelSource]) -> (Vec<InputFile>, Vec<Vec<usize>>) {
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
fn tensor_names(models: &[ModelSource]) -> Vec<&str> {
    let base = &models[0];
    let is_scale = |name: &str| {
        name.strip_suffix(SCALE_SUFFIX).is_some_and(|w| {
            base.fp8_block.is_some()
                && base
                    .tensors
                    .get(w)
                    .is_some_and(|t| t.dtype == Dtype::F8_E4M3)
        })
    };
    let mut names: Vec<&str> = base
        .tensors
        .keys()
        .map(String::as_str)
        .filter(|n| !is_scale(n))
        .collect();
    if !base.tensors.contains_key(LM_HEAD) && models.iter().any(|m| m.tensors.contains_key(LM_HEAD))
    {
        names.push(LM_HEAD);
        names.sort_unstable();
    }
    names
}

/// Tensor `name` in every model (base first), checked to agree with the base in shape and
/// in being a float; with the base's shape and dtype. A model without lm_head lends its
/// embedding (tied weights).
fn input_slices<'a>(
    name: &str,
    models: &'a [ModelSource],
    file_ids: &[Vec<usize>],
) -> Result<(Vec<InputSlice>, &'a [usize], Dtype), PlanError> {
    let mut slices = Vec::with_capacity(models.len());
    let mut base_meta: Option<(&[usize], Dtype)> = None;
    for (mi, m) in models.iter().enumerate() {
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
                if t.shape != shape {
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
                        hint: if name.contains("embed") || name.contains("lm_head") {
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
        slices.push(InputSlice {
            file: file_ids[mi][t.file],
            range: t.start..t.end,
            dtype: t.dtype,
            scale,
            lora,
        });
    }
    let (shape, dtype) = base_meta.expect("at least one model");
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
    let slices_base_scale = slices[0].scale.as_ref().map(|s| s.blocks);
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
        let first = slices[0].value_dtype();
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
        (
            out.st_dtype(),
            Op::Merge {
                kernel,
                inputs: merge.ordered(slices),
            },
        )
    } else {
        let input = slices.swap_remove(0);
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
    })
}

/// Bytes a tensor takes in its file: its data, and its scales when written as FP8.
fn tensor_bytes(j: &TensorJob) -> u64 {
    let scales = j.requant.as_ref().map_or(0, |r| r.blocks.scale_bytes());
    j.numel() as u64 * dtype::size(j.dtype).expect("whole-byte dtype") as u64 + scales
}

/// Shard the tensors (already in lexicographic order) into files and tasks.
fn layout(
    jobs: Vec<TensorJob>,
    inputs: Vec<InputFile>,
    warnings: Vec<String>,
    opts: PlanOptions,
) -> Result<MergePlan, PlanError> {
    let total_size: u64 = jobs.iter().map(tensor_bytes).sum();
    let groups = shard(jobs, opts.out_shard_size);
    let k = groups.len();
    let mut files = Vec::with_capacity(k);
    let mut tasks: Vec<Task> = Vec::new();
    let mut weight_map = Vec::new();
    for (fi, mut group) in groups.into_iter().enumerate() {
        let name = if k == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", fi + 1, k)
        };
        // safetensors' order inside a file: by dtype, widest first, then by name.
        group.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
        let header = file_header(&group)?;
        let data_start = header.len() as u64;
        for j in &group {
            weight_map.push((j.name.clone(), name.clone()));
            if j.requant.is_some() {
                weight_map.push((format!("{}{SCALE_SUFFIX}", j.name), name.clone()));
            }
        }
        let first_task = tasks.len();
        let data = cut_tasks(group, fi, data_start, opts, &mut tasks);
        files.push(OutputFile {
            name,
            size: data_start + data,
            header,
            tasks: first_task..tasks.len(),
        });
    }
    for (i, t) in tasks.iter_mut().enumerate() {
        t.id = i;
    }
    weight_map.sort();
    Ok(MergePlan {
        inputs,
        files,
        tasks,
        weight_map,
        total_size,
        warnings,
    })
}

/// Greedy sharding, as mergekit's TensorWriter: start a new file when this tensor would
/// push a non-empty file past `limit`.
fn shard(jobs: Vec<TensorJob>, limit: u64) -> Vec<Vec<TensorJob>> {
    let mut groups: Vec<Vec<TensorJob>> = Vec::new();
    let mut cur = 0u64;
    for j in jobs {
        let b = tensor_bytes(&j);
        match groups.last_mut() {
            Some(g) if cur + b <= limit => {
                g.push(j);
                cur += b;
            }
            _ => {
                groups.push(vec![j]);
                cur = b;
            }
        }
    }
    groups
}

/// The header of a file holding `group`, in order.
fn file_header(group: &[TensorJob]) -> Result<Vec<u8>, PlanError> {
    let mut off = 0u64;
    let mut infos = Vec::with_capacity(group.len());
    for j in group {
        let b = j.numel() as u64 * dtype::size(j.dtype).expect("whole-byte dtype") as u64;
        infos.push((
            j.name.clone(),
            TensorInfo {
                dtype: j.dtype,
                shape: j.shape.clone(),
                data_offsets: (off as usize, (off + b) as usize),
            },
        ));
        off += b;
        if let Some(r) = &j.requant {
            // Each scale right after its weight, so one task writes both.
            let s = r.blocks.scale_bytes();
            infos.push((
                format!("{}{SCALE_SUFFIX}", j.name),
                TensorInfo {
                    dtype: Dtype::F32,
                    shape: r.blocks.scale_shape().to_vec(),
                    data_offsets: (off as usize, (off + s) as usize),
                },
            ));
            off += s;
        }
    }
    crate::header::write_header(infos).map_err(PlanError::Layout)
}

/// Place `group`'s tensors after the header of file `file` and cut them into tasks of about
/// `opts.task_size` input bytes (at least `opts.min_part` output bytes, a multipart part's
/// minimum), appended to `tasks`. The file's first task starts at 0 and writes the header;
/// a file of empty tensors still gets one task for it. Returns the bytes of data.
fn cut_tasks(
    group: Vec<TensorJob>,
    file: usize,
    data_start: u64,
    opts: PlanOptions,
    tasks: &mut Vec<Task>,
) -> u64 {
    let first_task = tasks.len();
    let mut pos = 0u64;
    let mut cur_task: Option<Task> = None;
    for mut j in group {
        let b = tensor_bytes(&j);
        let end = data_start + pos + b;
        match &mut j.requant {
            Some(r) => {
                let scales = r.blocks.scale_bytes();
                r.scales = end - scales..end;
                j.out = data_start + pos..end - scales;
            }
            None => j.out = data_start + pos..end,
        }
        pos += b;
        let fits = cur_task.as_ref().is_some_and(|t| {
            t.input_bytes() + j.input_bytes() <= opts.task_size
                || t.out.end - t.out.start < opts.min_part
        });
        if !fits {
            tasks.extend(cur_task.take());
            let start = if tasks.len() == first_task {
                0
            } else {
                j.written().start
            };
            cur_task = Some(Task {
                id: 0,
                file,
                out: start..start,
                tensors: Vec::new(),
            });
        }
        let t = cur_task.as_mut().expect("task open");
        t.out.end = j.written().end;
        t.tensors.push(j);
    }
    tasks.extend(cur_task.take());
    if tasks.len() == first_task {
        tasks.push(Task {
            id: 0,
            file,
            out: 0..data_start,
            tensors: Vec::new(),
        });
    }
    pos
}

mod method;

#[cfg(test)]
mod tests;
