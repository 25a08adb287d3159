//! Cluster mode's coordinator: plans the merge from headers, hands tasks to workers over
//! gRPC, completes each output file when its tasks are done, and commits the checkpoint.
//!
//! It never touches weights: workers fetch inputs from object storage and upload their part
//! of the output themselves. Its own state is small (one slot per task) and journaled in
//! the output location, so a restarted coordinator resumes without redoing finished work.

pub mod journal;
pub mod service;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, Notify};
use tonic::transport::Identity;

use crate::error::{Error, Result};
use crate::job::Job;
use crate::metrics::CoordinatorMetrics;
use crate::plan::{MergePlan, PlanOptions};
use crate::shutdown::shutdown_signal;
use crate::sink::cluster::ClusterOutput;
use crate::sink::lock::{Holder, OutputLock, RELEASE_WAIT, RELEASE_WAIT_FAILED};
use crate::sink::uploads::Uploads;
use crate::sink::{Sink, ABORT_DEADLINE};
use crate::store::{Location, Stores};
use crate::units::fmt_bytes;
use crate::wire::TaskId;
use journal::{fingerprint, Journal};
use state::{ClusterState, Phase, Reported, TaskNeeds};

/// Options of `mergefleet coordinator`.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    pub listen: SocketAddr,
    pub token: Option<String>,
    pub insecure: bool,
    /// PEM certificate and key: serve TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub plan: PlanOptions,
    pub max_attempts: u32,
    pub lease_timeout: Duration,
    /// Discard a journal of another merge (or of this one) and start over.
    pub restart: bool,
    pub overwrite: bool,
    pub copy_tokenizer: bool,
    pub model_card: bool,
    /// After the end, how long to keep answering so every worker learns the outcome.
    pub linger: Duration,
    /// Serve Prometheus metrics here (`GET /metrics`).
    pub metrics_listen: Option<SocketAddr>,
}

/// State shared by the gRPC service and the main loop.
pub struct Shared {
    pub state: Mutex<ClusterState>,
    /// Wakes long-polling lease calls when tasks or the phase change.
    pub changed: Notify,
    pub plan: Arc<MergePlan>,
    pub output: ClusterOutput,
    /// The record of the output's multipart uploads (object stores).
    pub uploads: Option<Arc<Uploads>>,
    pub journal: Mutex<Journal>,
    pub started: Instant,
    pub output_display: String,
    /// Side-file warnings, for the summary (embedded mode prints the same).
    pub warnings: Vec<String>,
    pub metrics: CoordinatorMetrics,
}

/// What a finished cluster merge did.
#[derive(Debug)]
pub struct ClusterSummary {
    pub output: String,
    pub tensors: usize,
    pub tasks: usize,
    pub resumed: usize,
    pub bytes_written: u64,
    pub seconds: f64,
    /// Time from the last task's report to the committed index.
    pub commit_seconds: f64,
    pub warnings: Vec<String>,
    /// Incomplete uploads of earlier merges aborted when this one took the output.
    pub uploads_aborted: usize,
    /// The output already held this merge's committed checkpoint (a coordinator restarted
    /// after its commit): nothing was written.
    pub already_committed: bool,
}

fn describe(plan: &MergePlan, i: usize) -> String {
    let t = &plan.tasks[i];
    let names: Vec<&str> = t.tensors.iter().map(|j| j.name.as_str()).collect();
    let tensors = match names.as_slice() {
        [] => "header only".to_string(),
        [one] => format!("tensor {one}"),
        [first, .., last] => format!("tensors {first} .. {last}"),
    };
    format!("task {i} ({}, {tensors})", plan.files[t.file].name)
}

fn check_security(opts: &CoordinatorOptions) -> Result<()> {
    if let Some(t) = &opts.token {
        crate::security::check_strength(t).map_err(Error::Usage)?;
    }
    if opts.token.is_none() {
        if !opts.insecure {
            return Err(Error::Usage(
                "refusing to start without a token: give --token-file or MERGEFLEET_TOKEN (or --insecure to run without authentication on loopback)".into(),
            ));
        }
        if !opts.listen.ip().is_loopback() && opts.tls.is_none() {
            return Err(Error::Usage(format!(
                "refusing to serve {} in plaintext without a token: anyone on the network could steer the merge. Give a token (and TLS), or listen on 127.0.0.1",
                opts.listen
            )));
        }
    }
    Ok(())
}

