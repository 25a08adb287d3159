//! The contract, embedded mode: a user's models are never written, one output has one
//! owner, an overwrite leaves nothing of the old checkpoint, and the edges a careless user
//! or operator reaches (YAML merge keys, spellings of one model, float64, absurd flags)
//! behave. Each test reproduces a report that once lost or changed data.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::util::*;

/// Every file under `dir` with its bytes: what "untouched" is compared against.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let key = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(key, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The tiny example models in `dir` (base, ft1, ft2) and a config merging them.
fn tiny_set(dir: &Path) -> std::path::PathBuf {
    for m in ["base", "ft1", "ft2"] {
        copy_dir(&root().join("examples/models").join(m), &dir.join(m));
    }
    write_config(dir, "base", &["ft1", "ft2"], "dtype: bfloat16\n")
}

fn write_config(dir: &Path, base: &str, models: &[&str], extra: &str) -> std::path::PathBuf {
    let list: String = models.iter().map(|m| format!("  - model: {m}\n")).collect();
    let cfg = dir.join("config.yml");
    std::fs::write(
        &cfg,
        format!("models:\n{list}merge_method: model_stock\nbase_model: {base}\n{extra}"),
    )
    .unwrap();
    cfg
}

#[track_caller]
fn assert_refused(o: &std::process::Output, words: &[&str]) {
    assert_exit(o, 2);
    for w in words {
        assert!(text(o).contains(w), "missing {w:?} in: {}", text(o));
    }
}

#[test]
fn an_output_overlapping_an_input_is_refused_and_the_input_kept() {
    let d = tmp();
    let dir = d.path();
    tiny_set(dir);
    std::os::unix::fs::symlink(dir.join("base"), dir.join("base-link")).unwrap();
    let before = snapshot(dir);
    let base = dir.join("base").display().to_string();
    let cases: Vec<(String, &str)> = vec![
        (base.clone(), "is"),
        (format!("{base}/"), "is"),
        (format!("file://{base}"), "is"),
        (dir.join("base-link").display().to_string(), "is"),
        (dir.join("ft2").display().to_string(), "is"),
        (dir.join("base/merged").display().to_string(), "lies inside"),
        (dir.display().to_string(), "contains"),
    ];
    for (out, how) in &cases {
        for cmd in ["merge", "coordinator"] {
            let port = format!("127.0.0.1:{}", free_port());
            let mut args = vec![cmd, "config.yml", out.as_str(), "--overwrite"];
            if cmd == "coordinator" {
                args.extend(["--listen", &port, "--insecure"]);
            }
            let o = run_in(dir, &args, &[]);
            assert_refused(&o, &[how, "input model", "choose another output"]);
        }
    }
    assert_eq!(snapshot(dir), before, "an input changed");
}

#[test]
fn an_s3_output_overlapping_an_input_is_refused_and_the_input_kept() {
    let s3 = S3Server::start();
    let models = s3.bucket("models");
    tiny_set(&models);
    copy_dir(&models.join("ft2"), &models.join("ft2_copy"));
    let d = tmp();
    write_config(
        d.path(),
        "s3://models/base",
        &["s3://models/ft1", "s3://models/ft2_copy"],
        "",
    );
    let before = snapshot(&models);
    for (out, how) in [
        ("s3://models/ft2_copy", "is"),
        ("s3://models/ft2_copy/", "is"),
        ("s3://models/", "contains"),
        ("s3://models/base/x", "lies inside"),
    ] {
        let o = run_in(
            d.path(),
            &["merge", "config.yml", out, "--overwrite"],
            &s3.env(),
        );
        assert_refused(&o, &[how, "input model"]);
    }
    assert_eq!(snapshot(&models), before, "an input object changed");
    // A sibling prefix with a shared name start is another place: that merge works.
    s3.bucket("models");
    let o = run_in(
        d.path(),
        &["merge", "config.yml", "s3://models/ft2_copy_merged", "-q"],
        &s3.env(),
    );
    assert_ok(&o);
}

#[test]
fn one_model_in_two_spellings_is_refused() {
    let d = tmp();
    let dir = d.path();
    tiny_set(dir);
    std::os::unix::fs::symlink(dir.join("ft1"), dir.join("ft1-link")).unwrap();
    for (a, b) in [
        ("./ft1", "ft1/"),
        ("ft1", "./x/../ft1"),
        ("ft1", "ft1-link"),
        ("ft1", &*format!("file://{}/ft1", dir.display())),
    ] {
        write_config(dir, "base", &[a, b, "ft2"], "");
        let o = run_in(dir, &["plan", "config.yml"], &[]);
        assert_refused(&o, &["listed twice"]);
    }
    let abs_base = dir.join("base").display().to_string();
    write_config(dir, "base", &["ft1", &abs_base, "ft2"], "");
    let o = run_in(dir, &["plan", "config.yml"], &[]);
    assert_refused(&o, &["listed twice", "base_model"]);
}

