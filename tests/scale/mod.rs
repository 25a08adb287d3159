//! A 671B-class merge plan (DeepSeek-V3 layout as released: 91,991 tensors, the big
//! matrices block FP8 with their scales, in 163 files per model, as sparse files, so nothing
//! real is stored): `mergefleet plan` handles it, with and without `--quantize fp8`, the
//! plan keeps its invariants, and every task message stays small; a 120B-class frankenmerge
//! (two 70B-layout models stacked) plans its 137 layers. Time and memory are measured by
//! `benches/scale.sh`, not asserted here.

use mergefleet::job::Job;
use mergefleet::plan::PlanOptions;
use mergefleet::sink::cluster::Target;
use mergefleet::store::Stores;
use mergefleet::wire::{task_to_wire, Attempt, TaskId, MAX_MESSAGE};

use crate::util::*;

/// What a task message may weigh at most: far below the gRPC cap, so no layout can hit it.
const TASK_MESSAGE_BOUND: usize = 1 << 20;

#[test]
fn plan_671b_class_layout() {
    let dir = tmp();
    mergefleet::synth::write_sparse_deepseek_set(dir.path(), 2).unwrap();
    let cfg = dir.path().join("model_stock.yml");

    // The command users run: dequantized, the scales are read but not written.
    let all = mergefleet::synth::deepseek_v3_tensors();
    let scales = all.iter().filter(|t| t.0.ends_with("_scale_inv")).count();
    let o = run(&["plan", cfg.to_str().unwrap()]);
    assert_ok(&o);
    let t = text(&o);
    assert!(
        t.contains(&format!("tensors:        {}", all.len() - scales)),
        "{t}"
    );
    assert!(
        t.contains(&format!("FP8 inputs:     {}", 3 * scales)),
        "{t}"
    );
    let o = run(&["plan", cfg.to_str().unwrap(), "--quantize", "fp8"]);
    assert_ok(&o);
    assert!(text(&o).contains(&format!("tensors:        {}", all.len() - scales)));

    // The plan itself, written as FP8 again: every tensor of the release, scales included.
    let yaml = std::fs::read_to_string(&cfg).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = PlanOptions {
        quantize_fp8: true,
        ..PlanOptions::default()
    };
    let job = rt.block_on(Job::load(&yaml, &Stores::new(), opts)).unwrap();
    let plan = &job.plan;
    assert_eq!(plan.weight_map.len(), 91_991);
    assert_eq!(plan.inputs.len(), 3 * 163);
    let sizes: Vec<u64> = plan
        .inputs
        .iter()
        .map(|f| std::fs::metadata(&f.url).unwrap().len())
        .collect();
    plan.check(&opts, |i| sizes[i]).unwrap();

    // Every message the coordinator would send, to an S3 multipart target.
    let output = Target::Parts {
        url: "s3://a-bucket-name/some/long/prefix/model-00001-of-00275.safetensors".into(),
        upload_id: "x".repeat(128),
        first_part: 1,
        part_size: 5 << 20,
    };
    let lens: Vec<usize> = (0..plan.tasks.len())
        .map(|t| task_to_wire(plan, TaskId(t), Attempt(1), &output).encoded_len())
        .collect();
    let max = *lens.iter().max().unwrap();
    let mean = lens.iter().sum::<usize>() / lens.len();
    println!(
        "671B-class plan: {} tasks, {} output files; task messages: max {max} B, mean {mean} B",
        plan.tasks.len(),
        plan.files.len()
    );
    assert!(
        max <= TASK_MESSAGE_BOUND && TASK_MESSAGE_BOUND < MAX_MESSAGE,
        "a task message of {max} bytes"
    );
}

#[test]
fn plan_120b_class_frankenmerge() {
    // Goliath-120B's stack of two 70B-layout models: 137 layers, each input layer read once
    // per use, the output (larger than either input) sharded as mergekit shards it.
    let dir = tmp();
    mergefleet::synth::write_sparse_frankenmerge_set(dir.path()).unwrap();
    let yaml = std::fs::read_to_string(dir.path().join("frankenmerge.yml")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = PlanOptions::default();
    let job = rt.block_on(Job::load(&yaml, &Stores::new(), opts)).unwrap();
    let plan = &job.plan;
    assert_eq!(plan.layers.len(), 137);
    assert_eq!(plan.weight_map.len(), 137 * 9 + 3);
    let (h, i, kv) = (8192u64, 28672u64, 1024u64);
    let layer = 2 * (2 * h * h + 2 * kv * h + 3 * i * h + 2 * h);
    let edges = 2 * (2 * 32000 * h + h);
    assert_eq!(plan.bytes_read(), 137 * layer + edges);
    assert_eq!(plan.total_size, 137 * layer + edges);
    let sizes: Vec<u64> = plan
        .inputs
        .iter()
        .map(|f| std::fs::metadata(&f.url).unwrap().len())
        .collect();
    plan.check(&opts, |i| sizes[i]).unwrap();
    // mergekit's 5 GB shards.
    assert!(plan.files.len() >= 47, "{}", plan.files.len());
    let o = run(&[
        "plan",
        dir.path().join("frankenmerge.yml").to_str().unwrap(),
    ]);
    assert_ok(&o);
    assert!(
        text(&o).contains("122..137   slice 8:") && text(&o).contains("layers 65..80"),
        "{}",
        text(&o)
    );
}
