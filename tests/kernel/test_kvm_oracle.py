"""The live kernel as an oracle: memslot ioctls in lockstep against ``/dev/kvm``.

Every call of ``KVM_SET_USER_MEMORY_REGION`` (v1) and ``KVM_SET_USER_MEMORY_REGION2`` (v2)
goes to a real KVM VM (``KVM_CREATE_VM`` type 0) and to a gmem VM with the same arguments,
and the two must agree on the outcome: success, or the same errno. Random sequences
(hypothesis, derandomized) and scripted ones cover creation, deletion (size 0), moves
(a new gpa), flag changes, overlapping gpa ranges (``EEXIST``), unaligned sizes, gpas and
addresses, slot ids at and beyond ``KVM_CAP_NR_MEMSLOTS`` as the live kernel reports it,
address-space ids in the slot's high bits, ``KVM_MEM_READONLY``,
``KVM_MEM_LOG_DIRTY_PAGES``, v2's guest_memfd fields without ``KVM_MEM_GUEST_MEMFD``, the
ends of the user address space and of the guest physical space, and memslots over mapped
memory, over a hole left by ``munmap`` and at address 0. At the end of each sequence,
deleting every slot id it used agrees too, so both VMs were left with the same memslots.

The gmem VM type. gmem has no default (non-confidential) VM type; the closest is
``sw_protected`` (x86 ``KVM_X86_SW_PROTECTED_VM``): an x86 VM without protected state, so
read-only memslots exist (``kvm_arch_has_readonly_mem()``), the same generic checks of
``kvm_set_memory_region()`` apply in the same order, and memslots are limited by the same
``kvm_mmu_max_gfn()``. ``pkvm`` is arm64, ``tdx``/``snp`` refuse ``KVM_MEM_READONLY`` and
(TDX) limit gpas by the shared bit. The strategy is ``dual``, the one that follows mainline.
What the two VM types do not share is left out of the generated calls:

- ``KVM_MEM_GUEST_MEMFD`` alone on v2: the live kernel has no guest_memfd
  (``KVM_CAP_GUEST_MEMFD`` is 0, ``KVM_CREATE_GUEST_MEMFD`` is ``ENOTTY``), so
  ``check_memory_region_flags()`` refuses the flag first (``EINVAL``), also on a delete;
  every gmem VM type has guest_memfd and goes on to the gpa checks and ``kvm_gmem_bind()``
  (``EEXIST``, ``EBADF``, or a delete that succeeds). gmem cannot mirror a VM without
  guest_memfd, so only the combinations the flag check refuses on both are generated:
  with ``KVM_MEM_LOG_DIRTY_PAGES`` or ``KVM_MEM_READONLY``, with unknown bits, and on v1.
  ``test_capabilities`` pins the kernel's answer.
- Address space 1 where the live kernel has two (x86 with SMM: ``KVM_CAP_MULTI_ADDRESS_SPACE``
  2): ``sw_protected`` has private memory and so one address space. Address-space ids
  beyond the kernel's count are generated always.
- The top of the user address space and of the guest physical space are generated only
  where the live kernel has the limits gmem models (4-level paging: user addresses end
  at ``(1 << 47) - 4096``; a 52-bit ``kvm_mmu_max_gfn()``, which with TDP is the host's
  MAXPHYADDR instead); both are probed on a scratch VM. Other gpas stay below 2^39.
- Large memslots (more than a few dozen pages, up to ``KVM_MEM_MAX_NR_PAGES`` pages): the
  kernel allocates per-page metadata (rmaps, dirty bitmaps) for a memslot it creates,
  which for terabytes is ``ENOMEM`` or gigabytes of host memory; a model has no such
  limit. Sizes of ``2^31`` pages and more (``EINVAL`` for the size alone) are generated.

The address space: the kernel checks ``userspace_addr`` with ``access_ok()`` (page
aligned, below the top of the user address space), not against the mappings. Still, both
sides are given the same layout: the gmem host's anonymous mappings are mirrored by real
``mmap(MAP_FIXED_NOREPLACE)`` mappings of this process at the same addresses (one of
them unmapped again on both sides, a hole), and generated addresses fall inside them,
across their ends, in the hole and in gaps.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gmem

PAGE = 4096

# <asm-generic/ioctl.h>: dir (2 bits) | size (14 bits) | type (8 bits) | nr (8 bits).
_IOC_NONE = 0
_IOC_WRITE = 1
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | KVMIO << 8 | nr


# struct kvm_userspace_memory_region {u32 slot, flags; u64 guest_phys_addr, memory_size,
# userspace_addr;} and kvm_userspace_memory_region2, which adds u64 guest_memfd_offset,
# u32 guest_memfd, pad1 and u64 pad2[14].
REGION = struct.Struct("=IIQQQ")
REGION2 = struct.Struct("=IIQQQQII112x")
assert (REGION.size, REGION2.size) == (32, 160)

KVM_GET_API_VERSION = _ioc(_IOC_NONE, 0x00, 0)
KVM_CREATE_VM = _ioc(_IOC_NONE, 0x01, 0)
KVM_CHECK_EXTENSION = _ioc(_IOC_NONE, 0x03, 0)
KVM_SET_USER_MEMORY_REGION = _ioc(_IOC_WRITE, 0x46, REGION.size)
KVM_SET_USER_MEMORY_REGION2 = _ioc(_IOC_WRITE, 0x49, REGION2.size)
KVM_API_VERSION = 12
KVM_CAP_MULTI_ADDRESS_SPACE = 118

LOG = gmem.KVM_MEM_LOG_DIRTY_PAGES
RO = gmem.KVM_MEM_READONLY
GMEM = gmem.KVM_MEM_GUEST_MEMFD

# x86-64 TASK_SIZE_MAX with 4-level paging: the end of the user address space.
USER_VA_END = (1 << 47) - PAGE
# The memslots of a VM end below 2^52 (x86 kvm_mmu_max_gfn() with 52 address bits).
GPA_END = 1 << 52
# KVM_MEM_MAX_NR_PAGES + 1 pages: the smallest memslot size refused for its size alone.
TOO_MANY_PAGES = 1 << 31

# The VMM's mappings (pages); the last one is unmapped again on both sides, a hole.
LAYOUT = (16, 512, 8)

MAP_SHARED = 0x01
MAP_ANONYMOUS = 0x20
MAP_FIXED_NOREPLACE = 0x100000
PROT_READ = 0x1
PROT_WRITE = 0x2


class Libc:
    """`mmap`/`munmap` at fixed addresses (Python's `mmap` module cannot choose one)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._mmap = libc.mmap
        self._mmap.restype = ctypes.c_void_p
        self._mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        self._munmap = libc.munmap
        self._munmap.restype = ctypes.c_int
        self._munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

    def mmap_at(self, addr: int, length: int) -> None:
        flags = MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
        got = self._mmap(addr, length, PROT_READ | PROT_WRITE, flags, -1, 0)
        if got != addr:
            err = ctypes.get_errno()
            if got not in (None, ctypes.c_void_p(-1).value):
                # A kernel older than 4.17 takes MAP_FIXED_NOREPLACE as a hint.
                self.munmap(got, length)
            raise OSError(err, f"mmap at {addr:#x} gave {got}: {os.strerror(err)}")

    def munmap(self, addr: int, length: int) -> None:
        if self._munmap(addr, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


class LiveVm:
    """A VM of the live kernel: `KVM_CREATE_VM` type 0, the default VM."""

    def __init__(self, kvm_fd: int) -> None:
        self.fd = fcntl.ioctl(kvm_fd, KVM_CREATE_VM, 0)

    def check_extension(self, cap: int) -> int:
        return fcntl.ioctl(self.fd, KVM_CHECK_EXTENSION, cap)

    def region(self, c: Call) -> int:
        if c.v2:
            req = KVM_SET_USER_MEMORY_REGION2
            arg = REGION2.pack(c.slot, c.flags, c.gpa, c.size, c.ua, c.offset, c.fd, 0)
        else:
            req = KVM_SET_USER_MEMORY_REGION
            arg = REGION.pack(c.slot, c.flags, c.gpa, c.size, c.ua)
        try:
            fcntl.ioctl(self.fd, req, arg)
        except OSError as e:
            return e.errno
        return 0

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class Call:
    """One memslot ioctl; `size == 0` deletes. `fd` and `offset` are v2's `guest_memfd`
    and `guest_memfd_offset`, which count only with `KVM_MEM_GUEST_MEMFD`."""

    v2: bool
    slot: int
    flags: int
    gpa: int
    size: int
    ua: int
    fd: int = 0
    offset: int = 0

    def __str__(self) -> str:
        name = "REGION2" if self.v2 else "REGION"
        v2 = f", guest_memfd={self.fd}, offset={self.offset:#x}" if self.v2 else ""
        return (
            f"{name}(slot={self.slot:#x}, flags={self.flags:#x}, gpa={self.gpa:#x}, "
            f"size={self.size:#x}, ua={self.ua:#x}{v2})"
        )


def gmem_region(vm: gmem.Vm, c: Call) -> int:
    try:
        if c.v2:
            vm.set_user_memory_region2(c.slot, c.flags, c.gpa, c.size, c.ua, c.fd, c.offset)
        else:
            vm.set_user_memory_region(c.slot, c.flags, c.gpa, c.size, c.ua)
    except gmem.GmemError as e:
        return e.errno
    return 0


def _name(e: int) -> str:
    return "ok" if e == 0 else errno.errorcode.get(e, str(e))


@dataclass
class Oracle:
    """The live kernel's facts that decide which calls can be compared."""

    kvm_fd: int
    nr_slots: int
    address_spaces: int
    top_of_va: bool
    top_of_gpa: bool
    maps: list[tuple[int, int]]
    hole: tuple[int, int]


@dataclass
class Lockstep:
    """A live VM and a gmem VM driven with the same calls."""

    live: LiveVm
    vm: gmem.Vm
    history: list[str] = field(default_factory=list)
    slots: dict[int, Call] = field(default_factory=dict)
    used: set[int] = field(default_factory=set)

    def do(self, c: Call) -> int:
        self.used.add(c.slot)
        want = self.live.region(c)
        got = gmem_region(self.vm, c)
        self.history.append(f"{c} -> kernel {_name(want)}, gmem {_name(got)}")
        if want != got:
            pytest.fail(
                "gmem and the live kernel disagree:\n  " + "\n  ".join(self.history),
                pytrace=False,
            )
        if want == 0:
            if c.size == 0:
                del self.slots[c.slot]
            else:
                self.slots[c.slot] = c
        return want

    def finish(self) -> None:
        """Both VMs hold the same memslots: deleting every id ever used agrees."""
        for slot in sorted(self.used):
            self.do(Call(True, slot, 0, 0, 0, 0))
        assert not self.slots
        self.vm.check()


def _probe(kvm_fd: int, c: Call) -> bool:
    vm = LiveVm(kvm_fd)
    try:
        return vm.region(c) == 0
    finally:
        vm.close()


@pytest.fixture(scope="module")
def oracle():
    if platform.machine() != "x86_64":
        pytest.skip(f"the lockstep compares with x86-64 KVM; this is {platform.machine()}")
    try:
        kvm_fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        pytest.skip(f"/dev/kvm cannot be opened: {e}")
    libc = Libc()
    mapped: list[tuple[int, int]] = []
    try:
        if fcntl.ioctl(kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION:
            pytest.skip("/dev/kvm speaks another KVM API version")
        try:
            scratch = LiveVm(kvm_fd)
        except OSError as e:
            pytest.skip(f"KVM_CREATE_VM fails on /dev/kvm: {e}")
        nr_slots = scratch.check_extension(gmem.KVM_CAP_NR_MEMSLOTS)
        address_spaces = max(1, scratch.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE))
        scratch.close()
        maps = _layout()
        try:
            for addr, length in maps:
                libc.mmap_at(addr, length)
                mapped.append((addr, length))
        except OSError as e:
            pytest.skip(f"cannot mirror gmem's mappings in this process: {e}")
        hole = mapped.pop()
        libc.munmap(*hole)
        yield Oracle(
            kvm_fd=kvm_fd,
            nr_slots=nr_slots,
            address_spaces=address_spaces,
            # 4-level paging: the last page below the end is user memory, the next is not.
            top_of_va=_probe(kvm_fd, Call(True, 0, 0, 0, PAGE, USER_VA_END - PAGE))
            and not _probe(kvm_fd, Call(True, 0, 0, 0, PAGE, USER_VA_END)),
            top_of_gpa=_probe(kvm_fd, Call(True, 0, 0, GPA_END - PAGE, PAGE, 0))
            and not _probe(kvm_fd, Call(True, 0, 0, GPA_END, PAGE, 0)),
            maps=mapped,
            hole=hole,
        )
    finally:
        for addr, length in mapped:
            libc.munmap(addr, length)
        os.close(kvm_fd)


def _layout() -> list[tuple[int, int]]:
    """Where a fresh gmem host places the mappings of `LAYOUT` (always the same)."""
    h = gmem.Host(16 << 20)
    return [(m.addr, m.length) for m in (h.mmap_anonymous(n * PAGE) for n in LAYOUT)]


def _lockstep(oracle: Oracle) -> Lockstep:
    """A fresh pair of VMs; the gmem host gets the mirrored layout, hole included."""
    host = gmem.Host(16 << 20)
    ms = [host.mmap_anonymous(n * PAGE) for n in LAYOUT]
    assert [(m.addr, m.length) for m in ms[:-1]] == oracle.maps
    assert (ms[-1].addr, ms[-1].length) == oracle.hole
    ms[-1].unmap()
    return Lockstep(LiveVm(oracle.kvm_fd), host.create_vm("sw_protected", "dual"))


@pytest.fixture
def pair(oracle):
    ls = _lockstep(oracle)
    yield ls
    ls.live.close()


# ------------------------------------------------------------------ capabilities


def test_capabilities(oracle):
    """The capabilities both VM types share agree; the guest_memfd ones are the exclusion."""
    live = LiveVm(oracle.kvm_fd)
    try:
        vm = gmem.Host(16 << 20).create_vm("sw_protected", "dual")
        for cap in (
            gmem.KVM_CAP_NR_MEMSLOTS,
            gmem.KVM_CAP_READONLY_MEM,
            gmem.KVM_CAP_USER_MEMORY2,
            gmem.KVM_CAP_MEMORY_FAULT_INFO,
        ):
            assert live.check_extension(cap) == vm.check_extension(cap), cap
        assert oracle.nr_slots == gmem.KVM_USER_MEM_SLOTS
        # The reason KVM_MEM_GUEST_MEMFD alone is not generated: no guest_memfd here, so
        # the flag check refuses it before anything else, a delete included.
        if live.check_extension(gmem.KVM_CAP_GUEST_MEMFD) == 0:
            assert vm.check_extension(gmem.KVM_CAP_GUEST_MEMFD) == 1
            ua = oracle.maps[0][0]
            assert live.region(Call(True, 0, 0, 0, PAGE, ua)) == 0
            for size in (PAGE, 0):
                assert live.region(Call(True, 0, GMEM, 1 << 30, size, ua)) == errno.EINVAL
            assert live.region(Call(True, 0, 0, 0, 0, ua)) == 0
    finally:
        live.close()


# ------------------------------------------------------------------ scripted sequences


def _scripts(oracle: Oracle) -> dict[str, list[Call]]:
    a, n = oracle.maps[0]
    b, _ = oracle.maps[1]
    hole = oracle.hole[0]
    g = 1 << 32
    nr = oracle.nr_slots

    def v2(slot, flags, gpa, size, ua):
        return Call(True, slot, flags, gpa, size, ua)

    def v1(slot, flags, gpa, size, ua):
        return Call(False, slot, flags, gpa, size, ua)

    return {
        "create_delete": [
            v2(0, 0, g, 4 * PAGE, a),
            v2(0, 0, g, 0, a),
            v2(0, 0, g, 0, a),  # no such slot
            v1(1, 0, g, PAGE, a),
            v1(1, 0, 0, 0, 0),
            # guest_memfd and its offset count only with KVM_MEM_GUEST_MEMFD.
            Call(True, 2, 0, g, PAGE, a, fd=1000, offset=1),
            Call(True, 2, LOG, g, PAGE, a, fd=(1 << 32) - 1, offset=1 << 63),
        ],
        "overlap": [
            v2(0, 0, g, 4 * PAGE, a),
            v2(1, 0, g + 3 * PAGE, 4 * PAGE, b),  # EEXIST
            v2(1, 0, g - PAGE, PAGE, b),
            v2(2, 0, g - PAGE, 2 * PAGE, b),  # EEXIST across both
            v2(2, 0, g + 4 * PAGE, PAGE, a),  # same hva as slot 0: fine
            v1(3, 0, g + PAGE, PAGE, b),  # EEXIST
        ],
        "move": [
            v2(0, 0, g, 4 * PAGE, a),
            v2(1, 0, g + 8 * PAGE, 4 * PAGE, b),
            v2(0, 0, g + 2 * PAGE, 4 * PAGE, a),  # into its own old range
            v2(0, 0, g + 6 * PAGE, 4 * PAGE, a),  # EEXIST with slot 1
            v2(0, LOG, g + 16 * PAGE, 4 * PAGE, a),  # move and change flags
            v2(0, 0, g, 8 * PAGE, a),  # size change
            v2(0, 0, g, 4 * PAGE, a + PAGE),  # address change
        ],
        "flags": [
            v2(0, 0, g, 4 * PAGE, a),
            v2(0, LOG, g, 4 * PAGE, a),
            v2(0, LOG, g, 4 * PAGE, a),  # nothing to change
            v1(0, 0, g, 4 * PAGE, a),
            v2(0, RO, g, 4 * PAGE, a),  # READONLY cannot change
            v2(1, RO | LOG, g + 4 * PAGE, PAGE, b),
            v2(1, LOG, g + 4 * PAGE, PAGE, b),
            v2(1, RO, g + 4 * PAGE, PAGE, b),
            v1(1, RO, 0, 0, 0),
        ],
        "bad_flags": [
            v2(0, 1 << 3, g, PAGE, a),
            v2(0, GMEM | LOG, g, PAGE, a),
            v2(0, GMEM | RO, g, PAGE, a),
            v1(0, GMEM, g, PAGE, a),
            v2(0, 1 << 31, g, PAGE, a),
            v2(0, 0, g, PAGE, a),
            v2(0, 1 << 3, g, 0, a),  # even a delete checks flags
            v1(0, GMEM, g, 0, a),
        ],
        "unaligned": [
            v2(0, 0, g, PAGE + 1, a),
            v2(0, 0, g, PAGE // 2, a),
            v2(0, 0, g + 1, PAGE, a),
            v2(0, 0, g, PAGE, a + 8),
            v2(0, 0, g, PAGE, a),
            v2(0, 0, g + 1, 0, a),  # a delete checks the gpa
            v2(0, 0, g, 0, a + 1),  # and the address
        ],
        "slot_ids": [
            v2(nr - 1, 0, g, PAGE, a),
            v2(nr, 0, g + PAGE, PAGE, a),
            v2(0xFFFF, 0, g + PAGE, PAGE, a),
            v1(nr - 1, 0, 0, 0, 0),
            v2(oracle.address_spaces << 16, 0, g, PAGE, a),
            v2(0x7FFF << 16 | 1, 0, g, PAGE, a),
            v1(0xFFFF << 16 | 1, 0, g, PAGE, a),
        ],
        "addresses": [
            v2(0, 0, g, 4 * PAGE, hole),  # unmapped: access_ok() does not care
            v2(1, 0, g + 4 * PAGE, 2 * n, a),  # across the end of a mapping
            v2(2, 0, g + 16 * PAGE, PAGE, 0),
            v2(3, 0, g + 32 * PAGE, TOO_MANY_PAGES * PAGE, PAGE),
            v2(3, 0, 1 << 63, PAGE, a),
            v2(3, 0, (1 << 64) - PAGE, PAGE, a),  # the gpa range wraps
            v2(3, 0, g + 32 * PAGE, 1 << 47, 0),
            v2(3, 0, g + 32 * PAGE, PAGE, 1 << 63),
            v2(3, 0, g + 32 * PAGE, 1 << 63, 1 << 63),  # the address range wraps
        ],
    }


def _top_scripts(oracle: Oracle) -> dict[str, list[Call]]:
    a = oracle.maps[0][0]
    out = {}
    if oracle.top_of_va:
        out["top_of_va"] = [
            Call(True, 0, 0, 0, 2 * PAGE, USER_VA_END - 2 * PAGE),
            Call(True, 1, 0, 2 * PAGE, 2 * PAGE, USER_VA_END - PAGE),
            Call(True, 0, 0, 0, 0, USER_VA_END + PAGE),  # a delete's address is checked
            Call(True, 0, 0, 0, 0, USER_VA_END),
        ]
    if oracle.top_of_gpa:
        out["top_of_gpa"] = [
            Call(True, 0, 0, GPA_END - 2 * PAGE, 2 * PAGE, a),
            Call(True, 1, 0, GPA_END - PAGE, 2 * PAGE, a),
            Call(True, 1, 0, 0, PAGE, a),
            Call(True, 1, 0, GPA_END, PAGE, a),  # a move is checked
            Call(True, 0, 0, GPA_END, 0, a),  # a delete is not
        ]
    return out


SCRIPTS = (
    "create_delete",
    "overlap",
    "move",
    "flags",
    "bad_flags",
    "unaligned",
    "slot_ids",
    "addresses",
    "top_of_va",
    "top_of_gpa",
)


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripted(oracle, pair, name):
    scripts = _scripts(oracle) | _top_scripts(oracle)
    if name not in scripts:
        pytest.skip(f"{name}: the live kernel's limits differ from the ones gmem models")
    for c in scripts[name]:
        pair.do(c)
    pair.finish()


# ------------------------------------------------------------------ random sequences


class Pools:
    """The values random calls draw from, built once: mostly well-formed calls on a few
    slots and on overlapping gpa windows, with invalid values mixed in; every value is
    one that both VM types decide alike (see the module docstring)."""

    def __init__(self, oracle: Oracle) -> None:
        self.oracle = oracle
        nr = oracle.nr_slots
        self.small_ids = st.integers(0, 5)
        self.other_ids = st.sampled_from(
            [nr - 1, nr, nr + 1, 0x7FFF, 0xFFFF]
            + [a << 16 | s for a in (oracle.address_spaces, 2, 0x7FFF) for s in (0, 1)]
        )
        self.valid_flags = st.sampled_from([0, LOG, RO, LOG | RO])
        bad = [GMEM | LOG, GMEM | RO, GMEM | LOG | RO, 1 << 3, 1 << 31]
        # KVM_MEM_GUEST_MEMFD alone only on v1.
        self.bad_flags = {True: st.sampled_from(bad), False: st.sampled_from([*bad, GMEM])}
        self.sizes = st.integers(1, 8).map(lambda p: p * PAGE)
        # Windows of 16 pages, so that slots overlap often; all below 2^39, which any
        # x86-64 host's kvm_mmu_max_gfn() admits (with TDP it follows the host's MAXPHYADDR).
        self.gpas = st.builds(
            lambda w, k: w + k * PAGE, st.sampled_from([0, 1 << 32, 1 << 36]), st.integers(0, 15)
        )
        last = oracle.maps[-1]
        self.uas = st.one_of(
            *(
                st.integers(0, length // PAGE - 1).map(lambda k, a=addr: a + k * PAGE)
                for addr, length in oracle.maps
            ),
            st.sampled_from([oracle.hole[0], last[0] + last[1], 0]),  # hole, gap, NULL
        )
        # v2's guest_memfd fields, ignored without KVM_MEM_GUEST_MEMFD.
        self.fds = st.sampled_from([0, 1, 1000, (1 << 32) - 1])
        self.offsets = st.sampled_from([0, 1, PAGE, 1 << 63, (1 << 64) - PAGE])
        self.kinds = st.sampled_from(["create", "create", "delete", "move", "flags", "change"])
        self.edge = st.sampled_from(["slot", "flags", "gpa", "size", "ua"])

    def call(self, data, slots: dict[int, Call]) -> Call:
        c = self._call(data, slots)
        if not c.v2:
            return c
        return replace(c, fd=data.draw(self.fds), offset=data.draw(self.offsets))

    def _call(self, data, slots: dict[int, Call]) -> Call:
        d = data.draw
        v2 = d(st.booleans())
        kind = d(st.one_of(self.kinds, st.just("edge")))
        if kind in ("move", "flags", "change") and slots:
            old = slots[d(st.sampled_from(sorted(slots)))]
            if kind == "move":
                return replace(old, v2=v2, flags=d(self.valid_flags), gpa=d(self.gpas))
            if kind == "flags":
                return replace(old, v2=v2, flags=d(self.valid_flags))
            return replace(
                old,
                v2=v2,
                flags=old.flags ^ d(st.sampled_from([0, RO])),
                size=old.size + d(st.sampled_from([0, PAGE])),
                ua=old.ua + d(st.sampled_from([0, PAGE])),
            )
        if kind == "delete":
            slot = d(st.one_of(self.small_ids, self.other_ids))
            gpa = d(st.one_of(self.gpas, st.just(0)))
            return Call(v2, slot, d(self.valid_flags), gpa, 0, d(self.uas))
        if kind != "edge":
            return Call(
                v2, d(self.small_ids), d(self.valid_flags), d(self.gpas), d(self.sizes), d(self.uas)
            )
        # One parameter off a well-formed call (a delete too).
        size = d(st.one_of(st.just(0), self.sizes))
        c = Call(v2, d(self.small_ids), d(self.valid_flags), d(self.gpas), size, d(self.uas))
        which = d(self.edge)
        if which == "slot":
            return replace(c, slot=d(self.other_ids))
        if which == "flags":
            return replace(c, flags=d(self.bad_flags[v2]))
        if which == "gpa":
            gpas = [c.gpa + 1, c.gpa + PAGE // 2, 1 << 63, (1 << 64) - PAGE]
            if self.oracle.top_of_gpa:
                gpas += [GPA_END - c.size, GPA_END - c.size + PAGE]
            return replace(c, gpa=d(st.sampled_from(gpas)))
        if which == "size":
            sizes = [1, PAGE // 2, PAGE - 1, PAGE + 1, TOO_MANY_PAGES * PAGE, 1 << 47, 1 << 63]
            return replace(c, size=d(st.sampled_from([*sizes, (1 << 64) - PAGE])))
        uas = [c.ua + 1, c.ua + PAGE // 2, 1 << 47, 1 << 63, (1 << 64) - PAGE]
        if self.oracle.top_of_va:
            uas += [USER_VA_END - c.size, USER_VA_END - c.size + PAGE]
        return replace(c, ua=d(st.sampled_from(uas)))


@pytest.fixture(scope="module")
def pools(oracle):
    return Pools(oracle)


@settings(derandomize=True)
@given(data=st.data())
def test_random_sequences(oracle, pools, data):
    ls = _lockstep(oracle)
    try:
        for _ in range(data.draw(st.integers(1, 30), label="steps")):
            ls.do(pools.call(data, ls.slots))
        ls.finish()
    finally:
        ls.live.close()
