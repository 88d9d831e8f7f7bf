//! `AttrMap` under arbitrary stores over the whole u64 index space, against the
//! write-history model (the last store covering an index decides its value).
#![no_main]

use arbitrary::Arbitrary;
use gmem_core::attr_map::AttrMap;
use libfuzzer_sys::fuzz_target;

/// An index: small, near the top of the space, or anything.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Index {
    Low(u16),
    High(u16),
    Raw(u64),
}

impl Index {
    fn get(self) -> u64 {
        match self {
            Index::Low(i) => u64::from(i % 1100),
            Index::High(i) => u64::MAX - u64::from(i % 1100),
            Index::Raw(i) => i,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// A store through `set` or, when `counted`, through `set_count`.
    Set {
        start: Index,
        end: Index,
        value: u8,
        counted: bool,
    },
    Query {
        start: Index,
        end: Index,
        value: u8,
    },
}

#[derive(Debug, Arbitrary)]
struct Input {
    default: u8,
    ops: Vec<Op>,
}

/// Maximal runs of the history model as `(start, end, value)`, covering `[0, u64::MAX)`.
fn runs(default: u64, writes: &[(u64, u64, u64)]) -> Vec<(u64, u64, u64)> {
    let get = |i: u64| {
        writes
            .iter()
            .rev()
            .find(|w| w.0 <= i && i < w.1)
            .map_or(default, |w| w.2)
    };
    let mut cuts: Vec<u64> = vec![0];
    for w in writes {
        cuts.extend([w.0, w.1]);
    }
    cuts.retain(|&c| c < u64::MAX);
    cuts.sort_unstable();
    cuts.dedup();
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for (k, &c) in cuts.iter().enumerate() {
        let e = cuts.get(k + 1).copied().unwrap_or(u64::MAX);
        let v = get(c);
        match out.last_mut() {
            Some(r) if r.2 == v => r.1 = e,
            _ => out.push((c, e, v)),
        }
    }
    out
}

fn compare_range(map: &AttrMap, model: &[(u64, u64, u64)], start: u64, end: u64, value: u64) {
    let expect: Vec<(u64, u64, u64)> = if start < end {
        model
            .iter()
            .filter(|r| r.0 < end && r.1 > start)
            .map(|r| (r.0.max(start), r.1.min(end), r.2))
            .collect()
    } else {
        Vec::new()
    };
    assert_eq!(map.runs(start, end).collect::<Vec<_>>(), expect);
    let count: u64 = expect
        .iter()
        .filter(|r| r.2 == value)
        .map(|r| r.1 - r.0)
        .sum();
    assert_eq!(map.count(start, end, value), count);
    let uniform = match expect.as_slice() {
        [one] => Some(one.2),
        _ => None,
    };
    assert_eq!(map.uniform(start, end), uniform);
    if start < u64::MAX {
        let r = model.iter().find(|r| r.0 <= start && start < r.1).copied();
        assert_eq!(Some(map.run_at(start)), r);
        assert_eq!(map.get(start), r.expect("covered").2);
    }
}

fuzz_target!(|input: Input| {
    let default = u64::from(input.default % 4);
    let mut map = AttrMap::new(default);
    let mut writes: Vec<(u64, u64, u64)> = Vec::new();
    let mut model = runs(default, &writes);
    for op in input.ops.into_iter().take(64) {
        match op {
            Op::Set {
                start,
                end,
                value,
                counted,
            } => {
                let (start, end, value) = (start.get(), end.get(), u64::from(value % 4));
                let changes: u64 = if start < end {
                    model
                        .iter()
                        .filter(|r| r.0 < end && r.1 > start && r.2 != value)
                        .map(|r| r.1.min(end) - r.0.max(start))
                        .sum()
                } else {
                    0
                };
                if counted {
                    assert_eq!(map.set_count(start, end, value), changes);
                } else {
                    assert_eq!(map.set(start, end, value), changes > 0);
                }
                if start < end {
                    writes.push((start, end, value));
                }
                model = runs(default, &writes);
                map.check().expect("check");
                assert_eq!(map.intervals(), model.len());
                let points: Vec<(u64, u64)> = model.iter().map(|r| (r.0, r.2)).collect();
                assert_eq!(map.breakpoints().collect::<Vec<_>>(), points);
                assert_eq!(AttrMap::from_breakpoints(&points).as_ref(), Some(&map));
                compare_range(&map, &model, start, end, value);
            }
            Op::Query { start, end, value } => {
                compare_range(&map, &model, start.get(), end.get(), u64::from(value % 4));
            }
        }
    }
});
