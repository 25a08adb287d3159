//! One owner per output location: a merge takes the output before it touches it.
//!
//! Two merges writing one output corrupt each other (a second coordinator resumed from the
//! first's journal and zeroed its shards). So every merge, embedded or cluster, first takes
//! exclusive ownership of its output and keeps it until it ends:
//! - on a filesystem, `flock` on `OUT/.mergefleet.lock`, with the holder written inside; the
//!   kernel drops the lock when the process dies, however it dies;
//! - on object stores, a lock object created with a conditional put (`PutMode::Create`),
//!   renewed every [`RENEW_EVERY`] with a conditional update, and taken over only when it
//!   has not been renewed for [`STALE_AFTER`] or when it names the same owner (a
//!   coordinator restarted by its Kubernetes Job: `MERGEFLEET_OWNER`). A holder whose
//!   renewal is refused has lost the output and stops.
//!
//! A merge that finds the output held exits 2 naming the holder: host, pid, role, address,
//! since when.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::SinkError;
use crate::store::Location;

pub const LOCK_NAME: &str = ".mergefleet.lock";
/// An object-store lock not renewed for this long belongs to a process that is gone.
pub const STALE_AFTER: Duration = Duration::from_secs(120);
/// How often a holder renews its object-store lock.
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
/// The longest a finished merge waits on its store to remove its lock.
pub const RELEASE_WAIT: Duration = Duration::from_secs(10);
/// The same after a failure, whose store may be the thing that is gone.
pub const RELEASE_WAIT_FAILED: Duration = Duration::from_secs(3);

