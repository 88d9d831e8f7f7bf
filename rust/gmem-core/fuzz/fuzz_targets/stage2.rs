//! `Stage2` under arbitrary maps and zaps, against a plain list of leaves.
#![no_main]

use arbitrary::Arbitrary;
use gmem_core::stage2::{Leaf, Level, Stage2, Zapped};
use libfuzzer_sys::fuzz_target;

/// A gfn: 1 GiB region (three at the bottom, one at the top of the 52-bit gfn space),
/// 2 MiB slot and page inside it.
#[derive(Debug, Clone, Copy, Arbitrary)]
struct Gfn {
    region: u8,
    slot: u16,
    page: u16,
}

impl Gfn {
    fn get(self) -> u64 {
        let region = [0u64, 1, 2, (1 << 34) - 1][usize::from(self.region % 4)];
        (region << 18) + (u64::from(self.slot % 512) << 9) + u64::from(self.page % 512)
    }
}

#[derive(Debug, Arbitrary)]
enum Op {
    Map {
        gfn: Gfn,
        level: u8,
        pfn: u16,
        private: bool,
    },
    Zap {
        start: Gfn,
        len: u32,
        filter: Option<bool>,
    },
    ZapRaw {
        start: u64,
        end: u64,
        filter: Option<bool>,
    },
}

fn end_of(l: &Leaf) -> u64 {
    l.gfn + l.level.pages()
}

fn remove(leaves: &mut Vec<Leaf>, start: u64, end: u64, filter: Option<bool>) -> Zapped {
    let mut z = Zapped::default();
    if start >= end {
        return z;
    }
    leaves.retain(|l| {
        let hit = l.gfn < end && end_of(l) > start && filter.is_none_or(|f| f == l.private);
        if hit {
            z.leaves += 1;
            z.pages += l.level.pages();
        }
        !hit
    });
    z
}

fn sorted(mut v: Vec<Leaf>) -> Vec<Leaf> {
    v.sort_by_key(|l| (l.gfn, l.level));
    v
}

fuzz_target!(|ops: Vec<Op>| {
    let mut s = Stage2::new();
    let mut model: Vec<Leaf> = Vec::new();
    for op in ops.into_iter().take(128) {
        match op {
            Op::Map {
                gfn,
                level,
                pfn,
                private,
            } => {
                let level = [Level::L4K, Level::L2M, Level::L1G][usize::from(level % 3)];
                let n = level.pages();
                let gfn = gfn.get() / n * n;
                let pfn = (u32::from(pfn) << level.order()) & ((1 << 31) - 1);
                let leaf = Leaf {
                    gfn,
                    level,
                    pfn,
                    private,
                };
                let expect = remove(&mut model, gfn, gfn + n, None);
                model.push(leaf);
                assert_eq!(s.map(gfn, level, pfn, private, &()), expect);
            }
            Op::Zap { start, len, filter } => {
                let start = start.get();
                let end = start.saturating_add(u64::from(len));
                assert_eq!(
                    s.zap(start, end, filter),
                    remove(&mut model, start, end, filter)
                );
            }
            Op::ZapRaw { start, end, filter } => {
                assert_eq!(
                    s.zap(start, end, filter),
                    remove(&mut model, start, end, filter)
                );
            }
        }
        s.check().expect("check");
        let mut counts = [0u64; 3];
        for l in &model {
            counts[l.level as usize] += 1;
        }
        assert_eq!(s.counts(), counts);
        assert_eq!(sorted(s.leaves(&())), sorted(model.clone()));
        for l in &model {
            for g in [
                Some(l.gfn),
                Some(end_of(l) - 1),
                Some(end_of(l)),
                l.gfn.checked_sub(1),
            ]
            .into_iter()
            .flatten()
            {
                let expect = model.iter().find(|m| m.gfn <= g && g < end_of(m)).copied();
                assert_eq!(s.lookup(g, &()), expect);
            }
        }
    }
});
