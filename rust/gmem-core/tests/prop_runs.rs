//! Range events done per run give what the same pages done one by one give.
//!
//! Two hosts with the same VMs (every strategy × platform) get the same random batches;
//! on the second, every multi-page guest access is replayed as single-page events, in
//! order, stopping at the first failure (an event's status is its first failing page's).
//! Statuses, every VM's counters (but the event count), free memory and, at the end, the
//! value of every page as the guest reads it must agree, and `check()` must hold on both.

#[allow(dead_code)] // each test crate uses part of the shared setup
mod common;
mod strategies;

use common::{Event, GFN_SPAN, MAX_PAGES, ample_pages, apply_checked, build, combos};
use gmem_core::{Host, Op, PAGE_SIZE};
use proptest::prelude::*;
use strategies::vm_spec;

/// Mostly guest accesses over ranges (the path under test), with conversions, punches,
/// discards and host accesses between them to vary the state they meet.
fn event() -> impl Strategy<Value = Event> {
    let access = prop_oneof![
        Just(Op::GuestReadPrivate),
        Just(Op::GuestWritePrivate),
        Just(Op::GuestReadShared),
        Just(Op::GuestWriteShared),
    ];
    let other = prop_oneof![
        Just(Op::ConvertPrivate),
        Just(Op::ConvertShared),
        Just(Op::PunchHole),
        Just(Op::DiscardShared),
        Just(Op::HostWrite),
        Just(Op::Pin),
        Just(Op::Unpin),
    ];
    let op = prop_oneof![4 => access, 1 => other];
    let gfn = prop_oneof![4 => 0u64..GFN_SPAN, 1 => (0u64..2).prop_map(|k| k * 512)];
    let npages = prop_oneof![2 => 1u64..=4, 3 => 2u64..=MAX_PAGES + 8];
    (op, gfn, npages, 0u64..4).prop_map(|(op, gfn, npages, value)| Event {
        op: op as u8,
        gfn,
        npages,
        value,
    })
}

fn is_access(op: u8) -> bool {
    [
        Op::GuestReadPrivate,
        Op::GuestWritePrivate,
        Op::GuestReadShared,
        Op::GuestWriteShared,
    ]
    .iter()
    .any(|&o| o as u8 == op)
}

/// Run `e` on `host` as single-page events when it is a multi-page access; its status.
fn one_by_one(host: &mut Host, vm: usize, e: &Event) -> Result<i32, TestCaseError> {
    if !is_access(e.op) || e.npages == 1 {
        return Ok(apply_checked(host, vm, &[*e], false).map_err(TestCaseError::fail)?[0]);
    }
    for g in e.gfn..e.gfn + e.npages {
        let page = Event {
            gfn: g,
            npages: 1,
            ..*e
        };
        let s = apply_checked(host, vm, &[page], false).map_err(TestCaseError::fail)?[0];
        if s != 0 {
            return Ok(s);
        }
    }
    Ok(0)
}

fn without_events(host: &Host, vm: usize) -> gmem_core::metrics::Stats {
    let mut s = host.stats(vm);
    s.events = 0;
    s
}

