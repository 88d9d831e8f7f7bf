//! Drive the core from Rust, for profiling (`perf stat`, `valgrind --tool=callgrind`,
//! `perf record`) without the Python binding. (The benchmarks' Rust baseline is
//! `benches/baseline`'s `CoreDriver`; both lay the guest out as `gmem.setup.build_vm`.)
//!
//! `cargo run --release -p gmem-core --example drive -- [strategy] [log2 pages] [events]`
//!
//! `... --example drive -- goal [log2 pages] [events] [rounds] [runs|scattered] [strategy]
//! [columns|packed]` runs the scenario of the `apply-vs-numpy` benchmark instead: a guest
//! (`dual` unless named), all private and mapped (populated in order, so frames come in
//! runs, or in random order), fragmented to ~10^5 and then ~10^6 intervals, and rounds of
//! random single-page conversions of mapped private pages (remapped, untimed, between
//! rounds) and private reads of them, given as columns or (`packed`) as the records
//! `vm.apply` hands the core.
//!
//! `... --example drive -- boot [strategy] [log2 pages]` runs the `boot` workload's events
//! on a TDX guest: the whole guest made private, every 2 MiB unit accepted by a guest
//! access in address order (one in ten a read), then a SWIOTLB-sized pool made shared.

use std::time::Instant;

// The allocator of the Python extension, for the same figures.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use gmem_core::events::Packed;
use gmem_core::{GmemArg, Host, MemRegion, StrategyKind, VmType, uapi};

/// A host with one VM of `pages` pages: one guest_memfd memslot at gpa 0, laid out as
/// `gmem.setup.build_vm` does (`GUEST_MEMFD_FLAG_MMAP` on the private file only where the
/// shared view is that same file, and on `two_offsets`' shared file).
fn guest(strategy: StrategyKind, pages: u64) -> (Host, usize) {
    guest_on(VmType::SwProtected, strategy, pages)
}

fn guest_on(vm_type: VmType, strategy: StrategyKind, pages: u64) -> (Host, usize) {
    let bytes = pages << 12;
    let mut h = Host::new(bytes + (1 << 30)).expect("host");
    let vm = h.create_vm(vm_type, strategy);
    let mmap = h.supported_gmem_flags(vm) & uapi::GUEST_MEMFD_FLAG_MMAP;
    let same_file = matches!(
        strategy,
        StrategyKind::Inplace | StrategyKind::Realloc | StrategyKind::AttrHook
    );
    let f = h
        .create_guest_memfd(vm, bytes, if same_file { mmap } else { 0 }, 0)
        .expect("gmem");
    let m = h.mmap_anonymous(bytes).expect("anon");
    let shared = if strategy == StrategyKind::TwoOffsets {
        let s = h.create_guest_memfd(vm, bytes, mmap, 0).expect("gmem");
        (
            GmemArg::Fd(i64::from(h.file(s).fd().expect("open"))),
            Some(0),
        )
    } else {
        (GmemArg::None, None)
    };
    let region = MemRegion {
        slot: 0,
        flags: uapi::KVM_MEM_GUEST_MEMFD,
        guest_phys_addr: 0,
        memory_size: bytes,
        userspace_addr: h.mapping(m).addr,
        guest_memfd: GmemArg::Fd(i64::from(h.file(f).fd().expect("open"))),
        guest_memfd_offset: 0,
        shared_guest_memfd: shared.0,
        shared_offset: shared.1,
    };
    h.set_user_memory_region2(vm, region).expect("memslot");
    (h, vm)
}

/// xorshift: deterministic pseudo-random numbers without a dependency.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// `perf record --control fifo:CTL,ACK -D -1` support: with `GMEM_PERF_CTL=CTL,ACK` set,
/// sampling is switched on only around the timed calls named by `GMEM_PERF_OP`
/// (`convert` or `read`).
struct PerfCtl(Option<(std::fs::File, std::io::BufReader<std::fs::File>, String)>);

impl PerfCtl {
    fn new() -> Self {
        let Ok(v) = std::env::var("GMEM_PERF_CTL") else {
            return Self(None);
        };
        let (ctl, ack) = v.split_once(',').expect("GMEM_PERF_CTL=ctl,ack");
        let op = std::env::var("GMEM_PERF_OP").unwrap_or_else(|_| "convert".into());
        let ctl = std::fs::OpenOptions::new()
            .write(true)
            .open(ctl)
            .expect("ctl");
        let ack = std::io::BufReader::new(std::fs::File::open(ack).expect("ack"));
        Self(Some((ctl, ack, op)))
    }
    fn switch(&mut self, op: &str, on: bool) {
        use std::io::{BufRead, Write};
        if let Some((ctl, ack, want)) = &mut self.0
            && want == op
        {
            ctl.write_all(if on { b"enable\n" } else { b"disable\n" })
                .expect("perf ctl");
            let mut line = String::new();
            ack.read_line(&mut line).expect("perf ack");
        }
    }
}

