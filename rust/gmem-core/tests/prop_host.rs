//! Random event batches on a whole `Host`: one VM per strategy × platform, each laid out
//! as a VMM lays out a confidential guest (see `python/gmem/setup.py`): a guest_memfd the
//! size of the guest, anonymous VMM memory, one memslot at gpa 0 with
//! `KVM_MEM_GUEST_MEMFD`; for `two_offsets` a second guest_memfd bound as the shared side.
//! Some VMs also get HugeTLB folios, a plain (non-guest_memfd) memslot, other options.
//!
//! Batches mix valid and invalid events (unknown op codes, `npages == 0`, gfns beyond the
//! 52-bit gfn space or outside every memslot) and the host may be small enough to run out
//! of memory. Whatever happens: `apply` never panics, every status is 0 or a negative
//! errno the API lists, invalid events get `EINVAL`, and `host.check()` holds after every
//! batch. Closing guest_memfds, merge passes and snapshot round trips are mixed in.

mod common;
mod strategies;

use common::{
    Event, GFN_LIMIT, GFN_SPAN, Guest, VmSpec, ample_pages, apply_checked, build, combos,
};
use gmem_core::error::errno;
use gmem_core::{GmemArg, Host, MemRegion, Op, PAGE_SIZE, StrategyKind, VmType};
use proptest::prelude::*;
use strategies::vm_spec;

fn event() -> impl Strategy<Value = Event> {
    let op = prop_oneof![24 => 0u8..Op::COUNT, 1 => Op::COUNT..=u8::MAX];
    let gfn = prop_oneof![
        16 => 0u64..GFN_SPAN + 8,
        2 => (0u64..8).prop_map(|k| k * 512),
        1 => prop::sample::select(vec![GFN_LIMIT - 1, GFN_LIMIT, u64::MAX, 1 << 40, (1 << 40) + 511]),
    ];
    let npages = prop_oneof![
        16 => 1u64..=8,
        4 => 1u64..=600,
        1 => Just(0u64),
        1 => prop::sample::select(vec![u64::MAX, GFN_LIMIT, GFN_LIMIT - 1, 1 << 40]),
    ];
    let value = prop_oneof![Just(0u64), 1u64..4, any::<u64>()];
    (op, gfn, npages, value).prop_map(|(op, gfn, npages, value)| Event {
        op,
        gfn,
        npages,
        value,
    })
}

#[derive(Debug, Clone)]
enum Action {
    Apply {
        vm: usize,
        events: Vec<Event>,
        details: bool,
    },
    MergePass(usize),
    /// Close a guest_memfd fd of the VM: the private one, or the `two_offsets` shared one
    /// (the file lives on while the VMM maps it).
    Close {
        vm: usize,
        shared: bool,
    },
    /// Snapshot the host, restore it, and check the copy behaves as the original.
    Snapshot {
        vm: usize,
        events: Vec<Event>,
    },
    /// Apply the same batch to the host without details (the batch's fast paths: mapped
    /// accesses, single-page conversions, the loops for batches of one op) and to a copy
    /// with details (every event through the generic dispatch): the same statuses,
    /// counters, free memory and attributes, and the same values read back.
    Paths {
        vm: usize,
        events: Vec<Event>,
    },
}

/// A single-page event, mostly a conversion: what the batch's fast paths take.
fn page_event() -> impl Strategy<Value = Event> {
    let op = prop_oneof![8 => 0u8..2, 2 => 2u8..6, 1 => 0u8..Op::COUNT];
    let gfn = prop_oneof![8 => 0u64..GFN_SPAN + 8, 1 => Just(GFN_LIMIT - 1)];
    (op, gfn, prop_oneof![Just(0u64), 1u64..4]).prop_map(|(op, gfn, value)| Event {
        op,
        gfn,
        npages: 1,
        value,
    })
}

