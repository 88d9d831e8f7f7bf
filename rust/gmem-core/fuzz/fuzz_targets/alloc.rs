//! `BuddyAllocator` under arbitrary allocations and (partial) frees, against one free flag
//! per frame.
#![no_main]

use arbitrary::Arbitrary;
use gmem_core::alloc::{BuddyAllocator, MAX_ORDER};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Op {
    Alloc(u8),
    Free(u16),
    FreePiece { block: u16, sub: u8, which: u32 },
}

#[derive(Debug, Arbitrary)]
struct Input {
    total: u16,
    ops: Vec<Op>,
}

struct Harness {
    a: BuddyAllocator,
    free: Vec<bool>,
    held: Vec<(u32, u32)>,
}

impl Harness {
    fn has_block(&self, order: u32) -> bool {
        order <= MAX_ORDER
            && self
                .free
                .chunks_exact(1 << order)
                .any(|c| c.iter().all(|&f| f))
    }

    fn release(&mut self, p: u32, order: u32) {
        self.a.free(p, order);
        let p = p as usize;
        self.free[p..p + (1 << order)].fill(true);
    }

    fn compare(&self) {
        self.a.check().expect("check");
        let free = self.free.iter().filter(|&&f| f).count() as u64;
        assert_eq!(self.a.free_pages(), free);
        let blocks: Vec<(u32, u32)> = self.a.blocks().collect();
        let mut covered = vec![false; self.free.len()];
        for &(o, p) in &blocks {
            let p = p as usize;
            for c in &mut covered[p..p + (1 << o)] {
                assert!(!*c, "free blocks overlap");
                *c = true;
            }
            if o < MAX_ORDER {
                assert!(
                    !blocks.contains(&(o, (p as u32) ^ (1 << o))),
                    "unmerged buddies"
                );
            }
        }
        assert!(
            covered == self.free,
            "free blocks differ from the free frames"
        );
    }
}

fuzz_target!(|input: Input| {
    let total = u64::from(input.total % 8192) + 1;
    let mut h = Harness {
        a: BuddyAllocator::new(total),
        free: vec![true; total as usize],
        held: Vec::new(),
    };
    for op in input.ops.into_iter().take(256) {
        match op {
            Op::Alloc(order) => {
                let order = u32::from(order % (MAX_ORDER as u8 + 2));
                let possible = h.has_block(order);
                match h.a.alloc(order) {
                    Ok(p) => {
                        assert!(possible);
                        let (s, n) = (p as usize, 1usize << order);
                        assert_eq!(s % n, 0);
                        assert!(
                            h.free[s..s + n].iter().all(|&f| f),
                            "frame handed out twice"
                        );
                        h.free[s..s + n].fill(false);
                        h.held.push((p, order));
                    }
                    Err(_) => assert!(!possible, "ENOMEM with an aligned free block"),
                }
            }
            Op::Free(i) if !h.held.is_empty() => {
                let (p, o) = h.held.swap_remove(usize::from(i) % h.held.len());
                h.release(p, o);
            }
            Op::FreePiece { block, sub, which } if !h.held.is_empty() => {
                let (p, o) = h.held.swap_remove(usize::from(block) % h.held.len());
                let sub = u32::from(sub).min(o);
                let pieces = 1u32 << (o - sub);
                let k = which % pieces;
                for i in 0..pieces {
                    let q = p + (i << sub);
                    if i == k {
                        h.release(q, sub);
                    } else {
                        h.held.push((q, sub));
                    }
                }
            }
            Op::Free(_) | Op::FreePiece { .. } => {}
        }
        h.compare();
    }
    for (p, o) in std::mem::take(&mut h.held) {
        h.release(p, o);
    }
    h.compare();
    let mut now: Vec<(u32, u32)> = h.a.blocks().collect();
    let mut initial: Vec<(u32, u32)> = BuddyAllocator::new(total).blocks().collect();
    now.sort_unstable();
    initial.sort_unstable();
    assert_eq!(now, initial);
});
