"""gmem as the memory backend of a SimPy discrete-event simulation.

vCPU processes run a guest driver that allocates DMA buffers (``dma_alloc_coherent``:
convert shared, fill, let the device read) and frees them (convert private). They do not
touch gmem themselves: each posts its request to the VMM and waits. A VMM process wakes
every ``batch_ns``, collects the pending requests into one event array, passes it through
a gmem policy and applies it with ``vm.apply(..., details=True)`` — one call per batch,
per-event status and details back, no per-event callbacks. Simulated time advances by the
cost model's ``modelled_ns`` of each batch, so a strategy that converts expensively makes
the vCPUs wait longer.

Run:  python examples/simpy_backend.py --strategy inplace --vcpus 8
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import simpy

from gmem import STRATEGIES, VM_TYPES, policies
from gmem._events import EVENT_DTYPE, Op
from gmem.guest import build_vm, make_host


def _request(ops, gfn: int, npages: int, value: int) -> np.ndarray:
    ev = np.zeros(len(ops), EVENT_DTYPE)
    ev["op"] = ops
    ev["gfn"] = gfn
    ev["npages"] = npages
    ev["value"] = value
    return ev


class Vmm:
    """Collects requests from vCPUs and applies them to the VM in batches."""

    def __init__(self, env: simpy.Environment, guest, policy: policies.Policy, batch_ns: int):
        self.env = env
        self.vm = guest.vm
        self.policy = policy
        self.batch_ns = batch_ns
        self.pending: list[tuple[np.ndarray, simpy.Event]] = []
        self.batches = 0
        self.failed = 0
        policy.configure(self.vm)
        env.process(self.loop())

    def submit(self, events: np.ndarray) -> simpy.Event:
        done = self.env.event()
        self.pending.append((events, done))
        return done

    def loop(self):
        while True:
            yield self.env.timeout(self.batch_ns)
            if not self.pending:
                continue
            requests, self.pending = self.pending, []
            batch = self.policy.transform(np.concatenate([ev for ev, _ in requests]))
            before = self.vm.stats()["modelled_ns"]
            status, details = self.vm.apply(batch, details=True)
            follow = self.policy.after_batch(self.vm, batch, status, 0)
            if follow is not None and len(follow):
                self.vm.apply(follow)
            self.failed += int((status != 0).sum())
            self.batches += 1
            # the VMM is busy for the modelled cost of the batch
            yield self.env.timeout(max(1, self.vm.stats()["modelled_ns"] - before))
            for _, done in requests:
                done.succeed()
            del details


def vcpu(env, vmm: Vmm, rng: np.random.Generator, base: int, window: int, think_ns: int, log):
    """A guest driver: allocate a coherent buffer, use it, free it, forever."""
    sizes = np.array([1, 2, 4, 8, 16])
    while True:
        yield env.timeout(int(rng.exponential(think_ns)) + 1)
        npages = int(rng.choice(sizes, p=[0.4, 0.25, 0.15, 0.12, 0.08]))
        gfn = base + int(rng.integers(0, window // npages)) * npages
        start = env.now
        value = int(rng.integers(1, 1 << 62))
        yield vmm.submit(
            _request([Op.CONVERT_SHARED, Op.GUEST_WRITE_SHARED, Op.HOST_READ], gfn, npages, value)
        )
        yield vmm.submit(_request([Op.CONVERT_PRIVATE, Op.GUEST_WRITE_PRIVATE], gfn, npages, value))
        log.append(env.now - start)


def run_simulation(
    *,
    strategy: str = "dual",
    vm_type: str = "sw_protected",
    pages: int = 1 << 16,
    vcpus: int = 4,
    until_ns: int = 50_000_000,
    batch_ns: int = 20_000,
    think_ns: int = 50_000,
    seed: int = 0,
) -> dict:
    """Simulate ``until_ns`` nanoseconds; return a summary dict."""
    env = simpy.Environment()
    host = make_host(pages)
    guest = build_vm(host, pages, vm_type, strategy)
    guest.vm.apply(_request([Op.CONVERT_PRIVATE], 0, pages, 0))  # QEMU: RAM starts private
    vmm = Vmm(env, guest, policies.make_policy(), batch_ns)
    rng = np.random.default_rng(seed)
    window = pages // vcpus // 16 * 16
    latencies: list[int] = []
    for i in range(vcpus):
        child = np.random.default_rng(rng.integers(1 << 63))
        env.process(vcpu(env, vmm, child, i * window, window, think_ns, latencies))
    env.run(until=until_ns)
    stats = guest.vm.stats()
    return {
        "strategy": strategy,
        "simulated_ns": until_ns,
        "dma_buffers": len(latencies),
        "mean_latency_ns": float(np.mean(latencies)) if latencies else 0.0,
        "batches": vmm.batches,
        "failed_events": vmm.failed,
        "peak_pages_allocated": stats["peak_pages_allocated"],
        "double_backed_pages": stats["double_backed_pages"],
        "modelled_ns": stats["modelled_ns"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategy", choices=STRATEGIES, default="dual")
    p.add_argument("--vm-type", choices=VM_TYPES, default="sw_protected")
    p.add_argument("--pages", type=int, default=1 << 16)
    p.add_argument("--vcpus", type=int, default=4)
    p.add_argument("--until-ns", type=int, default=50_000_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    result = run_simulation(
        strategy=args.strategy,
        vm_type=args.vm_type,
        pages=args.pages,
        vcpus=args.vcpus,
        until_ns=args.until_ns,
        seed=args.seed,
    )
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