/// Run a cluster merge: serve until the checkpoint is committed or the merge fails.
///
/// Every check runs, and the port is bound, before the output is touched; then the output
/// is locked (one owner at a time), and only then read for a journal or written.
pub async fn run(config_yaml: &str, out: &str, opts: CoordinatorOptions) -> Result<ClusterSummary> {
    check_security(&opts)?;
    let started = Instant::now();
    let stores = Stores::new();
    let job = Job::load(config_yaml, &stores, opts.plan).await?;
    let location = stores.resolve(out)?;
    job.check_output(&location)?;
    let output = ClusterOutput::for_location(&location)?;
    for w in &job.plan.warnings {
        tracing::warn!("{w}");
    }
    let (listener, tls) = bind(&opts).await?;
    // The bucket and credentials now; an existing checkpoint is refused once the output is
    // ours and its journal read (a resumed merge has one, and no checkpoint yet).
    Sink::check(&location, true).await?;
    let holder = Holder::this_process("coordinator", Some(opts.listen.to_string()));
    let lock = OutputLock::acquire(&location, &holder).await?;
    let prepared = prepare(&job, &location, &output, &opts).await;
    let already_committed = matches!(prepared, Ok(Start::Committed));
    let mut uploads_aborted = 0;
    let served = match prepared {
        Ok(Start::Merge(journal, sink, warnings)) => {
            uploads_aborted = sink.uploads_aborted();
            serve(
                &job, journal, warnings, output, &location, &sink, listener, tls, &lock, &opts,
            )
            .await
        }
        Ok(Start::Committed) => {
            serve_committed(&job, output, &location, listener, tls, &opts).await
        }
        Err(e) => Err(e),
    };
    // A failed merge does not wait long on a store that may be gone: a lock left behind
    // goes stale, and the next coordinator of the same Job takes it over at once.
    lock.release_within(if served.is_ok() {
        RELEASE_WAIT
    } else {
        RELEASE_WAIT_FAILED
    })
    .await;
    let (shared, resumed, commit_seconds) = served?;
    Ok(ClusterSummary {
        already_committed,
        output: location.display.clone(),
        tensors: shared.plan.tensor_count(),
        tasks: shared.plan.tasks.len(),
        resumed,
        bytes_written: shared.plan.bytes_written(),
        seconds: started.elapsed().as_secs_f64(),
        commit_seconds,
        warnings: shared.warnings.clone(),
        uploads_aborted,
    })
}

/// Bind the port and load the TLS identity: failures here must leave the output untouched.
async fn bind(opts: &CoordinatorOptions) -> Result<(tokio::net::TcpListener, Option<Identity>)> {
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: opts.listen.to_string(),
            source,
        })?;
    let tls = match &opts.tls {
        Some((cert, key)) => {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|source| Error::ReadFile {
                    path: p.display().to_string(),
                    source,
                })
            };
            Some(Identity::from_pem(read(cert)?, read(key)?))
        }
        None => None,
    };
    Ok((listener, tls))
}

/// What the coordinator finds in its output before serving.
#[allow(clippy::large_enum_variant)] // one value per run
enum Start {
    /// Merge, or resume: the journal, the opened output and the side files' warnings.
    Merge(Journal, Sink, Vec<String>),
    /// This merge's checkpoint is already committed there.
    Committed,
}

/// Resume or start over, then write the side files and prepare every output file.
async fn prepare(
    job: &Job,
    location: &Location,
    output: &ClusterOutput,
    opts: &CoordinatorOptions,
) -> Result<Start> {
    let fp = fingerprint(&job.config, &job.plan);
    let mut journal = match Journal::load(location).await? {
        Some(old) if old.fingerprint == fp && !opts.restart => {
            tracing::info!(
                "resuming from the journal in {}: {} task(s) already done",
                location.display,
                old.done.len()
            );
            old
        }
        Some(old) => {
            if !opts.restart {
                return Err(Error::Usage(format!(
                    "{} holds the resume journal of a different merge (the config, the inputs or the layout changed); pass --restart to discard it and start over",
                    location.display
                )));
            }
            tracing::info!("--restart: discarding the journal in {}", location.display);
            old.abort_open(output, &job.plan).await;
            Journal::remove(location).await;
            Journal::new(fp)
        }
        None if !opts.overwrite && !opts.restart && job.is_committed_at(location).await? => {
            tracing::info!(
                "{} already holds this merge's committed checkpoint (restarted after the commit?): nothing to do",
                location.display
            );
            return Ok(Start::Committed);
        }
        None => Journal::new(fp),
    };
    // Uploads earlier merges left under the output are aborted, but this journal's.
    let resume = journal.uploads.values().cloned().collect();
    let sink = Sink::open(location.clone(), opts.overwrite, &resume).await?;
    let warnings = job
        .write_side_files(&sink, opts.copy_tokenizer, opts.model_card)
        .await?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    journal
        .prepare_files(output, &job.plan, sink.uploads().as_deref())
        .await?;
    journal.save(location).await?;
    Ok(Start::Merge(journal, sink, warnings))
}

