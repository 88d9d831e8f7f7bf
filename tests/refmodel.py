"""A small pure-Python reference model of gmem's kernel-shaped API.

It mirrors the public names of :mod:`gmem` (``Host``, ``Vm``, ``GuestMemfd``,
``Mapping``, the constants and the error classes) so that a test can be written once
and run against either.  It is written for clarity, not speed: per-page dicts, linear
scans, the kernel's checks spelled out in the kernel's order.

Scope: the ``dual`` strategy on ``sw_protected`` (mainline KVM, ~v6.18).  Other
strategies plug in by subclassing :class:`Strategy` and registering the class in
:data:`STRATEGIES`; other platforms by adding to :data:`PLATFORMS`.

Semantics modelled (``dual``):

* Memslots (``KVM_SET_USER_MEMORY_REGION2``): checks in the order of
  ``kvm_set_user_memory_region()`` / ``kvm_set_memory_region()`` / ``kvm_gmem_bind()``.
  guest_memfd memslots are immutable (delete only); other memslots may be moved or
  have their ``LOG_DIRTY_PAGES`` bit flipped.
* VM attributes: a gfn -> attributes map (default 0 = shared), independent of memslots.
  A conversion only flips attributes and zaps stage-2: KVM never discards the side no
  longer used, so nothing is freed or allocated by a conversion.
* guest_memfd pages are allocated on first private guest access or on fallocate, and
  read 0 when new.  ``PUNCH_HOLE`` frees them (a later access reads 0 again).
* Anonymous (VMM) memory: a page is allocated on first write or pin; a host read of an
  untouched page returns 0 and allocates nothing.  ``discard`` (MADV_DONTNEED) takes
  pages out of the mapping; unpinned ones are freed, pinned ones stay allocated (not
  visible through the mapping any more) until their last unpin.
  A guest *shared* access to gfn reads or writes the anonymous page at
  ``userspace_addr + (gfn - base_gfn) * PAGE_SIZE``.
  A guest shared *read* of an untouched anonymous page allocates it: the guest's
  stage-2 fault goes through ``hva_to_pfn()`` which faults the host page in (for a
  ``MAP_SHARED`` anonymous mapping that populates a zeroed shmem page).
* Guest access rules (``kvm_mmu_faultin_pfn``): first the private-ness of the access is
  compared with the gfn's attribute (mismatch -> ``MemoryFault``), then the memslot is
  looked up: a private access without a usable guest_memfd (no slot, a slot without
  one, a closed file) -> ``MemoryFault``; a shared access without a memslot, and a
  shared write to a read-only memslot -> ``MmioExit`` (``KVM_EXIT_MMIO``, 8 bytes).
* Statistics: ``pages_allocated`` = the VM's guest_memfd pages + the allocated anonymous
  pages (and pinned pages discarded from them) inside one of the VM's memslots'
  ``[userspace_addr, +memory_size)`` ranges, each counted once.
  ``double_backed_pages`` = gfns whose private guest_memfd page and shared anonymous
  page are both allocated.  ``allocations`` / ``frees`` count 4 KiB page allocations
  and frees: guest_memfd pages of the VM's files, and anonymous pages inside one of the
  VM's memslots' ranges at the moment they are allocated or freed (a page that a memslot
  covers later comes into ``pages_allocated`` but not into ``allocations``).
* A failed call changes nothing.
"""

from __future__ import annotations

import errno as E
import itertools
import os
from dataclasses import dataclass

PAGE_SIZE = 4096
PAGE_SHIFT = 12
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
#: x86 kvm_mmu_max_gfn(): at most 52 bits of guest physical address.
MAX_GPA_BITS = 52
TDX_SHARED_GPA_BIT = 51
KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3
KVM_EXIT_MMIO = 6
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
GUEST_MEMFD_FLAG_HUGETLB = 1 << 4
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_READONLY_MEM = 81
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_GUEST_MEMFD_FLAGS = 244
KVM_USER_MEM_SLOTS = 32764

# vfs_fallocate() accepts these mode bits (FALLOC_FL_MODE_MASK | KEEP_SIZE); anything
# else is EOPNOTSUPP before the filesystem is asked.
_FALLOC_VFS_MASK = 0x7F
_MAX_LFS_FILESIZE = (1 << 63) - 1
# x86-64 TASK_SIZE_MAX with 4-level paging: access_ok() limit for userspace_addr.
_TASK_SIZE = (1 << 47) - PAGE_SIZE

# REGION2 flags KVM knows on x86; REGION v1 does not accept GUEST_MEMFD.
_MEMSLOT_V1_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY
_MEMSLOT_V2_FLAGS = _MEMSLOT_V1_FLAGS | KVM_MEM_GUEST_MEMFD

