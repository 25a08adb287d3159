//! Kernel tests: hand-computed rounding, the special branches, and a straightforward
//! reference implementation (whole tensors, no blocks, no threads) for N = 2..5.

use super::*;
use crate::merge::numeric::{self, Bf16, Round, F16, F32};
use half::{bf16, f16};

fn round(w: WorkDtype, x: f32) -> f32 {
    match w {
        WorkDtype::BF16 => bf16::from_f32(x).to_f32(),
        WorkDtype::F16 => f16::from_f32(x).to_f32(),
        WorkDtype::F32 | WorkDtype::F64 => x,
    }
}

fn round64(w: WorkDtype, x: f64) -> f32 {
    match w {
        WorkDtype::BF16 => Bf16::round_f64(x),
        WorkDtype::F16 => F16::round_f64(x),
        WorkDtype::F32 | WorkDtype::F64 => F32::round_f64(x),
    }
}

fn encode_vec(vals: &[f32], d: WorkDtype) -> Vec<u8> {
    let mut out = vec![0u8; vals.len() * d.size()];
    numeric::encode(vals, d.st_dtype(), &mut out);
    out
}

fn decode_vec(bytes: &[u8], d: WorkDtype) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / d.size()];
    numeric::decode::<F32>(bytes, d.st_dtype(), 0, &mut out);
    out
}

/// mergekit's model_stock written out literally, one torch op per line.
fn reference(k: ModelStock, shape: &[usize], w: &[Vec<f32>]) -> Vec<f32> {
    let r = |x: f32| round(k.work, x);
    let numel: usize = shape.iter().product();
    let row = if k.filter_wise { row_len(shape) } else { numel };
    let n = w.len() - 1;
    let eps = r(1e-6);
    let mut out = vec![0f32; numel];
    for start in (0..numel).step_by(row.max(1)) {
        let idx = start..start + row;
        let d: Vec<Vec<f32>> = (1..=n)
            .map(|i| idx.clone().map(|e| r(w[i][e] - w[0][e])).collect())
            .collect();
        let norms: Vec<f32> = d
            .iter()
            .map(|di| {
                round64(
                    k.work,
                    di.iter()
                        .map(|x| (*x as f64) * (*x as f64))
                        .sum::<f64>()
                        .sqrt(),
                )
            })
            .collect();
        let mut coss = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                let np = r(norms[i] * norms[j]).max(eps);
                let dot = round64(
                    k.work,
                    d[i].iter().zip(&d[j]).map(|(a, b)| r(a * b) as f64).sum(),
                );
                coss.push(r(dot / np).clamp(-1.0, 1.0));
            }
        }
        let c = round64(
            k.work,
            coss.iter().map(|c| *c as f64).sum::<f64>() / coss.len() as f64,
        );
        let num = r(n as f32 * c);
        let den = r(1.0 + r((n as f32 - 1.0) * c));
        let t = if den.abs() < eps { 0.0 } else { r(num / den) };
        for e in idx {
            let mut s = w[1][e];
            for wi in &w[2..] {
                s = r(s + wi[e]);
            }
            let avg = r(s / n as f32);
            out[e] = r(r(t * avg) + r(r(1.0 - t) * w[0][e]));
        }
    }
    out.iter().map(|x| round(k.out, *x)).collect()
}

/// Deterministic pseudo-random models: base + shared and private noise.
fn models(n: usize, numel: usize, d: WorkDtype, seed: u64) -> Vec<Vec<f32>> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rnd = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
    };
    let base: Vec<f32> = (0..numel).map(|_| round(d, rnd() * 0.05)).collect();
    let shared: Vec<f32> = (0..numel).map(|_| rnd()).collect();
    let mut out = vec![base.clone()];
    for _ in 0..n {
        out.push(
            (0..numel)
                .map(|e| round(d, base[e] + 0.002 * (shared[e] + rnd())))
                .collect(),
        );
    }
    out
}

/// Views of whole encoded tensors of dtype `d`.
fn views_of(bytes: &[Vec<u8>], d: WorkDtype) -> Vec<InputView<'_>> {
    bytes
        .iter()
        .map(|b| InputView {
            bytes: b,
            dtype: d.st_dtype(),
        })
        .collect()
}

