//! The tokenizer files: reading each model's (a few small reads per model, at plan time)
//! and making the output's, as transformers 5 saves the tokenizer mergekit builds.
//!
//! Read: `tokenizer.json` (what the `tokenizers` library loads), `tokenizer_config.json`,
//! `special_tokens_map.json`, the chat template (`chat_template.jinja`, else
//! tokenizer_config.json's `chat_template`), and config.json's vocabulary size. Written:
//! `tokenizer.json` (the library's own serialization), `tokenizer_config.json` (the source's,
//! its `added_tokens_decoder` rebuilt and its inline template moved out),
//! `special_tokens_map.json` when the source has one, and `chat_template.jinja`.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::build::{ModelTokenizer, Vocabulary};
use super::VocabError;
use crate::config::ChatTemplate;
use crate::error::Result;
use crate::store::{head_size, read_small, Location};

/// One model's tokenizer files, as far as it has them.
#[derive(Debug, Clone, Default)]
pub struct TokenizerFiles {
    /// The model as the config names it.
    pub model: String,
    pub tokenizer_json: Option<String>,
    /// It has a SentencePiece `tokenizer.model`.
    pub sentencepiece: bool,
    pub tokenizer_config: Option<Map<String, Value>>,
    pub special_tokens_map: Option<Bytes>,
    /// Its chat template, as written.
    pub template: Option<String>,
    /// config.json's `vocab_size` (or `text_config.vocab_size`).
    pub vocab_size: Option<usize>,
}

/// Read the tokenizer files of the model at `location` (named `model` in the config).
pub async fn read(location: &Location, model: &str) -> Result<TokenizerFiles> {
    let store = location.store.as_ref();
    let get = |name: &'static str| async move {
        let url = location.child_display(name);
        let path = location.child(name);
        Ok::<_, crate::Error>(match head_size(store, &path, &url).await? {
            Some(_) => Some((read_small(store, &path, &url).await?, url)),
            None => None,
        })
    };
    let text = |b: Bytes, url: &str| {
        String::from_utf8(b.to_vec()).map_err(|_| VocabError::Tokenizer {
            model: model.to_string(),
            message: format!("{url} is not UTF-8 text"),
        })
    };
    let json = |b: Bytes, url: &str| {
        serde_json::from_slice::<Value>(&b).map_err(|e| VocabError::Tokenizer {
            model: model.to_string(),
            message: format!("{url} is not valid JSON: {e}"),
        })
    };
    let mut files = TokenizerFiles {
        model: model.to_string(),
        ..Default::default()
    };
    if let Some((b, url)) = get("tokenizer.json").await? {
        files.tokenizer_json = Some(text(b, &url)?);
    }
    let sp = location.child("tokenizer.model");
    files.sentencepiece = head_size(store, &sp, &location.child_display("tokenizer.model"))
        .await?
        .is_some();
    if let Some((b, url)) = get("tokenizer_config.json").await? {
        if let Value::Object(m) = json(b, &url)? {
            files.tokenizer_config = Some(m);
        }
    }
    files.special_tokens_map = get("special_tokens_map.json").await?.map(|(b, _)| b);
    files.template = match get("chat_template.jinja").await? {
        Some((b, url)) => Some(text(b, &url)?),
        None => files
            .tokenizer_config
            .as_ref()
            .and_then(|c| inline_template(c.get("chat_template")?)),
    };
    if let Some((b, url)) = get("config.json").await? {
        let c = json(b, &url)?;
        files.vocab_size = c
            .get("vocab_size")
            .or_else(|| c.get("text_config")?.get("vocab_size"))
            .and_then(Value::as_u64)
            .map(|n| n as usize);
    }
    Ok(files)
}

