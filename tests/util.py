"""Helpers shared by the test modules."""

from __future__ import annotations

import contextlib
import errno

import pytest

PAGE = 4096

# Stats a failed call must leave alone (all of them: "a failed call changes nothing").
IGNORED_ON_FAILURE: frozenset[str] = frozenset()


class Raised:
    value: BaseException | None = None


@contextlib.contextmanager
def raises_errno(err: int, exc_type: type[BaseException] = OSError, msg: str = ""):
    """Expect an OSError (or subclass) carrying ``err``; ``msg`` says what was tried."""
    raised = Raised()
    where = f" ({msg})" if msg else ""
    try:
        yield raised
    except exc_type as e:
        raised.value = e
    else:
        pytest.fail(f"DID NOT RAISE {errno.errorcode[err]}{where}")
    got = raised.value.errno
    assert got == err, (
        f"expected {errno.errorcode[err]}, got {errno.errorcode.get(got, got)}{where}: "
        f"{raised.value}"
    )


def outcome(api, fn, *args, **kwargs):
    """Run a call and describe what happened as a comparable tuple."""
    try:
        return ("ok", fn(*args, **kwargs))
    except api.MemoryFault as e:
        return ("memory_fault", e.errno, e.gpa, e.size, e.flags)
    except api.MmioExit as e:
        return ("mmio", e.phys_addr, e.len, e.is_write)
    except api.HostFault as e:
        return ("host_fault", e.errno)
    except OSError as e:
        return ("oserror", e.errno)


class Guest:
    """The usual layout: one guest_memfd memslot at ``gpa`` over ``npages`` pages, its
    shared side in one anonymous mapping, the guest_memfd bound at offset 0."""

    def __init__(self, api, host, vm, npages=256, gpa=0, file_pages=None, slot=0):
        self.api, self.host, self.vm = api, host, vm
        self.npages, self.gpa, self.slot = npages, gpa, slot
        self.gmem = vm.create_guest_memfd((file_pages or npages) * PAGE)
        self.mem = host.mmap_anonymous(npages * PAGE)
        vm.set_user_memory_region2(
            slot, api.KVM_MEM_GUEST_MEMFD, gpa, npages * PAGE, self.mem.addr, self.gmem, 0
        )

    def gpa_of(self, page):
        return self.gpa + page * PAGE

    def convert(self, page, npages, private):
        attrs = self.api.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
        self.vm.set_memory_attributes(self.gpa_of(page), npages * PAGE, attrs)

    def read(self, page, private):
        return self.vm.guest_read(self.gpa_of(page), private=private)

    def write(self, page, value, private):
        self.vm.guest_write(self.gpa_of(page), value, private=private)

    def host_read(self, page):
        return self.mem.read(page * PAGE)

    def host_write(self, page, value):
        self.mem.write(page * PAGE, value)


def snapshot(vm, host, gfns):
    st = {k: v for k, v in vm.stats().items() if k not in IGNORED_ON_FAILURE}
    attrs = [vm.get_memory_attributes(g) for g in gfns]
    return st, attrs, host.stats()
