//! `SparseVec` against a `BTreeMap` holding only the non-default entries, with either
//! chunk store.
//!
//! Indices cluster in a few chunks (both edges of each, and chunks far apart up to the
//! top of the u64 space for the hashed store, up to chunk 1000 for the dense one) so that
//! stores share chunks, chunks empty out and get released, and range clears cut chunks
//! partially and cover others whole.

use std::collections::BTreeMap;

use gmem_core::sparse::{CHUNK, ChunkStore, Dense, Hashed, SparseVec};
use proptest::prelude::*;

const CHUNKS: [u64; 7] = [0, 1, 2, 3, 1 << 40, u64::MAX / CHUNK - 1, u64::MAX / CHUNK];
/// The dense store grows to its highest chunk: keep them low (pages of 512 chunks).
/// A dense store's near directory ends at chunk key 2^22 (2^31 indices); keys above go to
/// its hash map, up to the end of the space (a guest_memfd's content is by file page).
const DENSE_CHUNKS: [u64; 12] = [
    0,
    1,
    2,
    3,
    511,
    512,
    1000,
    (1 << 22) - 1,
    1 << 22,
    1 << 40,
    u64::MAX / CHUNK - 1,
    u64::MAX / CHUNK,
];

fn index(chunks: &'static [u64]) -> impl Strategy<Value = u64> + Clone {
    let within = prop_oneof![0u64..4, CHUNK - 4..CHUNK, 0..CHUNK];
    (prop::sample::select(chunks), within).prop_map(|(c, i)| c * CHUNK + i)
}

/// A range bound: an index, or the very ends of the space.
fn bound(chunks: &'static [u64]) -> impl Strategy<Value = u64> {
    prop_oneof![8 => index(chunks), 1 => Just(0u64), 1 => Just(u64::MAX)]
}

fn value() -> impl Strategy<Value = u32> {
    prop_oneof![2 => Just(0u32), 3 => 1u32..4, 1 => Just(u32::MAX)]
}

/// The first value of a counting fill: small, near the top of u32 (the run wraps through
/// the default), or 0 (the run starts at the default).
fn counting_start() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 1u32..1000, 1 => u32::MAX - 600..=u32::MAX, 1 => Just(0u32)]
}

#[derive(Debug, Clone)]
enum Op {
    Set(u64, u32),
    Clear(u64, u64),
    Entries(u64, u64),
    /// `fill(a, a + n, v)`: whole chunks among them, held as one value by a dense store.
    Fill(u64, u64, u32),
    /// `fill_counting(a, a + n, v)`: entry `a + i` holds `v + i` (wrapping); whole chunks
    /// among them held as their first value by a dense store when they do not wrap.
    FillCounting(u64, u64, u32),
    /// `runs_in`, `count_in` and `is_default_in` over a range.
    Scan(u64, u64),
}

fn op(chunks: &'static [u64]) -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (index(chunks), value()).prop_map(|(i, v)| Op::Set(i, v)),
        1 => (bound(chunks), bound(chunks)).prop_map(|(a, b)| Op::Clear(a, b)),
        2 => (bound(chunks), bound(chunks)).prop_map(|(a, b)| Op::Entries(a, b)),
        2 => (index(chunks), 0..3 * CHUNK, value()).prop_map(|(a, n, v)| Op::Fill(a, n, v)),
        2 => (index(chunks), 0..3 * CHUNK, counting_start())
            .prop_map(|(a, n, v)| Op::FillCounting(a, n, v)),
        1 => (bound(chunks), bound(chunks)).prop_map(|(a, b)| Op::Scan(a, b)),
    ]
}

fn model_entries(model: &BTreeMap<u64, u32>, start: u64, end: u64) -> Vec<(u64, u32)> {
    if start >= end {
        return Vec::new();
    }
    model.range(start..end).map(|(&k, &v)| (k, v)).collect()
}

/// The runs of consecutive keys of `model` in `[start, end)`.
fn model_runs(model: &BTreeMap<u64, u32>, start: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (k, _) in model_entries(model, start, end) {
        match out.last_mut() {
            Some(r) if r.1 == k => r.1 = k + 1,
            _ => out.push((k, k + 1)),
        }
    }
    out
}

fn compare<S: ChunkStore<u32>>(
    v: &SparseVec<u32, S>,
    model: &BTreeMap<u64, u32>,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(v.len(), model.len() as u64);
    prop_assert_eq!(v.is_empty(), model.is_empty());
    for (&k, &val) in model {
        prop_assert_eq!(v.get(k), val, "get({:#x})", k);
    }
    // Chunks are released when they return to all-default: memory follows live chunks.
    // A uniform chunk (the dense store's, after a fill) holds its value and 8 bytes.
    let mut chunks: Vec<u64> = model.keys().map(|k| k / CHUNK).collect();
    chunks.dedup();
    let uniform = v.uniform_chunks();
    prop_assert!(uniform <= chunks.len());
    prop_assert_eq!(
        v.heap_bytes(),
        (chunks.len() - uniform) * (CHUNK as usize * 4 + 32) + uniform * (4 + 8)
    );
    prop_assert_eq!(
        v.all(),
        model.iter().map(|(&k, &v)| (k, v)).collect::<Vec<_>>()
    );
    Ok(())
}

