//! Block-FP8 checkpoints (DeepSeek-V3/R1, Kimi K2, Qwen3 `-FP8`): weights stored as
//! `F8_E4M3` with one float32 `<name>_scale_inv` per block (128x128 unless the checkpoint's
//! `quantization_config.weight_block_size` says otherwise). Pure arithmetic, no I/O.
//!
//! Dequantizing is what DeepSeek's official `fp8_cast_bf16.py` does, element by element:
//! `bf16(f32(w) * f32(scale_inv[i / rows_per_block][j / cols_per_block]))`, one float32
//! product rounded to nearest even. The merge then sees the bfloat16 checkpoint the official
//! converter would have written, so its result is mergekit's on that checkpoint, bit for bit.

use crate::dtype::bf16_round;

/// The suffix of a weight's scale tensor.
pub const SCALE_SUFFIX: &str = "_scale_inv";

/// The block size when `quantization_config` gives none.
pub const DEFAULT_BLOCK: [usize; 2] = [128, 128];

/// An `F8_E4M3` (E4M3FN: bias 7, no infinities, 0x7F/0xFF are NaN) byte as f32 (exact).
pub const fn e4m3_to_f32(b: u8) -> f32 {
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

/// Every E4M3 byte's value: dequantizing is a table lookup and one multiply.
static E4M3: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_to_f32(i as u8);
        i += 1;
    }
    t
};

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
        let [_, scols] = self.scale_shape();
        let [br, bc] = self.block;
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
            for j in k..k + run {
                let v = bf16_round(E4M3[q[j] as usize] * s);
                out[2 * j..2 * j + 2].copy_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes());
            }
            k += run;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
