//! LoRA adapters (`model+adapter`) against the real mergekit's goldens (`tests/fixtures/lora`,
//! made with peft 0.21.2 and `--lora-merge-cache`): every tensor of every adapted model
//! equals what mergekit's PEFT step wrote, bit for bit; model_stock over adapted models
//! equals mergekit's output, embedded and on a 2-worker cluster; what PEFT merges
//! differently is refused, naming it.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::cluster::Cluster;
use crate::util::*;

fn dir() -> PathBuf {
    root().join("tests/fixtures/lora")
}

fn hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The `model: BASE+ADAPTER` of an apply case's config, as paths.
fn case_paths(config: &Path) -> (PathBuf, PathBuf) {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("- model: "))
        .unwrap();
    let (base, adapter) = line.split_once('+').unwrap();
    (dir().join(base), dir().join(adapter))
}

/// Adapt every tensor of `base` with the adapter at `adapter` through the library (the
/// same code the executor runs on read), returning name -> bytes.
fn adapt(base: &Path, adapter: &Path) -> Tensors {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stores = mergefleet::store::Stores::new();
    let a = rt
        .block_on(mergefleet::source::adapter::open_adapter(
            &stores,
            adapter.to_str().unwrap(),
            "adapter",
        ))
        .unwrap();
    let adapter_file = read_safetensors(&adapter.join("adapter_model.safetensors"));
    let raw = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let mut out = read_safetensors(&base.join("model.safetensors"));
    assert!(!adapter_file.is_empty());
    for (name, (dtype, shape, bytes)) in out.iter_mut() {
        let Some(pair) = a.pairs.get(name) else {
            continue;
        };
        let st = |d: &str| mergefleet::dtype::parse(d).unwrap();
        let f = mergefleet::lora::LoraFactors::new(
            &raw[pair.a.start as usize..pair.a.end as usize],
            pair.a.dtype,
            &raw[pair.b.start as usize..pair.b.end as usize],
            pair.b.dtype,
            pair.a.shape[0],
            pair.scaling,
        );
        let mut adapted = vec![0u8; bytes.len()];
        f.apply(bytes, st(dtype), 0, shape[1], &mut adapted);
        *bytes = adapted;
    }
    out
}

#[test]
fn every_adapted_tensor_equals_what_mergekits_peft_step_wrote() {
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("apply/expected_sha256.json")).unwrap())
            .unwrap();
    let mut checked = 0;
    for (case, want) in expected.as_object().unwrap() {
        // Made with `--lora-merge-dtype`, which mergefleet does not take; and the refusals,
        // tested below.
        if case.starts_with("unsupported_") || !want["mergekit_flags"].as_str().unwrap().is_empty()
        {
            continue;
        }
        let (base, adapter) = case_paths(&dir().join(want["config"].as_str().unwrap()));
        let got = adapt(&base, &adapter);
        for (name, t) in want["tensors"].as_object().unwrap() {
            let (_, shape, bytes) = &got[name];
            assert_eq!(serde_json::json!(shape), t["shape"], "{case}: {name} shape");
            assert_eq!(hex(bytes), t["sha256"].as_str().unwrap(), "{case}: {name}");
            checked += 1;
        }
    }
    assert!(checked >= 11 * 20, "{checked} tensors checked");
}

/// Merge `case`'s config (paths relative to the LoRA fixtures) and compare every tensor with
/// mergekit's output.
fn merge_equals_mergekit(case: &str, extra: &[&str]) -> TempDir {
    let out = tmp();
    let target = out.path().join("out");
    let cfg = dir().join(case).join("config.yml");
    let mut args = vec![
        "merge",
        cfg.to_str().unwrap(),
        target.to_str().unwrap(),
        "-q",
    ];
    args.extend_from_slice(extra);
    assert_ok(&run_in(&dir(), &args, &[]));
    assert_eq!(
        read_checkpoint(&target),
        read_checkpoint(&dir().join(case).join("expected")),
        "{case}"
    );
    out
}

#[test]
fn model_stock_over_adapted_models_equals_mergekit() {
    merge_equals_mergekit("model_stock_bf16", &[]);
    merge_equals_mergekit("model_stock_tied_bf16", &[]);
    // Three adapters on one base: three models, not one named thrice. Streamed too.
    merge_equals_mergekit("model_stock_f32_three_adapters", &[]);
    merge_equals_mergekit(
        "model_stock_f32_three_adapters",
        &["--memory-limit", "2MiB", "--threads", "1"],
    );
}

#[test]
fn a_two_worker_cluster_applies_adapters_as_embedded_mode_does() {
    let c = Cluster::new(&dir(), vec![]);
    let out = tmp();
    let target = out.path().join("out");
    let cfg = dir().join("model_stock_f32_three_adapters/config.yml");
    let mut coord = c.coordinator(
        cfg.to_str().unwrap(),
        target.to_str().unwrap(),
        &["--task-size", "1", "--out-shard-size", "100K"],
        "coordinator.log",
    );
    let mut workers = c.workers(2, &[]);
    assert_exit_ok(&mut coord, 120);
    for w in &mut workers {
        assert_exit_ok(w, 60);
    }
    assert_eq!(
        read_checkpoint(&target),
        read_checkpoint(&dir().join("model_stock_f32_three_adapters/expected"))
    );
}

#[test]
fn adapters_peft_merges_differently_are_refused_naming_why() {
    let work = tmp();
    for (adapter, want) in [
        ("dora", "use_dora"),
        ("modules_to_save", "modules_to_save"),
        ("embed_lm_head", "not a LoRA factor"),
        ("extra_tensors", "not a LoRA factor"),
    ] {
        let cfg = work.path().join(format!("{adapter}.yml"));
        std::fs::write(
            &cfg,
            format!(
                "models:\n  - model: {base}+{a}\n  - model: {base}+{ok}\nmerge_method: model_stock\nbase_model: {base}\ndtype: float32\n",
                base = dir().join("models/base_f32").display(),
                a = dir().join("adapters/unsupported").join(adapter).display(),
                ok = dir().join("adapters/f32_r8").display(),
            ),
        )
        .unwrap();
        let out = work.path().join("out");
        let o = run_in(
            work.path(),
            &["merge", cfg.to_str().unwrap(), out.to_str().unwrap()],
            &[],
        );
        let t = assert_exit(&o, 2);
        assert!(
            t.contains(want) && t.contains(adapter),
            "{adapter}: wanted `{want}` in {t}"
        );
        assert!(!out.exists());
    }
}
