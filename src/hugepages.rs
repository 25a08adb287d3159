//! Large scratch buffers: kept for the next tensor, and backed by transparent huge pages.
//!
//! The whole-tensor methods allocate several buffers the size of a tensor (task vectors,
//! sort pairs, masks) for every tensor; glibc serves each from a fresh mapping and unmaps
//! it when freed, so every page of every buffer costs the kernel a fault and a clearing
//! (on the 4 GB bench set, ties spent a third of its CPU time there; a first touch costs
//! this VM about 0.7 ns a byte, more than reading it). So a freed block of at least 1 MiB
//! is kept (masks and a partition's bit masks too: below 32 MiB glibc unmaps or trims
//! them just the same), and an allocation of exactly its size and alignment (the next
//! tensor of the same shape) takes it back. Memory stays what the plan counted: an
//! allocation of 1 MiB or more that no kept block fits first frees kept blocks of at least
//! its size (or all of them), so kept and live bytes together never exceed the most ever
//! live at once. New mappings of at least 32 MiB ask for huge pages (`MADV_HUGEPAGE`,
//! honoured where the kernel's THP mode is `madvise` or `always`), 512 times fewer faults.
//! Everything smaller than 1 MiB goes to the system allocator unchanged.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// The system allocator, with large blocks kept for reuse and backed by huge pages.
pub struct HugePages;

const LARGE: usize = 1 << 20;
/// Blocks at least this large ask for huge pages.
const ADVISE: usize = 32 << 20;
const HUGE: usize = 2 << 20;
/// Kept blocks at most (a tensor's buffers: the base, each model's mask, the pairs, the
/// partitions' bit masks, for a few tensors in flight).
const KEEP: usize = 64;

/// A freed large block: address, size, alignment.
type Block = (usize, usize, usize);

/// The kept blocks and how many there are (no allocation inside the allocator).
static KEPT: Mutex<([Block; KEEP], usize)> = Mutex::new(([(0, 0, 0); KEEP], 0));

/// A kept block of exactly `layout`, or none, after freeing kept blocks to make room.
fn take(layout: Layout) -> Option<*mut u8> {
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    let (blocks, len) = &mut *kept;
    let want = (layout.size(), layout.align());
    if let Some(i) = blocks[..*len].iter().position(|b| (b.1, b.2) == want) {
        let p = blocks[i].0;
        blocks[i] = blocks[*len - 1];
        *len -= 1;
        return Some(p as *mut u8);
    }
    // Free kept blocks, largest first, until as many bytes as the new block's are freed
    // (or none is left): kept plus live bytes never exceed the most ever live.
    let mut freed = 0;
    while freed < layout.size() && *len > 0 {
        let i = (0..*len)
            .max_by_key(|&i| blocks[i].1)
            .expect("a kept block");
        let (p, size, align) = blocks[i];
        blocks[i] = blocks[*len - 1];
        *len -= 1;
        freed += size;
        // SAFETY: each kept block came from `System` with exactly this layout and is
        // owned by no one.
        unsafe { System.dealloc(p as *mut u8, Layout::from_size_align_unchecked(size, align)) };
    }
    None
}

unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= LARGE {
            if let Some(p) = take(layout) {
                return p;
            }
        }
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= LARGE {
            if let Some(p) = take(layout) {
                // SAFETY: the block is `layout.size()` bytes, ours alone.
                unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
                return p;
            }
        }
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= LARGE {
            let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
            let (blocks, len) = &mut *kept;
            if *len < KEEP {
                blocks[*len] = (ptr as usize, layout.size(), layout.align());
                *len += 1;
                return;
            }
        }
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        advise(p, new_size);
        p
    }
}

/// `madvise(MADV_HUGEPAGE)` on the whole huge pages inside a large block; a hint only, so
/// its result is ignored.
fn advise(p: *mut u8, size: usize) {
    #[cfg(target_os = "linux")]
    if !p.is_null() && size >= ADVISE {
        let start = (p as usize).next_multiple_of(HUGE);
        let end = (p as usize + size) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside the block just allocated; the advice changes
            // no contents and no permissions.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (p, size);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The policy through the allocator's own entry points (the test binary's global
    /// allocator is the system's, so only this test touches the kept blocks).
    #[test]
    fn keeps_frees_and_bounds() {
        let mb = |n: usize| Layout::from_size_align(n << 20, 64).unwrap();
        let kept = || KEPT.lock().unwrap().1;
        // SAFETY: every block is freed once, with the layout it was allocated with, and
        // written only within its size.
        unsafe {
            // Below the threshold nothing is kept.
            let small = HugePages.alloc(Layout::from_size_align(4096, 8).unwrap());
            HugePages.dealloc(small, Layout::from_size_align(4096, 8).unwrap());
            assert_eq!(kept(), 0);
            // A freed block comes back for the same layout, zeroed when asked.
            let a = HugePages.alloc(mb(2));
            a.write_bytes(7, 2 << 20);
            HugePages.dealloc(a, mb(2));
            assert_eq!(kept(), 1);
            let b = HugePages.alloc_zeroed(mb(2));
            assert_eq!(a, b);
            assert_eq!(kept(), 0);
            assert!(std::slice::from_raw_parts(b, 2 << 20)
                .iter()
                .all(|&x| x == 0));
            // Another size frees kept blocks of at least its bytes before mapping its own.
            let c = HugePages.alloc(mb(1));
            HugePages.dealloc(b, mb(2));
            HugePages.dealloc(c, mb(1));
            assert_eq!(kept(), 2);
            let d = HugePages.alloc(mb(3));
            assert_eq!(kept(), 0, "2 + 1 MiB freed for 3 MiB");
            HugePages.dealloc(d, mb(3));
            let e = HugePages.alloc(mb(1));
            assert_eq!(kept(), 0, "the 3 MiB block freed for 1 MiB");
            HugePages.dealloc(e, mb(1));
            let f = HugePages.alloc(mb(1));
            assert_eq!(e, f);
            HugePages.dealloc(f, mb(1));
        }
    }
}