/// A batch of one op on single pages (the batch loops made for conversions and for
/// private accesses take it), now and then out of the gfn space: a list of pages taken
/// twice, so that the second access to a page finds it mapped (the first may fault it
/// in).
fn uniform_events() -> impl Strategy<Value = Vec<Event>> {
    let gfn = prop_oneof![
        8 => 0u64..48,
        8 => 0u64..GFN_SPAN + 8,
        1 => Just(GFN_LIMIT - 1),
    ];
    let pages = prop::collection::vec((gfn, 1u64..4), 1..40);
    (0u8..6, pages, any::<bool>()).prop_map(|(op, pages, interleave)| {
        let event = |&(gfn, value): &(u64, u64)| Event {
            op,
            gfn,
            npages: 1,
            value,
        };
        if interleave {
            pages
                .iter()
                .flat_map(|p| [event(p), event(&(p.0, p.1 + 4))])
                .collect()
        } else {
            pages.iter().chain(&pages).map(event).collect()
        }
    })
}

/// Read every gfn of `events` in the gfn space privately and shared, with details: the
/// statuses and the values read.
fn read_back(host: &mut Host, vm: usize, events: &[Event]) -> (Vec<i32>, Vec<u64>) {
    let gfns: Vec<u64> = events
        .iter()
        .filter(|e| e.gfn < GFN_SPAN + 8)
        .flat_map(|e| [e.gfn, e.gfn])
        .collect();
    let ops: Vec<u8> = (0..gfns.len())
        .map(|i| if i % 2 == 0 { Op::GuestReadPrivate } else { Op::GuestReadShared } as u8)
        .collect();
    let ones = vec![1; gfns.len()];
    let mut det = Vec::new();
    let status = host
        .apply(vm, &ops, &gfns, &ones, &ones, Some(&mut det))
        .expect("columns of one length");
    (status, det.iter().map(|d| d.value).collect())
}

fn action(nr_vms: usize) -> impl Strategy<Value = Action> {
    let events = || prop::collection::vec(event(), 1..24);
    prop_oneof![
        20 => (0..nr_vms, events(), any::<bool>())
            .prop_map(|(vm, events, details)| Action::Apply { vm, events, details }),
        2 => (0..nr_vms).prop_map(Action::MergePass),
        1 => (0..nr_vms, any::<bool>()).prop_map(|(vm, shared)| Action::Close { vm, shared }),
        1 => (0..nr_vms, events()).prop_map(|(vm, events)| Action::Snapshot { vm, events }),
        3 => (0..nr_vms, prop::collection::vec(prop_oneof![4 => page_event(), 1 => event()], 1..48))
            .prop_map(|(vm, events)| Action::Paths { vm, events }),
        2 => (0..nr_vms, uniform_events()).prop_map(|(vm, events)| Action::Paths { vm, events }),
    ]
}

fn apply(
    host: &mut Host,
    vm: usize,
    events: &[Event],
    details: bool,
) -> Result<Vec<i32>, TestCaseError> {
    apply_checked(host, vm, events, details).map_err(TestCaseError::fail)
}

/// Every VM's counters and the host's free memory agree between `a` and `b`.
fn same_counters(a: &Host, b: &Host) -> Result<(), TestCaseError> {
    for v in 0..a.nr_vms() {
        prop_assert_eq!(a.stats(v), b.stats(v));
    }
    prop_assert_eq!(a.free_pages(), b.free_pages());
    Ok(())
}

