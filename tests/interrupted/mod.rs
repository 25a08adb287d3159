//! A merge killed or stopped midway never leaves a checkpoint that looks complete.

use std::path::Path;

use crate::util::*;

/// A synthetic set big enough that a merge into 1 MB shards takes a while.
pub fn slow_set(dir: &Path) -> std::path::PathBuf {
    let shape = mergefleet::synth::LlamaShape {
        hidden: 512,
        layers: 8,
        intermediate: 1536,
        vocab: 8192,
        heads: 8,
        kv_heads: 4,
        lm_head: true,
    };
    mergefleet::synth::write_set(dir, &shape, 3, 1).unwrap();
    dir.join("model_stock.yml")
}

/// Start a merge into many small shards and wait until the first one is visible.
pub fn start_and_wait_for_first_shard(cfg: &Path, out: &Path) -> std::process::Child {
    let mut child = std::process::Command::new(bin())
        .args(["merge", cfg.to_str().unwrap(), out.to_str().unwrap()])
        .args([
            "--out-shard-size",
            "1M",
            "--threads",
            "1",
            "--task-size",
            "1",
            "-q",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first_shard_visible = || {
        std::fs::read_dir(out).is_ok_and(|d| {
            d.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("model-00001-of-")
            })
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !first_shard_visible() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "merge ended before the first shard appeared"
        );
        assert!(std::time::Instant::now() < deadline, "no shard after 60 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child
}

#[test]
fn killed_merge_leaves_no_complete_checkpoint() {
    let dir = tmp();
    let cfg = slow_set(dir.path());
    let out = dir.path().join("out");
    let mut child = start_and_wait_for_first_shard(&cfg, &out);
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the merge finished before it was killed");
    assert!(
        !looks_complete(&out),
        "a killed merge left a complete-looking checkpoint"
    );
    // Running again refuses nothing (no complete checkpoint) and completes.
    let o = run(&[
        "merge",
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        "--out-shard-size",
        "1M",
        "-q",
    ]);
    assert_ok(&o);
    assert!(out.join("model.safetensors.index.json").exists());
}

#[test]
fn sigterm_cleans_up_partial_files() {
    let dir = tmp();
    let cfg = slow_set(dir.path());
    let out = dir.path().join("out");
    let mut child = start_and_wait_for_first_shard(&cfg, &out);
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    assert!(!status.success(), "the merge finished before SIGTERM");
    assert!(!looks_complete(&out));
    let partial: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".mergefleet-partial"))
        .collect();
    assert!(partial.is_empty(), "partial files left behind: {partial:?}");
}
