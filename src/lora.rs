//! LoRA adapters applied to a weight on read, as PEFT's `merge_and_unload` computes them
//! (which mergekit 0.1.5 runs before merging a `model+adapter`).
//!
//! Pure arithmetic: the executor hands over the weight's bytes (any window of elements) and
//! the adapter's two factors, and gets the adapted weight in the weight's own dtype, so the
//! merge kernel is unchanged and a cluster worker does the same. PEFT on CPU, as measured
//! against mergekit (`tests/fixtures/lora/README.md`): the factors are float32 (PEFT upcasts
//! bfloat16/float16 adapters on load), the update is `(B @ A) * float32(scaling)`, and
//! `W += update` adds in float32 and rounds once to the weight's dtype. `B @ A` is MKL's
//! float32 GEMM with inner size `rank`: each element is a chain of fused multiply-adds over
//! the rank in order, from zero; above rank 192 the rank is cut into blocks (halves below
//! 384, else 192 each, the remainder last), each summed so, and the block sums added left
//! to right. Measured on AVX2; MKL may block differently on AVX-512.

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
    ) -> LoraFactors {
        let a = widen(a, a_dtype);
        let fan_in = a.len() / rank.max(1);
        LoraFactors {
            a,
            b: widen(b, b_dtype),
            rank,
            fan_in,
            scaling: scaling as f32,
        }
    }

    /// The update of weight element (`i`, `j`).
    #[inline]
    fn delta(&self, i: usize, j: usize) -> f32 {
        let b = &self.b[i * self.rank..(i + 1) * self.rank];
        let block = gemm_block(self.rank);
        let mut total = 0f32;
        for (n, chunk) in b.chunks(block).enumerate() {
            let mut acc = 0f32;
            for (k, bk) in chunk.iter().enumerate() {
                acc = bk.mul_add(self.a[(n * block + k) * self.fan_in + j], acc);
            }
            total = if n == 0 { acc } else { total + acc };
        }
        total * self.scaling
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

/// How MKL's float32 GEMM blocks an inner dimension of `rank` (measured; see the module doc).
fn gemm_block(rank: usize) -> usize {
    match rank {
        0..=192 => rank.max(1),
        193..=383 => rank / 2,
        _ => 192,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_blocks_as_measured() {
        let blocks = |r: usize| {
            (0..r)
                .step_by(gemm_block(r))
                .map(|s| (r - s).min(gemm_block(r)))
                .collect::<Vec<_>>()
        };
        assert_eq!(blocks(8), vec![8]);
        assert_eq!(blocks(192), vec![192]);
        assert_eq!(blocks(256), vec![128, 128]);
        assert_eq!(blocks(257), vec![128, 128, 1]);
        assert_eq!(blocks(385), vec![192, 192, 1]);
    }

    /// A 3 x 4 weight, rank 2: every element is W + scaling * (B @ A), any window alike.
    #[test]
    fn update_is_b_times_a_scaled_in_any_window() {
        let a = [1f32, 2., 3., 4., 0.5, -1., 0.25, 2.];
        let b = [1f32, 0., 0., 1., 2., -1.];
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let f = LoraFactors::new(&bytes(&a), Dtype::F32, &bytes(&b), Dtype::F32, 2, 0.5);
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
    }
}
