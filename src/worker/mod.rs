//! Cluster mode's worker: registers with the coordinator, leases tasks, runs them with the
//! embedded engine's executor, writes its piece of the output, and reports.
//!
//! Inputs come straight from object storage (credentials from this process's environment);
//! output goes to the file range or multipart parts the task names. Heartbeats renew the
//! lease while a task runs; a refused heartbeat (the lease expired and went to another
//! worker) stops the task. Losing the coordinator, the worker retries with backoff for a
//! bounded time, then exits non-zero so Kubernetes can act.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use object_store::PutPayload;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::exec::buffers::BufferPool;
use crate::exec::{run_task, Chunk, InputFiles, Progress};
use crate::security::AddToken;
use crate::shutdown::shutdown_signal;
use crate::store::Stores;
use crate::wire::{pb, task_from_wire, MAX_MESSAGE, PROTOCOL_VERSION};

type Client = pb::coordinator_client::CoordinatorClient<
    tonic::service::interceptor::InterceptedService<Channel, AddToken>,
>;

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
}

/// How a worker's run ended well.
#[derive(Debug)]
pub struct WorkerSummary {
    pub tasks_done: u64,
}

fn connect(opts: &WorkerOptions) -> Result<Client> {
    let bad = |m: String| Error::Usage(format!("--coordinator {}: {m}", opts.coordinator));
    let mut ep = Endpoint::from_shared(opts.coordinator.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    if opts.tls_ca.is_some() || opts.coordinator.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &opts.tls_ca {
            let pem =
                std::fs::read(ca).map_err(|e| bad(format!("cannot read {}: {e}", ca.display())))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        } else {
            tls = tls.with_enabled_roots();
        }
        ep = ep.tls_config(tls).map_err(|e| bad(e.to_string()))?;
    }
    Ok(pb::coordinator_client::CoordinatorClient::with_interceptor(
        ep.connect_lazy(),
        AddToken::new(opts.token.as_deref()),
    )
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE))
}

/// Serve gRPC health (always SERVING) until the returned guard is dropped. It says only
/// that this process is alive and responsive, so a liveness probe built on it never kills
/// a worker that is waiting for a restarting coordinator.
async fn serve_health(addr: std::net::SocketAddr) -> Result<AbortOnDrop> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Usage(format!("--health-listen {addr}: cannot listen: {e}")))?;
    let (_reporter, service) = tonic_health::server::health_reporter();
    let server = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    Ok(AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::warn!("the health endpoint stopped: {e}");
        }
    })))
}

/// Stops a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Ask a coordinator for its status (`mergefleet status`).
pub async fn status(
    url: &str,
    token: Option<&str>,
    tls_ca: Option<&std::path::Path>,
) -> Result<pb::StatusResponse> {
    let opts = WorkerOptions {
        coordinator: url.to_string(),
        token: token.map(str::to_string),
        tls_ca: tls_ca.map(|p| p.to_path_buf()),
        memory_limit: 0,
        threads: 0,
        name: String::new(),
        retry_for: Duration::ZERO,
        health_listen: None,
    };
    let mut client = connect(&opts)?;
    let call = tokio::time::timeout(STATUS_TIMEOUT, client.status(pb::StatusRequest {}));
    let answer = call.await.unwrap_or_else(|_| {
        Err(Status::deadline_exceeded(format!(
            "no answer within {} s",
            STATUS_TIMEOUT.as_secs()
        )))
    });
    match answer {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => Err(fatal_status(&s, url).unwrap_or_else(|| {
            Error::Unreachable(format!(
                "cannot reach the coordinator at {url}: {} (a coordinator exits once its merge has ended)",
                s.message()
            ))
        })),
    }
}

/// The longest `mergefleet status` waits for an answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest one call waits for an answer (lease long polls excepted).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Tracks how long the coordinator has been unreachable.
struct Backoff {
    since: Option<Instant>,
    delay: Duration,
    limit: Duration,
}

