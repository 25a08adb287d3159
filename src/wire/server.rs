//! Serving a [`CoordinatorApi`] over gRPC: the tonic service that decodes requests into
//! domain calls and encodes the answers, plus the standard health service, the token check
//! and TLS.

use std::sync::Arc;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use super::{
    pb, Attempt, CoordinatorApi, Heartbeat, Hello, LeaseAnswer, PartDone, Report, TaskId,
    TaskOutcome, WorkerId, MAX_MESSAGE,
};
use crate::security::CheckToken;

/// The tonic face of a [`CoordinatorApi`].
struct Adapter<A>(Arc<A>);

#[tonic::async_trait]
impl<A: CoordinatorApi> pb::coordinator_server::Coordinator for Adapter<A> {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        let w = self.0.register(Hello {
            protocol_version: r.protocol_version,
            name: r.name,
            memory_limit: r.memory_limit,
            threads: r.threads,
        })?;
        Ok(Response::new(pb::RegisterResponse {
            worker_id: w.worker.0,
            heartbeat_interval_ms: w.heartbeat_interval.as_millis() as u64,
            lease_timeout_ms: w.lease_timeout.as_millis() as u64,
        }))
    }

    async fn lease(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let r = req.into_inner();
        let answer = self
            .0
            .lease(WorkerId(r.worker_id), Duration::from_millis(r.wait_ms))
            .await?;
        use pb::lease_response::Outcome as O;
        let outcome = match answer {
            LeaseAnswer::Task(t) => O::Task(t.0),
            LeaseAnswer::Wait => O::Wait(pb::Empty {}),
            LeaseAnswer::Done => O::Done(pb::Empty {}),
            LeaseAnswer::Failed(m) => O::Failed(m),
            LeaseAnswer::Malformed { error, .. } => return Err(Status::internal(error.0)),
        };
        Ok(Response::new(pb::LeaseResponse {
            outcome: Some(outcome),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let task = usize::try_from(r.task_id)
            .map_err(|_| Status::invalid_argument(format!("task id {}", r.task_id)))?;
        let keep_going = self.0.heartbeat(Heartbeat {
            worker: WorkerId(r.worker_id),
            task: TaskId(task),
            attempt: Attempt(r.attempt),
            bytes_done: r.bytes_done,
        });
        Ok(Response::new(pb::HeartbeatResponse { keep_going }))
    }

    async fn report(
        &self,
        req: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let r = req.into_inner();
        let outcome = match r.outcome {
            Some(pb::report_request::Outcome::Success(s)) => TaskOutcome::Success {
                parts: s
                    .parts
                    .into_iter()
                    .map(|p| PartDone {
                        part: p.part,
                        content_id: p.content_id,
                    })
                    .collect(),
            },
            Some(pb::report_request::Outcome::Failure(f)) => TaskOutcome::Failure {
                message: f.message,
                retryable: f.retryable,
                preempted: f.preempted,
            },
            None => return Err(Status::invalid_argument("a report needs an outcome")),
        };
        let task = usize::try_from(r.task_id)
            .map_err(|_| Status::invalid_argument(format!("task id {}", r.task_id)))?;
        self.0.report(Report {
            worker: WorkerId(r.worker_id),
            task: TaskId(task),
            attempt: Attempt(r.attempt),
            outcome,
        })?;
        Ok(Response::new(pb::ReportResponse {}))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self.0.status();
        Ok(Response::new(pb::StatusResponse {
            state: s.state,
            tasks_total: s.tasks_total,
            tasks_done: s.tasks_done,
            tasks_running: s.tasks_running,
            tasks_pending: s.tasks_pending,
            bytes_total: s.bytes_total,
            bytes_done: s.bytes_done,
            elapsed_s: s.elapsed_s,
            output: s.output,
            workers: s
                .workers
                .into_iter()
                .map(|w| pb::WorkerStatus {
                    worker_id: w.worker.0,
                    name: w.name,
                    last_heartbeat_s_ago: w.last_heartbeat_s_ago,
                    task_id: w.task.map_or(-1, |t| t.0 as i64),
                    tasks_done: w.tasks_done,
                })
                .collect(),
        }))
    }
}

/// A running gRPC server; [`Running::stop`] ends it.
pub struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Running {
    /// Stop serving, waiting up to `grace` for calls in flight.
    pub async fn stop(self, grace: Duration) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(grace, self.task).await;
    }
}

/// Serve `api` (and gRPC health, SERVING) on `listener`, checking `token` on every call
/// but health's, over TLS when an identity is given.
pub async fn spawn<A: CoordinatorApi>(
    api: Arc<A>,
    listener: tokio::net::TcpListener,
    tls: Option<Identity>,
    token: Option<String>,
) -> Result<Running, tonic::transport::Error> {
    let coordinator = pb::coordinator_server::CoordinatorServer::new(Adapter(api))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<pb::coordinator_server::CoordinatorServer<Adapter<A>>>()
        .await;
    let mut builder = Server::builder();
    if let Some(identity) = tls {
        builder = builder.tls_config(ServerTlsConfig::new().identity(identity))?;
    }
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = builder
        .add_service(health_svc)
        .add_service(InterceptedService::new(coordinator, CheckToken(token)))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = stop_rx.await;
            },
        );
    Ok(Running {
        stop,
        task: tokio::spawn(server),
    })
}
