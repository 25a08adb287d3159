//! mergekit's other methods against the real mergekit's goldens (`tests/fixtures/methods`,
//! made with `mergekit-yaml -j 1`, see its README): every tensor bit for bit, embedded,
//! streamed under a small memory limit on one thread, and on a 3-worker cluster; the
//! card names the method; `plan` shows the resolved parameters.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::cluster::Cluster;
use crate::util::*;

mod slices;

fn dir() -> PathBuf {
    root().join("tests/fixtures/methods")
}

/// Every golden case: (folder, what the model card calls the method).
const CASES: &[(&str, &str)] = &[
    ("linear_bf16", "[Linear](https://arxiv.org/abs/2203.05482)"),
    ("linear_f32_base_listed", "[Linear]"),
    ("linear_f16_base_appended", "[Linear]"),
    (
        "task_arithmetic_bf16",
        "[Task Arithmetic](https://arxiv.org/abs/2212.04089)",
    ),
    ("task_arithmetic_f32_five", "[Task Arithmetic]"),
    ("task_arithmetic_f16_filtered", "[Task Arithmetic]"),
    ("ties_bf16", "[TIES](https://arxiv.org/abs/2306.01708)"),
    ("ties_f32_rescale", "[TIES]"),
    ("ties_f16_filtered", "[TIES]"),
    (
        "dare_ties_bf16",
        "[DARE TIES](https://arxiv.org/abs/2311.03099)",
    ),
    ("dare_linear_f16", "[Linear DARE]"),
    ("dare_ties_f32_plain", "[DARE TIES]"),
    (
        "breadcrumbs_bf16",
        "[Model Breadcrumbs](https://arxiv.org/abs/2312.06795)",
    ),
    ("breadcrumbs_ties_f32", "[Model Breadcrumbs with TIES]"),
    ("breadcrumbs_f16", "[Model Breadcrumbs]"),
    ("della_bf16", "[DELLA](https://arxiv.org/abs/2406.11617)"),
    ("della_linear_f32", "[Linear DELLA]"),
    ("della_f16", "[DELLA]"),
    (
        "nearswap_bf16",
        "[NearSwap](https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)",
    ),
    ("nearswap_f32", "[NearSwap]"),
    ("nearswap_f16", "[NearSwap]"),
    (
        "ram_bf16",
        "[Reinforced Agent Merging](https://arxiv.org/abs/2601.13572)",
    ),
    ("ram_f32_five", "[Reinforced Agent Merging]"),
    ("ram_f16", "[Reinforced Agent Merging]"),
    (
        "ramplus_tl_bf16",
        "[Reinforced Agent Merging Plus (Tensor-Local)]",
    ),
    (
        "ramplus_tl_f16",
        "[Reinforced Agent Merging Plus (Tensor-Local)]",
    ),
    (
        "ramplus_tl_f32",
        "[Reinforced Agent Merging Plus (Tensor-Local)]",
    ),
    ("sce_bf16", "[SCE](https://arxiv.org/abs/2408.07990)"),
    ("sce_f32_all", "[SCE]"),
    ("sce_f16", "[SCE]"),
    ("slerp_bf16", "[SLERP](https://en.wikipedia.org/wiki/Slerp)"),
    ("slerp_f16_slices", "[SLERP]"),
    ("slerp_f32_gradient", "[SLERP]"),
    ("slerp_f32_gpt2_slices", "[SLERP]"),
    ("nuslerp_bf16_base", "using the NuSLERP merge method"),
    ("nuslerp_f32_rows", "NuSLERP"),
    ("nuslerp_f16_plain", "NuSLERP"),
    ("nuslerp_bf16_row_wise", "NuSLERP"),
    ("nuslerp_f32_row_wise", "NuSLERP"),
    (
        "multislerp_bf16_base",
        "[Multi-SLERP](https://goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
    ),
    ("multislerp_f32_plain", "[Multi-SLERP]"),
    ("multislerp_f16_three", "[Multi-SLERP]"),
    (
        "karcher_bf16",
        "[Karcher Mean](https://arxiv.org/abs/2603.04972)",
    ),
    ("karcher_far_bf16", "[Karcher Mean]"),
    ("karcher_f16_iter", "[Karcher Mean]"),
    ("karcher_f32", "[Karcher Mean]"),
    (
        "passthrough_bf16_frankenmerge",
        "using the Passthrough merge method",
    ),
    ("passthrough_f32_gpt2", "Passthrough"),
    ("passthrough_f16_gpt2_plain", "Passthrough"),
];

