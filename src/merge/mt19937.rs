//! torch's CPU random stream: mt19937 seeded by `torch.manual_seed`, and the draws
//! `torch.bernoulli` takes from it; with a jump ahead, so any tensor's draws can start
//! where mergekit's would, on any worker, without drawing through the tensors before it.
//!
//! mergekit's random methods (dare, della) consume one stream across the whole merge, in
//! tensor-name order. The plan gives each tensor its offset in that stream; here the
//! generator jumps there in `O(log offset)` polynomial steps: the state after `J` steps is
//! `g(A) s0` with `g = x^J mod P`, `P` the generator's characteristic polynomial (degree
//! 19937, found once by Berlekamp-Massey from the stream itself) and `A` one step of the
//! recurrence, applied by Horner's rule.

use std::sync::{Arc, Mutex, OnceLock};

use super::bits;

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER: u32 = 0x8000_0000;
const LOWER: u32 = 0x7fff_ffff;
/// The dimension of the generator's state space (and the degree of `P`).
const DEGREE: usize = 19937;

/// mt19937 as torch's CPU generator runs it.
#[derive(Clone)]
pub struct Mt19937 {
    mt: [u32; N],
    next: usize,
}

/// One step of the recurrence: the word after `x[k], x[k+1], ..., x[k+397]`.
#[inline(always)]
fn recur(xk: u32, xk1: u32, xkm: u32) -> u32 {
    let y = (xk & UPPER) | (xk1 & LOWER);
    xkm ^ (y >> 1) ^ if xk1 & 1 == 1 { MATRIX_A } else { 0 }
}

fn init_state(seed: u64) -> [u32; N] {
    let mut mt = [0u32; N];
    mt[0] = seed as u32;
    for i in 1..N {
        mt[i] = 1_812_433_253u32
            .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
            .wrapping_add(i as u32);
    }
    mt
}

impl Mt19937 {
    /// `torch.manual_seed(seed)`: the standard `init_genrand` of the seed's low 32 bits
    /// (the kernels start at an offset, [`Mt19937::at`]; the tests walk from here).
    #[cfg(test)]
    fn new(seed: u64) -> Self {
        Mt19937 {
            mt: init_state(seed),
            next: N,
        }
    }

