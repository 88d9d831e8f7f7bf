//! Drive the core from Rust, for profiling (`perf stat`, `valgrind --tool=callgrind`) and
//! as the "same work driven from Rust" baseline of the benchmarks.
//!
//! `cargo run --release -p gmem-core --example drive -- [strategy] [log2 pages] [events]`

use std::time::Instant;

use gmem_core::{GmemArg, Host, MemRegion, StrategyKind, VmType, uapi};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let strategy =
        StrategyKind::parse(args.get(1).map_or("dual", String::as_str)).expect("strategy");
    let log2: u32 = args.get(2).map_or(24, |s| s.parse().expect("log2 pages"));
    let events: usize = args
        .get(3)
        .map_or(1_000_000, |s| s.parse().expect("events"));
    let pages = 1u64 << log2;
    let bytes = pages << 12;
    let mut h = Host::new(bytes + (1 << 30)).expect("host");
    let vm = h.create_vm(VmType::SwProtected, strategy);
    let f = h
        .create_guest_memfd(vm, bytes, uapi::GUEST_MEMFD_FLAG_MMAP, 0)
        .expect("gmem");
    let m = h.mmap_anonymous(bytes).expect("anon");
    let shared = if strategy == StrategyKind::TwoOffsets {
        let s = h.create_guest_memfd(vm, bytes, 0, 0).expect("gmem");
        (GmemArg::Fd(i64::from(h.file(s).fd.expect("open"))), Some(0))
    } else {
        (GmemArg::None, None)
    };
    let region = MemRegion {
        slot: 0,
        flags: uapi::KVM_MEM_GUEST_MEMFD,
        guest_phys_addr: 0,
        memory_size: bytes,
        userspace_addr: h.mapping(m).addr,
        guest_memfd: GmemArg::Fd(i64::from(h.file(f).fd.expect("open"))),
        guest_memfd_offset: 0,
        shared_guest_memfd: shared.0,
        shared_offset: shared.1,
    };
    h.set_user_memory_region2(vm, region).expect("memslot");
    // xorshift: deterministic pseudo-random gfns without a dependency.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let gfns: Vec<u64> = (0..events).map(|_| next() % pages).collect();
    let ops: Vec<u8> = (0..events).map(|i| (i % 2) as u8).collect();
    let ones = vec![1u64; events];
    let vals = vec![0u64; events];
    let t = Instant::now();
    let st = h.apply(vm, &ops, &gfns, &ones, &vals, None).expect("apply");
    let dt = t.elapsed();
    let ok = st.iter().filter(|&&s| s == 0).count();
    let s = h.stats(vm);
    println!(
        "{}: {events} random single-page conversions at 2^{log2} pages: {:.1} ns/event ({ok} ok), {} intervals",
        strategy.name(),
        dt.as_nanos() as f64 / events as f64,
        h.vm(vm).attrs.intervals()
    );
    let reads: Vec<u8> = vec![2; events];
    // Map private pages first, then read them back.
    let _ = h.set_memory_attributes(vm, 0, bytes, uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE, 0);
    let touch: Vec<u64> = gfns.iter().map(|g| g % (pages.min(1 << 20))).collect();
    h.apply(vm, &reads, &touch, &ones, &vals, None)
        .expect("apply");
    let t = Instant::now();
    h.apply(vm, &reads, &touch, &ones, &vals, None)
        .expect("apply");
    let dt = t.elapsed();
    println!(
        "{}: {events} private reads of mapped pages: {:.1} ns/event; pages_allocated {}",
        strategy.name(),
        dt.as_nanos() as f64 / events as f64,
        s.pages_allocated
    );
}