/// mergekit's output for small case `case`: the SHA-256 of its file and of each tensor,
/// and config.json's `dtype` (`expected.json`, written by `make_goldens.py`).
fn expected(case: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir().join(case).join("expected.json")).unwrap()).unwrap()
}

fn sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// MKL's single library, whose float32 acos/sin/cos torch uses (`.ci/run` installs PyPI's
/// `mkl==2024.2.2` in its venv; `MERGEFLEET_MKL_RT` to use another).
pub fn mkl_rt() -> PathBuf {
    ci_venv(
        "lib/libmkl_rt.so.2",
        "MERGEFLEET_MKL_RT",
        "PyPI's mkl==2024.2.2",
    )
}

/// MKL's transcendental functions loaded.
fn mkl_env() -> Vec<(String, String)> {
    vec![("MERGEFLEET_MKL_RT".into(), mkl_rt().display().to_string())]
}

/// The environment a case's merge runs in: MKL's transcendental functions for the
/// spherical methods (slerp, nuslerp, multislerp, karcher) (their float32 bits depend on them, and now and then a 16-bit
/// rounding does: one float16 tensor of `five_slerp_f16` without them).
fn case_env(case: &str) -> Vec<(String, String)> {
    if case.contains("slerp") || case.contains("karcher") {
        mkl_env()
    } else {
        // Not inherited from the test's environment either: the C library's functions.
        vec![("MERGEFLEET_MKL_RT".into(), String::new())]
    }
}

/// Merge `case` (paths relative to the fixtures, as mergekit resolved them) with `extra`
/// flags and compare every tensor, and the output file, with mergekit's.
fn merge_equals_mergekit(case: &str, extra: &[&str]) -> TempDir {
    let out = tmp();
    let target = out.path().join("out");
    let cfg = dir().join(case).join("config.yml");
    // mergekit's goldens were made with `--random-seed 0`.
    let mut args = vec![
        "merge",
        cfg.to_str().unwrap(),
        target.to_str().unwrap(),
        "-q",
        "--random-seed",
        "0",
    ];
    args.extend_from_slice(extra);
    assert_ok(&run_in(&dir(), &args, &case_env(case)));
    let want = expected(case);
    let got = crate::fidelity::hashes(&target);
    let tensors = want["tensors"].as_object().unwrap();
    let differ: Vec<&String> = tensors
        .iter()
        .filter(|(k, t)| got.get(*k).map(String::as_str) != t["sha256"].as_str())
        .map(|(k, _)| k)
        .collect();
    assert!(
        differ.is_empty() && got.len() == tensors.len(),
        "{case} {extra:?}: differs from mergekit in {differ:?}"
    );
    for (file, sha) in want["files"].as_object().unwrap() {
        assert_eq!(
            sha256(&std::fs::read(target.join(file)).unwrap()),
            sha.as_str().unwrap(),
            "{case}: {file} is mergekit's, byte for byte"
        );
    }
    out
}

#[test]
fn every_method_equals_mergekit_bit_for_bit() {
    for (case, card) in CASES {
        let out = merge_equals_mergekit(case, &[]);
        let readme = std::fs::read_to_string(out.path().join("out/README.md")).unwrap();
        assert!(readme.contains(card), "{case}: {readme}");
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("out/config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["dtype"], expected(case)["config_dtype"], "{case}");
    }
}

/// The synth set of five fine-tunes with odd sizes (hidden 264: no tensor a multiple of 32
/// elements, so torch's outer sums take their tail order), written once under the target
/// directory.
fn five_set() -> &'static Path {
    static SET: OnceLock<PathBuf> = OnceLock::new();
    SET.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("methods-five-set");
        let done = dir.join("complete");
        if !done.exists() {
            let shape = mergefleet::synth::LlamaShape {
                hidden: 264,
                layers: 2,
                intermediate: 701,
                vocab: 1001,
                heads: 4,
                kv_heads: 2,
                lm_head: true,
            };
            mergefleet::synth::write_set(&dir, &shape, 5, 1).unwrap();
            std::fs::write(&done, "").unwrap();
        }
        dir
    })
}

