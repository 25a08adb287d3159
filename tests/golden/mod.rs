//! The real binary against mergekit's golden outputs (`tests/fixtures/model_stock`): every
//! case bit for bit or within its stated tolerance, streamed or not, and what else a
//! checkpoint holds (tokenizer, card, plan, overwrite rules).

use std::path::Path;

use crate::util::*;

/// How closely a fixture case must match mergekit (from the fixtures' README).
#[derive(Clone, Copy)]
pub enum Agreement {
    BitForBit,
    /// float32 values within this absolute difference
    F32Abs(f32),
    /// float16 values within this many units in the last place
    F16Ulp(i32),
}

pub fn compare_values(name: &str, dtype: &str, got: &[u8], want: &[u8], how: Agreement) {
    assert_eq!(got.len(), want.len(), "{name}: byte length");
    match how {
        Agreement::BitForBit => assert!(got == want, "{name}: not bit for bit"),
        Agreement::F32Abs(tol) => {
            assert_eq!(dtype, "F32");
            for (i, (a, b)) in got.chunks_exact(4).zip(want.chunks_exact(4)).enumerate() {
                let a = f32::from_le_bytes(a.try_into().unwrap());
                let b = f32::from_le_bytes(b.try_into().unwrap());
                assert!((a - b).abs() <= tol, "{name}[{i}]: {a} vs {b}");
            }
        }
        Agreement::F16Ulp(ulps) => {
            assert_eq!(dtype, "F16");
            for (i, (a, b)) in got.chunks_exact(2).zip(want.chunks_exact(2)).enumerate() {
                let a = i16::from_le_bytes(a.try_into().unwrap()) as i32;
                let b = i16::from_le_bytes(b.try_into().unwrap()) as i32;
                assert!((a - b).abs() <= ulps, "{name}[{i}]: {a:#x} vs {b:#x}");
            }
        }
    }
}

