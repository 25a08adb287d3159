//! Talking to a coordinator that may be gone for a while: bounded retries with backoff, and
//! the gRPC answers no retry can fix.

use std::time::Duration;

use tokio::time::Instant;
use tonic::{Code, Status};

use crate::error::{Error, Result};

/// The longest one call waits for an answer (lease long polls excepted).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest wait between two tries of an unreachable coordinator: the protocol's.
pub use crate::wire::WORKER_MAX_RETRY_DELAY as MAX_DELAY;

/// Tracks how long the coordinator has been unreachable.
pub struct Backoff {
    coordinator: String,
    since: Option<Instant>,
    delay: Duration,
    limit: Duration,
}

impl Backoff {
    /// Retry calls to `coordinator` (its URL, for messages) for up to `limit`.
    pub fn new(coordinator: &str, limit: Duration) -> Self {
        Backoff {
            coordinator: coordinator.to_string(),
            since: None,
            delay: Duration::from_millis(200),
            limit,
        }
    }

    /// A call went through: the next failure starts a new outage.
    pub fn ok(&mut self) {
        self.since = None;
        self.delay = Duration::from_millis(200);
    }

    /// Run one call, waiting no longer than the time left to retry (so an address that
    /// accepts connections but never answers cannot hold a worker past --retry-for).
    pub async fn call<T>(
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
    pub async fn wait(&mut self, why: &Status) -> Result<()> {
        if let Some(e) = fatal_status(why, &self.coordinator) {
            return Err(e);
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.limit {
            return Err(Error::Unreachable(format!(
                "lost the coordinator at {} for {} s ({}); giving up",
                self.coordinator,
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
        self.delay = (self.delay * 2).min(MAX_DELAY);
        Ok(())
    }
}

/// The coordinator's answers that no retry can fix, as the error to stop with; None for
/// the ones worth retrying (unreachable, timed out, overloaded).
pub fn fatal_status(s: &Status, url: &str) -> Option<Error> {
    match s.code() {
        // A gRPC server, but not ours (a health port, another service): stop at once.
        Code::Unimplemented => Some(Error::Usage(format!(
            "{url} answers gRPC but is not a mergefleet coordinator ({}): check --coordinator",
            s.message()
        ))),
        Code::Unauthenticated
        | Code::FailedPrecondition
        | Code::PermissionDenied
        | Code::InvalidArgument => Some(Error::Usage(format!(
            "the coordinator refused this worker: {}",
            s.message()
        ))),
        // A certificate that does not verify will not start verifying: stop at once.
        _ if s.message().contains("certificate") => Some(Error::Usage(format!(
            "cannot verify the coordinator's TLS certificate ({}): give its CA with --tls-ca",
            s.message()
        ))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lasting_refusals_are_fatal() {
        let url = "http://c:7300";
        for (status, exit) in [
            (Status::unimplemented("no such service"), Some(2)),
            (Status::unauthenticated("bad token"), Some(2)),
            (Status::failed_precondition("too small"), Some(2)),
            (Status::permission_denied("no"), Some(2)),
            (Status::invalid_argument("bad"), Some(2)),
            (
                Status::unavailable("invalid peer certificate: UnknownIssuer"),
                Some(2),
            ),
            (Status::unavailable("connection refused"), None),
            (Status::deadline_exceeded("no answer"), None),
            (Status::internal("oops"), None),
            (Status::not_found("unknown worker"), None),
        ] {
            let got = fatal_status(&status, url);
            assert_eq!(got.as_ref().map(Error::exit_code), exit, "{status:?}");
            if let Some(e) = got {
                assert!(!e.is_retryable(), "{status:?}");
            }
        }
        let e = fatal_status(&Status::unimplemented("x"), url).unwrap();
        assert!(e.to_string().contains(url) && e.to_string().contains("--coordinator"));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_the_limit_not_before() {
        let mut b = Backoff::new("http://c", Duration::from_secs(10));
        let down = Status::unavailable("connection refused");
        let start = tokio::time::Instant::now();
        let mut tries = 0;
        let err = loop {
            match b.wait(&down).await {
                Ok(()) => tries += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, Error::Unreachable(_)), "{err}");
        assert!(tries >= 3, "{tries}");
        // Measured on tokio's clock (paused here): the sleeps follow the backoff schedule.
        assert!(start.elapsed() >= Duration::from_secs(10));
        b.ok();
        assert!(b.wait(&down).await.is_ok(), "a success starts a new outage");
    }
}
