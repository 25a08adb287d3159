//! Emulation of torch's reduced-precision arithmetic.
//!
//! mergekit runs model_stock in the working dtype with no upcast. For bfloat16 and float16
//! torch computes each elementwise operation in float32 and rounds the result to the working
//! dtype (round to nearest, ties to even); reductions accumulate in higher precision and round
//! once. We keep every working value as an `f32` that is exactly representable in the working
//! dtype, and call [`Round::round`] after each operation, so results match torch bit for bit.

#[cfg(test)]
use half::bf16;
use safetensors::Dtype;

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
        let b = x.to_bits();
        let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000;
        // NaN stays NaN (quiet); everything else rounds to nearest even.
        let out = if x.is_nan() { b | 0x0040_0000 } else { rounded };
        f32::from_bits(out)
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

/// f64 -> f32 rounding to odd: a second rounding to a narrower format is then exact
/// (the classic fix for double rounding).
fn to_f32_round_to_odd(x: f64) -> f32 {
    if !x.is_finite() {
        return x as f32;
    }
    let mut t = x as f32;
    if (t as f64).abs() > x.abs() {
        // rounded away from zero: step back toward zero
        t = f32::from_bits(t.to_bits() - 1);
    }
    if t as f64 != x {
        t = f32::from_bits(t.to_bits() | 1);
    }
    t
}

/// The float16 value nearest `x` (ties to even), as an f32: IEEE's conversion, written with
/// bit operations that vectorize (the `half` crate's portable conversion does not, and
/// made float16 merges several times slower than bfloat16).
#[inline(always)]
pub fn f16_round(x: f32) -> f32 {
    let a = x.abs();
    let bits = x.to_bits();
    // Normal range: keep 10 fraction bits, round to nearest even.
    let normal = f32::from_bits((bits + 0xFFF + ((bits >> 13) & 1)) & !0x1FFF);
    // Below the smallest normal (2^-14), float16 steps by 2^-24: adding 0.5 (whose f32 ulp
    // is 2^-24) rounds to that step, ties to even.
    let sub = ((a + 0.5) - 0.5).copysign(x);
    let r = if a < 6.103_515_6e-5 { sub } else { normal };
    let r = if r.abs() > 65504.0 {
        f32::INFINITY.copysign(x)
    } else {
        r
    };
    if x.is_nan() {
        x
    } else {
        r
    }
}

/// A float16 bit pattern as f32 (exact).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7FFF;
    // Re-bias the exponent by multiplying by 2^112 (exact, subnormals included).
    let v = f32::from_bits(em << 13) * f32::from_bits(0x7780_0000);
    let v = if em >= 0x7C00 {
        // infinity, or a NaN made quiet (as the hardware conversion does)
        let quiet = if em > 0x7C00 { 0x0040_0000 } else { 0 };
        f32::from_bits((em << 13) | 0x7F80_0000 | quiet)
    } else {
        v
    };
    f32::from_bits(v.to_bits() | sign)
}

/// The float16 bits of `x` (rounded to nearest even).
#[inline(always)]
pub fn f16_bits(x: f32) -> u16 {
    let r = f16_round(x);
    let bits = r.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let a = r.abs();
    let mag = if r.is_nan() {
        0x7E00
    } else if a >= 6.103_515_6e-5 {
        // normal (infinity included: its exponent maps to 0x1F)
        ((bits & 0x7FFF_FFFF).wrapping_sub(112 << 23) >> 13).min(0x7C00) as u16
    } else {
        (a * 16_777_216.0) as u16
    };
    sign | mag
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
    use half::f16;

    #[test]
    fn f16_conversions_match_half() {
        let check = |x: f32| {
            let want = f16::from_f32(x);
            let got = f16_round(x);
            if x.is_nan() {
                assert!(got.is_nan());
                return;
            }
            assert_eq!(
                got.to_bits(),
                want.to_f32().to_bits(),
                "round {x:e} ({:#x})",
                x.to_bits()
            );
            assert_eq!(f16_bits(x), want.to_bits(), "bits {x:e}");
        };
        // Every float16 value and every midpoint between neighbours, then random floats.
        for h in 0..=u16::MAX {
            let v = f16::from_bits(h);
            assert_eq!(f16_to_f32(h).to_bits(), v.to_f32().to_bits(), "{h:#x}");
            check(v.to_f32());
            let next = f16::from_bits(h.wrapping_add(1)).to_f32();
            if v.is_finite() && next.is_finite() && (h & 0x7FFF) != 0x7BFF {
                let mid = (v.to_f32() as f64 + next as f64) / 2.0;
                check(mid as f32);
                check(f32::from_bits((mid as f32).to_bits() + 1));
                check(f32::from_bits((mid as f32).to_bits().wrapping_sub(1)));
            }
        }
        let mut s = 0x9E37_79B9u32;
        for _ in 0..2_000_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            check(f32::from_bits(s));
        }
        for x in [
            65504.0f32,
            65519.99,
            65520.0,
            1e9,
            f32::INFINITY,
            5.96e-8,
            2.98e-8,
            2.99e-8,
        ] {
            check(x);
            check(-x);
        }
    }

    #[test]
    fn bf16_round_matches_half() {
        let mut x = 0x3f80_0000u32;
        for _ in 0..200_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let f = f32::from_bits(x);
            if f.is_nan() {
                continue;
            }
            assert_eq!(
                Bf16::round(f).to_bits(),
                bf16::from_f32(f).to_f32().to_bits(),
                "{f:e}"
            );
        }
    }

    #[test]
    fn bf16_ties_go_to_even() {
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: rounds to even (1.0)
        assert_eq!(Bf16::round(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: rounds to 1 + 2^-6
        assert_eq!(Bf16::round(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert!(Bf16::round(f32::NAN).is_nan());
        assert_eq!(Bf16::round(f32::INFINITY), f32::INFINITY);
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
