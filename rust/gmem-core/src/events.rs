//! Event batches: the fast path that benchmarks and embedding simulators drive.

use crate::PAGE_SHIFT;
use crate::access::HostOp;
use crate::convert::{BoundPart, Parts};
use crate::error::{Error, Result, einval, err, errno};
use crate::host::{Host, Loc};
use crate::memslot::FilePage;
use crate::stage2::Leaf;
use crate::strategy::{ConvertTouches, Strategy};
use crate::vm::Vm;

/// Event operations (`gmem.Op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    ConvertPrivate = 0,
    ConvertShared = 1,
    GuestReadPrivate = 2,
    GuestReadShared = 3,
    GuestWritePrivate = 4,
    GuestWriteShared = 5,
    PunchHole = 6,
    Pin = 7,
    Unpin = 8,
    DiscardShared = 9,
    HostRead = 10,
    HostWrite = 11,
    Allocate = 12,
    /// `memory_failure()` on the guest_memfd page behind each gfn's private view (the
    /// only page of a same-page design): `Host::memory_failure`.
    MemoryFailure = 13,
    /// `KVM_PRE_FAULT_MEMORY` over the range (`Host::pre_fault_memory`).
    PreFault = 14,
}

impl Op {
    pub const COUNT: u8 = 15;

    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Op::ConvertPrivate,
            1 => Op::ConvertShared,
            2 => Op::GuestReadPrivate,
            3 => Op::GuestReadShared,
            4 => Op::GuestWritePrivate,
            5 => Op::GuestWriteShared,
            6 => Op::PunchHole,
            7 => Op::Pin,
            8 => Op::Unpin,
            9 => Op::DiscardShared,
            10 => Op::HostRead,
            11 => Op::HostWrite,
            12 => Op::Allocate,
            13 => Op::MemoryFailure,
            14 => Op::PreFault,
            _ => return None,
        })
    }

    /// For a guest access: whether it is private, and the value it writes (`None` for a
    /// read).
    #[inline]
    fn guest_access(self, value: u64) -> Option<(bool, Option<u64>)> {
        match self {
            Op::GuestReadPrivate => Some((true, None)),
            Op::GuestReadShared => Some((false, None)),
            Op::GuestWritePrivate => Some((true, Some(value))),
            Op::GuestWriteShared => Some((false, Some(value))),
            _ => None,
        }
    }
}

/// `fault_flags` bit: the memory-fault exit at `fault_gpa` was answered by an implicit
/// conversion (fault policy `convert`) and the access then succeeded.
pub const DETAIL_IMPLICIT_CONVERSION: u32 = 1 << 31;

/// Per-event details (`gmem.DETAIL_DTYPE`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Detail {
    /// Last value read (reads), or written.
    pub value: u64,
    pub fault_gpa: u64,
    pub fault_flags: u32,
    /// Host pages allocated and freed by the event.
    pub allocated: u64,
    pub freed: u64,
}

/// A stage-2 lookup of one gfn: the leaf mapping it, if any.
#[derive(Debug, Clone, Copy)]
struct Lookup(Option<Leaf>);

/// What `apply`'s pipeline found ahead for a guest access to `gfn`, at table generation
/// `generation`: the stage-2 lookup, when it made one (shared accesses), and where the
/// page's content lives, when the page is mapped as the access asks.
#[derive(Debug, Clone, Copy)]
struct Ahead {
    generation: u64,
    gfn: u64,
    lookup: Option<Lookup>,
    loc: Option<Loc>,
}

/// The memslot `apply` last found for a private access: `[base, end)` and its
/// guest_memfd binding (the file page of `base`), if any. Memslots do not change
/// during a batch, so it stays valid for the whole batch.
#[derive(Debug, Clone, Copy, Default)]
struct SlotMemo {
    base: u64,
    end: u64,
    gmem: Option<FilePage>,
}

