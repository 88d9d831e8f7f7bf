"""What the design tests share: a fresh host and VM per test, checked when the test ends
(``conftest.py``), the `Env` of one guest_memfd memslot, and the constants of the
strategies x platforms matrix. The reference model covers dual/sw_protected only, so
only the gmem core is exercised here.
"""

from __future__ import annotations

import numpy as np

import gmem
from util import PAGE

MiB = 1 << 20
GPA = 1 << 32
PRIV = gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE
MMAP = gmem.GUEST_MEMFD_FLAG_MMAP
INIT_SHARED = gmem.GUEST_MEMFD_FLAG_INIT_SHARED
KEEP = gmem.FALLOC_FL_KEEP_SIZE
PUNCH = gmem.FALLOC_FL_PUNCH_HOLE | gmem.FALLOC_FL_KEEP_SIZE
MEMFD = gmem.KVM_MEM_GUEST_MEMFD

STRATEGIES = ("dual", "inplace", "realloc", "two_offsets", "attr_hook")
VM_TYPES = ("sw_protected", "pkvm", "tdx", "snp")
ALL = [(vt, s) for s in STRATEGIES for vt in VM_TYPES]
SAME_PAGE = ("inplace", "attr_hook")  # the shared view is the private page itself
SEPARATE = ("dual", "two_offsets")  # a distinct shared page per gfn
KEEPS = ("sw_protected", "pkvm")  # in-place content kept (TDX/SNP scrub)

assert set(STRATEGIES) == set(gmem.STRATEGIES)
assert set(VM_TYPES) == set(gmem.VM_TYPES)

# --------------------------------------------------------------------------- plumbing

_LIVE: list[tuple[gmem.Host, list[gmem.Vm]]] = []


def new_host(memory=64 * MiB):
    host = gmem.Host(memory)
    _LIVE.append((host, []))
    return host


def new_vm(host, vm_type, strategy):
    vm = host.create_vm(vm_type, strategy)
    for h, vms in _LIVE:
        if h is host:
            vms.append(vm)
    return vm


def st(vm, *keys):
    s = vm.stats()
    return {k: s[k] for k in keys}


class Env:
    """One guest_memfd memslot of ``npages`` at ``gpa`` on a fresh VM.

    ``view`` is the VMM's mapping of the shared side: the anonymous memory for dual,
    the guest_memfd itself for the same-page strategies and realloc, the second
    guest_memfd range for two_offsets.  ``shared=True`` starts every page shared
    (INIT_SHARED for inplace, a conversion for attr_hook).
    """

    def __init__(
        self,
        vm_type="sw_protected",
        strategy="dual",
        npages=16,
        *,
        gpa=GPA,
        shared=False,
        flags=None,
        host=None,
    ):
        self.host = host or new_host()
        self.vm_type, self.strategy = vm_type, strategy
        self.vm = vm = new_vm(self.host, vm_type, strategy)
        self.npages, self.gpa = npages, gpa
        if flags is None:
            flags = 0 if strategy in SEPARATE else MMAP
            if strategy == "inplace" and shared:
                flags |= INIT_SHARED
        self.gmem = vm.create_guest_memfd(npages * PAGE, flags)
        self.mem = self.host.mmap_anonymous(npages * PAGE)
        kw = {}
        self.shared_gmem = None
        if strategy == "two_offsets":
            self.shared_gmem = vm.create_guest_memfd(npages * PAGE, MMAP)
            kw = {"shared_guest_memfd": self.shared_gmem, "shared_offset": 0}
        vm.set_user_memory_region2(0, MEMFD, gpa, npages * PAGE, self.mem.addr, self.gmem, 0, **kw)
        if strategy == "dual":
            self.view = self.mem
        elif strategy == "two_offsets":
            self.view = self.shared_gmem.mmap()
        else:
            self.view = self.gmem.mmap()
        if shared and strategy == "attr_hook":
            self.convert(0, npages, private=False)

    def g(self, page):
        return self.gpa + page * PAGE

    def convert(self, page, n, private):
        """What the VMM calls: KVM_SET_MEMORY_ATTRIBUTES, or in in-place mode (v13) the
        guest_memfd's KVM_SET_MEMORY_ATTRIBUTES2 (the file is bound at offset 0)."""
        attrs = PRIV if private else 0
        if self.strategy == "inplace":
            self.gmem.set_memory_attributes2(page * PAGE, n * PAGE, attrs)
        else:
            self.vm.set_memory_attributes(self.g(page), n * PAGE, attrs)

    def read(self, page, private):
        return self.vm.guest_read(self.g(page), private=private)

    def write(self, page, value, private):
        self.vm.guest_write(self.g(page), value, private=private)

    def host_read(self, page):
        return self.view.read(page * PAGE)

    def host_write(self, page, value):
        self.view.write(page * PAGE, value)

    def attr(self, page):
        return self.vm.get_memory_attributes(self.g(page) // PAGE)

    def stats(self, *keys):
        return st(self.vm, *keys)


def run(vm, events):
    arr = np.array(events, dtype=gmem.EVENT_DTYPE)
    return [int(x) for x in vm.apply(arr)]


def vmm_convert(vm, gpa, size, attrs):
    """The VMM converts ``[gpa, gpa + size)``: KVM_SET_MEMORY_ATTRIBUTES, or on an in-place
    VM (v13, where that ioctl no longer takes PRIVATE) a conversion event, which stands for
    KVM_SET_MEMORY_ATTRIBUTES2 on the bound guest_memfd ranges. Raises on failure."""
    if vm.strategy != "inplace":
        vm.set_memory_attributes(gpa, size, attrs)
        return
    op = gmem.Op.CONVERT_PRIVATE if attrs else gmem.Op.CONVERT_SHARED
    (status,) = run(vm, [(op, gpa // PAGE, size // PAGE, 0)])
    if status:
        raise OSError(-status, f"conversion of {gpa:#x}+{size:#x} failed")


def after_to_private(vm_type, strategy, shared_value, old_private=0):
    """What the guest reads privately from a page right after shared -> private."""
    if strategy in SEPARATE:
        return old_private
    if strategy in SAME_PAGE and vm_type in KEEPS:
        return shared_value
    return 0


def after_to_shared(vm_type, strategy, private_value, old_shared):
    """What the guest reads (shared) right after private -> shared."""
    if strategy in SEPARATE:
        return old_shared
    if strategy in SAME_PAGE and vm_type in KEEPS:
        return private_value
    return 0