/// Serve workers until the merge ends; on failure, give the output up cleanly.
#[allow(clippy::too_many_arguments)]
async fn serve(
    job: &Job,
    journal: Journal,
    warnings: Vec<String>,
    output: ClusterOutput,
    location: &Location,
    sink: &Sink,
    listener: tokio::net::TcpListener,
    tls: Option<Identity>,
    lock: &OutputLock,
    opts: &CoordinatorOptions,
) -> Result<(Arc<Shared>, usize, f64)> {
    let resumed = journal.done.len();
    let shared = shared_state(
        job,
        journal,
        warnings,
        (output, sink.uploads()),
        location,
        opts,
    );
    let (server, events) = start_server(&shared, listener, tls, opts).await?;
    tracing::info!(
        "coordinator listening on {}: {} tasks ({} already done), {} files, {} to write",
        opts.listen,
        shared.plan.tasks.len(),
        resumed,
        shared.plan.files.len(),
        fmt_bytes(shared.plan.bytes_written())
    );
    let outcome = tokio::select! {
        r = main_loop(&shared, job, sink, location, events) => r,
        // A failure reported while the loop waits on the store (completing a file, saving
        // the journal) ends the merge now, not after that call's retry budget.
        m = failure(&shared) => Err(Error::Cluster(m)),
        loss = lock.lost() => Err(loss.into_error(&location.display)),
    };
    let commit_seconds = match &outcome {
        Ok(s) => *s,
        Err(Error::Interrupted) => {
            tracing::warn!("interrupted: uploads and the journal are kept; start the coordinator again to resume");
            0.0
        }
        Err(Error::OutputLost(_)) => 0.0,
        Err(e) => {
            // Workers hear it at once (heartbeats are refused, leases answer the failure)
            // while the uploads are aborted (within the abort deadline): a merge whose
            // store died exits within the retry budget plus that deadline.
            shared.state.lock().expect("state").fail(e.to_string());
            shared.changed.notify_waiters();
            let linger = tokio::time::timeout(ABORT_DEADLINE, linger(&shared, opts.linger));
            let _ = tokio::join!(give_up(&shared, location), linger);
            0.0
        }
    };
    shared.changed.notify_waiters();
    // Fault injection for the tests: stay up a while after the end (metrics scraped in the
    // final state, deterministically).
    if let Some(ms) = std::env::var("MERGEFLEET_FAILPOINT_AFTER_END_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if outcome.is_ok() {
        linger(&shared, opts.linger).await;
    }
    server.stop(Duration::from_secs(5)).await;
    let commit_seconds = outcome.map(|_| commit_seconds)?;
    Ok((shared, resumed, commit_seconds))
}

/// Resolves with the failure's message once the merge has failed.
async fn failure(shared: &Shared) -> String {
    loop {
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if let Phase::Failed(m) = shared.state.lock().expect("state").phase() {
            return m.clone();
        }
        changed.await;
    }
}

/// The state of one coordinator run: every task, those in `journal` already done.
fn shared_state(
    job: &Job,
    journal: Journal,
    warnings: Vec<String>,
    (output, uploads): (ClusterOutput, Option<Arc<Uploads>>),
    location: &Location,
    opts: &CoordinatorOptions,
) -> Arc<Shared> {
    let plan = Arc::new(job.plan.clone());
    let describe_plan = Arc::clone(&plan);
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(1);
    let mut state = ClusterState::new(
        epoch,
        (0..plan.tasks.len())
            .map(|i| TaskNeeds::of(&plan.tasks[i], output.write_buffer(&plan, i)))
            .collect(),
        opts.max_attempts,
        opts.lease_timeout,
        Box::new(move |i| describe(&describe_plan, i)),
    );
    for (task, parts) in &journal.done {
        state.restore_done(TaskId(*task), parts.clone());
    }
    Arc::new(Shared {
        state: Mutex::new(state),
        changed: Notify::new(),
        plan,
        output,
        uploads,
        warnings,
        journal: Mutex::new(journal),
        started: Instant::now(),
        output_display: location.display.clone(),
        metrics: CoordinatorMetrics::default(),
    })
}

