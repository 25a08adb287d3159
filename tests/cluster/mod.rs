//! Cluster mode with real processes: a coordinator and workers over gRPC on loopback, the
//! S3 server, and real faults (kill -9, SIGSTOP, a stopped S3 server, corrupted input).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

mod chaos;
mod contract;
mod observe;

pub(crate) struct Cluster {
    pub(crate) dir: TempDir,
    port: u16,
    env: Vec<(String, String)>,
    cwd: PathBuf,
}

impl Cluster {
    pub(crate) fn new(cwd: &Path, env: Vec<(String, String)>) -> Cluster {
        Cluster {
            dir: tmp(),
            port: free_port(),
            env,
            cwd: cwd.to_path_buf(),
        }
    }

    pub(crate) fn coordinator(&self, config: &str, out: &str, extra: &[&str], log: &str) -> Proc {
        let listen = format!("127.0.0.1:{}", self.port);
        let mut args = vec![
            "coordinator",
            config,
            out,
            "--listen",
            &listen,
            "--insecure",
        ];
        if !extra.contains(&"--linger") {
            args.extend(["--linger", "10s"]);
        }
        args.extend_from_slice(extra);
        let mut p = Proc::spawn(&args, &self.cwd, &self.env, self.dir.path().join(log));
        p.wait_for("coordinator listening", 60);
        p
    }

    pub(crate) fn worker(&self, name: &str, extra: &[&str], env: &[(String, String)]) -> Proc {
        let url = format!("http://127.0.0.1:{}", self.port);
        let mut args = vec![
            "worker",
            "--coordinator",
            &url,
            "--name",
            name,
            "--threads",
            "1",
        ];
        if !extra.contains(&"--retry-for") {
            args.extend(["--retry-for", "60s"]);
        }
        args.extend_from_slice(extra);
        let mut all = self.env.clone();
        all.extend_from_slice(env);
        Proc::spawn(
            &args,
            &self.cwd,
            &all,
            self.dir.path().join(format!("{name}.log")),
        )
    }

    pub(crate) fn workers(&self, n: usize, env: &[(String, String)]) -> Vec<Proc> {
        (1..=n)
            .map(|i| self.worker(&format!("w{i}"), &[], env))
            .collect()
    }

    /// A whole merge by a coordinator (with `extra` flags) and 3 workers (with `env`): both
    /// must succeed, the coordinator within `secs`.
    pub(crate) fn merge_on_three(
        &self,
        config: &str,
        out: &str,
        extra: &[&str],
        env: &[(String, String)],
        secs: u64,
    ) {
        let mut coord = self.coordinator(config, out, extra, "coordinator.log");
        let mut workers = self.workers(3, env);
        assert_exit_ok(&mut coord, secs);
        for w in &mut workers {
            assert_exit_ok(w, 60);
        }
    }
}

fn embedded(config: &Path, cwd: &Path, extra: &[&str], env: &[(String, String)]) -> TempDir {
    let out = tmp();
    let mut args = vec![
        "merge",
        config.to_str().unwrap(),
        out.path().to_str().unwrap(),
        "-q",
        "--overwrite",
    ];
    args.extend_from_slice(extra);
    assert_ok(&run_in(cwd, &args, env));
    out
}

/// A synthetic set whose tasks are several MiB each (so S3 parts are real multipart parts).
fn mid_set(dir: &Path) -> PathBuf {
    llama_set(dir, 4, 2)
}

/// Base + 3 fine-tunes, hidden 512, vocab 8192, `layers` layers (3.1 M parameters each),
/// in `shards` files per model.
fn llama_set(dir: &Path, layers: usize, shards: usize) -> PathBuf {
    let shape = mergefleet::synth::LlamaShape {
        hidden: 512,
        layers,
        intermediate: 1536,
        vocab: 8192,
        heads: 8,
        kv_heads: 4,
        lm_head: true,
    };
    mergefleet::synth::write_set(dir, &shape, 3, shards).unwrap();
    dir.join("model_stock.yml")
}

