//! Running one leased task on a worker: fetch its inputs, merge with the shared executor,
//! write its byte range where the coordinator said, renew the lease meanwhile, and turn how
//! it ended into the outcome to report.

use crate::metrics::WorkerMetrics;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::Instrument;

use super::AbortOnDrop;
use crate::error::{Error, Result};
use crate::exec::buffers::BufferPool;
use crate::exec::{run_task, Chunk, InputFiles, Progress};
use crate::sink::cluster::RangeWriter;
use crate::store::Stores;
use crate::wire::client::Client;
use crate::wire::{Heartbeat, PartDone, Received, TaskOutcome, WorkerId};

/// How a leased task ended on this worker.
#[derive(Debug)]
pub enum TaskEnd {
    /// It ran to the end: its parts, or why it failed.
    Finished(Result<Vec<PartDone>>),
    /// The coordinator gave the lease to another worker: drop the task, report nothing.
    LeaseLost,
    /// This worker is shutting down (SIGTERM).
    Stopped,
}

impl TaskEnd {
    /// What to report, or None (a lost lease is not ours to report).
    pub fn outcome(self, worker_name: &str) -> Option<TaskOutcome> {
        match self {
            TaskEnd::LeaseLost => None,
            TaskEnd::Finished(Ok(parts)) => Some(TaskOutcome::Success { parts }),
            TaskEnd::Finished(Err(e)) => Some(failure(&e, error_chain(&e))),
            TaskEnd::Stopped => Some(failure(
                &Error::Interrupted,
                format!("worker {worker_name} was stopped (SIGTERM) while running the task"),
            )),
        }
    }
}

/// A failure as reported: the error decides whether it may be retried and whether it
/// counts toward `--max-attempts`.
fn failure(e: &Error, message: String) -> TaskOutcome {
    TaskOutcome::Failure {
        message,
        retryable: e.is_retryable(),
        preempted: !e.counts_toward_attempts(),
    }
}

/// An error with its sources, each once.
fn error_chain(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

/// What running a task needs from its worker.
pub struct Runner<'a> {
    pub client: &'a Client,
    pub worker: WorkerId,
    pub heartbeat: Duration,
    pub stores: &'a Stores,
    pub pool: &'a Arc<BufferPool>,
    pub memory_limit: u64,
    pub metrics: &'a WorkerMetrics,
}

