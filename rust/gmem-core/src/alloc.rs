//! The host page allocator: a binary buddy allocator over page frame numbers.
//!
//! Free blocks of each order live in a compressed bitmap (`roaring`), so a free page costs
//! at most about one bit (dense runs) and an untouched host is a handful of 1 GiB blocks.
//! Allocation takes the lowest free block of the smallest sufficient order and splits it,
//! which keeps runs deterministic; freeing merges buddies back up to `MAX_ORDER`.

use roaring::RoaringBitmap;

use crate::error::{Result, err, errno};

/// Largest block: 2^18 pages = 1 GiB.
pub const MAX_ORDER: u32 = 18;
/// Frames are u32 and page-cache entries store `pfn + 1` in 31 bits: up to 2^31 - 1 pages
/// (8 TiB) of host memory.
pub const MAX_PAGES: u64 = (1 << 31) - 1;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BuddyAllocator {
    total: u64,
    free_pages: u64,
    free: Vec<RoaringBitmap>,
}

impl BuddyAllocator {
    /// An allocator over `total` pages, all free.
    pub fn new(total: u64) -> Self {
        assert!(total <= MAX_PAGES, "host larger than {MAX_PAGES} pages");
        let mut free = vec![RoaringBitmap::new(); MAX_ORDER as usize + 1];
        let mut pfn = 0u64;
        while pfn < total {
            let mut order = MAX_ORDER;
            while order > 0 && (!pfn.is_multiple_of(1 << order) || pfn + (1 << order) > total) {
                order -= 1;
            }
            free[order as usize].insert(pfn as u32);
            pfn += 1 << order;
        }
        Self {
            total,
            free_pages: total,
            free,
        }
    }

    pub fn total_pages(&self) -> u64 {
        self.total
    }

    pub fn free_pages(&self) -> u64 {
        self.free_pages
    }

    /// Allocate a naturally aligned block of `2^order` pages; `ENOMEM` when none is left.
    pub fn alloc(&mut self, order: u32) -> Result<u32> {
        let found = (order..=MAX_ORDER).find(|&o| !self.free[o as usize].is_empty());
        let Some(mut o) = found else {
            return Err(err(
                errno::ENOMEM,
                format!("host memory exhausted: no free block of order {order}"),
            ));
        };
        let pfn = self.free[o as usize].min().expect("non-empty");
        self.free[o as usize].remove(pfn);
        while o > order {
            o -= 1;
            self.free[o as usize].insert(pfn + (1u32 << o));
        }
        self.free_pages -= 1 << order;
        Ok(pfn)
    }

    /// `n` single pages, exactly those `n` calls of `alloc(0)` in a row would return, in
    /// that order, leaving the same free blocks; returned as runs `(first pfn, pages)` in
    /// O(blocks taken) rather than O(n). All or nothing: `ENOMEM`, taking nothing, when
    /// fewer than `n` pages are free.
    ///
    /// Why it is the same: `alloc(0)` splits a block of order `o` only when every smaller
    /// order is empty, and then takes the split block's pages in ascending order (each
    /// split leaves the upper halves free, the smallest of them taken next); so `n`
    /// allocations take whole blocks, smallest order and lowest pfn first, and the first
    /// pages of the last one, whose remainder is left in its aligned decomposition.
    pub fn alloc_pages(&mut self, n: u64) -> Result<Vec<(u32, u64)>> {
        if n > self.free_pages {
            return Err(err(
                errno::ENOMEM,
                format!(
                    "host memory exhausted: {n} pages asked, {} free",
                    self.free_pages
                ),
            ));
        }
        let mut runs: Vec<(u32, u64)> = Vec::new();
        let mut left = n;
        while left > 0 {
            let o = (0..=MAX_ORDER)
                .find(|&o| !self.free[o as usize].is_empty())
                .expect("enough pages are free");
            let pfn = self.free[o as usize].min().expect("non-empty");
            self.free[o as usize].remove(pfn);
            let take = left.min(1 << o);
            // The untaken tail of the block, in aligned blocks.
            let (mut x, end) = (u64::from(pfn) + take, u64::from(pfn) + (1u64 << o));
            while x < end {
                let k = x.trailing_zeros().min((end - x).ilog2());
                self.free[k as usize].insert(x as u32);
                x += 1 << k;
            }
            match runs.last_mut() {
                Some((p, len)) if u64::from(*p) + *len == u64::from(pfn) => *len += take,
                _ => runs.push((pfn, take)),
            }
            left -= take;
        }
        self.free_pages -= n;
        Ok(runs)
    }

