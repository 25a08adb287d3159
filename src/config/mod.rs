//! mergekit's YAML merge config, read and checked.
//!
//! Users bring the exact YAML they give `mergekit-yaml`. This module turns it into a
//! [`MergeConfig`] in two stages: YAML -> `serde_yaml::Value`, then a hand-written walk that
//! checks every key so each refusal names the key or form at fault. Nothing here touches the
//! network or the filesystem; model references are checked for form only (see `reference`, `resolve`).

use serde_yaml::{Mapping, Value};

use crate::dtype::WorkDtype;
use crate::merge::{BaseUse, MethodName, MERGEKIT_METHODS};
use crate::params::{parse_setting, Params};

/// A config that cannot be merged, with the key or form at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("the config is not valid YAML: {0}")]
    Yaml(String),
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
    #[error("config key `{key}` is not supported by mergefleet yet: {hint}")]
    Unsupported { key: String, hint: String },
}

fn key_err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.into(),
        message: message.into(),
    }
}

pub use crate::reference::{ModelPath, ModelRef};
pub use tokenizer::{
    ChatTemplate, TokenRef, TokenSource, TokenSpec, TokenizerSource, TokenizerSpec,
    BUILTIN_TEMPLATES,
};

mod tokenizer;

/// A checked merge config.
#[derive(Debug, Clone)]
pub struct MergeConfig {
    pub method: MethodName,
    /// Required by the methods that take task vectors from it; optional for the others.
    pub base_model: Option<ModelRef>,
    /// The models besides the base, in config order.
    pub models: Vec<ModelRef>,
    /// Each of `models`' own `parameters`.
    pub model_params: Vec<Params>,
    /// Where the base is listed under `models` (its position among all entries), if it is.
    pub base_position: Option<usize>,
    /// The base's own `parameters`, when it is listed.
    pub base_params: Params,
    /// The top-level `parameters`.
    pub parameters: Params,
    pub dtype: Option<WorkDtype>,
    pub out_dtype: Option<WorkDtype>,
    /// Things the user should know but that do not stop the merge (ignored keys, ...).
    pub warnings: Vec<String>,
    /// The YAML exactly as given, written to `mergekit_config.yml`.
    pub source_yaml: String,
    /// The output slices of a `slices:` config (empty for a `models:` one). Their models
    /// are [`Self::all_models`]: the base, then every other source model by first mention.
    pub slices: Vec<Slice>,
    /// `tokenizer_source` or `tokenizer`: the output vocabulary, when it is not simply the
    /// base's tokenizer copied.
    pub tokenizer: Option<TokenizerSpec>,
    /// `chat_template`.
    pub chat_template: Option<ChatTemplate>,
}

/// One output slice: consecutive output layers, each merged from one layer of every source.
#[derive(Debug, Clone)]
pub struct Slice {
    pub sources: Vec<SliceSource>,
    /// The slice's base among its sources (an index into `sources`): its own `base_model`,
    /// else the config's, when the method uses a base.
    pub base: Option<usize>,
    /// The slice's `base_model` (else the config's) among its sources, whatever the method:
    /// a vocabulary merge takes the rows other models lack from it.
    pub vocab_base: Option<usize>,
    pub parameters: Params,
}

/// A source of a slice: layers `layers` of model `model` (an index into
/// [`MergeConfig::all_models`]), with its own `parameters`.
#[derive(Debug, Clone)]
pub struct SliceSource {
    pub model: usize,
    pub layers: std::ops::Range<usize>,
    pub parameters: Params,
}

