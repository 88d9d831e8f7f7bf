//! Fixed blocks of 512 entries in segments of 128 KiB that never move, but for the first,
//! which grows by doubling up to that size (a store of a few blocks stays small). A block
//! is found from its number by arithmetic, with no per-block pointer to load first, so
//! `apply` can prefetch an entry knowing only the number; freed blocks are reused, and the
//! arena stays at its high-water mark. The stage-2 frame tables, the host's frame-content
//! chunks and each guest_memfd's content chunks each live in one.

/// Entries per block.
pub const BLOCK: usize = 512;

/// Bytes per segment.
const SEG_BYTES: usize = 128 << 10;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BlockArena<T> {
    segs: Vec<Box<[T]>>,
    free: Vec<u32>,
    /// Blocks handed out so far (in use or free).
    len: u32,
}

impl<T> Default for BlockArena<T> {
    fn default() -> Self {
        Self {
            segs: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T: Copy + Default> BlockArena<T> {
    /// Blocks per segment.
    const PER_SEG: usize = SEG_BYTES / (BLOCK * std::mem::size_of::<T>());

    /// Segment and offset of block `b`.
    #[inline]
    fn at(b: u32) -> (usize, usize) {
        let b = b as usize;
        (b / Self::PER_SEG, (b % Self::PER_SEG) * BLOCK)
    }

    /// Blocks the first segment holds while `len` (> 0) blocks are handed out.
    fn first_blocks(len: u32) -> usize {
        (len as usize).next_power_of_two().min(Self::PER_SEG)
    }

    /// A block. A new one holds `T::default()`; a reused one what it held when released
    /// (the caller clears it if it must).
    pub fn alloc(&mut self) -> u32 {
        if let Some(b) = self.free.pop() {
            return b;
        }
        let b = self.len;
        if (b as usize) < Self::PER_SEG {
            // The first segment grows by doubling up to its full size (it may move: no
            // reference outlives `&mut self`), so that a store holding a few blocks (a
            // small guest_memfd's content, a small VM's frame tables) stays small, and a
            // lookup's arithmetic stays that of full segments.
            let want = Self::first_blocks(b + 1) * BLOCK;
            match self.segs.first_mut() {
                None => self.segs.push(vec![T::default(); want].into()),
                Some(g) if g.len() < want => {
                    let mut v = g.to_vec();
                    v.resize(want, T::default());
                    *g = v.into();
                }
                Some(_) => {}
            }
        } else if (b as usize).is_multiple_of(Self::PER_SEG) {
            self.segs
                .push(vec![T::default(); Self::PER_SEG * BLOCK].into());
        }
        self.len = b.checked_add(1).expect("fewer than 2^32 blocks");
        b
    }

    pub fn release(&mut self, b: u32) {
        self.free.push(b);
    }

    #[inline]
    pub fn block(&self, b: u32) -> &[T] {
        let (s, o) = Self::at(b);
        &self.segs[s][o..o + BLOCK]
    }

    #[inline]
    pub fn block_mut(&mut self, b: u32) -> &mut [T] {
        let (s, o) = Self::at(b);
        &mut self.segs[s][o..o + BLOCK]
    }

    /// Entry `i` of block `b` (one bounds check on the way).
    #[allow(clippy::inline_always)] // on every read; left to the inliner it stays a call
    #[inline(always)]
    pub fn entry(&self, b: u32, i: usize) -> &T {
        let (s, o) = Self::at(b);
        &self.segs[s][o + i]
    }

    /// Blocks handed out so far (in use or free).
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The blocks free for reuse.
    pub fn free(&self) -> &[u32] {
        &self.free
    }

    /// Whether the segments match the blocks handed out and the free list names each of
    /// them at most once (for an arena read from a snapshot, before anything indexes
    /// through it).
    pub fn shape_ok(&self) -> bool {
        let mut seen = vec![false; self.len as usize];
        self.segs.len() == (self.len as usize).div_ceil(Self::PER_SEG)
            && self.segs.iter().enumerate().all(|(s, g)| {
                g.len()
                    == if s == 0 {
                        Self::first_blocks(self.len) * BLOCK
                    } else {
                        Self::PER_SEG * BLOCK
                    }
            })
            && self
                .free
                .iter()
                .all(|&b| b < self.len && !std::mem::replace(&mut seen[b as usize], true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_reuse_and_shape() {
        let mut a: BlockArena<u64> = BlockArena::default();
        let per = BlockArena::<u64>::PER_SEG;
        // The first segment doubles as blocks are handed out, keeping what they hold.
        let mut sizes = Vec::new();
        for b in 0..4u32 {
            assert_eq!(a.alloc(), b);
            a.block_mut(b).fill(u64::from(b) + 1);
            sizes.push(a.segs[0].len() / BLOCK);
            assert!(a.shape_ok());
        }
        assert_eq!(sizes, vec![1, 2, 4, 4]);
        let blocks: Vec<u32> = (4..=per as u32).map(|_| a.alloc()).collect();
        assert_eq!(blocks, (4..=per as u32).collect::<Vec<_>>());
        assert_eq!(a.segs.len(), 2);
        assert_eq!(a.segs[0].len(), per * BLOCK);
        for b in 0..4u32 {
            assert!(a.block(b).iter().all(|&x| x == u64::from(b) + 1));
        }
        a.block_mut(3)[7] = 9;
        assert_eq!(*a.entry(3, 7), 9);
        assert_eq!(a.block(3)[7], 9);
        a.release(3);
        assert!(a.shape_ok());
        // A reused block keeps its entries.
        assert_eq!(a.alloc(), 3);
        assert_eq!(*a.entry(3, 7), 9);
        a.release(3);
        a.free.push(3);
        assert!(!a.shape_ok(), "a block freed twice");
        a.free.pop();
        assert!(a.shape_ok());
        a.len = 2 * per as u32 + 1; // three segments' worth, two held
        assert!(!a.shape_ok(), "segments missing");
    }
}