/// Who holds an output, as written inside the lock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// `merge` or `coordinator`.
    pub role: String,
    /// The coordinator's gRPC address.
    pub address: Option<String>,
    /// Holders with the same owner may take over each other's lock at once (the pods of
    /// one Kubernetes Job); by default unique to this process.
    pub owner: String,
    /// Unix seconds when the lock was taken.
    pub since: u64,
    /// Unique to this acquisition: tells our lock object from anyone else's.
    pub token: String,
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl Holder {
    /// This process as a holder in `role`; `MERGEFLEET_OWNER` names its owner if set.
    pub fn this_process(role: &str, address: Option<String>) -> Holder {
        let host = hostname();
        let pid = std::process::id();
        let now = unix_now();
        let token = format!("{host}:{pid}:{}", now.as_nanos());
        let owner = std::env::var("MERGEFLEET_OWNER")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| token.clone());
        Holder {
            host,
            pid,
            role: role.into(),
            address,
            owner,
            since: now.as_secs(),
            token,
        }
    }

    /// For messages: "coordinator (pid 12, host h, serving 10.0.0.3:7300) since ...".
    pub fn describe(&self) -> String {
        let address = self
            .address
            .as_ref()
            .map(|a| format!(", serving {a}"))
            .unwrap_or_default();
        format!(
            "a mergefleet {} (pid {} on host {}{address}) since {}",
            self.role,
            self.pid,
            self.host,
            crate::units::fmt_unix_time(self.since)
        )
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(s) = std::str::from_utf8(&buf[..end]) {
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    "unknown-host".into()
}

/// How a holder lost its output.
#[derive(Debug, Clone, PartialEq)]
pub enum Loss {
    /// Another process took the lock over (it judged this holder dead).
    TakenOver,
    /// The store did not answer a renewal for so long that another process may now judge
    /// the lock stale: the store is unreachable (the message says how).
    Unreachable(String),
}

impl Loss {
    /// The error a holder stops with.
    pub fn into_error(self, location: &str) -> crate::error::Error {
        match self {
            Loss::TakenOver => crate::error::Error::OutputLost(location.to_string()),
            Loss::Unreachable(why) => crate::error::Error::StoreGone(why),
        }
    }
}

/// Exclusive ownership of an output location, until [`OutputLock::release`] (or death).
pub struct OutputLock {
    kind: Kind,
    lost: watch::Receiver<Option<Loss>>,
}

enum Kind {
    Local {
        path: PathBuf,
        _file: File,
    },
    Store {
        location: Location,
        version: Arc<std::sync::Mutex<UpdateVersion>>,
        renew: tokio::task::JoinHandle<()>,
    },
}

impl OutputLock {
    /// Take `location` for `holder`, or fail with [`SinkError::Held`] naming who has it.
    pub async fn acquire(location: &Location, holder: &Holder) -> Result<OutputLock, SinkError> {
        match &location.local_dir {
            Some(dir) => {
                let dir = dir.clone();
                let holder = holder.clone();
                let display = location.display.clone();
                tokio::task::spawn_blocking(move || lock_local(&dir, &holder, &display))
                    .await
                    .map_err(|e| SinkError::Io {
                        path: location.child_display(LOCK_NAME),
                        source: std::io::Error::other(e),
                    })?
            }
            None => lock_store(location, holder).await,
        }
    }

    /// Resolves if another process took the output over (it judged this holder dead), or
    /// if its store stopped answering for so long that another may.
    pub async fn lost(&self) -> Loss {
        let mut rx = self.lost.clone();
        let loss = match rx.wait_for(Option::is_some).await {
            Ok(loss) => loss.clone(),
            Err(_) => None,
        };
        match loss {
            Some(loss) => loss,
            // The renewal task ended without a loss (released): never resolves.
            None => std::future::pending().await,
        }
    }

    /// Give the output up: remove the lock (only if it is still ours), waiting at most
    /// [`RELEASE_WAIT`] on its store.
    pub async fn release(self) {
        self.release_within(RELEASE_WAIT).await
    }

    /// [`OutputLock::release`], waiting at most `limit` on the store (a lock left behind
    /// goes stale after [`STALE_AFTER`]).
    pub async fn release_within(self, limit: Duration) {
        match self.kind {
            Kind::Local { path, _file } => {
                // Removed while still locked: a process that opened the old file finds,
                // once it has the lock, that the path no longer names it, and retries.
                let _ = std::fs::remove_file(&path);
                drop(_file);
            }
            Kind::Store {
                location,
                version,
                renew,
            } => {
                renew.abort();
                let path = location.child(LOCK_NAME);
                let ours = version.lock().expect("lock version").e_tag.clone();
                let fut = async {
                    match location.store.head(&path).await {
                        Ok(meta) if meta.e_tag == ours => {
                            if let Err(e) = location.store.delete(&path).await {
                                tracing::warn!(
                                    "could not remove the lock {}: {e}",
                                    location.child_display(LOCK_NAME)
                                );
                            }
                        }
                        _ => {}
                    }
                };
                if tokio::time::timeout(limit, fut).await.is_err() {
                    tracing::warn!(
                        "could not remove the lock {} in time; it goes stale after {} s",
                        location.child_display(LOCK_NAME),
                        STALE_AFTER.as_secs()
                    );
                }
            }
        }
    }
}

fn lock_local(
    dir: &std::path::Path,
    holder: &Holder,
    display: &str,
) -> Result<OutputLock, SinkError> {
    let path = dir.join(LOCK_NAME);
    let io = |source| SinkError::Io {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|source| SinkError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let file = loop {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // SAFETY: a valid open descriptor; flock has no memory effects.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                let raw = std::fs::read(&path).unwrap_or_default();
                return Err(held(display, serde_json::from_slice(&raw).ok(), None));
            }
            return Err(io(err));
        }
        // The previous holder may have removed the file between our open and our lock.
        let ours = f.metadata().map_err(io)?;
        match std::fs::metadata(&path) {
            Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => break f,
            _ => continue,
        }
    };
    file.set_len(0).map_err(io)?;
    (&file)
        .write_all(&serde_json::to_vec(holder).expect("holder serializes"))
        .map_err(io)?;
    let (_, lost) = watch::channel(None);
    Ok(OutputLock {
        kind: Kind::Local { path, _file: file },
        lost,
    })
}

