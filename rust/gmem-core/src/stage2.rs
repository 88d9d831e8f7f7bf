//! The stage-2 (EPT/NPT) page table of one VM: gfn -> (pfn, level, private).
//!
//! A lazily built radix: 1 GiB leaves in an ordered map; 2 MiB slots (a 2 MiB leaf, or
//! 512 4 KiB entries with presence and private bitmaps) in a slab, found through a
//! directory of 1 GiB regions (512 slab indices each; an array below 8 TiB of guest
//! physical space, a hash map above). The directory is small enough to stay cached, so a
//! slot's address is known without touching the slot: `apply` prefetches the slots of the
//! events ahead. Slot kinds and bitmaps are arrays at the slot's index: a conversion's zap
//! touches one line of bitmaps. The frames of 4 KiB entries are either implied (a *run*:
//! every leaf of the slot maps `base + index`, as faulting a range in on a fresh host
//! gives; a *file* slot: private leaves whose frames are the page cache's at the slot's
//! guest_memfd offsets, see [`Frames`]) or held in a table of 512 in an arena of fixed
//! segments, found from the slot by arithmetic. Only a shared access through a table slot
//! reads them: a private access asks [`Stage2::probe`], bits only, and finds the page's
//! content in its guest_memfd. Only what is mapped exists; a range zap probes the slots of
//! a small range or walks the present regions of a large one, and clears 4 KiB leaves
//! through the bitmaps alone. Live leaf counts per level are kept incrementally.

use std::collections::BTreeMap;

use crate::arena::{BLOCK, BlockArena};
use crate::pagedir::{self, PageDir};

/// Mapping levels, as page orders: 4 KiB (0), 2 MiB (9), 1 GiB (18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    L4K,
    L2M,
    L1G,
}

impl Level {
    pub const fn order(self) -> u32 {
        match self {
            Level::L4K => 0,
            Level::L2M => 9,
            Level::L1G => 18,
        }
    }
    pub const fn pages(self) -> u64 {
        1 << self.order()
    }
}

const PRIVATE_BIT: u32 = 1 << 31;

#[inline]
fn pack(pfn: u32, private: bool) -> u32 {
    debug_assert!(pfn < PRIVATE_BIT);
    pfn | if private { PRIVATE_BIT } else { 0 }
}

#[inline]
fn unpack(e: u32) -> (u32, bool) {
    (e & !PRIVATE_BIT, e & PRIVATE_BIT != 0)
}

/// One leaf mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// First gfn the leaf maps (aligned to its level).
    pub gfn: u64,
    pub level: Level,
    /// Frame of the first page.
    pub pfn: u32,
    pub private: bool,
}

/// A 2 MiB slot: empty (on the free list), a 2 MiB leaf, or a table of `count` 4 KiB
/// leaves whose present and private bits are in `Stage2::bits` at the slot's index, with
/// their frames either in table `t` of `Stage2::frames` or, while every leaf of the slot
/// maps frame `base + index` (what faulting a range in on a fresh host gives), implied by
/// `base` alone: such a run costs no frame array, and a read of it loads no entry. The
/// first leaf that breaks the run turns the slot into a table.
///
/// A slot of private 4 KiB leaves installed from a guest_memfd ([`Stage2::map_file`]) is
/// a *file* slot: its frames are what the file's page cache holds at the slot's offsets
/// (`Stage2::src`), read through [`Frames`] when asked for, so it keeps no frame array
/// either, however scattered the frames. This relies on the kernel's own order: a
/// guest_memfd invalidates (zaps) the stage-2 entries of a range before its page cache
/// drops the range's folios (`kvm_gmem_invalidate_begin()` before
/// `truncate_inode_pages_range()` in `virt/kvm/guest_memfd.c`); `Host::check` verifies
/// that every file-slot leaf finds its page. A leaf of any other kind turns the slot into
/// a table first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Slot {
    Vacant,
    Leaf(u32),
    Table { count: u16, t: u32 },
    Run { count: u16, base: u32 },
    File { count: u16 },
}

/// Where a file slot's frames come from: guest_memfd `file`, whose page `off0 + i` backs
/// the slot's leaf `i` (`off0` wraps when the slot starts before the memslot's offset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct FileSrc {
    file: u32,
    off0: u64,
}

/// A frame that no page has: what [`Frames::frame`] answers for a file page that is not
/// in the page cache (host frames are below 2^31 - 1).
pub const NO_FRAME: u32 = PRIVATE_BIT - 1;

