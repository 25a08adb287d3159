//! Output writers: a local directory (positioned writes) or an object-store prefix
//! (streamed multipart uploads), with the same commit discipline.
//!
//! A stopped merge must never leave something that looks complete. Locally every file is
//! written under a temporary name and renamed when whole; on object stores a multipart upload
//! is invisible until completed. Data files come first, the index (or the single
//! `model.safetensors`) last: it is the commit point. An output that already holds a complete
//! checkpoint is refused unless the caller allows overwriting, and an overwrite first removes
//! the old commit point so a crash midway cannot leave a mix that looks whole, then every
//! other file of the old checkpoint. Before any of this, [`lock`] makes the caller the
//! output's only owner.

pub mod cluster;
pub mod lock;
pub mod uploads;

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use object_store::multipart::{MultipartStore, PartId};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use cluster::{PartWriter, RangeWriter};
use uploads::Uploads;

use crate::checkpoint;
use crate::store::{head_size, read_small, Location, StoreError};

/// Where an output could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    #[error("{location} already holds a complete checkpoint ({marker}); pass --overwrite to replace it, or choose another output")]
    Exists { location: String, marker: String },
    #[error(
        "{location} is being written by {holder}; wait for it to finish, or choose another output"
    )]
    Held { location: String, holder: String },
    #[error("the output {output} {how} the input model `{input}`; a merge never writes where its inputs are: choose another output")]
    OverlapsInput {
        output: String,
        how: &'static str,
        input: String,
    },
    #[error("cannot write to {url}: {message}")]
    Unsupported { url: String, message: String },
    #[error("cannot write {path}: {source}{}", io_hint(source))]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {url}: {source}")]
    Store {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot use the output location {url}: check that the bucket exists and the store's credentials and endpoint (environment variables): {source}")]
    Unusable {
        url: String,
        #[source]
        source: object_store::Error,
    },
    /// A writer's bookkeeping went wrong (a bug, not the user's input).
    #[error("{url}: {message}")]
    Incomplete { url: String, message: String },
    #[error(transparent)]
    Read(#[from] StoreError),
}

impl SinkError {
    pub fn is_invalid_input(&self) -> bool {
        match self {
            SinkError::Exists { .. }
            | SinkError::Held { .. }
            | SinkError::OverlapsInput { .. }
            | SinkError::Unsupported { .. }
            | SinkError::Unusable { .. } => true,
            SinkError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::ReadOnlyFilesystem
                    | std::io::ErrorKind::NotADirectory
                    | std::io::ErrorKind::StorageFull
            ),
            SinkError::Store { source, .. } => matches!(
                source,
                object_store::Error::NotFound { .. }
                    | object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
            ),
            SinkError::Read(e) => e.is_invalid_input(),
            SinkError::Incomplete { .. } => false,
        }
    }
}

pub const INDEX_NAME: &str = "model.safetensors.index.json";
pub const SINGLE_NAME: &str = "model.safetensors";

/// Chunk size of multipart uploads (every part but the last; S3 needs at least 5 MiB).
const PART_SIZE: usize = 16 << 20;
/// How long giving up may take: aborts run concurrently under this one deadline, so a
/// failed merge with its store gone exits promptly whatever the number of files.
pub const ABORT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15);
/// Parts of one file (embedded mode) or one task (cluster mode) uploading at once.
pub const PARTS_IN_FLIGHT: usize = 4;

/// A checkpoint being written.
pub enum Sink {
    Local(LocalSink),
    Store(StoreSink),
}

pub struct LocalSink {
    dir: PathBuf,
    open: Mutex<HashMap<String, Arc<File>>>,
}

pub struct StoreSink {
    location: Location,
    /// The location's store, as the multipart store it is.
    multipart: Arc<dyn MultipartStore>,
    /// The record of this output's uploads (see [`uploads`]).
    uploads: Arc<Uploads>,
    /// Uploads an earlier merge left open, aborted when this one took the output.
    aborted: usize,
    /// Open uploads: the writer, the size the file will have, the upload id.
    open: tokio::sync::Mutex<HashMap<String, (RangeWriter, u64, String)>>,
}

pub fn tmp_name(name: &str) -> String {
    format!(".{name}.mergefleet-partial")
}

/// What to do about the I/O errors a user can fix.
fn io_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::StorageFull => {
            " (the output's filesystem is full: free space, or choose another output; `mergefleet plan` prints the bytes to write)"
        }
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
            " (choose an output this user may write)"
        }
        _ => "",
    }
}

