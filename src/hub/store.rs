//! One Hub repo at one commit as a read-only object store, so every reader in mergefleet
//! (headers, indexes, parallel ranged tensor reads) works on the Hub unchanged.
//!
//! A file the local HF cache holds for that commit is read from the disk; any other is a
//! GET of its resolve URL with a `Range`. A body that breaks off mid-read is resumed from
//! the byte where it stopped, so one dropped connection does not fail a task.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    Attributes, CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload, ListResult,
    MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload,
    PutResult,
};
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, ETAG};
use reqwest::{Method, StatusCode};

use super::http::{describe, HubClient, Target};
use super::{cache, HubError};

/// Times a broken body is resumed before the read fails.
const RESUMES: u32 = 5;

/// A Hub repo pinned to a commit.
pub struct HubStore {
    client: Arc<HubClient>,
    repo: String,
    commit: String,
    local: LocalFileSystem,
}

impl HubStore {
    pub fn new(client: Arc<HubClient>, repo: &str, commit: &str) -> HubStore {
        HubStore {
            client,
            repo: repo.into(),
            commit: commit.into(),
            local: LocalFileSystem::new(),
        }
    }

    /// The file in the local cache, if it is there (and the cache is in use).
    fn cached(&self, name: &str) -> Option<PathBuf> {
        let root = self.client.env().cache.as_deref()?;
        cache::file(root, &self.repo, &self.commit, name)
    }

    fn target<'a>(&'a self, name: &'a str) -> Target<'a> {
        Target {
            repo: &self.repo,
            revision: &self.commit,
            file: Some(name),
        }
    }

    fn err(&self, name: &str, e: HubError) -> object_store::Error {
        match e {
            HubError::EntryNotFound { .. } => object_store::Error::NotFound {
                path: name.into(),
                source: Box::new(e),
            },
            HubError::Gated { .. } | HubError::RepoNotFound { .. } => {
                object_store::Error::PermissionDenied {
                    path: name.into(),
                    source: Box::new(e),
                }
            }
            other => object_store::Error::Generic {
                store: "Hugging Face Hub",
                source: Box::new(other),
            },
        }
    }
}

impl fmt::Display for HubStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HuggingFaceHub({}@{})", self.repo, self.commit)
    }
}

impl fmt::Debug for HubStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `bytes START-END/TOTAL` -> (START..END+1, TOTAL).
fn content_range(v: &str) -> Option<(Range<u64>, u64)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (a, b) = span.split_once('-')?;
    let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a <= b).then_some((a..b + 1, total.trim().parse().ok()?))
}

fn range_header(r: &GetRange) -> String {
    match r {
        GetRange::Bounded(r) => format!("bytes={}-{}", r.start, r.end.saturating_sub(1)),
        GetRange::Offset(o) => format!("bytes={o}-"),
        GetRange::Suffix(n) => format!("bytes=-{n}"),
    }
}

fn header_u64(h: &reqwest::header::HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn unsupported(what: &str) -> object_store::Error {
    object_store::Error::NotSupported {
        source: format!("the Hugging Face Hub is read-only here: cannot {what}").into(),
    }
}

#[async_trait]
impl ObjectStore for HubStore {
    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let name = location.as_ref();
        if let Some(p) = self.cached(name) {
            let p = Path::from_filesystem_path(&p).map_err(|e| object_store::Error::Generic {
                store: "Hugging Face cache",
                source: Box::new(e),
            })?;
            return self.local.get_opts(&p, options).await;
        }
        let target = self.target(name);
        if self.client.listed(&self.repo, &self.commit, name) == Some(false) {
            let e = HubError::EntryNotFound {
                repo: self.repo.clone(),
                revision: self.commit.clone(),
                file: name.into(),
            };
            return Err(self.err(name, e));
        }
        let url = self.client.resolve_url(&self.repo, &self.commit, name);
        if options.head {
            let resp = self
                .client
                .send(Method::HEAD, &url, None, &target)
                .await
                .map_err(|e| self.err(name, e))?;
            let h = resp.headers();
            let size = header_u64(h, "x-linked-size")
                .or_else(|| header_u64(h, CONTENT_LENGTH.as_str()))
                .ok_or_else(|| object_store::Error::Generic {
                    store: "Hugging Face Hub",
                    source: format!("{url}: HEAD gave no size").into(),
                })?;
            let meta = meta(location, size, h);
            return Ok(GetResult {
                payload: GetResultPayload::Stream(futures::stream::empty().boxed()),
                meta,
                range: 0..size,
                attributes: Attributes::default(),
                extensions: Default::default(),
            });
        }
        let range = options.range.as_ref().map(range_header);
        let resp = self
            .client
            .send(Method::GET, &url, range.as_deref(), &target)
            .await
            .map_err(|e| self.err(name, e))?;
        let h = resp.headers();
        let (got, size) = match resp.status() {
            StatusCode::PARTIAL_CONTENT => h
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(content_range)
                .ok_or_else(|| object_store::Error::Generic {
                    store: "Hugging Face Hub",
                    source: format!("{url}: 206 without a valid Content-Range").into(),
                })?,
            _ if range.is_some() => {
                return Err(object_store::Error::Generic {
                    store: "Hugging Face Hub",
                    source: format!(
                        "{url}: the server answered HTTP {} to a ranged GET (it must honour Range)",
                        resp.status()
                    )
                    .into(),
                })
            }
            _ => {
                let n = resp.content_length().unwrap_or(0);
                (0..n, n)
            }
        };
        let meta = meta(location, size, h);
        let body = Resume {
            client: self.client.clone(),
            url,
            repo: self.repo.clone(),
            commit: self.commit.clone(),
            name: name.to_string(),
            pos: got.start,
            end: got.end,
            resumes: 0,
            inner: resp.bytes_stream().boxed(),
        };
        Ok(GetResult {
            payload: GetResultPayload::Stream(body.stream()),
            meta,
            range: got,
            attributes: Attributes::default(),
            extensions: Default::default(),
        })
    }

    async fn put_opts(
        &self,
        _: &Path,
        _: PutPayload,
        _: PutOptions,
    ) -> object_store::Result<PutResult> {
        Err(unsupported("write a file"))
    }

    async fn put_multipart_opts(
        &self,
        _: &Path,
        _: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Err(unsupported("write a file"))
    }

    fn delete_stream(
        &self,
        _: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        futures::stream::once(async { Err(unsupported("delete a file")) }).boxed()
    }

    fn list(&self, _: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        futures::stream::once(async { Err(unsupported("list files")) }).boxed()
    }

    async fn list_with_delimiter(&self, _: Option<&Path>) -> object_store::Result<ListResult> {
        Err(unsupported("list files"))
    }

    async fn copy_opts(&self, _: &Path, _: &Path, _: CopyOptions) -> object_store::Result<()> {
        Err(unsupported("copy a file"))
    }
}