/// Sized case `case` (`tests/fixtures/methods/sized`) with its sets linked into a fresh
/// folder: the folder, the config and the output path.
fn sized_case(case: &str) -> (TempDir, PathBuf, PathBuf) {
    let sets = tmp();
    for (name, set) in [("real", crate::fidelity::real_set()), ("five", five_set())] {
        std::os::unix::fs::symlink(set, sets.path().join(name)).unwrap();
    }
    let text = std::fs::read_to_string(dir().join("sized").join(format!("{case}.yml")))
        .unwrap()
        .replace("SETS/", &format!("{}/", sets.path().display()));
    let cfg = sets.path().join("config.yml");
    std::fs::write(&cfg, text).unwrap();
    let out = sets.path().join("out");
    (sets, cfg, out)
}

/// Every tensor of the merge in `out` has the SHA-256 mergekit's has for sized `case`.
fn assert_sized_hashes(case: &str, out: &Path, how: &str) {
    let all: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("sized/mergekit_sha256.json")).unwrap())
            .unwrap();
    let want: BTreeMap<String, String> = all[case]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, t)| (k.clone(), t["sha256"].as_str().unwrap().to_string()))
        .collect();
    crate::fidelity::assert_hashes(&format!("{case} {how}"), &want, out);
}

/// Merge sized case `case` embedded with `extra` flags and compare every tensor's SHA-256
/// with mergekit's.
fn sized_equals_mergekit(case: &str, extra: &[&str]) {
    let (_sets, cfg, out) = sized_case(case);
    let mut args = vec![
        "merge",
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        "-q",
        "--random-seed",
        "0",
    ];
    args.extend_from_slice(extra);
    assert_ok(&run_in(&root(), &args, &case_env(case)));
    assert_sized_hashes(case, &out, &format!("{extra:?}"));
}

#[test]
fn real_size_tensors_equal_mergekit() {
    // 65.5M-element embeddings and head, 11.5M-element MLP matrices (real set); five
    // fine-tunes in float32 and float16 with odd sizes (five set).
    for case in [
        "real_linear_bf16",
        "real_ta_f16",
        "real_ta_bf16",
        "five_ta_f32",
        "five_linear_f32",
        "five_linear_f16",
        "real_ties_bf16",
        "real_dare_ties_bf16",
        "real_della_linear_f16",
        "five_ties_f32",
        "five_dare_linear_f16",
        "five_breadcrumbs_ties_f32",
        "five_della_f32",
        "real_sce_bf16",
        "real_nearswap_bf16",
        "real_ramplus_tl_bf16",
        "five_sce_f32",
        "five_ram_f32",
        // slerp's norms and cosine over 2^20-element chunks (63 of them for the embeddings).
        "real_slerp_bf16",
        "real_slerp_f32",
        "five_slerp_f16",
        "five_passthrough_f32",
        "real_nuslerp_bf16",
        "five_nuslerp_f32",
        "five_multislerp_f32",
        "real_multislerp_bf16",
    ] {
        sized_equals_mergekit(case, &[]);
    }
}

