//! Planner tests on synthetic headers: layout, tied embeddings, refusals, tasks.

use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::source::{SourceFile, TensorLoc};
use crate::store::Stores;
use safetensors::tensor::TensorInfo;

fn model(name: &str, tensors: &[(&str, Dtype, &[usize])]) -> ModelSource {
    let location = Stores::new().resolve(&format!("/models/{name}")).unwrap();
    let mut map = BTreeMap::new();
    let mut off = 64u64;
    for (t, d, shape) in tensors {
        let n: usize = shape.iter().product::<usize>() * dtype::size(*d).unwrap();
        map.insert(
            t.to_string(),
            TensorLoc {
                file: 0,
                dtype: *d,
                shape: shape.to_vec(),
                start: off,
                end: off + n as u64,
            },
        );
        off += n as u64;
    }
    ModelSource {
        reference: name.into(),
        files: vec![SourceFile {
            path: location.child("model.safetensors"),
            url: location.child_display("model.safetensors"),
            size: off,
        }],
        location,
        tensors: map,
        fp8_block: None,
        adapter: None,
    }
}

fn config(extra: &str) -> MergeConfig {
    MergeConfig::from_yaml(&format!(
        "models:\n  - model: a\n  - model: b\nmerge_method: model_stock\nbase_model: base\n{extra}"
    ))
    .unwrap()
}

const LLAMA: &[(&str, Dtype, &[usize])] = &[
    ("model.embed_tokens.weight", Dtype::BF16, &[256, 64]),
    ("lm_head.weight", Dtype::BF16, &[256, 64]),
    ("model.layers.0.mlp.up_proj.weight", Dtype::BF16, &[176, 64]),
    ("model.layers.0.input_layernorm.weight", Dtype::BF16, &[64]),
    ("model.norm.weight", Dtype::BF16, &[64]),
];

fn three(t: &[(&str, Dtype, &[usize])]) -> Vec<ModelSource> {
    vec![model("base", t), model("a", t), model("b", t)]
}

#[test]
fn single_file_layout_is_lexicographic() {
    let p = plan(&config(""), &three(LLAMA), PlanOptions::default()).unwrap();
    assert_eq!(p.files.len(), 1);
    assert_eq!(p.files[0].name, "model.safetensors");
    let names: Vec<&str> = p
        .tasks
        .iter()
        .flat_map(|t| &t.tensors)
        .map(|t| t.name.as_str())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(
        p.total_size,
        (256 * 64 * 2 * 2 + 176 * 64 * 2 + 64 * 2 * 2) as u64
    );
    assert_eq!(p.bytes_written(), p.files[0].size);
    assert_eq!(p.bytes_read(), 3 * p.total_size);
}

#[test]
fn header_equals_the_safetensors_crate() {
    let p = plan(&config(""), &three(LLAMA), PlanOptions::default()).unwrap();
    let f = &p.files[0];
    let data = vec![0u8; (f.size - f.header.len() as u64) as usize];
    let mut views = Vec::new();
    let mut off = 0;
    for t in p.tasks.iter().flat_map(|t| &t.tensors) {
        let n = (t.out.end - t.out.start) as usize;
        views.push((
            t.name.clone(),
            safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &data[off..off + n])
                .unwrap(),
        ));
        off += n;
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta)).unwrap();
    assert_eq!(&bytes[..f.header.len()], &f.header[..]);
    assert_eq!(bytes.len() as u64, f.size);
}

