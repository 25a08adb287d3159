//! A PEFT LoRA adapter (`model+adapter` in a config), opened from its headers like a model.
//!
//! mergekit 0.1.5 merges an adapter into its model with PEFT's `merge_and_unload` before
//! merging; mergefleet applies it on read instead ([`crate::lora`]), so here we only find, for
//! each weight the adapter changes, its `lora_A` and `lora_B` tensors and PEFT's scaling
//! (`lora_alpha / r`, or `/ sqrt(r)` with rslora, per-module `rank_pattern`/`alpha_pattern`).
//! Anything PEFT would merge differently is refused, naming it.

use std::collections::BTreeMap;

use safetensors::Dtype;
use serde_json::Value;

use super::{read_header, SourceError, SourceFile, TensorLoc};
use crate::store::{head_size, read_small, Stores};

/// PEFT's names for an adapter's files.
const CONFIG: &str = "adapter_config.json";
const WEIGHTS: &str = "adapter_model.safetensors";

/// The two factors of one adapted weight and how to apply them.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    pub a: TensorLoc,
    pub b: TensorLoc,
    /// PEFT's `scaling`: `lora_alpha / r` (rslora: `/ sqrt(r)`), as the double Python holds.
    pub scaling: f64,
}

/// An adapter opened from its header: one file, and the adapted weights by the base's
/// tensor name (`model.layers.0.self_attn.q_proj.weight`).
#[derive(Debug, Clone)]
pub struct Adapter {
    pub reference: String,
    pub file: SourceFile,
    pub pairs: BTreeMap<String, LoraPair>,
}

/// Open the adapter at `spec` (pinned, see [`crate::resolve`]).
pub async fn open_adapter(
    stores: &Stores,
    spec: &str,
    reference: &str,
) -> Result<Adapter, SourceError> {
    let location = stores.resolve(spec)?;
    let store = location.store.as_ref();
    let config_url = location.child_display(CONFIG);
    let config_path = location.child(CONFIG);
    if head_size(store, &config_path, &config_url).await?.is_none() {
        return Err(SourceError::NotFound {
            location: location.display.clone(),
            message: format!(
                "no {CONFIG}: `{reference}` names a LoRA adapter after `+`, which must be a PEFT adapter folder (adapter_config.json and adapter_model.safetensors)"
            ),
        });
    }
    let raw = read_small(store, &config_path, &config_url).await?;
    let config = AdapterConfig::parse(&raw).map_err(|message| SourceError::Unsupported {
        location: config_url.clone(),
        message,
    })?;
    let url = location.child_display(WEIGHTS);
    let path = location.child(WEIGHTS);
    let size = head_size(store, &path, &url)
        .await?
        .ok_or_else(|| SourceError::NotFound {
            location: url.clone(),
            message: "missing: a PEFT adapter keeps its weights there (a `.bin` adapter must be converted to safetensors)".into(),
        })?;
    let (entries, _) = read_header(store, &path, &url, size).await?;
    let mut tensors = BTreeMap::new();
    for e in entries {
        tensors.insert(
            e.name,
            TensorLoc {
                file: 0,
                dtype: e.dtype,
                shape: e.shape,
                start: e.start,
                end: e.end,
            },
        );
    }
    let pairs = config
        .pairs(tensors)
        .map_err(|message| SourceError::Invalid {
            file: url.clone(),
            message,
        })?;
    Ok(Adapter {
        reference: reference.to_string(),
        file: SourceFile { path, url, size },
        pairs,
    })
}

/// The parts of `adapter_config.json` that decide the merge.
#[derive(Debug, Clone, PartialEq)]
struct AdapterConfig {
    r: f64,
    alpha: f64,
    rslora: bool,
    /// `target_modules`: names or name suffixes (`None`: `all-linear`). PEFT ignores the
    /// factors of any other module, so they are ignored here too.
    targets: Option<Vec<String>>,
    /// In file order: PEFT takes the first key that matches.
    rank_pattern: Vec<(String, f64)>,
    alpha_pattern: Vec<(String, f64)>,
}

