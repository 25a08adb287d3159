//! The gRPC contract (`proto/mergefleet/v1/cluster.proto`) and its conversion to domain types.
//!
//! prost types stop here. The coordinator implements [`CoordinatorApi`] in domain terms and
//! [`server`] serves it; the worker talks through [`client::Client`]. A task travels as
//! [`OutgoingTask`] and arrives as [`Received`], checked by [`task_from_wire`] so a malformed
//! message is an error, never a panic. The planner, the executor, the kernel, the writers and
//! the coordinator's state machine never see a protobuf type.

pub mod client;
pub mod server;

use std::future::Future;
use std::time::Duration;

use std::sync::Arc;

use safetensors::Dtype;
use tonic::Status;

use crate::dtype::{self, WorkDtype};
use crate::fp8::Blocks;
use crate::merge::{Family, Gta, Kernel, Method, Reductions};
use crate::plan::{
    InputFile, InputSlice, LoraSlice, MergePlan, Op, Requant, ScaleSlice, Task, TensorJob,
};
use crate::sink::cluster::Target;
use crate::vocab::{RowFrom, RowMap, Run, VocabTensor};

/// The generated protobuf types. Public for tests that speak raw gRPC; code outside this
/// module uses the domain types below.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("mergefleet.v1");
}

/// Bumped on any incompatible change of the contract; checked at registration.
pub const PROTOCOL_VERSION: u32 = 5;

/// The longest a worker waits between two tries of an unreachable coordinator. Part of the
/// protocol: a coordinator lingers at least this long (plus a second) after the merge, so a
/// worker in backoff still hears the outcome.
pub const WORKER_MAX_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest gRPC message either side accepts (a task lists every input range of its
/// tensors; 64 MiB is far above any real task).
pub const MAX_MESSAGE: usize = 64 << 20;

/// The largest block side a task may name (checkpoints use 128).
const MAX_BLOCK: usize = 1 << 16;

/// A wire message that does not describe a valid task.
#[derive(Debug, thiserror::Error)]
#[error("malformed task from the coordinator: {0}")]
pub struct WireError(pub String);

/// A worker, as numbered by the coordinator that registered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub u64);

/// A task: its index in the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub usize);

/// One lease of a task (1 for the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attempt(pub u32);

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::fmt::Display for TaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A worker introducing itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub protocol_version: u32,
    pub name: String,
    /// Bytes the worker's tasks may use at once.
    pub memory_limit: u64,
    pub threads: u32,
}

/// The coordinator's answer to [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Welcome {
    pub worker: WorkerId,
    pub heartbeat_interval: Duration,
    pub lease_timeout: Duration,
}

/// The answer to a lease request. `T` is [`OutgoingTask`] on the coordinator and
/// [`Received`] on the worker.
#[derive(Debug)]
pub enum LeaseAnswer<T> {
    Task(T),
    /// Nothing to do now: ask again.
    Wait,
    /// The merge is committed.
    Done,
    /// The merge failed, with the reason.
    Failed(String),
    /// On the worker: a task arrived that does not decode. Reported as a failure.
    Malformed {
        task: TaskId,
        attempt: Attempt,
        error: WireError,
    },
}

/// A lease renewal: the worker is still on `task`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heartbeat {
    pub worker: WorkerId,
    pub task: TaskId,
    pub attempt: Attempt,
    pub bytes_done: u64,
}

/// One uploaded part of a multipart output: its number and the store's id for it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartDone {
    pub part: u32,
    pub content_id: String,
}

/// How one attempt of a task ended.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskOutcome {
    Success {
        parts: Vec<PartDone>,
    },
    Failure {
        message: String,
        /// Another attempt may succeed.
        retryable: bool,
        /// The worker was stopped (SIGTERM), not the task at fault: does not count
        /// toward `--max-attempts`.
        preempted: bool,
    },
}

/// A worker's report of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub worker: WorkerId,
    pub task: TaskId,
    pub attempt: Attempt,
    pub outcome: TaskOutcome,
}

/// What `mergefleet status` shows.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    /// `running`, `committing`, `done` or `failed: <why>`.
    pub state: String,
    pub output: String,
    pub tasks_total: u64,
    pub tasks_done: u64,
    pub tasks_running: u64,
    pub tasks_pending: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub elapsed_s: f64,
    pub workers: Vec<WorkerStatus>,
}

/// One worker in a [`StatusReport`].
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerStatus {
    pub worker: WorkerId,
    pub name: String,
    pub last_heartbeat_s_ago: f64,
    /// The first task it runs, if any.
    pub task: Option<TaskId>,
    pub tasks_done: u64,
}

/// The coordinator's side of the contract, in domain terms. Errors are gRPC statuses:
/// `failed_precondition` refuses a worker for good, `not_found` means "register again".
pub trait CoordinatorApi: Send + Sync + 'static {
    fn register(&self, hello: Hello) -> Result<Welcome, Status>;
    /// Wait up to `wait` for a task.
    fn lease(
        &self,
        worker: WorkerId,
        wait: Duration,
    ) -> impl Future<Output = Result<LeaseAnswer<OutgoingTask>, Status>> + Send;
    /// False: stop the task (its lease is gone).
    fn heartbeat(&self, beat: Heartbeat) -> bool;
    fn report(&self, report: Report) -> Result<(), Status>;
    fn status(&self) -> StatusReport;
}

/// A task encoded for the wire (opaque outside this module).
#[derive(Debug, Clone)]
pub struct OutgoingTask(pb::Task);

impl OutgoingTask {
    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        prost::Message::encoded_len(&self.0)
    }
}

fn parse_dtype(s: &str) -> Result<Dtype, WireError> {
    dtype::parse(s).ok_or_else(|| WireError(format!("unknown dtype `{s}`")))
}

fn parse_work(s: &str) -> Result<WorkDtype, WireError> {
    WorkDtype::from_name(s).ok_or_else(|| WireError(format!("unknown working dtype `{s}`")))
}

fn target_to_wire(target: &Target) -> pb::Output {
    let target = match target {
        Target::File { path } => pb::output::Target::LocalPath(path.clone()),
        Target::Parts {
            url,
            upload_id,
            first_part,
            part_size,
        } => pb::output::Target::Multipart(pb::Multipart {
            url: url.clone(),
            upload_id: upload_id.clone(),
            first_part: *first_part,
            part_size: *part_size,
        }),
    };
    pb::Output {
        target: Some(target),
    }
}

