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
//! in expected linear time.

/// An element: its value (a magnitude) and its index in the tensor.
pub type Pair = (f32, u32);

/// The order torch asks for. NaN sorts last ascending and first descending, as torch's
/// comparators put it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Ascending,
    Descending,
}

impl Order {
    #[inline(always)]
    fn less(self, a: f32, b: f32) -> bool {
        match self {
            Order::Ascending => (!a.is_nan() && b.is_nan()) || a < b,
            Order::Descending => (a.is_nan() && !b.is_nan()) || a > b,
        }
    }
}

const THRESHOLD: usize = 16;

fn lg(n: usize) -> usize {
    (usize::BITS - 1 - n.leading_zeros()) as usize
}

/// `std::sort(v, comp)`.
pub fn sort(v: &mut [Pair], order: Order) {
    if v.len() > 1 {
        introsort_loop(v, 0, v.len(), 2 * lg(v.len()), order, &[]);
        final_insertion_sort(v, order);
    }
}

/// The elements `std::sort` would place before each of `bounds`: afterwards, for every
/// bound `b`, `v[..b]` holds the same elements as after a full sort (in another order).
pub fn select(v: &mut [Pair], order: Order, bounds: &[usize]) {
    let n = v.len();
    let inner: Vec<usize> = bounds.iter().copied().filter(|&b| b > 0 && b < n).collect();
    if n > 1 && !inner.is_empty() {
        introsort_loop(v, 0, n, 2 * lg(n), order, &inner);
    }
}

/// `std::nth_element(v, v + nth, comp)`.
pub fn nth_element(v: &mut [Pair], nth: usize, order: Order) {
    let n = v.len();
    if n == 0 || nth >= n {
        return;
    }
    let (mut first, mut last) = (0, n);
    let mut depth = 2 * lg(n);
    while last - first > 3 {
        if depth == 0 {
            heap_select(&mut v[first..last], nth + 1 - first, order);
            v.swap(first, nth);
            return;
        }
        depth -= 1;
        let cut = partition_pivot(v, first, last, order);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(&mut v[first..last], order);
}

/// `std::partial_sort(v, v + middle, v + len, comp)`.
pub fn partial_sort(v: &mut [Pair], middle: usize, order: Order) {
    heap_select(v, middle, order);
    sort_heap(&mut v[..middle], order);
}

/// The indices `torch.topk(x, k, largest=True)` returns, as a set (in no useful order):
/// `partial_sort` when `k * 64 <= n`, else `nth_element` at `k - 1`.
pub fn topk_set(v: &mut [Pair], k: usize) -> &[Pair] {
    let order = Order::Descending;
    if k == 0 {
        return &v[..0];
    }
    if k * 64 <= v.len() {
        heap_select(v, k, order);
    } else {
        nth_element(v, k - 1, order);
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
    order: Order,
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
            heap_select(&mut v[first..last], last - first, order);
            sort_heap(&mut v[first..last], order);
            return;
        }
        depth -= 1;
        let cut = partition_pivot(v, first, last, order);
        introsort_loop(v, cut, last, depth, order, bounds);
        last = cut;
    }
    if selecting && straddles(first, last) {
        insertion_sort(&mut v[first..last], order);
    }
}

/// `__unguarded_partition_pivot`: the median of three moved to `first`, then Hoare's
/// partition of `first + 1..last` around it.
fn partition_pivot(v: &mut [Pair], first: usize, last: usize, order: Order) -> usize {
    let mid = first + (last - first) / 2;
    let (a, b, c) = (first + 1, mid, last - 1);
    let less = |i: usize, j: usize, v: &[Pair]| order.less(v[i].0, v[j].0);
    let m = if less(a, b, v) {
        if less(b, c, v) {
            b
        } else if less(a, c, v) {
            c
        } else {
            a
        }
    } else if less(a, c, v) {
        a
    } else if less(b, c, v) {
        c
    } else {
        b
    };
    v.swap(first, m);
    let pivot = v[first].0;
    let (mut lo, mut hi) = (first + 1, last);
    loop {
        while order.less(v[lo].0, pivot) {
            lo += 1;
        }
        hi -= 1;
        while order.less(pivot, v[hi].0) {
            hi -= 1;
        }
        if lo >= hi {
            return lo;
        }
        v.swap(lo, hi);
        lo += 1;
    }
}

