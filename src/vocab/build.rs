//! The output tokenizer and each model's token map, as mergekit's `tokenizer/build.py` makes
//! them (pure: tokenizers in, tokenizer and maps out).
//!
//! - `base`: the base's tokenizer, stripped of the tokens whose ids are past its config's
//!   `vocab_size` (padding rows nobody trained); `<model>`: that model's, as it is;
//!   `union`: the base's plus every other model's regular tokens, then their added tokens.
//! - `tokenizer.tokens` adds the tokens it names that are not there yet.
//! - Per model: output id -> the model's own id, or none when it lacks the token.
//!
//! Where mergekit's order is Python's set or Rust's hash order (which models' new tokens
//! come first; a model's new regular tokens among themselves), it differs from run to run;
//! we take config order and each model's id order (docs/vocabulary.md).

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use tokenizers::{AddedToken, Tokenizer};

use super::VocabError;
use crate::config::{TokenizerSource, TokenizerSpec};

/// One model's tokenizer as read from its files.
#[derive(Clone)]
pub struct ModelTokenizer {
    /// tokenizer.json, parsed by Hugging Face's own library.
    pub tokenizer: Tokenizer,
    /// The text of tokenizer.json (stripping edits it).
    pub json: String,
    /// config.json's vocabulary size (`vocab_size`, or `text_config.vocab_size`).
    pub vocab_size: Option<usize>,
}

impl ModelTokenizer {
    pub fn parse(json: &str, vocab_size: Option<usize>, model: &str) -> Result<Self, VocabError> {
        let tokenizer = load(json).map_err(|e| VocabError::Tokenizer {
            model: model.to_string(),
            message: format!("tokenizer.json cannot be read by the tokenizers library: {e}"),
        })?;
        Ok(ModelTokenizer {
            tokenizer,
            json: json.to_string(),
            vocab_size,
        })
    }

    /// Token -> id, added tokens included.
    pub fn vocab(&self) -> HashMap<String, u32> {
        self.tokenizer.get_vocab(true)
    }

    /// The vocabulary in id order.
    fn by_id(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self.vocab().into_iter().collect();
        v.sort_by_key(|(_, id)| *id);
        v
    }

    /// The added tokens in id order (transformers' `added_tokens_decoder`).
    fn added(&self) -> Vec<(u32, AddedToken)> {
        let mut v: Vec<(u32, AddedToken)> = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }
}

/// The output vocabulary and how every model's tokens map into it.
pub struct Vocabulary {
    pub tokenizer: Tokenizer,
    /// Output id -> token.
    pub tokens: Vec<String>,
    /// Rows in the output: the vocabulary, rounded up to `pad_to_multiple_of`.
    pub padded: usize,
    /// Per model (base first, then config order): output id -> the model's own id.
    pub maps: Vec<Vec<Option<u32>>>,
    /// Per model: its own vocabulary (the base's stripped), for `kind: model_token`.
    pub own: Vec<HashMap<String, u32>>,
    /// Which model is the base (mergekit's `base_model`, else the first model).
    pub base: usize,
    pub spec: TokenizerSpec,
    /// Things the user should know (tokens no model has, ids past a model's rows).
    pub warnings: Vec<String>,
}

impl Vocabulary {
    /// The output vocabulary's size before padding.
    pub fn size(&self) -> usize {
        self.tokens.len()
    }

    /// Where the output tokens come from: per model (base first), how many tokens it is the
    /// first to have; and every token no model has (their rows are zeros or a
    /// `tokenizer.tokens` source).
    pub fn origins(&self) -> (Vec<usize>, Vec<&str>) {
        let mut counts = vec![0; self.maps.len()];
        let mut none = Vec::new();
        let order: Vec<usize> = std::iter::once(self.base)
            .chain((0..self.maps.len()).filter(|&i| i != self.base))
            .collect();
        for (id, token) in self.tokens.iter().enumerate() {
            match order.iter().find(|&&m| self.maps[m][id].is_some()) {
                Some(&m) => counts[m] += 1,
                None => none.push(token.as_str()),
            }
        }
        (counts, none)
    }
}

