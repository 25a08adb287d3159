//! slerp (mergekit 0.1.5, `merge_methods/slerp.py`): spherical interpolation between the
//! base and one other model, by `t` (0 gives the base).
//!
//! mergekit's batched kernel works in float32 on the flattened tensor, in chunks of 2^20
//! elements: the norms of `a` (base) and `b` are the norms of the chunks' norms (torch's
//! lane-path `vector_norm`), a norm at most 1e-8 counts as 1; the cosine is the sum over the
//! chunks of each chunk's cascade sum of `(a / |a|) * (b / |b|)`, clamped to [-1, 1]. Then
//! four scalar transcendentals give the two coefficients (linear interpolation when the
//! cosine's magnitude passes 0.9995), and `out = R(ca * a + cb * b)` (two float32
//! products and a sum, one rounding to the working dtype). So it streams in three passes:
//! norms, cosine, output ([`super::Streaming::Statistics`] with two statistics passes).
//!
//! torch computes float32 `acos`/`sin` with Intel MKL's vector math, whose last bit differs
//! from the C library's on a few percent of inputs: see [`super::vml`].

use rayon::prelude::*;

use super::numeric::{decode, encode_with, Bf16, Round, F16, F32};
use super::torch::{CascadeSum, NormSum, LANES};
use super::{par_windows, vml, InputView, Kernel, Prepared, WorkDtype};
use crate::params::{Kind, ParamDef, Scope};

pub const PARAMS: &[ParamDef] = &[ParamDef {
    name: "t",
    kind: Kind::Float,
    scope: Scope::Shared,
    default: None,
}];

/// mergekit's chunk: the norms and the cosine are summed chunk by chunk.
pub const CHUNK: usize = 1 << 20;
const MICRO: usize = 512;

/// A statistics pass in progress: the chunks' norms, then the chunks' cosine sums.
#[derive(Debug, Clone)]
pub enum Acc {
    Norms {
        pos: usize,
        a: Vec<NormSum>,
        b: Vec<NormSum>,
    },
    Dot {
        pos: usize,
        na: f32,
        nb: f32,
        parts: Vec<CascadeSum>,
    },
}

fn chunk_lens(numel: usize) -> impl Iterator<Item = usize> {
    (0..numel.div_ceil(CHUNK)).map(move |c| CHUNK.min(numel - c * CHUNK))
}

/// The pass after `prior`: the norms first, the cosine once the norms are known.
pub fn begin(prior: Prepared, numel: usize) -> Acc {
    match prior {
        Prepared::SlerpNorms(na, nb) => Acc::Dot {
            pos: 0,
            na,
            nb,
            parts: chunk_lens(numel)
                .map(|n| CascadeSum::new(n, LANES))
                .collect(),
        },
        _ => Acc::Norms {
            pos: 0,
            a: chunk_lens(numel).map(|n| NormSum::new(n, LANES)).collect(),
            b: chunk_lens(numel).map(|n| NormSum::new(n, LANES)).collect(),
        },
    }
}

/// The next `len` elements (`inputs` hold exactly them), chunks in parallel.
pub fn feed(k: &Kernel, acc: &mut Acc, inputs: &[InputView], len: usize) {
    match k.work {
        WorkDtype::BF16 => feed_r::<Bf16>(acc, inputs, len),
        WorkDtype::F16 => feed_r::<F16>(acc, inputs, len),
        _ => feed_r::<F32>(acc, inputs, len),
    }
}

/// The pieces of a window starting at tensor element `pos`: `(chunk, window offset, len)`.
fn pieces(pos: usize, len: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < len {
        let at = pos + off;
        let n = (CHUNK - at % CHUNK).min(len - off);
        out.push((at / CHUNK, off, n));
        off += n;
    }
    out
}

fn feed_r<R: Round>(acc: &mut Acc, inputs: &[InputView], len: usize) {
    // Runs `f(piece's accumulator(s), window offset, piece len)` for each piece, in
    // parallel (each piece is a different chunk).
    let decode_pair = |off: usize, m: usize, a: &mut [f32], b: &mut [f32]| {
        decode::<R>(inputs[0].bytes, inputs[0].dtype, off, &mut a[..m]);
        decode::<R>(inputs[1].bytes, inputs[1].dtype, off, &mut b[..m]);
    };
    match acc {
        Acc::Norms { pos, a, b } => {
            let ps = pieces(*pos, len);
            let first = ps.first().map_or(0, |p| p.0);
            let n = ps.len();
            a[first..first + n]
                .par_iter_mut()
                .zip(b[first..first + n].par_iter_mut())
                .zip(ps.par_iter())
                .for_each(|((na, nb), &(_, off, n))| {
                    let (mut x, mut y) = ([0f32; MICRO], [0f32; MICRO]);
                    let mut i = 0;
                    while i < n {
                        let m = MICRO.min(n - i);
                        decode_pair(off + i, m, &mut x, &mut y);
                        na.feed(&x[..m]);
                        nb.feed(&y[..m]);
                        i += m;
                    }
                });
            *pos += len;
        }
        Acc::Dot { pos, na, nb, parts } => {
            let (na, nb) = (*na, *nb);
            let ps = pieces(*pos, len);
            let first = ps.first().map_or(0, |p| p.0);
            parts[first..first + ps.len()]
                .par_iter_mut()
                .zip(ps.par_iter())
                .for_each(|(sum, &(_, off, n))| {
                    let (mut x, mut y) = ([0f32; MICRO], [0f32; MICRO]);
                    let mut i = 0;
                    while i < n {
                        let m = MICRO.min(n - i);
                        decode_pair(off + i, m, &mut x, &mut y);
                        for j in 0..m {
                            x[j] = (x[j] / na) * (y[j] / nb);
                        }
                        sum.feed(&x[..m]);
                        i += m;
                    }
                });
            *pos += len;
        }
    }
}