fn run(k: ModelStock, shape: &[usize], w: &[Vec<f32>], stored: WorkDtype) -> Vec<f32> {
    let bytes: Vec<Vec<u8>> = w.iter().map(|m| encode_vec(m, stored)).collect();
    let views = views_of(&bytes, stored);
    let numel: usize = shape.iter().product();
    let mut out = vec![0u8; numel * k.out.size()];
    k.merge(shape, &views, &mut out);
    decode_vec(&out, k.out)
}

fn assert_bits_eq(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "{what}: element {i}: {x} vs {y}");
    }
}

#[test]
fn matches_reference_for_2_to_5_models() {
    let shapes: &[&[usize]] = &[&[64, 48], &[300], &[3, 5, 7], &[2, BLOCK + 77]];
    for work in [WorkDtype::BF16, WorkDtype::F16, WorkDtype::F32] {
        for n in 2..=5 {
            for fw in [false, true] {
                for shape in shapes {
                    let numel: usize = shape.iter().product();
                    let w = models(n, numel, work, (n * 31 + numel) as u64);
                    for out in [work, WorkDtype::F16] {
                        let k = ModelStock {
                            work,
                            out,
                            filter_wise: fw,
                            reductions: Reductions::Exact,
                        };
                        let what = format!("{work:?}->{out:?} n={n} fw={fw} shape={shape:?}");
                        assert_bits_eq(&run(k, shape, &w, work), &reference(k, shape, &w), &what);
                    }
                }
            }
        }
    }
}

#[test]
fn inputs_are_cast_to_the_working_dtype() {
    // float32 inputs merged in bfloat16: each input rounds to bf16 first (torch's .to()).
    let shape = [40, 40];
    let w = models(3, 1600, WorkDtype::F32, 7);
    let k = ModelStock {
        work: WorkDtype::BF16,
        out: WorkDtype::BF16,
        filter_wise: false,
        reductions: Reductions::Exact,
    };
    let rounded: Vec<Vec<f32>> = w
        .iter()
        .map(|m| m.iter().map(|x| round(WorkDtype::BF16, *x)).collect())
        .collect();
    assert_bits_eq(
        &run(k, &shape, &w, WorkDtype::F32),
        &reference(k, &shape, &rounded),
        "f32 in, bf16 work",
    );
}

#[test]
fn hand_computed_bf16_rounding() {
    // base 1, fine-tunes 1, 1+2^-7, 1+2^-7: task vectors 0, 2^-7, 2^-7.
    let b = |x: f32| encode_vec(&[x], WorkDtype::BF16);
    let inputs = [b(1.0), b(1.0), b(1.0078125), b(1.0078125)];
    let views: Vec<InputView> = inputs
        .iter()
        .map(|x| InputView {
            bytes: x,
            dtype: Dtype::BF16,
        })
        .collect();
    let k = ModelStock {
        work: WorkDtype::BF16,
        out: WorkDtype::BF16,
        filter_wise: false,
        reductions: Reductions::Exact,
    };
    // cos = [0, 0, 1]; c = bf16(1/3) = 0.333984375; 3c rounds to 1.0; 1 + 2c = 1.66796875
    // is a tie that rounds to even 1.671875; t = bf16(1/1.671875) = 0.59765625. Computing
    // t in f32 and rounding once would give bf16(0.6) = 0.6015625.
    let stats = k.block_stats(&views, 0, 1);
    let t = k.ratio(views.len() - 1, stats.iter());
    assert_eq!(t, 0.59765625);
    // With t = 1 the output is the average: 1 + (1+2^-7) = 2.0078125 is a tie -> 2.0;
    // 2 + (1+2^-7) = 3.0078125 is a tie -> 3.0; 3/3 = 1.0. Exact arithmetic rounded once
    // would give 1.0078125.
    let mut out = [0u8; 2];
    k.apply(&views, 0, 1, 1.0, &mut out);
    assert_eq!(decode_vec(&out, WorkDtype::BF16), vec![1.0]);
}