#[test]
fn a_second_merge_on_a_held_output_is_refused() {
    let d = tmp();
    let cfg = crate::interrupted::slow_set(d.path());
    let out = d.path().join("out");
    let mut first = crate::interrupted::start_and_wait_for_first_shard(&cfg, &out);
    let o = run(&[
        "merge",
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        "--overwrite",
    ]);
    assert_refused(&o, &["is being written by", "merge (pid", "since"]);
    assert!(first.wait().unwrap().success(), "the first merge failed");
    assert!(looks_complete(&out));
    assert!(
        !out.join(".mergefleet.lock").exists(),
        "the lock file stayed"
    );
    // Free again: a later merge takes it.
    assert_ok(&run(&[
        "merge",
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        "--overwrite",
        "-q",
    ]));
}

#[test]
fn overwrite_removes_every_file_of_the_old_checkpoint() {
    let d = tmp();
    let out = d.path().join("out");
    let o = out.to_str().unwrap();
    assert_ok(&run(&["merge", "examples/model_stock.yml", o, "-q"]));
    std::fs::write(out.join("model-00009-of-00009.safetensors"), b"stale").unwrap();
    std::fs::write(out.join("chat_template.jinja"), b"stale").unwrap();
    std::fs::write(out.join("notes.txt"), b"the user's").unwrap();
    // Single file -> shards: the old model.safetensors would win over the new index.
    assert_ok(&run(&[
        "merge",
        "examples/model_stock.yml",
        o,
        "--overwrite",
        "--out-shard-size",
        "20K",
        "-q",
    ]));
    let files = weight_files(&out);
    assert!(
        !files.contains(&"model.safetensors".to_string()),
        "{files:?}"
    );
    assert!(!out.join("model-00009-of-00009.safetensors").exists());
    assert!(!out.join("chat_template.jinja").exists());
    assert!(
        out.join("notes.txt").exists(),
        "a file not of the checkpoint was removed"
    );
    let map = weight_map(&out).unwrap();
    let named: std::collections::BTreeSet<&str> = map
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    let shards: std::collections::BTreeSet<&str> = files
        .iter()
        .map(String::as_str)
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    assert_eq!(shards, named, "weight files other than the index names");
}

#[test]
fn yaml_merge_keys_change_the_merge_like_pyyaml() {
    let d = tmp();
    tiny_set(d.path());
    let merged = |extra: &str| {
        write_config(d.path(), "base", &["ft1", "ft2"], extra);
        let out = d.path().join("out");
        assert_ok(&run_in(
            d.path(),
            &[
                "merge",
                "config.yml",
                out.to_str().unwrap(),
                "--overwrite",
                "-q",
            ],
            &[],
        ));
        std::fs::read(out.join("model.safetensors")).unwrap()
    };
    let explicit = merged("parameters: {filter_wise: true}\n");
    let via_merge_key = merged("defaults: &d {filter_wise: true}\nparameters: {<<: *d}\n");
    let off = merged("parameters: {filter_wise: false}\n");
    assert_eq!(explicit, via_merge_key);
    assert_ne!(explicit, off, "filter_wise made no difference: a weak test");
}

#[test]
fn chat_template_and_generation_config_are_copied() {
    let d = tmp();
    tiny_set(d.path());
    let base = d.path().join("base");
    let template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}";
    std::fs::write(base.join("chat_template.jinja"), template).unwrap();
    let gen = r#"{"bos_token_id": 1, "eos_token_id": [2, 7], "temperature": 0.6, "top_p": 0.9}"#;
    std::fs::write(base.join("generation_config.json"), gen).unwrap();
    let out = d.path().join("out");
    assert_ok(&run_in(
        d.path(),
        &["merge", "config.yml", out.to_str().unwrap(), "-q"],
        &[],
    ));
    for f in [
        "chat_template.jinja",
        "generation_config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(base.join(f)).unwrap(),
            "{f}"
        );
    }
}