impl Backoff {
    fn new(limit: Duration) -> Self {
        Backoff {
            since: None,
            delay: Duration::from_millis(200),
            limit,
        }
    }
    fn ok(&mut self) {
        self.since = None;
        self.delay = Duration::from_millis(200);
    }
    /// Run one call, waiting no longer than the time left to retry (so an address that
    /// accepts connections but never answers cannot hold a worker past --retry-for).
    async fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let left = self
            .limit
            .saturating_sub(self.since.map_or(Duration::ZERO, |s| s.elapsed()))
            .clamp(Duration::from_secs(1), CALL_TIMEOUT);
        tokio::time::timeout(left, fut).await.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "no answer within {} s",
                left.as_secs()
            )))
        })
    }

    /// After a failed call: fail at once on an error no retry fixes, or when the
    /// coordinator has been gone too long; else sleep before the next try.
    async fn wait(&mut self, opts: &WorkerOptions, why: &Status) -> Result<()> {
        if let Some(e) = fatal_status(why, &opts.coordinator) {
            return Err(e);
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.limit {
            return Err(Error::Unreachable(format!(
                "lost the coordinator at {} for {} s ({}); giving up",
                opts.coordinator,
                self.limit.as_secs(),
                why.message()
            )));
        }
        tracing::warn!(
            "coordinator unreachable ({}); retrying in {} ms",
            why.message(),
            self.delay.as_millis()
        );
        // jitter: up to +50%, from the clock's low bits
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
        let jitter = nanos % (self.delay.as_millis() as u64 / 2 + 1);
        tokio::time::sleep(self.delay + Duration::from_millis(jitter)).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
        Ok(())
    }
}

/// Errors the coordinator gives that no retry can fix.
fn fatal_status(s: &Status, url: &str) -> Option<Error> {
    match s.code() {
        // A gRPC server, but not ours (a health port, another service): stop at once.
        Code::Unimplemented => Some(Error::Usage(format!(
            "{url} answers gRPC but is not a mergefleet coordinator ({}): check --coordinator",
            s.message()
        ))),
        Code::Unauthenticated => Some(Error::Usage(format!(
            "the coordinator refused this worker: {}",
            s.message()
        ))),
        Code::FailedPrecondition | Code::PermissionDenied | Code::InvalidArgument => {
            Some(Error::Usage(format!(
                "the coordinator refused this worker: {}",
                s.message()
            )))
        }
        // A certificate that does not verify will not start verifying: stop at once.
        _ if s.message().contains("certificate") => Some(Error::Usage(format!(
            "cannot verify the coordinator's TLS certificate ({}): give its CA with --tls-ca",
            s.message()
        ))),
        _ => None,
    }
}

/// What the task slots of one worker share.
struct Ctx {
    opts: WorkerOptions,
    client: Client,
    stores: Stores,
    pool: Arc<BufferPool>,
    /// This worker's id and heartbeat interval, once registered.
    registration: tokio::sync::Mutex<Option<(u64, Duration)>>,
    done: std::sync::atomic::AtomicU64,
    /// Set on SIGTERM/SIGINT: slots report their running task as failed and stop.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl Ctx {
    /// Register (once for all slots) and return the worker id and heartbeat interval.
    async fn registered(&self) -> Result<(u64, Duration)> {
        let mut reg = self.registration.lock().await;
        if let Some(r) = *reg {
            return Ok(r);
        }
        let mut backoff = Backoff::new(self.opts.retry_for);
        loop {
            let req = pb::RegisterRequest {
                protocol_version: PROTOCOL_VERSION,
                name: self.opts.name.clone(),
                memory_limit: self.opts.memory_limit,
                threads: self.opts.threads,
            };
            match backoff.call(self.client.clone().register(req)).await {
                Ok(r) => {
                    let r = r.into_inner();
                    tracing::info!(
                        worker = r.worker_id,
                        "registered with {}",
                        self.opts.coordinator
                    );
                    let got = (
                        r.worker_id,
                        Duration::from_millis(r.heartbeat_interval_ms.max(100)),
                    );
                    *reg = Some(got);
                    return Ok(got);
                }
                Err(s) => {
                    backoff.wait(&self.opts, &s).await?;
                }
            }
        }
    }

