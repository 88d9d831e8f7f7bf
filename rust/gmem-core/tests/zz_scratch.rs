use gmem_core::attr_map::AttrMap;
use std::collections::BTreeMap;
use std::ops::Bound::*;
#[test]
fn t() {
    let m: BTreeMap<u64, u64> = (0..3).map(|k| (k * 10, k)).collect();
    let r = std::panic::catch_unwind(|| m.range((Excluded(5u64), Excluded(5u64))).count());
    println!("btree: {:?}", r);
    let mut map = AttrMap::new(0);
    map.set(10, 20, 8);
    let r = std::panic::catch_unwind(|| map.runs(5, 5).count());
    println!("runs: {:?}", r);
    let r = std::panic::catch_unwind(|| map.runs(15, 15).collect::<Vec<_>>());
    println!("runs: {:?}", r);
}
