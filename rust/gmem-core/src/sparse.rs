//! A sparse array: fixed chunks of 512 entries allocated on first non-default store and
//! released when they return to all-default. Memory follows what is touched, never the
//! size of the index space (a guest_memfd may be 2^51 pages long). Where the chunks live is
//! a [`ChunkStore`]: a hash map ([`Hashed`], the default: page caches, mappings) or
//! segments of 512 chunks in place ([`Dense`]: host frame contents, looked up on every read
//! and prefetched ahead by `apply`).

use rustc_hash::FxHashMap;

/// Entries per chunk: one 2 MiB huge page worth of 4 KiB pages.
pub const CHUNK: u64 = 512;

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
    /// Approximate heap bytes held.
    fn heap_bytes(&self) -> usize;
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
    fn heap_bytes(&self) -> usize {
        self.0.len() * (CHUNK as usize * std::mem::size_of::<T>() + 32)
    }
}

/// Chunk keys per segment of a [`Dense`] store (a segment covers 2^18 indices: 1 GiB of
/// frames).
const SEG_KEYS: usize = 512;
/// Entries per segment.
const SEG_LEN: u64 = SEG_KEYS as u64 * CHUNK;
/// Chunk keys a [`Dense`] store takes (indices below 2^32: host frames are below 2^31).
const DENSE_KEYS: u64 = (1 << 32) / CHUNK;

/// One segment of a [`Dense`] store: the entries of its `SEG_KEYS` chunks in place, which
/// chunks are held, and the live count of each.
#[derive(Debug, Clone)]
struct Seg<T> {
    data: Box<[T]>,
    live: Box<[u32]>,
    held: [u64; SEG_KEYS / 64],
    count: u32,
}

impl<T: Copy + Default> Seg<T> {
    fn new() -> Self {
        Self {
            data: vec![T::default(); SEG_LEN as usize].into(),
            live: vec![0; SEG_KEYS].into(),
            held: [0; SEG_KEYS / 64],
            count: 0,
        }
    }
}

impl<T> Seg<T> {
    #[inline]
    fn holds(&self, i: usize) -> bool {
        self.held[i / 64] >> (i % 64) & 1 == 1
    }
}

/// Chunks in place in segments of 512 (2^18 indices, 1 GiB of frames), by key: an entry
/// is found from its index by arithmetic and one load from a table of segments that stays
/// in L1 (64 segments for 2^24 frames), so `apply` can prefetch an entry and read it
/// without walking an index. For a dense, bounded index space (host frames, below 2^31,
/// which the buddy allocator hands out lowest first): memory follows the 2^18-index
/// regions holding a live chunk (a segment is allocated when its first chunk is held and
/// freed when its last is released), not the size of the space. Keys from 2^23 up
/// (indices from 2^32) are refused.
///
/// Measured against the previous store (chunks in an arena behind pages of chunk numbers),
/// `drive goal 24 100000 7 scattered`: random reads of mapped pages ~5 ns faster (the
/// page of chunk numbers, an L2 line, was on the path to every content prefetch).
#[derive(Debug, Clone)]
pub struct Dense<T> {
    /// Segment `key / SEG_KEYS`, grown to the highest segment held.
    segs: Vec<Option<Seg<T>>>,
    held: usize,
}

impl<T> Default for Dense<T> {
    fn default() -> Self {
        Self {
            segs: Vec::new(),
            held: 0,
        }
    }
}

impl<T> Dense<T> {
    /// (segment, chunk in segment) of `key`, if in range.
    #[inline]
    fn split(key: u64) -> Option<(usize, usize)> {
        (key < DENSE_KEYS).then(|| {
            (
                (key / SEG_KEYS as u64) as usize,
                (key % SEG_KEYS as u64) as usize,
            )
        })
    }

    #[inline]
    fn seg(&self, s: usize) -> Option<&Seg<T>> {
        self.segs.get(s)?.as_ref()
    }
}