fn target_from_wire(o: Option<&pb::Output>) -> Result<Target, WireError> {
    match o.and_then(|o| o.target.as_ref()) {
        None => Err(WireError("a task without an output".into())),
        Some(pb::output::Target::LocalPath(p)) if p.is_empty() => {
            Err(WireError("an empty output path".into()))
        }
        Some(pb::output::Target::LocalPath(p)) => Ok(Target::File { path: p.clone() }),
        Some(pb::output::Target::Multipart(m)) => {
            if m.url.is_empty() || m.upload_id.is_empty() || m.part_size == 0 {
                return Err(WireError(format!(
                    "multipart output `{}` without an upload id or a part size",
                    m.url
                )));
            }
            Ok(Target::Parts {
                url: m.url.clone(),
                upload_id: m.upload_id.clone(),
                first_part: m.first_part,
                part_size: m.part_size,
            })
        }
    }
}

/// Task `id` of `plan` as sent to a worker, for its `attempt`, writing to `target`. The
/// output file's header rides with the file's first task.
pub fn task_to_wire(
    plan: &MergePlan,
    id: TaskId,
    attempt: Attempt,
    target: &Target,
) -> OutgoingTask {
    let task = &plan.tasks[id.0];
    let file = &plan.files[task.file];
    let header = (task.out.start == 0).then_some(file.header.as_slice());
    let inputs = &plan.inputs;
    let slice = |s: &InputSlice| pb::InputRange {
        url: inputs[s.file].url.clone(),
        start: s.range.start,
        end: s.range.end,
        dtype: dtype::name(s.dtype),
        scales: s.scale.as_ref().map(|sc| pb::Scales {
            url: inputs[sc.file].url.clone(),
            start: sc.range.start,
            end: sc.range.end,
            block_rows: sc.blocks.block[0] as u64,
            block_cols: sc.blocks.block[1] as u64,
        }),
        lora: s.lora.as_ref().map(|l| pb::Lora {
            url: inputs[l.file].url.clone(),
            a_start: l.a.start,
            a_end: l.a.end,
            a_dtype: dtype::name(l.a_dtype),
            b_start: l.b.start,
            b_end: l.b.end,
            b_dtype: dtype::name(l.b_dtype),
            rank: l.rank as u64,
            scaling: l.scaling,
        }),
    };
    OutgoingTask(pb::Task {
        task_id: task.id as u64,
        attempt: attempt.0,
        out_start: task.out.start,
        out_end: task.out.end,
        header: header.map(<[u8]>::to_vec).unwrap_or_default(),
        tensors: task
            .tensors
            .iter()
            .map(|j| {
                let (kernel, inputs) = match &j.op {
                    Op::Merge { kernel, inputs } => (
                        Some(pb::KernelParams {
                            work_dtype: kernel.work.name().into(),
                            out_dtype: kernel.out.name().into(),
                            reductions: kernel.reductions.name().into(),
                            method: Some(method_to_wire(&kernel.method)),
                        }),
                        inputs.iter().map(slice).collect(),
                    ),
                    Op::Copy { input } => (None, vec![slice(input)]),
                };
                pb::TensorJob {
                    name: j.name.clone(),
                    shape: j.shape.iter().map(|&d| d as u64).collect(),
                    dtype: dtype::name(j.dtype),
                    out_start: j.out.start,
                    out_end: j.out.end,
                    kernel,
                    inputs,
                    requant: j.requant.as_ref().map(|r| pb::Requant {
                        block_rows: r.blocks.block[0] as u64,
                        block_cols: r.blocks.block[1] as u64,
                        scales_start: r.scales.start,
                        scales_end: r.scales.end,
                    }),
                    realign: j.vocab.as_deref().map(realign_to_wire),
                }
            })
            .collect(),
        output: Some(target_to_wire(target)),
        file_name: file.name.clone(),
    })
}

/// A task as a worker receives it, checked.
#[derive(Debug)]
pub struct Received {
    pub task: Task,
    pub attempt: Attempt,
    /// The input files the task's slices index.
    pub inputs: Vec<InputFile>,
    /// The file header, when the task starts its file.
    pub header: Option<Vec<u8>>,
    /// The output file's name (for logs).
    pub file_name: String,
    /// Where the task's bytes go.
    pub target: Target,
}

impl Received {
    pub fn id(&self) -> TaskId {
        TaskId(self.task.id)
    }
}

/// Bytes of `shape` elements of `dtype`, if the dtype has whole-byte elements and the
/// product does not overflow.
fn byte_len(shape: &[usize], d: Dtype) -> Option<u64> {
    shape
        .iter()
        .try_fold(dtype::size(d)? as u64, |n, &x| n.checked_mul(x as u64))
}

/// A wire task back as a plan task, with the input files its slices index. Everything the
/// executor relies on is checked here (sizes agree with shapes and dtypes, ranges lie in the
/// task's range, a merge has a base and two fine-tunes), so a malformed message from a
/// buggy or foreign peer is an error naming the tensor, not a panic later.
pub fn task_from_wire(t: &pb::Task) -> Result<Received, WireError> {
    let task_range = t.out_start..t.out_end;
    if task_range.end < task_range.start {
        return Err(WireError(format!(
            "task {}: output range {}..{}",
            t.task_id, t.out_start, t.out_end
        )));
    }
    let header = (!t.header.is_empty()).then(|| t.header.clone());
    if let Some(h) = &header {
        if t.out_start != 0 || h.len() as u64 > t.out_end {
            return Err(WireError(format!(
                "task {}: a {}-byte header for a range starting at {}",
                t.task_id,
                h.len(),
                t.out_start
            )));
        }
    }
    let mut files: Vec<InputFile> = Vec::new();
    let mut tensors = Vec::with_capacity(t.tensors.len());
    // The tensors must tile the task after its header, in order, with no gap or overlap:
    // the executor writes them back to back.
    let mut pos = t.out_start + header.as_ref().map_or(0, |h| h.len() as u64);
    for j in &t.tensors {
        let job = tensor_from_wire(j, &task_range, &mut files)?;
        if job.out.start != pos {
            return Err(WireError(format!(
                "tensor `{}` starts at {} where {pos} was expected: the tensors do not tile the task",
                job.name, job.out.start
            )));
        }
        pos = job.written().end;
        tensors.push(job);
    }
    if pos != t.out_end {
        return Err(WireError(format!(
            "task {}: its tensors end at {pos}, the task at {}",
            t.task_id, t.out_end
        )));
    }
    let task = Task {
        id: usize::try_from(t.task_id).map_err(|_| WireError(format!("task id {}", t.task_id)))?,
        file: 0,
        out: task_range,
        tensors,
    };
    Ok(Received {
        task,
        attempt: Attempt(t.attempt),
        inputs: files,
        header,
        file_name: t.file_name.clone(),
        target: target_from_wire(t.output.as_ref())?,
    })
}

