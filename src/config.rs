//! mergekit's YAML merge config, read and checked.
//!
//! Users bring the exact YAML they give `mergekit-yaml`. This module turns it into a
//! [`MergeConfig`] in two stages: YAML -> `serde_yaml::Value`, then a hand-written walk that
//! checks every key so each refusal names the key or form at fault. Nothing here touches the
//! network or the filesystem; model references are checked for form only (see `reference`, `resolve`).

use serde_yaml::{Mapping, Value};

use crate::dtype::WorkDtype;

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

/// A parameter that may differ per tensor: mergekit's scalar-or-filter-list form.
#[derive(Debug, Clone, PartialEq)]
pub enum PerTensor<T> {
    Scalar(T),
    /// `(filter, value)`: the first entry whose filter is `None`, `*` or a substring of the
    /// tensor name wins; no match gives the method's default.
    Filtered(Vec<(Option<String>, T)>),
}

impl<T: Copy> PerTensor<T> {
    /// The value for one tensor, `default` when no filter matches.
    pub fn for_tensor(&self, name: &str, default: T) -> T {
        match self {
            PerTensor::Scalar(v) => *v,
            PerTensor::Filtered(entries) => entries
                .iter()
                .find(|(f, _)| match f.as_deref() {
                    None | Some("*") => true,
                    Some(f) => name.contains(f),
                })
                .map(|(_, v)| *v)
                .unwrap_or(default),
        }
    }
}

/// A checked model_stock merge config.
#[derive(Debug, Clone)]
pub struct MergeConfig {
    pub base_model: ModelRef,
    /// The fine-tunes in config order (the base is never among them).
    pub models: Vec<ModelRef>,
    pub filter_wise: PerTensor<bool>,
    pub dtype: Option<WorkDtype>,
    pub out_dtype: Option<WorkDtype>,
    /// Things the user should know but that do not stop the merge (ignored keys, ...).
    pub warnings: Vec<String>,
    /// The YAML exactly as given, written to `mergekit_config.yml`.
    pub source_yaml: String,
}

const TOP_KEYS: &[&str] = &[
    "models",
    "base_model",
    "merge_method",
    "dtype",
    "out_dtype",
    "parameters",
];