impl Runner<'_> {
    /// Run `task` until it ends, the lease is lost, or `stopping` turns true. `turn` (the
    /// worker's lease gate) is released at the task's first output.
    pub async fn run(
        &self,
        task: Received,
        turn: OwnedSemaphorePermit,
        stopping: &mut tokio::sync::watch::Receiver<bool>,
    ) -> TaskEnd {
        let (id, attempt) = (task.id(), task.attempt);
        let span =
            tracing::info_span!("task", file = %task.file_name, task = %id, attempt = %attempt);
        async {
            let bytes = task.task.out.end - task.task.out.start;
            let read = task.task.input_bytes();
            tracing::info!(tensors = task.task.tensors.len(), bytes, "running");
            let progress = Progress::new(bytes);
            let started = Instant::now();
            let beat = Heartbeat {
                worker: self.worker,
                task: id,
                attempt,
                bytes_done: 0,
            };
            let end = tokio::select! {
                r = self.execute(task, progress.clone(), turn) => TaskEnd::Finished(r),
                _ = heartbeats(self.client, beat, self.heartbeat, progress) => TaskEnd::LeaseLost,
                _ = stopping.changed() => TaskEnd::Stopped,
            };
            let m = self.metrics;
            match &end {
                TaskEnd::Finished(Ok(_)) => {
                    let secs = started.elapsed().as_secs_f64();
                    tracing::info!(secs, "done");
                    // The outcome last: a scrape that sees the task done sees its figures.
                    m.task_seconds.observe(secs);
                    m.bytes_read.inc_by(read);
                    m.bytes_written.inc_by(bytes);
                    m.task("done");
                }
                TaskEnd::Finished(Err(e)) => {
                    m.task("failed");
                    if e.is_store() {
                        m.store_errors.inc();
                    }
                }
                TaskEnd::LeaseLost => m.task("lost"),
                TaskEnd::Stopped => m.task("stopped"),
            }
            end
        }
        .instrument(span)
        .await
    }

    /// Run one task and write its output where the task says. Returns the multipart parts.
    async fn execute(
        &self,
        r: Received,
        progress: Arc<Progress>,
        turn: OwnedSemaphorePermit,
    ) -> Result<Vec<PartDone>> {
        let inputs = Arc::new(InputFiles::resolve(
            self.stores,
            &r.inputs,
            self.pool.clone(),
        )?);
        let len = r.task.out.end - r.task.out.start;
        let mut writer = RangeWriter::open(r.target, len, self.stores)?;
        // The coordinator counted the writer's parts in this task's memory: the merge gets
        // the rest (its streaming windows are sized from it).
        let budget = self.memory_limit.saturating_sub(writer.buffer());
        let (tx, mut rx) = mpsc::channel::<Chunk>(2);
        // Aborted if this task is dropped (lease lost, worker stopping), so its memory goes
        // with it instead of outliving the slot.
        let mut producer = AbortOnDrop(tokio::spawn(run_task(
            Arc::new(r.task),
            r.header.map(Arc::new),
            inputs,
            budget,
            progress.clone(),
            tx,
            None,
        )));
        let written = {
            let written = async {
                while let Some(chunk) = rx.recv().await {
                    progress.inputs_fetched();
                    let n = chunk.data.len() as u64;
                    writer.write(chunk.offset, chunk.data).await?;
                    progress.written(n);
                }
                writer.finish().await
            };
            tokio::pin!(written);
            // The worker's next lease waits for this task's inputs (see `Ctx::leasing`).
            tokio::select! {
                w = &mut written => w,
                _ = progress.wait_inputs_fetched() => {
                    drop(turn);
                    written.await
                }
            }
        }
        .map_err(Error::Sink);
        // A failed write stops the reading above; the producer then fails to send
        // (Interrupted), and the write's error is the one to report.
        drop(rx);
        let produced = (&mut producer.0)
            .await
            .map_err(Error::panicked("the task"))?;
        let written = match (produced, written) {
            (Err(Error::Interrupted), Err(w)) => Err(w),
            (Err(p), _) => Err(p),
            (Ok(()), w) => w,
        };
        // Fault injection for the cluster tests: hold the finished task (and its lease) a
        // while, so a test can kill or stop this worker mid-task deterministically.
        if let Some(ms) = std::env::var("MERGEFLEET_FAILPOINT_TASK_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            tracing::info!("failpoint: holding the task {ms} ms");
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Ok(written?
            .into_iter()
            .map(|(part, content_id)| PartDone { part, content_id })
            .collect())
    }
}

/// Renew the lease until the coordinator refuses it; returns then. Unreachable
/// coordinators are tolerated here (the task goes on; the report will retry).
async fn heartbeats(
    client: &Client,
    mut beat: Heartbeat,
    every: Duration,
    progress: Arc<Progress>,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        beat.bytes_done = progress.bytes_written.load(Ordering::Relaxed);
        match client.heartbeat(beat).await {
            Ok(false) => return,
            Ok(true) => {}
            Err(s) => tracing::debug!("heartbeat failed: {}", s.message()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_error() {
        assert_eq!(TaskEnd::LeaseLost.outcome("w"), None);
        let ok = TaskEnd::Finished(Ok(vec![PartDone {
            part: 3,
            content_id: "e".into(),
        }]));
        assert!(
            matches!(ok.outcome("w"), Some(TaskOutcome::Success { parts }) if parts[0].part == 3)
        );
        let stopped = TaskEnd::Stopped.outcome("w7").unwrap();
        assert!(matches!(
            &stopped,
            TaskOutcome::Failure { retryable: true, preempted: true, message } if message.contains("w7")
        ));
        let transient = TaskEnd::Finished(Err(Error::Internal("boom".into())));
        assert!(matches!(
            transient.outcome("w"),
            Some(TaskOutcome::Failure {
                retryable: true,
                preempted: false,
                ..
            })
        ));
        let bad = TaskEnd::Finished(Err(Error::Wire(crate::wire::WireError("shape".into()))));
        assert!(matches!(
            bad.outcome("w"),
            Some(TaskOutcome::Failure { retryable: false, preempted: false, message }) if message.contains("shape")
        ));
    }
}
