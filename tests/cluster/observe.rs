//! What operators watch: Prometheus metrics scraped over HTTP during a real cluster merge
//! and checked against what the merge did, and JSON log lines a log aggregator can parse.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::*;

/// `GET /metrics` over plain HTTP/1.1: the body, or None when nothing answers.
fn scrape(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    Some(body.to_string())
}

/// Samples of the text format: `name{labels}` -> value.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

/// Keep scraping `port` until stopped; the last body that answered.
fn keep_scraping(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Option<String>> {
    std::thread::spawn(move || {
        let mut last = None;
        while !stop.load(Ordering::Relaxed) {
            if let Some(b) = scrape(port) {
                last = Some(b);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        last
    })
}

#[test]
fn metrics_scraped_during_a_merge_match_it_and_json_logs_parse() {
    let d = tmp();
    let cfg = mid_set(d.path());
    // The coordinator stays up 2 s after the commit, so its final state is scraped.
    let c = Cluster::new(
        d.path(),
        vec![(
            "MERGEFLEET_FAILPOINT_AFTER_END_MS".to_string(),
            "2000".to_string(),
        )],
    );
    let out = c.dir.path().join("out");
    let (mc, mw) = (free_port(), free_port());
    let coordinator_metrics = format!("127.0.0.1:{mc}");
    let worker_metrics = format!("127.0.0.1:{mw}");
    let mut args = LAYOUT.to_vec();
    args.extend([
        "--metrics-listen",
        &coordinator_metrics,
        "--log-format",
        "json",
    ]);
    let mut coord = c.coordinator(
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        &args,
        "coord.log",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let coord_scrapes = keep_scraping(mc, stop.clone());
    let worker_scrapes = keep_scraping(mw, stop.clone());
    let delay = [(
        "MERGEFLEET_FAILPOINT_TASK_DELAY_MS".to_string(),
        "100".to_string(),
    )];
    let mut watched = c.worker("watched", &["--metrics-listen", &worker_metrics], &delay);
    let mut other = c.worker("other", &[], &delay);
    // Mid-merge: the worker's endpoint answers with work done, bytes and timings.
    let mid = Arc::new(Mutex::new(None));
    for _ in 0..600 {
        if let Some(s) = scrape(mw).map(|b| samples(&b)) {
            if s.get("mergefleet_worker_tasks_total{outcome=\"done\"}")
                .copied()
                .unwrap_or(0.0)
                >= 1.0
            {
                *mid.lock().unwrap() = Some(s);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_exit_ok(&mut coord, 120);
    assert_exit_ok(&mut watched, 30);
    assert_exit_ok(&mut other, 30);
    stop.store(true, Ordering::Relaxed);
    let last = samples(
        &coord_scrapes
            .join()
            .unwrap()
            .expect("the coordinator's metrics answered"),
    );
    worker_scrapes.join().unwrap();

    // The coordinator's last answer (it keeps serving until it exits) against the merge.
    let summary = coord.log();
    let tasks: f64 = summary
        .split(" tasks, ")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no task count in {summary}"));
    let bytes: u64 = weight_files(&out)
        .iter()
        .filter(|f| f.ends_with(".safetensors"))
        .map(|f| std::fs::metadata(out.join(f)).unwrap().len())
        .sum();
    let get = |k: &str| *last.get(k).unwrap_or_else(|| panic!("no {k} in {last:?}"));
    assert_eq!(get("mergefleet_tasks{state=\"done\"}"), tasks);
    assert_eq!(get("mergefleet_tasks{state=\"pending\"}"), 0.0);
    assert_eq!(get("mergefleet_reports_total{outcome=\"done\"}"), tasks);
    assert!(get("mergefleet_leases_total") >= tasks);
    assert_eq!(get("mergefleet_output_bytes_done"), bytes as f64);
    assert_eq!(get("mergefleet_output_bytes_total"), bytes as f64);
    let per_worker = |name: &str| {
        ["watched", "other"]
            .iter()
            .map(|w| {
                last.get(&format!("{name}{{worker=\"{w}\"}}"))
                    .copied()
                    .unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    assert_eq!(per_worker("mergefleet_worker_tasks_total"), tasks);
    assert_eq!(
        per_worker("mergefleet_worker_output_bytes_total"),
        bytes as f64
    );
    assert_eq!(
        get("mergefleet_lease_wait_seconds_count"),
        get("mergefleet_leases_total")
    );
    assert_eq!(get("mergefleet_lease_expiries_total"), 0.0);

    // The worker, mid-merge: what it had finished, read and written so far.
    let mid = mid
        .lock()
        .unwrap()
        .take()
        .expect("the worker's metrics answered mid-merge");
    let ran: f64 = watched
        .log()
        .split(" task(s) ran here")
        .next()
        .and_then(|s| s.rsplit("; ").next())
        .and_then(|s| s.parse().ok())
        .expect("the worker says how many tasks it ran");
    let done = mid["mergefleet_worker_tasks_total{outcome=\"done\"}"];
    assert!(done >= 1.0 && done <= ran, "{done} of {ran}");
    assert!(mid["mergefleet_worker_bytes_read_total"] > 0.0);
    assert!(mid["mergefleet_worker_bytes_written_total"] > 0.0);
    assert_eq!(mid["mergefleet_worker_task_seconds_count"], done);
    assert!(mid.contains_key("mergefleet_worker_store_retries_total"));

    // Every line the coordinator logged is a JSON object; leases carry their fields.
    let log = std::fs::read_to_string(c.dir.path().join("coord.log")).unwrap();
    let mut leased = 0;
    for line in log.lines().filter(|l| !l.starts_with("committed ")) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if v["message"] == "task leased" {
            leased += 1;
            assert!(v["task"].is_string() || v["task"].is_number(), "{line}");
            assert!(v["worker"].is_string() || v["worker"].is_number(), "{line}");
            assert!(
                v["attempt"].is_string() || v["attempt"].is_number(),
                "{line}"
            );
        }
    }
    assert_eq!(leased as f64, get("mergefleet_leases_total"));
}
