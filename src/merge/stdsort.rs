//! torch's CPU `sort`, `argsort` and `topk` tie order: libstdc++'s algorithms, replayed.
//!
//! torch sorts `(value, index)` pairs with `std::sort` (not stable) comparing values only,
//! and takes `topk` with `std::partial_sort` or `std::nth_element`. Which of several equal
//! magnitudes a method keeps (ties, breadcrumbs, della, sce) is decided by those
//! algorithms' exact steps, so they are copied here step for step: introsort (threshold 16,
//! median of three of `first + 1`, the middle and `last - 1`, depth `2 * floor(log2 n)`,
//! heap sort past it, a final insertion sort), introselect and the heap-based partial sort.
//!
//! A method that keeps a set (the top k, a band of ranks) needs only the elements on each
//! side of the set's bounds, not their order: [`select`] replays introsort but follows only
//! the partitions that straddle a bound, which is what `std::sort` would have put there,
//! in expected linear time. Its large partitions are replayed from bit masks of the
//! comparisons with the pivot (`partition_masked`): the same swaps, without a branch per
//! element, and the largest by every thread (the swapping pairs never overlap).

use rayon::prelude::*;

use super::bits;

/// An element: an order-preserving key of its value in the high half (the requested order
/// made ascending, so one integer comparison is torch's comparator) and its index in the
/// tensor in the low half. Only keys are compared.
pub type Pair = u64;

/// The order torch asks for. NaN sorts last ascending and first descending, as torch's
/// comparators put it; NaNs compare equal, and so do -0 and +0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Ascending,
    Descending,
}

/// The pair of `value` at `index`, keyed for `order`.
#[inline(always)]
pub fn pair(value: f32, index: usize, order: Order) -> Pair {
    let bits = if value.is_nan() {
        0x7fc0_0000
    } else {
        // `+ 0.0` makes -0 into +0: torch's comparators see them equal.
        (value + 0.0).to_bits()
    };
    // IEEE order as unsigned order: flip every bit of negatives, the sign bit of the rest.
    let up = if bits >> 31 == 1 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    let key = match order {
        Order::Ascending => up,
        Order::Descending => !up,
    };
    ((key as u64) << 32) | index as u64
}

/// The tensor index of a pair.
#[inline(always)]
pub fn index(p: Pair) -> usize {
    (p & 0xffff_ffff) as usize
}

/// The order key of a pair: pairs compare by it alone.
#[inline(always)]
pub fn key(p: Pair) -> u32 {
    (p >> 32) as u32
}

#[inline(always)]
fn less(a: Pair, b: Pair) -> bool {
    key(a) < key(b)
}

const THRESHOLD: usize = 16;

fn lg(n: usize) -> usize {
    (usize::BITS - 1 - n.leading_zeros()) as usize
}

/// `std::sort(v, comp)` step for step, ending with `__final_insertion_sort` (an insertion
/// sort of the first 16, then an unguarded one of the rest: the plain stable insertion sort
/// in effect). The methods need only its sets ([`select`]) or its places ([`sort_places`]);
/// this is the reference the tests hold both to.
#[cfg(test)]
pub fn sort(v: &mut [Pair]) {
    if v.len() > 1 {
        introsort_loop(v, 0, v.len(), 2 * lg(v.len()), &[]);
        insertion_sort(v);
    }
}

/// Where `std::sort` puts each element, without the last pass: after introsort's
/// partitions, `places[i]` is the final position of `v[i]` (`keys` is scratch). The final
/// insertion sort only sorts, stably, runs of at most 16 (`THRESHOLD`) elements that are
/// already in order with each other (every key of a run is at most every key of the next:
/// a sorted heap-sort range is such a run too), so an element's place is its position, less
/// the greater keys before it, plus the smaller keys after it, all within 15 places of it:
/// a window count in vector loops instead of a branch per move.
#[inline(always)]
pub fn sort_places(v: &mut [Pair], keys: &mut Vec<u32>, places: &mut Vec<u32>) {
    const W: usize = THRESHOLD - 1;
    let n = v.len();
    if n > 1 {
        introsort_loop(v, 0, n, 2 * lg(n), &[]);
    }
    // Padding that counts neither way: no key is below 0 on the left or above MAX on the
    // right.
    keys.clear();
    keys.resize(W, 0);
    keys.extend(v.iter().map(|&p| key(p)));
    keys.resize(n + 2 * W, u32::MAX);
    places.clear();
    places.extend(0..n as u32);
    let mid = &keys[W..W + n];
    for d in 1..=W {
        let (before, after) = (&keys[W - d..W - d + n], &keys[W + d..W + d + n]);
        for (((p, &k), &b), &a) in places.iter_mut().zip(mid).zip(before).zip(after) {
            *p = *p + (a < k) as u32 - (b > k) as u32;
        }
    }
}

