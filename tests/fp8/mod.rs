//! Block-FP8 checkpoints: read and dequantized as DeepSeek's converter does, merged into
//! exactly what mergekit writes from the officially dequantized models
//! (`tests/fixtures/fp8`), in every way a merge can run; and every malformed FP8 input
//! refused with exit 2, naming the tensor or key.

use std::path::{Path, PathBuf};

use crate::util::*;

pub fn fp8_fixtures() -> PathBuf {
    root().join("tests/fixtures/fp8")
}

/// Merge fixture `case` with `extra` flags and compare with mergekit's output.
fn merge_and_compare(case: &str, extra: &[&str]) {
    let out = tmp();
    let cfg = format!("{case}.yml");
    let mut args = vec!["merge", &cfg, out.path().to_str().unwrap(), "-q"];
    args.extend_from_slice(extra);
    let o = run_in(&fp8_fixtures(), &args, &[]);
    assert_ok(&o);
    let want = std::fs::read(
        fp8_fixtures()
            .join("expected")
            .join(case)
            .join("model.safetensors"),
    )
    .unwrap();
    let got = std::fs::read(out.path().join("model.safetensors")).unwrap();
    assert!(
        got == want,
        "{case} {extra:?}: the output differs from mergekit's"
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("config.json")).unwrap()).unwrap();
    assert!(
        cfg.get("quantization_config").is_none(),
        "a bfloat16 output must not claim to be FP8: {cfg}"
    );
}

#[test]
fn fp8_inputs_merge_to_mergekits_bytes() {
    for case in ["all_fp8", "all_fp8_fw", "mixed"] {
        merge_and_compare(case, &[]);
        merge_and_compare(case, &["--threads", "1"]);
    }
    // One tensor at a time, and filter_wise rows streamed in windows.
    merge_and_compare("all_fp8", &["--memory-limit", "200K", "--task-size", "1"]);
    merge_and_compare(
        "all_fp8_fw",
        &["--memory-limit", "100K", "--task-size", "1"],
    );
}

#[test]
fn plan_reports_fp8_inputs() {
    let o = run_in(&fp8_fixtures(), &["plan", "all_fp8.yml"], &[]);
    let t = text(&o);
    assert_ok(&o);
    assert!(t.contains("FP8") && t.contains("dequantized"), "{t}");
    // The scales are read, not written: 21 tensors out, as from the bfloat16 models.
    assert!(t.contains("tensors:        21"), "{t}");
    assert!(!t.contains("_scale_inv "), "{t}");
}

/// Rewrite the single-file checkpoint in `dir` through `f` (name, dtype, shape, bytes):
/// None drops the tensor.
fn rewrite(
    dir: &Path,
    f: impl Fn(&str, &str, Vec<usize>, Vec<u8>) -> Option<(String, Vec<usize>, Vec<u8>)>,
) {
    let path = dir.join("model.safetensors");
    let raw = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&raw[8..8 + n]).unwrap();
    let data = &raw[8 + n..];
    let mut out_header = serde_json::Map::new();
    let mut out_data = Vec::new();
    let mut names: Vec<_> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    names.sort();
    for name in names {
        let e = &header[&name];
        let dtype = e["dtype"].as_str().unwrap();
        let shape: Vec<usize> = e["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let off: Vec<usize> = e["data_offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        if let Some((dt, shape, bytes)) = f(&name, dtype, shape, data[off[0]..off[1]].to_vec()) {
            let start = out_data.len();
            out_data.extend_from_slice(&bytes);
            out_header.insert(
                name,
                serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [start, out_data.len()]}),
            );
        }
    }
    let mut h = serde_json::to_vec(&out_header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(&out_data);
    std::fs::write(path, file).unwrap();
}

