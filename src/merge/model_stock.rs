//! model_stock (mergekit 0.1.5), the first method: pure arithmetic on byte slices, no I/O.
//!
//! Per tensor, with base `w0` and fine-tunes `w1..wN` in config order:
//! `d_i = w_i - w0`; `cos_ij = clamp(<d_i,d_j> / max(|d_i||d_j|, 1e-6), -1, 1)`;
//! `c = mean(cos_ij)`; `t = N c / (1 + (N-1) c)` (0 where the denominator is below 1e-6);
//! `out = t * mean(w_i) + (1 - t) * w0`. With `filter_wise` each row (last axis) gets its own
//! `t`. Every operation is rounded like torch does in the working dtype (see `numeric.rs`).
//!
//! The work is split into fixed blocks of [`BLOCK`] elements whose partial statistics are
//! combined in block order, so the result does not depend on the thread count, and a tensor
//! too large for memory can be streamed in block-aligned windows with the same bits out.

use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;
use safetensors::Dtype;

use super::numeric::{decode, encode_with, map_round, Bf16, Round, F16, F32};
use super::{row_len, torch, wide, InputView, Reductions, WorkDtype, BLOCK};
use crate::params::{Kind, ParamDef};

/// Elements decoded at a time inside a block (stays in L1/L2).
const MICRO: usize = 512;

/// model_stock's one parameter.
pub const PARAMS: &[ParamDef] = &[ParamDef::shared("filter_wise", Kind::Bool, 0.0)];

/// Partial sums over some elements of `fine_tunes` task vectors: the squared norm of each,
/// then the dot products of each pair (i < j) in row-major pair order. Accumulated in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub fine_tunes: usize,
    pub sums: Vec<f64>,
}

impl Stats {
    pub fn zero(fine_tunes: usize) -> Self {
        let n = fine_tunes;
        Stats {
            fine_tunes: n,
            sums: vec![0.0; n + n * n.saturating_sub(1) / 2],
        }
    }
    fn add(&mut self, other: &Stats) {
        debug_assert_eq!(self.fine_tunes, other.fine_tunes);
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            *a += b;
        }
    }
}

/// model_stock for one tensor: working dtype, output dtype, filter_wise, reduction order.
#[derive(Debug, Clone, Copy)]
pub struct ModelStock {
    pub work: WorkDtype,
    pub out: WorkDtype,
    pub filter_wise: bool,
    pub reductions: Reductions,
}

/// The statistics of one tensor (or filter_wise row) being gathered in element order.
pub enum StatsAcc {
    /// Per-block float64 partial sums, combined in block order.
    Exact {
        fine_tunes: usize,
        blocks: Vec<Stats>,
    },
    /// torch's accumulators: one per norm, one per pair's sum of products.
    Torch {
        fine_tunes: usize,
        norms: Vec<torch::NormSum>,
        dots: Vec<torch::CascadeSum>,
    },
}

impl ModelStock {
    /// torch's order is emulated for the 16- and 32-bit dtypes; float64 sums exactly.
    fn torch_order(&self) -> bool {
        self.reductions == Reductions::Torch && self.work != WorkDtype::F64
    }

    /// Merge a whole tensor held in memory. `inputs[0]` is the base, then the fine-tunes.
    /// `shape` is the tensor's shape; `out` receives `numel * out.size()` bytes.
    pub fn merge(&self, shape: &[usize], inputs: &[InputView], out: &mut [u8]) {
        let numel: usize = shape.iter().product();
        if self.filter_wise {
            let row = row_len(shape).max(1);
            self.merge_rows(row, 0, numel / row, inputs, out);
        } else {
            let mut acc = self.begin_stats(inputs.len() - 1, numel);
            self.feed_stats(&mut acc, inputs, 0, numel);
            let t = self.finish_ratio(&acc, 0, 1);
            self.apply(inputs, 0, numel, t, out);
        }
    }

