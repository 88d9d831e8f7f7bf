//! `Stage2` against a naive model: a plain list of leaves.
//!
//! A leaf maps every gfn of `[gfn, gfn + level.pages())`; `map` first removes every leaf
//! intersecting its range, `zap` removes every leaf intersecting the range whose private
//! flag matches the filter — whole, as KVM does for a huge leaf straddling the range.
//! The model answers each query by a linear scan; a list (rather than one entry per gfn)
//! keeps 1 GiB leaves cheap to model while staying just as obviously right.

use gmem_core::stage2::{Frames, Leaf, Level, Stage2, Zapped};
use proptest::prelude::*;

const LEVELS: [Level; 3] = [Level::L4K, Level::L2M, Level::L1G];

/// 1 GiB regions used: the bottom of the space, both sides of the table's indexed/hashed
/// directory boundary (region 2^12), and the top of the 52-bit gfn space (gpas must fit
/// in 64 bits).
const REGIONS: [u64; 6] = [0, 1, 2, (1 << 12) - 1, 1 << 12, (1 << 34) - 1];

fn end_of(l: &Leaf) -> u64 {
    l.gfn + l.level.pages()
}

#[derive(Debug, Default)]
struct Model {
    leaves: Vec<Leaf>,
}

impl Model {
    fn remove(&mut self, start: u64, end: u64, filter: Option<bool>) -> Zapped {
        let mut z = Zapped::default();
        if start >= end {
            return z;
        }
        self.leaves.retain(|l| {
            let hit = l.gfn < end && end_of(l) > start && filter.is_none_or(|f| f == l.private);
            if hit {
                z.leaves += 1;
                z.pages += l.level.pages();
            }
            !hit
        });
        z
    }

    fn map(&mut self, leaf: Leaf) -> Zapped {
        let z = self.remove(leaf.gfn, end_of(&leaf), None);
        self.leaves.push(leaf);
        z
    }

    fn lookup(&self, gfn: u64) -> Option<Leaf> {
        let mut hits = self
            .leaves
            .iter()
            .filter(|l| l.gfn <= gfn && gfn < end_of(l));
        let first = hits.next().copied();
        assert!(hits.next().is_none(), "model: leaves overlap at {gfn:#x}");
        first
    }

    fn counts(&self) -> [u64; 3] {
        let mut c = [0; 3];
        for l in &self.leaves {
            c[l.level as usize] += 1;
        }
        c
    }
}

/// Two guest_memfd page caches that never change (a live mapping's page stays in place,
/// as the kernel's invalidate-before-truncate order guarantees): file 0 holds frame
/// `off + 4096` at page `off` (consecutive frames, so runs), file 1 a scattered frame.
struct Caches;

impl Frames for Caches {
    fn frame(&self, file: u32, off: u64) -> u32 {
        if file == 0 {
            (off.wrapping_add(4096) & 0x3fff_ffff) as u32
        } else {
            (off.wrapping_mul(2_654_435_761) >> 7 & 0x3fff_ffff) as u32
        }
    }
}

/// A gfn in one of the regions, near the edges of its 2 MiB and 1 GiB blocks.
fn gfn() -> impl Strategy<Value = u64> {
    let slot = prop_oneof![0u64..4, 508u64..512];
    let page = prop_oneof![0u64..8, 504u64..512, 0u64..512];
    (prop::sample::select(REGIONS.to_vec()), slot, page)
        .prop_map(|(r, s, p)| (r << 18) + (s << 9) + p)
}

fn level() -> impl Strategy<Value = Level> {
    prop_oneof![6 => Just(Level::L4K), 3 => Just(Level::L2M), 1 => Just(Level::L1G)]
}

#[derive(Debug, Clone)]
enum Op {
    Map {
        gfn: u64,
        level: Level,
        pfn: u32,
        private: bool,
    },
    Zap {
        start: u64,
        end: u64,
        filter: Option<bool>,
    },
    /// A private 4 KiB leaf from page `gfn + delta` (wrapping) of guest_memfd `file`.
    MapFile { gfn: u64, file: u32, delta: u64 },
    /// `n` private 4 KiB leaves at once from pages `gfn + delta ..` of `file`, over a range
    /// zapped first (`map_file_run` requires nothing mapped there).
    MapFileRun {
        gfn: u64,
        n: u64,
        file: u32,
        delta: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (gfn(), level(), 0u32..1 << 12, any::<bool>()).prop_map(|(g, level, pfn, private)| {
            let align = level.pages();
            Op::Map {
                gfn: g / align * align,
                level,
                // Frames stay below 2^31 (bit 31 of an entry is the private flag).
                pfn: (pfn << level.order()) & ((1 << 31) - 1),
                private,
            }
        }),
        1 => (gfn(), prop_oneof![0u64..4, 0u64..1024, Just(1 << 18), Just(u64::MAX)], any::<Option<bool>>())
            .prop_map(|(start, len, filter)| Op::Zap {
                start,
                end: start.saturating_add(len),
                filter,
            }),
        3 => (gfn(), 0u32..2, prop_oneof![Just(0u64), Just(7), Just(u64::MAX - 2)])
            .prop_map(|(gfn, file, delta)| Op::MapFile { gfn, file, delta }),
        1 => (gfn(), prop_oneof![3 => 1u64..40, 1 => 500u64..1100], 0u32..2, prop_oneof![Just(0u64), Just(7), Just(u64::MAX - 2)])
            .prop_map(|(gfn, n, file, delta)| Op::MapFileRun { gfn, n, file, delta }),
        // Rarely, an inverted or huge range.
        1 => (gfn(), gfn(), any::<Option<bool>>())
            .prop_map(|(start, end, filter)| Op::Zap { start, end, filter }),
    ]
}

