//! The safetensors header format, both ways (pure: bytes in, entries out, and back).
//!
//! Writing produces the exact bytes the safetensors library writes, so our files equal
//! mergekit's. Parsing is defensive: checkpoints come from strangers. A header is trusted only after: its length is capped and
//! inside the file, it is a JSON object, every dtype is known, every shape times the dtype
//! size equals the byte length (checked arithmetic), offsets are contiguous from 0 with no gap
//! or overlap, and the data ends exactly at the end of the file. Errors name the tensor.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Metadata, TensorInfo};

use safetensors::Dtype;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Visitor methods that accept any JSON value but an object, as `None` (so the caller can
/// say which entry is not an object, rather than serde's generic "invalid type").
macro_rules! not_an_object {
    () => {
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    };
}

/// Headers larger than this are refused (the safetensors crate uses the same cap).
pub const MAX_HEADER: u64 = 100_000_000;

/// One tensor of a safetensors file, with offsets absolute in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file (header included).
    pub start: u64,
    pub end: u64,
}

/// Check the 8-byte prefix against the file size; returns the header's JSON length.
pub fn header_len(prefix: [u8; 8], file_size: u64) -> Result<u64, String> {
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER {
        return Err(format!(
            "header length {n} exceeds the {MAX_HEADER}-byte cap: not a safetensors file, or corrupted"
        ));
    }
    if n.checked_add(8).is_none_or(|e| e > file_size) {
        return Err(format!(
            "header length {n} runs past the end of the file ({file_size} bytes): truncated or not safetensors"
        ));
    }
    Ok(n)
}

/// Parse a header's JSON (`json` = the `n` bytes after the length prefix) for a file of
/// `file_size` bytes. Returns tensors sorted by offset and the `__metadata__` map.
pub fn parse_header(
    json: &[u8],
    file_size: u64,
) -> Result<(Vec<TensorEntry>, BTreeMap<String, String>), String> {
    let data_start = 8 + json.len() as u64;
    // Streamed into small typed entries rather than a `serde_json::Value` tree: a 671B
    // checkpoint has ~91,000 entries, and the tree's per-entry maps dominated planning.
    let mut de = serde_json::Deserializer::from_slice(json);
    let items = serde::Deserializer::deserialize_any(&mut de, TopVisitor)
        .and_then(|items| de.end().map(|()| items))
        .map_err(|e| {
            format!("the header is not valid JSON ({e}): not a safetensors file, or corrupted")
        })?
        .ok_or("the header is not a JSON object")?;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(items.len());
    let mut seen_metadata = false;
    for (name, item) in items {
        match item {
            Item::Metadata(v) => {
                if std::mem::replace(&mut seen_metadata, true) {
                    return Err("`__metadata__` appears twice".into());
                }
                let Value::Object(m) = v else {
                    return Err("`__metadata__` is not an object".into());
                };
                for (k, v) in m {
                    match v {
                        Value::String(s) => {
                            metadata.insert(k, s);
                        }
                        _ => return Err(format!("`__metadata__.{k}` is not a string")),
                    }
                }
            }
            Item::Tensor(e) => tensors.push(parse_entry(&name, e.as_ref(), data_start)?),
        }
    }
    let mut names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("tensor `{}` appears twice in the header", w[0]));
    }
    tensors.sort_by_key(|t| (t.start, t.end));
    let mut expect = data_start;
    for t in &tensors {
        if t.start != expect {
            let rel = t.start - data_start;
            let want = expect - data_start;
            return Err(if t.start < expect {
                format!("tensor `{}`: data_offsets start {rel} overlaps the previous tensor (which ends at {want})", t.name)
            } else {
                format!(
                    "tensor `{}`: data_offsets start {rel} leaves a gap after offset {want}",
                    t.name
                )
            });
        }
        expect = t.end;
    }
    if expect != file_size {
        return Err(format!(
            "the tensors' data ends at byte {expect} but the file has {file_size} bytes: truncated, or extra bytes"
        ));
    }
    Ok((tensors, metadata))
}

/// A header entry as read: a tensor's fields, still untyped, or `None` if it is not an
/// object. Unknown fields are skipped.
#[derive(Default)]
struct RawEntry {
    dtype: Option<Value>,
    shape: Option<Value>,
    data_offsets: Option<Value>,
}

enum Item {
    Metadata(Value),
    Tensor(Option<RawEntry>),
}

/// The top level: `Some(entries)` for an object, `None` for any other JSON value.
struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Option<Vec<(String, Item)>>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some(name) = map.next_key::<String>()? {
            let item = if name == "__metadata__" {
                Item::Metadata(map.next_value()?)
            } else {
                Item::Tensor(map.next_value_seed(EntryVisitor)?)
            };
            items.push((name, item));
        }
        Ok(Some(items))
    }
    not_an_object!();
}

struct EntryVisitor;

impl<'de> DeserializeSeed<'de> for EntryVisitor {
    type Value = Option<RawEntry>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for EntryVisitor {
    type Value = Option<RawEntry>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a tensor entry")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut e = RawEntry::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "dtype" => e.dtype = Some(map.next_value()?),
                "shape" => e.shape = Some(map.next_value()?),
                "data_offsets" => e.data_offsets = Some(map.next_value()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(e))
    }
    not_an_object!();
}

