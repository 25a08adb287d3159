//! The small files of a mergekit-style checkpoint, built as bytes (pure).
//!
//! Tools that load a mergekit merge read `model.safetensors.index.json`, `config.json` and the
//! tokenizer files; people read `README.md`. These builders produce them from the plan and
//! the config so the writer only has to store them.

use serde_json::{json, Map, Value};

use crate::config::MergeConfig;
use crate::plan::MergePlan;

/// Files copied byte for byte from the base model when present: the list mergekit 0.1.5
/// copies (`_copy_tokenizer`: tokenizer files, the chat template and the generation config,
/// whose stop tokens and sampling defaults a chat model needs), plus vocab.json, which
/// byte-level BPE tokenizers need next to merges.txt.
pub const COPIED_FILES: &[&str] = &[
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "generation_config.json",
    "chat_template.json",
    "video_preprocessor_config.json",
];

/// Files a merge writes itself beside the weights.
pub const WRITTEN_FILES: &[&str] = &["config.json", "mergekit_config.yml", "README.md"];

/// `model.safetensors.index.json` as transformers and mergekit write it.
pub fn index_json(plan: &MergePlan) -> Vec<u8> {
    let weight_map: Map<String, Value> = plan
        .weight_map
        .iter()
        .map(|(t, f)| (t.clone(), Value::String(f.clone())))
        .collect();
    let v = json!({
        "metadata": {
            "total_size": plan.total_size,
            "mergefleet_version": env!("CARGO_PKG_VERSION"),
        },
        "weight_map": weight_map,
    });
    let mut out = serde_json::to_vec_pretty(&v).expect("json");
    out.push(b'\n');
    out
}

/// The base model's `config.json` with the output dtype recorded.
/// The error names no file: the caller knows which one it read.
pub fn config_json(base: &[u8], dtype: Option<&str>) -> Result<Vec<u8>, String> {
    let mut v: Value =
        serde_json::from_slice(base).map_err(|e| format!("config.json is not valid JSON: {e}"))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| "config.json is not a JSON object".to_string())?;
    if let Some(d) = dtype {
        let mut set = false;
        for key in ["torch_dtype", "dtype"] {
            if obj.contains_key(key) {
                obj.insert(key.into(), Value::String(d.into()));
                set = true;
            }
        }
        if !set {
            obj.insert("torch_dtype".into(), Value::String(d.into()));
        }
    }
    let mut out = serde_json::to_vec_pretty(&v).expect("json");
    out.push(b'\n');
    Ok(out)
}

/// A model card in the shape mergekit writes.
pub fn model_card(config: &MergeConfig) -> String {
    let models: String = config.models.iter().map(|m| format!("* {m}\n")).collect();
    format!(
        "---\nbase_model: []\nlibrary_name: transformers\ntags:\n- mergekit\n- merge\n- mergefleet\n\n---\n\
# Merged model\n\n\
This is a merge of pre-trained language models created with mergefleet {version}, which \
reproduces [mergekit](https://github.com/arcee-ai/mergekit)'s merge methods.\n\n\
## Merge Details\n### Merge Method\n\n\
This model was merged using the [Model Stock](https://arxiv.org/abs/2403.19522) merge method \
using {base} as a base.\n\n\
### Models Merged\n\nThe following models were included in the merge:\n{models}\n\
### Configuration\n\nThe following YAML configuration was used to produce this model:\n\n\
```yaml\n{yaml}\n```\n",
        version = env!("CARGO_PKG_VERSION"),
        base = config.base_model,
        yaml = config.source_yaml.trim_end(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_records_dtype() {
        let out = config_json(br#"{"a":1,"torch_dtype":"float32"}"#, Some("bfloat16")).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["torch_dtype"], "bfloat16");
        assert_eq!(v["a"], 1);
        let out = config_json(br#"{"dtype":"float32"}"#, Some("float16")).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["dtype"], "float16");
        assert!(v.get("torch_dtype").is_none());
        assert!(config_json(b"[", None)
            .unwrap_err()
            .starts_with("config.json is not valid JSON"));
        assert!(config_json(b"[1]", None).is_err());
    }

    #[test]
    fn card_has_models_and_yaml() {
        let c = MergeConfig::from_yaml(
            "models:\n  - model: a\n  - model: b\nmerge_method: model_stock\nbase_model: base\n",
        )
        .unwrap();
        let card = model_card(&c);
        assert!(card.contains("* a\n* b\n"));
        assert!(card.contains("using base as a base"));
        assert!(card.contains("merge_method: model_stock"));
    }
}
