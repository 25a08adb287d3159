//! Prometheus metrics for the coordinator and the workers, served in Prometheus' text format
//! on `--metrics-listen` (`GET /metrics`), encoded by the `prometheus-client` crate.
//!
//! Operators of a long merge watch these rather than logs: how many tasks are done, running
//! and pending, bytes moved, each worker's throughput, attempts, lease expiries, object-store
//! errors and retries, and how long workers wait for work. Counters only go up; the
//! coordinator's task gauges are read from its state at each scrape.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Requests object_store retried (transient errors it backed off from), counted from its
/// own log events by [`StoreRetries`]; shared by every store of the process.
pub static STORE_RETRIES: LazyLock<Counter> = LazyLock::new(Counter::default);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    pub worker: String,
}

/// Seconds from 10 ms to about 3 hours.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 4.0, 10))
}

/// The coordinator's metrics.
#[derive(Clone, Debug)]
pub struct CoordinatorMetrics {
    /// Tasks by state (done, running, pending), refreshed at each scrape.
    pub tasks: Family<StateLabel, Gauge>,
    pub workers: Gauge,
    pub output_bytes_done: Gauge,
    pub output_bytes_total: Gauge,
    /// Attempts handed out (first runs and retries).
    pub leases: Counter,
    pub lease_expiries: Counter,
    /// Reported attempts by outcome: done, failed (retryable), fatal, preempted.
    pub reports: Family<OutcomeLabel, Counter>,
    /// Output bytes of the tasks each worker finished: rate() is its throughput.
    pub worker_output_bytes: Family<WorkerLabel, Counter>,
    pub worker_tasks: Family<WorkerLabel, Counter>,
    /// How long lease calls waited before they were given a task (the queue wait).
    pub lease_wait_seconds: Histogram,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        CoordinatorMetrics {
            tasks: Family::default(),
            workers: Gauge::default(),
            output_bytes_done: Gauge::default(),
            output_bytes_total: Gauge::default(),
            leases: Counter::default(),
            lease_expiries: Counter::default(),
            reports: Family::default(),
            worker_output_bytes: Family::default(),
            worker_tasks: Family::default(),
            lease_wait_seconds: seconds_histogram(),
        }
    }
}

impl CoordinatorMetrics {
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("mergefleet");
        r.register("tasks", "Tasks by state", self.tasks.clone());
        r.register("workers", "Registered workers", self.workers.clone());
        r.register(
            "output_bytes_done",
            "Bytes of the output written by finished tasks",
            self.output_bytes_done.clone(),
        );
        r.register(
            "output_bytes_total",
            "Bytes of the whole output",
            self.output_bytes_total.clone(),
        );
        r.register(
            "leases",
            "Task attempts handed to workers",
            self.leases.clone(),
        );
        r.register(
            "lease_expiries",
            "Leases that expired (worker lost or stalled)",
            self.lease_expiries.clone(),
        );
        r.register(
            "reports",
            "Attempts reported, by outcome",
            self.reports.clone(),
        );
        r.register(
            "worker_output_bytes",
            "Output bytes of the tasks each worker finished",
            self.worker_output_bytes.clone(),
        );
        r.register(
            "worker_tasks",
            "Tasks each worker finished",
            self.worker_tasks.clone(),
        );
        r.register(
            "lease_wait_seconds",
            "Time a lease call waited before it was given a task",
            self.lease_wait_seconds.clone(),
        );
        r.register(
            "store_retries",
            "Object-store requests retried after a transient error",
            STORE_RETRIES.clone(),
        );
        r
    }

    pub fn report(&self, outcome: &'static str) {
        self.reports.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

/// A worker's metrics.
#[derive(Clone, Debug)]
pub struct WorkerMetrics {
    pub bytes_read: Counter,
    pub bytes_written: Counter,
    /// Attempts by how they ended: done, failed, lost (lease), stopped (SIGTERM).
    pub tasks: Family<OutcomeLabel, Counter>,
    /// Attempts that failed on an object store (after object_store's own retries).
    pub store_errors: Counter,
    pub task_seconds: Histogram,
    /// How long this worker waited for each task it was given (the queue wait).
    pub lease_wait_seconds: Histogram,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics {
            bytes_read: Counter::default(),
            bytes_written: Counter::default(),
            tasks: Family::default(),
            store_errors: Counter::default(),
            task_seconds: seconds_histogram(),
            lease_wait_seconds: seconds_histogram(),
        }
    }
}

impl WorkerMetrics {
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("mergefleet_worker");
        r.register(
            "bytes_read",
            "Input bytes read by finished tasks",
            self.bytes_read.clone(),
        );
        r.register(
            "bytes_written",
            "Output bytes written by finished tasks",
            self.bytes_written.clone(),
        );
        r.register("tasks", "Task attempts, by outcome", self.tasks.clone());
        r.register(
            "store_errors",
            "Task attempts failed by an object-store error",
            self.store_errors.clone(),
        );
        r.register(
            "task_seconds",
            "Time to run one task",
            self.task_seconds.clone(),
        );
        r.register(
            "lease_wait_seconds",
            "Time waited for each task given to this worker",
            self.lease_wait_seconds.clone(),
        );
        r.register(
            "store_retries",
            "Object-store requests retried after a transient error",
            STORE_RETRIES.clone(),
        );
        r
    }

    pub fn task(&self, outcome: &'static str) {
        self.tasks.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

/// Serve `registry` on `addr` (`GET /metrics`) until the process ends; `refresh` runs
/// before each scrape. Binds now, so a taken port is an error at startup.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    refresh: impl Fn() + Send + Sync + 'static,
) -> Result<(), crate::Error> {
    let bound = bind_and_serve(addr, registry, refresh)
        .await
        .map_err(|source| crate::Error::Listen {
            addr: addr.to_string(),
            source,
        })?;
    tracing::info!("metrics on http://{bound}/metrics");
    Ok(())
}

async fn bind_and_serve(
    addr: SocketAddr,
    registry: Registry,
    refresh: impl Fn() + Send + Sync + 'static,
) -> std::io::Result<SocketAddr> {
    use axum::http::header::CONTENT_TYPE;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let state = Arc::new((registry, refresh));
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let state = state.clone();
            async move {
                (state.1)();
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &state.0) {
                    Ok(()) => (
                        axum::http::StatusCode::OK,
                        [(
                            CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    ),
                    Err(_) => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [(CONTENT_TYPE, "text/plain")],
                        "cannot encode the metrics".to_string(),
                    ),
                }
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the metrics endpoint stopped: {e}");
        }
    });
    Ok(bound)
}

/// A tracing layer counting object_store's retries into [`STORE_RETRIES`] (object_store
/// retries inside its client and tells only its log).
pub struct StoreRetries;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for StoreRetries {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        // Every info event of these two modules is a retry (of a request, or of a body
        // read cut off mid-way); see `store_retries_filter`.
        let target = event.metadata().target();
        if target.starts_with("object_store::client::retry")
            || target.starts_with("object_store::client::get")
        {
            STORE_RETRIES.inc();
        }
    }
}

/// The filter [`StoreRetries`] needs: object_store's retry events only.
pub fn store_retries_filter() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new()
        .with_target("object_store::client::retry", tracing::Level::INFO)
        .with_target("object_store::client::get", tracing::Level::INFO)
}