fn meta(location: &Path, size: u64, h: &reqwest::header::HeaderMap) -> ObjectMeta {
    let etag = h
        .get("x-linked-etag")
        .or_else(|| h.get(ETAG))
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    ObjectMeta {
        location: location.clone(),
        last_modified: chrono::DateTime::from_timestamp(0, 0).unwrap_or_default(),
        size,
        e_tag: etag,
        version: None,
    }
}

/// A body read from `pos` to `end`, resumed with a new ranged GET when it breaks off.
struct Resume {
    client: Arc<HubClient>,
    url: String,
    repo: String,
    commit: String,
    name: String,
    pos: u64,
    end: u64,
    resumes: u32,
    inner: BoxStream<'static, reqwest::Result<Bytes>>,
}

impl Resume {
    fn stream(self) -> BoxStream<'static, object_store::Result<Bytes>> {
        futures::stream::unfold(Some(self), |state| async move {
            let mut st = state?;
            loop {
                let broken = match st.inner.next().await {
                    Some(Ok(b)) => {
                        st.pos += b.len() as u64;
                        return Some((Ok(b), Some(st)));
                    }
                    Some(Err(e)) => describe(&e),
                    None if st.pos >= st.end => return None,
                    None => format!("the body ended at byte {} of {}", st.pos, st.end),
                };
                if st.resumes >= RESUMES {
                    let e = object_store::Error::Generic {
                        store: "Hugging Face Hub",
                        source: format!("{}: {broken} (after {RESUMES} resumes)", st.url).into(),
                    };
                    return Some((Err(e), None));
                }
                st.resumes += 1;
                tracing::debug!(url = st.url, pos = st.pos, %broken, "resuming a Hub read");
                let range = format!("bytes={}-{}", st.pos, st.end - 1);
                let target = Target {
                    repo: &st.repo,
                    revision: &st.commit,
                    file: Some(&st.name),
                };
                match st
                    .client
                    .send(Method::GET, &st.url, Some(&range), &target)
                    .await
                {
                    Ok(r) if r.status() == StatusCode::PARTIAL_CONTENT => {
                        st.inner = r.bytes_stream().boxed();
                    }
                    Ok(r) => {
                        let e = object_store::Error::Generic {
                            store: "Hugging Face Hub",
                            source: format!("{}: resuming got HTTP {}", st.url, r.status()).into(),
                        };
                        return Some((Err(e), None));
                    }
                    Err(e) => {
                        let e = object_store::Error::Generic {
                            store: "Hugging Face Hub",
                            source: Box::new(e),
                        };
                        return Some((Err(e), None));
                    }
                }
            }
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        assert_eq!(content_range("bytes 0-9/100"), Some((0..10, 100)));
        assert_eq!(content_range("bytes 5-5/6"), Some((5..6, 6)));
        assert_eq!(content_range("bytes 9-5/6"), None);
        assert_eq!(content_range("bytes */6"), None);
        assert_eq!(range_header(&GetRange::Bounded(3..10)), "bytes=3-9");
        assert_eq!(range_header(&GetRange::Offset(3)), "bytes=3-");
        assert_eq!(range_header(&GetRange::Suffix(3)), "bytes=-3");
    }
}