fn held(location: &str, holder: Option<Holder>, stale_in: Option<Duration>) -> SinkError {
    let who = holder
        .map(|h| h.describe())
        .unwrap_or_else(|| "another mergefleet process".into());
    let hint = match stale_in {
        Some(d) => format!(
            "; if that process is gone, its lock goes stale in {} s: run again then",
            d.as_secs()
        ),
        None => String::new(),
    };
    SinkError::Held {
        location: location.to_string(),
        holder: format!("{who}{hint}"),
    }
}

async fn lock_store(location: &Location, holder: &Holder) -> Result<OutputLock, SinkError> {
    let store = location.store.clone();
    let path = location.child(LOCK_NAME);
    let url = location.child_display(LOCK_NAME);
    let store_err = |source| SinkError::Store {
        url: url.clone(),
        source,
    };
    let body = || PutPayload::from_bytes(Bytes::from(serde_json::to_vec(holder).expect("json")));
    let version: UpdateVersion = match store.put_opts(&path, body(), PutMode::Create.into()).await {
        Ok(r) => r.into(),
        Err(
            object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. },
        ) => {
            let got = store.get(&path).await.map_err(store_err)?;
            let meta = got.meta.clone();
            let raw = got.bytes().await.map_err(store_err)?;
            let theirs: Option<Holder> = serde_json::from_slice(&raw).ok();
            let age = SystemTime::now()
                .duration_since(meta.last_modified.into())
                .unwrap_or_default();
            let same_owner = theirs.as_ref().is_some_and(|h| h.owner == holder.owner);
            if !same_owner && age < STALE_AFTER {
                return Err(held(&location.display, theirs, Some(STALE_AFTER - age)));
            }
            let update = UpdateVersion {
                e_tag: meta.e_tag.clone(),
                version: meta.version.clone(),
            };
            match store
                .put_opts(&path, body(), PutMode::Update(update).into())
                .await
            {
                Ok(r) => {
                    tracing::warn!(
                        "took over the output {} from {} (lock last renewed {} s ago)",
                        location.display,
                        theirs
                            .map(|h| h.describe())
                            .unwrap_or_else(|| "an unreadable lock".into()),
                        age.as_secs()
                    );
                    r.into()
                }
                Err(object_store::Error::Precondition { .. }) => {
                    return Err(held(&location.display, None, None))
                }
                Err(e) => return Err(conditional_err(location, e)),
            }
        }
        Err(e) => return Err(conditional_err(location, e)),
    };
    // A store that ignores preconditions would have let us overwrite a live holder: read
    // the lock back and make sure it is ours.
    let raw = store
        .get(&path)
        .await
        .map_err(store_err)?
        .bytes()
        .await
        .map_err(store_err)?;
    match serde_json::from_slice::<Holder>(&raw) {
        Ok(h) if h.token == holder.token => {}
        other => return Err(held(&location.display, other.ok(), None)),
    }
    let version = Arc::new(std::sync::Mutex::new(version));
    let (lost_tx, lost) = watch::channel(None);
    let renew = tokio::spawn(renew(
        location.clone(),
        holder.clone(),
        version.clone(),
        lost_tx,
    ));
    Ok(OutputLock {
        kind: Kind::Store {
            location: location.clone(),
            version,
            renew,
        },
        lost,
    })
}

fn conditional_err(location: &Location, source: object_store::Error) -> SinkError {
    match source {
        object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. } => {
            SinkError::Unusable {
                url: location.display.clone(),
                source,
            }
        }
        source => SinkError::Store {
            url: location.child_display(LOCK_NAME),
            source,
        },
    }
}

/// The lock's current version if it still names `holder` (this acquisition's token).
async fn still_ours(location: &Location, holder: &Holder) -> Option<UpdateVersion> {
    let got = location.store.get(&location.child(LOCK_NAME)).await.ok()?;
    let meta = got.meta.clone();
    let raw = got.bytes().await.ok()?;
    let h: Holder = serde_json::from_slice(&raw).ok()?;
    (h.token == holder.token).then_some(UpdateVersion {
        e_tag: meta.e_tag,
        version: meta.version,
    })
}