    /// The generator after `draws` 32-bit draws from `seed`. The last generators made are
    /// kept, and the nearest one at or before `draws` (the previous model's, the previous
    /// tensor's last model's) moves on by [`Mt19937::ahead`]: usually one application of a
    /// kept polynomial instead of the whole jump from the seed.
    pub fn at(seed: u64, draws: u64) -> Self {
        type Kept = Vec<(u64, u64, Arc<Mt19937>)>;
        static KEPT: Mutex<Kept> = Mutex::new(Vec::new());
        let near = KEPT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(s, d, _)| *s == seed && *d <= draws)
            .max_by_key(|(_, d, _)| *d)
            .map(|(_, d, g)| (*d, g.clone()));
        let g = match near {
            Some((from, g)) => g.ahead(draws - from),
            None => Mt19937 {
                mt: jump(&init_state(seed), draws),
                next: N,
            },
        };
        let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
        if kept.len() >= 8 {
            kept.remove(0);
        }
        kept.push((seed, draws, Arc::new(g.clone())));
        g
    }

    /// This generator `draws` draws later. The jump's polynomial is kept for the next jump
    /// of the same length (a merge's models and tensors repeat a few sizes), so a jump
    /// from here costs one application, not the polynomial's powers.
    pub fn ahead(&self, draws: u64) -> Self {
        debug_assert_eq!(self.next, N, "a jump starts from a whole window");
        if draws == 0 {
            return self.clone();
        }
        static KEPT: Mutex<Vec<(u64, Arc<Poly>)>> = Mutex::new(Vec::new());
        let kept = KEPT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(d, _)| *d == draws)
            .map(|(_, p)| p.clone());
        let poly = kept.unwrap_or_else(|| {
            let p = Arc::new(power_of_x(draws));
            let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
            if kept.len() >= 16 {
                kept.remove(0);
            }
            kept.push((draws, p.clone()));
            p
        });
        Mt19937 {
            mt: apply(&self.mt, &poly),
            next: N,
        }
    }

    /// The next 624 words, in place: word `i` from `i + 1` and `i + 397` (mod 624), the
    /// words past the end already renewed. Three loops without a modulo, so the compiler
    /// makes vector loops of the first two (the second reads words 227 behind it).
    fn twist(&mut self) {
        let mt = &mut self.mt;
        for i in 0..N - M {
            mt[i] = recur(mt[i], mt[i + 1], mt[i + M]);
        }
        for i in N - M..N - 1 {
            mt[i] = recur(mt[i], mt[i + 1], mt[i + M - N]);
        }
        mt[N - 1] = recur(mt[N - 1], mt[0], mt[M - 1]);
        self.next = 0;
    }

    /// The next 32-bit draw.
    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.next >= N {
            self.twist();
        }
        let y = self.mt[self.next];
        self.next += 1;
        temper(y)
    }

    /// One `torch.bernoulli` draw for probability `p` (a float32, bfloat16 or float16
    /// probability, as float32): 24 random bits as a float in [0, 1), below `p`.
    #[inline]
    pub fn bernoulli(&mut self, p: f32) -> bool {
        below(self.next_u32(), p)
    }

    /// `out.len()` draws of [`Mt19937::bernoulli`], element `j` with probability `p` of
    /// element `from + j`.
    #[inline(always)]
    fn bernoulli_fill(&mut self, out: &mut [bool], from: usize, p: Probs) {
        match p {
            Probs::All(p) => self.fill_with(out, |_| p),
            Probs::Each(ps) => self.fill_with(out, |j| ps[from + j]),
        }
    }

    /// `n` draws as [`Mt19937::bernoulli_fill`] into bits (see [`super::bits`]), drawn a
    /// run at a time into flags on the stack, then packed.
    #[inline(always)]
    fn bernoulli_bits(&mut self, out: &mut [u64], from: usize, n: usize, p: Probs) {
        const RUN: usize = 4096;
        let mut flags = [false; RUN];
        for (c, words) in out.chunks_mut(RUN / 64).enumerate() {
            let len = RUN.min(n - c * RUN);
            self.bernoulli_fill(&mut flags[..len], from + c * RUN, p);
            bits::pack(&flags[..len], words);
        }
    }

    /// Draws into `out`, element `j` with probability `p(j)`: a state's words at a time,
    /// in one loop the compiler vectorizes.
    #[inline(always)]
    fn fill_with(&mut self, out: &mut [bool], p: impl Fn(usize) -> f32) {
        let mut done = 0;
        while done < out.len() {
            if self.next >= N {
                self.twist();
            }
            let take = (N - self.next).min(out.len() - done);
            let words = &self.mt[self.next..self.next + take];
            for (j, (o, &w)) in out[done..done + take].iter_mut().zip(words).enumerate() {
                *o = below(temper(w), p(done + j));
            }
            self.next += take;
            done += take;
        }
    }
}

/// The probability of each draw of [`bernoulli_par`]: one for all, or one per element.
#[derive(Debug, Clone, Copy)]
pub enum Probs<'a> {
    All(f32),
    Each(&'a [f32]),
}

/// The draw loop compiled twice (see [`super::simd`]).
mod simd {
    use super::*;
    use crate::twice;

    twice!(bernoulli_bits(g: &mut Mt19937, out: &mut [u64], from: usize, n: usize, p: Probs) => g.bernoulli_bits(out, from, n, p));
}

/// mt19937's tempering of a state word into a draw.
#[inline(always)]
fn temper(mut y: u32) -> u32 {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c_5680;
    y ^= (y << 15) & 0xefc6_0000;
    y ^ (y >> 18)
}