    /// filter_wise: every row of `row` elements gets its own ratio. `inputs` hold whole
    /// rows, the first of them row `first_row` of the tensor's `rows`.
    pub fn merge_rows(
        &self,
        row: usize,
        first_row: usize,
        rows: usize,
        inputs: &[InputView],
        out: &mut [u8],
    ) {
        let osz = self.out.size();
        let row = row.max(1);
        out.par_chunks_mut(row * osz)
            .enumerate()
            .with_min_len((BLOCK / row).max(1))
            .for_each(|(r, out)| {
                let start = r * row;
                let len = out.len() / osz;
                let mut acc = self.begin_stats(inputs.len() - 1, len);
                self.feed_stats(&mut acc, inputs, start, len);
                let t = self.finish_ratio(&acc, first_row + r, rows);
                self.apply_range(inputs, start, len, t, out);
            });
    }

    /// Start gathering the statistics of `fine_tunes` task vectors of `numel` elements.
    pub fn begin_stats(&self, fine_tunes: usize, numel: usize) -> StatsAcc {
        if !self.torch_order() {
            return StatsAcc::Exact {
                fine_tunes,
                blocks: Vec::new(),
            };
        }
        let (norm_width, sum_width) = match self.work {
            WorkDtype::F32 => (torch::LANES, torch::LANES),
            WorkDtype::BF16 => (2 * torch::LANES, 2 * torch::LANES),
            // float16 norms take torch's generic, sequential path.
            _ => (0, 2 * torch::LANES),
        };
        let pairs = fine_tunes * fine_tunes.saturating_sub(1) / 2;
        StatsAcc::Torch {
            fine_tunes,
            norms: (0..fine_tunes)
                .map(|_| torch::NormSum::new(numel, norm_width))
                .collect(),
            dots: (0..pairs)
                .map(|_| torch::CascadeSum::new(numel, sum_width))
                .collect(),
        }
    }

    /// The next `len` elements (from element `start` of `inputs`), in order. In exact mode
    /// `start` must be a multiple of [`BLOCK`] for results to equal a single pass.
    pub fn feed_stats(&self, acc: &mut StatsAcc, inputs: &[InputView], start: usize, len: usize) {
        match acc {
            StatsAcc::Exact { blocks, .. } => blocks.extend(self.block_stats(inputs, start, len)),
            StatsAcc::Torch { norms, dots, .. } => match self.work {
                WorkDtype::BF16 => feed_torch::<Bf16>(norms, dots, inputs, start, len),
                WorkDtype::F16 => feed_torch::<F16>(norms, dots, inputs, start, len),
                _ => feed_torch::<F32>(norms, dots, inputs, start, len),
            },
        }
    }

    /// The ratio `t` from gathered statistics, for output `col` of `outputs` (the row of a
    /// filter_wise tensor; 0 of 1 otherwise). An f32 for the 16- and 32-bit dtypes,
    /// widened exactly.
    pub fn finish_ratio(&self, acc: &StatsAcc, col: usize, outputs: usize) -> f64 {
        match acc {
            StatsAcc::Exact { fine_tunes, blocks } => self.ratio(*fine_tunes, blocks.iter()),
            StatsAcc::Torch {
                fine_tunes,
                norms,
                dots,
            } => {
                let n: Vec<f32> = norms.iter().map(|a| a.finish()).collect();
                let d: Vec<f32> = dots.iter().map(|a| a.finish()).collect();
                let t = match self.work {
                    WorkDtype::BF16 => ratio_torch::<Bf16>(*fine_tunes, &n, &d, col, outputs),
                    WorkDtype::F16 => ratio_torch::<F16>(*fine_tunes, &n, &d, col, outputs),
                    _ => ratio_torch::<F32>(*fine_tunes, &n, &d, col, outputs),
                };
                t as f64
            }
        }
    }

    /// Statistics of `len` elements starting at element `start` of `inputs`, one [`Stats`]
    /// per [`BLOCK`] (the last may be short), computed in parallel. `start` must be a
    /// multiple of `BLOCK` for results to equal a single in-memory pass.
    pub fn block_stats(&self, inputs: &[InputView], start: usize, len: usize) -> Vec<Stats> {
        let blocks = len.div_ceil(BLOCK);
        (0..blocks)
            .into_par_iter()
            .map(|b| {
                let s = start + b * BLOCK;
                let l = BLOCK.min(len - b * BLOCK);
                self.stats_range(inputs, s, l)
            })
            .collect()
    }

