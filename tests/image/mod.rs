//! The container image, run for real with podman: what a user's first `kubectl apply`
//! would otherwise find out. The image is `$MERGEFLEET_IMAGE` when set (`.ci/run` builds it
//! from the release binary), otherwise `deploy/image.sh` packages this test build's binary
//! once per run. Without a working podman every test here says why it is skipped.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::util::*;

/// The image's unprivileged user, as deploy/Dockerfile sets it and the manifests expect.
const USER: &str = "65532:65532";

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("podman runs")
}

#[track_caller]
fn podman_ok(args: &[&str]) -> String {
    let o = podman(args);
    assert!(o.status.success(), "podman {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The image to test, or None (with the reason printed) where podman cannot run one.
fn image() -> Option<&'static str> {
    static IMAGE: OnceLock<Option<String>> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let usable = Command::new("podman")
                .args(["info", "--format", "{{.Host.OCIRuntime.Name}}"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            let given = std::env::var("MERGEFLEET_IMAGE").ok();
            if !usable {
                // `.ci/run` built the image: a podman that cannot run it now is a failure.
                assert!(
                    given.is_none(),
                    "MERGEFLEET_IMAGE is set but podman cannot run"
                );
                return None;
            }
            if let Some(image) = given {
                return Some(image);
            }
            let tag = "localhost/mergefleet:cargo-test";
            let o = Command::new(root().join("deploy/image.sh"))
                .args([tag, bin()])
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "deploy/image.sh failed (without a registry, make the base image first: \
                 deploy/debian-base.sh):\n{}",
                text(&o)
            );
            Some(tag.to_string())
        })
        .as_deref()
        .or_else(|| {
            eprintln!("skipped: podman cannot run containers here (`.ci/run` installs it)");
            None
        })
}

/// Containers and a network removed on drop, so a failed assertion leaves nothing running.
struct Scope {
    names: Vec<String>,
    network: Option<String>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = podman(&["rm", "-f", "-t", "0", n]);
        }
        if let Some(net) = &self.network {
            let _ = podman(&["network", "rm", "-f", net]);
        }
    }
}

