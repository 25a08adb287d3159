//! Criterion benchmarks of the model_stock kernel alone (no I/O): GB/s of input for the
//! bfloat16, float16 and float32 working dtypes, base + 3 fine-tunes.
//!
//! `model_stock`: a 1024 x 2048 tensor (its inputs fit in the last-level cache), every
//! reduction order, filter_wise on and off. `model_stock_real_size`: a 4096 x 4096 tensor
//! (16.8M elements, 134 MB of bfloat16 inputs, as a 7B model's largest matrices), torch's
//! order: memory traffic and the statistics pass's parallelism show only at this size.
//!
//! `lora`: a rank-16 and a rank-64 adapter applied on read to a 4096 x 4096 bfloat16 weight
//! (a 7B model's attention projection): GB/s of weight adapted.
//!
//! `cargo bench --bench kernel`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mergefleet::merge::{InputView, ModelStock, Reductions, WorkDtype};

fn inputs(dtype: WorkDtype, numel: usize) -> Vec<Vec<u8>> {
    (0..4u32)
        .map(|m| {
            let vals: Vec<f32> = (0..numel)
                .map(|i| {
                    let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(m * 97) as f32
                        / u32::MAX as f32;
                    0.05 * (x - 0.5) + 0.001 * m as f32
                })
                .collect();
            let mut out = vec![0u8; numel * dtype.size()];
            mergefleet::merge::encode(&vals, dtype.st_dtype(), &mut out);
            out
        })
        .collect()
}

/// Benchmark model_stock on `shape` for every dtype and each of `variants` (reduction
/// order, filter_wise).
fn group(c: &mut Criterion, name: &str, shape: [usize; 2], variants: &[(Reductions, bool)]) {
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    let numel = shape[0] * shape[1];
    for dtype in [WorkDtype::BF16, WorkDtype::F16, WorkDtype::F32] {
        let data = inputs(dtype, numel);
        let views: Vec<InputView> = data
            .iter()
            .map(|b| InputView {
                bytes: b,
                dtype: dtype.st_dtype(),
            })
            .collect();
        let in_bytes: usize = data.iter().map(Vec::len).sum();
        g.throughput(Throughput::Bytes(in_bytes as u64));
        for &(reductions, fw) in variants {
            let k = ModelStock {
                work: dtype,
                out: dtype,
                filter_wise: fw,
                reductions,
            };
            let mut out = vec![0u8; numel * dtype.size()];
            let name = format!("{}/{}/filter_wise={fw}", dtype.name(), reductions.name());
            g.bench_function(name, |b| b.iter(|| k.merge(&shape, &views, &mut out)));
        }
    }
    g.finish();
}

fn lora(c: &mut Criterion) {
    let mut g = c.benchmark_group("lora");
    g.sample_size(10);
    let (rows, cols) = (4096, 4096);
    let weight = inputs(WorkDtype::BF16, rows * cols).remove(0);
    g.throughput(Throughput::Bytes(weight.len() as u64));
    for rank in [16, 64] {
        let f32s = |n: usize| inputs(WorkDtype::F32, n).remove(1);
        let f = mergefleet::lora::LoraFactors::new(
            &f32s(rank * cols),
            safetensors::Dtype::F32,
            &f32s(rows * rank),
            safetensors::Dtype::F32,
            rank,
            2.0,
        );
        let mut out = vec![0u8; weight.len()];
        g.bench_function(format!("bf16/r{rank}"), |b| {
            b.iter(|| f.apply(&weight, safetensors::Dtype::BF16, 0, cols, &mut out))
        });
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    let all = [
        (Reductions::Torch, false),
        (Reductions::Torch, true),
        (Reductions::Exact, false),
        (Reductions::Exact, true),
    ];
    group(c, "model_stock", [1024, 2048], &all);
    group(
        c,
        "model_stock_real_size",
        [4096, 4096],
        &[(Reductions::Torch, false)],
    );
}

criterion_group!(benches, bench, lora);
criterion_main!(benches);