    /// The interpolation ratio `t` for `fine_tunes` fine-tunes from per-block statistics,
    /// combined in order.
    /// (An f32 for the 16- and 32-bit dtypes, widened exactly.)
    pub fn ratio<'a>(&self, fine_tunes: usize, parts: impl Iterator<Item = &'a Stats>) -> f64 {
        let mut total = Stats::zero(fine_tunes);
        for s in parts {
            total.add(s);
        }
        match self.work {
            WorkDtype::BF16 => ratio_from::<Bf16>(&total) as f64,
            WorkDtype::F16 => ratio_from::<F16>(&total) as f64,
            WorkDtype::F32 => ratio_from::<F32>(&total) as f64,
            WorkDtype::F64 => wide::ratio(&total),
        }
    }

    /// Write the merged values of `len` elements starting at element `start` of `inputs`
    /// into `out` (which starts at that element), in parallel.
    pub fn apply(&self, inputs: &[InputView], start: usize, len: usize, t: f64, out: &mut [u8]) {
        let osz = self.out.size();
        debug_assert_eq!(out.len(), len * osz);
        out.par_chunks_mut(BLOCK * osz)
            .enumerate()
            .for_each(|(b, out)| {
                self.apply_range(inputs, start + b * BLOCK, out.len() / osz, t, out)
            });
    }

    fn stats_range(&self, inputs: &[InputView], start: usize, len: usize) -> Stats {
        match self.work {
            WorkDtype::BF16 => simd::stats_range::<Bf16>(inputs, start, len),
            WorkDtype::F16 => simd::stats_range::<F16>(inputs, start, len),
            WorkDtype::F32 => simd::stats_range::<F32>(inputs, start, len),
            WorkDtype::F64 => wide::stats_range(inputs, start, len),
        }
    }

    fn apply_range(&self, inputs: &[InputView], start: usize, len: usize, t: f64, out: &mut [u8]) {
        let od = self.out.st_dtype();
        let t32 = t as f32;
        match self.work {
            WorkDtype::BF16 => simd::apply_range::<Bf16>(inputs, start, len, t32, od, out),
            WorkDtype::F16 => simd::apply_range::<F16>(inputs, start, len, t32, od, out),
            WorkDtype::F32 => simd::apply_range::<F32>(inputs, start, len, t32, od, out),
            WorkDtype::F64 => wide::apply_range(inputs, start, len, t, od, out),
        }
    }
}

/// The hot loops, compiled twice (see [`super::simd`]).
mod simd {
    use super::*;
    use crate::twice;

    twice!(generic stats_range(inputs: &[InputView], start: usize, len: usize) -> Stats);
    twice!(generic apply_range(inputs: &[InputView], start: usize, len: usize, t: f32, od: Dtype, out: &mut [u8]));
    twice!(generic torch_values(inputs: &[InputView], at: usize, m: usize, out: &mut [f32]));
    twice!(feed_norm(a: &mut torch::NormSum, x: &[f32]) => a.feed(x));
    twice!(feed_sum(a: &mut torch::CascadeSum, x: &[f32]) => a.feed(x));
}

#[inline(always)]
fn stats_range<R: Round>(inputs: &[InputView], start: usize, len: usize) -> Stats {
    let n = inputs.len() - 1;
    let mut stats = Stats::zero(n);
    let mut w0 = [0f32; MICRO];
    let mut w = [0f32; MICRO];
    let mut d = vec![[0f32; MICRO]; n];
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        decode::<R>(inputs[0].bytes, inputs[0].dtype, start + off, &mut w0[..m]);
        for (i, di) in d.iter_mut().enumerate() {
            let inp = &inputs[i + 1];
            decode::<R>(inp.bytes, inp.dtype, start + off, &mut w[..m]);
            map_round::<R>(&mut di[..m], |k| w[k] - w0[k]);
        }
        let mut p = n;
        for i in 0..n {
            stats.sums[i] += sum_sq(&d[i][..m]);
            for j in i + 1..n {
                stats.sums[p] += sum_rounded_products::<R>(&d[i][..m], &d[j][..m]);
                p += 1;
            }
        }
        off += m;
    }
    stats
}