/// Serve the gRPC API over `shared`; the receiver gets what each report did.
async fn start_server(
    shared: &Arc<Shared>,
    listener: tokio::net::TcpListener,
    tls: Option<Identity>,
    opts: &CoordinatorOptions,
) -> Result<(
    crate::wire::server::Running,
    mpsc::UnboundedReceiver<Reported>,
)> {
    if let Some(addr) = opts.metrics_listen {
        let for_scrape = shared.clone();
        crate::metrics::serve(addr, shared.metrics.registry(), move || {
            refresh_metrics(&for_scrape)
        })
        .await?;
    }
    let (events_tx, events) = mpsc::unbounded_channel();
    let svc = service::Service {
        shared: shared.clone(),
        events: events_tx,
    };
    let server = crate::wire::server::spawn(Arc::new(svc), listener, tls, opts.token.clone())
        .await
        .map_err(|source| Error::Transport {
            what: "bad TLS certificate or key".into(),
            source,
        })?;
    Ok((server, events))
}

/// The checkpoint is already committed: answer "done" to the workers of this merge that
/// still ask (they would otherwise retry an absent coordinator, then fail their pods).
async fn serve_committed(
    job: &Job,
    output: ClusterOutput,
    location: &Location,
    listener: tokio::net::TcpListener,
    tls: Option<Identity>,
    opts: &CoordinatorOptions,
) -> Result<(Arc<Shared>, usize, f64)> {
    let mut journal = Journal::new(fingerprint(&job.config, &job.plan));
    journal.done = (0..job.plan.tasks.len()).map(|t| (t, Vec::new())).collect();
    let shared = shared_state(job, journal, Vec::new(), (output, None), location, opts);
    shared.state.lock().expect("state").mark_committed();
    let (server, _events) = start_server(&shared, listener, tls, opts).await?;
    tracing::info!(
        "coordinator listening on {}: the merge is already committed; telling workers that still ask",
        opts.listen
    );
    // The workers of the merge may be in backoff (seconds between tries) and none has
    // registered yet: answer for the whole --linger, not only until no one is waiting.
    tokio::time::sleep(opts.linger).await;
    server.stop(Duration::from_secs(5)).await;
    let tasks = shared.plan.tasks.len();
    Ok((shared, tasks, 0.0))
}

/// A failed merge: abort the uploads concurrently under one deadline. The journal goes only
/// when nothing is left open; otherwise it keeps the upload ids, so running the coordinator
/// again (same config: resume; `--restart`: abort them) can clean up.
async fn give_up(shared: &Shared, location: &Location) {
    let journal = shared.journal.lock().expect("journal").clone();
    let left = journal.abort_open(&shared.output, &shared.plan).await;
    if !left.is_empty() {
        // Kept in the journal and the upload record: the next merge here aborts them. A
        // store that did not take the aborts is not asked to update either.
        let ids: Vec<String> = left.iter().map(|(f, id)| format!("{f}: {id}")).collect();
        tracing::warn!(
            "{} upload(s) may still be open under {} (upload ids kept in its journal: {}); run the coordinator again to resume, or with --restart to abort them",
            left.len(),
            location.display,
            ids.join(", ")
        );
        return;
    }
    let gone: Vec<&str> = journal.uploads.values().map(String::as_str).collect();
    let tidy = async {
        if let Some(uploads) = &shared.uploads {
            if let Err(e) = uploads.closed(&gone).await {
                tracing::warn!("could not update the upload record: {e}");
            }
        }
        Journal::remove(location).await;
    };
    if tokio::time::timeout(ABORT_DEADLINE, tidy).await.is_err() {
        tracing::warn!(
            "could not remove the journal in {} in time",
            location.display
        );
    }
}