/// The mid set in bucket `models` (under `mid/`), an empty bucket `merged`, and a cluster
/// whose config reads the models from S3. Returns the models bucket's directory.
fn s3_cluster(s3: &S3Server) -> (PathBuf, Cluster, PathBuf) {
    let models = s3.bucket("models");
    mid_set(&models.join("mid"));
    s3.bucket("merged");
    let cfg_text = std::fs::read_to_string(models.join("mid/model_stock.yml"))
        .unwrap()
        .replace(&format!("{}/", models.display()), "s3://models/");
    let c = Cluster::new(Path::new("/"), s3.env());
    let cfg = c.dir.path().join("config.yml");
    std::fs::write(&cfg, &cfg_text).unwrap();
    (models, c, cfg)
}

const LAYOUT: &[&str] = &["--out-shard-size", "12M", "--task-size", "1"];

#[test]
fn cluster_local_to_local_equals_embedded() {
    for case in ["basic_bf16", "sharded_two_ft_f16_out"] {
        let c = Cluster::new(&fixtures(), vec![]);
        let out = c.dir.path().join("out");
        let ss = std::fs::read_to_string(fixtures().join(case).join("shard_size"))
            .unwrap_or("5B".into());
        let cfg = format!("{case}/config.yml");
        let mut coord = c.coordinator(
            &cfg,
            out.to_str().unwrap(),
            &["--out-shard-size", ss.trim()],
            "coord.log",
        );
        let mut ws = c.workers(3, &[]);
        assert_exit_ok(&mut coord, 60);
        for w in &mut ws {
            assert_exit_ok(w, 30);
        }
        let want = embedded(
            &fixtures().join(&cfg),
            &fixtures(),
            &["--out-shard-size", ss.trim()],
            &[],
        );
        assert_same_checkpoint(&out, want.path());
        assert!(
            !out.join(".mergefleet-journal.json").exists(),
            "journal removed after commit"
        );
    }
}

#[test]
fn cluster_fp8_equals_mergekit() {
    // Scales travel with their weights (layer 0's in another shard of the base), and each
    // worker dequantizes what it reads.
    let fixtures = crate::fp8::fp8_fixtures();
    for case in ["all_fp8", "mixed"] {
        let c = Cluster::new(&fixtures, vec![]);
        let out = c.dir.path().join("out");
        let mut coord = c.coordinator(
            &format!("{case}.yml"),
            out.to_str().unwrap(),
            &["--task-size", "1"],
            "coord.log",
        );
        let mut ws = c.workers(3, &[]);
        assert_exit_ok(&mut coord, 60);
        for w in &mut ws {
            assert_exit_ok(w, 30);
        }
        let want = std::fs::read(
            fixtures
                .join("expected")
                .join(case)
                .join("model.safetensors"),
        );
        let got = std::fs::read(out.join("model.safetensors"));
        assert!(
            got.unwrap() == want.unwrap(),
            "{case}: differs from mergekit"
        );
    }
    // Written as FP8 again by 3 workers: mergekit's result requantized, tensor for tensor.
    let c = Cluster::new(&fixtures, vec![]);
    let out = c.dir.path().join("out");
    let flags = ["--task-size", "1", "--quantize", "fp8"];
    let mut coord = c.coordinator("all_fp8.yml", out.to_str().unwrap(), &flags, "coord.log");
    let mut ws = c.workers(3, &[]);
    assert_exit_ok(&mut coord, 60);
    for w in &mut ws {
        assert_exit_ok(w, 30);
    }
    assert!(
        read_checkpoint(&out) == read_checkpoint(&fixtures.join("expected/all_fp8_q")),
        "3 workers with --quantize fp8 differ from the requantized golden"
    );
}

#[test]
fn cluster_fp8_quantized_equals_embedded() {
    // FP8 in, FP8 out (--quantize fp8), over 3 workers with small tasks: the bytes of
    // embedded mode.
    let c = Cluster::new(Path::new("/"), vec![]);
    let cfg = crate::fp8::fp8_set(&c.dir.path().join("set"));
    let out = c.dir.path().join("out");
    let flags = [
        "--quantize",
        "fp8",
        "--task-size",
        "2M",
        "--out-shard-size",
        "8M",
    ];
    let mut coord = c.coordinator(
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        &flags,
        "coord.log",
    );
    let mut ws = c.workers(3, &[]);
    assert_exit_ok(&mut coord, 120);
    for w in &mut ws {
        assert_exit_ok(w, 30);
    }
    let want = embedded(&cfg, Path::new("/"), &flags, &[]);
    assert_same_checkpoint(&out, want.path());
}

