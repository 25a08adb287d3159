//! Output data files in cluster mode: owned by the coordinator ([`ClusterOutput`]) and
//! filled by workers ([`RangeWriter`]), each task writing to the [`Target`] it is given.
//!
//! On a shared filesystem the coordinator preallocates each file under its temporary name
//! and workers write their byte ranges in place; on S3/GCS/Azure it creates one multipart
//! upload per file and workers upload their parts. Either way the coordinator alone makes a
//! file visible (rename, or complete the upload) once all its tasks are done.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use object_store::multipart::{MultipartStore, PartId};
use object_store::{ObjectStoreExt, PutPayload};

use tokio::task::JoinSet;

use super::uploads::Uploads;
use super::{tmp_name, SinkError, ABORT_DEADLINE, PARTS_IN_FLIGHT};
use crate::store::{Location, Stores};

/// Where one task's bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A byte range of a preallocated file on a filesystem every worker mounts.
    File { path: String },
    /// Parts of a multipart upload, numbered from `first_part` (0-based), `part_size`
    /// bytes each but the task's last.
    Parts {
        url: String,
        upload_id: String,
        first_part: u32,
        part_size: u64,
    },
}

/// How [`ClusterOutput::prepare`] left one file.
#[derive(Debug, PartialEq, Eq)]
pub enum Prepared {
    /// The file (or its upload) was there already: work journaled for it stands.
    Kept,
    /// A new local file: none of its tasks is done, whatever a journal says.
    Created,
    /// A new multipart upload, with its id.
    Upload(String),
}

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

    /// Create (or, resuming, reuse) the output file `name` of `size` bytes; `upload` is
    /// the multipart upload a journal already holds for it.
    /// New uploads go into `record` (see [`super::uploads`]).
    pub async fn prepare(
        &self,
        name: &str,
        size: u64,
        upload: Option<&str>,
        record: Option<&Uploads>,
    ) -> Result<Prepared, SinkError> {
        match self {
            ClusterOutput::Local { dir } => {
                // Never truncate a partial file: a worker of the previous run may still
                // be writing its range. Reuse it; tasks not in the journal run again.
                let path = dir.join(tmp_name(name));
                if std::fs::metadata(&path).is_ok_and(|m| m.len() == size) {
                    return Ok(Prepared::Kept);
                }
                let io = |source| SinkError::Io {
                    path: path.display().to_string(),
                    source,
                };
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(io)?;
                file.set_len(size).map_err(io)?;
                Ok(Prepared::Created)
            }
            ClusterOutput::Multipart { .. } if upload.is_some() => Ok(Prepared::Kept),
            ClusterOutput::Multipart { .. } => {
                Ok(Prepared::Upload(self.new_upload(name, record).await?))
            }
        }
    }

    /// Memory a worker's writer holds for task `id` of `plan` beyond its working set: the
    /// multipart parts it fills and uploads ([`upload_buffer`]); nothing for local files.
    pub fn write_buffer(&self, plan: &crate::plan::MergePlan, id: usize) -> u64 {
        match self {
            ClusterOutput::Local { .. } => 0,
            ClusterOutput::Multipart { .. } => {
                let t = &plan.tasks[id];
                let len = t.out.end - t.out.start;
                let target = crate::plan::part_target(plan.files[t.file].size);
                upload_buffer(len, crate::plan::split_parts(len, target).1)
            }
        }
    }

    /// Where a task of file `name` writes: `upload_id` is the file's upload, `first_part`
    /// and `part_size` the task's share of it (see [`crate::plan::MergePlan::parts_of`]).
    pub fn target(&self, name: &str, upload_id: &str, first_part: u32, part_size: u64) -> Target {
        match self {
            ClusterOutput::Local { dir } => Target::File {
                path: dir.join(tmp_name(name)).display().to_string(),
            },
            ClusterOutput::Multipart { location, .. } => Target::Parts {
                url: location.child_display(name),
                upload_id: upload_id.to_string(),
                first_part,
                part_size,
            },
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
        upload_id: &str,
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
                let path = location.child(name);
                match store
                    .complete_multipart(&path, &upload_id.to_string(), ids)
                    .await
                {
                    Ok(_) => Ok(true),
                    // An error that does not say the upload is gone came after the whole
                    // retry budget: the store is not answering, and a look at the object
                    // would wait as long again.
                    Err(source) if !super::upload_may_be_gone(&source) => Err(SinkError::Store {
                        url: location.child_display(name),
                        source,
                    }),
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
                        Err(object_store::Error::NotFound { .. }) | Ok(_) => {
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

    /// Start a multipart upload of `name` (anew, when its old one is lost), recorded in
    /// `record` before anything is sent to it; returns its id.
    pub async fn new_upload(
        &self,
        name: &str,
        record: Option<&Uploads>,
    ) -> Result<String, SinkError> {
        match (self, record) {
            (ClusterOutput::Multipart { .. }, Some(record)) => record.create(name).await,
            (ClusterOutput::Multipart { location, store }, None) => store
                .create_multipart(&location.child(name))
                .await
                .map_err(|source| SinkError::Store {
                    url: location.child_display(name),
                    source,
                }),
            (ClusterOutput::Local { .. }, _) => Err(SinkError::Unsupported {
                url: name.into(),
                message: "local outputs have no uploads".into(),
            }),
        }
    }

    /// Give up: remove the partial files `open` and abort `uploads` (file name, upload id),
    /// concurrently and within [`ABORT_DEADLINE`]. Returns the uploads that may still be
    /// open (to keep in the journal so a later run can clean them up).
    pub async fn abort(
        &self,
        open: &[&str],
        uploads: Vec<(String, String)>,
    ) -> Vec<(String, String)> {
        match self {
            ClusterOutput::Local { dir } => {
                for name in open {
                    let _ = std::fs::remove_file(dir.join(tmp_name(name)));
                }
                Vec::new()
            }
            ClusterOutput::Multipart { location, store } => {
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

/// A worker's writer for one task's byte range: positioned writes into the shared file, or
/// the task's multipart parts (each uploaded as soon as it is full, up to
/// [`PARTS_IN_FLIGHT`] at once; a chunk that is exactly one part goes without a copy).
pub enum RangeWriter {
    File {
        file: Arc<std::fs::File>,
        path: String,
    },
    Parts(PartWriter),
}

pub struct PartWriter {
    store: Arc<dyn MultipartStore>,
    path: object_store::path::Path,
    url: String,
    upload_id: String,
    next_part: u32,
    part_size: u64,
    /// Bytes of the task's range not yet uploaded.
    remaining: u64,
    buf: BytesMut,
    /// Parts being uploaded, each a task of its own (so uploads go on while the writer
    /// waits for its next chunk; aborted with the writer): at most [`PARTS_IN_FLIGHT`],
    /// each holding its bytes.
    uploading: JoinSet<Result<(u32, String), SinkError>>,
    done: Vec<(u32, String)>,
}

impl PartWriter {
    /// A writer of the `len` bytes that go to `upload_id` from part `first_part` on, in
    /// parts of `part_size` (the last may be short).
    pub fn new(
        store: Arc<dyn MultipartStore>,
        path: object_store::path::Path,
        url: String,
        upload_id: String,
        first_part: u32,
        part_size: u64,
        len: u64,
    ) -> Self {
        PartWriter {
            store,
            path,
            url,
            upload_id,
            next_part: first_part,
            part_size: part_size.max(1),
            remaining: len,
            buf: BytesMut::new(),
            uploading: JoinSet::new(),
            done: Vec::new(),
        }
    }
}

/// The most a task's multipart writer holds: the part being filled and those uploading.
/// The coordinator counts it in the task's memory (see [`ClusterOutput::write_buffer`]).
pub fn upload_buffer(len: u64, part_size: u64) -> u64 {
    len.min((PARTS_IN_FLIGHT as u64 + 1) * part_size)
}

impl RangeWriter {
    /// A writer for the `len` bytes a task sends to `target`.
    pub fn open(target: Target, len: u64, stores: &Stores) -> Result<Self, SinkError> {
        match target {
            Target::File { path } => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| SinkError::Io {
                        path: path.clone(),
                        source: std::io::Error::new(
                            e.kind(),
                            format!("{e} (is the output volume mounted on this worker?)"),
                        ),
                    })?;
                Ok(RangeWriter::File {
                    file: Arc::new(file),
                    path,
                })
            }
            Target::Parts {
                url,
                upload_id,
                first_part,
                part_size,
            } => {
                let loc = stores.resolve(&url)?;
                let store = loc
                    .multipart
                    .clone()
                    .ok_or_else(|| SinkError::Unsupported {
                        url: url.clone(),
                        message: "this store has no multipart uploads".into(),
                    })?;
                Ok(RangeWriter::Parts(PartWriter::new(
                    store, loc.prefix, url, upload_id, first_part, part_size, len,
                )))
            }
        }
    }

    /// Write `data` at absolute file `offset` (multipart: chunks must come in order).
    pub async fn write(&mut self, offset: u64, data: Bytes) -> Result<(), SinkError> {
        match self {
            RangeWriter::File { file, path } => {
                let (file, path) = (file.clone(), path.clone());
                let p = path.clone();
                tokio::task::spawn_blocking(move || {
                    file.write_all_at(&data, offset)
                        .map_err(|source| SinkError::Io { path, source })
                })
                .await
                .map_err(|e| SinkError::Io {
                    path: p,
                    source: std::io::Error::other(format!("write task panicked: {e}")),
                })?
            }
            RangeWriter::Parts(p) => p.push(data).await,
        }
    }

    /// The most memory this writer will hold (see [`upload_buffer`]); nothing for files.
    pub fn buffer(&self) -> u64 {
        match self {
            RangeWriter::File { .. } => 0,
            RangeWriter::Parts(p) => upload_buffer(p.remaining, p.part_size),
        }
    }

    /// Wait for the uploads; the uploaded parts (number, content id) in order, or none for
    /// files.
    pub async fn finish(self) -> Result<Vec<(u32, String)>, SinkError> {
        match self {
            RangeWriter::File { .. } => Ok(Vec::new()),
            RangeWriter::Parts(p) if p.remaining != 0 || !p.buf.is_empty() => {
                Err(SinkError::Incomplete {
                    url: p.url,
                    message: format!("the task left {} bytes unwritten", p.remaining),
                })
            }
            RangeWriter::Parts(mut p) => {
                while p.uploaded_one().await? {}
                p.done.sort_unstable();
                Ok(p.done)
            }
        }
    }
}

impl PartWriter {
    async fn push(&mut self, mut data: Bytes) -> Result<(), SinkError> {
        while !data.is_empty() {
            // The part being filled: `part_size`, or what is left for the last one.
            let target = self.part_size.min(self.remaining) as usize;
            if target == 0 {
                return Err(SinkError::Incomplete {
                    url: self.url.clone(),
                    message: "a task wrote past its range".into(),
                });
            }
            if self.buf.is_empty() && data.len() == target {
                self.remaining -= target as u64;
                return self.upload(data).await;
            }
            if self.buf.is_empty() {
                self.buf.reserve(target);
            }
            let take = (target - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data.split_to(take));
            if self.buf.len() == target {
                self.remaining -= target as u64;
                let part = self.buf.split().freeze();
                self.upload(part).await?;
            }
        }
        Ok(())
    }

    /// Start uploading `part`, once fewer than [`PARTS_IN_FLIGHT`] are uploading.
    async fn upload(&mut self, part: Bytes) -> Result<(), SinkError> {
        while self.uploading.len() >= PARTS_IN_FLIGHT {
            self.uploaded_one().await?;
        }
        let n = self.next_part;
        self.next_part += 1;
        let (store, path, id) = (
            self.store.clone(),
            self.path.clone(),
            self.upload_id.clone(),
        );
        let url = self.url.clone();
        self.uploading.spawn(async move {
            store
                .put_part(&path, &id, n as usize, PutPayload::from_bytes(part))
                .await
                .map(|p| (n, p.content_id))
                .map_err(|source| SinkError::Store {
                    url: format!("{url} (part {n})"),
                    source,
                })
        });
        Ok(())
    }

    /// Wait for one upload to end; false when none was running. The first failure is
    /// returned (the other uploads are dropped with the writer).
    async fn uploaded_one(&mut self) -> Result<bool, SinkError> {
        match self.uploading.join_next().await {
            Some(part) => {
                let part = part.map_err(|e| SinkError::Incomplete {
                    url: self.url.clone(),
                    message: format!("a part upload panicked: {e}"),
                })?;
                self.done.push(part?);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use object_store::memory::InMemory;
    use object_store::multipart::MultipartStore;
    use object_store::path::Path;
    use object_store::{MultipartId, ObjectStoreExt, PutPayload};

    use super::*;

    /// Resuming never truncates a partial file of the planned size (a worker of the
    /// previous run may still be writing its range, and journaled tasks stand on its
    /// bytes); a partial file of another size is a new file whose tasks all run again.
    #[tokio::test]
    async fn a_resumed_partial_file_of_the_right_size_is_kept_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let out = ClusterOutput::Local {
            dir: dir.path().to_path_buf(),
        };
        let partial = dir
            .path()
            .join(tmp_name("model-00001-of-00002.safetensors"));
        let written: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&partial, &written).unwrap();
        let p = out
            .prepare("model-00001-of-00002.safetensors", 4096, None, None)
            .await
            .unwrap();
        assert!(matches!(p, Prepared::Kept));
        assert_eq!(std::fs::read(&partial).unwrap(), written);

        let other = dir
            .path()
            .join(tmp_name("model-00002-of-00002.safetensors"));
        std::fs::write(&other, &written[..100]).unwrap();
        let p = out
            .prepare("model-00002-of-00002.safetensors", 4096, None, None)
            .await
            .unwrap();
        assert!(matches!(p, Prepared::Created));
        assert_eq!(std::fs::metadata(&other).unwrap().len(), 4096);
    }

    /// InMemory whose part uploads take 20 ms, counting how many run at once.
    #[derive(Default)]
    struct Slow {
        inner: InMemory,
        now: AtomicUsize,
        most: AtomicUsize,
        finished: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl MultipartStore for Slow {
        async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
            self.inner.create_multipart(path).await
        }
        async fn put_part(
            &self,
            path: &Path,
            id: &MultipartId,
            part_idx: usize,
            data: PutPayload,
        ) -> object_store::Result<PartId> {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let r = self.inner.put_part(path, id, part_idx, data).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.finished.fetch_add(1, Ordering::SeqCst);
            r
        }
        async fn complete_multipart(
            &self,
            path: &Path,
            id: &MultipartId,
            parts: Vec<PartId>,
        ) -> object_store::Result<object_store::PutResult> {
            self.inner.complete_multipart(path, id, parts).await
        }
        async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
            self.inner.abort_multipart(path, id).await
        }
    }

    #[tokio::test]
    async fn parts_upload_several_at_once_but_no_more_than_the_limit() {
        let store = Arc::new(Slow::default());
        let path = Path::from("out/model.safetensors");
        let upload = store.create_multipart(&path).await.unwrap();
        let data: Vec<u8> = (0..10_500u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut w = RangeWriter::Parts(PartWriter {
            store: store.clone(),
            path: path.clone(),
            url: "s3://out/model.safetensors".into(),
            upload_id: upload.clone(),
            next_part: 0,
            part_size: 1000,
            remaining: data.len() as u64,
            buf: BytesMut::new(),
            uploading: JoinSet::new(),
            done: Vec::new(),
        });
        // Uploads go on while the writer waits for its next chunk.
        w.write(0, Bytes::copy_from_slice(&data[..2000]))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(store.finished.load(Ordering::SeqCst), 2);
        // Chunks that straddle parts, fill one exactly (no copy), and end mid-part.
        let mut at = 2000;
        for n in [300, 700, 1000, 500, 7, 5993] {
            w.write(at as u64, Bytes::copy_from_slice(&data[at..at + n]))
                .await
                .unwrap();
            at += n;
        }
        assert_eq!(at, data.len());
        let parts = w.finish().await.unwrap();
        let numbers: Vec<u32> = parts.iter().map(|p| p.0).collect();
        assert_eq!(numbers, (0..11).collect::<Vec<_>>());
        assert_eq!(store.most.load(Ordering::SeqCst), PARTS_IN_FLIGHT);

        let ids = parts
            .into_iter()
            .map(|(_, content_id)| PartId { content_id })
            .collect();
        store.complete_multipart(&path, &upload, ids).await.unwrap();
        let got = store.inner.get(&path).await.unwrap().bytes().await.unwrap();
        assert!(got == data, "the object differs from what was written");
        assert_eq!(upload_buffer(10_500, 1000), 5000);
        assert_eq!(upload_buffer(3000, 1000), 3000);
    }
}
