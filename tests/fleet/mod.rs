//! The cluster over a real network: the S3 server, the coordinator and two workers each on
//! a host of its own (network namespaces joined by a bridge, `benches/netns.sh`), talking
//! over their addresses with a token, as pods do. The output equals embedded mode's.
//! Needs root and iproute2, as `.ci/run` has; elsewhere it says why it is skipped.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::util::*;

/// Hosts made by `benches/netns.sh` for this test, removed on drop.
struct Hosts {
    id: String,
}

impl Hosts {
    fn up(workers: usize) -> Option<Hosts> {
        let root = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&root.stdout).trim() != "0"
            || Command::new("ip").arg("-V").output().is_err()
        {
            eprintln!(
                "skipped: network namespaces need root and iproute2 (`.ci/run` runs as root)"
            );
            return None;
        }
        let id = format!("mft{}", std::process::id() % 10000);
        // Root without the right to make namespaces (a container without NET_ADMIN).
        let probe = format!("{id}-probe");
        let made = Command::new("ip")
            .args(["netns", "add", &probe])
            .output()
            .ok()?;
        if !made.status.success() {
            eprintln!("skipped: cannot make a network namespace: {}", text(&made));
            return None;
        }
        let _ = Command::new("ip").args(["netns", "del", &probe]).output();
        let h = Hosts { id };
        let o = Command::new(root_path("benches/netns.sh"))
            .args(["up", &h.id, &workers.to_string()])
            .output()
            .unwrap();
        assert!(o.status.success(), "netns.sh up: {}", text(&o));
        Some(h)
    }

    /// Start `program args` on host `name` (s3, co, w1, ...), its output to `log`.
    fn spawn(
        &self,
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(String, String)],
        log: &Path,
    ) -> Child {
        let f = std::fs::File::create(log).unwrap();
        Command::new("ip")
            .args(["netns", "exec", &format!("{}-{name}", self.id)])
            .arg(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = Command::new(root_path("benches/netns.sh"))
            .args(["down", &self.id])
            .output();
    }
}

fn root_path(p: &str) -> std::path::PathBuf {
    root().join(p)
}

/// Kills a child on drop (a failed assertion must not leave servers behind).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_ok(c: &mut Killed, what: &str, log: &Path, secs: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(status) = c.0.try_wait().unwrap() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            assert!(status.success(), "{what} exited with {status}:\n{log}");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} still running after {secs} s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn two_worker_hosts_against_s3_equal_embedded_mode() {
    let Some(hosts) = Hosts::up(2) else { return };
    let d = tmp();
    // The S3 server's root: the models in bucket `models`, an empty bucket `merged`.
    let s3root = d.path().join("s3");
    let shape = mergefleet::synth::LlamaShape {
        hidden: 512,
        layers: 4,
        intermediate: 1536,
        vocab: 8192,
        heads: 8,
        kv_heads: 4,
        lm_head: true,
    };
    let (local_cfg, s3_cfg) = s3_model_set(&s3root, "mid", &shape, 3, 2);
    let cfg = d.path().join("config.yml");
    std::fs::write(&cfg, &s3_cfg).unwrap();

    let s3 = |k: &str, v: &str| (k.to_string(), v.to_string());
    let env = vec![
        s3("AWS_ENDPOINT", "http://10.77.0.2:9000"),
        s3("AWS_ALLOW_HTTP", "true"),
        s3("AWS_REGION", "us-east-1"),
        s3("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        s3("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        s3("AWS_EC2_METADATA_DISABLED", "true"),
        s3("MERGEFLEET_TOKEN", "fleet-test-token-0123456789abcdef"),
    ];
    let s3s = s3s_fs();
    let log = |n: &str| d.path().join(format!("{n}.log"));
    let _server = Killed(hosts.spawn(
        "s3",
        &s3s,
        &s3s_fs_args("10.77.0.2", "9000", s3root.to_str().unwrap()),
        &[],
        &log("s3"),
    ));
    let bin = Path::new(bin());
    let layout = ["--out-shard-size", "12M", "--task-size", "1"];
    let mut args = vec![
        "coordinator",
        cfg.to_str().unwrap(),
        "s3://merged/fleet/",
        "--listen",
        "10.77.0.3:7300",
        "--linger",
        "5s",
    ];
    args.extend(layout);
    let mut coord = Killed(hosts.spawn("co", bin, &args, &env, &log("co")));
    // Each task held 200 ms, so the second host has work left when it joins, even on a
    // loaded machine.
    let mut worker_env = env.clone();
    worker_env.push(s3("MERGEFLEET_FAILPOINT_TASK_DELAY_MS", "200"));
    let mut workers: Vec<Killed> = ["w1", "w2"]
        .iter()
        .map(|w| {
            Killed(hosts.spawn(
                w,
                bin,
                &[
                    "worker",
                    "--coordinator",
                    "http://10.77.0.3:7300",
                    "--name",
                    w,
                    "--threads",
                    "1",
                    "--retry-for",
                    "60s",
                ],
                &worker_env,
                &log(w),
            ))
        })
        .collect();
    wait_ok(&mut coord, "the coordinator", &log("co"), 180);
    for (w, name) in workers.iter_mut().zip(["w1", "w2"]) {
        wait_ok(w, name, &log(name), 30);
        let l = std::fs::read_to_string(log(name)).unwrap();
        assert!(
            !l.contains(" 0 task(s) ran here"),
            "{name} ran no task:\n{l}"
        );
    }
    // Only the hosts' addresses connect them: the coordinator saw the workers register.
    let co = std::fs::read_to_string(log("co")).unwrap();
    assert_eq!(co.matches("worker registered").count(), 2, "{co}");

    let want = tmp();
    let mut args = vec![
        "merge",
        local_cfg.to_str().unwrap(),
        want.path().to_str().unwrap(),
        "-q",
        "--overwrite",
    ];
    args.extend(layout);
    assert_ok(&run(&args));
    assert_same_checkpoint(&s3root.join("merged/fleet"), want.path());
}
