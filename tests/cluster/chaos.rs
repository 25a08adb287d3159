//! Chaos: a merge with many tasks and 5 workers while workers are killed (kill -9) at
//! random every second or two and replaced, as a Job would, and the coordinator is killed
//! once and restarted. The output must equal embedded mode's byte for byte, in bounded time.
//!
//! Soak (not in CI): `MERGEFLEET_CHAOS_ROUNDS=20 cargo test --release chaos -- --nocapture`
//! runs 20 merges in a row and prints how many kills they survived;
//! `MERGEFLEET_CHAOS_SEED=N` replays a run.

use super::*;

/// 219 tensors, 4 shards per model; with `--task-size 20MiB` the plan has 27 tasks
/// (`mergefleet plan` says so).
fn chaos_set(dir: &Path) -> PathBuf {
    llama_set(dir, 24, 4)
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn chaos_random_worker_kills_and_a_coordinator_restart() {
    let rounds: usize = std::env::var("MERGEFLEET_CHAOS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let seed = std::env::var("MERGEFLEET_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("chaos seed {seed} (MERGEFLEET_CHAOS_SEED replays it)");
    let mut rng = Rng(seed);
    let d = tmp();
    let cfg = chaos_set(d.path());
    let want = embedded(&cfg, d.path(), &[], &[]);
    let (mut worker_kills, mut coordinator_kills) = (0, 0);
    for round in 1..=rounds {
        let c = Cluster::new(d.path(), vec![]);
        let out = c.dir.path().join("out");
        // Short leases so a killed worker's task goes back to the queue quickly; each task
        // held 500 ms so kills land mid-task and the merge outlives several kills.
        let args = ["--lease-timeout", "2s", "--task-size", "20MiB"];
        let delay = [(
            "MERGEFLEET_FAILPOINT_TASK_DELAY_MS".to_string(),
            "500".to_string(),
        )];
        let start =
            |c: &Cluster, n: usize| c.worker(&format!("w{n}"), &["--tasks-in-flight", "1"], &delay);
        let mut coord = c.coordinator(
            cfg.to_str().unwrap(),
            out.to_str().unwrap(),
            &args,
            "coord.log",
        );
        let mut next = 1;
        let mut ws: Vec<Proc> = (0..5)
            .map(|_| {
                next += 1;
                start(&c, next - 1)
            })
            .collect();
        let began = Instant::now();
        let mut restarted = false;
        let mut next_kill = Instant::now() + Duration::from_millis(1000 + rng.below(1000));
        loop {
            if let Some(st) = coord.child.try_wait().unwrap() {
                assert!(
                    st.success(),
                    "round {round}: coordinator exit {st}:\n{}",
                    coord.log()
                );
                break;
            }
            assert!(
                began.elapsed() < Duration::from_secs(240),
                "round {round}: no commit after 240 s (seed {seed}):\n{}",
                coord.log()
            );
            // The coordinator dies once, after some work is journaled.
            let journaled = std::fs::read(out.join(".mergefleet-journal.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|j| j["done"].as_object().is_some_and(|d| !d.is_empty()));
            if !restarted && journaled {
                coord.signal("-KILL");
                coord.wait(10);
                coordinator_kills += 1;
                coord = c.coordinator(
                    cfg.to_str().unwrap(),
                    out.to_str().unwrap(),
                    &args,
                    "coord2.log",
                );
                restarted = true;
            }
            if Instant::now() >= next_kill {
                let victim = rng.below(ws.len() as u64) as usize;
                ws[victim].signal("-KILL");
                ws[victim].wait(10);
                worker_kills += 1;
                ws[victim] = start(&c, next);
                next += 1;
                next_kill = Instant::now() + Duration::from_millis(1000 + rng.below(1000));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            restarted,
            "round {round}: finished before the coordinator could be killed"
        );
        for w in &mut ws {
            assert_exit_ok(w, 60);
        }
        assert_same_checkpoint(&out, want.path());
        println!(
            "chaos round {round}: committed in {:.1} s; so far {worker_kills} worker kills, {coordinator_kills} coordinator kills survived",
            began.elapsed().as_secs_f64()
        );
    }
    assert!(
        worker_kills > 0,
        "no worker was killed: the merge was too quick to test anything"
    );
}
