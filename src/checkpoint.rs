//! The small files of a mergekit-style checkpoint, built as bytes (pure).
//!
//! Tools that load a mergekit merge read `model.safetensors.index.json`, `config.json` and the
//! tokenizer files; people read `README.md`. These builders produce them from the plan and
//! the config so the writer only has to store them ([`crate::index`] reads an index back).

use serde_json::{json, Map, Value};

use crate::config::{MergeConfig, ModelPath, ModelRef};
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

/// The base model's `config.json` with the output dtype recorded as mergekit 0.1.5 records
/// it: `dtype` is the config's `out_dtype`, else its `dtype`, else whatever the base said.
/// transformers 5 (which mergekit saves the config with) reads a `torch_dtype` key as
/// `dtype` and writes only `dtype`, so that is the one key written.
/// The error names no file: the caller knows which one it read.
///
/// `layers` (a sliced merge): for each output layer, the input layer it is made from. The
/// layer count is set to their number, as mergekit sets it, and every top-level list with
/// one entry per input layer (`layer_types`, ...) is rebuilt to match, which mergekit
/// leaves stale (and transformers then refuses).
pub fn config_json(
    base: &[u8],
    dtype: Option<&str>,
    fp8: bool,
    layers: Option<&[usize]>,
    vocab_size: Option<usize>,
) -> Result<Vec<u8>, String> {
    let mut v: Value =
        serde_json::from_slice(base).map_err(|e| format!("config.json is not valid JSON: {e}"))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| "config.json is not a JSON object".to_string())?;
    // A block-FP8 base written dequantized must lose its `quantization_config`: left in (as
    // DeepSeek's own converter leaves it) it makes loaders treat bfloat16 weights as FP8.
    // Written as FP8 again (`fp8`), it keeps it.
    if !fp8 {
        obj.remove("quantization_config");
    }
    if let Some(layers) = layers {
        let keys = ["num_hidden_layers", "n_layer", "num_layers", "n_layers"];
        let Some((key, old)) = keys
            .iter()
            .find_map(|k| Some((*k, obj.get(*k)?.as_u64()? as usize)))
        else {
            return Err(format!(
                "config.json has no layer count ({}) to set for the {} sliced layers",
                keys.join(", "),
                layers.len()
            ));
        };
        obj.insert(key.into(), layers.len().into());
        for v in obj.values_mut() {
            if let Value::Array(items) = v {
                if items.len() == old && old > 0 && layers.iter().all(|&l| l < old) {
                    *items = layers.iter().map(|&l| items[l].clone()).collect();
                }
            }
        }
    }
    // A merged vocabulary: its size (padded), where the architecture keeps it (mergekit's
    // `vocab_size_config_key`: `vocab_size`, or `text_config.vocab_size` for the
    // multimodal configs that keep it there).
    if let Some(n) = vocab_size {
        let nested = !obj.contains_key("vocab_size")
            && obj
                .get("text_config")
                .is_some_and(|t| t.get("vocab_size").is_some());
        match obj.get_mut("text_config") {
            Some(Value::Object(t)) if nested => {
                t.insert("vocab_size".into(), n.into());
            }
            _ => {
                obj.insert("vocab_size".into(), n.into());
            }
        }
    }
    let legacy = obj.remove("torch_dtype");
    let kept = obj.remove("dtype").or(legacy);
    if let Some(d) = dtype.map(|d| Value::String(d.into())).or(kept) {
        obj.insert("dtype".into(), d);
    }
    let mut out = serde_json::to_vec_pretty(&v).expect("json");
    out.push(b'\n');
    Ok(out)
}

/// A model card in the shape mergekit writes: front matter listing the Hugging Face models
/// (`hub`: the paths of the models and adapters read from the Hub, in config order) and
/// each of them linked to its page.
pub fn model_card(config: &MergeConfig, hub: &[String]) -> String {
    let link = |p: &ModelPath| {
        if hub.contains(&p.path) {
            format!("[{0}](https://huggingface.co/{0})", p.path)
        } else {
            p.path.clone()
        }
    };
    let md = |m: &ModelRef| match &m.lora {
        Some(l) => format!("{} + {}", link(&m.model), link(l)),
        None => link(&m.model),
    };
    let models: String = config
        .models
        .iter()
        .map(|m| format!("* {}\n", md(m)))
        .collect();
    let base_model = if hub.is_empty() {
        "base_model: []\n".to_string()
    } else {
        let items: String = hub
            .iter()
            .map(|h| format!("- {}\n", yaml_plain(h)))
            .collect();
        format!("base_model:\n{items}")
    };
    format!(
        "---\n{base_model}library_name: transformers\ntags:\n- mergekit\n- merge\n- mergefleet\n\n---\n\
# Merged model\n\n\
This is a merge of pre-trained language models created with mergefleet {version}, which \
reproduces [mergekit](https://github.com/arcee-ai/mergekit)'s merge methods.\n\n\
## Merge Details\n### Merge Method\n\n\
This model was merged using the {method} merge method{base}.\n\n\
### Models Merged\n\nThe following models were included in the merge:\n{models}\n\
### Configuration\n\nThe following YAML configuration was used to produce this model:\n\n\
```yaml\n{yaml}\n```\n",
        version = env!("CARGO_PKG_VERSION"),
        method = match config.method.reference_url() {
            Some(url) => format!("[{}]({url})", config.method.pretty_name()),
            None => config.method.pretty_name().to_string(),
        },
        base = config
            .base_model
            .as_ref()
            .map(|b| format!(" using {} as a base", md(b)))
            .unwrap_or_default(),
        yaml = config.source_yaml.trim_end(),
    )
}

