//! Reading models: safetensors headers and shard indexes, into a [`ModelSource`].
//!
//! A model is opened from its headers alone (HEAD + one ranged GET per file, more only for
//! huge headers); weights are fetched later, per task, by byte range. Everything that can
//! be wrong with a checkpoint is reported here with the file's URL and the tensor's name.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use safetensors::Dtype;

pub mod adapter;

use crate::header;
pub use crate::header::TensorEntry;
use crate::store::{head_size, read_small, store_err, Location, StoreError, Stores};

/// A model or store that cannot be read, with its URL and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    #[error("{location}: {message}")]
    NotFound { location: String, message: String },
    #[error("{location}: {message}")]
    Unsupported { location: String, message: String },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
}

impl SourceError {
    pub fn is_invalid_input(&self) -> bool {
        match self {
            SourceError::Store(e) => e.is_invalid_input(),
            _ => true,
        }
    }
}

/// One safetensors file of a model.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: Path,
    pub url: String,
    pub size: u64,
}

/// Where one tensor of a model lives.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorLoc {
    /// Index into [`ModelSource::files`].
    pub file: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

/// A model opened from its headers.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// As written in the config.
    pub reference: String,
    pub location: Location,
    pub files: Vec<SourceFile>,
    pub tensors: BTreeMap<String, TensorLoc>,
    /// Rows and columns per scale block when the checkpoint is block-FP8 (its
    /// `config.json` has `quantization_config.quant_method: fp8`).
    pub fp8_block: Option<[usize; 2]>,
    /// The LoRA adapter applied to this model on read (`model+adapter`).
    pub adapter: Option<adapter::Adapter>,
}

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";
/// First read of a file: the length prefix and, for nearly all models, the whole header.
const FIRST_READ: u64 = 1 << 18;

/// Read and check the header of one safetensors file.
pub async fn read_header(
    store: &dyn ObjectStore,
    path: &Path,
    url: &str,
    size: u64,
) -> Result<(Vec<TensorEntry>, BTreeMap<String, String>), SourceError> {
    let invalid = |message: String| SourceError::Invalid {
        file: url.to_string(),
        message,
    };
    if size < 8 {
        return Err(invalid(format!(
            "only {size} bytes: too short to be a safetensors file"
        )));
    }
    let first = store
        .get_range(path, 0..size.min(FIRST_READ))
        .await
        .map_err(store_err(url, true))?;
    let prefix: [u8; 8] = first
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| invalid("short read of the header length".into()))?;
    let n = header::header_len(prefix, size).map_err(&invalid)?;
    let json: Bytes = if 8 + n <= first.len() as u64 {
        first.slice(8..8 + n as usize)
    } else {
        store
            .get_range(path, 8..8 + n)
            .await
            .map_err(store_err(url, true))?
    };
    // Parsing a large header is CPU work (a 671B checkpoint has 489 of ~100 KB): off the
    // async threads, so the headers of many files parse on all cores at once.
    tokio::task::spawn_blocking(move || header::parse_header(&json, size))
        .await
        .map_err(|e| invalid(format!("header parser failed: {e}")))?
        .map_err(invalid)
}

