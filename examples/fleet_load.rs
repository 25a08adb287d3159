//! Load generator for the coordinator's control plane: a real `mergefleet coordinator`
//! process, and many simulated workers that lease, heartbeat and report over gRPC like real
//! ones, without moving any data (each task is reported done as soon as it is leased).
//!
//! `benches/fleet_load.sh` runs it on the 671B-class set (46,087 tasks) with 256 workers:
//!
//! ```text
//! cargo run --release --example fleet_load -- target/release/mergefleet CONFIG OUT --workers 256
//! ```
//!
//! It prints completions per second, the coordinator's CPU seconds and peak memory over the
//! whole run (from /proc), the journal's largest size and its write times (from the
//! coordinator's JSON logs), and the time from the last report to the commit.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use mergefleet::wire::client::Client;
use mergefleet::wire::{
    Heartbeat, Hello, LeaseAnswer, Report, TaskId, TaskOutcome, PROTOCOL_VERSION,
};

#[derive(Parser)]
struct Args {
    /// The mergefleet binary to run as the coordinator.
    bin: PathBuf,
    config: PathBuf,
    /// A local output directory that does not exist yet (prepared sparse by the
    /// coordinator; removed at the end unless --keep).
    out: PathBuf,
    #[arg(long, default_value_t = 256)]
    workers: usize,
    /// Heartbeats per task, sent between the lease and the report.
    #[arg(long, default_value_t = 1)]
    heartbeats: u32,
    #[arg(long)]
    keep: bool,
}