fn tensor_from_wire(
    j: &pb::TensorJob,
    task_range: &std::ops::Range<u64>,
    files: &mut Vec<InputFile>,
) -> Result<TensorJob, WireError> {
    let bad = |m: String| WireError(format!("tensor `{}`: {m}", j.name));
    let shape: Vec<usize> = j
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| bad(format!("dimension {d}"))))
        .collect::<Result<_, _>>()?;
    let dtype = parse_dtype(&j.dtype).map_err(|e| bad(e.0))?;
    let out = j.out_start..j.out_end;
    if out.end < out.start || out.start < task_range.start || out.end > task_range.end {
        return Err(bad(format!(
            "output range {}..{} outside the task's {}..{}",
            out.start, out.end, task_range.start, task_range.end
        )));
    }
    if byte_len(&shape, dtype) != Some(out.end - out.start) {
        return Err(bad(format!(
            "{} output bytes for shape {shape:?} of {}",
            out.end - out.start,
            j.dtype
        )));
    }
    let mut slices = Vec::with_capacity(j.inputs.len());
    let cols: u64 = shape.iter().skip(1).map(|&d| d as u64).product();
    for r in &j.inputs {
        let input_dtype = parse_dtype(&r.dtype).map_err(|e| bad(e.0))?;
        if j.realign.is_some() {
            // A realigned input holds whole rows of its own count.
            let row = cols * dtype::size(input_dtype).unwrap_or(0) as u64;
            if r.scales.is_some() || r.end < r.start || row == 0 || (r.end - r.start) % row != 0 {
                return Err(bad(format!(
                    "realigned input range {}..{} of {} is not whole rows of {cols} {} elements",
                    r.start, r.end, r.url, r.dtype
                )));
            }
            slices.push(InputSlice {
                file: file_index(files, &r.url),
                range: r.start..r.end,
                dtype: input_dtype,
                scale: None,
                lora: None,
            });
            continue;
        }
        let scale = match &r.scales {
            None => None,
            Some(sc) => Some(scales_from_wire(sc, &shape, input_dtype, files).map_err(bad)?),
        };
        if r.end < r.start || byte_len(&shape, input_dtype) != Some(r.end - r.start) {
            return Err(bad(format!(
                "input range {}..{} of {} does not hold shape {shape:?} of {}",
                r.start, r.end, r.url, r.dtype
            )));
        }
        let lora = match &r.lora {
            None => None,
            Some(l) => Some(lora_from_wire(l, &shape, input_dtype, files).map_err(bad)?),
        };
        slices.push(InputSlice {
            file: file_index(files, &r.url),
            range: r.start..r.end,
            dtype: input_dtype,
            scale,
            lora,
        });
    }
    let op = match &j.kernel {
        Some(k) => {
            let kernel = Kernel {
                method: method_from_wire(k.method.as_ref(), slices.len()).map_err(bad)?,
                work: parse_work(&k.work_dtype).map_err(|e| bad(e.0))?,
                out: parse_work(&k.out_dtype).map_err(|e| bad(e.0))?,
                reductions: Reductions::from_name(&k.reductions)
                    .ok_or_else(|| bad(format!("unknown reduction order `{}`", k.reductions)))?,
            };
            let written = if j.requant.is_some() {
                Dtype::F8_E4M3
            } else {
                kernel.out.st_dtype()
            };
            if written != dtype || slices.iter().any(|s| !dtype::is_float(s.value_dtype())) {
                return Err(bad(format!(
                    "a merge into {} of inputs that are not all floats, or written as {}",
                    kernel.out.name(),
                    j.dtype
                )));
            }
            Op::Merge {
                kernel,
                inputs: slices,
            }
        }
        None => match <[InputSlice; 1]>::try_from(slices) {
            Ok([input])
                if input.dtype == dtype && input.scale.is_none() && input.lora.is_none() =>
            {
                Op::Copy { input }
            }
            _ => return Err(bad("a copy needs exactly one input of its own dtype".into())),
        },
    };
    let requant = match &j.requant {
        None => None,
        Some(r) => Some(requant_from_wire(r, &shape, dtype, &out, task_range, &op).map_err(bad)?),
    };
    let vocab = match &j.realign {
        None => None,
        Some(r) => {
            if requant.is_some() || matches!(op, Op::Copy { .. }) {
                return Err(bad(
                    "a realigned tensor is merged, not copied or requantized".into(),
                ));
            }
            let rows: Vec<usize> = slices_of(&op)
                .iter()
                .map(|s| (s.len() / (cols * dtype::size(s.dtype).unwrap_or(1) as u64)) as usize)
                .collect();
            Some(Arc::new(realign_from_wire(r, &shape, &rows).map_err(bad)?))
        }
    };
    Ok(TensorJob {
        name: j.name.clone(),
        shape,
        dtype,
        out,
        op,
        requant,
        vocab,
    })
}

fn slices_of(op: &Op) -> Vec<&InputSlice> {
    match op {
        Op::Merge { inputs, .. } => inputs.iter().collect(),
        Op::Copy { input } => vec![input],
    }
}

fn realign_to_wire(v: &VocabTensor) -> pb::Realign {
    let triple = |run: &Run| {
        let (source, start) = match run.from {
            RowFrom::Zero => (0, 0),
            RowFrom::Average(a) => (1, a),
            RowFrom::Rows { input, row } => (input + 2, row),
        };
        [run.len, source, start]
    };
    pb::Realign {
        rows: v.rows as u64,
        padded: v.padded as u64,
        dtype: dtype::name(v.dtype),
        inputs: v
            .inputs
            .iter()
            .map(|m| pb::RowRuns {
                triples: m.runs.iter().flat_map(triple).collect(),
            })
            .collect(),
        averages: v
            .averages
            .iter()
            .map(|pairs| pb::MeanRow {
                pairs: pairs.iter().flat_map(|&(k, r)| [k, r]).collect(),
            })
            .collect(),
    }
}

