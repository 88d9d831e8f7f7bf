//! The memory-attribute map of a VM or a guest_memfd: two values per index (KVM defines
//! one attribute, PRIVATE), kept in two levels.
//!
//! Indices are grouped in leaves of 4096. A coalescing interval map ([`AttrMap`]) over leaf
//! numbers says whether each leaf is all-clear, all-set or mixed; only mixed leaves own a
//! 512-byte bitmap, found by leaf number through a two-level directory (`Leaves`). A
//! single-page conversion in a fragmented region is two loads from small cached arrays
//! and a bit flip (so `apply` can prefetch the bitmap word without a miss first); a range
//! conversion touches its two edge leaves, the interval map and the mixed leaves it
//! covers — never one step per page. Uniformity over an aligned huge range (the kernel's
//! "mixed" rule) is a few word compares. Indices are `[0, u64::MAX)`: gfns and file
//! offsets stay far below.

use crate::attr_map::AttrMap;
use crate::pagedir::{self, PageDir};

const LEAF_SHIFT: u32 = 12;
const LEAF: u64 = 1 << LEAF_SHIFT;
const WORDS: usize = (LEAF / 64) as usize;
/// Leaf state in the coarse map: clear (0), set (1) or mixed.
const MIXED: u64 = 2;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BitAttrMap {
    /// `vals[0]`: the value of a clear bit (the map's default); `vals[1]`: of a set bit.
    vals: [u64; 2],
    has_set_value: bool,
    coarse: AttrMap,
    leaves: Leaves,
}

/// The bitmaps of the mixed leaves, by leaf number: a [`PageDir`] (512 leaf numbers per
/// page, each naming a slot + 1) over a slab of bitmaps whose freed slots are reused. A
/// lookup is the directory's two loads from small arrays (8 pages cover a 2^24-page
/// guest) and the bitmap word; a hash map costs a probe of its own table first, the miss
/// a single-page conversion used to wait for twice.
#[derive(Debug, Clone, Default)]
struct Leaves {
    dir: PageDir,
    slab: Vec<[u64; WORDS]>,
    free: Vec<u32>,
}

impl Leaves {
    #[allow(clippy::inline_always)] // on every conversion; left to the inliner it stays a call
    #[inline(always)]
    fn slot(&self, l: u64) -> Option<usize> {
        let e = self.dir.at(l);
        (e != 0).then(|| e as usize - 1)
    }

    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn get(&self, l: u64) -> Option<&[u64; WORDS]> {
        self.slot(l).map(|s| &self.slab[s])
    }

    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn get_mut(&mut self, l: u64) -> Option<&mut [u64; WORDS]> {
        self.slot(l).map(|s| &mut self.slab[s])
    }

    /// Store leaf `l`'s bitmap (replacing any).
    fn insert(&mut self, l: u64, b: &[u64; WORDS]) {
        if let Some(s) = self.slot(l) {
            self.slab[s] = *b;
            return;
        }
        let s = if let Some(s) = self.free.pop() {
            self.slab[s as usize] = *b;
            s
        } else {
            self.slab.push(*b);
            u32::try_from(self.slab.len()).expect("fewer than 2^32 mixed leaves") - 1
        };
        let (p, i) = pagedir::split(l);
        self.dir.get_or_insert(p)[i] = s + 1;
    }

    /// Drop leaf `l`'s bitmap, returning it.
    fn remove(&mut self, l: u64) -> Option<[u64; WORDS]> {
        let (p, i) = pagedir::split(l);
        let e = self.dir.take(p, i);
        if e == 0 {
            return None;
        }
        self.free.push(e - 1);
        Some(self.slab[e as usize - 1])
    }

    fn len(&self) -> usize {
        self.slab.len() - self.free.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every bitmap with its leaf number, in no particular order.
    fn iter(&self) -> impl Iterator<Item = (u64, &[u64; WORDS])> {
        self.dir.iter().flat_map(move |(p, page)| {
            page.iter()
                .enumerate()
                .filter(|&(_, &e)| e != 0)
                .map(move |(i, &e)| {
                    (
                        p * pagedir::ENTRIES as u64 + i as u64,
                        &self.slab[e as usize - 1],
                    )
                })
        })
    }
}

impl std::ops::Index<u64> for Leaves {
    type Output = [u64; WORDS];
    fn index(&self, l: u64) -> &[u64; WORDS] {
        self.get(l).expect("a mixed leaf's bitmap")
    }
}

/// The same leaves holding the same bitmaps, wherever the slab keeps them.
impl PartialEq for Leaves {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(l, b)| other.get(l) == Some(b))
    }
}

