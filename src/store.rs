//! Where bytes live: local paths and object-store URLs, resolved to a store + path, and the
//! few plain reads every layer needs (sizes, small files, byte ranges).
//!
//! Every read and write in mergefleet goes through object_store, so local disk, S3, GCS,
//! Azure and HTTP behave alike. Credentials and endpoints come from the standard variables
//! each object_store builder reads (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, `AWS_REGION`,
//! `AWS_ACCESS_KEY_ID`, `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_NAME`, ...). Stores
//! are cached per bucket so models in one bucket share a connection pool. Reading models
//! ([`crate::source`]) and writing checkpoints ([`crate::sink`]) both stand on this module.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::local::LocalFileSystem;
use object_store::multipart::MultipartStore;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreScheme, RetryConfig};
use std::ops::Range;

use bytes::Bytes;
use object_store::ObjectStoreExt;
use url::Url;

/// A location that cannot be resolved or read, with its URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("bad location `{location}`: {message}")]
    BadLocation { location: String, message: String },
    #[error("{url}: {source}")]
    Read {
        url: String,
        #[source]
        source: object_store::Error,
        /// True while reading headers and metadata (the user's input is at fault: wrong
        /// credentials, missing bucket, unreachable endpoint); false while moving weights.
        input: bool,
    },
    #[error("{url}: read failed: {source} (was the file changed or truncated during the merge?)")]
    Local {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: {source}")]
    Hub {
        url: String,
        #[source]
        source: crate::hub::HubError,
        /// As in [`StoreError::Read`].
        input: bool,
    },
    #[error("{url}: asked for bytes {start}..{end} but got {got}: the file changed or was truncated during the merge")]
    Truncated {
        url: String,
        start: u64,
        end: u64,
        got: usize,
    },
}

impl StoreError {
    pub fn is_invalid_input(&self) -> bool {
        match self {
            StoreError::Read { input, source, .. } => {
                *input
                    || matches!(
                        source,
                        object_store::Error::NotFound { .. }
                            | object_store::Error::PermissionDenied { .. }
                            | object_store::Error::Unauthenticated { .. }
                    )
            }
            StoreError::Hub { input, source, .. } => {
                *input || !matches!(source, crate::hub::HubError::Http { .. })
            }
            StoreError::BadLocation { .. }
            | StoreError::Local { .. }
            | StoreError::Truncated { .. } => true,
        }
    }
}

/// Wrap an object_store error with the URL read; `input` as in [`StoreError::Read`]. A Hub
/// refusal (gated, missing, ...) is its own message, without object_store's wording around it.
pub fn store_err(url: &str, input: bool) -> impl FnOnce(object_store::Error) -> StoreError + '_ {
    move |source| {
        let hub = std::error::Error::source(&source)
            .and_then(|e| e.downcast_ref::<crate::hub::HubError>())
            .cloned();
        match hub {
            Some(h) if !matches!(source, object_store::Error::NotFound { .. }) => StoreError::Hub {
                url: url.to_string(),
                source: h,
                input,
            },
            _ => StoreError::Read {
                url: url.to_string(),
                source,
                input,
            },
        }
    }
}

/// A store plus the path of a "directory" (prefix) in it.
#[derive(Clone)]
pub struct Location {
    pub store: Arc<dyn ObjectStore>,
    /// Present for stores with S3-style multipart uploads (S3, GCS, Azure).
    pub multipart: Option<Arc<dyn MultipartStore>>,
    /// The prefix inside the store.
    pub prefix: Path,
    /// The location as the user should read it in messages (URL or absolute path).
    pub display: String,
    /// Some(dir) when this is a local directory.
    pub local_dir: Option<PathBuf>,
    /// Which store this is, as the store itself names it (bucket or container, endpoint),
    /// so two spellings of one bucket compare equal. `file` for the local filesystem.
    pub store_id: String,
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

impl Location {
    /// The object path of `name` inside this location.
    pub fn child(&self, name: &str) -> Path {
        self.prefix.clone().join(name)
    }
    /// A printable URL for `name` inside this location.
    pub fn child_display(&self, name: &str) -> String {
        format!("{}/{}", self.display.trim_end_matches('/'), name)
    }

