//! torch's CPU reduction order, emulated, so model_stock's norms, sums and means round
//! exactly as mergekit's (torch 2.15, one thread) do.
//!
//! Floating-point sums depend on their order; torch's order on CPU is fixed by its kernels
//! and, measured, does not depend on the CPU: `norm` and `sum` run their AVX2 kernels (8
//! float32 lanes) on AVX-512 machines too. What each function reproduces, with the ATen
//! kernel it comes from, is written down in `docs/numerics.md`; the evidence (bit equality
//! with real torch up to 70M elements, and with mergekit at real size) in
//! `docs/research/torch-cpu-reductions.md`.
//!
//! Every accumulator is float32 and every `+` a float32 add, in the order written; Rust
//! never fuses `a * b + c`, and `mul_add` is used only where torch's compiled kernel fuses.
//! The accumulators take elements in index order, in chunks of any size, so a tensor
//! streamed in windows gives the same bits as one held whole.

// Lane and accumulator loops are written with indices, as torch's kernels index them.
#![allow(clippy::needless_range_loop)]

/// float32 lanes of torch's vectorized reductions (its AVX2 kernels, used on AVX-512 too).
pub const LANES: usize = 8;

/// `ceil(log2(x))`, 1 for x <= 2 (ATen's `CeilLog2`).
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// The sum of squares of `torch.norm(x, dim=-1)` over one row of `n` elements.
#[derive(Debug, Clone)]
pub enum NormSum {
    /// float32 and bfloat16: 8 lanes over the vector body (elements `0..m`, `m` a multiple
    /// of the vector width), lanes added in order, then the tail: whole groups of 4 with a
    /// separate multiply, the last `(n - m) % 4` with a fused multiply-add.
    Fast {
        acc: [f32; LANES],
        n: usize,
        m: usize,
        pos: usize,
        tail: Option<f32>,
    },
    /// float16: torch's generic path, one sequential float32 sum.
    Sequential { s: f32 },
}

impl NormSum {
    /// For a row of `n` elements whose vectors hold `width` of them (8 for float32, 16 for
    /// bfloat16); `width == 0` selects the sequential path (float16).
    pub fn new(n: usize, width: usize) -> Self {
        if width == 0 {
            return NormSum::Sequential { s: 0.0 };
        }
        NormSum::Fast {
            acc: [0.0; LANES],
            n,
            m: n - n % width,
            pos: 0,
            tail: None,
        }
    }

    /// The next elements of the row, in order.
    #[inline(always)]
    pub fn feed(&mut self, x: &[f32]) {
        match self {
            NormSum::Sequential { s } => {
                for v in x {
                    *s += v * v;
                }
            }
            NormSum::Fast {
                acc,
                n,
                m,
                pos,
                tail,
            } => {
                let mut x = x;
                // The vector body, 8 lanes at a time when aligned (the common case).
                while *pos < *m && !x.is_empty() {
                    if pos.is_multiple_of(LANES) && x.len() >= LANES && *pos + LANES <= *m {
                        let k = ((*m - *pos) / LANES).min(x.len() / LANES);
                        for c in x[..k * LANES].chunks_exact(LANES) {
                            for l in 0..LANES {
                                acc[l] += c[l] * c[l];
                            }
                        }
                        *pos += k * LANES;
                        x = &x[k * LANES..];
                    } else {
                        acc[*pos % LANES] += x[0] * x[0];
                        *pos += 1;
                        x = &x[1..];
                    }
                }
                let g = 4 * ((*n - *m) / 4);
                for v in x {
                    let s = tail.get_or_insert_with(|| lanes_sum(acc));
                    let i = *pos - *m;
                    *s = if i < g { *s + v * v } else { v.mul_add(*v, *s) };
                    *pos += 1;
                }
            }
        }
    }

    /// The float32 sum of squares (take `sqrt` and round to the dtype).
    pub fn finish(&self) -> f32 {
        match self {
            NormSum::Sequential { s } => *s,
            NormSum::Fast { acc, tail, .. } => tail.unwrap_or_else(|| lanes_sum(acc)),
        }
    }
}