    /// The coordinator forgot worker `id` (it restarted): register again on next use.
    async fn forget(&self, id: u64) {
        let mut reg = self.registration.lock().await;
        if reg.is_some_and(|(cur, _)| cur == id) {
            tracing::info!(
                "the coordinator does not know this worker (it restarted?): registering again"
            );
            *reg = None;
        }
    }
}

/// Run until the coordinator says the merge is done (Ok) or failed (Err). `slots` tasks
/// run at once (so fetching one overlaps computing another); the coordinator keeps their
/// total working set within this worker's memory limit.
pub async fn run(opts: WorkerOptions, slots: usize) -> Result<WorkerSummary> {
    let client = connect(&opts)?;
    let _health = match opts.health_listen {
        Some(addr) => Some(serve_health(addr).await?),
        None => None,
    };
    let (stop_tx, stopping) = tokio::sync::watch::channel(false);
    let ctx = Arc::new(Ctx {
        pool: BufferPool::new((opts.memory_limit / 4) as usize),
        opts,
        client,
        stores: Stores::new(),
        registration: tokio::sync::Mutex::new(None),
        done: std::sync::atomic::AtomicU64::new(0),
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
                let r = r.unwrap_or_else(|e| Err(Error::Internal(format!("worker slot panicked: {e}"))));
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
    let mut client = ctx.client.clone();
    let mut backoff = Backoff::new(ctx.opts.retry_for);
    let mut stopping = ctx.stopping.clone();
    loop {
        if *stopping.borrow() {
            return Err(Error::Interrupted);
        }
        let (id, heartbeat) = ctx.registered().await?;
        let lease = tokio::select! {
            r = client.lease(pb::LeaseRequest { worker_id: id, wait_ms: 20_000 }) => r,
            _ = stopping.changed() => return Err(Error::Interrupted),
        };
        let outcome = match lease {
            Ok(r) => {
                backoff.ok();
                r.into_inner().outcome
            }
            Err(s) if s.code() == Code::NotFound => {
                ctx.forget(id).await;
                continue;
            }
            Err(s) => {
                backoff.wait(&ctx.opts, &s).await?;
                continue;
            }
        };
        use pb::lease_response::Outcome as O;
        let task = match outcome {
            Some(O::Task(task)) => task,
            Some(O::Done(_)) => return Ok(()),
            Some(O::Failed(m)) => return Err(Error::JobFailed(m)),
            Some(O::Wait(_)) | None => continue,
        };
        let (task_id, attempt) = (task.task_id, task.attempt);
        let span = tracing::info_span!("task", file = %task.file_name, task = task_id, attempt);
        let result = async {
            tracing::info!(tensors = task.tensors.len(), bytes = task.out_end - task.out_start, "running");
            let progress = Progress::new(task.out_end - task.out_start);
            let started = Instant::now();
            let r = tokio::select! {
                r = execute(&task, &ctx.stores, &ctx.pool, ctx.opts.memory_limit, progress.clone()) => Some(Ok(r)),
                _ = heartbeats(client.clone(), id, task_id, attempt, heartbeat, progress.clone()) => None,
                _ = stopping.changed() => Some(Err(())),
            };
            if let Some(Ok(Ok(_))) = &r {
                tracing::info!(secs = started.elapsed().as_secs_f64(), "done");
            }
            r
        }
        .instrument(span)
        .await;
        let result = match result {
            Some(Err(())) => {
                let failure = pb::report_request::Outcome::Failure(pb::Failure {
                    message: format!(
                        "worker {} was stopped (SIGTERM) while running the task",
                        ctx.opts.name
                    ),
                    retryable: true,
                    preempted: true,
                });
                let _ = report(&mut client, &ctx.opts, id, task_id, attempt, failure).await;
                return Err(Error::Interrupted);
            }
            Some(Ok(r)) => Some(r),
            None => None,
        };
        let outcome = match result {
            None => {
                tracing::warn!(task = task_id, attempt, "the lease was lost (this worker was too slow or unreachable); dropping the task");
                continue;
            }
            Some(Ok(parts)) => {
                ctx.done.fetch_add(1, Ordering::Relaxed);
                pb::report_request::Outcome::Success(pb::Success {
                    parts: parts
                        .into_iter()
                        .map(|(part, content_id)| pb::PartDone { part, content_id })
                        .collect(),
                })
            }
            Some(Err(e)) => {
                tracing::warn!(task = task_id, attempt, "failed: {e}");
                pb::report_request::Outcome::Failure(pb::Failure {
                    message: error_chain(&e),
                    retryable: e.is_retryable(),
                    preempted: false,
                })
            }
        };
        if !report(&mut client, &ctx.opts, id, task_id, attempt, outcome).await? {
            ctx.forget(id).await;
        }
    }
}

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

/// Send a report, retrying while the coordinator is unreachable. False when the
/// coordinator no longer knows this worker (register again).
async fn report(
    client: &mut Client,
    opts: &WorkerOptions,
    worker: u64,
    task: u64,
    attempt: u32,
    outcome: pb::report_request::Outcome,
) -> Result<bool> {
    let mut backoff = Backoff::new(opts.retry_for);
    loop {
        let req = pb::ReportRequest {
            worker_id: worker,
            task_id: task,
            attempt,
            outcome: Some(outcome.clone()),
        };
        match backoff.call(client.report(req)).await {
            Ok(_) => return Ok(true),
            Err(s) if s.code() == Code::NotFound => return Ok(false),
            Err(s) => {
                backoff.wait(opts, &s).await?;
            }
        }
    }
}

/// Renew the lease until the coordinator refuses it; returns then. Unreachable
/// coordinators are tolerated here (the task goes on; the report will retry).
async fn heartbeats(
    mut client: Client,
    worker: u64,
    task: u64,
    attempt: u32,
    every: Duration,
    progress: Arc<Progress>,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let req = pb::HeartbeatRequest {
            worker_id: worker,
            task_id: task,
            attempt,
            bytes_done: progress.bytes_written.load(Ordering::Relaxed),
        };
        match client.heartbeat(req).await {
            Ok(r) if !r.get_ref().keep_going => return,
            Ok(_) => {}
            Err(s) => tracing::debug!("heartbeat failed: {}", s.message()),
        }
    }
}

/// Run one task and write its output where the task says. Returns the multipart part ids.
async fn execute(
    t: &pb::Task,
    stores: &Stores,
    pool: &Arc<BufferPool>,
    memory_limit: u64,
    progress: Arc<Progress>,
) -> Result<Vec<(u32, String)>> {
    let crate::wire::Received {
        task,
        inputs: files,
        header,
    } = task_from_wire(t)?;
    let inputs = Arc::new(InputFiles::resolve(stores, &files, pool.clone())?);
    let out_range = task.out.clone();
    let (tx, mut rx) = mpsc::channel::<Chunk>(2);
    let producer = tokio::spawn(run_task(
        Arc::new(task),
        header.map(Arc::new),
        inputs,
        memory_limit,
        progress.clone(),
        tx,
        None,
    ));
    let target = t
        .output
        .as_ref()
        .and_then(|o| o.target.clone())
        .ok_or_else(|| crate::wire::WireError("task without an output".into()))?;
    let mut writer = OutputWriter::open(target, out_range, stores)?;
    let written = async {
        while let Some(chunk) = rx.recv().await {
            let n = chunk.data.len() as u64;
            writer.write(chunk.offset, chunk.data).await?;
            progress.written(n);
        }
        writer.finish().await
    }
    .await;
    let produced = producer
        .await
        .map_err(|e| Error::Internal(format!("task panicked: {e}")))?;
    produced?;
    // Fault injection for the cluster tests: hold the finished task (and its lease) a
    // while, so a test can kill or stop this worker mid-task deterministically.
    if let Some(ms) = std::env::var("MERGEFLEET_FAILPOINT_TASK_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        tracing::info!("failpoint: holding the task {ms} ms");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    written
}

/// Where a task's output goes: a byte range of a preallocated shared file, or multipart parts.
enum OutputWriter {
    File {
        file: Arc<std::fs::File>,
        path: String,
    },
    Parts(PartWriter),
}

struct PartWriter {
    store: Arc<dyn object_store::multipart::MultipartStore>,
    path: object_store::path::Path,
    url: String,
    upload_id: String,
    next_part: u32,
    part_size: u64,
    /// Bytes of the task's range not yet uploaded.
    remaining: u64,
    buf: BytesMut,
    done: Vec<(u32, String)>,
}

impl OutputWriter {
    fn open(
        target: pb::output::Target,
        range: std::ops::Range<u64>,
        stores: &Stores,
    ) -> Result<Self> {
        match target {
            pb::output::Target::LocalPath(path) => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| {
                        Error::Sink(crate::sink::SinkError::Io {
                            path: path.clone(),
                            source: std::io::Error::new(
                                e.kind(),
                                format!("{e} (is the output volume mounted on this worker?)"),
                            ),
                        })
                    })?;
                Ok(OutputWriter::File {
                    file: Arc::new(file),
                    path,
                })
            }
            pb::output::Target::Multipart(m) => {
                let loc = stores.resolve(&m.url)?;
                let store = loc.multipart.clone().ok_or_else(|| {
                    Error::Usage(format!(
                        "{} is not on a store with multipart uploads",
                        m.url
                    ))
                })?;
                Ok(OutputWriter::Parts(PartWriter {
                    store,
                    path: loc.prefix,
                    url: m.url,
                    upload_id: m.upload_id,
                    next_part: m.first_part,
                    part_size: m.part_size.max(1),
                    remaining: range.end - range.start,
                    buf: BytesMut::new(),
                    done: Vec::new(),
                }))
            }
        }
    }

    async fn write(&mut self, offset: u64, data: Bytes) -> Result<()> {
        match self {
            OutputWriter::File { file, path } => {
                let (file, path) = (file.clone(), path.clone());
                tokio::task::spawn_blocking(move || {
                    file.write_all_at(&data, offset)
                        .map_err(|source| Error::Sink(crate::sink::SinkError::Io { path, source }))
                })
                .await
                .map_err(|e| Error::Internal(format!("write task panicked: {e}")))?
            }
            OutputWriter::Parts(p) => p.push(data).await,
        }
    }

    async fn finish(self) -> Result<Vec<(u32, String)>> {
        match self {
            OutputWriter::File { .. } => Ok(Vec::new()),
            OutputWriter::Parts(p) => {
                if p.remaining != 0 || !p.buf.is_empty() {
                    return Err(Error::Internal(format!(
                        "{}: the task left {} bytes unwritten",
                        p.url, p.remaining
                    )));
                }
                Ok(p.done)
            }
        }
    }
}