/// The norm of the chunks' norms (torch's `vector_norm` of the stacked values), 1 when at
/// most 1e-8.
fn norm_of(chunks: &[NormSum]) -> f32 {
    let norms: Vec<f32> = chunks.iter().map(|c| c.finish().sqrt()).collect();
    let mut all = NormSum::new(norms.len(), LANES);
    all.feed(&norms);
    let n = all.finish().sqrt();
    if n > 1e-8f32 {
        n
    } else {
        1.0
    }
}

/// A pass's result: the norms, then the two coefficients for `t`.
pub fn finish(acc: &Acc, t: f64) -> Prepared {
    match acc {
        Acc::Norms { a, b, .. } => Prepared::SlerpNorms(norm_of(a), norm_of(b)),
        Acc::Dot { parts, .. } => {
            let dots: Vec<f32> = parts.iter().map(CascadeSum::finish).collect();
            let mut sum = CascadeSum::new(dots.len(), LANES);
            sum.feed(&dots);
            let (ca, cb) = coefficients(sum.finish(), t as f32);
            Prepared::Coefficients(ca, cb)
        }
    }
}

/// The coefficients of the base and the other model, from their cosine.
fn coefficients(dot: f32, t: f32) -> (f32, f32) {
    let dot = dot.clamp(-1.0, 1.0);
    let linear = dot.abs() > 0.9995f32;
    let theta = vml::acos(if linear { 0.0 } else { dot });
    let s = vml::sin(theta);
    if linear {
        (1.0 - t, t)
    } else {
        (vml::sin((1.0 - t) * theta) / s, vml::sin(t * theta) / s)
    }
}

/// `out = R(ca * a + cb * b)` over a window.
pub fn apply(k: &Kernel, (ca, cb): (f32, f32), inputs: &[InputView], len: usize, out: &mut [u8]) {
    let od = k.out.st_dtype();
    par_windows(len, k.out.size(), out, |start, len, out| match k.work {
        WorkDtype::BF16 => apply_range::<Bf16>(inputs, start, len, ca, cb, od, out),
        WorkDtype::F16 => apply_range::<F16>(inputs, start, len, ca, cb, od, out),
        _ => apply_range::<F32>(inputs, start, len, ca, cb, od, out),
    })
}

fn apply_range<R: Round>(
    inputs: &[InputView],
    start: usize,
    len: usize,
    ca: f32,
    cb: f32,
    od: safetensors::Dtype,
    out: &mut [u8],
) {
    let osz = out.len() / len.max(1);
    let (mut a, mut b) = ([0f32; MICRO], [0f32; MICRO]);
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        decode::<R>(inputs[0].bytes, inputs[0].dtype, start + off, &mut a[..m]);
        decode::<R>(inputs[1].bytes, inputs[1].dtype, start + off, &mut b[..m]);
        for j in 0..m {
            a[j] = R::round(ca * a[j] + cb * b[j]);
        }
        encode_with::<R>(&a[..m], od, &mut out[off * osz..(off + m) * osz]);
        off += m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cut_at_chunk_bounds() {
        assert_eq!(pieces(0, 10), vec![(0, 0, 10)]);
        assert_eq!(pieces(CHUNK - 2, 5), vec![(0, 0, 2), (1, 2, 3)]);
        assert_eq!(
            pieces(3, 2 * CHUNK),
            vec![
                (0, 0, CHUNK - 3),
                (1, CHUNK - 3, CHUNK),
                (2, 2 * CHUNK - 3, 3)
            ]
        );
    }

    #[test]
    fn coefficients_interpolate_linearly_near_collinear() {
        assert_eq!(coefficients(0.9999, 0.3), (0.7, 0.3));
        assert_eq!(coefficients(-1.5, 0.25), (0.75, 0.25));
        // Orthogonal: sin((1 - t) pi/2), sin(t pi/2).
        let (ca, cb) = coefficients(0.0, 0.5);
        assert!((ca - 0.5f32.sqrt()).abs() < 1e-6 && (cb - ca).abs() < 1e-7);
    }
}
