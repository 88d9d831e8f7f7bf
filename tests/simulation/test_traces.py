"""Traces: gmem JSONL/CSV round trips, the ftrace importer, malformed-line errors."""

# ruff: noqa: E501 - the sample trace lines are kept verbatim, as ftrace prints them

from __future__ import annotations

import numpy as np
import pytest

from gmem import EVENT_DTYPE, Op, traces
from gmem.traces import TraceError
from gmem.workloads import make_events

# Lines as the kvm_hypercall tracepoint prints them (arch/x86/kvm/trace.h:
# "nr 0x%lx a0 0x%lx a1 0x%lx a2 0x%lx a3 0x%lx"), in the forms ftrace and trace-cmd
# write: comm-pid, optional (tgid), optional [cpu], optional flags and timestamp.
FTRACE = """\
# tracer: nop
#
# entries-in-buffer/entries-written: 9/9   #P:8
#
#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION
#              | |         |   |||||     |         |
     kvm_pv_test-54285: kvm_hypercall: nr 0x5 a0 0x0 a1 0x0 a2 0x0 a3 0x0
 apic_bus_clock_-11419   [056] d..2.   146.771179: kvm_hypercall: nr 0x2c8a9e9cc6703c a0 0x2c8b0e9ce46c37 a1 0xe0003bf7 a2 0xe0003bf7 a3 0x7
 CPU 0/KVM-2345    [001] d..1.   147.000001: kvm_exit: reason EPT_VIOLATION rip 0xffffffff81000000 info 0 0
 CPU 0/KVM-2345    [001] d..1.   147.000002: kvm_hypercall: nr 0xc a0 0x200000 a1 0x10 a2 0x0 a3 0x0
 CPU 1/KVM-2346 (   2340) [003] .....   147.000003: kvm_hypercall: nr 0xc a0 0x200000 a1 0x10 a2 0x10 a3 0x0
  qemu-system-x86-2340  [002]  148.512345: kvm_hypercall: nr 0xc a0 0x40000000 a1 0x200 a2 0x11 a3 0x0
           <...>-2340  [002]  148.600000: kvm_hypercall: nr 0xc a0 0x40000001 a1 0x1 a2 0x10 a3 0x0
           <...>-2340  [002]  148.700000: kvm_hypercall: nr 0xc a0 0x80000000 a1 0x0 a2 0x10 a3 0x0
           <...>-2340  [002]  148.800000: kvm_hypercall: nr 0xc a0 0x80000000 a1 0x1 a2 0x30 a3 0x0
  qemu-system-x86-2340  [002]  149.000000: kvm_hypercall: nr 0xc a0 0x80000000 a1 0x40000 a2 0x2 a3 0x0
"""

