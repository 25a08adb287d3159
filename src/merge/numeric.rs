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
    /// Round an f32 result to this dtype (ties to even).
    fn round(x: f32) -> f32;
    /// Round an f64 result to this dtype once (no double rounding through f32).
    fn round_f64(x: f64) -> f32;
}

#[derive(Clone, Copy)]
pub struct Bf16;
#[derive(Clone, Copy)]
pub struct F16;
#[derive(Clone, Copy)]
pub struct F32;

impl Round for Bf16 {
    const DTYPE: Dtype = Dtype::BF16;
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
    #[inline(always)]
    fn round(x: f32) -> f32 {
        x
    }
    fn round_f64(x: f64) -> f32 {
        x as f32
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
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = R::round(f32::from_bits(
                        (u16::from_le_bytes([c[0], c[1]]) as u32) << 16,
                    ));
                }
            }
        }
        Dtype::F16 => {
            let src = &bytes[start * 2..(start + n) * 2];
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = R::round(f16_to_f32(u16::from_le_bytes([c[0], c[1]])));
            }
        }
        Dtype::F32 => {
            let src = &bytes[start * 4..(start + n) * 4];
            if R::DTYPE == Dtype::F32 {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            } else {
                for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = R::round(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                }
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
    match dtype {
        Dtype::BF16 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&((Bf16::round(*v).to_bits() >> 16) as u16).to_le_bytes());
            }
        }
        Dtype::F16 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                o.copy_from_slice(&f16_bits(*v).to_le_bytes());
            }
        }
        Dtype::F32 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        other => unreachable!("encode to non-working dtype {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