/// The timed calls of `goal`, out of line so that `valgrind --tool=callgrind
/// --collect-atstart=no --toggle-collect=drive::timed_convert` counts them alone.
// (Each names itself, so that the linker does not fold the two into one.)
#[inline(never)]
fn timed_convert(h: &mut Host, vm: usize, b: &Batch) -> Vec<i32> {
    std::hint::black_box("convert");
    b.apply(h, vm)
}

#[inline(never)]
fn timed_read(h: &mut Host, vm: usize, b: &Batch) -> Vec<i32> {
    std::hint::black_box("read");
    b.apply(h, vm)
}

/// A timed batch: as columns (`Host::apply`), or as packed records, the memory of a
/// `gmem.EVENT_DTYPE` array (what `vm.apply` hands the core).
struct Batch {
    ops: Vec<u8>,
    gfns: Vec<u64>,
    npages: Vec<u64>,
    values: Vec<u64>,
    packed: Option<Vec<u8>>,
}

impl Batch {
    fn new(ops: Vec<u8>, gfns: &[u64], npages: &[u64], values: &[u64], packed: bool) -> Self {
        let packed = packed.then(|| {
            let mut b = Vec::with_capacity(ops.len() * Packed::RECORD);
            for (i, &op) in ops.iter().enumerate() {
                b.push(op);
                for w in [gfns[i], npages[i], values[i]] {
                    b.extend_from_slice(&w.to_le_bytes());
                }
            }
            b
        });
        Self {
            ops,
            gfns: gfns.to_vec(),
            npages: npages.to_vec(),
            values: values.to_vec(),
            packed,
        }
    }

    fn apply(&self, h: &mut Host, vm: usize) -> Vec<i32> {
        match &self.packed {
            Some(b) => h.apply_events(vm, &Packed::new(b).expect("records"), None),
            None => h.apply(vm, &self.ops, &self.gfns, &self.npages, &self.values, None),
        }
        .expect("apply")
    }
}

fn goal(
    strategy: StrategyKind,
    log2: u32,
    events: usize,
    rounds: usize,
    scattered: bool,
    packed: bool,
) {
    let pages = 1u64 << log2;
    let (mut h, vm) = guest(strategy, pages);
    // Private through the strategy's own path (in-place VMs convert through their
    // guest_memfd).
    h.convert(vm, 0, pages, true).expect("private");
    // Populate: private writes in 512-page events (frames in runs), or one page per
    // event in random order (`scattered`: frames follow no pattern).
    let st = if scattered {
        let mut g: Vec<u64> = (0..pages).collect();
        let mut next = rng(0x2545_F491_4F6C_DD1D);
        for i in (1..g.len()).rev() {
            g.swap(i, usize::try_from(next() % (i as u64 + 1)).expect("fits"));
        }
        let n = g.len();
        h.apply(vm, &vec![4; n], &g, &vec![1; n], &g, None)
    } else {
        let n = usize::try_from(pages / 512).expect("fits");
        let g: Vec<u64> = (0..pages).step_by(512).collect();
        h.apply(vm, &vec![4; n], &g, &vec![512; n], &g, None)
    }
    .expect("apply");
    assert!(st.iter().all(|&s| s == 0));
    // Fragment: every stride-th page shared, for ~10^5 and then ~10^6 runs.
    let mut shared = std::collections::HashSet::new();
    for intervals in [100_000u64, 1_000_000] {
        let stride = (pages / (intervals / 2)).max(2);
        let g: Vec<u64> = (0..intervals / 2)
            .map(|i| i * stride + 1)
            .filter(|&g| g < pages)
            .collect();
        shared.extend(g.iter().copied());
        let k = g.len();
        h.apply(vm, &vec![1; k], &g, &vec![1; k], &vec![0; k], None)
            .expect("apply");
    }
    // Targets are distinct private pages, drawn at random: ask for at most half of them.
    let private = pages - shared.len() as u64;
    assert!(
        events as u64 <= private / 2,
        "{events} events need at least {} private pages; 2^{log2} pages have {private}",
        2 * events
    );
    let mut next = rng(0x9E37_79B9_7F4A_7C15);
    let mut seen = std::collections::HashSet::new();
    let mut targets = Vec::with_capacity(events);
    while targets.len() < events {
        let g = next() % pages;
        if !shared.contains(&g) && seen.insert(g) {
            targets.push(g);
        }
    }
    let k = targets.len();
    let (ones, zeros) = (vec![1u64; k], vec![0u64; k]);
    let (mut conv, mut read) = (Vec::new(), Vec::new());
    let mut perf = PerfCtl::new();
    for _ in 0..rounds {
        h.apply(vm, &vec![0; k], &targets, &ones, &zeros, None)
            .expect("apply");
        h.apply(vm, &vec![2; k], &targets, &ones, &zeros, None)
            .expect("apply");
        let rd = Batch::new(vec![2; k], &targets, &ones, &zeros, packed);
        perf.switch("read", true);
        let t = Instant::now();
        timed_read(&mut h, vm, &rd);
        read.push(t.elapsed().as_nanos() as f64 / k as f64);
        perf.switch("read", false);
        let cv = Batch::new(vec![1; k], &targets, &ones, &zeros, packed);
        perf.switch("convert", true);
        let t = Instant::now();
        let st = timed_convert(&mut h, vm, &cv);
        conv.push(t.elapsed().as_nanos() as f64 / k as f64);
        perf.switch("convert", false);
        assert!(st.iter().all(|&s| s == 0));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "goal at 2^{log2} pages, frames {}, {} intervals, {k} events x {rounds} rounds: conversion {:.1} ns/event, read {:.1} ns/event (medians)",
        if scattered { "scattered" } else { "in runs" },
        h.vm(vm).attr_runs(),
        median(&mut conv),
        median(&mut read)
    );
}