impl PartWriter {
    async fn push(&mut self, mut data: Bytes) -> Result<()> {
        while !data.is_empty() {
            // The part being filled: `part_size`, or what is left for the last one.
            let target = self.part_size.min(self.remaining) as usize;
            if target == 0 {
                return Err(Error::Internal(format!(
                    "{}: a task wrote past its range",
                    self.url
                )));
            }
            if self.buf.is_empty() && data.len() == target {
                // A chunk that is exactly one part: upload without copying.
                self.remaining -= target as u64;
                return self.upload(data).await;
            }
            let take = (target - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data.split_to(take));
            if self.buf.len() == target {
                self.remaining -= target as u64;
                let part = self.buf.split().freeze();
                self.upload(part).await?;
            }
        }
        Ok(())
    }

    async fn upload(&mut self, part: Bytes) -> Result<()> {
        let n = self.next_part;
        let id = self
            .store
            .put_part(
                &self.path,
                &self.upload_id,
                n as usize,
                PutPayload::from_bytes(part),
            )
            .await
            .map_err(|source| {
                Error::Sink(crate::sink::SinkError::Store {
                    url: format!("{} (part {n})", self.url),
                    source,
                })
            })?;
        self.done.push((n, id.content_id));
        self.next_part += 1;
        Ok(())
    }
}
