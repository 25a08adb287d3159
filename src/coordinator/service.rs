//! The coordinator's side of the gRPC contract, in domain terms: turns calls into steps of
//! the state machine and tells the coordinator's main loop what happened.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tonic::Status;

use super::state::{Lease, Outcome, Phase, Reported};
use super::Shared;
use crate::units::fmt_bytes;
use crate::wire::{
    task_to_wire, Attempt, CoordinatorApi, Heartbeat, Hello, LeaseAnswer, OutgoingTask, Report,
    StatusReport, TaskId, TaskOutcome, Welcome, WorkerId, WorkerStatus, PROTOCOL_VERSION,
};

/// Longest a lease call waits for a task.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// The longest between two heartbeats of a running task (a quarter of the lease timeout
/// when shorter): a task moved to an idle worker stops on its old one within it.
const HEARTBEAT_MAX: Duration = super::state::MOVE_WITHIN;

pub struct Service {
    pub shared: Arc<Shared>,
    pub events: mpsc::UnboundedSender<Reported>,
}

impl CoordinatorApi for Service {
    fn register(&self, r: Hello) -> Result<Welcome, Status> {
        if r.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "worker `{}` speaks protocol version {} but this coordinator speaks {}: run the same mergefleet version everywhere",
                r.name, r.protocol_version, PROTOCOL_VERSION
            )));
        }
        let mut st = self.shared.state.lock().expect("state");
        // A worker too small for a task would wait forever: refuse it now, saying how much
        // it needs (workers of one Job are alike, so this is a configuration error).
        if let Some((task, need)) = st.most_memory_needed() {
            if r.memory_limit < need {
                return Err(Status::failed_precondition(format!(
                    "worker `{}` has {} for tasks, but {} needs at least {} even when streamed: give workers --memory-limit {} or more",
                    r.name,
                    fmt_bytes(r.memory_limit),
                    st.describe(task),
                    fmt_bytes(need),
                    fmt_bytes(crate::memory::limit_for_task_budget(need))
                )));
            }
        }
        let id = st.register(&r.name, r.memory_limit, r.threads, Instant::now());
        let lease = st.lease_timeout();
        tracing::info!(worker = %id, name = %r.name, memory = r.memory_limit, threads = r.threads, "worker registered");
        Ok(Welcome {
            worker: id,
            heartbeat_interval: (lease / 4).min(HEARTBEAT_MAX),
            lease_timeout: lease,
        })
    }

    async fn lease(
        &self,
        worker: WorkerId,
        wait: Duration,
    ) -> Result<LeaseAnswer<OutgoingTask>, Status> {
        let asked = Instant::now();
        let deadline = asked + wait.min(MAX_WAIT);
        let _polling = Polling::start(&self.shared, worker);
        loop {
            // Register interest before looking, so a change between the look and the wait
            // is not missed.
            let notified = self.shared.changed.notified();
            let decision = self
                .shared
                .state
                .lock()
                .expect("state")
                .lease(worker, Instant::now());
            return Ok(match decision {
                Lease::Task { task, attempt } => {
                    let m = &self.shared.metrics;
                    m.leases.inc();
                    m.lease_wait_seconds.observe(asked.elapsed().as_secs_f64());
                    LeaseAnswer::Task(self.outgoing(task, attempt, worker))
                }
                Lease::Done => LeaseAnswer::Done,
                Lease::Failed(m) => LeaseAnswer::Failed(m),
                Lease::UnknownWorker => {
                    return Err(Status::not_found(
                        "unknown worker (the coordinator restarted or forgot it): register again",
                    ))
                }
                Lease::Wait => {
                    let now = Instant::now();
                    if now >= deadline {
                        LeaseAnswer::Wait
                    } else {
                        let _ = tokio::time::timeout(deadline - now, notified).await;
                        continue;
                    }
                }
            });
        }
    }

    fn heartbeat(&self, b: Heartbeat) -> bool {
        let mut st = self.shared.state.lock().expect("state");
        let keep = st.heartbeat(b.worker, b.task, b.attempt, Instant::now());
        if keep && b.bytes_done > 0 {
            st.writing(b.worker, b.task);
        }
        keep
    }

    fn report(&self, r: Report) -> Result<(), Status> {
        let outcome = match r.outcome {
            TaskOutcome::Success { parts } => Outcome::Success {
                parts: parts.into_iter().map(|p| (p.part, p.content_id)).collect(),
            },
            TaskOutcome::Failure {
                message,
                preempted: true,
                ..
            } => Outcome::Preempted { message },
            TaskOutcome::Failure {
                message, retryable, ..
            } => Outcome::Failure { message, retryable },
        };
        let preempted = matches!(outcome, Outcome::Preempted { .. });
        let (reported, worker_name) = {
            let mut st = self.shared.state.lock().expect("state");
            let reported = st.report(r.worker, r.task, r.attempt, outcome, Instant::now());
            (reported, st.worker_name(r.worker))
        };
        self.count(&reported, preempted, worker_name);
        match &reported {
            Reported::Stale => tracing::info!(
                task = %r.task,
                attempt = %r.attempt,
                worker = %r.worker,
                "ignoring a stale report"
            ),
            Reported::Retrying(t) => tracing::warn!(
                task = %t,
                attempt = %r.attempt,
                "task failed; it will be retried"
            ),
            _ => {}
        }
        let _ = self.events.send(reported);
        self.shared.changed.notify_waiters();
        Ok(())
    }

    fn status(&self) -> StatusReport {
        let st = self.shared.state.lock().expect("state");
        let (done, running, pending) = st.counts();
        let now = Instant::now();
        let state = match st.phase() {
            Phase::Running => "running".to_string(),
            Phase::Committing => "committing".to_string(),
            Phase::Done => "done".to_string(),
            Phase::Failed(m) => format!("failed: {m}"),
        };
        StatusReport {
            state,
            output: self.shared.output_display.clone(),
            tasks_total: st.task_count() as u64,
            tasks_done: done as u64,
            tasks_running: running as u64,
            tasks_pending: pending as u64,
            bytes_total: self.shared.plan.bytes_written(),
            bytes_done: st.bytes_done(),
            elapsed_s: self.shared.started.elapsed().as_secs_f64(),
            workers: st
                .workers()
                .map(|(id, w)| WorkerStatus {
                    worker: id,
                    name: w.name.clone(),
                    last_heartbeat_s_ago: now.duration_since(w.last_seen).as_secs_f64(),
                    task: w.tasks.first().map(|(t, _)| *t),
                    tasks_done: w.tasks_done,
                })
                .collect(),
        }
    }
}