#[test]
fn streamed_on_one_thread_the_bytes_do_not_change() {
    // 4 MB: the five set's 264K-element embeddings (6 inputs x 4 B) stream in windows of a
    // block; the real set's 65.5M-element embeddings in windows too, on one thread.
    for case in [
        "five_ta_f32",
        "five_linear_f32",
        "five_linear_f16",
        "five_ram_f32",
    ] {
        sized_equals_mergekit(
            case,
            &[
                "--memory-limit",
                "4MB",
                "--task-size",
                "1",
                "--threads",
                "1",
            ],
        );
    }
    sized_equals_mergekit(
        "real_ta_bf16",
        &["--memory-limit", "64MB", "--threads", "1"],
    );
    // Whole-tensor methods under a limit that holds one tensor at a time.
    for case in [
        "five_ties_f32",
        "five_dare_linear_f16",
        "five_della_f32",
        "five_sce_f32",
    ] {
        sized_equals_mergekit(
            case,
            &[
                "--memory-limit",
                "24MB",
                "--task-size",
                "1",
                "--threads",
                "1",
            ],
        );
    }
}

#[test]
fn plan_says_which_methods_take_whole_tensors() {
    let cfg = dir().join("ties_bf16/config.yml");
    let o = run_in(&dir(), &["plan", cfg.to_str().unwrap()], &[]);
    assert_ok(&o);
    assert!(text(&o).contains("whole tensors"), "{}", text(&o));
    // Below the largest tensor's whole working set, the merge is refused before it starts.
    let out = tmp();
    let target = out.path().join("out");
    let o = run_in(
        &dir(),
        &[
            "merge",
            cfg.to_str().unwrap(),
            target.to_str().unwrap(),
            "--memory-limit",
            "100K",
        ],
        &[],
    );
    let t = assert_exit(&o, 2);
    assert!(
        t.contains("--memory-limit") && t.contains("embed_tokens"),
        "{t}"
    );
    assert!(!target.exists());
}

/// Small case `case` merged by a coordinator and 3 workers (a task per tensor, small
/// shards, `--random-seed 0`), every tensor and config.json's dtype compared with mergekit's.
fn three_workers_equal_mergekit(case: &str) {
    let c = Cluster::new(&dir(), vec![]);
    let out = tmp();
    let target = out.path().join("out");
    let cfg = dir().join(case).join("config.yml");
    c.merge_on_three(
        cfg.to_str().unwrap(),
        target.to_str().unwrap(),
        &[
            "--task-size",
            "1",
            "--out-shard-size",
            "100K",
            "--random-seed",
            "0",
        ],
        &case_env(case),
        120,
    );
    let want = expected(case);
    let got = crate::fidelity::hashes(&target);
    for (name, t) in want["tensors"].as_object().unwrap() {
        assert_eq!(
            got.get(name).map(String::as_str),
            t["sha256"].as_str(),
            "{case}: {name}"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(target.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], want["config_dtype"], "{case}");
}

#[test]
fn a_three_worker_cluster_equals_mergekit() {
    // The random methods' draws start at each tensor's own offset, whoever merges it.
    for case in [
        "linear_bf16",
        "task_arithmetic_f32_five",
        "dare_ties_bf16",
        "della_bf16",
        "ties_f32_rescale",
    ] {
        three_workers_equal_mergekit(case);
    }
}

#[test]
fn real_size_tensors_on_three_workers_equal_mergekit() {
    // Tasks of one tensor spread the draws and the selections over three processes; each
    // random tensor starts at its own offset in the stream, each selection replays the
    // whole tensor's sort. The real set's 65.5M-element embeddings go to one worker whole.
    for case in [
        "real_dare_ties_bf16",
        "five_ties_f32",
        "five_della_f32",
        "five_sce_f32",
        "five_ta_f32",
    ] {
        let (sets, cfg, out) = sized_case(case);
        let c = Cluster::new(sets.path(), vec![]);
        c.merge_on_three(
            cfg.to_str().unwrap(),
            out.to_str().unwrap(),
            &["--task-size", "1", "--random-seed", "0"],
            &[],
            600,
        );
        assert_sized_hashes(case, &out, "on 3 workers");
    }
}

#[test]
fn plan_shows_the_resolved_parameters() {
    let cfg = dir().join("task_arithmetic_bf16/config.yml");
    let o = run_in(&dir(), &["plan", cfg.to_str().unwrap()], &[]);
    let t = text(&o);
    assert_ok(&o);
    assert!(t.contains("merge method: task_arithmetic"), "{t}");
    // The gradient [0.9, 0.3, 0.6] over 3 layers: 0.9 at layer 0 and the embeddings, 0.3 at
    // layer 1, 0.6 at layer 2; the base's weight is unused (0).
    assert!(
        t.contains("weight=[0.0,0.9,0.35,-0.2] normalize=true lambda=0.85"),
        "{t}"
    );
    assert!(t.contains("weight=[0.0,0.3,0.35,-0.2]"), "{t}");
    assert!(t.contains("weight=[0.0,0.6,0.35,-0.2]"), "{t}");
    let o = run_in(&dir(), &["plan", cfg.to_str().unwrap(), "--json"], &[]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["merge_method"], "task_arithmetic");
    let layer1 = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "model.layers.1.mlp.up_proj.weight")
        .unwrap();
    assert_eq!(layer1["parameters"]["weight"][1], 0.3);
}