/// Feed several norms their next values (`xs[q]` to `norms[q]`, all the same length). The
/// sequential (float16) ones advance together, element by element, so their independent
/// chains of dependent adds overlap in one thread instead of each waiting on its own.
pub fn feed_norms(norms: &mut [NormSum], xs: &[&[f32]]) {
    let sequential: Option<Vec<f32>> = norms
        .iter()
        .map(|n| match n {
            NormSum::Sequential { s } => Some(*s),
            NormSum::Fast { .. } => None,
        })
        .collect();
    let Some(mut s) = sequential else {
        for (n, x) in norms.iter_mut().zip(xs) {
            n.feed(x);
        }
        return;
    };
    for (sc, xc) in s.chunks_mut(4).zip(xs.chunks(4)) {
        match sc.len() {
            4 => chains::<4>(sc, xc),
            3 => chains::<3>(sc, xc),
            2 => chains::<2>(sc, xc),
            _ => chains::<1>(sc, xc),
        }
    }
    for (n, v) in norms.iter_mut().zip(s) {
        *n = NormSum::Sequential { s: v };
    }
}

/// `K` sequential sums of squares advanced together (the same adds, in each one's order).
#[inline(always)]
fn chains<const K: usize>(s: &mut [f32], xs: &[&[f32]]) {
    let mut acc = [0f32; K];
    acc.copy_from_slice(&s[..K]);
    let len = xs[0].len();
    for k in 0..len {
        for q in 0..K {
            let v = xs[q][k];
            acc[q] += v * v;
        }
    }
    s[..K].copy_from_slice(&acc);
}

fn lanes_sum(acc: &[f32; LANES]) -> f32 {
    let mut s = acc[0];
    for a in &acc[1..] {
        s += a;
    }
    s
}

/// `x.sum(dim=-1)` over one row of `n` elements (torch's `cascade_sum`): vectors of 8
/// float32 lanes (a bfloat16/float16 vector of 16 folds its halves: `x[k] + x[k + 8]`),
/// four vectors a row with four accumulators, summed in a 4-level cascade whose step grows
/// with the row count, then the leftover vectors, the scalar tail, and the lanes.
#[derive(Debug, Clone)]
pub struct CascadeSum {
    /// Elements per vector: 8 (float32) or 16 (bfloat16, float16).
    width: usize,
    n: usize,
    rows: usize,
    lp: usize,
    done: usize,
    acc: [[[f32; LANES]; 4]; 4],
    buf: Vec<f32>,
}

impl CascadeSum {
    pub fn new(n: usize, width: usize) -> Self {
        debug_assert!(width == LANES || width == 2 * LANES, "a vector of {width}");
        let rows = n / width / 4;
        CascadeSum {
            width,
            n,
            rows,
            lp: (ceil_log2(rows) / 4).max(4),
            done: 0,
            acc: [[[0.0; LANES]; 4]; 4],
            buf: Vec::with_capacity(4 * width),
        }
    }

    /// The next elements of the row, in order.
    #[inline(always)]
    pub fn feed(&mut self, mut x: &[f32]) {
        if self.n < self.width {
            self.buf.extend_from_slice(x);
            return;
        }
        let row = 4 * self.width;
        if !self.buf.is_empty() {
            let take = (row - self.buf.len()).min(x.len());
            self.buf.extend_from_slice(&x[..take]);
            x = &x[take..];
            if self.buf.len() == row && self.done < self.rows {
                let b = std::mem::take(&mut self.buf);
                self.add_row(&b);
                self.buf = b;
                self.buf.clear();
            }
        }
        let used = match self.width {
            LANES => self.add_rows::<LANES>(x),
            _ => self.add_rows::<{ 2 * LANES }>(x),
        };
        self.buf.extend_from_slice(&x[used..]);
    }

