//! A 671B-class merge plan (DeepSeek-V3 layout as released: 91,991 tensors, the big
//! matrices block FP8 with their scales, in 163 files per model, as sparse files, so nothing
//! real is stored): `mergefleet plan` handles it, with and without `--quantize fp8`, the
//! plan keeps its invariants, and every task message stays small. Time and memory are measured by
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
