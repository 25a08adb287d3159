//! Progress counters shared by readers, kernels and writers, and their reporting: a bar on a
//! terminal, plain periodic log lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counters updated as the merge runs.
#[derive(Debug)]
pub struct Progress {
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub tensors_done: AtomicU64,
    pub total_write: u64,
    pub started: Instant,
    /// Signalled once a task's inputs are all in memory (a worker then leases its next).
    fetched: tokio::sync::Notify,
}

impl Progress {
    pub fn new(total_write: u64) -> Arc<Self> {
        Arc::new(Progress {
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            tensors_done: AtomicU64::new(0),
            total_write,
            started: Instant::now(),
            fetched: tokio::sync::Notify::new(),
        })
    }
    /// All inputs of the task are read (or, for a streamed task, its first output is out).
    pub fn inputs_fetched(&self) {
        self.fetched.notify_one();
    }
    /// Wait for [`Progress::inputs_fetched`] (at once if it was already called).
    pub async fn wait_inputs_fetched(&self) {
        self.fetched.notified().await
    }
    pub fn read(&self, n: u64) {
        self.bytes_read.fetch_add(n, Ordering::Relaxed);
    }
    pub fn written(&self, n: u64) {
        self.bytes_written.fetch_add(n, Ordering::Relaxed);
    }

    /// Report until the returned handle is dropped (or aborted).
    pub fn spawn_reporter(self: &Arc<Self>, quiet: bool) -> Reporter {
        let me = self.clone();
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(me.total_write);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            b
        });
        let b2 = bar.clone();
        let handle = tokio::spawn(async move {
            let period = if b2.is_some() {
                Duration::from_millis(200)
            } else {
                Duration::from_secs(10)
            };
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            loop {
                tick.tick().await;
                let w = me.bytes_written.load(Ordering::Relaxed);
                match &b2 {
                    Some(b) => b.set_position(w),
                    None if !quiet => {
                        let secs = me.started.elapsed().as_secs_f64();
                        let r = me.bytes_read.load(Ordering::Relaxed);
                        tracing::info!(
                            "progress: {:.1}% written ({} of {} bytes), {:.2} GB/s read, {} tensors done",
                            100.0 * w as f64 / me.total_write.max(1) as f64,
                            w,
                            me.total_write,
                            r as f64 / secs / 1e9,
                            me.tensors_done.load(Ordering::Relaxed)
                        );
                    }
                    None => {}
                }
            }
        });
        Reporter { handle, bar }
    }
}

/// Stops reporting when dropped.
pub struct Reporter {
    handle: tokio::task::JoinHandle<()>,
    bar: Option<indicatif::ProgressBar>,
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.handle.abort();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