    /// Every whole row of `x` while rows remain (the width `W` known, so the row is a few
    /// vector additions on accumulators kept in registers); the elements used.
    #[inline(always)]
    fn add_rows<const W: usize>(&mut self, x: &[f32]) -> usize {
        let row = 4 * W;
        let count = (x.len() / row).min(self.rows - self.done);
        let mask = (1usize << self.lp) - 1;
        let mut a = self.acc[0];
        for r in x[..count * row].chunks_exact(row) {
            for (j, v) in r.chunks_exact(W).enumerate() {
                for k in 0..LANES {
                    a[j][k] += if W == LANES {
                        v[k]
                    } else {
                        v[k] + v[k + LANES]
                    };
                }
            }
            self.done += 1;
            if self.done & mask == 0 {
                self.acc[0] = a;
                self.cascade();
                a = self.acc[0];
            }
        }
        self.acc[0] = a;
        count * row
    }

    #[inline(always)]
    fn vector(&self, v: &[f32]) -> [f32; LANES] {
        let mut out = [0f32; LANES];
        if self.width == LANES {
            out.copy_from_slice(v);
        } else {
            for k in 0..LANES {
                out[k] = v[k] + v[k + LANES];
            }
        }
        out
    }

    #[inline(always)]
    fn add_row(&mut self, r: &[f32]) {
        for (j, v) in r.chunks_exact(self.width).enumerate() {
            let v = self.vector(v);
            for k in 0..LANES {
                self.acc[0][j][k] += v[k];
            }
        }
        self.done += 1;
        if self.done.is_multiple_of(1 << self.lp) {
            self.cascade();
        }
    }

    /// After every `2^lp` rows: each full level's accumulators into the next.
    fn cascade(&mut self) {
        let mask = (1usize << self.lp) - 1;
        for lev in 1..4 {
            for j in 0..4 {
                for k in 0..LANES {
                    self.acc[lev][j][k] += self.acc[lev - 1][j][k];
                    self.acc[lev - 1][j][k] = 0.0;
                }
            }
            if self.done & (mask << (lev * self.lp)) != 0 {
                break;
            }
        }
    }

    /// The float32 sum (`0.0 + s`, as torch stores into a zeroed output); round it to the
    /// dtype.
    pub fn finish(&self) -> f32 {
        if self.n < self.width {
            return 0.0 + row_sum(&self.buf);
        }
        let mut a = self.acc[0];
        for lev in 1..4 {
            for j in 0..4 {
                for k in 0..LANES {
                    a[j][k] += self.acc[lev][j][k];
                }
            }
        }
        let vectors = self.buf.len() / self.width;
        for v in self.buf[..vectors * self.width].chunks_exact(self.width) {
            let v = self.vector(v);
            for k in 0..LANES {
                a[0][k] += v[k];
            }
        }
        let mut p = [0f32; LANES];
        for k in 0..LANES {
            p[k] = ((a[0][k] + a[1][k]) + a[2][k]) + a[3][k];
        }
        let mut s = 0f32;
        for x in &self.buf[vectors * self.width..] {
            s += x;
        }
        for l in p {
            s += l;
        }
        0.0 + s
    }
}

/// A sum of scalars in `row_sum` order: rows of 4 with 4 accumulators (cascaded), the
/// leftovers into the first, then `((a0 + a1) + a2) + a3`.
fn row_sum(x: &[f32]) -> f32 {
    let rows = x.len() / 4;
    let mut acc = [0f32; 4];
    let cascaded = multi_row_sum(rows, |r, j| x[4 * r + j], 4);
    acc[..4].copy_from_slice(&cascaded[..4]);
    for v in &x[4 * rows..] {
        acc[0] += v;
    }
    ((acc[0] + acc[1]) + acc[2]) + acc[3]
}

