//! The coordinator's journal: what it needs to resume after a crash, kept in the output
//! location next to the checkpoint it is building.
//!
//! It records the plan's fingerprint (a journal of another config or layout is refused),
//! the multipart upload of each output file, the files already completed, and every
//! finished task with its part ids. Finished tasks are never redone; a task that finished
//! after the last save is simply run again, which is safe because a task always writes the
//! same bytes to the same range or part number.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use object_store::{ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::config::MergeConfig;
use crate::plan::MergePlan;
use crate::sink::cluster::{ClusterOutput, Prepared, Target};
use crate::sink::uploads::Uploads;
use crate::sink::SinkError;
use crate::store::{head_size, read_small, Location};

pub const JOURNAL_NAME: &str = ".mergefleet-journal.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Journal {
    pub version: u32,
    pub fingerprint: String,
    /// Output file name -> multipart upload id.
    pub uploads: BTreeMap<String, String>,
    /// Output files already complete under their final name.
    pub completed_files: BTreeSet<String>,
    /// Task id -> part ids (part number, content id).
    pub done: BTreeMap<usize, Vec<(u32, String)>>,
}

/// A stable digest of everything that decides the output bytes: the config text, the
/// program version and the whole plan (inputs, ranges, layout, tasks).
pub fn fingerprint(config: &MergeConfig, plan: &MergePlan) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |s: &str| {
        for b in s.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    };
    feed(env!("CARGO_PKG_VERSION"));
    feed(&config.source_yaml);
    // How tasks are cut into multipart parts: a journal's part numbers mean this layout.
    feed(&format!(
        "parts {} {}",
        crate::plan::UPLOAD_PART,
        crate::plan::MAX_PARTS
    ));
    feed(&format!("{:?}", plan.inputs));
    for f in &plan.files {
        feed(&format!("{}:{}:{:?}", f.name, f.size, f.tasks));
    }
    for t in &plan.tasks {
        feed(&format!("{t:?}"));
    }
    format!("{h:016x}")
}

impl Journal {
    pub fn new(fingerprint: String) -> Self {
        Journal {
            version: 1,
            fingerprint,
            ..Default::default()
        }
    }

    /// The journal in `location`, if any.
    pub async fn load(location: &Location) -> Result<Option<Journal>, crate::Error> {
        let url = location.child_display(JOURNAL_NAME);
        let path = location.child(JOURNAL_NAME);
        if head_size(location.store.as_ref(), &path, &url)
            .await?
            .is_none()
        {
            return Ok(None);
        }
        let raw = read_small(location.store.as_ref(), &path, &url).await?;
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|source| crate::Error::Journal { url, source })
    }

    /// Save (atomically: a temp file renamed locally, one PUT on object stores). Returns
    /// the bytes written.
    pub async fn save(&self, location: &Location) -> Result<usize, SinkError> {
        let data = serde_json::to_vec(self).expect("journal serializes");
        let len = data.len();
        match &location.local_dir {
            Some(dir) => {
                let tmp = dir.join(format!("{JOURNAL_NAME}.tmp"));
                let io = |source| SinkError::Io {
                    path: tmp.display().to_string(),
                    source,
                };
                std::fs::write(&tmp, &data).map_err(io)?;
                std::fs::rename(&tmp, dir.join(JOURNAL_NAME)).map_err(io)?;
                Ok(len)
            }
            None => location
                .store
                .put(
                    &location.child(JOURNAL_NAME),
                    PutPayload::from_bytes(Bytes::from(data)),
                )
                .await
                .map(|_| len)
                .map_err(|source| SinkError::Store {
                    url: location.child_display(JOURNAL_NAME),
                    source,
                }),
        }
    }

    /// Create (or reuse) every output file not yet complete, recording new uploads and
    /// forgetting finished tasks of files that had to be created anew.
    pub async fn prepare_files(
        &mut self,
        output: &ClusterOutput,
        plan: &MergePlan,
        record: Option<&Uploads>,
    ) -> Result<(), SinkError> {
        for f in &plan.files {
            if self.completed_files.contains(&f.name) {
                continue;
            }
            let upload = self.uploads.get(&f.name).map(String::as_str);
            match output.prepare(&f.name, f.size, upload, record).await? {
                Prepared::Kept => {}
                Prepared::Created => {
                    for t in f.tasks.clone() {
                        self.done.remove(&t);
                    }
                }
                Prepared::Upload(id) => {
                    self.uploads.insert(f.name.clone(), id);
                }
            }
        }
        Ok(())
    }

    /// Where task `id` of `plan` writes.
    pub fn target(&self, output: &ClusterOutput, plan: &MergePlan, id: usize) -> Target {
        let name = &plan.files[plan.tasks[id].file].name;
        let upload = self.uploads.get(name).map_or("", String::as_str);
        let (first_part, part_size) = plan.parts_of(id);
        output.target(name, upload, first_part, part_size)
    }

    /// Give the output up: remove the partial files of `plan` and abort every upload this
    /// journal names (whatever plan made it: `--restart` after a layout change aborts the
    /// old plan's uploads). Returns the uploads that may still be open.
    pub async fn abort_open(
        &self,
        output: &ClusterOutput,
        plan: &MergePlan,
    ) -> Vec<(String, String)> {
        let open: Vec<&str> = plan
            .files
            .iter()
            .map(|f| f.name.as_str())
            .filter(|n| !self.completed_files.contains(*n))
            .collect();
        let uploads = self
            .uploads
            .iter()
            .filter(|(name, _)| !self.completed_files.contains(*name))
            .map(|(name, id)| (name.clone(), id.clone()))
            .collect();
        output.abort(&open, uploads).await
    }

    pub async fn remove(location: &Location) {
        if let Err(e) = location.store.delete(&location.child(JOURNAL_NAME)).await {
            if !matches!(e, object_store::Error::NotFound { .. }) {
                tracing::warn!(
                    "could not remove the journal {}: {e}",
                    location.child_display(JOURNAL_NAME)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn save_load_remove_locally() {
        let dir = tempfile::tempdir().unwrap();
        let loc = crate::store::Stores::new()
            .resolve(dir.path().to_str().unwrap())
            .unwrap();
        assert!(Journal::load(&loc).await.unwrap().is_none());
        let mut j = Journal::new("abc".into());
        j.done.insert(3, vec![(0, "etag".into())]);
        j.uploads
            .insert("model.safetensors".into(), "upload-1".into());
        j.save(&loc).await.unwrap();
        assert_eq!(Journal::load(&loc).await.unwrap(), Some(j));
        Journal::remove(&loc).await;
        assert!(Journal::load(&loc).await.unwrap().is_none());
        std::fs::write(dir.path().join(JOURNAL_NAME), "{").unwrap();
        assert!(Journal::load(&loc)
            .await
            .unwrap_err()
            .to_string()
            .contains("--restart"));
    }
}
