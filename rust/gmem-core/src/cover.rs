//! How many memslots of a VM point at each host virtual address: a piecewise-constant
//! count kept as the start of each piece and its count. The VM's footprint counts an
//! anonymous page once when the count at its address is positive, so a memslot made or
//! deleted changes the footprint only by the pages where the count leaves or reaches 0 —
//! found in O(pieces in its range), whatever the number of memslots.

use std::collections::BTreeMap;

/// Canonical: no piece starts with count 0 before the first positive one, and no two
/// neighbouring pieces have the same count; the last piece (to 2^64) has count 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cover(BTreeMap<u64, u32>);

impl Cover {
    /// The count at `addr`.
    #[inline]
    pub fn at(&self, addr: u64) -> u32 {
        self.0.range(..=addr).next_back().map_or(0, |(_, &c)| c)
    }

    /// Add one (`up`) or remove one over `[a0, a1)`; returns the ranges where the count went
    /// from 0 to 1 (adding) or from 1 to 0 (removing), in order.
    ///
    /// # Panics
    /// When removing from a range not covered (a caller bug).
    pub fn change(&mut self, a0: u64, a1: u64, up: bool) -> Vec<(u64, u64)> {
        if a0 >= a1 {
            return Vec::new();
        }
        for at in [a0, a1] {
            let c = self.at(at);
            self.0.entry(at).or_insert(c);
        }
        let starts: Vec<u64> = self.0.range(a0..a1).map(|(&k, _)| k).collect();
        let mut edges: Vec<(u64, u64)> = Vec::new();
        for (i, &s) in starts.iter().enumerate() {
            let e = starts.get(i + 1).copied().unwrap_or(a1);
            let c = self.0.get_mut(&s).expect("a piece start");
            let edge = if up {
                *c += 1;
                *c == 1
            } else {
                *c = c
                    .checked_sub(1)
                    .expect("removing a range that is not covered");
                *c == 0
            };
            if edge {
                match edges.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => edges.push((s, e)),
                }
            }
        }
        // Re-canonicalise around the pieces touched.
        for s in starts.into_iter().chain([a1]) {
            let before = self.0.range(..s).next_back().map_or(0, |(_, &c)| c);
            if self.0.get(&s) == Some(&before) {
                self.0.remove(&s);
            }
        }
        edges
    }

    /// The cover of the given ranges, built from scratch (for invariant checks).
    pub fn of(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut c = Self::default();
        for (a0, a1) in ranges {
            c.change(a0, a1, true);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_edges_and_stays_canonical() {
        let mut c = Cover::default();
        assert_eq!(c.change(10, 20, true), vec![(10, 20)]);
        assert_eq!(c.change(15, 30, true), vec![(20, 30)]);
        assert_eq!(
            (c.at(9), c.at(10), c.at(15), c.at(25), c.at(30)),
            (0, 1, 2, 1, 0)
        );
        assert_eq!(c.change(10, 20, false), vec![(10, 15)]);
        assert_eq!(c, Cover::of([(15, 30)]));
        assert_eq!(c.change(15, 30, false), vec![(15, 30)]);
        assert_eq!(c, Cover::default());
        // Many equal ranges: two pieces whatever their number.
        for _ in 0..1000 {
            c.change(0, 8, true);
        }
        assert_eq!(c.0.len(), 2);
        assert_eq!(c.change(0, 8, false), vec![]);
        assert_eq!(c.at(4), 999);
    }

    #[test]
    #[should_panic(expected = "not covered")]
    fn removing_uncovered_panics() {
        Cover::default().change(0, 4, false);
    }
}
