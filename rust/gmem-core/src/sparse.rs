//! A sparse array: fixed chunks of 512 entries allocated on first non-default store and
//! released when they return to all-default. Memory follows what is touched, never the
//! size of the index space (a guest_memfd may be 2^51 pages long). Where the chunks live is
//! a [`ChunkStore`]: a hash map ([`Hashed`], the default: page caches, mappings) or a
//! two-level array ([`Dense`]: host frame contents, looked up on every read and prefetched
//! ahead by `apply`).

use rustc_hash::FxHashMap;
use smallvec::SmallVec;

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

/// What a [`SparseVec`] stores: a plain number. A run of consecutive values (the frames
/// of a 2 MiB run behind the pages of a file) is a start and a step of one.
pub trait Entry: Copy + Default + PartialEq {
    /// `self + i`, wrapping.
    #[must_use]
    fn plus(self, i: u64) -> Self;
    /// Whether `self + n` fits without wrapping.
    fn counts_to(self, n: u64) -> bool;
}

impl Entry for u32 {
    #[inline]
    #[allow(clippy::cast_possible_truncation)] // wrapping, as the sum does
    fn plus(self, i: u64) -> Self {
        self.wrapping_add(i as u32)
    }
    fn counts_to(self, n: u64) -> bool {
        u32::try_from(n).is_ok_and(|n| self.checked_add(n).is_some())
    }
}

impl Entry for u64 {
    #[inline]
    fn plus(self, i: u64) -> Self {
        self.wrapping_add(i)
    }
    fn counts_to(self, n: u64) -> bool {
        self.checked_add(n).is_some()
    }
}

/// A chunk as a store lends it out for reading: its `CHUNK` entries, the one value (never
/// the default) every entry of a uniform chunk holds, or the first value of a counting
/// chunk, whose entry `i` holds that value + `i` (never wrapping, so never the default).
#[derive(Clone, Copy)]
pub enum ChunkView<'a, T> {
    Entries(&'a [T]),
    Uniform(T),
    Counting(T),
}

impl<T: Entry> ChunkView<'_, T> {
    /// Entry `i`.
    #[inline]
    pub fn at(&self, i: usize) -> T {
        match self {
            Self::Entries(d) => d[i],
            Self::Uniform(v) => *v,
            Self::Counting(v) => v.plus(i as u64),
        }
    }
}

