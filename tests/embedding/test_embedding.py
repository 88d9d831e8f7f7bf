"""The embedding surfaces agree with the Python API: the C example reproduces the
README's example, and libgmem (through ctypes, `tests/capi.py`) takes the same input and
fails with the same errno as `gmem` for each call."""

from __future__ import annotations

import contextlib
import errno as E
import io
import re
import shutil
import subprocess
from pathlib import Path

import capi
import numpy as np
import pytest

import gmem

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
PAGE = 4096


@pytest.fixture(scope="module")
def built():
    """Build libgmem and the C example (make c-example-bin), once per run."""
    if not (shutil.which("cargo") and shutil.which("cc") and shutil.which("make")):
        pytest.skip("needs cargo, cc and make")
    subprocess.run(["make", "-s", "c-example-bin"], cwd=ROOT, check=True)
    capi.open_library(ROOT / "target" / "debug" / "libgmem.so")
    return ROOT / "target" / "c" / "example"


BATCH = [
    (gmem.Op.CONVERT_SHARED, 0, 16, 0),
    (gmem.Op.GUEST_WRITE_SHARED, 1, 1, 7),
    (gmem.Op.GUEST_READ_SHARED, 1, 1, 0),
    (gmem.Op.GUEST_READ_PRIVATE, 2, 1, 0),
    (gmem.Op.CONVERT_PRIVATE, 0, 16, 0),
    (gmem.Op.GUEST_READ_PRIVATE, 1, 1, 0),
]


