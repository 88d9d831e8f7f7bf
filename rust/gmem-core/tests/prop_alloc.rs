//! `BuddyAllocator` against a naive model: one free flag per frame.
//!
//! Blocks handed out must be naturally aligned, in range, made of free frames, and
//! disjoint from each other. Because buddies merge eagerly, a buddy allocator fails an
//! allocation exactly when no naturally aligned run of free frames of that size exists,
//! so `ENOMEM` is checked in both directions. Freeing everything must give back the
//! initial block set.

use gmem_core::alloc::{BuddyAllocator, MAX_ORDER};
use gmem_core::error::errno;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Alloc(u32),
    /// Free the allocated block at this index (modulo the number held).
    Free(usize),
    /// Free one naturally aligned piece of order `sub` of a held block, keeping the rest.
    FreePiece {
        block: usize,
        sub: u32,
        which: u64,
    },
}

fn op(max_order: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop_oneof![4 => 0u32..4, 2 => 0..=max_order, 1 => Just(MAX_ORDER + 1)].prop_map(Op::Alloc),
        2 => any::<usize>().prop_map(Op::Free),
        1 => (any::<usize>(), 0u32..MAX_ORDER, any::<u64>())
            .prop_map(|(block, sub, which)| Op::FreePiece { block, sub, which }),
    ]
}

struct Harness {
    a: BuddyAllocator,
    free: Vec<bool>,
    held: Vec<(u32, u32)>,
}

impl Harness {
    fn new(total: u64) -> Self {
        Self {
            a: BuddyAllocator::new(total),
            free: vec![true; total as usize],
            held: Vec::new(),
        }
    }

    fn total(&self) -> u64 {
        self.free.len() as u64
    }

    /// Whether the naive model has a naturally aligned all-free run of `2^order` frames.
    fn model_has_block(&self, order: u32) -> bool {
        if order > MAX_ORDER {
            return false;
        }
        let n = 1usize << order;
        self.free.chunks_exact(n).any(|c| c.iter().all(|&f| f))
    }

    fn alloc(&mut self, order: u32) -> Result<(), TestCaseError> {
        let possible = self.model_has_block(order);
        let before = self.a.free_pages();
        match self.a.alloc(order) {
            Ok(p) => {
                prop_assert!(
                    possible,
                    "alloc({}) = {:#x} but no aligned free block",
                    order,
                    p
                );
                let (p64, n) = (u64::from(p), 1u64 << order);
                prop_assert_eq!(p64 % n, 0, "block {:#x} of order {} misaligned", p, order);
                prop_assert!(p64 + n <= self.total(), "block {:#x} beyond the end", p);
                for f in &mut self.free[p64 as usize..(p64 + n) as usize] {
                    prop_assert!(*f, "alloc({}) = {:#x} hands out a frame in use", order, p);
                    *f = false;
                }
                prop_assert_eq!(self.a.free_pages(), before - n);
                self.held.push((p, order));
                self.probe(p64.saturating_sub(1), p64 + n + 1)?;
            }
            Err(e) => {
                prop_assert_eq!(e.errno(), errno::ENOMEM);
                prop_assert!(
                    !possible,
                    "alloc({}) failed though an aligned free block exists",
                    order
                );
                prop_assert_eq!(self.a.free_pages(), before);
            }
        }
        Ok(())
    }

    fn release(&mut self, p: u32, order: u32) -> Result<(), TestCaseError> {
        let before = self.a.free_pages();
        self.a.free(p, order);
        let (p64, n) = (u64::from(p), 1u64 << order);
        for f in &mut self.free[p64 as usize..(p64 + n) as usize] {
            *f = true;
        }
        prop_assert_eq!(self.a.free_pages(), before + n);
        self.probe(p64.saturating_sub(1), p64 + n + 1)
    }

    /// `is_free` agrees with the model on `[lo, hi)` (clipped to the frames that exist).
    fn probe(&self, lo: u64, hi: u64) -> Result<(), TestCaseError> {
        for p in lo..hi.min(self.total()) {
            prop_assert_eq!(
                self.a.is_free(p as u32),
                self.free[p as usize],
                "is_free({:#x})",
                p
            );
        }
        Ok(())
    }

    /// The free blocks cover exactly the model's free frames, and no two free buddies of
    /// the same order coexist (they would have been merged).
    fn compare(&self) -> Result<(), TestCaseError> {
        self.a.check().map_err(TestCaseError::fail)?;
        let free_count = self.free.iter().filter(|&&f| f).count() as u64;
        prop_assert_eq!(self.a.free_pages(), free_count);
        let blocks: Vec<(u32, u32)> = self.a.blocks().collect();
        let per_order = self.a.free_blocks();
        prop_assert_eq!(per_order.len(), MAX_ORDER as usize + 1);
        for (o, &n) in per_order.iter().enumerate() {
            prop_assert_eq!(
                blocks.iter().filter(|b| b.0 as usize == o).count() as u64,
                n
            );
        }
        let mut covered = vec![false; self.free.len()];
        for &(o, p) in &blocks {
            let (p64, n) = (u64::from(p), 1u64 << o);
            for c in &mut covered[p64 as usize..(p64 + n) as usize] {
                prop_assert!(!*c, "free blocks overlap at {:#x}", p);
                *c = true;
            }
            if o < MAX_ORDER {
                let buddy = (o, p ^ (1 << o));
                prop_assert!(
                    !blocks.contains(&buddy),
                    "free buddies {:#x}/{:#x} of order {} not merged",
                    p,
                    buddy.1,
                    o
                );
            }
        }
        prop_assert!(
            covered == self.free,
            "free blocks differ from the free frames"
        );
        Ok(())
    }

