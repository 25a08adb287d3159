//! model_stock in float64, the working dtype mergekit keeps for float64 inputs.
//!
//! Every operation is a plain f64 operation (torch computes float64 natively, with no
//! wider type to round from); reductions accumulate in f64 in block order, so results
//! match torch within float64 summation-order differences, as float32 results do.

use safetensors::Dtype;

use super::model_stock::Stats;
use super::InputView;

const MICRO: usize = 512;

/// Decode elements `start..start + out.len()` of a float tensor to f64 (exact for every
/// float dtype).
pub(super) fn decode(bytes: &[u8], dtype: Dtype, start: usize, out: &mut [f64]) {
    let n = out.len();
    match dtype {
        Dtype::F64 => {
            for (o, c) in out
                .iter_mut()
                .zip(bytes[start * 8..(start + n) * 8].chunks_exact(8))
            {
                *o = f64::from_le_bytes(c.try_into().expect("chunk of 8"));
            }
        }
        _ => {
            let mut tmp = [0f32; MICRO];
            for (k, chunk) in out.chunks_mut(MICRO).enumerate() {
                let m = chunk.len();
                super::numeric::decode::<super::numeric::F32>(
                    bytes,
                    dtype,
                    start + k * MICRO,
                    &mut tmp[..m],
                );
                for (o, v) in chunk.iter_mut().zip(&tmp[..m]) {
                    *o = *v as f64;
                }
            }
        }
    }
}

/// Encode f64 values to `dtype` as torch's `.to(dtype)` does: to float32 (nearest even),
/// and from there to bfloat16 or float16 (torch converts a double to those through float).
/// (`half`'s own `from_f64` is no substitute: it drops the double's low 32 bits before
/// rounding, so values just above a tie round as ties.)
pub(super) fn encode(values: &[f64], dtype: Dtype, out: &mut [u8]) {
    match dtype {
        Dtype::F64 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(8)) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::F32 => {
            for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                o.copy_from_slice(&(*v as f32).to_le_bytes());
            }
        }
        Dtype::BF16 | Dtype::F16 => {
            let mut narrow = [0f32; MICRO];
            for (vals, out) in values.chunks(MICRO).zip(out.chunks_mut(MICRO * 2)) {
                for (n, v) in narrow.iter_mut().zip(vals) {
                    *n = *v as f32;
                }
                super::numeric::encode(&narrow[..vals.len()], dtype, out);
            }
        }
        other => unreachable!("encode to non-working dtype {other:?}"),
    }
}

pub fn stats_range(inputs: &[InputView], start: usize, len: usize) -> Stats {
    let n = inputs.len() - 1;
    let mut stats = Stats::zero(n);
    let mut w0 = [0f64; MICRO];
    let mut w = [0f64; MICRO];
    let mut d = vec![[0f64; MICRO]; n];
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        decode(inputs[0].bytes, inputs[0].dtype, start + off, &mut w0[..m]);
        for (i, di) in d.iter_mut().enumerate() {
            let inp = &inputs[i + 1];
            decode(inp.bytes, inp.dtype, start + off, &mut w[..m]);
            for k in 0..m {
                di[k] = w[k] - w0[k];
            }
        }
        let mut p = n;
        for i in 0..n {
            stats.sums[i] += d[i][..m].iter().map(|x| x * x).sum::<f64>();
            for j in i + 1..n {
                stats.sums[p] += d[i][..m]
                    .iter()
                    .zip(&d[j][..m])
                    .map(|(a, b)| a * b)
                    .sum::<f64>();
                p += 1;
            }
        }
        off += m;
    }
    stats
}

pub fn ratio(stats: &Stats) -> f64 {
    let n = stats.fine_tunes;
    if n < 2 {
        return 0.0;
    }
    let norms: Vec<f64> = stats.sums[..n].iter().map(|s| s.sqrt()).collect();
    let mut cos_sum = 0f64;
    let mut p = n;
    for i in 0..n {
        for j in i + 1..n {
            let denom = (norms[i] * norms[j]).max(1e-6);
            cos_sum += (stats.sums[p] / denom).clamp(-1.0, 1.0);
            p += 1;
        }
    }
    let c = cos_sum / (n * (n - 1) / 2) as f64;
    let nf = n as f64;
    let den = 1.0 + (nf - 1.0) * c;
    if den.abs() < 1e-6 {
        0.0
    } else {
        nf * c / den
    }
}

pub fn apply_range(
    inputs: &[InputView],
    start: usize,
    len: usize,
    t: f64,
    out_dtype: Dtype,
    out: &mut [u8],
) {
    let nf = (inputs.len() - 1) as f64;
    let osz = out.len() / len.max(1);
    let mut w0 = [0f64; MICRO];
    let mut s = [0f64; MICRO];
    let mut w = [0f64; MICRO];
    let mut off = 0;
    while off < len {
        let m = MICRO.min(len - off);
        decode(inputs[0].bytes, inputs[0].dtype, start + off, &mut w0[..m]);
        decode(inputs[1].bytes, inputs[1].dtype, start + off, &mut s[..m]);
        for inp in &inputs[2..] {
            decode(inp.bytes, inp.dtype, start + off, &mut w[..m]);
            for k in 0..m {
                s[k] += w[k];
            }
        }
        for k in 0..m {
            s[k] = t * (s[k] / nf) + (1.0 - t) * w0[k];
        }
        encode(&s[..m], out_dtype, &mut out[off * osz..(off + m) * osz]);
        off += m;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// float64 results are written to narrower dtypes as torch's `.to()` writes them:
    /// through float32, each step to nearest even.
    #[test]
    fn narrowing_goes_through_float32_as_torch_does() {
        let above_tie = 1.0 + 2f64.powi(-8) + 2f64.powi(-23); // an f32, just above a bf16 tie
        let double_rounded = 1.0 + 2f64.powi(-8) + 2f64.powi(-40); // rounds to the tie in f32
        let mut out = [0u8; 4];
        encode(&[above_tie, double_rounded], Dtype::BF16, &mut out);
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x3F81); // 1 + 2^-7
        assert_eq!(u16::from_le_bytes([out[2], out[3]]), 0x3F80); // 1.0: the tie, to even
        let x = 1.0 + 2f64.powi(-11) + 2f64.powi(-23); // just above a float16 tie
        encode(&[x, -x], Dtype::F16, &mut out);
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), 0x3C01);
        assert_eq!(u16::from_le_bytes([out[2], out[3]]), 0xBC01);
        let mut wide = [0u8; 8];
        encode(&[above_tie], Dtype::F64, &mut wide);
        assert_eq!(f64::from_le_bytes(wide), above_tie);
    }
}