/// Run `ops` on a fresh `SparseVec` with store `S` and on the model, comparing after each.
fn run<S: ChunkStore<u32>>(ops: Vec<Op>, probes: &[u64]) -> Result<(), TestCaseError> {
    let mut v: SparseVec<u32, S> = SparseVec::new();
    let mut model: BTreeMap<u64, u32> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Set(i, val) => {
                let old = if val == 0 {
                    model.remove(&i)
                } else {
                    model.insert(i, val)
                };
                prop_assert_eq!(v.set(i, val), old.unwrap_or(0), "set({:#x}, {})", i, val);
            }
            Op::Clear(a, b) => {
                v.clear_range(a, b);
                if a < b {
                    model.retain(|&k, _| k < a || k >= b);
                }
            }
            Op::Entries(a, b) => {
                prop_assert_eq!(
                    v.entries(a, b),
                    model_entries(&model, a, b),
                    "entries({:#x}, {:#x})",
                    a,
                    b
                );
            }
            Op::Fill(a, n, val) => {
                let b = a.saturating_add(n);
                v.fill(a, b, val);
                for k in a..b {
                    if val == 0 {
                        model.remove(&k);
                    } else {
                        model.insert(k, val);
                    }
                }
            }
            Op::FillCounting(a, n, val) => {
                let b = a.saturating_add(n);
                v.fill_counting(a, b, val);
                for k in a..b {
                    let x = val.wrapping_add((k - a) as u32);
                    if x == 0 {
                        model.remove(&k);
                    } else {
                        model.insert(k, x);
                    }
                }
            }
            Op::Scan(a, b) => {
                let runs = model_runs(&model, a, b);
                prop_assert_eq!(v.runs_in(a, b), runs.clone(), "runs_in({:#x}, {:#x})", a, b);
                let n: u64 = runs.iter().map(|r| r.1 - r.0).sum();
                prop_assert_eq!(v.count_in(a, b), n);
                prop_assert_eq!(v.is_default_in(a, b), n == 0);
            }
        }
        compare(&v, &model)?;
        prop_assert!(v.shape_ok(), "store indices inconsistent");
        for &p in probes {
            prop_assert_eq!(v.get(p), model.get(&p).copied().unwrap_or(0));
        }
    }
    v.clear_range(0, u64::MAX - 1);
    model.retain(|&k, _| k >= u64::MAX - 1);
    compare(&v, &model)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn sparse_matches_btreemap(ops in prop::collection::vec(op(&CHUNKS), 1..120), probes in prop::collection::vec(index(&CHUNKS), 8)) {
        run::<Hashed<u32>>(ops, &probes)?;
    }

    #[test]
    fn dense_sparse_matches_btreemap(ops in prop::collection::vec(op(&DENSE_CHUNKS), 1..120), probes in prop::collection::vec(index(&DENSE_CHUNKS), 8)) {
        run::<Dense<u32>>(ops, &probes)?;
    }
}

/// Regression (found by `sparse_matches_btreemap`): the last chunk starts at
/// `u64::MAX - 511`; `entries` and `clear_range` computed its end as `base + CHUNK`, which
/// overflowed, and `all()` was `entries(0, u64::MAX)`, which can never return index
/// `u64::MAX`. Not reachable through `Host` (frames are < 2^31, file offsets < 2^51), but
/// `SparseVec` promises the whole u64 index space.
#[test]
fn last_chunk_of_the_space() {
    let mut v: SparseVec<u32> = SparseVec::new();
    v.set(u64::MAX - 1, 7);
    v.set(u64::MAX, 9);
    assert_eq!(v.len(), 2);
    assert_eq!(v.all(), vec![(u64::MAX - 1, 7), (u64::MAX, 9)]);
    assert_eq!(v.entries(u64::MAX - 511, u64::MAX), vec![(u64::MAX - 1, 7)]);
    v.clear_range(u64::MAX - 1, u64::MAX);
    assert_eq!(v.get(u64::MAX - 1), 0);
    assert_eq!(v.len(), 1);
}

/// `clear_range(start, u64::MAX)` must not drop the last chunk whole: its end would be
/// 2^64, so it is never covered, and index `u64::MAX` lies outside the half-open range.
#[test]
fn clear_up_to_the_top_keeps_the_last_index() {
    let mut v: SparseVec<u32> = SparseVec::new();
    v.set(u64::MAX, 9);
    v.set(u64::MAX - 1, 7);
    v.clear_range(0, u64::MAX);
    assert_eq!(v.get(u64::MAX - 1), 0);
    assert_eq!(v.get(u64::MAX), 9, "index u64::MAX is not in [0, u64::MAX)");
    assert_eq!(v.len(), 1);
}
