//! A sparse array: fixed chunks of 512 entries allocated on first non-default store and
//! released when they return to all-default. Memory follows what is touched, never the
//! size of the index space (a guest_memfd may be 2^51 pages long). Where the chunks live is
//! a [`ChunkStore`]: a hash map ([`Hashed`], the default: page caches, mappings) or a
//! two-level array ([`Dense`]: host frame contents, looked up on every read and prefetched
//! ahead by `apply`).

use rustc_hash::FxHashMap;

use crate::arena::{BLOCK, BlockArena};
use crate::pagedir::{self, PageDir};

/// Entries per chunk: one 2 MiB huge page worth of 4 KiB pages.
pub const CHUNK: u64 = 512;

// A chunk of a [`Dense`] store is one block of its arena.
const _: () = assert!(BLOCK as u64 == CHUNK);

/// One chunk of a [`Hashed`] store: `CHUNK` entries and how many of them are not the
/// default.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Chunk<T> {
    live: u32,
    data: Box<[T]>,
}

/// A chunk as a store lends it out for writing: its count of non-default entries and its
/// `CHUNK` entries.
pub struct ChunkMut<'a, T> {
    pub live: &'a mut u32,
    pub data: &'a mut [T],
}

/// Where a [`SparseVec`] keeps its chunks, by chunk key (`index / CHUNK`).
pub trait ChunkStore<T>: Default {
    /// The `CHUNK` entries of chunk `key`, if held.
    fn get(&self, key: u64) -> Option<&[T]>;
    /// Entry `idx` (of chunk `idx / CHUNK`), if its chunk is held.
    #[inline]
    fn entry(&self, idx: u64) -> Option<&T> {
        self.get(idx / CHUNK).map(|c| &c[(idx % CHUNK) as usize])
    }
    fn get_mut(&mut self, key: u64) -> Option<ChunkMut<'_, T>>;
    /// Chunk `key`, created all-default (with a live count of 0) if absent.
    fn get_or_insert(&mut self, key: u64) -> ChunkMut<'_, T>;
    /// Drop chunk `key`; returns its live count, if it was held.
    fn remove(&mut self, key: u64) -> Option<u32>;
    /// Chunks held.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Keys held in `[k0, k1]`, in order, in O(min(k1 - k0, chunks held)).
    fn keys_in(&self, k0: u64, k1: u64) -> Vec<u64>;
    /// Whether the store's internal indices are in bounds and consistent (for a store
    /// read from a snapshot, before anything indexes through it).
    fn shape_ok(&self) -> bool;
}

/// Chunks in a hash map: for index spaces far larger than what is touched (a guest_memfd
/// may be 2^51 pages long).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Hashed<T>(FxHashMap<u64, Chunk<T>>);

impl<T> Default for Hashed<T> {
    fn default() -> Self {
        Self(FxHashMap::default())
    }
}

impl<T: Copy + Default> ChunkStore<T> for Hashed<T> {
    #[inline]
    fn get(&self, key: u64) -> Option<&[T]> {
        self.0.get(&key).map(|c| &*c.data)
    }
    #[inline]
    fn get_mut(&mut self, key: u64) -> Option<ChunkMut<'_, T>> {
        self.0.get_mut(&key).map(|c| ChunkMut {
            live: &mut c.live,
            data: &mut c.data,
        })
    }
    #[inline]
    fn get_or_insert(&mut self, key: u64) -> ChunkMut<'_, T> {
        let c = self.0.entry(key).or_insert_with(|| Chunk {
            live: 0,
            data: vec![T::default(); CHUNK as usize].into(),
        });
        ChunkMut {
            live: &mut c.live,
            data: &mut c.data,
        }
    }
    fn remove(&mut self, key: u64) -> Option<u32> {
        self.0.remove(&key).map(|c| c.live)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn keys_in(&self, k0: u64, k1: u64) -> Vec<u64> {
        let mut keys: Vec<u64> = if k1 - k0 < self.0.len() as u64 {
            (k0..=k1).filter(|k| self.0.contains_key(k)).collect()
        } else {
            self.0
                .keys()
                .copied()
                .filter(|k| (k0..=k1).contains(k))
                .collect()
        };
        keys.sort_unstable();
        keys
    }
    fn shape_ok(&self) -> bool {
        self.0.values().all(|c| c.data.len() == CHUNK as usize)
    }
}

/// Chunk keys per page of a [`Dense`] directory (a page covers 2^18 indices: 1 GiB of
/// frames or of file pages).
const PAGE_KEYS: usize = pagedir::ENTRIES;