/// A realignment as received, checked: runs cover the rows in order, every source row
/// exists (`rows[k]`: input k's row count), the output shape has `padded` rows.
fn realign_from_wire(
    r: &pb::Realign,
    shape: &[usize],
    rows: &[usize],
) -> Result<VocabTensor, String> {
    let (n, padded) = (r.rows as usize, r.padded as usize);
    if shape.first() != Some(&padded) || n > padded || r.inputs.len() != rows.len() {
        return Err(format!(
            "realignment of {n} rows padded to {padded} for {} inputs does not fit shape {shape:?} and {} inputs",
            r.inputs.len(),
            rows.len()
        ));
    }
    let g = parse_dtype(&r.dtype).map_err(|e| e.0)?;
    if !dtype::is_float(g) {
        return Err(format!("realigned rows gathered as {}", r.dtype));
    }
    let row_ok = |k: u32, row: u64| (k as usize) < rows.len() && row < rows[k as usize] as u64;
    let averages = r
        .averages
        .iter()
        .map(|a| {
            if a.pairs.is_empty() || a.pairs.len() % 2 != 0 {
                return Err("a mean row of no rows".to_string());
            }
            a.pairs
                .chunks(2)
                .map(|p| {
                    if row_ok(p[0], p[1] as u64) {
                        Ok((p[0], p[1]))
                    } else {
                        Err(format!("mean row reads row {} of input {}", p[1], p[0]))
                    }
                })
                .collect()
        })
        .collect::<Result<Vec<Vec<(u32, u32)>>, String>>()?;
    let mut inputs = Vec::with_capacity(r.inputs.len());
    for m in &r.inputs {
        if m.triples.len() % 3 != 0 {
            return Err("runs are triples".into());
        }
        let mut runs = Vec::new();
        let mut out = 0u64;
        for t in m.triples.chunks(3) {
            let (len, source, start) = (t[0], t[1], t[2]);
            let end = start as u64 + len as u64;
            let from = match source {
                0 => RowFrom::Zero,
                1 if end <= averages.len() as u64 => RowFrom::Average(start),
                k if k >= 2 && len > 0 && row_ok(k - 2, end - 1) => RowFrom::Rows {
                    input: k - 2,
                    row: start,
                },
                _ => {
                    return Err(format!(
                        "run of {len} rows from source {source} at {start} reads past its rows"
                    ))
                }
            };
            runs.push(Run {
                out: out as u32,
                len,
                from,
            });
            out += len as u64;
        }
        if out != n as u64 {
            return Err(format!("runs cover {out} rows, not {n}"));
        }
        inputs.push(RowMap { runs });
    }
    Ok(VocabTensor {
        rows: n,
        padded,
        inputs,
        averages,
        dtype: g,
    })
}

/// The index of the input file `url` in `files`, added when new.
fn file_index(files: &mut Vec<InputFile>, url: &str) -> usize {
    match files.iter().position(|f| f.url == url) {
        Some(i) => i,
        None => {
            files.push(InputFile {
                model: 0,
                url: url.to_string(),
            });
            files.len() - 1
        }
    }
}

/// How a merged tensor is written as FP8, checked: an F8_E4M3 matrix from a merge, its
/// scales right after it and inside the task.
fn requant_from_wire(
    r: &pb::Requant,
    shape: &[usize],
    dtype: Dtype,
    out: &std::ops::Range<u64>,
    task_range: &std::ops::Range<u64>,
    op: &Op,
) -> Result<Requant, String> {
    let &[rows, cols] = shape else {
        return Err(format!(
            "requantized shape {shape:?}: FP8 weights are matrices"
        ));
    };
    let blocks = Blocks {
        rows,
        cols,
        block: [r.block_rows as usize, r.block_cols as usize],
    };
    let scales = r.scales_start..r.scales_end;
    let out16or32 = matches!(op, Op::Merge { kernel, .. } if kernel.out != WorkDtype::F64);
    if dtype != Dtype::F8_E4M3
        || !out16or32
        || blocks.block.iter().any(|&b| b == 0 || b > MAX_BLOCK)
        || rows == 0
        || cols == 0
        || scales.start != out.end
        || scales.end < scales.start
        || scales.end - scales.start != blocks.scale_bytes()
        || scales.end > task_range.end
    {
        return Err(format!(
            "requantized scales {}..{} with {:?} blocks do not follow a {rows}x{cols} FP8 merge ending at {}",
            scales.start, scales.end, blocks.block, out.end
        ));
    }
    Ok(Requant { blocks, scales })
}

/// A LoRA input's factors, checked to make an update of the weight's shape.
fn lora_from_wire(
    l: &pb::Lora,
    shape: &[usize],
    weight: Dtype,
    files: &mut Vec<InputFile>,
) -> Result<LoraSlice, String> {
    let &[rows, cols] = shape else {
        return Err(format!(
            "LoRA factors for shape {shape:?}: LoRA adapts matrices"
        ));
    };
    let a_dtype = parse_dtype(&l.a_dtype).map_err(|e| e.0)?;
    let b_dtype = parse_dtype(&l.b_dtype).map_err(|e| e.0)?;
    let rank = l.rank as usize;
    let (fan_out, fan_in) = (rows, cols);
    let fits = |start: u64, end: u64, n: [usize; 2], d: Dtype| {
        end >= start && byte_len(&n, d) == Some(end - start)
    };
    let float = |d: Dtype| matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32);
    if rank == 0
        || !float(a_dtype)
        || !float(b_dtype)
        || !float(weight)
        || !fits(l.a_start, l.a_end, [rank, fan_in], a_dtype)
        || !fits(l.b_start, l.b_end, [fan_out, rank], b_dtype)
        || !l.scaling.is_finite()
    {
        return Err(format!(
            "LoRA factors A {}..{} ({}), B {}..{} ({}) of rank {rank} do not fit a {rows}x{cols} {weight:?} weight",
            l.a_start, l.a_end, l.a_dtype, l.b_start, l.b_end, l.b_dtype
        ));
    }
    Ok(LoraSlice {
        file: file_index(files, &l.url),
        a: l.a_start..l.a_end,
        a_dtype,
        b: l.b_start..l.b_end,
        b_dtype,
        rank,
        scaling: l.scaling,
    })
}

