//! Integration tests: the real `mergefleet` binary against mergekit's golden outputs, bad
//! inputs, and a real S3-compatible server.

mod cluster;
mod contract;
mod fidelity;
mod k8s;
mod scale;
mod util;

use std::path::Path;

use util::*;

/// How closely a fixture case must match mergekit (from the fixtures' README).
#[derive(Clone, Copy)]
enum Agreement {
    BitForBit,
    /// float32 values within this absolute difference
    F32Abs(f32),
    /// float16 values within this many units in the last place
    F16Ulp(i32),
}

fn compare_values(name: &str, dtype: &str, got: &[u8], want: &[u8], how: Agreement) {
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

fn shard_size(case: &str) -> String {
    std::fs::read_to_string(fixtures().join(case).join("shard_size"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "5B".into())
}

/// Check a merged directory against a fixture's expected output.
fn check_against_expected(case: &str, out: &Path, how: Agreement) {
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
    assert_eq!(
        cfg["torch_dtype"], want_cfg["dtype"],
        "{case}: config.json dtype"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("mergekit_config.yml")).unwrap(),
        std::fs::read_to_string(fixtures().join(case).join("config.yml")).unwrap()
    );
    assert!(std::fs::read_to_string(out.join("README.md"))
        .unwrap()
        .contains("Model Stock"));
}

fn merge_fixture(case: &str, out: &Path, extra: &[&str]) {
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
const CASES: &[(&str, Agreement)] = &[
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
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
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
    assert_eq!(o.status.code(), Some(2));
}

/// A bad-input case: how to break the inputs, and words the error must contain.
struct Bad {
    name: &'static str,
    setup: fn(&Path) -> String,
    words: &'static [&'static str],
}

/// Copy the tiny example models into `dir` and return a config merging them.
fn tiny(dir: &Path) -> String {
    for m in ["base", "ft1", "ft2"] {
        copy_dir(&root().join("examples/models").join(m), &dir.join(m));
    }
    format!(
        "models:\n  - model: {d}/ft1\n  - model: {d}/ft2\nmerge_method: model_stock\nbase_model: {d}/base\ndtype: bfloat16\n",
        d = dir.display()
    )
}

fn ft2(dir: &Path) -> std::path::PathBuf {
    dir.join("ft2/model.safetensors")
}

const EMBED: &str = "model.embed_tokens.weight";

const BAD: &[Bad] = &[
    Bad {
        name: "malformed yaml",
        setup: |_| "models: [\n".into(),
        words: &["not valid YAML"],
    },
    Bad {
        name: "wrong type",
        setup: |d| tiny(d).replace("dtype: bfloat16", "dtype: [1]"),
        words: &["`dtype`"],
    },
    Bad {
        name: "missing base",
        setup: |d| {
            tiny(d)
                .lines()
                .filter(|l| !l.starts_with("base_model"))
                .collect::<Vec<_>>()
                .join("\n")
        },
        words: &["base_model", "missing"],
    },
    Bad {
        name: "unknown method",
        setup: |d| tiny(d).replace("model_stock", "slerp"),
        words: &["merge_method", "slerp"],
    },
    Bad {
        name: "one fine-tune",
        setup: |d| tiny(d).replace(&format!("  - model: {}/ft2\n", d.display()), ""),
        words: &["at least two"],
    },
    Bad {
        name: "duplicated model",
        setup: |d| tiny(d).replace("/ft2\n", "/ft1\n"),
        words: &["listed twice"],
    },
    Bad {
        name: "slices",
        setup: |d| tiny(d) + "slices: []\n",
        words: &["`slices`", "not supported"],
    },
    Bad {
        name: "tokenizer_source",
        setup: |d| tiny(d) + "tokenizer_source: base\n",
        words: &["`tokenizer_source`"],
    },
    Bad {
        name: "lora",
        setup: |d| tiny(d).replace("/ft1\n", "/ft1+adapter\n"),
        words: &["LoRA"],
    },
    Bad {
        name: "missing model dir",
        setup: |d| tiny(d).replace("/ft2\n", "/nope\n"),
        words: &["nope", "no such model directory"],
    },
    Bad {
        name: "hub id",
        setup: |d| tiny(d).replace(&format!("{}/ft2", d.display()), "meta-llama/Llama-2-7b"),
        words: &["hub ids are not supported"],
    },
    Bad {
        name: "pickle checkpoint",
        setup: |d| {
            let c = tiny(d);
            std::fs::remove_file(ft2(d)).unwrap();
            std::fs::write(d.join("ft2/pytorch_model.bin"), b"PK").unwrap();
            c
        },
        words: &["pytorch_model.bin", "safetensors"],
    },
    Bad {
        name: "empty model dir",
        setup: |d| {
            let c = tiny(d);
            std::fs::remove_file(ft2(d)).unwrap();
            c
        },
        words: &["ft2", "no model.safetensors"],
    },
    Bad {
        name: "truncated file",
        setup: |d| {
            let c = tiny(d);
            let b = std::fs::read(ft2(d)).unwrap();
            std::fs::write(ft2(d), &b[..b.len() - 100]).unwrap();
            c
        },
        words: &["ft2/model.safetensors", "truncated"],
    },
    Bad {
        name: "tiny file",
        setup: |d| {
            let c = tiny(d);
            std::fs::write(ft2(d), b"abc").unwrap();
            c
        },
        words: &["too short"],
    },
    Bad {
        name: "header beyond file",
        setup: |d| {
            let c = tiny(d);
            let mut b = std::fs::read(ft2(d)).unwrap();
            b[..8].copy_from_slice(&(1u64 << 20).to_le_bytes());
            std::fs::write(ft2(d), b).unwrap();
            c
        },
        words: &["ft2/model.safetensors", "past the end"],
    },
    Bad {
        name: "header not json",
        setup: |d| {
            let c = tiny(d);
            write_raw_safetensors(&ft2(d), "{not json at all}       ", 0);
            c
        },
        words: &["not valid JSON"],
    },
    Bad {
        name: "overlapping offsets",
        setup: |d| {
            let c = tiny(d);
            write_raw_safetensors(
                &ft2(d),
                r#"{"a":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[4,12]}}"#,
                12,
            );
            c
        },
        words: &["`b`", "overlaps"],
    },
    Bad {
        name: "out of range offsets",
        setup: |d| {
            let c = tiny(d);
            write_raw_safetensors(
                &ft2(d),
                r#"{"a":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]}}"#,
                4,
            );
            c
        },
        words: &["truncated"],
    },
    Bad {
        name: "unknown dtype",
        setup: |d| {
            let c = tiny(d);
            write_raw_safetensors(
                &ft2(d),
                r#"{"a":{"dtype":"Q4_K","shape":[4],"data_offsets":[0,8]}}"#,
                8,
            );
            c
        },
        words: &["`a`", "unknown dtype"],
    },
    Bad {
        name: "size mismatch",
        setup: |d| {
            let c = tiny(d);
            write_raw_safetensors(
                &ft2(d),
                r#"{"a":{"dtype":"BF16","shape":[5],"data_offsets":[0,8]}}"#,
                8,
            );
            c
        },
        words: &["`a`", "needs 10"],
    },
    Bad {
        name: "index names a missing file",
        setup: |d| {
            let c = tiny(d);
            std::fs::write(
                d.join("ft2/model.safetensors.index.json"),
                r#"{"weight_map":{"model.norm.weight":"model-00009-of-00009.safetensors"}}"#,
            )
            .unwrap();
            c
        },
        words: &["model-00009-of-00009.safetensors", "missing"],
    },
    Bad {
        name: "tensor in two shards",
        setup: |d| {
            let c = tiny(d);
            std::fs::copy(ft2(d), d.join("ft2/copy.safetensors")).unwrap();
            std::fs::write(d.join("ft2/model.safetensors.index.json"), format!(r#"{{"weight_map":{{"{EMBED}":"model.safetensors","model.norm.weight":"copy.safetensors"}}}}"#)).unwrap();
            c
        },
        words: &["also in", "one shard only"],
    },
    Bad {
        name: "missing tensor",
        setup: |d| {
            let c = tiny(d);
            write_raw_safetensors(
                &ft2(d),
                r#"{"x":{"dtype":"BF16","shape":[4],"data_offsets":[0,8]}}"#,
                8,
            );
            c
        },
        words: &["missing from", "ft2"],
    },
    Bad {
        name: "shape mismatch",
        setup: |d| {
            let c = tiny(d);
            write_raw_safetensors(
                &ft2(d),
                &format!(
                    r#"{{"{EMBED}":{{"dtype":"BF16","shape":[130,32],"data_offsets":[0,8320]}}}}"#
                ),
                8320,
            );
            c
        },
        words: &["[130, 32]", "[128, 32]", "vocabularies"],
    },
    Bad {
        name: "tensor named twice in a header",
        setup: |d| {
            let c = tiny(d);
            write_raw_safetensors(
                &ft2(d),
                r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                2,
            );
            c
        },
        words: &["ft2/model.safetensors", "`w` appears twice"],
    },
    Bad {
        name: "metadata not an object",
        setup: |d| {
            let c = tiny(d);
            write_raw_safetensors(&ft2(d), r#"{"__metadata__":7}"#, 0);
            c
        },
        words: &["ft2/model.safetensors", "`__metadata__` is not an object"],
    },
    Bad {
        name: "negative dimension",
        setup: |d| {
            let c = tiny(d);
            write_raw_safetensors(
                &ft2(d),
                r#"{"w":{"dtype":"BF16","shape":[-4],"data_offsets":[0,8]}}"#,
                8,
            );
            c
        },
        words: &["`w`", "non-negative integers"],
    },
    Bad {
        name: "unreadable model file",
        setup: |d| {
            // Root reads everything, so "unreadable" is a directory where the file must be.
            let c = tiny(d);
            std::fs::remove_file(ft2(d)).unwrap();
            std::fs::create_dir(ft2(d)).unwrap();
            c
        },
        words: &["ft2", "model.safetensors"],
    },
    Bad {
        name: "model path is a file",
        setup: |d| {
            let c = tiny(d);
            std::fs::write(d.join("ft3"), b"not a model").unwrap();
            c.replace("/ft2\n", "/ft3\n")
        },
        words: &["ft3", "is not a directory"],
    },
    Bad {
        name: "fp8 checkpoint",
        setup: |d| {
            let c = tiny(d);
            for m in ["base", "ft1", "ft2"] {
                write_raw_safetensors(
                    &d.join(m).join("model.safetensors"),
                    r#"{"w":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}}"#,
                    4,
                );
            }
            c
        },
        words: &["`w`", "F8_E4M3", "bfloat16"],
    },
    Bad {
        name: "empty config",
        setup: |_| String::new(),
        words: &["config"],
    },
];

#[test]
fn bad_inputs_exit_2_with_a_clear_message_and_no_checkpoint() {
    for case in BAD {
        let dir = tmp();
        let cfg = (case.setup)(dir.path());
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let out = dir.path().join("out");
        let o = run(&["merge", cfg_path.to_str().unwrap(), out.to_str().unwrap()]);
        let t = text(&o);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{}: exit code; output: {t}",
            case.name
        );
        for w in case.words {
            assert!(t.contains(w), "{}: message lacks {w:?}: {t}", case.name);
        }
        assert!(
            !t.contains("panicked") && !t.contains("RUST_BACKTRACE"),
            "{}: {t}",
            case.name
        );
        assert!(
            !looks_complete(&out),
            "{}: left a complete-looking checkpoint",
            case.name
        );
        // `plan` sees the same problem before any weight is read.
        let p = run(&["plan", cfg_path.to_str().unwrap()]);
        assert_eq!(
            p.status.code(),
            Some(2),
            "{}: plan exit code: {}",
            case.name,
            text(&p)
        );
    }
}

#[test]
fn memory_limit_too_small_is_refused_up_front() {
    let out = tmp();
    let o = run(&[
        "merge",
        "examples/model_stock.yml",
        out.path().to_str().unwrap(),
        "--memory-limit",
        "1K",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--memory-limit"), "{}", text(&o));
    assert!(!looks_complete(out.path()));
}

#[test]
fn unwritable_output_is_refused() {
    let dir = tmp();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = file.join("out");
    let o = run(&["merge", "examples/model_stock.yml", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("a-file"), "{}", text(&o));
}

/// A small tmpfs, unmounted when dropped (the tests run as root on our machines).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> SmallDisk {
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(
            st.success(),
            "cannot mount a tmpfs at {} (needs root)",
            dir.display()
        );
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_is_a_clear_error_and_leaves_no_checkpoint() {
    let dir = tmp();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    // The example's side files fit; its ~55 KB of weights do not.
    let _mounted = SmallDisk::mount(&disk, "24k");
    let out = disk.join("out");
    let o = run(&["merge", "examples/model_stock.yml", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    for w in ["No space left", "filesystem is full", "out"] {
        assert!(text(&o).contains(w), "lacks {w:?}: {}", text(&o));
    }
    assert!(!looks_complete(&out));
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !left
            .iter()
            .any(|n| n.to_string_lossy().contains("safetensors")),
        "weights left behind: {left:?}"
    );
}

/// A synthetic set big enough that a merge into 1 MB shards takes a while.
fn slow_set(dir: &Path) -> std::path::PathBuf {
    let shape = mergefleet::synth::LlamaShape {
        hidden: 512,
        layers: 8,
        intermediate: 1536,
        vocab: 8192,
        heads: 8,
        kv_heads: 4,
        lm_head: true,
    };
    mergefleet::synth::write_set(dir, &shape, 3, 1).unwrap();
    dir.join("model_stock.yml")
}

/// Start a merge into many small shards and wait until the first one is visible.
fn start_and_wait_for_first_shard(cfg: &Path, out: &Path) -> std::process::Child {
    let mut child = std::process::Command::new(bin())
        .args(["merge", cfg.to_str().unwrap(), out.to_str().unwrap()])
        .args([
            "--out-shard-size",
            "1M",
            "--threads",
            "1",
            "--task-size",
            "1",
            "-q",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first_shard_visible = || {
        std::fs::read_dir(out).is_ok_and(|d| {
            d.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("model-00001-of-")
            })
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !first_shard_visible() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "merge ended before the first shard appeared"
        );
        assert!(std::time::Instant::now() < deadline, "no shard after 60 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child
}

#[test]
fn killed_merge_leaves_no_complete_checkpoint() {
    let dir = tmp();
    let cfg = slow_set(dir.path());
    let out = dir.path().join("out");
    let mut child = start_and_wait_for_first_shard(&cfg, &out);
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the merge finished before it was killed");
    assert!(
        !looks_complete(&out),
        "a killed merge left a complete-looking checkpoint"
    );
    // Running again refuses nothing (no complete checkpoint) and completes.
    let o = run(&[
        "merge",
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        "--out-shard-size",
        "1M",
        "-q",
    ]);
    assert_ok(&o);
    assert!(out.join("model.safetensors.index.json").exists());
}

#[test]
fn sigterm_cleans_up_partial_files() {
    let dir = tmp();
    let cfg = slow_set(dir.path());
    let out = dir.path().join("out");
    let mut child = start_and_wait_for_first_shard(&cfg, &out);
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = child.wait().unwrap();
    assert!(!status.success(), "the merge finished before SIGTERM");
    assert!(!looks_complete(&out));
    let partial: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".mergefleet-partial"))
        .collect();
    assert!(partial.is_empty(), "partial files left behind: {partial:?}");
}

/// Put the fixture models into a bucket of the S3 server.
fn upload_fixture_models(s3: &S3Server) {
    copy_dir(&fixtures().join("models"), &s3.bucket("models"));
    s3.bucket("merged");
}

#[test]
fn s3_in_and_out_is_byte_identical_to_local() {
    let s3 = S3Server::start();
    upload_fixture_models(&s3);
    for (case, _) in CASES {
        let local = tmp();
        merge_fixture(case, local.path(), &[]);
        let cfg = std::fs::read_to_string(fixtures().join(case).join("config.yml"))
            .unwrap()
            .replace("./models/", "s3://models/");
        let dir = tmp();
        std::fs::write(dir.path().join("config.yml"), &cfg).unwrap();
        let url = format!("s3://merged/{case}/");
        let ss = shard_size(case);
        let o = run_in(
            dir.path(),
            &["merge", "config.yml", &url, "--out-shard-size", &ss, "-q"],
            &s3.env(),
        );
        assert_ok(&o);
        let remote = s3.root.path().join("merged").join(case);
        assert_eq!(weight_files(&remote), weight_files(local.path()), "{case}");
        for f in weight_files(local.path())
            .iter()
            .map(String::as_str)
            .chain(["config.json"])
        {
            assert!(
                std::fs::read(remote.join(f)).unwrap()
                    == std::fs::read(local.path().join(f)).unwrap(),
                "{case}: {f} differs between S3 and local"
            );
        }
        // The plan works from S3 headers alone.
        let p = run_in(
            dir.path(),
            &["plan", "config.yml", "--out-shard-size", &ss],
            &s3.env(),
        );
        assert_ok(&p);
    }
}

#[test]
fn s3_errors_say_what_is_wrong() {
    let s3 = S3Server::start();
    upload_fixture_models(&s3);
    let dir = tmp();
    let cfg = std::fs::read_to_string(fixtures().join("basic_bf16/config.yml"))
        .unwrap()
        .replace("./models/", "s3://models/");
    std::fs::write(dir.path().join("config.yml"), &cfg).unwrap();
    let mut env = s3.env();
    env.push(("MERGEFLEET_RETRY_TIMEOUT_SECS".into(), "2".into()));

    // A missing bucket, for an input and for the output.
    std::fs::write(
        dir.path().join("nobucket.yml"),
        cfg.replace("s3://models/ft3", "s3://no-such-bucket/ft3"),
    )
    .unwrap();
    let o = run_in(
        dir.path(),
        &["merge", "nobucket.yml", "s3://merged/w/"],
        &env,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("s3://no-such-bucket/ft3"), "{}", text(&o));
    let o = run_in(
        dir.path(),
        &["merge", "config.yml", "s3://no-such-bucket/out/"],
        &env,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no-such-bucket"), "{}", text(&o));

    // A missing model prefix in the input bucket.
    std::fs::write(
        dir.path().join("bad.yml"),
        cfg.replace("s3://models/ft3", "s3://models/ft9"),
    )
    .unwrap();
    let o = run_in(dir.path(), &["merge", "bad.yml", "s3://merged/x/"], &env);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("s3://models/ft9"), "{}", text(&o));

    // Wrong credentials.
    let mut wrong = env.clone();
    wrong.retain(|(k, _)| k != "AWS_SECRET_ACCESS_KEY");
    wrong.push(("AWS_SECRET_ACCESS_KEY".into(), "wrong".into()));
    let o = run_in(
        dir.path(),
        &["merge", "config.yml", "s3://merged/y/"],
        &wrong,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("s3://models/"), "{}", text(&o));

    // An unreachable endpoint.
    let mut gone = env.clone();
    gone.retain(|(k, _)| k != "AWS_ENDPOINT");
    gone.push(("AWS_ENDPOINT".into(), "http://127.0.0.1:9".into()));
    let o = run_in(
        dir.path(),
        &["merge", "config.yml", "s3://merged/z/"],
        &gone,
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("s3://models/"), "{}", text(&o));
    assert!(!looks_complete(&s3.root.path().join("merged/z")));
}
