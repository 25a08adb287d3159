//! Output data files in cluster mode, owned by the coordinator and filled by workers.
//!
//! On a shared filesystem the coordinator preallocates each file under its temporary name
//! and workers write their byte ranges in place; on S3/GCS/Azure it creates one multipart
//! upload per file and workers upload their parts. Either way the coordinator alone makes a
//! file visible (rename, or complete the upload) once all its tasks are done.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::multipart::{MultipartStore, PartId};
use object_store::ObjectStoreExt;

use super::journal::Journal;
use crate::plan::{split_parts, MergePlan, Task};
use crate::sink::{tmp_name, SinkError, ABORT_DEADLINE};
use crate::store::Location;
use crate::wire::pb;

pub enum ClusterOutput {
    Local {
        dir: PathBuf,
    },
    Multipart {
        location: Location,
        store: Arc<dyn MultipartStore>,
    },
}

impl ClusterOutput {
    pub fn for_location(location: &Location) -> Result<Self, SinkError> {
        match (&location.local_dir, &location.multipart) {
            (Some(dir), _) => Ok(ClusterOutput::Local { dir: dir.clone() }),
            (None, Some(store)) => Ok(ClusterOutput::Multipart { location: location.clone(), store: store.clone() }),
            (None, None) => Err(SinkError::Unsupported {
                url: location.display.clone(),
                message: "cluster mode writes to a shared filesystem path or to S3, GCS or Azure (multipart uploads); this store has neither".into(),
            }),
        }
    }

    /// Create (or, resuming, reuse) every output file not yet complete.
    pub async fn prepare(&self, plan: &MergePlan, journal: &mut Journal) -> Result<(), SinkError> {
        for f in &plan.files {
            if journal.completed_files.contains(&f.name) {
                continue;
            }
            match self {
                ClusterOutput::Local { dir } => {
                    // Never truncate a partial file: a worker of the previous run may still
                    // be writing its range. Reuse it; tasks not in the journal run again.
                    let path = dir.join(tmp_name(&f.name));
                    let io = |source| SinkError::Io {
                        path: path.display().to_string(),
                        source,
                    };
                    let existed = std::fs::metadata(&path).is_ok_and(|m| m.len() == f.size);
                    if !existed {
                        let file = std::fs::OpenOptions::new()
                            .write(true)
                            .create(true)
                            .truncate(false)
                            .open(&path)
                            .map_err(io)?;
                        file.set_len(f.size).map_err(io)?;
                        // A new (or resized) file holds none of the journal's finished tasks.
                        for t in f.tasks.clone() {
                            journal.done.remove(&t);
                        }
                    }
                }
                ClusterOutput::Multipart { location, store } => {
                    if !journal.uploads.contains_key(&f.name) {
                        let id = store
                            .create_multipart(&location.child(&f.name))
                            .await
                            .map_err(|source| SinkError::Store {
                                url: location.child_display(&f.name),
                                source,
                            })?;
                        journal.uploads.insert(f.name.clone(), id);
                    }
                }
            }
        }
        Ok(())
    }

    /// Where a task writes its output.
    pub fn target(&self, plan: &MergePlan, task: &Task, journal: &Journal) -> pb::Output {
        let file = &plan.files[task.file];
        let target = match self {
            ClusterOutput::Local { dir } => {
                pb::output::Target::LocalPath(dir.join(tmp_name(&file.name)).display().to_string())
            }
            ClusterOutput::Multipart { location, .. } => {
                let first_part: u32 = plan.tasks[file.tasks.start..task.id]
                    .iter()
                    .map(|t| split_parts(t.out.end - t.out.start).0)
                    .sum();
                pb::output::Target::Multipart(pb::Multipart {
                    url: location.child_display(&file.name),
                    upload_id: journal.uploads.get(&file.name).cloned().unwrap_or_default(),
                    first_part,
                    part_size: split_parts(task.out.end - task.out.start).1,
                })
            }
        };
        pb::Output {
            target: Some(target),
        }
    }