# The stats keys the model computes (a subset of gmem's).
STAT_KEYS = (
    "pages_allocated",
    "peak_pages_allocated",
    "double_backed_pages",
    "allocations",
    "frees",
    "memory_faults",
    "mmio_exits",
    "conversions",
)


class GmemError(OSError):
    """Base class of the model's errors: an OSError with the kernel's errno."""

    def __init__(self, err: int, msg: str = "") -> None:
        super().__init__(err, msg or os.strerror(err))


class MemoryFault(GmemError):
    """KVM_EXIT_MEMORY_FAULT: KVM_RUN fails with EFAULT."""

    def __init__(self, gpa: int, flags: int) -> None:
        super().__init__(E.EFAULT, f"memory fault exit at gpa {gpa:#x} flags {flags:#x}")
        self.gpa = gpa
        self.size = PAGE_SIZE
        self.flags = flags


class HostFault(GmemError):
    """A host access the kernel would answer with SIGBUS."""

    def __init__(self, msg: str) -> None:
        super().__init__(E.EFAULT, msg)
        self.signal = "SIGBUS"


class ConversionBusy(GmemError):
    def __init__(self, error_offset: int) -> None:
        super().__init__(E.EAGAIN, f"page at {error_offset:#x} is in use")
        self.error_offset = error_offset


class InvariantError(AssertionError):
    pass


class MmioExit(Exception):
    """KVM_EXIT_MMIO: KVM_RUN returns 0 and hands the access to the VMM to emulate."""

    def __init__(self, phys_addr: int, is_write: bool) -> None:
        super().__init__(f"KVM_EXIT_MMIO at gpa {phys_addr:#x}")
        self.phys_addr = phys_addr
        self.len = 8
        self.is_write = is_write


def _err(err: int, msg: str = "") -> GmemError:
    return GmemError(err, msg)


