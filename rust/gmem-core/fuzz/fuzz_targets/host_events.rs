//! Bytes → a host with a few VMs (any strategy × platform, as `tests/common` lays them out)
//! and event batches (op codes, gfns and page counts taken raw, so invalid events are
//! frequent). `apply` must not panic, statuses must be 0 or a listed negative errno, and
//! `host.check()` must hold after every batch.
#![no_main]

#[allow(dead_code)]
#[path = "../../tests/common/mod.rs"]
mod common;

use arbitrary::Arbitrary;
use common::{Event, GFN_LIMIT, GFN_SPAN, MAX_PAGES, VmSpec, ample_pages, combos};
use gmem_core::vm::{FaultPolicy, MergePolicy, Options, ZeroPolicy};
use gmem_core::{Host, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct RawVm {
    combo: u8,
    pages: u16,
    huge: bool,
    mmap: bool,
    plain_slot: bool,
    fault: bool,
    merge: bool,
    zero: u8,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Gfn {
    InSpan(u16),
    Raw(u64),
    NearLimit(u8),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum Npages {
    Small(u8),
    Raw(u64),
}

#[derive(Debug, Clone, Copy, Arbitrary)]
struct RawEvent {
    op: u8,
    gfn: Gfn,
    npages: Npages,
    value: u64,
}

impl RawEvent {
    fn get(self) -> Event {
        let gfn = match self.gfn {
            Gfn::InSpan(g) => u64::from(g) % (GFN_SPAN + 8),
            Gfn::Raw(g) => g,
            Gfn::NearLimit(d) => GFN_LIMIT.wrapping_sub(u64::from(d) % 4),
        };
        let npages = match self.npages {
            Npages::Small(n) => u64::from(n),
            Npages::Raw(n) => n,
        };
        // Op codes up to 15: the 13 known ones and a few unknown.
        Event {
            op: self.op % 16,
            gfn,
            npages,
            value: self.value,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Action {
    Apply {
        vm: u8,
        events: Vec<RawEvent>,
        details: bool,
    },
    MergePass(u8),
    Close {
        vm: u8,
        shared: bool,
    },
}

#[derive(Debug, Arbitrary)]
struct Input {
    vms: Vec<RawVm>,
    tight: Option<u16>,
    strict: bool,
    actions: Vec<Action>,
}

fuzz_target!(|input: Input| {
    let all = combos();
    let picked: Vec<_> = input
        .vms
        .iter()
        .take(4)
        .map(|r| {
            let (strategy, vm_type) = all[usize::from(r.combo) % all.len()];
            let spec = VmSpec {
                pages: u64::from(r.pages) % MAX_PAGES + 1,
                huge: r.huge,
                mmap: r.mmap,
                plain_slot: r.plain_slot,
                opts: Options {
                    fault: if r.fault {
                        FaultPolicy::Convert
                    } else {
                        FaultPolicy::Exit
                    },
                    merge: if r.merge {
                        MergePolicy::Deferred
                    } else {
                        MergePolicy::Eager
                    },
                    zero: [ZeroPolicy::OnUse, ZeroPolicy::OnFree, ZeroPolicy::Never]
                        [usize::from(r.zero % 3)],
                },
            };
            (strategy, vm_type, spec)
        })
        .collect();
    if picked.is_empty() {
        return;
    }
    let specs: Vec<VmSpec> = picked.iter().map(|p| p.2).collect();
    let pages = input
        .tight
        .map_or_else(|| ample_pages(&specs), |t| u64::from(t) % 6000 + 64);
    let mut host = Host::new(pages * PAGE_SIZE).expect("host");
    host.strict = input.strict;
    let guests: Vec<common::Guest> = picked
        .iter()
        .map(|&(s, t, spec)| common::build(&mut host, s, t, spec))
        .collect();
    host.check().expect("check after setup");
    for action in input.actions.into_iter().take(32) {
        match action {
            Action::Apply {
                vm,
                events,
                details,
            } => {
                let i = usize::from(vm) % guests.len();
                let events: Vec<Event> = events.iter().take(64).map(|e| e.get()).collect();
                if let Err(e) = common::apply_checked(&mut host, guests[i].vm, &events, details) {
                    panic!("{e}");
                }
            }
            Action::MergePass(vm) => {
                host.merge_pass(guests[usize::from(vm) % guests.len()].vm);
            }
            Action::Close { vm, shared } => {
                let g = &guests[usize::from(vm) % guests.len()];
                let file = if shared {
                    g.shared_file.unwrap_or(g.private_file)
                } else {
                    g.private_file
                };
                // A second close is EBADF; anything else is not expected.
                if let Err(e) = host.gmem_close(file) {
                    assert_eq!(e.errno(), gmem_core::error::errno::EBADF);
                }
            }
        }
        if let Err(e) = host.check() {
            panic!("host.check(): {e}");
        }
    }
});
