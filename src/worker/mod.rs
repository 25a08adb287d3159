//! Cluster mode's worker: registers with the coordinator, leases tasks, runs them with the
//! embedded engine's executor, writes its piece of the output, and reports.
//!
//! Inputs come straight from object storage (credentials from this process's environment);
//! output goes to the file range or multipart parts the task names ([`crate::sink::cluster`]).
//! Heartbeats renew the lease while a task runs; a refused heartbeat (the lease expired and
//! went to another worker) stops the task. Losing the coordinator, the worker retries with
//! backoff for a bounded time ([`backoff`]), then exits non-zero so Kubernetes can act.
//! `task.rs` runs one leased task; `health.rs` is the worker's own liveness endpoint.

pub mod backoff;
mod health;
mod task;

use crate::metrics::WorkerMetrics;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Status};

use crate::error::{Error, Result};
use crate::exec::buffers::BufferPool;
use crate::shutdown::shutdown_signal;
use crate::store::Stores;
use crate::wire::client::Client;
use crate::wire::{
    Attempt, Hello, LeaseAnswer, Report, StatusReport, TaskId, TaskOutcome, Welcome, WorkerId,
    PROTOCOL_VERSION,
};
use backoff::{fatal_status, Backoff};
use task::{Runner, TaskEnd};

/// A spawned task, aborted when dropped (a dropped task or endpoint takes its work and
/// memory with it).
pub(crate) struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Options of `mergefleet worker`.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub coordinator: String,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub memory_limit: u64,
    pub threads: u32,
    pub name: String,
    /// How long to keep trying to reach a coordinator that does not answer.
    pub retry_for: Duration,
    /// Serve the standard gRPC health service here (for a liveness probe): it answers
    /// while this process runs, whatever the coordinator's state.
    pub health_listen: Option<std::net::SocketAddr>,
    /// Serve Prometheus metrics here (`GET /metrics`).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// How a worker's run ended well.
#[derive(Debug)]
pub struct WorkerSummary {
    pub tasks_done: u64,
}

/// Tasks a worker fetches at once (see `Ctx::leasing`).
const FETCHING: usize = 2;
/// How long one lease call waits on the coordinator for a task.
const LEASE_WAIT: Duration = Duration::from_secs(20);
/// The longest a stopping worker tries to report its interrupted task.
const STOP_REPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest `mergefleet status` waits for an answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

fn client(url: &str, token: Option<&str>, tls_ca: Option<&std::path::Path>) -> Result<Client> {
    Ok(Client::new(url, token, tls_ca)?)
}

/// Ask a coordinator for its status (`mergefleet status`).
pub async fn status(
    url: &str,
    token: Option<&str>,
    tls_ca: Option<&std::path::Path>,
) -> Result<StatusReport> {
    let client = client(url, token, tls_ca)?;
    let answer = tokio::time::timeout(STATUS_TIMEOUT, client.status())
        .await
        .unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "no answer within {} s",
                STATUS_TIMEOUT.as_secs()
            )))
        });
    answer.map_err(|s| {
        fatal_status(&s, url).unwrap_or_else(|| {
            Error::Unreachable(format!(
                "cannot reach the coordinator at {url}: {} (a coordinator exits once its merge has ended)",
                s.message()
            ))
        })
    })
}

/// What the task slots of one worker share.
struct Ctx {
    opts: WorkerOptions,
    client: Client,
    stores: Stores,
    pool: Arc<BufferPool>,
    /// This worker's registration, once registered.
    registration: tokio::sync::Mutex<Option<Welcome>>,
    done: AtomicU64,
    metrics: WorkerMetrics,
    /// Set on SIGTERM/SIGINT: slots report their running task as failed and stop.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// Two permits, each held by a slot asking for a lease and then by its task until the
    /// task's inputs are read: at most two tasks fetch at once (the second fills the
    /// connections the first's last parts leave idle), and the next is leased only when
    /// this worker can start reading it. Without it a worker leased a task per slot at
    /// once and sat on work (the largest tasks, first in line) that idle workers could
    /// have done; the others still compute and write meanwhile.
    leasing: Arc<tokio::sync::Semaphore>,
}

