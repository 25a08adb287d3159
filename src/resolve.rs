//! From a model as the config names it to a location every process reads the same way.
//!
//! mergekit's rule, kept: a path that exists here (relative to the working directory) is a
//! local folder; otherwise a string of Hub-id shape is a Hugging Face repo; anything else is
//! an error giving both readings. Hub revisions are pinned to a commit now, once, and the
//! model becomes `hf://REPO@COMMIT`, the form [`crate::store::Stores::resolve`] reads (from
//! the local cache or the Hub) in the coordinator, every worker and embedded mode alike.

use crate::hub::{self, HubError};
use crate::reference::{is_hub_id, is_url, ModelPath};
use crate::source::SourceError;
use crate::store::Stores;

/// A model pinned: the location spec to open, and a note for the user (a revision
/// mergekit would ignore, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Pinned {
    pub spec: String,
    pub note: Option<String>,
}

/// Pin one model path (a model or an adapter).
pub async fn pin(stores: &Stores, p: &ModelPath) -> Result<Pinned, SourceError> {
    let plain = |spec: &str| Pinned {
        spec: spec.into(),
        note: None,
    };
    if let Some(repo) = p.path.strip_prefix("hf://") {
        let repo = repo.trim_end_matches('/');
        return pin_hub(stores, repo, p.revision.as_deref()).await;
    }
    if is_url(&p.path) {
        return match &p.revision {
            None => Ok(plain(&p.path)),
            Some(r) => Err(SourceError::NotFound {
                location: p.to_string(),
                message: format!(
                    "a revision (`@{r}`) belongs to Hugging Face repos, not to object-store URLs; \
                     remove it or name the Hub repo"
                ),
            }),
        };
    }
    // Existence as the stores read paths: relative to the working directory, `.` and `..`
    // taken lexically (mergekit's `os.path.exists` would miss `./x/../m` when `x` is absent).
    if crate::store::lexical_path(&p.path).is_some_and(|l| l.exists()) {
        return Ok(Pinned {
            spec: p.path.clone(),
            note: p.revision.as_ref().map(|r| {
                format!(
                    "`{p}`: `{}` is a local folder, so the revision `{r}` is ignored (as mergekit does)",
                    p.path
                )
            }),
        });
    }
    if is_hub_id(&p.path) {
        return pin_hub(stores, &p.path, p.revision.as_deref()).await;
    }
    Err(SourceError::NotFound {
        location: p.path.clone(),
        message: format!(
            "no folder `{}` here ({}), and `{}` is not a Hugging Face repo id (`org/name`)",
            p.path,
            std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|_| "the working directory".into()),
            p.path
        ),
    })
}

async fn pin_hub(
    stores: &Stores,
    repo: &str,
    revision: Option<&str>,
) -> Result<Pinned, SourceError> {
    if !is_hub_id(repo) {
        return Err(SourceError::NotFound {
            location: format!("hf://{repo}"),
            message: "not a Hugging Face repo id (`org/name`)".into(),
        });
    }
    let client = stores.hub()?;
    let pinned = hub::pin(&client, repo, revision).await?;
    if let Some(files) = &pinned.files {
        let has = |ext: &str| files.iter().any(|f| f.to_ascii_lowercase().ends_with(ext));
        if !has(".safetensors") && has(".bin") {
            return Err(HubError::BinOnly {
                repo: repo.into(),
                revision: revision.unwrap_or("main").into(),
            }
            .into());
        }
    }
    Ok(Pinned {
        spec: format!("hf://{repo}@{}", pinned.commit),
        note: None,
    })
}