impl SlotMemo {
    /// The guest_memfd page bound to `gfn` of `vm`, if live.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn file_page(&mut self, vm: &Vm, gfn: u64) -> Option<(usize, u64)> {
        if !(self.base..self.end).contains(&gfn) {
            let s = vm.slot_at(gfn)?;
            *self = SlotMemo {
                base: s.base_gfn,
                end: s.end_gfn(),
                gmem: s.offset_of(s.base_gfn),
            };
        }
        let p = self.gmem?;
        p.live.then_some((p.file, p.off + (gfn - self.base)))
    }
}

/// How many events ahead `apply` issues cache hints.
const AHEAD: usize = 16;

/// How many events ahead the loop of a batch of private accesses hints the stage-2
/// bits, and then, once they are cached, finds the page (and hints a write's content).
/// Farther than `AHEAD`: an access has one random line to wait for, where a conversion
/// has three. Measured with `drive goal 24 200000 7 scattered dual`, reads (ns, medians
/// of alternating runs): 16/8 21.5-22.3, 24/8 18.1-19.6, 32/16 17.0-18.9, 64/32 17.4-21.7.
const READ_FAR: usize = 32;
const READ_NEAR: usize = 16;

/// Largest gfn whose gpa fits in 64 bits.
const GFN_LIMIT: u64 = 1 << (64 - PAGE_SHIFT);

// Ops as the raw byte of an event: on the hot loops a few compares, where a match on
// `Op` is a jump table.
const CONVERT_PRIVATE: u8 = Op::ConvertPrivate as u8;
const CONVERT_SHARED: u8 = Op::ConvertShared as u8;
const READ_PRIVATE: u8 = Op::GuestReadPrivate as u8;
const WRITE_PRIVATE: u8 = Op::GuestWritePrivate as u8;
const READ_SHARED: u8 = Op::GuestReadShared as u8;
const WRITE_SHARED: u8 = Op::GuestWriteShared as u8;

/// `EINVAL` for an event whose range does not fit: the end address must fit in u64, as
/// `address + size` must for the ioctls.
fn range_error(gfn: u64, npages: u64) -> Error {
    einval(format!("event range gfn {gfn:#x} + {npages} pages invalid"))
}

/// A batch of events, read one at a time: `(op, gfn, npages, value)` of event `i`.
pub trait Events {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn get(&self, i: usize) -> (u8, u64, u64, u64);
    /// The gfn of event `i` (what the look-ahead reads).
    #[inline]
    fn gfn(&self, i: usize) -> u64 {
        self.get(i).1
    }
    /// The op of every event, when all are that op on one page (`None` for an empty
    /// batch or a mixed one): `apply` then runs a loop made for that op.
    fn single_page_op(&self) -> Option<u8> {
        let (op, _, _, _) = (!self.is_empty()).then(|| self.get(0))?;
        (0..self.len())
            .all(|i| {
                let (o, _, np, _) = self.get(i);
                o == op && np == 1
            })
            .then_some(op)
    }
}

/// Events as four columns of equal length.
#[derive(Debug, Clone, Copy)]
pub struct Columns<'a> {
    pub ops: &'a [u8],
    pub gfns: &'a [u64],
    pub npages: &'a [u64],
    pub values: &'a [u64],
}

impl Events for Columns<'_> {
    #[inline]
    fn len(&self) -> usize {
        self.ops.len()
    }
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn get(&self, i: usize) -> (u8, u64, u64, u64) {
        (self.ops[i], self.gfns[i], self.npages[i], self.values[i])
    }
    #[inline]
    fn gfn(&self, i: usize) -> u64 {
        self.gfns[i]
    }
    fn single_page_op(&self) -> Option<u8> {
        let &op = self.ops.first()?;
        (self.ops.iter().all(|&o| o == op) && self.npages.iter().all(|&np| np == 1)).then_some(op)
    }
}

/// Events as packed little-endian records of [`Packed::RECORD`] bytes: `op` (u8), then
/// `gfn`, `npages`, `value` (u64 each) — the memory of a `gmem.EVENT_DTYPE` array, read
/// in place.
#[derive(Debug, Clone, Copy)]
pub struct Packed<'a>(&'a [u8]);