#[test]
fn greedy_sharding_like_mergekit() {
    // 32768 + 32768 > 60000: lm_head alone; then embed + norm + up_proj (22528) = 55424...
    let opts = PlanOptions {
        out_shard_size: 60_000,
        ..Default::default()
    };
    let p = plan(&config(""), &three(LLAMA), opts).unwrap();
    let names: Vec<&str> = p.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    let in_file = |i: usize| -> Vec<&str> {
        p.tasks[p.files[i].tasks.clone()]
            .iter()
            .flat_map(|t| &t.tensors)
            .map(|t| t.name.as_str())
            .collect()
    };
    assert_eq!(in_file(0), ["lm_head.weight"]);
    assert_eq!(in_file(1).len(), 4);
    assert_eq!(p.weight_map.len(), 5);
    assert!(p.weight_map.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(p
        .weight_map
        .iter()
        .any(|(t, f)| t == "model.norm.weight" && f == "model-00002-of-00002.safetensors"));
    // a tensor larger than the shard size still gets a file of its own
    let opts = PlanOptions {
        out_shard_size: 10,
        ..Default::default()
    };
    let p = plan(&config(""), &three(LLAMA), opts).unwrap();
    assert_eq!(p.files.len(), 5);
    assert_eq!(p.files[4].name, "model-00005-of-00005.safetensors");
}

#[test]
fn tasks_cover_each_file_contiguously() {
    let opts = PlanOptions {
        out_shard_size: 60_000,
        task_size: 40_000,
        min_part: 1,
        ..PlanOptions::default()
    };
    let p = plan(&config(""), &three(LLAMA), opts).unwrap();
    for (fi, f) in p.files.iter().enumerate() {
        let tasks = &p.tasks[f.tasks.clone()];
        assert_eq!(tasks[0].out.start, 0, "first task writes the header");
        assert_eq!(tasks.last().unwrap().out.end, f.size);
        for w in tasks.windows(2) {
            assert_eq!(w[0].out.end, w[1].out.start);
        }
        for t in tasks {
            assert_eq!(t.file, fi);
            assert!(t.input_bytes() <= 40_000 || t.tensors.len() == 1);
        }
    }
    let ids: Vec<usize> = p.tasks.iter().map(|t| t.id).collect();
    assert_eq!(ids, (0..p.tasks.len()).collect::<Vec<_>>());
}

#[test]
fn tied_embeddings() {
    let tied: Vec<_> = LLAMA
        .iter()
        .filter(|t| t.0 != "lm_head.weight")
        .cloned()
        .collect();
    // No model has lm_head: the output has none.
    let p = plan(&config(""), &three(&tied), PlanOptions::default()).unwrap();
    assert!(p.weight_map.iter().all(|(t, _)| t != "lm_head.weight"));
    // One fine-tune lacks it: that model contributes its embeddings.
    let models = vec![model("base", LLAMA), model("a", &tied), model("b", LLAMA)];
    let p = plan(&config(""), &models, PlanOptions::default()).unwrap();
    let lm = p
        .tasks
        .iter()
        .flat_map(|t| &t.tensors)
        .find(|t| t.name == "lm_head.weight")
        .unwrap();
    let Op::Merge { inputs, .. } = &lm.op else {
        panic!()
    };
    let embed = &models[1].tensors["model.embed_tokens.weight"];
    assert_eq!(inputs[1].range, embed.start..embed.end);
    // Only a fine-tune has it: the base contributes its embeddings, the output has one.
    let models = vec![model("base", &tied), model("a", LLAMA), model("b", &tied)];
    let p = plan(&config(""), &models, PlanOptions::default()).unwrap();
    assert!(p.weight_map.iter().any(|(t, _)| t == "lm_head.weight"));
}

#[test]
fn refusals_name_tensor_and_model() {
    let missing: Vec<_> = LLAMA
        .iter()
        .filter(|t| t.0 != "model.norm.weight")
        .cloned()
        .collect();
    let e = plan(
        &config(""),
        &[
            model("base", LLAMA),
            model("a", LLAMA),
            model("b", &missing),
        ],
        PlanOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("model.norm.weight") && e.contains("`b`"), "{e}");

    let mut vocab: Vec<_> = LLAMA.to_vec();
    vocab[0] = ("model.embed_tokens.weight", Dtype::BF16, &[260, 64]);
    let e = plan(
        &config(""),
        &[model("base", LLAMA), model("a", &vocab), model("b", LLAMA)],
        PlanOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("[260, 64]") && e.contains("[256, 64]") && e.contains("vocabularies"),
        "{e}"
    );

    let mut shape: Vec<_> = LLAMA.to_vec();
    shape[4] = ("model.norm.weight", Dtype::BF16, &[65]);
    let e = plan(
        &config(""),
        &[model("base", LLAMA), model("a", &shape), model("b", LLAMA)],
        PlanOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("model.norm.weight") && !e.contains("vocabularies"),
        "{e}"
    );

    let e = plan(&config(""), &three(&[]), PlanOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no tensors"), "{e}");
}

#[test]
fn dtypes_and_copies() {
    let t: &[(&str, Dtype, &[usize])] =
        &[("w", Dtype::F32, &[8]), ("position_ids", Dtype::I64, &[4])];
    let mixed: &[(&str, Dtype, &[usize])] =
        &[("w", Dtype::BF16, &[8]), ("position_ids", Dtype::I64, &[4])];
    let models = vec![model("base", t), model("a", mixed), model("b", t)];
    let p = plan(&config(""), &models, PlanOptions::default()).unwrap();
    let jobs: Vec<&TensorJob> = p.tasks.iter().flat_map(|t| &t.tensors).collect();
    // safetensors order: I64 (wider dtype) before F32
    assert_eq!(jobs[0].name, "position_ids");
    assert!(matches!(jobs[0].op, Op::Copy { .. }));
    assert_eq!(jobs[0].dtype, Dtype::I64);
    let Op::Merge { kernel, .. } = &jobs[1].op else {
        panic!()
    };
    assert_eq!(kernel.work, WorkDtype::F32, "mixed inputs work in float32");
    let p = plan(
        &config("dtype: bfloat16\nout_dtype: float16\n"),
        &models,
        PlanOptions::default(),
    )
    .unwrap();
    let w = p
        .tasks
        .iter()
        .flat_map(|t| &t.tensors)
        .find(|t| t.name == "w")
        .unwrap();
    assert_eq!(w.dtype, Dtype::F16);

    let int_ft: &[(&str, Dtype, &[usize])] =
        &[("w", Dtype::I32, &[8]), ("position_ids", Dtype::I64, &[4])];
    let e = plan(
        &config(""),
        &[model("base", t), model("a", int_ft), model("b", t)],
        PlanOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`w`") && e.contains("I32"), "{e}");
}

#[test]
fn filter_wise_per_tensor() {
    let c = config(
        "parameters:\n  filter_wise:\n    - filter: mlp\n      value: true\n    - value: false\n",
    );
    let p = plan(&c, &three(LLAMA), PlanOptions::default()).unwrap();
    for t in p.tasks.iter().flat_map(|t| &t.tensors) {
        let Op::Merge { kernel, .. } = &t.op else {
            panic!()
        };
        let want = crate::merge::Method::ModelStock {
            filter_wise: t.name.contains("mlp"),
        };
        assert_eq!(kernel.method, want, "{}", t.name);
    }
}

#[test]
fn tasks_keep_multipart_parts_large() {
    // With a 5 MiB minimum part, small tensors group until the task output reaches it.
    let opts = PlanOptions {
        task_size: 1,
        min_part: 40_000,
        ..Default::default()
    };
    let p = plan(&config(""), &three(LLAMA), opts).unwrap();
    for f in &p.files {
        let tasks = &p.tasks[f.tasks.clone()];
        for t in &tasks[..tasks.len() - 1] {
            assert!(t.out.end - t.out.start >= 40_000, "{:?}", t.out);
        }
    }
}

#[test]
fn tasks_are_cut_into_parts_near_the_target() {
    let t = UPLOAD_PART;
    assert_eq!(split_parts(10, t), (1, 10));
    assert_eq!(split_parts(2 * t - 1, t), (1, 2 * t - 1));
    assert_eq!(split_parts(2 * t, t), (2, t));
    assert_eq!(split_parts(5 * t + 3, t), (5, t + 1));
    // Every part of every cut is at least S3's minimum (but a single short task), and
    // below twice the target; the cut tiles the task.
    for len in [
        MIN_PART,
        t,
        3 * t - 1,
        100 * t + 12_345,
        9_000 * t - 1,
        40 << 30,
    ] {
        let target = part_target(len);
        let (n, size) = split_parts(len, target);
        let last = len - (n as u64 - 1) * size;
        assert!(last > 0 && last <= size, "{len}: {n} x {size}, last {last}");
        assert!(n == 1 || last >= MIN_PART, "{len}: last part {last}");
        assert!(
            size < 2 * target && n as u64 <= MAX_PARTS,
            "{len}: {n} x {size}"
        );
    }
    // A file too big for 9,000 parts of 8 MiB aims at bigger parts.
    assert_eq!(part_target(100 << 30), (100u64 << 30).div_ceil(MAX_PARTS));
}

mod properties {
    //! Property tests: random tensor sets and sizes, checked against the plan's invariants
    //! and against the header parser.

    use proptest::prelude::*;

    use super::*;
    use crate::header::parse_header;

    /// A random tensor set: unique names, float or integer dtypes, small shapes.
    fn tensor_set() -> impl Strategy<Value = Vec<(String, Dtype, Vec<usize>)>> {
        let dtype = prop::sample::select(vec![
            Dtype::BF16,
            Dtype::F16,
            Dtype::F32,
            Dtype::I64,
            Dtype::U8,
        ]);
        let shape = prop::collection::vec(1usize..48, 0..3);
        prop::collection::btree_map("[a-z]{1,3}(\\.[a-z0-9]{1,3}){0,2}", (dtype, shape), 1..40)
            .prop_map(|m| m.into_iter().map(|(n, (d, s))| (n, d, s)).collect())
    }

    fn borrowed(t: &[(String, Dtype, Vec<usize>)]) -> Vec<(&str, Dtype, &[usize])> {
        t.iter()
            .map(|(n, d, s)| (n.as_str(), *d, s.as_slice()))
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn plans_keep_their_invariants(
            tensors in tensor_set(),
            shard in 1u64..20_000,
            task in 1u64..20_000,
            min_part in 0u64..4_000,
        ) {
            let t = borrowed(&tensors);
            let models = three(&t);
            let opts = PlanOptions { out_shard_size: shard, task_size: task, min_part, ..PlanOptions::default() };
            let p = plan(&config(""), &models, opts).unwrap();
            let sizes: Vec<u64> = models.iter().flat_map(|m| m.files.iter().map(|f| f.size)).collect();
            prop_assert_eq!(p.check(&opts, |i| sizes[i]), Ok(()));
            prop_assert_eq!(p.tensor_count(), tensors.len());
        }

        #[test]
        fn headers_round_trip(tensors in tensor_set()) {
            let mut off = 0;
            let infos: Vec<(String, TensorInfo)> = tensors
                .iter()
                .map(|(n, d, s)| {
                    let len = s.iter().product::<usize>() * d.bitsize() / 8;
                    off += len;
                    (n.clone(), TensorInfo { dtype: *d, shape: s.clone(), data_offsets: (off - len, off) })
                })
                .collect();
            let header = crate::header::write_header(infos.clone()).unwrap();
            let size = (header.len() + off) as u64;
            let (parsed, meta) = parse_header(&header[8..], size).unwrap();
            prop_assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
            prop_assert_eq!(parsed.len(), infos.len());
            for p in &parsed {
                let (_, info) = infos.iter().find(|(n, _)| *n == p.name).unwrap();
                prop_assert_eq!((p.dtype, &p.shape), (info.dtype, &info.shape));
                let data = header.len() as u64;
                prop_assert_eq!(
                    (p.start, p.end),
                    (data + info.data_offsets.0 as u64, data + info.data_offsets.1 as u64)
                );
            }
        }
    }
}

#[test]
fn check_catches_broken_plans() {
    let models = three(LLAMA);
    let opts = PlanOptions {
        out_shard_size: 40_000,
        task_size: 1,
        min_part: 0,
        ..PlanOptions::default()
    };
    let good = plan(&config(""), &models, opts).unwrap();
    let size = |_| models[0].files[0].size;
    assert_eq!(good.check(&opts, size), Ok(()));
    type Break = fn(&mut MergePlan);
    let breaks: Vec<(&str, Break)> = vec![
        ("do not follow on", |p| p.files[0].tasks.start = 1),
        ("expected from", |p| p.tasks[1].out.start += 2),
        ("in two tasks", |p| {
            p.tasks[1].tensors[0].name = p.tasks[0].tensors[0].name.clone()
        }),
        ("outside the file", |p| {
            if let Op::Merge { inputs, .. } = &mut p.tasks[0].tensors[0].op {
                inputs[1].range.end += 1 << 40;
            }
        }),
        ("total_size", |p| p.total_size += 1),
        ("weight map", |p| p.weight_map[0].1 = "elsewhere".into()),
    ];
    for (want, brk) in breaks {
        let mut p = good.clone();
        brk(&mut p);
        let err = p.check(&opts, size).unwrap_err();
        assert!(err.contains(want), "{want}: {err}");
    }
    let strict = PlanOptions {
        min_part: 1 << 30,
        ..opts
    };
    assert!(good.check(&strict, size).unwrap_err().contains("part"));
}