/// Keep answering until every worker that will still ask has been told the outcome (one
/// that registers during the linger too), or `max` passes. Killed workers are not waited for.
/// At least one worker retry period passes first (within `max`): a worker that could not
/// reach this coordinator yet (in backoff, never registered) comes back within it.
async fn linger(shared: &Shared, max: Duration) {
    let start = Instant::now();
    let until = start + max;
    let least = start + (crate::wire::WORKER_MAX_RETRY_DELAY + Duration::from_secs(1)).min(max);
    while Instant::now() < until {
        let waiting = shared
            .state
            .lock()
            .expect("state")
            .workers_to_tell(Instant::now());
        if waiting == 0 && Instant::now() >= least {
            // Give the last answers time to leave.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How often, at most, the journal is written while tasks finish.
const JOURNAL_EVERY: Duration = Duration::from_secs(2);

/// Handle reports, expire leases, complete files, commit. Returns the seconds from the
/// last task's report to the commit.
async fn main_loop(
    shared: &Shared,
    job: &Job,
    sink: &Sink,
    location_journal: &Location,
    mut events: mpsc::UnboundedReceiver<Reported>,
) -> Result<f64> {
    let plan = &shared.plan;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_log = Instant::now();
    let (mut unsaved, mut last_save) = (false, Instant::now());
    let signal = shutdown_signal();
    tokio::pin!(signal);
    // Files whose tasks were all done before a restart, but not yet completed.
    for f in 0..plan.files.len() {
        complete_file_if_done(shared, f).await?;
    }
    loop {
        let phase = shared.state.lock().expect("state").phase().clone();
        match phase {
            Phase::Failed(m) => return Err(Error::Cluster(m)),
            Phase::Committing => match commit(shared, job, sink, location_journal).await? {
                Some(seconds) => return Ok(seconds),
                None => continue, // a file's upload was lost and its tasks are queued again
            },
            Phase::Done => return Ok(0.0),
            Phase::Running => {}
        }
        tokio::select! {
            ev = events.recv() => {
                let mut batch = vec![ev];
                while let Ok(e) = events.try_recv() {
                    batch.push(Some(e));
                }
                for ev in batch.into_iter().flatten() {
                    if let Reported::Finished(task) = ev {
                        finished(shared, task).await?;
                        unsaved = true;
                    }
                }
            }
            _ = tick.tick() => {
                expire_leases(shared);
                if last_log.elapsed() >= Duration::from_secs(10) {
                    last_log = Instant::now();
                    log_progress(shared);
                }
            }
            _ = &mut signal => {
                // Keep what finished since the last save; a failed save only costs redoing it.
                let j = shared.journal.lock().expect("journal").clone();
                if let Err(e) = j.save(location_journal).await {
                    tracing::warn!("could not save the journal on the way out: {e}");
                }
                return Err(Error::Interrupted);
            }
        }
        // At most one journal write per JOURNAL_EVERY: at 671B scale it lists ~46,000 tasks,
        // and a task finished after the last save is merely run again after a restart.
        if unsaved && last_save.elapsed() >= JOURNAL_EVERY {
            save_journal(shared, location_journal).await?;
            unsaved = false;
            last_save = Instant::now();
        }
    }
}

/// Leases past their deadline go back to the queue, and the workers waiting are told.
fn expire_leases(shared: &Shared) {
    let expired = shared.state.lock().expect("state").tick(Instant::now());
    shared.metrics.lease_expiries.inc_by(expired.len() as u64);
    for t in &expired {
        tracing::warn!(
            "{}: lease expired (worker lost or stalled); the task goes back to the queue",
            describe(&shared.plan, t.0)
        );
    }
    if !expired.is_empty() {
        shared.changed.notify_waiters();
    }
}

async fn save_journal(shared: &Shared, location_journal: &Location) -> Result<()> {
    let started = Instant::now();
    let j = shared.journal.lock().expect("journal").clone();
    let bytes = j.save(location_journal).await?;
    tracing::debug!(
        tasks = j.done.len(),
        bytes,
        ms = started.elapsed().as_secs_f64() * 1e3,
        "journal saved"
    );
    Ok(())
}

/// Every task is done: complete the files not yet complete, then commit the checkpoint.
/// Returns the seconds this took, or None when a file's upload was lost and its tasks are
/// queued again.
async fn commit(
    shared: &Shared,
    job: &Job,
    sink: &Sink,
    location_journal: &Location,
) -> Result<Option<f64>> {
    let last_report = Instant::now();
    for f in 0..shared.plan.files.len() {
        complete_file_if_done(shared, f).await?;
    }
    if *shared.state.lock().expect("state").phase() != Phase::Committing {
        return Ok(None);
    }
    job.commit(sink).await?;
    if let Some(uploads) = &shared.uploads {
        // Every upload of this merge is complete: nothing is left for a later merge to abort.
        let journal = shared.journal.lock().expect("journal").clone();
        let ids: Vec<&str> = journal.uploads.values().map(String::as_str).collect();
        uploads.committed(&ids).await;
    }
    Journal::remove(location_journal).await;
    shared.state.lock().expect("state").mark_committed();
    shared.changed.notify_waiters();
    tracing::info!(
        "committed {} ({} files)",
        shared.output_display,
        shared.plan.files.len()
    );
    Ok(Some(last_report.elapsed().as_secs_f64()))
}

/// A task finished: journal it and complete its file if that was the file's last task.
async fn finished(shared: &Shared, task: TaskId) -> Result<()> {
    let Some(parts) = shared
        .state
        .lock()
        .expect("state")
        .parts(task)
        .map(<[_]>::to_vec)
    else {
        return Ok(());
    };
    shared
        .journal
        .lock()
        .expect("journal")
        .done
        .insert(task.0, parts);
    complete_file_if_done(shared, shared.plan.tasks[task.0].file).await
}

/// The task and byte gauges, from the state (at each scrape).
fn refresh_metrics(shared: &Shared) {
    let st = shared.state.lock().expect("state");
    let (done, running, pending) = st.counts();
    let m = &shared.metrics;
    for (state, n) in [("done", done), ("running", running), ("pending", pending)] {
        m.tasks
            .get_or_create(&crate::metrics::StateLabel { state })
            .set(n as i64);
    }
    m.workers.set(st.workers().count() as i64);
    m.output_bytes_done.set(st.bytes_done() as i64);
    m.output_bytes_total.set(shared.plan.bytes_written() as i64);
}

fn log_progress(shared: &Shared) {
    let st = shared.state.lock().expect("state");
    let (done, running, pending) = st.counts();
    let bytes = st.bytes_done();
    let total = shared.plan.bytes_written();
    let secs = shared.started.elapsed().as_secs_f64();
    let (rate, eta) = crate::units::rate_and_eta(bytes, total, secs);
    tracing::info!(
        "progress: {done}/{} tasks done, {running} running, {pending} pending; {} of {} written ({}/s, ETA {}); {} worker(s)",
        st.task_count(),
        fmt_bytes(bytes),
        fmt_bytes(total),
        fmt_bytes(rate as u64),
        crate::units::fmt_eta(eta),
        st.workers().count()
    );
}

/// Complete output file `f` if all its tasks are done and it is not complete yet.
async fn complete_file_if_done(shared: &Shared, f: usize) -> Result<()> {
    let plan = &shared.plan;
    let file = &plan.files[f];
    let parts = {
        let st = shared.state.lock().expect("state");
        let mut parts = Vec::new();
        for t in file.tasks.clone() {
            match st.parts(TaskId(t)) {
                Some(p) => parts.extend(p.iter().cloned()),
                None => return Ok(()),
            }
        }
        parts
    };
    // Only what this file needs from the journal (a copy of it all grows with its parts).
    let upload = {
        let j = shared.journal.lock().expect("journal");
        if j.completed_files.contains(&file.name) {
            return Ok(());
        }
        j.uploads.get(&file.name).cloned().unwrap_or_default()
    };
    let part_count = parts.len();
    if !shared
        .output
        .complete(&file.name, file.size, parts, &upload)
        .await?
    {
        // The upload is gone: start it again and redo the file's tasks.
        let id = shared
            .output
            .new_upload(&file.name, shared.uploads.as_deref())
            .await?;
        {
            let mut j = shared.journal.lock().expect("journal");
            j.uploads.insert(file.name.clone(), id);
            for t in file.tasks.clone() {
                j.done.remove(&t);
            }
        }
        shared.state.lock().expect("state").redo(file.tasks.clone());
        shared.changed.notify_waiters();
        return Ok(());
    }
    shared
        .journal
        .lock()
        .expect("journal")
        .completed_files
        .insert(file.name.clone());
    tracing::info!(parts = part_count, "output file {} complete", file.name);
    Ok(())
}