impl AdapterConfig {
    /// Parse and refuse what PEFT's `merge_and_unload` merges differently from plain LoRA.
    fn parse(raw: &[u8]) -> Result<AdapterConfig, String> {
        let v: Value = serde_json::from_slice(raw).map_err(|e| format!("not valid JSON: {e}"))?;
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        let on = |k: &str| v.get(k).is_some_and(|x| x.as_bool() == Some(true));
        let present = |k: &str| {
            v.get(k).is_some_and(|x| match x {
                Value::Null => false,
                Value::Array(a) => !a.is_empty(),
                Value::Object(o) => !o.is_empty(),
                Value::Bool(b) => *b,
                _ => true,
            })
        };
        match s("peft_type") {
            Some("LORA") | None => {}
            Some(other) => {
                return Err(format!(
                    "peft_type is `{other}`: only LoRA adapters (`LORA`) are applied"
                ))
            }
        }
        for (key, why) in [
            ("use_dora", "DoRA adapters rescale the merged weight by a magnitude vector"),
            ("modules_to_save", "modules_to_save replaces whole modules (often the embeddings and head)"),
            ("lora_bias", "LoRA biases add a bias term"),
            ("use_qalora", "QA-LoRA merges through quantization"),
            ("trainable_token_indices", "trainable tokens replace embedding rows"),
            ("target_parameters", "target_parameters adapts raw parameters, not linear layers"),
            ("layer_replication", "layer_replication duplicates layers"),
            ("megatron_config", "Megatron layers merge differently"),
            ("ensure_weight_tying", "ensure_weight_tying ties adapted embeddings"),
            ("alora_invocation_tokens", "activated LoRA applies only after invocation tokens"),
            ("arrow_config", "Arrow routes between adapters"),
            ("exclude_modules", "exclude_modules selects modules by pattern"),
            ("layers_to_transform", "layers_to_transform selects layers by index"),
            ("fan_in_fan_out", "fan_in_fan_out is for GPT-2-style Conv1D layers (PEFT ignores it on nn.Linear, and the two cannot be told apart from the weights)"),
        ] {
            if present(key) {
                return Err(format!(
                    "`{key}` is set: {why}, which mergefleet does not apply; merge this adapter with PEFT first (`merge_and_unload`)"
                ));
            }
        }
        if s("bias").is_some_and(|b| b != "none") {
            return Err("`bias` is not `none`: adapters that train biases are not applied; merge it with PEFT first".into());
        }
        match v.get("init_lora_weights") {
            None | Some(Value::Null | Value::Bool(_)) => {}
            Some(Value::String(g)) if g == "gaussian" => {}
            Some(other) => {
                return Err(format!(
                    "init_lora_weights is {other}: that initialization rewrites the base weights when the adapter is loaded; merge this adapter with PEFT first"
                ))
            }
        }
        let targets = match v.get("target_modules") {
            Some(Value::String(t)) if t == "all-linear" => None,
            Some(Value::String(t)) if !t.chars().any(|c| "*?[](){}|^$\\+.".contains(c)) => {
                Some(vec![t.clone()])
            }
            Some(Value::String(t)) => {
                return Err(format!(
                    "target_modules is the regular expression `{t}`: only a list of module names is applied"
                ))
            }
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| x.as_str().map(String::from).ok_or("target_modules must hold strings"))
                    .collect::<Result<_, _>>()?,
            ),
            _ => return Err("target_modules is missing: it names the modules the adapter changes".into()),
        };
        let num = |k: &str| v.get(k).and_then(Value::as_f64);
        let r = num("r")
            .filter(|r| *r >= 1.0)
            .ok_or("`r` must be a positive integer")?;
        let alpha = num("lora_alpha").unwrap_or(8.0);
        let pattern = |k: &str| -> Result<Vec<(String, f64)>, String> {
            let mut out = Vec::new();
            if let Some(Value::Object(o)) = v.get(k) {
                for (key, val) in o {
                    if key.chars().any(|c| "*?[](){}|^$\\+".contains(c)) {
                        return Err(format!(
                            "`{k}` key `{key}` is a regular expression: only module names and name suffixes are applied"
                        ));
                    }
                    let n = val
                        .as_f64()
                        .ok_or(format!("`{k}.{key}` must be a number"))?;
                    out.push((key.clone(), n));
                }
            }
            Ok(out)
        };
        Ok(AdapterConfig {
            r,
            alpha,
            rslora: on("use_rslora"),
            targets,
            rank_pattern: pattern("rank_pattern")?,
            alpha_pattern: pattern("alpha_pattern")?,
        })
    }

    /// PEFT's scaling for `module` (`model.layers.0.self_attn.q_proj`): a pattern key that is
    /// the module's name or a dotted suffix of it overrides r or alpha.
    fn scaling(&self, module: &str) -> f64 {
        let find = |p: &[(String, f64)]| {
            p.iter()
                .find(|(k, _)| suffix_match(module, k))
                .map(|(_, v)| *v)
        };
        let r = find(&self.rank_pattern).unwrap_or(self.r);
        let alpha = find(&self.alpha_pattern).unwrap_or(self.alpha);
        if self.rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// Pair every `…lora_A.weight` with its `…lora_B.weight`, checked in shape, by the
    /// base tensor they change.
    fn pairs(
        &self,
        mut tensors: BTreeMap<String, TensorLoc>,
    ) -> Result<BTreeMap<String, LoraPair>, String> {
        let mut pairs = BTreeMap::new();
        let names: Vec<String> = tensors.keys().cloned().collect();
        for name in names {
            let Some(prefix) = name.strip_suffix(".lora_A.weight") else {
                if name.ends_with(".lora_B.weight") {
                    continue;
                }
                return Err(format!(
                    "tensor `{name}` is not a LoRA factor (`.lora_A.weight` / `.lora_B.weight`): embedding LoRA, biases and saved modules are not applied; merge this adapter with PEFT first"
                ));
            };
            let a = tensors.remove(&name).expect("listed");
            let b_name = format!("{prefix}.lora_B.weight");
            let b = tensors
                .remove(&b_name)
                .ok_or(format!("`{name}` has no `{b_name}`"))?;
            let module = prefix.strip_prefix("base_model.model.").unwrap_or(prefix);
            let targeted = match &self.targets {
                Some(t) => t.iter().any(|t| suffix_match(module, t)),
                None => !module.ends_with("lm_head"),
            };
            if !targeted {
                // PEFT loads only the modules the config targets.
                continue;
            }
            let (&[rank, fan_in], &[fan_out, rank_b]) = (a.shape.as_slice(), b.shape.as_slice())
            else {
                return Err(format!(
                    "`{module}`: lora_A {:?} and lora_B {:?} must be matrices",
                    a.shape, b.shape
                ));
            };
            if rank != rank_b || rank == 0 {
                return Err(format!(
                    "`{module}`: lora_A {:?} and lora_B {:?} disagree on the rank",
                    a.shape, b.shape
                ));
            }
            let _ = (fan_in, fan_out);
            for t in [&a, &b] {
                if !matches!(t.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
                    return Err(format!(
                        "`{module}`: LoRA factors in {:?}; expected bfloat16, float16 or float32",
                        t.dtype
                    ));
                }
            }
            pairs.insert(
                format!("{module}.weight"),
                LoraPair {
                    a,
                    b,
                    scaling: self.scaling(module),
                },
            );
        }
        Ok(pairs)
    }
}

