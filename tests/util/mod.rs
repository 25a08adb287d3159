//! Helpers for the integration tests: temp dirs, running the real binary, a real
//! S3-compatible server (s3s-fs) on loopback, and reading safetensors files back.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

pub mod hub;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mergefleet")
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures/model_stock")
}

pub fn tmp() -> TempDir {
    tempfile::Builder::new()
        .prefix("mergefleet-test")
        .tempdir()
        .expect("temp dir")
}

/// Run the binary in `cwd` with extra environment variables.
pub fn run_in(cwd: &Path, args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run mergefleet")
}

pub fn run(args: &[&str]) -> Output {
    run_in(&root(), args, &[])
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Assert the command exited with `code` (2: the user's input; 1: anything else), printing
/// its output otherwise; returns that output for further checks.
#[track_caller]
pub fn assert_exit(o: &Output, code: i32) -> String {
    let t = text(o);
    assert_eq!(o.status.code(), Some(code), "{t}");
    t
}

#[track_caller]
pub fn assert_ok(o: &Output) {
    assert!(o.status.success(), "mergefleet failed: {}", text(o));
}

/// Copy a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
            let mut p = std::fs::metadata(&dest).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            p.set_readonly(false);
            std::fs::set_permissions(&dest, p).unwrap();
        }
    }
}

/// A file of the Python virtualenv `.ci/run` installs (`$TMPDIR/mergefleet-ci-venv/REL`), or
/// the path the environment variable `var` names instead; `what` says what it is for.
pub fn ci_venv(rel: &str, var: &str, what: &str) -> PathBuf {
    if let Ok(p) = std::env::var(var) {
        return p.into();
    }
    let tmp = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
    let p = PathBuf::from(tmp).join("mergefleet-ci-venv").join(rel);
    assert!(
        p.exists(),
        "{} is missing: run .ci/run once (it installs {what} there) or set {var}",
        p.display()
    );
    p
}

/// The Python with torch and transformers that `.ci/run` installs
/// (`MERGEFLEET_TORCH_PYTHON` to use another).
pub fn torch_python() -> PathBuf {
    ci_venv(
        "bin/python",
        "MERGEFLEET_TORCH_PYTHON",
        "torch and transformers",
    )
}

/// True when `dir` holds something that looks like a finished checkpoint.
pub fn looks_complete(dir: &Path) -> bool {
    dir.join("model.safetensors").exists() || dir.join("model.safetensors.index.json").exists()
}

/// A tensor read back: dtype name, shape, raw bytes.
pub type Tensors = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

pub fn read_safetensors(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                (
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                ),
            )
        })
        .collect()
}

/// All tensors of a checkpoint directory (one file or shards).
pub fn read_checkpoint(dir: &Path) -> Tensors {
    let mut all = Tensors::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            all.extend(read_safetensors(&p));
        }
    }
    all
}

/// Names of the `.safetensors` and index files in a directory, sorted.
pub fn weight_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors") || n.ends_with(".index.json"))
        .collect();
    v.sort();
    v
}