/// Chunks in a [`BlockArena`] found through a two-level [`PageDir`] indexed by key: pages
/// of 512 chunk numbers (2 KiB, allocated on first use), in an array below 2^31 indices
/// and a hash map above. For index spaces touched densely (host frames, the content of a
/// guest_memfd's pages): a lookup is two loads from small arrays that stay cached (64 KiB
/// of pages for 2^24 indices) and the entry itself, found by arithmetic from the chunk
/// number, so `apply` can prefetch an entry without a miss first. Memory follows the
/// 2^18-index regions touched and the most chunks ever held at once (a freed chunk is
/// reused), not the size of the space.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Dense<T> {
    /// Pages of chunk number + 1 (0: no chunk), by `key / PAGE_KEYS`.
    dir: PageDir,
    arena: BlockArena<T>,
    /// Live count of each chunk number.
    live: Vec<u32>,
    held: usize,
}

impl<T> Default for Dense<T> {
    fn default() -> Self {
        Self {
            dir: PageDir::default(),
            arena: BlockArena::default(),
            live: Vec::new(),
            held: 0,
        }
    }
}

impl<T> Dense<T> {
    /// (page, slot) of `key`.
    #[inline]
    fn split(key: u64) -> (u64, usize) {
        (key / PAGE_KEYS as u64, (key % PAGE_KEYS as u64) as usize)
    }

    /// The chunk number of `key`, if held.
    #[inline]
    fn number(&self, key: u64) -> Option<u32> {
        let (p, i) = Self::split(key);
        let c = self.dir.get(p)?[i];
        (c != 0).then(|| c - 1)
    }
}

impl<T: Copy + Default> Dense<T> {
    #[inline]
    fn chunk_mut(&mut self, c: u32) -> ChunkMut<'_, T> {
        ChunkMut {
            live: &mut self.live[c as usize],
            data: self.arena.block_mut(c),
        }
    }
}

impl<T: Copy + Default> ChunkStore<T> for Dense<T> {
    #[inline]
    fn get(&self, key: u64) -> Option<&[T]> {
        self.number(key).map(|c| self.arena.block(c))
    }
    #[allow(clippy::inline_always)] // on every read; left to the inliner it stays a call
    #[inline(always)]
    fn entry(&self, idx: u64) -> Option<&T> {
        let c = self.number(idx / CHUNK)?;
        Some(self.arena.entry(c, (idx % CHUNK) as usize))
    }
    #[inline]
    fn get_mut(&mut self, key: u64) -> Option<ChunkMut<'_, T>> {
        self.number(key).map(|c| self.chunk_mut(c))
    }
    fn get_or_insert(&mut self, key: u64) -> ChunkMut<'_, T> {
        if let Some(c) = self.number(key) {
            return self.chunk_mut(c);
        }
        let (p, i) = Self::split(key);
        let c = self.arena.alloc();
        if c as usize == self.live.len() {
            self.live.push(0);
        } else {
            // A reused chunk: clear what it held.
            self.live[c as usize] = 0;
            self.arena.block_mut(c).fill(T::default());
        }
        let page = self.dir.get_or_insert(p);
        page[i] = c.checked_add(1).expect("fewer than 2^32 - 1 chunks");
        self.held += 1;
        self.chunk_mut(c)
    }
    fn remove(&mut self, key: u64) -> Option<u32> {
        let (p, i) = Self::split(key);
        let page = self.dir.get_mut(p)?;
        let c = std::mem::take(&mut page[i]);
        if c == 0 {
            return None;
        }
        if page.iter().all(|&c| c == 0) {
            self.dir.remove(p);
        }
        self.held -= 1;
        self.arena.release(c - 1);
        Some(self.live[c as usize - 1])
    }
    fn len(&self) -> usize {
        self.held
    }
    fn keys_in(&self, k0: u64, k1: u64) -> Vec<u64> {
        // Only the pages overlapping [k0, k1] (probed, or filtered from those held when
        // fewer), and in them only the slots inside it.
        let per = PAGE_KEYS as u64;
        let (p0, p1) = (k0 / per, k1 / per);
        let mut pages: Vec<(u64, &[u32])> = if p1 - p0 < self.dir.span() as u64 {
            (p0..=p1)
                .filter_map(|p| self.dir.get(p).map(|e| (p, e)))
                .collect()
        } else {
            self.dir
                .iter()
                .filter(|(p, _)| (p0..=p1).contains(p))
                .collect()
        };
        pages.sort_unstable_by_key(|(p, _)| *p);
        let mut out = Vec::new();
        for (p, page) in pages {
            let base = p * per;
            let lo = k0.saturating_sub(base);
            let hi = (k1 - base).min(per - 1);
            for i in lo..=hi {
                if page[i as usize] != 0 {
                    out.push(base + i);
                }
            }
        }
        out
    }
    fn shape_ok(&self) -> bool {
        let n = self.arena.len() as usize;
        if !self.arena.shape_ok() || self.live.len() != n {
            return false;
        }
        // Every chunk number is held by one key or free, never both.
        let mut seen = vec![false; n];
        let mut mark = |c: usize| c < n && !std::mem::replace(&mut seen[c], true);
        let mut held = 0;
        if !self.dir.trimmed() {
            return false;
        }
        for (_, page) in self.dir.iter() {
            if page.len() != PAGE_KEYS {
                return false;
            }
            for &c in page.iter().filter(|&&c| c != 0) {
                held += 1;
                if !mark(c as usize - 1) {
                    return false;
                }
            }
        }
        held == self.held
            && self.arena.free().iter().all(|&c| mark(c as usize))
            && held + self.arena.free().len() == n
    }
}