/// Build the output tokenizer and the token maps. `tokenizers[i]` is model `i`'s (base
/// first), `names[i]` its name as written.
pub fn build(
    spec: &TokenizerSpec,
    base: usize,
    tokenizers: &[ModelTokenizer],
    names: &[String],
) -> Result<Vocabulary, VocabError> {
    let mut warnings = Vec::new();
    let stripped = strip(&tokenizers[base], &names[base])?;
    let mut out = match &spec.source {
        TokenizerSource::Base => stripped.clone(),
        TokenizerSource::Model(m) => tokenizers[*m].tokenizer.clone(),
        TokenizerSource::Union => union(&stripped, base, tokenizers, &mut warnings, names),
    };
    let mut existing: HashSet<String> = out.get_vocab(true).into_keys().collect();
    for (token, _) in &spec.tokens {
        if existing.insert(token.clone()) {
            out.add_tokens([AddedToken::from(token.clone(), false)])
                .map_err(|e| VocabError::Key {
                    key: format!("{}.tokens.{token}", spec.key),
                    message: format!("cannot add the token: {e}"),
                })?;
        }
    }
    let vocab = out.get_vocab(true);
    let mut tokens = vec![None; vocab.len()];
    for (t, &id) in &vocab {
        match tokens.get_mut(id as usize) {
            Some(slot) => *slot = Some(t.clone()),
            None => {
                return Err(VocabError::Tokenizer {
                    model: names[base].clone(),
                    message: format!(
                        "the output vocabulary's ids are not 0..{}: token {t:?} has id {id}; mergekit cannot merge such a tokenizer either",
                        vocab.len()
                    ),
                })
            }
        }
    }
    let tokens: Vec<String> = match tokens.iter().position(Option::is_none) {
        Some(id) => {
            return Err(VocabError::Tokenizer {
                model: names[base].clone(),
                message: format!(
                    "the output vocabulary has no token at id {id} (two tokens share an id); mergekit cannot merge such a tokenizer either"
                ),
            })
        }
        None => tokens.into_iter().flatten().collect(),
    };
    let own: Vec<HashMap<String, u32>> = tokenizers
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if i == base {
                stripped.get_vocab(true)
            } else {
                t.vocab()
            }
        })
        .collect();
    let maps = own
        .iter()
        .zip(tokenizers)
        .zip(names)
        .map(|((own, t), name)| {
            let size = t.vocab_size.unwrap_or(own.len());
            let mut past = 0;
            let map = tokens
                .iter()
                .map(|tok| match own.get(tok) {
                    Some(&id) if (id as usize) < size => Some(id),
                    Some(_) => {
                        past += 1;
                        None
                    }
                    None => None,
                })
                .collect();
            if past > 0 {
                // mergekit fails on these (a KeyError); the rows past vocab_size are padding.
                warnings.push(format!(
                    "{past} token(s) of the output vocabulary have ids past `{name}`'s vocab_size {size}; that model's rows for them are treated as missing"
                ));
            }
            map
        })
        .collect();
    let padded = match spec.pad_to_multiple_of {
        Some(m) => tokens.len().div_ceil(m) * m,
        None => tokens.len(),
    };
    Ok(Vocabulary {
        tokenizer: out,
        tokens,
        padded,
        maps,
        own,
        base,
        spec: spec.clone(),
        warnings,
    })
}