/// The page caches that file slots read their frames from.
pub trait Frames {
    /// The frame at page `off` of guest_memfd `file`, or [`NO_FRAME`].
    fn frame(&self, file: u32, off: u64) -> u32;
}

/// No guest_memfd at all (a table used without files, as in the unit tests).
impl Frames for () {
    fn frame(&self, _file: u32, _off: u64) -> u32 {
        NO_FRAME
    }
}

// A table's 512 4 KiB entries are one block of the frame arena.
const _: () = assert!(BLOCK == SLOTS);

/// A table's bits: per 64-entry word `w`, `[present, private]` side by side, two cache
/// lines per table, so a 1-page zap decides from one line without touching the frames.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(C, align(64))]
struct Bits([[u64; 2]; 8]);

/// What a zap removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Zapped {
    /// Leaf entries removed (of any level).
    pub leaves: u64,
    /// 4 KiB pages those leaves covered.
    pub pages: u64,
}

/// Clear the 4 KiB leaves of one `[present, private]` bitmap word that are in `mask` and
/// match `filter`; returns how many.
#[inline]
fn clear_word(word: &mut [u64; 2], mask: u64, filter: Option<bool>) -> u64 {
    let [present, private] = word;
    let hit = *present
        & mask
        & match filter {
            Some(true) => *private,
            Some(false) => !*private,
            None => u64::MAX,
        };
    *present &= !hit;
    *private &= !hit;
    u64::from(hit.count_ones())
}

/// The leaf indices `[i0, i1)` of 2 MiB slot `k` that `[g0, g1)` covers.
#[inline]
fn slot_span(k: u64, g0: u64, g1: u64) -> (usize, usize) {
    let base = k << 9;
    (
        (g0.max(base) - base) as usize,
        (g1.min(base + 512) - base) as usize,
    )
}

/// The bits of bitmap word `w` (leaves `64 w .. 64 w + 64`) that lie in `[i0, i1)`.
#[inline]
fn word_mask(w: usize, i0: usize, i1: usize) -> u64 {
    let (lo, hi) = (i0.clamp(64 * w, 64 * w + 64), i1.clamp(64 * w, 64 * w + 64));
    if lo >= hi {
        return 0;
    }
    let len = hi - lo;
    let ones = if len == 64 {
        u64::MAX
    } else {
        (1u64 << len) - 1
    };
    ones << (lo - 64 * w)
}

/// 2 MiB slots per 1 GiB region.
const SLOTS: usize = 512;

// A directory page holds the slab indices of one region's 512 slots.
const _: () = assert!(pagedir::ENTRIES == SLOTS);

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Stage2 {
    l1g: BTreeMap<u64, u32>,
    /// 1 GiB regions by `gfn >> 18`, each the slab index + 1 of its 512 2 MiB slots
    /// (0: none): 2 KiB per region with anything mapped at 4 KiB or 2 MiB.
    dir: PageDir,
    /// The slots, in a slab (freed entries are reused); the directory gives a slot's
    /// index without touching the slot, so a batch can prefetch it.
    slots: Vec<Slot>,
    /// The bitmaps of each table slot, at the slot's index: 128 bytes per 2 MiB (4 MiB
    /// for a 64 GiB guest: cache-resident).
    bits: Vec<Bits>,
    /// The source of each file slot, at the slot's index (meaningless for other kinds).
    src: Vec<FileSrc>,
    /// The 512 4 KiB entries of each table slot (`Slot::Table { t, .. }`, block `t`): a
    /// read's frame (a run slot and a 2 MiB leaf have none). A reused block holds stale
    /// entries: the slot's bits say which are present.
    frames: BlockArena<u32>,
    free: Vec<u32>,
    /// 2 MiB slots in use.
    used: u64,
    counts: [u64; 3],
    /// Bumped by every change of a mapping: a lookup result stays valid while it holds.
    #[serde(skip)]
    generation: u64,
}

impl Stage2 {
    pub fn new() -> Self {
        Self::default()
    }

    /// Live leaves per level: `[4K, 2M, 1G]`.
    pub fn counts(&self) -> [u64; 3] {
        self.counts
    }

    /// Frame tables in use (each 2 KiB: the 512 frames of one 2 MiB slot).
    pub fn frame_tables(&self) -> usize {
        self.frames.len() as usize - self.frames.free().len()
    }

    /// Changes whenever a mapping is installed or removed, so that a caller holding a
    /// [`Stage2::lookup`] result can tell whether it still holds.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Slab index of 2 MiB slot `k` (`gfn >> 9`), if it exists.
    #[inline]
    fn index(&self, k: u64) -> Option<usize> {
        let r = self.dir.get(k >> 9)?;
        let i = r[(k % SLOTS as u64) as usize];
        (i != 0).then(|| i as usize - 1)
    }