/// Renew the lock until aborted; say `lost` if it was taken over, or if it could not be
/// renewed for so long that another process may have judged it stale.
async fn renew(
    location: Location,
    holder: Holder,
    version: Arc<std::sync::Mutex<UpdateVersion>>,
    lost: watch::Sender<Option<Loss>>,
) {
    let path = location.child(LOCK_NAME);
    let body = Bytes::from(serde_json::to_vec(&holder).expect("json"));
    let mut last_ok = std::time::Instant::now();
    let mut last_err = String::new();
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        let current = version.lock().expect("lock version").clone();
        let put = location.store.put_opts(
            &path,
            PutPayload::from_bytes(body.clone()),
            PutMode::Update(current).into(),
        );
        match tokio::time::timeout(STALE_AFTER / 2, put).await {
            Ok(Ok(r)) => {
                *version.lock().expect("lock version") = r.into();
                last_ok = std::time::Instant::now();
            }
            Ok(Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            )) => match still_ours(&location, &holder).await {
                // An earlier try of this renewal went through but its answer was lost (the
                // store restarted mid-request): the lock is ours, at a version we did not
                // hear of. Only a lock naming someone else is a takeover.
                Some(v) => {
                    *version.lock().expect("lock version") = v;
                    last_ok = std::time::Instant::now();
                }
                None => {
                    tracing::error!(
                        "another process took over the output {}: stopping",
                        location.display
                    );
                    let _ = lost.send(Some(Loss::TakenOver));
                    return;
                }
            },
            Ok(Err(e)) => {
                tracing::warn!("could not renew the lock on {}: {e}", location.display);
                last_err = e.to_string();
            }
            Err(_) => {
                tracing::warn!("renewing the lock on {} timed out", location.display);
                last_err = "no answer".into();
            }
        }
        if last_ok.elapsed() >= STALE_AFTER - RENEW_EVERY {
            let why = format!(
                "the store of {} stopped answering: its lock could not be renewed for {} s ({last_err})",
                location.display,
                last_ok.elapsed().as_secs()
            );
            tracing::error!("{why}; another process may take the output over: stopping");
            let _ = lost.send(Some(Loss::Unreachable(why)));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::path::Path;

    fn in_memory() -> (Arc<InMemory>, Location) {
        let store = Arc::new(InMemory::new());
        let location = Location {
            store: store.clone(),
            multipart: None,
            prefix: Path::from("out"),
            display: "memory:///out".into(),
            local_dir: None,
            store_id: "memory".into(),
        };
        (store, location)
    }

    async fn overwrite_lock(store: &InMemory, location: &Location, h: &Holder) {
        let body = PutPayload::from_bytes(Bytes::from(serde_json::to_vec(h).unwrap()));
        store.put(&location.child(LOCK_NAME), body).await.unwrap();
    }

    /// A renewal that went through while its answer was lost (the store restarted
    /// mid-request) leaves the lock at a version the holder never heard of: its next
    /// renewal is refused, yet the lock is still its own and it goes on. A lock naming
    /// another holder is a takeover.
    #[tokio::test(start_paused = true)]
    async fn a_renewal_whose_answer_was_lost_is_no_takeover() {
        let (store, location) = in_memory();
        let me = Holder::this_process("merge", None);
        let lock = OutputLock::acquire(&location, &me).await.unwrap();
        overwrite_lock(&store, &location, &me).await;
        let waited = tokio::time::timeout(3 * RENEW_EVERY, lock.lost()).await;
        assert!(waited.is_err(), "lost the lock: {waited:?}");
        // Renewed since: the lock is ours at its newest version.
        assert!(still_ours(&location, &me).await.is_some());

        let other = Holder::this_process("merge", None);
        overwrite_lock(&store, &location, &other).await;
        assert!(still_ours(&location, &me).await.is_none());
        let loss = tokio::time::timeout(3 * RENEW_EVERY, lock.lost()).await;
        assert_eq!(loss, Ok(Loss::TakenOver));
    }
}