pub fn shard_size(case: &str) -> String {
    std::fs::read_to_string(fixtures().join(case).join("shard_size"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "5B".into())
}

/// Check a merged directory against a fixture's expected output.
pub fn check_against_expected(case: &str, out: &Path, how: Agreement) {
    let expected = fixtures().join(case).join("expected");
    assert_eq!(
        weight_files(out),
        weight_files(&expected),
        "{case}: output files"
    );
    assert_eq!(
        weight_map(out),
        weight_map(&expected),
        "{case}: index weight_map"
    );
    if weight_map(&expected).is_some() {
        let total = |d: &Path| -> serde_json::Value {
            let v: serde_json::Value = serde_json::from_slice(
                &std::fs::read(d.join("model.safetensors.index.json")).unwrap(),
            )
            .unwrap();
            v["metadata"]["total_size"].clone()
        };
        assert_eq!(total(out), total(&expected), "{case}: total_size");
    }
    let got = read_checkpoint(out);
    let want = read_checkpoint(&expected);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{case}: tensor names"
    );
    for (name, (dt, shape, bytes)) in &want {
        let (gdt, gshape, gbytes) = &got[name];
        assert_eq!((gdt, gshape), (dt, shape), "{case}: {name} dtype/shape");
        compare_values(&format!("{case}: {name}"), dt, gbytes, bytes, how);
    }
    if matches!(how, Agreement::BitForBit) {
        for f in weight_files(&expected)
            .iter()
            .filter(|f| f.ends_with(".safetensors"))
        {
            assert!(
                std::fs::read(out.join(f)).unwrap() == std::fs::read(expected.join(f)).unwrap(),
                "{case}: {f} is not byte-identical to mergekit's"
            );
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let want_cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(expected.join("config.json")).unwrap()).unwrap();
    // Under the key mergekit 0.1.5 (transformers 5) writes, and no other.
    assert_eq!(cfg["dtype"], want_cfg["dtype"], "{case}: config.json dtype");
    assert!(cfg.get("torch_dtype").is_none(), "{case}: {cfg}");
    assert_eq!(
        std::fs::read_to_string(out.join("mergekit_config.yml")).unwrap(),
        std::fs::read_to_string(fixtures().join(case).join("config.yml")).unwrap()
    );
    assert!(std::fs::read_to_string(out.join("README.md"))
        .unwrap()
        .contains("Model Stock"));
}

pub fn merge_fixture(case: &str, out: &Path, extra: &[&str]) {
    let out_s = out.to_str().unwrap();
    let ss = shard_size(case);
    let cfg = format!("{case}/config.yml");
    let mut args = vec![
        "merge",
        cfg.as_str(),
        out_s,
        "--out-shard-size",
        ss.as_str(),
        "-q",
    ];
    args.extend_from_slice(extra);
    assert_ok(&run_in(&fixtures(), &args, &[]));
}

/// Every case bit for bit in torch's summation order (the default); with `--reductions
/// exact` (correctly rounded sums), within the fixtures' stated tolerances.
pub const CASES: &[(&str, Agreement)] = &[
    ("basic_bf16", Agreement::BitForBit),
    ("filter_wise_f32", Agreement::F32Abs(1e-6)),
    ("sharded_two_ft_f16_out", Agreement::F16Ulp(1)),
    ("zero_delta_bf16", Agreement::BitForBit),
    ("tied_embeddings_bf16", Agreement::BitForBit),
];

#[test]
fn golden_fixtures_match_mergekit() {
    for (case, exact_how) in CASES {
        let out = tmp();
        merge_fixture(case, out.path(), &[]);
        check_against_expected(case, out.path(), Agreement::BitForBit);
        merge_fixture(case, out.path(), &["--reductions", "exact", "--overwrite"]);
        check_against_expected(case, out.path(), *exact_how);
    }
}

#[test]
fn golden_fixtures_streamed_under_a_small_memory_limit() {
    // 40 KB is less than the working set of the embeddings (5 x 32 KB), so filter_wise tensors
    // stream row windows and whole-tensor tensors go one by one; the bytes must not change.
    for (case, limit) in [("filter_wise_f32", "100K"), ("basic_bf16", "200K")] {
        let out = tmp();
        merge_fixture(
            case,
            out.path(),
            &["--memory-limit", limit, "--task-size", "1"],
        );
        check_against_expected(case, out.path(), Agreement::BitForBit);
    }
}

#[test]
fn two_pass_streaming_equals_one_pass() {
    // A tensor several blocks long merged under a budget that forces block-aligned windows
    // (statistics pass, then output pass) gives the same bytes as one pass in memory.
    let dir = tmp();
    let shape = mergefleet::synth::LlamaShape {
        hidden: 256,
        layers: 1,
        intermediate: 1024,
        vocab: 2048,
        heads: 4,
        kv_heads: 2,
        lm_head: true,
    };
    mergefleet::synth::write_set(dir.path(), &shape, 3, 1).unwrap();
    let cfg = dir.path().join("model_stock.yml");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    assert_ok(&run(&[
        "merge",
        cfg.to_str().unwrap(),
        a.to_str().unwrap(),
        "-q",
    ]));
    // embed: 2048 x 256 = 8 blocks; 10 bytes per element; 3 MB gives 2-block windows.
    let o = run(&[
        "merge",
        cfg.to_str().unwrap(),
        b.to_str().unwrap(),
        "-q",
        "--memory-limit",
        "3MB",
        "--task-size",
        "1",
    ]);
    assert_ok(&o);
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap()
    );
}

#[test]
fn bundled_example_merges() {
    let out = tmp();
    let o = run(&[
        "merge",
        "examples/model_stock.yml",
        out.path().to_str().unwrap(),
    ]);
    assert_ok(&o);
    assert!(text(&o).contains("merged 21 tensors"), "{}", text(&o));
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "mergekit_config.yml",
        "README.md",
    ] {
        assert!(out.path().join(f).exists(), "{f} missing");
    }
    assert_eq!(read_checkpoint(out.path()).len(), 21);
}

