//! Block-FP8 checkpoints (DeepSeek-V3/R1, Kimi K2, Qwen3 `-FP8`): weights stored as
//! `F8_E4M3` with one float32 `<name>_scale_inv` per block (128x128 unless the checkpoint's
//! `quantization_config.weight_block_size` says otherwise). Pure arithmetic, no I/O.
//!
//! Dequantizing is what DeepSeek's official `fp8_cast_bf16.py` does, element by element:
//! `bf16(f32(w) * f32(scale_inv[i / rows_per_block][j / cols_per_block]))`, one float32
//! product rounded to nearest even. The merge then sees the bfloat16 checkpoint the official
//! converter would have written, so its result is mergekit's on that checkpoint, bit for bit.
//!
//! Quantizing (`--quantize fp8`) is DeepGEMM's `per_block_cast_to_fp8`: per block (zero
//! padding past the edges) `amax = max |x|` in float32, at least 1e-4;
//! `q = e4m3fn(f32(x) * (448 / amax))` rounded to nearest even; `scale_inv = amax / 448`.
//! As torch evaluates it: `448 / amax` is `amax.reciprocal() * 448` (two float32 roundings),
//! and the conversion saturates at 448.

use crate::dtype::bf16_round;

/// The suffix of a weight's scale tensor.
pub const SCALE_SUFFIX: &str = "_scale_inv";

/// The block size when `quantization_config` gives none.
pub const DEFAULT_BLOCK: [usize; 2] = [128, 128];

/// The layout of one block-quantized matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocks {
    pub rows: usize,
    pub cols: usize,
    /// Rows and columns per block.
    pub block: [usize; 2],
}

impl Blocks {
    /// The scale tensor's shape: `[ceil(rows / block_rows), ceil(cols / block_cols)]`.
    pub fn scale_shape(&self) -> [usize; 2] {
        [
            self.rows.div_ceil(self.block[0].max(1)),
            self.cols.div_ceil(self.block[1].max(1)),
        ]
    }

    /// Bytes of the float32 scale tensor.
    pub fn scale_bytes(&self) -> u64 {
        let [r, c] = self.scale_shape();
        (r * c * 4) as u64
    }

    /// Dequantize elements `start..start + q.len()` (row-major) of the matrix into bfloat16
    /// bytes (little endian) in `out`, with the whole scale tensor in `scales` (f32, little
    /// endian).
    pub fn dequantize(&self, q: &[u8], scales: &[u8], start: usize, out: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { self.dequantize_avx2(q, scales, start, out) };
        }
        self.dequantize_runs(q, scales, start, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn dequantize_avx2(&self, q: &[u8], scales: &[u8], start: usize, out: &mut [u8]) {
        self.dequantize_runs(q, scales, start, out)
    }

    #[inline(always)]
    fn dequantize_runs(&self, q: &[u8], scales: &[u8], start: usize, out: &mut [u8]) {
        let [_, scols] = self.scale_shape();
        let [br, bc] = self.block;
        if self.cols == 0 || br == 0 || bc == 0 {
            return;
        }
        let scale = |i: usize| {
            let b = &scales[4 * i..4 * i + 4];
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        };
        let mut k = 0;
        while k < q.len() {
            let e = start + k;
            let (row, col) = (e / self.cols, e % self.cols);
            // One run: to the end of this row's block of columns.
            let run = (bc - col % bc).min(self.cols - col).min(q.len() - k);
            let s = scale(row / br * scols + col / bc);
            let (qs, os) = (&q[k..k + run], &mut out[2 * k..2 * (k + run)]);
            // Eight at a time through a small array (the loop vectorizes), then the rest.
            let mut qc = qs.chunks_exact(8);
            let mut oc = os.chunks_exact_mut(16);
            for (qq, oo) in (&mut qc).zip(&mut oc) {
                let mut h = [0u16; 8];
                for (h, &b) in h.iter_mut().zip(qq) {
                    *h = bf16_bits(e4m3_value(b) * s);
                }
                for (o, h) in oo.chunks_exact_mut(2).zip(h) {
                    o.copy_from_slice(&h.to_le_bytes());
                }
            }
            for (o, &b) in oc.into_remainder().chunks_exact_mut(2).zip(qc.remainder()) {
                o.copy_from_slice(&bf16_bits(e4m3_value(b) * s).to_le_bytes());
            }
            k += run;
        }
    }
}

/// The bfloat16 bits nearest `x` (ties to even).
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    (bf16_round(x).to_bits() >> 16) as u16
}

