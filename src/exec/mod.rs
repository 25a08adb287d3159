//! Running tasks: fetch input ranges, run the kernel, hand output chunks to a writer.
//!
//! Used by both modes. [`run_task`] executes one self-contained [`Task`] within a memory
//! budget: when the task's inputs and output fit, it fetches everything at once and merges
//! its tensors in parallel; otherwise it streams tensor by tensor, and a tensor too large
//! for the budget goes in block-aligned windows, in two passes (statistics, then output)
//! when one ratio spans the whole tensor. [`run_plan`] pipelines tasks so reads, compute and
//! writes overlap, with memory admitted in task order (so the pipeline cannot deadlock).

pub mod buffers;
pub mod progress;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::try_join_all;
use object_store::path::Path;
use object_store::ObjectStore;
use rayon::prelude::*;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::dtype;
use crate::error::{Error, Result};
use crate::lora::LoraFactors;
use crate::merge::{InputView, Prepared, Streaming, Window};
use crate::plan::{InputFile, MergePlan, Op, Task, TensorJob};
use crate::sink::Sink;
use crate::store::{read_ranges, StoreError, Stores};
use buffers::BufferPool;
pub use progress::Progress;

/// Where one input file is read from.
enum InputSource {
    /// A local file: memory-mapped ranges.
    Local(PathBuf),
    /// Any object store: ranged GETs.
    Store(Arc<dyn ObjectStore>, Path),
}

/// Input files resolved to stores, indexed like [`MergePlan::inputs`].
pub struct InputFiles {
    files: Vec<(InputSource, String)>,
    pool: Arc<BufferPool>,
}