fn io_err(path: &FsPath) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
    move |source| SinkError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl Sink {
    /// Check an output location without touching it: the bucket and credentials work, and
    /// it holds no complete checkpoint unless `overwrite`. Returns the old checkpoint's
    /// commit point, if any. Run before the output is locked, and again by [`Sink::open`].
    pub async fn check(
        location: &Location,
        overwrite: bool,
    ) -> Result<Option<&'static str>, SinkError> {
        if location.local_dir.is_none() {
            // The bucket and credentials now, not after hours of merging.
            let url = location.display.clone();
            location
                .store
                .list_with_delimiter(Some(&location.prefix))
                .await
                .map_err(|source| SinkError::Unusable { url, source })?;
        }
        for name in [INDEX_NAME, SINGLE_NAME] {
            let url = location.child_display(name);
            if head_size(location.store.as_ref(), &location.child(name), &url)
                .await?
                .is_some()
            {
                if !overwrite {
                    return Err(SinkError::Exists {
                        location: location.display.clone(),
                        marker: name.to_string(),
                    });
                }
                return Ok(Some(name));
            }
        }
        Ok(None)
    }

    /// Memory the sink for `location` holds on its own while a file is written: a multipart
    /// upload's part being filled and those uploading; nothing for local files. Embedded
    /// mode writes one file at a time and keeps this out of its pipeline's budget.
    pub fn write_buffer(location: &Location) -> u64 {
        match location.local_dir {
            Some(_) => 0,
            None => cluster::upload_buffer(u64::MAX, PART_SIZE as u64),
        }
    }

    /// Open an output location the caller owns (see [`lock`]); refuse a complete checkpoint
    /// unless `overwrite`, which removes it. On object stores, every upload an earlier
    /// merge recorded there is aborted, but those in `resume` (upload ids a resumed
    /// coordinator goes on with).
    pub async fn open(
        location: Location,
        overwrite: bool,
        resume: &std::collections::BTreeSet<String>,
    ) -> Result<Sink, SinkError> {
        if let Some(marker) = Sink::check(&location, overwrite).await? {
            remove_old_checkpoint(&location, marker).await?;
        }
        if let Some(dir) = &location.local_dir {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            return Ok(Sink::Local(LocalSink {
                dir: dir.clone(),
                open: Mutex::new(HashMap::new()),
            }));
        }
        let unsupported = || SinkError::Unsupported {
            url: location.display.clone(),
            message:
                "this store has no multipart uploads; write to a local directory, S3, GCS or Azure"
                    .into(),
        };
        let multipart = location.multipart.clone().ok_or_else(unsupported)?;
        let (uploads, aborted) = Uploads::take_over(&location, resume)
            .await?
            .ok_or_else(unsupported)?;
        Ok(Sink::Store(StoreSink {
            multipart,
            location,
            uploads: Arc::new(uploads),
            aborted,
            open: tokio::sync::Mutex::new(HashMap::new()),
        }))
    }

    /// How many incomplete uploads of earlier merges were aborted when this output was
    /// opened.
    pub fn uploads_aborted(&self) -> usize {
        match self {
            Sink::Local(_) => 0,
            Sink::Store(s) => s.aborted,
        }
    }

    /// The checkpoint is committed: the upload record goes (see [`uploads`]).
    pub async fn committed(&self) {
        if let Sink::Store(s) = self {
            s.uploads.committed(&[]).await;
        }
    }

    /// The record of this output's multipart uploads (object stores only).
    pub fn uploads(&self) -> Option<Arc<Uploads>> {
        match self {
            Sink::Local(_) => None,
            Sink::Store(s) => Some(s.uploads.clone()),
        }
    }

    /// Start a data file of `size` bytes (preallocated locally).
    pub async fn create(&self, name: &str, size: u64) -> Result<(), SinkError> {
        match self {
            Sink::Local(s) => {
                let path = s.dir.join(tmp_name(name));
                let f = File::create(&path).map_err(io_err(&path))?;
                f.set_len(size).map_err(io_err(&path))?;
                s.open
                    .lock()
                    .expect("open files")
                    .insert(name.into(), Arc::new(f));
                Ok(())
            }
            Sink::Store(s) => {
                let id = s.uploads.create(name).await?;
                let store = s.multipart.clone();
                let writer = PartWriter::new(
                    store,
                    s.location.child(name),
                    s.location.child_display(name),
                    id.clone(),
                    0,
                    PART_SIZE as u64,
                    size,
                );
                s.open
                    .lock()
                    .await
                    .insert(name.into(), (RangeWriter::Parts(writer), size, id));
                Ok(())
            }
        }
    }

    /// Write bytes at `offset` of data file `name`. Object stores need offsets in order.
    pub async fn write(&self, name: &str, offset: u64, data: Bytes) -> Result<(), SinkError> {
        match self {
            Sink::Local(s) => {
                let f = s.open.lock().expect("open files").get(name).cloned();
                let f = f.ok_or_else(|| not_open(name))?;
                let path = s.dir.join(tmp_name(name));
                tokio::task::spawn_blocking(move || {
                    f.write_all_at(&data, offset).map_err(io_err(&path))
                })
                .await
                .map_err(|e| join_err(name, e))?
            }
            Sink::Store(s) => {
                // The writer uploads each part as soon as it is full, at most
                // PARTS_IN_FLIGHT at once: it holds at most `write_buffer` bytes.
                let mut open = s.open.lock().await;
                let (w, _, _) = open.get_mut(name).ok_or_else(|| not_open(name))?;
                w.write(offset, data).await
            }
        }
    }

    /// A data file is whole: make it visible under its name.
    pub async fn finish(&self, name: &str) -> Result<(), SinkError> {
        match self {
            Sink::Local(s) => {
                let f = s.open.lock().expect("open files").remove(name);
                drop(f.ok_or_else(|| not_open(name))?);
                let from = s.dir.join(tmp_name(name));
                let to = s.dir.join(name);
                std::fs::rename(&from, &to).map_err(io_err(&to))
            }
            Sink::Store(s) => {
                let (w, size, id) = s
                    .open
                    .lock()
                    .await
                    .remove(name)
                    .ok_or_else(|| not_open(name))?;
                let mut parts = w.finish().await?;
                parts.sort_by_key(|(n, _)| *n);
                let parts = parts
                    .into_iter()
                    .map(|(_, content_id)| PartId { content_id })
                    .collect();
                let store = s.multipart.clone();
                let path = s.location.child(name);
                let completed = match store.complete_multipart(&path, &id, parts).await {
                    Ok(_) => Ok(()),
                    // After the whole retry budget: the store is not answering.
                    Err(e) if !upload_may_be_gone(&e) => Err(s.store_err(name, e)),
                    // Completing is not idempotent: when a try went through but its answer
                    // was lost (the store restarted), the retry finds no upload, and the
                    // object is there, whole.
                    Err(e) => match s.location.store.head(&path).await {
                        Ok(meta) if meta.size == size => {
                            tracing::info!(
                                "{} was already complete (an earlier answer was lost)",
                                s.location.child_display(name)
                            );
                            Ok(())
                        }
                        _ => Err(s.store_err(name, e)),
                    },
                };
                completed?;
                s.uploads.closed(&[&id]).await
            }
        }
    }

    /// Write a small file whole (config.json, tokenizer files, card, index).
    pub async fn put(&self, name: &str, data: Bytes) -> Result<(), SinkError> {
        match self {
            Sink::Local(s) => {
                let tmp = s.dir.join(tmp_name(name));
                std::fs::write(&tmp, &data).map_err(io_err(&tmp))?;
                let to = s.dir.join(name);
                std::fs::rename(&tmp, &to).map_err(io_err(&to))
            }
            Sink::Store(s) => {
                s.location
                    .store
                    .put(&s.location.child(name), PutPayload::from_bytes(data))
                    .await
                    .map_err(|e| s.store_err(name, e))?;
                Ok(())
            }
        }
    }

    /// Give up: remove partial files, abort uploads. Best effort; errors are logged.
    pub async fn abort(&self) {
        match self {
            Sink::Local(s) => {
                let names: Vec<String> = s
                    .open
                    .lock()
                    .expect("open files")
                    .drain()
                    .map(|(n, _)| n)
                    .collect();
                for n in names {
                    let p = s.dir.join(tmp_name(&n));
                    if let Err(e) = std::fs::remove_file(&p) {
                        tracing::warn!("could not remove {}: {e}", p.display());
                    }
                }
            }
            Sink::Store(s) => {
                let open: Vec<(String, (RangeWriter, u64, String))> =
                    s.open.lock().await.drain().collect::<Vec<_>>();
                let store = s.multipart.clone();
                let aborts = open.iter().map(|(n, (_, _, id))| {
                    let store = store.clone();
                    async move {
                        match store.abort_multipart(&s.location.child(n), id).await {
                            Ok(()) | Err(object_store::Error::NotFound { .. }) => Some(id.as_str()),
                            Err(e) => {
                                tracing::warn!(
                                    "could not abort the upload of {}: {e}",
                                    s.location.child_display(n)
                                );
                                None
                            }
                        }
                    }
                });
                // The record keeps what could not be aborted: the next merge on this
                // output aborts it.
                let ending = async {
                    let gone: Vec<&str> = futures::future::join_all(aborts)
                        .await
                        .into_iter()
                        .flatten()
                        .collect();
                    if !gone.is_empty() {
                        if let Err(e) = s.uploads.closed(&gone).await {
                            tracing::warn!("could not update the upload record: {e}");
                        }
                    }
                };
                if tokio::time::timeout(ABORT_DEADLINE, ending).await.is_err() {
                    tracing::warn!(
                        "could not abort every upload under {} within {} s; the next merge to this output aborts them (or a bucket lifecycle rule for incomplete multipart uploads)",
                        s.location.display,
                        ABORT_DEADLINE.as_secs()
                    );
                }
            }
        }
    }

    /// Where the checkpoint goes, for messages.
    pub fn display(&self) -> String {
        match self {
            Sink::Local(s) => s.dir.display().to_string(),
            Sink::Store(s) => s.location.display.clone(),
        }
    }
}

