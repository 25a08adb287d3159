//! LoRA adapters applied to a weight on read, as PEFT's `merge_and_unload` computes them
//! (which mergekit 0.1.5 runs before merging a `model+adapter`).
//!
//! Pure arithmetic: the executor hands over the weight's bytes (any window of elements) and
//! the adapter's two factors, and gets the adapted weight in the weight's own dtype, so the
//! merge kernel is unchanged and a cluster worker does the same. PEFT on CPU: the factors
//! are float32 (PEFT upcasts bfloat16/float16 adapters on load), the update is
//! `(B @ A) * scaling` in float32 (transposed with `fan_in_fan_out`), and `W += update` adds
//! in float32 and rounds once to the weight's dtype. `B @ A` is a float32 matrix product of
//! inner size `rank`; each element is summed over the rank in order with fused
//! multiply-adds, as the CPU GEMM kernels torch calls do for a small inner dimension.

use safetensors::Dtype;

use crate::dtype::{bf16_round, f16_bits, f16_to_f32};

/// One weight's adapter, factors widened to float32.
#[derive(Debug, Clone)]
pub struct LoraFactors {
    /// `lora_A`: [rank, fan_in], row-major.
    pub a: Vec<f32>,
    /// `lora_B`: [fan_out, rank], row-major.
    pub b: Vec<f32>,
    pub rank: usize,
    pub fan_in: usize,
    pub scaling: f32,
    /// The weight is [fan_in, fan_out] (`fan_in_fan_out`).
    pub transpose: bool,
}

/// Little-endian floats of `dtype` as f32 (exact).
pub fn widen(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        other => unreachable!("LoRA factors in {other:?} are refused by the plan"),
    }
}

impl LoraFactors {
    /// `scaling` is PEFT's double; torch multiplies a float32 tensor by it as a float32.
    pub fn new(
        a: &[u8],
        a_dtype: Dtype,
        b: &[u8],
        b_dtype: Dtype,
        rank: usize,
        scaling: f64,
        transpose: bool,
    ) -> LoraFactors {
        let a = widen(a, a_dtype);
        let fan_in = a.len() / rank.max(1);
        LoraFactors {
            a,
            b: widen(b, b_dtype),
            rank,
            fan_in,
            scaling: scaling as f32,
            transpose,
        }
    }

    /// The update of weight element (`row`, `col`) (the weight's own row and column).
    #[inline]
    fn delta(&self, row: usize, col: usize) -> f32 {
        let (i, j) = if self.transpose { (col, row) } else { (row, col) };
        let b = &self.b[i * self.rank..(i + 1) * self.rank];
        let mut acc = 0f32;
        for (k, bk) in b.iter().enumerate() {
            acc = bk.mul_add(self.a[k * self.fan_in + j], acc);
        }
        acc * self.scaling
    }

    /// Adapt weight elements `start..` (`weight`: their bytes in `dtype`; the weight has
    /// `cols` columns) into `out` (same dtype and length).
    pub fn apply(&self, weight: &[u8], dtype: Dtype, start: usize, cols: usize, out: &mut [u8]) {
        let size = crate::dtype::size(dtype).expect("whole-byte dtype");
        debug_assert_eq!(weight.len(), out.len());
        for (n, (w, o)) in weight
            .chunks_exact(size)
            .zip(out.chunks_exact_mut(size))
            .enumerate()
        {
            let e = start + n;
            let d = self.delta(e / cols, e % cols);
            match dtype {
                Dtype::F32 => {
                    let x = f32::from_le_bytes([w[0], w[1], w[2], w[3]]) + d;
                    o.copy_from_slice(&x.to_le_bytes());
                }
                Dtype::BF16 => {
                    let x = f32::from_bits((u16::from_le_bytes([w[0], w[1]]) as u32) << 16) + d;
                    let bits = (bf16_round(x).to_bits() >> 16) as u16;
                    o.copy_from_slice(&bits.to_le_bytes());
                }
                Dtype::F16 => {
                    let x = f16_to_f32(u16::from_le_bytes([w[0], w[1]])) + d;
                    o.copy_from_slice(&f16_bits(x).to_le_bytes());
                }
                other => unreachable!("LoRA on {other:?} weights is refused by the plan"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3 x 4 weight, rank 2: every element is W + scaling * (B @ A), any window alike,
    /// transposed storage too.
    #[test]
    fn update_is_b_times_a_scaled_in_any_window() {
        let a = [1f32, 2., 3., 4., 0.5, -1., 0.25, 2.];
        let b = [1f32, 0., 0., 1., 2., -1.];
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let f = LoraFactors::new(&bytes(&a), Dtype::F32, &bytes(&b), Dtype::F32, 2, 0.5, false);
        let w = [10f32; 12];
        let mut out = vec![0u8; 48];
        f.apply(&bytes(&w), Dtype::F32, 0, 4, &mut out);
        let got: Vec<f32> = widen(&out, Dtype::F32);
        // B @ A = [[1,2,3,4],[0.5,-1,0.25,2],[1.5,5,5.75,6]]
        let ba = [1., 2., 3., 4., 0.5, -1., 0.25, 2., 1.5, 5., 5.75, 6.];
        for (g, d) in got.iter().zip(ba) {
            assert_eq!(*g, 10. + 0.5 * d);
        }
        let mut tail = vec![0u8; 20];
        f.apply(&bytes(&w[7..]), Dtype::F32, 7, 4, &mut tail);
        assert_eq!(&tail[..], &out[28..]);
        // Stored as [fan_in, fan_out] = 4 x 3: element (r, c) takes (B @ A)[c][r].
        let t = LoraFactors::new(&bytes(&a), Dtype::F32, &bytes(&b), Dtype::F32, 2, 0.5, true);
        let mut out_t = vec![0u8; 48];
        t.apply(&bytes(&w), Dtype::F32, 0, 3, &mut out_t);
        let got_t = widen(&out_t, Dtype::F32);
        for r in 0..4 {
            for c in 0..3 {
                assert_eq!(got_t[r * 3 + c], got[c * 4 + r]);
            }
        }
    }
}
