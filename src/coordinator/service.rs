//! The coordinator's gRPC service: a thin shell that turns RPCs into calls on the state
//! machine and tells the coordinator's main loop what happened.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::state::{Lease, Outcome, Phase, Reported};
use super::Shared;
use crate::units::fmt_bytes;
use crate::wire::{pb, task_to_wire, PROTOCOL_VERSION};

/// Longest a lease call waits for a task.
const MAX_WAIT: Duration = Duration::from_secs(30);

pub struct Service {
    pub shared: Arc<Shared>,
    pub events: mpsc::UnboundedSender<Reported>,
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Service {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
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
                    fmt_bytes(crate::units::limit_for_task_budget(need))
                )));
            }
        }
        let id = st.register(&r.name, r.memory_limit, r.threads, Instant::now());
        let lease = st.lease_timeout;
        tracing::info!(worker = id, name = %r.name, memory = r.memory_limit, threads = r.threads, "worker registered");
        Ok(Response::new(pb::RegisterResponse {
            worker_id: id,
            heartbeat_interval_ms: (lease / 4).as_millis() as u64,
            lease_timeout_ms: lease.as_millis() as u64,
        }))
    }

    async fn lease(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let r = req.into_inner();
        let deadline = Instant::now() + Duration::from_millis(r.wait_ms).min(MAX_WAIT);
        loop {
            // Register interest before looking, so a change between the look and the wait
            // is not missed.
            let notified = self.shared.changed.notified();
            let decision = self
                .shared
                .state
                .lock()
                .expect("state")
                .lease(r.worker_id, Instant::now());
            use pb::lease_response::Outcome as O;
            let outcome = match decision {
                Lease::Task { task, attempt } => {
                    let plan = &self.shared.plan;
                    let t = &plan.tasks[task];
                    let target = {
                        let journal = self.shared.journal.lock().expect("journal");
                        self.shared.output.target(plan, t, &journal)
                    };
                    tracing::info!(task, attempt, worker = r.worker_id, file = %plan.files[t.file].name, "task leased");
                    O::Task(task_to_wire(plan, task, attempt, target))
                }
                Lease::Done => O::Done(pb::Empty {}),
                Lease::Failed(m) => O::Failed(m),
                Lease::UnknownWorker => {
                    return Err(Status::not_found(
                        "unknown worker (the coordinator restarted or forgot it): register again",
                    ))
                }
                Lease::Wait => {
                    let now = Instant::now();
                    if now >= deadline {
                        O::Wait(pb::Empty {})
                    } else {
                        let _ = tokio::time::timeout(deadline - now, notified).await;
                        continue;
                    }
                }
            };
            return Ok(Response::new(pb::LeaseResponse {
                outcome: Some(outcome),
            }));
        }
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let mut st = self.shared.state.lock().expect("state");
        let keep_going = st.heartbeat(r.worker_id, r.task_id as usize, r.attempt, Instant::now());
        Ok(Response::new(pb::HeartbeatResponse { keep_going }))
    }

    async fn report(
        &self,
        req: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let r = req.into_inner();
        let outcome = match r.outcome {
            Some(pb::report_request::Outcome::Success(s)) => Outcome::Success {
                parts: s
                    .parts
                    .into_iter()
                    .map(|p| (p.part, p.content_id))
                    .collect(),
            },
            Some(pb::report_request::Outcome::Failure(f)) if f.preempted => {
                Outcome::Preempted { message: f.message }
            }
            Some(pb::report_request::Outcome::Failure(f)) => Outcome::Failure {
                message: f.message,
                retryable: f.retryable,
            },
            None => return Err(Status::invalid_argument("a report needs an outcome")),
        };
        let reported = self.shared.state.lock().expect("state").report(
            r.worker_id,
            r.task_id as usize,
            r.attempt,
            outcome,
            Instant::now(),
        );
        match &reported {
            Reported::Stale => tracing::info!(
                task = r.task_id,
                attempt = r.attempt,
                worker = r.worker_id,
                "ignoring a stale report"
            ),
            Reported::Retrying(t) => tracing::warn!(
                task = t,
                attempt = r.attempt,
                "task failed; it will be retried"
            ),
            _ => {}
        }
        let _ = self.events.send(reported);
        self.shared.changed.notify_waiters();
        Ok(Response::new(pb::ReportResponse {}))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let st = self.shared.state.lock().expect("state");
        let (done, running, pending) = st.counts();
        let now = Instant::now();
        let state = match &st.phase {
            Phase::Running => "running".to_string(),
            Phase::Committing => "committing".to_string(),
            Phase::Done => "done".to_string(),
            Phase::Failed(m) => format!("failed: {m}"),
        };
        Ok(Response::new(pb::StatusResponse {
            state,
            tasks_total: st.tasks.len() as u64,
            tasks_done: done as u64,
            tasks_running: running as u64,
            tasks_pending: pending as u64,
            bytes_total: self.shared.plan.bytes_written(),
            bytes_done: st.bytes_done(),
            elapsed_s: self.shared.started.elapsed().as_secs_f64(),
            output: self.shared.output_display.clone(),
            workers: st
                .workers
                .iter()
                .map(|(id, w)| pb::WorkerStatus {
                    worker_id: *id,
                    name: w.name.clone(),
                    last_heartbeat_s_ago: now.duration_since(w.last_seen).as_secs_f64(),
                    task_id: w.tasks.first().map(|(t, _)| *t as i64).unwrap_or(-1),
                    tasks_done: w.tasks_done,
                })
                .collect(),
        }))
    }
}