/// A string as a YAML scalar: plain when YAML reads it back as that string, else quoted.
fn yaml_plain(s: &str) -> String {
    match serde_yaml::from_str::<serde_yaml::Value>(s) {
        Ok(serde_yaml::Value::String(back)) if back == s => s.to_string(),
        _ => format!("'{}'", s.replace('\'', "''")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_json_drops_quantization() {
        let base = br#"{"dtype": "bfloat16", "quantization_config": {"quant_method": "fp8"}, "hidden_size": 8}"#;
        let out: Value =
            serde_json::from_slice(&config_json(base, Some("float16"), false, None, None).unwrap())
                .unwrap();
        assert!(out.get("quantization_config").is_none(), "{out}");
        let kept: Value =
            serde_json::from_slice(&config_json(base, None, true, None, None).unwrap()).unwrap();
        assert_eq!(kept["quantization_config"]["quant_method"], "fp8");
        assert_eq!(
            (out["dtype"].as_str(), out["hidden_size"].as_u64()),
            (Some("float16"), Some(8))
        );
    }

    #[test]
    fn config_json_of_a_sliced_merge_counts_its_layers() {
        let base = br#"{"num_hidden_layers": 4, "layer_types": ["s", "f", "s", "f"], "architectures": ["X"]}"#;
        let v: Value = serde_json::from_slice(
            &config_json(base, None, false, Some(&[0, 1, 1, 2, 3, 3]), None).unwrap(),
        )
        .unwrap();
        assert_eq!(v["num_hidden_layers"], 6);
        assert_eq!(v["layer_types"], json!(["s", "f", "f", "s", "f", "f"]));
        assert_eq!(v["architectures"], json!(["X"]));
        assert!(config_json(br#"{"a": 1}"#, None, false, Some(&[0]), None).is_err());
    }

    #[test]
    fn config_json_of_a_merged_vocabulary_has_its_size_where_the_architecture_keeps_it() {
        let get = |raw: &[u8]| -> Value {
            serde_json::from_slice(&config_json(raw, None, false, None, Some(384)).unwrap())
                .unwrap()
        };
        assert_eq!(get(br#"{"vocab_size": 320}"#)["vocab_size"], 384);
        // Multimodal configs (Gemma 3, Mistral 3) keep it under text_config.
        let v = get(br#"{"text_config": {"vocab_size": 320}}"#);
        assert_eq!(
            (&v["text_config"]["vocab_size"], v.get("vocab_size")),
            (&json!(384), None)
        );
        assert_eq!(get(br#"{"a": 1}"#)["vocab_size"], 384);
    }

    #[test]
    fn config_json_records_dtype_as_transformers_5_writes_it() {
        let parse = |raw: &[u8], d: Option<&str>| -> Value {
            serde_json::from_slice(&config_json(raw, d, false, None, None).unwrap()).unwrap()
        };
        // A legacy `torch_dtype` key becomes `dtype`, set or kept.
        let v = parse(br#"{"a":1,"torch_dtype":"float32"}"#, Some("bfloat16"));
        assert_eq!(
            (v["dtype"].as_str(), v["a"].as_u64()),
            (Some("bfloat16"), Some(1))
        );
        assert!(v.get("torch_dtype").is_none(), "{v}");
        let v = parse(br#"{"torch_dtype":"float64"}"#, None);
        assert_eq!(v["dtype"], "float64");
        assert!(v.get("torch_dtype").is_none(), "{v}");
        let v = parse(br#"{"dtype":"float32"}"#, Some("float16"));
        assert_eq!(v["dtype"], "float16");
        // Neither key in the base: `dtype` when the config sets one, else none.
        assert_eq!(parse(br#"{"a":1}"#, Some("float64"))["dtype"], "float64");
        let v = parse(br#"{"a":1}"#, None);
        assert!(
            v.get("dtype").is_none() && v.get("torch_dtype").is_none(),
            "{v}"
        );
        assert!(config_json(b"[", None, false, None, None)
            .unwrap_err()
            .starts_with("config.json is not valid JSON"));
        assert!(config_json(b"[1]", None, false, None, None).is_err());
    }

    #[test]
    fn card_has_models_and_yaml() {
        let c = MergeConfig::from_yaml(
            "models:\n  - model: a\n  - model: b\nmerge_method: model_stock\nbase_model: base\n",
        )
        .unwrap();
        let card = model_card(&c, &[]);
        assert!(card.contains("* a\n* b\n"));
        assert!(card.contains("using base as a base"));
        assert!(card.contains("merge_method: model_stock"));
        assert!(card.starts_with("---\nbase_model: []\n"), "{card}");
        // Hub models are listed in the front matter and linked, as mergekit does.
        let c = MergeConfig::from_yaml(
            "models:\n  - model: org/a+org/lora\n  - model: ./b\nmerge_method: model_stock\nbase_model: org/base@v1\n",
        )
        .unwrap();
        let hub = ["org/base", "org/a", "org/lora", "1.5"].map(String::from);
        let card = model_card(&c, &hub);
        assert!(
            card.starts_with("---\nbase_model:\n- org/base\n- org/a\n- org/lora\n- '1.5'\nlibrary_name: transformers\n"),
            "{card}"
        );
        assert!(card.contains("* [org/a](https://huggingface.co/org/a) + [org/lora](https://huggingface.co/org/lora)\n* ./b\n"), "{card}");
        assert!(
            card.contains("using [org/base](https://huggingface.co/org/base) as a base"),
            "{card}"
        );
    }
}
