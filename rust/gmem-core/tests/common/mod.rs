//! Host setup shared by `prop_host.rs` and the `host_events` fuzz target: VMs laid out as
//! a VMM lays out a confidential guest (see `python/gmem/setup.py`), and the rules every
//! event batch must follow whatever the state.

use gmem_core::error::errno;
use gmem_core::uapi;
use gmem_core::vm::Options;
use gmem_core::{GmemArg, Host, MemRegion, Op, PAGE_SHIFT, PAGE_SIZE, StrategyKind, VmType};

/// First gfn whose gpa does not fit in 64 bits.
pub const GFN_LIMIT: u64 = 1 << (64 - PAGE_SHIFT);
/// Largest guest, in pages.
pub const MAX_PAGES: u64 = 320;
/// Gap between the guest_memfd slot and the optional plain slot.
pub const GAP: u64 = 16;
pub const PLAIN_PAGES: u64 = 32;
/// Gfns below this can be in a memslot; the rest never are.
pub const GFN_SPAN: u64 = MAX_PAGES + GAP + PLAIN_PAGES;

/// The errnos `vm.apply` may report (docs/api.md, "Events").
/// The errnos events may end with: those of every op, plus `ENOENT` (a pre-fault outside
/// the memslots, a memory failure where no page is) and `EHWPOISON` (a poisoned page).
pub const ERRNOS: [i32; 6] = [
    errno::EINVAL,
    errno::EFAULT,
    errno::EAGAIN,
    errno::ENOMEM,
    errno::ENOENT,
    errno::EHWPOISON,
];

#[derive(Debug, Clone, Copy)]
pub struct VmSpec {
    /// Guest size, in pages: 1..=MAX_PAGES.
    pub pages: u64,
    /// Back the guest with 2 MiB HugeTLB folios.
    pub huge: bool,
    /// Give the private guest_memfd `GUEST_MEMFD_FLAG_MMAP` even where the strategy does
    /// not need it (a `dual` slot then serves shared faults from guest_memfd too).
    pub mmap: bool,
    /// A second memslot, without guest_memfd, after a gap.
    pub plain_slot: bool,
    pub opts: Options,
}

impl VmSpec {
    pub fn small(pages: u64) -> Self {
        Self {
            pages,
            huge: false,
            mmap: false,
            plain_slot: false,
            opts: Options::default(),
        }
    }
}

/// Every (strategy, platform) pair, in a fixed order: VM `i` is `combos()[i]`.
pub fn combos() -> Vec<(StrategyKind, VmType)> {
    StrategyKind::ALL
        .iter()
        .flat_map(|&s| VmType::ALL.iter().map(move |&t| (s, t)))
        .collect()
}

pub struct Guest {
    pub vm: usize,
    pub private_file: usize,
    /// The `two_offsets` shared-side file.
    pub shared_file: Option<usize>,
}

fn fd(host: &Host, file: usize) -> GmemArg {
    GmemArg::Fd(i64::from(host.file(file).fd().expect("open")))
}

