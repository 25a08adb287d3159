//! The library's public error type, and the one place that classifies errors.
//!
//! Each layer has its own small error enum (config, store, source, plan, sink, wire); they
//! fold into [`Error`] here, keeping their sources. Three questions are answered here, from
//! the type alone (never by parsing messages), and unit-tested: the exit code (2 when the
//! user's input is at fault), whether another attempt of a task may succeed, and whether a
//! failed attempt counts toward `--max-attempts`. Messages always name the file, tensor, key
//! or worker involved.

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
    Vocab(#[from] crate::vocab::VocabError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// A command-line argument or option the user must change.
    #[error("invalid argument: {0}")]
    Usage(String),
    /// A file named on the command line (config, certificate, key) cannot be read.
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A port to serve on cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// The gRPC transport refused its settings (TLS certificate or key, endpoint).
    #[error("{what}: {source}")]
    Transport {
        what: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Endpoint(#[from] crate::wire::client::BadEndpoint),
    #[error("the merge was interrupted")]
    Interrupted,
    /// Another process took the output over (it judged this one's lock stale).
    #[error("lost ownership of the output {0} to another process; stopped without committing")]
    OutputLost(String),
    /// A store stopped answering for the whole retry budget (the message names it): the
    /// merge fails at once, since another attempt would wait as long again.
    #[error(
        "{0}; the merge failed (set MERGEFLEET_RETRY_TIMEOUT_SECS to ride out longer outages)"
    )]
    StoreGone(String),
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
    /// A background task panicked.
    #[error("{what} panicked: {source}")]
    Panicked {
        what: String,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// A background task that panicked (or was cancelled) while doing `what`.
    pub fn panicked(what: impl Into<String>) -> impl FnOnce(tokio::task::JoinError) -> Error {
        let what = what.into();
        move |source| Error::Panicked { what, source }
    }

    /// True when the user's config, arguments or input data are at fault (exit code 2).
    pub fn is_invalid_input(&self) -> bool {
        match self {
            Error::Config(_)
            | Error::Plan(_)
            | Error::Vocab(_)
            | Error::Usage(_)
            | Error::ReadFile { .. }
            | Error::Listen { .. }
            | Error::Transport { .. }
            | Error::Endpoint(_)
            | Error::Journal { .. } => true,
            Error::Source(e) => e.is_invalid_input(),
            Error::Store(e) => e.is_invalid_input(),
            Error::Sink(e) => e.is_invalid_input(),
            Error::Interrupted
            | Error::OutputLost(_)
            | Error::StoreGone(_)
            | Error::Internal(_)
            | Error::Panicked { .. }
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

    /// An object store (reading inputs or writing the output) failed, after object_store's
    /// own retries: counted by the workers' `store_errors` metric.
    pub fn is_store(&self) -> bool {
        matches!(
            self,
            Error::Store(StoreError::Read { .. } | StoreError::Hub { .. })
                | Error::Sink(
                    SinkError::Store { .. }
                        | SinkError::Read(StoreError::Read { .. } | StoreError::Hub { .. })
                )
                | Error::Source(
                    SourceError::Store(StoreError::Read { .. } | StoreError::Hub { .. })
                        | SourceError::Hub(crate::hub::HubError::Http { .. })
                )
        )
    }

    /// Whether another attempt of the same task may succeed. A bad config or plan, a
    /// malformed task or a memory limit too small for a tensor fail the same way every time;
    /// a lost lease or a stopped worker need not. A store error is final too: the store
    /// client retries every request for the whole retry budget before it says so, so the
    /// store did not answer for that long, and another attempt would wait as long again
    /// (a dead store must end a cluster merge within the budget, not a multiple of it).
    pub fn is_retryable(&self) -> bool {
        !(self.is_store()
            || matches!(
                self,
                Error::Config(_)
                    | Error::Plan(_)
                    | Error::Usage(_)
                    | Error::Wire(_)
                    | Error::Cluster(_)
                    | Error::JobFailed(_)
                    | Error::StoreGone(_)
            ))
    }

    /// Whether a task attempt that ended with this error counts toward `--max-attempts`. A
    /// worker stopped under its task (SIGTERM: preemption, scale-down, a rolling update) is
    /// not the task's fault, so its attempts are free.
    pub fn counts_toward_attempts(&self) -> bool {
        !matches!(self, Error::Interrupted)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: std::io::ErrorKind) -> std::io::Error {
        std::io::Error::new(kind, "x")
    }

    #[test]
    fn classification() {
        let store = |e: object_store::Error, input| {
            Error::Store(StoreError::Read {
                url: "s3://b/m".into(),
                source: e,
                input,
            })
        };
        let generic = || object_store::Error::Generic {
            store: "S3",
            source: "connection reset".into(),
        };
        let not_found = || object_store::Error::NotFound {
            path: "m".into(),
            source: "gone".into(),
        };
        // (error, exit code, retryable, counts toward --max-attempts)
        let table: Vec<(Error, u8, bool, bool)> = vec![
            (Error::Usage("--threads 0".into()), 2, false, true),
            (
                Error::Config(ConfigError::Key {
                    key: "models".into(),
                    message: "empty".into(),
                }),
                2,
                false,
                true,
            ),
            (Error::Plan(PlanError::Empty("b".into())), 2, false, true),
            (
                Error::Sink(SinkError::Unsupported {
                    url: "http://x".into(),
                    message: "no multipart".into(),
                }),
                2,
                true,
                true,
            ),
            (
                Error::Sink(SinkError::Io {
                    path: "/out".into(),
                    source: io(std::io::ErrorKind::StorageFull),
                }),
                2,
                true,
                true,
            ),
            (
                Error::Sink(SinkError::Io {
                    path: "/out".into(),
                    source: io(std::io::ErrorKind::Interrupted),
                }),
                1,
                true,
                true,
            ),
            // Reading headers: the user's input (credentials, bucket); moving weights: not.
            // Store errors come after the whole retry budget: not retried again.
            (store(generic(), true), 2, false, true),
            (store(generic(), false), 1, false, true),
            (store(not_found(), false), 2, false, true),
            (
                Error::Sink(SinkError::Store {
                    url: "s3://b/out/model.safetensors".into(),
                    source: generic(),
                }),
                1,
                false,
                true,
            ),
            (Error::StoreGone("s3://b/out".into()), 1, false, true),
            (
                Error::ReadFile {
                    path: "cert.pem".into(),
                    source: io(std::io::ErrorKind::NotFound),
                },
                2,
                true,
                true,
            ),
            (
                Error::Listen {
                    addr: "0.0.0.0:7300".into(),
                    source: io(std::io::ErrorKind::AddrInUse),
                },
                2,
                true,
                true,
            ),
            (
                Error::Wire(crate::wire::WireError("shape".into())),
                1,
                false,
                true,
            ),
            (Error::Interrupted, 1, true, false),
            (Error::OutputLost("/out".into()), 1, true, true),
            (Error::Cluster("task 3 failed".into()), 1, false, true),
            (Error::Unreachable("lost".into()), 1, true, true),
            (Error::JobFailed("task 3 failed".into()), 3, false, true),
            (Error::Internal("bug".into()), 1, true, true),
        ];
        for (e, exit, retry, counts) in table {
            assert_eq!(
                (e.exit_code(), e.is_retryable(), e.counts_toward_attempts()),
                (exit, retry, counts),
                "{e:?}"
            );
        }
    }

    #[test]
    fn sources_are_kept() {
        let e = Error::ReadFile {
            path: "key.pem".into(),
            source: io(std::io::ErrorKind::PermissionDenied),
        };
        let source = std::error::Error::source(&e).expect("a source");
        assert_eq!(
            source.downcast_ref::<std::io::Error>().map(|e| e.kind()),
            Some(std::io::ErrorKind::PermissionDenied)
        );
        assert!(e.to_string().contains("key.pem"));
    }
}