    /// The location's identity for overlap checks: the store and the path segments, local
    /// paths with symlinks resolved (as far as the path exists; the rest is appended as
    /// written, already free of `.` and `..`).
    pub fn identity(&self) -> (String, Vec<String>) {
        if let Some(hub) = self
            .local_dir
            .as_deref()
            .and_then(|d| cache_identity(&canonical(d)))
        {
            return hub;
        }
        let segments = match &self.local_dir {
            Some(dir) => canonical(dir)
                .components()
                .filter_map(|c| match c {
                    std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect(),
            None => self
                .prefix
                .parts()
                .map(|p| p.as_ref().to_string())
                .collect(),
        };
        (self.store_id.clone(), segments)
    }
}

/// A folder inside an HF cache snapshot (`.../models--ORG--NAME/snapshots/COMMIT/...`) is the
/// Hub repo at that commit: the same model as `ORG/NAME@COMMIT` read from the Hub.
fn cache_identity(path: &std::path::Path) -> Option<(String, Vec<String>)> {
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let i = parts.iter().rposition(|p| p.starts_with("models--"))?;
    let repo = parts[i].strip_prefix("models--")?.replace("--", "/");
    if parts.get(i + 1).map(String::as_str) != Some("snapshots") {
        return None;
    }
    let commit = parts.get(i + 2)?;
    Some((format!("hf:{repo}@{commit}"), parts[i + 3..].to_vec()))
}

/// `path` with symlinks resolved in its longest existing ancestor.
fn canonical(path: &std::path::Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut cur = path.to_path_buf();
    loop {
        if let Ok(c) = std::fs::canonicalize(&cur) {
            return rest.iter().rev().fold(c, |acc, r| acc.join(r));
        }
        match (cur.file_name().map(|n| n.to_os_string()), cur.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                cur = parent.to_path_buf();
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// A store, the same store as a multipart store when it is one, and its identity.
type StorePair = (
    Arc<dyn ObjectStore>,
    Option<Arc<dyn MultipartStore>>,
    String,
);

/// Size of an object, or None when it does not exist.
pub async fn head_size(
    store: &dyn ObjectStore,
    path: &Path,
    url: &str,
) -> Result<Option<u64>, StoreError> {
    match store.head(path).await {
        Ok(m) => Ok(Some(m.size)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(store_err(url, true)(e)),
    }
}

/// Read a whole (small) object: index files, config.json, tokenizer files.
pub async fn read_small(
    store: &dyn ObjectStore,
    path: &Path,
    url: &str,
) -> Result<Bytes, StoreError> {
    let r = store.get(path).await.map_err(store_err(url, true))?;
    r.bytes().await.map_err(store_err(url, true))
}

/// How byte ranges are read from object stores. A store gives each connection a limited
/// throughput (tens of MB/s to ~100 MB/s on S3), so one request per tensor cannot fill a
/// node's network: each read (the ranges a task needs from one object) is split into up to
/// `concurrency` parts of at least [`MIN_READ_PART`] and at most `part_size` bytes, fetched
/// concurrently, at most `concurrency` requests at a time in the whole process, each part
/// streamed straight into its place in the range's buffer (no reassembly copy). Splitting
/// by the connection budget, not only by size, keeps a lone read at the end of a merge on
/// every connection instead of a few.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadParts {
    pub part_size: u64,
    pub concurrency: usize,
}

impl Default for ReadParts {
    fn default() -> Self {
        ReadParts {
            part_size: 8 << 20,
            concurrency: 16,
        }
    }
}

/// Ranges less apart than this are read with one request (as object_store does).
const COALESCE: u64 = 1 << 20;

/// The smallest part a read is split into (smaller parts cost more in request overhead
/// than they gain in parallelism).
pub const MIN_READ_PART: u64 = 1 << 20;

impl ReadParts {
    /// The part size for a read of `total` bytes: spread over every connection, within
    /// [`MIN_READ_PART`] (or `part_size`, when smaller) and `part_size`.
    pub fn part_for(&self, total: u64) -> u64 {
        let floor = MIN_READ_PART.min(self.part_size);
        total
            .div_ceil(self.concurrency as u64)
            .clamp(floor, self.part_size.max(floor))
    }
}

static READS: std::sync::OnceLock<(ReadParts, tokio::sync::Semaphore)> = std::sync::OnceLock::new();

/// Set how this process reads ranges (the first call wins; later calls return false).
pub fn configure_reads(parts: ReadParts) -> bool {
    let parts = ReadParts {
        part_size: parts.part_size.max(1),
        concurrency: parts.concurrency.max(1),
    };
    READS
        .set((parts, tokio::sync::Semaphore::new(parts.concurrency)))
        .is_ok()
}

fn reads() -> &'static (ReadParts, tokio::sync::Semaphore) {
    READS.get_or_init(|| {
        let p = ReadParts::default();
        (p, tokio::sync::Semaphore::new(p.concurrency))
    })
}

/// Read several byte ranges of one object, each checked to be whole (a short read means
/// the object changed or was truncated). See [`ReadParts`].
pub async fn read_ranges(
    store: &dyn ObjectStore,
    path: &Path,
    url: &str,
    ranges: &[Range<u64>],
) -> Result<Vec<Bytes>, StoreError> {
    let (parts, permits) = reads();
    let total = coalesce(ranges).iter().map(|r| r.end - r.start).sum();
    read_ranges_in_parts(store, path, url, ranges, parts.part_for(total), permits).await
}

async fn read_ranges_in_parts(
    store: &dyn ObjectStore,
    path: &Path,
    url: &str,
    ranges: &[Range<u64>],
    part_size: u64,
    permits: &tokio::sync::Semaphore,
) -> Result<Vec<Bytes>, StoreError> {
    let merged = coalesce(ranges);
    // Zeroed buffers of this size are fresh pages from the OS: the zeroing costs nothing.
    let mut bufs: Vec<Vec<u8>> = merged
        .iter()
        .map(|m| vec![0u8; (m.end - m.start) as usize])
        .collect();
    let mut parts = Vec::new();
    for (m, buf) in merged.iter().zip(bufs.iter_mut()) {
        for (k, slice) in buf.chunks_mut(part_size as usize).enumerate() {
            let start = m.start + k as u64 * part_size;
            parts.push(fetch_into(store, path, url, start, slice, permits));
        }
    }
    futures::future::try_join_all(parts).await?;
    let bufs: Vec<Bytes> = bufs.into_iter().map(Bytes::from).collect();
    Ok(ranges
        .iter()
        .map(|r| {
            if r.start >= r.end {
                return Bytes::new();
            }
            let i = merged.partition_point(|m| m.start <= r.start) - 1;
            let at = merged[i].start;
            bufs[i].slice((r.start - at) as usize..(r.end - at) as usize)
        })
        .collect())
}

/// The non-empty ranges, sorted, with those less than [`COALESCE`] apart (or overlapping)
/// merged.
fn coalesce(ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut sorted: Vec<Range<u64>> = ranges.iter().filter(|r| r.start < r.end).cloned().collect();
    sorted.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match merged.last_mut() {
            Some(m) if r.start <= m.end.saturating_add(COALESCE) => m.end = m.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Fetch `out.len()` bytes at `start` into `out`, holding one of `permits` meanwhile.
async fn fetch_into(
    store: &dyn ObjectStore,
    path: &Path,
    url: &str,
    start: u64,
    out: &mut [u8],
    permits: &tokio::sync::Semaphore,
) -> Result<(), StoreError> {
    use futures::StreamExt;
    let _permit = permits
        .acquire()
        .await
        .expect("the read semaphore is never closed");
    let end = start + out.len() as u64;
    let truncated = |got: usize| StoreError::Truncated {
        url: url.into(),
        start,
        end,
        got,
    };
    let got = store
        .get_opts(
            path,
            object_store::GetOptions::new().with_range(Some(start..end)),
        )
        .await
        .map_err(store_err(url, false))?;
    let mut body = got.into_stream();
    let mut filled = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(store_err(url, false))?;
        let Some(dst) = out.get_mut(filled..filled + chunk.len()) else {
            return Err(truncated(filled + chunk.len()));
        };
        dst.copy_from_slice(&chunk);
        filled += chunk.len();
    }
    if filled != out.len() {
        return Err(truncated(filled));
    }
    Ok(())
}

/// Builds and caches stores.
#[derive(Default)]
pub struct Stores {
    cache: Mutex<HashMap<String, StorePair>>,
    hub: std::sync::OnceLock<Arc<crate::hub::HubClient>>,
}

/// Retry policy for every remote store: bounded in total time (120 s, or
/// `MERGEFLEET_RETRY_TIMEOUT_SECS`). The count bound is only a backstop far beyond what
/// the time allows, so an outage shorter than the time never fails a merge (with a count
/// of 50, quick refusals used up the tries in under 40 s).
pub fn retry_timeout() -> Duration {
    let secs = std::env::var("MERGEFLEET_RETRY_TIMEOUT_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(120);
    Duration::from_secs(secs)
}

fn retry_config() -> RetryConfig {
    RetryConfig {
        max_retries: 100_000,
        retry_timeout: retry_timeout(),
        ..Default::default()
    }
}

impl Stores {
    pub fn new() -> Self {
        Self::default()
    }

    /// Resolve a model reference or output location: a URL (`s3://`, `gs://`, `az://`,
    /// `abfs://`, `http(s)://`, `file://`) or a local path relative to the working directory.
    pub fn resolve(&self, spec: &str) -> Result<Location, StoreError> {
        if let Some(rest) = spec.strip_prefix("hf://") {
            return self.hub_location(rest, spec);
        }
        if spec.contains("://") {
            let url = Url::parse(spec).map_err(|e| StoreError::BadLocation {
                location: spec.into(),
                message: e.to_string(),
            })?;
            if url.scheme() == "file" {
                let path = url.to_file_path().map_err(|_| StoreError::BadLocation {
                    location: spec.into(),
                    message: "not an absolute file path".into(),
                })?;
                return self.local(path);
            }
            let (scheme, path) =
                ObjectStoreScheme::parse(&url).map_err(|e| StoreError::BadLocation {
                    location: spec.into(),
                    message: format!(
                        "{e}; supported: s3://, gs://, az://, abfs://, http(s)://, file:// and local paths"
                    ),
                })?;
            let key = format!("{scheme:?}:{}", &url[..url::Position::BeforePath]);
            let (store, multipart, store_id) = self.remote(&key, &scheme, &url, spec)?;
            Ok(Location {
                store,
                multipart,
                prefix: path,
                display: spec.trim_end_matches('/').to_string(),
                local_dir: None,
                store_id,
            })
        } else {
            let p = PathBuf::from(spec);
            let abs = if p.is_absolute() {
                p
            } else {
                std::env::current_dir()
                    .map_err(|e| StoreError::BadLocation {
                        location: spec.into(),
                        message: format!("cannot read the working directory: {e}"),
                    })?
                    .join(p)
            };
            self.local(abs)
        }
    }

    /// The Hub client of this process (built on first use, from the environment).
    pub fn hub(&self) -> Result<Arc<crate::hub::HubClient>, StoreError> {
        if let Some(c) = self.hub.get() {
            return Ok(c.clone());
        }
        let env = crate::hub::HubEnv::from_env();
        let endpoint = env.endpoint.clone();
        let client = crate::hub::HubClient::new(env).map_err(|e| StoreError::BadLocation {
            location: endpoint,
            message: e.to_string(),
        })?;
        Ok(self.hub.get_or_init(|| Arc::new(client)).clone())
    }

    /// `hf://REPO@COMMIT[/FILE]`, pinned (a branch is pinned before a merge starts, by
    /// [`crate::resolve`]): a file the local cache holds is a local file; offline, the
    /// whole snapshot is a local folder; else the repo is a [`crate::hub::HubStore`].
    fn hub_location(&self, rest: &str, spec: &str) -> Result<Location, StoreError> {
        let bad = |message: String| StoreError::BadLocation {
            location: spec.into(),
            message,
        };
        let (repo, after) = rest
            .split_once('@')
            .ok_or_else(|| bad("needs a pinned commit: hf://REPO@COMMIT/FILE".into()))?;
        let (commit, file) = after.split_once('/').unwrap_or((after, ""));
        let file = file.trim_matches('/');
        if !crate::reference::is_hub_id(repo) || !crate::reference::is_commit(commit) {
            return Err(bad(
                "expected hf://REPO@COMMIT/FILE with a Hub repo id and a 40-digit commit".into(),
            ));
        }
        let client = self.hub()?;
        let env = client.env();
        let display = format!("hf://{repo}@{commit}");
        if let Some(cache) = env.cache.as_deref() {
            if !file.is_empty() {
                if let Some(p) = crate::hub::cache::file(cache, repo, commit, file) {
                    return self.local(p);
                }
            } else if env.offline {
                let dir = crate::hub::cache::snapshot(cache, repo, commit);
                return Ok(Location {
                    display,
                    ..self.local(dir)?
                });
            }
        }
        if env.offline {
            let what = if file.is_empty() {
                "the snapshot".to_string()
            } else {
                format!("`{file}`")
            };
            return Err(bad(crate::hub::HubError::Offline {
                repo: repo.into(),
                at: format!("@{commit}"),
                what,
                cache: crate::hub::cache_name(env),
            }
            .to_string()));
        }
        Ok(Location {
            store: Arc::new(crate::hub::HubStore::new(client.clone(), repo, commit)),
            multipart: None,
            prefix: Path::from(file),
            display: if file.is_empty() {
                display
            } else {
                format!("{display}/{file}")
            },
            local_dir: None,
            store_id: format!("hf:{repo}@{commit}"),
        })
    }

    fn local(&self, path: PathBuf) -> Result<Location, StoreError> {
        let path = normalize(&path);
        let prefix = Path::from_absolute_path(&path).map_err(|e| StoreError::BadLocation {
            location: path.display().to_string(),
            message: e.to_string(),
        })?;
        let store = {
            let mut cache = self.cache.lock().expect("store cache");
            cache
                .entry("local".into())
                .or_insert_with(|| (Arc::new(LocalFileSystem::new()), None, "file".into()))
                .0
                .clone()
        };
        Ok(Location {
            store,
            multipart: None,
            prefix,
            display: path.display().to_string(),
            local_dir: Some(path),
            store_id: "file".into(),
        })
    }

    fn remote(
        &self,
        key: &str,
        scheme: &ObjectStoreScheme,
        url: &Url,
        spec: &str,
    ) -> Result<StorePair, StoreError> {
        let mut cache = self.cache.lock().expect("store cache");
        if let Some(hit) = cache.get(key) {
            return Ok(hit.clone());
        }
        let bad = |e: object_store::Error| StoreError::BadLocation {
            location: spec.into(),
            message: format!("cannot configure the store: {e}"),
        };
        let built: StorePair = match scheme {
            ObjectStoreScheme::AmazonS3 => {
                let b = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url.as_str())
                    .with_retry(retry_config());
                let endpoint = b
                    .get_config_value(&object_store::aws::AmazonS3ConfigKey::Endpoint)
                    .unwrap_or_default();
                let s = Arc::new(b.build().map_err(bad)?);
                let id = format!("{s}@{endpoint}");
                (s.clone(), Some(s), id)
            }
            ObjectStoreScheme::GoogleCloudStorage => {
                let s = Arc::new(
                    object_store::gcp::GoogleCloudStorageBuilder::from_env()
                        .with_url(url.as_str())
                        .with_retry(retry_config())
                        .build()
                        .map_err(bad)?,
                );
                let id = s.to_string();
                (s.clone(), Some(s), id)
            }
            ObjectStoreScheme::MicrosoftAzure => {
                let s = Arc::new(
                    object_store::azure::MicrosoftAzureBuilder::from_env()
                        .with_url(url.as_str())
                        .with_retry(retry_config())
                        .build()
                        .map_err(bad)?,
                );
                let id = s.to_string();
                (s.clone(), Some(s), id)
            }
            ObjectStoreScheme::Http => {
                let base = &url[..url::Position::BeforePath];
                let s = Arc::new(
                    object_store::http::HttpBuilder::new()
                        .with_url(base)
                        // A plain `http://` URL is the user's explicit choice (a server
                        // inside the cluster); object_store refuses it unless allowed.
                        .with_client_options(
                            object_store::ClientOptions::new()
                                .with_allow_http(url.scheme() == "http"),
                        )
                        .with_retry(retry_config())
                        .build()
                        .map_err(bad)?,
                );
                (s, None, base.to_string())
            }
            other => {
                return Err(StoreError::BadLocation {
                    location: spec.into(),
                    message: format!("the {other:?} scheme is not supported"),
                })
            }
        };
        cache.insert(key.to_string(), built.clone());
        Ok(built)
    }
}

/// A local path as [`Stores::resolve`] reads it: absolute (relative to the working
/// directory), `.` and `..` taken lexically.
pub fn lexical_path(spec: &str) -> Option<PathBuf> {
    let p = PathBuf::from(spec);
    let abs = if p.is_absolute() {
        p
    } else {
        std::env::current_dir().ok()?.join(p)
    };
    Some(normalize(&abs))
}

/// Lexically normalise `.` and `..` (object_store paths reject them).
fn normalize(p: &std::path::Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranges of every shape (overlapping, adjacent, far apart, empty, split into many
    /// parts) read back exactly, with at most the allowed requests at once; a range past
    /// the end is an error naming it.
    #[tokio::test]
    async fn ranges_read_in_parts_equal_the_bytes() {
        use object_store::memory::InMemory;
        let store = InMemory::new();
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let path = Path::from("m/model.safetensors");
        store.put(&path, data.clone().into()).await.unwrap();
        let ranges = vec![
            0..10,
            5..4_000_000,
            4_000_000..4_000_001,
            4_500_000..5_000_000,
            100..100,
            3_000_000..3_000_010,
            2_999_990..3_000_000,
        ];
        for part in [1 << 20, 333_333, 4_096, 10_000_000] {
            let permits = tokio::sync::Semaphore::new(3);
            let got = read_ranges_in_parts(&store, &path, "mem://m", &ranges, part, &permits)
                .await
                .unwrap();
            for (r, b) in ranges.iter().zip(&got) {
                assert_eq!(
                    &b[..],
                    &data[r.start as usize..r.end as usize],
                    "part {part}, {r:?}"
                );
            }
            assert_eq!(permits.available_permits(), 3);
        }
        let permits = tokio::sync::Semaphore::new(2);
        let past = [0..1, 4_999_000..5_000_100];
        let err = read_ranges_in_parts(&store, &path, "mem://m", &past, 300, &permits)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("mem://m"), "{err}");
    }

    #[test]
    fn a_read_is_spread_over_the_connections_within_the_part_bounds() {
        let p = ReadParts {
            part_size: 8 << 20,
            concurrency: 16,
        };
        // A 16 MiB read alone would take two connections in 8 MiB parts; it takes all 16.
        assert_eq!(p.part_for(16 << 20), 1 << 20);
        assert_eq!(p.part_for(64 << 20), 4 << 20);
        // Never below 1 MiB, never above the part size.
        assert_eq!(p.part_for(100), MIN_READ_PART);
        assert_eq!(p.part_for(1 << 30), 8 << 20);
        // A part size set below 1 MiB is what the user asked for.
        let tiny = ReadParts {
            part_size: 1000,
            concurrency: 3,
        };
        assert_eq!(tiny.part_for(1 << 20), 1000);
        let one = ReadParts {
            part_size: 8 << 20,
            concurrency: 1,
        };
        assert_eq!(one.part_for(100 << 20), 8 << 20);
    }

    #[test]
    fn coalesce_merges_close_and_overlapping_ranges_only() {
        assert_eq!(
            coalesce(&[
                10..20,
                0..5,
                3..8,
                8..8,
                20 + COALESCE..30 + COALESCE,
                40 + 2 * COALESCE..50 + 2 * COALESCE
            ]),
            vec![0..30 + COALESCE, 40 + 2 * COALESCE..50 + 2 * COALESCE]
        );
    }

    #[test]
    fn local_paths_are_absolute_and_normalized() {
        let s = Stores::new();
        let l = s.resolve("./a/../b/").unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(l.local_dir.unwrap(), cwd.join("b"));
        let l = s.resolve("file:///tmp/x").unwrap();
        assert_eq!(l.prefix.as_ref(), "tmp/x");
        assert_eq!(l.child_display("m.json"), "/tmp/x/m.json");
    }

    #[test]
    fn urls_pick_their_store() {
        let s = Stores::new();
        let l = s.resolve("s3://bucket/models/base/").unwrap();
        assert_eq!(l.prefix.as_ref(), "models/base");
        assert!(l.multipart.is_some());
        assert_eq!(
            l.child_display("config.json"),
            "s3://bucket/models/base/config.json"
        );
        let e = s.resolve("ftp://host/x").unwrap_err().to_string();
        assert!(e.contains("ftp://host/x"), "{e}");
    }
}