#[test]
fn copy_tokenizer_and_card_can_be_turned_off() {
    let out = tmp();
    let o = run(&[
        "merge",
        "examples/model_stock.yml",
        out.path().to_str().unwrap(),
        "--no-copy-tokenizer",
        "--no-model-card",
    ]);
    assert_ok(&o);
    assert!(!out.path().join("tokenizer_config.json").exists());
    assert!(!out.path().join("README.md").exists());
    assert!(out.path().join("model.safetensors").exists());
}

#[test]
fn existing_output_needs_overwrite() {
    let out = tmp();
    let o = out.path().to_str().unwrap();
    // Sharded first, so the overwrite must also remove the old shards.
    assert_ok(&run(&[
        "merge",
        "examples/model_stock.yml",
        o,
        "--out-shard-size",
        "20K",
    ]));
    assert!(out.path().join("model.safetensors.index.json").exists());
    let again = run(&["merge", "examples/model_stock.yml", o]);
    assert_exit(&again, 2);
    assert!(text(&again).contains("--overwrite"));
    assert_ok(&run(&[
        "merge",
        "examples/model_stock.yml",
        o,
        "--overwrite",
    ]));
    assert_eq!(weight_files(out.path()), ["model.safetensors"]);
}

#[test]
fn plan_prints_what_a_merge_would_do() {
    let o = run(&["plan", "examples/model_stock.yml"]);
    assert_ok(&o);
    let t = text(&o);
    for want in [
        "tensors:        21",
        "bytes to read:",
        "bytes to write:",
        "largest tensor:",
        "model.safetensors",
    ] {
        assert!(t.contains(want), "missing {want:?} in {t}");
    }
    // Model paths are relative to the working directory, as in mergekit.
    let o2 = run_in(
        &fixtures(),
        &[
            "plan",
            "sharded_two_ft_f16_out/config.yml",
            "--json",
            "--out-shard-size",
            "60K",
        ],
        &[],
    );
    assert_ok(&o2);
    let v: serde_json::Value = serde_json::from_slice(&o2.stdout).unwrap();
    assert_eq!(v["files"].as_array().unwrap().len(), 5);
    assert_eq!(v["tensors"].as_array().unwrap().len(), 21);
    assert_eq!(v["bytes_written"].as_u64().unwrap(), 252760);
    let o = run(&["plan", "no-such-config.yml"]);
    assert_exit(&o, 2);
}

/// A float tensor's values, widened exactly to f64.
pub(crate) fn values(dtype: &str, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        "BF16" => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        "F16" => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        "F32" => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        "F64" => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        other => panic!("not a float dtype: {other}"),
    }
}

/// `x` rounded to the safetensors dtype `dtype` as torch's `.to(dtype)` does: to nearest,
/// ties to even, a double through float first. (`half`'s `from_f64` drops a double's low
/// 32 bits before rounding: not a correct rounding, so not used here.)
fn cast(x: f64, dtype: &str) -> f64 {
    let x32 = x as f32;
    match dtype {
        "BF16" => half::bf16::from_f32(x32).to_f64(),
        "F16" => half::f16::from_f32(x32).to_f64(),
        "F32" => x32 as f64,
        _ => x,
    }
}

