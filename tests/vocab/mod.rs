//! Vocabulary merges (`tokenizer_source`, `tokenizer:`, `chat_template`) against the real
//! mergekit's goldens (`tests/fixtures/vocab`, see its README): every tensor bit for bit
//! row by row, config.json equal as JSON, the output tokenizer loaded by transformers making
//! mergekit's tokens (and ids, where mergekit's are reproducible) and chat template; the
//! same bytes on a 3-worker cluster and streamed; the plan's vocabulary report; refusals.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::cluster::Cluster;
use crate::util::*;

fn dir() -> PathBuf {
    root().join("tests/fixtures/vocab")
}

const VOCAB: &[&str] = &["model.embed_tokens.weight", "lm_head.weight"];

/// Every golden case (`cases/*`).
fn cases() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir().join("cases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn expected(case: &str) -> serde_json::Value {
    let p = dir().join("cases").join(case).join("expected.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The output vocabulary of a merge, in id order (tokenizer.json's model vocabulary and
/// added tokens).
fn tokens(out: &Path) -> Vec<String> {
    let t: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tokenizer.json")).unwrap()).unwrap();
    let mut by_id: BTreeMap<u64, String> = t["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (v.as_u64().unwrap(), k.clone()))
        .collect();
    for a in t["added_tokens"].as_array().unwrap() {
        by_id.insert(
            a["id"].as_u64().unwrap(),
            a["content"].as_str().unwrap().into(),
        );
    }
    assert!(
        by_id.keys().copied().eq(0..by_id.len() as u64),
        "{}: ids not 0..n",
        out.display()
    );
    by_id.into_values().collect()
}

/// SHA-256 of every tensor; a vocabulary tensor's rows in the order of their tokens
/// sorted by text, then its padding rows (as make_goldens.py hashes mergekit's).
fn canonical_hashes(out: &Path, tokens: &[String]) -> BTreeMap<String, (Vec<usize>, String)> {
    let mut by_text: Vec<usize> = (0..tokens.len()).collect();
    by_text.sort_by(|&a, &b| tokens[a].cmp(&tokens[b]));
    read_checkpoint(out)
        .into_iter()
        .map(|(name, (_, shape, data))| {
            let bytes = if VOCAB.contains(&name.as_str()) {
                let size = data.len() / shape[0];
                let order = by_text.iter().copied().chain(tokens.len()..shape[0]);
                order
                    .flat_map(|i| data[i * size..(i + 1) * size].iter().copied())
                    .collect()
            } else {
                data
            };
            (name, (shape, sha256(&bytes)))
        })
        .collect()
}

/// Compare the merge in `out` with mergekit's for `case`: the vocabulary (ids too where
/// mergekit's are fixed), every tensor, config.json, the tokenizer files written.
fn assert_equals_mergekit(case: &str, out: &Path, how: &str) {
    let want = expected(case);
    let got_tokens = tokens(out);
    let want_tokens: Vec<String> = want["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let padded = want["padded"].as_u64().unwrap_or(0) as usize;
    // mergekit's padding row is the mean of the rows in its id order: comparable only
    // where its ids are fixed.
    assert!(
        padded <= want_tokens.len() || want["ids_fixed"].as_bool().unwrap(),
        "{case}: padding rows over ids that vary are not reproducible"
    );
    if want["ids_fixed"].as_bool().unwrap() {
        assert_eq!(got_tokens, want_tokens, "{case} {how}: token ids");
    } else {
        let (mut a, mut b) = (got_tokens.clone(), want_tokens.clone());
        a.sort();
        b.sort();
        assert_eq!(a, b, "{case} {how}: token set");
    }
    let got = canonical_hashes(out, &got_tokens);
    let tensors = want["tensors"].as_object().unwrap();
    let differ: Vec<&String> = tensors
        .iter()
        .filter(|(k, t)| {
            got.get(*k).map(|(s, h)| (s.clone(), h.as_str()))
                != Some((
                    serde_json::from_value(t["shape"].clone()).unwrap(),
                    t["sha256"].as_str().unwrap(),
                ))
        })
        .map(|(k, _)| k)
        .collect();
    assert!(
        differ.is_empty() && got.len() == tensors.len(),
        "{case} {how}: differs from mergekit in {differ:?} (of {:?})",
        got.keys().collect::<Vec<_>>()
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let cfg_text =
        std::fs::read_to_string(dir().join("cases").join(case).join("config.yml")).unwrap();
    if cfg_text.contains("base_model:") {
        assert_eq!(config, want["config"], "{case} {how}: config.json");
        for f in want["files"].as_array().unwrap() {
            assert!(
                out.join(f.as_str().unwrap()).exists(),
                "{case} {how}: {f} missing"
            );
        }
    } else {
        // Without a base, mergekit takes config.json and the tokenizer files from a model
        // picked in Python's set order; mergefleet from the first model.
        assert_eq!(
            config["vocab_size"], want["config"]["vocab_size"],
            "{case} {how}"
        );
    }
}

fn merge(case: &str, out: &Path, extra: &[&str]) {
    let cfg = dir().join("cases").join(case).join("config.yml");
    let mut args = vec![
        "merge",
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        "-q",
        "--random-seed",
        "0",
    ];
    args.extend_from_slice(extra);
    let env = vec![(
        "MERGEFLEET_MKL_RT".to_string(),
        crate::methods::mkl_rt().display().to_string(),
    )];
    assert_ok(&run_in(&dir(), &args, &env));
}

#[test]
fn every_case_equals_mergekit_and_tokenizes_as_mergekit() {
    let t = tmp();
    let mut check = vec![dir().join("check_tokenizer.py").display().to_string()];
    let all = cases();
    assert!(all.len() >= 30, "{all:?}");
    for case in &all {
        let out = t.path().join(case);
        merge(case, &out, &[]);
        assert_equals_mergekit(case, &out, "embedded");
        check.push(out.display().to_string());
        check.push(
            dir()
                .join("cases")
                .join(case)
                .join("expected.json")
                .display()
                .to_string(),
        );
    }
    let o = std::process::Command::new(torch_python())
        .args(&check)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn streamed_on_one_thread_and_on_three_workers_the_bytes_do_not_change() {
    for case in ["union_ties", "tokens_linear_f32", "pad_dare_ties_bf16"] {
        let t = tmp();
        let out = t.path().join("out");
        merge(
            case,
            &out,
            &[
                "--memory-limit",
                "2MB",
                "--task-size",
                "1",
                "--threads",
                "1",
            ],
        );
        assert_equals_mergekit(case, &out, "streamed");
    }
    for case in [
        "union_model_stock",
        "tokens_linear_f32",
        "pad_dare_ties_bf16",
    ] {
        let c = Cluster::new(&dir(), vec![]);
        let t = tmp();
        let out = t.path().join("out");
        let cfg = dir().join("cases").join(case).join("config.yml");
        c.merge_on_three(
            cfg.to_str().unwrap(),
            out.to_str().unwrap(),
            &[
                "--task-size",
                "1",
                "--out-shard-size",
                "100K",
                "--random-seed",
                "0",
            ],
            &[],
            120,
        );
        assert_equals_mergekit(case, &out, "3 workers");
    }
}

#[test]
fn plan_reports_the_vocabulary() {
    let cfg = |c: &str| dir().join("cases").join(c).join("config.yml");
    let o = run_in(&dir(), &["plan", cfg("union_ties").to_str().unwrap()], &[]);
    let out = assert_exit(&o, 0);
    assert!(
        out.contains("vocabulary (tokenizer_source): 362 tokens"),
        "{out}"
    );
    for want in [
        "320 from `./models/base`",
        "2 from `./models/chatml`",
        "40 from `./models/other`",
        "[362, 72]",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    let o = run_in(
        &dir(),
        &["plan", cfg("tokens_linear_f32").to_str().unwrap(), "--json"],
        &[],
    );
    let v: serde_json::Value = serde_json::from_str(&assert_exit(&o, 0)).unwrap();
    let voc = &v["vocabulary"];
    assert_eq!(
        (voc["size"].as_u64(), voc["padded"].as_u64()),
        (Some(324), Some(384))
    );
    assert_eq!(voc["in_no_model"], serde_json::json!(["<|new|>", "<tool>"]));
    assert_eq!(voc["from"][0]["tokens"], 320);
}

#[test]
fn bad_vocabulary_configs_are_refused_naming_the_key() {
    let t = tmp();
    // A model without tokenizer.json, one with only SentencePiece's tokenizer.model.
    let bare = t.path().join("bare");
    copy_dir(&dir().join("models/chatml"), &bare);
    std::fs::remove_file(bare.join("tokenizer.json")).unwrap();
    let sp = t.path().join("sp");
    copy_dir(&bare, &sp);
    std::fs::write(sp.join("tokenizer.model"), b"\x0a\x00").unwrap();
    let m = |name: &str| dir().join("models").join(name).display().to_string();
    let head = |method: &str| {
        format!(
            "models:\n  - model: {}\n    parameters: {{weight: 0.5}}\nbase_model: {}\nmerge_method: {method}\ndtype: bfloat16\n",
            m("chatml"),
            m("base")
        )
    };
    let cases = [
        (
            format!("{}tokenizer:\n  tokens:\n    <x>: {{source: {{kind: model_token, model: {}, token: nope}}}}\n", head("task_arithmetic"), m("chatml")),
            "`tokenizer.tokens.<x>.source.token`",
        ),
        (
            format!("{}tokenizer:\n  tokens:\n    <x>: {{source: {{kind: model_token, model: {}, token_id: 999}}}}\n", head("task_arithmetic"), m("base")),
            "`tokenizer.tokens.<x>.source.token_id`",
        ),
        (
            format!("{}tokenizer:\n  tokens:\n    <x>: {{}}\n", head("task_arithmetic")),
            "`tokenizer.tokens.<x>`",
        ),
        (
            format!("{}tokenizer_source: {}\n", head("task_arithmetic"), m("other")),
            "`tokenizer_source`",
        ),
        (
            head("task_arithmetic").replace(&m("chatml"), &bare.display().to_string())
                + "tokenizer_source: union\n",
            "no tokenizer files",
        ),
        (
            head("task_arithmetic").replace(&m("chatml"), &sp.display().to_string())
                + "tokenizer_source: base\n",
            "tokenizer.model",
        ),
        // Without a vocabulary merge, different vocabularies are refused with the way out.
        (head("task_arithmetic"), "tokenizer_source: union"),
    ];
    for (i, (yaml, want)) in cases.iter().enumerate() {
        let cfg = t.path().join(format!("c{i}.yml"));
        std::fs::write(&cfg, yaml).unwrap();
        let out = t.path().join(format!("out{i}"));
        let o = run_in(
            &dir(),
            &["merge", cfg.to_str().unwrap(), out.to_str().unwrap()],
            &[],
        );
        let e = assert_exit(&o, 2);
        assert!(e.contains(want), "case {i}: {want}: {e}");
        assert!(!out.exists(), "case {i}: wrote {}", out.display());
    }
}

#[test]
fn models_on_s3_give_the_bytes_of_local_models() {
    // Tokenizer files are read from the bucket, the output (tokenizer included) written there.
    let s3 = S3Server::start();
    copy_dir(&dir().join("models"), &s3.bucket("models"));
    s3.bucket("merged");
    for case in ["union_ties", "tokens_linear_f32", "chat_auto_linear"] {
        let local = tmp();
        let here = local.path().join("out");
        merge(case, &here, &[]);
        let cfg = std::fs::read_to_string(dir().join("cases").join(case).join("config.yml"))
            .unwrap()
            .replace("./models/", "s3://models/");
        let work = tmp();
        std::fs::write(work.path().join("config.yml"), &cfg).unwrap();
        let url = format!("s3://merged/{case}/");
        let o = run_in(
            work.path(),
            &["merge", "config.yml", &url, "-q", "--random-seed", "0"],
            &s3.env(),
        );
        assert_ok(&o);
        let remote = s3.root.path().join("merged").join(case);
        for f in [
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
        ] {
            assert_eq!(
                std::fs::read(remote.join(f)).ok(),
                std::fs::read(here.join(f)).ok(),
                "{case}: {f} differs between S3 and local"
            );
        }
    }
}

/// The sized set's vocabulary of `model` (make_goldens.py's `sized_vocab`): 32000 tokens
/// `t0`.., in order for base and ft1, permuted for ft2, every 32nd replaced by a token of
/// its own for ft3.
fn sized_vocab(model: &str) -> serde_json::Map<String, serde_json::Value> {
    (0..32000u64)
        .map(|i| {
            let (token, id) = match model {
                "ft2" => (format!("t{i}"), (i * 7919) % 32000),
                "ft3" if i % 32 == 5 => (format!("n{}", i / 32), i),
                _ => (format!("t{i}"), i),
            };
            (token, id.into())
        })
        .collect()
}

/// The fidelity tests' real-size set (65.5M-element embeddings and head) with those
/// tokenizers, written once.
fn sized_set() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vocab-sized-set");
    let real = crate::fidelity::real_set();
    if !dir.join("complete").exists() {
        for m in ["base", "ft1", "ft2", "ft3"] {
            let d = dir.join(m);
            std::fs::create_dir_all(&d).unwrap();
            for f in ["config.json", "model.safetensors"] {
                let _ = std::fs::remove_file(d.join(f));
                std::os::unix::fs::symlink(real.join(m).join(f), d.join(f)).unwrap();
            }
            let tok = serde_json::json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
                "model": {"type": "BPE", "dropout": null, "unk_token": null,
                    "continuing_subword_prefix": null, "end_of_word_suffix": null,
                    "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                    "vocab": sized_vocab(m), "merges": []}
            });
            std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
        }
        std::fs::write(dir.join("complete"), "").unwrap();
    }
    dir
}

#[test]
fn real_size_tensors_equal_mergekit() {
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("sized.json")).unwrap()).unwrap();
    let set = sized_set();
    for (case, g) in golden.as_object().unwrap() {
        let t = tmp();
        let cfg = t.path().join("config.yml");
        std::fs::write(&cfg, serde_yaml::to_string(&g["config"]).unwrap()).unwrap();
        let out = t.path().join("out");
        let o = run_in(
            &set,
            &["merge", cfg.to_str().unwrap(), out.to_str().unwrap(), "-q"],
            &[],
        );
        assert_ok(&o);
        let got = canonical_hashes(&out, &tokens(&out));
        for (name, want) in g["tensors"].as_object().unwrap() {
            let shape: Vec<usize> = serde_json::from_value(want["shape"].clone()).unwrap();
            assert_eq!(
                got.get(name),
                Some(&(shape, want["sha256"].as_str().unwrap().to_string())),
                "{case}: {name}"
            );
        }
        assert_eq!(got.len(), g["tensors"].as_object().unwrap().len(), "{case}");
    }
}
