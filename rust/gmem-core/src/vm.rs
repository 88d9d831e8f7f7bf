//! A VM: memslots, the VM-scoped attribute map, stage-2 and counters.

use crate::cover::Cover;
use std::collections::BTreeMap;

use smallvec::SmallVec;

use crate::bit_attr_map::BitAttrMap;
use crate::error::{Result, einval};
use crate::host::Host;
use crate::memslot::Memslot;
use crate::metrics::Stats;
use crate::platform::VmType;
use crate::stage2::Stage2;
use crate::strategy::StrategyKind;

/// What the VMM does on a memory-fault exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FaultPolicy {
    /// Report the exit (`MemoryFault` / `-EFAULT`).
    Exit,
    /// Convert the page to the access's type and retry, as QEMU does for an implicit
    /// conversion.
    Convert,
}

/// When split huge folios are merged back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MergePolicy {
    Eager,
    Deferred,
}

/// When freed or newly allocated pages are cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ZeroPolicy {
    /// Mainline: guest_memfd zeroes a page when first handed out (uptodate bit).
    OnUse,
    /// Clear on free (init_on_free); allocation does not clear again.
    OnFree,
    /// Never clear: unsafe; shows up as violations when data crosses owners.
    Never,
}

/// Pick the choice named `s` for option `what`.
fn parse_choice<T: Copy>(what: &str, s: &str, choices: &[(&str, T)]) -> Result<T> {
    choices
        .iter()
        .find(|(n, _)| *n == s)
        .map(|&(_, v)| v)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            einval(format!(
                "{what} {s:?}: expected one of {}",
                names.join(", ")
            ))
        })
}

impl FaultPolicy {
    pub fn parse(s: &str) -> Result<Self> {
        parse_choice(
            "fault_policy",
            s,
            &[("exit", Self::Exit), ("convert", Self::Convert)],
        )
    }
}

impl MergePolicy {
    pub fn parse(s: &str) -> Result<Self> {
        parse_choice(
            "merge",
            s,
            &[("eager", Self::Eager), ("deferred", Self::Deferred)],
        )
    }
}

impl ZeroPolicy {
    pub fn parse(s: &str) -> Result<Self> {
        let choices = [
            ("on_use", Self::OnUse),
            ("on_free", Self::OnFree),
            ("never", Self::Never),
        ];
        parse_choice("zero", s, &choices)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Options {
    pub fault: FaultPolicy,
    pub merge: MergePolicy,
    pub zero: ZeroPolicy,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            fault: FaultPolicy::Exit,
            merge: MergePolicy::Eager,
            zero: ZeroPolicy::OnUse,
        }
    }
}

/// Memslot ids by base gfn, sorted by it (memslots never overlap): a binary search over
/// one small array per lookup, on every conversion and fault, where a `BTreeMap` range
/// walk cost ~100 instructions. Inserting keeps the order by shifting (memslots are few:
/// at most `KVM_USER_MEM_SLOTS` per address space, and usually added in gfn order, at the
/// end).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct SlotIndex(Vec<(u64, u32)>);

impl SlotIndex {
    /// Entries with a base below `gfn`.
    #[inline]
    fn below(&self, gfn: u64) -> usize {
        self.0.partition_point(|&(b, _)| b < gfn)
    }

    /// Index `base` as slot `id` (replacing any slot there).
    pub(crate) fn insert(&mut self, base: u64, id: u32) {
        let i = self.below(base);
        match self.0.get_mut(i) {
            Some(e) if e.0 == base => e.1 = id,
            _ => self.0.insert(i, (base, id)),
        }
    }

    /// Forget the slot at `base`.
    pub(crate) fn remove(&mut self, base: u64) {
        let i = self.below(base);
        if self.0.get(i).is_some_and(|e| e.0 == base) {
            self.0.remove(i);
        }
    }

    /// The slot whose base is `base`.
    pub(crate) fn get(&self, base: u64) -> Option<u32> {
        let i = self.below(base);
        self.0.get(i).filter(|e| e.0 == base).map(|e| e.1)
    }

    /// The slot with the highest base at or below `gfn`.
    #[inline]
    pub(crate) fn at_or_before(&self, gfn: u64) -> Option<u32> {
        let i = self.0.partition_point(|&(b, _)| b <= gfn);
        i.checked_sub(1).map(|i| self.0[i].1)
    }

