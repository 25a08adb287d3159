//! Models on the Hugging Face Hub, read where they are: the local HF cache first, else
//! straight from the Hub by byte ranges, pinned to one commit.
//!
//! mergekit downloads every file of every Hub model before it merges a tensor; a fleet that
//! first copies a 1.3 TB checkpoint into object storage moves each byte twice. Here a Hub
//! repo is one more object store ([`HubStore`]): headers and indexes are ranged GETs of the
//! resolve URL, tensors the same parallel ranged reads as S3. A revision is pinned to its
//! commit once, by the Hub's revision API ([`pin`]), and every process of a merge reads that
//! commit (`hf://org/name@COMMIT/file`), so a branch moved mid-merge changes nothing.
//!
//! Settings are huggingface_hub's variables: `HF_ENDPOINT`, `HF_TOKEN` (else
//! `HF_TOKEN_PATH`, else `HF_HOME/token`), `HF_HUB_CACHE`/`HF_HOME`, `HF_HUB_OFFLINE`.

pub mod cache;
mod http;
mod store;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

pub use http::HubClient;
pub use store::HubStore;

/// What went wrong talking to the Hub, with the repo and what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    #[error("Hugging Face repo `{repo}` is gated or private and {why}: accept the conditions on {page} (or ask for access), then set HF_TOKEN to a token of that account")]
    Gated {
        repo: String,
        page: String,
        why: String,
    },
    #[error("no Hugging Face repo `{repo}` on {endpoint} (if it is private, set HF_TOKEN to a token that can read it; check the spelling)")]
    RepoNotFound { repo: String, endpoint: String },
    #[error("Hugging Face repo `{repo}` has no revision `{revision}` (a branch, tag or commit; see {page})")]
    RevisionNotFound {
        repo: String,
        revision: String,
        page: String,
    },
    #[error("`{file}` is not in Hugging Face repo `{repo}` at {revision}")]
    EntryNotFound {
        repo: String,
        revision: String,
        file: String,
    },
    #[error("HF_HUB_OFFLINE is set and {what} of Hugging Face repo `{repo}`{at} is not in the cache {cache}: run once online (or `huggingface-cli download {repo}`), or unset HF_HUB_OFFLINE")]
    Offline {
        repo: String,
        at: String,
        what: String,
        cache: String,
    },
    #[error("Hugging Face repo `{repo}` at {revision} has only PyTorch `.bin` weights; mergefleet reads safetensors: convert them (or pick a revision with safetensors)")]
    BinOnly { repo: String, revision: String },
    #[error("{url}: {message}")]
    Http { url: String, message: String },
}

/// How this process reaches the Hub (from the environment and `--no-hf-cache`).
#[derive(Debug, Clone)]
pub struct HubEnv {
    /// `HF_ENDPOINT` without a trailing slash.
    pub endpoint: String,
    pub token: Option<String>,
    /// The HF cache, unless `--no-hf-cache`.
    pub cache: Option<PathBuf>,
    /// `HF_HUB_OFFLINE=1`: the cache only.
    pub offline: bool,
}

static USE_CACHE: OnceLock<bool> = OnceLock::new();

/// `--no-hf-cache`: read Hub models from the Hub even when the local cache has them (the
/// first call wins).
pub fn configure(use_cache: bool) {
    let _ = USE_CACHE.set(use_cache);
}

impl HubEnv {
    pub fn from_env() -> HubEnv {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let truthy = |k: &str| {
            var(k).is_some_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
        };
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .or_else(|| cache::hf_home().map(|h| h.join("token")))?;
                std::fs::read_to_string(path).ok()
            })
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let use_cache = *USE_CACHE.get().unwrap_or(&true);
        HubEnv {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            token,
            cache: if use_cache { cache::cache_dir() } else { None },
            offline: truthy("HF_HUB_OFFLINE") || truthy("TRANSFORMERS_OFFLINE"),
        }
    }

    /// The repo's page, for messages.
    pub fn page(&self, repo: &str) -> String {
        format!("{}/{repo}", self.endpoint)
    }
}

/// A revision pinned to its commit, with the repo's file list when the Hub gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pinned {
    pub commit: String,
    /// `None` when pinned from the cache or by a commit hash (no listing was read).
    pub files: Option<Vec<String>>,
    /// The repo asks users to accept conditions before its files are served.
    pub gated: bool,
}

/// Pin `revision` (default `main`) of `repo` to a commit: a commit hash is itself; offline,
/// the cache's `refs/`; else the Hub's revision API, which also lists the files.
pub async fn pin(
    client: &Arc<HubClient>,
    repo: &str,
    revision: Option<&str>,
) -> Result<Pinned, HubError> {
    let env = client.env();
    let revision = revision.unwrap_or("main");
    if crate::reference::is_commit(revision) {
        return Ok(Pinned {
            commit: revision.into(),
            files: None,
            gated: false,
        });
    }
    if env.offline {
        let found = env
            .cache
            .as_deref()
            .and_then(|c| cache::commit_of(c, repo, revision));
        return found
            .map(|commit| Pinned {
                commit,
                files: None,
                gated: false,
            })
            .ok_or_else(|| HubError::Offline {
                repo: repo.into(),
                at: format!("@{revision}"),
                what: "the revision".into(),
                cache: cache_name(env),
            });
    }
    let pinned = client.revision(repo, revision).await?;
    // The Hub serves a gated repo's listing to anyone but its files only to accounts that
    // accepted its conditions: without a token, say so now, not at the first file.
    if pinned.gated && env.token.is_none() {
        return Err(HubError::Gated {
            repo: repo.into(),
            page: env.page(repo),
            why: "no token is set (HF_TOKEN)".into(),
        });
    }
    Ok(pinned)
}

/// The cache folder as messages name it.
pub fn cache_name(env: &HubEnv) -> String {
    match &env.cache {
        Some(c) => c.display().to_string(),
        None => "(none: --no-hf-cache)".into(),
    }
}