/// The value of every page of `vm` as the guest reads it, single page by single page (a
/// private read, then a shared one where the private one fails), with statuses.
fn sweep(host: &mut Host, vm: usize) -> Result<Vec<(i32, u64)>, TestCaseError> {
    let mut out = Vec::new();
    for op in [Op::GuestReadPrivate, Op::GuestReadShared] {
        for g in 0..GFN_SPAN {
            let e = Event {
                op: op as u8,
                gfn: g,
                npages: 1,
                value: 0,
            };
            let mut det = Vec::new();
            let s = host
                .apply(vm, &[e.op], &[g], &[1], &[0], Some(&mut det))
                .map_err(|e| TestCaseError::fail(e.to_string()))?[0];
            out.push((s, det[0].value));
        }
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn range_accesses_equal_page_by_page(
        specs in prop::collection::vec(vm_spec(), 20),
        tight in prop::option::weighted(0.2, 64u64..4000),
        batches in prop::collection::vec((0usize..20, prop::collection::vec(event(), 1..24)), 1..6),
    ) {
        let pages = tight.unwrap_or_else(|| ample_pages(&specs));
        let mut hosts = [
            Host::new(pages * PAGE_SIZE).expect("host"),
            Host::new(pages * PAGE_SIZE).expect("host"),
        ];
        let mut vms = vec![];
        for h in &mut hosts {
            vms = combos()
                .into_iter()
                .zip(&specs)
                .map(|((s, t), &spec)| build(h, s, t, spec).vm)
                .collect();
        }
        for (vi, events) in batches {
            let vm = vms[vi];
            let [a, b] = &mut hosts;
            let got = apply_checked(a, vm, &events, false).map_err(TestCaseError::fail)?;
            for (i, e) in events.iter().enumerate() {
                let want = one_by_one(b, vm, e)?;
                prop_assert_eq!(got[i], want, "event {} {:?}", i, e);
            }
            a.check().map_err(|e| TestCaseError::fail(e.to_string()))?;
            b.check().map_err(|e| TestCaseError::fail(e.to_string()))?;
            for v in 0..a.nr_vms() {
                prop_assert_eq!(without_events(a, v), without_events(b, v), "vm {}", v);
            }
            prop_assert_eq!(a.free_pages(), b.free_pages());
        }
        for &vm in &vms {
            let [a, b] = &mut hosts;
            prop_assert_eq!(sweep(a, vm)?, sweep(b, vm)?, "page values of vm {}", vm);
        }
    }
}

/// A `GUEST_MEMFD_FLAG_NO_DIRECT_MAP` file (series v12): faulting a range in per run takes
/// each page out of the direct map with its own flush, as faults one by one do.
#[test]
fn no_direct_map_run_equals_page_by_page() {
    use gmem_core::{GmemArg, MemRegion, StrategyKind, VmType, uapi};
    const PAGES: u64 = 1100;
    let setup = || {
        let mut h = Host::new(4 * PAGES * PAGE_SIZE).expect("host");
        let vm = h.create_vm(VmType::SwProtected, StrategyKind::Dual);
        let f = h
            .create_guest_memfd(
                vm,
                PAGES * PAGE_SIZE,
                uapi::GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
                0,
            )
            .expect("guest_memfd");
        let anon = h.mmap_anonymous(PAGES * PAGE_SIZE).expect("mmap");
        let fd = i64::from(h.file(f).fd().expect("open"));
        h.set_user_memory_region2(
            vm,
            MemRegion {
                slot: 0,
                flags: uapi::KVM_MEM_GUEST_MEMFD,
                guest_phys_addr: 0,
                memory_size: PAGES * PAGE_SIZE,
                userspace_addr: h.mapping(anon).addr,
                guest_memfd: GmemArg::Fd(fd),
                guest_memfd_offset: 0,
                shared_guest_memfd: GmemArg::None,
                shared_offset: None,
            },
        )
        .expect("memslot");
        let p = Op::ConvertPrivate as u8;
        assert_eq!(
            h.apply(vm, &[p], &[0], &[PAGES], &[0], None)
                .expect("apply"),
            [0]
        );
        (h, vm)
    };
    let (mut a, vm) = setup();
    let (mut b, _) = setup();
    let w = Op::GuestWritePrivate as u8;
    assert_eq!(
        a.apply(vm, &[w], &[5], &[PAGES - 5], &[7], None)
            .expect("apply"),
        [0]
    );
    for g in 5..PAGES {
        assert_eq!(
            b.apply(vm, &[w], &[g], &[1], &[7], None).expect("apply"),
            [0]
        );
    }
    let (sa, sb) = (without_events(&a, vm), without_events(&b, vm));
    assert_eq!(sa.direct_map_removals, PAGES - 5);
    assert_eq!(sa.direct_map_flushes, PAGES - 5);
    assert!(sa.direct_map_splits >= 2);
    assert_eq!(sa, sb);
    a.check().expect("check");
    b.check().expect("check");
}
