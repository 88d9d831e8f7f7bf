//! The two-level bitmap attribute map against the interval map as the oracle, over index
//! spaces that cross leaf boundaries, with ranges near the top of the u64 space.

use gmem_core::attr_map::AttrMap;
use gmem_core::bit_attr_map::BitAttrMap;
use proptest::prelude::*;

fn index() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..20_000,
        prop::sample::select(vec![0u64, 1, 4095, 4096, 4097, 8191, 8192, 12_288, 1 << 20]),
        // The domain is [0, u64::MAX): index u64::MAX lies outside every half-open range.
        (u64::MAX - 20_000)..u64::MAX,
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Set(u64, u64, bool),
    Query(u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (index(), index(), any::<bool>()).prop_map(|(a, b, v)| Op::Set(a.min(b), a.max(b), v)),
        // Single indices: the one-word path of a random single-page conversion.
        4 => (index(), any::<bool>()).prop_map(|(a, v)| Op::Set(a, a + 1, v)),
        2 => (index(), index()).prop_map(|(a, b)| Op::Query(a.min(b), a.max(b))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn bitmap_map_matches_interval_map(default in prop::sample::select(vec![0u64, 8]), ops in prop::collection::vec(op(), 1..60)) {
        let other = 8 - default;
        let mut bits = BitAttrMap::new(default);
        let mut oracle = AttrMap::new(default);
        for op in ops {
            match op {
                Op::Set(a, b, set) => {
                    let v = if set { other } else { default };
                    prop_assert_eq!(bits.set_count(a, b, v), oracle.set_count(a, b, v), "set_count({}, {})", a, b);
                    prop_assert!(bits.check().is_ok(), "{:?}", bits.check());
                    prop_assert_eq!(bits.intervals(), oracle.intervals());
                }
                Op::Query(a, b) => {
                    prop_assert_eq!(bits.uniform(a, b), oracle.uniform(a, b), "uniform({}, {})", a, b);
                    for v in [default, other] {
                        prop_assert_eq!(bits.count(a, b, v), oracle.count(a, b, v), "count({}, {}, {})", a, b, v);
                    }
                    for i in [a, b, a.saturating_add(1), b.saturating_sub(1), a / 2 + b / 2] {
                        prop_assert_eq!(bits.get(i), oracle.get(i), "get({})", i);
                    }
                }
            }
        }
    }
}