/// Where a [`SparseVec`] keeps its chunks, by chunk key (`index / CHUNK`).
pub trait ChunkStore<T>: Default {
    /// Chunk `key`, if held: its `CHUNK` entries, or the one value of a uniform or
    /// counting chunk.
    fn view(&self, key: u64) -> Option<ChunkView<'_, T>>;
    /// Entry `idx` (of chunk `idx / CHUNK`), if its chunk is held.
    fn entry(&self, idx: u64) -> Option<T>;
    /// Entry `idx` if its chunk is held as entries (not uniform): where a prefetch goes.
    fn stored_entry(&self, idx: u64) -> Option<&T>;
    /// Chunk `key` for writing, if held (a uniform chunk gets its entries back first).
    fn get_mut(&mut self, key: u64) -> Option<ChunkMut<'_, T>>;
    /// Chunk `key`, created all-default (with a live count of 0) if absent.
    fn get_or_insert(&mut self, key: u64) -> ChunkMut<'_, T>;
    /// Make chunk `key` hold `v` (not the default) at every entry, or with `counting`
    /// `v + i` at entry `i` (`v` must count to `v + CHUNK - 1` without wrapping), as one
    /// value rather than `CHUNK` entries, if the store can: returns the live count the
    /// chunk had (0 when absent), or `None` when the store keeps no such chunks.
    fn put_uniform(&mut self, _key: u64, _v: T, _counting: bool) -> Option<u32> {
        None
    }
    /// Drop chunk `key`; returns its live count, if it was held.
    fn remove(&mut self, key: u64) -> Option<u32>;
    /// Chunks held (uniform ones included).
    fn len(&self) -> usize;
    /// Chunks held as one value (uniform or counting).
    fn uniform_len(&self) -> usize {
        0
    }
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

impl<T: Entry> ChunkStore<T> for Hashed<T> {
    #[inline]
    fn view(&self, key: u64) -> Option<ChunkView<'_, T>> {
        self.0.get(&key).map(|c| ChunkView::Entries(&c.data))
    }
    #[inline]
    fn entry(&self, idx: u64) -> Option<T> {
        self.stored_entry(idx).copied()
    }
    #[inline]
    fn stored_entry(&self, idx: u64) -> Option<&T> {
        self.0
            .get(&(idx / CHUNK))
            .map(|c| &c.data[(idx % CHUNK) as usize])
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
///
/// A chunk whose entries all hold one value (a 2 MiB run of pages a guest access wrote
/// in one event), or count up by one from a value (the page cache entries of a 2 MiB run
/// of frames allocated in one step), can be held as that value alone
/// ([`ChunkStore::put_uniform`]): its directory entry names a slot of `uniform` instead
/// of an arena block, and it gets its entries back on its first write. A 1 TiB guest
/// written in 2 MiB runs keeps 16 bytes per run instead of 4 KiB, its page cache 12
/// bytes per run instead of 2 KiB.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Dense<T> {
    /// Pages of directory entries, by `key / PAGE_KEYS`: 0 no chunk; below `UNIFORM`,
    /// arena block number + 1; from `UNIFORM` up, `UNIFORM` + the slot of `uniform`, +
    /// `COUNTING` for a counting chunk.
    dir: PageDir,
    arena: BlockArena<T>,
    /// Live count of each block number.
    live: Vec<u32>,
    /// The value of each uniform chunk, the first value of each counting one, by slot
    /// (free slots hold stale values).
    uniform: Vec<T>,
    /// Free slots of `uniform`.
    uniform_free: Vec<u32>,
    held: usize,
}

/// Directory entries from this value up name uniform or counting chunks.
const UNIFORM: u32 = 1 << 31;
/// The bit of such an entry that makes its chunk counting; the bits below are the slot.
const COUNTING: u32 = 1 << 30;

/// The slot of `uniform` and whether the chunk counts, of directory entry `e >= UNIFORM`.
#[inline]
fn run_slot(e: u32) -> (usize, bool) {
    let u = e - UNIFORM;
    ((u & !COUNTING) as usize, u & COUNTING != 0)
}

impl<T> Default for Dense<T> {
    fn default() -> Self {
        Self {
            dir: PageDir::default(),
            arena: BlockArena::default(),
            live: Vec::new(),
            uniform: Vec::new(),
            uniform_free: Vec::new(),
            held: 0,
        }
    }
}

impl<T> Dense<T> {
    /// The directory entry of `key` (0: none).
    #[allow(clippy::inline_always)] // on every read
    #[inline(always)]
    fn dir_entry(&self, key: u64) -> u32 {
        self.dir.at(key)
    }

    /// Frees the uniform slot of directory entry `e >= UNIFORM`.
    fn free_uniform(&mut self, e: u32) {
        self.uniform_free.push(run_slot(e).0 as u32);
    }
}

impl<T: Entry> Dense<T> {
    #[inline]
    fn chunk_mut(&mut self, c: u32) -> ChunkMut<'_, T> {
        ChunkMut {
            live: &mut self.live[c as usize],
            data: self.arena.block_mut(c),
        }
    }