/// Every (`dtype`, `out_dtype`) pair mergekit accepts, without and with `--quantize fp8`:
/// whatever `plan` accepts, `merge` merges (never a panic), and what `plan` refuses,
/// `merge` refuses the same way (exit 2). `out_dtype` is mergekit's cast at save: each
/// output tensor is the working dtype's result rounded once to the output dtype, and
/// config.json records it.
#[test]
fn every_working_and_output_dtype_pair_merges_as_mergekit_casts() {
    const NAMES: [(&str, &str); 4] = [
        ("bfloat16", "BF16"),
        ("float16", "F16"),
        ("float32", "F32"),
        ("float64", "F64"),
    ];
    let d = tmp();
    let sets = [
        ("basic_bf16/config.yml", fixtures(), None),
        (
            "all_fp8.yml",
            root().join("tests/fixtures/fp8"),
            Some("--quantize=fp8"),
        ),
    ];
    for (set, (config, cwd, quantize)) in sets.into_iter().enumerate() {
        let base_cfg = std::fs::read_to_string(cwd.join(config)).unwrap();
        let base_cfg: String = base_cfg
            .lines()
            .filter(|l| !l.starts_with("dtype:"))
            .map(|l| format!("{l}\n"))
            .collect();
        for flags in [None, quantize]
            .into_iter()
            .collect::<std::collections::BTreeSet<_>>()
        {
            for (work, _) in NAMES {
                // The working dtype's own result: the reference every output dtype casts.
                let merge = |out_dtype: &str, tag: &str| {
                    let cfg = d.path().join(format!("{tag}.yml"));
                    let mut yaml = format!("{base_cfg}dtype: {work}\n");
                    if !out_dtype.is_empty() {
                        yaml.push_str(&format!("out_dtype: {out_dtype}\n"));
                    }
                    std::fs::write(&cfg, yaml).unwrap();
                    let out = d.path().join(tag);
                    let mut args = vec!["merge", cfg.to_str().unwrap(), out.to_str().unwrap()];
                    args.push("-q");
                    args.extend(flags);
                    let mut plan_args = vec!["plan", cfg.to_str().unwrap()];
                    plan_args.extend(flags);
                    let planned = run_in(&cwd, &plan_args, &[]);
                    let merged = run_in(&cwd, &args, &[]);
                    let what = format!("dtype {work}, out_dtype {out_dtype:?}, {flags:?}");
                    assert_eq!(
                        planned.status.code(),
                        merged.status.code(),
                        "{what}: plan and merge disagree:\n{}\n{}",
                        text(&planned),
                        text(&merged)
                    );
                    match merged.status.code() {
                        Some(0) => Some(out),
                        Some(2) => None,
                        _ => panic!("{what}: merge failed:\n{}", text(&merged)),
                    }
                };
                let tag = format!("{set}-{}-{work}", flags.is_some());
                let Some(reference) = merge("", &tag) else {
                    // FP8 output takes 16- and 32-bit values only; plan said so too.
                    assert!(flags.is_some() && work == "float64", "{work} refused");
                    continue;
                };
                let want = read_checkpoint(&reference);
                for (out_name, out_st) in NAMES {
                    let tag = format!("{tag}-{out_name}");
                    let Some(out) = merge(out_name, &tag) else {
                        assert!(flags.is_some() && out_name == "float64", "{tag} refused");
                        continue;
                    };
                    let got = read_checkpoint(&out);
                    assert_eq!(
                        got.keys().collect::<Vec<_>>(),
                        want.keys().collect::<Vec<_>>()
                    );
                    for (name, (dt, shape, bytes)) in &got {
                        let (wdt, wshape, wbytes) = &want[name];
                        assert_eq!(shape, wshape, "{tag} {name}");
                        if wdt != NAMES.iter().find(|n| n.0 == work).unwrap().1
                            || dt == "F8_E4M3"
                            || name.ends_with("_scale_inv")
                        {
                            // Copied (non-float) or requantized tensors: not a cast.
                            continue;
                        }
                        assert_eq!(dt, out_st, "{tag} {name}");
                        let w: Vec<f64> = values(wdt, wbytes)
                            .iter()
                            .map(|&x| cast(x, out_st))
                            .collect();
                        let g = values(dt, bytes);
                        assert!(
                            w.iter()
                                .zip(&g)
                                .all(|(a, b)| a.to_bits() == b.to_bits()
                                    || (a.is_nan() && b.is_nan())),
                            "{tag} {name}: not the cast of the {work} result"
                        );
                    }
                    let config: serde_json::Value =
                        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap())
                            .unwrap();
                    assert_eq!(config["dtype"], out_name, "{tag}");
                }
            }
        }
    }
}