fn parse_entry(name: &str, e: Option<&RawEntry>, data_start: u64) -> Result<TensorEntry, String> {
    let err = |m: String| format!("tensor `{name}`: {m}");
    let Some(o) = e else {
        return Err(err("entry is not an object".into()));
    };
    let dtype_v = o.dtype.as_ref().ok_or_else(|| err("no `dtype`".into()))?;
    let dtype: Dtype = serde_json::from_value(dtype_v.clone())
        .map_err(|_| err(format!("unknown dtype {dtype_v}")))?;
    let size = crate::dtype::size(dtype)
        .ok_or_else(|| err(format!("sub-byte dtype {dtype:?} is not supported")))?;
    let shape: Vec<usize> = match &o.shape {
        Some(v @ Value::Array(a)) => a
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<_>>()
            .ok_or_else(|| err(format!("shape {v} is not a list of non-negative integers")))?,
        _ => return Err(err("no `shape` list".into())),
    };
    let offs = match &o.data_offsets {
        Some(Value::Array(a)) if a.len() == 2 => (a[0].as_u64(), a[1].as_u64()),
        _ => return Err(err("`data_offsets` is not a pair of integers".into())),
    };
    let (Some(s), Some(e)) = offs else {
        return Err(err(
            "`data_offsets` is not a pair of non-negative integers".into()
        ));
    };
    if e < s {
        return Err(err(format!(
            "data_offsets [{s}, {e}] end before they start"
        )));
    }
    let numel = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
        .ok_or_else(|| err(format!("shape {shape:?} overflows")))?;
    let bytes = numel
        .checked_mul(size as u64)
        .ok_or_else(|| err(format!("shape {shape:?} overflows")))?;
    if e - s != bytes {
        return Err(err(format!(
            "data_offsets [{s}, {e}] hold {} bytes but shape {shape:?} of {dtype:?} needs {bytes}",
            e - s
        )));
    }
    let start = data_start
        .checked_add(s)
        .ok_or_else(|| err("offset overflows".into()))?;
    let end = data_start
        .checked_add(e)
        .ok_or_else(|| err("offset overflows".into()))?;
    Ok(TensorEntry {
        name: name.to_string(),
        dtype,
        shape,
        start,
        end,
    })
}

/// The exact header bytes the safetensors library writes for these tensors: 8-byte length,
/// JSON with `{"format":"pt"}` metadata, padded with spaces to a multiple of 8.
pub fn write_header(infos: Vec<(String, TensorInfo)>) -> Result<Vec<u8>, String> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let md = Metadata::new(Some(meta), infos).map_err(|e| format!("{e:?}"))?;
    let mut json = serde_json::to_vec(&md).map_err(|e| e.to_string())?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data: usize) -> (Vec<u8>, u64) {
        (json.as_bytes().to_vec(), (8 + json.len() + data) as u64)
    }

    fn parse(json: &str, data: usize) -> Result<Vec<TensorEntry>, String> {
        let (j, size) = file(json, data);
        parse_header(&j, size).map(|(t, _)| t)
    }

    #[test]
    fn valid_header_sorted_by_offset() {
        let json = r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let (j, size) = file(json, 16);
        let (t, m) = parse_header(&j, size).unwrap();
        assert_eq!(t[0].name, "a");
        assert_eq!(t[0].start, 8 + json.len() as u64);
        assert_eq!(t[1].end, size);
        assert_eq!(m["format"], "pt");
    }

    #[test]
    fn matches_safetensors_crate() {
        let data = [0u8; 24];
        let views = vec![
            (
                "x",
                safetensors::tensor::TensorView::new(Dtype::F32, vec![2, 1], &data[..8]).unwrap(),
            ),
            (
                "y",
                safetensors::tensor::TensorView::new(Dtype::BF16, vec![8], &data[8..24]).unwrap(),
            ),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        let n = header_len(bytes[..8].try_into().unwrap(), bytes.len() as u64).unwrap();
        let (t, _) = parse_header(&bytes[8..8 + n as usize], bytes.len() as u64).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[1].end, bytes.len() as u64);
    }

    #[test]
    fn malformed_headers_are_refused_by_name() {
        let cases: &[(&str, usize, &str)] = &[
            ("not json", 0, "not valid JSON"),
            ("[1,2]", 0, "not a JSON object"),
            (r#"{"__metadata__":[1]}"#, 0, "__metadata__"),
            (r#"{"__metadata__":{"a":1}}"#, 0, "__metadata__.a"),
            (
                r#"{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#,
                1,
                "unknown dtype",
            ),
            (
                r#"{"w":{"shape":[1],"data_offsets":[0,1]}}"#,
                1,
                "no `dtype`",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                4,
                "non-negative",
            ),
            (
                r#"{"w":{"dtype":"F32","data_offsets":[0,4]}}"#,
                4,
                "no `shape`",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
                4,
                "data_offsets",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
                4,
                "end before",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                4,
                "needs 8",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#,
                4,
                "overflows",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
                "overlaps",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
                "gap",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                8,
                "extra bytes",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                4,
                "truncated",
            ),
            (r#"{"w":7}"#, 0, "not an object"),
            (r#"{"w":[1,2]}"#, 0, "not an object"),
            (
                r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                2,
                "appears twice",
            ),
            (r#"[1,2]"#, 0, "not a JSON object"),
            (r#"{} trailing"#, 0, "not valid JSON"),
        ];
        for (json, data, want) in cases {
            let e = parse(json, *data).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
            if json.contains("\"w\"") {
                assert!(e.contains("`w`"), "names the tensor: {e}");
            }
        }
    }

    #[test]
    fn header_length_checks() {
        assert!(header_len(200_000_000u64.to_le_bytes(), 1 << 40)
            .unwrap_err()
            .contains("cap"));
        assert!(header_len(100u64.to_le_bytes(), 50)
            .unwrap_err()
            .contains("past the end"));
        assert!(header_len(u64::MAX.to_le_bytes(), 50).is_err());
        assert_eq!(header_len(42u64.to_le_bytes(), 50).unwrap(), 42);
    }
}