/// A template written in tokenizer_config.json: a string, or named templates (`default`).
fn inline_template(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

impl TokenizerFiles {
    /// The parsed tokenizer, or why this model cannot take part in a vocabulary merge
    /// (`key` is the config key that needs it).
    pub fn tokenizer(&self, key: &str) -> Result<ModelTokenizer, VocabError> {
        match &self.tokenizer_json {
            Some(json) => ModelTokenizer::parse(json, self.vocab_size, &self.model),
            None => Err(VocabError::Key {
                key: key.to_string(),
                message: if self.sentencepiece {
                    format!(
                        "`{}` has only a SentencePiece tokenizer.model, no tokenizer.json; mergefleet reads tokenizer.json (save the tokenizer once with transformers' AutoTokenizer to write one)",
                        self.model
                    )
                } else {
                    format!(
                        "`{}` has no tokenizer files (tokenizer.json); a vocabulary merge needs every model's tokenizer",
                        self.model
                    )
                },
            }),
        }
    }
}

/// The chat template to write: `auto` takes the template most of the models have (trimmed;
/// a tie goes to the first in config order), none when none has one.
pub fn chat_template(ct: &ChatTemplate, models: &[TokenizerFiles]) -> Option<String> {
    match ct {
        ChatTemplate::Builtin(name) => super::templates::builtin(name).map(str::to_string),
        ChatTemplate::Literal(t) => Some(t.clone()),
        ChatTemplate::Auto => {
            let all: Vec<&str> = models
                .iter()
                .filter_map(|m| m.template.as_deref().map(str::trim))
                .filter(|t| !t.is_empty())
                .collect();
            let mut best: Option<(&str, usize)> = None;
            for t in &all {
                let n = all.iter().filter(|x| *x == t).count();
                if best.is_none_or(|(_, b)| n > b) {
                    best = Some((t, n));
                }
            }
            best.map(|(t, _)| t.to_string())
        }
    }
}

/// The output's tokenizer files. `source` is the model whose tokenizer the output starts
/// from (the base, or `tokenizer_source`'s model); `vocab` the merged vocabulary, if any;
/// `template` the chat template to write, if any.
pub fn output_files(
    source: &TokenizerFiles,
    vocab: Option<&Vocabulary>,
    template: Option<&str>,
) -> Result<Vec<(String, Bytes)>, VocabError> {
    let mut out = Vec::new();
    let mut config = source.tokenizer_config.clone().unwrap_or_default();
    config.remove("chat_template");
    if let Some(v) = vocab {
        let json = v
            .tokenizer
            .to_string(true)
            .map_err(|e| VocabError::Tokenizer {
                model: source.model.clone(),
                message: format!("the merged tokenizer cannot be written: {e}"),
            })?;
        out.push(("tokenizer.json".to_string(), Bytes::from(json)));
        if config.contains_key("added_tokens_decoder") {
            config.insert("added_tokens_decoder".into(), added_tokens_decoder(v));
        }
    } else if let Some(json) = &source.tokenizer_json {
        out.push(("tokenizer.json".to_string(), Bytes::from(json.clone())));
    }
    if source.tokenizer_config.is_some() || vocab.is_some() {
        let text = serde_json::to_string_pretty(&Value::Object(config)).unwrap_or_default() + "\n";
        out.push(("tokenizer_config.json".to_string(), Bytes::from(text)));
    }
    if let Some(m) = &source.special_tokens_map {
        out.push(("special_tokens_map.json".to_string(), m.clone()));
    }
    if let Some(t) = template.or(source.template.as_deref()) {
        out.push((
            "chat_template.jinja".to_string(),
            Bytes::from(t.to_string()),
        ));
    }
    Ok(out)
}

/// tokenizer_config.json's `added_tokens_decoder` for the merged tokenizer, by id.
fn added_tokens_decoder(v: &Vocabulary) -> Value {
    let mut added: Vec<_> = v.tokenizer.get_added_tokens_decoder().into_iter().collect();
    added.sort_by_key(|(id, _)| *id);
    let mut m = Map::new();
    for (id, t) in added {
        m.insert(
            id.to_string(),
            serde_json::json!({
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }),
        );
    }
    Value::Object(m)
}