#[test]
fn cluster_s3_to_s3_equals_embedded() {
    let s3 = S3Server::start();
    let (models, c, cfg) = s3_cluster(&s3);
    let mut args = LAYOUT.to_vec();
    args.extend(["--lease-timeout", "20s"]);
    let mut coord = c.coordinator(
        cfg.to_str().unwrap(),
        "s3://merged/cluster/",
        &args,
        "coord.log",
    );
    // One worker reads in small parts, many at a time (inputs of several MiB per task). It
    // starts first and is running a task before the others start, so it surely runs some.
    let mut split = c.worker(
        "w3",
        &["--read-part-size", "256KiB", "--read-concurrency", "8"],
        &[],
    );
    split.wait_for("running", 60);
    let mut ws = c.workers(2, &[]);
    ws.push(split);
    assert_exit_ok(&mut coord, 120);
    for w in &mut ws {
        assert_exit_ok(w, 30);
    }
    assert!(
        !ws[2].log().contains(" 0 task(s) ran here"),
        "{}",
        ws[2].log()
    );
    let want = embedded(&models.join("mid/model_stock.yml"), &c.cwd, LAYOUT, &[]);
    let got = s3.root.path().join("merged/cluster");
    assert_same_checkpoint(&got, want.path());
    // Several tasks per file: real multipart uploads with several parts.
    let log = coord.log();
    assert!(
        log.matches("task leased").count() > weight_files(&got).len(),
        "{log}"
    );
    // the status of a finished job is not reachable any more; the coordinator is gone
    assert!(!got.join(".mergefleet-journal.json").exists());
}