fn edit_config(dir: &Path, f: impl Fn(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

const Q: &str = "model.layers.0.self_attn.q_proj.weight";

#[test]
fn malformed_fp8_inputs_are_refused() {
    type Break = fn(&Path);
    let cases: Vec<(&str, Break, &[&str])> = vec![
        (
            "a weight without its scales",
            |d| {
                rewrite(d, |n, dt, s, b| {
                    (n != format!("{Q}_scale_inv")).then(|| (dt.into(), s, b))
                })
            },
            &[Q, "_scale_inv", "missing"],
        ),
        (
            "scales of the wrong shape",
            |d| {
                rewrite(d, |n, dt, s, b| {
                    let s = if n == format!("{Q}_scale_inv") {
                        vec![s[0] * s[1], 1]
                    } else {
                        s
                    };
                    Some((dt.into(), s, b))
                })
            },
            &[Q, "_scale_inv", "[2, 2]"],
        ),
        (
            "FP8 weights without quantization_config",
            |d| {
                edit_config(d, |v| {
                    v.as_object_mut().unwrap().remove("quantization_config");
                })
            },
            &["FP8 tensor", "_proj.weight", "quantization_config"],
        ),
        (
            "a quantization method we do not read",
            |d| {
                edit_config(d, |v| {
                    v["quantization_config"]["quant_method"] = "gptq".into()
                })
            },
            &["quant_method", "gptq", "config.json"],
        ),
        (
            "compressed-tensors",
            |d| {
                edit_config(d, |v| {
                    v["quantization_config"]["quant_method"] = "compressed-tensors".into()
                })
            },
            &["quant_method", "compressed-tensors"],
        ),
        (
            "E5M2 weights",
            |d| {
                rewrite(d, |n, dt, s, b| {
                    Some((if n == Q { "F8_E5M2".into() } else { dt.into() }, s, b))
                })
            },
            &[Q, "F8_E5M2"],
        ),
    ];
    for (what, breaks, words) in cases {
        let d = tmp();
        let models = d.path().join("models");
        copy_dir(&fp8_fixtures().join("models"), &models);
        breaks(&models.join("ft1_fp8"));
        let cfg = d.path().join("all_fp8.yml");
        std::fs::copy(fp8_fixtures().join("all_fp8.yml"), &cfg).unwrap();
        let out = d.path().join("out");
        for args in [
            vec!["merge", "all_fp8.yml", out.to_str().unwrap()],
            vec!["plan", "all_fp8.yml"],
        ] {
            let o = run_in(d.path(), &args, &[]);
            let t = assert_exit(&o, 2);
            for w in words {
                assert!(t.contains(w), "{what}: missing {w:?} in: {t}");
            }
        }
        assert!(!looks_complete(&out), "{what}: a checkpoint was written");
    }
}

/// `--quantize fp8` into `out` with `extra` flags; every tensor equals the requantized
/// golden (weights F8_E4M3, scales F32), and each scale sits in its weight's file.
fn quantize_and_compare(case: &str, out: &Path, extra: &[&str]) {
    let cfg = format!("{case}.yml");
    let mut args = vec![
        "merge",
        &cfg,
        out.to_str().unwrap(),
        "-q",
        "--quantize",
        "fp8",
    ];
    args.extend_from_slice(extra);
    assert_ok(&run_in(&fp8_fixtures(), &args, &[]));
    let want = read_checkpoint(&fp8_fixtures().join("expected").join(format!("{case}_q")));
    let got = read_checkpoint(out);
    assert_eq!(got.len(), want.len(), "{case} {extra:?}: tensor count");
    for (name, w) in &want {
        assert!(
            got.get(name) == Some(w),
            "{case} {extra:?}: `{name}` differs"
        );
    }
    if let Some(map) = weight_map(out) {
        let map = map.as_object().unwrap();
        for (name, file) in map {
            if let Some(w) = name.strip_suffix("_scale_inv") {
                assert_eq!(map.get(w), Some(file), "{name} is not in its weight's file");
            }
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["quant_method"], "fp8", "{cfg}");
}

#[test]
fn quantize_fp8_writes_mergekits_result_requantized() {
    for case in ["all_fp8", "mixed"] {
        let out = tmp();
        quantize_and_compare(case, out.path(), &[]);
        let one = tmp();
        quantize_and_compare(case, one.path(), &["--threads", "1"]);
        assert_same_checkpoint(out.path(), one.path());
    }
    // Several output files (scales beside their weights), and one tensor at a time under a
    // small memory limit (windows: `fp8_streamed_equals_in_memory`): the same tensors.
    let out = tmp();
    quantize_and_compare("all_fp8", out.path(), &["--out-shard-size", "40K"]);
    assert!(weight_map(out.path()).is_some(), "expected several files");
    let small = tmp();
    quantize_and_compare(
        "all_fp8",
        small.path(),
        &["--memory-limit", "200K", "--task-size", "1"],
    );
}

#[test]
fn quantize_fp8_needs_an_fp8_base() {
    let out = tmp();
    let o = run_in(
        &fixtures(),
        &[
            "merge",
            "basic_bf16/config.yml",
            out.path().to_str().unwrap(),
            "--quantize",
            "fp8",
        ],
        &[],
    );
    let t = assert_exit(&o, 2);
    assert!(
        t.contains("--quantize fp8") && t.contains("no block-FP8"),
        "{t}"
    );
    assert!(!looks_complete(out.path()));
    // FP8 is quantized from 16- or 32-bit values, not float64.
    let d = tmp();
    let cfg = std::fs::read_to_string(fp8_fixtures().join("all_fp8.yml"))
        .unwrap()
        .replace("dtype: bfloat16", "dtype: float64")
        .replace("models/", &format!("{}/models/", fp8_fixtures().display()));
    let path = d.path().join("f64.yml");
    std::fs::write(&path, cfg).unwrap();
    let out = d.path().join("out");
    let args = [
        "merge",
        path.to_str().unwrap(),
        out.to_str().unwrap(),
        "--quantize",
        "fp8",
    ];
    let t = assert_exit(&run(&args), 2);
    assert!(t.contains("bfloat16, float16 or float32"), "{t}");
    assert!(!looks_complete(&out));
}

/// A block-FP8 set with matrices of up to 786,432 elements (several kernel blocks and
/// 128-row block rows each): the synthetic LLaMA set quantized as DeepSeek ships models.
pub fn fp8_set(dir: &Path) -> PathBuf {
    let shape = mergefleet::synth::LlamaShape {
        hidden: 512,
        layers: 2,
        intermediate: 1536,
        vocab: 4096,
        heads: 8,
        kv_heads: 4,
        lm_head: true,
    };
    mergefleet::synth::write_set(dir, &shape, 3, 2).unwrap();
    for m in ["base", "ft1", "ft2", "ft3"] {
        mergefleet::synth::quantize_model(&dir.join(m), [128, 128]).unwrap();
    }
    dir.join("model_stock.yml")
}

#[test]
fn fp8_streamed_equals_in_memory() {
    // Streamed windows (whole rows of 128-row blocks when requantizing) give the bytes of
    // a merge done in one pass, for both outputs.
    let d = tmp();
    let cfg = fp8_set(d.path());
    let cfg = cfg.to_str().unwrap();
    for quantize in [&[][..], &["--quantize", "fp8"][..]] {
        let merge = |extra: &[&str]| {
            let out = tmp();
            let mut args = vec!["merge", cfg, out.path().to_str().unwrap(), "-q"];
            args.extend_from_slice(quantize);
            args.extend_from_slice(extra);
            assert_ok(&run(&args));
            out
        };
        let whole = merge(&[]);
        let streamed = merge(&["--memory-limit", "8M", "--task-size", "1"]);
        assert_same_checkpoint(whole.path(), streamed.path());
        let t = read_checkpoint(whole.path());
        let up = &t["model.layers.0.mlp.up_proj.weight"];
        let want = if quantize.is_empty() {
            "BF16"
        } else {
            "F8_E4M3"
        };
        assert_eq!((up.0.as_str(), up.1.clone()), (want, vec![1536, 512]));
        assert_eq!(
            t.contains_key("model.layers.0.mlp.up_proj.weight_scale_inv"),
            !quantize.is_empty()
        );
    }
}
