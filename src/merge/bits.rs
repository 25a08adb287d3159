//! Masks of one bit an element (element `j` is bit `j % 64` of word `j / 64`): a tensor's
//! keep mask is read by several passes over the tensor, and at a bit an element it costs
//! those passes an eighth of the memory traffic of one byte an element.

/// Words for `n` elements.
pub fn words(n: usize) -> usize {
    n.div_ceil(64)
}

/// Flags (0 or 1) into bits: `flags[64 * i..]` into `out[i]`, a partial last word padded
/// with zeros. Eight flags become eight bits by one multiplication, so the loop is a
/// vector loop.
#[inline(always)]
pub fn pack<T: Copy>(flags: &[T], out: &mut [u64])
where
    u8: From<T>,
{
    // Byte i (0 or 1) of `x` lands on bit 56 + i; nothing carries into those bits.
    let eight = |x: u64| x.wrapping_mul(0x0102_0408_1020_4080) >> 56;
    for (c, w) in flags.chunks(64).zip(out) {
        let mut m = 0u64;
        let whole = c.chunks_exact(8);
        let tail = whole.remainder();
        let i = c.len() / 8;
        for (i, e) in whole.enumerate() {
            m |= eight(u64::from_le_bytes(std::array::from_fn(|b| u8::from(e[b])))) << (8 * i);
        }
        if !tail.is_empty() {
            let x = u64::from_le_bytes(std::array::from_fn(|b| {
                tail.get(b).map_or(0, |&f| u8::from(f))
            }));
            m |= eight(x) << (8 * i);
        }
        *w = m;
    }
}

/// Elements `start..start + out.len()` of a mask as 0.0 or 1.0 (`start` a multiple of 64).
#[inline(always)]
pub fn expand(bits: &[u64], start: usize, out: &mut [f32]) {
    debug_assert_eq!(start % 64, 0);
    for (c, w) in out.chunks_mut(32).zip(
        bits[start / 64..]
            .iter()
            .flat_map(|&w| [w as u32, (w >> 32) as u32]),
    ) {
        for (b, o) in c.iter_mut().enumerate() {
            *o = ((w >> b) & 1) as f32;
        }
    }
}

/// Whether element `j` is set.
#[cfg(test)]
pub fn get(bits: &[u64], j: usize) -> bool {
    bits[j / 64] >> (j % 64) & 1 == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_expand_and_get_agree() {
        for n in [0, 1, 63, 64, 65, 100, 4096, 5000] {
            let flags: Vec<bool> = (0..n).map(|j| (j * 7 + j / 3) % 5 < 2).collect();
            let mut bits = vec![!0u64; words(n)];
            pack(&flags, &mut bits);
            for (j, &f) in flags.iter().enumerate() {
                assert_eq!(get(&bits, j), f, "n {n} j {j}");
            }
            if n % 64 != 0 {
                assert_eq!(bits[n / 64] >> (n % 64), 0, "padding is zero");
            }
            for start in (0..n).step_by(64) {
                let mut out = vec![9.0f32; (n - start).min(300)];
                expand(&bits, start, &mut out);
                for (j, &o) in out.iter().enumerate() {
                    assert_eq!(o, flags[start + j] as u8 as f32);
                }
            }
        }
    }
}
