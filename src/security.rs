//! Shared-token authentication and TLS for the cluster's gRPC traffic.
//!
//! Every RPC but health checks carries `authorization: Bearer TOKEN`; the coordinator
//! compares it in constant time. The token comes from `--token-file` or `MERGEFLEET_TOKEN`
//! and never appears in logs or error messages.

use std::path::Path;

use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

/// Read the token: the file's first line, else `MERGEFLEET_TOKEN` (set but empty means no
/// token, as an unset variable does).
pub fn load_token(file: Option<&Path>) -> Result<Option<String>, String> {
    let token = match file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| format!("cannot read the token file {}: {e}", f.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
        ),
        None => std::env::var("MERGEFLEET_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()),
    };
    match token {
        Some(t) if t.is_empty() => Err("the token is empty".into()),
        // HTTP headers also carry bytes past ASCII, but not every peer takes them: refuse
        // them here, on both sides, instead of at the first worker's call.
        Some(t) if !t.bytes().all(|b| b.is_ascii_graphic()) => Err(
            "the token must be printable ASCII without spaces (e.g. from `openssl rand -hex 32`)"
                .into(),
        ),
        other => Ok(other),
    }
}

/// The coordinator's token must be hard to guess: at least 16 characters. This also catches
/// a placeholder left in a deployment's Secret.
pub fn check_strength(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token is too short ({} characters): use at least {MIN_TOKEN_LEN}, e.g. from `openssl rand -hex 32`",
            token.len()
        ));
    }
    Ok(())
}

pub const MIN_TOKEN_LEN: usize = 16;

/// Equal in time independent of where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Server side: refuse requests without the right token.
#[derive(Clone)]
pub struct CheckToken(pub Option<String>);

impl tonic::service::Interceptor for CheckToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.0 else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or wrong token: give the coordinator's token with --token-file or MERGEFLEET_TOKEN"))
        }
    }
}

/// Client side: attach the token to every request.
#[derive(Clone)]
pub struct AddToken(pub Option<MetadataValue<tonic::metadata::Ascii>>);

impl AddToken {
    pub fn new(token: Option<&str>) -> Self {
        AddToken(token.and_then(|t| format!("Bearer {t}").parse().ok()))
    }
}

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn short_tokens_are_refused() {
        assert!(check_strength("replace-me")
            .unwrap_err()
            .contains("too short"));
        assert!(check_strength(&"x".repeat(16)).is_ok());
    }

    #[test]
    fn tokens() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        let mut check = CheckToken(Some("s3cret".into()));
        let mut add = AddToken::new(Some("s3cret"));
        assert!(check.call(add.call(Request::new(())).unwrap()).is_ok());
        let mut wrong = AddToken::new(Some("nope"));
        let e = check
            .call(wrong.call(Request::new(())).unwrap())
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(!e.message().contains("s3cret") && !e.message().contains("nope"));
        assert!(check.call(Request::new(())).is_err());
        assert!(CheckToken(None).call(Request::new(())).is_ok());
    }

    #[test]
    fn token_sources() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "abc\n").unwrap();
        assert_eq!(load_token(Some(&f)).unwrap().as_deref(), Some("abc"));
        std::fs::write(&f, "\n").unwrap();
        assert!(load_token(Some(&f)).is_err());
        assert!(load_token(Some(&dir.path().join("missing")))
            .unwrap_err()
            .contains("missing"));
        // Refused at start, not first at a worker's call.
        std::fs::write(&f, "s3cret-é-0123456789\n").unwrap();
        assert!(load_token(Some(&f)).unwrap_err().contains("ASCII"));
        std::fs::write(&f, "two words-0123456789\n").unwrap();
        assert!(load_token(Some(&f)).unwrap_err().contains("ASCII"));
    }
}
