//! Output writers: a local directory (positioned writes) or an object-store prefix
//! (streamed multipart uploads), with the same commit discipline.
//!
//! A stopped merge must never leave something that looks complete. Locally every file is
//! written under a temporary name and renamed when whole; on object stores a multipart upload
//! is invisible until completed. Data files come first, the index (or the single
//! `model.safetensors`) last: it is the commit point. An output that already holds a complete
//! checkpoint is refused unless the caller allows overwriting, and an overwrite first removes
//! the old commit point so a crash midway cannot leave a mix that looks whole.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use object_store::path::Path;
use object_store::WriteMultipart;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::source::{head_size, read_small, Location, SourceError};

/// Where an output could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    #[error("{location} already holds a complete checkpoint ({marker}); pass --overwrite to replace it, or choose another output")]
    Exists { location: String, marker: String },
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
    #[error(transparent)]
    Source(#[from] SourceError),
}

impl SinkError {
    pub fn is_invalid_input(&self) -> bool {
        match self {
            SinkError::Exists { .. } | SinkError::Unusable { .. } => true,
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
            SinkError::Source(e) => e.is_invalid_input(),
        }
    }
}

pub const INDEX_NAME: &str = "model.safetensors.index.json";
pub const SINGLE_NAME: &str = "model.safetensors";

/// Chunk size of multipart uploads (every part but the last; S3 needs at least 5 MiB).
const PART_SIZE: usize = 16 << 20;
/// Parts of one file uploading at once.
const PARTS_IN_FLIGHT: usize = 4;

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
    open: tokio::sync::Mutex<HashMap<String, WriteMultipart>>,
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
    /// Open an output location; refuse a complete checkpoint unless `overwrite`.
    pub async fn open(location: Location, overwrite: bool) -> Result<Sink, SinkError> {
        let store = location.store.clone();
        let mut marker = None;
        for name in [INDEX_NAME, SINGLE_NAME] {
            let url = location.child_display(name);
            if head_size(store.as_ref(), &location.child(name), &url)
                .await?
                .is_some()
            {
                marker = Some(name);
                break;
            }
        }
        if let Some(m) = marker {
            if !overwrite {
                return Err(SinkError::Exists {
                    location: location.display.clone(),
                    marker: m.to_string(),
                });
            }
            remove_old_checkpoint(&location, m).await?;
        }
        if location.local_dir.is_none() {
            // Check the bucket and credentials now, not after hours of merging.
            let url = location.display.clone();
            store
                .list_with_delimiter(Some(&location.prefix))
                .await
                .map_err(|source| SinkError::Unusable { url, source })?;
        }
        Ok(match &location.local_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(io_err(dir))?;
                Sink::Local(LocalSink {
                    dir: dir.clone(),
                    open: Mutex::new(HashMap::new()),
                })
            }
            None => Sink::Store(StoreSink {
                location,
                open: tokio::sync::Mutex::new(HashMap::new()),
            }),
        })
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
                let path = s.location.child(name);
                let upload = s
                    .location
                    .store
                    .put_multipart(&path)
                    .await
                    .map_err(|e| s.store_err(name, e))?;
                s.open.lock().await.insert(
                    name.into(),
                    WriteMultipart::new_with_chunk_size(upload, PART_SIZE),
                );
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
                let mut open = s.open.lock().await;
                let w = open.get_mut(name).ok_or_else(|| not_open(name))?;
                w.wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| s.store_err(name, e))?;
                w.put(data);
                Ok(())
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
                let w = s
                    .open
                    .lock()
                    .await
                    .remove(name)
                    .ok_or_else(|| not_open(name))?;
                w.finish().await.map_err(|e| s.store_err(name, e))?;
                Ok(())
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
                let open: Vec<(String, WriteMultipart)> =
                    s.open.lock().await.drain().collect::<Vec<_>>();
                for (n, w) in open {
                    if let Err(e) = w.abort().await {
                        tracing::warn!(
                            "could not abort the upload of {}: {e}",
                            s.location.child_display(&n)
                        );
                    }
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

/// Remove an old checkpoint's commit point first, then its data files.
async fn remove_old_checkpoint(location: &Location, marker: &str) -> Result<(), SinkError> {
    let store: &dyn ObjectStore = location.store.as_ref();
    let mut data_files = Vec::new();
    if marker == INDEX_NAME {
        let url = location.child_display(INDEX_NAME);
        let json = read_small(store, &location.child(INDEX_NAME), &url).await?;
        if let Ok(map) = crate::source::parse_index(&json, &url) {
            let mut files: Vec<String> = map.into_values().collect();
            files.sort();
            files.dedup();
            data_files = files;
        }
    }
    let delete = |p: Path, name: String| async move {
        match store.delete(&p).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(SinkError::Store {
                url: location.child_display(&name),
                source,
            }),
        }
    };
    delete(location.child(marker), marker.to_string()).await?;
    for f in data_files {
        delete(location.child(&f), f.clone()).await?;
    }
    Ok(())
}