#[inline(never)]
fn timed_boot(h: &mut Host, vm: usize, o: &[u8], g: &[u64], n: &[u64], v: &[u64]) -> Vec<i32> {
    h.apply(vm, o, g, n, v, None).expect("apply")
}

/// The `boot` workload (`gmem.workloads.boot`) on a TDX guest of `2^log2` pages.
fn boot(strategy: StrategyKind, log2: u32) {
    const UNIT: u64 = 512;
    let pages = 1u64 << log2;
    let (mut h, vm) = guest_on(VmType::Tdx, strategy, pages);
    let pool = (pages * 6 / 100)
        .clamp(16_384, 262_144)
        .min(pages / 4)
        .max(1);
    let (mut o, mut g, mut n, mut v) = (vec![0u8], vec![0u64], vec![pages], vec![0u64]);
    let mut next = rng(0x9E37_79B9_7F4A_7C15);
    for gfn in (0..pages).step_by(UNIT as usize) {
        o.push(if next().is_multiple_of(10) { 2 } else { 4 });
        g.push(gfn);
        n.push(UNIT.min(pages - gfn));
        v.push(gfn + 1);
    }
    o.push(1);
    g.push(pages / 2);
    n.push(pool);
    v.push(0);
    let t = Instant::now();
    let st = timed_boot(&mut h, vm, &o, &g, &n, &v);
    let dt = t.elapsed();
    let s = h.stats(vm);
    println!(
        "{} boot at 2^{log2} pages (TDX): {:.3} s, {:.1} ns/page; {} of {} events ok; pages_allocated {}, stage2_faults {}, tdx_accepts {}",
        strategy.name(),
        dt.as_secs_f64(),
        dt.as_nanos() as f64 / pages as f64,
        st.iter().filter(|&&x| x == 0).count(),
        st.len(),
        s.pages_allocated,
        s.stage2_faults,
        s.tdx_accepts
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("boot") {
        let strategy =
            StrategyKind::parse(args.get(2).map_or("dual", String::as_str)).expect("strategy");
        let log2: u32 = args.get(3).map_or(24, |s| s.parse().expect("log2 pages"));
        boot(strategy, log2);
        return;
    }
    if args.get(1).map(String::as_str) == Some("goal") {
        let log2: u32 = args.get(2).map_or(24, |s| s.parse().expect("log2 pages"));
        let events = args.get(3).map_or(100_000, |s| s.parse().expect("events"));
        let rounds = args.get(4).map_or(7, |s| s.parse().expect("rounds"));
        let scattered = args.get(5).map(String::as_str) == Some("scattered");
        let strategy =
            StrategyKind::parse(args.get(6).map_or("dual", String::as_str)).expect("strategy");
        let packed = args.get(7).map(String::as_str) == Some("packed");
        goal(strategy, log2, events, rounds, scattered, packed);
        return;
    }
    let strategy =
        StrategyKind::parse(args.get(1).map_or("dual", String::as_str)).expect("strategy");
    let log2: u32 = args.get(2).map_or(24, |s| s.parse().expect("log2 pages"));
    let events: usize = args
        .get(3)
        .map_or(1_000_000, |s| s.parse().expect("events"));
    let pages = 1u64 << log2;
    let (mut h, vm) = guest(strategy, pages);
    let mut next = rng(0x9E37_79B9_7F4A_7C15);
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
        h.vm(vm).attr_runs()
    );
    let reads: Vec<u8> = vec![2; events];
    // Map private pages first, then read them back.
    // The conversion an event does (in-place VMs convert through their guest_memfd).
    h.convert(vm, 0, pages, true).expect("private");
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