/// A sparse array: fixed chunks of 512 entries allocated on first non-default store and
/// released when they return to all-default, kept in a [`ChunkStore`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(bound(
    serialize = "T: serde::Serialize, S: serde::Serialize",
    deserialize = "T: serde::Deserialize<'de>, S: serde::Deserialize<'de>"
))]
pub struct SparseVec<T, S = Hashed<T>> {
    chunks: S,
    live: u64,
    #[serde(skip)]
    _t: std::marker::PhantomData<T>,
}

impl<T: Copy + Default + PartialEq, S: ChunkStore<T>> Default for SparseVec<T, S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + Default + PartialEq, S: ChunkStore<T>> SparseVec<T, S> {
    pub fn new() -> Self {
        Self {
            chunks: S::default(),
            live: 0,
            _t: std::marker::PhantomData,
        }
    }

    #[allow(clippy::inline_always)] // on every read; left to the inliner it stays a call
    #[inline(always)]
    pub fn get(&self, idx: u64) -> T {
        self.chunks.entry(idx).copied().unwrap_or_default()
    }

    /// Hint the cache about `idx`'s entry (see `BitAttrMap::prefetch`), non-temporally:
    /// the entry is read once, a few events later (see `Stage2::prefetch`).
    #[inline]
    pub fn prefetch(&self, idx: u64) {
        if let Some(e) = self.chunks.entry(idx) {
            mem_prefetch::prefetch_read_data::<_, 0>(e);
        }
    }

    /// Store `v` at `idx`, returning the previous value.
    #[inline]
    pub fn set(&mut self, idx: u64, v: T) -> T {
        let key = idx / CHUNK;
        let slot = (idx % CHUNK) as usize;
        let zero = T::default();
        if v == zero {
            let Some(c) = self.chunks.get_mut(key) else {
                return zero;
            };
            let old = c.data[slot];
            if old != zero {
                c.data[slot] = zero;
                *c.live -= 1;
                self.live -= 1;
                if *c.live == 0 {
                    self.chunks.remove(key);
                }
            }
            return old;
        }
        let c = self.chunks.get_or_insert(key);
        let old = c.data[slot];
        c.data[slot] = v;
        if old == zero {
            *c.live += 1;
            self.live += 1;
        }
        old
    }

    /// Store `f(i)` at every `i` of `[start, end)`: one chunk lookup per chunk, not per
    /// entry.
    pub fn fill_with(&mut self, start: u64, end: u64, mut f: impl FnMut(u64) -> T) {
        let zero = T::default();
        let mut idx = start;
        while idx < end {
            let key = idx / CHUNK;
            let base = key * CHUNK;
            let hi = end.min(base + CHUNK);
            let c = self.chunks.get_or_insert(key);
            let (mut gained, mut lost) = (0u32, 0u32);
            for i in idx..hi {
                let slot = &mut c.data[(i - base) as usize];
                let v = f(i);
                match (*slot == zero, v == zero) {
                    (true, false) => gained += 1,
                    (false, true) => lost += 1,
                    _ => {}
                }
                *slot = v;
            }
            *c.live = *c.live + gained - lost;
            let empty = *c.live == 0;
            self.live = self.live + u64::from(gained) - u64::from(lost);
            if empty {
                self.chunks.remove(key);
            }
            idx = hi;
        }
    }

    /// Whether every entry of `[start, end)` is the default: O(chunks in the range).
    pub fn is_default_in(&self, start: u64, end: u64) -> bool {
        let zero = T::default();
        self.chunk_keys(start, end).into_iter().all(|key| {
            let c = self.chunks.get(key).expect("key from chunk_keys");
            let base = key * CHUNK;
            let (lo, hi) = (
                start.max(base) - base,
                end.min(base.saturating_add(CHUNK)) - base,
            );
            c[lo as usize..hi as usize].iter().all(|v| *v == zero)
        })
    }