    /// The leaf mapping `gfn`, if any; a file slot's frame comes from `frames`.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub fn lookup(&self, gfn: u64, frames: &impl Frames) -> Option<Leaf> {
        if !self.l1g.is_empty()
            && let Some(&e) = self.l1g.get(&(gfn >> 18))
        {
            let (pfn, private) = unpack(e);
            return Some(Leaf {
                gfn: gfn & !((1 << 18) - 1),
                level: Level::L1G,
                pfn,
                private,
            });
        }
        let s = self.index(gfn >> 9)?;
        match &self.slots[s] {
            Slot::Leaf(e) => {
                let (pfn, private) = unpack(*e);
                Some(Leaf {
                    gfn: gfn & !511,
                    level: Level::L2M,
                    pfn,
                    private,
                })
            }
            Slot::Table { t, .. } => {
                let i = (gfn & 511) as usize;
                (self.bits[s].0[i / 64][0] & (1 << (i % 64)) != 0).then(|| {
                    let (pfn, private) = unpack(*self.frames.entry(*t, i));
                    Leaf {
                        gfn,
                        level: Level::L4K,
                        pfn,
                        private,
                    }
                })
            }
            Slot::Run { base, .. } => {
                let i = (gfn & 511) as usize;
                let [present, private] = self.bits[s].0[i / 64];
                (present >> (i % 64) & 1 == 1).then(|| Leaf {
                    gfn,
                    level: Level::L4K,
                    pfn: base + i as u32,
                    private: private >> (i % 64) & 1 == 1,
                })
            }
            Slot::File { .. } => {
                let i = (gfn & 511) as usize;
                (self.bits[s].0[i / 64][0] >> (i % 64) & 1 == 1).then(|| Leaf {
                    gfn,
                    level: Level::L4K,
                    pfn: self.file_frame(s, i, frames),
                    private: true,
                })
            }
            Slot::Vacant => None,
        }
    }

    /// The frame of leaf `i` of file slot `s`.
    #[inline]
    fn file_frame(&self, s: usize, i: usize, frames: &impl Frames) -> u32 {
        let src = self.src[s];
        frames.frame(src.file, src.off0.wrapping_add(i as u64))
    }

    /// Whether `gfn` is mapped, and then whether private: [`Stage2::lookup`] without the
    /// frame, so without loading a table slot's frame entry.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub fn probe(&self, gfn: u64) -> Option<bool> {
        self.probe_in(self.slot_of(gfn), gfn)
    }

    /// The slab index of `gfn`'s 2 MiB slot, if it exists: what [`Stage2::probe_in`]
    /// takes. It holds while the table does not change ([`Stage2::generation`]).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub fn slot_of(&self, gfn: u64) -> Option<usize> {
        self.index(gfn >> 9)
    }

    /// [`Stage2::probe`] with `gfn`'s slot found beforehand by [`Stage2::slot_of`].
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub fn probe_in(&self, slot: Option<usize>, gfn: u64) -> Option<bool> {
        if !self.l1g.is_empty()
            && let Some(&e) = self.l1g.get(&(gfn >> 18))
        {
            return Some(unpack(e).1);
        }
        let s = slot?;
        match &self.slots[s] {
            Slot::Leaf(e) => Some(unpack(*e).1),
            Slot::Table { .. } | Slot::Run { .. } | Slot::File { .. } => {
                let i = (gfn & 511) as usize;
                let [present, private] = self.bits[s].0[i / 64];
                (present >> (i % 64) & 1 == 1).then_some(private >> (i % 64) & 1 == 1)
            }
            Slot::Vacant => None,
        }
    }

    /// Hint the cache, non-temporally, about `gfn`'s slot bits only: what
    /// [`Stage2::probe`] loads. Returns the slot ([`Stage2::slot_of`]).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub fn prefetch_bits(&self, gfn: u64) -> Option<usize> {
        let s = self.index(gfn >> 9)?;
        let i = (gfn & 511) as usize;
        mem_prefetch::prefetch_read_data::<_, 0>(&self.bits[s].0[i / 64]);
        Some(s)
    }

    /// Hint the cache about `gfn`'s slot bits and, with `entry`, its 4 KiB entry (see
    /// `BitAttrMap::prefetch`). Touches the directory (2 KiB per GiB) and, with `entry`,
    /// the slot (8 bytes per 2 MiB). A read's lines are fetched non-temporally
    /// (`prefetchnta`): they are used once, a few events later, and fetched into L2 they
    /// evict what every event uses (the directory, the slots, the content index). Measured
    /// with `drive goal 24 100000 7`: random reads 62-63 -> 51-53 ns (scattered frames) and
    /// 46-47 -> 40-42 ns (frames in runs) against `prefetcht0`; `prefetcht1`/`t2` were
    /// slower (67-71 ns), and so was `nta` with the pipeline 8, 12, 24 or 32 events deep.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    pub fn prefetch(&self, gfn: u64, entry: bool) {
        if let Some(s) = self.index(gfn >> 9) {
            let i = (gfn & 511) as usize;
            let bits = &self.bits[s].0[i / 64];
            if entry {
                mem_prefetch::prefetch_read_data::<_, 0>(bits);
                if let Slot::Table { t, .. } = self.slots[s] {
                    mem_prefetch::prefetch_read_data::<_, 0>(self.frames.entry(t, i));
                }
            } else {
                // A zap writes the bits.
                mem_prefetch::prefetch_write_data::<_, 3>(bits);
                mem_prefetch::prefetch_read_data::<_, 3>(&self.slots[s]);
            }
        }
    }

    /// The slab index of slot `k`, creating it as `slot` if absent.
    fn slot_or_insert(&mut self, k: u64, slot: impl FnOnce(&mut BlockArena<u32>) -> Slot) -> usize {
        if let Some(s) = self.index(k) {
            return s;
        }
        let s = if let Some(s) = self.free.pop() {
            s as usize
        } else {
            self.slots.push(Slot::Vacant);
            self.bits.push(Bits::default());
            self.src.push(FileSrc::default());
            self.slots.len() - 1
        };
        self.slots[s] = slot(&mut self.frames);
        self.bits[s] = Bits::default();
        self.link(k, s);
        s
    }

    fn link(&mut self, k: u64, s: usize) {
        let r = self.dir.get_or_insert(k >> 9);
        r[(k % SLOTS as u64) as usize] = u32::try_from(s + 1).expect("fewer than 2^32 slots");
        self.used += 1;
    }

    /// Free slot `k` (at slab index `s`).
    fn unlink(&mut self, k: u64, s: usize) {
        if let Slot::Table { t, .. } = self.slots[s] {
            self.frames.release(t);
        }
        self.slots[s] = Slot::Vacant;
        self.free
            .push(u32::try_from(s).expect("fewer than 2^32 slots"));
        self.used -= 1;
        let r = self.dir.get_mut(k >> 9).expect("linked slot");
        r[(k % SLOTS as u64) as usize] = 0;
        if r.iter().all(|&i| i == 0) {
            self.dir.remove(k >> 9);
        }
    }

    /// Install a leaf at `gfn` (aligned to `level`) mapping `pfn` (aligned likewise).
    /// Anything already mapped inside the range is replaced; returns what was replaced.
    /// A 4 KiB leaf in a file slot turns the slot into a table (its frames from `frames`).
    pub fn map(
        &mut self,
        gfn: u64,
        level: Level,
        pfn: u32,
        private: bool,
        frames: &impl Frames,
    ) -> Zapped {
        debug_assert_eq!(gfn % level.pages(), 0);
        self.generation += 1;
        let replaced = self.zap(gfn, gfn + level.pages(), None);
        if level == Level::L4K
            && let Some(s) = self.index(gfn >> 9)
        {
            self.file_to_table(s, frames);
        }
        let e = pack(pfn, private);
        match level {
            Level::L1G => {
                self.l1g.insert(gfn >> 18, e);
            }
            Level::L2M => {
                // The range was zapped: no slot is left at `gfn >> 9`.
                self.slot_or_insert(gfn >> 9, |_| Slot::Leaf(e));
            }
            Level::L4K => {
                let i = (gfn & 511) as usize;
                let s = self.slot_or_insert(gfn >> 9, |f| match pfn.checked_sub(i as u32) {
                    Some(base) => Slot::Run { count: 0, base },
                    None => Slot::Table {
                        count: 0,
                        t: f.alloc(),
                    },
                });
                if let Slot::Run { base, .. } = self.slots[s]
                    && base + i as u32 != pfn
                {
                    self.materialize(s);
                }
                let w = &mut self.bits[s].0[i / 64];
                w[0] |= 1 << (i % 64);
                if private {
                    w[1] |= 1 << (i % 64);
                }
                match &mut self.slots[s] {
                    Slot::Table { count, t } => {
                        *count += 1;
                        let t = *t;
                        self.frames.block_mut(t)[i] = e;
                    }
                    Slot::Run { count, .. } => *count += 1,
                    _ => unreachable!("range was zapped"),
                }
            }
        }
        self.counts[level as usize] += 1;
        replaced
    }

    /// Install a private 4 KiB leaf at `gfn` backed by page `off` of guest_memfd `file`,
    /// whose frame is `pfn` (what `frames` answers for it). A new slot becomes a file slot
    /// (no frame array); a run slot stays a run while `pfn` continues it; a file slot of
    /// another source, or a run broken by `pfn`, becomes a table. Returns what was
    /// replaced.
    pub fn map_file(
        &mut self,
        gfn: u64,
        pfn: u32,
        file: u32,
        off: u64,
        frames: &impl Frames,
    ) -> Zapped {
        debug_assert_eq!(
            frames.frame(file, off),
            pfn,
            "the page cache holds the frame"
        );
        self.generation += 1;
        let replaced = self.zap(gfn, gfn + 1, None);
        let i = (gfn & 511) as usize;
        let src = FileSrc {
            file,
            off0: off.wrapping_sub(i as u64),
        };
        let s = self.slot_or_insert(gfn >> 9, |_| Slot::File { count: 0 });
        match self.slots[s] {
            Slot::File { count: 0 } => self.src[s] = src,
            Slot::File { .. } if self.src[s] != src => self.file_to_table(s, frames),
            Slot::Run { base, .. } if base.checked_add(i as u32) != Some(pfn) => {
                self.materialize(s);
            }
            _ => {}
        }
        let w = &mut self.bits[s].0[i / 64];
        w[0] |= 1 << (i % 64);
        w[1] |= 1 << (i % 64);
        match &mut self.slots[s] {
            Slot::Table { count, t } => {
                *count += 1;
                let t = *t;
                self.frames.block_mut(t)[i] = pack(pfn, true);
            }
            Slot::Run { count, .. } | Slot::File { count } => *count += 1,
            _ => unreachable!("range was zapped"),
        }
        self.counts[Level::L4K as usize] += 1;
        replaced
    }

    /// Whether any leaf maps a gfn of `[g0, g1)`: O(2 MiB slots in the range).
    pub fn mapped_in(&self, g0: u64, g1: u64) -> bool {
        if g0 >= g1 {
            return false;
        }
        if self.l1g.range(g0 >> 18..=(g1 - 1) >> 18).next().is_some() {
            return true;
        }
        (g0 >> 9..=(g1 - 1) >> 9).any(|k| {
            self.index(k).is_some_and(|s| match self.slots[s] {
                Slot::Leaf(_) => true,
                Slot::Vacant => false,
                _ => {
                    let (i0, i1) = slot_span(k, g0, g1);
                    self.bits[s]
                        .0
                        .iter()
                        .enumerate()
                        .any(|(w, word)| word[0] & word_mask(w, i0, i1) != 0)
                }
            })
        })
    }

    /// Install private 4 KiB leaves at `g0..g0 + n` backed by pages `off0..off0 + n` of
    /// guest_memfd `file`, none of them mapped now (the caller checked
    /// [`Stage2::mapped_in`]): what [`Stage2::map_file`] on each gfn in turn installs, in
    /// O(2 MiB slots) plus, in slots that already hold frames in a table, O(pages).
    pub fn map_file_run(&mut self, g0: u64, n: u64, file: u32, off0: u64, frames: &impl Frames) {
        debug_assert!(!self.mapped_in(g0, g0 + n));
        if n == 0 {
            return;
        }
        self.generation += 1;
        let g1 = g0 + n;
        for k in g0 >> 9..=(g1 - 1) >> 9 {
            let (i0, i1) = slot_span(k, g0, g1);
            let first = (k << 9) + i0 as u64;
            let src = FileSrc {
                file,
                off0: off0.wrapping_add(first - g0).wrapping_sub(i0 as u64),
            };
            let s = self.slot_or_insert(k, |_| Slot::File { count: 0 });
            match self.slots[s] {
                Slot::File { count: 0 } => self.src[s] = src,
                Slot::File { .. } if self.src[s] != src => self.file_to_table(s, frames),
                Slot::Run { base, .. }
                    if (i0..i1).any(|i| {
                        base.checked_add(i as u32)
                            != Some(frames.frame(file, src.off0.wrapping_add(i as u64)))
                    }) =>
                {
                    self.materialize(s);
                }
                _ => {}
            }
            for (w, word) in self.bits[s].0.iter_mut().enumerate() {
                let m = word_mask(w, i0, i1);
                word[0] |= m;
                word[1] |= m;
            }
            let added = (i1 - i0) as u16;
            match &mut self.slots[s] {
                Slot::Table { count, t } => {
                    *count += added;
                    let t = *t;
                    for i in i0..i1 {
                        let off = src.off0.wrapping_add(i as u64);
                        self.frames.block_mut(t)[i] = pack(frames.frame(file, off), true);
                    }
                }
                Slot::Run { count, .. } | Slot::File { count } => *count += added,
                _ => unreachable!("nothing was mapped in the run"),
            }
        }
        self.counts[Level::L4K as usize] += n;
    }

    /// Turn file slot `s` (if it is one) into a table holding the frames `frames` gives.
    fn file_to_table(&mut self, s: usize, frames: &impl Frames) {
        let Slot::File { count } = self.slots[s] else {
            return;
        };
        let t = self.frames.alloc();
        for i in 0..SLOTS {
            if self.bits[s].0[i / 64][0] >> (i % 64) & 1 == 1 {
                let pfn = self.file_frame(s, i, frames);
                self.frames.block_mut(t)[i] = pack(pfn, true);
            }
        }
        self.slots[s] = Slot::Table { count, t };
    }

    /// Turn run slot `s` into a table holding the frames the run implies.
    fn materialize(&mut self, s: usize) {
        let Slot::Run { count, base } = self.slots[s] else {
            return;
        };
        let t = self.frames.alloc();
        let bits = &self.bits[s].0;
        let table = self.frames.block_mut(t);
        for (i, e) in table.iter_mut().enumerate() {
            let [present, private] = bits[i / 64];
            if present >> (i % 64) & 1 == 1 {
                *e = pack(base + i as u32, private >> (i % 64) & 1 == 1);
            }
        }
        self.slots[s] = Slot::Table { count, t };
    }

    /// Remove every leaf intersecting `[start, end)` whose private flag matches `filter`
    /// (`None`: all). A huge leaf straddling the range is removed whole, as KVM does.
    #[allow(clippy::inline_always)] // once per conversion; left to the inliner it stays a call
    #[inline(always)]
    pub fn zap(&mut self, start: u64, end: u64, filter: Option<bool>) -> Zapped {
        if start < end && end - start == 1 && self.l1g.is_empty() {
            // One page (a random single-page conversion): at most one bit of one table.
            let k = start >> 9;
            let Some(s) = self.index(k) else {
                return Zapped::default();
            };
            if let Slot::Table { count, .. } | Slot::Run { count, .. } | Slot::File { count } =
                &mut self.slots[s]
            {
                let i = (start & 511) as usize;
                let n = clear_word(&mut self.bits[s].0[i / 64], 1 << (i % 64), filter);
                *count -= n as u16;
                self.counts[Level::L4K as usize] -= n;
                if *count == 0 {
                    self.unlink(k, s);
                }
                self.generation += n;
                return Zapped {
                    leaves: n,
                    pages: n,
                };
            }
        }
        self.zap_range(start, end, filter)
    }

    /// [`Stage2::zap`] beyond its one-page case (out of line: the one-page case stays small
    /// enough to inline into the conversion).
    #[inline(never)]
    fn zap_range(&mut self, start: u64, end: u64, filter: Option<bool>) -> Zapped {
        let mut z = Zapped::default();
        if start >= end {
            return z;
        }
        let keep = |private: bool| filter.is_some_and(|f| f != private);
        if !self.l1g.is_empty() {
            let keys: Vec<u64> = self
                .l1g
                .range(start >> 18..=(end - 1) >> 18)
                .filter(|(_, e)| !keep(unpack(**e).1))
                .map(|(&k, _)| k)
                .collect();
            for k in keys {
                self.l1g.remove(&k);
                self.counts[Level::L1G as usize] -= 1;
                z.leaves += 1;
                z.pages += Level::L1G.pages();
            }
        }
        // Probe the slots of a small range; walk the regions present for a large one:
        // either way O(min(range / 512, slots present + 512 x regions present)).
        let (k0, k1) = (start >> 9, (end - 1) >> 9);
        if k1 - k0 < self.used {
            for k in k0..=k1 {
                if let Some(s) = self.index(k) {
                    self.zap_slot(k, s, start, end, filter, &mut z);
                }
            }
        } else {
            let mut found: Vec<(u64, usize)> = Vec::new();
            for (r, idx) in self.dir.iter() {
                if r < k0 >> 9 || r > k1 >> 9 {
                    continue;
                }
                for (j, &i) in idx.iter().enumerate() {
                    let k = (r << 9) + j as u64;
                    if i != 0 && (k0..=k1).contains(&k) {
                        found.push((k, i as usize - 1));
                    }
                }
            }
            for (k, s) in found {
                self.zap_slot(k, s, start, end, filter, &mut z);
            }
        }
        self.generation += z.leaves;
        z
    }

    /// Zap the leaves of 2 MiB slot `k` (slab index `s`) inside `[start, end)` that match
    /// `filter`.
    fn zap_slot(
        &mut self,
        k: u64,
        s: usize,
        start: u64,
        end: u64,
        filter: Option<bool>,
        z: &mut Zapped,
    ) {
        let keep = |private: bool| filter.is_some_and(|f| f != private);
        let base = k << 9;
        let remove = match &mut self.slots[s] {
            Slot::Vacant => false,
            Slot::Leaf(e) => {
                if keep(unpack(*e).1) {
                    false
                } else {
                    self.counts[Level::L2M as usize] -= 1;
                    z.leaves += 1;
                    z.pages += Level::L2M.pages();
                    true
                }
            }
            Slot::Table { count, .. } | Slot::Run { count, .. } | Slot::File { count } => {
                let bits = &mut self.bits[s].0;
                let lo = start.max(base) - base;
                let hi = end.min(base + 512) - base;
                for w in (lo / 64)..=((hi - 1) / 64) {
                    let (wlo, whi) = (lo.max(w * 64) - w * 64, hi.min(w * 64 + 64) - w * 64);
                    let span = whi - wlo;
                    let mask = if span == 64 {
                        u64::MAX
                    } else {
                        ((1u64 << span) - 1) << wlo
                    };
                    let n = clear_word(&mut bits[w as usize], mask, filter);
                    *count -= n as u16;
                    self.counts[Level::L4K as usize] -= n;
                    z.leaves += n;
                    z.pages += n;
                }
                *count == 0
            }
        };
        if remove {
            self.unlink(k, s);
        }
    }

    /// The slots in use as `(k, slab index)`, by `k`.
    fn slots_sorted(&self) -> Vec<(u64, usize)> {
        let mut out: Vec<(u64, usize)> = self
            .dir
            .iter()
            .flat_map(|(r, idx)| {
                idx.iter()
                    .enumerate()
                    .filter(|&(_, &i)| i != 0)
                    .map(move |(j, &i)| ((r << 9) + j as u64, i as usize - 1))
            })
            .collect();
        out.sort_unstable();
        out
    }

    /// Every leaf, in gfn order within each level group (file slots' frames from
    /// `frames`).
    pub fn leaves(&self, frames: &impl Frames) -> Vec<Leaf> {
        let mut out = Vec::new();
        for (&k, &e) in &self.l1g {
            let (pfn, private) = unpack(e);
            out.push(Leaf {
                gfn: k << 18,
                level: Level::L1G,
                pfn,
                private,
            });
        }
        for (k, s) in self.slots_sorted() {
            match &self.slots[s] {
                Slot::Leaf(e) => {
                    let (pfn, private) = unpack(*e);
                    out.push(Leaf {
                        gfn: k << 9,
                        level: Level::L2M,
                        pfn,
                        private,
                    });
                }
                Slot::Table { .. } | Slot::Run { .. } | Slot::File { .. } => {
                    let bits = &self.bits[s].0;
                    for i in 0..SLOTS {
                        if bits[i / 64][0] >> (i % 64) & 1 == 1 {
                            out.push(self.lookup((k << 9) + i as u64, frames).expect("present"));
                        }
                    }
                }
                Slot::Vacant => {}
            }
        }
        out
    }

    /// Verify the counts and the shape (no 2 MiB slot under a 1 GiB leaf, no empty table,
    /// a directory and slab that agree).
    pub fn check(&self) -> Result<(), String> {
        let mut c = [0u64; 3];
        let linked = self.slots_sorted();
        if linked.len() as u64 != self.used
            || self.slots.len() != self.bits.len()
            || self.slots.len() != self.src.len()
            || linked.len() + self.free.len() != self.slots.len()
        {
            return Err("stage-2: slot directory and slab disagree".into());
        }
        let n = self.slots.len();
        if linked.iter().any(|&(_, s)| s >= n) || self.free.iter().any(|&f| f as usize >= n) {
            return Err("stage-2: slab index out of range".into());
        }
        if !self.dir.trimmed() {
            return Err("stage-2: empty directory region".into());
        }
        if self
            .free
            .iter()
            .any(|&f| self.slots[f as usize] != Slot::Vacant)
        {
            return Err("stage-2: a free slab entry is in use".into());
        }
        if !self.frames.shape_ok() {
            return Err("stage-2: frame table arena misshapen".into());
        }
        let mut tables = std::collections::HashSet::new();
        for (k, s) in linked {
            if self.l1g.contains_key(&(k >> 9)) {
                return Err(format!(
                    "stage-2: 2 MiB slot {:#x} under a 1 GiB leaf",
                    k << 9
                ));
            }
            match &self.slots[s] {
                Slot::Vacant => {
                    return Err(format!("stage-2: slot {:#x} links a free entry", k << 9));
                }
                Slot::Leaf(_) => c[1] += 1,
                slot @ (Slot::Table { count, .. }
                | Slot::Run { count, .. }
                | Slot::File { count }) => {
                    // What 4 KiB slots share: counts and bits.
                    let bits = &self.bits[s].0;
                    let n: u32 = bits.iter().map(|w| w[0].count_ones()).sum();
                    if n != u32::from(*count) || n == 0 {
                        return Err(format!("stage-2: slot at gfn {:#x} miscounted", k << 9));
                    }
                    if bits.iter().any(|w| w[1] & !w[0] != 0) {
                        return Err(format!(
                            "stage-2: private bits without entries at {:#x}",
                            k << 9
                        ));
                    }
                    c[0] += u64::from(n);
                    match *slot {
                        Slot::Table { t, .. } => {
                            if t >= self.frames.len() || !tables.insert(t) {
                                return Err(format!(
                                    "stage-2: table at gfn {:#x} has frames {t} out of range or shared",
                                    k << 9
                                ));
                            }
                            for (i, &e) in self.frames.block(t).iter().enumerate() {
                                let [present, private] = bits[i / 64];
                                if present >> (i % 64) & 1 == 1
                                    && (private >> (i % 64) & 1 == 1) != unpack(e).1
                                {
                                    return Err(format!(
                                        "stage-2: private bit of gfn {:#x} disagrees with its entry",
                                        (k << 9) + i as u64
                                    ));
                                }
                            }
                        }
                        Slot::Run { base, .. } if base >= PRIVATE_BIT => {
                            return Err(format!(
                                "stage-2: run at gfn {:#x} has frames out of range",
                                k << 9
                            ));
                        }
                        Slot::File { .. } if bits.iter().any(|w| w[1] != w[0]) => {
                            return Err(format!(
                                "stage-2: file slot at gfn {:#x} maps a shared leaf",
                                k << 9
                            ));
                        }
                        _ => {}
                    }
                }
            }
        }
        let f = &self.frames;
        if tables.len() + f.free().len() != f.len() as usize
            || f.free().iter().any(|t| tables.contains(t))
        {
            return Err("stage-2: frame tables and slots disagree".into());
        }
        c[2] = self.l1g.len() as u64;
        if c != self.counts {
            return Err(format!("stage-2 counts {:?} != recount {c:?}", self.counts));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_lookup_zap() {
        let mut s = Stage2::new();
        s.map(5, Level::L4K, 100, true, &());
        s.map(512, Level::L2M, 1024, false, &());
        s.map(1 << 18, Level::L1G, 1 << 18, true, &());
        assert_eq!(s.counts(), [1, 1, 1]);
        let l = s.lookup(600, &()).unwrap();
        assert_eq!(
            (l.gfn, l.level, l.pfn, l.private),
            (512, Level::L2M, 1024, false)
        );
        assert_eq!(s.lookup((1 << 18) + 7, &()).unwrap().level, Level::L1G);
        assert!(s.lookup(6, &()).is_none());
        let z = s.zap(0, 1 << 19, Some(false));
        assert_eq!(
            z,
            Zapped {
                leaves: 1,
                pages: 512
            }
        );
        let z = s.zap(0, u64::MAX, None);
        assert_eq!(z.leaves, 2);
        assert_eq!(s.counts(), [0, 0, 0]);
        s.check().unwrap();
    }

    #[test]
    fn huge_map_replaces_small() {
        let mut s = Stage2::new();
        for g in 0..512 {
            s.map(g, Level::L4K, g as u32, true, &());
        }
        let r = s.map(0, Level::L2M, 0, true, &());
        assert_eq!(r.leaves, 512);
        assert_eq!(s.counts(), [0, 1, 0]);
        s.check().unwrap();
    }
}