/// The elements `std::sort` would place before each of `bounds`: afterwards, for every
/// bound `b`, `v[..b]` holds the same elements as after a full sort (in another order).
pub fn select(v: &mut [Pair], bounds: &[usize]) {
    let n = v.len();
    let inner: Vec<usize> = bounds.iter().copied().filter(|&b| b > 0 && b < n).collect();
    if n > 1 && !inner.is_empty() {
        introsort_loop(v, 0, n, 2 * lg(n), &inner);
    }
}

/// `std::nth_element(v, v + nth, comp)`.
pub fn nth_element(v: &mut [Pair], nth: usize) {
    let n = v.len();
    if n == 0 || nth >= n {
        return;
    }
    let (mut first, mut last) = (0, n);
    let mut depth = 2 * lg(n);
    while last - first > 3 {
        if depth == 0 {
            heap_select(&mut v[first..last], nth + 1 - first);
            v.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = partition_pivot(v, first, last);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(&mut v[first..last]);
}

/// The indices `torch.topk(x, k, largest=True)` returns, as a set (in no useful order):
/// `partial_sort`'s heap selection when `k * 64 <= n`, else `nth_element` at `k - 1`. The pairs are keyed
/// [`Order::Descending`].
pub fn topk_set(v: &mut [Pair], k: usize) -> &[Pair] {
    if k == 0 {
        return &v[..0];
    }
    if k * 64 <= v.len() {
        heap_select(v, k);
    } else {
        nth_element(v, k - 1);
    }
    &v[..k]
}

/// `__introsort_loop` over `v[first..last]`. With `bounds` empty it sorts as `std::sort`
/// does; otherwise it only follows partitions that straddle a bound and finishes those
/// itself (the final insertion sort never moves an element across a partition edge).
fn introsort_loop(
    v: &mut [Pair],
    first: usize,
    mut last: usize,
    mut depth: usize,
    bounds: &[usize],
) {
    let selecting = !bounds.is_empty();
    let straddles = |a: usize, b: usize| bounds.iter().any(|&x| x > a && x < b);
    while last - first > THRESHOLD {
        if selecting && !straddles(first, last) {
            return;
        }
        if depth == 0 {
            // `std::__partial_sort(first, last, last)`: a heap sort.
            heap_select(&mut v[first..last], last - first);
            sort_heap(&mut v[first..last]);
            return;
        }
        depth -= 1;
        let cut = partition_pivot(v, first, last);
        introsort_loop(v, cut, last, depth, bounds);
        last = cut;
    }
    if selecting && straddles(first, last) {
        insertion_sort(&mut v[first..last]);
    }
}

/// `__unguarded_partition_pivot`: the median of three moved to `first`, then Hoare's
/// partition of `first + 1..last` around it.
fn partition_pivot(v: &mut [Pair], first: usize, last: usize) -> usize {
    median_to_first(v, first, last);
    if last - first > MASKED {
        partition_masked(v, first, last)
    } else {
        partition_scalar(v, first, last)
    }
}

/// `__move_median_to_first(first, first + 1, mid, last - 1)`.
fn median_to_first(v: &mut [Pair], first: usize, last: usize) {
    let mid = first + (last - first) / 2;
    let (a, b, c) = (first + 1, mid, last - 1);
    let lt = |i: usize, j: usize, v: &[Pair]| less(v[i], v[j]);
    let m = if lt(a, b, v) {
        if lt(b, c, v) {
            b
        } else if lt(a, c, v) {
            c
        } else {
            a
        }
    } else if lt(a, c, v) {
        a
    } else if lt(b, c, v) {
        c
    } else {
        b
    };
    v.swap(first, m);
}

/// Ranges longer than this are partitioned from masks.
const MASKED: usize = 64;

/// `__unguarded_partition(first + 1, last, first)`, as written.
fn partition_scalar(v: &mut [Pair], first: usize, last: usize) -> usize {
    let pivot = v[first];
    let (mut lo, mut hi) = (first + 1, last);
    loop {
        while less(v[lo], pivot) {
            lo += 1;
        }
        hi -= 1;
        while less(pivot, v[hi]) {
            hi -= 1;
        }
        if lo >= hi {
            return lo;
        }
        v.swap(lo, hi);
        lo += 1;
    }
}

/// The same partition from two bit masks over `first + 1..last` taken before any swap:
/// where the left scan stops (`!(x < pivot)`) and where the right one does
/// (`!(pivot < x)`). Between the two fronts every element still holds its first value, and
/// what a swap leaves behind each front stops the other scan anyway, so the i-th left stop
/// pairs with the i-th right stop (counted from the right) until they cross: the same
/// swaps and the same cut as [`partition_scalar`]. A range of at least [`PARALLEL`]
/// elements is partitioned by every thread: the pairs never overlap, so once the crossing
/// is found from the masks' bit counts, runs of pairs swap apart ([`parallel_swaps`]).
fn partition_masked(v: &mut [Pair], first: usize, last: usize) -> usize {
    let p = key(v[first]);
    let base = first + 1;
    let n = last - base;
    let words = n.div_ceil(64);
    let body = &mut v[base..last];
    if n >= PARALLEL {
        let (mut stop_l, mut stop_r) = (vec![0u64; words], vec![0u64; words]);
        body.par_chunks(CHUNK_WORDS * 64)
            .zip(stop_l.par_chunks_mut(CHUNK_WORDS))
            .zip(stop_r.par_chunks_mut(CHUNK_WORDS))
            .for_each(|((c, l), r)| simd::stop_masks(c, p, l, r));
        return base + parallel_swaps(body, &stop_l, &stop_r);
    }
    // Up to 4096 elements, the masks live on the stack.
    let (mut small_l, mut small_r) = ([0u64; 64], [0u64; 64]);
    let (mut big_l, mut big_r) = (Vec::new(), Vec::new());
    let (stop_l, stop_r) = if words <= 64 {
        (&mut small_l[..words], &mut small_r[..words])
    } else {
        big_l.resize(words, 0);
        big_r.resize(words, 0);
        (&mut big_l[..], &mut big_r[..])
    };
    simd::stop_masks(body, p, stop_l, stop_r);
    base + swaps(body, stop_l, stop_r)
}

/// Ranges at least this long are partitioned by every thread.
const PARALLEL: usize = 1 << 18;

/// Mask words per parallel piece of [`partition_masked`] (65,536 elements).
const CHUNK_WORDS: usize = 1024;

/// [`partition_masked`]'s swaps, one pair after another: the next left stop, the next
/// right stop, until they cross. Returns the cut (relative to `v`).
fn swaps(v: &mut [Pair], stop_l: &[u64], stop_r: &[u64]) -> usize {
    let (mut left, mut right) = (Walk::up(stop_l, 0), Walk::down(stop_r, v.len() - 1));
    // One past the range the left scan may search: the last right stop.
    let mut hi = v.len();
    loop {
        let Some(l) = left.next_up().filter(|&l| l < hi) else {
            return hi;
        };
        match right.next_down() {
            Some(r) if r > l => {
                v.swap(l, r);
                hi = r;
            }
            _ => return l,
        }
    }
}

/// The set bits of a stop mask, walked up or down from a position (the word in hand kept,
/// so each step is a bit operation).
struct Walk<'a> {
    mask: &'a [u64],
    word: usize,
    bits: u64,
}

impl<'a> Walk<'a> {
    /// From bit `from` upward.
    fn up(mask: &'a [u64], from: usize) -> Self {
        let word = from / 64;
        Walk {
            mask,
            word,
            bits: mask[word] & (!0u64 << (from % 64)),
        }
    }

    /// From bit `from` downward.
    fn down(mask: &'a [u64], from: usize) -> Self {
        let word = from / 64;
        Walk {
            mask,
            word,
            bits: mask[word] & (!0u64 >> (63 - from % 64)),
        }
    }

    #[inline(always)]
    fn next_up(&mut self) -> Option<usize> {
        while self.bits == 0 {
            self.word += 1;
            self.bits = *self.mask.get(self.word)?;
        }
        let at = self.word * 64 + self.bits.trailing_zeros() as usize;
        self.bits &= self.bits - 1;
        Some(at)
    }

    #[inline(always)]
    fn next_down(&mut self) -> Option<usize> {
        while self.bits == 0 {
            self.word = self.word.checked_sub(1)?;
            self.bits = self.mask[self.word];
        }
        let at = self.word * 64 + 63 - self.bits.leading_zeros() as usize;
        self.bits &= !(1u64 << (at % 64));
        Some(at)
    }
}

/// Stop positions by rank: the i-th set bit of a mask counted from the left (`from_left`)
/// or from the right, from per-chunk bit counts ([`CHUNK_WORDS`] words a chunk).
struct Ranks<'a> {
    mask: &'a [u64],
    /// Set bits before each chunk, in the counting direction; one more entry: the total.
    before: Vec<usize>,
    from_left: bool,
}

