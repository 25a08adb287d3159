//! The vocabulary keys of a config: `tokenizer_source`, `tokenizer:` and `chat_template`.
//!
//! mergekit 0.1.5 reads them in `config.py` and `tokenizer/config.py`; this module checks
//! their form and resolves every model they name to one of the merge's models, so a typo
//! fails before anything is read. What they do lives in [`crate::vocab`].

use serde_yaml::{Mapping, Value};

use super::{key_err, model_ref, same_model, yaml_key, ConfigError, ModelRef};

/// How the output vocabulary is made, and its per-token overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerSpec {
    /// The key the user wrote (`tokenizer_source` or `tokenizer`), for messages.
    pub key: &'static str,
    pub source: TokenizerSource,
    /// `tokenizer.tokens`, in the order written: extra tokens and where their rows come from.
    pub tokens: Vec<(String, TokenSpec)>,
    /// `tokenizer.pad_to_multiple_of`.
    pub pad_to_multiple_of: Option<usize>,
}

/// `tokenizer_source` / `tokenizer.source`.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSource {
    /// The base's tokenizer plus every other model's tokens.
    Union,
    /// The base's tokenizer (the first model's when there is no base).
    Base,
    /// One model's tokenizer: an index into [`super::MergeConfig::all_models`].
    Model(usize),
}

/// One entry of `tokenizer.tokens`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSpec {
    pub source: Option<TokenSource>,
    /// Use `source` even for the models that have the token.
    pub force: bool,
}

/// Where a token's row comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenSource {
    /// The same token in that model (an index into `all_models`).
    Model(usize),
    /// Another token of that model, by text or id (`kind: model_token`).
    ModelToken { model: usize, token: TokenRef },
    /// A row of zeros (`kind: zero`).
    Zero,
}

/// A token named by `kind: model_token`.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenRef {
    Id(i64),
    Text(String),
}

/// `chat_template`.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatTemplate {
    /// The template most of the models have.
    Auto,
    /// A template mergefleet ships, by name (see [`crate::vocab::templates`]).
    Builtin(String),
    /// A Jinja template as written.
    Literal(String),
}

/// The names of the templates mergekit 0.1.5 ships, which a config may use.
pub const BUILTIN_TEMPLATES: &[&str] = &["alpaca", "chatml", "exaone", "llama3", "mistral"];

/// Read `tokenizer_source` or `tokenizer` (mergekit refuses both). `models` are the merge's
/// models, base first.
pub fn tokenizer(
    map: &Mapping,
    models: &[&ModelRef],
) -> Result<Option<TokenizerSpec>, ConfigError> {
    let legacy = map.get("tokenizer_source").filter(|v| !v.is_null());
    let block = map.get("tokenizer").filter(|v| !v.is_null());
    match (legacy, block) {
        (Some(_), Some(_)) => Err(key_err(
            "tokenizer",
            "give either `tokenizer_source` or `tokenizer`, not both (mergekit refuses both too)",
        )),
        (Some(v), None) => Ok(Some(TokenizerSpec {
            key: "tokenizer_source",
            source: source(v, "tokenizer_source", models)?,
            tokens: Vec::new(),
            pad_to_multiple_of: None,
        })),
        (None, Some(Value::Mapping(m))) => block_spec(m, models).map(Some),
        (None, Some(_)) => Err(key_err(
            "tokenizer",
            "must be a mapping with `source`, `tokens` and `pad_to_multiple_of`",
        )),
        (None, None) => Ok(None),
    }
}

fn block_spec(m: &Mapping, models: &[&ModelRef]) -> Result<TokenizerSpec, ConfigError> {
    for (k, _) in m {
        let k = yaml_key(k);
        if !["source", "tokens", "pad_to_multiple_of"].contains(&k.as_str()) {
            return Err(key_err(
                format!("tokenizer.{k}"),
                "unknown key; `tokenizer` takes `source`, `tokens` and `pad_to_multiple_of`",
            ));
        }
    }
    let source = match m.get("source").filter(|v| !v.is_null()) {
        Some(v) => source(v, "tokenizer.source", models)?,
        None => TokenizerSource::Union,
    };
    let pad_to_multiple_of = match m.get("pad_to_multiple_of") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n > 0) => {
            Some(n.as_u64().unwrap_or(1) as usize)
        }
        Some(_) => {
            return Err(key_err(
                "tokenizer.pad_to_multiple_of",
                "must be a positive whole number",
            ))
        }
    };
    let mut tokens = Vec::new();
    match m.get("tokens") {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(t)) => {
            for (k, v) in t {
                let token = match k {
                    Value::String(s) => s.clone(),
                    other => yaml_key(other),
                };
                let key = format!("tokenizer.tokens.{token}");
                tokens.push((token, token_spec(v, &key, models)?));
            }
        }
        Some(_) => {
            return Err(key_err(
                "tokenizer.tokens",
                "must map each token to `{source: ..., force: ...}`",
            ))
        }
    }
    Ok(TokenizerSpec {
        key: "tokenizer",
        source,
        tokens,
        pad_to_multiple_of,
    })
}