impl Ctx {
    fn backoff(&self) -> Backoff {
        Backoff::new(&self.opts.coordinator, self.opts.retry_for)
    }

    /// Register (once for all slots).
    async fn registered(&self) -> Result<Welcome> {
        let mut reg = self.registration.lock().await;
        if let Some(r) = *reg {
            return Ok(r);
        }
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            name: self.opts.name.clone(),
            memory_limit: self.opts.memory_limit,
            threads: self.opts.threads,
        };
        let mut backoff = self.backoff();
        loop {
            match backoff.call(self.client.register(&hello)).await {
                Ok(w) => {
                    tracing::info!(worker = %w.worker, "registered with {}", self.opts.coordinator);
                    *reg = Some(w);
                    return Ok(w);
                }
                Err(s) => backoff.wait(&s).await?,
            }
        }
    }

    /// The coordinator forgot worker `id` (it restarted): register again on next use.
    async fn forget(&self, id: WorkerId) {
        let mut reg = self.registration.lock().await;
        if reg.is_some_and(|w| w.worker == id) {
            tracing::info!(
                "the coordinator does not know this worker (it restarted?): registering again"
            );
            *reg = None;
        }
    }

    /// Send a report, retrying while the coordinator is unreachable. False when the
    /// coordinator no longer knows this worker (register again).
    async fn report(&self, report: Report) -> Result<bool> {
        let mut backoff = self.backoff();
        loop {
            match backoff.call(self.client.report(&report)).await {
                Ok(()) => return Ok(true),
                Err(s) if s.code() == Code::NotFound => return Ok(false),
                Err(s) => backoff.wait(&s).await?,
            }
        }
    }
}

/// Run until the coordinator says the merge is done (Ok) or failed (Err). `slots` tasks
/// run at once (so fetching one overlaps computing another); the coordinator keeps their
/// total working set within this worker's memory limit.
pub async fn run(opts: WorkerOptions, slots: usize) -> Result<WorkerSummary> {
    let client = client(
        &opts.coordinator,
        opts.token.as_deref(),
        opts.tls_ca.as_deref(),
    )?;
    let _health = match opts.health_listen {
        Some(addr) => Some(health::serve(addr).await?),
        None => None,
    };
    let metrics = WorkerMetrics::default();
    if let Some(addr) = opts.metrics_listen {
        crate::metrics::serve(addr, metrics.registry(), || {}).await?;
    }
    let (stop_tx, stopping) = tokio::sync::watch::channel(false);
    let ctx = Arc::new(Ctx {
        metrics,
        pool: BufferPool::new(crate::memory::idle_buffers(opts.memory_limit)),
        opts,
        client,
        stores: Stores::new(),
        registration: tokio::sync::Mutex::new(None),
        leasing: Arc::new(tokio::sync::Semaphore::new(FETCHING)),
        done: AtomicU64::new(0),
        stopping,
    });
    ctx.registered().await?;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..slots.max(1) {
        set.spawn(slot(ctx.clone()));
    }
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut first: Option<Result<()>> = None;
    loop {
        tokio::select! {
            r = set.join_next() => {
                let Some(r) = r else { break };
                let r = r.unwrap_or_else(|e| Err(Error::panicked("a worker slot")(e)));
                if r.is_err() {
                    // One slot failing for good ends the worker: stop the others.
                    let _ = stop_tx.send(true);
                }
                first.get_or_insert(r);
            }
            _ = &mut signal, if !*stop_tx.borrow() => {
                let _ = stop_tx.send(true);
                first.get_or_insert(Err(Error::Interrupted));
            }
        }
    }
    first.unwrap_or(Ok(()))?;
    let tasks_done = ctx.done.load(Ordering::Relaxed);
    tracing::info!("the merge is committed; {tasks_done} task(s) ran here");
    Ok(WorkerSummary { tasks_done })
}