fn check(host: &Host, what: &str) -> Result<(), TestCaseError> {
    host.check()
        .map_err(|e| TestCaseError::fail(format!("host.check() after {what}: {e}")))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_batches_keep_every_invariant(
        specs in prop::collection::vec(vm_spec(), 20),
        tight in prop::option::weighted(0.3, 64u64..6000),
        strict in prop::bool::weighted(0.25),
        actions in prop::collection::vec(action(20), 1..16),
    ) {
        let pages = tight.unwrap_or_else(|| ample_pages(&specs));
        let mut host = Host::new(pages * PAGE_SIZE).expect("host");
        host.strict = strict;
        let guests: Vec<Guest> = combos()
            .into_iter()
            .zip(&specs)
            .map(|((s, t), &spec)| build(&mut host, s, t, spec))
            .collect();
        check(&host, "setup")?;
        for (i, a) in actions.into_iter().enumerate() {
            match a {
                Action::Apply { vm, events, details } => {
                    apply(&mut host, guests[vm].vm, &events, details)?;
                }
                Action::MergePass(vm) => {
                    host.merge_pass(guests[vm].vm);
                }
                Action::Close { vm, shared } => {
                    let g = &guests[vm];
                    let file = if shared { g.shared_file.unwrap_or(g.private_file) } else { g.private_file };
                    if let Err(e) = host.gmem_close(file) {
                        prop_assert_eq!(e.errno(), errno::EBADF, "only a second close fails");
                    }
                }
                Action::Snapshot { vm, events } => {
                    let bytes = host.to_snapshot().map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let mut copy = Host::from_snapshot(&bytes)
                        .map_err(|e| TestCaseError::fail(format!("restore: {e}")))?;
                    check(&copy, "restore")?;
                    let vm = guests[vm].vm;
                    let a = apply(&mut host, vm, &events, false)?;
                    let b = apply(&mut copy, vm, &events, false)?;
                    prop_assert_eq!(a, b, "restored host answers differently");
                    same_counters(&host, &copy)?;
                    host = copy;
                }
                Action::Paths { vm, events } => {
                    let mut copy = host.clone();
                    let vm = guests[vm].vm;
                    let a = apply(&mut host, vm, &events, false)?;
                    let b = apply(&mut copy, vm, &events, true)?;
                    prop_assert_eq!(a, b, "the fast paths answer differently");
                    same_counters(&host, &copy)?;
                    for e in events.iter().filter(|e| e.gfn < GFN_SPAN + 8) {
                        prop_assert_eq!(
                            host.get_memory_attributes(vm, e.gfn),
                            copy.get_memory_attributes(vm, e.gfn),
                            "attributes of gfn {:#x}", e.gfn
                        );
                    }
                    check(&copy, "the same batch with details")?;
                    prop_assert_eq!(
                        read_back(&mut host, vm, &events),
                        read_back(&mut copy, vm, &events),
                        "the pages read back differently"
                    );
                    same_counters(&host, &copy)?;
                }
            }
            check(&host, &format!("action {i}"))?;
        }
    }
}

/// Columns of different lengths are refused as a whole.
#[test]
fn ragged_columns_are_einval() {
    let mut host = Host::new(1024 * PAGE_SIZE).expect("host");
    let g = build(
        &mut host,
        StrategyKind::Dual,
        VmType::SwProtected,
        VmSpec::small(16),
    );
    let e = host
        .apply(g.vm, &[0, 1], &[0], &[1, 1], &[0, 0], None)
        .expect_err("ragged");
    assert_eq!(e.errno(), errno::EINVAL);
    assert_eq!(host.stats(g.vm).events, 0);
    host.check().expect("check");
}

/// Regression (found by `random_batches_keep_every_invariant`): in a VM whose shared side
/// is not userspace memory (`inplace`, `realloc`, `attr_hook`, `two_offsets`), a shared
/// guest access to a plain memslot (no guest_memfd) is served from the slot's userspace
/// memory, but `check_vm` used to look for the backing only on the file side and reported
/// the stage-2 entry as mapping a gfn whose backing is `None`.
#[test]
fn plain_memslot_shared_access_in_non_dual_vm() {
    for strategy in [
        StrategyKind::Inplace,
        StrategyKind::Realloc,
        StrategyKind::AttrHook,
        StrategyKind::TwoOffsets,
    ] {
        let mut host = Host::new(1024 * PAGE_SIZE).expect("host");
        let vm = host.create_vm(VmType::SwProtected, strategy);
        let m = host.mmap_anonymous(4 * PAGE_SIZE).expect("mmap");
        let region = MemRegion {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 4 * PAGE_SIZE,
            userspace_addr: host.mapping(m).addr,
            guest_memfd: GmemArg::None,
            guest_memfd_offset: 0,
            shared_guest_memfd: GmemArg::None,
            shared_offset: None,
        };
        host.set_user_memory_region2(vm, region)
            .expect("plain memslot");
        let status = host
            .apply(vm, &[Op::GuestReadShared as u8], &[0], &[1], &[0], None)
            .expect("apply");
        assert_eq!(status, vec![0], "{strategy:?}");
        host.check().unwrap_or_else(|e| panic!("{strategy:?}: {e}"));
    }
}