#[test]
fn zero_task_vector_has_zero_cosine() {
    // One fine-tune equals the base: its cosines are 0/1e-6 = 0.
    let numel = 500;
    let mut w = models(2, numel, WorkDtype::BF16, 3);
    w.push(w[0].clone());
    let k = ModelStock {
        work: WorkDtype::BF16,
        out: WorkDtype::BF16,
        filter_wise: false,
        reductions: Reductions::Exact,
    };
    assert_bits_eq(
        &run(k, &[numel], &w, WorkDtype::BF16),
        &reference(k, &[numel], &w),
        "zero delta",
    );
}

#[test]
fn opposite_task_vectors_take_the_t_zero_branch() {
    // d2 = -d1: c = -1, 1 + (N-1)c = 0 -> t = 0 -> the output is the base.
    let base: Vec<f32> = (0..256).map(|i| (i as f32 - 128.0) / 64.0).collect();
    let d: Vec<f32> = (0..256)
        .map(|i| if i % 3 == 0 { 0.125 } else { -0.0625 })
        .collect();
    let w = vec![
        base.clone(),
        base.iter().zip(&d).map(|(b, d)| b + d).collect(),
        base.iter().zip(&d).map(|(b, d)| b - d).collect(),
    ];
    for work in [WorkDtype::BF16, WorkDtype::F32] {
        let k = ModelStock {
            work,
            out: work,
            filter_wise: false,
            reductions: Reductions::Exact,
        };
        let out = run(k, &[256], &w, work);
        assert_bits_eq(&out, &base, "t = 0 gives the base");
        let bytes: Vec<Vec<u8>> = w.iter().map(|m| encode_vec(m, work)).collect();
        let views: Vec<InputView> = bytes
            .iter()
            .map(|b| InputView {
                bytes: b,
                dtype: work.st_dtype(),
            })
            .collect();
        assert_eq!(
            k.ratio(views.len() - 1, k.block_stats(&views, 0, 256).iter()),
            0.0
        );
    }
}

#[test]
fn filter_wise_treats_1d_as_one_row() {
    let numel = 300;
    let w = models(3, numel, WorkDtype::BF16, 11);
    let fw = ModelStock {
        work: WorkDtype::BF16,
        out: WorkDtype::BF16,
        filter_wise: true,
        reductions: Reductions::Exact,
    };
    let plain = ModelStock {
        filter_wise: false,
        reductions: Reductions::Exact,
        ..fw
    };
    assert_bits_eq(
        &run(fw, &[numel], &w, WorkDtype::BF16),
        &run(plain, &[numel], &w, WorkDtype::BF16),
        "1-D",
    );
    // ...while a 2-D tensor gets one ratio per row, which differs from one ratio overall.
    let a = run(fw, &[10, 30], &w, WorkDtype::BF16);
    let b = run(plain, &[10, 30], &w, WorkDtype::BF16);
    assert_ne!(a, b);
}

#[test]
fn streamed_windows_equal_one_pass() {
    // Statistics over block-aligned windows, then output per window, equal the in-memory merge.
    let numel = 3 * BLOCK + 1234;
    let w = models(3, numel, WorkDtype::BF16, 5);
    let k = ModelStock {
        work: WorkDtype::BF16,
        out: WorkDtype::F32,
        filter_wise: false,
        reductions: Reductions::Exact,
    };
    let whole = run(k, &[numel], &w, WorkDtype::BF16);
    let bytes: Vec<Vec<u8>> = w.iter().map(|m| encode_vec(m, WorkDtype::BF16)).collect();
    let window = 2 * BLOCK;
    let view = |s: usize, e: usize| -> Vec<InputView> {
        bytes
            .iter()
            .map(|b| InputView {
                bytes: &b[s * 2..e * 2],
                dtype: Dtype::BF16,
            })
            .collect()
    };
    let mut stats = Vec::new();
    for s in (0..numel).step_by(window) {
        let e = (s + window).min(numel);
        stats.extend(k.block_stats(&view(s, e), 0, e - s));
    }
    let t = k.ratio(bytes.len() - 1, stats.iter());
    let mut out = vec![0u8; numel * 4];
    for s in (0..numel).step_by(window) {
        let e = (s + window).min(numel);
        k.apply(&view(s, e), 0, e - s, t, &mut out[s * 4..e * 4]);
    }
    assert_bits_eq(&decode_vec(&out, WorkDtype::F32), &whole, "streamed");
}