TRACE_CMD = """\
cpus=2
version = 6
CPU 1 is empty
  CPU 0/KVM-7001  [000]  5001.000001: kvm_page_fault:       vcpu 0 rip 0xfff0 address 0x1000 error_code 0x6
  CPU 0/KVM-7001  [000]  5001.000002: kvm_hypercall:        nr 0xc a0 0x3000 a1 0x2 a2 0x0 a3 0x0
CPU:0 [LOST 12 EVENTS]
  CPU 0/KVM-7001  [000]  5001.000003: kvm_hypercall:        nr 0xc a0 0x3000 a1 0x2 a2 0x10 a3 0x0
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def rows(ev):
    return [
        (Op(o).name, g, n)
        for o, g, n in zip(*(ev[k].tolist() for k in ("op", "gfn", "npages")), strict=True)
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_round_trip(tmp_path, suffix):
    ev = make_events("dma-churn", 1 << 14, seed=2, rounds=20)
    path = tmp_path / f"t{suffix}"
    assert traces.write_trace(path, ev, pages=1 << 14) == len(ev)
    back = traces.read_events(path)
    assert back.dtype == EVENT_DTYPE
    assert np.array_equal(back, ev)
    assert traces.trace_extent(path) == (len(ev), 1 << 14)
    # streaming: chunks, same events
    parts = list(traces.read_trace(path, chunk=100))
    assert all(len(p) <= 100 for p in parts)
    assert np.array_equal(np.concatenate(parts), ev)


def test_write_streams_and_big_values(tmp_path):
    ev = np.zeros(3, EVENT_DTYPE)
    ev["op"] = [Op.HOST_WRITE, Op.ALLOCATE, Op.GUEST_WRITE_SHARED]
    ev["gfn"] = [0, 1 << 40, 7]
    ev["npages"] = [1, 2, 3]
    ev["value"] = [0, (1 << 64) - 1, 42]
    for suffix in (".jsonl", ".csv"):
        path = tmp_path / f"v{suffix}"
        traces.write_trace(path, iter([ev[:1], ev[1:]]))
        assert np.array_equal(traces.read_events(path), ev)
    with pytest.raises(ValueError, match=r"jsonl or \.csv"):
        traces.write_trace(tmp_path / "x.trace", ev)


def test_readers_accept_numbers_and_hex(tmp_path):
    p = write(tmp_path, "a.jsonl", '{"op": 1, "gfn": "0x10", "npages": 2, "t": 5}\n\n')
    assert rows(traces.read_events(p)) == [("CONVERT_SHARED", 16, 2)]
    p = write(tmp_path, "a.csv", "op,gfn,npages\n# comment\n0,0x20,1\nPIN, 3, 4\n")
    ev = traces.read_events(p)
    assert rows(ev) == [("CONVERT_PRIVATE", 32, 1), ("PIN", 3, 4)]
    assert (ev["value"] == 0).all()


def test_ftrace_import_decodes_map_gpa_range(tmp_path):
    path = write(tmp_path, "guest.trace", FTRACE)
    ev, stats = traces.import_ftrace(path, touch=False)
    assert rows(ev) == [
        ("CONVERT_SHARED", 0x200, 0x10),  # a2 bit 4 clear: decrypted -> shared
        ("CONVERT_PRIVATE", 0x200, 0x10),  # ENC_STAT(1) -> private
        ("CONVERT_PRIVATE", 0x40000, 0x200),  # 2M hint: a1 still counts 4 KiB pages
        ("CONVERT_SHARED", 0x80000, 0x40000),  # 1G hint, shared
    ]
    assert stats["hypercalls"] == 9
    assert stats["other_hypercalls"] == 2  # nr 0x5 and the huge nr
    assert stats["other_events"] == 1  # kvm_exit
    assert stats["rejected"] == 3  # unaligned gpa, a1 == 0, reserved attribute bit 5
    assert stats["conversions"] == 4
    assert (stats["page_size_4k"], stats["page_size_2m"], stats["page_size_1g"]) == (2, 1, 1)


def test_ftrace_touch_follows_each_conversion(tmp_path):
    path = write(tmp_path, "guest.trace", FTRACE)
    ev, _ = traces.import_ftrace(path)
    assert rows(ev)[:4] == [
        ("CONVERT_SHARED", 0x200, 0x10),
        ("GUEST_WRITE_SHARED", 0x200, 0x10),
        ("CONVERT_PRIVATE", 0x200, 0x10),
        ("GUEST_WRITE_PRIVATE", 0x200, 0x10),
    ]


def test_trace_cmd_report_form(tmp_path):
    path = write(tmp_path, "report.txt", TRACE_CMD)
    ev, stats = traces.import_ftrace(path, touch=False)
    assert rows(ev) == [("CONVERT_SHARED", 3, 2), ("CONVERT_PRIVATE", 3, 2)]
    assert stats["other_events"] == 1


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("garbage that is no event\n", "not an ftrace event line"),
        (" CPU 0/KVM-1 [000] 1.0: kvm_hypercall: nr 0xc a0 0x1000\n", "fields are not"),
        (" CPU 0/KVM-1 [000] 1.0: kvm_hypercall: nr 0xc a0 0xzz a1 0x1 a2 0 a3 0\n", "fields"),
    ],
)
def test_ftrace_malformed_line_names_file_and_line(tmp_path, line, reason):
    path = write(tmp_path, "bad.trace", FTRACE + line + FTRACE)
    lineno = FTRACE.count("\n") + 1
    with pytest.raises(TraceError, match=reason) as info:
        traces.import_ftrace(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.path, err.lineno) == (str(path), lineno)
    assert str(err).startswith(f"{path}:{lineno}: ")
    # opt-in skipping counts the line and keeps the rest
    ev, stats = traces.import_ftrace(path, skip_bad=True, touch=False)
    assert stats["bad_lines"] == 1
    assert len(ev) == 8


@pytest.mark.parametrize(
    ("name", "text", "lineno", "reason"),
    [
        ("a.jsonl", '{"op": "PIN", "gfn": 1, "npages": 1}\n{"op": "PIN"\n', 2, "not valid JSON"),
        ("a.jsonl", '{"gmem_trace": 1}\n[1, 2]\n', 2, "expected a JSON object"),
        ("a.jsonl", '{"op": "PIN", "gfn": 1}\n', 1, "missing field"),
        ("a.jsonl", '{"op": "FLY", "gfn": 1, "npages": 1}\n', 1, "unknown op"),
        ("a.jsonl", '{"op": 13, "gfn": 1, "npages": 1}\n', 1, "unknown op"),
        ("a.jsonl", '{"op": "PIN", "gfn": -1, "npages": 1}\n', 1, "does not fit"),
        ("a.jsonl", '{"op": "PIN", "gfn": 1, "npages": 0}\n', 1, "at least 1"),
        ("a.jsonl", '{"op": "PIN", "gfn": 1.5, "npages": 1}\n', 1, "not an integer"),
        ("a.jsonl", '{"gmem_trace": 2}\n', 1, "version"),
        ("a.csv", "op,gfn,npages,value\nPIN,1,1,0\nPIN,1,1\n", 3, "expected 4 fields"),
        ("a.csv", "op,gfn,npages\nPIN,x,1\n", 2, "not an integer"),
        ("a.csv", "gfn,op,npages\n", 1, "header"),
        ("a.csv", "# only a comment\n", 1, "no 'op,gfn,npages,value' header"),
    ],
)
def test_gmem_format_errors(tmp_path, name, text, lineno, reason):
    path = write(tmp_path, name, text)
    with pytest.raises(TraceError, match=reason) as info:
        traces.read_events(path)
    assert info.value.lineno == lineno
    assert str(info.value).startswith(f"{path}:{lineno}: ")


def test_skip_bad_in_gmem_formats(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"op": "PIN", "gfn": 1, "npages": 1}\nnope\n')
    stats = __import__("collections").Counter()
    ev = np.concatenate(list(traces.read_trace(path, skip_bad=True, stats=stats)))
    assert len(ev) == 1
    assert stats["bad_lines"] == 1


def test_missing_file(tmp_path):
    with pytest.raises(TraceError, match="no such file"):
        traces.read_events(tmp_path / "absent.jsonl")


def test_trace_workload(tmp_path):
    path = write(tmp_path, "guest.trace", FTRACE)
    stream = traces.trace_workload(path)
    ev = stream.to_array()
    # the guest's extent (1G-hinted range ends at gfn 0xc0000), rounded up to 2 MiB
    assert stream.pages == 0xC0000
    assert rows(ev[:1]) == [("CONVERT_PRIVATE", 0, 0xC0000)]  # QEMU: RAM starts private
    assert len(ev) == stream.total_events == 1 + 2 * 4
    with pytest.raises(ValueError, match="beyond a guest of 4096 pages"):
        traces.trace_workload(path, pages=4096)
    # gmem formats replay as written, no extra setup
    j = tmp_path / "w.jsonl"
    traces.write_trace(j, make_events("random", 1024, ops=10))
    assert np.array_equal(traces.trace_workload(j).to_array(), traces.read_events(j))
    # through the workload registry
    from gmem.workloads import make_workload

    assert np.array_equal(make_workload(f"trace:{path}", None).to_array(), ev)