/// The base's tokenizer without the tokens at ids past its config's `vocab_size`
/// (mergekit's `get_stripped_tokenizer`): such tokens leave the vocabulary, the added
/// tokens and every BPE merge that uses them.
fn strip(t: &ModelTokenizer, name: &str) -> Result<Tokenizer, VocabError> {
    let vocab = t.vocab();
    let size = t.vocab_size.unwrap_or(vocab.len());
    let unused: HashSet<&str> = vocab
        .iter()
        .filter(|(_, &id)| id as usize >= size)
        .map(|(k, _)| k.as_str())
        .collect();
    if unused.is_empty() {
        return Ok(t.tokenizer.clone());
    }
    let bad = |message: String| VocabError::Tokenizer {
        model: name.to_string(),
        message,
    };
    let mut json: Value = serde_json::from_str(&t.json)
        .map_err(|e| bad(format!("tokenizer.json is not JSON: {e}")))?;
    let kind = json["model"]["type"].as_str().unwrap_or("").to_string();
    if kind != "BPE" {
        return Err(bad(format!(
            "{} token(s) have ids past config.json's vocab_size {size}, and only a BPE tokenizer can be stripped of them (this one is {kind}); mergekit refuses this too",
            unused.len()
        )));
    }
    if let Some(Value::Array(added)) = json.get_mut("added_tokens") {
        added.retain(|e| e["id"].as_u64().is_some_and(|id| (id as usize) < size));
    }
    if let Some(Value::Object(v)) = json["model"].get_mut("vocab") {
        v.retain(|k, _| !unused.contains(k.as_str()));
    }
    if let Some(Value::Array(merges)) = json["model"].get_mut("merges") {
        let mut bad_merge = None;
        merges.retain(|m| {
            let parts: Vec<&str> = match m {
                Value::String(s) if s.matches(' ').count() == 1 => s.split(' ').collect(),
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                other => {
                    bad_merge = Some(other.to_string());
                    return true;
                }
            };
            // mergekit checks the two parts; the merged token must stay too, or the
            // tokenizers library cannot load the result (mergekit then fails).
            let merged: String = parts.concat();
            !parts.iter().any(|p| unused.contains(p)) && !unused.contains(merged.as_str())
        });
        if let Some(m) = bad_merge {
            return Err(bad(format!(
                "tokenizer.json has a BPE merge of an unknown form: {m}"
            )));
        }
    }
    load(&json.to_string())
        .map_err(|e| bad(format!("the stripped tokenizer cannot be rebuilt: {e}")))
}

/// Parse tokenizer.json with the tokenizers library, which can panic on some malformed
/// files (a BPE merge into a token missing from the vocabulary): that is an error too.
fn load(json: &str) -> Result<Tokenizer, String> {
    std::panic::catch_unwind(|| Tokenizer::from_bytes(json.as_bytes()))
        .map_err(|_| "the tokenizers library failed on it (malformed BPE merges?)".to_string())?
        .map_err(|e| e.to_string())
}