/// torch's `multi_row_sum` over `rows` rows of `cols` scalars (`at(r, j)`).
fn multi_row_sum(rows: usize, at: impl Fn(usize, usize) -> f32, cols: usize) -> [f32; 4] {
    let lp = (ceil_log2(rows) / 4).max(4);
    let step = 1usize << lp;
    let mask = step - 1;
    let mut acc = [[0f32; 4]; 4];
    let mut i = 0;
    while i + step <= rows {
        for _ in 0..step {
            for j in 0..cols {
                acc[0][j] += at(i, j);
            }
            i += 1;
        }
        for lev in 1..4 {
            for j in 0..cols {
                acc[lev][j] += acc[lev - 1][j];
                acc[lev - 1][j] = 0.0;
            }
            if i & (mask << (lev * lp)) != 0 {
                break;
            }
        }
    }
    while i < rows {
        for j in 0..cols {
            acc[0][j] += at(i, j);
        }
        i += 1;
    }
    for lev in 1..4 {
        for j in 0..cols {
            acc[0][j] += acc[lev][j];
        }
    }
    acc[0]
}

/// `torch.stack(values).mean(dim=0)` for one output of `outputs` (the filter_wise rows;
/// 1 otherwise) at index `col`, in float32 before the cast to the dtype.
pub fn mean(values: &[f32], col: usize, outputs: usize) -> f32 {
    outer_sum(values, col, outputs) / values.len() as f32
}

/// `torch.stack(values).sum(dim=0)` in float32 for output `col` of `outputs`: one row of
/// `values.len()` when there is a single output, else torch's outer-sum kernels, whose
/// order depends on where the output sits among the others (whole groups of columns sum
/// row by row in a cascade, the last columns in a scalar row sum).
pub fn outer_sum(values: &[f32], col: usize, outputs: usize) -> f32 {
    let p = values.len();
    if outputs <= 1 {
        let mut c = CascadeSum::new(p, LANES);
        c.feed(values);
        c.finish()
    } else {
        let group = if outputs >= LANES { 32 } else { 4 };
        if col < group * (outputs / group) {
            0.0 + multi_row_sum(p, |r, _| values[r], 1)[0]
        } else {
            0.0 + row_sum(values)
        }
    }
}

/// `torch.stack(values).sum(dim=0)` for element `col` of a tensor of `numel` elements held
/// in `dtype`: bfloat16 and float16 add in float32 in model order; float32 takes the
/// outer-sum order of the element's column ([`outer_sum`]). Not rounded. The kernels take
/// a run at a time ([`sum_models_run`]); this is the definition the tests hold it to.
#[cfg(test)]
fn sum_models(dtype: safetensors::Dtype, values: &[f32], col: usize, numel: usize) -> f32 {
    if dtype == safetensors::Dtype::F32 {
        outer_sum(values, col, numel)
    } else {
        values.iter().fold(0.0, |a, &x| a + x)
    }
}

/// `torch.stack(values).sum(dim=0)` in its per-element order (the tests' `sum_models`) for
/// a run of elements `start..start + out.len()`: model `i`'s values at
/// `rows[i * len..(i + 1) * len]` with `len = out.len()`. The 16-bit dtypes' sums run down
/// the models a vector of elements at a time (the same additions, in the same order).
pub fn sum_models_run(
    dtype: safetensors::Dtype,
    rows: &[f32],
    start: usize,
    numel: usize,
    out: &mut [f32],
) {
    let len = out.len();
    if len == 0 {
        return;
    }
    let models = rows.len() / len;
    out.fill(0.0);
    for row in rows.chunks_exact(len) {
        for (o, x) in out.iter_mut().zip(row) {
            *o += x;
        }
    }
    if dtype == safetensors::Dtype::F32 {
        // float32's outer sums are that fold too for fewer than 16 models in a tensor's
        // whole groups of columns (a cascade that never fills, plus zeros); the rest sum
        // one element at a time.
        let folded = if models < 16 && numel > 1 {
            let group = if numel >= LANES { 32 } else { 4 };
            group * (numel / group)
        } else {
            0
        };
        let mut col = vec![0f32; models];
        for (j, o) in out
            .iter_mut()
            .enumerate()
            .skip(folded.saturating_sub(start))
        {
            for (c, row) in col.iter_mut().zip(rows.chunks_exact(len)) {
                *c = row[j];
            }
            *o = outer_sum(&col, start + j, numel);
        }
    }
}