/// What the sampler saw of the coordinator process.
#[derive(Default)]
struct Sample {
    cpu_s: f64,
    peak_rss_kb: u64,
    journal_bytes: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log_path = a.out.with_extension("coordinator.log");
    // Never delete what is there: OUT could be anything, a model included. It must not
    // exist; what the coordinator creates there is removed at the end.
    anyhow::ensure!(
        !a.out.exists(),
        "{} exists: give an output directory that does not (it is removed at the end)",
        a.out.display()
    );
    let started = Instant::now();
    let mut coord = Command::new(&a.bin)
        .args(["--log-format", "json", "coordinator"])
        .arg(&a.config)
        .arg(&a.out)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--insecure"])
        .args(["--lease-timeout", "120s", "--linger", "30s"])
        .env("RUST_LOG", "info,mergefleet::coordinator=debug")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let pid = coord.id();
    let mut guard = KillOnDrop(Some(pid));
    let sample = Arc::new(Mutex::new(Sample::default()));
    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (sample, running) = (sample.clone(), running.clone());
        let journal = a.out.join(".mergefleet-journal.json");
        std::thread::spawn(move || {
            while running.load(Ordering::Relaxed) {
                if let Some((cpu, hwm)) = proc_figures(pid) {
                    let mut s = sample.lock().unwrap();
                    s.cpu_s = cpu;
                    s.peak_rss_kb = s.peak_rss_kb.max(hwm);
                    if let Ok(m) = std::fs::metadata(&journal) {
                        s.journal_bytes = s.journal_bytes.max(m.len());
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // Wait for the coordinator to serve.
    let serving = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("coordinator listening") {
            break started.elapsed();
        }
        if let Some(status) = coord.try_wait()? {
            anyhow::bail!("the coordinator exited ({status}) before serving:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let before = sample.lock().unwrap().peak_rss_kb;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let url = format!("http://127.0.0.1:{port}");
    let done = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let (first, last) = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..a.workers {
            let client = Client::new(&url, None, None)?;
            let (done, calls) = (done.clone(), calls.clone());
            set.spawn(simulated_worker(client, i, a.heartbeats, done, calls));
        }
        let (mut first, mut last) = (None::<Instant>, None::<Instant>);
        while let Some(r) = set.join_next().await {
            let (f, l) = r??;
            first = match (first, f) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            last = last.max(l);
        }
        anyhow::Ok((first, last))
    })?;
    let out = coord.wait_with_output()?;
    guard.0 = None;
    running.store(false, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success(),
        "the coordinator failed ({}): see {}",
        out.status,
        log_path.display()
    );
    let tasks = done.load(Ordering::Relaxed);
    let span = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
        _ => f64::NAN,
    };
    let s = sample.lock().unwrap();
    let (saves, save_ms_max, save_ms_sum) = journal_saves(&log_path);
    println!(
        "{} simulated workers, {tasks} tasks completed in {span:.2} s: {:.0} completions/s ({} gRPC calls)",
        a.workers,
        tasks as f64 / span,
        calls.load(Ordering::Relaxed)
    );
    println!(
        "coordinator: serving after {:.2} s (peak RSS {} MB then); whole run {:.2} CPU s, peak RSS {} MB",
        serving.as_secs_f64(),
        before / 1024,
        s.cpu_s,
        s.peak_rss_kb / 1024
    );
    println!(
        "journal: up to {:.1} MB, {saves} saves, {:.1} ms longest, {:.1} ms mean",
        s.journal_bytes as f64 / 1e6,
        save_ms_max,
        save_ms_sum / saves.max(1) as f64
    );
    println!("coordinator says: {}", summary.trim());
    if !a.keep {
        // Created by this run's coordinator (OUT did not exist before).
        let _ = std::fs::remove_dir_all(&a.out);
    }
    Ok(())
}

/// One simulated worker: register, then lease / heartbeat / report until told the merge is
/// done. Returns when it received its first task and sent its last report.
async fn simulated_worker(
    client: Client,
    i: usize,
    heartbeats: u32,
    done: Arc<AtomicU64>,
    calls: Arc<AtomicU64>,
) -> anyhow::Result<(Option<Instant>, Option<Instant>)> {
    let welcome = client
        .register(&Hello {
            protocol_version: PROTOCOL_VERSION,
            name: format!("sim-{i}"),
            memory_limit: 1 << 40,
            threads: 1,
        })
        .await?;
    let worker = welcome.worker;
    let (mut first, mut last) = (None, None);
    loop {
        calls.fetch_add(1, Ordering::Relaxed);
        match client.lease(worker, Duration::from_secs(30)).await? {
            LeaseAnswer::Task(t) => {
                first.get_or_insert_with(Instant::now);
                for _ in 0..heartbeats {
                    calls.fetch_add(1, Ordering::Relaxed);
                    let beat = Heartbeat {
                        worker,
                        task: TaskId(t.task.id),
                        attempt: t.attempt,
                        bytes_done: 0,
                    };
                    anyhow::ensure!(client.heartbeat(beat).await?, "lease lost");
                }
                calls.fetch_add(1, Ordering::Relaxed);
                client
                    .report(&Report {
                        worker,
                        task: TaskId(t.task.id),
                        attempt: t.attempt,
                        outcome: TaskOutcome::Success { parts: Vec::new() },
                    })
                    .await?;
                done.fetch_add(1, Ordering::Relaxed);
                last = Some(Instant::now());
            }
            LeaseAnswer::Wait => {}
            LeaseAnswer::Done => return Ok((first, last)),
            LeaseAnswer::Failed(m) => anyhow::bail!("the merge failed: {m}"),
            LeaseAnswer::Malformed { error, .. } => anyhow::bail!("malformed task: {error}"),
        }
    }
}

/// Kills the coordinator if the generator stops early (a failed simulated worker), so it
/// does not keep its port and its output lock.
struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// CPU seconds (user + system) and peak RSS (KiB) of a process, from /proc.
fn proc_figures(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some((ticks / hz, hwm))
}

/// The coordinator's "journal saved" events: count, longest and summed milliseconds.
fn journal_saves(log: &std::path::Path) -> (usize, f64, f64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let ms: Vec<f64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "journal saved")
        .filter_map(|v| v["ms"].as_f64())
        .collect();
    let max = ms.iter().copied().fold(0.0, f64::max);
    (ms.len(), max, ms.iter().sum())
}