const UNSUPPORTED_KEYS: &[(&str, &str)] = &[
    ("slices", "slice-wise merges are not implemented; list whole models under `models`"),
    ("modules", "module-wise merges are not implemented; list whole models under `models`"),
    ("tokenizer", "tokenizer merging is not implemented; remove the key to copy the base model's tokenizer"),
    ("tokenizer_source", "tokenizer merging is not implemented; remove the key to copy the base model's tokenizer"),
    ("chat_template", "chat templates are not implemented; remove the key and edit tokenizer_config.json after the merge"),
];

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
        check_method(&map)?;
        let base_model = base_model(&map)?;
        let models = fine_tunes(&map, &base_model, &mut warnings)?;
        let filter_wise = method_parameters(&map, &mut warnings)?;
        Ok(MergeConfig {
            base_model,
            models,
            filter_wise,
            dtype: opt_dtype(map.get("dtype"), "dtype")?,
            out_dtype: opt_dtype(map.get("out_dtype"), "out_dtype")?,
            warnings,
            source_yaml: text.to_string(),
        })
    }

    /// Every model, base first, then the fine-tunes in config order.
    pub fn all_models(&self) -> impl Iterator<Item = &ModelRef> {
        std::iter::once(&self.base_model).chain(self.models.iter())
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

fn yaml_key(k: &Value) -> String {
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

fn per_tensor_bool(v: &Value, key: &str) -> Result<PerTensor<bool>, ConfigError> {
    match v {
        Value::Sequence(entries) => {
            let mut out = Vec::new();
            for (i, e) in entries.iter().enumerate() {
                let Value::Mapping(m) = e else {
                    return Err(key_err(
                        format!("{key}[{i}]"),
                        "is a plain value; a list here must hold `{filter: SUBSTRING, value: BOOL}` \
                         entries (gradients of numbers make no sense for a boolean)",
                    ));
                };
                let filter = match m.get("filter") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(_) => {
                        return Err(key_err(format!("{key}[{i}].filter"), "must be a string"))
                    }
                };
                let value = m
                    .get("value")
                    .ok_or_else(|| key_err(format!("{key}[{i}]"), "has no `value`"))?;
                out.push((filter, bool_value(value, &format!("{key}[{i}].value"))?));
            }
            Ok(PerTensor::Filtered(out))
        }
        other => Ok(PerTensor::Scalar(bool_value(other, key)?)),
    }
}

fn bool_value(v: &Value, key: &str) -> Result<bool, ConfigError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Number(n) if n.as_f64() == Some(1.0) => Ok(true),
        Value::Number(n) if n.as_f64() == Some(0.0) => Ok(false),
        // YAML 1.1 booleans, which PyYAML (and so mergekit) reads as booleans.
        Value::String(s)
            if ["true", "yes", "on"]
                .iter()
                .any(|b| s.eq_ignore_ascii_case(b)) =>
        {
            Ok(true)
        }
        Value::String(s)
            if ["false", "no", "off"]
                .iter()
                .any(|b| s.eq_ignore_ascii_case(b)) =>
        {
            Ok(false)
        }
        Value::Sequence(_) => Err(key_err(
            key,
            "is a list (a gradient); filter_wise takes true or false",
        )),
        _ => Err(key_err(key, "must be true or false (or 1 / 0)")),
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

/// `merge_method` must be `model_stock`.
fn check_method(map: &Mapping) -> Result<(), ConfigError> {
    match map.get("merge_method") {
        None => Err(key_err("merge_method", "missing; set it to `model_stock`")),
        Some(Value::String(m)) if m == "model_stock" => Ok(()),
        Some(Value::String(m)) => Err(ConfigError::Unsupported {
            key: "merge_method".into(),
            hint: format!("`{m}` is not implemented; only `model_stock` is"),
        }),
        Some(_) => Err(key_err("merge_method", "must be a string (`model_stock`)")),
    }
}

/// The required `base_model`.
fn base_model(map: &Mapping) -> Result<ModelRef, ConfigError> {
    match map.get("base_model") {
        None | Some(Value::Null) => Err(key_err(
            "base_model",
            "missing; model_stock needs the base model the fine-tunes started from",
        )),
        Some(v) => model_ref(v, "base_model"),
    }
}

/// The fine-tunes under `models`, in order: the base skipped (with a warning), duplicates
/// refused, at least two, per-model parameters ignored (with a warning).
fn fine_tunes(
    map: &Mapping,
    base_model: &ModelRef,
    warnings: &mut Vec<String>,
) -> Result<Vec<ModelRef>, ConfigError> {
    let Some(Value::Sequence(entries)) = map.get("models") else {
        return Err(key_err(
            "models",
            "missing or not a list; write `models: [{model: PATH_OR_URL}, ...]`",
        ));
    };
    let mut models: Vec<ModelRef> = Vec::new();
    let mut ignored_params = Vec::new();
    let mut base_listed = false;
    for (i, entry) in entries.iter().enumerate() {
        let key = format!("models[{i}]");
        let m = model_entry(entry, &key, warnings, &mut ignored_params)?;
        if same_model(&m, base_model) {
            base_listed = true;
            continue;
        }
        if models.iter().any(|x| same_model(x, &m)) {
            return Err(key_err(
                &key,
                format!(
                    "model `{m}` is listed twice; mergekit would silently merge one model \
                     fewer than written. Remove the duplicate"
                ),
            ));
        }
        models.push(m);
    }
    if base_listed {
        warnings.push(format!(
            "the base model `{base_model}` is also listed under `models`; it is used as the base only"
        ));
    }
    if models.len() < 2 {
        return Err(key_err(
            "models",
            format!(
                "model_stock needs at least two models besides the base, found {}",
                models.len()
            ),
        ));
    }
    if !ignored_params.is_empty() {
        warnings.push(format!(
            "model_stock ignores per-model parameters: {}",
            ignored_params.join(", ")
        ));
    }
    Ok(models)
}

/// One entry of `models`: `{model: REF, parameters: {...}}` or a bare `REF`. Unknown keys
/// and per-model parameters (model_stock has none) are noted, not refused.
fn model_entry(
    entry: &Value,
    key: &str,
    warnings: &mut Vec<String>,
    ignored_params: &mut Vec<String>,
) -> Result<ModelRef, ConfigError> {
    let (m, params) = match entry {
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
            (model_ref(m, &format!("{key}.model"))?, e.get("parameters"))
        }
        Value::String(_) => (model_ref(entry, key)?, None),
        _ => return Err(key_err(key, "must be `{model: PATH_OR_URL}`")),
    };
    if let Some(Value::Mapping(p)) = params {
        for (k, _) in p {
            ignored_params.push(format!("{key}.parameters.{}", yaml_key(k)));
        }
    } else if let Some(p) = params {
        if !p.is_null() {
            return Err(key_err(format!("{key}.parameters"), "must be a mapping"));
        }
    }
    Ok(m)
}

