//! Bad input gets a clear error (exit 2, the file/tensor/key named) and leaves no
//! checkpoint: a table of broken models and configs, too little memory, an unwritable output
//! and a full disk.

use std::path::Path;

use crate::util::*;

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
        setup: |d| tiny(d).replace("model_stock", "model_soup"),
        words: &["merge_method", "model_soup", "not a mergekit method"],
    },
    Bad {
        name: "one fine-tune",
        setup: |d| tiny(d).replace(&format!("  - model: {}/ft2\n", d.display()), ""),
        words: &["at least 2 models"],
    },
    Bad {
        name: "duplicated model",
        setup: |d| tiny(d).replace("/ft2\n", "/ft1\n"),
        words: &["listed twice"],
    },
    Bad {
        name: "slices and models",
        setup: |d| tiny(d) + "slices: []\n",
        words: &["`slices`", "not both"],
    },
    Bad {
        name: "tokenizer_source",
        setup: |d| tiny(d) + "tokenizer_source: base\n",
        words: &["`tokenizer_source`"],
    },
    Bad {
        name: "lora adapter that is a model",
        setup: |d| tiny(d).replace("/ft1\n", &format!("/ft1+{}/ft2\n", d.display())),
        words: &["adapter_config.json", "LoRA adapter", "ft2"],
    },
    Bad {
        name: "lora adapter missing",
        setup: |d| tiny(d).replace("/ft1\n", &format!("/ft1+{}/no-adapter\n", d.display())),
        words: &["no-adapter", "no folder"],
    },
    Bad {
        name: "missing model dir",
        setup: |d| tiny(d).replace("/ft2\n", "/nope\n"),
        words: &["nope", "no folder", "not a Hugging Face repo id"],
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
    assert_exit(&o, 2);
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
    assert_exit(&o, 2);
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
    assert_exit(&o, 2);
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