/// An E4M3 byte's value, branch-free so loops over it vectorize: a normal number is its bits
/// moved into a float32 and re-biased; a subnormal is its mantissa times 2^-9, converted from
/// an integer (no subnormal float arithmetic); 0x7F/0xFF are NaN. The values of
/// the format's definition (tested on all 256 bytes).
#[inline(always)]
pub fn e4m3_value(b: u8) -> f32 {
    let b = b as u32;
    let sign = (b & 0x80) << 24;
    let mag = b & 0x7F;
    let normal = f32::from_bits(sign | ((mag << 20) + (120 << 23)));
    let sub = f32::from_bits(sign | ((mag & 7) as f32 * 0.001_953_125).to_bits());
    let v = if mag < 8 { sub } else { normal };
    if mag == 0x7F {
        f32::from_bits(sign | 0x7FC0_0000)
    } else {
        v
    }
}

/// The E4M3FN byte nearest `x`, ties to even, as torch 2.15 converts on CPU: magnitudes
/// past the largest value (448), infinities included, saturate to it; NaN stays NaN (0x7F).
/// Branch-free, so loops over it vectorize.
#[inline(always)]
pub fn f32_to_e4m3(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let ab = bits & 0x7FFF_FFFF;
    let a = f32::from_bits(ab);
    // Normal: keep 3 mantissa bits (round to nearest even), re-bias the exponent (127 -> 7).
    let r = ab.wrapping_add(0x7FFFF + ((ab >> 20) & 1)) & !0xFFFFF;
    let normal = (r >> 20).wrapping_sub(120 << 3) as u8;
    // Subnormal (below 2^-6): steps of 2^-9; adding 2^23 rounds to an integer, ties to even.
    let sub = ((a * 512.0 + 8_388_608.0).to_bits() & 0xF) as u8;
    let mag = if a < 0.015_625 { sub } else { normal };
    let mag = if a >= 464.0 { 0x7E } else { mag };
    let mag = if a.is_nan() { 0x7F } else { mag };
    sign | mag
}

