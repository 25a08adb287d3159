//! The contract in cluster mode: one coordinator per output, every check (and the port)
//! before the output is touched, workers refused early and clearly, a failed merge that
//! exits promptly with its store gone and keeps what a later run needs to clean up; the end
//! of a merge that waits for no dead worker, and a restart after the commit that finds it.

use std::path::Path;
use std::time::{Duration, Instant};

use super::*;

#[test]
fn a_second_coordinator_on_a_held_output_is_refused_and_touches_nothing() {
    let c = Cluster::new(&fixtures(), vec![]);
    let out = c.dir.path().join("out");
    let o = out.to_str().unwrap();
    let mut first = c.coordinator("basic_bf16/config.yml", o, &[], "coord.log");
    let before = std::fs::read_dir(&out).unwrap().count();
    // Same output, another port: refused, naming the holder.
    let listen = format!("127.0.0.1:{}", free_port());
    let second = run_in(
        &fixtures(),
        &[
            "coordinator",
            "basic_bf16/config.yml",
            o,
            "--listen",
            &listen,
            "--insecure",
        ],
        &[],
    );
    assert_exit(&second, 2);
    let t = text(&second);
    assert!(
        t.contains("coordinator (pid") && t.contains(&format!("127.0.0.1:{}", c.port)),
        "{t}"
    );
    // An embedded merge is refused too.
    let m = run_in(
        &fixtures(),
        &["merge", "basic_bf16/config.yml", o, "--overwrite"],
        &[],
    );
    assert_exit(&m, 2);
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        before,
        "the output was touched"
    );
    // A coordinator whose port is taken leaves a fresh output untouched.
    let fresh = c.dir.path().join("fresh");
    let taken = format!("127.0.0.1:{}", c.port);
    let o2 = run_in(
        &fixtures(),
        &[
            "coordinator",
            "basic_bf16/config.yml",
            fresh.to_str().unwrap(),
            "--listen",
            &taken,
            "--insecure",
        ],
        &[],
    );
    assert_exit(&o2, 2);
    assert!(
        !fresh.exists(),
        "a coordinator that could not listen created its output"
    );
    // The first one still produces embedded mode's bytes.
    let mut ws = c.workers(2, &[]);
    assert_exit_ok(&mut first, 120);
    for w in &mut ws {
        assert_exit_ok(w, 30);
    }
    let want = embedded(
        &fixtures().join("basic_bf16/config.yml"),
        &fixtures(),
        &[],
        &[],
    );
    assert_same_checkpoint(&out, want.path());
}