    fn run(&mut self, ops: Vec<Op>) -> Result<(), TestCaseError> {
        self.compare()?;
        for op in ops {
            match op {
                Op::Alloc(order) => self.alloc(order)?,
                Op::Free(i) if !self.held.is_empty() => {
                    let (p, o) = self.held.swap_remove(i % self.held.len());
                    self.release(p, o)?;
                }
                Op::FreePiece { block, sub, which } if !self.held.is_empty() => {
                    let (p, o) = self.held.swap_remove(block % self.held.len());
                    let sub = sub.min(o);
                    let pieces = 1u64 << (o - sub);
                    let k = which % pieces;
                    for i in 0..pieces {
                        let q = p + ((i as u32) << sub);
                        if i == k {
                            self.release(q, sub)?;
                        } else {
                            self.held.push((q, sub));
                        }
                    }
                }
                Op::Free(_) | Op::FreePiece { .. } => {}
            }
            self.compare()?;
        }
        let snapshot: Vec<(u32, u32)> = self.a.blocks().collect();
        let copy = BuddyAllocator::from_blocks(self.total(), &snapshot).expect("valid snapshot");
        prop_assert_eq!(copy.blocks().collect::<Vec<_>>(), snapshot);
        prop_assert_eq!(copy.free_pages(), self.a.free_pages());
        self.probe(0, self.total())?;
        for (p, o) in std::mem::take(&mut self.held) {
            self.release(p, o)?;
        }
        self.compare()?;
        let mut now: Vec<(u32, u32)> = self.a.blocks().collect();
        let mut initial: Vec<(u32, u32)> = BuddyAllocator::new(self.total()).blocks().collect();
        now.sort_unstable();
        initial.sort_unstable();
        prop_assert_eq!(
            now,
            initial,
            "freeing everything did not restore the initial blocks"
        );
        prop_assert_eq!(self.a.free_pages(), self.total());
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn buddy_matches_free_frame_model(
        total in prop_oneof![1u64..=64, 1u64..=4096, Just(4096u64), Just(3000u64)],
        ops in prop::collection::vec(op(12), 1..100),
    ) {
        Harness::new(total).run(ops)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Hosts beyond one 1 GiB block: top-order blocks, and a tail split into every order.
    #[test]
    fn buddy_matches_model_beyond_max_order(
        total in prop_oneof![Just((1u64 << 19) - 1), Just((1u64 << 18) + 1), (1u64 << 18)..(1 << 19)],
        ops in prop::collection::vec(op(MAX_ORDER), 1..24),
    ) {
        Harness::new(total).run(ops)?;
    }
}

/// `from_blocks` refuses misaligned, overlapping and out-of-range blocks.
#[test]
fn from_blocks_rejects_bad_blocks() {
    assert!(BuddyAllocator::from_blocks(8, &[(0, 0), (1, 2), (2, 4)]).is_some());
    assert!(
        BuddyAllocator::from_blocks(8, &[(1, 1)]).is_none(),
        "misaligned"
    );
    assert!(
        BuddyAllocator::from_blocks(8, &[(2, 0), (1, 2)]).is_none(),
        "overlap"
    );
    assert!(
        BuddyAllocator::from_blocks(8, &[(3, 8)]).is_none(),
        "out of range"
    );
    assert!(
        BuddyAllocator::from_blocks(8, &[(MAX_ORDER + 1, 0)]).is_none(),
        "order"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `alloc_pages(n)` gives exactly the pages, in the order, that `n` calls of
    /// `alloc(0)` give, and leaves the same free blocks, from any fragmented state; asking
    /// for more than is free is `ENOMEM` and changes nothing.
    #[test]
    fn alloc_pages_is_n_single_allocations(
        total in prop_oneof![1u64..=64, 1u64..=4096, Just(3000u64)],
        setup in prop::collection::vec((0u32..6, any::<bool>()), 0..60),
        n in 0u64..1200,
    ) {
        // Fragment: allocate blocks, then free every other one.
        let mut a = BuddyAllocator::new(total);
        let mut held = Vec::new();
        for (order, keep) in setup {
            if let Ok(p) = a.alloc(order) {
                if keep { held.push((p, order)); } else { a.free(p, order); }
            }
        }
        for (i, &(p, o)) in held.iter().enumerate() {
            if i % 2 == 0 {
                a.free(p, o);
            }
        }
        let mut singles = a.clone();
        let bulk = a.alloc_pages(n);
        if n > singles.free_pages() {
            prop_assert_eq!(bulk.unwrap_err().errno(), errno::ENOMEM);
            prop_assert_eq!(a.blocks().collect::<Vec<_>>(), singles.blocks().collect::<Vec<_>>());
            return Ok(());
        }
        let pages: Vec<u32> = bulk
            .unwrap()
            .into_iter()
            .flat_map(|(p, len)| (0..len as u32).map(move |i| p + i))
            .collect();
        let one_by_one: Vec<u32> = (0..n).map(|_| singles.alloc(0).unwrap()).collect();
        prop_assert_eq!(pages, one_by_one);
        prop_assert_eq!(a.free_pages(), singles.free_pages());
        prop_assert_eq!(a.blocks().collect::<Vec<_>>(), singles.blocks().collect::<Vec<_>>());
        a.check().unwrap();
    }
}