/// Marks a worker as waiting in a lease call until dropped (answered, or the call cancelled).
struct Polling<'a> {
    shared: &'a Shared,
    worker: WorkerId,
}

impl<'a> Polling<'a> {
    fn start(shared: &'a Shared, worker: WorkerId) -> Self {
        shared.state.lock().expect("state").polling(worker, true);
        Polling { shared, worker }
    }
}

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.polling(self.worker, false);
        }
    }
}

impl Service {
    /// Count a report in the metrics: its outcome, and a finished task's bytes for its worker.
    fn count(&self, reported: &Reported, preempted: bool, worker: Option<String>) {
        let m = &self.shared.metrics;
        match reported {
            Reported::Stale => m.report("stale"),
            Reported::Finished(task) => {
                m.report("done");
                if let Some(worker) = worker {
                    let t = &self.shared.plan.tasks[task.0];
                    let label = crate::metrics::WorkerLabel { worker };
                    m.worker_output_bytes
                        .get_or_create(&label)
                        .inc_by(t.out.end - t.out.start);
                    m.worker_tasks.get_or_create(&label).inc();
                }
            }
            Reported::Retrying(_) if preempted => m.report("preempted"),
            Reported::Retrying(_) => m.report("failed"),
            Reported::JobFailed(_) => m.report("fatal"),
        }
    }

    /// Task `task`'s lease for `worker`, encoded with where its bytes go.
    fn outgoing(&self, task: TaskId, attempt: Attempt, worker: WorkerId) -> OutgoingTask {
        let plan = &self.shared.plan;
        let target = {
            let journal = self.shared.journal.lock().expect("journal");
            journal.target(&self.shared.output, plan, task.0)
        };
        let file = &plan.files[plan.tasks[task.0].file].name;
        tracing::info!(task = %task, attempt = %attempt, worker = %worker, file = %file, "task leased");
        task_to_wire(plan, task, attempt, &target)
    }
}
