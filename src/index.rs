//! `model.safetensors.index.json`, read: tensor name -> file name, trusting nothing in it.
//!
//! Read for an input model (its shards) and for an old output (which files it wrote); a room
//! of its own so the readers (`source`, `sink`) need nothing of the writers (`checkpoint`).

use std::collections::BTreeMap;

/// Parse an index: tensor name -> file name, every file name a plain name in the folder.
pub fn parse_index(json: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let invalid = |message: String| message;
    // Only `weight_map` is read, straight into strings (no JSON tree: a 671B index lists
    // ~91,000 tensors). When that fails, the slow path says what is wrong.
    #[derive(serde::Deserialize)]
    struct Typed {
        weight_map: BTreeMap<String, String>,
    }
    let map = match serde_json::from_slice::<Typed>(json) {
        Ok(t) => t.weight_map,
        Err(_) => {
            let v: serde_json::Value = serde_json::from_slice(json)
                .map_err(|e| invalid(format!("not valid JSON: {e}")))?;
            let m = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| invalid("no `weight_map` object".into()))?;
            let (k, _) = m
                .iter()
                .find(|(_, f)| !f.is_string())
                .ok_or_else(|| invalid("malformed".into()))?;
            return Err(invalid(format!("weight_map[`{k}`] is not a file name")));
        }
    };
    for (k, f) in &map {
        if f.is_empty() || f.contains('/') || f.contains('\\') || f == "." || f == ".." {
            return Err(invalid(format!(
                "weight_map[`{k}`] = `{f}` is not a plain file name in the model directory"
            )));
        }
    }
    if map.is_empty() {
        return Err(invalid("the weight_map is empty".into()));
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_parsing() {
        let m = parse_index(
            br#"{"metadata":{"total_size":8},"weight_map":{"a":"m-1.safetensors","b":"m-2.safetensors"}}"#,
        )
        .unwrap();
        assert_eq!(m["b"], "m-2.safetensors");
        for (bad, want) in [
            ("{", "not valid JSON"),
            ("{}", "weight_map"),
            (r#"{"weight_map":{}}"#, "empty"),
            (r#"{"weight_map":{"a":1}}"#, "`a`"),
            (r#"{"weight_map":{"a":"../x"}}"#, "plain file name"),
        ] {
            let e = parse_index(bad.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
