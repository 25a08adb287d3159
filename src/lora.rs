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

    /// The updates of row `i`, columns `j0..j0 + out.len()`: for each rank block, a chain
    /// of fused multiply-adds per element (vectorized across the columns), then the block sums
    /// added in order, then the scaling.
    #[inline(always)]
    fn row_deltas_portable(&self, i: usize, j0: usize, out: &mut [f32]) {
        let n = out.len();
        let b = &self.b[i * self.rank..(i + 1) * self.rank];
        let block = gemm_block(self.rank);
        let mut part = Vec::new();
        for (bi, chunk) in b.chunks(block).enumerate() {
            let acc: &mut [f32] = if bi == 0 {
                &mut *out
            } else {
                part.clear();
                part.resize(n, 0f32);
                &mut part
            };
            acc.fill(0.0);
            for (k, &bk) in chunk.iter().enumerate() {
                let at = (bi * block + k) * self.fan_in + j0;
                for (x, &a) in acc.iter_mut().zip(&self.a[at..at + n]) {
                    *x = bk.mul_add(a, *x);
                }
            }
            if bi > 0 {
                for (o, p) in out.iter_mut().zip(&part) {
                    *o += *p;
                }
            }
        }
        for o in out.iter_mut() {
            *o *= self.scaling;
        }
    }

    /// [`Self::row_deltas_portable`] compiled for FMA hardware (the same bits: a fused
    /// multiply-add rounds once either way; without it each one is a libm call).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn row_deltas_fma(&self, i: usize, j0: usize, out: &mut [f32]) {
        self.row_deltas_portable(i, j0, out)
    }

    fn row_deltas(&self, i: usize, j0: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { self.row_deltas_fma(i, j0, out) };
        }
        self.row_deltas_portable(i, j0, out)
    }

    /// Adapt weight elements `start..` (`weight`: their bytes in `dtype`; the weight has
    /// `cols` columns) into `out` (same dtype and length), row segment by row segment.
    pub fn apply(&self, weight: &[u8], dtype: Dtype, start: usize, cols: usize, out: &mut [u8]) {
        let size = crate::dtype::size(dtype).expect("whole-byte dtype");
        debug_assert_eq!(weight.len(), out.len());
        let total = weight.len() / size;
        let mut deltas = Vec::new();
        let mut done = 0;
        while done < total {
            let e = start + done;
            let (i, j0) = (e / cols, e % cols);
            let n = (cols - j0).min(total - done);
            deltas.resize(n, 0f32);
            self.row_deltas(i, j0, &mut deltas);
            let w = &weight[done * size..(done + n) * size];
            let o = &mut out[done * size..(done + n) * size];
            add_round(w, &deltas, dtype, o);
            done += n;
        }
    }
}

/// `out = dtype(float32(w) + d)`, element by element.
fn add_round(w: &[u8], d: &[f32], dtype: Dtype, out: &mut [u8]) {
    match dtype {
        Dtype::F32 => {
            for ((w, o), d) in w.chunks_exact(4).zip(out.chunks_exact_mut(4)).zip(d) {
                let x = f32::from_le_bytes([w[0], w[1], w[2], w[3]]) + d;
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
        Dtype::BF16 => {
            for ((w, o), d) in w.chunks_exact(2).zip(out.chunks_exact_mut(2)).zip(d) {
                let x = f32::from_bits((u16::from_le_bytes([w[0], w[1]]) as u32) << 16) + d;
                let bits = (bf16_round(x).to_bits() >> 16) as u16;
                o.copy_from_slice(&bits.to_le_bytes());
            }
        }
        Dtype::F16 => {
            for ((w, o), d) in w.chunks_exact(2).zip(out.chunks_exact_mut(2)).zip(d) {
                let x = f16_to_f32(u16::from_le_bytes([w[0], w[1]])) + d;
                o.copy_from_slice(&f16_bits(x).to_le_bytes());
            }
        }
        other => unreachable!("LoRA on {other:?} weights is refused by the plan"),
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

    /// Rank 300 (two blocks of 150): any window, on either code path, equals the
    /// element-by-element definition.
    #[test]
    fn blocked_ranks_in_windows_equal_the_definition() {
        let (rank, rows, cols) = (300, 3, 20);
        let val = |n: usize| ((n * 7919 % 1000) as f32 - 500.0) / 3.0e3;
        let a: Vec<f32> = (0..rank * cols).map(val).collect();
        let b: Vec<f32> = (0..rows * rank).map(|n| val(n + 17)).collect();
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let f = LoraFactors::new(
            &bytes(&a),
            Dtype::F32,
            &bytes(&b),
            Dtype::F32,
            rank,
            1.0 / 3.0,
        );
        let w: Vec<f32> = (0..rows * cols).map(|n| val(n + 5) * 10.0).collect();
        let want: Vec<f32> = (0..rows * cols)
            .map(|e| {
                let (i, j) = (e / cols, e % cols);
                let block = |lo: usize, hi: usize| {
                    (lo..hi).fold(0f32, |acc, k| b[i * rank + k].mul_add(a[k * cols + j], acc))
                };
                w[e] + (block(0, 150) + block(150, 300)) * (1.0f32 / 3.0)
            })
            .collect();
        for (start, end) in [(0, 60), (7, 33), (19, 21), (40, 60)] {
            let mut out = vec![0u8; (end - start) * 4];
            f.apply(&bytes(&w[start..end]), Dtype::F32, start, cols, &mut out);
            assert_eq!(widen(&out, Dtype::F32), want[start..end], "{start}..{end}");
        }
        let mut portable = vec![0f32; cols];
        let mut dispatched = vec![0f32; cols];
        f.row_deltas_portable(1, 0, &mut portable);
        f.row_deltas(1, 0, &mut dispatched);
        assert_eq!(portable, dispatched);
    }

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
