//! HTTP to the Hub: one client per process, requests retried within the store retry budget
//! (429 and 503 wait what `Retry-After` asks), redirects followed by hand so the token never
//! reaches another host, and the Hub's `X-Error-Code` turned into a [`HubError`].

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, AUTHORIZATION, LOCATION, RANGE, RETRY_AFTER};
use reqwest::{Method, Response, StatusCode, Url};

use super::{HubEnv, HubError, Pinned};

/// Redirects followed per request (the Hub sends one, to its download host).
const MAX_REDIRECTS: usize = 10;

/// What a request was for, to name it in errors.
pub struct Target<'a> {
    pub repo: &'a str,
    pub revision: &'a str,
    /// The file in the repo, or None for the revision API.
    pub file: Option<&'a str>,
}

/// The Hub as this process reaches it.
pub struct HubClient {
    env: HubEnv,
    http: reqwest::Client,
    /// The files of each pinned commit the revision API listed: a file not listed is
    /// known missing without asking (the side files a merge looks for, most absent).
    listings: Mutex<HashMap<(String, String), Listing>>,
}

/// The files of one commit.
type Listing = Arc<BTreeSet<String>>;

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HubClient({})", self.env.endpoint)
    }
}

impl HubClient {
    pub fn new(env: HubEnv) -> Result<HubClient, HubError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("mergefleet/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            // A stalled body is retried from where it stopped (see `HubStore`).
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| HubError::Http {
                url: env.endpoint.clone(),
                message: format!("cannot build an HTTP client: {e}"),
            })?;
        Ok(HubClient {
            env,
            http,
            listings: Mutex::default(),
        })
    }

    /// Whether `file` is in `repo` at `commit`, when a listing of that commit was read.
    pub fn listed(&self, repo: &str, commit: &str, file: &str) -> Option<bool> {
        let listings = self.listings.lock().unwrap_or_else(|e| e.into_inner());
        let files = listings.get(&(repo.to_string(), commit.to_string()))?;
        Some(files.contains(file))
    }

    pub fn env(&self) -> &HubEnv {
        &self.env
    }

    /// `{endpoint}/{repo}/resolve/{revision}/{file}`.
    pub fn resolve_url(&self, repo: &str, revision: &str, file: &str) -> String {
        format!(
            "{}/{repo}/resolve/{}/{}",
            self.env.endpoint,
            encode(revision),
            file.split('/').map(encode).collect::<Vec<_>>().join("/")
        )
    }

    /// The Hub's revision API: the commit a branch or tag points to now, and the files.
    pub async fn revision(&self, repo: &str, revision: &str) -> Result<Pinned, HubError> {
        let url = format!(
            "{}/api/models/{repo}/revision/{}",
            self.env.endpoint,
            encode(revision)
        );
        let target = Target {
            repo,
            revision,
            file: None,
        };
        let resp = self.send(Method::GET, &url, None, &target).await?;
        let bad = |message: String| HubError::Http {
            url: url.clone(),
            message,
        };
        let body = resp
            .bytes()
            .await
            .map_err(|e| bad(format!("reading the answer: {e}")))?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| bad(format!("the answer is not JSON: {e}")))?;
        let commit = v
            .get("sha")
            .and_then(|s| s.as_str())
            .filter(|s| crate::reference::is_commit(s))
            .ok_or_else(|| bad("the answer has no 40-digit `sha`".into()))?;
        let files = v.get("siblings").and_then(|s| s.as_array()).map(|a| {
            a.iter()
                .filter_map(|f| f.get("rfilename").and_then(|n| n.as_str()))
                .map(String::from)
                .collect::<Vec<_>>()
        });
        if let Some(files) = &files {
            self.listings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    (repo.to_string(), commit.to_string()),
                    Arc::new(files.iter().cloned().collect()),
                );
        }
        // `false`, or how access is granted (`"auto"`, `"manual"`).
        let gated = v
            .get("gated")
            .is_some_and(|g| !g.is_null() && g.as_bool() != Some(false));
        Ok(Pinned {
            commit: commit.to_string(),
            files,
            gated,
        })
    }

    /// Send a request, following redirects and retrying what may pass: connection errors,
    /// 429 and 5xx, for at most the store retry budget. `range` is a `Range` header value.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        range: Option<&str>,
        target: &Target<'_>,
    ) -> Result<Response, HubError> {
        let budget = crate::store::retry_timeout();
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            let (wait, why, unreachable) = match self.follow(&method, url, range).await {
                Ok(r) if r.status().is_success() => return Ok(r),
                Ok(r) if retryable(r.status()) => {
                    let after = retry_after(r.headers());
                    (
                        after.unwrap_or(backoff),
                        format!("HTTP {}", r.status()),
                        false,
                    )
                }
                Ok(r) => return Err(self.refusal(r, url, target).await),
                Err(e) => (backoff, e, true),
            };
            if started.elapsed() + wait > budget {
                let hint = if unreachable {
                    format!(
                        " (the Hub at {} cannot be reached: set HF_ENDPOINT to a reachable mirror, or HF_HUB_OFFLINE=1 to read `{}` from the local cache)",
                        self.env.endpoint, target.repo
                    )
                } else {
                    String::new()
                };
                return Err(HubError::Http {
                    url: url.into(),
                    message: format!(
                        "{why}; still failing after {:.0} s of retries (MERGEFLEET_RETRY_TIMEOUT_SECS){hint}",
                        started.elapsed().as_secs_f64()
                    ),
                });
            }
            tracing::debug!(url, %why, wait_ms = wait.as_millis() as u64, "retrying a Hub request");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(15));
        }
    }

    /// One request with its redirects. The token goes to the endpoint's own host only:
    /// once a redirect leaves it, no later hop gets it.
    async fn follow(
        &self,
        method: &Method,
        url: &str,
        range: Option<&str>,
    ) -> Result<Response, String> {
        let mut url = Url::parse(url).map_err(|e| format!("bad URL {url}: {e}"))?;
        let home = Url::parse(&self.env.endpoint).ok();
        let mut same_host = home.as_ref().is_some_and(|h| same_origin(h, &url));
        for _ in 0..=MAX_REDIRECTS {
            let mut req = self.http.request(method.clone(), url.clone());
            if let Some(r) = range {
                req = req.header(RANGE, r);
            }
            if let (true, Some(t)) = (same_host, &self.env.token) {
                req = req.header(AUTHORIZATION, format!("Bearer {t}"));
            }
            let resp = req.send().await.map_err(|e| describe(&e))?;
            if !resp.status().is_redirection() {
                return Ok(resp);
            }
            let next = resp
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
                .ok_or_else(|| format!("HTTP {} without a usable Location", resp.status()))?;
            same_host = same_host && same_origin(&url, &next);
            url = next;
        }
        Err(format!("more than {MAX_REDIRECTS} redirects"))
    }

    /// The error for a final, non-retryable answer.
    async fn refusal(&self, resp: Response, url: &str, t: &Target<'_>) -> HubError {
        let status = resp.status();
        let code = resp
            .headers()
            .get("x-error-code")
            .and_then(|c| c.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp.text().await.unwrap_or_default();
        let repo = t.repo.to_string();
        match code.as_str() {
            "RepoNotFound" => HubError::RepoNotFound {
                repo,
                endpoint: self.env.endpoint.clone(),
            },
            "RevisionNotFound" => HubError::RevisionNotFound {
                repo,
                revision: t.revision.into(),
                page: self.env.page(t.repo),
            },
            "EntryNotFound" => HubError::EntryNotFound {
                repo,
                revision: t.revision.into(),
                file: t.file.unwrap_or("").into(),
            },
            _ if code == "GatedRepo"
                || status == StatusCode::UNAUTHORIZED
                || status == StatusCode::FORBIDDEN =>
            {
                HubError::Gated {
                    page: self.env.page(t.repo),
                    why: match &self.env.token {
                        None => "no token is set (HF_TOKEN)".into(),
                        Some(_) => format!("the token was refused (HTTP {status})"),
                    },
                    repo,
                }
            }
            _ if status == StatusCode::NOT_FOUND && t.file.is_some() => HubError::EntryNotFound {
                repo,
                revision: t.revision.into(),
                file: t.file.unwrap_or("").into(),
            },
            _ => HubError::Http {
                url: url.into(),
                message: format!(
                    "HTTP {status}{}: {}",
                    if code.is_empty() {
                        String::new()
                    } else {
                        format!(" ({code})")
                    },
                    body.chars().take(200).collect::<String>().trim()
                ),
            },
        }
    }
}

