//! The stage-2 (EPT/NPT) page table of one VM: gfn -> (pfn, level, private).
//!
//! A lazily built radix: 1 GiB leaves in an ordered map, 2 MiB slots (a 2 MiB leaf, or a
//! table of 512 4 KiB entries with presence and private bitmaps) in a hash map. Only what
//! is mapped exists; a range zap probes the slots of a small range or walks the present
//! slots of a large one, and clears 4 KiB leaves through the bitmaps alone. Live leaf
//! counts per level are kept incrementally.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

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

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Table {
    present: [u64; 8],
    /// Which present entries are private: a filtered zap decides from the two bitmaps in
    /// the slot alone, without touching `entries` (a cache miss per page).
    private: [u64; 8],
    entries: Box<[u32]>,
    count: u32,
}

impl Table {
    fn new() -> Self {
        Self {
            present: [0; 8],
            private: [0; 8],
            entries: Box::new([0; 512]),
            count: 0,
        }
    }
    #[inline]
    fn has(&self, i: usize) -> bool {
        self.present[i / 64] & (1 << (i % 64)) != 0
    }
    fn set_bit(&mut self, i: usize, on: bool) {
        if on {
            self.present[i / 64] |= 1 << (i % 64);
        } else {
            self.present[i / 64] &= !(1 << (i % 64));
        }
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
enum Slot2M {
    Leaf(u32),
    Table(Table),
}

/// What a zap removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Zapped {
    /// Leaf entries removed (of any level).
    pub leaves: u64,
    /// 4 KiB pages those leaves covered.
    pub pages: u64,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Stage2 {
    l1g: BTreeMap<u64, u32>,
    /// 2 MiB slots by `gfn >> 9`: hashed, so a lookup is one probe.
    l2m: FxHashMap<u64, Slot2M>,
    counts: [u64; 3],
}

impl Stage2 {
    pub fn new() -> Self {
        Self::default()
    }

    /// Live leaves per level: `[4K, 2M, 1G]`.
    pub fn counts(&self) -> [u64; 3] {
        self.counts
    }

    /// The leaf mapping `gfn`, if any.
    #[inline]
    pub fn lookup(&self, gfn: u64) -> Option<Leaf> {
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
        match self.l2m.get(&(gfn >> 9))? {
            Slot2M::Leaf(e) => {
                let (pfn, private) = unpack(*e);
                Some(Leaf {
                    gfn: gfn & !511,
                    level: Level::L2M,
                    pfn,
                    private,
                })
            }
            Slot2M::Table(t) => {
                let i = (gfn & 511) as usize;
                t.has(i).then(|| {
                    let (pfn, private) = unpack(t.entries[i]);
                    Leaf {
                        gfn,
                        level: Level::L4K,
                        pfn,
                        private,
                    }
                })
            }
        }
    }

    /// Install a leaf at `gfn` (aligned to `level`) mapping `pfn` (aligned likewise).
    /// Anything already mapped inside the range is replaced; returns what was replaced.
    pub fn map(&mut self, gfn: u64, level: Level, pfn: u32, private: bool) -> Zapped {
        debug_assert_eq!(gfn % level.pages(), 0);
        let replaced = self.zap(gfn, gfn + level.pages(), None);
        let e = pack(pfn, private);
        match level {
            Level::L1G => {
                self.l1g.insert(gfn >> 18, e);
            }
            Level::L2M => {
                self.l2m.insert(gfn >> 9, Slot2M::Leaf(e));
            }
            Level::L4K => {
                let slot = self
                    .l2m
                    .entry(gfn >> 9)
                    .or_insert_with(|| Slot2M::Table(Table::new()));
                let Slot2M::Table(t) = slot else {
                    unreachable!("range was zapped")
                };
                let i = (gfn & 511) as usize;
                t.entries[i] = e;
                t.set_bit(i, true);
                if private {
                    t.private[i / 64] |= 1 << (i % 64);
                }
                t.count += 1;
            }
        }
        self.counts[level as usize] += 1;
        replaced
    }

    /// Remove every leaf intersecting `[start, end)` whose private flag matches `filter`
    /// (`None`: all). A huge leaf straddling the range is removed whole, as KVM does.
    pub fn zap(&mut self, start: u64, end: u64, filter: Option<bool>) -> Zapped {
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
        // Probe the slots of a small range; walk the present slots for a large one: either
        // way O(min(range / 512, slots present)).
        let (k0, k1) = (start >> 9, (end - 1) >> 9);
        if k1 - k0 < self.l2m.len() as u64 {
            for k in k0..=k1 {
                self.zap_slot(k, start, end, filter, &mut z);
            }
        } else {
            let keys: Vec<u64> = self
                .l2m
                .keys()
                .copied()
                .filter(|k| (k0..=k1).contains(k))
                .collect();
            for k in keys {
                self.zap_slot(k, start, end, filter, &mut z);
            }
        }
        z
    }

    /// Zap the leaves of 2 MiB slot `k` inside `[start, end)` that match `filter`.
    fn zap_slot(&mut self, k: u64, start: u64, end: u64, filter: Option<bool>, z: &mut Zapped) {
        let keep = |private: bool| filter.is_some_and(|f| f != private);
        let base = k << 9;
        let Some(slot) = self.l2m.get_mut(&k) else {
            return;
        };
        let remove = match slot {
            Slot2M::Leaf(e) => {
                if keep(unpack(*e).1) {
                    false
                } else {
                    self.counts[Level::L2M as usize] -= 1;
                    z.leaves += 1;
                    z.pages += Level::L2M.pages();
                    true
                }
            }
            Slot2M::Table(t) => {
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
                    let w = w as usize;
                    let mut bits = t.present[w] & mask;
                    match filter {
                        Some(true) => bits &= t.private[w],
                        Some(false) => bits &= !t.private[w],
                        None => {}
                    }
                    if bits == 0 {
                        continue;
                    }
                    let n = u64::from(bits.count_ones());
                    t.present[w] &= !bits;
                    t.private[w] &= !bits;
                    t.count -= n as u32;
                    self.counts[Level::L4K as usize] -= n;
                    z.leaves += n;
                    z.pages += n;
                }
                t.count == 0
            }
        };
        if remove {
            self.l2m.remove(&k);
        }
    }

    /// Every leaf, in gfn order within each level group.
    pub fn leaves(&self) -> Vec<Leaf> {
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
        let mut keys: Vec<u64> = self.l2m.keys().copied().collect();
        keys.sort_unstable();
        for k in keys {
            match &self.l2m[&k] {
                Slot2M::Leaf(e) => {
                    let (pfn, private) = unpack(*e);
                    out.push(Leaf {
                        gfn: k << 9,
                        level: Level::L2M,
                        pfn,
                        private,
                    });
                }
                Slot2M::Table(t) => {
                    for i in 0..512 {
                        if t.has(i) {
                            let (pfn, private) = unpack(t.entries[i]);
                            out.push(Leaf {
                                gfn: (k << 9) + i as u64,
                                level: Level::L4K,
                                pfn,
                                private,
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// Verify the counts and the shape (no 2 MiB slot under a 1 GiB leaf, no empty table).
    pub fn check(&self) -> Result<(), String> {
        let mut c = [0u64; 3];
        for (&k, s) in &self.l2m {
            if self.l1g.contains_key(&(k >> 9)) {
                return Err(format!(
                    "stage-2: 2 MiB slot {:#x} under a 1 GiB leaf",
                    k << 9
                ));
            }
            match s {
                Slot2M::Leaf(_) => c[1] += 1,
                Slot2M::Table(t) => {
                    let n: u32 = t.present.iter().map(|w| w.count_ones()).sum();
                    if n != t.count || n == 0 {
                        return Err(format!("stage-2: table at gfn {:#x} miscounted", k << 9));
                    }
                    for i in (0..512).filter(|&i| t.has(i)) {
                        let bit = t.private[i / 64] >> (i % 64) & 1 == 1;
                        if bit != unpack(t.entries[i]).1 {
                            return Err(format!(
                                "stage-2: private bit of gfn {:#x} disagrees with its entry",
                                (k << 9) + i as u64
                            ));
                        }
                    }
                    if (0..8).any(|w| t.private[w] & !t.present[w] != 0) {
                        return Err(format!(
                            "stage-2: private bits without entries at {:#x}",
                            k << 9
                        ));
                    }
                    c[0] += u64::from(n);
                }
            }
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
        s.map(5, Level::L4K, 100, true);
        s.map(512, Level::L2M, 1024, false);
        s.map(1 << 18, Level::L1G, 1 << 18, true);
        assert_eq!(s.counts(), [1, 1, 1]);
        let l = s.lookup(600).unwrap();
        assert_eq!(
            (l.gfn, l.level, l.pfn, l.private),
            (512, Level::L2M, 1024, false)
        );
        assert_eq!(s.lookup((1 << 18) + 7).unwrap().level, Level::L1G);
        assert!(s.lookup(6).is_none());
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
            s.map(g, Level::L4K, g as u32, true);
        }
        let r = s.map(0, Level::L2M, 0, true);
        assert_eq!(r.leaves, 512);
        assert_eq!(s.counts(), [0, 1, 0]);
        s.check().unwrap();
    }
}