/// Write a model of float64 tensors `w` ([8, 16]) and `norm` ([16]).
fn f64_model(dir: &Path, seed: u64) {
    use safetensors::tensor::TensorView;
    std::fs::create_dir_all(dir).unwrap();
    let mut s = seed | 1;
    let mut vals = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let noise = (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                (0.01 * i as f64 + 1e-3 * noise).to_le_bytes()
            })
            .collect()
    };
    let (w, n) = (vals(128), vals(16));
    let tensors = [
        (
            "w",
            TensorView::new(safetensors::Dtype::F64, vec![8, 16], &w).unwrap(),
        ),
        (
            "norm",
            TensorView::new(safetensors::Dtype::F64, vec![16], &n).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(tensors, None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"torch_dtype": "float64"}"#).unwrap();
}

#[test]
fn float64_inputs_stay_float64() {
    let d = tmp();
    for (i, m) in ["base", "a", "b", "c"].iter().enumerate() {
        f64_model(&d.path().join(m), i as u64 + 1);
    }
    write_config(d.path(), "base", &["a", "b", "c"], "");
    let out = d.path().join("out");
    assert_ok(&run_in(
        d.path(),
        &["merge", "config.yml", out.to_str().unwrap(), "-q"],
        &[],
    ));
    let got = read_checkpoint(&out);
    for (name, (dtype, _, bytes)) in &got {
        assert_eq!(dtype, "F64", "{name}");
        assert_eq!(bytes.len() % 8, 0);
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    // mergekit (transformers 5) reads the base's torch_dtype as dtype and writes dtype.
    assert_eq!(cfg["dtype"], "float64");
    assert!(cfg.get("torch_dtype").is_none(), "{cfg}");
}

#[test]
fn plan_refuses_what_merge_refuses() {
    let d = tmp();
    tiny_set(d.path());
    std::fs::write(d.path().join("base/config.json"), "{ not json").unwrap();
    let o = run_in(d.path(), &["plan", "config.yml"], &[]);
    assert_refused(&o, &["config.json", "not valid JSON"]);
    // The file is named once, not twice.
    let path = d.path().join("base/config.json").display().to_string();
    assert_eq!(text(&o).matches(&path).count(), 1, "{}", text(&o));
}

#[test]
fn absurd_thread_counts_are_capped_or_refused() {
    let out = tmp();
    let o = run(&[
        "merge",
        "examples/model_stock.yml",
        out.path().to_str().unwrap(),
        "--threads",
        "5000",
        "--overwrite",
    ]);
    assert_ok(&o);
    assert!(
        text(&o).contains("--threads 5000 is more than"),
        "{}",
        text(&o)
    );
    let o = run(&["merge", "examples/model_stock.yml", "x", "--threads", "0"]);
    assert_exit(&o, 2);
}

#[test]
fn an_s3_outage_of_40_s_mid_merge_is_survived() {
    let mut s3 = S3Server::start();
    let (d, cfg) = s3.slow_set();
    let log = d.path().join("merge.log");
    let mut p = Proc::spawn(&S3Server::SLOW_MERGE, d.path(), &s3.env(), log);
    // Wait until the merge moves weights (a first shard is complete), then take the store
    // away for 40 s: longer than the 50 tries that once bound, shorter than 120 s.
    let out_dir = s3.root.path().join("merged/out");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_dir(&out_dir).is_ok_and(|d| {
        d.flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("model-00001-of-")
        })
    }) {
        assert!(std::time::Instant::now() < deadline, "{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    s3.restart_after(Duration::from_secs(40));
    assert_exit_ok(&mut p, 240);
    let want = tmp();
    assert_ok(&run(&[
        "merge",
        cfg.to_str().unwrap(),
        want.path().to_str().unwrap(),
        "--out-shard-size",
        "1M",
        "--overwrite",
        "-q",
    ]));
    assert_same_checkpoint(&s3.root.path().join("merged/out"), want.path());
}

/// One generated merge: a config over the fixture models and the flags it runs with.
#[derive(Debug, Clone)]
struct GeneratedMerge {
    yaml: String,
    /// Flags `plan` and `merge` both take.
    flags: Vec<String>,
    /// `merge`'s `--memory-limit`, which `plan` does not take.
    memory_limit: Option<&'static str>,
}

fn generated_merge() -> impl proptest::strategy::Strategy<Value = GeneratedMerge> {
    use proptest::prelude::*;
    let dtypes = prop_oneof![
        Just(None),
        Just(Some("bfloat16")),
        Just(Some("torch.float16")),
        Just(Some("float32")),
        Just(Some("float64")),
    ];
    // (base, fine-tunes): the plain set, the tied-embedding set, the FP8 set, a mixed set.
    let sets = prop_oneof![
        Just((
            "models/base",
            vec!["models/ft1", "models/ft2", "models/ft3"]
        )),
        Just(("models/base", vec!["models/ft1", "models/ft_zero"])),
        Just(("models/base_sh", vec!["models/ft1_sh", "models/ft2_sh"])),
        Just((
            "models/tied_base",
            vec!["models/tied_ft1", "models/tied_ft2"]
        )),
        Just((
            "../fp8/models/base_fp8",
            vec!["../fp8/models/ft1_fp8", "../fp8/models/ft2_fp8"]
        )),
        Just(("../fp8/models/base_fp8", vec!["models/ft1", "models/ft2"])),
    ];
    let filter_wise = prop_oneof![
        Just(""),
        Just("parameters: {filter_wise: true}\n"),
        Just("parameters: {filter_wise: off}\n"),
        Just("parameters:\n  filter_wise: [{filter: mlp, value: true}, {value: false}]\n"),
    ];
    let flags = (
        any::<bool>(),
        prop_oneof![Just(None), Just(Some("1")), Just(Some("64KiB"))],
        prop_oneof![Just(None), Just(Some("100K"))],
        prop_oneof![Just(None), Just(Some("8MiB"))],
        prop_oneof![Just("torch"), Just("exact")],
    );
    (sets, dtypes.clone(), dtypes, filter_wise, flags).prop_map(
        |((base, fts), dtype, out_dtype, fw, (q, task, shard, mem, red))| {
            let mut yaml = String::from("models:\n");
            for m in fts {
                yaml.push_str(&format!("  - model: {m}\n"));
            }
            yaml.push_str(&format!(
                "merge_method: model_stock\nbase_model: {base}\n{fw}"
            ));
            if let Some(d) = dtype {
                yaml.push_str(&format!("dtype: {d}\n"));
            }
            if let Some(d) = out_dtype {
                yaml.push_str(&format!("out_dtype: {d}\n"));
            }
            let mut flags = vec![format!("--reductions={red}")];
            if q {
                flags.push("--quantize=fp8".into());
            }
            for (flag, v) in [("--task-size", task), ("--out-shard-size", shard)] {
                if let Some(v) = v {
                    flags.push(format!("{flag}={v}"));
                }
            }
            GeneratedMerge {
                yaml,
                flags,
                memory_limit: mem,
            }
        },
    )
}

/// Whatever `plan` accepts, `merge` merges, and what `plan` refuses, `merge` refuses the
/// same way: over generated configs (models, dtypes, filter_wise, FP8 inputs and output,
/// task and shard sizes, memory limits, reduction orders), the two commands exit alike,
/// with 0 or 2, never a crash.
#[test]
fn plan_and_merge_agree_on_generated_configs() {
    use proptest::test_runner::{Config, TestRunner};
    let dir = fixtures();
    let scratch = tmp();
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let count = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&generated_merge(), |g| {
            let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let cfg = scratch.path().join(format!("c{n}.yml"));
            std::fs::write(&cfg, &g.yaml).unwrap();
            let out = scratch.path().join(format!("o{n}"));
            let flags: Vec<&str> = g.flags.iter().map(String::as_str).collect();
            let plan = run_in(
                &dir,
                &[&["plan", cfg.to_str().unwrap()], &flags[..]].concat(),
                &[],
            );
            let limit = g.memory_limit.map(|l| format!("--memory-limit={l}"));
            let mut merge_args = vec!["merge", cfg.to_str().unwrap(), out.to_str().unwrap(), "-q"];
            merge_args.extend(&flags);
            merge_args.extend(limit.as_deref());
            let merge = run_in(&dir, &merge_args, &[]);
            let (p, m) = (plan.status.code(), merge.status.code());
            // A memory limit is merge's alone: it may refuse one too small, naming it.
            let limit_refused = p == Some(0)
                && m == Some(2)
                && limit.is_some()
                && text(&merge).contains("--memory-limit");
            proptest::prop_assert!(
                (p == m || limit_refused) && matches!(m, Some(0 | 2)),
                "plan exit {p:?}, merge exit {m:?}\n{}\n{:?}\nplan: {}\nmerge: {}",
                g.yaml,
                g.flags,
                text(&plan),
                text(&merge)
            );
            if m == Some(0) {
                proptest::prop_assert!(looks_complete(&out));
                proptest::prop_assert!(!read_checkpoint(&out).is_empty());
            }
            Ok(())
        })
        .unwrap();
}