fn source(v: &Value, key: &str, models: &[&ModelRef]) -> Result<TokenizerSource, ConfigError> {
    match v {
        Value::String(s) if s == "union" => Ok(TokenizerSource::Union),
        Value::String(s) if s == "base" => Ok(TokenizerSource::Base),
        Value::String(s) if s.starts_with("model:") => Err(key_err(
            key,
            format!(
                "`{s}` is older mergekit's spelling, which mergekit 0.1.5 fails on; write the model as the config names it: `{key}: {}`",
                &s["model:".len()..]
            ),
        )),
        other => Ok(TokenizerSource::Model(model_index(other, key, models)?)),
    }
}

fn token_spec(v: &Value, key: &str, models: &[&ModelRef]) -> Result<TokenSpec, ConfigError> {
    let Value::Mapping(m) = v else {
        return Err(key_err(
            key,
            "must be a mapping `{source: ..., force: ...}`",
        ));
    };
    for (k, _) in m {
        let k = yaml_key(k);
        if k != "source" && k != "force" {
            return Err(key_err(
                format!("{key}.{k}"),
                "unknown key; a token takes `source` and `force`",
            ));
        }
    }
    let force = match m.get("force") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(key_err(format!("{key}.force"), "must be true or false")),
    };
    let skey = format!("{key}.source");
    let source = match m.get("source") {
        None | Some(Value::Null) => None,
        Some(Value::Mapping(s)) if s.contains_key("kind") => Some(kind(s, &skey, models)?),
        Some(other) => Some(TokenSource::Model(model_index(other, &skey, models)?)),
    };
    if force && source.is_none() {
        return Err(key_err(
            format!("{key}.force"),
            "`force: true` needs a `source` to take the row from",
        ));
    }
    Ok(TokenSpec { source, force })
}

fn kind(s: &Mapping, key: &str, models: &[&ModelRef]) -> Result<TokenSource, ConfigError> {
    match s.get("kind") {
        Some(Value::String(k)) if k == "zero" => Ok(TokenSource::Zero),
        Some(Value::String(k)) if k == "model_token" => {
            let model = match s.get("model") {
                Some(m) => model_index(m, &format!("{key}.model"), models)?,
                None => return Err(key_err(format!("{key}.model"), "missing")),
            };
            let token = match (s.get("token_id"), s.get("token")) {
                (Some(Value::Number(n)), None) if n.as_i64().is_some() => {
                    TokenRef::Id(n.as_i64().unwrap_or(-1))
                }
                (None, Some(Value::String(t))) => TokenRef::Text(t.clone()),
                (Some(_), Some(_)) => {
                    return Err(key_err(key, "give one of `token_id` and `token`, not both"))
                }
                (None, None) => {
                    return Err(key_err(
                        key,
                        "`kind: model_token` needs `token_id` or `token`",
                    ))
                }
                (Some(_), None) => {
                    return Err(key_err(format!("{key}.token_id"), "must be a whole number"))
                }
                (None, Some(_)) => return Err(key_err(format!("{key}.token"), "must be a string")),
            };
            Ok(TokenSource::ModelToken { model, token })
        }
        _ => Err(key_err(
            format!("{key}.kind"),
            "must be `model_token` or `zero` (or give a model instead of a mapping)",
        )),
    }
}

/// The merge's model a key names.
fn model_index(v: &Value, key: &str, models: &[&ModelRef]) -> Result<usize, ConfigError> {
    let m = model_ref(v, key)?;
    models.iter().position(|x| same_model(x, &m)).ok_or_else(|| {
        key_err(
            key,
            format!(
                "`{m}` is not one of the merged models ({}); mergefleet takes tokenizers and token rows from the merged models only",
                models
                    .iter()
                    .map(|m| format!("`{m}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })
}

/// Read `chat_template` as mergekit does: `auto`, a shipped template's name, or a Jinja
/// template (at least 20 characters with a `{`).
pub fn chat_template(map: &Mapping) -> Result<Option<ChatTemplate>, ConfigError> {
    match map.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "auto" => Ok(Some(ChatTemplate::Auto)),
        Some(Value::String(s)) if BUILTIN_TEMPLATES.contains(&s.as_str()) => {
            Ok(Some(ChatTemplate::Builtin(s.clone())))
        }
        Some(Value::String(s)) if s.chars().count() >= 20 && s.contains('{') => {
            Ok(Some(ChatTemplate::Literal(s.clone())))
        }
        Some(Value::String(s)) => Err(key_err(
            "chat_template",
            format!(
                "`{s}` is neither `auto`, a template name ({}) nor a Jinja template",
                BUILTIN_TEMPLATES.join(", ")
            ),
        )),
        Some(_) => Err(key_err("chat_template", "must be a string")),
    }
}
