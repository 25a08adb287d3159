//! Emulation of torch's reduced-precision arithmetic.
//!
//! mergekit runs model_stock in the working dtype with no upcast. For bfloat16 and float16
//! torch computes each elementwise operation in float32 and rounds the result to the working
//! dtype (round to nearest, ties to even); reductions accumulate in higher precision and round
//! once. We keep every working value as an `f32` that is exactly representable in the working
//! dtype, and call [`Round::round`] after each operation, so results match torch bit for bit.

use safetensors::Dtype;

pub use crate::dtype::{bf16_round, f16_bits, f16_round, f16_to_f32, to_f32_round_to_odd};

/// Rounding of an `f32` (or `f64`) result to a working dtype, kept in an `f32`.
pub trait Round: Copy + Send + Sync + 'static {
    /// The dtype values are rounded to; decoding it needs no rounding.
    const DTYPE: Dtype;
    /// True when [`Round::round_slice`] is faster than rounding element by element (a
    /// hardware conversion): loops then compute a run of results first and round it in a
    /// second pass over the same (L1-resident) values.
    const SLICES: bool = false;
    /// The same rounding for code compiled with AVX2, FMA and F16C (see `simd` in the
    /// kernel): float16 uses the CPU's conversions there.
    type Fast: Round;
    /// Round an f32 result to this dtype (ties to even).
    fn round(x: f32) -> f32;
    /// Round an f64 result to this dtype once (no double rounding through f32).
    fn round_f64(x: f64) -> f32;
    /// Round every value (the same bits as [`Round::round`] on each).
    #[inline(always)]
    fn round_slice(xs: &mut [f32]) {
        for x in xs {
            *x = Self::round(*x);
        }
    }
    /// Decode little-endian float16 values, rounded to this dtype.
    #[inline(always)]
    fn decode_f16(src: &[u8], out: &mut [f32]) {
        for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
            *o = Self::round(f16_to_f32(u16::from_le_bytes([c[0], c[1]])));
        }
    }
    /// Encode values as little-endian float16 (round to nearest even).
    #[inline(always)]
    fn encode_f16(values: &[f32], out: &mut [u8]) {
        for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
            o.copy_from_slice(&f16_bits(*v).to_le_bytes());
        }
    }
}

/// `out[k] = R::round(f(k))` for every `k`, in one pass, or in two when the rounding is
/// faster on a whole run ([`Round::SLICES`]). Same bits either way.
#[inline(always)]
pub fn map_round<R: Round>(out: &mut [f32], f: impl Fn(usize) -> f32) {
    if R::SLICES {
        for (k, o) in out.iter_mut().enumerate() {
            *o = f(k);
        }
        R::round_slice(out);
    } else {
        for (k, o) in out.iter_mut().enumerate() {
            *o = R::round(f(k));
        }
    }
}

#[derive(Clone, Copy)]
pub struct Bf16;
#[derive(Clone, Copy)]
pub struct F16;
#[derive(Clone, Copy)]
pub struct F32;

impl Round for Bf16 {
    const DTYPE: Dtype = Dtype::BF16;
    type Fast = Self;
    #[inline(always)]
    fn round(x: f32) -> f32 {
        bf16_round(x)
    }
    fn round_f64(x: f64) -> f32 {
        Self::round(to_f32_round_to_odd(x))
    }
}

impl Round for F16 {
    const DTYPE: Dtype = Dtype::F16;
    #[cfg(target_arch = "x86_64")]
    type Fast = F16c;
    #[cfg(not(target_arch = "x86_64"))]
    type Fast = Self;
    #[inline(always)]
    fn round(x: f32) -> f32 {
        f16_round(x)
    }
    fn round_f64(x: f64) -> f32 {
        // half's f64 conversion goes through f32 and can round twice.
        Self::round(to_f32_round_to_odd(x))
    }
}

impl Round for F32 {
    const DTYPE: Dtype = Dtype::F32;
    type Fast = Self;
    #[inline(always)]
    fn round(x: f32) -> f32 {
        x
    }
    fn round_f64(x: f64) -> f32 {
        x as f32
    }
}