    /// A block for a new chunk of `key` holding `fill` at every entry (with `counting`,
    /// `fill + i` at entry `i`) with a live count of `live`; the directory entry of `key`
    /// names it. Returns the block number.
    fn new_block(&mut self, key: u64, fill: T, counting: bool, live: u32) -> u32 {
        let c = self.arena.alloc();
        assert!(c < UNIFORM - 1, "fewer than 2^31 - 1 chunks");
        // A new block holds defaults, a reused one what it held.
        let fresh = c as usize == self.live.len();
        if fresh {
            self.live.push(live);
        } else {
            self.live[c as usize] = live;
        }
        let b = self.arena.block_mut(c);
        if counting {
            for (i, x) in (0..).zip(b.iter_mut()) {
                *x = fill.plus(i);
            }
        } else if fill != T::default() || !fresh {
            b.fill(fill);
        }
        let (p, i) = pagedir::split(key);
        self.dir.get_or_insert(p)[i] = c + 1;
        c
    }

    /// The block of `key`, giving a uniform chunk its entries back first; `None` if
    /// `key` holds no chunk.
    fn block_of(&mut self, key: u64) -> Option<u32> {
        match self.dir_entry(key) {
            0 => None,
            e if e < UNIFORM => Some(e - 1),
            e => Some(self.expand(key, e)),
        }
    }

    /// Give the uniform or counting chunk `key` (directory entry `e`) its entries: a
    /// block, whose number it returns. Out of line: once per such chunk.
    #[cold]
    #[inline(never)]
    fn expand(&mut self, key: u64, e: u32) -> u32 {
        let (u, counting) = run_slot(e);
        let v = self.uniform[u];
        self.free_uniform(e);
        self.new_block(key, v, counting, CHUNK as u32)
    }
}