/// mergekit's `build_union_tokenizer`: the (stripped) base, then every model's regular
/// tokens it lacks, then every added token, each token once (the first model's settings).
fn union(
    base_tok: &Tokenizer,
    base: usize,
    tokenizers: &[ModelTokenizer],
    warnings: &mut Vec<String>,
    names: &[String],
) -> Tokenizer {
    let stripped = ModelTokenizer {
        tokenizer: base_tok.clone(),
        json: String::new(),
        vocab_size: tokenizers[base].vocab_size,
    };
    let order = std::iter::once(base).chain((0..tokenizers.len()).filter(|&i| i != base));
    let mut regular: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut added: Vec<AddedToken> = Vec::new();
    let mut added_seen: HashMap<String, usize> = HashMap::new();
    for i in order {
        let t = if i == base { &stripped } else { &tokenizers[i] };
        let size = t
            .vocab_size
            .unwrap_or_else(|| t.tokenizer.get_vocab_size(false));
        for (tok, id) in t.by_id() {
            if (id as usize) < size && seen.insert(tok.clone()) {
                regular.push(tok);
            }
        }
        for (id, info) in t.added() {
            if id as usize >= size {
                continue;
            }
            match added_seen.get(&info.content) {
                Some(&k) if added[k] != info => warnings.push(format!(
                    "token {:?} is added with different settings by `{}`; using the first model's",
                    info.content, names[i]
                )),
                Some(_) => {}
                None => {
                    added_seen.insert(info.content.clone(), added.len());
                    added.push(info);
                }
            }
        }
    }
    let mut out = base_tok.clone();
    let base_vocab = base_tok.get_vocab(true);
    let new: Vec<AddedToken> = regular
        .into_iter()
        .filter(|t| !added_seen.contains_key(t) && !base_vocab.contains_key(t))
        .map(|t| AddedToken::from(t, false))
        .collect();
    // Adding can only fail on an empty token, which no vocabulary holds.
    let _ = out.add_tokens(new);
    let _ = out.add_tokens(added);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{TokenSpec, TokenizerSpec};

    /// A minimal BPE tokenizer.json: `vocab` in id order, `merges`, added tokens
    /// (content, id, special).
    pub fn tokenizer_json(vocab: &[&str], merges: &[&str], added: &[(&str, u32, bool)]) -> String {
        let v: serde_json::Map<String, Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), Value::from(i)))
            .collect();
        let added: Vec<Value> = added
            .iter()
            .map(|(c, id, special)| {
                serde_json::json!({"id": id, "content": c, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": !special, "special": special})
            })
            .collect();
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": v, "merges": merges}
        })
        .to_string()
    }

    pub fn model(json: &str, vocab_size: Option<usize>) -> ModelTokenizer {
        ModelTokenizer::parse(json, vocab_size, "m").unwrap()
    }

    pub fn spec(source: TokenizerSource, tokens: Vec<(String, TokenSpec)>) -> TokenizerSpec {
        TokenizerSpec {
            key: "tokenizer",
            source,
            tokens,
            pad_to_multiple_of: None,
        }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("m{i}")).collect()
    }

    #[test]
    fn union_appends_new_regular_then_added_tokens_and_maps_every_model() {
        let base = model(
            &tokenizer_json(&["a", "b", "c", "<s>"], &[], &[("<s>", 3, true)]),
            Some(4),
        );
        let ft = model(
            &tokenizer_json(
                &["a", "c", "d", "<s>", "e", "<x>"],
                &[],
                &[("<s>", 3, true), ("<x>", 5, true)],
            ),
            Some(6),
        );
        let v = build(
            &spec(TokenizerSource::Union, vec![]),
            0,
            &[base, ft],
            &names(2),
        )
        .unwrap();
        assert_eq!(v.tokens, ["a", "b", "c", "<s>", "d", "e", "<x>"]);
        assert_eq!(
            v.maps[0],
            [Some(0), Some(1), Some(2), Some(3), None, None, None]
        );
        assert_eq!(
            v.maps[1],
            [Some(0), None, Some(1), Some(3), Some(2), Some(4), Some(5)]
        );
        let added = v.tokenizer.get_added_tokens_decoder();
        assert!(added[&6].special && !added[&4].special, "{added:?}");
        assert_eq!(v.origins(), (vec![4, 3], vec![]));
    }

    #[test]
    fn base_is_stripped_of_tokens_past_its_vocab_size_and_tokens_are_added() {
        let base = model(
            &tokenizer_json(&["a", "b", "ab", "abb"], &["a b", "ab b"], &[]),
            Some(3),
        );
        let ft = model(
            &tokenizer_json(&["a", "b", "ab", "abb"], &["a b", "ab b"], &[]),
            Some(4),
        );
        let extra = vec![(
            "<new>".to_string(),
            TokenSpec {
                source: None,
                force: false,
            },
        )];
        let v = build(
            &spec(TokenizerSource::Base, extra),
            0,
            &[base, ft],
            &names(2),
        )
        .unwrap();
        assert_eq!(v.tokens, ["a", "b", "ab", "<new>"]);
        assert_eq!(v.maps[1], [Some(0), Some(1), Some(2), None]);
        assert_eq!(v.origins().1, ["<new>"]);
        // A stripped tokenizer that is not BPE is refused, naming the model.
        let wl = tokenizer_json(&["a", "b"], &[], &[]).replace("\"BPE\"", "\"WordLevel\"");
        let wl = ModelTokenizer {
            tokenizer: Tokenizer::from_bytes(tokenizer_json(&["a", "b"], &[], &[]).as_bytes())
                .unwrap(),
            json: wl,
            vocab_size: Some(1),
        };
        let Err(e) = build(&spec(TokenizerSource::Base, vec![]), 0, &[wl], &names(1)) else {
            panic!("a WordLevel tokenizer was stripped")
        };
        assert!(
            e.to_string().contains("m0") && e.to_string().contains("BPE"),
            "{e}"
        );
    }
}