def events(rows) -> np.ndarray:
    return np.array([tuple(int(x) for x in r) for r in rows], dtype=gmem.EVENT_DTYPE)


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_c_example_prints_what_the_readme_example_and_a_batch_print(built):
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(readme_example(), scope)
    vm = scope["vm"]
    status, details = vm.apply(events(BATCH), details=True)
    lines = out.getvalue().splitlines()
    lines.append("status " + " ".join(str(s) for s in status))
    lines.append("values " + " ".join(str(v) for v in details["value"]))
    lines += [f"{k} {v}" for k, v in vm.stats().items()]
    c = subprocess.run([built], capture_output=True, text=True, check=True)
    assert c.stdout.splitlines() == lines
    rust = subprocess.run(
        ["cargo", "run", "-q", "-p", "gmem-core", "--example", "embed"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert rust.stdout.splitlines() == lines


def outcome(fn, *args, **kwargs):
    """What a call did, comparably across the two APIs: its result or its errno."""
    try:
        r = fn(*args, **kwargs)
    except (gmem.MemoryFault, capi.MemoryFault) as e:
        return ("memory_fault", e.errno, e.gpa, e.size, e.flags)
    except (gmem.MmioExit, capi.MmioExit) as e:
        return ("mmio", e.phys_addr, e.len, e.is_write)
    except (gmem.ConversionBusy, capi.ConversionBusy) as e:
        return ("busy", e.errno, e.error_offset)
    except (gmem.HostFault, capi.HostFault) as e:
        return ("host_fault", e.errno)
    except OSError as e:
        return ("errno", E.errorcode[e.errno])
    except (gmem.InvariantError, capi.InvariantError):
        return ("invariant",)
    except ValueError:
        # Python's ValueError for a bad name or size is EINVAL in C.
        return ("errno", "EINVAL")
    if isinstance(r, (gmem.Host, gmem.Vm, gmem.GuestMemfd, gmem.Mapping, capi.Handle)):
        return ("ok", "handle")
    return ("ok", r)


def applied(vm, rows):
    """`vm.apply(..., details=True)` as plain lists."""
    status, details = vm.apply(events(rows), details=True)
    return status.tolist(), [tuple(map(int, d)) for d in details]


def scenario(api):
    """A walk through every call, good and bad input; one outcome per step."""
    out = []
    rec = out.append
    rec(outcome(api.Host, 12345))
    rec(outcome(api.Host, 64 * MiB, costs={"nonsense": 1}))
    host = api.Host(256 * MiB, costs={"exit_roundtrip": 900})
    rec(outcome(host.set_costs, {"nonsense": 1}))
    rec(outcome(host.create_vm, "nonsense", "dual"))
    rec(outcome(host.create_vm, "snp", "nonsense"))
    for vm_type, strategy in [("snp", "dual"), ("sw_protected", "inplace")]:
        vm = host.create_vm(vm_type, strategy)
        rec(outcome(vm.create_guest_memfd, 4097))
        rec(outcome(vm.create_guest_memfd, 4 * MiB, 1 << 40))
        mmap_flag = gmem.GUEST_MEMFD_FLAG_MMAP if strategy == "inplace" else 0
        f = vm.create_guest_memfd(4 * MiB, mmap_flag)
        mem = host.mmap_anonymous(4 * MiB)
        rec(outcome(mem.read, 4 * MiB))
        rec(outcome(mem.write, 0, 5))
        rec(outcome(mem.read, 0))
        region = (0, gmem.KVM_MEM_GUEST_MEMFD, 0, 4 * MiB, mem.addr, f, 0)
        rec(outcome(vm.set_user_memory_region2, 0, 1 << 20, 0, 4 * MiB, mem.addr))
        rec(outcome(vm.set_user_memory_region2, 0, gmem.KVM_MEM_GUEST_MEMFD, 0, 4 * MiB, 0))
        rec(outcome(vm.set_user_memory_region2, *region))
        rec(outcome(vm.set_user_memory_region2, *region))
        rec(outcome(vm.set_memory_attributes, 1, PAGE, gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE))
        rec(outcome(vm.set_memory_attributes, 0, 64 * PAGE, 1 << 9))
        rec(outcome(vm.set_memory_attributes, 0, 64 * PAGE, gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE))
        rec(outcome(vm.get_memory_attributes, 3))
        rec(outcome(vm.guest_write, 0x3000, 9, private=True))
        rec(outcome(vm.guest_read, 0x3000, private=False))
        rec(outcome(vm.guest_read, 0x3000, private=True))
        rec(outcome(vm.guest_write, 100 * PAGE, 1, private=True))
        rec(outcome(vm.guest_read, 64 * MiB, private=True))
        rec(outcome(f.fallocate, 3, 0, PAGE))
        rec(outcome(f.fallocate, 0, 1, PAGE))
        rec(outcome(f.fallocate, 3, 200 * PAGE, PAGE))
        rec(outcome(f.set_memory_attributes2, 0, PAGE, 0))
        rec(outcome(f.mmap, 0, 0))
        m = None
        if strategy == "inplace":
            m = f.mmap()
            rec(outcome(m.read, 0))
            rec(outcome(f.set_memory_attributes2, 0, 8 * PAGE, 0))
            rec(outcome(m.write, 2 * PAGE, 3))
            rec(outcome(m.pin, 2 * PAGE))
            rec(outcome(f.set_memory_attributes2, 0, 8 * PAGE, gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE))
            rec(outcome(m.unpin, 2 * PAGE))
            rec(outcome(m.unpin, 2 * PAGE))
            rec(outcome(m.discard, 0, PAGE))
        rec(outcome(applied, vm, [*BATCH, (99, 0, 1, 0), (0, 1 << 40, 1, 0)]))
        rec(outcome(applied, vm, BATCH))
        rec(outcome(vm.check))
        rec(outcome(host.check))
        rec(vm.stats())
        if m is not None:
            rec(outcome(m.unmap))
            rec(outcome(m.read, 0))
        rec(outcome(f.close))
        rec(outcome(f.close))
        rec(outcome(f.fallocate, 3, 0, PAGE))
    rec({k: v for k, v in host.stats().items() if k != "heap_bytes"})
    return out, host


def test_c_api_gives_the_python_api_results_and_errnos(built, tmp_path):
    py, py_host = scenario(gmem)
    c, c_host = scenario(capi)
    for i, (a, b) in enumerate(zip(py, c, strict=True)):
        assert a == b, f"step {i}"
    # Snapshots: what one API saves, the other loads, to the same counters.
    py_host.save(tmp_path / "py.snap")
    c_host.save(tmp_path / "c.snap")
    for path in ("py.snap", "c.snap"):
        stats = [gmem.load(tmp_path / path).vms()[i].stats() for i in range(2)]
        assert [capi.load(tmp_path / path).vms()[i].stats() for i in range(2)] == stats
    (tmp_path / "bad.snap").write_bytes(b"not a snapshot")
    assert outcome(capi.load, tmp_path / "bad.snap") == outcome(gmem.load, tmp_path / "bad.snap")
    c_host.free()


def numa_scenario(api):
    """NUMA nodes and memory policy, good and bad input; one outcome per step."""
    out = []
    rec = out.append
    rec(outcome(api.Host, 64 * MiB, nodes=0))
    rec(outcome(api.Host, 3 * PAGE, nodes=2))
    host = api.Host(64 * MiB, nodes=2)
    vm = host.create_vm("sw_protected", "inplace")
    shared = gmem.GUEST_MEMFD_FLAG_MMAP | gmem.GUEST_MEMFD_FLAG_INIT_SHARED
    f = vm.create_guest_memfd(4 * MiB, shared)
    m = f.mmap()
    anon = host.mmap_anonymous(4 * MiB)
    for mp in (m, anon):
        rec(outcome(mp.mbind, 0, PAGE, 999, [0]))
        rec(outcome(mp.mbind, 0, PAGE, gmem.MPOL_BIND, []))
        rec(outcome(mp.mbind, 0, PAGE, gmem.MPOL_BIND, [2]))
        rec(outcome(mp.mbind, 1, PAGE, gmem.MPOL_BIND, [1]))
        rec(outcome(mp.mbind, 0, 8 * MiB, gmem.MPOL_BIND, [1]))
        rec(outcome(mp.mbind, 0, 2 * PAGE, gmem.MPOL_BIND, [1]))
        rec(outcome(mp.mbind, 2 * PAGE, 4 * PAGE, gmem.MPOL_INTERLEAVE, [0, 1]))
        rec(outcome(mp.get_mempolicy, 0))
        rec(outcome(mp.get_mempolicy, 3 * PAGE))
        rec(outcome(mp.get_mempolicy, 9 * PAGE))
        rec(outcome(mp.get_mempolicy, 4 * MiB))
        rec(outcome(mp.page_node, 0))
        for i in range(8):
            rec(outcome(mp.write, i * PAGE, i))
        rec([outcome(mp.page_node, i * PAGE) for i in range(8)])
        rec(outcome(mp.page_node, 4 * MiB))
    rec(outcome(host.check))
    rec([{k: n[k] for k in ("node", "total_pages", "free_pages")} for n in host.node_stats()])
    return out


def test_c_api_numa_gives_the_python_api_results_and_errnos(built):
    py, c = numa_scenario(gmem), numa_scenario(capi)
    for i, (a, b) in enumerate(zip(py, c, strict=True)):
        assert a == b, f"step {i}"
    # Pages landed where the policies say: bound to node 1, interleaved (the guest_memfd
    # in allocation order, the anonymous mapping by offset: the same here), then local.
    placed = [r for r in py if isinstance(r, list) and len(r) == 8]
    want = [("ok", n) for n in (1, 1, 0, 1, 0, 1, 0, 0)]
    assert placed == [want, want]


def test_handles_are_checked_not_trusted(built):
    host = capi.Host(64 * MiB)
    vm = host.create_vm()
    f = vm.create_guest_memfd(MiB)
    # A NULL handle, a handle of the wrong kind, a number never handed out: EBADF.
    for bad in (capi.Vm(host, None), capi.Vm(host, f.ptr), capi.Vm(host, capi.P(0x7777_7777))):
        with pytest.raises(capi.GmemError) as e:
            bad.check()
        assert e.value.errno == E.EBADF
    # A required out-pointer that is NULL: EINVAL, and a message naming it.
    assert capi.lib.gmem_host_create_vm(host.ptr, None, None, None) == -E.EINVAL
    assert capi.last_error() == "out is NULL"
    assert capi.lib.gmem_vm_apply(vm.ptr, None, capi.sz(3), None, None) == -E.EINVAL
    # Stats by name, and a name that does not exist.
    v = capi.u64()
    assert capi.lib.gmem_vm_stat_get(vm.ptr, b"rmpupdates", capi.C.byref(v)) == 0
    assert capi.lib.gmem_vm_stat_get(vm.ptr, b"nonsense", capi.C.byref(v)) == -E.ENOENT
    host.free()
    # Freeing a host invalidates every handle made from it, and the host itself.
    for h in (vm, f):
        with pytest.raises(capi.GmemError) as e:
            h.check() if h is vm else h.close()
        assert e.value.errno == E.EBADF
    with pytest.raises(capi.GmemError) as e:
        host.free()
    assert e.value.errno == E.EBADF