impl<'a> Packed<'a> {
    pub const RECORD: usize = 25;

    /// `bytes` as records; `EINVAL` unless its length is a whole number of records.
    pub fn new(bytes: &'a [u8]) -> Result<Self> {
        if !bytes.len().is_multiple_of(Self::RECORD) {
            return Err(einval(format!(
                "{} bytes are not a whole number of {}-byte event records",
                bytes.len(),
                Self::RECORD
            )));
        }
        Ok(Self(bytes))
    }

    /// Record `i`, as an array: one bounds check, none for its fields.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn record(&self, i: usize) -> &[u8; Packed::RECORD] {
        self.0[i * Self::RECORD..][..Self::RECORD]
            .try_into()
            .expect("a whole record")
    }
}

impl Events for Packed<'_> {
    #[inline]
    fn len(&self) -> usize {
        self.0.len() / Self::RECORD
    }
    // Measured: left to the inliner, this call stayed out of line in the extension and
    // cost ~14 ns per event (60.8 vs 73.3 ns per random conversion, batches of 10^6).
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn get(&self, i: usize) -> (u8, u64, u64, u64) {
        let r = self.record(i);
        let word = |at: usize| u64::from_le_bytes(r[at..at + 8].try_into().expect("8 bytes"));
        (r[0], word(1), word(9), word(17))
    }
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn gfn(&self, i: usize) -> u64 {
        u64::from_le_bytes(self.record(i)[1..9].try_into().expect("8 bytes"))
    }
    fn single_page_op(&self) -> Option<u8> {
        let &op = self.0.first()?;
        let one = 1u64.to_le_bytes();
        self.0
            .chunks_exact(Self::RECORD)
            .all(|r| r[0] == op && r[9..17] == one)
            .then_some(op)
    }
}

impl Host {
    /// Run a batch of events on `vm`, given as columns; one status per event: 0 or
    /// `-errno`.
    pub fn apply(
        &mut self,
        vm: usize,
        ops: &[u8],
        gfns: &[u64],
        npages: &[u64],
        values: &[u64],
        details: Option<&mut Vec<Detail>>,
    ) -> Result<Vec<i32>> {
        let n = ops.len();
        if gfns.len() != n || npages.len() != n || values.len() != n {
            return Err(einval("event columns differ in length"));
        }
        let cols = Columns {
            ops,
            gfns,
            npages,
            values,
        };
        self.apply_events(vm, &cols, details)
    }