pub fn weight_map(dir: &Path) -> Option<serde_json::Value> {
    let p = dir.join("model.safetensors.index.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).unwrap();
    Some(v["weight_map"].clone())
}

/// Write a safetensors file with a hand-made header (for corrupt inputs).
pub fn write_raw_safetensors(path: &Path, header: &str, data_len: usize) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.resize(b.len() + data_len, 0);
    std::fs::write(path, b).unwrap();
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where the s3s-fs binary is: `$S3S_FS`, `~/.cargo/bin/s3s-fs`, or `s3s-fs` on PATH.
pub fn s3s_fs() -> PathBuf {
    if let Ok(p) = std::env::var("S3S_FS") {
        return p.into();
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let p = home.join("bin/s3s-fs");
    if p.exists() {
        p
    } else {
        "s3s-fs".into()
    }
}

/// A synthetic set (base + `fine_tunes` of `shape`, `shards` files each) in bucket `models`
/// of an S3 server's `root`, under `name/`, and an empty bucket `merged`. Returns the set's
/// local config and the same config with the models at their `s3://models/name/` URLs.
pub fn s3_model_set(
    root: &Path,
    name: &str,
    shape: &mergefleet::synth::LlamaShape,
    fine_tunes: usize,
    shards: usize,
) -> (PathBuf, String) {
    let set = root.join("models").join(name);
    mergefleet::synth::write_set(&set, shape, fine_tunes, shards).unwrap();
    std::fs::create_dir_all(root.join("merged")).unwrap();
    let local = set.join("model_stock.yml");
    let s3 = std::fs::read_to_string(&local).unwrap().replace(
        &format!("{}/", set.display()),
        &format!("s3://models/{name}/"),
    );
    assert!(s3.contains(&format!("s3://models/{name}/base")), "{s3}");
    (local, s3)
}

/// The arguments that start s3s-fs on `host:port` with the tests' credentials over `root`.
pub fn s3s_fs_args<'a>(host: &'a str, port: &'a str, root: &'a str) -> [&'a str; 9] {
    [
        "--host",
        host,
        "--port",
        port,
        "--access-key",
        ACCESS_KEY,
        "--secret-key",
        SECRET_KEY,
        root,
    ]
}

/// A real S3-compatible server (s3s-fs) on 127.0.0.1 with a temp root; a bucket is a
/// directory of the root. Killed on drop.
pub struct S3Server {
    child: Child,
    pub port: u16,
    pub root: TempDir,
}

pub const ACCESS_KEY: &str = "mergefleet-test";
pub const SECRET_KEY: &str = "mergefleet-secret";

impl S3Server {
    pub fn start() -> S3Server {
        let root = tmp();
        let port = free_port();
        let child = Self::spawn(root.path(), port);
        S3Server { child, port, root }
    }

    /// Kill the server now and start it again on the same port and root after `down`
    /// (in the background, so the caller's processes see the outage).
    pub fn restart_after(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        self.child = Self::spawn(self.root.path(), self.port);
    }

    /// Kill the server (its data stays); [`S3Server::start_again`] brings it back.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn start_again(&mut self) {
        self.child = Self::spawn(self.root.path(), self.port);
    }

    fn spawn(root: &Path, port: u16) -> Child {
        let child = Command::new(s3s_fs())
            .args(s3s_fs_args(
                "127.0.0.1",
                &port.to_string(),
                root.to_str().unwrap(),
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start s3s-fs ({e}); install it with `cargo install s3s-fs@0.14.1 --features binary --locked` or set S3S_FS")
            });
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not start listening on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    pub fn bucket(&self, name: &str) -> PathBuf {
        let p = self.root.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// Incomplete multipart uploads the server holds (s3s-fs keeps one `.upload-*.json`
    /// per open upload in its root).
    pub fn open_uploads(&self) -> usize {
        std::fs::read_dir(self.root.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".upload-"))
            .count()
    }

    /// `merge` of [`S3Server::slow_set`]'s config into `s3://merged/out`, in many small shards
    /// and tasks on one thread (so it runs long enough to be interrupted).
    pub const SLOW_MERGE: [&'static str; 9] = [
        "merge",
        "config.yml",
        "s3://merged/out",
        "--out-shard-size",
        "1M",
        "--task-size",
        "1",
        "--threads",
        "1",
    ];

    /// The interrupted tests' slow set in bucket `models` (under `set/`) and an empty bucket
    /// `merged`. Returns a directory holding `config.yml` (the models at their `s3://`
    /// URLs) and the set's local config.
    pub fn slow_set(&self) -> (TempDir, PathBuf) {
        let models = self.bucket("models");
        let local = crate::interrupted::slow_set(&models.join("set"));
        let yaml = std::fs::read_to_string(&local)
            .unwrap()
            .replace(&format!("{}/", models.display()), "s3://models/");
        let d = tmp();
        std::fs::write(d.path().join("config.yml"), yaml).unwrap();
        self.bucket("merged");
        (d, local)
    }

    /// The environment a client needs to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A background mergefleet process whose output goes to a log file.
pub struct Proc {
    pub child: Child,
    log: PathBuf,
}

impl Proc {
    /// Run the mergefleet binary with `args`, the caller's environment plus `env`.
    pub fn spawn(args: &[&str], cwd: &Path, env: &[(String, String)], log: PathBuf) -> Proc {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .current_dir(cwd)
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        Proc::start(cmd, log)
    }

    /// Start a prepared command, its stdout and stderr going to `log`.
    pub fn start(mut cmd: Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Proc { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    #[track_caller]
    pub fn wait_for(&mut self, needle: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !self.log().contains(needle) {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "process exited ({st}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} after {secs} s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[track_caller]
    pub fn wait(&mut self, secs: u64) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {secs} s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: &str) {
        assert!(Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Does the gRPC health service at `url` say SERVING (no token)?
pub fn serving(url: &str) -> bool {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap();
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    })
}

#[track_caller]
pub fn assert_exit_ok(p: &mut Proc, secs: u64) {
    let st = p.wait(secs);
    assert!(st.success(), "exit {st}:\n{}", p.log());
}

/// Compare every weight file and the index of two checkpoint directories byte for byte.
#[track_caller]
pub fn assert_same_checkpoint(a: &Path, b: &Path) {
    assert_eq!(weight_files(a), weight_files(b));
    for f in weight_files(a) {
        assert!(
            std::fs::read(a.join(&f)).unwrap() == std::fs::read(b.join(&f)).unwrap(),
            "{f} differs"
        );
    }
}
