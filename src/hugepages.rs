//! Large scratch buffers backed by transparent huge pages.
//!
//! The whole-tensor methods allocate several buffers the size of a tensor (task vectors,
//! sort pairs, masks) for every tensor; glibc serves each from a fresh mapping and frees it
//! back, so every 4 KiB page of every buffer costs a fault and a clearing on first touch:
//! on the real-size set that was 40% of a merge's CPU time. Asking for huge pages on such
//! mappings (`MADV_HUGEPAGE`, honoured where the kernel's THP mode is `madvise` or
//! `always`) makes those faults 512 times fewer. Only allocations of at least 32 MiB are
//! touched; everything else goes to the system allocator unchanged.

use std::alloc::{GlobalAlloc, Layout, System};

/// The system allocator, with huge pages asked for on large allocations.
pub struct HugePages;

const LARGE: usize = 32 << 20;
const HUGE: usize = 2 << 20;

unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        let p = unsafe { System.alloc(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        advise(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
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
    if !p.is_null() && size >= LARGE {
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
