//! A Hugging Face Hub look-alike: real nginx serving a tree laid out as `tests/hub/README.md`
//! describes (resolve URLs with exact Range, the revision and tree APIs, the Hub's error
//! codes, gated repos, 429s, redirects to a CDN on another host). Killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{free_port, root, tmp, TempDir};

/// The token the gated repos accept.
pub const TOKEN: &str = "hf_mergefleet_test_token";

pub struct HubServer {
    child: Child,
    pub port: u16,
    pub cdn_port: u16,
    /// Holds `prefix/` (nginx's config, logs) and `tree/` (the repos).
    dir: TempDir,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl HubServer {
    pub fn start() -> HubServer {
        let dir = tmp();
        let prefix = dir.path().join("prefix");
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(&prefix).unwrap();
        std::fs::create_dir_all(&tree).unwrap();
        let (port, cdn_port) = (free_port(), free_port());
        let conf = std::fs::read_to_string(root().join("tests/hub/nginx.conf.template"))
            .unwrap()
            .replace("@ROOT@", tree.to_str().unwrap())
            .replace("@PORT@", &port.to_string())
            .replace("@CDN_PORT@", &cdn_port.to_string())
            .replace("@TOKEN@", TOKEN);
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let nginx = std::env::var("NGINX").unwrap_or_else(|_| {
            if Path::new("/usr/sbin/nginx").exists() {
                "/usr/sbin/nginx".into()
            } else {
                "nginx".into()
            }
        });
        let child = Command::new(&nginx)
            .args(["-e", "stderr", "-p"])
            .arg(&prefix)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(prefix.join("stderr.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nginx ({e}); install Debian's nginx or set NGINX")
            });
        let deadline = Instant::now() + Duration::from_secs(20);
        for p in [port, cdn_port] {
            while std::net::TcpStream::connect(("127.0.0.1", p)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "nginx did not listen on {p}: {}",
                    std::fs::read_to_string(prefix.join("stderr.log")).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        HubServer {
            child,
            port,
            cdn_port,
            dir,
        }
    }

    /// `HF_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn tree(&self) -> PathBuf {
        self.dir.path().join("tree")
    }

    /// The environment of a client of this Hub with an empty cache of its own (`cache`)
    /// and no token.
    pub fn env(&self, cache: &Path) -> Vec<(String, String)> {
        vec![
            ("HF_ENDPOINT".into(), self.endpoint()),
            ("HF_HUB_CACHE".into(), cache.display().to_string()),
            ("HF_HOME".into(), cache.join("home").display().to_string()),
            ("HF_TOKEN".into(), String::new()),
            ("MERGEFLEET_RETRY_TIMEOUT_SECS".into(), "20".into()),
        ]
    }

    /// The requests the Hub host served (its access log: one line per request, with the
    /// method, URI, status and Range).
    pub fn requests(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prefix/hub.access.log")).unwrap_or_default()
    }

    /// Publish the files of `src` (a model folder) as a new commit of `repo` and point
    /// `branch` at it. The commit hash is derived from the content. Returns it.
    pub fn publish(&self, repo: &str, branch: &str, src: &Path) -> String {
        let mut files = Vec::new();
        collect(src, src, &mut files);
        files.sort();
        let mut commit_hash = Sha256::new();
        commit_hash.update(repo.as_bytes());
        let mut entries = Vec::new();
        for rel in &files {
            let data = std::fs::read(src.join(rel)).unwrap();
            let sha = hex(&Sha256::digest(&data));
            commit_hash.update(rel.as_bytes());
            commit_hash.update(sha.as_bytes());
            entries.push((rel.clone(), sha, data));
        }
        let commit = hex(&commit_hash.finalize())[..40].to_string();
        let repo_dir = self.tree().join(repo);
        for d in ["blobs/lfs", "info", "tree", "resolve"] {
            std::fs::create_dir_all(repo_dir.join(d)).unwrap();
        }
        let snap = repo_dir.join("resolve").join(&commit);
        let mut siblings = Vec::new();
        let mut tree = Vec::new();
        for (rel, sha, data) in &entries {
            let blob = repo_dir.join("blobs/lfs").join(sha);
            if !blob.exists() {
                std::fs::write(&blob, data).unwrap();
            }
            let link = snap.join(rel);
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            let depth = rel.matches('/').count() + 2;
            let target = format!("{}blobs/lfs/{sha}", "../".repeat(depth));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(target, &link).unwrap();
            let pointer = format!(
                "version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {}\n",
                data.len()
            );
            let pointer_id = hex(&Sha256::digest(pointer.as_bytes()))[..40].to_string();
            siblings.push(serde_json::json!({
                "rfilename": rel, "size": data.len(), "blobId": pointer_id,
                "lfs": {"sha256": sha, "size": data.len(), "pointerSize": pointer.len()},
            }));
            tree.push(serde_json::json!({
                "type": "file", "oid": pointer_id, "size": data.len(), "path": rel,
                "lfs": {"oid": sha, "size": data.len(), "pointerSize": pointer.len()},
            }));
        }
        let gated = repo.starts_with("gated/") || repo_dir.join(".gated").exists();
        let info = serde_json::json!({
            "_id": commit[..24], "id": repo, "modelId": repo,
            "author": repo.split('/').next(), "sha": commit,
            "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
            "private": false, "disabled": false,
            "gated": if gated { serde_json::json!("manual") } else { serde_json::json!(false) },
            "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
        });
        std::fs::write(
            repo_dir.join("info").join(format!("{commit}.json")),
            info.to_string(),
        )
        .unwrap();
        std::fs::write(
            repo_dir.join("tree").join(format!("{commit}.json")),
            serde_json::Value::Array(tree).to_string(),
        )
        .unwrap();
        self.point(repo, branch, &commit);
        commit
    }

    /// Move `branch` of `repo` to `commit` (atomically, as a push does).
    pub fn point(&self, repo: &str, branch: &str, commit: &str) {
        let resolve = self.tree().join(repo).join("resolve");
        let tmp_link = resolve.join(format!(".{branch}.tmp"));
        let _ = std::fs::remove_file(&tmp_link);
        std::os::unix::fs::symlink(commit, &tmp_link).unwrap();
        std::fs::rename(&tmp_link, resolve.join(branch)).unwrap();
    }

    /// Create or remove a marker file of a repo (`.throttle`, `.gated`, `.cdnhost`, ...).
    pub fn mark(&self, repo: &str, marker: &str, on: bool) {
        let p = self.tree().join(repo).join(marker);
        if on {
            std::fs::write(p, b"").unwrap();
        } else {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(root, &p, out);
        } else {
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        }
    }
}

impl Drop for HubServer {
    /// SIGTERM, nginx's fast shutdown: the master stops its worker too (a SIGKILL would
    /// leave the worker running, orphaned, with the port). SIGKILL after 10 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