#[test]
fn missing_and_bad_parameters_are_refused_naming_model_and_tensor() {
    let work = tmp();
    let m = "models:\n  - model: ./models/ft1\n    parameters: {weight: 0.5}\n  - model: ./models/ft2\n";
    for (yaml, want) in [
        (
            format!("{m}merge_method: linear\n"),
            "missing required parameter `weight` for `./models/ft2` (tensor `",
        ),
        (
            format!("{m}    parameters: {{weight: lots}}\nmerge_method: linear\n"),
            "`lots` is not a number",
        ),
        (
            format!("{m}    parameters: {{weight: -0.5}}\nmerge_method: linear\n"),
            "sum to zero",
        ),
        (
            format!("{m}    parameters: {{weight: []}}\nmerge_method: linear\n"),
            "models[1].parameters.weight` is an empty list",
        ),
        (
            format!("{m}merge_method: ties\nbase_model: ./models/base\nparameters: {{weight: 1, density: 1.5}}\n"),
            "1.5 for `./models/ft1`",
        ),
        (
            format!("{m}merge_method: della\nbase_model: ./models/base\nparameters: {{weight: 1, density: 0.6, epsilon: 0.5}}\n"),
            "density +- epsilon must stay inside (0, 1)",
        ),
        (
            format!("{m}merge_method: breadcrumbs\nbase_model: ./models/base\nparameters: {{weight: 1, density: 0.5, gamma: -0.1}}\n"),
            "`gamma`",
        ),
        (
            format!("{m}merge_method: nearswap\nbase_model: ./models/base\nparameters: {{t: 0.1}}\n"),
            "exactly 1 model besides the base",
        ),
        (
            format!("{m}merge_method: nearswap\nbase_model: ./models/base\n").replace("  - model: ./models/ft2\n", ""),
            "missing required parameter `t`",
        ),
        (
            format!("{m}merge_method: ties\nbase_model: ./models/base\nparameters: {{weight: 1}}\ndtype: float64\n"),
            "set `dtype` to one of them",
        ),
    ] {
        let cfg = work.path().join("c.yml");
        std::fs::write(&cfg, &yaml).unwrap();
        let out = work.path().join("out");
        let o = run_in(
            &dir(),
            &["merge", cfg.to_str().unwrap(), out.to_str().unwrap(), "-q"],
            &[],
        );
        let t = assert_exit(&o, 2);
        assert!(t.contains(want), "{yaml}\nwanted `{want}` in: {t}");
        assert!(!out.exists());
    }
}

#[test]
fn whole_tensors_past_32_bit_indices_are_refused_by_the_plan() {
    // A 2^32 + 1 element tensor (sparse files: only the headers are real) cannot be
    // selected among with 32-bit sort indices; ties refuses it naming tensor and method,
    // task_arithmetic (streamed) plans it.
    let work = tmp();
    let big = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![(1usize << 32) + 1],
        safetensors::Dtype::BF16,
    )];
    for m in ["base", "ft1"] {
        mergefleet::synth::write_sparse_model(
            &work.path().join(m),
            &big,
            1,
            &serde_json::json!({}),
        )
        .unwrap();
    }
    let cfg = work.path().join("config.yml");
    for (method, refused) in [("ties", true), ("task_arithmetic", false)] {
        std::fs::write(
            &cfg,
            format!("models:\n  - model: ./ft1\n    parameters: {{weight: 0.5, density: 0.5}}\nmerge_method: {method}\nbase_model: ./base\ndtype: bfloat16\n"),
        )
        .unwrap();
        let o = run_in(work.path(), &["plan", cfg.to_str().unwrap()], &[]);
        if refused {
            let t = assert_exit(&o, 2);
            assert!(t.contains("2^32") && t.contains("embed_tokens"), "{t}");
        } else {
            assert_ok(&o);
        }
    }
}

