"""The C API (libgmem) behind the Python API's names, through ctypes: the same test code
drives both, so every call is checked to take the same input and fail with the same
errno. Only what the C API covers is here."""

from __future__ import annotations

import ctypes as C
import errno as E
import os

import numpy as np

from gmem._events import EVENT_DTYPE

lib: C.CDLL

u64, i32, u32, sz = C.c_uint64, C.c_int32, C.c_uint32, C.c_size_t
P = C.c_void_p


class MemoryFaultC(C.Structure):
    _fields_ = [("gpa", u64), ("size", u64), ("flags", u64)]


class DetailC(C.Structure):
    _fields_ = [
        ("value", u64),
        ("fault_gpa", u64),
        ("fault_flags", u32),
        ("allocated", u64),
        ("freed", u64),
    ]


class GmemError(OSError):
    pass


class MemoryFault(GmemError):
    pass


class HostFault(GmemError):
    pass


class ConversionBusy(GmemError):
    pass


class MmioExit(Exception):
    pass


KVM_EXIT_MMIO = 6


class InvariantError(AssertionError):
    pass


def last_error() -> str:
    return lib.gmem_last_error().decode()


def check(rc: int, *, fault: MemoryFaultC | None = None, error_offset: int | None = None):
    if rc == 0:
        return
    if rc == KVM_EXIT_MMIO and fault is not None:
        e = MmioExit(last_error())
        e.phys_addr, e.len, e.is_write = fault.gpa, fault.size, bool(fault.flags & 1)
        raise e
    err, msg = -rc, last_error()
    if err == E.EUCLEAN:
        raise InvariantError(msg)
    if err == E.EFAULT and fault is not None and "KVM_EXIT_MEMORY_FAULT" in msg:
        e = MemoryFault(err, msg)
        e.gpa, e.size, e.flags = fault.gpa, fault.size, fault.flags
        raise e
    if err == E.EFAULT and "SIGBUS" in msg:
        raise HostFault(err, msg)
    if err == E.EAGAIN and error_offset is not None:
        e = ConversionBusy(err, msg)
        e.error_offset = error_offset
        raise e
    raise GmemError(err, msg)


def _cstr(s: str | None):
    return None if s is None else s.encode()


class Handle:
    def __init__(self, host: Host | None, ptr: P):
        self.host, self.ptr = host, ptr


def _made(fn, *args) -> P:
    out = P()
    check(fn(*args, C.byref(out)))
    return out


class Host(Handle):
    def __init__(
        self, memory: int, *, nodes: int = 1, costs: dict[str, int] | None = None, _ptr=None
    ):
        if _ptr is not None:
            super().__init__(None, _ptr)
            return
        costs = costs or {}
        arr = (Cost * len(costs))(*[Cost(k.encode(), v) for k, v in costs.items()])
        if nodes == 1:
            ptr = _made(lib.gmem_host_new, u64(memory), arr, sz(len(costs)))
        else:
            ptr = _made(lib.gmem_host_new_numa, u64(memory), u32(nodes), arr, sz(len(costs)))
        super().__init__(None, ptr)

    def node_stats(self) -> list[dict[str, int]]:
        out, total, free = [], u64(), u64()
        fn = lib.gmem_host_node_pages
        while (rc := fn(self.ptr, u32(len(out)), C.byref(total), C.byref(free))) == 0:
            out.append({"node": len(out), "total_pages": total.value, "free_pages": free.value})
        assert rc == -E.ENOENT, rc
        return out

    def free(self) -> None:
        check(lib.gmem_host_free(self.ptr))

    def create_vm(self, vm_type: str = "sw_protected", strategy: str = "dual") -> Vm:
        return Vm(self, _made(lib.gmem_host_create_vm, self.ptr, _cstr(vm_type), _cstr(strategy)))

    def mmap_anonymous(self, length: int) -> Mapping:
        return Mapping(self, _made(lib.gmem_host_mmap_anonymous, self.ptr, u64(length)))

    def stats(self) -> dict[str, int]:
        return _stats(lib.gmem_host_stat, self.ptr)

    def set_costs(self, costs: dict[str, int]) -> None:
        for k, v in costs.items():
            check(lib.gmem_host_set_cost(self.ptr, k.encode(), u64(v)))

    def check(self) -> None:
        check(lib.gmem_host_check(self.ptr))

    def save(self, path) -> None:
        check(lib.gmem_host_save(self.ptr, os.fsencode(path)))

    def vms(self) -> list[Vm]:
        return _nth(self, lib.gmem_host_vm, Vm)


def load(path) -> Host:
    return Host(0, _ptr=_made(lib.gmem_load, os.fsencode(path)))


def _nth(host, fn, cls):
    out, i = [], 0
    while True:
        p = P()
        rc = fn(host.ptr, sz(i), C.byref(p))
        if rc == -E.ENOENT:
            return out
        check(rc)
        out.append(cls(host, p))
        i += 1


def _stats(fn, ptr) -> dict[str, int]:
    d, i = {}, 0
    name, value = C.c_char_p(), u64()
    while (rc := fn(ptr, sz(i), C.byref(name), C.byref(value))) == 0:
        d[name.value.decode()] = value.value
        i += 1
    assert rc == -E.ENOENT, rc
    return d


class Cost(C.Structure):
    _fields_ = [("name", C.c_char_p), ("ns", u64)]


