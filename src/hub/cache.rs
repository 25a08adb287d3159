//! The local Hugging Face cache as huggingface_hub lays it out, read only.
//!
//! `HUB/models--{org}--{name}/refs/{revision}` holds a commit hash; `snapshots/{commit}/{file}`
//! is a symlink into `blobs/`. A file found there is read from the disk (memory-mapped like
//! any local file) instead of the network. mergefleet never writes the cache.

use std::path::{Path, PathBuf};

/// The cache folder: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`
/// (huggingface_hub's order).
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| hf_home().map(|h| h.join("hub")))
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HOME").or_else(|| {
        var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|h| h.join(".cache")))
            .map(|c| c.join("huggingface"))
    })
}

/// A repo's folder in the cache: `models--org--name`.
pub fn repo_folder(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// The commit a revision points to in the cache: a commit hash is itself; a branch or tag
/// is read from `refs/` (as huggingface_hub does offline).
pub fn commit_of(cache: &Path, repo: &str, revision: &str) -> Option<String> {
    if crate::reference::is_commit(revision) {
        return Some(revision.to_string());
    }
    let text =
        std::fs::read_to_string(repo_folder(cache, repo).join("refs").join(revision)).ok()?;
    let commit = text.trim();
    crate::reference::is_commit(commit).then(|| commit.to_string())
}

/// The snapshot folder of a commit.
pub fn snapshot(cache: &Path, repo: &str, commit: &str) -> PathBuf {
    repo_folder(cache, repo).join("snapshots").join(commit)
}

/// A file of a commit in the cache, when it is there and readable (a dangling symlink,
/// left by an interrupted download, is not).
pub fn file(cache: &Path, repo: &str, commit: &str, name: &str) -> Option<PathBuf> {
    let p = snapshot(cache, repo, commit).join(name);
    std::fs::metadata(&p).ok()?.is_file().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_and_snapshots_as_huggingface_hub_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path();
        let commit = "a".repeat(40);
        let repo = repo_folder(cache, "org/m");
        assert!(repo.ends_with("models--org--m"));
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), &commit).unwrap();
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::write(repo.join("blobs/123"), b"{}").unwrap();
        let snap = snapshot(cache, "org/m", &commit);
        std::fs::create_dir_all(&snap).unwrap();
        std::os::unix::fs::symlink("../../blobs/123", snap.join("config.json")).unwrap();
        std::os::unix::fs::symlink("../../blobs/gone", snap.join("model.safetensors")).unwrap();
        assert_eq!(
            commit_of(cache, "org/m", "main").as_deref(),
            Some(&commit[..])
        );
        assert_eq!(commit_of(cache, "org/m", "v2"), None);
        assert_eq!(
            commit_of(cache, "x/y", &commit).as_deref(),
            Some(&commit[..])
        );
        assert!(file(cache, "org/m", &commit, "config.json").is_some());
        assert!(file(cache, "org/m", &commit, "model.safetensors").is_none());
        assert!(file(cache, "org/m", &commit, "nope.json").is_none());
    }
}
