//! `AttrMap` against naive models.
//!
//! Over a small index space the model is one value per index (`Vec<u64>`); near the top
//! of the u64 space, where no vector fits, it is the list of writes applied so far (the
//! last write covering an index decides its value). Every query of the map is compared
//! with the model after every store, and `check()` must hold throughout.
//!
//! The map covers indices `[0, u64::MAX)`: `run_at` reports `u64::MAX` as the exclusive
//! end of the last run, and a range end is exclusive, so no store can name index
//! `u64::MAX` itself. The models therefore never query it.

use gmem_core::attr_map::AttrMap;
use proptest::prelude::*;

/// Size of the index space the per-index model covers.
const SPACE: u64 = 2048;
const DEFAULT: u64 = 0;

/// Values drawn from a small set so that neighbouring runs often coincide (coalescing).
fn value() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(8), Just(1), Just(u64::MAX)]
}

/// An index of `0..=SPACE`, biased towards a few hot spots so ranges overlap and touch.
fn index() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..=SPACE,
        prop::sample::select(vec![
            0u64, 1, 2, 63, 64, 65, 511, 512, 513, 1024, 2047, 2048
        ]),
        (0u64..8).prop_map(|k| k * 256),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    /// A store through `set` or, when `counted`, through `set_count`.
    Set {
        start: u64,
        end: u64,
        value: u64,
        counted: bool,
    },
    /// Queries only: compare `uniform`/`runs`/`count`/`run_at` on this range.
    Query { start: u64, end: u64, value: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (index(), index(), value(), any::<bool>())
            .prop_map(|(start, end, value, counted)| Op::Set { start, end, value, counted }),
        1 => (index(), index(), value()).prop_map(|(start, end, value)| Op::Query { start, end, value }),
    ]
}

/// Maximal runs of the naive model, as `(start, end, value)`; the last one reaches
/// `u64::MAX` (indices beyond `SPACE` hold `DEFAULT`).
fn model_runs(model: &[u64]) -> Vec<(u64, u64, u64)> {
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    let values = model.iter().copied().chain(std::iter::once(DEFAULT));
    for (i, v) in values.enumerate() {
        let i = i as u64;
        match runs.last_mut() {
            Some(r) if r.2 == v => r.1 = i + 1,
            _ => runs.push((i, i + 1, v)),
        }
    }
    runs.last_mut().expect("non-empty").1 = u64::MAX;
    runs
}

/// The model's runs intersecting `[start, end)`, clipped.
fn clip(runs: &[(u64, u64, u64)], start: u64, end: u64) -> Vec<(u64, u64, u64)> {
    if start >= end {
        return Vec::new();
    }
    runs.iter()
        .filter(|r| r.0 < end && r.1 > start)
        .map(|r| (r.0.max(start), r.1.min(end), r.2))
        .collect()
}

fn compare_range(map: &AttrMap, runs: &[(u64, u64, u64)], start: u64, end: u64, value: u64) {
    let expect = clip(runs, start, end);
    let got: Vec<_> = map.runs(start, end).collect();
    assert_eq!(got, expect, "runs({start}, {end})");
    let count: u64 = expect
        .iter()
        .filter(|r| r.2 == value)
        .map(|r| r.1 - r.0)
        .sum();
    assert_eq!(
        map.count(start, end, value),
        count,
        "count({start}, {end}, {value})"
    );
    let uniform = match expect.as_slice() {
        [one] => Some(one.2),
        _ => None,
    };
    assert_eq!(map.uniform(start, end), uniform, "uniform({start}, {end})");
    if start < u64::MAX {
        let r = runs.iter().find(|r| r.0 <= start && start < r.1).copied();
        assert_eq!(Some(map.run_at(start)), r, "run_at({start})");
    }
}

fn compare_all(map: &AttrMap, model: &[u64]) -> Vec<(u64, u64, u64)> {
    map.check().expect("check");
    for (i, &v) in model.iter().enumerate() {
        assert_eq!(map.get(i as u64), v, "get({i})");
    }
    for i in [SPACE, SPACE + 1, 1 << 40, u64::MAX - 1] {
        assert_eq!(map.get(i), DEFAULT, "get({i}) beyond every store");
    }
    let runs = model_runs(model);
    assert_eq!(map.intervals(), runs.len(), "intervals");
    let points: Vec<(u64, u64)> = runs.iter().map(|r| (r.0, r.2)).collect();
    assert_eq!(map.breakpoints().collect::<Vec<_>>(), points, "breakpoints");
    assert_eq!(AttrMap::from_breakpoints(&points).as_ref(), Some(map));
    runs
}

/// The write-history model: any index of `[0, u64::MAX)`.
#[derive(Debug, Default)]
struct History {
    writes: Vec<(u64, u64, u64)>,
}

impl History {
    fn get(&self, idx: u64) -> u64 {
        self.writes
            .iter()
            .rev()
            .find(|w| w.0 <= idx && idx < w.1)
            .map_or(DEFAULT, |w| w.2)
    }