impl Slice {
    /// Its number of layers (every source spans the same number).
    pub fn len(&self) -> usize {
        self.sources[0].layers.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const TOP_KEYS: &[&str] = &[
    "models",
    "slices",
    "base_model",
    "merge_method",
    "dtype",
    "out_dtype",
    "parameters",
    "tokenizer",
    "tokenizer_source",
    "chat_template",
];

const UNSUPPORTED_KEYS: &[(&str, &str)] = &[(
    "modules",
    "module-wise merges are not implemented; list whole models under `models`",
)];

impl MergeConfig {
    /// Parse and check a config from its YAML text.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let mut value: Value =
            serde_yaml::from_str(text).map_err(|e| ConfigError::Yaml(e.to_string()))?;
        apply_merge_keys(&mut value)?;
        let Value::Mapping(map) = value else {
            return Err(ConfigError::Yaml(
                "the top level must be a mapping with `models`, `base_model` and `merge_method`"
                    .into(),
            ));
        };
        let mut warnings = Vec::new();
        check_top_keys(&map, &mut warnings)?;
        let method = method(&map)?;
        let base_model = base_model(&map, method)?;
        let (list, slices) = match (map.get("models"), map.get("slices")) {
            (Some(_), Some(_)) => {
                return Err(key_err(
                    "slices",
                    "give either `models` or `slices`, not both (mergekit refuses both too)",
                ))
            }
            (None, Some(v)) => {
                let (models, slices) = slice_list(v, method, base_model.as_ref(), &mut warnings)?;
                let n = models.len();
                let list = ModelList {
                    models,
                    params: vec![Vec::new(); n],
                    base_position: None,
                    base_params: Vec::new(),
                };
                (list, slices)
            }
            _ => (
                model_list(&map, method, base_model.as_ref(), &mut warnings)?,
                Vec::new(),
            ),
        };
        let parameters = params_at(map.get("parameters"), "parameters", method, &mut warnings)?;
        let all: Vec<&ModelRef> = base_model.iter().chain(list.models.iter()).collect();
        let tokenizer = tokenizer::tokenizer(&map, &all)?;
        let chat_template = tokenizer::chat_template(&map)?;
        if method == MethodName::ArceeFusion {
            warnings.push(
                "arcee_fusion is not bit for bit: mergekit's own result depends on the CPU (its softmax); mergefleet keeps mergekit's elements but for some whose importance is within rounding of the threshold (docs/numerics.md)".into(),
            );
        }
        Ok(MergeConfig {
            method,
            base_model,
            models: list.models,
            model_params: list.params,
            base_position: list.base_position,
            base_params: list.base_params,
            slices,
            parameters,
            dtype: opt_dtype(map.get("dtype"), "dtype")?,
            out_dtype: opt_dtype(map.get("out_dtype"), "out_dtype")?,
            warnings,
            source_yaml: text.to_string(),
            tokenizer,
            chat_template,
        })
    }

    /// Every model: the base first (when there is one), then the others in config order.
    /// The plan, the job and the card number models in this order.
    pub fn all_models(&self) -> impl Iterator<Item = &ModelRef> {
        self.base_model.iter().chain(self.models.iter())
    }

    /// The parameter levels of model `i` of [`Self::all_models`], highest precedence first:
    /// its own `parameters`, then the top level.
    pub fn levels(&self, i: usize) -> [&Params; 2] {
        let own = match (&self.base_model, i) {
            (Some(_), 0) => &self.base_params,
            (Some(_), i) => &self.model_params[i - 1],
            (None, i) => &self.model_params[i],
        };
        [own, &self.parameters]
    }

    /// The inputs in mergekit's order, as indices into [`Self::all_models`]: the entries
    /// of `models` as listed, then the base when it is not listed (mergekit adds it last).
    pub fn mergekit_order(&self) -> Vec<usize> {
        let has_base = usize::from(self.base_model.is_some());
        let mut order: Vec<usize> = (has_base..has_base + self.models.len()).collect();
        if has_base == 1 {
            order.insert(self.base_position.unwrap_or(order.len()), 0);
        }
        order
    }
}

/// Apply YAML merge keys (`<<: *defaults`) as PyYAML, which mergekit uses, does: keys
/// written in the mapping win over merged ones, earlier merged mappings over later ones.
/// Repeated so a merged mapping's own `<<` is applied too.
fn apply_merge_keys(value: &mut Value) -> Result<(), ConfigError> {
    fn has_merge_key(v: &Value) -> bool {
        match v {
            Value::Mapping(m) => m.contains_key("<<") || m.values().any(has_merge_key),
            Value::Sequence(s) => s.iter().any(has_merge_key),
            Value::Tagged(t) => has_merge_key(&t.value),
            _ => false,
        }
    }
    for _ in 0..64 {
        if !has_merge_key(value) {
            return Ok(());
        }
        value
            .apply_merge()
            .map_err(|e| ConfigError::Yaml(format!("merge key `<<`: {e}")))?;
    }
    Err(ConfigError::Yaml(
        "merge keys `<<` nested more than 64 deep".into(),
    ))
}

pub(crate) fn yaml_key(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

fn same_model(a: &ModelRef, b: &ModelRef) -> bool {
    let norm = |p: &ModelPath| {
        let path = p.path.trim_end_matches('/').trim_start_matches("./");
        (path.to_string(), p.revision.clone())
    };
    norm(&a.model) == norm(&b.model) && a.lora.as_ref().map(norm) == b.lora.as_ref().map(norm)
}

/// A model reference: a string (`path`, `path@rev`, `path+lora`, ...), or mergekit's long
/// form `{model: PATH_OR_{path, revision}, lora: PATH_OR_{path, revision}}`.
fn model_ref(v: &Value, key: &str) -> Result<ModelRef, ConfigError> {
    match v {
        Value::String(s) => ModelRef::parse(s).map_err(|m| key_err(key, m)),
        Value::Mapping(m) => {
            if m.get("override_architecture").is_some_and(|l| !l.is_null()) {
                return Err(ConfigError::Unsupported {
                    key: format!("{key}.override_architecture"),
                    hint: "architecture overrides are not supported".into(),
                });
            }
            let model = match m.get("model").or_else(|| m.get("path")) {
                Some(p) => model_path(p, &format!("{key}.model"))?,
                None => {
                    return Err(key_err(
                        key,
                        "must be a path, Hub id or URL string, or `{model: {path: ...}}`",
                    ))
                }
            };
            let lora = match m.get("lora") {
                None | Some(Value::Null) => None,
                Some(l) => Some(model_path(l, &format!("{key}.lora"))?),
            };
            Ok(ModelRef::from_parts(model, lora))
        }
        _ => Err(key_err(key, "must be a path, Hub id or URL string")),
    }
}

/// A `ModelPath`: `path@rev` or `{path, revision}`.
fn model_path(v: &Value, key: &str) -> Result<ModelPath, ConfigError> {
    match v {
        Value::String(s) => ModelPath::parse(s).map_err(|m| key_err(key, m)),
        Value::Mapping(p) => {
            let path = match p.get("path") {
                Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
                _ => return Err(key_err(key, "needs a `path` string")),
            };
            let revision = match p.get("revision") {
                None | Some(Value::Null) => None,
                Some(Value::String(r)) => Some(r.clone()),
                Some(_) => return Err(key_err(format!("{key}.revision"), "must be a string")),
            };
            Ok(ModelPath { path, revision })
        }
        _ => Err(key_err(key, "must be a path string or `{path, revision}`")),
    }
}

/// Refuse keys we know and do not implement; warn about keys we do not know.
fn check_top_keys(map: &Mapping, warnings: &mut Vec<String>) -> Result<(), ConfigError> {
    let mut unknown = Vec::new();
    for (k, _) in map {
        let key = yaml_key(k);
        if let Some((_, hint)) = UNSUPPORTED_KEYS.iter().find(|(u, _)| *u == key) {
            return Err(ConfigError::Unsupported {
                key,
                hint: (*hint).into(),
            });
        }
        if !TOP_KEYS.contains(&key.as_str()) {
            unknown.push(key);
        }
    }
    if !unknown.is_empty() {
        warnings.push(format!(
            "ignoring unknown config key(s): {}",
            unknown.join(", ")
        ));
    }
    Ok(())
}

/// `merge_method`: a method mergefleet runs; mergekit's others are named as not yet here.
fn method(map: &Mapping) -> Result<MethodName, ConfigError> {
    let ours = || {
        MethodName::ALL
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match map.get("merge_method") {
        None => Err(key_err(
            "merge_method",
            format!("missing; set it to one of {}", ours()),
        )),
        Some(Value::String(m)) => match MethodName::from_name(m) {
            Some(method) => Ok(method),
            None if MERGEKIT_METHODS.contains(&m.as_str()) => Err(ConfigError::Unsupported {
                key: "merge_method".into(),
                hint: format!("`{m}` is not implemented yet; mergefleet runs {}", ours()),
            }),
            None => Err(key_err(
                "merge_method",
                format!("`{m}` is not a mergekit method; mergefleet runs {}", ours()),
            )),
        },
        Some(_) => Err(key_err("merge_method", "must be a string")),
    }
}

/// `base_model`: required by the methods that take task vectors from it.
fn base_model(map: &Mapping, method: MethodName) -> Result<Option<ModelRef>, ConfigError> {
    match map.get("base_model") {
        None | Some(Value::Null) if method.base_use() == BaseUse::Required => Err(key_err(
            "base_model",
            format!(
                "missing; {} needs the base model the others were fine-tuned from",
                method.name()
            ),
        )),
        None | Some(Value::Null) => Ok(None),
        Some(v) => model_ref(v, "base_model").map(Some),
    }
}

/// `models`, read: the entries besides the base with their parameters, and where and with
/// what parameters the base is listed.
struct ModelList {
    models: Vec<ModelRef>,
    params: Vec<Params>,
    base_position: Option<usize>,
    base_params: Params,
}

/// The entries of `models`, in order: duplicates refused, enough inputs for the method.
fn model_list(
    map: &Mapping,
    method: MethodName,
    base_model: Option<&ModelRef>,
    warnings: &mut Vec<String>,
) -> Result<ModelList, ConfigError> {
    let Some(Value::Sequence(entries)) = map.get("models") else {
        return Err(key_err(
            "models",
            "missing or not a list; write `models: [{model: PATH_OR_URL}, ...]`",
        ));
    };
    let mut list = ModelList {
        models: Vec::new(),
        params: Vec::new(),
        base_position: None,
        base_params: Vec::new(),
    };
    for (i, entry) in entries.iter().enumerate() {
        let key = format!("models[{i}]");
        let (m, params) = model_entry(entry, &key, method, warnings)?;
        if base_model.is_some_and(|b| same_model(&m, b)) {
            if list.base_position.is_some() {
                return Err(key_err(
                    &key,
                    format!("the base model `{m}` is listed twice"),
                ));
            }
            list.base_position = Some(i);
            list.base_params = params;
            continue;
        }
        if list.models.iter().any(|x| same_model(x, &m)) {
            return Err(key_err(
                &key,
                format!(
                    "model `{m}` is listed twice; mergekit would silently merge one model \
                     fewer than written. Remove the duplicate"
                ),
            ));
        }
        list.models.push(m);
        list.params.push(params);
    }
    let apart = method.base_use().apart();
    if let (true, Some(_), Some(b)) = (apart, list.base_position, base_model) {
        warnings.push(format!(
            "the base model `{b}` is also listed under `models`; {} uses it as the base only",
            method.name()
        ));
    }
    let inputs = list.models.len() + usize::from(!apart && base_model.is_some());
    let besides = if apart { " besides the base" } else { "" };
    if let Some(max) = method.max_inputs().filter(|m| inputs > *m) {
        let how = if max == method.min_inputs() {
            "exactly"
        } else {
            "at most"
        };
        return Err(key_err(
            "models",
            format!(
                "{} takes {how} {max} model{}{besides}, found {inputs}",
                method.name(),
                if max == 1 { "" } else { "s" }
            ),
        ));
    }
    if inputs < method.min_inputs() {
        return Err(key_err(
            "models",
            format!(
                "{} needs at least {} model{}{besides}, found {inputs}",
                method.name(),
                method.min_inputs(),
                if method.min_inputs() == 1 { "" } else { "s" },
            ),
        ));
    }
    Ok(list)
}

/// One entry of `models`: `{model: REF, parameters: {...}}` or a bare `REF`. Unknown keys
/// are noted, not refused.
fn model_entry(
    entry: &Value,
    key: &str,
    method: MethodName,
    warnings: &mut Vec<String>,
) -> Result<(ModelRef, Params), ConfigError> {
    match entry {
        Value::Mapping(e) => {
            for (k, _) in e {
                let k = yaml_key(k);
                if k != "model" && k != "parameters" {
                    warnings.push(format!("ignoring unknown key `{key}.{k}`"));
                }
            }
            let m = e
                .get("model")
                .ok_or_else(|| key_err(key, "has no `model`; write `- model: PATH_OR_URL`"))?;
            let m = model_ref(m, &format!("{key}.model"))?;
            let params = params_at(
                e.get("parameters"),
                &format!("{key}.parameters"),
                method,
                warnings,
            )?;
            Ok((m, params))
        }
        Value::String(_) => Ok((model_ref(entry, key)?, Vec::new())),
        _ => Err(key_err(key, "must be `{model: PATH_OR_URL}`")),
    }
}

/// `slices`, read: the models they name (besides the base, by first mention) and each
/// slice's sources. Checked as mergekit checks each slice: sources spanning the same number
/// of layers, no model twice, the base among the sources when the method uses one, and the
/// method's number of inputs.
fn slice_list(
    v: &Value,
    method: MethodName,
    base_model: Option<&ModelRef>,
    warnings: &mut Vec<String>,
) -> Result<(Vec<ModelRef>, Vec<Slice>), ConfigError> {
    let Value::Sequence(entries) = v else {
        return Err(key_err(
            "slices",
            "must be a list of `{sources: [{model: PATH_OR_URL, layer_range: [A, B]}, ...]}`",
        ));
    };
    if entries.is_empty() {
        return Err(key_err("slices", "is empty: list at least one slice"));
    }
    let mut models: Vec<ModelRef> = Vec::new();
    // The index in `MergeConfig::all_models` of a model, added when first seen.
    let has_base = usize::from(base_model.is_some());
    let mut index_of = |m: &ModelRef| -> usize {
        if base_model.is_some_and(|b| same_model(m, b)) {
            return 0;
        }
        match models.iter().position(|x| same_model(x, m)) {
            Some(i) => i + has_base,
            None => {
                models.push(m.clone());
                models.len() - 1 + has_base
            }
        }
    };
    let mut slices = Vec::with_capacity(entries.len());
    for (si, entry) in entries.iter().enumerate() {
        let key = format!("slices[{si}]");
        let Value::Mapping(e) = entry else {
            return Err(key_err(&key, "must be a mapping with `sources`"));
        };
        for (k, v) in e {
            match yaml_key(k).as_str() {
                "sources" | "base_model" | "parameters" => {}
                "residual_weight" if !v.is_null() => warnings.push(format!(
                    "ignoring `{key}.residual_weight`: mergekit 0.1.5 reads it but never uses it"
                )),
                "residual_weight" => {}
                other => warnings.push(format!("ignoring unknown key `{key}.{other}`")),
            }
        }
        let Some(Value::Sequence(srcs)) = e.get("sources") else {
            return Err(key_err(
                &key,
                "has no `sources` list; write `sources: [{model: PATH_OR_URL, layer_range: [A, B]}]`",
            ));
        };
        if srcs.is_empty() {
            return Err(key_err(format!("{key}.sources"), "is empty"));
        }
        let mut sources: Vec<SliceSource> = Vec::with_capacity(srcs.len());
        let mut refs: Vec<ModelRef> = Vec::with_capacity(srcs.len());
        for (j, src) in srcs.iter().enumerate() {
            let skey = format!("{key}.sources[{j}]");
            let Value::Mapping(sm) = src else {
                return Err(key_err(
                    &skey,
                    "must be `{model: PATH_OR_URL, layer_range: [A, B]}`",
                ));
            };
            for (k, _) in sm {
                let k = yaml_key(k);
                if !matches!(k.as_str(), "model" | "layer_range" | "parameters") {
                    warnings.push(format!("ignoring unknown key `{skey}.{k}`"));
                }
            }
            let m = sm
                .get("model")
                .ok_or_else(|| key_err(&skey, "has no `model`"))?;
            let m = model_ref(m, &format!("{skey}.model"))?;
            if refs.iter().any(|r| same_model(r, &m)) {
                return Err(key_err(
                    &skey,
                    format!("model `{m}` is a source of this slice twice; mergekit refuses duplicate merge inputs"),
                ));
            }
            let layers = layer_range(sm.get("layer_range"), &format!("{skey}.layer_range"))?;
            if let Some(first) = sources.first() {
                if layers.len() != first.layers.len() {
                    return Err(key_err(
                        &key,
                        format!(
                            "its sources span different numbers of layers ({} and {}); every source of a slice must give the same number",
                            first.layers.len(),
                            layers.len()
                        ),
                    ));
                }
            }
            let parameters = params_at(
                sm.get("parameters"),
                &format!("{skey}.parameters"),
                method,
                warnings,
            )?;
            sources.push(SliceSource {
                model: index_of(&m),
                layers,
                parameters,
            });
            refs.push(m);
        }
        let slice_base = match e.get("base_model") {
            None | Some(Value::Null) => base_model.cloned(),
            Some(v) => Some(model_ref(v, &format!("{key}.base_model"))?),
        };
        // A method that takes the base as one more input ignores it in a slice (mergekit
        // adds it only to a `models:` list).
        let base = match (method.base_use(), &slice_base) {
            (BaseUse::Input, _) | (BaseUse::Optional, None) => None,
            (BaseUse::Required, None) => {
                return Err(key_err(
                    &key,
                    format!("{} needs a base model: set `base_model` (at the top or in the slice)", method.name()),
                ))
            }
            (_, Some(b)) => match refs.iter().position(|r| same_model(r, b)) {
                Some(p) => Some(p),
                None => {
                    return Err(key_err(
                        &key,
                        format!("the base model `{b}` is not one of its sources; mergekit needs the base among a slice's inputs"),
                    ))
                }
            },
        };
        let vocab_base = slice_base
            .as_ref()
            .and_then(|b| refs.iter().position(|r| same_model(r, b)));
        let inputs = sources.len();
        let counted = inputs - usize::from(base.is_some());
        if let Some(max) = method.max_inputs().filter(|m| counted > *m) {
            return Err(key_err(
                &key,
                format!(
                    "{} takes at most {max} input{} per slice{}, found {counted}",
                    method.name(),
                    if max == 1 { "" } else { "s" },
                    besides(method)
                ),
            ));
        }
        if counted < method.min_inputs() {
            return Err(key_err(
                &key,
                format!(
                    "{} needs at least {} input{} per slice{}, found {counted}",
                    method.name(),
                    method.min_inputs(),
                    if method.min_inputs() == 1 { "" } else { "s" },
                    besides(method)
                ),
            ));
        }
        let parameters = params_at(
            e.get("parameters"),
            &format!("{key}.parameters"),
            method,
            warnings,
        )?;
        slices.push(Slice {
            sources,
            base,
            vocab_base,
            parameters,
        });
    }
    Ok((models, slices))
}

fn besides(method: MethodName) -> &'static str {
    if method.base_use().apart() {
        " besides the base"
    } else {
        ""
    }
}

/// `layer_range: [A, B]`: layers A to B-1.
fn layer_range(v: Option<&Value>, key: &str) -> Result<std::ops::Range<usize>, ConfigError> {
    let bad = || {
        key_err(
            key,
            "must be `[A, B]`: two whole numbers, A <= B, the layers A to B-1",
        )
    };
    let Some(Value::Sequence(r)) = v else {
        return Err(bad());
    };
    let n = |v: &Value| v.as_u64().map(|n| n as usize);
    match r.as_slice() {
        [a, b] => match (n(a), n(b)) {
            (Some(a), Some(b)) if a <= b => Ok(a..b),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// A `parameters` mapping at `key`: each setting read (its values are checked against the
/// parameter's type per tensor, in the plan); names the method does not declare warned
/// about, as mergekit ignores them.
fn params_at(
    v: Option<&Value>,
    key: &str,
    method: MethodName,
    warnings: &mut Vec<String>,
) -> Result<Params, ConfigError> {
    let p = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Mapping(p)) => p,
        Some(_) => return Err(key_err(key, "must be a mapping")),
    };
    let mut out = Vec::with_capacity(p.len());
    for (k, v) in p {
        let name = yaml_key(k);
        let full = format!("{key}.{name}");
        if !method.params().iter().any(|d| d.name == name) {
            let known: Vec<&str> = method.params().iter().map(|d| d.name).collect();
            warnings.push(format!(
                "{} ignores the parameter `{full}` (its parameters: {})",
                method.name(),
                known.join(", ")
            ));
            continue;
        }
        let setting = parse_setting(v, &full).map_err(|m| key_err(&full, m))?;
        out.push((name, setting));
    }
    Ok(out)
}

fn opt_dtype(v: Option<&Value>, key: &str) -> Result<Option<WorkDtype>, ConfigError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => WorkDtype::from_name(s).map(Some).ok_or_else(|| {
            key_err(
                key,
                format!("`{s}` is not supported; use bfloat16, float16, float32 or float64"),
            )
        }),
        Some(_) => Err(key_err(
            key,
            "must be a string: bfloat16, float16, float32 or float64",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str =
        "models:\n  - model: a\n  - model: b\nmerge_method: model_stock\nbase_model: base\n";

    fn err(yaml: &str) -> String {
        MergeConfig::from_yaml(yaml).unwrap_err().to_string()
    }

    /// model_stock's filter_wise for a tensor, resolved as the plan resolves it.
    fn filter_wise(c: &MergeConfig, tensor: &str) -> Result<bool, String> {
        let def = &MethodName::ModelStock.params()[0];
        crate::params::resolve(def, &[&c.parameters], tensor, 0.0, "")
            .map(|(v, _)| v != 0.0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_config() {
        let c = MergeConfig::from_yaml(OK).unwrap();
        assert_eq!(c.base_model.as_ref().unwrap().text, "base");
        assert_eq!(
            c.models,
            vec![ModelRef::parse("a").unwrap(), ModelRef::parse("b").unwrap()]
        );
        assert!(!filter_wise(&c, "x").unwrap());
        assert!(c.dtype.is_none() && c.warnings.is_empty());
    }

    #[test]
    fn dtypes_with_torch_prefix() {
        let c = MergeConfig::from_yaml(&format!("{OK}dtype: torch.bfloat16\nout_dtype: float16\n"))
            .unwrap();
        assert_eq!(c.dtype, Some(WorkDtype::BF16));
        assert_eq!(c.out_dtype, Some(WorkDtype::F16));
        assert!(err(&format!("{OK}dtype: int8\n")).contains("`dtype`"));
    }

    #[test]
    fn filter_wise_forms() {
        for (v, want) in [("true", true), ("false", false), ("1", true), ("0", false)] {
            let c =
                MergeConfig::from_yaml(&format!("{OK}parameters: {{filter_wise: {v}}}\n")).unwrap();
            assert_eq!(filter_wise(&c, "x").unwrap(), want);
        }
        let c = MergeConfig::from_yaml(&format!(
            "{OK}parameters:\n  filter_wise:\n    - filter: mlp\n      value: true\n    - value: false\n"
        ))
        .unwrap();
        assert!(filter_wise(&c, "model.layers.0.mlp.up_proj.weight").unwrap());
        assert!(!filter_wise(&c, "model.layers.0.self_attn.q_proj.weight").unwrap());
        let c = MergeConfig::from_yaml(&format!(
            "{OK}parameters:\n  filter_wise:\n    - filter: mlp\n      value: true\n"
        ))
        .unwrap();
        assert!(
            !filter_wise(&c, "attn").unwrap(),
            "no match gives the default"
        );
        let c =
            MergeConfig::from_yaml(&format!("{OK}parameters: {{filter_wise: maybe}}\n")).unwrap();
        assert!(filter_wise(&c, "x").unwrap_err().contains("filter_wise"));
    }

    #[test]
    fn per_model_parameters_warn() {
        let c = MergeConfig::from_yaml(
            "models:\n  - model: a\n    parameters: {weight: 0.5}\n  - model: b\nmerge_method: model_stock\nbase_model: base\n",
        )
        .unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert!(
            c.warnings[0].contains("models[0].parameters.weight"),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn long_model_form() {
        let c = MergeConfig::from_yaml(
            "models:\n  - model: {model: {path: a}}\n  - model: b\nmerge_method: model_stock\nbase_model: {model: {path: base}}\n",
        )
        .unwrap();
        assert_eq!(c.models[0].text, "a");
        assert_eq!(c.base_model.as_ref().unwrap().text, "base");
        let c = MergeConfig::from_yaml("models:\n  - model: {model: {path: a, revision: v1}, lora: l@r}\n  - model: b@v2\nmerge_method: model_stock\nbase_model: x\n").unwrap();
        assert_eq!(c.models[0].text, "a@v1+l@r");
        assert_eq!(
            c.models[0].lora.as_ref().unwrap().revision.as_deref(),
            Some("r")
        );
        assert_eq!(c.models[1].model.revision.as_deref(), Some("v2"));
        assert!(err("models:\n  - model: {model: {path: a}, override_architecture: X}\n  - model: b\nmerge_method: model_stock\nbase_model: x\n").contains("override_architecture"));
    }

    #[test]
    fn refusals_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("models: [", "not valid YAML"),
            ("- 1\n", "top level"),
            ("models:\n  - model: a\n  - model: b\nbase_model: x\n", "merge_method"),
            ("models:\n  - model: a\n  - model: b\nmerge_method: slerp\nbase_model: x\n", "exactly 1 model besides the base"),
            ("models:\n  - model: a\n  - model: b\nmerge_method: avg\nbase_model: x\n", "not a mergekit method"),
            ("models:\n  - model: a\nmerge_method: task_arithmetic\n", "base_model"),
            ("models:\n  - model: x\nmerge_method: task_arithmetic\nbase_model: x\n", "at least 1 model besides"),
            ("models:\n  - model: a\n    parameters: {weight: [{filter: a}]}\nmerge_method: linear\n", "no `value`"),
            ("models:\n  - model: a\n  - model: b\nmerge_method: model_stock\n", "base_model"),
            ("models:\n  - model: a\nmerge_method: model_stock\nbase_model: x\n", "at least 2 models"),
            ("models:\n  - model: a\n  - model: x\nmerge_method: model_stock\nbase_model: x\n", "at least 2 models"),
            ("models:\n  - model: a\n  - model: a/\n  - model: b\nmerge_method: model_stock\nbase_model: x\n", "listed twice"),
            ("merge_method: model_stock\nbase_model: x\n", "`models`"),
            ("models:\n  - model: a@main@x\n  - model: b\nmerge_method: model_stock\nbase_model: x\n", "more than one `@`"),
            ("models:\n  - model: a+l+m\n  - model: b\nmerge_method: model_stock\nbase_model: x\n", "more than one `+`"),
            ("models:\n  - model: a@v1\n  - model: ./a@v1\n  - model: b\nmerge_method: model_stock\nbase_model: x\n", "listed twice"),
            ("models:\n  - parameters: {}\n  - model: b\nmerge_method: model_stock\nbase_model: x\n", "models[0]"),
        ];
        for (yaml, want) in cases {
            let e = err(yaml);
            assert!(e.contains(want), "{yaml:?}: {e}");
        }
        let e = err(&format!("{OK}modules: x\n"));
        assert!(
            e.contains("`modules`") && e.contains("not supported"),
            "{e}"
        );
    }

    #[test]
    fn vocabulary_keys_are_read_and_checked() {
        let c = MergeConfig::from_yaml(&format!(
            "{OK}tokenizer:\n  source: a\n  pad_to_multiple_of: 64\n  tokens:\n    <|im_start|>: {{source: base}}\n    <|im_end|>: {{source: {{kind: model_token, model: a, token: '</s>'}}, force: true}}\n    <x>: {{source: {{kind: zero}}}}\n    <y>: {{source: {{kind: model_token, model: base, token_id: 3}}}}\nchat_template: chatml\n"
        ))
        .unwrap();
        let t = c.tokenizer.unwrap();
        assert_eq!(t.source, TokenizerSource::Model(1));
        assert_eq!(t.pad_to_multiple_of, Some(64));
        let names: Vec<&str> = t.tokens.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["<|im_start|>", "<|im_end|>", "<x>", "<y>"]);
        assert_eq!(t.tokens[0].1.source, Some(TokenSource::Model(0)));
        assert_eq!(
            t.tokens[1].1,
            TokenSpec {
                source: Some(TokenSource::ModelToken {
                    model: 1,
                    token: TokenRef::Text("</s>".into())
                }),
                force: true
            }
        );
        assert_eq!(t.tokens[2].1.source, Some(TokenSource::Zero));
        assert_eq!(
            c.chat_template,
            Some(ChatTemplate::Builtin("chatml".into()))
        );
        let c = MergeConfig::from_yaml(&format!(
            "{OK}tokenizer_source: union\nchat_template: auto\n"
        ))
        .unwrap();
        assert_eq!(c.tokenizer.unwrap().source, TokenizerSource::Union);
        assert_eq!(c.chat_template, Some(ChatTemplate::Auto));
        let cases = [
            ("tokenizer_source: nope", "`tokenizer_source`"),
            ("tokenizer_source: base\ntokenizer: {source: base}", "`tokenizer`"),
            ("tokenizer: {sauce: base}", "`tokenizer.sauce`"),
            ("tokenizer: {pad_to_multiple_of: 0}", "`tokenizer.pad_to_multiple_of`"),
            ("tokenizer: {tokens: {a: {source: other}}}", "`tokenizer.tokens.a.source`"),
            ("tokenizer: {tokens: {a: {source: {kind: model_token, model: a}}}}", "`tokenizer.tokens.a.source`"),
            ("tokenizer: {tokens: {a: {source: {kind: model_token, model: a, token: b, token_id: 1}}}}", "not both"),
            ("tokenizer: {tokens: {a: {source: {kind: one}}}}", "`tokenizer.tokens.a.source.kind`"),
            ("tokenizer: {tokens: {a: {force: true}}}", "`tokenizer.tokens.a.force`"),
            ("chat_template: chatm", "`chat_template`"),
        ];
        for (yaml, want) in cases {
            let e = err(&format!("{OK}{yaml}\n"));
            assert!(e.contains(want), "{yaml:?}: {e}");
        }
    }

    #[test]
    fn slices_are_read_and_checked_per_slice() {
        let c = MergeConfig::from_yaml(
            "slices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n      - {model: base, layer_range: [1, 3], parameters: {weight: 0.3}}\n  - sources:\n      - {model: b, layer_range: [2, 4]}\n      - {model: a, layer_range: [0, 2]}\n    base_model: b\n    parameters: {weight: 0.5}\nmerge_method: ties\nbase_model: base\n",
        )
        .unwrap();
        let texts: Vec<&str> = c.all_models().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["base", "a", "b"]);
        assert_eq!(c.slices.len(), 2);
        let (s0, s1) = (&c.slices[0], &c.slices[1]);
        assert_eq!((s0.sources[0].model, s0.sources[1].model), (1, 0));
        assert_eq!(s0.sources[1].layers, 1..3);
        assert_eq!((s0.base, s1.base, s1.len()), (Some(1), Some(0), 2));
        assert_eq!(s0.sources[1].parameters.len(), 1);
        assert_eq!(s1.parameters.len(), 1);
        let src = |a: &str, b: &str| format!("      - {{model: {a}, layer_range: {b}}}\n");
        let cases = [
            (format!("slices:\n  - sources:\n{}{}merge_method: ties\nbase_model: a\n", src("a", "[0, 2]"), src("b", "[0, 3]")), "slices[0]", "different numbers of layers"),
            (format!("slices:\n  - sources:\n{}{}merge_method: ties\nbase_model: c\n", src("a", "[0, 2]"), src("b", "[0, 2]")), "slices[0]", "not one of its sources"),
            (format!("slices:\n  - sources:\n{}{}  - sources:\n{}{}merge_method: ties\nbase_model: a\n", src("a", "[0, 1]"), src("b", "[0, 1]"), src("a", "[1, 2]"), src("a", "[2, 3]")), "slices[1]", "twice"),
            (format!("slices:\n  - sources:\n{}{}{}merge_method: nearswap\nbase_model: a\nparameters: {{t: 0.1}}\n", src("a", "[0, 1]"), src("b", "[0, 1]"), src("c", "[0, 1]")), "slices[0]", "at most 1"),
            (format!("slices:\n  - sources:\n{}merge_method: ties\n", src("a", "[0, 1]")), "base_model", "missing"),
            (format!("slices:\n  - sources:\n{}merge_method: linear\n", src("a", "[2, 1]")), "layer_range", "A <= B"),
            (format!("models: [a]\nslices:\n  - sources:\n{}merge_method: linear\n", src("a", "[0, 1]")), "slices", "not both"),
        ];
        for (yaml, key, words) in &cases {
            let e = err(yaml);
            assert!(e.contains(key) && e.contains(words), "{yaml}: {e}");
        }
    }

    #[test]
    fn anchors_aliases_and_merge_keys() {
        // PyYAML applies merge keys: the merged filter_wise must count, not warn about `<<`.
        let c = MergeConfig::from_yaml(
            "defaults: &d {filter_wise: true}\nmodels:\n  - model: &a a\n  - model: b\nmerge_method: model_stock\nbase_model: base\nparameters: {<<: *d}\n",
        )
        .unwrap();
        assert!(filter_wise(&c, "x").unwrap());
        assert!(
            c.warnings.iter().all(|w| !w.contains("<<")),
            "{:?}",
            c.warnings
        );
        // Explicit keys win over merged ones; earlier merged mappings over later ones.
        let c = MergeConfig::from_yaml(
            "x: &t {filter_wise: true}\ny: &f {filter_wise: false}\nmodels: [{model: a}, {model: b}]\nmerge_method: model_stock\nbase_model: base\nparameters: {<<: [*f, *t]}\n",
        )
        .unwrap();
        assert!(!filter_wise(&c, "x").unwrap());
        let c = MergeConfig::from_yaml(
            "x: &t {filter_wise: true}\nmodels: [{model: a}, {model: b}]\nmerge_method: model_stock\nbase_model: base\nparameters: {<<: *t, filter_wise: false}\n",
        )
        .unwrap();
        assert!(!filter_wise(&c, "x").unwrap());
        // A merged mapping that itself merges another.
        let c = MergeConfig::from_yaml(
            "x: &inner {filter_wise: on}\ny: &outer {<<: *inner}\nmodels: [{model: a}, {model: b}]\nmerge_method: model_stock\nbase_model: base\nparameters: {<<: *outer}\n",
        )
        .unwrap();
        assert!(filter_wise(&c, "x").unwrap());
        // Aliases of whole entries and of model paths.
        let c = MergeConfig::from_yaml(
            "models:\n  - &first {model: a}\n  - model: b\nmerge_method: model_stock\nbase_model: &b base\n",
        )
        .unwrap();
        assert_eq!(c.models[0].text, "a");
        assert!(err(
            "models: [{model: a}, {model: b}]\nmerge_method: model_stock\nbase_model: *nope\n"
        )
        .contains("not valid YAML"));
        assert!(err("models: [{model: a}, {model: b}]\nmerge_method: model_stock\nbase_model: base\nparameters: {<<: 3}\n")
            .contains("<<"));
    }

    #[test]
    fn unknown_keys_warn() {
        let c = MergeConfig::from_yaml(&format!("{OK}name: foo\n")).unwrap();
        assert!(c.warnings[0].contains("name"));
        let c = MergeConfig::from_yaml(&format!("{OK}parameters: {{normalize: true}}\n")).unwrap();
        assert!(c.warnings[0].contains("parameters.normalize"));
    }

    #[test]
    fn base_listed_among_models_is_tolerated() {
        let c = MergeConfig::from_yaml(
            "models:\n  - model: base\n  - model: a\n  - model: b\nmerge_method: model_stock\nbase_model: base\n",
        )
        .unwrap();
        assert_eq!(c.models.len(), 2);
        assert!(c.warnings[0].contains("also listed"));
    }
}