impl<T: Entry> ChunkStore<T> for Dense<T> {
    #[inline]
    fn view(&self, key: u64) -> Option<ChunkView<'_, T>> {
        match self.dir_entry(key) {
            0 => None,
            e if e < UNIFORM => Some(ChunkView::Entries(self.arena.block(e - 1))),
            e => {
                let (u, counting) = run_slot(e);
                let v = self.uniform[u];
                Some(if counting {
                    ChunkView::Counting(v)
                } else {
                    ChunkView::Uniform(v)
                })
            }
        }
    }
    #[allow(clippy::inline_always)] // on every read; left to the inliner it stays a call
    #[inline(always)]
    fn entry(&self, idx: u64) -> Option<T> {
        let e = self.dir_entry(idx / CHUNK);
        // One signed test on the way to a block entry, as the test for "none" was: the
        // uniform, counting and absent cases share the other branch.
        #[allow(clippy::cast_possible_wrap)]
        if (e as i32) > 0 {
            return Some(*self.arena.entry(e - 1, (idx % CHUNK) as usize));
        }
        // Absent (0 wraps to a slot, 2^31, past any held: slots stay below 2^30), uniform
        // (step 0) or counting (step 1).
        let u = e.wrapping_sub(UNIFORM);
        let v = *self.uniform.get((u & !COUNTING) as usize)?;
        Some(v.plus(u64::from(u >> 30) * (idx % CHUNK)))
    }
    #[allow(clippy::inline_always)] // on every prefetch; left to the inliner it stays a call
    #[inline(always)]
    fn stored_entry(&self, idx: u64) -> Option<&T> {
        let e = self.dir_entry(idx / CHUNK);
        #[allow(clippy::cast_possible_wrap)]
        ((e as i32) > 0).then(|| self.arena.entry(e - 1, (idx % CHUNK) as usize))
    }
    #[inline]
    fn get_mut(&mut self, key: u64) -> Option<ChunkMut<'_, T>> {
        self.block_of(key).map(|c| self.chunk_mut(c))
    }
    fn get_or_insert(&mut self, key: u64) -> ChunkMut<'_, T> {
        let c = if let Some(c) = self.block_of(key) {
            c
        } else {
            self.held += 1;
            self.new_block(key, T::default(), false, 0)
        };
        self.chunk_mut(c)
    }
    fn put_uniform(&mut self, key: u64, v: T, counting: bool) -> Option<u32> {
        debug_assert!(v != T::default() && (!counting || v.counts_to(CHUNK - 1)));
        let old = match self.dir_entry(key) {
            0 => {
                self.held += 1;
                0
            }
            e if e < UNIFORM => {
                self.arena.release(e - 1);
                self.live[(e - 1) as usize]
            }
            e => {
                self.free_uniform(e);
                CHUNK as u32
            }
        };
        let u = if let Some(u) = self.uniform_free.pop() {
            self.uniform[u as usize] = v;
            u
        } else {
            self.uniform.push(v);
            u32::try_from(self.uniform.len() - 1).expect("fewer than 2^30 uniform chunks")
        };
        assert!(u < COUNTING, "fewer than 2^30 uniform chunks");
        let (p, i) = pagedir::split(key);
        self.dir.get_or_insert(p)[i] = UNIFORM + u + if counting { COUNTING } else { 0 };
        Some(old)
    }
    fn remove(&mut self, key: u64) -> Option<u32> {
        let (p, i) = pagedir::split(key);
        let e = self.dir.take(p, i);
        if e == 0 {
            return None;
        }
        self.held -= 1;
        if e >= UNIFORM {
            self.free_uniform(e);
            return Some(CHUNK as u32);
        }
        self.arena.release(e - 1);
        Some(self.live[e as usize - 1])
    }
    fn len(&self) -> usize {
        self.held
    }
    fn uniform_len(&self) -> usize {
        self.uniform.len() - self.uniform_free.len()
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
        let nu = self.uniform.len();
        if !self.arena.shape_ok() || self.live.len() != n || nu >= COUNTING as usize {
            return false;
        }
        // Every block and every uniform slot is held by one key or free, never both; a
        // uniform chunk never holds the default, a counting one never wraps to it.
        let mut seen = vec![false; n];
        let mut seen_u = vec![false; nu];
        let mut held = 0;
        if !self.dir.trimmed() {
            return false;
        }
        for (_, page) in self.dir.iter() {
            if page.len() != PAGE_KEYS {
                return false;
            }
            for &e in page.iter().filter(|&&e| e != 0) {
                held += 1;
                let ok = if e < UNIFORM {
                    mark(&mut seen, e as usize - 1)
                } else {
                    let (u, counting) = run_slot(e);
                    mark(&mut seen_u, u)
                        && self.uniform[u] != T::default()
                        && (!counting || self.uniform[u].counts_to(CHUNK - 1))
                };
                if !ok {
                    return false;
                }
            }
        }
        held == self.held
            && self
                .arena
                .free()
                .iter()
                .all(|&c| mark(&mut seen, c as usize))
            && self
                .uniform_free
                .iter()
                .all(|&u| mark(&mut seen_u, u as usize))
            && seen.iter().all(|&s| s)
            && seen_u.iter().all(|&s| s)
    }
}