/// Independent f64 accumulators: enough to hide the latency of vector adds.
const LANES: usize = 8;

/// sum of squares in f64 (torch's norm accumulates in higher precision).
#[inline(always)]
fn sum_sq(a: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let v = c[l] as f64;
            acc[l] += v * v;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for v in rest {
        s += (*v as f64) * (*v as f64);
    }
    s
}

/// sum of products each rounded to the working dtype (torch: `(a * b).sum()`), in f64
/// lanes. `a` and `b` hold at most [`MICRO`] values.
#[inline(always)]
fn sum_rounded_products<R: Round>(a: &[f32], b: &[f32]) -> f64 {
    let mut p = [0f32; MICRO];
    let p = &mut p[..a.len().min(b.len())];
    map_round::<R>(p, |k| a[k] * b[k]);
    let mut acc = [0f64; LANES];
    let chunks = p.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l] as f64;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for v in rest {
        s += *v as f64;
    }
    s
}

/// Elements per block of the torch-order pass. A block's values (for 3 fine-tunes, 6 streams
/// of float32: 384 KiB) stay in the cache of the core that computed them until it feeds them.
const TORCH_BLOCK: usize = 1 << 14;

/// Most threads working on one tensor's torch-order statistics. Feeding the accumulators is
/// serial and takes about a third of the work, so more threads would mostly wait their turn.
const TORCH_THREADS: usize = 3;

/// Feed torch's accumulators. Up to [`TORCH_THREADS`] threads claim blocks of
/// [`TORCH_BLOCK`] elements in order; each computes its block's task vectors and rounded
/// products into its own buffer, waits for the block's turn, and feeds every accumulator
/// (each takes its values in order, as torch's order requires). The feeding is serial but
/// overlaps the other threads' next blocks, and no values move between cores.
///
/// Why the turn always advances: blocks are claimed in order, and nothing between a claim
/// and its `turn` update calls into rayon or blocks, so the owner of the block whose turn it
/// is is running. A thread that panics there hands the turn to no one: it marks the pass
/// abandoned, the others stop waiting, and the panic reaches the caller.
fn feed_torch<R: Round>(
    norms: &mut [torch::NormSum],
    dots: &mut [torch::CascadeSum],
    inputs: &[InputView],
    start: usize,
    len: usize,
) {
    let streams = norms.len() + dots.len();
    let blocks = len.div_ceil(TORCH_BLOCK);
    let next = AtomicUsize::new(0);
    let turn = AtomicUsize::new(0);
    let accumulators = std::sync::Mutex::new((norms, dots));
    let work = || {
        let _abandon = Abandon(&turn);
        let mut values = vec![0f32; TORCH_BLOCK.min(len).div_ceil(MICRO) * MICRO * streams];
        loop {
            let b = next.fetch_add(1, Ordering::Relaxed);
            if b >= blocks {
                return;
            }
            let c = TORCH_BLOCK.min(len - b * TORCH_BLOCK);
            for (p, out) in values.chunks_mut(MICRO * streams).enumerate() {
                let at = p * MICRO;
                if at >= c {
                    break;
                }
                simd::torch_values::<R>(
                    inputs,
                    start + b * TORCH_BLOCK + at,
                    MICRO.min(c - at),
                    out,
                );
            }
            if !await_turn(&turn, b) {
                return;
            }
            let mut acc = accumulators.lock().expect("torch accumulators");
            let (norms, dots) = &mut *acc;
            feed_block(norms, dots, &values, c);
            drop(acc);
            // Not over an abandoned pass: the threads waiting for later turns must stop.
            if turn
                .compare_exchange(b, b + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return;
            }
        }
    };
    let threads = rayon::current_num_threads()
        .clamp(1, TORCH_THREADS)
        .min(blocks);
    if threads <= 1 {
        // One block (a filter_wise row, a small window) or one thread: no scope to set up.
        return work();
    }
    rayon::scope(|s| {
        for _ in 1..threads {
            s.spawn(|_| work());
        }
        work();
    });
}