/// An FP8 input's scales, checked against the weight they scale.
fn scales_from_wire(
    sc: &pb::Scales,
    shape: &[usize],
    input_dtype: Dtype,
    files: &mut Vec<InputFile>,
) -> Result<ScaleSlice, String> {
    let &[rows, cols] = shape else {
        return Err(format!(
            "scales for shape {shape:?}: FP8 weights are matrices"
        ));
    };
    let block = [sc.block_rows as usize, sc.block_cols as usize];
    let blocks = Blocks { rows, cols, block };
    if input_dtype != Dtype::F8_E4M3
        || block.iter().any(|&b| b == 0 || b > MAX_BLOCK)
        || rows == 0
        || cols == 0
        || sc.end < sc.start
        || sc.end - sc.start != blocks.scale_bytes()
    {
        return Err(format!(
            "scales {}..{} of {} with {block:?} blocks do not fit a {rows}x{cols} {} weight",
            sc.start,
            sc.end,
            sc.url,
            dtype::name(input_dtype)
        ));
    }
    Ok(ScaleSlice {
        file: file_index(files, &sc.url),
        range: sc.start..sc.end,
        blocks,
    })
}

/// A kernel's method as the proto carries it.
fn method_to_wire(m: &Method) -> pb::kernel_params::Method {
    use pb::kernel_params::Method as W;
    match m {
        Method::ModelStock { filter_wise } => W::ModelStock(pb::ModelStock {
            filter_wise: *filter_wise,
        }),
        Method::Linear { weights, normalize } => W::Linear(pb::Linear {
            weights: weights.clone(),
            normalize: *normalize,
        }),
        Method::TaskArithmetic {
            weights,
            normalize,
            lambda,
        } => W::TaskArithmetic(pb::TaskArithmetic {
            weights: weights.clone(),
            normalize: *normalize,
            lambda: *lambda,
        }),
        Method::Gta(g) => W::Gta(pb::Gta {
            family: g.family.name().into(),
            weights: g.weights.clone(),
            densities: g.densities.clone(),
            extra: g.extra.clone(),
            normalize: g.normalize,
            rescale: g.rescale,
            lambda: g.lambda,
            seed: g.seed,
            offset: g.offset,
        }),
        Method::Nearswap { t } => W::Nearswap(pb::Nearswap { t: *t }),
        Method::Ram { epsilon } => W::Ram(pb::Ram { epsilon: *epsilon }),
        Method::RamplusTl { r, alpha, epsilon } => W::RamplusTl(pb::RamplusTl {
            r: *r,
            alpha: *alpha,
            epsilon: *epsilon,
        }),
        Method::Sce { select_topk } => W::Sce(pb::Sce {
            select_topk: *select_topk,
        }),
        Method::Slerp { t } => W::Slerp(pb::Slerp { t: *t }),
        Method::ArceeFusion { seed, offset } => W::ArceeFusion(pb::ArceeFusion {
            seed: *seed,
            offset: *offset,
        }),
        Method::Karcher { max_iter, tol } => W::Karcher(pb::Karcher {
            max_iter: *max_iter as u64,
            tol: *tol,
        }),
        Method::Multislerp(m) => W::Multislerp(pb::Multislerp {
            weights: m.weights.clone(),
            normalize: m.normalize,
            eps: m.eps,
        }),
        Method::Nuslerp(n) => W::Nuslerp(pb::Nuslerp {
            t: n.t,
            flatten: n.flatten,
            row_wise: n.row_wise,
        }),
        Method::Passthrough { scale } => W::Passthrough(pb::Passthrough { scale: *scale }),
    }
}