impl Eq for Leaves {}

/// Stored as a map from leaf number to its words.
impl serde::Serialize for Leaves {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.len()))?;
        for (l, b) in self.iter() {
            m.serialize_entry(&l, &b[..])?;
        }
        m.end()
    }
}

impl<'de> serde::Deserialize<'de> for Leaves {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = std::collections::BTreeMap::<u64, Vec<u64>>::deserialize(d)?;
        let mut leaves = Self::default();
        for (l, b) in map {
            let b: [u64; WORDS] = b
                .try_into()
                .map_err(|b: Vec<u64>| serde::de::Error::invalid_length(b.len(), &"64 words"))?;
            leaves.insert(l, &b);
        }
        Ok(leaves)
    }
}

/// The words of a leaf that `[a, z)` touches, with the mask of its bits in each
/// (`a < z <= LEAF`).
fn word_masks(a: u64, z: u64) -> impl Iterator<Item = (usize, u64)> {
    (a / 64..z.div_ceil(64)).map(move |w| {
        let (lo, hi) = (a.max(w * 64) - w * 64, z.min(w * 64 + 64) - w * 64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        (w as usize, mask)
    })
}

/// Set bits of `b` in `[a, z)`.
fn ones(b: &[u64], a: u64, z: u64) -> u64 {
    word_masks(a, z)
        .map(|(w, m)| u64::from((b[w] & m).count_ones()))
        .sum()
}

/// Set or clear bits of `b` in `[a, z)`.
fn fill(b: &mut [u64], a: u64, z: u64, on: bool) {
    for (w, m) in word_masks(a, z) {
        if on {
            b[w] |= m;
        } else {
            b[w] &= !m;
        }
    }
}

/// Whether every bit of `b` is `bit`, just after a store of `bit` into word `w`: asks that
/// word first (cached), so a leaf that stays mixed costs no other line.
fn all_of(b: &[u64], w: usize, bit: u64) -> bool {
    let full = if bit == 1 { u64::MAX } else { 0 };
    b[w] == full && b.iter().all(|&x| x == full)
}

/// `Some(bit)` if the whole leaf holds one bit value.
fn uniform_leaf(b: &[u64]) -> Option<u64> {
    if b.iter().all(|&w| w == 0) {
        Some(0)
    } else if b.iter().all(|&w| w == u64::MAX) {
        Some(1)
    } else {
        None
    }
}

impl BitAttrMap {
    /// A map holding `default` everywhere.
    pub fn new(default: u64) -> Self {
        Self {
            vals: [default, default],
            has_set_value: false,
            coarse: AttrMap::new(0),
            leaves: Leaves::default(),
        }
    }

    /// The bit standing for `value`, assigning the second value on first use.
    ///
    /// # Panics
    /// On a third distinct value: the map holds two (KVM has one attribute bit).
    fn bit_of(&mut self, value: u64) -> u64 {
        if value == self.vals[0] {
            return 0;
        }
        if !self.has_set_value {
            self.vals[1] = value;
            self.has_set_value = true;
        }
        assert_eq!(value, self.vals[1], "an attribute map holds two values");
        1
    }

    /// The bit standing for `value`, if any index can hold it.
    fn known_bit(&self, value: u64) -> Option<u64> {
        if value == self.vals[0] {
            Some(0)
        } else if self.has_set_value && value == self.vals[1] {
            Some(1)
        } else {
            None
        }
    }

    /// The value at `idx`.
    #[inline]
    pub fn get(&self, idx: u64) -> u64 {
        let l = idx >> LEAF_SHIFT;
        if !self.leaves.is_empty()
            && let Some(b) = self.leaves.get(l)
        {
            let i = idx % LEAF;
            return self.vals[((b[(i / 64) as usize] >> (i % 64)) & 1) as usize];
        }
        self.vals[self.coarse.get(l) as usize]
    }

    /// Hint the cache about `idx`'s word, ahead of a `get` or a store there (a batch issues
    /// it a few events early, so that the misses of several events overlap).
    #[allow(clippy::inline_always)] // in `apply`'s look-ahead; left to the inliner it stays a call
    #[inline(always)]
    pub fn prefetch(&self, idx: u64) {
        if !self.leaves.is_empty()
            && let Some(b) = self.leaves.get(idx >> LEAF_SHIFT)
        {
            mem_prefetch::prefetch_write_data::<_, 3>(&b[((idx % LEAF) / 64) as usize]);
        }
    }

    /// Split `[start, end)` into an optional head leaf piece, whole leaves `[m0, m1)` and an
    /// optional tail leaf piece: `(head, (m0, m1), tail)`, pieces as `(leaf, a, z)`.
    #[allow(clippy::type_complexity)]
    fn pieces(
        start: u64,
        end: u64,
    ) -> (Option<(u64, u64, u64)>, (u64, u64), Option<(u64, u64, u64)>) {
        let (l0, l1) = (start >> LEAF_SHIFT, (end - 1) >> LEAF_SHIFT);
        if l0 == l1 {
            let (a, z) = (start - (l0 << LEAF_SHIFT), end - (l0 << LEAF_SHIFT));
            if a == 0 && z == LEAF {
                return (None, (l0, l0 + 1), None);
            }
            return (Some((l0, a, z)), (l0, l0), None);
        }
        let mut m0 = l0;
        let mut head = None;
        if !start.is_multiple_of(LEAF) {
            head = Some((l0, start % LEAF, LEAF));
            m0 = l0 + 1;
        }
        let tail_len = end - (l1 << LEAF_SHIFT);
        let mut m1 = l1 + 1;
        let mut tail = None;
        if tail_len != LEAF {
            tail = Some((l1, 0, tail_len));
            m1 = l1;
        }
        (head, (m0, m1.max(m0)), tail)
    }

    /// The bit over a piece of one leaf, `None` if mixed.
    fn piece_uniform(&self, (l, a, z): (u64, u64, u64)) -> Option<u64> {
        match self.leaves.get(l) {
            Some(b) => match ones(b, a, z) {
                0 => Some(0),
                n if n == z - a => Some(1),
                _ => None,
            },
            None => Some(self.coarse.get(l)),
        }
    }

    /// `Some(v)` if every index in `[start, end)` holds `v`; `None` if mixed or empty.
    pub fn uniform(&self, start: u64, end: u64) -> Option<u64> {
        if start >= end {
            return None;
        }
        if end - start == 1 {
            // One index: its value (a single-page conversion's "already there?" check).
            return Some(self.get(start));
        }
        let (head, (m0, m1), tail) = Self::pieces(start, end);
        let mut bit: Option<u64> = None;
        let mut agree = |b: Option<u64>| -> bool {
            match (b, bit) {
                (None, _) => false,
                (Some(x), None) => {
                    bit = Some(x);
                    true
                }
                (Some(x), Some(y)) => x == y,
            }
        };
        if let Some(p) = head
            && !agree(self.piece_uniform(p))
        {
            return None;
        }
        if m0 < m1 {
            let s = self.coarse.uniform(m0, m1).filter(|&s| s != MIXED);
            if !agree(s) {
                return None;
            }
        }
        if let Some(p) = tail
            && !agree(self.piece_uniform(p))
        {
            return None;
        }
        bit.map(|b| self.vals[b as usize])
    }

    /// Indices of one leaf piece holding `bit`.
    fn piece_count(&self, (l, a, z): (u64, u64, u64), bit: u64) -> u64 {
        match self.leaves.get(l) {
            Some(b) => {
                let n = ones(b, a, z);
                if bit == 1 { n } else { z - a - n }
            }
            None => {
                if self.coarse.get(l) == bit {
                    z - a
                } else {
                    0
                }
            }
        }
    }

    /// Indices of whole leaves `[m0, m1)` holding `bit`: O(runs + mixed leaves).
    fn full_count(&self, m0: u64, m1: u64, bit: u64) -> u64 {
        let mut n = 0u64;
        for (a, b, s) in self.coarse.runs(m0, m1) {
            if s == MIXED {
                for l in a..b {
                    n = n.saturating_add(self.piece_count((l, 0, LEAF), bit));
                }
            } else if s == bit {
                n = n.saturating_add((b - a).saturating_mul(LEAF));
            }
        }
        n
    }

    /// How many indices of `[start, end)` hold `value`.
    pub fn count(&self, start: u64, end: u64, value: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let Some(bit) = self.known_bit(value) else {
            return 0;
        };
        let (head, (m0, m1), tail) = Self::pieces(start, end);
        let mut n = 0u64;
        if let Some(p) = head {
            n += self.piece_count(p, bit);
        }
        if m0 < m1 {
            n = n.saturating_add(self.full_count(m0, m1, bit));
        }
        if let Some(p) = tail {
            n = n.saturating_add(self.piece_count(p, bit));
        }
        n
    }

    /// Mixed leaf `l` now holds `bit` everywhere: drop its bitmap, record it whole.
    fn collapse(&mut self, l: u64, bit: u64) {
        self.leaves.remove(l);
        self.coarse.set(l, l + 1, bit);
    }

    /// Set `[a, z)` of leaf `l` to `bit`; returns the indices changed.
    fn set_piece(&mut self, l: u64, a: u64, z: u64, bit: u64) -> u64 {
        if let Some(b) = self.leaves.get_mut(l) {
            let n = ones(b, a, z);
            let changed = if bit == 1 { z - a - n } else { n };
            if changed == 0 {
                return 0;
            }
            fill(b, a, z, bit == 1);
            if all_of(b, (a / 64) as usize, bit) {
                self.collapse(l, bit);
            }
            return changed;
        }
        let s = self.coarse.get(l);
        if s == bit {
            return 0;
        }
        let mut b = [if s == 1 { u64::MAX } else { 0 }; WORDS];
        fill(&mut b, a, z, bit == 1);
        if let Some(u) = uniform_leaf(&b) {
            self.coarse.set(l, l + 1, u);
        } else {
            self.leaves.insert(l, &b);
            self.coarse.set(l, l + 1, MIXED);
        }
        z - a
    }

    /// Set `[start, end)` to `value`; returns how many indices changed value.
    ///
    /// # Panics
    /// If `value` would be a third distinct value of the map.
    #[inline]
    pub fn set_count(&mut self, start: u64, end: u64, value: u64) -> u64 {
        if start < end
            && end - start == 1
            && let Some(changed) = self.set_one(start, value)
        {
            return u64::from(changed);
        }
        self.set_count_range(start, end, value)
    }

    /// Store `value` at `idx` if `idx` lies in a mixed leaf (a random single-page
    /// conversion: one word): `Some(changed)`. `None` when the leaf is uniform, and nothing
    /// was stored ([`BitAttrMap::set_count`] does that case).
    #[allow(clippy::inline_always)] // once per conversion; left to the inliner it stays a call
    #[inline(always)]
    pub fn set_one(&mut self, idx: u64, value: u64) -> Option<bool> {
        // A mixed leaf exists only once both values are known.
        let bit = self.known_bit(value)?;
        let b = self.leaves.get_mut(idx >> LEAF_SHIFT)?;
        let i = idx % LEAF;
        let (w, m) = ((i / 64) as usize, 1u64 << (i % 64));
        if (b[w] & m != 0) == (bit == 1) {
            return Some(false);
        }
        b[w] ^= m;
        if all_of(b, w, bit) {
            self.collapse(idx >> LEAF_SHIFT, bit);
        }
        Some(true)
    }

    /// [`BitAttrMap::set_count`] beyond its one-index case (out of line, as
    /// `Stage2::zap_range` is).
    #[inline(never)]
    fn set_count_range(&mut self, start: u64, end: u64, value: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let bit = self.bit_of(value);
        let (head, (m0, m1), tail) = Self::pieces(start, end);
        let mut changed = 0u64;
        if let Some((l, a, z)) = head {
            changed += self.set_piece(l, a, z, bit);
        }
        if m0 < m1 {
            let runs: Vec<(u64, u64, u64)> = self.coarse.runs(m0, m1).collect();
            for (a, b, s) in runs {
                if s == MIXED {
                    for l in a..b {
                        if let Some(bm) = self.leaves.remove(l) {
                            let n = ones(&bm, 0, LEAF);
                            changed += if bit == 1 { LEAF - n } else { n };
                        }
                    }
                } else if s != bit {
                    changed = changed.saturating_add((b - a).saturating_mul(LEAF));
                }
            }
            self.coarse.set(m0, m1, bit);
        }
        if let Some((l, a, z)) = tail {
            changed = changed.saturating_add(self.set_piece(l, a, z, bit));
        }
        changed
    }

    /// Set `[start, end)` to `value`. Returns whether anything changed.
    pub fn set(&mut self, start: u64, end: u64, value: u64) -> bool {
        self.set_count(start, end, value) > 0
    }

    /// Number of maximal runs of equal value over the whole index space.
    pub fn intervals(&self) -> usize {
        let mut n = 0usize;
        let mut last: Option<bool> = None;
        let mut push = |on: bool| {
            if last != Some(on) {
                n += 1;
                last = Some(on);
            }
        };
        // Leaves exist up to the one holding index u64::MAX - 1.
        for (a, b, s) in self.coarse.runs(0, (u64::MAX >> LEAF_SHIFT) + 1) {
            if s != MIXED {
                push(s == 1);
                continue;
            }
            for l in a..b {
                for (j, &w) in self.leaves[l].iter().enumerate() {
                    // Index u64::MAX, the last bit of the last leaf, is outside the domain.
                    let bits = if l == u64::MAX >> LEAF_SHIFT && j == WORDS - 1 {
                        63
                    } else {
                        64
                    };
                    match w {
                        0 => push(false),
                        u64::MAX if bits == 64 => push(true),
                        _ => (0..bits).for_each(|i| push((w >> i) & 1 == 1)),
                    }
                }
            }
        }
        n
    }

    /// Verify: the coarse map is coalesced and only holds clear/set/mixed; exactly the
    /// mixed leaves own a bitmap, and no bitmap is uniform.
    pub fn check(&self) -> Result<(), String> {
        self.coarse.check()?;
        let mut mixed = 0usize;
        for (a, b, s) in self.coarse.runs(0, u64::MAX) {
            if s > MIXED {
                return Err(format!("attribute leaf state {s} at leaf {a:#x}"));
            }
            if s == MIXED {
                for l in a..b {
                    let Some(bm) = self.leaves.get(l) else {
                        return Err(format!("mixed attribute leaf {l:#x} has no bitmap"));
                    };
                    if bm.len() != WORDS || uniform_leaf(bm).is_some() {
                        return Err(format!("attribute leaf {l:#x} marked mixed is uniform"));
                    }
                    mixed += 1;
                }
            }
        }
        if mixed != self.leaves.len() {
            return Err(format!(
                "{} attribute bitmaps for {mixed} mixed leaves",
                self.leaves.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_pages_and_ranges() {
        let mut m = BitAttrMap::new(0);
        assert_eq!(m.set_count(5, 6, 8), 1);
        assert_eq!(m.get(5), 8);
        assert_eq!(m.get(4), 0);
        assert_eq!(m.uniform(0, 5), Some(0));
        assert_eq!(m.uniform(4, 6), None);
        assert_eq!(m.intervals(), 3);
        assert_eq!(m.set_count(0, 1 << 20, 8), (1 << 20) - 1);
        assert_eq!(m.intervals(), 2);
        assert!(m.leaves.is_empty());
        assert_eq!(m.count(100, 1 << 21, 8), (1 << 20) - 100);
        assert_eq!(m.set_count(4095, 4097, 0), 2);
        assert_eq!(m.uniform(4095, 4097), Some(0));
        assert_eq!(m.count(0, 1 << 20, 0), 2);
        m.check().unwrap();
        assert_eq!(m.set_count(0, u64::MAX, 0), (1 << 20) - 2);
        assert_eq!(m.intervals(), 1);
        m.check().unwrap();
    }

    /// Mixed leaves near (array directory) and far (hashed directory pages, leaf numbers
    /// from 2^22 up) keep their bits through stores, removals with slot reuse, equality
    /// whatever the slab order, and a postcard round trip.
    #[test]
    fn leaves_near_and_far() {
        let far = 1u64 << 40;
        let idx = [
            3u64,
            4096 * 700 + 9,
            far + 1,
            far + 4096 * 513 + 77,
            u64::MAX - 5,
        ];
        let mut a = BitAttrMap::new(0);
        for &i in &idx {
            assert_eq!(a.set_count(i, i + 1, 8), 1);
        }
        assert_eq!(a.leaves.len(), idx.len());
        // Same content, built in the other order (other slab slots).
        let mut b = BitAttrMap::new(0);
        for &i in idx.iter().rev() {
            b.set_count(i, i + 1, 8);
        }
        assert_eq!(a, b);
        // Emptying a leaf frees its slot; the next mixed leaf reuses it.
        assert_eq!(a.set_count(idx[1], idx[1] + 1, 0), 1);
        assert_eq!(a.leaves.len(), idx.len() - 1);
        assert_ne!(a, b);
        a.set_count(4096 * 5, 4096 * 5 + 1, 8);
        assert_eq!(a.leaves.slab.len(), idx.len());
        for &i in &idx {
            let want = if i == idx[1] { 0 } else { 8 };
            assert_eq!((a.get(i), a.get(i + 1)), (want, 0), "index {i:#x}");
        }
        a.check().unwrap();
        let bytes = postcard::to_allocvec(&a).unwrap();
        let c: BitAttrMap = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(a, c);
        c.check().unwrap();
        assert_eq!(c.get(far + 4096 * 513 + 77), 8);
    }
}
