//! A pool of large byte buffers, so gigabytes moving through the pipeline reuse the same
//! pages instead of paying for fresh zeroed pages (a page fault per 4 KiB) on every task.
//!
//! Buffers are handed out as plain `Vec<u8>`s and come back when the [`Bytes`] made from
//! them is dropped. The pool keeps at most `keep` bytes of idle buffers; memory in use is
//! bounded by the executor's memory budget, not here.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Buffers smaller than this come from the allocator directly.
const MIN_POOLED: usize = 1 << 20;

#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl BufferPool {
    pub fn new(keep: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            free: Mutex::new(Vec::new()),
            keep,
        })
    }

    /// A buffer of exactly `len` bytes, contents unspecified (callers overwrite it all).
    pub fn get(&self, len: usize) -> Vec<u8> {
        if len >= MIN_POOLED {
            let mut free = self.free.lock().expect("buffer pool");
            // Smallest idle buffer that fits without wasting more than half of it.
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= len && b.len() / 2 <= len)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            if let Some(i) = best {
                let mut b = free.swap_remove(i);
                b.truncate(len);
                return b;
            }
        }
        vec![0u8; len]
    }

    /// Wrap a buffer as [`Bytes`] that returns it to the pool when dropped.
    pub fn freeze(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        if buf.capacity() < MIN_POOLED {
            return Bytes::from(buf);
        }
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }

    fn put(&self, mut buf: Vec<u8>) {
        // Restore the full (initialised) length so a later `get` can hand it out again.
        let cap = buf.capacity();
        if buf.len() < cap {
            buf.resize(cap, 0);
        }
        let mut free = self.free.lock().expect("buffer pool");
        let idle: usize = free.iter().map(Vec::len).sum();
        if idle + cap <= self.keep {
            free.push(buf);
        }
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back() {
        let pool = BufferPool::new(64 << 20);
        let mut b = pool.get(4 << 20);
        b[0] = 7;
        let ptr = b.as_ptr();
        let bytes = pool.freeze(b);
        assert_eq!(bytes.len(), 4 << 20);
        drop(bytes);
        let again = pool.get(3 << 20);
        assert_eq!(again.as_ptr(), ptr, "reused");
        assert_eq!(again.len(), 3 << 20);
        // too small a request does not take a big buffer
        let big = pool.freeze(pool.get(8 << 20));
        drop(big);
        assert_eq!(pool.get(2 << 20).len(), 2 << 20);
        assert_eq!(pool.free.lock().unwrap().len(), 1);
    }

    #[test]
    fn idle_bytes_are_capped() {
        let pool = BufferPool::new(5 << 20);
        let a = pool.freeze(pool.get(4 << 20));
        let b = pool.freeze(pool.get(4 << 20));
        drop(a);
        drop(b);
        assert_eq!(pool.free.lock().unwrap().len(), 1);
    }
}