impl InputFiles {
    pub fn resolve(stores: &Stores, inputs: &[InputFile], pool: Arc<BufferPool>) -> Result<Self> {
        let files = inputs
            .iter()
            .map(|f| {
                let loc = stores.resolve(&f.url)?;
                let src = match loc.local_dir {
                    Some(p) => InputSource::Local(p),
                    None => InputSource::Store(loc.store, loc.prefix),
                };
                Ok((src, f.url.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(InputFiles { files, pool })
    }

    /// Fetch several ranges, grouped per file, all files concurrently.
    async fn fetch(
        &self,
        wanted: &[(usize, Range<u64>)],
        progress: &Progress,
    ) -> Result<Vec<Bytes>> {
        let mut by_file: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, (f, _)) in wanted.iter().enumerate() {
            match by_file.iter_mut().find(|(g, _)| g == f) {
                Some((_, v)) => v.push(i),
                None => by_file.push((*f, vec![i])),
            }
        }
        let reads = by_file.iter().map(|(f, idx)| async move {
            let (src, url) = self.files.get(*f).ok_or_else(|| {
                Error::Internal(format!(
                    "task names input file {f}, which the plan does not have"
                ))
            })?;
            let ranges: Vec<Range<u64>> = idx.iter().map(|&i| wanted[i].1.clone()).collect();
            let got = match src {
                InputSource::Store(store, path) => {
                    read_ranges(store.as_ref(), path, url, &ranges).await?
                }
                InputSource::Local(p) => {
                    let (p, url) = (p.clone(), url.clone());
                    let ranges = ranges.clone();
                    blocking(move || read_local(&p, &url, &ranges)).await??
                }
            };
            progress.read(ranges.iter().map(|r| r.end - r.start).sum());
            Ok::<_, Error>(idx.iter().copied().zip(got).collect::<Vec<_>>())
        });
        let mut out = vec![Bytes::new(); wanted.len()];
        for group in try_join_all(reads).await? {
            for (i, b) in group {
                out[i] = b;
            }
        }
        Ok(out)
    }
}

/// Map byte ranges of a local file into memory (no copy: the kernel reads the page cache
/// directly, as safetensors' own loader does). Each range is its own mapping, populated up
/// front so the page faults happen here, in the fetch stage, and unmapped when its last
/// [`Bytes`] is dropped, so resident memory stays bounded by the tasks in flight.
/// Like any mmap reader, this assumes input files are not modified during the merge.
fn read_local(path: &std::path::Path, url: &str, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
    let io = |source: std::io::Error| {
        Error::Store(StoreError::Local {
            url: url.to_string(),
            source,
        })
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    const PAGE: u64 = 4096;
    ranges
        .iter()
        .map(|r| {
            if r.end > size {
                return Err(io(std::io::Error::other(format!(
                    "bytes {}..{} are past the end of the file ({size} bytes)",
                    r.start, r.end
                ))));
            }
            if r.start == r.end {
                return Ok(Bytes::new());
            }
            let base = r.start / PAGE * PAGE;
            // SAFETY: read-only mapping of a file we do not modify; see the note above.
            let map = unsafe {
                memmap2::MmapOptions::new()
                    .offset(base)
                    .len((r.end - base) as usize)
                    .populate()
                    .map(&file)
            }
            .map_err(io)?;
            Ok(Bytes::from_owner(map).slice((r.start - base) as usize..))
        })
        .collect()
}

/// A piece of output: bytes at an absolute offset of the task's file. The last chunk of a
/// task carries the task's memory permit, released once the chunk is written.
pub struct Chunk {
    pub offset: u64,
    pub data: Bytes,
    pub permit: Option<OwnedSemaphorePermit>,
}

/// Run one task within `budget` bytes, sending its output in file order to `tx`.
/// `header` is the file header when the task starts the file.
pub async fn run_task(
    task: Arc<Task>,
    header: Option<Arc<Vec<u8>>>,
    inputs: Arc<InputFiles>,
    budget: u64,
    progress: Arc<Progress>,
    tx: mpsc::Sender<Chunk>,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<()> {
    if task.working_set() <= budget {
        let data = run_in_memory(
            &task,
            header.as_deref().map(|h| h.as_slice()),
            &inputs,
            &progress,
        )
        .await?;
        send(&tx, task.out.start, data, permit).await
    } else {
        let mut pos = task.out.start;
        if let Some(h) = header {
            send(&tx, 0, Bytes::from(h.to_vec()), None).await?;
            pos = h.len() as u64;
        }
        for job in &task.tensors {
            debug_assert_eq!(job.out.start, pos);
            if job.working_set() <= budget {
                let one = Task {
                    id: task.id,
                    file: task.file,
                    out: job.written(),
                    tensors: vec![job.clone()],
                };
                let data = run_in_memory(&one, None, &inputs, &progress).await?;
                send(&tx, job.out.start, data, None).await?;
            } else {
                stream_tensor(job, &inputs, budget, &progress, &tx).await?;
            }
            pos = job.written().end;
        }
        drop(permit);
        Ok(())
    }
}

async fn send(
    tx: &mpsc::Sender<Chunk>,
    offset: u64,
    data: Bytes,
    permit: Option<OwnedSemaphorePermit>,
) -> Result<()> {
    tx.send(Chunk {
        offset,
        data,
        permit,
    })
    .await
    .map_err(|_| Error::Interrupted)
}

/// Fetch all inputs of a task, then merge its tensors in parallel into one buffer.
async fn run_in_memory(
    task: &Task,
    header: Option<&[u8]>,
    inputs: &InputFiles,
    progress: &Progress,
) -> Result<Bytes> {
    let wanted: Vec<(usize, Range<u64>)> = task
        .tensors
        .iter()
        .flat_map(|j| tensor_ranges(j, 0..j.numel()))
        .collect();
    let fetched = inputs.fetch(&wanted, progress).await?;
    progress.inputs_fetched();
    let pool = inputs.pool.clone();
    let task = task.clone();
    let n_tensors = task.tensors.len() as u64;
    let header = header.map(|h| h.to_vec());
    let out = blocking(move || {
        let mut out = pool.get((task.out.end - task.out.start) as usize);
        if let Some(h) = &header {
            out[..h.len()].copy_from_slice(h);
        }
        // Split the buffer into one slice per tensor, then merge tensors in parallel.
        let mut slices = Vec::with_capacity(task.tensors.len());
        let mut rest: &mut [u8] = &mut out;
        let mut pos = task.out.start;
        let mut k = 0;
        for job in &task.tensors {
            let skip = (job.out.start - pos) as usize;
            let (_, r) = rest.split_at_mut(skip);
            let written = job.written();
            let (mine, r) = r.split_at_mut((written.end - written.start) as usize);
            rest = r;
            pos = written.end;
            let n = tensor_ranges(job, 0..0).len();
            slices.push((job, mine, &fetched[k..k + n]));
            k += n;
        }
        slices
            .into_par_iter()
            .for_each(|(job, out, bytes)| compute(job, bytes, out, &pool));
        pool.freeze(out)
    })
    .await?;
    progress
        .tensors_done
        .fetch_add(n_tensors, Ordering::Relaxed);
    Ok(out)
}

fn compute(job: &TensorJob, bytes: &[Bytes], out: &mut [u8], pool: &Arc<BufferPool>) {
    match &job.op {
        Op::Copy { .. } => out.copy_from_slice(&bytes[0]),
        Op::Merge { kernel, .. } => {
            let values = kernel_inputs(job, bytes, 0, pool);
            match &job.requant {
                None => kernel.merge(&job.shape, &views(&values), out),
                Some(r) => {
                    // Merge into the kernel's dtype, then quantize whole: weight, then scales.
                    let mut merged = pool.get(job.numel() * kernel.out.size());
                    kernel.merge(&job.shape, &views(&values), &mut merged);
                    let (q, scales) = out.split_at_mut(job.numel());
                    r.blocks
                        .quantize(&merged, kernel.out.st_dtype(), 0, q, scales);
                    drop(pool.freeze(merged));
                }
            }
        }
    }
}

/// The byte ranges tensor `job` reads for its elements `elems`, in order: each input's
/// range, followed by the whole of its scales when it is a block-FP8 weight.
fn tensor_ranges(job: &TensorJob, elems: Range<usize>) -> Vec<(usize, Range<u64>)> {
    let mut out = Vec::new();
    for s in job.inputs() {
        let size = dtype::size(s.dtype).expect("whole-byte dtype") as u64;
        if job.vocab.is_some() {
            // Realigned rows: every input whole (its own row count), in one window.
            out.push((s.file, s.range.clone()));
        } else {
            out.push((
                s.file,
                s.range.start + elems.start as u64 * size..s.range.start + elems.end as u64 * size,
            ));
        }
        if let Some(sc) = &s.scale {
            out.push((sc.file, sc.range.clone()));
        }
        if let Some(l) = &s.lora {
            out.push((l.file, l.a.clone()));
            out.push((l.file, l.b.clone()));
        }
    }
    out
}

/// What the kernel reads, from bytes fetched as [`tensor_ranges`] orders them, for the
/// elements from `start` on: each input's bytes and dtype, block-FP8 weights dequantized to
/// bfloat16 on the way (DeepSeek's formula; see [`crate::fp8`]), LoRA-adapted weights
/// adapted (see [`crate::lora`]).
fn kernel_inputs(
    job: &TensorJob,
    fetched: &[Bytes],
    start: usize,
    pool: &Arc<BufferPool>,
) -> Vec<(Bytes, safetensors::Dtype)> {
    let mut out = Vec::new();
    let mut k = 0;
    let cols = job.shape.last().copied().unwrap_or(1).max(1);
    for s in job.inputs() {
        let q = &fetched[k];
        k += 1;
        let value = match &s.scale {
            None => (q.clone(), s.dtype),
            Some(sc) => {
                let mut buf = pool.get(2 * q.len());
                sc.blocks.dequantize(q, &fetched[k], start, &mut buf);
                k += 1;
                (pool.freeze(buf), safetensors::Dtype::BF16)
            }
        };
        match &s.lora {
            None => out.push(value),
            Some(l) => {
                let factors = LoraFactors::new(
                    &fetched[k],
                    l.a_dtype,
                    &fetched[k + 1],
                    l.b_dtype,
                    l.rank,
                    l.scaling,
                );
                k += 2;
                let mut buf = pool.get(value.0.len());
                factors.apply(&value.0, value.1, start, cols, &mut buf);
                out.push((pool.freeze(buf), value.1));
            }
        }
    }
    match &job.vocab {
        None => out,
        Some(v) => {
            let whole: Vec<(&[u8], safetensors::Dtype)> =
                out.iter().map(|(b, d)| (b.as_ref(), *d)).collect();
            v.gather(&whole, job.numel() / v.padded.max(1))
                .into_iter()
                .map(|b| (Bytes::from(b), v.dtype))
                .collect()
        }
    }
}

/// A tensor whose inputs and output exceed the budget: windows of whole blocks (or rows),
/// a statistics pass first when the kernel needs one, then the output window by window.
async fn stream_tensor(
    job: &TensorJob,
    inputs: &InputFiles,
    budget: u64,
    progress: &Progress,
    tx: &mpsc::Sender<Chunk>,
) -> Result<()> {
    let out_size = dtype::size(job.dtype).expect("whole-byte dtype") as u64;
    let kernel = match &job.op {
        Op::Merge { kernel, .. } => Some(Arc::new(kernel.clone())),
        Op::Copy { .. } => None,
    };
    let streaming = kernel.as_ref().map(|k| k.streaming(&job.shape));
    let windows = windows(job, budget)?;
    let prepared = match (&kernel, streaming) {
        (Some(k), Some(Streaming::Statistics)) => {
            statistics_pass(job, k, inputs, &windows, progress).await?
        }
        _ => Prepared::Nothing,
    };
    // Requantized scales (a row of blocks per window) follow the weight, in order, once
    // every window is written.
    let mut scales = job
        .requant
        .as_ref()
        .map(|r| vec![0u8; r.blocks.scale_bytes() as usize]);
    for w in &windows {
        let bytes = inputs
            .fetch(&tensor_ranges(job, w.clone()), progress)
            .await?;
        let pass = OutputPass {
            job: job.clone(),
            kernel: kernel.clone(),
            streaming,
            prepared,
        };
        let pool = inputs.pool.clone();
        let window = w.clone();
        let (data, window_scales) = blocking(move || pass.window(&bytes, window, &pool)).await?;
        if let (Some(all), Some(s), Some(r)) = (&mut scales, window_scales, &job.requant) {
            let first = w.start / (r.blocks.block[0] * r.blocks.cols);
            let at = first * r.blocks.scale_shape()[1] * 4;
            all[at..at + s.len()].copy_from_slice(&s);
        }
        send(tx, job.out.start + w.start as u64 * out_size, data, None).await?;
    }
    if let (Some(all), Some(r)) = (scales, &job.requant) {
        send(tx, r.scales.start, Bytes::from(all), None).await?;
    }
    progress.tensors_done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The windows a tensor is streamed in: half the budget for the window being computed, the
/// rest for the chunk being written; the scales read (whole) and written (whole, when
/// requantizing) stay for every window. Whole-tensor kernels and realigned vocabulary
/// tensors take one window (the plan checked that it fits).
fn windows(job: &TensorJob, budget: u64) -> Result<Vec<Range<usize>>> {
    let numel = job.numel();
    let (unit, per_elem) = job.window_unit();
    let scales_out = job
        .requant
        .as_ref()
        .map_or(0, |r| r.scales.end - r.scales.start);
    let fixed = job.scale_bytes() + scales_out;
    let window = if job.whole() {
        numel.max(1)
    } else {
        (budget.saturating_sub(fixed) / 2 / per_elem) as usize / unit * unit
    };
    if window == 0 {
        return Err(Error::Usage(format!(
            "--memory-limit is too small for tensor `{}`: it needs at least {} bytes",
            job.name,
            job.min_memory()
        )));
    }
    Ok((0..numel)
        .step_by(window)
        .map(|s| s..(s + window).min(numel))
        .collect())
}

/// A statistics kernel's passes before its output pass: each over every window, in
/// element order.
async fn statistics_pass(
    job: &TensorJob,
    k: &Arc<crate::merge::Kernel>,
    inputs: &InputFiles,
    windows: &[Range<usize>],
    progress: &Progress,
) -> Result<Prepared> {
    let mut prepared = Prepared::Nothing;
    for pass in 0..k.stats_passes() {
        prepared = one_pass(job, k, inputs, windows, progress, pass, prepared).await?;
    }
    Ok(prepared)
}

async fn one_pass(
    job: &TensorJob,
    k: &Arc<crate::merge::Kernel>,
    inputs: &InputFiles,
    windows: &[Range<usize>],
    progress: &Progress,
    pass: usize,
    prior: Prepared,
) -> Result<Prepared> {
    let mut acc = k.begin_stats(pass, prior, job.inputs().len(), job.numel());
    for w in windows {
        let bytes = inputs
            .fetch(&tensor_ranges(job, w.clone()), progress)
            .await?;
        let (k, job, pool) = (k.clone(), job.clone(), inputs.pool.clone());
        let (start, len) = (w.start, w.len());
        acc = blocking(move || {
            let values = kernel_inputs(&job, &bytes, start, &pool);
            k.feed_stats(&mut acc, &views(&values), len);
            acc
        })
        .await?;
    }
    Ok(k.finish_stats(&acc))
}

/// The output pass of a streamed tensor (or its only pass).
struct OutputPass {
    job: TensorJob,
    kernel: Option<Arc<crate::merge::Kernel>>,
    streaming: Option<Streaming>,
    prepared: Prepared,
}

impl OutputPass {
    /// One window's output bytes (quantized when requantizing) and, then, its scales.
    fn window(
        self,
        bytes: &[Bytes],
        w: Range<usize>,
        pool: &Arc<BufferPool>,
    ) -> (Bytes, Option<Vec<u8>>) {
        let job = &self.job;
        let (start, len, numel) = (w.start, w.len(), job.numel());
        let kernel_out = self.kernel.as_ref().map_or(job.dtype, |k| k.out.st_dtype());
        let values = kernel_inputs(job, bytes, start, pool);
        let size = dtype::size(kernel_out).expect("whole-byte dtype");
        let mut out = pool.get(len * size);
        let views = views(&values);
        match (&self.kernel, self.streaming) {
            (Some(k), Some(Streaming::Rows(row))) => {
                k.merge_rows(row, start / row, numel / row, &views, &mut out)
            }
            (Some(k), Some(Streaming::Whole)) => k.merge(&job.shape, &views, &mut out),
            (Some(k), _) => {
                let at = Window {
                    first: start,
                    numel,
                };
                k.apply(&views, at, self.prepared, &mut out)
            }
            (None, _) => out.copy_from_slice(&values[0].0),
        }
        match &job.requant {
            None => (pool.freeze(out), None),
            Some(r) => {
                let block_rows = (len / r.blocks.cols).div_ceil(r.blocks.block[0]);
                let mut s = vec![0u8; block_rows * r.blocks.scale_shape()[1] * 4];
                let mut q = pool.get(len);
                r.blocks.quantize(&out, kernel_out, 0, &mut q, &mut s);
                drop(pool.freeze(out));
                (pool.freeze(q), Some(s))
            }
        }
    }
}

/// Input views over the kernel's inputs.
fn views(values: &[(Bytes, safetensors::Dtype)]) -> Vec<InputView<'_>> {
    values
        .iter()
        .map(|(b, d)| InputView {
            bytes: b,
            dtype: *d,
        })
        .collect()
}

/// Run CPU-bound work off the async threads; a panic becomes an internal error.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(Error::panicked("a merge computation"))
}

/// Memory is counted in units of this many bytes (semaphores count in u32).
const UNIT: u64 = 1 << 16;

/// A task started: its id, the chunks it will write, and its handle.
type Pending = (
    usize,
    mpsc::Receiver<Chunk>,
    tokio::task::JoinHandle<Result<()>>,
);

/// Run a whole plan in this process: tasks pipelined, output written in file order.
pub async fn run_plan(
    plan: &MergePlan,
    inputs: Arc<InputFiles>,
    sink: &Sink,
    memory_limit: u64,
    depth: usize,
    progress: Arc<Progress>,
) -> Result<()> {
    let budget_units = memory_limit.div_ceil(UNIT).clamp(1, u32::MAX as u64) as u32;
    let (htx, hrx) = mpsc::channel::<Pending>(depth.max(1));
    let producer = start_tasks(plan, inputs, budget_units, progress.clone(), htx);
    // The writer owns the receiving end: if it fails, the channel closes and the producer
    // stops instead of waiting forever for room.
    let consumer = write_in_order(plan, sink, progress, hrx);
    let (p, c) = tokio::join!(producer, consumer);
    c?;
    p
}

/// Start the tasks in order, each once its memory is admitted (in task order, so the
/// pipeline cannot deadlock), handing each to the writer.
async fn start_tasks(
    plan: &MergePlan,
    inputs: Arc<InputFiles>,
    budget_units: u32,
    progress: Arc<Progress>,
    htx: mpsc::Sender<Pending>,
) -> Result<()> {
    let budget = budget_units as u64 * UNIT;
    let sem = Arc::new(Semaphore::new(budget_units as usize));
    for task in &plan.tasks {
        let want = task.working_set().min(budget);
        let units = want.div_ceil(UNIT).clamp(1, budget_units as u64) as u32;
        let permit = sem
            .clone()
            .acquire_many_owned(units)
            .await
            .map_err(|_| Error::Interrupted)?;
        tracing::debug!(
            task = task.id,
            units,
            free = sem.available_permits(),
            "admitted"
        );
        let file = &plan.files[task.file];
        let header = (task.out.start == 0).then(|| Arc::new(file.header.clone()));
        let (ctx, crx) = mpsc::channel(1);
        let h = tokio::spawn(run_task(
            Arc::new(task.clone()),
            header,
            inputs.clone(),
            budget,
            progress.clone(),
            ctx,
            Some(permit),
        ));
        if htx.send((task.id, crx, h)).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Write every task's chunks in file order as they come, creating and finishing files
/// around their tasks, and check each task wrote exactly its range.
async fn write_in_order(
    plan: &MergePlan,
    sink: &Sink,
    progress: Arc<Progress>,
    mut hrx: mpsc::Receiver<Pending>,
) -> Result<()> {
    while let Some((id, mut crx, handle)) = hrx.recv().await {
        let task = &plan.tasks[id];
        let file = &plan.files[task.file];
        if id == file.tasks.start {
            sink.create(&file.name, file.size).await?;
        }
        let mut written = task.out.start;
        while let Some(chunk) = crx.recv().await {
            if chunk.offset != written {
                return Err(Error::Internal(format!(
                    "task {id} wrote offset {} of {} but {} was expected",
                    chunk.offset, file.name, written
                )));
            }
            let n = chunk.data.len() as u64;
            sink.write(&file.name, chunk.offset, chunk.data).await?;
            written += n;
            progress.written(n);
            drop(chunk.permit);
        }
        handle
            .await
            .map_err(Error::panicked(format!("task {id}")))??;
        if written != task.out.end {
            return Err(Error::Internal(format!(
                "task {id} wrote {} bytes of {}, expected {}",
                written - task.out.start,
                file.name,
                task.out.end - task.out.start
            )));
        }
        if id + 1 == file.tasks.end {
            sink.finish(&file.name).await?;
        }
    }
    Ok(())
}