/// `__final_insertion_sort`: an insertion sort of the first 16, then an unguarded one of
/// the rest; both are the plain (stable) insertion sort in effect.
fn final_insertion_sort(v: &mut [Pair], order: Order) {
    insertion_sort(v, order);
}

fn insertion_sort(v: &mut [Pair], order: Order) {
    for i in 1..v.len() {
        let val = v[i];
        let mut j = i;
        while j > 0 && order.less(val.0, v[j - 1].0) {
            v[j] = v[j - 1];
            j -= 1;
        }
        v[j] = val;
    }
}

/// `__heap_select(first, middle, last)`: a heap of the first `middle`, then every later
/// element that beats the heap's top replaces it.
fn heap_select(v: &mut [Pair], middle: usize, order: Order) {
    make_heap(&mut v[..middle], order);
    for i in middle..v.len() {
        if order.less(v[i].0, v[0].0) {
            // `__pop_heap(first, middle, i)`.
            let value = v[i];
            v[i] = v[0];
            adjust_heap(&mut v[..middle], 0, value, order);
        }
    }
}

fn make_heap(v: &mut [Pair], order: Order) {
    let len = v.len();
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let value = v[parent];
        adjust_heap(v, parent, value, order);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

fn sort_heap(v: &mut [Pair], order: Order) {
    let mut last = v.len();
    while last > 1 {
        last -= 1;
        let value = v[last];
        v[last] = v[0];
        adjust_heap(&mut v[..last], 0, value, order);
    }
}

/// `__adjust_heap(first, hole, len, value)` followed by `__push_heap`.
fn adjust_heap(v: &mut [Pair], mut hole: usize, value: Pair, order: Order) {
    let len = v.len();
    let top = hole;
    let mut child = hole;
    while child < (len.saturating_sub(1)) / 2 {
        child = 2 * (child + 1);
        if order.less(v[child].0, v[child - 1].0) {
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
    while hole > top && order.less(v[parent].0, value.0) {
        v[hole] = v[parent];
        hole = parent;
        parent = hole.wrapping_sub(1) / 2;
    }
    v[hole] = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tie-heavy magnitudes: a few distinct values, like bfloat16-rounded ones.
    fn ties(n: usize, seed: u64) -> Vec<Pair> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((s >> 33) % 7) as f32 * 0.25, i as u32)
            })
            .collect()
    }

    fn set(v: &[Pair]) -> Vec<u32> {
        let mut s: Vec<u32> = v.iter().map(|p| p.1).collect();
        s.sort_unstable();
        s
    }

    #[test]
    fn sorts_and_permutes() {
        for n in [0, 1, 2, 3, 16, 17, 100, 1000, 5000] {
            for order in [Order::Ascending, Order::Descending] {
                let mut v = ties(n, n as u64);
                sort(&mut v, order);
                assert!(v.windows(2).all(|w| !order.less(w[1].0, w[0].0)));
                assert_eq!(set(&v), (0..n as u32).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn selection_keeps_what_the_full_sort_keeps() {
        for n in [17, 50, 333, 4096, 20000] {
            for order in [Order::Ascending, Order::Descending] {
                let mut full = ties(n, 7 + n as u64);
                let bounds = [n / 3, n / 3 + n / 4, n - 1];
                let mut part = full.clone();
                sort(&mut full, order);
                select(&mut part, order, &bounds);
                for b in bounds {
                    assert_eq!(set(&part[..b]), set(&full[..b]), "n {n} bound {b}");
                }
            }
        }
    }

    #[test]
    fn topk_is_the_sorts_prefix_in_value() {
        for (n, k) in [(1000, 10), (1000, 500), (64, 1), (5000, 4999)] {
            let mut v = ties(n, 3);
            let mut s = v.clone();
            sort(&mut s, Order::Descending);
            let got = topk_set(&mut v, k).to_vec();
            let mut gv: Vec<f32> = got.iter().map(|p| p.0).collect();
            gv.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let want: Vec<f32> = s[..k].iter().map(|p| p.0).collect();
            assert_eq!(gv, want);
        }
    }
}