    /// Slots with a base in `[start, end)`, in gfn order.
    pub(crate) fn within(&self, start: u64, end: u64) -> impl Iterator<Item = u32> + '_ {
        let (a, b) = (self.below(start), self.below(end.max(start)));
        self.0[a..b].iter().map(|e| e.1)
    }

    /// Every slot id.
    pub(crate) fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().map(|e| e.1)
    }

    /// Whether the bases strictly increase (for an index read from a snapshot).
    pub(crate) fn sorted(&self) -> bool {
        self.0.windows(2).all(|w| w[0].0 < w[1].0)
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Vm {
    pub(crate) fd: i32,
    /// `KVM_CREATE_VM`'s type: the uAPI's name, kept.
    #[allow(clippy::struct_field_names)]
    pub(crate) vm_type: VmType,
    pub(crate) strategy: StrategyKind,
    pub(crate) slots: BTreeMap<u32, Memslot>,
    /// base gfn -> slot id (memslots never overlap).
    pub(crate) by_gfn: SlotIndex,
    /// VM-scoped attributes (mainline `mem_attr_array`), default shared.
    pub(crate) attrs: BitAttrMap,
    pub(crate) s2: Stage2,
    pub(crate) stats: Stats,
    pub(crate) opts: Options,
    pub(crate) closed: bool,
    /// Some live private-side binding is a huge-folio file (kept by
    /// `Host::bindings_changed`): conversions skip folio splitting and merging otherwise.
    pub(crate) huge_bound: bool,
    /// Memslots with `KVM_MEM_READONLY` (kept by `Host::insert_slot`/`delete_slot`): while
    /// there are none, a guest write needs no memslot lookup.
    pub(crate) readonly_slots: u32,
    /// How many of its memslots point at each host address with their shared view (see
    /// `Host::slot_shared_in_userspace`): the anonymous pages it counts in its footprint.
    pub(crate) anon_cover: Cover,
}

impl Vm {
    /// The VM's fd.
    pub fn fd(&self) -> i32 {
        self.fd
    }

    pub fn vm_type(&self) -> VmType {
        self.vm_type
    }

    pub fn strategy(&self) -> StrategyKind {
        self.strategy
    }

    /// The VMM policy knobs (`vm.set_options`).
    pub fn opts(&self) -> Options {
        self.opts
    }

    pub fn set_opts(&mut self, opts: Options) {
        self.opts = opts;
    }

    /// Runs in the VM-scoped attribute map.
    pub fn attr_runs(&self) -> usize {
        self.attrs.intervals()
    }

    pub fn new(fd: i32, vm_type: VmType, strategy: StrategyKind) -> Self {
        Self {
            fd,
            vm_type,
            strategy,
            slots: BTreeMap::new(),
            by_gfn: SlotIndex::default(),
            attrs: BitAttrMap::new(0),
            s2: Stage2::new(),
            stats: Stats::default(),
            opts: Options::default(),
            closed: false,
            huge_bound: false,
            readonly_slots: 0,
            anon_cover: Cover::default(),
        }
    }

    /// The memslot containing `gfn`.
    #[inline]
    pub fn slot_at(&self, gfn: u64) -> Option<&Memslot> {
        let id = self.by_gfn.at_or_before(gfn)?;
        let s = &self.slots[&id];
        s.contains(gfn).then_some(s)
    }

    /// Ids of the memslots intersecting `[start, end)`, in gfn order (inline, no heap
    /// allocation, for the usual handful).
    pub fn slots_in(&self, start: u64, end: u64) -> SmallVec<[u32; 4]> {
        let mut out = SmallVec::new();
        if let Some(id) = start
            .checked_sub(1)
            .and_then(|g| self.by_gfn.at_or_before(g))
            && self.slots[&id].end_gfn() > start
        {
            out.push(id);
        }
        out.extend(self.by_gfn.within(start, end));
        out
    }
}

// ---------------------------------------------------------------- stage-2 zap

impl Host {
    /// Zap stage-2 `[g0, g1)` of `vm`, counting one zap and one TLB flush if anything went.
    #[allow(clippy::inline_always)] // once per conversion; left to the inliner it stays a call
    #[inline(always)]
    pub(crate) fn zap(&mut self, vm: usize, g0: u64, g1: u64, filter: Option<bool>) -> u64 {
        let v = &mut self.vms[vm];
        let z = v.s2.zap(g0, g1, filter);
        if z.leaves == 0 {
            return 0;
        }
        let c = &self.costs;
        v.stats
            .stage2_zapped(c.stage2_zap + c.stage2_zap_entry * z.leaves + c.tlb_flush);
        if filter != Some(false) {
            let vt = v.vm_type;
            vt.zap_private(v, c, z.leaves);
        }
        z.leaves
    }
}