/// `module` is `key` or ends with `.key` (PEFT's `(.*\.)?key$` for a plain key).
fn suffix_match(module: &str, key: &str) -> bool {
    module == key || module.ends_with(&format!(".{key}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lora_configs_and_what_is_refused() {
        let c = AdapterConfig::parse(
            br#"{"peft_type":"LORA","r":8,"lora_alpha":16,"use_dora":false,"modules_to_save":null,"bias":"none","target_modules":["q_proj"]}"#,
        )
        .unwrap();
        assert_eq!(c.scaling("model.layers.0.self_attn.q_proj"), 2.0);
        let c = AdapterConfig::parse(
            br#"{"r":16,"lora_alpha":8,"use_rslora":true,"target_modules":"all-linear","rank_pattern":{"v_proj":4},"alpha_pattern":{"model.layers.1.self_attn.q_proj":32}}"#,
        )
        .unwrap();
        assert_eq!(c.scaling("model.layers.0.self_attn.q_proj"), 2.0);
        assert_eq!(c.scaling("model.layers.0.self_attn.v_proj"), 4.0);
        assert_eq!(c.scaling("model.layers.1.self_attn.q_proj"), 8.0);
        for (cfg, want) in [
            (r#"{"r":8,"use_dora":true}"#, "use_dora"),
            (
                r#"{"r":8,"modules_to_save":["lm_head"]}"#,
                "modules_to_save",
            ),
            (r#"{"r":8,"peft_type":"LOHA"}"#, "LOHA"),
            (r#"{"r":8,"bias":"all"}"#, "bias"),
            (r#"{"r":8,"fan_in_fan_out":true}"#, "fan_in_fan_out"),
            (
                r#"{"r":8,"init_lora_weights":"pissa"}"#,
                "init_lora_weights",
            ),
            (r#"{"r":8,"target_modules":".*proj"}"#, "regular expression"),
            (r#"{"r":8}"#, "target_modules"),
            (r#"{"r":0,"target_modules":["q"]}"#, "`r`"),
            (
                r#"{"r":8,"target_modules":["q"],"rank_pattern":{"^model.*q_proj":4}}"#,
                "regular expression",
            ),
        ] {
            let e = AdapterConfig::parse(cfg.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{cfg}: {e}");
        }
    }

    #[test]
    fn factors_pair_by_module() {
        let t = |shape: Vec<usize>| TensorLoc {
            file: 0,
            dtype: Dtype::F32,
            shape,
            start: 0,
            end: 0,
        };
        let c =
            AdapterConfig::parse(br#"{"r":2,"lora_alpha":4,"target_modules":["q_proj"]}"#).unwrap();
        let mut m = BTreeMap::new();
        let q = "base_model.model.model.layers.0.self_attn.q_proj";
        m.insert(format!("{q}.lora_A.weight"), t(vec![2, 6]));
        m.insert(format!("{q}.lora_B.weight"), t(vec![5, 2]));
        let p = c.pairs(m.clone()).unwrap();
        let pair = &p["model.layers.0.self_attn.q_proj.weight"];
        assert_eq!((pair.scaling, pair.a.shape.clone()), (2.0, vec![2, 6]));
        m.insert(format!("{q}.lora_B.weight"), t(vec![5, 3]));
        assert!(c.pairs(m.clone()).unwrap_err().contains("rank"));
        m.insert(
            "base_model.model.model.embed_tokens.lora_embedding_A".into(),
            t(vec![2, 6]),
        );
        assert!(c.pairs(m).unwrap_err().contains("embedding"));
    }
}