/// float16 with the CPU's conversions (VCVTPS2PH / VCVTPH2PS, round to nearest even):
/// IEEE's conversion, so the same bits as [`F16`] except the payload of a NaN. Only code
/// compiled with F16C, on a CPU checked to have it, may use it: the kernel's `simd`
/// dispatchers are the only ones that name it (through [`Round::Fast`]).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub struct F16c;

#[cfg(target_arch = "x86_64")]
impl Round for F16c {
    const DTYPE: Dtype = Dtype::F16;
    const SLICES: bool = true;
    type Fast = Self;
    #[inline(always)]
    fn round(x: f32) -> f32 {
        f16_round(x)
    }
    fn round_f64(x: f64) -> f32 {
        F16::round_f64(x)
    }
    #[inline(always)]
    fn round_slice(xs: &mut [f32]) {
        use std::arch::x86_64::*;
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: 8 floats in bounds; F16C is present (see the type's comment).
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(c.as_ptr()));
                _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
        for x in chunks.into_remainder() {
            *x = f16_round(*x);
        }
    }
    #[inline(always)]
    fn decode_f16(src: &[u8], out: &mut [f32]) {
        use std::arch::x86_64::*;
        let n = out.len().min(src.len() / 2);
        let mut k = 0;
        while k + 8 <= n {
            // SAFETY: 16 bytes in and 8 floats out, in bounds; F16C is present.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(2 * k) as *const __m128i);
                _mm256_storeu_ps(out.as_mut_ptr().add(k), _mm256_cvtph_ps(h));
            }
            k += 8;
        }
        for (o, c) in out[k..n].iter_mut().zip(src[2 * k..].chunks_exact(2)) {
            *o = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
        }
    }
    #[inline(always)]
    fn encode_f16(values: &[f32], out: &mut [u8]) {
        use std::arch::x86_64::*;
        let n = values.len().min(out.len() / 2);
        let mut k = 0;
        while k + 8 <= n {
            // SAFETY: 8 floats in and 16 bytes out, in bounds; F16C is present.
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(
                    values.as_ptr().add(k),
                ));
                _mm_storeu_si128(out.as_mut_ptr().add(2 * k) as *mut __m128i, h);
            }
            k += 8;
        }
        for (v, o) in values[k..n].iter().zip(out[2 * k..].chunks_exact_mut(2)) {
            o.copy_from_slice(&f16_bits(*v).to_le_bytes());
        }
    }
}

/// Decode `out.len()` elements of a little-endian float tensor starting at element `start`,
/// rounding each to the working dtype `R` (torch's `.to(dtype)`).
#[inline(always)]
pub fn decode<R: Round>(bytes: &[u8], dtype: Dtype, start: usize, out: &mut [f32]) {
    let n = out.len();
    match dtype {
        Dtype::BF16 => {
            let src = &bytes[start * 2..(start + n) * 2];
            if R::DTYPE == Dtype::BF16 || R::DTYPE == Dtype::F32 {
                // exact: no rounding needed
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            } else {
                map_round::<R>(out, |k| {
                    f32::from_bits((u16::from_le_bytes([src[2 * k], src[2 * k + 1]]) as u32) << 16)
                });
            }
        }
        Dtype::F16 => R::decode_f16(&bytes[start * 2..(start + n) * 2], out),
        Dtype::F32 => {
            let src = &bytes[start * 4..(start + n) * 4];
            if R::DTYPE == Dtype::F32 {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            } else {
                map_round::<R>(out, |k| {
                    f32::from_le_bytes([src[4 * k], src[4 * k + 1], src[4 * k + 2], src[4 * k + 3]])
                });
            }
        }
        Dtype::F64 => {
            let src = &bytes[start * 8..(start + n) * 8];
            for (o, c) in out.iter_mut().zip(src.chunks_exact(8)) {
                let v = f64::from_le_bytes(c.try_into().expect("chunk of 8"));
                *o = R::round(v as f32);
            }
        }
        other => {
            unreachable!("decode called on non-float dtype {other:?}; the planner copies those")
        }
    }
}

/// Encode values to `dtype` (round to nearest even) into `out` (little endian).
#[inline(always)]
pub fn encode(values: &[f32], dtype: Dtype, out: &mut [u8]) {
    encode_with::<F32>(values, dtype, out)
}