/// Marks `i` seen; false if out of range or seen already.
fn mark(seen: &mut [bool], i: usize) -> bool {
    i < seen.len() && !std::mem::replace(&mut seen[i], true)
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

impl<T: Entry, S: ChunkStore<T>> Default for SparseVec<T, S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Entry, S: ChunkStore<T>> SparseVec<T, S> {
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
        self.chunks.entry(idx).unwrap_or_default()
    }

    /// Hint the cache about `idx`'s entry (see `BitAttrMap::prefetch`), non-temporally:
    /// the entry is read once, a few events later (see `Stage2::prefetch`).
    #[inline]
    pub fn prefetch(&self, idx: u64) {
        if let Some(e) = self.chunks.stored_entry(idx) {
            mem_prefetch::prefetch_read_data::<_, 0>(e);
        }
    }

    /// Hint the cache about `idx`'s entry ahead of a store there by an event that touches
    /// many other lines on the way (`realloc`'s conversion frees the page): kept in every
    /// level, where a non-temporal hint is evicted before the store. Measured with `drive
    /// goal 24 200000 5 scattered realloc`: the page cache load waited for 24% of the
    /// samples with the non-temporal hint.
    #[inline]
    pub fn prefetch_write(&self, idx: u64) {
        if let Some(e) = self.chunks.stored_entry(idx) {
            mem_prefetch::prefetch_write_data::<_, 3>(e);
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
            let hi = end.min(base.saturating_add(CHUNK));
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

    /// Store `v` at every index of `[start, end)`: O(chunks in the range). A chunk the
    /// range covers whole holds `v` as one value where the store keeps uniform chunks
    /// ([`ChunkStore::put_uniform`]).
    pub fn fill(&mut self, start: u64, end: u64, v: T) {
        if v == T::default() {
            self.clear_range(start, end);
            return;
        }
        self.fill_run(start, end, v, false);
    }

    /// Store `first + (i - start)` at every `i` of `[start, end)` (the page cache entries
    /// of a run of frames): O(chunks in the range). A chunk the range covers whole is held
    /// as its first value where the store keeps counting chunks. A run that would wrap is
    /// stored entry by entry.
    pub fn fill_counting(&mut self, start: u64, end: u64, first: T) {
        if start >= end {
            return;
        }
        if first == T::default() || !first.counts_to(end - start - 1) {
            self.fill_with(start, end, |i| first.plus(i - start));
            return;
        }
        self.fill_run(start, end, first, true);
    }

    /// [`SparseVec::fill`] (`counting` false) or [`SparseVec::fill_counting`] of a
    /// non-default `first` that does not wrap: whole chunks as one value where the store
    /// can, the others entry by entry.
    fn fill_run(&mut self, start: u64, end: u64, first: T, counting: bool) {
        let step = u64::from(counting);
        let mut idx = start;
        while idx < end {
            let key = idx / CHUNK;
            let base = key * CHUNK;
            let hi = end.min(base.saturating_add(CHUNK));
            let v = first.plus((idx - start) * step);
            if idx == base
                && hi - base == CHUNK
                && let Some(old) = self.chunks.put_uniform(key, v, counting)
            {
                self.live += CHUNK - u64::from(old);
            } else {
                self.fill_with(idx, hi, |i| v.plus((i - idx) * step));
            }
            idx = hi;
        }
    }

    /// Whether every entry of `[start, end)` is the default: O(chunks in the range).
    pub fn is_default_in(&self, start: u64, end: u64) -> bool {
        let zero = T::default();
        self.chunk_keys(start, end).into_iter().all(|key| {
            let base = key * CHUNK;
            let (lo, hi) = (
                start.max(base) - base,
                end.min(base.saturating_add(CHUNK)) - base,
            );
            match self.chunks.view(key).expect("key from chunk_keys") {
                ChunkView::Entries(c) => c[lo as usize..hi as usize].iter().all(|v| *v == zero),
                ChunkView::Uniform(_) | ChunkView::Counting(_) => false,
            }
        })
    }

    /// The runs `[a, b)` of consecutive non-default entries in `[start, end)`, in order:
    /// O(chunks in the range × chunk length), one output entry per run, not per index.
    pub fn runs_in(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let zero = T::default();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for key in self.chunk_keys(start, end) {
            let c = self.chunks.view(key).expect("key from chunk_keys");
            let base = key * CHUNK;
            let lo = start.max(base) - base;
            let hi = end.min(base.saturating_add(CHUNK)) - base;
            let mut i = lo;
            while i < hi {
                if c.at(i as usize) == zero {
                    i += 1;
                    continue;
                }
                let a = i;
                while i < hi && c.at(i as usize) != zero {
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
                let base = key * CHUNK;
                let lo = (start.max(base) - base) as usize;
                let hi = (end.min(base.saturating_add(CHUNK)) - base) as usize;
                let n = match self.chunks.view(key).expect("key from chunk_keys") {
                    ChunkView::Entries(c) => c[lo..hi].iter().filter(|v| **v != zero).count(),
                    ChunkView::Uniform(_) | ChunkView::Counting(_) => hi - lo,
                };
                n as u64
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
    fn chunk_keys(&self, start: u64, end: u64) -> SmallVec<[u64; 2]> {
        if start >= end {
            return SmallVec::new();
        }
        let (k0, k1) = (start / CHUNK, (end - 1) / CHUNK);
        if k0 == k1 {
            // One chunk (a page's entry, a short run): a probe, no list to build.
            let mut one = SmallVec::new();
            if self.chunks.view(k0).is_some() {
                one.push(k0);
            }
            return one;
        }
        SmallVec::from_vec(self.chunks.keys_in(k0, k1))
    }

    /// The non-default entries in `[start, end)`, in index order.
    pub fn entries(&self, start: u64, end: u64) -> Vec<(u64, T)> {
        let mut out = Vec::new();
        let zero = T::default();
        for key in self.chunk_keys(start, end) {
            let c = self.chunks.view(key).expect("key from chunk_keys");
            let base = key * CHUNK;
            let lo = start.max(base) - base;
            let hi = end.min(base.saturating_add(CHUNK)) - base;
            for i in lo..hi {
                let v = c.at(i as usize);
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
        if start < end && end - start == 1 {
            // One index (a single page's punch): no chunk list.
            self.set(start, T::default());
            return;
        }
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

    /// Whether `pred` holds for every non-default entry: one pass over the chunks held,
    /// nothing collected (a uniform chunk's value asked once).
    pub fn all_entries(&self, mut pred: impl FnMut(T) -> bool) -> bool {
        let zero = T::default();
        self.chunks
            .keys_in(0, u64::MAX / CHUNK)
            .into_iter()
            .all(
                |key| match self.chunks.view(key).expect("key from keys_in") {
                    ChunkView::Entries(c) => c.iter().all(|&v| v == zero || pred(v)),
                    ChunkView::Uniform(v) => pred(v),
                    ChunkView::Counting(v) => (0..CHUNK).all(|i| pred(v.plus(i))),
                },
            )
    }

    /// Whether the chunk store is consistent (see [`ChunkStore::shape_ok`]).
    pub fn shape_ok(&self) -> bool {
        self.chunks.shape_ok()
    }

    /// Chunks held as one value, uniform or counting ([`ChunkStore::put_uniform`]).
    pub fn uniform_chunks(&self) -> usize {
        self.chunks.uniform_len()
    }

    /// Approximate heap bytes held: a chunk of entries, `CHUNK` entries and 32 bytes of
    /// bookkeeping; a uniform or counting chunk, its value and 8 bytes.
    pub fn heap_bytes(&self) -> usize {
        let uniform = self.chunks.uniform_len();
        let entries = self.chunks.len() - uniform;
        let size = std::mem::size_of::<T>();
        entries * (CHUNK as usize * size + 32) + uniform * (size + 8)
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
    fn uniform_chunks_hold_one_value() {
        let mut d: SparseVec<u64, Dense<u64>> = SparseVec::new();
        // 2^20 entries from index 100: 2047 whole chunks held as one value each, the two
        // partial ones at the ends as entries.
        d.fill(100, 100 + (1 << 20), 7);
        assert_eq!(d.len(), 1 << 20);
        assert_eq!(d.uniform_chunks(), 2047);
        assert_eq!(d.heap_bytes(), 2 * (512 * 8 + 32) + 2047 * 16);
        assert_eq!(
            (d.get(99), d.get(100), d.get(5000), d.get(100 + (1 << 20))),
            (0, 7, 7, 0)
        );
        assert_eq!(d.runs_in(0, u64::MAX), vec![(100, 100 + (1 << 20))]);
        assert_eq!(d.count_in(1000, 3000), 2000);
        assert!(!d.is_default_in(1024, 1025) && d.is_default_in(0, 100));
        // A write into a uniform chunk gives it its entries back; the others stay.
        assert_eq!(d.set(1030, 9), 7);
        assert_eq!((d.get(1029), d.get(1030), d.get(1031)), (7, 9, 7));
        assert_eq!(d.uniform_chunks(), 2046);
        assert_eq!(d.set(1536, 0), 7);
        assert_eq!(d.len(), (1 << 20) - 1);
        // Refilling over entries and over uniform chunks; a default fill clears.
        d.fill(0, 1 << 21, 3);
        assert_eq!(d.uniform_chunks(), 4096);
        assert_eq!(d.len(), 1 << 21);
        assert!(d.shape_ok());
        d.fill(512, 1 << 21, 0);
        assert_eq!(d.len(), 512);
        assert_eq!(d.uniform_chunks(), 1);
        d.clear_range(0, 512);
        assert!(d.is_empty() && d.shape_ok());
        assert_eq!(d.heap_bytes(), 0);
        // A hashed store has no uniform chunks: the same fill, as entries.
        let mut h: SparseVec<u64> = SparseVec::new();
        h.fill(0, 1024, 5);
        assert_eq!((h.uniform_chunks(), h.len(), h.get(1023)), (0, 1024, 5));
    }

    #[test]
    fn counting_chunks_hold_their_first_value() {
        let mut d: SparseVec<u32, Dense<u32>> = SparseVec::new();
        // 1536 entries from 256 counting from 10: chunks 1 and 2 whole (one value each),
        // the halves of chunks 0 and 3 as entries.
        d.fill_counting(256, 256 + 1536, 10);
        assert_eq!((d.len(), d.uniform_chunks()), (1536, 2));
        assert_eq!(d.heap_bytes(), 2 * (512 * 4 + 32) + 2 * 12);
        assert_eq!(
            (
                d.get(255),
                d.get(256),
                d.get(512),
                d.get(1500),
                d.get(1791),
                d.get(1792)
            ),
            (0, 10, 266, 1254, 1545, 0)
        );
        assert_eq!(d.runs_in(0, 4096), vec![(256, 1792)]);
        assert_eq!(d.count_in(600, 700), 100);
        assert!(!d.is_default_in(700, 701));
        let e = d.entries(1020, 1030);
        assert_eq!(e.first(), Some(&(1020, 774)));
        assert_eq!(e.last(), Some(&(1029, 783)));
        // A write gives the chunk its entries back, counting as before.
        assert_eq!(d.set(1000, 0), 754);
        assert_eq!((d.get(999), d.get(1000), d.get(1001)), (753, 0, 755));
        assert_eq!(d.uniform_chunks(), 1);
        assert!(d.shape_ok());
        // A run that would wrap past u32::MAX is stored as entries, wrapping as `plus`.
        let mut w: SparseVec<u32, Dense<u32>> = SparseVec::new();
        w.fill_counting(0, 1024, u32::MAX - 511);
        assert_eq!((w.uniform_chunks(), w.len()), (0, 1023));
        assert_eq!((w.get(511), w.get(512), w.get(513)), (u32::MAX, 0, 1));
        // The hashed store keeps entries.
        let mut h: SparseVec<u32> = SparseVec::new();
        h.fill_counting(0, 1024, 1);
        assert_eq!((h.uniform_chunks(), h.get(1023)), (0, 1024));
        d.clear_range(0, 4096);
        assert!(d.is_empty() && d.shape_ok() && d.heap_bytes() == 0);
    }

    #[test]
    fn all_entries_sees_every_kind_of_chunk() {
        let mut d: SparseVec<u32, Dense<u32>> = SparseVec::new();
        d.set(3, 7);
        d.fill(512, 1024, 9);
        d.fill_counting(1024, 1536, 100);
        let mut seen = Vec::new();
        assert!(d.all_entries(|v| {
            seen.push(v);
            true
        }));
        assert_eq!(seen.len(), 1 + 1 + 512);
        assert!(seen.contains(&611) && !seen.contains(&0));
        assert!(!d.all_entries(|v| v != 611));
        assert!(!d.all_entries(|v| v != 9));
        assert!(d.all_entries(|v| v >= 7));
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