    /// Run a batch of events on `vm`; one status per event: 0 or `-errno`. Never in line:
    /// its loops were laid out (and their instructions counted) as a function of their own.
    #[inline(never)]
    pub fn apply_events(
        &mut self,
        vm: usize,
        events: &impl Events,
        mut details: Option<&mut Vec<Detail>>,
    ) -> Result<Vec<i32>> {
        let n = events.len();
        // Statuses are written only for events that fail.
        let mut out = vec![0; n];
        // A guest access to a page mapped as it asks and a single-page conversion skip the
        // generic dispatch, unless the caller wants details or a check after every event.
        let fast = details.is_none() && !self.strict;
        if fast {
            // A batch of one kind of single-page event gets a loop made for it.
            match events.single_page_op() {
                Some(op @ (CONVERT_PRIVATE | CONVERT_SHARED)) => {
                    self.convert_pages(vm, events, op == CONVERT_PRIVATE, &mut out);
                    return Ok(out);
                }
                Some(op @ (READ_PRIVATE | WRITE_PRIVATE)) => {
                    self.private_accesses(vm, events, op == WRITE_PRIVATE, &mut out);
                    return Ok(out);
                }
                _ => {}
            }
        }
        // Events done by that fast path, added to the VM's count at the end (the fast
        // path never runs in strict mode, the only way out of the loop before the end).
        let mut fast_events = 0;
        // Stage-2 lookups made by the second prefetch pass, by event index modulo `AHEAD`:
        // an event reuses its lookup when no mapping changed since.
        let mut known: [Option<Ahead>; AHEAD] = [None; AHEAD];
        let mut memo = SlotMemo::default();
        // The same for the event at hand, and what a conversion touches (the VM's design
        // is fixed).
        let mut now = SlotMemo::default();
        let touches = self.vms[vm].strategy.convert_touches();
        for i in 0..n {
            // Software pipeline: hint the structures of the events `AHEAD` and `AHEAD / 2`
            // ahead, so that the cache misses of ~`AHEAD` random events overlap instead of
            // following one another (the first pass finds the slots, the second, once the
            // slot is cached, the frame behind it).
            if i + AHEAD < n {
                let (op, gfn, np, _) = events.get(i + AHEAD);
                self.prefetch_event(vm, op, gfn, np, false, &mut memo);
            }
            if i + AHEAD / 2 < n {
                let j = i + AHEAD / 2;
                let (op, gfn, np, _) = events.get(j);
                if let Some((lookup, loc)) = self.prefetch_event(vm, op, gfn, np, true, &mut memo) {
                    let generation = self.vms[vm].s2.generation();
                    known[j % AHEAD] = Some(Ahead {
                        generation,
                        gfn,
                        lookup,
                        loc,
                    });
                }
            }
            let (op, gfn, np, value) = events.get(i);
            if fast && np == 1 && op <= CONVERT_SHARED {
                let r = self.convert_page(vm, gfn, op == CONVERT_PRIVATE, touches, &mut now);
                if let Err(e) = r {
                    out[i] = e.status();
                }
                fast_events += 1;
                continue;
            }
            let ahead = known[i % AHEAD]
                .take()
                .filter(|a| a.gfn == gfn && a.generation == self.vms[vm].s2.generation());
            if fast
                && np == 1
                && let Some(Ahead { loc: Some(loc), .. }) = ahead
                && let Some((private, write)) = Op::from_u8(op).and_then(|o| o.guest_access(value))
                && self.access_mapped(vm, private, write, loc).is_some()
            {
                // What `event` would do, without its dispatch. A mapped gfn lies in a
                // memslot, so its range is valid.
                fast_events += 1;
                continue;
            }
            let before = details.as_ref().map(|_| {
                let s = &self.vms[vm].stats;
                (s.allocations, s.frees)
            });
            self.implicit = None;
            let r = self.event(vm, op, gfn, np, value, ahead.and_then(|a| a.lookup));
            self.vms[vm].stats.events += 1;
            if self.strict {
                self.check_vm(vm)?;
            }
            if let Err(e) = &r {
                out[i] = e.status();
            }
            if let Some(d) = details.as_deref_mut() {
                let (a0, f0) = before.expect("set with details");
                let s = &self.vms[vm].stats;
                let mut det = Detail {
                    allocated: s.allocations - a0,
                    freed: s.frees - f0,
                    ..Detail::default()
                };
                if let Some((gpa, flags)) = self.implicit.take() {
                    det.fault_gpa = gpa;
                    det.fault_flags = flags as u32 | DETAIL_IMPLICIT_CONVERSION;
                }
                match r {
                    Ok(v) => det.value = v,
                    Err(Error::MemoryFault { gpa, flags, .. }) => {
                        det.fault_gpa = gpa;
                        det.fault_flags = flags as u32;
                    }
                    Err(
                        Error::HostFault { addr: gpa, .. } | Error::Mmio { phys_addr: gpa, .. },
                    ) => det.fault_gpa = gpa,
                    Err(_) => {}
                }
                d.push(det);
            }
        }
        self.vms[vm].stats.events += fast_events;
        Ok(out)
    }