/// torch's Bernoulli test of a draw: its low 24 bits as a float in [0, 1), below `p`.
#[inline(always)]
fn below(draw: u32, p: f32) -> bool {
    ((draw & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)) < p
}

/// Draws per segment of [`bernoulli_par`]: 8M draws take about 20 ms, a step from one
/// segment's start to the next (a fixed polynomial, applied) about 3 ms.
const SEGMENT: usize = 1 << 23;

/// `torch.bernoulli` for `n` elements with probabilities `p`, from generator `g` (a whole
/// window: [`Mt19937::at`], [`Mt19937::ahead`]), into bits (`out`: `bits::words(n)`
/// words): the same values as drawing them one after another, drawn in segments on every
/// core, each from its own start.
pub fn bernoulli_par(g: &Mt19937, n: usize, out: &mut [u64], p: Probs) {
    use rayon::prelude::*;
    static STEP: OnceLock<Poly> = OnceLock::new();
    let step = STEP.get_or_init(|| power_of_x(SEGMENT as u64));
    let mut starts = Vec::with_capacity(n.div_ceil(SEGMENT));
    let mut g = g.clone();
    for s in 0..n.div_ceil(SEGMENT) {
        if s > 0 {
            g = Mt19937 {
                mt: apply(&g.mt, step),
                next: N,
            };
        }
        starts.push(g.clone());
    }
    out[..bits::words(n)]
        .par_chunks_mut(SEGMENT / 64)
        .zip(starts)
        .enumerate()
        .for_each(|(s, (out, mut g))| {
            let from = s * SEGMENT;
            simd::bernoulli_bits(&mut g, out, from, SEGMENT.min(n - from), p);
        });
}

/// A polynomial over GF(2), bit `i` of the words the coefficient of `x^i`.
type Poly = Vec<u64>;

fn bit(p: &[u64], i: usize) -> bool {
    p.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1)
}

fn degree(p: &[u64]) -> Option<usize> {
    p.iter()
        .rposition(|&w| w != 0)
        .map(|i| i * 64 + 63 - p[i].leading_zeros() as usize)
}

/// The characteristic polynomial of mt19937's recurrence: the minimal polynomial of the
/// top bit of its words (Berlekamp-Massey over 2 x 19937 of them).
fn characteristic() -> &'static Poly {
    static P: OnceLock<Poly> = OnceLock::new();
    P.get_or_init(|| {
        let n = 2 * DEGREE + 64;
        // The sequence x[0], x[1], ... from any seed: the recurrence is the same.
        let mut x: Vec<u32> = init_state(5489).to_vec();
        while x.len() < n + N {
            let k = x.len() - N;
            x.push(recur(x[k], x[k + 1], x[k + M]));
        }
        let s: Vec<bool> = x[..n].iter().map(|w| w >> 31 == 1).collect();
        berlekamp_massey(&s)
    })
}

