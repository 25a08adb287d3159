//! Every fact about tensor dtypes in one place: which safetensors dtypes model_stock merges,
//! the dtypes it computes in (mergekit's `dtype` / `out_dtype`), element sizes, names on the
//! wire, and the scalar roundings to bfloat16 and float16 the kernel is built on (pure).

use safetensors::Dtype;

/// A dtype model_stock can compute in (mergekit's `dtype` / `out_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkDtype {
    BF16,
    F16,
    F32,
    /// mergekit keeps float64 inputs in float64 when no `dtype` is given.
    F64,
}

impl WorkDtype {
    /// Parse mergekit's names: `bfloat16`, `float16`, `float32`, optionally `torch.`-prefixed.
    pub fn from_name(s: &str) -> Option<Self> {
        match s.trim().strip_prefix("torch.").unwrap_or(s.trim()) {
            "bfloat16" => Some(Self::BF16),
            "float16" | "half" => Some(Self::F16),
            "float32" | "float" => Some(Self::F32),
            "float64" | "double" => Some(Self::F64),
            _ => None,
        }
    }
    /// The name torch (and `config.json`) uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::BF16 => "bfloat16",
            Self::F16 => "float16",
            Self::F32 => "float32",
            Self::F64 => "float64",
        }
    }
    pub fn st_dtype(self) -> Dtype {
        match self {
            Self::BF16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
            Self::F32 => Dtype::F32,
            Self::F64 => Dtype::F64,
        }
    }
    pub fn from_st(d: Dtype) -> Option<Self> {
        match d {
            Dtype::BF16 => Some(Self::BF16),
            Dtype::F16 => Some(Self::F16),
            Dtype::F32 => Some(Self::F32),
            Dtype::F64 => Some(Self::F64),
            _ => None,
        }
    }
    pub fn size(self) -> usize {
        match self {
            Self::BF16 | Self::F16 => 2,
            Self::F32 => 4,
            Self::F64 => 8,
        }
    }
}

/// True for dtypes model_stock merges; other tensors are copied from the base.
pub fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32 | Dtype::F64)
}

/// The byte size of one element, if the dtype has whole-byte elements.
pub fn size(d: Dtype) -> Option<usize> {
    let bits = d.bitsize();
    bits.is_multiple_of(8).then_some(bits / 8)
}

/// Sub-16-bit float formats (FP8, FP6, FP4): quantized checkpoints, not weights model_stock
/// can merge as they are.
pub fn is_low_precision_float(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::F8_E4M3
            | Dtype::F8_E5M2
            | Dtype::F8_E8M0
            | Dtype::F8_E4M3FNUZ
            | Dtype::F8_E5M2FNUZ
            | Dtype::F4
            | Dtype::F6_E2M3
            | Dtype::F6_E3M2
    )
}

/// The safetensors name of a dtype (`BF16`, `F8_E4M3`, ...).
pub fn name(d: Dtype) -> String {
    serde_json::to_value(d)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{d:?}"))
}

/// A dtype from its safetensors name.
pub fn parse(s: &str) -> Option<Dtype> {
    serde_json::from_value(serde_json::Value::String(s.into())).ok()
}

/// The bfloat16 value nearest `x` (ties to even), as an f32; NaN stays NaN (quiet).
#[inline(always)]
pub fn bf16_round(x: f32) -> f32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) & 0xFFFF_0000;
    let out = if x.is_nan() { b | 0x0040_0000 } else { rounded };
    f32::from_bits(out)
}

/// f64 -> f32 rounding to odd: a second rounding to a narrower format is then exact
/// (the classic fix for double rounding).
pub fn to_f32_round_to_odd(x: f64) -> f32 {
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
    let normal = f32::from_bits(bits.wrapping_add(0xFFF + ((bits >> 13) & 1)) & !0x1FFF);
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

/// Element `i` of `bytes` (a float tensor in `d`) as f64; 0 for a dtype that is not one of
/// the four float dtypes. For the few elements handled one at a time (vocabulary rows).
pub fn read_f64(bytes: &[u8], d: Dtype, i: usize) -> f64 {
    let at = |n: usize| &bytes[i * n..(i + 1) * n];
    match d {
        Dtype::BF16 => {
            f32::from_bits((u16::from_le_bytes([at(2)[0], at(2)[1]]) as u32) << 16) as f64
        }
        Dtype::F16 => f16_to_f32(u16::from_le_bytes([at(2)[0], at(2)[1]])) as f64,
        Dtype::F32 => f32::from_le_bytes(at(4).try_into().unwrap_or([0; 4])) as f64,
        Dtype::F64 => f64::from_le_bytes(at(8).try_into().unwrap_or([0; 8])),
        _ => 0.0,
    }
}

/// Write `x` as element `i` of `out` in `d`, rounding as torch's casts do (through float32
/// for the 16-bit dtypes).
pub fn write_f64(out: &mut [u8], d: Dtype, i: usize, x: f64) {
    match d {
        Dtype::BF16 => {
            let b = (bf16_round(x as f32).to_bits() >> 16) as u16;
            out[2 * i..2 * i + 2].copy_from_slice(&b.to_le_bytes());
        }
        Dtype::F16 => out[2 * i..2 * i + 2].copy_from_slice(&f16_bits(x as f32).to_le_bytes()),
        Dtype::F32 => out[4 * i..4 * i + 4].copy_from_slice(&(x as f32).to_le_bytes()),
        Dtype::F64 => out[8 * i..8 * i + 8].copy_from_slice(&x.to_le_bytes()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    #[test]
    fn names() {
        assert_eq!(WorkDtype::from_name("torch.float16"), Some(WorkDtype::F16));
        assert_eq!(WorkDtype::from_name("bfloat16").unwrap().name(), "bfloat16");
        assert_eq!(WorkDtype::from_name("int8"), None);
        for d in [Dtype::BF16, Dtype::F8_E4M3, Dtype::I64, Dtype::F32] {
            assert_eq!(parse(&name(d)), Some(d));
        }
        assert_eq!(name(Dtype::F8_E4M3), "F8_E4M3");
        assert_eq!(parse("Q9"), None);
        assert_eq!(size(Dtype::BF16), Some(2));
        assert_eq!(size(Dtype::F4), None);
        assert!(is_float(Dtype::F64) && !is_float(Dtype::F8_E4M3) && !is_float(Dtype::I32));
        assert!(is_low_precision_float(Dtype::F8_E4M3) && !is_low_precision_float(Dtype::BF16));
    }

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
                bf16_round(f).to_bits(),
                bf16::from_f32(f).to_f32().to_bits(),
                "{f:e}"
            );
        }
    }

    #[test]
    fn bf16_ties_go_to_even() {
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: rounds to even (1.0)
        assert_eq!(bf16_round(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: rounds to 1 + 2^-6
        assert_eq!(bf16_round(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert!(bf16_round(f32::NAN).is_nan());
        assert_eq!(bf16_round(f32::INFINITY), f32::INFINITY);
    }
}