/// Create a VM with one guest_memfd memslot at gpa 0 (plus what `spec` asks for).
pub fn build(host: &mut Host, strategy: StrategyKind, vm_type: VmType, spec: VmSpec) -> Guest {
    let vm = host.create_vm(vm_type, strategy);
    host.vm_mut(vm).set_opts(spec.opts);
    let same_file = matches!(
        strategy,
        StrategyKind::Inplace | StrategyKind::Realloc | StrategyKind::AttrHook
    );
    let mmap = uapi::GUEST_MEMFD_FLAG_MMAP & host.supported_gmem_flags(vm);
    let (order, huge_flag) = if spec.huge {
        (9, uapi::GUEST_MEMFD_FLAG_HUGETLB)
    } else {
        (0, 0)
    };
    let unit = 1u64 << order;
    let size = spec.pages.div_ceil(unit) * unit * PAGE_SIZE;
    let private_flags = huge_flag | if same_file || spec.mmap { mmap } else { 0 };
    let private_file = host
        .create_guest_memfd(vm, size, private_flags, order)
        .expect("create guest_memfd");
    let anon = host
        .mmap_anonymous(spec.pages * PAGE_SIZE)
        .expect("mmap anonymous");
    let mut shared_file = None;
    let (shared_guest_memfd, shared_offset) = if strategy == StrategyKind::TwoOffsets {
        let shared = host
            .create_guest_memfd(vm, size, huge_flag | mmap, order)
            .expect("create shared guest_memfd");
        shared_file = Some(shared);
        (fd(host, shared), Some(0))
    } else {
        (GmemArg::None, None)
    };
    host.set_user_memory_region2(
        vm,
        MemRegion {
            slot: 0,
            flags: uapi::KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: 0,
            memory_size: spec.pages * PAGE_SIZE,
            userspace_addr: host.mapping(anon).addr,
            guest_memfd: fd(host, private_file),
            guest_memfd_offset: 0,
            shared_guest_memfd,
            shared_offset,
        },
    )
    .expect("guest_memfd memslot");
    if spec.plain_slot {
        let m = host
            .mmap_anonymous(PLAIN_PAGES * PAGE_SIZE)
            .expect("mmap anonymous");
        host.set_user_memory_region2(
            vm,
            MemRegion {
                slot: 1,
                flags: 0,
                guest_phys_addr: (spec.pages + GAP) * PAGE_SIZE,
                memory_size: PLAIN_PAGES * PAGE_SIZE,
                userspace_addr: host.mapping(m).addr,
                guest_memfd: GmemArg::None,
                guest_memfd_offset: 0,
                shared_guest_memfd: GmemArg::None,
                shared_offset: None,
            },
        )
        .expect("plain memslot");
    }
    Guest {
        vm,
        private_file,
        shared_file,
    }
}

/// Host RAM no guest can exhaust: every gfn backed twice, rounded to 2 MiB, plus slack
/// (as `host_pages_for` in `python/gmem/setup.py`), plus the plain slots.
pub fn ample_pages(specs: &[VmSpec]) -> u64 {
    specs
        .iter()
        .map(|s| 2 * s.pages.div_ceil(512) * 512 + 512 + PLAIN_PAGES)
        .sum()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub op: u8,
    pub gfn: u64,
    pub npages: u64,
    pub value: u64,
}

/// The status the API fixes for an event whatever the state, if any.
pub fn fixed_status(e: &Event) -> Option<i32> {
    let bad_range = e.npages == 0 || e.gfn >= GFN_LIMIT || e.npages > GFN_LIMIT - e.gfn;
    (Op::from_u8(e.op).is_none() || bad_range).then_some(-errno::EINVAL)
}

/// Run `events` on `vm` and check what holds whatever the state: one status per event,
/// each 0 or a listed negative errno, `EINVAL` where the API fixes it, the event counter
/// advanced, one detail per event. Returns the statuses, or what went wrong.
pub fn apply_checked(
    host: &mut Host,
    vm: usize,
    events: &[Event],
    details: bool,
) -> Result<Vec<i32>, String> {
    let ops: Vec<u8> = events.iter().map(|e| e.op).collect();
    let gfns: Vec<u64> = events.iter().map(|e| e.gfn).collect();
    let npages: Vec<u64> = events.iter().map(|e| e.npages).collect();
    let values: Vec<u64> = events.iter().map(|e| e.value).collect();
    let before = host.stats(vm).events;
    let mut det = Vec::new();
    let status = host
        .apply(
            vm,
            &ops,
            &gfns,
            &npages,
            &values,
            details.then_some(&mut det),
        )
        .map_err(|e| format!("apply failed: {e}"))?;
    if status.len() != events.len() {
        return Err(format!(
            "{} statuses for {} events",
            status.len(),
            events.len()
        ));
    }
    if host.stats(vm).events != before + events.len() as u64 {
        return Err("events counter did not advance by the batch size".into());
    }
    if details && det.len() != events.len() {
        return Err(format!("{} details for {} events", det.len(), events.len()));
    }
    for (e, &s) in events.iter().zip(&status) {
        if s != 0 && s != gmem_core::uapi::KVM_EXIT_MMIO && !ERRNOS.contains(&-s) {
            return Err(format!(
                "status {s} for {e:?} is neither 0, KVM_EXIT_MMIO nor a negative errno the API lists"
            ));
        }
        if let Some(f) = fixed_status(e)
            && s != f
        {
            return Err(format!("status {s} for {e:?}, expected {f}"));
        }
    }
    Ok(status)
}