/// The shortest linear recurrence of a bit sequence: `C(x)` with `C(0) = 1`, returned as
/// its reciprocal (the characteristic polynomial, leading coefficient at `x^L`).
fn berlekamp_massey(s: &[bool]) -> Poly {
    let words = s.len() / 64 + 2;
    let mut c: Poly = vec![0; words];
    let mut b: Poly = vec![0; words];
    c[0] = 1;
    b[0] = 1;
    let (mut l, mut m) = (0usize, 1usize);
    // The sequence reversed, as bits: s[n - i] is bit (len - 1 - n + i) of `rev`, so a
    // discrepancy is the parity of `c` AND a window of `rev`, 64 terms a word.
    let len = s.len();
    let mut rev: Poly = vec![0; len / 64 + 2];
    for (k, &b) in s.iter().rev().enumerate() {
        if b {
            rev[k / 64] |= 1 << (k % 64);
        }
    }
    let window = |off: usize, j: usize| -> u64 {
        let (q, r) = (off / 64 + j, off % 64);
        let lo = rev.get(q).copied().unwrap_or(0) >> r;
        let hi = if r == 0 {
            0
        } else {
            rev.get(q + 1).copied().unwrap_or(0) << (64 - r)
        };
        lo | hi
    };
    for n in 0..len {
        // The discrepancy: s[n] + sum_{i=1..L} c_i s[n-i]; bit i of the window at
        // `len - 1 - n` is s[n - i] (bit 0 is s[n] itself, and c_0 = 1).
        let off = len - 1 - n;
        let mut acc = 0u64;
        for (j, &word) in c.iter().enumerate().take(l / 64 + 1) {
            let mut cw = word;
            if j == l / 64 {
                let top = l % 64;
                if top < 63 {
                    cw &= (1u64 << (top + 1)) - 1;
                }
            }
            acc ^= cw & window(off, j);
        }
        let d = acc.count_ones() % 2 == 1;
        if !d {
            m += 1;
            continue;
        }
        let t = c.clone();
        // c += x^m b
        for (i, &w) in b.iter().enumerate() {
            if w == 0 {
                continue;
            }
            let at = i * 64 + m;
            let (q, r) = (at / 64, at % 64);
            if q < words {
                c[q] ^= w << r;
            }
            if r != 0 && q + 1 < words {
                c[q + 1] ^= w >> (64 - r);
            }
        }
        if 2 * l <= n {
            l = n + 1 - l;
            b = t;
            m = 1;
        } else {
            m += 1;
        }
    }
    // The characteristic polynomial: coefficient of x^(L - i) is c_i.
    let mut p: Poly = vec![0; l / 64 + 1];
    for i in 0..=l {
        if bit(&c, i) {
            let j = l - i;
            p[j / 64] |= 1 << (j % 64);
        }
    }
    p
}

/// `a` reduced modulo `p` (of degree `d`), in place, a bit at a time (the tests' check of
/// [`Reducer`]).
#[cfg(test)]
fn reduce(a: &mut Poly, p: &[u64], d: usize) {
    while let Some(top) = degree(a) {
        if top < d {
            break;
        }
        let shift = top - d;
        let (q, r) = (shift / 64, shift % 64);
        for (i, &w) in p.iter().enumerate() {
            if w == 0 {
                continue;
            }
            a[i + q] ^= w << r;
            if r != 0 && i + q + 1 < a.len() {
                a[i + q + 1] ^= w >> (64 - r);
            }
        }
    }
    a.truncate(d / 64 + 1);
}

/// Reduction modulo the characteristic polynomial eight bits at a time: `table[b]` is
/// `b(x) * x^d mod P`, so the eight coefficients at `d + s..d + s + 8` are replaced by
/// `table[b] * x^s`, whose degree stays below `d + s`; top down, that is a full reduction in
/// `d / 8` word-wide XORs instead of one per set bit.
struct Reducer {
    d: usize,
    words: usize,
    table: Vec<u64>,
}