def _int(x: object, bits: int = 64) -> int:
    """Python-side argument conversion as a PyO3 binding does it."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"expected an int, got {type(x).__name__}")
    if x < 0 or x >= (1 << bits):
        raise OverflowError(f"{x} does not fit in u{bits}")
    return x


def _mmap_length(length: int) -> int:
    """mmap(2): length 0 is EINVAL, the rest is rounded up to pages (ENOMEM past 2^47)."""
    if length <= 0:
        raise _err(E.EINVAL, "mmap length 0")
    length = -(-length // PAGE_SIZE) * PAGE_SIZE
    if length > 1 << 47:
        raise _err(E.ENOMEM, f"mmap length {length:#x} exceeds the user address space")
    return length


def _aligned(x: int) -> bool:
    return x % PAGE_SIZE == 0


# --------------------------------------------------------------------------- attributes


class AttrMap:
    """gfn -> attributes as sorted, disjoint, coalesced intervals (attr 0 not stored)."""

    def __init__(self) -> None:
        self.iv: list[tuple[int, int, int]] = []

    def get(self, gfn: int) -> int:
        for s, e, a in self.iv:
            if s <= gfn < e:
                return a
        return 0

    def set(self, start: int, end: int, attrs: int) -> None:
        new: list[tuple[int, int, int]] = []
        for s, e, a in self.iv:
            if e <= start or s >= end:
                new.append((s, e, a))
                continue
            if s < start:
                new.append((s, start, a))
            if e > end:
                new.append((end, e, a))
        if attrs:
            new.append((start, end, attrs))
        new.sort()
        merged: list[tuple[int, int, int]] = []
        for s, e, a in new:
            if merged and merged[-1][1] == s and merged[-1][2] == a:
                merged[-1] = (merged[-1][0], e, a)
            else:
                merged.append((s, e, a))
        self.iv = merged

    def has(self, start: int, end: int, attrs: int) -> bool:
        """Whether every gfn in [start, end) has exactly ``attrs``."""
        hits = [(s, e, a) for s, e, a in self.iv if s < end and start < e]
        if attrs == 0:
            return not hits
        pos = start
        for s, e, a in hits:
            if s > pos or a != attrs:
                return False
            pos = e
        return pos >= end


# --------------------------------------------------------------------------- strategies


class Strategy:
    """What differs between conversion designs.  Subclass and register in STRATEGIES."""

    name = ""

    def gmem_flags(self, vm: Vm) -> int:
        """KVM_CAP_GUEST_MEMFD_FLAGS."""
        return GUEST_MEMFD_FLAG_MMAP

    def attributes_cap(self, vm: Vm) -> int:
        """KVM_CAP_MEMORY_ATTRIBUTES."""
        return KVM_MEMORY_ATTRIBUTE_PRIVATE

    def convert(self, vm: Vm, start: int, end: int, attrs: int) -> None:
        raise NotImplementedError


class Dual(Strategy):
    """Mainline: flip attributes, zap stage-2; never discard either side."""

    name = "dual"

    def convert(self, vm: Vm, start: int, end: int, attrs: int) -> None:
        vm.attrs.set(start, end, attrs)
        # Stage-2 zap: the model keeps no stage-2 table; the next access re-faults.


STRATEGIES: dict[str, type[Strategy]] = {"dual": Dual}
PLATFORMS = ("sw_protected",)
_ALL_VM_TYPES = ("sw_protected", "pkvm", "tdx", "snp")
_ALL_STRATEGIES = ("dual", "inplace", "realloc", "two_offsets", "attr_hook")


# --------------------------------------------------------------------------- host


class Host:
    def __init__(
        self,
        memory: int,
        *,
        costs: dict | None = None,
        kvm_fd: int | None = None,
        sticky_mappings: bool = False,
    ):
        memory = _int(memory)
        if memory == 0 or not _aligned(memory) or memory // PAGE_SIZE > (1 << 31):
            raise ValueError(f"host memory {memory:#x} must be page aligned, 1..2^31 pages")
        self.total_pages = memory // PAGE_SIZE
        self.used_pages = 0
        self.vms: list[Vm] = []
        self.mappings: list[Mapping] = []
        self._next_fd = 3
        self._free_fds: set[int] = set()  # closed numbers below _next_fd
        self._next_addr = 0x7F00_0000_0000
        self._next_inode = 1
        self.fd = kvm_fd if kvm_fd is not None else self._new_fd()
        self.files: dict[int, GuestMemfd] = {}  # open guest_memfd fds
        # Accounting variant: False = a mapping counts into a VM while one of its memslots
        # points into it (the documented rule); True = it belongs for good to the first VM
        # whose memslot pointed into it.
        self.sticky_mappings = sticky_mappings

    def _new_fd(self) -> int:
        """The lowest fd number not open (get_unused_fd_flags(); 0-2 are stdio)."""
        if self._free_fds:
            fd = min(self._free_fds)
            self._free_fds.discard(fd)
            return fd
        fd = self._next_fd
        self._next_fd += 1
        return fd

    # -- allocator
    def _alloc(self, n: int = 1) -> None:
        if self.used_pages + n > self.total_pages:
            raise _err(E.ENOMEM, "host memory exhausted")
        self.used_pages += n

    def _free(self, n: int = 1) -> None:
        self.used_pages -= n
        assert self.used_pages >= 0

    # -- anonymous memory
    def mmap_anonymous(self, length: int, *, addr: int | None = None) -> Mapping:
        length = _mmap_length(_int(length))
        if addr is None:
            addr = self._next_addr
            self._next_addr += length + PAGE_SIZE  # a guard gap between mappings
        m = Mapping(self, addr, length)
        self.mappings.append(m)
        return m

    def _find_anon(self, hva: int) -> tuple[Mapping | None, int]:
        for m in self.mappings:
            if m.kind == "anonymous" and not m.unmapped and m.addr <= hva < m.addr + m.length:
                return m, (hva - m.addr) // PAGE_SIZE
        return None, 0

    def _anon_event(self, m: Mapping, idx: int, key: str) -> None:
        for vm in self.vms:
            if vm._covers(m, idx):
                vm.counters[key] += 1

    # -- VMs
    def create_vm(
        self, vm_type: str = "sw_protected", strategy: str = "dual", *, fd: int | None = None
    ) -> Vm:
        if vm_type not in _ALL_VM_TYPES:
            raise ValueError(f"unknown vm_type {vm_type!r}")
        if strategy not in _ALL_STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}")
        if vm_type not in PLATFORMS or strategy not in STRATEGIES:
            raise NotImplementedError(f"the model does not cover {vm_type}/{strategy}")
        vm = Vm(self, vm_type, STRATEGIES[strategy](), fd if fd is not None else self._new_fd())
        self.vms.append(vm)
        return vm

    def stats(self) -> dict[str, int]:
        return {
            "total_pages": self.total_pages,
            "free_pages": self.total_pages - self.used_pages,
            "pages_allocated": self.used_pages,
        }

    def check(self) -> None:
        anon = sum(len(m.pages) + len(m.orphans) for m in self.mappings)
        gm = sum(len(f.pages) for vm in self.vms for f in vm.files)
        if anon + gm != self.used_pages:
            raise InvariantError(f"host accounting: {anon}+{gm} != {self.used_pages}")
        for vm in self.vms:
            vm.check()


# --------------------------------------------------------------------------- memslots


@dataclass
class Slot:
    id: int
    flags: int
    base_gfn: int
    npages: int
    userspace_addr: int
    gmem: GuestMemfd | None
    pgoff: int

    def contains(self, gfn: int) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages


# --------------------------------------------------------------------------- VM


class Vm:
    def __init__(self, host: Host, vm_type: str, strategy: Strategy, fd: int) -> None:
        self.host = host
        self.vm_type = vm_type
        self.strat = strategy
        self.strategy = strategy.name
        self.fd = fd
        self.slots: dict[int, Slot] = {}
        self.attrs = AttrMap()
        self.files: list[GuestMemfd] = []
        self.counters = dict.fromkeys(STAT_KEYS, 0)

    # -- capabilities
    def check_extension(self, cap: int) -> int:
        cap = _int(cap)
        return {
            KVM_CAP_GUEST_MEMFD: 1,
            KVM_CAP_GUEST_MEMFD_FLAGS: self.strat.gmem_flags(self),
            KVM_CAP_MEMORY_ATTRIBUTES: self.strat.attributes_cap(self),
            KVM_CAP_USER_MEMORY2: 1,
            KVM_CAP_NR_MEMSLOTS: KVM_USER_MEM_SLOTS,
            KVM_CAP_MEMORY_FAULT_INFO: 1,
            KVM_CAP_READONLY_MEM: 1,  # sw_protected: no protected state
        }.get(cap, 0)

    # -- guest_memfd
    def create_guest_memfd(
        self,
        size: int,
        flags: int = 0,
        page_order: int = 0,
        *,
        fd: int | None = None,
        inode: int | None = None,
    ) -> GuestMemfd:
        size, flags, page_order = _int(size), _int(flags), _int(page_order)
        if flags & ~self.strat.gmem_flags(self):
            raise _err(E.EINVAL, f"unsupported guest_memfd flags {flags:#x}")
        if size == 0 or size >= (1 << 63) or not _aligned(size):
            raise _err(E.EINVAL, f"size {size:#x} is not a positive page-aligned size")
        if page_order and not flags & GUEST_MEMFD_FLAG_HUGETLB:
            raise _err(E.EINVAL, "page_order without GUEST_MEMFD_FLAG_HUGETLB")
        if fd is None:
            fd = self.host._new_fd()
        if inode is None:
            inode = self.host._next_inode
            self.host._next_inode += 1
        f = GuestMemfd(self, fd, size, flags, page_order, inode)
        self.files.append(f)
        self.host.files[fd] = f
        return f

    # -- memslots
    def _resolve_gmem(self, obj: object) -> GuestMemfd:
        """kvm_gmem_bind(): fget() then the f_op / owner checks."""
        if isinstance(obj, GuestMemfd):
            if obj.fd_closed:
                raise _err(E.EBADF, "guest_memfd is closed")
            f = obj
        elif isinstance(obj, (Vm, Host)):
            raise _err(E.EINVAL, "not a guest_memfd")
        elif obj is None:
            raise _err(E.EBADF, "no guest_memfd given")
        elif isinstance(obj, int) and not isinstance(obj, bool):
            if obj in (0, 1, 2):  # the standard streams: open, not guest_memfds
                raise _err(E.EINVAL, f"fd {obj} is not a guest_memfd")
            if obj == self.host.fd or any(v.fd == obj for v in self.host.vms):
                raise _err(E.EINVAL, f"fd {obj} is not a guest_memfd")
            f = self.host.files.get(obj)
            if f is None:
                raise _err(E.EBADF, f"fd {obj} is not open")
        else:
            raise TypeError(f"guest_memfd must be a GuestMemfd or an fd, not {type(obj)}")
        if f.vm is not self:
            raise _err(E.EINVAL, "guest_memfd belongs to another VM")
        return f

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        flags = _int(flags, 32)
        if flags & ~_MEMSLOT_V1_FLAGS:
            raise _err(E.EINVAL, f"flags {flags:#x} not valid for KVM_SET_USER_MEMORY_REGION")
        self.set_user_memory_region2(slot, flags, guest_phys_addr, memory_size, userspace_addr)

    def set_user_memory_region2(
        self,
        slot: int,
        flags: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int = 0,
        guest_memfd: object = None,
        guest_memfd_offset: int = 0,
        *,
        shared_guest_memfd: object = None,
        shared_offset: int = 0,
    ) -> None:
        slot, flags = _int(slot, 32), _int(flags, 32)
        gpa, size, uaddr = _int(guest_phys_addr), _int(memory_size), _int(userspace_addr)
        offset = _int(guest_memfd_offset)
        _int(shared_offset)
        # kvm_set_user_memory_region()
        if (slot & 0xFFFF) >= KVM_USER_MEM_SLOTS:
            raise _err(E.EINVAL, f"slot {slot} >= KVM_USER_MEM_SLOTS")
        # check_memory_region_flags()
        if flags & ~_MEMSLOT_V2_FLAGS:
            raise _err(E.EINVAL, f"unknown memslot flags {flags:#x}")
        if flags & KVM_MEM_GUEST_MEMFD and flags & ~KVM_MEM_GUEST_MEMFD:
            raise _err(E.EINVAL, "GUEST_MEMFD cannot be combined with LOG_DIRTY/READONLY")
        if shared_guest_memfd is not None:  # only two_offsets binds a shared side
            raise _err(E.EINVAL, "shared_guest_memfd needs the two_offsets strategy")
        # general sanity checks
        if not _aligned(size) or not _aligned(gpa) or not _aligned(uaddr):
            raise _err(E.EINVAL, "size, gpa and userspace_addr must be page aligned")
        if uaddr + size > _TASK_SIZE:
            raise _err(E.EINVAL, "userspace_addr range fails access_ok()")
        if flags & KVM_MEM_GUEST_MEMFD and (not _aligned(offset) or offset + size > U64_MAX):
            raise _err(E.EINVAL, f"guest_memfd_offset {offset:#x} unaligned or overflowing")
        if slot >> 16:  # as_id: one address space for VMs with private memory
            raise _err(E.EINVAL, f"address space {slot >> 16} does not exist")
        if gpa + size > U64_MAX:
            raise _err(E.EINVAL, "guest physical range wraps")
        old = self.slots.get(slot)
        if size == 0:
            if old is None:
                raise _err(E.EINVAL, f"slot {slot} does not exist")
            self._delete_slot(old)
            return
        base, npages = gpa >> PAGE_SHIFT, size >> PAGE_SHIFT
        if old is not None:
            if flags & KVM_MEM_GUEST_MEMFD:
                raise _err(E.EINVAL, "guest_memfd memslots can only be deleted")
            if (
                uaddr != old.userspace_addr
                or npages != old.npages
                or ((flags ^ old.flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD))
            ):
                raise _err(E.EINVAL, "only the gpa or LOG_DIRTY_PAGES of a memslot may change")
            if base == old.base_gfn and flags == old.flags:
                return
        if (old is None or base != old.base_gfn) and self._overlaps(slot, base, npages):
            raise _err(E.EEXIST, "memslot overlaps another one")
        f = None
        if flags & KVM_MEM_GUEST_MEMFD:
            f = self._resolve_gmem(guest_memfd)
            if offset + size > f.size:
                raise _err(E.EINVAL, "guest_memfd range beyond the file")
            pgoff = offset >> PAGE_SHIFT
            if any(pgoff <= i < pgoff + npages for i in f.bindings):
                raise _err(E.EEXIST, "guest_memfd range already bound")  # EINVAL up to 7.1
        # kvm_arch_prepare_memory_region(): the slot must end below kvm_mmu_max_gfn()
        # (and, on TDX, below the shared-GPA bit: kvm_is_gfn_alias()).
        bits = TDX_SHARED_GPA_BIT if self.vm_type == "tdx" else MAX_GPA_BITS
        if base + npages - 1 > (1 << (bits - PAGE_SHIFT)) - 1:
            raise _err(E.EINVAL, "memslot beyond the guest physical address width")
        if old is not None:  # MOVE / FLAGS_ONLY of a non-guest_memfd memslot
            old.base_gfn, old.flags = base, flags
            self._claim_mappings()
            return
        new = Slot(slot, flags, base, npages, uaddr, f, offset >> PAGE_SHIFT)
        if f is not None:
            for i in range(new.pgoff, new.pgoff + npages):
                f.bindings[i] = slot
        self.slots[slot] = new
        self._claim_mappings()
        self._update_peak()

    def _overlaps(self, slot_id: int, base: int, npages: int) -> bool:
        return any(
            s.id != slot_id and s.base_gfn < base + npages and base < s.base_gfn + s.npages
            for s in self.slots.values()
        )

    def _delete_slot(self, s: Slot) -> None:
        if s.gmem is not None and not s.gmem.released:
            for i in range(s.pgoff, s.pgoff + s.npages):
                s.gmem.bindings.pop(i, None)
        del self.slots[s.id]

    def _slot_for(self, gfn: int) -> Slot | None:
        for s in self.slots.values():
            if s.contains(gfn):
                return s
        return None

    def _points_into(self, m: Mapping) -> bool:
        return m.kind == "anonymous" and any(
            s.userspace_addr < m.addr + m.length
            and m.addr < s.userspace_addr + s.npages * PAGE_SIZE
            for s in self.slots.values()
        )

    def _claim_mappings(self) -> None:
        for m in self.host.mappings:
            if m.owner is None and self._points_into(m):
                m.owner = self

    def _owns_mapping(self, m: Mapping) -> bool:
        """Whether anonymous mapping ``m`` counts into this VM's footprint (sticky mode)."""
        return m.owner is self

    def _covers(self, m: Mapping, idx: int) -> bool:
        """Whether anonymous page ``idx`` of ``m`` counts into this VM's footprint: it lies
        inside one of the VM's memslots' userspace ranges (sticky mode: the whole mapping
        of its first VM)."""
        if self.host.sticky_mappings:
            return m.owner is self
        hva = m.addr + idx * PAGE_SIZE
        return m.kind == "anonymous" and any(
            s.userspace_addr <= hva < s.userspace_addr + s.npages * PAGE_SIZE
            for s in self.slots.values()
        )

    # -- attributes
    def set_memory_attributes(
        self, address: int, size: int, attributes: int, flags: int = 0
    ) -> None:
        address, size, attributes, flags = _int(address), _int(size), _int(attributes), _int(flags)
        if flags:
            raise _err(E.EINVAL, f"flags {flags:#x} must be 0")
        if attributes & ~self.strat.attributes_cap(self):
            raise _err(E.EINVAL, f"unsupported attributes {attributes:#x}")
        if size == 0 or address + size > U64_MAX:
            raise _err(E.EINVAL, "size 0 or range wraps")
        if not _aligned(address) or not _aligned(size):
            raise _err(E.EINVAL, "address and size must be page aligned")
        start, end = address >> PAGE_SHIFT, (address + size) >> PAGE_SHIFT
        self.counters["conversions"] += 1
        if self.attrs.has(start, end, attributes):
            return
        self.strat.convert(self, start, end, attributes)

    def get_memory_attributes(self, gfn: int) -> int:
        return self.attrs.get(_int(gfn))

    # -- guest accesses
    def _fault(self, gfn: int, private: bool) -> MemoryFault:
        self.counters["memory_faults"] += 1
        return MemoryFault(gfn << PAGE_SHIFT, KVM_MEMORY_EXIT_FLAG_PRIVATE if private else 0)

    def _guest_page(
        self, gpa: int, private: bool, write: bool = False
    ) -> tuple[dict[int, int], int, object]:
        """Fault the page in; returns (page dict, index, owner) with the page allocated."""
        gfn = _int(gpa) >> PAGE_SHIFT
        private = bool(private)
        if private != bool(self.attrs.get(gfn) & KVM_MEMORY_ATTRIBUTE_PRIVATE):
            raise self._fault(gfn, private)
        s = self._slot_for(gfn)
        if private:
            if s is None or s.gmem is None or s.gmem.released:
                raise self._fault(gfn, private)
            idx = gfn - s.base_gfn + s.pgoff
            s.gmem._get_page(idx)
            return s.gmem.pages, idx, s.gmem
        if s is None or (write and s.flags & KVM_MEM_READONLY):
            self.counters["mmio_exits"] += 1
            raise MmioExit(gfn << PAGE_SHIFT, write)
        hva = s.userspace_addr + (gfn - s.base_gfn) * PAGE_SIZE
        m, idx = self.host._find_anon(hva)
        if m is None:
            raise _err(E.EFAULT, f"userspace_addr {hva:#x} is not mapped")
        m._get_page(idx)
        return m.pages, idx, m

    def guest_read(self, gpa: int, *, private: bool) -> int:
        pages, idx, _ = self._guest_page(gpa, private)
        self._update_peak()
        return pages[idx]

    def guest_write(self, gpa: int, value: int, *, private: bool) -> None:
        value = _int(value)
        pages, idx, _ = self._guest_page(gpa, private, write=True)
        pages[idx] = value
        self._update_peak()

    # -- statistics
    def _pages_allocated(self) -> int:
        gmem_pages = sum(len(f.pages) for f in self.files)
        anon = 0
        for m in self.host.mappings:
            anon += sum(1 for i in m.pages if self._covers(m, i))
            anon += sum(1 for i, _ in m.orphans if self._covers(m, i))
        return gmem_pages + anon

    def _double_backed(self) -> int:
        n = 0
        for s in self.slots.values():
            if s.gmem is None or s.gmem.released:
                continue
            for idx in s.gmem.pages:
                if not s.pgoff <= idx < s.pgoff + s.npages:
                    continue
                hva = s.userspace_addr + (idx - s.pgoff) * PAGE_SIZE
                m, aidx = self.host._find_anon(hva)
                if m is not None and aidx in m.pages:
                    n += 1
        return n

    def _update_peak(self) -> None:
        self.counters["peak_pages_allocated"] = max(
            self.counters["peak_pages_allocated"], self._pages_allocated()
        )

    def stats(self) -> dict[str, int]:
        st = dict(self.counters)
        st["pages_allocated"] = self._pages_allocated()
        st["double_backed_pages"] = self._double_backed()
        return st

    def check(self) -> None:
        slots = sorted(self.slots.values(), key=lambda s: s.base_gfn)
        for a, b in itertools.pairwise(slots):
            if a.base_gfn + a.npages > b.base_gfn:
                raise InvariantError(f"memslots {a.id} and {b.id} overlap")
        for f in self.files:
            for idx, sid in f.bindings.items():
                s = self.slots.get(sid)
                if s is None or s.gmem is not f or not s.pgoff <= idx < s.pgoff + s.npages:
                    raise InvariantError(f"stale binding {idx} -> slot {sid}")
            if any(i >= f.size // PAGE_SIZE for i in f.pages):
                raise InvariantError("guest_memfd page beyond EOF")


# --------------------------------------------------------------------------- guest_memfd


class GuestMemfd:
    def __init__(self, vm: Vm, fd: int, size: int, flags: int, page_order: int, inode: int) -> None:
        self.vm = vm
        self.fd = fd
        self.size = size
        self.flags = flags
        self.page_order = page_order
        self.inode = inode
        self.pages: dict[int, int] = {}  # page index -> value
        self.bindings: dict[int, int] = {}  # page index -> slot id
        self.fd_closed = False
        self.released = False
        self.mmaps = 0

    @property
    def closed(self) -> bool:
        return self.fd_closed

    def _get_page(self, idx: int) -> None:
        if idx not in self.pages:
            self.vm.host._alloc()
            self.pages[idx] = 0  # zeroed on first use
            self.vm.counters["allocations"] += 1

    def _free_pages(self, idxs: list[int]) -> None:
        for i in idxs:
            del self.pages[i]
        self.vm.host._free(len(idxs))
        self.vm.counters["frees"] += len(idxs)

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        mode, offset, length = _int(mode, 32), _int(offset), _int(length)
        if self.fd_closed:
            raise _err(E.EBADF, "guest_memfd is closed")
        # vfs_fallocate()
        if offset >= (1 << 63) or length == 0 or length >= (1 << 63):
            raise _err(E.EINVAL, "negative offset or non-positive length")
        if mode & ~_FALLOC_VFS_MASK:
            raise _err(E.EOPNOTSUPP, f"mode {mode:#x}")
        if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
            raise _err(E.EOPNOTSUPP, "PUNCH_HOLE needs KEEP_SIZE")
        if offset + length > _MAX_LFS_FILESIZE:
            raise _err(E.EFBIG, "range beyond the largest file")
        # kvm_gmem_fallocate(): guest_memfd cannot grow, so KEEP_SIZE is mandatory.
        if not mode & FALLOC_FL_KEEP_SIZE:
            raise _err(E.EOPNOTSUPP, "FALLOC_FL_KEEP_SIZE is required")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise _err(E.EOPNOTSUPP, f"mode {mode:#x}")
        if not _aligned(offset) or not _aligned(length):
            raise _err(E.EINVAL, "offset and length must be page aligned")
        first, last = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
        if mode & FALLOC_FL_PUNCH_HOLE:
            self._free_pages([i for i in self.pages if first <= i < last])
            return
        if offset + length > self.size:
            raise _err(E.EINVAL, "allocation beyond the end of the file")
        missing = [i for i in range(first, last) if i not in self.pages]
        self.vm.host._alloc(len(missing))  # ENOMEM before any change
        self.vm.host._free(len(missing))
        for i in missing:
            self._get_page(i)
        self.vm._update_peak()

    def _open(self) -> None:
        if self.fd_closed:
            raise _err(E.EBADF, "guest_memfd is closed")

    def read(self, n: int) -> bytes:
        self._open()
        raise _err(E.EINVAL, "guest_memfd has no read")

    def write(self, data: bytes) -> int:
        self._open()
        raise _err(E.EINVAL, "guest_memfd has no write")

    def truncate(self, size: int) -> None:
        self._open()
        raise _err(E.EINVAL, "guest_memfd cannot be resized")

    def mmap(self, offset: int = 0, length: int | None = None, *, shared: bool = True) -> Mapping:
        offset = _int(offset)
        if self.fd_closed:
            raise _err(E.EBADF, "guest_memfd is closed")
        if not self.flags & GUEST_MEMFD_FLAG_MMAP:
            raise _err(E.ENODEV, "guest_memfd was created without GUEST_MEMFD_FLAG_MMAP")
        if not shared:
            raise _err(E.EINVAL, "guest_memfd mappings must be MAP_SHARED")
        length = self.size - offset if length is None else _int(length)
        if not _aligned(offset):
            raise _err(E.EINVAL, f"mmap offset {offset:#x} not page aligned")
        length = _mmap_length(length)
        m = Mapping(self.vm.host, self.vm.host._next_addr, length, gmem=self, gmem_offset=offset)
        self.vm.host._next_addr += length + PAGE_SIZE
        self.vm.host.mappings.append(m)
        self.mmaps += 1
        return m

    def set_memory_attributes2(
        self, offset: int, size: int, attributes: int, flags: int = 0
    ) -> None:
        raise _err(E.ENOTTY, "KVM_SET_MEMORY_ATTRIBUTES2 needs the inplace strategy")

    def get_memory_attributes2(self, offset: int) -> int:
        raise _err(E.ENOTTY, "file attributes need the inplace/attr_hook strategy")

    def close(self) -> None:
        if self.fd_closed:
            raise _err(E.EBADF, "guest_memfd already closed")
        self.fd_closed = True
        self.vm.host.files.pop(self.fd, None)
        self.vm.host._free_fds.add(self.fd)
        if self.mmaps == 0:
            self._release()

    def _release(self) -> None:
        """kvm_gmem_release() + inode eviction: slots lose the file, pages are freed."""
        self.released = True
        self.bindings.clear()
        self._free_pages(list(self.pages))


# --------------------------------------------------------------------------- mappings


class Mapping:
    def __init__(
        self,
        host: Host,
        addr: int,
        length: int,
        *,
        gmem: GuestMemfd | None = None,
        gmem_offset: int = 0,
    ) -> None:
        self.host = host
        self.addr = addr
        self.length = length
        self.kind = "anonymous" if gmem is None else "guest_memfd"
        self.gmem = gmem
        self.gmem_offset = gmem_offset
        self.pages: dict[int, int] = {}
        self.pins: dict[int, int] = {}
        # Pinned pages discarded from the mapping.  MADV_DONTNEED zaps the
        # page table entry (the next access faults in a new zeroed page) but the GUP
        # reference keeps the frame allocated until the last unpin.
        self.orphans: list[list[int]] = []  # [index, pins], one entry per orphaned frame
        self.owner: Vm | None = None  # see Host.sticky_mappings
        self.unmapped = False

    def _index(self, offset: int) -> int:
        offset = _int(offset)
        if self.unmapped or offset >= self.length:
            raise _err(E.EINVAL, f"offset {offset:#x} outside the mapping")
        idx = offset // PAGE_SIZE
        if self.gmem is not None:
            # dual/sw_protected guest_memfd is never INIT_SHARED: every page is private.
            raise HostFault(f"guest_memfd page at offset {offset:#x} is not shared")
        return idx

    def _get_page(self, idx: int) -> None:
        if idx not in self.pages:
            self.host._alloc()
            self.pages[idx] = 0
            self.host._anon_event(self, idx, "allocations")
            for vm in self.host.vms:
                vm._update_peak()

    def _drop(self, idxs: list[int]) -> None:
        """Take pages out of the mapping: free them, or orphan them while pinned."""
        freed = [i for i in idxs if i not in self.pins]
        for i in freed:
            self.host._anon_event(self, i, "frees")
        for i in idxs:
            del self.pages[i]
            if i in self.pins:
                self.orphans.append([i, self.pins.pop(i)])
        self.host._free(len(freed))

    def read(self, offset: int) -> int:
        return self.pages.get(self._index(offset), 0)

    def write(self, offset: int, value: int) -> None:
        idx = self._index(offset)
        value = _int(value)
        self._get_page(idx)
        self.pages[idx] = value

    def pin(self, offset: int) -> None:
        idx = self._index(offset)
        self._get_page(idx)
        self.pins[idx] = self.pins.get(idx, 0) + 1

    def unpin(self, offset: int) -> None:
        """Drop a pin: of the page mapped at ``offset`` if it is pinned, else of the oldest
        orphaned frame that was discarded from ``offset``."""
        idx = self._index(offset)
        if self.pins.get(idx):
            self.pins[idx] -= 1
            if not self.pins[idx]:
                del self.pins[idx]
            return
        for entry in self.orphans:
            if entry[0] == idx:
                entry[1] -= 1
                if not entry[1]:
                    self.orphans.remove(entry)
                    self.host._anon_event(self, idx, "frees")
                    self.host._free()
                return
        raise _err(E.EINVAL, f"page at offset {offset:#x} is not pinned")

    def discard(self, offset: int, length: int) -> None:
        offset, length = _int(offset), _int(length)
        if self.unmapped or not _aligned(offset) or offset + length > self.length:
            raise _err(E.EINVAL, "discard range outside the mapping or unaligned")
        if self.gmem is not None:
            return  # guest_memfd pages are only unmapped
        first, last = offset // PAGE_SIZE, -(-(offset + length) // PAGE_SIZE)
        self._drop([i for i in self.pages if first <= i < last])

    def unmap(self) -> None:
        if self.unmapped:
            return
        self._drop(list(self.pages))
        self.unmapped = True
        if self.gmem is not None:
            self.gmem.mmaps -= 1
            if self.gmem.fd_closed and self.gmem.mmaps == 0:
                self.gmem._release()
