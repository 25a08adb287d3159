//! The record of the multipart uploads merges opened under an output, so that whoever owns
//! the output next aborts the ones left open.
//!
//! An incomplete multipart upload is invisible and costs storage until it is aborted. A merge
//! that fails with its store gone cannot abort its uploads, and one killed outright never
//! tries. So every upload is recorded in `OUT/.mergefleet-uploads.json` right after it is
//! created and before its first part is sent, and a merge that takes ownership of OUT (under
//! its lock) aborts every recorded upload it will not resume. Listing a bucket's uploads
//! would find uploads of other tools too, but not every S3-compatible server answers that
//! call; the record works on every store that has multipart uploads. Uploads no merge will
//! ever come back for are the job of a bucket lifecycle rule (`AbortIncompleteMultipartUpload`).

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use object_store::multipart::MultipartStore;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use super::{SinkError, ABORT_DEADLINE};
use crate::store::{head_size, read_small, Location};

pub const UPLOADS_NAME: &str = ".mergefleet-uploads.json";

/// One multipart upload: the output file and the store's upload id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Upload {
    pub file: String,
    pub upload_id: String,
}

/// What became of a recorded upload when an output was taken over.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Gone {
    Aborted,
    Already,
    No,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    uploads: BTreeSet<Upload>,
}

/// The uploads recorded under an output this process owns.
pub struct Uploads {
    location: Location,
    store: Arc<dyn MultipartStore>,
    open: tokio::sync::Mutex<BTreeSet<Upload>>,
}

/// The uploads recorded under `location` (none for local outputs or a missing record). A
/// record that cannot be parsed is reported and counts as empty: it only ever names
/// uploads to abort, and a lifecycle rule takes care of what it loses.
pub async fn recorded(location: &Location) -> Result<Vec<Upload>, SinkError> {
    if location.multipart.is_none() {
        return Ok(Vec::new());
    }
    let store = location.store.as_ref();
    let (path, url) = (
        location.child(UPLOADS_NAME),
        location.child_display(UPLOADS_NAME),
    );
    if head_size(store, &path, &url).await?.is_none() {
        return Ok(Vec::new());
    }
    let raw = read_small(store, &path, &url).await?;
    match serde_json::from_slice::<Record>(&raw) {
        Ok(r) => Ok(r.uploads.into_iter().collect()),
        Err(e) => {
            tracing::warn!("ignoring the unreadable upload record {url}: {e}");
            Ok(Vec::new())
        }
    }
}

impl Uploads {
    /// Take over the record of an output this process now owns: abort every recorded
    /// upload whose id is not in `keep` (the uploads a resumed merge goes on with),
    /// concurrently and within [`ABORT_DEADLINE`]. Returns the record (what could not be
    /// aborted stays in it, with `keep`) and how many uploads were aborted. None for
    /// outputs without multipart uploads (local directories).
    pub async fn take_over(
        location: &Location,
        keep: &BTreeSet<String>,
    ) -> Result<Option<(Uploads, usize)>, SinkError> {
        let Some(store) = location.multipart.clone() else {
            return Ok(None);
        };
        let found = recorded(location).await?;
        let (kept, stale): (Vec<Upload>, Vec<Upload>) =
            found.into_iter().partition(|u| keep.contains(&u.upload_id));
        let aborts = stale.iter().map(|u| {
            let store = store.clone();
            let path = location.child(&u.file);
            async move {
                match store.abort_multipart(&path, &u.upload_id).await {
                    Ok(()) => Gone::Aborted,
                    // Gone already (completed, aborted, or expired by a lifecycle rule).
                    Err(object_store::Error::NotFound { .. }) => Gone::Already,
                    Err(e) => {
                        tracing::warn!("could not abort the upload {} of {path}: {e}", u.upload_id);
                        Gone::No
                    }
                }
            }
        });
        let done = tokio::time::timeout(ABORT_DEADLINE, futures::future::join_all(aborts))
            .await
            .unwrap_or_else(|_| vec![Gone::No; stale.len()]);
        let aborted = done.iter().filter(|g| **g == Gone::Aborted).count();
        let changed = done.iter().any(|g| *g != Gone::No);
        let mut open: BTreeSet<Upload> = kept.into_iter().collect();
        open.extend(
            stale
                .into_iter()
                .zip(done)
                .filter(|(_, g)| *g == Gone::No)
                .map(|(u, _)| u),
        );
        if aborted > 0 {
            tracing::info!(
                "aborted {aborted} incomplete upload(s) an earlier merge left under {}",
                location.display
            );
        }
        let uploads = Uploads {
            location: location.clone(),
            store,
            open: tokio::sync::Mutex::new(open),
        };
        if changed {
            uploads.save().await?;
        }
        Ok(Some((uploads, aborted)))
    }

    /// Start a multipart upload of `file` and record it before anything is sent to it.
    pub async fn create(&self, file: &str) -> Result<String, SinkError> {
        let upload_id = self
            .store
            .create_multipart(&self.location.child(file))
            .await
            .map_err(|source| SinkError::Store {
                url: self.location.child_display(file),
                source,
            })?;
        self.open.lock().await.insert(Upload {
            file: file.into(),
            upload_id: upload_id.clone(),
        });
        self.save().await?;
        Ok(upload_id)
    }

    /// Uploads that are no longer open (completed or aborted) leave the record.
    pub async fn closed(&self, upload_ids: &[&str]) -> Result<(), SinkError> {
        self.open
            .lock()
            .await
            .retain(|u| !upload_ids.contains(&u.upload_id.as_str()));
        self.save().await
    }

    /// The checkpoint is committed, every upload of this merge complete: the record goes,
    /// unless it still names uploads an earlier merge left that could not be aborted.
    /// Best effort: a record left behind only names uploads that are gone.
    pub async fn committed(&self, completed: &[&str]) {
        let mut open = self.open.lock().await;
        open.retain(|u| !completed.contains(&u.upload_id.as_str()));
        if !open.is_empty() {
            drop(open);
            if let Err(e) = self.save().await {
                tracing::warn!("could not update the upload record: {e}");
            }
            return;
        }
        let path = self.location.child(UPLOADS_NAME);
        match self.location.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => tracing::warn!(
                "could not remove the upload record {}: {e}",
                self.location.child_display(UPLOADS_NAME)
            ),
        }
    }

    /// Write the record (an empty one when nothing is open: a put is retried through an
    /// outage, and S3's delete, a bulk POST, is not). The record stays locked while it is
    /// written, so two writes cannot land in the wrong order.
    async fn save(&self) -> Result<(), SinkError> {
        let open = self.open.lock().await;
        let path = self.location.child(UPLOADS_NAME);
        let err = |source| SinkError::Store {
            url: self.location.child_display(UPLOADS_NAME),
            source,
        };
        let body = serde_json::to_vec_pretty(&Record {
            uploads: open.clone(),
        })
        .expect("json");
        self.location
            .store
            .put(&path, PutPayload::from_bytes(Bytes::from(body)))
            .await
            .map_err(err)?;
        Ok(())
    }
}