impl Reducer {
    fn get() -> &'static Reducer {
        static R: OnceLock<Reducer> = OnceLock::new();
        R.get_or_init(|| {
            let p = characteristic();
            let d = degree(p).expect("a nonzero polynomial");
            let words = d / 64 + 1;
            // x^(d + j) mod P for j = 0..8: x^d = P - x^d, then times x, reduced.
            let mut powers: Vec<Vec<u64>> = Vec::with_capacity(8);
            let mut cur = p[..words].to_vec();
            cur[d / 64] &= !(1u64 << (d % 64));
            for _ in 0..8 {
                powers.push(cur.clone());
                let mut carry = 0;
                for w in cur.iter_mut() {
                    let next = *w >> 63;
                    *w = (*w << 1) | carry;
                    carry = next;
                }
                if cur[d / 64] >> (d % 64) & 1 == 1 {
                    for (c, &w) in cur.iter_mut().zip(p) {
                        *c ^= w;
                    }
                }
            }
            let mut table = vec![0u64; 256 * words];
            for b in 1usize..256 {
                let low = b & (b - 1);
                let j = (b ^ low).trailing_zeros() as usize;
                for k in 0..words {
                    table[b * words + k] = table[low * words + k] ^ powers[j][k];
                }
            }
            Reducer { d, words, table }
        })
    }

    /// `a mod P`, truncated to the residue's words.
    fn reduce(&self, a: &mut Poly) {
        let d = self.d;
        let Some(top) = degree(a) else {
            a.truncate(self.words);
            return;
        };
        if top >= d {
            for m in (0..=(top - d) / 8).rev() {
                let at = d + 8 * m;
                let b = bits8(a, at);
                if b == 0 {
                    continue;
                }
                // Clear the eight coefficients, then add table[b] * x^(8m).
                a[at / 64] &= !(0xffu64 << (at % 64));
                if at % 64 > 56 {
                    a[at / 64 + 1] &= !(0xffu64 >> (64 - at % 64));
                }
                let row = &self.table[b * self.words..(b + 1) * self.words];
                let (q, r) = ((8 * m) / 64, (8 * m) % 64);
                for (i, &w) in row.iter().enumerate() {
                    a[i + q] ^= w << r;
                    if r != 0 {
                        a[i + q + 1] ^= w >> (64 - r);
                    }
                }
            }
        }
        a.truncate(self.words);
    }
}

/// The eight coefficients of `a` at `at..at + 8`.
fn bits8(a: &[u64], at: usize) -> usize {
    let (w, r) = (at / 64, at % 64);
    let mut v = a[w] >> r;
    if r > 56 {
        v |= a.get(w + 1).copied().unwrap_or(0) << (64 - r);
    }
    (v & 0xff) as usize
}

/// `x^e mod P`, P the characteristic polynomial.
fn power_of_x(e: u64) -> Poly {
    let red = Reducer::get();
    let words = 2 * red.words + 1;
    let mut r: Poly = vec![0; words];
    r[0] = 1;
    for k in (0..64 - e.leading_zeros()).rev() {
        // r = r^2: over GF(2), bit i moves to bit 2i.
        let mut sq: Poly = vec![0; words];
        for (i, &w) in r.iter().enumerate().take(red.words) {
            sq[2 * i] = spread(w as u32);
            sq[2 * i + 1] = spread((w >> 32) as u32);
        }
        r = sq;
        if e >> k & 1 == 1 {
            // r = r * x
            let mut carry = 0;
            for w in r.iter_mut() {
                let next = *w >> 63;
                *w = (*w << 1) | carry;
                carry = next;
            }
        }
        red.reduce(&mut r);
        r.resize(words, 0);
    }
    r
}