    /// Maximal runs: the value is constant between consecutive write endpoints.
    fn runs(&self) -> Vec<(u64, u64, u64)> {
        let mut cuts: Vec<u64> = vec![0];
        for w in &self.writes {
            cuts.push(w.0);
            cuts.push(w.1);
        }
        cuts.retain(|&c| c < u64::MAX);
        cuts.sort_unstable();
        cuts.dedup();
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        for (k, &c) in cuts.iter().enumerate() {
            let e = cuts.get(k + 1).copied().unwrap_or(u64::MAX);
            let v = self.get(c);
            match runs.last_mut() {
                Some(r) if r.2 == v => r.1 = e,
                _ => runs.push((c, e, v)),
            }
        }
        runs
    }
}

/// Indices around both ends of the space and around 2^32 and 2^63.
fn wide_index() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..64,
        (0u64..64).prop_map(|d| u64::MAX - d),
        (0u64..64).prop_map(|d| (1 << 32) - 32 + d),
        (0u64..64).prop_map(|d| (1 << 63) - 32 + d),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn attr_map_matches_per_index_model(default in value(), ops in prop::collection::vec(op(), 1..60)) {
        // Build the map from its default through a store so the model's "beyond SPACE"
        // rule stays DEFAULT while index 0..SPACE starts from `default`.
        let mut map = AttrMap::new(DEFAULT);
        let mut model = vec![DEFAULT; SPACE as usize];
        map.set(0, SPACE, default);
        model.fill(default);
        let mut runs = compare_all(&map, &model);
        for op in ops {
            match op {
                Op::Set { start, end, value, counted } => {
                    let changes = if start < end {
                        model[start as usize..end as usize].iter().filter(|&&v| v != value).count() as u64
                    } else {
                        0
                    };
                    if counted {
                        let n = map.set_count(start, end, value);
                        prop_assert_eq!(n, changes, "set_count({}, {}, {})", start, end, value);
                    } else {
                        let changed = map.set(start, end, value);
                        prop_assert_eq!(changed, changes > 0, "set({}, {}, {})", start, end, value);
                    }
                    if start < end {
                        model[start as usize..end as usize].fill(value);
                    }
                    runs = compare_all(&map, &model);
                    compare_range(&map, &runs, start, end, value);
                    compare_range(&map, &runs, start.saturating_sub(1), end.saturating_add(1), value);
                }
                Op::Query { start, end, value } => compare_range(&map, &runs, start, end, value),
            }
        }
        compare_range(&map, &runs, 0, u64::MAX, default);
    }

    #[test]
    fn attr_map_matches_history_model_over_u64(
        writes in prop::collection::vec((wide_index(), wide_index(), value()), 1..40),
        probes in prop::collection::vec((wide_index(), wide_index()), 8),
    ) {
        let mut map = AttrMap::new(DEFAULT);
        let mut model = History::default();
        for (start, end, value) in writes {
            let before: Vec<_> = model.runs();
            let changes: u64 = clip(&before, start, end)
                .iter()
                .filter(|r| r.2 != value)
                .map(|r| r.1 - r.0)
                .sum();
            prop_assert_eq!(map.set_count(start, end, value), changes);
            if start < end {
                model.writes.push((start, end, value));
            }
            map.check().map_err(TestCaseError::fail)?;
            let runs = model.runs();
            prop_assert_eq!(map.intervals(), runs.len());
            let points: Vec<(u64, u64)> = runs.iter().map(|r| (r.0, r.2)).collect();
            prop_assert_eq!(map.breakpoints().collect::<Vec<_>>(), points);
            for &(a, b) in &probes {
                if a < u64::MAX {
                    prop_assert_eq!(map.get(a), model.get(a), "get({})", a);
                }
                compare_range(&map, &runs, a, b, value);
            }
        }
    }

    /// `from_breakpoints` accepts exactly the valid breakpoint lists: distinct keys, key 0
    /// present, neighbours (in key order) holding different values.
    #[test]
    fn from_breakpoints_validates(points in prop::collection::vec((0u64..8, 0u64..3), 0..8)) {
        let mut sorted = points.clone();
        sorted.sort_unstable();
        let distinct = sorted.windows(2).all(|w| w[0].0 != w[1].0);
        let valid = distinct
            && sorted.first().is_some_and(|p| p.0 == 0)
            && sorted.windows(2).all(|w| w[0].1 != w[1].1);
        let map = AttrMap::from_breakpoints(&points);
        prop_assert_eq!(map.is_some(), valid, "{:?}", points);
        if let Some(m) = map {
            prop_assert_eq!(m.breakpoints().collect::<Vec<_>>(), sorted);
        }
    }
}

/// Regression: `runs` and `count` used to build the BTreeMap range
/// `(Excluded(start), Excluded(start))` for an empty range, which panics.
#[test]
fn runs_of_empty_range_is_empty() {
    let mut map = AttrMap::new(0);
    map.set(10, 20, 8);
    for (a, b) in [
        (5, 5),
        (10, 10),
        (15, 15),
        (20, 20),
        (7, 3),
        (20, 10),
        (u64::MAX, 0),
    ] {
        assert_eq!(map.runs(a, b).count(), 0, "runs({a}, {b})");
        assert_eq!(map.count(a, b, 8), 0, "count({a}, {b})");
        assert_eq!(map.uniform(a, b), None, "uniform({a}, {b})");
    }
}
