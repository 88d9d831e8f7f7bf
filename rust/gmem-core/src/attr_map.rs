//! A coalescing interval map over page indices (gfns or file offsets).
//!
//! Stored as breakpoints: `starts[k] = v` means indices from `k` up to the next key hold `v`.
//! Key 0 is always present, so the map covers the whole index space at all times — the
//! shape of the in-place series' per-inode maple tree, which also covers every index. Two
//! neighbouring runs never hold the same value. Setting a range is O(log n + runs
//! removed), a point lookup O(log n), a uniformity query O(log n); the kernel's mainline
//! xarray instead stores one entry per gfn.

use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Unbounded};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AttrMap {
    starts: BTreeMap<u64, u64>,
}

impl AttrMap {
    /// A map holding `default` everywhere.
    pub fn new(default: u64) -> Self {
        let mut starts = BTreeMap::new();
        starts.insert(0, default);
        Self { starts }
    }

    /// The value at `idx`.
    pub fn get(&self, idx: u64) -> u64 {
        *self
            .starts
            .range(..=idx)
            .next_back()
            .expect("key 0 always present")
            .1
    }

    /// The run containing `idx`: `(start, end, value)` with `end` exclusive (`u64::MAX`
    /// for the last run).
    pub fn run_at(&self, idx: u64) -> (u64, u64, u64) {
        let (&s, &v) = self
            .starts
            .range(..=idx)
            .next_back()
            .expect("key 0 always present");
        let e = self
            .starts
            .range((Excluded(idx), Unbounded))
            .next()
            .map_or(u64::MAX, |(&k, _)| k);
        (s, e, v)
    }

    /// `Some(v)` if every index in `[start, end)` holds `v`; `None` if the range is mixed or
    /// empty.
    pub fn uniform(&self, start: u64, end: u64) -> Option<u64> {
        if start >= end {
            return None;
        }
        let v = self.get(start);
        let split = self
            .starts
            .range((Excluded(start), Excluded(end)))
            .next()
            .is_some();
        (!split).then_some(v)
    }

    /// Set `[start, end)` to `value`. Returns whether anything changed.
    pub fn set(&mut self, start: u64, end: u64, value: u64) -> bool {
        self.set_count(start, end, value) > 0
    }

    /// Set `[start, end)` to `value`; returns how many indices changed value. One ordered
    /// walk from `end` down to `start` finds the value after the range, the breakpoints
    /// inside it and the value before it; then only those breakpoints are touched.
    pub fn set_count(&mut self, start: u64, end: u64, value: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let mut iter = self.starts.range(..=end).rev();
        let (&k0, &v0) = iter.next().expect("key 0 always present");
        let after = (end != u64::MAX).then_some(v0);
        let mut cur = (k0, v0);
        if k0 == end {
            let (&k, &v) = iter.next().expect("start < end, so a run covers end - 1");
            cur = (k, v);
        }
        let mut hi = end;
        let mut changed = 0u64;
        let before = loop {
            let (k, v) = cur;
            if v != value {
                changed += hi - k.max(start);
            }
            if k > start {
                hi = k;
                let (&nk, &nv) = iter.next().expect("key 0 always present");
                cur = (nk, nv);
                continue;
            }
            if k == start {
                break if start == 0 {
                    None
                } else {
                    iter.next().map(|(_, &pv)| pv)
                };
            }
            break Some(v);
        };
        if changed == 0 {
            return 0;
        }
        // Every breakpoint in [start, end] goes; the two edges are re-laid below.
        self.starts
            .extract_if(start..=end, |_, _| true)
            .for_each(drop);
        if before != Some(value) {
            self.starts.insert(start, value);
        }
        if let Some(a) = after
            && a != value
        {
            self.starts.insert(end, a);
        }
        changed
    }

    /// The runs intersecting `[start, end)`, clipped to it: `(start, end, value)`.
    pub fn runs(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        let mut items: Vec<(u64, u64)> = Vec::new();
        if start < end {
            items.push((start, self.get(start)));
            items.extend(
                self.starts
                    .range((Excluded(start), Excluded(end)))
                    .map(|(&k, &v)| (k, v)),
            );
        }
        let n = items.len();
        (0..n).map(move |i| {
            let e = if i + 1 < n { items[i + 1].0 } else { end };
            (items[i].0, e, items[i].1)
        })
    }

    /// How many indices of `[start, end)` hold `value`: O(runs in the range).
    pub fn count(&self, start: u64, end: u64, value: u64) -> u64 {
        self.runs(start, end)
            .filter(|r| r.2 == value)
            .map(|r| r.1 - r.0)
            .sum()
    }

    /// Number of runs (intervals) in the whole map.
    pub fn intervals(&self) -> usize {
        self.starts.len()
    }

    /// Every run as `(start, value)` breakpoints, in order (for snapshots and checks).
    pub fn breakpoints(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.starts.iter().map(|(&k, &v)| (k, v))
    }

    /// Rebuild from breakpoints; `None` if they are not a valid map.
    pub fn from_breakpoints(points: &[(u64, u64)]) -> Option<Self> {
        let starts: BTreeMap<u64, u64> = points.iter().copied().collect();
        let map = Self { starts };
        map.check().ok()?;
        (map.starts.len() == points.len()).then_some(map)
    }

    /// Verify the structural invariants: key 0 present, neighbours differ.
    pub fn check(&self) -> Result<(), String> {
        if !self.starts.contains_key(&0) {
            return Err("attribute map does not cover index 0".into());
        }
        let mut prev: Option<u64> = None;
        for (&k, &v) in &self.starts {
            if prev == Some(v) {
                return Err(format!("attribute map not coalesced at index {k:#x}"));
            }
            prev = Some(v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_and_coalesce() {
        let mut m = AttrMap::new(0);
        assert!(m.set(10, 20, 8));
        assert_eq!(m.get(9), 0);
        assert_eq!(m.get(10), 8);
        assert_eq!(m.get(19), 8);
        assert_eq!(m.get(20), 0);
        assert_eq!(m.intervals(), 3);
        assert!(m.set(20, 30, 8));
        assert_eq!(m.intervals(), 3);
        assert!(m.set(0, 10, 8));
        assert_eq!(m.intervals(), 2);
        assert!(!m.set(5, 25, 8));
        assert!(m.set(0, 30, 0));
        assert_eq!(m.intervals(), 1);
        m.check().unwrap();
    }

    #[test]
    fn uniform_and_runs() {
        let mut m = AttrMap::new(0);
        m.set(512, 1024, 8);
        assert_eq!(m.uniform(512, 1024), Some(8));
        assert_eq!(m.uniform(0, 512), Some(0));
        assert_eq!(m.uniform(511, 513), None);
        let runs: Vec<_> = m.runs(500, 1100).collect();
        assert_eq!(runs, vec![(500, 512, 0), (512, 1024, 8), (1024, 1100, 0)]);
        assert_eq!(m.count(0, 2048, 8), 512);
        assert_eq!(m.run_at(700), (512, 1024, 8));
    }

    #[test]
    fn top_of_space() {
        let mut m = AttrMap::new(0);
        m.set(u64::MAX - 5, u64::MAX, 8);
        assert_eq!(m.get(u64::MAX - 1), 8);
        assert_eq!(m.run_at(u64::MAX - 1).1, u64::MAX);
        m.check().unwrap();
    }
}