impl<'a> Ranks<'a> {
    fn new(mask: &'a [u64], from_left: bool) -> Self {
        let mut counts: Vec<usize> = mask
            .par_chunks(CHUNK_WORDS)
            .map(|c| c.iter().map(|w| w.count_ones() as usize).sum())
            .collect();
        if !from_left {
            counts.reverse();
        }
        let mut before = Vec::with_capacity(counts.len() + 1);
        let mut total = 0;
        for c in counts {
            before.push(total);
            total += c;
        }
        before.push(total);
        Ranks {
            mask,
            before,
            from_left,
        }
    }

    fn total(&self) -> usize {
        *self.before.last().expect("a total")
    }

    /// The position of the i-th stop (`i < total`).
    fn at(&self, i: usize) -> usize {
        // The chunk (in counting order) holding it, then its word, then its bit.
        let c = self.before.partition_point(|&b| b <= i) - 1;
        let mut left = i - self.before[c];
        let chunks = self.before.len() - 1;
        let chunk = if self.from_left { c } else { chunks - 1 - c };
        let lo = chunk * CHUNK_WORDS;
        let hi = (lo + CHUNK_WORDS).min(self.mask.len());
        let mut visit = |w: usize| -> Option<usize> {
            let mut bits = self.mask[w];
            let count = bits.count_ones() as usize;
            if left >= count {
                left -= count;
                return None;
            }
            for _ in 0..(if self.from_left {
                left
            } else {
                count - 1 - left
            }) {
                bits &= bits - 1;
            }
            Some(w * 64 + bits.trailing_zeros() as usize)
        };
        let found = if self.from_left {
            (lo..hi).find_map(&mut visit)
        } else {
            (lo..hi).rev().find_map(&mut visit)
        };
        found.expect("the chunk's counts hold the stop")
    }
}