class Vm(Handle):
    def create_guest_memfd(self, size: int, flags: int = 0, page_order: int = 0) -> GuestMemfd:
        fn = lib.gmem_vm_create_guest_memfd
        return GuestMemfd(self.host, _made(fn, self.ptr, u64(size), u64(flags), u32(page_order)))

    def set_user_memory_region2(
        self,
        slot,
        flags,
        guest_phys_addr,
        memory_size,
        userspace_addr=0,
        guest_memfd=None,
        guest_memfd_offset=0,
        *,
        shared_guest_memfd=None,
        shared_offset=None,
    ) -> None:
        so = None if shared_offset is None else C.byref(u64(shared_offset))
        check(
            lib.gmem_vm_set_user_memory_region2(
                self.ptr,
                u32(slot),
                u32(flags),
                u64(guest_phys_addr),
                u64(memory_size),
                u64(userspace_addr),
                guest_memfd and guest_memfd.ptr,
                u64(guest_memfd_offset),
                shared_guest_memfd and shared_guest_memfd.ptr,
                so,
            )
        )

    def set_memory_attributes(self, address, size, attributes, flags=0) -> None:
        check(
            lib.gmem_vm_set_memory_attributes(
                self.ptr, u64(address), u64(size), u64(attributes), u64(flags)
            )
        )

    def get_memory_attributes(self, gfn: int) -> int:
        v = u64()
        check(lib.gmem_vm_get_memory_attributes(self.ptr, u64(gfn), C.byref(v)))
        return v.value

    def guest_read(self, gpa: int, *, private: bool) -> int:
        v, f = u64(), MemoryFaultC()
        rc = lib.gmem_vm_guest_read(self.ptr, u64(gpa), C.c_bool(private), C.byref(v), C.byref(f))
        check(rc, fault=f)
        return v.value

    def guest_write(self, gpa: int, value: int, *, private: bool) -> None:
        f = MemoryFaultC()
        rc = lib.gmem_vm_guest_write(self.ptr, u64(gpa), u64(value), C.c_bool(private), C.byref(f))
        check(rc, fault=f)

    def stats(self) -> dict[str, int]:
        return _stats(lib.gmem_vm_stat, self.ptr)

    def check(self) -> None:
        check(lib.gmem_vm_check(self.ptr))

    def apply(self, events: np.ndarray, *, details: bool = False):
        events = np.ascontiguousarray(events, dtype=EVENT_DTYPE)
        n = len(events)
        status = np.zeros(n, np.int32)
        dets = (DetailC * n)()
        check(
            lib.gmem_vm_apply(
                self.ptr,
                events.ctypes.data_as(P),
                sz(n),
                status.ctypes.data_as(P),
                dets if details else None,
            )
        )
        if not details:
            return status
        return status, [(d.value, d.fault_gpa, d.fault_flags, d.allocated, d.freed) for d in dets]


class GuestMemfd(Handle):
    def fallocate(self, mode: int, offset: int, length: int) -> None:
        check(lib.gmem_guest_memfd_fallocate(self.ptr, u32(mode), u64(offset), u64(length)))

    def mmap(self, offset: int = 0, length: int | None = None, *, shared: bool = True) -> Mapping:
        ln = None if length is None else C.byref(u64(length))
        fn = lib.gmem_guest_memfd_mmap
        return Mapping(self.host, _made(fn, self.ptr, u64(offset), ln, C.c_bool(shared)))

    def set_memory_attributes2(self, offset, size, attributes, flags=0) -> None:
        at = u64(~0 & (2**64 - 1))
        rc = lib.gmem_guest_memfd_set_memory_attributes2(
            self.ptr, u64(offset), u64(size), u64(attributes), u64(flags), C.byref(at)
        )
        check(rc, error_offset=at.value)

    def close(self) -> None:
        check(lib.gmem_guest_memfd_close(self.ptr))


class Mapping(Handle):
    @property
    def addr(self) -> int:
        v = u64()
        check(lib.gmem_mapping_addr(self.ptr, C.byref(v)))
        return v.value

    def read(self, offset: int) -> int:
        v = u64()
        check(lib.gmem_mapping_read(self.ptr, u64(offset), C.byref(v)))
        return v.value

    def write(self, offset: int, value: int) -> None:
        check(lib.gmem_mapping_write(self.ptr, u64(offset), u64(value)))

    def pin(self, offset: int) -> None:
        check(lib.gmem_mapping_pin(self.ptr, u64(offset)))

    def unpin(self, offset: int) -> None:
        check(lib.gmem_mapping_unpin(self.ptr, u64(offset)))

    def discard(self, offset: int, length: int) -> None:
        check(lib.gmem_mapping_discard(self.ptr, u64(offset), u64(length)))

    def mbind(self, offset: int, length: int, mode: int, nodes=()) -> None:
        mask = 0
        for n in nodes:
            mask |= 1 << n
        check(lib.gmem_mapping_mbind(self.ptr, u64(offset), u64(length), u32(mode), u64(mask)))

    def get_mempolicy(self, offset: int) -> tuple[int, list[int]]:
        mode, mask = u32(), u64()
        check(lib.gmem_mapping_get_mempolicy(self.ptr, u64(offset), C.byref(mode), C.byref(mask)))
        return mode.value, [n for n in range(64) if mask.value >> n & 1]

    def page_node(self, offset: int) -> int:
        node = u32()
        check(lib.gmem_mapping_page_node(self.ptr, u64(offset), C.byref(node)))
        return node.value

    def unmap(self) -> None:
        check(lib.gmem_mapping_unmap(self.ptr))


def open_library(path) -> None:
    """Load libgmem from `path` and declare every function's return type."""
    global lib
    lib = C.CDLL(str(path))
    lib.gmem_last_error.restype = C.c_char_p