    /// `apply`'s loop for a batch of single-page conversions, all one way (no details,
    /// not strict): on a VM with private memory, the design's loop
    /// ([`Host::convert_pages_as`]); else each event is what [`Host::convert`] says.
    fn convert_pages(&mut self, vm: usize, events: &impl Events, private: bool, out: &mut [i32]) {
        if self.vms[vm].vm_type.has_private_mem() {
            let strategy = self.vms[vm].strategy;
            strategy.convert_pages(self, vm, events, private, out);
        } else {
            let mut memo = SlotMemo::default();
            let touches = self.vms[vm].strategy.convert_touches();
            for (i, status) in out.iter_mut().enumerate() {
                if let Err(e) = self.convert_page(vm, events.gfn(i), private, touches, &mut memo) {
                    *status = e.status();
                }
            }
        }
        self.vms[vm].stats.events += events.len() as u64;
    }

    /// [`Host::convert_pages`] for design `D` on a VM with private memory: the
    /// look-ahead's one pass and the design's conversion of each page.
    pub(crate) fn convert_pages_as<D: Strategy>(
        &mut self,
        vm: usize,
        events: &impl Events,
        private: bool,
        out: &mut [i32],
    ) {
        let n = events.len();
        let touches = ConvertTouches::of::<D>();
        let (mut memo, mut now) = (SlotMemo::default(), SlotMemo::default());
        for (i, status) in out.iter_mut().enumerate() {
            let gfn = events.gfn(i);
            if i + AHEAD < n {
                self.prefetch_conversion(vm, events.gfn(i + AHEAD), touches, &mut memo);
            }
            // The parts are built where they are used, not moved: a move copies them with
            // wide loads over the narrow stores that built them, a failed store forward
            // (perf: a third of the loop's samples with packed records).
            let r = if gfn >= GFN_LIMIT - 1 {
                Err(range_error(gfn, 1))
            } else {
                self.convert_as::<D>(&self.page_parts(vm, gfn, touches, &mut now), private)
            };
            if let Err(e) = r {
                *status = e.status();
            }
        }
    }

    /// `apply`'s loop for a batch of single-page private guest accesses, all reads or all
    /// writes (no details, not strict): the look-ahead hints the stage-2 bits `READ_FAR`
    /// events ahead and, once those are cached, finds the page `READ_NEAR` ahead (and
    /// hints a write's content). An access to a page mapped private is counted, and a
    /// write stores its value; a read's value is not loaded, as nothing returns it
    /// without details. Any other access goes through [`Host::event`].
    fn private_accesses(&mut self, vm: usize, events: &impl Events, write: bool, out: &mut [i32]) {
        let n = events.len();
        let mut memo = SlotMemo::default();
        // The file page found `READ_NEAR` events ahead, by event index modulo `READ_FAR`
        // (`None`: not mapped private), valid from event `fresh`: only a generic event
        // changes mappings, and what was found before it is found again.
        let mut found: [Option<(usize, u64)>; READ_FAR] = [None; READ_FAR];
        let mut fresh = READ_NEAR;
        // The same for the stage-2 slot found `READ_FAR` events ahead.
        let mut slots: [Option<usize>; READ_FAR] = [None; READ_FAR];
        let mut fresh_slots = READ_FAR;
        let mut fast_events = 0;
        for i in 0..n {
            if i + READ_FAR < n {
                let k = i + READ_FAR;
                slots[k % READ_FAR] = self.vms[vm].s2.prefetch_bits(events.gfn(k));
            }
            let j = i + READ_NEAR;
            if j < n {
                let gfn = events.gfn(j);
                let s2 = &self.vms[vm].s2;
                let slot = if j < fresh_slots {
                    s2.slot_of(gfn)
                } else {
                    slots[j % READ_FAR]
                };
                let page = self.mapped_private_in(vm, slot, gfn, &mut memo);
                if write && let Some((f, off)) = page {
                    self.files[f].content.prefetch(off);
                }
                found[j % READ_FAR] = page;
            }
            let gfn = events.gfn(i);
            let page = if i < fresh {
                self.mapped_private(vm, gfn, &mut memo)
            } else {
                found[i % READ_FAR]
            };
            // What `access_mapped` does for a private access, in line.
            if let Some((f, off)) = page
                && self.frames.stale.is_empty()
            {
                if write {
                    self.files[f].content.set(off, events.get(i).3);
                }
                fast_events += 1;
                continue;
            }
            let (op, _, _, value) = events.get(i);
            self.implicit = None;
            if let Err(e) = self.event(vm, op, gfn, 1, value, None) {
                out[i] = e.status();
            }
            self.vms[vm].stats.events += 1;
            (fresh, fresh_slots) = (j + 1, i + READ_FAR + 1);
        }
        self.vms[vm].stats.events += fast_events;
    }

