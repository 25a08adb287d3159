//! `slices:` (layer surgery) and the spherical methods and passthrough: transformers (the
//! real client) loads the sliced merges, `plan` shows the layer map, bad slices and
//! parameters are refused naming them, and the goldens hold streamed and on three workers.

use super::*;

#[test]
fn transformers_loads_sliced_and_spherical_merges() {
    // (case, output layers): a LLaMA frankenmerge, a GPT-2 one (`transformer.h.N`,
    // `n_layer`), slerp over two slices of each layout; the spherical methods and
    // arcee_fusion (float32 tensors under a bfloat16 config, as mergekit writes them).
    for (case, layers) in [
        ("passthrough_bf16_frankenmerge", 5),
        ("passthrough_f16_gpt2_plain", 5),
        ("slerp_f16_slices", 3),
        ("slerp_f32_gpt2_slices", 4),
        ("slerp_bf16", 3),
        ("nuslerp_bf16_row_wise", 3),
        ("multislerp_f16_three", 3),
        ("karcher_bf16", 3),
        ("arcee_fusion_bf16", 3),
    ] {
        let out = tmp();
        let target = out.path().join("out");
        let cfg = dir().join(case).join("config.yml");
        let args = [
            "merge",
            cfg.to_str().unwrap(),
            target.to_str().unwrap(),
            "-q",
        ];
        assert_ok(&run_in(&dir(), &args, &case_env(case)));
        let script = r#"
import json, sys, torch, transformers
m, info = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)
body = getattr(m, "model", None) or m.transformer
stack = body.layers if hasattr(body, "layers") else body.h
logits = m(torch.tensor([[1, 2, 3]])).logits
print(json.dumps({"config": m.config.num_hidden_layers, "modules": len(stack),
                  "info": {k: list(v) for k, v in info.items() if v},
                  "finite": bool(torch.isfinite(logits).all())}))
"#;
        let o = std::process::Command::new(torch_python())
            .args(["-c", script, out.path().join("out").to_str().unwrap()])
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{case}: {}", text(&o));
        let line = String::from_utf8_lossy(&o.stdout);
        let v: serde_json::Value = serde_json::from_str(line.trim().lines().last().unwrap())
            .unwrap_or_else(|e| panic!("{case}: {e}: {}", text(&o)));
        assert_eq!(
            (&v["config"], &v["modules"]),
            (&serde_json::json!(layers), &serde_json::json!(layers)),
            "{case}: {v}"
        );
        assert_eq!(
            v["info"],
            serde_json::json!({}),
            "{case}: missing or unexpected weights"
        );
        assert_eq!(v["finite"], true, "{case}");
    }
}

#[test]
fn plan_shows_the_output_layer_map() {
    let cfg = dir().join("passthrough_bf16_frankenmerge/config.yml");
    let o = run_in(&dir(), &["plan", cfg.to_str().unwrap()], &[]);
    let t = text(&o);
    assert_ok(&o);
    for line in [
        "output layers (slices):",
        "0..2       slice 0: `./models/ft1` layers 0..2",
        "2..4       slice 1: `./models/ft2` layers 1..3",
        "4          slice 2: `./models/ft1` layers 2..3",
    ] {
        assert!(t.contains(line), "{line}\n{t}");
    }
    // The source's filter sees the input's name: output layer 2 is ft2's layer 1.
    assert!(
        t.contains("model.layers.2.self_attn.o_proj.weight: scale=0.5"),
        "{t}"
    );
    let o = run_in(&dir(), &["plan", cfg.to_str().unwrap(), "--json"], &[]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 5);
    assert_eq!(
        layers[3],
        serde_json::json!({"output": 3, "slice": 1, "sources": [{"model": "./models/ft2", "layer": 2}]})
    );
}

#[test]
fn bad_slices_and_spherical_parameters_are_refused_naming_them() {
    let work = tmp();
    let models = dir().join("models");
    let cases = [
        (
            "slices:\n  - sources:\n      - {model: M/ft1, layer_range: [0, 2]}\n  - sources:\n      - {model: M/ft2, layer_range: [2, 4]}\nmerge_method: passthrough\n",
            &["slices[1]", "layer_range [2, 4]", "3 layers"][..],
        ),
        (
            "slices:\n  - sources:\n      - {model: M/base, layer_range: [0, 2]}\n      - {model: M/ft1, layer_range: [0, 3]}\nmerge_method: slerp\nbase_model: M/base\nparameters: {t: 0.5}\n",
            &["slices[0]", "different numbers of layers"][..],
        ),
        (
            "slices:\n  - sources:\n      - {model: M/ft1, layer_range: [0, 2]}\n      - {model: M/ft2, layer_range: [0, 2]}\nmerge_method: slerp\nbase_model: M/base\nparameters: {t: 0.5}\n",
            &["slices[0]", "not one of its sources"][..],
        ),
        (
            "slices:\n  - sources:\n      - {model: M/ft1, layer_range: [0, 2]}\n      - {model: M/ft2, layer_range: [0, 2]}\nmerge_method: passthrough\n",
            &["slices[0]", "passthrough takes at most 1 input"][..],
        ),
        (
            "models:\n  - model: M/ft1\n  - model: M/base\nmerge_method: slerp\nbase_model: M/base\n",
            &["missing required parameter `t`"][..],
        ),
        (
            "models:\n  - model: M/ft1\n  - model: M/ft2\n  - model: M/ft3\nmerge_method: nuslerp\nparameters: {weight: 1}\n",
            &["`models`", "nuslerp takes exactly 2 models"][..],
        ),
        (
            "models:\n  - model: M/ft1\n  - model: M/ft2\nmerge_method: multislerp\nbase_model: M/base\n",
            &["missing required parameter `weight`", "ft1"][..],
        ),
    ];
    for (yaml, words) in cases {
        let cfg = work.path().join("config.yml");
        std::fs::write(&cfg, yaml.replace("M/", &format!("{}/", models.display()))).unwrap();
        let target = work.path().join("out");
        let o = run(&["merge", cfg.to_str().unwrap(), target.to_str().unwrap()]);
        let t = assert_exit(&o, 2);
        for w in words {
            assert!(t.contains(w), "{yaml}: wants {w:?}: {t}");
        }
        assert!(!target.exists(), "{yaml}: nothing written");
    }
}

#[test]
fn sliced_and_spherical_merges_stream_and_spread_over_workers() {
    // Windows smaller than slerp's 2^20-element chunks, crossing their bounds, on one
    // thread: the norms, the cosine and the output are the same (nuslerp's too).
    sized_equals_mergekit(
        "real_slerp_bf16",
        &["--memory-limit", "48MB", "--threads", "1"],
    );
    sized_equals_mergekit(
        "five_passthrough_f32",
        &[
            "--memory-limit",
            "4MB",
            "--task-size",
            "1",
            "--threads",
            "1",
        ],
    );
    sized_equals_mergekit(
        "real_nuslerp_bf16",
        &["--memory-limit", "48MB", "--threads", "1"],
    );
    for case in [
        "slerp_f16_slices",
        "slerp_f32_gpt2_slices",
        "passthrough_bf16_frankenmerge",
        "nuslerp_bf16_base",
        "nuslerp_f32_rows",
        "multislerp_f16_three",
        "karcher_far_bf16",
    ] {
        merge_equals_mergekit(
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
        three_workers_equal_mergekit(case);
    }
}