#[test]
fn a_second_coordinator_on_a_held_s3_output_is_refused() {
    let s3 = S3Server::start();
    let (_models, c, cfg) = s3_cluster(&s3);
    let mut first = c.coordinator(
        cfg.to_str().unwrap(),
        "s3://merged/held/",
        LAYOUT,
        "coord.log",
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let second = run_in(
        Path::new("/"),
        &[
            "coordinator",
            cfg.to_str().unwrap(),
            "s3://merged/held",
            "--listen",
            &listen,
            "--insecure",
        ],
        &s3.env(),
    );
    assert_exit(&second, 2);
    assert!(
        text(&second).contains("is being written by a mergefleet coordinator"),
        "{}",
        text(&second)
    );
    first.signal("-TERM");
    first.wait(30);
}

#[test]
fn a_worker_too_small_for_a_task_is_refused_at_registration() {
    let c = Cluster::new(&fixtures(), vec![]);
    let out = c.dir.path().join("out");
    let _coord = c.coordinator(
        "basic_bf16/config.yml",
        out.to_str().unwrap(),
        &[],
        "coord.log",
    );
    let mut w = c.worker("tiny", &["--memory-limit", "10K"], &[]);
    let st = w.wait(20);
    assert_eq!(st.code(), Some(2), "{}", w.log());
    assert!(
        w.log().contains("needs at least") && w.log().contains("--memory-limit"),
        "{}",
        w.log()
    );
}

#[test]
fn workers_and_status_fail_fast_and_clearly_at_the_wrong_address() {
    let c = Cluster::new(&fixtures(), vec![]);
    // A gRPC server that is not a coordinator: a worker's own health endpoint.
    let health = format!("127.0.0.1:{}", free_port());
    let other = c.worker(
        "other",
        &["--health-listen", &health, "--retry-for", "5m"],
        &[],
    );
    let url = format!("http://{health}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&health).is_err() {
        assert!(Instant::now() < deadline, "{}", other.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let o = run(&["worker", "--coordinator", &url, "--retry-for", "5m"]);
    assert_exit(&o, 2);
    assert!(
        text(&o).contains("not a mergefleet coordinator"),
        "{}",
        text(&o)
    );
    let o = run(&["status", "--coordinator", &url]);
    assert_exit(&o, 2);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    other.signal("-KILL");

    // An address that accepts connections and never answers: bounded by --retry-for.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let started = Instant::now();
    let o = run(&["worker", "--coordinator", &url, "--retry-for", "3s"]);
    assert_exit(&o, 1);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "worker took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let o = run(&["status", "--coordinator", &url]);
    assert_exit(&o, 1);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "status took {:?}",
        started.elapsed()
    );
    // Nobody there (a finished merge): no claim that a merge failed.
    drop(silent);
    let o = run(&["status", "--coordinator", &url]);
    assert_exit(&o, 1);
    assert!(!text(&o).contains("merge failed"), "{}", text(&o));
    assert!(
        text(&o).contains("cannot reach the coordinator"),
        "{}",
        text(&o)
    );
}

#[test]
fn coordinator_command_line_edges() {
    let d = tmp();
    let run_coord = |extra: &[&str], env: &[(String, String)]| {
        let listen = format!("127.0.0.1:{}", free_port());
        let out = d.path().join("out");
        let mut args = vec![
            "coordinator",
            "basic_bf16/config.yml",
            out.to_str().unwrap(),
            "--listen",
            &listen,
        ];
        args.extend_from_slice(extra);
        run_in(&fixtures(), &args, env)
    };
    // A token a worker could not send is refused at start.
    std::fs::write(d.path().join("token"), "s3cret-passwörd-0123456789\n").unwrap();
    let tf = d.path().join("token").display().to_string();
    let o = run_coord(&["--token-file", &tf], &[]);
    assert_exit(&o, 2);
    assert!(text(&o).contains("ASCII"), "{}", text(&o));
    // An output no cluster can write (an HTTP store): a user error.
    let listen = format!("127.0.0.1:{}", free_port());
    let o = run_in(
        &fixtures(),
        &[
            "coordinator",
            "basic_bf16/config.yml",
            "http://127.0.0.1:9/out",
            "--listen",
            &listen,
            "--insecure",
        ],
        &[],
    );
    assert_exit(&o, 2);
    assert!(text(&o).contains("cluster mode writes to"), "{}", text(&o));
    // MERGEFLEET_TOKEN set but empty, with --insecure, means no token: it starts.
    let c = Cluster::new(
        &fixtures(),
        vec![("MERGEFLEET_TOKEN".into(), String::new())],
    );
    let out = c.dir.path().join("out");
    let mut coord = c.coordinator(
        "basic_bf16/config.yml",
        out.to_str().unwrap(),
        &[],
        "coord.log",
    );
    let mut ws = c.workers(1, &[]);
    assert_exit_ok(&mut coord, 60);
    assert_exit_ok(&mut ws[0], 30);
}

#[test]
fn cluster_mode_prints_the_side_file_warnings() {
    let d = tmp();
    copy_dir(&fixtures().join("models"), &d.path().join("models"));
    std::fs::remove_file(d.path().join("models/base/config.json")).unwrap();
    std::fs::copy(
        fixtures().join("basic_bf16/config.yml"),
        d.path().join("config.yml"),
    )
    .unwrap();
    let c = Cluster::new(d.path(), vec![]);
    let out = c.dir.path().join("out");
    let mut coord = c.coordinator("config.yml", out.to_str().unwrap(), &[], "coord.log");
    let mut ws = c.workers(1, &[]);
    assert_exit_ok(&mut coord, 60);
    assert_exit_ok(&mut ws[0], 30);
    assert!(
        coord
            .log()
            .contains("warning: the base model has no config.json"),
        "{}",
        coord.log()
    );
}

#[test]
fn a_failed_merge_with_its_store_gone_exits_promptly_and_keeps_its_upload_ids() {
    let mut s3 = S3Server::start();
    let (_models, c, cfg) = s3_cluster(&s3);
    // Several output files; the coordinator's own requests keep the full 60 s retry budget,
    // so only concurrent aborts under one deadline make it exit promptly.
    let mut coord_env = c.env.clone();
    coord_env.push(("MERGEFLEET_RETRY_TIMEOUT_SECS".into(), "60".into()));
    // As the pods of one Kubernetes Job: the next coordinator may take the lock the gone
    // store kept it from removing.
    let owner = ("MERGEFLEET_OWNER".to_string(), "job-uid-1".to_string());
    coord_env.push(owner.clone());
    let listen = format!("127.0.0.1:{}", c.port);
    let mut coord = Proc::spawn(
        &[
            "coordinator",
            cfg.to_str().unwrap(),
            "s3://merged/gone/",
            "--listen",
            &listen,
            "--insecure",
            "--linger",
            "1s",
            "--max-attempts",
            "1",
            "--out-shard-size",
            "4M",
        ],
        &c.cwd,
        &coord_env,
        c.dir.path().join("coord.log"),
    );
    coord.wait_for("coordinator listening", 60);
    let journal = s3.root.path().join("merged/gone/.mergefleet-journal.json");
    let uploads = |j: &Path| -> usize {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(j).unwrap()).unwrap();
        v["uploads"].as_object().unwrap().len()
    };
    let files = uploads(&journal);
    assert!(files >= 5, "want several output files, got {files}");
    // The store goes away for good (as far as this run knows); workers give up quickly.
    s3.stop();
    let fast = [("MERGEFLEET_RETRY_TIMEOUT_SECS".to_string(), "1".to_string())];
    let _ws = c.workers(1, &fast);
    let started = Instant::now();
    let st = coord.wait(100);
    assert!(!st.success(), "{}", coord.log());
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(70),
        "exit took {took:?}:\n{}",
        coord.log()
    );
    assert!(coord.log().contains("upload ids kept"), "{}", coord.log());
    // The store comes back: the journal still names the uploads, and --restart aborts them.
    s3.start_again();
    assert_eq!(uploads(&journal), files);
    // They are in the upload record too: `plan` with the output counts them.
    let o = run_in(
        &c.cwd,
        &["plan", cfg.to_str().unwrap(), "s3://merged/gone/"],
        &c.env,
    );
    assert!(
        text(&o).contains(&format!("{files} incomplete upload(s)")),
        "{}",
        text(&o)
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let mut again_env = c.env.clone();
    again_env.push(owner);
    let mut again = Proc::spawn(
        &[
            "coordinator",
            cfg.to_str().unwrap(),
            "s3://merged/gone/",
            "--listen",
            &listen,
            "--insecure",
            "--restart",
            "--linger",
            "1s",
        ],
        &c.cwd,
        &again_env,
        c.dir.path().join("again.log"),
    );
    again.wait_for("coordinator listening", 60);
    again.signal("-TERM");
    again.wait(30);
    // Only the new run's uploads (kept for its resume) are open, none of the old run's.
    assert_eq!(s3.open_uploads(), uploads(&journal));
}

/// The store dies for good under a coordinator and two workers: every process exits
/// non-zero within the store's retry budget plus the abort deadline (each store request is
/// retried for the whole budget, and then the merge fails at once instead of handing the
/// task to another worker to wait as long again), the workers with code 3 (the merge
/// failed: Kubernetes must not restart them), each naming the store that stopped answering.
#[test]
fn a_store_dead_for_good_ends_every_process_within_the_retry_budget() {
    let mut s3 = S3Server::start();
    let (_models, mut c, cfg) = s3_cluster(&s3);
    let budget = Duration::from_secs(20);
    c.env.push((
        "MERGEFLEET_RETRY_TIMEOUT_SECS".into(),
        budget.as_secs().to_string(),
    ));
    let mut coord = c.coordinator(
        cfg.to_str().unwrap(),
        "s3://merged/dead/",
        &[LAYOUT, &["--lease-timeout", "8s"]].concat(),
        "coord.log",
    );
    let slow = [(
        "MERGEFLEET_FAILPOINT_TASK_DELAY_MS".to_string(),
        "300".to_string(),
    )];
    let mut ws = c.workers(2, &slow);
    ws[0].wait_for(": done", 60);
    s3.stop();
    let killed = Instant::now();
    // The budget, the abort deadline, the short wait on the dead store to remove the
    // coordinator's lock, and a few seconds for processes to stop.
    let bound = budget
        + mergefleet::sink::ABORT_DEADLINE
        + mergefleet::sink::lock::RELEASE_WAIT_FAILED
        + Duration::from_secs(5);
    let mut procs: Vec<(&str, &mut Proc)> = vec![("coordinator", &mut coord)];
    for (i, w) in ws.iter_mut().enumerate() {
        procs.push((["w1", "w2"][i], w));
    }
    // Each exit timed as it happens.
    let mut exits: Vec<(&str, Duration, std::process::ExitStatus, String)> = Vec::new();
    while !procs.is_empty() {
        let mut i = 0;
        while i < procs.len() {
            if let Some(st) = procs[i].1.child.try_wait().unwrap() {
                let (name, p) = procs.swap_remove(i);
                exits.push((name, killed.elapsed(), st, p.log()));
            } else {
                i += 1;
            }
        }
        assert!(
            killed.elapsed() <= bound + Duration::from_secs(30),
            "still running {:?} after {:?}",
            procs.iter().map(|p| p.0).collect::<Vec<_>>(),
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for (name, took, st, log) in &exits {
        eprintln!(
            "{name}: exit {st} {:.1} s after the store died",
            took.as_secs_f64()
        );
        assert!(
            *took <= bound,
            "{name} took {took:?} (bound {bound:?}):\n{log}"
        );
        assert!(!st.success(), "{name} exited 0:\n{log}");
        assert!(
            log.contains("s3://"),
            "{name} does not name the store:\n{log}"
        );
        if name.starts_with('w') {
            assert_eq!(st.code(), Some(3), "{name}:\n{log}");
        }
    }
}

/// After the commit the coordinator answers the workers that will ask again, not a worker
/// killed in its long poll (it used to wait the whole --linger for it). Run again by its
/// Job after the commit, it finds the committed checkpoint of the same merge and exits 0
/// without touching it; another merge on that output is still refused.
#[test]
fn the_end_waits_for_no_killed_worker_and_a_restart_finds_the_commit() {
    let d = tmp();
    let cfg = mid_set(d.path());
    let c = Cluster::new(d.path(), vec![]);
    let out = c.dir.path().join("out");
    let (cfg_s, out_s) = (cfg.to_str().unwrap(), out.to_str().unwrap());
    let coordinator_args = ["--lease-timeout", "20s", "--linger", "600s"];
    let mut coord = c.coordinator(cfg_s, out_s, &coordinator_args, "coord.log");
    let delay = [(
        "MERGEFLEET_FAILPOINT_TASK_DELAY_MS".to_string(),
        "4000".to_string(),
    )];
    // One task (the default layout of this small set): the busy worker holds it while the
    // other waits in a long poll, and is killed there.
    let mut busy = c.worker("busy", &[], &delay);
    busy.wait_for("failpoint: holding the task", 60);
    let mut idle = c.worker("idle", &[], &[]);
    idle.wait_for("registered with", 30);
    std::thread::sleep(Duration::from_millis(500));
    idle.signal("-KILL");
    coord.wait_for("committed", 60);
    let committed = Instant::now();
    assert_exit_ok(&mut coord, 60);
    assert_exit_ok(&mut busy, 30);
    assert!(
        committed.elapsed() < Duration::from_secs(30),
        "the coordinator waited {:?} after the commit",
        committed.elapsed()
    );
    let want = embedded(&cfg, d.path(), &[], &[]);
    assert_same_checkpoint(&out, want.path());

    let snapshot = |dir: &Path| -> Vec<(String, std::time::SystemTime, u64)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    m.modified().unwrap(),
                    m.len(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = snapshot(&out);
    let mut again = c.coordinator(cfg_s, out_s, &[], "again.log");
    assert_exit_ok(&mut again, 30);
    assert!(
        again
            .log()
            .contains("already holds this merge's committed checkpoint"),
        "{}",
        again.log()
    );
    assert_eq!(
        snapshot(&out),
        before,
        "the committed checkpoint was touched"
    );
    assert_same_checkpoint(&out, want.path());

    // A different merge (filter_wise) on the committed output: refused as before.
    let other = d.path().join("other.yml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&other, format!("{text}parameters:\n  filter_wise: true\n")).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let refused = run_in(
        d.path(),
        &[
            "coordinator",
            other.to_str().unwrap(),
            out_s,
            "--listen",
            &listen,
            "--insecure",
        ],
        &[],
    );
    assert_exit(&refused, 2);
    assert_eq!(snapshot(&out), before);
}