fn sorted(mut v: Vec<Leaf>) -> Vec<Leaf> {
    v.sort_by_key(|l| (l.gfn, l.level));
    v
}

fn compare(s: &Stage2, model: &Model, probes: &[u64]) -> Result<(), TestCaseError> {
    s.check().map_err(TestCaseError::fail)?;
    prop_assert_eq!(s.counts(), model.counts());
    prop_assert_eq!(sorted(s.leaves(&Caches)), sorted(model.leaves.clone()));
    let mut gfns: Vec<u64> = probes.to_vec();
    for l in &model.leaves {
        gfns.extend([l.gfn, end_of(l) - 1, end_of(l)]);
        gfns.extend(l.gfn.checked_sub(1));
    }
    for g in gfns {
        prop_assert_eq!(s.lookup(g, &Caches), model.lookup(g), "lookup({:#x})", g);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn stage2_matches_leaf_list(
        ops in prop::collection::vec(op(), 1..80),
        probes in prop::collection::vec(gfn(), 16),
    ) {
        let mut s = Stage2::new();
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Map { gfn, level, pfn, private } => {
                    let leaf = Leaf { gfn, level, pfn, private };
                    let got = s.map(gfn, level, pfn, private, &Caches);
                    prop_assert_eq!(got, model.map(leaf), "map {:?}", leaf);
                    prop_assert_eq!(s.lookup(gfn, &Caches), Some(leaf));
                }
                Op::MapFile { gfn, file, delta } => {
                    let off = gfn.wrapping_add(delta);
                    let pfn = Caches.frame(file, off);
                    let leaf = Leaf { gfn, level: Level::L4K, pfn, private: true };
                    let got = s.map_file(gfn, pfn, file, off, &Caches);
                    prop_assert_eq!(got, model.map(leaf), "map_file {:?}", leaf);
                    prop_assert_eq!(s.lookup(gfn, &Caches), Some(leaf));
                }
                Op::MapFileRun { gfn, n, file, delta } => {
                    let end = gfn + n;
                    let mapped = model.leaves.iter().any(|l| l.gfn < end && end_of(l) > gfn);
                    prop_assert_eq!(s.mapped_in(gfn, end), mapped, "mapped_in({:#x}, {:#x})", gfn, end);
                    prop_assert_eq!(s.zap(gfn, end, None), model.remove(gfn, end, None));
                    prop_assert!(!s.mapped_in(gfn, end));
                    s.map_file_run(gfn, n, file, gfn.wrapping_add(delta), &Caches);
                    for g in gfn..end {
                        let pfn = Caches.frame(file, g.wrapping_add(delta));
                        model.leaves.push(Leaf { gfn: g, level: Level::L4K, pfn, private: true });
                    }
                    prop_assert!(s.mapped_in(gfn, end));
                }
                Op::Zap { start, end, filter } => {
                    let got = s.zap(start, end, filter);
                    prop_assert_eq!(got, model.remove(start, end, filter), "zap({:#x}, {:#x}, {:?})", start, end, filter);
                }
            }
            compare(&s, &model, &probes)?;
        }
        // Zapping everything empties the table whatever was left.
        let left = model.remove(0, u64::MAX, None);
        prop_assert_eq!(s.zap(0, u64::MAX, None), left);
        prop_assert_eq!(s.counts(), [0, 0, 0]);
        prop_assert!(s.leaves(&Caches).is_empty());
        s.check().map_err(TestCaseError::fail)?;
    }

    /// Each level's leaf, mapped over a full table of smaller leaves, replaces all of them.
    #[test]
    fn huge_map_replaces_everything_below(region in 0u64..3, private in any::<bool>(), lvl in 1usize..3) {
        let level = LEVELS[lvl];
        let base = region << 18;
        let mut s = Stage2::new();
        let mut model = Model::default();
        let below = LEVELS[lvl - 1];
        let mut g = base;
        while g < base + level.pages() {
            let leaf = Leaf { gfn: g, level: below, pfn: 0, private: !private };
            s.map(g, below, 0, !private, &Caches);
            model.map(leaf);
            g += below.pages().max(level.pages() / 4);
        }
        let leaf = Leaf { gfn: base, level, pfn: 0, private };
        prop_assert_eq!(s.map(base, level, 0, private, &Caches), model.map(leaf));
        compare(&s, &model, &[base, base + level.pages() - 1, base + level.pages()])?;
    }
}
