//! Model references as mergekit 0.1.5 writes them: `path`, `path@revision`, `path+lora`,
//! `path@rev+lora@rev`, or the long form `{model: {path, revision}, lora: {path, revision}}`.
//!
//! Pure parsing and classification only: whether a path names a local folder is asked of the
//! filesystem by the caller ([`crate::resolve`]), and nothing here reads the network. The
//! rules are mergekit's (`common.py`: `ModelPath`, `ModelReference`): one `+` splits a model
//! from its adapter, one `@` a path from its revision; URLs (`s3://`, ...) are mergefleet's
//! own and taken whole.

use std::fmt;

/// A model or adapter path with an optional revision (`path@revision`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelPath {
    pub path: String,
    pub revision: Option<String>,
}

impl fmt::Display for ModelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.revision {
            Some(r) => write!(f, "{}@{r}", self.path),
            None => f.write_str(&self.path),
        }
    }
}

/// A model as the user named it: the text as written, the model, and its LoRA adapter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelRef {
    /// As written in the config (the long form printed as mergekit prints it).
    pub text: String,
    pub model: ModelPath,
    pub lora: Option<ModelPath>,
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl ModelRef {
    /// Parse mergekit's short form. `Err` says what is wrong with the text.
    pub fn parse(text: &str) -> Result<ModelRef, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("is empty".into());
        }
        // URLs are mergefleet's (mergekit has none); `hf://` follows huggingface_hub's
        // `hf://repo@revision/path` and has no adapter form.
        if is_url(text) && !text.starts_with("hf://") {
            return Ok(ModelRef {
                text: text.into(),
                model: ModelPath {
                    path: text.into(),
                    revision: None,
                },
                lora: None,
            });
        }
        let chunks: Vec<&str> = text.split('+').collect();
        let (model, lora) = match chunks[..] {
            [m] => (ModelPath::parse(m)?, None),
            [m, l] => (ModelPath::parse(m)?, Some(ModelPath::parse(l)?)),
            _ => {
                return Err(format!(
                    "`{text}` has more than one `+` (write `MODEL+LORA`)"
                ))
            }
        };
        Ok(ModelRef {
            text: text.into(),
            model,
            lora,
        })
    }

    /// Build from the long form's parts.
    pub fn from_parts(model: ModelPath, lora: Option<ModelPath>) -> ModelRef {
        let text = match &lora {
            Some(l) => format!("{model}+{l}"),
            None => model.to_string(),
        };
        ModelRef { text, model, lora }
    }
}

impl ModelPath {
    /// `path` or `path@revision`: more than one `@` is refused, as mergekit does.
    pub fn parse(text: &str) -> Result<ModelPath, String> {
        let text = text.trim();
        let mut parts = text.split('@');
        let path = parts.next().unwrap_or_default().trim();
        let revision = parts.next().map(|r| r.trim().to_string());
        if parts.next().is_some() {
            return Err(format!(
                "`{text}` has more than one `@` (write `PATH@REVISION`)"
            ));
        }
        if path.is_empty() {
            return Err(format!("`{text}` has no path before `@`"));
        }
        if revision.as_deref() == Some("") {
            return Err(format!("`{text}` has an empty revision after `@`"));
        }
        Ok(ModelPath {
            path: path.to_string(),
            revision,
        })
    }
}

/// Does `s` name a URL (`scheme://...`)?
pub fn is_url(s: &str) -> bool {
    s.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    })
}

/// Is `s` shaped like a Hugging Face repo id (`name` or `namespace/name`), by the rules
/// huggingface_hub's `validate_repo_id` applies: word characters, `-`, `.`; no `--` or
/// `..`; not starting or ending with `-` or `.`; at most 96 characters; not ending in `.git`.
pub fn is_hub_id(s: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '.')
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
    };
    let parts: Vec<&str> = s.split('/').collect();
    s.len() <= 96
        && !s.contains("--")
        && !s.contains("..")
        && !s.ends_with(".git")
        && matches!(parts.len(), 1 | 2)
        && parts.iter().all(|p| part_ok(p))
}

/// Is `s` a full commit hash (40 lowercase hex digits), which needs no lookup to pin?
pub fn is_commit(s: &str) -> bool {
    s.len() == 40
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mp(path: &str, rev: Option<&str>) -> ModelPath {
        ModelPath {
            path: path.into(),
            revision: rev.map(Into::into),
        }
    }

    #[test]
    fn mergekit_short_forms() {
        let r = ModelRef::parse("org/m").unwrap();
        assert_eq!((r.model, r.lora), (mp("org/m", None), None));
        let r = ModelRef::parse("org/m@v1").unwrap();
        assert_eq!(r.model, mp("org/m", Some("v1")));
        let r = ModelRef::parse("org/m+org/adapter").unwrap();
        assert_eq!(r.lora, Some(mp("org/adapter", None)));
        let r = ModelRef::parse("org/m@main+org/a@0123").unwrap();
        assert_eq!(r.model, mp("org/m", Some("main")));
        assert_eq!(r.lora, Some(mp("org/a", Some("0123"))));
        assert_eq!(r.text, "org/m@main+org/a@0123");
        // Local paths parse the same way; URLs are whole.
        let r = ModelRef::parse("./models/base").unwrap();
        assert_eq!(r.model, mp("./models/base", None));
        let r = ModelRef::parse("s3://b/user@host+x/m").unwrap();
        assert_eq!(
            (r.model.path.as_str(), r.lora),
            ("s3://b/user@host+x/m", None)
        );
        let r = ModelRef::parse("hf://org/m@abc").unwrap();
        assert_eq!(r.model, mp("hf://org/m", Some("abc")));
        assert_eq!(
            ModelRef::from_parts(mp("a", Some("r")), Some(mp("l", None))).text,
            "a@r+l"
        );
    }

    #[test]
    fn malformed_references_say_why() {
        for (text, want) in [
            ("a+b+c", "more than one `+`"),
            ("a@b@c", "more than one `@`"),
            ("@main", "no path"),
            ("a@", "empty revision"),
            ("  ", "empty"),
        ] {
            let e = ModelRef::parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn hub_ids_as_huggingface_hub_validates_them() {
        for ok in ["gpt2", "org/name", "Org_1/Mistral-7B-v0.1", "a.b/c_d-e"] {
            assert!(is_hub_id(ok), "{ok}");
        }
        for bad in [
            "a/b/c",
            "/abs/path",
            "./rel",
            "a--b/c",
            "a/b..c",
            "a/b.git",
            "-a/b",
            "a/b-",
            "",
            "a/",
            "with space/x",
            &"x".repeat(97),
        ] {
            assert!(!is_hub_id(bad), "{bad}");
        }
        assert!(is_commit(&"0123456789abcdef".repeat(3)[..40]));
        assert!(!is_commit("main") && !is_commit(&"A".repeat(40)));
        assert!(is_url("s3://b/k") && is_url("hf://o/n") && !is_url("org/name"));
    }
}