#[test]
fn result_does_not_depend_on_thread_count() {
    let numel = 5 * BLOCK;
    let w = models(4, numel, WorkDtype::BF16, 9);
    let k = ModelStock {
        work: WorkDtype::BF16,
        out: WorkDtype::BF16,
        filter_wise: false,
        reductions: Reductions::Exact,
    };
    let many = run(k, &[numel], &w, WorkDtype::BF16);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let one = pool.install(|| run(k, &[numel], &w, WorkDtype::BF16));
    assert_bits_eq(&one, &many, "threads");
}

#[test]
fn row_lengths() {
    assert_eq!(row_len(&[4, 5, 6]), 6);
    assert_eq!(row_len(&[7]), 7);
    assert_eq!(row_len(&[]), 1);
}

#[test]
fn many_fine_tunes_match_reference() {
    // The count of fine-tunes is passed, never inferred: 65 and 100 once gave the base back.
    for n in [65, 100] {
        for fw in [false, true] {
            let shape = [8, 40];
            let w = models(n, 320, WorkDtype::BF16, n as u64);
            let k = ModelStock {
                work: WorkDtype::BF16,
                out: WorkDtype::BF16,
                filter_wise: fw,
                reductions: Reductions::Exact,
            };
            let got = run(k, &shape, &w, WorkDtype::BF16);
            assert_bits_eq(&got, &reference(k, &shape, &w), &format!("n={n} fw={fw}"));
            assert_ne!(got, w[0], "n={n}: the base came back unmerged");
        }
    }
}