/// `turn` of a torch-order pass once one of its threads has panicked.
const ABANDONED: usize = usize::MAX;

/// Marks a torch-order pass abandoned if its thread unwinds.
struct Abandon<'a>(&'a AtomicUsize);

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(ABANDONED, Ordering::Release);
        }
    }
}

/// Wait until `turn` reaches block `b` (spinning, yielding now and then); false if the pass
/// was abandoned.
fn await_turn(turn: &AtomicUsize, b: usize) -> bool {
    let mut spins = 0u32;
    loop {
        match turn.load(Ordering::Acquire) {
            t if t == b => return true,
            ABANDONED => return false,
            _ => {}
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(64) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Feed `len` elements of values laid out by [`torch_values`] piece after piece (each
/// piece holds every stream's `MICRO` values in turn) to the accumulators, in order.
fn feed_block(
    norms: &mut [torch::NormSum],
    dots: &mut [torch::CascadeSum],
    values: &[f32],
    len: usize,
) {
    let n = norms.len();
    let streams = n + dots.len();
    let sequential = matches!(norms.first(), Some(torch::NormSum::Sequential { .. }));
    let mut xs: Vec<&[f32]> = Vec::with_capacity(n);
    for p in 0..len.div_ceil(MICRO) {
        let m = MICRO.min(len - p * MICRO);
        let piece = |q: usize| &values[(p * streams + q) * MICRO..][..m];
        if sequential {
            // float16: all norms advance together, their chains interleaved.
            xs.clear();
            xs.extend((0..n).map(piece));
            torch::feed_norms(norms, &xs);
        } else {
            for (q, a) in norms.iter_mut().enumerate() {
                simd::feed_norm(a, piece(q));
            }
        }
        for (q, a) in dots.iter_mut().enumerate() {
            simd::feed_sum(a, piece(n + q));
        }
    }
}

/// For `m` elements at `at`: the task vectors (rounded to the working dtype), then the
/// products of each pair (i < j) rounded to it, each in its own `MICRO`-long slot of `out`.
#[inline(always)]
fn torch_values<R: Round>(inputs: &[InputView], at: usize, m: usize, out: &mut [f32]) {
    let n = inputs.len() - 1;
    let mut w0 = [0f32; MICRO];
    decode::<R>(inputs[0].bytes, inputs[0].dtype, at, &mut w0[..m]);
    for i in 0..n {
        let d = &mut out[i * MICRO..i * MICRO + m];
        let inp = &inputs[i + 1];
        decode::<R>(inp.bytes, inp.dtype, at, d);
        if R::SLICES {
            for (o, z) in d.iter_mut().zip(&w0[..m]) {
                *o -= z;
            }
            R::round_slice(d);
        } else {
            for (o, z) in d.iter_mut().zip(&w0[..m]) {
                *o = R::round(*o - z);
            }
        }
    }
    let mut q = n;
    for i in 0..n {
        for j in i + 1..n {
            let (head, tail) = out.split_at_mut(q * MICRO);
            let (a, b) = (
                &head[i * MICRO..i * MICRO + m],
                &head[j * MICRO..j * MICRO + m],
            );
            map_round::<R>(&mut tail[..m], |k| a[k] * b[k]);
            q += 1;
        }
    }
}

/// `t` from torch-ordered sums: the same elementwise steps as [`ratio_from`], with the
/// norms' square roots taken in float32 and the mean of the cosines in torch's order.
fn ratio_torch<R: Round>(
    n: usize,
    norm_sums: &[f32],
    dot_sums: &[f32],
    col: usize,
    outputs: usize,
) -> f32 {
    if n < 2 {
        return 0.0;
    }
    let norms: Vec<f32> = norm_sums.iter().map(|s| R::round(s.sqrt())).collect();
    let eps = R::round(1e-6);
    let mut cos = Vec::with_capacity(dot_sums.len());
    let mut p = 0;
    for i in 0..n {
        for j in i + 1..n {
            let norm_product = R::round(norms[i] * norms[j]);
            let denom = if norm_product < eps {
                eps
            } else {
                norm_product
            };
            let dot = R::round(dot_sums[p]);
            cos.push(R::round(dot / denom).clamp(-1.0, 1.0));
            p += 1;
        }
    }
    let c = R::round(torch::mean(&cos, col, outputs));
    let nf = n as f32;
    let num = R::round(nf * c);
    let den = R::round(1.0 + R::round((nf - 1.0) * c));
    if den.abs() < eps {
        0.0
    } else {
        R::round(num / den)
    }
}

fn ratio_from<R: Round>(stats: &Stats) -> f32 {
    let n = stats.fine_tunes;
    if n < 2 {
        return 0.0;
    }
    let norms: Vec<f32> = stats.sums[..n]
        .iter()
        .map(|s| R::round_f64(s.sqrt()))
        .collect();
    let eps = R::round(1e-6);
    let mut cos_sum = 0f64;
    let mut p = n;
    for i in 0..n {
        for j in i + 1..n {
            let norm_product = R::round(norms[i] * norms[j]);
            let denom = if norm_product < eps {
                eps
            } else {
                norm_product
            };
            let dot = R::round_f64(stats.sums[p]);
            let cos = R::round(dot / denom).clamp(-1.0, 1.0);
            cos_sum += cos as f64;
            p += 1;
        }
    }
    let pairs = (n * (n - 1) / 2) as f64;
    let c = R::round_f64(cos_sum / pairs);
    let nf = n as f32;
    let num = R::round(nf * c);
    let den = R::round(1.0 + R::round((nf - 1.0) * c));
    if den.abs() < eps {
        0.0
    } else {
        R::round(num / den)
    }
}

#[inline(always)]
fn apply_range<R: Round>(
    inputs: &[InputView],
    start: usize,
    len: usize,
    t: f32,
    out_dtype: Dtype,
    out: &mut [u8],
) {
    let n = inputs.len() - 1;
    let nf = n as f32;
    let one_minus_t = R::round(1.0 - t);
    let osz = out.len() / len.max(1);
    let mut w0 = [0f32; MICRO];
    let mut s = [0f32; MICRO];
    let mut w = [0f32; MICRO];
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        decode::<R>(inputs[0].bytes, inputs[0].dtype, start + off, &mut w0[..m]);
        decode::<R>(inputs[1].bytes, inputs[1].dtype, start + off, &mut s[..m]);
        for inp in &inputs[2..] {
            decode::<R>(inp.bytes, inp.dtype, start + off, &mut w[..m]);
            if R::SLICES {
                for k in 0..m {
                    s[k] += w[k];
                }
                R::round_slice(&mut s[..m]);
            } else {
                for k in 0..m {
                    s[k] = R::round(s[k] + w[k]);
                }
            }
        }
        if R::SLICES {
            // avg = s / n; out = t * avg + (1 - t) * w0, each step rounded.
            for v in &mut s[..m] {
                *v /= nf;
            }
            R::round_slice(&mut s[..m]);
            for k in 0..m {
                s[k] *= t;
                w[k] = one_minus_t * w0[k];
            }
            R::round_slice(&mut s[..m]);
            R::round_slice(&mut w[..m]);
            for k in 0..m {
                s[k] += w[k];
            }
            R::round_slice(&mut s[..m]);
        } else {
            for k in 0..m {
                let avg = R::round(s[k] / nf);
                s[k] = R::round(R::round(t * avg) + R::round(one_minus_t * w0[k]));
            }
        }
        encode_with::<R>(&s[..m], out_dtype, &mut out[off * osz..(off + m) * osz]);
        off += m;
    }
}

#[cfg(test)]
#[path = "model_stock_tests.rs"]
mod tests;