/// [`swaps`] over a long range by every thread: the number of pairs that swap (the first
/// pair that does not cross) by bisection over ranks, the cut from it, then runs of pairs,
/// each on its own slices of `v` (left stops all lie before right ones).
fn parallel_swaps(v: &mut [Pair], stop_l: &[u64], stop_r: &[u64]) -> usize {
    let n = v.len();
    let (ls, rs) = rayon::join(|| Ranks::new(stop_l, true), || Ranks::new(stop_r, false));
    let pairs = ls.total().min(rs.total());
    // Pairs `..m` swap: their left stop lies before their right one (monotone in i).
    let (mut lo, mut hi) = (0, pairs);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if ls.at(mid) < rs.at(mid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let m = lo;
    let bound = if m == 0 { n } else { rs.at(m - 1) };
    let cut = if m == ls.total() || ls.at(m) >= bound {
        bound
    } else {
        ls.at(m)
    };
    if m == 0 {
        return cut;
    }
    // Runs of pairs `a..b`. A run's left stops lie in `ls.at(a)..ls.at(b)`, its right
    // ones in `rs.at(b) + 1..=rs.at(a)`, and every left stop of a swapping pair lies
    // before `split`, every right one after: `v` splits into one left and one right
    // region per run (the first and last runs' regions reach the ends and `split`).
    let runs = (rayon::current_num_threads() * 4).min(m);
    let starts: Vec<usize> = (0..=runs).map(|j| j * m / runs).collect();
    let split = ls.at(m - 1) + 1;
    let (mut left, mut right) = v.split_at_mut(split);
    let mut work = Vec::with_capacity(runs);
    let (mut l_start, mut r_end) = (0, n);
    for j in 0..runs {
        let (a, b) = (starts[j], starts[j + 1]);
        let (l_end, r_start) = if b == m {
            (split, split)
        } else {
            (ls.at(b), rs.at(b) + 1)
        };
        let (mine, rest) = std::mem::take(&mut left).split_at_mut(l_end - l_start);
        left = rest;
        let (rest, theirs) = std::mem::take(&mut right).split_at_mut(r_start - split);
        right = rest;
        work.push((a, b - a, (l_start, mine), (r_start, theirs)));
        l_start = l_end;
        r_end = r_start;
    }
    debug_assert_eq!(r_end, split);
    work.into_par_iter().for_each(|(a, count, left, right)| {
        swap_run(left, right, (stop_l, ls.at(a)), (stop_r, rs.at(a)), count)
    });
    cut
}

/// `count` swaps of [`parallel_swaps`]: the left stops from `l0` on (each `(start,
/// slice)` region holds positions `start..`) with the right stops from `r0` down.
fn swap_run(
    (l_start, left): (usize, &mut [Pair]),
    (r_start, right): (usize, &mut [Pair]),
    (stop_l, l0): (&[u64], usize),
    (stop_r, r0): (&[u64], usize),
    count: usize,
) {
    let (mut ls, mut rs) = (Walk::up(stop_l, l0), Walk::down(stop_r, r0));
    for _ in 0..count {
        // The ranks counted `count` pairs from these two stops on.
        let (Some(l), Some(r)) = (ls.next_up(), rs.next_down()) else {
            return;
        };
        std::mem::swap(&mut left[l - l_start], &mut right[r - r_start]);
    }
}

/// The bits of [`partition_masked`]: for each element of `v`, whether `key >= p` (in
/// `stop_l`) and whether `key <= p` (in `stop_r`), 64 to a word. The comparisons go to
/// bytes first, then packed ([`bits::pack`]), so the loop is a vector loop.
#[inline(always)]
fn stop_masks(v: &[Pair], p: u32, stop_l: &mut [u64], stop_r: &mut [u64]) {
    let (mut l, mut r) = ([0u8; 64], [0u8; 64]);
    for ((chunk, sl), sr) in v.chunks(64).zip(stop_l).zip(stop_r) {
        for ((&x, l), r) in chunk.iter().zip(&mut l).zip(&mut r) {
            let k = key(x);
            *l = (k >= p) as u8;
            *r = (k <= p) as u8;
        }
        let len = chunk.len();
        bits::pack(&l[..len], std::slice::from_mut(sl));
        bits::pack(&r[..len], std::slice::from_mut(sr));
    }
}

/// The hot loop compiled twice (see [`super::simd`]).
mod simd {
    use super::*;
    use crate::twice;

    twice!(stop_masks(v: &[Pair], p: u32, stop_l: &mut [u64], stop_r: &mut [u64]) => super::stop_masks(v, p, stop_l, stop_r));
}

fn insertion_sort(v: &mut [Pair]) {
    for i in 1..v.len() {
        let val = v[i];
        let mut j = i;
        while j > 0 && less(val, v[j - 1]) {
            v[j] = v[j - 1];
            j -= 1;
        }
        v[j] = val;
    }
}

/// `__heap_select(first, middle, last)`: a heap of the first `middle`, then every later
/// element that beats the heap's top replaces it.
fn heap_select(v: &mut [Pair], middle: usize) {
    make_heap(&mut v[..middle]);
    for i in middle..v.len() {
        if less(v[i], v[0]) {
            // `__pop_heap(first, middle, i)`.
            let value = v[i];
            v[i] = v[0];
            adjust_heap(&mut v[..middle], 0, value);
        }
    }
}

fn make_heap(v: &mut [Pair]) {
    let len = v.len();
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let value = v[parent];
        adjust_heap(v, parent, value);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

fn sort_heap(v: &mut [Pair]) {
    let mut last = v.len();
    while last > 1 {
        last -= 1;
        let value = v[last];
        v[last] = v[0];
        adjust_heap(&mut v[..last], 0, value);
    }
}

/// `__adjust_heap(first, hole, len, value)` followed by `__push_heap`.
fn adjust_heap(v: &mut [Pair], mut hole: usize, value: Pair) {
    let len = v.len();
    let top = hole;
    let mut child = hole;
    while child < (len.saturating_sub(1)) / 2 {
        child = 2 * (child + 1);
        if less(v[child], v[child - 1]) {
            child -= 1;
        }
        v[hole] = v[child];
        hole = child;
    }
    if len & 1 == 0 && len >= 2 && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        v[hole] = v[child - 1];
        hole = child - 1;
    }
    // `__push_heap(first, hole, top, value)`.
    let mut parent = hole.wrapping_sub(1) / 2;
    while hole > top && less(v[parent], value) {
        v[hole] = v[parent];
        hole = parent;
        parent = hole.wrapping_sub(1) / 2;
    }
    v[hole] = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tie-heavy magnitudes: a few distinct values, like bfloat16-rounded ones, and a
    /// few NaNs and negative zeros.
    fn ties(n: usize, seed: u64, order: Order) -> Vec<Pair> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let x = match (s >> 33) % 101 {
                    0 => f32::NAN,
                    1 => -0.0,
                    r => (r % 7) as f32 * 0.25,
                };
                pair(x, i, order)
            })
            .collect()
    }

    fn set(v: &[Pair]) -> Vec<usize> {
        let mut s: Vec<usize> = v.iter().map(|&p| index(p)).collect();
        s.sort_unstable();
        s
    }

    #[test]
    fn keys_order_as_torch_compares() {
        let asc = |a: f32, b: f32| less(pair(a, 0, Order::Ascending), pair(b, 1, Order::Ascending));
        let desc =
            |a: f32, b: f32| less(pair(a, 0, Order::Descending), pair(b, 1, Order::Descending));
        assert!(asc(-1.0, 0.5) && asc(0.5, f32::INFINITY) && asc(f32::INFINITY, f32::NAN));
        assert!(desc(f32::NAN, 3.0) && desc(3.0, -2.0));
        assert!(!asc(-0.0, 0.0) && !asc(0.0, -0.0) && !asc(f32::NAN, -f32::NAN));
        assert_eq!(index(pair(1.0, 123_456, Order::Descending)), 123_456);
    }

    #[test]
    fn the_masked_partition_makes_the_scalar_ones_swaps() {
        for n in [
            66,
            100,
            258,
            300,
            1000,
            4097,
            20000,
            PARALLEL,
            300_000,
            1 << 20,
        ] {
            for seed in 0..if n > 20000 { 4 } else { 20 } {
                let mut a = ties(n, seed * 31 + n as u64, Order::Descending);
                let first = (seed % 3) as usize * 5;
                median_to_first(&mut a, first, n);
                let mut b = a.clone();
                let cut_masked = partition_masked(&mut a, first, n);
                let cut_scalar = partition_scalar(&mut b, first, n);
                assert_eq!(cut_masked, cut_scalar, "n {n} seed {seed}");
                assert_eq!(a, b, "n {n} seed {seed}");
            }
        }
    }

    #[test]
    fn sorts_and_permutes() {
        for n in [0, 1, 2, 3, 16, 17, 100, 1000, 5000] {
            for order in [Order::Ascending, Order::Descending] {
                let mut v = ties(n, n as u64, order);
                sort(&mut v);
                assert!(v.windows(2).all(|w| !less(w[1], w[0])));
                assert_eq!(set(&v), (0..n).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn places_are_the_full_sorts_positions() {
        for n in [0, 1, 2, 16, 17, 100, 1000, 4096, 14336] {
            for order in [Order::Ascending, Order::Descending] {
                let mut full = ties(n, 11 + n as u64, order);
                let mut part = full.clone();
                sort(&mut full);
                let (mut keys, mut places) = (Vec::new(), Vec::new());
                sort_places(&mut part, &mut keys, &mut places);
                let mut placed = vec![0; n];
                for (&p, &at) in part.iter().zip(&places) {
                    placed[at as usize] = p;
                }
                assert_eq!(placed, full, "n {n}");
            }
        }
    }

    #[test]
    fn selection_keeps_what_the_full_sort_keeps() {
        for n in [17, 50, 333, 4096, 20000] {
            for order in [Order::Ascending, Order::Descending] {
                let mut full = ties(n, 7 + n as u64, order);
                let bounds = [n / 3, n / 3 + n / 4, n - 1];
                let mut part = full.clone();
                sort(&mut full);
                select(&mut part, &bounds);
                for b in bounds {
                    assert_eq!(set(&part[..b]), set(&full[..b]), "n {n} bound {b}");
                }
            }
        }
    }

    #[test]
    fn topk_is_the_sorts_prefix_in_value() {
        for (n, k) in [(1000, 10), (1000, 500), (64, 1), (5000, 4999)] {
            let mut v = ties(n, 3, Order::Descending);
            let mut s = v.clone();
            sort(&mut s);
            let mut got: Vec<u32> = topk_set(&mut v, k).iter().map(|&p| key(p)).collect();
            got.sort_unstable();
            let mut want: Vec<u32> = s[..k].iter().map(|&p| key(p)).collect();
            want.sort_unstable();
            assert_eq!(got, want);
        }
    }
}