/// The bits of `x` at the even positions of a word: `x(t)^2` over GF(2).
fn spread(x: u32) -> u64 {
    let mut v = x as u64;
    v = (v | (v << 16)) & 0x0000_ffff_0000_ffff;
    v = (v | (v << 8)) & 0x00ff_00ff_00ff_00ff;
    v = (v | (v << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    v = (v | (v << 2)) & 0x3333_3333_3333_3333;
    (v | (v << 1)) & 0x5555_5555_5555_5555
}

/// The state window `x[J..J + 624]` from `x[0..624]`.
fn jump(state: &[u32; N], draws: u64) -> [u32; N] {
    if draws == 0 {
        return *state;
    }
    apply(state, &power_of_x(draws))
}

/// `g(A) s`: the window `g` steps on when `g = x^J mod P`.
fn apply(state: &[u32; N], g: &[u64]) -> [u32; N] {
    // Horner: v = sum_i g_i A^i s, highest coefficient first. `buf` holds the window of
    // v at `start`; a step appends the next word.
    let mut buf = vec![0u32; 2 * N];
    let mut start = 0;
    for i in (0..=degree(g).unwrap_or(0)).rev() {
        // v = A v
        if start + N == buf.len() {
            buf.copy_within(start.., 0);
            start = 0;
        }
        let w = recur(buf[start], buf[start + 1], buf[start + M]);
        buf[start + N] = w;
        start += 1;
        if bit(g, i) {
            for (v, s) in buf[start..start + N].iter_mut().zip(state) {
                *v ^= s;
            }
        }
    }
    let mut out = [0u32; N];
    out.copy_from_slice(&buf[start..start + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_stream() {
        // mt19937 from 5489: the C++ standard's check value is the 10000th output.
        let mut g = Mt19937::new(5489);
        let first = g.next_u32();
        assert_eq!(first, 3_499_211_612);
        for _ in 1..9999 {
            g.next_u32();
        }
        assert_eq!(g.next_u32(), 4_123_659_995);
    }

    #[test]
    fn segmented_draws_are_the_streams_draws() {
        let n = 2 * SEGMENT + 12_345;
        let p: Vec<f32> = (0..n).map(|i| (i % 10) as f32 / 10.0).collect();
        let mut par = vec![0u64; bits::words(n)];
        bernoulli_par(&Mt19937::at(9, 777), n, &mut par, Probs::Each(&p));
        let mut g = Mt19937::at(9, 777);
        assert!((0..n).all(|i| bits::get(&par, i) == g.bernoulli(p[i])));
        assert_eq!(par[n / 64] >> (n % 64), 0, "no bit past the end");
        let mut all = vec![0u64; bits::words(n)];
        bernoulli_par(&Mt19937::at(9, 777), n, &mut all, Probs::All(0.3));
        let mut g = Mt19937::at(9, 777);
        assert!((0..n).all(|i| bits::get(&all, i) == g.bernoulli(0.3)));
    }

    #[test]
    fn the_table_reduction_is_the_bitwise_one() {
        let p = characteristic();
        let d = degree(p).unwrap();
        let mut s = 12345u64;
        for len in [1usize, 200, 311, 312, 400, 623, 624] {
            let mut a: Poly = (0..len)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    s
                })
                .collect();
            a.resize(2 * (d / 64 + 1) + 1, 0);
            let mut b = a.clone();
            reduce(&mut a, p, d);
            Reducer::get().reduce(&mut b);
            assert_eq!(a, b, "{len} words");
        }
    }

    #[test]
    fn the_characteristic_polynomial_has_the_generators_degree() {
        assert_eq!(degree(characteristic()), Some(DEGREE));
    }

    #[test]
    fn a_jump_lands_where_drawing_through_does() {
        for (seed, draws) in [
            (0u64, 1u64),
            (0, 623),
            (0, 624),
            (7, 625),
            (42, 100_003),
            (3, 1_000_000),
        ] {
            let mut walked = Mt19937::new(seed);
            for _ in 0..draws {
                walked.next_u32();
            }
            let mut jumped = Mt19937::at(seed, draws);
            // In two jumps from the seed (the second with a kept polynomial when the halves
            // are equal).
            let mut twice = Mt19937::at(seed, 0)
                .ahead(draws / 2)
                .ahead(draws - draws / 2);
            for k in 0..2000 {
                let w = walked.next_u32();
                assert_eq!(jumped.next_u32(), w, "seed {seed} +{draws}, draw {k}");
                assert_eq!(twice.next_u32(), w, "ahead: seed {seed} +{draws}, draw {k}");
            }
        }
    }

    #[test]
    fn a_jump_from_a_kept_generator_lands_where_drawing_through_does() {
        // Out of order: each from the nearest kept generator before it (or the seed), of
        // this seed only.
        let mut walked = Mt19937::new(11);
        let mut draws = vec![];
        for _ in 0..90_000 {
            draws.push(walked.next_u32());
        }
        Mt19937::at(12, 30_000);
        for at in [50_000usize, 20_000, 70_000, 20_001, 89_000] {
            let mut g = Mt19937::at(11, at as u64);
            for (k, &w) in draws[at..].iter().take(1000).enumerate() {
                assert_eq!(g.next_u32(), w, "at {at}, draw {k}");
            }
        }
    }
}