/// Open a model from its headers: `model.safetensors.index.json` + shards, or a single
/// `model.safetensors`. `spec` is where it is (pinned, see [`crate::resolve`]),
/// `reference` how the config names it.
pub async fn open_model(
    stores: &Stores,
    spec: &str,
    reference: &str,
) -> Result<ModelSource, SourceError> {
    let location = stores.resolve(spec)?;
    check_local_dir(&location)?;
    let index_url = location.child_display(INDEX);
    let (names, weight_map) = list_files(&location, &index_url).await?;
    let headers = read_headers(
        &location,
        &names,
        weight_map.is_some().then_some(&index_url),
    )
    .await?;
    // CPU work on ~91,000 names for a 671B model: off the async task, so the models of a
    // merge are indexed in parallel.
    let (files, tensors) = tokio::task::spawn_blocking(move || {
        let (files, mut tensors) = collect_tensors(headers)?;
        if let Some(map) = weight_map {
            check_index(&map, &names, &files, &mut tensors, &index_url)?;
        }
        Ok::<_, SourceError>((files, tensors))
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
    let fp8_block = quantization(&location).await?;
    Ok(ModelSource {
        reference: reference.to_string(),
        location,
        files,
        tensors,
        fp8_block,
        adapter: None,
    })
}

/// The model's quantization, from `quantization_config` in its `config.json` (absent:
/// none). Block FP8 gives its block size; every other method is refused, naming it: its
/// tensors are not weights model_stock can merge as they are.
async fn quantization(location: &Location) -> Result<Option<[usize; 2]>, SourceError> {
    let url = location.child_display("config.json");
    let path = location.child("config.json");
    if head_size(location.store.as_ref(), &path, &url)
        .await?
        .is_none()
    {
        return Ok(None);
    }
    let raw = read_small(location.store.as_ref(), &path, &url).await?;
    parse_quantization(&raw).map_err(|message| SourceError::Unsupported {
        location: url,
        message,
    })
}

/// [`quantization`]'s pure part.
fn parse_quantization(config_json: &[u8]) -> Result<Option<[usize; 2]>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(config_json).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(q) = v.get("quantization_config").filter(|q| !q.is_null()) else {
        return Ok(None);
    };
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
    if method != "fp8" {
        return Err(format!(
            "quantization_config.quant_method is `{method}`: mergefleet reads block FP8 (`fp8`) \
             only; dequantize the model to bfloat16 first"
        ));
    }
    if let Some(fmt) = q.get("fmt").and_then(|f| f.as_str()) {
        if fmt != "e4m3" {
            return Err(format!(
                "quantization_config.fmt is `{fmt}`: only e4m3 (F8_E4M3) block FP8 is implemented"
            ));
        }
    }
    match q.get("weight_block_size") {
        None | Some(serde_json::Value::Null) => Ok(Some(crate::fp8::DEFAULT_BLOCK)),
        Some(b) => match b
            .as_array()
            .map(|a| a.iter().map(|x| x.as_u64()).collect::<Vec<_>>())
        {
            Some(a) if a.len() == 2 && a.iter().all(|x| x.is_some_and(|x| x > 0 && x <= 1 << 16)) => Ok(Some([
                a[0].unwrap_or(1) as usize,
                a[1].unwrap_or(1) as usize,
            ])),
            _ => Err(format!(
                "quantization_config.weight_block_size is {b}: expected two integers from 1 to 65536"
            )),
        },
    }
}

/// A local model must be a directory (a missing one never gets here: see
/// [`crate::resolve`]).
fn check_local_dir(location: &Location) -> Result<(), SourceError> {
    if let Some(dir) = &location.local_dir {
        if !dir.is_dir() {
            let message = if dir.exists() {
                "is not a directory; give the model's directory (holding model.safetensors or its index)"
            } else {
                "no such model directory"
            };
            return Err(SourceError::NotFound {
                location: dir.display().to_string(),
                message: message.into(),
            });
        }
    }
    Ok(())
}

/// The model's safetensors files, from its index (with the index's weight map) or the
/// single `model.safetensors`.
async fn list_files(
    location: &Location,
    index_url: &str,
) -> Result<(Vec<String>, Option<BTreeMap<String, String>>), SourceError> {
    let store = location.store.clone();
    match head_size(store.as_ref(), &location.child(INDEX), index_url).await? {
        Some(_) => {
            let json = read_small(store.as_ref(), &location.child(INDEX), index_url).await?;
            let map = tokio::task::spawn_blocking(move || crate::index::parse_index(&json))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
                .map_err(|message| SourceError::Invalid {
                    file: index_url.to_string(),
                    message,
                })?;
            let files: BTreeSet<String> = map.values().cloned().collect();
            Ok((files.into_iter().collect::<Vec<_>>(), Some(map)))
        }
        None => {
            let single = location.child(SINGLE);
            if head_size(store.as_ref(), &single, &location.child_display(SINGLE))
                .await?
                .is_none()
            {
                return Err(missing_model(location).await);
            }
            Ok((vec![SINGLE.to_string()], None))
        }
    }
}

/// Every file's size and parsed header, 16 files at a time. `index_url` names the index
/// that listed them, if any (for the message when one is missing).
async fn read_headers(
    location: &Location,
    names: &[String],
    index_url: Option<&String>,
) -> Result<Vec<(SourceFile, Vec<TensorEntry>)>, SourceError> {
    let store = location.store.clone();
    futures::stream::iter(names.iter())
        .map(|name| {
            let store = store.clone();
            let path = location.child(name);
            let url = location.child_display(name);
            async move {
                let size = head_size(store.as_ref(), &path, &url)
                    .await?
                    .ok_or_else(|| SourceError::NotFound {
                        location: url.clone(),
                        message: match index_url {
                            Some(index_url) => format!("listed in {index_url} but missing"),
                            None => "missing".into(),
                        },
                    })?;
                let (entries, _) = read_header(store.as_ref(), &path, &url, size).await?;
                Ok::<_, SourceError>((SourceFile { path, url, size }, entries))
            }
        })
        .buffered(16)
        .try_collect()
        .await
}

/// The tensors of all files by name; a tensor in two files is refused.
#[allow(clippy::type_complexity)]
fn collect_tensors(
    headers: Vec<(SourceFile, Vec<TensorEntry>)>,
) -> Result<(Vec<SourceFile>, BTreeMap<String, TensorLoc>), SourceError> {
    // One sort of every name, then a bulk build: a 671B checkpoint has ~91,000 tensors with
    // long shared prefixes, and inserting them one by one compared each ~17 times.
    let mut files = Vec::with_capacity(headers.len());
    let mut all: Vec<(String, TensorLoc)> = Vec::new();
    for (fi, (file, entries)) in headers.into_iter().enumerate() {
        all.extend(entries.into_iter().map(|e| {
            let loc = TensorLoc {
                file: fi,
                dtype: e.dtype,
                shape: e.shape,
                start: e.start,
                end: e.end,
            };
            (e.name, loc)
        }));
        files.push(file);
    }
    all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = all.windows(2).find(|w| w[0].0 == w[1].0) {
        let (first, second) = (w[0].1.file.min(w[1].1.file), w[0].1.file.max(w[1].1.file));
        return Err(SourceError::Invalid {
            file: files[second].url.clone(),
            message: format!(
                "tensor `{}` is also in {}: a tensor may be in one shard only",
                w[0].0,
                files_url(&files, first)
            ),
        });
    }
    Ok((files, all.into_iter().collect()))
}

/// The index must agree with the headers: every tensor it maps is in the file it names.
/// Tensors present in a shard but absent from the index are dropped, as transformers does.
fn check_index(
    map: &BTreeMap<String, String>,
    names: &[String],
    files: &[SourceFile],
    tensors: &mut BTreeMap<String, TensorLoc>,
    index_url: &str,
) -> Result<(), SourceError> {
    let file_index: std::collections::HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    // Both maps are sorted by name: walk them side by side.
    let mut stored = tensors.iter().peekable();
    let mut unindexed = false;
    for (name, fname) in map {
        while stored
            .next_if(|(n, _)| n.as_str() < name.as_str())
            .is_some()
        {
            unindexed = true;
        }
        let fi = file_index[fname.as_str()];
        match stored.next() {
            Some((n, t)) if n == name && t.file == fi => {}
            Some((n, t)) if n == name => {
                return Err(SourceError::Invalid {
                    file: index_url.to_string(),
                    message: format!(
                        "tensor `{name}` is mapped to {fname} but stored in {}",
                        files[t.file].url
                    ),
                })
            }
            _ => {
                return Err(SourceError::Invalid {
                    file: index_url.to_string(),
                    message: format!(
                        "tensor `{name}` is mapped to {fname}, whose header does not have it"
                    ),
                })
            }
        }
    }
    // Tensors present in a shard but absent from the index are ignored, as transformers does.
    if unindexed || stored.next().is_some() {
        tensors.retain(|name, _| map.contains_key(name));
    }
    Ok(())
}

fn files_url(files: &[SourceFile], i: usize) -> &str {
    files
        .get(i)
        .map(|f| f.url.as_str())
        .unwrap_or("another shard")
}

async fn missing_model(location: &Location) -> SourceError {
    for pickle in ["pytorch_model.bin", "pytorch_model.bin.index.json"] {
        let url = location.child_display(pickle);
        if let Ok(Some(_)) = head_size(location.store.as_ref(), &location.child(pickle), &url).await
        {
            return SourceError::Unsupported {
                location: url,
                message: "PyTorch pickle checkpoints (.bin) are not supported; convert the model to safetensors first (e.g. transformers' save_pretrained(safe_serialization=True))".into(),
            };
        }
    }
    SourceError::NotFound {
        location: location.display.clone(),
        message: format!("no {SINGLE} or {INDEX} here: not a safetensors model directory"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(name: &str, tensors: &[&str]) -> (SourceFile, Vec<TensorEntry>) {
        let file = SourceFile {
            path: Path::from(name),
            url: format!("mem://m/{name}"),
            size: 0,
        };
        let entries = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| TensorEntry {
                name: t.to_string(),
                dtype: Dtype::BF16,
                shape: vec![1],
                start: 2 * i as u64,
                end: 2 * i as u64 + 2,
            })
            .collect();
        (file, entries)
    }

    #[test]
    fn tensors_are_collected_once_and_checked_against_the_index() {
        let names = vec!["a.safetensors".to_string(), "b.safetensors".to_string()];
        let headers = || {
            vec![
                shard("a.safetensors", &["layers.1.w", "layers.0.w", "extra"]),
                shard("b.safetensors", &["layers.2.w", "embed"]),
            ]
        };
        let (files, tensors) = collect_tensors(headers()).unwrap();
        let got: Vec<(&str, usize)> = tensors.iter().map(|(n, t)| (n.as_str(), t.file)).collect();
        assert_eq!(
            got,
            [
                ("embed", 1),
                ("extra", 0),
                ("layers.0.w", 0),
                ("layers.1.w", 0),
                ("layers.2.w", 1)
            ]
        );
        let index = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(t, f)| (t.to_string(), f.to_string()))
                .collect()
        };
        let full = [
            ("embed", "b.safetensors"),
            ("layers.0.w", "a.safetensors"),
            ("layers.1.w", "a.safetensors"),
            ("layers.2.w", "b.safetensors"),
        ];
        // A tensor the index does not list is dropped, as transformers does.
        let mut t = tensors.clone();
        check_index(&index(&full), &names, &files, &mut t, "idx").unwrap();
        assert_eq!(
            t.keys().collect::<Vec<_>>(),
            ["embed", "layers.0.w", "layers.1.w", "layers.2.w"]
        );
        let mut wrong = full;
        wrong[2].1 = "b.safetensors";
        let e =
            check_index(&index(&wrong), &names, &files, &mut tensors.clone(), "idx").unwrap_err();
        assert!(
            e.to_string().contains(
                "`layers.1.w` is mapped to b.safetensors but stored in mem://m/a.safetensors"
            ),
            "{e}"
        );
        let mut absent = full.to_vec();
        absent.push(("layers.3.w", "b.safetensors"));
        let e =
            check_index(&index(&absent), &names, &files, &mut tensors.clone(), "idx").unwrap_err();
        assert!(
            e.to_string()
                .contains("`layers.3.w` is mapped to b.safetensors, whose header does not have it"),
            "{e}"
        );
        let mut twice = headers();
        twice[1]
            .1
            .push(shard("x", &["", "", "", "layers.0.w"]).1.pop().unwrap());
        let e = collect_tensors(twice).unwrap_err().to_string();
        assert!(
            e.contains("mem://m/b.safetensors")
                && e.contains("`layers.0.w` is also in mem://m/a.safetensors"),
            "{e}"
        );
    }

    #[test]
    fn quantization_configs() {
        let q = |s: &str| parse_quantization(s.as_bytes());
        assert_eq!(q("{}"), Ok(None));
        assert_eq!(q(r#"{"quantization_config": null}"#), Ok(None));
        assert_eq!(
            q(
                r#"{"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 64]}}"#
            ),
            Ok(Some([128, 64]))
        );
        assert_eq!(
            q(r#"{"quantization_config": {"quant_method": "fp8"}}"#),
            Ok(Some([128, 128]))
        );
        for (bad, words) in [
            (
                r#"{"quantization_config": {"quant_method": "gptq"}}"#,
                "`gptq`",
            ),
            (
                r#"{"quantization_config": {"quant_method": "awq"}}"#,
                "`awq`",
            ),
            (
                r#"{"quantization_config": {"quant_method": "bitsandbytes"}}"#,
                "`bitsandbytes`",
            ),
            (
                r#"{"quantization_config": {"quant_method": "compressed-tensors"}}"#,
                "compressed-tensors",
            ),
            (
                r#"{"quantization_config": {"quant_method": "mxfp4"}}"#,
                "`mxfp4`",
            ),
            (
                r#"{"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}"#,
                "e5m2",
            ),
            (
                r#"{"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}"#,
                "weight_block_size",
            ),
            (
                r#"{"quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 128]}}"#,
                "weight_block_size",
            ),
            ("{", "not valid JSON"),
        ] {
            let e = q(bad).unwrap_err();
            assert!(e.contains(words), "{bad}: {e}");
        }
    }
}