impl<T: Copy + Default + PartialEq> ChunkStore<T> for Dense<T> {
    #[inline]
    fn get(&self, key: u64) -> Option<&[T]> {
        let (s, i) = Self::split(key)?;
        let seg = self.seg(s)?;
        seg.holds(i)
            .then(|| &seg.data[i * CHUNK as usize..(i + 1) * CHUNK as usize])
    }
    /// Entry `idx` if its segment is held: a chunk not held inside it reads as default,
    /// as it is (a chunk is released only once all-default, or cleared on release).
    #[allow(clippy::inline_always)] // on every read; left to the inliner it stays a call
    #[inline(always)]
    fn entry(&self, idx: u64) -> Option<&T> {
        let seg = self
            .segs
            .get(usize::try_from(idx / SEG_LEN).ok()?)?
            .as_ref()?;
        Some(&seg.data[(idx % SEG_LEN) as usize])
    }
    #[inline]
    fn get_mut(&mut self, key: u64) -> Option<ChunkMut<'_, T>> {
        let (s, i) = Self::split(key)?;
        let seg = self.segs.get_mut(s)?.as_mut()?;
        seg.holds(i).then(|| ChunkMut {
            live: &mut seg.live[i],
            data: &mut seg.data[i * CHUNK as usize..(i + 1) * CHUNK as usize],
        })
    }
    fn get_or_insert(&mut self, key: u64) -> ChunkMut<'_, T> {
        let (s, i) = Self::split(key).expect("dense chunk key below 2^23");
        if s >= self.segs.len() {
            self.segs.resize_with(s + 1, || None);
        }
        let seg = self.segs[s].get_or_insert_with(Seg::new);
        if !seg.holds(i) {
            seg.held[i / 64] |= 1 << (i % 64);
            seg.count += 1;
            self.held += 1;
        }
        ChunkMut {
            live: &mut seg.live[i],
            data: &mut seg.data[i * CHUNK as usize..(i + 1) * CHUNK as usize],
        }
    }
    fn remove(&mut self, key: u64) -> Option<u32> {
        let (s, i) = Self::split(key)?;
        let seg = self.segs.get_mut(s)?.as_mut()?;
        if !seg.holds(i) {
            return None;
        }
        let live = std::mem::take(&mut seg.live[i]);
        if live != 0 {
            seg.data[i * CHUNK as usize..(i + 1) * CHUNK as usize].fill(T::default());
        }
        seg.held[i / 64] &= !(1 << (i % 64));
        seg.count -= 1;
        self.held -= 1;
        if seg.count == 0 {
            self.segs[s] = None;
            while self.segs.last().is_some_and(Option::is_none) {
                self.segs.pop();
            }
        }
        Some(live)
    }
    fn len(&self) -> usize {
        self.held
    }
    fn keys_in(&self, k0: u64, k1: u64) -> Vec<u64> {
        // Only the segments overlapping [k0, k1], and in them only the chunks inside it.
        let mut out = Vec::new();
        let per = SEG_KEYS as u64;
        let last = (self.segs.len() as u64).min(k1 / per + 1);
        for s in k0 / per..last {
            let Some(seg) = &self.segs[s as usize] else {
                continue;
            };
            let base = s * per;
            let lo = k0.saturating_sub(base);
            let hi = (k1 - base).min(per - 1);
            for i in lo..=hi {
                if seg.holds(i as usize) {
                    out.push(base + i);
                }
            }
        }
        out
    }
    fn shape_ok(&self) -> bool {
        let mut held = 0;
        for seg in self.segs.iter().flatten() {
            let n: u32 = seg.held.iter().map(|w| w.count_ones()).sum();
            if seg.data.len() != SEG_LEN as usize
                || seg.live.len() != SEG_KEYS
                || n != seg.count
                || n == 0
            {
                return false;
            }
            // A chunk not held is all default and counts no live entry; a held one counts
            // exactly its non-default entries.
            for (i, chunk) in seg.data.chunks(CHUNK as usize).enumerate() {
                let live = chunk.iter().filter(|&&v| v != T::default()).count();
                // (A chunk is held only while it holds a live entry.)
                let want = if seg.holds(i) {
                    seg.live[i] as usize
                } else {
                    0
                };
                if live != want || seg.live[i] as usize != want || (seg.holds(i) && want == 0) {
                    return false;
                }
            }
            held += n as usize;
        }
        held == self.held && !matches!(self.segs.last(), Some(None))
    }
    fn heap_bytes(&self) -> usize {
        self.segs.iter().flatten().count() * Self::segment_bytes()
            + self.segs.len() * Self::segment_slot_bytes()
    }
}

impl<T> Dense<T> {
    /// Heap bytes of one segment (entries and live counts).
    pub const fn segment_bytes() -> usize {
        SEG_LEN as usize * std::mem::size_of::<T>() + SEG_KEYS * 4
    }

    /// Bytes of one slot of the segment table (held or not, up to the highest held).
    pub const fn segment_slot_bytes() -> usize {
        std::mem::size_of::<Option<Seg<T>>>()
    }
}

/// A [`Dense`] store in a snapshot: its held chunks as `(key, live count, entries)`, in key
/// order (segments are not written whole).
type DenseRepr<T> = Vec<(u64, u32, Vec<T>)>;

impl<T: Copy + Default + PartialEq + serde::Serialize> serde::Serialize for Dense<T> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        let chunks: DenseRepr<T> = self
            .keys_in(0, DENSE_KEYS - 1)
            .into_iter()
            .map(|k| {
                let (s, i) = Self::split(k).expect("a held key");
                let seg = self.seg(s).expect("a held segment");
                (k, seg.live[i], self.get(k).expect("a held chunk").to_vec())
            })
            .collect();
        chunks.serialize(ser)
    }
}

impl<'de, T: Copy + Default + PartialEq + serde::Deserialize<'de>> serde::Deserialize<'de>
    for Dense<T>
{
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let chunks = DenseRepr::<T>::deserialize(de)?;
        let mut d = Self::default();
        for (key, live, data) in chunks {
            if Self::split(key).is_none() || data.len() != CHUNK as usize || d.get(key).is_some() {
                return Err(D::Error::custom(format!("dense chunk {key:#x} misshapen")));
            }
            let c = d.get_or_insert(key);
            c.data.copy_from_slice(&data);
            *c.live = live;
        }
        Ok(d)
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
        self.chunks.heap_bytes()
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