fn retryable(s: StatusCode) -> bool {
    s == StatusCode::TOO_MANY_REQUESTS || s == StatusCode::REQUEST_TIMEOUT || s.is_server_error()
}

/// `Retry-After` in seconds (the Hub sends seconds; an HTTP date is not worth parsing).
fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let secs: f64 = h.get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// A reqwest error with its causes (reqwest's own text is often just "error sending request").
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Percent-encode one path segment (revisions such as `refs/pr/1` are one segment).
fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_headers() {
        let env = HubEnv {
            endpoint: "http://hub:8080".into(),
            token: None,
            cache: None,
            offline: false,
        };
        let c = HubClient::new(env).unwrap();
        assert_eq!(
            c.resolve_url("org/m", "refs/pr/1", "sub dir/model.safetensors"),
            "http://hub:8080/org/m/resolve/refs%2Fpr%2F1/sub%20dir/model.safetensors"
        );
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
        let u = |s: &str| Url::parse(s).unwrap();
        assert!(same_origin(
            &u("https://hf.co/a"),
            &u("https://hf.co:443/b")
        ));
        assert!(!same_origin(&u("http://h:1/a"), &u("http://h:2/a")));
        assert!(!same_origin(
            &u("https://hf.co/a"),
            &u("https://cdn.hf.co/a")
        ));
    }
}
