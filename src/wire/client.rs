//! The worker's (and `mergefleet status`'s) side of the contract: a gRPC client that speaks
//! in domain types. Retrying is the caller's business; this only encodes, sends and decodes.

use std::path::Path;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Status;

use super::{
    pb, task_from_wire, Attempt, Heartbeat, Hello, LeaseAnswer, Received, Report, StatusReport,
    TaskId, TaskOutcome, Welcome, WorkerId, WorkerStatus, MAX_MESSAGE,
};
use crate::security::AddToken;

/// Why a client could not be built: the address or the CA file is wrong.
#[derive(Debug, thiserror::Error)]
#[error("--coordinator {url}: {message}")]
pub struct BadEndpoint {
    pub url: String,
    pub message: String,
}

/// A connection (made lazily, on first use) to a coordinator.
#[derive(Clone)]
pub struct Client {
    inner: pb::coordinator_client::CoordinatorClient<InterceptedService<Channel, AddToken>>,
}

impl Client {
    /// A client for `url` (`http://` or `https://`), sending `token`; TLS verified against
    /// `tls_ca`, or the system's roots for `https://` without one.
    pub fn new(url: &str, token: Option<&str>, tls_ca: Option<&Path>) -> Result<Self, BadEndpoint> {
        let bad = |message: String| BadEndpoint {
            url: url.to_string(),
            message,
        };
        let mut ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20));
        if tls_ca.is_some() || url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = tls_ca {
                let pem = std::fs::read(ca)
                    .map_err(|e| bad(format!("cannot read {}: {e}", ca.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            } else {
                tls = tls.with_enabled_roots();
            }
            ep = ep.tls_config(tls).map_err(|e| bad(e.to_string()))?;
        }
        let inner = pb::coordinator_client::CoordinatorClient::with_interceptor(
            ep.connect_lazy(),
            AddToken::new(token),
        )
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
        Ok(Client { inner })
    }

    pub async fn register(&self, hello: &Hello) -> Result<Welcome, Status> {
        let r = self
            .inner
            .clone()
            .register(pb::RegisterRequest {
                protocol_version: hello.protocol_version,
                name: hello.name.clone(),
                memory_limit: hello.memory_limit,
                threads: hello.threads,
            })
            .await?
            .into_inner();
        Ok(Welcome {
            worker: WorkerId(r.worker_id),
            heartbeat_interval: Duration::from_millis(r.heartbeat_interval_ms.max(100)),
            lease_timeout: Duration::from_millis(r.lease_timeout_ms),
        })
    }

    /// Ask for a task, waiting up to `wait` on the coordinator's side.
    pub async fn lease(
        &self,
        worker: WorkerId,
        wait: Duration,
    ) -> Result<LeaseAnswer<Received>, Status> {
        let r = self
            .inner
            .clone()
            .lease(pb::LeaseRequest {
                worker_id: worker.0,
                wait_ms: wait.as_millis() as u64,
            })
            .await?
            .into_inner();
        use pb::lease_response::Outcome as O;
        Ok(match r.outcome {
            Some(O::Task(t)) => match task_from_wire(&t) {
                Ok(received) => LeaseAnswer::Task(received),
                Err(error) => LeaseAnswer::Malformed {
                    task: TaskId(t.task_id as usize),
                    attempt: Attempt(t.attempt),
                    error,
                },
            },
            Some(O::Done(_)) => LeaseAnswer::Done,
            Some(O::Failed(m)) => LeaseAnswer::Failed(m),
            Some(O::Wait(_)) | None => LeaseAnswer::Wait,
        })
    }

    /// False when the coordinator says to stop the task.
    pub async fn heartbeat(&self, beat: Heartbeat) -> Result<bool, Status> {
        let r = self
            .inner
            .clone()
            .heartbeat(pb::HeartbeatRequest {
                worker_id: beat.worker.0,
                task_id: beat.task.0 as u64,
                attempt: beat.attempt.0,
                bytes_done: beat.bytes_done,
            })
            .await?;
        Ok(r.into_inner().keep_going)
    }

    pub async fn report(&self, report: &Report) -> Result<(), Status> {
        let outcome = match &report.outcome {
            TaskOutcome::Success { parts } => pb::report_request::Outcome::Success(pb::Success {
                parts: parts
                    .iter()
                    .map(|p| pb::PartDone {
                        part: p.part,
                        content_id: p.content_id.clone(),
                    })
                    .collect(),
            }),
            TaskOutcome::Failure {
                message,
                retryable,
                preempted,
            } => pb::report_request::Outcome::Failure(pb::Failure {
                message: message.clone(),
                retryable: *retryable,
                preempted: *preempted,
            }),
        };
        self.inner
            .clone()
            .report(pb::ReportRequest {
                worker_id: report.worker.0,
                task_id: report.task.0 as u64,
                attempt: report.attempt.0,
                outcome: Some(outcome),
            })
            .await?;
        Ok(())
    }

    pub async fn status(&self) -> Result<StatusReport, Status> {
        let s = self
            .inner
            .clone()
            .status(pb::StatusRequest {})
            .await?
            .into_inner();
        Ok(StatusReport {
            state: s.state,
            output: s.output,
            tasks_total: s.tasks_total,
            tasks_done: s.tasks_done,
            tasks_running: s.tasks_running,
            tasks_pending: s.tasks_pending,
            bytes_total: s.bytes_total,
            bytes_done: s.bytes_done,
            elapsed_s: s.elapsed_s,
            workers: s
                .workers
                .into_iter()
                .map(|w| WorkerStatus {
                    worker: WorkerId(w.worker_id),
                    name: w.name,
                    last_heartbeat_s_ago: w.last_heartbeat_s_ago,
                    task: usize::try_from(w.task_id).ok().map(TaskId),
                    tasks_done: w.tasks_done,
                })
                .collect(),
        })
    }
}