impl Blocks {
    /// Quantize the elements of whole block rows, from block row `first_block_row` on:
    /// `values` (row-major, `dtype` bytes: bfloat16, float16 or float32) into E4M3 bytes `q`
    /// and their float32 scales (little endian), one per block, into `scales`.
    pub fn quantize(
        &self,
        values: &[u8],
        dtype: safetensors::Dtype,
        first_block_row: usize,
        q: &mut [u8],
        scales: &mut [u8],
    ) {
        let size = dtype.bitsize() / 8;
        let [br, bc] = self.block;
        let [_, scols] = self.scale_shape();
        if self.cols == 0 || br == 0 || bc == 0 {
            return;
        }
        let rows = values.len() / size / self.cols;
        let mut vals = vec![0f32; br.min(rows.max(1)) * self.cols];
        let mut amax = vec![0f32; scols];
        let mut mult = vec![0f32; scols];
        for (i, r0) in (0..rows).step_by(br).enumerate() {
            let n = ((r0 + br).min(rows) - r0) * self.cols;
            let at = r0 * self.cols;
            crate::merge::numeric::decode::<crate::merge::numeric::F32>(
                values,
                dtype,
                at,
                &mut vals[..n],
            );
            amax.fill(0.0);
            for row in vals[..n].chunks(self.cols) {
                for (a, c) in amax.iter_mut().zip(row.chunks(bc)) {
                    // torch's amax propagates NaN (f32::max would drop it).
                    *a = c.iter().fold(*a, |m, v| {
                        let x = v.abs();
                        if m.is_nan() || x <= m {
                            m
                        } else {
                            x
                        }
                    });
                }
            }
            for (j, a) in amax.iter().enumerate() {
                // clamp(min=1e-4) keeps NaN, as torch's does.
                let a = if a.is_nan() { *a } else { a.max(1e-4) };
                // torch evaluates `448.0 / amax` as `amax.reciprocal() * 448.0`.
                mult[j] = (1.0 / a) * 448.0;
                let s = ((first_block_row + i) * scols + j) * 4;
                scales[s..s + 4].copy_from_slice(&(a / 448.0).to_le_bytes());
            }
            let out = &mut q[at..at + n];
            for (row, qrow) in vals[..n].chunks(self.cols).zip(out.chunks_mut(self.cols)) {
                for ((c, qc), m) in row.chunks(bc).zip(qrow.chunks_mut(bc)).zip(&mult) {
                    for (v, o) in c.iter().zip(qc) {
                        *o = f32_to_e4m3(v * m);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `F8_E4M3` (E4M3FN: bias 7, no infinities, 0x7F/0xFF are NaN) byte as f32 (exact).
    fn e4m3_to_f32(b: u8) -> f32 {
        let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let exp = ((b >> 3) & 0x0F) as i32;
        let man = (b & 0x07) as f32;
        if exp == 0x0F && (b & 0x07) == 0x07 {
            return f32::NAN;
        }
        let mag = if exp == 0 {
            // subnormal: man/8 * 2^-6
            man / 8.0 / 64.0
        } else {
            let mut p = 1.0f32;
            let mut e = exp - 7;
            while e > 0 {
                p *= 2.0;
                e -= 1;
            }
            while e < 0 {
                p /= 2.0;
                e += 1;
            }
            (1.0 + man / 8.0) * p
        };
        sign * mag
    }

    #[test]
    fn branch_free_values_match() {
        for b in 0..=255u8 {
            let (x, y) = (e4m3_value(b), e4m3_to_f32(b));
            assert!(
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                "{b:#x}: {x} {y}"
            );
        }
    }

    #[test]
    fn e4m3_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        // Every byte agrees with a direct decoding of sign, exponent and mantissa.
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                continue;
            }
            let (e, m) = (((b >> 3) & 15) as i32, (b & 7) as f64);
            let mag = if e == 0 {
                m / 8.0 * 2f64.powi(-6)
            } else {
                (1.0 + m / 8.0) * 2f64.powi(e - 7)
            };
            assert_eq!(v as f64, if b & 0x80 != 0 { -mag } else { mag }, "{b:#x}");
        }
    }

    #[test]
    fn dequantize_uses_each_elements_block() {
        // 3 x 5 matrix, 2 x 2 blocks: scale shape 2 x 3, edge blocks on both axes.
        let b = Blocks {
            rows: 3,
            cols: 5,
            block: [2, 2],
        };
        assert_eq!(b.scale_shape(), [2, 3]);
        let scales: Vec<u8> = [1.0f32, 2.0, 4.0, 8.0, 16.0, 32.0]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let q = [0x38u8; 15]; // 1.0 everywhere
        let want = [
            1., 1., 2., 2., 4., 1., 1., 2., 2., 4., 8., 8., 16., 16., 32.,
        ];
        // Whole, and from an offset in the middle of a row (a streamed window).
        for start in [0usize, 7] {
            let mut out = vec![0u8; 2 * (15 - start)];
            b.dequantize(&q[start..], &scales, start, &mut out);
            for (k, w) in want[start..].iter().enumerate() {
                let got =
                    f32::from_bits((u16::from_le_bytes([out[2 * k], out[2 * k + 1]]) as u32) << 16);
                assert_eq!(got, *w as f32, "element {}", start + k);
            }
        }
        // The product is rounded once, to nearest even, to bfloat16.
        let s = 1.0 + 2f32.powi(-8) + 2f32.powi(-12);
        let one = Blocks {
            rows: 1,
            cols: 1,
            block: [128, 128],
        };
        let mut out = [0u8; 2];
        one.dequantize(&[0x38], &s.to_le_bytes(), 0, &mut out);
        assert_eq!(
            u16::from_le_bytes(out),
            (bf16_round(s).to_bits() >> 16) as u16
        );
    }

    #[test]
    fn e4m3_rounding_is_nearest_even() {
        // Against the nearest of the finite values by brute force, for every E4M3 value,
        // points between neighbours, and random floats.
        let finite: Vec<(u8, f64)> = (0..=255u8)
            .map(|b| (b, e4m3_to_f32(b) as f64))
            .filter(|(_, v)| !v.is_nan())
            .collect();
        let want = |x: f32| -> u8 {
            if x.is_nan() {
                return if x.is_sign_negative() { 0xFF } else { 0x7F };
            }
            let x = x as f64;
            let mut best = (f64::INFINITY, 0u8);
            for &(b, v) in &finite {
                if (b & 0x80 != 0) != x.is_sign_negative() {
                    continue;
                }
                let d = (v - x).abs();
                if d < best.0 || (d == best.0 && b & 1 == 0) {
                    best = (d, b);
                }
            }
            best.1
        };
        let mut xs: Vec<f32> = Vec::new();
        for w in finite.windows(2) {
            let (a, b) = (w[0].1, w[1].1);
            xs.extend([
                a as f32,
                ((a + b) / 2.0) as f32,
                (a * 0.75 + b * 0.25) as f32,
            ]);
        }
        let mut s = 0x1234_5678u32;
        for _ in 0..200_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            let x = f32::from_bits(s);
            xs.push(x);
            let scale = if s & 1 == 0 { 1.0 } else { 1e-3 };
            xs.push(x.abs().min(500.0).copysign(x) * scale);
        }
        xs.extend([
            0.0,
            -0.0,
            448.0,
            463.9,
            464.0,
            464.1,
            479.9,
            480.0,
            2f32.powi(-10),
        ]);
        for x in xs {
            let (got, w) = (f32_to_e4m3(x), want(x));
            let zero = x == 0.0 && got & 0x7F == 0 && w & 0x7F == 0;
            assert!(got == w || zero, "{x:e}: got {got:#x}, want {w:#x}");
        }
    }

    /// Bytes torch 2.15 gave for these floats (`x.to(torch.float8_e4m3fn)`).
    #[test]
    fn e4m3_matches_torch_on_its_edges() {
        let cases = [
            (470.0f32, 0x7E),
            (464.0, 0x7E),
            (479.9, 0x7E),
            (480.0, 0x7E),
            (1e6, 0x7E),
            (f32::INFINITY, 0x7E),
            (-f32::INFINITY, 0xFE),
            (-470.0, 0xFE),
            (448.0, 0x7E),
            (1e-3, 0x01),
            (2f32.powi(-10), 0x00),
            (3.0 * 2f32.powi(-10), 0x02),
            (f32::NAN, 0x7F),
        ];
        for (x, want) in cases {
            assert_eq!(f32_to_e4m3(x), want, "{x:e}");
        }
    }

    #[test]
    fn quantize_round_trips_within_a_step() {
        // 3 x 5 values in 2 x 2 blocks; dequantizing gives them back within the format.
        let b = Blocks {
            rows: 3,
            cols: 5,
            block: [2, 2],
        };
        let vals: Vec<f32> = (0..15).map(|k| (k as f32 - 7.0) * 0.37).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut q = vec![0u8; 15];
        let mut scales = vec![0u8; b.scale_bytes() as usize];
        b.quantize(&bytes, safetensors::Dtype::F32, 0, &mut q, &mut scales);
        let mut back = vec![0u8; 30];
        b.dequantize(&q, &scales, 0, &mut back);
        for (k, v) in vals.iter().enumerate() {
            let h = u16::from_le_bytes([back[2 * k], back[2 * k + 1]]);
            let got = f32::from_bits((h as u32) << 16);
            assert!((got - v).abs() <= v.abs() / 8.0 + 1e-6, "{k}: {v} -> {got}");
        }
        // The largest magnitude of a block maps to +-448.
        assert_eq!(e4m3_to_f32(q[0]).abs(), 448.0);
        // An all-zero block gets the 1e-4 floor.
        let z = Blocks {
            rows: 1,
            cols: 1,
            block: [2, 2],
        };
        let mut s4 = [0u8; 4];
        z.quantize(
            &0f32.to_le_bytes(),
            safetensors::Dtype::F32,
            0,
            &mut [0u8],
            &mut s4,
        );
        assert_eq!(f32::from_le_bytes(s4), 1e-4f32 / 448.0);
    }
}
