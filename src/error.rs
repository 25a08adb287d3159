//! The library's public error type.
//!
//! Each layer has its own small error enum (config, source, plan, sink); they fold into
//! [`Error`] here so callers can ask one question: is this the user's input (exit code 2)
//! or something else (exit code 1)? Messages always name the file, tensor or key involved.

use crate::config::ConfigError;
use crate::plan::PlanError;
use crate::sink::SinkError;
use crate::source::SourceError;
use crate::store::StoreError;

/// Everything that can go wrong in a merge.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The coordinator's resume journal cannot be parsed.
    #[error("{url}: the resume journal is unreadable ({source}); start over with --restart")]
    Journal {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("invalid argument: {0}")]
    Usage(String),
    #[error("the merge was interrupted")]
    Interrupted,
    /// Another process took the output over (it judged this one's lock stale).
    #[error("lost ownership of the output {0} to another process; stopped without committing")]
    OutputLost(String),
    /// Cluster mode: the job failed (a task ran out of attempts, or the coordinator said so).
    #[error("the cluster merge failed: {0}")]
    Cluster(String),
    /// Cluster mode, a client: the coordinator could not be reached (or stopped answering).
    #[error("{0}")]
    Unreachable(String),
    /// Cluster mode, on a worker: the coordinator ended the merge as failed, so running this
    /// worker again cannot help (exit code 3, which Kubernetes is told not to retry).
    #[error("the coordinator ended the merge as failed: {0}")]
    JobFailed(String),
    #[error(transparent)]
    Wire(#[from] crate::wire::WireError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// True when the user's config or input data is at fault (CLI exit code 2).
    pub fn is_invalid_input(&self) -> bool {
        match self {
            Error::Config(_) | Error::Plan(_) | Error::Usage(_) => true,
            Error::Source(e) => e.is_invalid_input(),
            Error::Store(e) => e.is_invalid_input(),
            Error::Journal { .. } => true,
            Error::Sink(e) => e.is_invalid_input(),
            Error::Interrupted
            | Error::OutputLost(_)
            | Error::Internal(_)
            | Error::Cluster(_)
            | Error::Unreachable(_)
            | Error::JobFailed(_)
            | Error::Wire(_) => false,
        }
    }

    /// The CLI's exit code: 2 when the user's input is at fault, 3 when a worker learns the
    /// merge failed (restarting it cannot help), 1 for anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::JobFailed(_) => 3,
            e if e.is_invalid_input() => 2,
            _ => 1,
        }
    }

    /// Whether another attempt of the same task may succeed (decided here, in one place;
    /// the coordinator never parses messages). A bad config or plan, a malformed task or a
    /// memory limit too small for a tensor fail the same way every time.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            Error::Config(_)
                | Error::Plan(_)
                | Error::Usage(_)
                | Error::Wire(_)
                | Error::Cluster(_)
                | Error::JobFailed(_)
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
