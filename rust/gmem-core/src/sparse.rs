//! A sparse array: fixed chunks of 512 entries allocated on first non-default store and
//! released when they return to all-default. Memory follows what is touched, never the
//! size of the index space (a guest_memfd may be 2^51 pages long).

use rustc_hash::FxHashMap;

/// Entries per chunk: one 2 MiB huge page worth of 4 KiB pages.
pub const CHUNK: u64 = 512;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Chunk<T> {
    live: u32,
    data: Box<[T]>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SparseVec<T> {
    chunks: FxHashMap<u64, Chunk<T>>,
    live: u64,
}

impl<T: Copy + Default + PartialEq> Default for SparseVec<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + Default + PartialEq> SparseVec<T> {
    pub fn new() -> Self {
        Self {
            chunks: FxHashMap::default(),
            live: 0,
        }
    }

    #[inline]
    pub fn get(&self, idx: u64) -> T {
        match self.chunks.get(&(idx / CHUNK)) {
            Some(c) => c.data[(idx % CHUNK) as usize],
            None => T::default(),
        }
    }

    /// Hint the cache about `idx`'s entry (see `BitAttrMap::prefetch`).
    #[inline]
    pub fn prefetch(&self, idx: u64) {
        if let Some(c) = self.chunks.get(&(idx / CHUNK)) {
            mem_prefetch::prefetch_write_data::<_, 3>(&c.data[(idx % CHUNK) as usize]);
        }
    }

    /// Store `v` at `idx`, returning the previous value.
    #[inline]
    pub fn set(&mut self, idx: u64, v: T) -> T {
        let key = idx / CHUNK;
        let slot = (idx % CHUNK) as usize;
        let zero = T::default();
        if v == zero {
            let Some(c) = self.chunks.get_mut(&key) else {
                return zero;
            };
            let old = c.data[slot];
            if old != zero {
                c.data[slot] = zero;
                c.live -= 1;
                self.live -= 1;
                if c.live == 0 {
                    self.chunks.remove(&key);
                }
            }
            return old;
        }
        let c = self.chunks.entry(key).or_insert_with(|| Chunk {
            live: 0,
            data: vec![zero; CHUNK as usize].into(),
        });
        let old = c.data[slot];
        c.data[slot] = v;
        if old == zero {
            c.live += 1;
            self.live += 1;
        }
        old
    }

    /// Number of non-default entries.
    pub fn len(&self) -> u64 {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Chunk keys intersecting `[start, end)`, in order, found in O(min(chunks in range,
    /// chunks allocated)).
    fn chunk_keys(&self, start: u64, end: u64) -> Vec<u64> {
        if start >= end {
            return Vec::new();
        }
        let (k0, k1) = (start / CHUNK, (end - 1) / CHUNK);
        let span = k1 - k0 + 1;
        let mut keys: Vec<u64> = if span <= self.chunks.len() as u64 {
            (k0..=k1).filter(|k| self.chunks.contains_key(k)).collect()
        } else {
            self.chunks
                .keys()
                .copied()
                .filter(|k| (k0..=k1).contains(k))
                .collect()
        };
        keys.sort_unstable();
        keys
    }

    /// The non-default entries in `[start, end)`, in index order.
    pub fn entries(&self, start: u64, end: u64) -> Vec<(u64, T)> {
        let mut out = Vec::new();
        let zero = T::default();
        for key in self.chunk_keys(start, end) {
            let c = &self.chunks[&key];
            let base = key * CHUNK;
            let lo = start.max(base) - base;
            let hi = end.min(base.saturating_add(CHUNK)) - base;
            for i in lo..hi {
                let v = c.data[i as usize];
                if v != zero {
                    out.push((base + i, v));
                }
            }
        }
        out
    }

    /// Reset `[start, end)` to default, dropping whole chunks where the range covers them:
    /// O(chunks touched), not O(indices).
    pub fn clear_range(&mut self, start: u64, end: u64) {
        for key in self.chunk_keys(start, end) {
            let base = key * CHUNK;
            if start <= base && base.checked_add(CHUNK).is_some_and(|e| end >= e) {
                let c = self.chunks.remove(&key).expect("key from chunk_keys");
                self.live -= u64::from(c.live);
            } else {
                for i in start.max(base)..end.min(base.saturating_add(CHUNK)) {
                    self.set(i, T::default());
                }
            }
        }
    }

    /// Every non-default entry, in index order (index `u64::MAX` included).
    pub fn all(&self) -> Vec<(u64, T)> {
        let mut keys: Vec<u64> = self.chunks.keys().copied().collect();
        keys.sort_unstable();
        let zero = T::default();
        let mut out = Vec::with_capacity(self.live as usize);
        for key in keys {
            let base = key * CHUNK;
            for (i, &v) in self.chunks[&key].data.iter().enumerate() {
                if v != zero {
                    out.push((base + i as u64, v));
                }
            }
        }
        out
    }

    /// Approximate heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.chunks.len() * (CHUNK as usize * std::mem::size_of::<T>() + 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_set_get_release() {
        let mut v: SparseVec<u32> = SparseVec::new();
        assert_eq!(v.get(1 << 50), 0);
        v.set(1 << 50, 7);
        v.set(3, 9);
        assert_eq!(v.get(1 << 50), 7);
        assert_eq!(v.len(), 2);
        assert_eq!(v.entries(0, u64::MAX), vec![(3, 9), (1 << 50, 7)]);
        assert_eq!(v.entries(4, 1 << 50), vec![]);
        v.set(3, 0);
        v.set(1 << 50, 0);
        assert!(v.is_empty());
        assert_eq!(v.heap_bytes(), 0);
    }
}