/// torch's `sign`: 1, -1, or 0 (for zeros and NaN).
#[inline(always)]
pub fn sign(x: f32) -> f32 {
    // Without branches: in the methods' loops the signs are coin flips.
    ((x > 0.0) as i32 - (x < 0.0) as i32) as f32
}

/// Elements per vector of torch's sums over a tensor held in `dtype` ([`CascadeSum`]'s
/// width): 8 float32 lanes, 16 for the 16-bit dtypes.
pub fn sum_width(dtype: safetensors::Dtype) -> usize {
    if dtype == safetensors::Dtype::F32 {
        LANES
    } else {
        2 * LANES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_model_sums_is_each_elements_sum() {
        let mut seed = 99u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            match seed >> 60 {
                0 => -0.0,
                1 => 0.0,
                _ => ((seed >> 40) as i32 - (1 << 23)) as f32 * 1e-3,
            }
        };
        for models in [1usize, 2, 3, 4, 5, 15, 16, 17, 33] {
            for (numel, start, len) in [
                (1, 0, 1),
                (7, 0, 7),
                (40, 3, 37),
                (100, 60, 40),
                (4100, 4000, 100),
            ] {
                let rows: Vec<f32> = (0..models * len).map(|_| next()).collect();
                for dtype in [safetensors::Dtype::F32, safetensors::Dtype::BF16] {
                    let mut got = vec![0f32; len];
                    sum_models_run(dtype, &rows, start, numel, &mut got);
                    for (j, g) in got.iter().enumerate() {
                        let col: Vec<f32> = rows.chunks_exact(len).map(|r| r[j]).collect();
                        let want = sum_models(dtype, &col, start + j, numel);
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "{models} models, {numel} at {}",
                            start + j
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn orders_written_out() {
        // row_sum of 6 values: (((((0+v0)+v4)+v5)+v1)+v2)+v3.
        let v = [1e8f32, 1.0, -1e8, 3.0, 0.5, 0.25];
        let want = (((((0f32 + v[0]) + v[4]) + v[5]) + v[1]) + v[2]) + v[3];
        assert_eq!(row_sum(&v).to_bits(), want.to_bits());
        assert_eq!(ceil_log2(1), 1);
        assert_eq!(ceil_log2(3), 2);
        assert_eq!(ceil_log2(1 << 20), 20);
        assert_eq!(ceil_log2((1 << 20) + 1), 21);
    }

    #[test]
    fn streaming_in_any_chunks_gives_the_same_bits() {
        let n = 100_003;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.618).sin() * 1e-3) + if i % 977 == 0 { 3.0 } else { 0.0 })
            .collect();
        for width in [8, 16] {
            let mut whole = CascadeSum::new(n, width);
            whole.feed(&x);
            let mut norm = NormSum::new(n, width);
            norm.feed(&x);
            for chunk in [1, 7, 64, 4096, 65_536] {
                let mut c = CascadeSum::new(n, width);
                let mut m = NormSum::new(n, width);
                for part in x.chunks(chunk) {
                    c.feed(part);
                    m.feed(part);
                }
                assert_eq!(
                    c.finish().to_bits(),
                    whole.finish().to_bits(),
                    "{width} {chunk}"
                );
                assert_eq!(
                    m.finish().to_bits(),
                    norm.finish().to_bits(),
                    "{width} {chunk}"
                );
            }
        }
    }

    #[test]
    fn small_rows_take_the_scalar_path() {
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0];
        let mut c = CascadeSum::new(5, 16);
        c.feed(&x);
        assert_eq!(c.finish(), 15.0);
        let mut n = NormSum::new(5, 8);
        n.feed(&x);
        assert_eq!(n.finish(), 55.0);
    }
}