    /// A single-page conversion: what [`Host::event`] would do, without its dispatch.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn convert_page(
        &mut self,
        vm: usize,
        gfn: u64,
        private: bool,
        touches: ConvertTouches,
        memo: &mut SlotMemo,
    ) -> Result<()> {
        if gfn >= GFN_LIMIT - 1 {
            return Err(range_error(gfn, 1));
        }
        self.convert_parts(&self.page_parts(vm, gfn, touches, memo), private)
    }

    /// The parts of a single-page conversion of `gfn` (below `GFN_LIMIT - 1`). The
    /// designs that work on the page's bound file find it through `memo`, the batch's
    /// memo of the last memslot (events never change memslots); the others find it later
    /// if a step asks.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn page_parts(
        &self,
        vm: usize,
        gfn: u64,
        touches: ConvertTouches,
        memo: &mut SlotMemo,
    ) -> Parts {
        if touches == ConvertTouches::VmAttrs {
            return Parts::new(vm, gfn, gfn + 1);
        }
        let part = memo
            .file_page(&self.vms[vm], gfn)
            .map(|(file, o0)| BoundPart {
                g0: gfn,
                g1: gfn + 1,
                file,
                o0,
            });
        Parts::page(vm, gfn, part)
    }

    /// The guest_memfd page behind `gfn` when stage-2 maps it private: a private leaf
    /// maps the page of the gfn's live binding (the leaf is zapped before the binding
    /// goes). Reads the stage-2 bits, not the leaf's frame.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn mapped_private(&self, vm: usize, gfn: u64, memo: &mut SlotMemo) -> Option<(usize, u64)> {
        self.mapped_private_in(vm, self.vms[vm].s2.slot_of(gfn), gfn, memo)
    }

    /// [`Host::mapped_private`] with `gfn`'s stage-2 slot found beforehand.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn mapped_private_in(
        &self,
        vm: usize,
        slot: Option<usize>,
        gfn: u64,
        memo: &mut SlotMemo,
    ) -> Option<(usize, u64)> {
        let v = &self.vms[vm];
        (v.s2.probe_in(slot, gfn) == Some(true))
            .then(|| memo.file_page(v, gfn))
            .flatten()
    }

    /// Cache hints for a single-page conversion of `gfn`: what the design's conversion
    /// reads (one choice, made by constants per design) and the stage-2 slot.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn prefetch_conversion(
        &self,
        vm: usize,
        gfn: u64,
        touches: ConvertTouches,
        memo: &mut SlotMemo,
    ) {
        let v = &self.vms[vm];
        match touches {
            ConvertTouches::VmAttrs => v.attrs.prefetch(gfn),
            ConvertTouches::FileAttrs => {
                // The in-place designs store the attribute per file offset.
                if let Some((f, off)) = memo.file_page(v, gfn)
                    && let Some(a) = &self.files[f].attrs
                {
                    a.prefetch(off);
                }
            }
            ConvertTouches::VmAttrsAndPage => {
                // `realloc` frees the page: its page cache entry and content too.
                v.attrs.prefetch(gfn);
                if let Some((f, off)) = memo.file_page(v, gfn) {
                    self.files[f].pages.prefetch_write(off);
                    self.files[f].content.prefetch_write(off);
                }
            }
        }
        v.s2.prefetch(gfn, false);
    }

    /// Cache hints for a single-page event (nothing for ranges or odd input). The first
    /// pass: the attribute word and the stage-2 slot of a conversion; the stage-2 bits of
    /// a guest access, and for a shared one its frame entry. The second (`late`), once
    /// those are cached: the content of the page, found for a private access from the
    /// gfn's guest_memfd page (no frame entry on the way) and for a shared one from the
    /// stage-2 lookup, which it returns for the event to reuse, with where the content is
    /// when the page is mapped as the access asks.
    #[allow(clippy::inline_always)]
    #[inline(always)]
    fn prefetch_event(
        &self,
        vm: usize,
        op: u8,
        gfn: u64,
        npages: u64,
        late: bool,
        memo: &mut SlotMemo,
    ) -> Option<(Option<Lookup>, Option<Loc>)> {
        if npages != 1 {
            return None;
        }
        let v = &self.vms[vm];
        match op {
            CONVERT_PRIVATE | CONVERT_SHARED if !late => {
                self.prefetch_conversion(vm, gfn, v.strategy.convert_touches(), memo);
            }
            READ_PRIVATE | WRITE_PRIVATE => {
                if !late {
                    v.s2.prefetch_bits(gfn);
                    return None;
                }
                let loc = self
                    .mapped_private(vm, gfn, memo)
                    .map(|(f, off)| Loc::File(f, off));
                if let Some(Loc::File(f, off)) = loc {
                    self.files[f].content.prefetch(off);
                }
                return Some((None, loc));
            }
            READ_SHARED | WRITE_SHARED => {
                if !late {
                    v.s2.prefetch(gfn, true);
                    return None;
                }
                let leaf = v.s2.lookup(gfn, &self.files);
                let loc = leaf
                    .filter(|l| !l.private)
                    .map(|l| self.guest_loc(vm, gfn, false, l.pfn + (gfn - l.gfn) as u32));
                match loc {
                    Some(Loc::Frame(p)) => self.frames.content.prefetch(u64::from(p)),
                    Some(Loc::File(f, off)) => self.files[f].content.prefetch(off),
                    None => {}
                }
                return Some((Some(Lookup(leaf)), loc));
            }
            _ => {}
        }
        None
    }

    /// Guest accesses to `[g0, g1)` in order; the last one's value. Fresh private pages
    /// (an accept, a first touch) are faulted in per run. Out of line: it keeps
    /// [`Host::event`] small enough to inline into the batch loop.
    #[inline(never)]
    fn guest_access_range(
        &mut self,
        vm: usize,
        g0: u64,
        g1: u64,
        private: bool,
        write: Option<u64>,
    ) -> Result<u64> {
        let (mut g, mut last) = (g0, 0);
        while private
            && g1 - g > 1
            && let Some((next, v)) = self.fault_private_run(vm, g, g1, write)
        {
            (g, last) = (next, v);
        }
        for g in g..g1 {
            last = self.guest_access(vm, g << PAGE_SHIFT, private, write)?;
        }
        Ok(last)
    }

    /// One event; returns the last value read or written.
    /// `leaf`: the stage-2 lookup of `gfn`, if the caller holds a valid one.
    fn event(
        &mut self,
        vm: usize,
        op: u8,
        gfn: u64,
        npages: u64,
        value: u64,
        leaf: Option<Lookup>,
    ) -> Result<u64> {
        let Some(op) = Op::from_u8(op) else {
            return Err(einval(format!("unknown op {op}")));
        };
        if npages == 0 || gfn >= GFN_LIMIT || npages >= GFN_LIMIT - gfn {
            return Err(range_error(gfn, npages));
        }
        let end = gfn + npages;
        let mut last = 0;
        match op {
            Op::ConvertPrivate | Op::ConvertShared => {
                self.convert(vm, gfn, end, op == Op::ConvertPrivate)?;
            }
            Op::GuestReadPrivate
            | Op::GuestReadShared
            | Op::GuestWritePrivate
            | Op::GuestWriteShared => {
                let (private, write) = op.guest_access(value).expect("an access");
                if let Some(Lookup(l)) = leaf {
                    last = self.guest_access_at(vm, gfn << PAGE_SHIFT, private, write, l)?;
                } else {
                    last = self.guest_access_range(vm, gfn, end, private, write)?;
                }
            }
            Op::PunchHole | Op::Allocate => {
                for p in self.bound_parts(vm, gfn, end) {
                    let order = self.files[p.file].order;
                    let align = 1u64 << order;
                    if p.o0 % align != 0 || p.o1() % align != 0 {
                        return Err(einval(format!(
                            "range not aligned to the file's {align}-page folios"
                        )));
                    }
                    if op == Op::PunchHole {
                        self.punch(p.file, p.o0, p.o1());
                    } else {
                        let mut off = p.o0;
                        while off < p.o1() {
                            if self.files[p.file].page(off).is_none() {
                                self.gmem_alloc_folio(p.file, off)?;
                            }
                            off += align;
                        }
                    }
                }
            }
            Op::DiscardShared => self.discard_shared(vm, gfn, end),
            Op::MemoryFailure => {
                for g in gfn..end {
                    let Some(FilePage {
                        file,
                        off,
                        live: true,
                    }) = self.vms[vm].slot_at(g).and_then(|s| s.offset_of(g))
                    else {
                        return Err(err(
                            errno::ENOENT,
                            format!("memory_failure: no guest_memfd page behind gfn {g:#x}"),
                        ));
                    };
                    self.memory_failure(file, off << PAGE_SHIFT)?;
                }
            }
            Op::PreFault => {
                last = self.pre_fault_memory(vm, gfn << PAGE_SHIFT, npages << PAGE_SHIFT)?;
            }
            Op::Pin | Op::Unpin | Op::HostRead | Op::HostWrite => {
                let hop = match op {
                    Op::Pin => HostOp::Pin,
                    Op::Unpin => HostOp::Unpin,
                    Op::HostRead => HostOp::Read,
                    _ => HostOp::Write(value),
                };
                for g in gfn..end {
                    last = self.host_gfn_access(vm, g, hop)?;
                }
            }
        }
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use super::{Columns, Events, Packed};

    fn packed(events: &[(u8, u64, u64, u64)]) -> Vec<u8> {
        let mut b = Vec::new();
        for &(op, gfn, np, value) in events {
            b.push(op);
            for w in [gfn, np, value] {
                b.extend_from_slice(&w.to_le_bytes());
            }
        }
        b
    }

    /// Both layouts: every event's fields and gfn, and the op of a batch of one op on
    /// single pages (`None` when empty, mixed or with a range).
    #[test]
    fn layouts_agree_on_fields_and_single_page_op() {
        let cases: [&[(u8, u64, u64, u64)]; 5] = [
            &[],
            &[(2, 7, 1, 0), (2, 1 << 40, 1, 9), (2, u64::MAX, 1, 3)],
            &[(2, 7, 1, 0), (4, 8, 1, 0)],
            &[(1, 7, 1, 0), (1, 8, 2, 0)],
            &[(0, 5, 0, 0)],
        ];
        let want = [None, Some(2), None, None, None];
        for (events, want) in cases.iter().zip(want) {
            let bytes = packed(events);
            let p = Packed::new(&bytes).expect("whole records");
            let col =
                |f: fn(&(u8, u64, u64, u64)) -> u64| -> Vec<u64> { events.iter().map(f).collect() };
            let ops: Vec<u8> = events.iter().map(|e| e.0).collect();
            let (gfns, npages, values) = (col(|e| e.1), col(|e| e.2), col(|e| e.3));
            let c = Columns {
                ops: &ops,
                gfns: &gfns,
                npages: &npages,
                values: &values,
            };
            assert_eq!((p.len(), c.len()), (events.len(), events.len()));
            for (i, e) in events.iter().enumerate() {
                assert_eq!((p.get(i), c.get(i)), (*e, *e));
                assert_eq!((p.gfn(i), c.gfn(i)), (e.1, e.1));
            }
            assert_eq!(p.single_page_op(), want, "{events:?}");
            assert_eq!(c.single_page_op(), want, "{events:?}");
        }
    }
}