/// Apply one event per call and return its status.
fn event_status(host: &mut Host, vm: usize, op: Op, gfn: u64, npages: u64) -> i32 {
    let status = host
        .apply(vm, &[op as u8], &[gfn], &[npages], &[7], None)
        .expect("apply");
    status[0]
}

/// Regression (found by `random_batches_keep_every_invariant`): once a huge folio of a
/// HugeTLB guest_memfd is split and one of its 4 KiB pages freed (a `realloc` conversion
/// or a `two_offsets` shared-side discard punch sub-folio ranges), the next access to the
/// freed page used to allocate a whole new huge folio over the 511 order-0 pages still
/// there: 1023 pages held for 512 offsets, and the next partial punch, splitting the new
/// folio over the old pages' entries, leaked 511 frames.
#[test]
fn refault_in_a_split_huge_folio() {
    for strategy in [StrategyKind::Realloc, StrategyKind::TwoOffsets] {
        let mut host = Host::new(4096 * PAGE_SIZE).expect("host");
        let spec = VmSpec {
            huge: true,
            ..VmSpec::small(512)
        };
        let g = build(&mut host, strategy, VmType::SwProtected, spec);
        let vm = g.vm;
        // The file whose folio gets split (the private file for realloc, the shared one
        // for two_offsets), how to touch and read its pages, and the event that frees one.
        let (file, touch, read, free_op) = if strategy == StrategyKind::Realloc {
            assert_eq!(event_status(&mut host, vm, Op::ConvertPrivate, 0, 1), 0);
            let ops = (
                Op::GuestWritePrivate,
                Op::GuestReadPrivate,
                Op::ConvertPrivate,
            );
            (g.private_file, ops.0, ops.1, ops.2)
        } else {
            let ops = (Op::GuestWriteShared, Op::GuestReadShared, Op::DiscardShared);
            (g.shared_file.expect("two_offsets"), ops.0, ops.1, ops.2)
        };
        assert_eq!(event_status(&mut host, vm, touch, 0, 1), 0);
        assert_eq!(host.file(file).nr_pages(), 512);
        assert_eq!(event_status(&mut host, vm, free_op, 5, 1), 0);
        assert_eq!(
            host.file(file).nr_pages(),
            511,
            "{strategy:?}: split and freed one page"
        );
        assert_eq!(event_status(&mut host, vm, read, 5, 1), 0);
        host.check().expect("check after the re-fault");
        assert!(
            host.file(file).nr_pages() <= 512,
            "{strategy:?}: {} pages held for 512 file offsets",
            host.file(file).nr_pages()
        );
        assert_eq!(event_status(&mut host, vm, free_op, 6, 1), 0);
        host.check().unwrap_or_else(|e| panic!("{strategy:?}: {e}"));
    }
}

/// Regression (found by `random_batches_keep_every_invariant`): orphans (pinned pages
/// removed from a mapping or a file, alive until unpinned) were kept one per page index /
/// file offset. Pin a page, discard it, pin the page that replaces it, discard again: the
/// second orphan overwrote the first, whose frame leaked. Shown for anonymous memory
/// (`dual`) and for a guest_memfd shared range (`two_offsets`).
#[test]
fn pinned_page_discarded_twice() {
    for strategy in [StrategyKind::Dual, StrategyKind::TwoOffsets] {
        let mut host = Host::new(1024 * PAGE_SIZE).expect("host");
        let vm = build(&mut host, strategy, VmType::SwProtected, VmSpec::small(4)).vm;
        for _ in 0..2 {
            assert_eq!(event_status(&mut host, vm, Op::Pin, 0, 1), 0);
            assert_eq!(event_status(&mut host, vm, Op::DiscardShared, 0, 1), 0);
        }
        host.check().unwrap_or_else(|e| panic!("{strategy:?}: {e}"));
        for _ in 0..2 {
            assert_eq!(
                event_status(&mut host, vm, Op::Unpin, 0, 1),
                0,
                "{strategy:?}"
            );
        }
        assert_eq!(
            host.free_pages(),
            host.total_pages(),
            "{strategy:?}: frames leaked"
        );
    }
}