impl StoreSink {
    fn store_err(&self, name: &str, source: object_store::Error) -> SinkError {
        SinkError::Store {
            url: self.location.child_display(name),
            source,
        }
    }
}

/// Whether completing an upload failed in a way that means the upload is gone: completed
/// by an earlier try whose answer was lost (the object is then there, whole), or aborted
/// (by a lifecycle rule, or a store that lost it). Only then is the object worth a look;
/// any other error came after the store client's whole retry budget.
fn upload_may_be_gone(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::PermissionDenied { .. }
            | object_store::Error::Precondition { .. }
    )
}

fn not_open(name: &str) -> SinkError {
    SinkError::Io {
        path: name.into(),
        source: std::io::Error::other("file written before it was created (internal error)"),
    }
}

fn join_err(name: &str, e: tokio::task::JoinError) -> SinkError {
    SinkError::Io {
        path: name.into(),
        source: std::io::Error::other(e),
    }
}

/// Remove an old checkpoint: its commit point first (so a crash midway never leaves a mix
/// that looks whole), then every other file it had: the single `model.safetensors`, every
/// shard its index names or that is named like one (`model-*-of-*.safetensors`), and the
/// small files a merge writes beside them. transformers prefers `model.safetensors` to an
/// index, so an old single file left beside a new index would silently win.
async fn remove_old_checkpoint(location: &Location, marker: &str) -> Result<(), SinkError> {
    let store: &dyn ObjectStore = location.store.as_ref();
    let mut old: Vec<String> = Vec::new();
    if marker == INDEX_NAME {
        let url = location.child_display(INDEX_NAME);
        let json = read_small(store, &location.child(INDEX_NAME), &url).await?;
        if let Ok(map) = crate::index::parse_index(&json) {
            old.extend(map.into_values().filter(|f| is_plain_name(f)));
        }
    }
    let listing = store
        .list_with_delimiter(Some(&location.prefix))
        .await
        .map_err(|source| SinkError::Store {
            url: location.display.clone(),
            source,
        })?;
    old.extend(
        listing
            .objects
            .iter()
            .filter_map(|o| o.location.filename())
            .filter(|n| {
                *n == SINGLE_NAME
                    || is_shard_name(n)
                    || checkpoint::COPIED_FILES.contains(n)
                    || checkpoint::WRITTEN_FILES.contains(n)
            })
            .map(str::to_string),
    );
    old.sort();
    old.dedup();
    old.retain(|f| f != marker);
    let delete = |name: String| async move {
        match store.delete(&location.child(&name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(SinkError::Store {
                url: location.child_display(&name),
                source,
            }),
        }
    };
    delete(marker.to_string()).await?;
    for f in old {
        delete(f).await?;
    }
    Ok(())
}

/// `model-00001-of-00003.safetensors` and the like.
fn is_shard_name(n: &str) -> bool {
    n.strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .is_some_and(|r| r.contains("-of-"))
}

/// A file name without a directory part (an index may name anything).
fn is_plain_name(n: &str) -> bool {
    !n.is_empty() && !n.contains('/') && n != "." && n != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names() {
        assert!(is_shard_name("model-00001-of-00003.safetensors"));
        assert!(!is_shard_name("model.safetensors"));
        assert!(!is_shard_name("model-00001.safetensors"));
        assert!(!is_plain_name("../x.safetensors") && is_plain_name("a.safetensors"));
    }
}