    /// Return a block allocated with [`alloc`](Self::alloc) (or a piece of one: any
    /// naturally aligned sub-block may be freed on its own).
    pub fn free(&mut self, pfn: u32, order: u32) {
        debug_assert!(u64::from(pfn) + (1u64 << order) <= self.total);
        debug_assert!(!self.is_free(pfn), "double free of pfn {pfn:#x}");
        self.free_pages += 1 << order;
        let mut pfn = pfn;
        let mut order = order;
        while order < MAX_ORDER {
            let buddy = pfn ^ (1u32 << order);
            if u64::from(buddy) + (1u64 << order) > self.total
                || !self.free[order as usize].remove(buddy)
            {
                break;
            }
            pfn = pfn.min(buddy);
            order += 1;
        }
        self.free[order as usize].insert(pfn);
    }

    /// Whether `pfn` lies inside a free block.
    pub fn is_free(&self, pfn: u32) -> bool {
        (0..=MAX_ORDER).any(|o| self.free[o as usize].contains(pfn & !((1u32 << o) - 1)))
    }

    /// Number of free blocks per order.
    pub fn free_blocks(&self) -> Vec<u64> {
        self.free.iter().map(RoaringBitmap::len).collect()
    }

    /// Approximate heap bytes held by the free sets.
    pub fn heap_bytes(&self) -> usize {
        self.free.iter().map(RoaringBitmap::serialized_size).sum()
    }

    /// Free blocks as `(order, pfn)` (for snapshots).
    pub fn blocks(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.free
            .iter()
            .enumerate()
            .flat_map(|(o, b)| b.iter().map(move |p| (o as u32, p)))
    }

    /// Rebuild from free blocks; `None` if they overlap, are misaligned or out of range.
    pub fn from_blocks(total: u64, blocks: &[(u32, u32)]) -> Option<Self> {
        if total > MAX_PAGES {
            return None;
        }
        let mut free = vec![RoaringBitmap::new(); MAX_ORDER as usize + 1];
        let mut free_pages = 0;
        for &(o, p) in blocks {
            if o > MAX_ORDER || p % (1 << o) != 0 || u64::from(p) + (1 << o) > total {
                return None;
            }
            free[o as usize].insert(p);
            free_pages += 1u64 << o;
        }
        let a = Self {
            total,
            free_pages,
            free,
        };
        a.check().ok()?;
        Some(a)
    }

    /// Verify: blocks aligned, in range, disjoint, counts agree.
    pub fn check(&self) -> std::result::Result<(), String> {
        let mut spans: Vec<(u64, u64)> = Vec::new();
        for (o, p) in self.blocks() {
            let buddy = u64::from(p) ^ (1u64 << o);
            if o < MAX_ORDER
                && buddy + (1u64 << o) <= self.total
                && self.free[o as usize].contains(buddy as u32)
            {
                return Err(format!(
                    "free buddies {p:#x} and {buddy:#x} of order {o} not merged"
                ));
            }
            let p = u64::from(p);
            if p % (1 << o) != 0 || p + (1 << o) > self.total {
                return Err(format!(
                    "free block {p:#x} of order {o} misaligned or out of range"
                ));
            }
            spans.push((p, p + (1 << o)));
        }
        spans.sort_unstable();
        let mut sum = 0;
        for w in spans.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(format!("free blocks overlap at pfn {:#x}", w[1].0));
            }
        }
        for s in &spans {
            sum += s.1 - s.0;
        }
        if sum != self.free_pages {
            return Err(format!(
                "allocator free count {} != recount {sum}",
                self.free_pages
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_merge() {
        let mut a = BuddyAllocator::new(1 << 10);
        let p = a.alloc(0).unwrap();
        assert_eq!(p, 0);
        assert_eq!(a.free_pages(), 1023);
        let q = a.alloc(9).unwrap();
        assert_eq!(q, 512);
        a.free(p, 0);
        a.free(q, 9);
        assert_eq!(a.free_blocks()[10], 1);
        assert_eq!(a.free_blocks().iter().sum::<u64>(), 1);
        a.check().unwrap();
    }

    #[test]
    fn exhaustion_is_enomem() {
        let mut a = BuddyAllocator::new(3);
        a.alloc(0).unwrap();
        a.alloc(0).unwrap();
        a.alloc(0).unwrap();
        assert_eq!(a.alloc(0).unwrap_err().errno(), errno::ENOMEM);
        let mut b = BuddyAllocator::new(1000);
        assert_eq!(b.alloc(10).unwrap_err().errno(), errno::ENOMEM);
    }
}