/// One task slot: lease, run, report, until the merge ends.
async fn slot(ctx: Arc<Ctx>) -> Result<()> {
    let mut backoff = ctx.backoff();
    let mut stopping = ctx.stopping.clone();
    loop {
        if *stopping.borrow() {
            return Err(Error::Interrupted);
        }
        let me = tokio::select! {
            r = ctx.registered() => r?,
            _ = stopping.changed() => return Err(Error::Interrupted),
        };
        let turn = tokio::select! {
            p = ctx.leasing.clone().acquire_owned() => p.expect("the lease gate is never closed"),
            _ = stopping.changed() => return Err(Error::Interrupted),
        };
        let asked = std::time::Instant::now();
        let answer = tokio::select! {
            r = ctx.client.lease(me.worker, LEASE_WAIT) => r,
            _ = stopping.changed() => return Err(Error::Interrupted),
        };
        let answer = match answer {
            Ok(a) => {
                backoff.ok();
                a
            }
            Err(s) if s.code() == Code::NotFound => {
                ctx.forget(me.worker).await;
                continue;
            }
            Err(s) => {
                backoff.wait(&s).await?;
                continue;
            }
        };
        let (task, attempt, outcome) = match answer {
            LeaseAnswer::Task(received) => {
                ctx.metrics
                    .lease_wait_seconds
                    .observe(asked.elapsed().as_secs_f64());
                match run_leased(&ctx, &me, received, turn, &mut stopping).await? {
                    Some(ran) => ran,
                    None => continue,
                }
            }
            LeaseAnswer::Malformed {
                task,
                attempt,
                error,
            } => {
                drop(turn);
                let e = Error::Wire(error);
                tracing::warn!(task = %task, attempt = %attempt, "{e}");
                let outcome = TaskEnd::Finished(Err(e)).outcome(&ctx.opts.name);
                (
                    task,
                    attempt,
                    outcome.expect("a finished task has an outcome"),
                )
            }
            LeaseAnswer::Done => return Ok(()),
            LeaseAnswer::Failed(m) => return Err(Error::JobFailed(m)),
            LeaseAnswer::Wait => continue,
        };
        match &outcome {
            TaskOutcome::Success { .. } => {
                ctx.done.fetch_add(1, Ordering::Relaxed);
            }
            TaskOutcome::Failure { message, .. } => {
                tracing::warn!(task = %task, attempt = %attempt, "failed: {message}")
            }
        }
        if !ctx
            .report(report(me.worker, task, attempt, outcome))
            .await?
        {
            ctx.forget(me.worker).await;
        }
    }
}

/// Run a leased task: its outcome to report, or `None` when the lease was lost (nothing to
/// report). A worker stopped mid-task reports it if the coordinator answers soon, then
/// stops (a stopping worker must not outlive its grace period retrying).
async fn run_leased(
    ctx: &Ctx,
    me: &Welcome,
    received: crate::wire::Received,
    turn: tokio::sync::OwnedSemaphorePermit,
    stopping: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<Option<(TaskId, Attempt, TaskOutcome)>> {
    let (task, attempt) = (received.id(), received.attempt);
    let runner = Runner {
        client: &ctx.client,
        worker: me.worker,
        heartbeat: me.heartbeat_interval,
        stores: &ctx.stores,
        pool: &ctx.pool,
        memory_limit: ctx.opts.memory_limit,
        metrics: &ctx.metrics,
    };
    let end = runner.run(received, turn, stopping).await;
    let stopped = matches!(end, TaskEnd::Stopped);
    let Some(outcome) = end.outcome(&ctx.opts.name) else {
        tracing::warn!(task = %task, attempt = %attempt, "the lease was lost (this worker was too slow or unreachable); dropping the task");
        return Ok(None);
    };
    if stopped {
        let report = ctx.report(report(me.worker, task, attempt, outcome));
        let _ = tokio::time::timeout(STOP_REPORT_TIMEOUT, report).await;
        return Err(Error::Interrupted);
    }
    Ok(Some((task, attempt, outcome)))
}

fn report(worker: WorkerId, task: TaskId, attempt: Attempt, outcome: TaskOutcome) -> Report {
    Report {
        worker,
        task,
        attempt,
        outcome,
    }
}