#[test]
fn float64_work_stays_float64() {
    // mergekit keeps float64 inputs in float64: compare with the formula in plain f64.
    let shape = [16, 24];
    let n = 3;
    let w32 = models(n, 384, WorkDtype::F32, 11);
    let w: Vec<Vec<f64>> = w32
        .iter()
        .map(|m| m.iter().map(|x| *x as f64 * (1.0 + 1e-9)).collect())
        .collect();
    let bytes: Vec<Vec<u8>> = w
        .iter()
        .map(|m| m.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<InputView> = bytes
        .iter()
        .map(|b| InputView {
            bytes: b,
            dtype: Dtype::F64,
        })
        .collect();
    let k = ModelStock {
        work: WorkDtype::F64,
        out: WorkDtype::F64,
        filter_wise: false,
        reductions: Reductions::Exact,
    };
    let mut out = vec![0u8; 384 * 8];
    k.merge(&shape, &views, &mut out);
    let got: Vec<f64> = out
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let d: Vec<Vec<f64>> = (1..=n)
        .map(|i| (0..384).map(|e| w[i][e] - w[0][e]).collect())
        .collect();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut c = 0.0;
    for i in 0..n {
        for j in i + 1..n {
            c += dot(&d[i], &d[j]) / (dot(&d[i], &d[i]).sqrt() * dot(&d[j], &d[j]).sqrt());
        }
    }
    c /= 3.0;
    let t = 3.0 * c / (1.0 + 2.0 * c);
    for e in 0..384 {
        let avg = (w[1][e] + w[2][e] + w[3][e]) / 3.0;
        let want = t * avg + (1.0 - t) * w[0][e];
        assert!((got[e] - want).abs() <= 1e-15, "{e}: {} vs {want}", got[e]);
    }
    // Not a float32 result widened: float64 keeps bits float32 cannot hold.
    assert!(got.iter().any(|x| (*x as f32) as f64 != *x));
}

/// The torch-order statistics fed by one thread, element by element: the task vectors and
/// rounded products computed literally, each stream fed to its accumulator whole.
fn torch_reference(d: WorkDtype, w: &[Vec<f32>]) -> Vec<u32> {
    let numel = w[0].len();
    let width = if d == WorkDtype::F32 { 8 } else { 16 };
    let norm_width = if d == WorkDtype::F16 { 0 } else { width };
    let deltas: Vec<Vec<f32>> = w[1..]
        .iter()
        .map(|m| (0..numel).map(|e| round(d, m[e] - w[0][e])).collect())
        .collect();
    let mut out: Vec<u32> = deltas
        .iter()
        .map(|x| {
            let mut a = torch::NormSum::new(numel, norm_width);
            a.feed(x);
            a.finish().to_bits()
        })
        .collect();
    for i in 0..deltas.len() {
        for j in i + 1..deltas.len() {
            let p: Vec<f32> = (0..numel)
                .map(|e| round(d, deltas[i][e] * deltas[j][e]))
                .collect();
            let mut a = torch::CascadeSum::new(numel, width);
            a.feed(&p);
            out.push(a.finish().to_bits());
        }
    }
    out
}

/// The torch-order accumulators' sums after feeding `numel` elements in `window`s.
fn torch_sums(k: ModelStock, views: &[InputView], numel: usize, window: usize) -> Vec<u32> {
    let mut acc = k.begin_stats(views.len() - 1, numel);
    for s in (0..numel).step_by(window) {
        k.feed_stats(&mut acc, views, s, window.min(numel - s));
    }
    let StatsAcc::Torch { norms, dots, .. } = acc else {
        panic!("torch order expected");
    };
    norms
        .iter()
        .map(|a| a.finish().to_bits())
        .chain(dots.iter().map(|a| a.finish().to_bits()))
        .collect()
}

#[test]
fn torch_order_sums_do_not_depend_on_threads_or_windows() {
    // Many blocks and a ragged tail, so threads take turns; every thread count and window size
    // (aligned to nothing) must feed each accumulator the same values in the same order.
    let numel = 7 * TORCH_BLOCK + 1234;
    for d in [WorkDtype::BF16, WorkDtype::F16, WorkDtype::F32] {
        let w = models(3, numel, d, 11);
        let want = torch_reference(d, &w);
        let bytes: Vec<Vec<u8>> = w.iter().map(|m| encode_vec(m, d)).collect();
        let views = views_of(&bytes, d);
        let k = ModelStock {
            work: d,
            out: d,
            filter_wise: false,
            reductions: Reductions::Torch,
        };
        for threads in [1, 2, 3, 5] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            // Whole, windows of several blocks (threads take turns within each), windows
            // smaller than a block; and six tensors at once, as a task merges them.
            for window in [numel, 3 * TORCH_BLOCK + 5, 10_007] {
                let got = pool.install(|| torch_sums(k, &views, numel, window));
                assert_eq!(got, want, "{d:?}, {threads} threads, windows of {window}");
            }
            let concurrent: Vec<Vec<u32>> = pool.install(|| {
                (0..6)
                    .into_par_iter()
                    .map(|_| torch_sums(k, &views, numel, numel))
                    .collect()
            });
            for got in concurrent {
                assert_eq!(got, want, "{d:?}, {threads} threads, six at once");
            }
        }
    }
}

#[test]
fn the_baseline_build_gives_the_avx2_builds_bits() {
    // Every dtype, both orders, filter_wise on and off, several blocks and a ragged tail:
    // the kernel compiled for the baseline target (a CPU without AVX2, FMA or F16C) and the
    // one this CPU runs give the same bytes. (On a CPU without them both runs are baseline.)
    use std::sync::atomic::Ordering;
    let shape = [5, 3 * TORCH_BLOCK + 77];
    for d in [WorkDtype::BF16, WorkDtype::F16, WorkDtype::F32] {
        let w = models(3, shape[0] * shape[1], d, 21);
        for reductions in [Reductions::Torch, Reductions::Exact] {
            for filter_wise in [false, true] {
                let k = ModelStock {
                    work: d,
                    out: d,
                    filter_wise,
                    reductions,
                };
                let fast = run(k, &shape, &w, d);
                crate::merge::simd::BASELINE.store(true, Ordering::Relaxed);
                let baseline = run(k, &shape, &w, d);
                crate::merge::simd::BASELINE.store(false, Ordering::Relaxed);
                let what = format!("{d:?} {reductions:?} filter_wise={filter_wise}");
                assert_bits_eq(&baseline, &fast, &what);
            }
        }
    }
}