/// Tasks whose output spans several multipart parts (32 MiB embeddings, parts of 8 MiB)
/// upload them concurrently into the file's one upload, numbered after the tasks before
/// them; the checkpoint is embedded mode's.
#[test]
fn cluster_tasks_upload_several_parts_each() {
    let s3 = S3Server::start();
    let shape = mergefleet::synth::LlamaShape {
        hidden: 1024,
        layers: 1,
        intermediate: 2048,
        vocab: 16384,
        heads: 8,
        kv_heads: 4,
        lm_head: true,
    };
    let (local_cfg, s3_cfg) = s3_model_set(s3.root.path(), "wide", &shape, 2, 1);
    let c = Cluster::new(Path::new("/"), s3.env());
    let cfg = c.dir.path().join("config.yml");
    std::fs::write(&cfg, s3_cfg).unwrap();
    // One file; the embeddings (96 MiB of input each) are tasks of their own.
    let layout = ["--task-size", "90MiB"];
    let mut coord = c.coordinator(
        cfg.to_str().unwrap(),
        "s3://merged/wide/",
        &layout,
        "coord.log",
    );
    let mut ws = c.workers(2, &[]);
    assert_exit_ok(&mut coord, 180);
    for w in &mut ws {
        assert_exit_ok(w, 30);
    }
    let log = coord.log();
    let parts: usize = log
        .lines()
        .find(|l| l.contains("output file model.safetensors complete"))
        .and_then(|l| l.split("parts=").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no part count in:\n{log}"));
    assert!(parts >= 8, "{parts} parts:\n{log}");
    let want = embedded(&local_cfg, &c.cwd, &layout, &[]);
    assert_same_checkpoint(&s3.root.path().join("merged/wide"), want.path());
}

#[test]
fn killed_worker_task_is_redone() {
    let d = tmp();
    let cfg = mid_set(d.path());
    let c = Cluster::new(d.path(), vec![]);
    let out = c.dir.path().join("out");
    let mut coord = c.coordinator(
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        &[LAYOUT, &["--lease-timeout", "2s"]].concat(),
        "coord.log",
    );
    let delay = [(
        "MERGEFLEET_FAILPOINT_TASK_DELAY_MS".to_string(),
        "300".to_string(),
    )];
    let mut victim = c.worker("victim", &[], &delay);
    victim.wait_for("failpoint: holding the task", 60);
    victim.signal("-KILL");
    let mut ws = c.workers(2, &[]);
    assert_exit_ok(&mut coord, 120);
    for w in &mut ws {
        assert_exit_ok(w, 30);
    }
    assert!(coord.log().contains("lease expired"), "{}", coord.log());
    let want = embedded(&cfg, d.path(), LAYOUT, &[]);
    assert_same_checkpoint(&out, want.path());
}

#[test]
fn killed_coordinator_resumes_from_its_journal() {
    let d = tmp();
    let cfg = mid_set(d.path());
    let c = Cluster::new(d.path(), vec![]);
    let out = c.dir.path().join("out");
    // Slow enough that the coordinator is killed with work both journaled and not.
    let delay = [(
        "MERGEFLEET_FAILPOINT_TASK_DELAY_MS".to_string(),
        "1000".to_string(),
    )];
    let mut coord = c.coordinator(
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        LAYOUT,
        "coord1.log",
    );
    // One task at a time per worker, so that tasks finish in several rounds.
    let mut ws: Vec<Proc> = (1..=2)
        .map(|i| c.worker(&format!("w{i}"), &["--tasks-in-flight", "1"], &delay))
        .collect();
    // Once the journal (written at most every 2 s) records finished tasks, kill -9 the
    // coordinator.
    let deadline = Instant::now() + Duration::from_secs(60);
    let journaled = || {
        std::fs::read(out.join(".mergefleet-journal.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|j| j["done"].as_object().map(|d| d.len()))
            .unwrap_or(0)
    };
    while journaled() == 0 {
        assert!(
            Instant::now() < deadline,
            "the journal records no finished task: {:?} {}",
            std::fs::read_to_string(out.join(".mergefleet-journal.json")),
            coord.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    coord.signal("-KILL");
    coord.wait(10);
    let total = coord
        .log()
        .split("tasks (")
        .next()
        .and_then(|s| s.rsplit(": ").next())
        .and_then(|s| s.trim().parse::<usize>().ok());
    // Start it again: it resumes; the workers reconnect.
    let mut coord2 = c.coordinator(
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        LAYOUT,
        "coord2.log",
    );
    assert_exit_ok(&mut coord2, 120);
    for w in &mut ws {
        assert_exit_ok(w, 60);
    }
    let log2 = coord2.log();
    let resumed: usize = log2
        .split("resuming from the journal")
        .nth(1)
        .and_then(|s| s.split(": ").nth(1))
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no resume line:\n{log2}"));
    assert!(resumed > 0, "{log2}");
    let total = total.unwrap_or_else(|| panic!("no task count:\n{}", coord.log()));
    assert_eq!(
        log2.matches("task leased").count(),
        total - resumed,
        "finished tasks were redone:\n{log2}"
    );
    let want = embedded(&cfg, d.path(), LAYOUT, &[]);
    assert_same_checkpoint(&out, want.path());
}

/// A worker leases its next task only once a task's inputs are read: with the store down
/// it holds two tasks (one reading, one about to), not one per slot, and leaves the rest
/// to other workers. Once the store is back the merge completes.
#[test]
fn a_worker_waiting_for_its_inputs_holds_two_tasks_not_one_per_slot() {
    let mut s3 = S3Server::start();
    let (models, c, cfg) = s3_cluster(&s3);
    let out = c.dir.path().join("out");
    let mut coord = c.coordinator(
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        LAYOUT,
        "coord.log",
    );
    coord.wait_for("coordinator listening", 60);
    s3.stop();
    let mut w = c.worker("w1", &["--tasks-in-flight", "4"], &[]);
    let leased = |p: &Proc| p.log().matches("task leased").count();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while leased(&coord) < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", coord.log());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(leased(&coord), 2, "{}", coord.log());
    s3.start_again();
    assert_exit_ok(&mut coord, 180);
    assert_exit_ok(&mut w, 30);
    let want = embedded(&models.join("mid/model_stock.yml"), &c.cwd, LAYOUT, &[]);
    assert_same_checkpoint(&out, want.path());
}

#[test]
fn stalled_worker_loses_its_lease() {
    let d = tmp();
    let cfg = mid_set(d.path());
    let c = Cluster::new(d.path(), vec![]);
    let out = c.dir.path().join("out");
    let mut coord = c.coordinator(
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        &[LAYOUT, &["--lease-timeout", "1s"]].concat(),
        "coord.log",
    );
    let delay = [(
        "MERGEFLEET_FAILPOINT_TASK_DELAY_MS".to_string(),
        "500".to_string(),
    )];
    let mut stalled = c.worker("stalled", &[], &delay);
    stalled.wait_for("failpoint: holding the task", 60);
    stalled.signal("-STOP");
    let mut other = c.worker("other", &[], &[]);
    coord.wait_for("lease expired", 30);
    std::thread::sleep(Duration::from_millis(500));
    stalled.signal("-CONT");
    assert_exit_ok(&mut coord, 120);
    assert_exit_ok(&mut other, 30);
    assert_exit_ok(&mut stalled, 30);
    // The stalled worker's late work is not accepted: its heartbeat is refused and it drops
    // the task, or its report arrives and is ignored as stale.
    let (sl, cl) = (stalled.log(), coord.log());
    assert!(
        sl.contains("the lease was lost") || cl.contains("ignoring a stale report"),
        "{sl}\n{cl}"
    );
    let want = embedded(&cfg, d.path(), LAYOUT, &[]);
    assert_same_checkpoint(&out, want.path());
}

#[test]
fn s3_outage_mid_run_is_survived() {
    let mut s3 = S3Server::start();
    let (models, c, cfg) = s3_cluster(&s3);
    let mut coord = c.coordinator(
        cfg.to_str().unwrap(),
        "s3://merged/outage/",
        &[LAYOUT, &["--lease-timeout", "30s"]].concat(),
        "coord.log",
    );
    let delay = [(
        "MERGEFLEET_FAILPOINT_TASK_DELAY_MS".to_string(),
        "100".to_string(),
    )];
    let mut ws = c.workers(2, &delay);
    ws[0].wait_for(": done", 60);
    s3.restart_after(Duration::from_secs(3));
    assert_exit_ok(&mut coord, 180);
    for w in &mut ws {
        assert_exit_ok(w, 30);
    }
    let want = embedded(&models.join("mid/model_stock.yml"), &c.cwd, LAYOUT, &[]);
    assert_same_checkpoint(&s3.root.path().join("merged/outage"), want.path());
}

#[test]
fn deterministic_failure_fails_the_job_cleanly() {
    let s3 = S3Server::start();
    let (models, c, cfg) = s3_cluster(&s3);
    let mut coord = c.coordinator(
        cfg.to_str().unwrap(),
        "s3://merged/broken/",
        &[LAYOUT, &["--max-attempts", "3"]].concat(),
        "coord.log",
    );
    // The coordinator planned from intact headers; now corrupt the data: truncate a shard.
    let victim = models.join("mid/ft2/model-00002-of-00002.safetensors");
    let len = std::fs::metadata(&victim).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let mut ws = c.workers(2, &[]);
    let st = coord.wait(120);
    assert!(!st.success(), "{}", coord.log());
    let log = coord.log();
    // A range the store refuses (416) is no hiccup: the merge fails at once, not after
    // --max-attempts tries.
    assert!(
        log.contains("cannot succeed on another attempt")
            && log.contains("ft2/model-00002-of-00002.safetensors"),
        "{log}"
    );
    for w in &mut ws {
        // 3: told the merge failed, so Kubernetes' podFailurePolicy does not restart it.
        let st = w.wait(30);
        assert_eq!(st.code(), Some(3), "worker exit {st}:\n{}", w.log());
    }
    let out = s3.root.path().join("merged/broken");
    assert!(
        !looks_complete(&out),
        "a failed job left a complete-looking checkpoint"
    );
    // Multipart uploads were aborted.
    assert_eq!(s3.open_uploads(), 0, "uploads left open");
}

/// A raw gRPC client of the coordinator at `url`, sending `token`.
async fn client(
    url: &str,
    token: &str,
) -> mergefleet::wire::pb::coordinator_client::CoordinatorClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        mergefleet::security::AddToken,
    >,
> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    mergefleet::wire::pb::coordinator_client::CoordinatorClient::with_interceptor(
        channel,
        mergefleet::security::AddToken::new(Some(token)),
    )
}

#[test]
fn wrong_token_and_wrong_protocol_are_refused() {
    let c = Cluster::new(&fixtures(), vec![]);
    let token = c.dir.path().join("token");
    std::fs::write(&token, "right-token-0123456789\n").unwrap();
    let out = c.dir.path().join("out");
    let listen = format!("127.0.0.1:{}", c.port);
    let mut coord = Proc::spawn(
        &[
            "coordinator",
            "basic_bf16/config.yml",
            out.to_str().unwrap(),
            "--listen",
            &listen,
            "--token-file",
            token.to_str().unwrap(),
        ],
        &fixtures(),
        &[],
        c.dir.path().join("coord.log"),
    );
    coord.wait_for("coordinator listening", 60);
    let url = format!("http://{listen}");
    let o = run_in(
        &fixtures(),
        &["worker", "--coordinator", &url, "--name", "intruder"],
        &[("MERGEFLEET_TOKEN".into(), "wrong-token".into())],
    );
    assert_exit(&o, 2);
    assert!(
        text(&o).contains("refused") && text(&o).contains("token"),
        "{}",
        text(&o)
    );
    assert!(
        !text(&o).contains("right-token")
            && !coord.log().contains("right-token")
            && !coord.log().contains("wrong-token")
    );

    // A worker of another protocol version.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        client(&url, "right-token-0123456789")
            .await
            .register(mergefleet::wire::pb::RegisterRequest {
                protocol_version: 999,
                name: "old".into(),
                memory_limit: 1 << 30,
                threads: 1,
            })
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("protocol version 999"),
        "{}",
        status.message()
    );

    // A request over the message cap (64 MiB) is refused before it is decoded, and the
    // coordinator goes on serving.
    let status = rt.block_on(async {
        client(&url, "right-token-0123456789")
            .await
            .max_encoding_message_size(usize::MAX)
            .register(mergefleet::wire::pb::RegisterRequest {
                protocol_version: mergefleet::wire::PROTOCOL_VERSION,
                name: "x".repeat(mergefleet::wire::MAX_MESSAGE + 1),
                memory_limit: 1 << 30,
                threads: 1,
            })
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
    assert!(serving(&url));
    assert!(
        !coord.log().contains("xxxxxxxx"),
        "the oversized request was logged"
    );

    // Health checks need no token.
    assert!(serving(&url));
    // `status` needs the token...
    let o = run_in(&fixtures(), &["status", "--coordinator", &url], &[]);
    assert_exit(&o, 2);
    // ...and with it shows the job.
    let o = run_in(
        &fixtures(),
        &[
            "status",
            "--coordinator",
            &url,
            "--token-file",
            token.to_str().unwrap(),
        ],
        &[],
    );
    assert_ok(&o);
    assert!(
        text(&o).contains("tasks:") && text(&o).contains("0 done"),
        "{}",
        text(&o)
    );
    // Before the first task completes the time left is unknown, not `NaN s`.
    assert!(
        text(&o).contains("ETA unknown") && !text(&o).contains("NaN"),
        "{}",
        text(&o)
    );
    drop(coord);
}

#[test]
fn coordinator_needs_a_token_or_insecure() {
    let dir = tmp();
    let out = dir.path().join("out");
    let coordinator = |listen: &str, extra: &[&str], env: &[(String, String)]| {
        let mut args = vec![
            "coordinator",
            "basic_bf16/config.yml",
            out.to_str().unwrap(),
            "--listen",
            listen,
        ];
        args.extend_from_slice(extra);
        run_in(&fixtures(), &args, env)
    };
    let o = coordinator("127.0.0.1:0", &[], &[]);
    assert_exit(&o, 2);
    assert!(text(&o).contains("without a token"), "{}", text(&o));
    let o = coordinator("0.0.0.0:0", &["--insecure"], &[]);
    assert_exit(&o, 2);
    assert!(text(&o).contains("plaintext"), "{}", text(&o));
    // A guessable token (or a deployment's placeholder) is refused too, without echoing it.
    let o = coordinator(
        "127.0.0.1:0",
        &[],
        &[("MERGEFLEET_TOKEN".into(), "replace-me".into())],
    );
    assert_exit(&o, 2);
    assert!(text(&o).contains("too short"), "{}", text(&o));
    assert!(!text(&o).contains("replace-me"), "{}", text(&o));
    assert!(!out.exists(), "nothing may be written");
}

#[test]
fn tls_with_a_self_signed_certificate() {
    let c = Cluster::new(&fixtures(), vec![]);
    let d = c.dir.path();
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(d.join("key.pem"))
        .arg("-out")
        .arg(d.join("cert.pem"))
        .stderr(Stdio::null())
        .status()
        .expect("openssl (Debian package openssl) makes the test certificate");
    assert!(made.success());
    std::fs::write(d.join("token"), "tls-token-0123456789\n").unwrap();
    let listen = format!("127.0.0.1:{}", c.port);
    let out = d.join("out");
    let (cert, key, token) = (d.join("cert.pem"), d.join("key.pem"), d.join("token"));
    let mut coord = Proc::spawn(
        &[
            "coordinator",
            "basic_bf16/config.yml",
            out.to_str().unwrap(),
            "--listen",
            &listen,
            "--linger",
            "3s",
        ],
        &fixtures(),
        &[],
        d.join("coord.log"),
    );
    drop(coord);
    let args = [
        "coordinator",
        "basic_bf16/config.yml",
        out.to_str().unwrap(),
        "--listen",
        &listen,
        "--linger",
        "3s",
        "--token-file",
        token.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    coord = Proc::spawn(&args, &fixtures(), &[], d.join("coord.log"));
    coord.wait_for("coordinator listening", 60);
    let url = format!("https://localhost:{}", c.port);
    // Without the CA the certificate does not verify: a clear error at once, exit 2.
    let o = run_in(
        &fixtures(),
        &[
            "worker",
            "--coordinator",
            &url,
            "--token-file",
            token.to_str().unwrap(),
        ],
        &[],
    );
    assert_exit(&o, 2);
    assert!(text(&o).contains("--tls-ca"), "{}", text(&o));
    // With it, the merge runs over TLS.
    let o = run_in(
        &fixtures(),
        &[
            "worker",
            "--coordinator",
            &url,
            "--token-file",
            token.to_str().unwrap(),
            "--tls-ca",
            cert.to_str().unwrap(),
        ],
        &[],
    );
    assert_ok(&o);
    assert_exit_ok(&mut coord, 30);
    assert_same_checkpoint(&out, &fixtures().join("basic_bf16/expected"));
}

#[test]
fn token_never_logged_even_at_trace_level() {
    let c = Cluster::new(&fixtures(), vec![]);
    let secret = "never-log-me-0123456789abcdef";
    let env = [
        ("MERGEFLEET_TOKEN".to_string(), secret.to_string()),
        ("RUST_LOG".to_string(), "trace".to_string()),
    ];
    let out = c.dir.path().join("out");
    let listen = format!("127.0.0.1:{}", c.port);
    let mut coord = Proc::spawn(
        &[
            "coordinator",
            "basic_bf16/config.yml",
            out.to_str().unwrap(),
            "--listen",
            &listen,
            "--linger",
            "5s",
        ],
        &fixtures(),
        &env,
        c.dir.path().join("coord.log"),
    );
    coord.wait_for("coordinator listening", 60);
    let url = format!("http://{listen}");
    let mut w = Proc::spawn(
        &["worker", "--coordinator", &url, "--name", "w"],
        &fixtures(),
        &env,
        c.dir.path().join("w.log"),
    );
    assert_exit_ok(&mut coord, 60);
    assert_exit_ok(&mut w, 30);
    let (cl, wl) = (coord.log(), w.log());
    assert!(cl.lines().count() > 20, "trace logging is on:\n{cl}");
    assert!(
        !cl.contains(secret) && !wl.contains(secret),
        "the token was logged"
    );
    assert_same_checkpoint(&out, &fixtures().join("basic_bf16/expected"));
}

#[test]
fn worker_gives_up_on_a_lost_coordinator() {
    let d = tmp();
    let cfg = mid_set(d.path());
    let c = Cluster::new(d.path(), vec![]);
    let out = c.dir.path().join("out");
    let coord = c.coordinator(
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        LAYOUT,
        "coord.log",
    );
    let delay = [(
        "MERGEFLEET_FAILPOINT_TASK_DELAY_MS".to_string(),
        "300".to_string(),
    )];
    let health = format!("127.0.0.1:{}", free_port());
    let mut w = c.worker(
        "orphan",
        &["--retry-for", "4s", "--health-listen", &health],
        &delay,
    );
    w.wait_for("failpoint: holding the task", 60);
    coord.signal("-KILL");
    let started = Instant::now();
    // The liveness endpoint does not depend on the coordinator: it answers while the worker
    // waits for a coordinator that may be restarting.
    assert!(serving(&format!("http://{health}")));
    let st = w.wait(30);
    assert!(!st.success(), "{}", w.log());
    assert!(w.log().contains("lost the coordinator"), "{}", w.log());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "gave up only after {:?}",
        started.elapsed()
    );
}