/// How many elements of each tensor of the merge in `out` differ from the base in `base`
/// (the elements arcee_fusion took from the other model).
fn changed(out: &Path, base: &Path) -> BTreeMap<String, usize> {
    let base = read_checkpoint(base);
    read_checkpoint(out)
        .into_iter()
        .map(|(name, (dtype, _, bytes))| {
            let (bd, _, bb) = &base[&name];
            let got = crate::golden::values(&dtype, &bytes);
            let b = crate::golden::values(bd, bb);
            (name, got.iter().zip(&b).filter(|(x, y)| x != y).count())
        })
        .collect()
}

/// arcee_fusion is not bit-exact (mergekit's softmax follows the CPU's dispatch): the
/// elements it takes from the other model are mergekit's but for those whose importance lies
/// within rounding of the threshold. Per tensor the count differs by at most 10% of the
/// tensor (a float16 tie group at the threshold flips 171 of 2,592 elements in one), in all
/// by at most 0.5% of the elements; at real size (65.5M-element tensors, the quantiles from
/// 10^6 sampled importances, the sample replayed from the random stream) by at most 0.5% per
/// tensor.
#[test]
fn arcee_fusion_keeps_nearly_what_mergekit_keeps() {
    let models = dir().join("models");
    for case in ["arcee_fusion_bf16", "arcee_fusion_f16", "arcee_fusion_f32"] {
        let out = tmp();
        let target = out.path().join("out");
        let cfg = dir().join(case).join("config.yml");
        let o = run_in(
            &dir(),
            &[
                "merge",
                cfg.to_str().unwrap(),
                target.to_str().unwrap(),
                "-q",
            ],
            &mkl_env(),
        );
        assert_ok(&o);
        let want: BTreeMap<String, usize> =
            serde_json::from_value(expected(case)["changed"].clone()).unwrap();
        let got = changed(&target, &models.join("base"));
        let shapes = read_checkpoint(&target);
        let (mut diff, mut numel) = (0, 0);
        for (name, &n) in &want {
            let size: usize = shapes[name].1.iter().product();
            let d = got[name].abs_diff(n);
            assert!(
                d <= 8 + size / 10,
                "{case}: {name}: {} changed, mergekit {n} of {size}",
                got[name]
            );
            diff += d;
            numel += size;
        }
        assert!(diff * 200 <= numel, "{case}: {diff} of {numel} elements");
        // The output is float32, as mergekit's.
        assert!(shapes.values().all(|(d, _, _)| d == "F32"), "{case}");
    }
    let (_sets, cfg, out) = sized_case("real_arcee_fusion_bf16");
    assert_ok(&run_in(
        &root(),
        &[
            "merge",
            cfg.to_str().unwrap(),
            out.to_str().unwrap(),
            "-q",
            "--random-seed",
            "0",
        ],
        &mkl_env(),
    ));
    let all: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir().join("sized/mergekit_sha256.json")).unwrap())
            .unwrap();
    let got = changed(&out, &crate::fidelity::real_set().join("base"));
    let shapes = read_checkpoint(&out);
    for (name, t) in all["real_arcee_fusion_bf16"].as_object().unwrap() {
        let n = t["changed"].as_u64().unwrap() as usize;
        let size: usize = shapes[name].1.iter().product();
        let d = got[name].abs_diff(n);
        assert!(
            d * 200 <= size + 200,
            "{name}: {} changed, mergekit {n} of {size}",
            got[name]
        );
    }
}
