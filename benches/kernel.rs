//! Criterion benchmarks of the model_stock kernel alone (no I/O): GB/s of input for
//! bfloat16 and float32 working dtypes, filter_wise on and off, base + 3 fine-tunes.
//!
//! `cargo bench --bench kernel`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mergefleet::merge::{InputView, ModelStock, Reductions, WorkDtype};

const ROWS: usize = 1024;
const COLS: usize = 2048;

fn inputs(dtype: WorkDtype) -> Vec<Vec<u8>> {
    let numel = ROWS * COLS;
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

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("model_stock");
    g.sample_size(20);
    for dtype in [WorkDtype::BF16, WorkDtype::F16, WorkDtype::F32] {
        let data = inputs(dtype);
        let views: Vec<InputView> = data
            .iter()
            .map(|b| InputView {
                bytes: b,
                dtype: dtype.st_dtype(),
            })
            .collect();
        let in_bytes: usize = data.iter().map(Vec::len).sum();
        g.throughput(Throughput::Bytes(in_bytes as u64));
        for reductions in [Reductions::Torch, Reductions::Exact] {
            for fw in [false, true] {
                let k = ModelStock {
                    work: dtype,
                    out: dtype,
                    filter_wise: fw,
                    reductions,
                };
                let mut out = vec![0u8; ROWS * COLS * dtype.size()];
                let name = format!("{}/{}/filter_wise={fw}", dtype.name(), reductions.name());
                g.bench_function(name, |b| {
                    b.iter(|| k.merge(&[ROWS, COLS], &views, &mut out))
                });
            }
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