/// A method from the wire, checked against the tensor's `inputs`: each method's arity, one
/// value per input for per-input parameters.
fn method_from_wire(
    m: Option<&pb::kernel_params::Method>,
    inputs: usize,
) -> Result<Method, String> {
    use pb::kernel_params::Method as W;
    let per_input = |name: &str, v: &[f64]| {
        if v.len() == inputs {
            Ok(v.to_vec())
        } else {
            Err(format!("{} {name} values for {inputs} inputs", v.len()))
        }
    };
    let at_least = |n: usize, what: &str| {
        if inputs >= n {
            Ok(())
        } else {
            Err(format!("{what}, got {inputs} inputs"))
        }
    };
    match m {
        None => Err("a merge without a method (a coordinator of another version?)".into()),
        Some(W::ModelStock(p)) => {
            at_least(3, "model_stock needs a base and two fine-tunes")?;
            Ok(Method::ModelStock {
                filter_wise: p.filter_wise,
            })
        }
        Some(W::Linear(p)) => {
            at_least(1, "linear needs an input")?;
            Ok(Method::Linear {
                weights: per_input("weight", &p.weights)?,
                normalize: p.normalize,
            })
        }
        Some(W::TaskArithmetic(p)) => {
            at_least(2, "task_arithmetic needs a base and another model")?;
            Ok(Method::TaskArithmetic {
                weights: per_input("weight", &p.weights)?,
                normalize: p.normalize,
                lambda: p.lambda,
            })
        }
        Some(W::Gta(p)) => {
            let family = Family::ALL
                .iter()
                .copied()
                .find(|f| f.name() == p.family)
                .ok_or_else(|| format!("unknown method `{}`", p.family))?;
            at_least(2, "a task-arithmetic method needs a base and another model")?;
            let densities = per_input("density", &p.densities)?;
            if densities[1..].iter().any(|d| !(*d > 0.0 && *d <= 1.0)) {
                return Err("a density outside (0, 1]".into());
            }
            let extra = match family.extra() {
                Some(name) => per_input(name, &p.extra)?,
                None => Vec::new(),
            };
            Ok(Method::Gta(Gta {
                family,
                weights: per_input("weight", &p.weights)?,
                densities,
                extra,
                normalize: p.normalize,
                rescale: p.rescale,
                lambda: p.lambda,
                seed: p.seed,
                offset: p.offset,
            }))
        }
        Some(W::Nearswap(p)) => {
            if inputs != 2 {
                return Err(format!(
                    "nearswap takes a base and one model, got {inputs} inputs"
                ));
            }
            Ok(Method::Nearswap { t: p.t })
        }
        Some(W::Slerp(p)) => {
            if inputs != 2 {
                return Err(format!(
                    "slerp takes a base and one model, got {inputs} inputs"
                ));
            }
            Ok(Method::Slerp { t: p.t })
        }
        Some(W::ArceeFusion(p)) => {
            if inputs != 2 {
                return Err(format!(
                    "arcee_fusion takes a base and one model, got {inputs} inputs"
                ));
            }
            Ok(Method::ArceeFusion {
                seed: p.seed,
                offset: p.offset,
            })
        }
        Some(W::Karcher(p)) => {
            at_least(1, "karcher needs an input")?;
            Ok(Method::Karcher {
                max_iter: usize::try_from(p.max_iter)
                    .map_err(|_| "karcher's max_iter".to_string())?,
                tol: p.tol,
            })
        }
        Some(W::Multislerp(p)) => {
            let n = p.weights.len();
            if n == 0 || !(n..=n + 1).contains(&inputs) {
                return Err(format!(
                    "multislerp: {n} weights for {inputs} inputs (one per model besides an optional base)"
                ));
            }
            Ok(Method::Multislerp(crate::merge::Multislerp {
                weights: p.weights.clone(),
                normalize: p.normalize,
                eps: p.eps,
            }))
        }
        Some(W::Nuslerp(p)) => {
            if !(2..=3).contains(&inputs) {
                return Err(format!(
                    "nuslerp takes two models and an optional base, got {inputs} inputs"
                ));
            }
            Ok(Method::Nuslerp(crate::merge::Nuslerp {
                t: p.t,
                flatten: p.flatten,
                row_wise: p.row_wise,
            }))
        }
        Some(W::Passthrough(p)) => {
            if inputs != 1 {
                return Err(format!("passthrough takes one input, got {inputs}"));
            }
            Ok(Method::Passthrough { scale: p.scale })
        }
        Some(W::Ram(p)) => {
            at_least(2, "ram needs a base and another model")?;
            Ok(Method::Ram { epsilon: p.epsilon })
        }
        Some(W::RamplusTl(p)) => {
            at_least(2, "ramplus_tl needs a base and another model")?;
            Ok(Method::RamplusTl {
                r: p.r,
                alpha: p.alpha,
                epsilon: p.epsilon,
            })
        }
        Some(W::Sce(p)) => {
            at_least(2, "sce needs a base and another model")?;
            Ok(Method::Sce {
                select_topk: p.select_topk,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MergeConfig;
    use crate::plan::{plan, PlanOptions};
    use crate::source::{ModelSource, SourceFile, TensorLoc};
    use crate::store::Stores;

    #[test]
    fn round_trip_keeps_the_task() {
        let stores = Stores::new();
        let model = |name: &str| {
            let location = stores.resolve(&format!("/m/{name}")).unwrap();
            let mut tensors = std::collections::BTreeMap::new();
            tensors.insert(
                "a".into(),
                TensorLoc {
                    file: 0,
                    dtype: Dtype::BF16,
                    shape: vec![2, 3],
                    start: 8,
                    end: 20,
                },
            );
            tensors.insert(
                "ids".into(),
                TensorLoc {
                    file: 0,
                    dtype: Dtype::I64,
                    shape: vec![2],
                    start: 20,
                    end: 36,
                },
            );
            ModelSource {
                reference: name.into(),
                files: vec![SourceFile {
                    path: location.child("model.safetensors"),
                    url: location.child_display("model.safetensors"),
                    size: 36,
                }],
                location,
                tensors,
                fp8_block: None,
                adapter: None,
            }
        };
        let cfg = MergeConfig::from_yaml(
            "models:\n  - model: a\n  - model: b\nmerge_method: model_stock\nbase_model: base\n",
        )
        .unwrap();
        let p = plan(
            &cfg,
            &[model("base"), model("a"), model("b")],
            PlanOptions::default(),
        )
        .unwrap();
        let t = &p.tasks[0];
        let target = Target::Parts {
            url: "s3://b/out/model.safetensors".into(),
            upload_id: "up-1".into(),
            first_part: 0,
            part_size: 5 << 20,
        };
        let w = task_to_wire(&p, TaskId(0), Attempt(3), &target).0;
        assert_eq!(w.file_name, p.files[0].name);
        let Received {
            task: back,
            inputs: files,
            header,
            attempt,
            target: back_target,
            ..
        } = task_from_wire(&w).unwrap();
        assert_eq!((attempt, back_target), (Attempt(3), target));
        assert_eq!(header.as_deref(), Some(&p.files[0].header[..]));
        assert_eq!(back.out, t.out);
        assert_eq!(back.tensors.len(), t.tensors.len());
        for (a, b) in back.tensors.iter().zip(&t.tensors) {
            assert_eq!(
                (&a.name, &a.shape, a.dtype, &a.out),
                (&b.name, &b.shape, b.dtype, &b.out)
            );
            match (&a.op, &b.op) {
                (
                    Op::Merge {
                        kernel: ka,
                        inputs: ia,
                    },
                    Op::Merge {
                        kernel: kb,
                        inputs: ib,
                    },
                ) => {
                    assert_eq!(ka, kb);
                    for (x, y) in ia.iter().zip(ib) {
                        assert_eq!(files[x.file].url, p.inputs[y.file].url);
                        assert_eq!((&x.range, x.dtype), (&y.range, y.dtype));
                    }
                }
                (Op::Copy { input: x }, Op::Copy { input: y }) => {
                    assert_eq!(files[x.file].url, p.inputs[y.file].url)
                }
                _ => panic!("op changed"),
            }
        }
        malformed_tasks_are_refused(&w);
    }

    #[test]
    fn a_150k_vocabulary_travels_as_runs_well_under_a_mebibyte() {
        use crate::vocab::Vocabulary;
        // A Qwen-sized vocabulary: the base's 151,646 tokens, a fine-tune that added 20,
        // one that lacks 500 scattered tokens (its rows shifted), merged into a union.
        let (n, added, missing) = (151_646usize, 20usize, 500usize);
        let stores = Stores::new();
        let hidden = 64usize;
        let model = |name: &str, rows: usize| {
            let location = stores.resolve(&format!("/m/{name}")).unwrap();
            let mut tensors = std::collections::BTreeMap::new();
            let bytes = (rows * hidden * 2) as u64;
            for (i, t) in ["lm_head.weight", "model.embed_tokens.weight"]
                .iter()
                .enumerate()
            {
                tensors.insert(
                    t.to_string(),
                    TensorLoc {
                        file: 0,
                        dtype: Dtype::BF16,
                        shape: vec![rows, hidden],
                        start: 8 + i as u64 * bytes,
                        end: 8 + (i as u64 + 1) * bytes,
                    },
                );
            }
            ModelSource {
                reference: name.into(),
                files: vec![SourceFile {
                    path: location.child("model.safetensors"),
                    url: location.child_display("model.safetensors"),
                    size: 8 + 2 * bytes,
                }],
                location,
                tensors,
                fp8_block: None,
                adapter: None,
            }
        };
        let tokens: Vec<String> = (0..n + added).map(|i| format!("t{i}")).collect();
        let gone = |i: usize| i % (n / missing) == 7;
        let mut shifted = 0u32;
        let lacking: Vec<Option<u32>> = (0..n + added)
            .map(|i| {
                if i >= n || gone(i) {
                    None
                } else {
                    shifted += 1;
                    Some(shifted - 1)
                }
            })
            .collect();
        let lacking_rows = shifted as usize;
        let cfg = MergeConfig::from_yaml(
            "models:\n  - model: a\n  - model: b\nmerge_method: task_arithmetic\nparameters: {weight: 0.5}\nbase_model: base\ntokenizer_source: union\n",
        )
        .unwrap();
        let vocab = Vocabulary {
            tokenizer: tokenizers::Tokenizer::from_bytes(
                crate::vocab::build::tests::tokenizer_json(&["a"], &[], &[]).as_bytes(),
            )
            .unwrap(),
            maps: vec![
                (0..n + added)
                    .map(|i| (i < n).then_some(i as u32))
                    .collect(),
                (0..n + added).map(|i| Some(i as u32)).collect(),
                lacking,
            ],
            tokens,
            padded: n + added,
            own: vec![Default::default(); 3],
            base: 0,
            spec: cfg.tokenizer.clone().unwrap(),
            warnings: vec![],
        };
        let models = [
            model("base", n),
            model("a", n + added),
            model("b", lacking_rows),
        ];
        let p = crate::plan::plan_with_vocab(&cfg, &models, Some(&vocab), PlanOptions::default())
            .unwrap();
        let target = Target::Parts {
            url: "s3://b/out/model.safetensors".into(),
            upload_id: "up-1".into(),
            first_part: 0,
            part_size: 5 << 20,
        };
        let mut realigned = 0;
        for t in &p.tasks {
            let w = task_to_wire(&p, TaskId(t.id), Attempt(0), &target).0;
            let len = prost::Message::encoded_len(&w);
            assert!(len < 1 << 20, "task {} is {len} bytes", t.id);
            eprintln!("task {} ({} tensors): {len} bytes", t.id, t.tensors.len());
            let back = task_from_wire(&w).unwrap().task;
            for (a, b) in back.tensors.iter().zip(&t.tensors) {
                assert_eq!(a.vocab, b.vocab, "{}", a.name);
                assert_eq!(a.shape, [n + added, hidden]);
                realigned += usize::from(a.vocab.is_some());
            }
        }
        assert_eq!(realigned, 2);
    }

    #[test]
    fn fp8_scales_travel_and_are_checked() {
        let stores = Stores::new();
        // A 4 x 6 FP8 weight with 2 x 4 blocks: scales 2 x 2, in the model's second file.
        let model = |name: &str| {
            let location = stores.resolve(&format!("/m/{name}")).unwrap();
            let mut tensors = std::collections::BTreeMap::new();
            let loc = |file, dtype, shape: Vec<usize>, start, end| TensorLoc {
                file,
                dtype,
                shape,
                start,
                end,
            };
            tensors.insert("w".into(), loc(0, Dtype::F8_E4M3, vec![4, 6], 8, 32));
            tensors.insert("w_scale_inv".into(), loc(1, Dtype::F32, vec![2, 2], 8, 24));
            let file = |n: &str, size| SourceFile {
                path: location.child(n),
                url: location.child_display(n),
                size,
            };
            ModelSource {
                reference: name.into(),
                files: vec![file("a.safetensors", 32), file("b.safetensors", 24)],
                location,
                tensors,
                fp8_block: Some([2, 4]),
                adapter: None,
            }
        };
        let cfg = MergeConfig::from_yaml(
            "models:\n  - model: a\n  - model: b\nmerge_method: model_stock\nbase_model: base\n",
        )
        .unwrap();
        let p = plan(
            &cfg,
            &[model("base"), model("a"), model("b")],
            PlanOptions::default(),
        )
        .unwrap();
        assert_eq!(p.tensor_count(), 1, "the scales are not an output tensor");
        let target = Target::File {
            path: "/o/x".into(),
        };
        let w = task_to_wire(&p, TaskId(0), Attempt(1), &target).0;
        let back = task_from_wire(&w).unwrap();
        let Op::Merge { inputs, .. } = &back.task.tensors[0].op else {
            panic!("not a merge")
        };
        for s in inputs {
            let sc = s.scale.as_ref().expect("scales");
            assert_eq!((sc.range.clone(), sc.blocks.block), (8..24, [2, 4]));
            assert!(back.inputs[sc.file].url.ends_with("b.safetensors"));
            assert!(back.inputs[s.file].url.ends_with("a.safetensors"));
        }
        let mut bad = w.clone();
        bad.tensors[0].inputs[1].scales.as_mut().unwrap().end -= 4;
        assert!(task_from_wire(&bad)
            .unwrap_err()
            .to_string()
            .contains("do not fit"));
        let mut bad = w.clone();
        bad.tensors[0].inputs[1].scales.as_mut().unwrap().block_rows = 0;
        assert!(task_from_wire(&bad)
            .unwrap_err()
            .to_string()
            .contains("do not fit"));
    }

    #[test]
    fn every_method_travels_and_is_checked() {
        let gta = |family| {
            Method::Gta(Gta {
                family,
                weights: vec![0.0, 0.5, 0.25],
                densities: vec![0.0, 0.5, 1.0],
                extra: match family {
                    Family::Breadcrumbs | Family::Della => vec![0.0, 0.01, 0.02],
                    _ => Vec::new(),
                },
                normalize: true,
                rescale: false,
                lambda: 0.9,
                seed: 7,
                offset: 123_456_789_012,
            })
        };
        let methods = [
            Method::ModelStock { filter_wise: true },
            Method::Linear {
                weights: vec![0.3, 0.2, 0.5],
                normalize: false,
            },
            Method::TaskArithmetic {
                weights: vec![0.0, 1.0, -0.5],
                normalize: true,
                lambda: 1.5,
            },
            gta(Family::Ties),
            gta(Family::Breadcrumbs),
            gta(Family::Della),
            Method::Ram { epsilon: 1e-5 },
            Method::RamplusTl {
                r: 0.1,
                alpha: 0.2,
                epsilon: 1e-4,
            },
            Method::Sce { select_topk: 0.3 },
        ];
        for m in &methods {
            let w = method_to_wire(m);
            assert_eq!(&method_from_wire(Some(&w), 3).unwrap(), m);
        }
        let w = method_to_wire(&Method::Nearswap { t: 0.001 });
        assert_eq!(
            method_from_wire(Some(&w), 2).unwrap(),
            Method::Nearswap { t: 0.001 }
        );
        // Values per input that do not fit the inputs, arities, unknown members.
        let refused = |w: pb::kernel_params::Method, inputs: usize, words: &str| {
            let e = method_from_wire(Some(&w), inputs).unwrap_err();
            assert!(e.contains(words), "{e}");
        };
        refused(
            method_to_wire(&methods[1]),
            2,
            "3 weight values for 2 inputs",
        );
        refused(method_to_wire(&methods[0]), 2, "model_stock needs");
        refused(method_to_wire(&Method::Nearswap { t: 0.1 }), 3, "nearswap");
        let mut bad = pb::kernel_params::Method::Gta(pb::Gta {
            family: "tie".into(),
            ..Default::default()
        });
        refused(bad.clone(), 3, "unknown method `tie`");
        if let pb::kernel_params::Method::Gta(g) = &mut bad {
            g.family = "ties".into();
            g.weights = vec![0.0, 1.0, 1.0];
            g.densities = vec![0.0, 0.5, 1.5];
        }
        refused(bad, 3, "density");
        assert!(method_from_wire(None, 3)
            .unwrap_err()
            .contains("without a method"));
    }

    /// Each way of breaking a valid wire task is an error naming what is wrong.
    fn malformed_tasks_are_refused(good: &pb::Task) {
        type Break = fn(&mut pb::Task);
        let merged = good
            .tensors
            .iter()
            .position(|j| j.kernel.is_some())
            .expect("a merged tensor");
        let copied = good
            .tensors
            .iter()
            .position(|j| j.kernel.is_none())
            .expect("a copied tensor");
        let cases: Vec<(&str, Break, &str)> = vec![
            ("unknown dtype", |t| t.tensors[0].dtype = "Q9".into(), "Q9"),
            ("no output", |t| t.output = None, "without an output"),
            (
                "empty local path",
                |t| {
                    t.output = Some(pb::Output {
                        target: Some(pb::output::Target::LocalPath(String::new())),
                    })
                },
                "empty output path",
            ),
            (
                "multipart without an upload id",
                |t| {
                    if let Some(pb::output::Target::Multipart(m)) =
                        t.output.as_mut().and_then(|o| o.target.as_mut())
                    {
                        m.upload_id.clear();
                    }
                },
                "upload id",
            ),
            (
                "task range backwards",
                |t| std::mem::swap(&mut t.out_start, &mut t.out_end),
                "output range",
            ),
            (
                "header not at the start",
                |t| {
                    t.out_start += 8;
                    t.tensors.clear();
                },
                "header",
            ),
            (
                "tensor outside the task",
                |t| {
                    let j = &mut t.tensors[0];
                    j.out_start += t.out_end;
                    j.out_end += t.out_end;
                },
                "outside the task",
            ),
            (
                "shape disagrees with bytes",
                |t| t.tensors[0].shape.push(2),
                "output bytes for shape",
            ),
            (
                "input range too short",
                |t| t.tensors[0].inputs[0].end -= 1,
                "does not hold shape",
            ),
            (
                "input range backwards",
                |t| {
                    let r = &mut t.tensors[0].inputs[0];
                    std::mem::swap(&mut r.start, &mut r.end);
                },
                "input range",
            ),
            (
                "tensors out of order",
                |t| t.tensors.swap(0, 1),
                "do not tile",
            ),
            (
                "a gap after the last tensor",
                |t| t.out_end += 8,
                "tensors end at",
            ),
            (
                "huge dimension",
                |t| t.tensors[0].shape = vec![u64::MAX / 2, 4],
                "shape",
            ),
        ];
        for (what, f, words) in cases {
            let mut bad = good.clone();
            f(&mut bad);
            let err = task_from_wire(&bad).expect_err(what).to_string();
            assert!(err.contains(words), "{what}: {err}");
        }
        // A merge with one fine-tune, a merge written in another dtype, a copy with two
        // inputs or of another dtype.
        let mut bad = good.clone();
        bad.tensors[merged].inputs.truncate(2);
        assert!(task_from_wire(&bad)
            .unwrap_err()
            .to_string()
            .contains("two fine-tunes"));
        let mut bad = good.clone();
        bad.tensors[merged].kernel.as_mut().unwrap().out_dtype = "float16".into();
        assert!(task_from_wire(&bad)
            .unwrap_err()
            .to_string()
            .contains("written as"));
        let mut bad = good.clone();
        bad.tensors[merged].kernel.as_mut().unwrap().reductions = "fast".into();
        assert!(task_from_wire(&bad)
            .unwrap_err()
            .to_string()
            .contains("fast"));
        let mut bad = good.clone();
        let extra = bad.tensors[copied].inputs[0].clone();
        bad.tensors[copied].inputs.push(extra);
        assert!(task_from_wire(&bad)
            .unwrap_err()
            .to_string()
            .contains("exactly one input"));
        let mut bad = good.clone();
        bad.tensors[copied].inputs.clear();
        assert!(task_from_wire(&bad)
            .unwrap_err()
            .to_string()
            .contains("exactly one input"));
        // The good task still decodes (the cases above broke copies).
        assert!(task_from_wire(good).is_ok());
    }
}
