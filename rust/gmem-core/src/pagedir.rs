//! A directory of fixed pages of 512 `u32` entries, by page number: pages below `NEAR`
//! in an array (found by index, with no hashing: two dependent loads from small arrays
//! that stay cached), the rest in a hash map. The array grows to the highest near page
//! held (8 bytes per page number), never with the size of the index space. The stage-2
//! table finds its 2 MiB slots through one (a page per 1 GiB of guest physical space),
//! and the dense chunk stores their chunks (a page per 2^18 indices).

use rustc_hash::FxHashMap;

/// Entries per page.
pub const ENTRIES: usize = 512;

/// Pages below this are held in the array: 2^13 pages of 2^18 indices cover 2^31, every
/// host frame and a guest_memfd's first 8 TiB; of 1 GiB regions, 8 TiB of guest physical
/// space.
pub const NEAR: u64 = 1 << 13;

/// The page and the entry within it of directory index `n`.
#[inline]
pub fn split(n: u64) -> (u64, usize) {
    (n / ENTRIES as u64, (n % ENTRIES as u64) as usize)
}

#[derive(Debug, Clone, Default)]
pub struct PageDir {
    near: Vec<Option<Box<[u32]>>>,
    far: FxHashMap<u64, Box<[u32]>>,
}

impl PageDir {
    /// The entry at directory index `n` (0 where its page is absent).
    #[allow(clippy::inline_always)] // on every lookup of the stores built on it
    #[inline(always)]
    pub fn at(&self, n: u64) -> u32 {
        let (p, i) = split(n);
        self.get(p).map_or(0, |page| page[i])
    }

    /// Page `p`, if held.
    #[inline]
    pub fn get(&self, p: u64) -> Option<&[u32]> {
        if p < NEAR {
            self.near.get(p as usize)?.as_deref()
        } else {
            self.far.get(&p).map(AsRef::as_ref)
        }
    }

    pub fn get_mut(&mut self, p: u64) -> Option<&mut [u32]> {
        if p < NEAR {
            self.near.get_mut(p as usize)?.as_deref_mut()
        } else {
            self.far.get_mut(&p).map(AsMut::as_mut)
        }
    }

    /// Page `p`, created all zero if absent.
    pub fn get_or_insert(&mut self, p: u64) -> &mut [u32] {
        let empty = || vec![0; ENTRIES].into_boxed_slice();
        if p < NEAR {
            let p = p as usize;
            if p >= self.near.len() {
                self.near.resize_with(p + 1, || None);
            }
            self.near[p].get_or_insert_with(empty)
        } else {
            self.far.entry(p).or_insert_with(empty)
        }
    }

    /// Drop page `p`.
    pub fn remove(&mut self, p: u64) {
        if p < NEAR {
            if let Some(e) = self.near.get_mut(p as usize) {
                *e = None;
            }
            // Shrink the array to the highest page left.
            while self.near.last().is_some_and(Option::is_none) {
                self.near.pop();
            }
        } else {
            self.far.remove(&p);
        }
    }

    /// Clear entry `i` of page `p`, dropping the page once all its entries are zero;
    /// returns what the entry held (0 if nothing, or if the page is absent).
    pub fn take(&mut self, p: u64, i: usize) -> u32 {
        let Some(page) = self.get_mut(p) else {
            return 0;
        };
        let e = std::mem::take(&mut page[i]);
        if e != 0 && page.iter().all(|&x| x == 0) {
            self.remove(p);
        }
        e
    }

    /// An upper bound of the pages held (array slots and hashed pages).
    pub fn span(&self) -> usize {
        self.near.len() + self.far.len()
    }

    /// The pages held, as `(p, page)`, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u32])> {
        let near = self
            .near
            .iter()
            .enumerate()
            .filter_map(|(p, e)| e.as_deref().map(|e| (p as u64, e)));
        near.chain(self.far.iter().map(|(&p, e)| (p, e.as_ref())))
    }

    /// Whether no held page is all zero and the array ends with a page (what `remove`
    /// keeps true for callers that drop emptied pages).
    pub fn trimmed(&self) -> bool {
        !self.iter().any(|(_, e)| e.iter().all(|&x| x == 0))
            && !self.near.last().is_some_and(Option::is_none)
    }
}

/// Stored as a map from page number to page (whatever the in-memory split).
impl serde::Serialize for PageDir {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.iter().count()))?;
        for (p, e) in self.iter() {
            m.serialize_entry(&p, e)?;
        }
        m.end()
    }
}

impl<'de> serde::Deserialize<'de> for PageDir {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = FxHashMap::<u64, Box<[u32]>>::deserialize(d)?;
        let mut dir = Self::default();
        for (p, e) in map {
            if e.len() != ENTRIES {
                return Err(serde::de::Error::invalid_length(e.len(), &"512 entries"));
            }
            dir.get_or_insert(p).copy_from_slice(&e);
        }
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_and_far_pages() {
        let mut d = PageDir::default();
        for p in [0, NEAR - 1, NEAR, 1 << 40] {
            d.get_or_insert(p)[3] = 7;
        }
        assert_eq!(d.get(NEAR).map(|e| e[3]), Some(7));
        assert_eq!(d.get(NEAR + 1), None);
        let mut held: Vec<u64> = d.iter().map(|(p, _)| p).collect();
        held.sort_unstable();
        assert_eq!(held, vec![0, NEAR - 1, NEAR, 1 << 40]);
        d.remove(NEAR - 1);
        d.remove(1 << 40);
        assert_eq!(d.span(), 2);
        assert!(d.trimmed());
        let bytes = postcard::to_allocvec(&d).unwrap();
        let back: PageDir = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.get(0).map(|e| e[3]), Some(7));
        assert_eq!(back.get(NEAR).map(|e| e[3]), Some(7));
    }
}