/// [`encode`], with float16 through `R`'s conversion.
#[inline(always)]
pub fn encode_with<R: Round>(values: &[f32], dtype: Dtype, out: &mut [u8]) {
    match dtype {
        Dtype::BF16 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&((Bf16::round(*v).to_bits() >> 16) as u16).to_le_bytes());
            }
        }
        Dtype::F16 => R::encode_f16(values, out),
        Dtype::F32 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        // `out_dtype: float64` over a narrower working dtype: torch's `.to(float64)` at
        // save, an exact widening.
        Dtype::F64 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(8)) {
                o.copy_from_slice(&(*v as f64).to_le_bytes());
            }
        }
        other => unreachable!("encode to non-working dtype {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU's float16 conversions give the bits of our portable ones (NaN payloads
    /// aside): every float16, the midpoints around each, and random floats, through
    /// `round_slice`, `decode_f16` and `encode_f16` with every tail length.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f16c_conversions_match_the_portable_ones() {
        if !std::is_x86_feature_detected!("f16c") {
            eprintln!("skipped: this CPU has no F16C");
            return;
        }
        let mut xs: Vec<f32> = Vec::new();
        for h in 0..=u16::MAX {
            let v = f16_to_f32(h);
            xs.push(v);
            let next = f16_to_f32(h.wrapping_add(1));
            if v.is_finite() && next.is_finite() {
                let mid = ((v as f64 + next as f64) / 2.0) as f32;
                xs.extend([
                    mid,
                    f32::from_bits(mid.to_bits() + 1),
                    f32::from_bits(mid.to_bits().wrapping_sub(1)),
                ]);
            }
        }
        let mut s = 0x9E37_79B9u32;
        for _ in 0..1_000_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            xs.push(f32::from_bits(s));
        }
        xs.extend([
            65504.0,
            65519.99,
            65520.0,
            1e9,
            f32::INFINITY,
            5.96e-8,
            2.98e-8,
            -0.0,
        ]);
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        for len in [xs.len(), 7, 9, 15] {
            let xs = &xs[..len];
            let mut hw = xs.to_vec();
            F16c::round_slice(&mut hw);
            for (x, h) in xs.iter().zip(&hw) {
                assert!(same(*h, f16_round(*x)), "round {x:e}: {h:e}");
            }
            let mut bytes = vec![0u8; 2 * len];
            let mut want = vec![0u8; 2 * len];
            F16c::encode_f16(xs, &mut bytes);
            F16::encode_f16(xs, &mut want);
            for (k, x) in xs.iter().enumerate() {
                if !x.is_nan() {
                    assert_eq!(
                        bytes[2 * k..2 * k + 2],
                        want[2 * k..2 * k + 2],
                        "encode {x:e}"
                    );
                }
            }
            let mut back = vec![0f32; len];
            let mut back_want = vec![0f32; len];
            F16c::decode_f16(&want, &mut back);
            F16::decode_f16(&want, &mut back_want);
            for (a, b) in back.iter().zip(&back_want) {
                assert!(same(*a, *b), "decode {b:e}: {a:e}");
            }
        }
    }

    #[test]
    fn f64_rounds_once() {
        // x is just above the bf16 midpoint between 1 and 1+2^-7, but rounds to the midpoint
        // in f32; a double rounding would give 1.0, a single rounding 1 + 2^-7.
        let x = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(x as f32, 1.0 + 2f32.powi(-8));
        assert_eq!(Bf16::round(x as f32), 1.0);
        assert_eq!(Bf16::round_f64(x), 1.0 + 2f32.powi(-7));
        assert_eq!(
            F16::round_f64(1.0 + 2f64.powi(-11) + 2f64.powi(-40)),
            1.0 + 2f32.powi(-10)
        );
    }

    #[test]
    fn decode_encode_round_trip() {
        let vals = [1.5f32, -0.25, 3.0e-3, 65504.0];
        for dt in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            let mut bytes = vec![0u8; vals.len() * if dt == Dtype::F32 { 4 } else { 2 }];
            encode(&vals, dt, &mut bytes);
            let mut back = [0f32; 4];
            decode::<F32>(&bytes, dt, 0, &mut back);
            for (a, b) in vals.iter().zip(back) {
                assert!((a - b).abs() <= a.abs() * 1e-2, "{dt:?} {a} {b}");
            }
        }
    }
}