    /// The runs `[a, b)` of consecutive non-default entries in `[start, end)`, in order:
    /// O(chunks in the range × chunk length), one output entry per run, not per index.
    pub fn runs_in(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let zero = T::default();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for key in self.chunk_keys(start, end) {
            let c = self.chunks.get(key).expect("key from chunk_keys");
            let base = key * CHUNK;
            let lo = start.max(base) - base;
            let hi = end.min(base.saturating_add(CHUNK)) - base;
            let mut i = lo;
            while i < hi {
                if c[i as usize] == zero {
                    i += 1;
                    continue;
                }
                let a = i;
                while i < hi && c[i as usize] != zero {
                    i += 1;
                }
                match out.last_mut() {
                    Some(r) if r.1 == base + a => r.1 = base + i,
                    _ => out.push((base + a, base + i)),
                }
            }
        }
        out
    }

    /// Number of non-default entries in `[start, end)`: O(chunks in the range).
    pub fn count_in(&self, start: u64, end: u64) -> u64 {
        let zero = T::default();
        self.chunk_keys(start, end)
            .into_iter()
            .map(|key| {
                let c = self.chunks.get(key).expect("key from chunk_keys");
                let base = key * CHUNK;
                let lo = (start.max(base) - base) as usize;
                let hi = (end.min(base.saturating_add(CHUNK)) - base) as usize;
                c[lo..hi].iter().filter(|v| **v != zero).count() as u64
            })
            .sum()
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
        self.chunks.keys_in(start / CHUNK, (end - 1) / CHUNK)
    }

    /// The non-default entries in `[start, end)`, in index order.
    pub fn entries(&self, start: u64, end: u64) -> Vec<(u64, T)> {
        let mut out = Vec::new();
        let zero = T::default();
        for key in self.chunk_keys(start, end) {
            let c = self.chunks.get(key).expect("key from chunk_keys");
            let base = key * CHUNK;
            let lo = start.max(base) - base;
            let hi = end.min(base.saturating_add(CHUNK)) - base;
            for i in lo..hi {
                let v = c[i as usize];
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
                let live = self.chunks.remove(key).expect("key from chunk_keys");
                self.live -= u64::from(live);
            } else {
                for i in start.max(base)..end.min(base.saturating_add(CHUNK)) {
                    self.set(i, T::default());
                }
            }
        }
    }

    /// Every non-default entry, in index order (index `u64::MAX` included).
    pub fn all(&self) -> Vec<(u64, T)> {
        self.entries(0, u64::MAX)
            .into_iter()
            .chain((self.get(u64::MAX) != T::default()).then(|| (u64::MAX, self.get(u64::MAX))))
            .collect()
    }

    /// Whether the chunk store is consistent (see [`ChunkStore::shape_ok`]).
    pub fn shape_ok(&self) -> bool {
        self.chunks.shape_ok()
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
    fn runs_and_counts() {
        let mut v: SparseVec<u32> = SparseVec::new();
        for i in [3, 4, 5, 9, 510, 511, 512, 513, 2000] {
            v.set(i, 1);
        }
        assert_eq!(
            v.runs_in(0, 5000),
            vec![(3, 6), (9, 10), (510, 514), (2000, 2001)]
        );
        assert_eq!(v.runs_in(4, 511), vec![(4, 6), (9, 10), (510, 511)]);
        assert!(v.runs_in(6, 9).is_empty());
        assert_eq!(v.count_in(0, 5000), 9);
        assert_eq!(v.count_in(4, 512), 5);
        assert_eq!(v.count_in(514, 2000), 0);
    }

    #[test]
    fn fill_with_and_is_default_in() {
        let mut v: SparseVec<u32> = SparseVec::new();
        v.set(700, 5);
        v.fill_with(500, 1100, |i| i as u32 + 1);
        assert_eq!(v.len(), 600);
        assert_eq!(v.get(499), 0);
        assert_eq!(v.get(500), 501);
        assert_eq!(v.get(1099), 1100);
        assert!(v.is_default_in(0, 500) && v.is_default_in(1100, 5000));
        assert!(!v.is_default_in(0, 501));
        // Storing defaults releases what they empty.
        v.fill_with(500, 1100, |_| 0);
        assert!(v.is_empty());
        assert_eq!(v.heap_bytes(), 0);
        let mut d: SparseVec<u64, Dense<u64>> = SparseVec::new();
        d.fill_with(3, 2000, |_| 9);
        assert_eq!(d.entries(0, u64::MAX).len(), 1997);
        d.clear_range(0, 2000);
        assert!(d.is_empty());
    }

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