/// Wait for container `name` to exit and return its exit code and logs.
fn wait_exit(name: &str, secs: u64) -> (i32, String) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let state = podman_ok(&["inspect", "--format", "{{.State.Status}}", name]);
        if state == "exited" || state == "stopped" {
            let code = podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", name]);
            let logs = podman(&["logs", name]);
            return (code.parse().unwrap(), text(&logs));
        }
        let logs = text(&podman(&["logs", name]));
        assert!(
            Instant::now() < deadline,
            "{name} still {state} after {secs} s:\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Wait until container `name` has logged `needle`.
fn wait_log(name: &str, needle: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let logs = text(&podman(&["logs", name]));
        if logs.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not log {needle:?} in {secs} s:\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A host folder the image's user may write to, as a volume a pod gets.
fn writable(dir: &Path) {
    let o = Command::new("chown")
        .args([USER, dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "chown: {}", text(&o));
}

#[test]
fn the_image_starts_as_a_non_root_user_with_a_ca_bundle() {
    let Some(image) = image() else { return };
    let size: u64 = podman_ok(&["image", "inspect", "--format", "{{.Size}}", image])
        .parse()
        .unwrap();
    eprintln!("image {image}: {} MB", size / 1_000_000);

    // The binary's libraries are all there: it starts and says what it is.
    let version = podman_ok(&["run", "--rm", image, "--version"]);
    assert_eq!(version, text(&run(&["--version"])).trim());
    // With no arguments it prints its help (the image's CMD), not an error.
    assert!(podman_ok(&["run", "--rm", image]).contains("Usage"));

    assert_eq!(
        podman_ok(&["image", "inspect", "--format", "{{.Config.User}}", image]),
        USER
    );
    let id = podman_ok(&["run", "--rm", "--entrypoint", "id", image]);
    assert!(
        id.starts_with("uid=65532(") && id.contains(" gid=65532("),
        "{id}"
    );

    // HTTPS object stores need the system's roots: rustls-native-certs reads this bundle.
    let bundle = podman_ok(&[
        "run",
        "--rm",
        "--entrypoint",
        "cat",
        image,
        "/etc/ssl/certs/ca-certificates.crt",
    ]);
    let certs = bundle.matches("BEGIN CERTIFICATE").count();
    assert!(certs > 100, "only {certs} certificates in the CA bundle");
}

#[test]
fn merge_in_the_image_reads_read_only_inputs_and_writes_a_mount() {
    let Some(image) = image() else { return };
    let d = tmp();
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    writable(&out);
    let examples = root().join("examples");
    let name = format!("mft-{}-merge", std::process::id());
    let _scope = Scope {
        names: vec![name.clone()],
        network: None,
    };
    let inputs = format!("{}:/work/examples:ro", examples.display());
    let output = format!("{}:/out", out.display());
    let o = podman(&[
        "run",
        "--name",
        &name,
        "--network",
        "none",
        "-v",
        &inputs,
        "-v",
        &output,
        "-w",
        "/work",
        image,
        "merge",
        "examples/model_stock.yml",
        "/out/merged",
    ]);
    assert!(o.status.success(), "merge in the image: {}", text(&o));

    let want = d.path().join("want");
    assert_ok(&run_in(
        &root(),
        &[
            "merge",
            "examples/model_stock.yml",
            want.to_str().unwrap(),
            "-q",
        ],
        &[],
    ));
    let merged = out.join("merged");
    assert_same_checkpoint(&merged, &want);
    assert!(looks_complete(&merged));
    // Written by the image's user, which a pod's securityContext (runAsNonRoot) allows.
    let owner = Command::new("stat")
        .args([
            "-c",
            "%u",
            merged.join("model.safetensors").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(text(&owner).trim(), "65532");
}

#[test]
fn a_cluster_of_containers_on_a_podman_network_equals_embedded_mode() {
    let Some(image) = image() else { return };
    let d = tmp();
    let id = format!("mft-{}", std::process::id());
    let net = format!("{id}-net");
    let [s3, co, w1, w2] = ["s3", "co", "w1", "w2"].map(|n| format!("{id}-{n}"));
    let _scope = Scope {
        names: vec![w1.clone(), w2.clone(), co.clone(), s3.clone()],
        network: Some(net.clone()),
    };
    podman_ok(&["network", "create", &net]);

    // The S3 server's root: the models in bucket `models`, the output in bucket `merged`.
    let s3root = d.path().join("s3");
    let shape = mergefleet::synth::LlamaShape::small();
    let (local_cfg, s3_cfg) = s3_model_set(&s3root, "mid", &shape, 3, 5);
    let cfg_dir = d.path().join("cfg");
    std::fs::create_dir(&cfg_dir).unwrap();
    std::fs::write(cfg_dir.join("config.yml"), &s3_cfg).unwrap();

    // s3s-fs runs in a container on the same network (its binary mounted from the host;
    // it needs nothing the image lacks).
    let server = format!("{}:/usr/local/bin/s3s-fs:ro", s3s_fs().display());
    let data = format!("{}:/data", s3root.display());
    let mut args = vec![
        "run",
        "-d",
        "--name",
        &s3,
        "--network",
        &net,
        "--user",
        "0",
        "-v",
        &server,
        "-v",
        &data,
        "--entrypoint",
        "/usr/local/bin/s3s-fs",
        image,
    ];
    args.extend(s3s_fs_args("0.0.0.0", "9000", "/data"));
    podman_ok(&args);

    let endpoint = format!("AWS_ENDPOINT=http://{s3}:9000");
    let access = format!("AWS_ACCESS_KEY_ID={ACCESS_KEY}");
    let secret = format!("AWS_SECRET_ACCESS_KEY={SECRET_KEY}");
    let env = [
        endpoint.as_str(),
        "AWS_ALLOW_HTTP=true",
        "AWS_REGION=us-east-1",
        &access,
        &secret,
        "AWS_EC2_METADATA_DISABLED=true",
        "MERGEFLEET_TOKEN=image-test-token-0123456789abcdef",
        "RUST_LOG=info",
    ];
    let env_args: Vec<&str> = env.iter().flat_map(|e| ["-e", e]).collect();
    // Small files make several tasks, so that both workers get some.
    let layout = ["--out-shard-size", "1M", "--task-size", "1"];
    let cfg_mount = format!("{}:/cfg:ro", cfg_dir.display());
    let mut args = vec![
        "run",
        "-d",
        "--name",
        &co,
        "--network",
        &net,
        "-v",
        &cfg_mount,
    ];
    args.extend(&env_args);
    args.extend([
        image,
        "coordinator",
        "/cfg/config.yml",
        "s3://merged/fleet/",
        "--listen",
        "0.0.0.0:7300",
        "--linger",
        "5s",
    ]);
    args.extend(layout);
    podman_ok(&args);
    wait_log(&co, "coordinator listening", 60);

    // One task at a time, each held a second, so the worker that starts second still finds
    // work.
    let coordinator = format!("http://{co}:7300");
    for (w, name) in [(&w1, "w1"), (&w2, "w2")] {
        let mut args = vec!["run", "-d", "--name", w.as_str(), "--network", &net];
        args.extend(&env_args);
        args.extend([
            "-e",
            "MERGEFLEET_FAILPOINT_TASK_DELAY_MS=1000",
            image,
            "worker",
            "--coordinator",
            &coordinator,
            "--name",
            name,
            "--threads",
            "1",
            "--tasks-in-flight",
            "1",
            "--retry-for",
            "60s",
        ]);
        podman_ok(&args);
    }

    let (code, co_log) = wait_exit(&co, 300);
    assert_eq!(code, 0, "the coordinator:\n{co_log}");
    assert_eq!(co_log.matches("worker registered").count(), 2, "{co_log}");
    for w in [&w1, &w2] {
        let (code, log) = wait_exit(w, 60);
        assert_eq!(code, 0, "{w}:\n{log}");
        assert!(
            !log.contains(" 0 task(s) ran here"),
            "{w} ran no task:\n{log}\nthe coordinator:\n{co_log}"
        );
    }

    let want = d.path().join("want");
    let mut args = vec![
        "merge",
        local_cfg.to_str().unwrap(),
        want.to_str().unwrap(),
        "-q",
    ];
    args.extend(layout);
    assert_ok(&run(&args));
    let merged = s3root.join("merged/fleet");
    assert!(
        weight_files(&merged).len() > 1,
        "{:?}",
        weight_files(&merged)
    );
    assert_same_checkpoint(&merged, &want);
}