/// The method's `parameters`: `filter_wise`, and warnings for anything else.
fn method_parameters(
    map: &Mapping,
    warnings: &mut Vec<String>,
) -> Result<PerTensor<bool>, ConfigError> {
    let mut filter_wise = PerTensor::Scalar(false);
    match map.get("parameters") {
        None | Some(Value::Null) => {}
        Some(Value::Mapping(p)) => {
            for (k, v) in p {
                let k = yaml_key(k);
                if k == "filter_wise" {
                    filter_wise = per_tensor_bool(v, "parameters.filter_wise")?;
                } else {
                    warnings.push(format!(
                        "model_stock ignores the parameter `parameters.{k}` (its only parameter is `filter_wise`)"
                    ));
                }
            }
        }
        Some(_) => return Err(key_err("parameters", "must be a mapping")),
    }
    Ok(filter_wise)
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

    #[test]
    fn minimal_config() {
        let c = MergeConfig::from_yaml(OK).unwrap();
        assert_eq!(c.base_model.text, "base");
        assert_eq!(
            c.models,
            vec![ModelRef::parse("a").unwrap(), ModelRef::parse("b").unwrap()]
        );
        assert_eq!(c.filter_wise, PerTensor::Scalar(false));
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
            assert_eq!(c.filter_wise.for_tensor("x", !want), want);
        }
        let c = MergeConfig::from_yaml(&format!(
            "{OK}parameters:\n  filter_wise:\n    - filter: mlp\n      value: true\n    - value: false\n"
        ))
        .unwrap();
        assert!(c
            .filter_wise
            .for_tensor("model.layers.0.mlp.up_proj.weight", false));
        assert!(!c
            .filter_wise
            .for_tensor("model.layers.0.self_attn.q_proj.weight", true));
        let c = MergeConfig::from_yaml(&format!(
            "{OK}parameters:\n  filter_wise:\n    - filter: mlp\n      value: true\n"
        ))
        .unwrap();
        assert!(
            !c.filter_wise.for_tensor("attn", false),
            "no match gives the default"
        );
        assert!(
            err(&format!("{OK}parameters: {{filter_wise: [0.1, 0.5]}}\n")).contains("gradient")
        );
        assert!(err(&format!("{OK}parameters: {{filter_wise: maybe}}\n")).contains("filter_wise"));
    }

    #[test]
    fn per_model_parameters_warn() {
        let c = MergeConfig::from_yaml(
            "models:\n  - model: a\n    parameters: {weight: 0.5}\n  - model: b\nmerge_method: model_stock\nbase_model: base\n",
        )
        .unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].contains("models[0].parameters.weight"));
    }

    #[test]
    fn long_model_form() {
        let c = MergeConfig::from_yaml(
            "models:\n  - model: {model: {path: a}}\n  - model: b\nmerge_method: model_stock\nbase_model: {model: {path: base}}\n",
        )
        .unwrap();
        assert_eq!(c.models[0].text, "a");
        assert_eq!(c.base_model.text, "base");
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
            ("models:\n  - model: a\n  - model: b\nmerge_method: ties\nbase_model: x\n", "`ties`"),
            ("models:\n  - model: a\n  - model: b\nmerge_method: model_stock\n", "base_model"),
            ("models:\n  - model: a\nmerge_method: model_stock\nbase_model: x\n", "at least two"),
            ("models:\n  - model: a\n  - model: x\nmerge_method: model_stock\nbase_model: x\n", "at least two"),
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
        for key in [
            "slices",
            "modules",
            "tokenizer",
            "tokenizer_source",
            "chat_template",
        ] {
            let e = err(&format!("{OK}{key}: x\n"));
            assert!(
                e.contains(&format!("`{key}`")) && e.contains("not supported"),
                "{e}"
            );
        }
    }

    #[test]
    fn anchors_aliases_and_merge_keys() {
        // PyYAML applies merge keys: the merged filter_wise must count, not warn about `<<`.
        let c = MergeConfig::from_yaml(
            "defaults: &d {filter_wise: true}\nmodels:\n  - model: &a a\n  - model: b\nmerge_method: model_stock\nbase_model: base\nparameters: {<<: *d}\n",
        )
        .unwrap();
        assert_eq!(c.filter_wise, PerTensor::Scalar(true));
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
        assert_eq!(c.filter_wise, PerTensor::Scalar(false));
        let c = MergeConfig::from_yaml(
            "x: &t {filter_wise: true}\nmodels: [{model: a}, {model: b}]\nmerge_method: model_stock\nbase_model: base\nparameters: {<<: *t, filter_wise: false}\n",
        )
        .unwrap();
        assert_eq!(c.filter_wise, PerTensor::Scalar(false));
        // A merged mapping that itself merges another.
        let c = MergeConfig::from_yaml(
            "x: &inner {filter_wise: on}\ny: &outer {<<: *inner}\nmodels: [{model: a}, {model: b}]\nmerge_method: model_stock\nbase_model: base\nparameters: {<<: *outer}\n",
        )
        .unwrap();
        assert_eq!(c.filter_wise, PerTensor::Scalar(true));
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
