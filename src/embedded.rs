//! Embedded mode: the whole merge in this process, from config to committed checkpoint.

use std::sync::Arc;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::exec::buffers::BufferPool;
use crate::exec::{run_plan, InputFiles, Progress};
use crate::job::Job;
use crate::memory;
use crate::plan::PlanOptions;
use crate::shutdown::shutdown_signal;
use crate::sink::lock::{Holder, OutputLock, RELEASE_WAIT_FAILED};
use crate::sink::Sink;
use crate::store::Stores;

/// Options of `mergefleet merge`.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub plan: PlanOptions,
    pub memory_limit: u64,
    /// Tasks in flight (fetching, computing or waiting to be written).
    pub depth: usize,
    pub copy_tokenizer: bool,
    pub model_card: bool,
    pub overwrite: bool,
    /// No progress output.
    pub quiet: bool,
}

/// What a finished merge did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub output: String,
    pub tensors: usize,
    pub files: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub seconds: f64,
    pub warnings: Vec<String>,
    /// Incomplete uploads of earlier merges aborted when this one took the output.
    pub uploads_aborted: usize,
}

/// Merge `config_yaml` into `out` (a local directory or an object-store URL).
pub async fn merge(config_yaml: &str, out: &str, opts: &MergeOptions) -> Result<Summary> {
    let started = Instant::now();
    let stores = Stores::new();
    let job = Job::load(config_yaml, &stores, opts.plan).await?;
    let location = stores.resolve(out)?;
    job.check_output(&location)?;
    for w in &job.plan.warnings {
        tracing::warn!("{w}");
    }
    // An object store's upload holds its parts outside the pipeline.
    let write_buffer = Sink::write_buffer(&location);
    if let Some(big) = job.plan.largest_tensor() {
        let need = big.min_memory() + write_buffer;
        if need > opts.memory_limit {
            let upload = match write_buffer {
                0 => String::new(),
                b => format!(" ({b} of them for uploading to the object store)"),
            };
            return Err(Error::Usage(format!(
                "--memory-limit {} is too small: tensor `{}` needs at least {need} bytes even when streamed{upload}",
                opts.memory_limit, big.name
            )));
        }
    }
    let limit = opts.memory_limit.saturating_sub(write_buffer);
    let budget = memory::pipeline_budget(&job.plan, limit, opts.plan.task_size);
    // Idle output buffers kept for reuse: a few tasks' worth.
    let pool = BufferPool::new(memory::idle_buffers(budget));
    let inputs = Arc::new(InputFiles::resolve(&stores, &job.plan.inputs, pool)?);
    Sink::check(&location, opts.overwrite).await?;
    // Every check is done: take the output, then touch it.
    let lock = OutputLock::acquire(&location, &Holder::this_process("merge", None)).await?;
    let sink = match Sink::open(location, opts.overwrite, &Default::default()).await {
        Ok(s) => s,
        Err(e) => {
            lock.release().await;
            return Err(e.into());
        }
    };
    let progress = Progress::new(job.plan.bytes_written());
    let reporter = progress.spawn_reporter(opts.quiet);

    let work = async {
        let mut warnings = job
            .write_side_files(&sink, opts.copy_tokenizer, opts.model_card)
            .await?;
        run_plan(
            &job.plan,
            inputs,
            &sink,
            budget,
            opts.depth,
            progress.clone(),
        )
        .await?;
        job.commit(&sink).await?;
        sink.committed().await;
        warnings.extend(job.plan.warnings.iter().cloned());
        Ok::<_, Error>(warnings)
    };
    let result = tokio::select! {
        r = work => r,
        _ = shutdown_signal() => Err(Error::Interrupted),
        loss = lock.lost() => Err(loss.into_error(&sink.display())),
    };
    drop(reporter);
    if result.is_err() {
        sink.abort().await;
        lock.release_within(RELEASE_WAIT_FAILED).await;
    } else {
        lock.release().await;
    }
    let warnings = result?;
    Ok(Summary {
        output: sink.display(),
        tensors: job.plan.tensor_count(),
        files: job.plan.files.len(),
        bytes_read: job.plan.bytes_read(),
        bytes_written: job.plan.bytes_written(),
        seconds: started.elapsed().as_secs_f64(),
        warnings,
        uploads_aborted: sink.uploads_aborted(),
    })
}