    /// Make a file whose tasks are all done visible under its name. `Ok(false)` when its
    /// multipart upload is gone (aborted by a bucket lifecycle rule, or lost by a store that
    /// crashed while completing it) and the object is not there: the file must be redone.
    pub async fn complete(
        &self,
        name: &str,
        size: u64,
        mut parts: Vec<(u32, String)>,
        journal: &Journal,
    ) -> Result<bool, SinkError> {
        match self {
            ClusterOutput::Local { dir } => {
                let to = dir.join(name);
                std::fs::rename(dir.join(tmp_name(name)), &to).map_err(|source| SinkError::Io {
                    path: to.display().to_string(),
                    source,
                })?;
                Ok(true)
            }
            ClusterOutput::Multipart { location, store } => {
                parts.sort_by_key(|(n, _)| *n);
                let ids = parts
                    .into_iter()
                    .map(|(_, content_id)| PartId { content_id })
                    .collect();
                let id = journal.uploads.get(name).cloned().unwrap_or_default();
                let path = location.child(name);
                match store.complete_multipart(&path, &id, ids).await {
                    Ok(_) => Ok(true),
                    // Completing is not idempotent everywhere: when an earlier try went
                    // through but its answer was lost, the upload id is gone and the object
                    // is there, whole.
                    Err(source) => match location.store.head(&path).await {
                        Ok(meta) if meta.size == size => {
                            tracing::info!(
                                "{} was already complete (an earlier answer was lost)",
                                location.child_display(name)
                            );
                            Ok(true)
                        }
                        Err(object_store::Error::NotFound { .. }) | Ok(_)
                            if matches!(
                                source,
                                object_store::Error::NotFound { .. }
                                    | object_store::Error::PermissionDenied { .. }
                                    | object_store::Error::Precondition { .. }
                            ) =>
                        {
                            tracing::warn!(
                                "the upload of {} is gone ({source}); its tasks will be redone",
                                location.child_display(name)
                            );
                            Ok(false)
                        }
                        _ => Err(SinkError::Store {
                            url: location.child_display(name),
                            source,
                        }),
                    },
                }
            }
        }
    }

    /// Start a file's multipart upload anew; returns the new upload id.
    pub async fn restart_upload(&self, name: &str) -> Result<String, SinkError> {
        match self {
            ClusterOutput::Multipart { location, store } => store
                .create_multipart(&location.child(name))
                .await
                .map_err(|source| SinkError::Store {
                    url: location.child_display(name),
                    source,
                }),
            ClusterOutput::Local { .. } => Err(SinkError::Io {
                path: name.into(),
                source: std::io::Error::other("local outputs have no uploads"),
            }),
        }
    }

    /// Give up: abort uploads and remove partial files not yet complete, concurrently and
    /// within [`ABORT_DEADLINE`]. Returns the files whose uploads may still be open, with
    /// their upload ids (kept in the journal so a later run can clean them up).
    pub async fn abort(&self, plan: &MergePlan, journal: &Journal) -> Vec<(String, String)> {
        match self {
            ClusterOutput::Local { dir } => {
                let open = plan
                    .files
                    .iter()
                    .filter(|f| !journal.completed_files.contains(&f.name));
                for f in open {
                    let _ = std::fs::remove_file(dir.join(tmp_name(&f.name)));
                }
                Vec::new()
            }
            ClusterOutput::Multipart { location, store } => {
                // Every upload the journal names, whatever plan made it (`--restart` after
                // a layout change aborts the old plan's uploads).
                let uploads: Vec<(String, String)> = journal
                    .uploads
                    .iter()
                    .filter(|(name, _)| !journal.completed_files.contains(*name))
                    .map(|(name, id)| (name.clone(), id.clone()))
                    .collect();
                let aborts = uploads.iter().map(|(name, id)| async move {
                    match store.abort_multipart(&location.child(name), id).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => None,
                        Err(e) => {
                            tracing::warn!(
                                "could not abort the upload of {}: {e}",
                                location.child_display(name)
                            );
                            Some((name.clone(), id.clone()))
                        }
                    }
                });
                match tokio::time::timeout(ABORT_DEADLINE, futures::future::join_all(aborts)).await
                {
                    Ok(left) => left.into_iter().flatten().collect(),
                    Err(_) => uploads,
                }
            }
        }
    }
}
