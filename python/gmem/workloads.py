"""Seeded, vectorised workloads: streams of `EVENT_DTYPE` batches for `vm.apply`.

A workload is a function ``f(pages, *, seed=0, chunk=DEFAULT_CHUNK, **params)`` that
returns an `EventStream`: an iterable of event arrays of at most ``chunk`` events each,
so that a 1 TiB guest (2^28 pages) never needs one giant array. Iterating a stream twice
yields the same events (the random generator is re-seeded), which is what comparing
strategies on one workload needs. Every array is built by numpy operations over whole
rounds of events; nothing loops in Python per event.

Each workload first sets up, through events only, the state it needs: QEMU makes all
guest_memfd-backed RAM private when it creates the memslots (QEMU commit "kvm/memory:
Make memory type private by default if it has guest memfd backend", v9.0), so most
workloads begin with one ``CONVERT_PRIVATE`` of the whole guest.

The registry `WORKLOADS` maps a name to ``(generator, description)``; ``trace:PATH``
replays a trace file (see `gmem.traces`). Every workload, traces included, also takes
the parameters of `COMMON_PARAMETERS`: ``hwpoison_rate`` injects memory failures
(`inject_memory_failures`). `EventStream`, `chunked` and `events` live in
`gmem.streams` and are re-exported here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from gmem._events import Op
from gmem.constants import PAGE_SHIFT, PAGES_1G, PAGES_2M
from gmem.streams import DEFAULT_CHUNK, EventStream, chunked, events

__all__ = [
    "COMMON_PARAMETERS",
    "DEFAULT_CHUNK",
    "DEFAULT_VM_TYPE",
    "DEFAULT_VM_WORKLOADS",
    "WORKLOADS",
    "EventStream",
    "WorkloadSpec",
    "boot",
    "chunked",
    "dma_churn",
    "events",
    "get_workload",
    "hugepage_frag",
    "inject_memory_failures",
    "make_events",
    "make_workload",
    "random_ranges",
    "secret_hiding",
    "swiotlb",
    "swiotlb_pages",
    "workload_converts",
    "workload_parameters",
    "workload_vm_type",
]

#: Linux `IO_TLB_DEFAULT_SIZE` (include/linux/swiotlb.h): 64 MiB.
IO_TLB_DEFAULT_PAGES = (64 << 20) >> PAGE_SHIFT
#: Largest swiotlb size a confidential guest picks (`SZ_1G` in the clamp below).
IO_TLB_MAX_CC_PAGES = (1 << 30) >> PAGE_SHIFT
#: Linux `IO_TLB_SEGSIZE` * `IO_TLB_SIZE` = 128 slots of 2 KiB: the largest bounce, 64 pages.
IO_TLB_MAX_SEGMENT_PAGES = (128 * 2048) >> PAGE_SHIFT
#: x86 swiotlb lives in low memory (`memblock_alloc_low`): below 4 GiB.
LOW_MEMORY_PAGES = (4 << 30) >> PAGE_SHIFT


def _rowwise(*columns: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Interleave per-row event arrays: row i gives columns[0][i], columns[1][i], …;
    ``keep`` (rows x columns, bool) drops individual events."""
    table = np.stack(columns, axis=1)
    return table[keep] if keep is not None else table.reshape(-1)


def _check_pages(pages: int) -> int:
    pages = int(pages)
    if pages <= 0:
        raise ValueError(f"pages must be positive, got {pages}")
    return pages


def _blocks(total: int, block: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, block):
        yield start, min(block, total - start)


def swiotlb_pages(pages: int) -> int:
    """Pages of the SWIOTLB bounce-buffer pool Linux gives a confidential guest.

    ``arch/x86/mm/mem_encrypt.c: mem_encrypt_setup_arch()`` (earlier
    ``sev_setup_arch()`` in ``mem_encrypt_amd.c``): ``size = total_mem * 6 / 100;
    size = clamp_val(size, IO_TLB_DEFAULT_SIZE, SZ_1G); swiotlb_adjust_size(size);`` —
    6% of memory, at least 64 MiB, at most 1 GiB. gmem additionally caps it at a
    quarter of the guest so that toy guests smaller than 256 MiB stay usable.
    """
    pages = _check_pages(pages)
    size = min(max(pages * 6 // 100, IO_TLB_DEFAULT_PAGES), IO_TLB_MAX_CC_PAGES)
    return max(1, min(size, pages // 4))


def _swiotlb_base(pages: int, size: int) -> int:
    """Where the pool sits: memblock allocates top-down below 4 GiB, so the pool ends at
    the top of low memory (2 MiB aligned) — or of the guest, if it is smaller."""
    top = min(pages, LOW_MEMORY_PAGES)
    base = ((top - size) // PAGES_2M) * PAGES_2M
    return max(0, base)


def boot(
    pages: int,
    *,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
    touch: float = 1.0,
    unit: int = PAGES_2M,
    read_fraction: float = 0.1,
    swiotlb_size: int | None = None,
    psc: bool = False,
) -> EventStream:
    """Boot of a confidential guest with lazily accepted memory, then SWIOTLB setup.

    Imitates: QEMU making all guest_memfd RAM private at start (one ``CONVERT_PRIVATE``
    of the whole guest); the guest accepting memory lazily on first touch, in units of
    2 MiB (``drivers/firmware/efi/unaccepted_memory.c``: the unaccepted bitmap has one bit
    per ``unit_size`` = ``PMD_SIZE``; ``accept_memory()`` accepts whole units), in address
    order — ``touch`` is the fraction of memory touched, ``read_fraction`` the units
    whose first touch is a read; then ``swiotlb_update_mem_attributes()`` calling
    ``set_memory_decrypted()`` on the whole SWIOTLB pool, which the guest sends as a
    ``KVM_HC_MAP_GPA_RANGE`` (shared) and the VMM turns into one ``CONVERT_SHARED``.
    The pool size follows `swiotlb_pages` unless ``swiotlb_size`` (pages) is given.
    With ``psc`` each unit is first requested private by a page state change, as an SNP
    guest accepts memory (``snp_accept_memory()`` → ``set_pages_state(...,
    SNP_PAGE_STATE_PRIVATE)``, a PSC the VMM turns into a conversion, a no-op here since
    the memory is private already): a ``CONVERT_PRIVATE`` of the unit before its touch.
    The page allocator accepts ``MAX_PAGE_ORDER`` blocks (4 MiB on x86): ``unit=1024``.
    """
    pages = _check_pages(pages)
    if not 0.0 <= touch <= 1.0:
        raise ValueError(f"touch must be in [0, 1], got {touch}")
    if unit <= 0:
        raise ValueError(f"unit must be positive, got {unit}")
    pool = swiotlb_pages(pages) if swiotlb_size is None else int(swiotlb_size)
    if not 0 < pool <= pages:
        raise ValueError(f"swiotlb_size must be in [1, {pages}], got {pool}")
    pool_base = _swiotlb_base(pages, pool)
    touched = int(pages * touch)
    units = -(-touched // unit)

    def gen() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        yield events(Op.CONVERT_PRIVATE, 0, pages)
        for start, n in _blocks(units, DEFAULT_CHUNK):
            gfn = (np.arange(start, start + n, dtype=np.uint64)) * np.uint64(unit)
            npg = np.minimum(np.uint64(unit), np.uint64(touched) - gfn)
            is_read = rng.random(n) < read_fraction
            op = np.where(is_read, Op.GUEST_READ_PRIVATE, Op.GUEST_WRITE_PRIVATE)
            touch_events = events(op, gfn, npg, gfn + np.uint64(1))
            if psc:
                yield _rowwise(events(Op.CONVERT_PRIVATE, gfn, npg), touch_events)
            else:
                yield touch_events
        yield events(Op.CONVERT_SHARED, pool_base, pool)

    total = units * (2 if psc else 1) + 2
    return EventStream(gen, name="boot", pages=pages, chunk=chunk, total_events=total)


def swiotlb(
    pages: int,
    *,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
    ios: int = 250_000,
    tx_fraction: float = 0.5,
    swiotlb_size: int | None = None,
) -> EventStream:
    """Steady bounce-buffer I/O through a fixed shared SWIOTLB pool.

    Imitates ``kernel/dma/swiotlb.c`` in a confidential guest, where every streaming DMA
    of a device without private-memory access is bounced: ``swiotlb_tbl_map_single()``
    picks free slots, searching from the pool's moving index and wrapping around
    (``swiotlb_search_pool_area()``), copies the private buffer into them for a transfer
    to the device, and copies back from them for a transfer from it. Sizes are at most
    ``IO_TLB_SEGSIZE`` x ``IO_TLB_SIZE`` = 256 KiB (64 pages), mostly one page (network
    packets). Per I/O, ``tx_fraction`` of the time: guest reads the private source, writes
    the shared slots, the host (device model) reads them; otherwise: host writes the
    slots, guest reads them and writes its private destination. Setup: the whole guest
    private, then the pool (`swiotlb_pages`) shared. No conversion happens after setup:
    this workload measures the steady cost of the shared region and of private touch.
    """
    pages = _check_pages(pages)
    pool = swiotlb_pages(pages) if swiotlb_size is None else int(swiotlb_size)
    if not 0 < pool < pages:
        raise ValueError(f"swiotlb_size must be in [1, {pages - 1}], got {pool}")
    if ios < 0:
        raise ValueError(f"ios must be non-negative, got {ios}")
    base = _swiotlb_base(pages, pool)
    sizes = np.array([1, 2, 4, 8, 16, 32, 64], dtype=np.uint64)
    probs = np.array([0.5, 0.15, 0.1, 0.1, 0.07, 0.05, 0.03])
    sizes = np.minimum(sizes, np.uint64(min(pool, IO_TLB_MAX_SEGMENT_PAGES)))
    private_pages = pages - pool
    block = max(1, DEFAULT_CHUNK // 4)

    def gen() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        yield events([Op.CONVERT_PRIVATE, Op.CONVERT_SHARED], [0, base], [pages, pool])
        cursor = np.uint64(0)
        for start, n in _blocks(ios, block):
            npg = rng.choice(sizes, size=n, p=probs)
            ends = np.cumsum(npg) + cursor
            slot = (ends - npg) % np.uint64(pool)
            wrap = slot + npg > np.uint64(pool)
            slot[wrap] = 0
            cursor = ends[-1] % np.uint64(pool)
            slot += np.uint64(base)
            # a private buffer outside the pool, anywhere in guest memory
            buf = rng.integers(0, private_pages - npg + 1, dtype=np.uint64)
            buf = np.where(buf + npg > np.uint64(base), buf + np.uint64(pool), buf)
            tx = rng.random(n) < tx_fraction
            value = np.arange(start, start + n, dtype=np.uint64) + np.uint64(1)
            zero = np.zeros(n, np.uint64)
            first = events(np.where(tx, Op.GUEST_READ_PRIVATE, Op.HOST_WRITE), 0, npg, value)
            first["gfn"] = np.where(tx, buf, slot)
            second = events(np.where(tx, Op.GUEST_WRITE_SHARED, Op.GUEST_READ_SHARED), slot, npg)
            second["value"] = np.where(tx, value, zero)
            third = events(np.where(tx, Op.HOST_READ, Op.GUEST_WRITE_PRIVATE), slot, npg)
            third["gfn"] = np.where(tx, slot, buf)
            third["value"] = np.where(tx, zero, value)
            yield _rowwise(first, second, third)

    return EventStream(gen, name="swiotlb", pages=pages, chunk=chunk, total_events=2 + 3 * ios)


def dma_churn(
    pages: int,
    *,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
    rounds: int | None = None,
    channels: int = 64,
    window: int = 2048,
    reuse: float = 0.75,
    touch_private: float = 0.5,
    pin: float = 0.02,
) -> EventStream:
    """Coherent DMA buffers of 1-16 pages converted back and forth, with locality.

    Imitates ``dma_direct_alloc()``/``dma_direct_free()`` (``kernel/dma/direct.c``) in a
    confidential guest: a coherent buffer is ``1 << get_order(size)`` pages, aligned to its
    size by the buddy allocator, and is made shared with ``set_memory_decrypted()`` on
    allocation and private again with ``set_memory_encrypted()`` on free — each a
    ``KVM_HC_MAP_GPA_RANGE`` the VMM turns into a conversion. virtio drivers allocate and
    free such buffers continually (rings, control buffers, bounce pages). ``channels``
    independent users (queues/devices) each own a ``window`` of memory (2 MiB aligned,
    touched private at setup, so that huge mappings exist to be broken); per round each
    channel frees its previous buffer and allocates a new one of 1, 2, 4, 8 or 16 pages
    (probabilities .40/.25/.15/.12/.08), at the previous place with probability
    ``reuse`` (the per-CPU page lists hand back the page just freed) or at a random
    size-aligned place in its window; the guest writes the buffer and the device (host)
    reads it; with probability ``touch_private`` the guest reuses the freed pages as
    ordinary private memory. With probability ``pin`` the host pins the buffer for the
    device (``PIN``, as vhost zero-copy or VFIO take page references with GUP) and the
    device completes late: the pin is dropped only after the guest has freed the buffer,
    so that conversion meets a referenced page (``inplace`` refuses it with ``EAGAIN``,
    ``attr_hook`` lets it through — a violation). Channels interleave in a random order
    each round. At the end every outstanding buffer is freed (and unpinned). ``rounds``
    defaults to about a million events.
    """
    pages = _check_pages(pages)
    window = int(min(window, pages)) // 16 * 16
    if window < 16:
        raise ValueError(f"window must be at least 16 pages, got {window}")
    nwindows = pages // window
    channels = int(min(channels, nwindows))
    if channels <= 0:
        raise ValueError("channels must be positive")
    if rounds is None:
        rounds = max(1, 1_000_000 // (channels * 5))
    sizes = np.array([1, 2, 4, 8, 16], dtype=np.uint64)
    probs = np.array([0.40, 0.25, 0.15, 0.12, 0.08])
    block = max(1, DEFAULT_CHUNK // (channels * 5))
    if not 0.0 <= pin <= 1.0:
        raise ValueError(f"pin must be in [0, 1], got {pin}")
    # estimate: the private touches are drawn at random
    total = 2 + int(rounds * channels * (4 + touch_private + 2 * pin))

    def gen() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        win_idx = np.sort(rng.choice(nwindows, size=channels, replace=False))
        win_base = (win_idx * window).astype(np.uint64)
        yield events(Op.CONVERT_PRIVATE, 0, pages)
        yield events(Op.GUEST_WRITE_PRIVATE, win_base, window, win_base + np.uint64(1))
        prev_gfn = np.zeros(channels, np.uint64)
        prev_npg = np.zeros(channels, np.uint64)
        prev_pin = np.zeros(channels, bool)
        last_new = win_base.copy()  # offset source for "reuse"
        first_round = True
        for start, n in _blocks(rounds, block):
            npg = rng.choice(sizes, size=(n, channels), p=probs)
            fresh = win_base + rng.integers(0, window, size=(n, channels), dtype=np.uint64)
            is_new = rng.random((n, channels)) >= reuse
            if first_round:
                is_new[0] = True
            # forward-fill the place each allocation starts from: the last fresh draw
            src = np.where(is_new, np.arange(n)[:, None], -1)
            src = np.maximum.accumulate(src, axis=0)
            place = np.where(src >= 0, fresh[np.maximum(src, 0), np.arange(channels)], last_new)
            last_new = place[-1].copy()
            gfn = (place // npg) * npg  # buddy alignment to the buffer's own size
            old_gfn = np.vstack([prev_gfn, gfn[:-1]])
            old_npg = np.vstack([prev_npg, npg[:-1]])
            pinned = rng.random((n, channels)) < pin
            old_pinned = np.vstack([prev_pin, pinned[:-1]])
            prev_gfn, prev_npg, prev_pin = gfn[-1].copy(), npg[-1].copy(), pinned[-1].copy()
            value = np.arange(start * channels, (start + n) * channels, dtype=np.uint64).reshape(
                n, channels
            ) + np.uint64(1)
            order = np.argsort(rng.random((n, channels)), axis=1)
            take = np.take_along_axis
            gfn, npg, old_gfn, old_npg, value, pinned, old_pinned = (
                take(a, order, axis=1)
                for a in (gfn, npg, old_gfn, old_npg, value, pinned, old_pinned)
            )
            touch = rng.random((n, channels)) < touch_private
            has_old = old_npg > 0
            cols = (
                events(Op.CONVERT_PRIVATE, old_gfn, old_npg),
                events(Op.UNPIN, old_gfn, old_npg),
                events(Op.GUEST_WRITE_PRIVATE, old_gfn, old_npg, value),
                events(Op.CONVERT_SHARED, gfn, npg),
                events(Op.GUEST_WRITE_SHARED, gfn, npg, value),
                events(Op.PIN, gfn, npg),
                events(Op.HOST_READ, gfn, npg),
            )
            always = np.ones(n * channels, bool)
            keep = np.stack(
                [
                    has_old.ravel(),
                    (has_old & old_pinned).ravel(),
                    (has_old & touch).ravel(),
                    always,
                    always,
                    pinned.ravel(),
                    always,
                ],
                axis=1,
            )
            yield _rowwise(*cols, keep=keep)
            first_round = False
        yield events(Op.CONVERT_PRIVATE, prev_gfn, prev_npg)
        yield events(Op.UNPIN, prev_gfn[prev_pin], prev_npg[prev_pin])

    return EventStream(gen, name="dma-churn", pages=pages, chunk=chunk, total_events=total)


_GRANULES = {"2m": PAGES_2M, "1g": PAGES_1G}


def hugepage_frag(
    pages: int,
    *,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
    granule: str = "2m",
    fraction: float = 0.5,
    per_granule: int = 8,
    recover: bool = True,
) -> EventStream:
    """Scattered 4 KiB conversions across huge ranges, then recovery.

    Imitates what the in-place/HugeTLB guest_memfd series and the TDX huge-page RFC
    discuss: a guest converting single 4 KiB pages (a virtio descriptor, a GHCB page, a
    ``set_memory_decrypted()`` of one page) inside ranges backed by 2 MiB or 1 GiB folios
    forces the host to split the folio and the stage-2 mapping (the kernel's "mixed"
    huge-page rule, ``hugepage_has_attrs()``); converting every page back lets a merge
    (at once, or by a later pass) restore the huge page. ``fraction`` of the
    ``granule``-sized ranges (``"2m"`` or ``"1g"``) are touched private at setup; each gets
    ``per_granule`` random 4 KiB pages converted shared and written by the guest, in a
    globally shuffled order; with ``recover`` they are converted back private and written
    again, in another shuffled order.
    """
    pages = _check_pages(pages)
    if granule not in _GRANULES:
        raise ValueError(f"granule must be one of {sorted(_GRANULES)}, got {granule!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if per_granule <= 0:
        raise ValueError(f"per_granule must be positive, got {per_granule}")
    gsize = min(_GRANULES[granule], pages)
    ngranules = pages // gsize
    hit = max(1, int(ngranules * fraction))
    total = 1 + hit + hit * per_granule * (4 if recover else 2)

    def gen() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(ngranules, size=hit, replace=False)).astype(np.uint64)
        bases = chosen * np.uint64(gsize)
        yield events(Op.CONVERT_PRIVATE, 0, pages)
        yield events(Op.GUEST_WRITE_PRIVATE, bases, gsize, bases + np.uint64(1))
        offs = rng.integers(0, gsize, size=(hit, per_granule), dtype=np.uint64)
        gfn = (bases[:, None] + offs).ravel()
        value = np.arange(gfn.size, dtype=np.uint64) + np.uint64(1)
        frag = rng.permutation(gfn.size)
        yield _rowwise(
            events(Op.CONVERT_SHARED, gfn[frag], 1),
            events(Op.GUEST_WRITE_SHARED, gfn[frag], 1, value[frag]),
        )
        if recover:
            back = rng.permutation(gfn.size)
            yield _rowwise(
                events(Op.CONVERT_PRIVATE, gfn[back], 1),
                events(Op.GUEST_WRITE_PRIVATE, gfn[back], 1, value[back]),
            )

    return EventStream(gen, name="hugepage-frag", pages=pages, chunk=chunk, total_events=total)


_RANDOM_OPS = np.array(
    [
        Op.CONVERT_PRIVATE,
        Op.CONVERT_SHARED,
        Op.GUEST_WRITE_PRIVATE,
        Op.GUEST_WRITE_SHARED,
        Op.GUEST_READ_PRIVATE,
        Op.GUEST_READ_SHARED,
        Op.HOST_READ,
        Op.HOST_WRITE,
    ],
    dtype=np.uint8,
)
_RANDOM_WEIGHTS = np.array([2, 2, 2, 2, 1, 1, 1, 1], dtype=float) / 12


def random_ranges(
    pages: int,
    *,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
    ops: int = 200_000,
    max_npages: int = 64,
) -> EventStream:
    """Uniform random ranges: a stress test, not an imitation of a real guest.

    After QEMU's initial ``CONVERT_PRIVATE`` of the whole guest, ``ops`` events, each an
    op drawn from conversions (1/3), guest writes (1/3), guest reads and host accesses
    (1/3), over a range of 1…``max_npages`` pages starting at a uniformly random gfn.
    Guest accesses whose private-ness does not match the range exit with a memory fault
    and host accesses to private pages are refused: the policy's fault handling decides
    what follows.
    """
    pages = _check_pages(pages)
    if ops < 0:
        raise ValueError(f"ops must be non-negative, got {ops}")
    max_npages = int(min(max_npages, pages))
    if max_npages <= 0:
        raise ValueError("max_npages must be positive")

    def gen() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        yield events(Op.CONVERT_PRIVATE, 0, pages)
        for start, n in _blocks(ops, DEFAULT_CHUNK):
            op = rng.choice(_RANDOM_OPS, size=n, p=_RANDOM_WEIGHTS)
            npg = rng.integers(1, max_npages + 1, size=n, dtype=np.uint64)
            gfn = rng.integers(0, np.uint64(pages) - npg + np.uint64(1), dtype=np.uint64)
            value = np.arange(start, start + n, dtype=np.uint64) + np.uint64(1)
            yield events(op, gfn, npg, value)

    return EventStream(gen, name="random", pages=pages, chunk=chunk, total_events=ops + 1)


#: Largest virtio buffer of `secret_hiding`, in pages (a 256 KiB descriptor chain).
VIRTIO_MAX_BUFFER_PAGES = 64


def secret_hiding(
    pages: int,
    *,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
    touch: float = 1.0,
    ios: int = 100_000,
    tx_fraction: float = 0.5,
    balloon_every: int = 0,
) -> EventStream:
    """A Firecracker-style guest whose memory is hidden from the host kernel.

    Imitates Firecracker's "secret hiding" mode: a non-confidential VM (``vm_type``
    ``"default"``, ``KVM_X86_DEFAULT_VM``) whose RAM is one guest_memfd created with
    ``GUEST_MEMFD_FLAG_MMAP | INIT_SHARED | NO_DIRECT_MAP`` (the NO_DIRECT_MAP series, v12,
    not merged), mapped by the VMM and passed as the memslot's ``userspace_addr``, so that
    the VMM's devices reach guest memory through that mapping while the host kernel's
    direct map holds none of it. Nothing is private and nothing converts (`gmem.guest`
    builds this layout for a ``"default"`` VM).

    The guest first writes ``touch`` of its memory in address order, in 2 MiB units: each
    first touch is a guest fault that takes the page out of the direct map (one
    direct-map TLB flush per page). Then ``ios`` virtio requests, each a buffer of 1-64
    pages (mostly one: network packets) at a random place in guest memory — a
    non-confidential guest bounces nothing. With probability ``tx_fraction`` a transmit:
    the guest writes the buffer and the device (the VMM) reads it; otherwise a receive:
    the VMM writes and the guest reads. Every ``balloon_every`` requests (0: never) the
    balloon device inflates over a random 2 MiB block (the VMM punches it out of the
    guest_memfd: its pages are freed and return to the direct map) and the guest writes
    it again at once (deflate and reuse: new pages, removed again).
    """
    pages = _check_pages(pages)
    if not 0.0 <= touch <= 1.0:
        raise ValueError(f"touch must be in [0, 1], got {touch}")
    if ios < 0:
        raise ValueError(f"ios must be non-negative, got {ios}")
    if not 0.0 <= tx_fraction <= 1.0:
        raise ValueError(f"tx_fraction must be in [0, 1], got {tx_fraction}")
    if balloon_every < 0:
        raise ValueError(f"balloon_every must be non-negative, got {balloon_every}")
    touched = int(pages * touch)
    units = -(-touched // PAGES_2M)
    sizes = np.minimum(np.array([1, 2, 4, 8, 16, 32, 64], dtype=np.uint64), np.uint64(pages))
    probs = np.array([0.5, 0.15, 0.1, 0.1, 0.07, 0.05, 0.03])
    block = max(1, DEFAULT_CHUNK // 3)
    balloons = ios // balloon_every if balloon_every else 0
    blocks_2m = max(1, pages // PAGES_2M)
    total = units + 2 * ios + 2 * balloons

    def gen() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        for start, n in _blocks(units, DEFAULT_CHUNK):
            gfn = np.arange(start, start + n, dtype=np.uint64) * np.uint64(PAGES_2M)
            npg = np.minimum(np.uint64(PAGES_2M), np.uint64(touched) - gfn)
            yield events(Op.GUEST_WRITE_SHARED, gfn, npg, gfn + np.uint64(1))
        for start, n in _blocks(ios, block):
            npg = rng.choice(sizes, size=n, p=probs)
            gfn = rng.integers(0, np.uint64(pages) - npg + np.uint64(1), dtype=np.uint64)
            tx = rng.random(n) < tx_fraction
            value = np.arange(start, start + n, dtype=np.uint64) + np.uint64(1)
            zero = np.zeros(n, np.uint64)
            first = events(np.where(tx, Op.GUEST_WRITE_SHARED, Op.HOST_WRITE), gfn, npg, value)
            second = events(np.where(tx, Op.HOST_READ, Op.GUEST_READ_SHARED), gfn, npg, zero)
            rows = _rowwise(first, second)
            if balloon_every:
                # the requests after which the balloon inflates and deflates
                index = np.arange(start, start + n) + 1
                hit = index % balloon_every == 0
                base = rng.integers(0, blocks_2m, size=n, dtype=np.uint64) * np.uint64(PAGES_2M)
                span = np.minimum(np.uint64(PAGES_2M), np.uint64(pages) - base)
                punch = events(Op.PUNCH_HOLE, base, span)
                reuse = events(Op.GUEST_WRITE_SHARED, base, span, value)
                keep = np.stack([np.ones(n, bool), np.ones(n, bool), hit, hit], axis=1)
                rows = _rowwise(first, second, punch, reuse, keep=keep)
            yield rows

    return EventStream(gen, name="secret-hiding", pages=pages, chunk=chunk, total_events=total)


class WorkloadSpec(NamedTuple):
    """A registry entry: the generator function and a one-line description."""

    generator: Callable[..., EventStream]
    description: str


WORKLOADS: dict[str, WorkloadSpec] = {
    "boot": WorkloadSpec(
        boot, "lazy accept of all memory in 2 MiB units, then the SWIOTLB pool made shared"
    ),
    "swiotlb": WorkloadSpec(swiotlb, "steady bounce-buffer I/O through a fixed shared pool"),
    "dma-churn": WorkloadSpec(
        dma_churn, "dma_alloc_coherent-style 1-16 page buffers converted back and forth"
    ),
    "hugepage-frag": WorkloadSpec(
        hugepage_frag, "scattered 4 KiB conversions inside 2 MiB / 1 GiB ranges, then recovery"
    ),
    "random": WorkloadSpec(random_ranges, "uniform random ranges of random ops (stress test)"),
}

#: Workloads of a VM without private memory (``vm_type`` ``"default"``): they convert
#: nothing. Those of `WORKLOADS` (and traces) convert, and need a confidential VM type.
DEFAULT_VM_WORKLOADS: dict[str, WorkloadSpec] = {
    "secret-hiding": WorkloadSpec(
        secret_hiding,
        "Firecracker-style default VM in a NO_DIRECT_MAP guest_memfd, virtio I/O (no conversions)",
    ),
}

#: The VM type of a `DEFAULT_VM_WORKLOADS` run.
DEFAULT_VM_TYPE = "default"


def workload_converts(name: str) -> bool:
    """Whether workload ``name`` converts memory (it then needs a VM with private memory):
    every workload but those of `DEFAULT_VM_WORKLOADS`; a trace replays conversions."""
    return name not in DEFAULT_VM_WORKLOADS


def workload_vm_type(name: str) -> str:
    """The VM type a run of workload ``name`` uses when none is given: ``"default"`` for
    `DEFAULT_VM_WORKLOADS`, else ``"sw_protected"``."""
    return DEFAULT_VM_TYPE if name in DEFAULT_VM_WORKLOADS else "sw_protected"


def _trace_spec(path: str) -> WorkloadSpec:
    from gmem import traces

    def gen(pages: int | None = None, **params) -> EventStream:
        return traces.trace_workload(path, pages=pages, **params)

    return WorkloadSpec(gen, f"replay of the trace {path}")


def get_workload(name: str) -> WorkloadSpec:
    """Look a workload up by name; ``trace:PATH`` replays a trace file."""
    if name.startswith("trace:"):
        path = name[len("trace:") :]
        if not path:
            raise ValueError("trace: needs a path, as in trace:guest.jsonl")
        return _trace_spec(path)
    spec = WORKLOADS.get(name) or DEFAULT_VM_WORKLOADS.get(name)
    if spec is None:
        known = ", ".join([*WORKLOADS, *DEFAULT_VM_WORKLOADS, "trace:PATH"])
        raise ValueError(f"unknown workload {name!r} (known: {known})")
    return spec


#: Parameters every workload takes (traces too), with their annotations: applied by
#: `make_workload` around the workload's own events.
COMMON_PARAMETERS: dict[str, str] = {"hwpoison_rate": "float"}

#: Seeds the failure generator apart from the workload's own (same ``seed``, other draws).
_HWPOISON_STREAM = 0x48574D46


def inject_memory_failures(stream: EventStream, rate: float, *, seed: int = 0) -> EventStream:
    """``stream`` with memory failures injected: after each event, with probability
    ``rate``, a ``MEMORY_FAILURE`` of one page at a uniformly random gfn of the guest
    (the kernel's ``memory_failure()`` on the guest_memfd page behind the gfn's private
    view — the only page of a same-page design; where no page is, the event fails with
    ``ENOENT``: the failure hit memory that is not the guest's).

    Uncorrectable errors strike physical pages at random, so a design that keeps more
    guest_memfd pages present offers more targets; what a hit costs differs too: on a
    two-sided design (`dual`, `two_offsets`) only the private side of a gfn is lost,
    while in place (one page per gfn) the gfn's content is lost whatever its state (the
    counters ``hwpoisoned_pages``, ``hwpoison_lost_pages``, ``hwpoison_refused``).
    Failures of the VMM's ordinary memory are outside guest_memfd and not injected.
    Re-iterating the result yields the same failures at the same places.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"hwpoison_rate must be in [0, 1], got {rate}")
    if rate == 0.0:
        return stream
    pages = stream.pages

    def gen() -> Iterator[np.ndarray]:
        rng = np.random.default_rng([seed, _HWPOISON_STREAM])
        for batch in stream:
            k = int(rng.binomial(len(batch), rate))
            if not k:
                yield batch
                continue
            after = np.sort(rng.integers(1, len(batch) + 1, size=k))
            gfn = rng.integers(0, pages, size=k, dtype=np.uint64)
            yield np.insert(batch, after, events(Op.MEMORY_FAILURE, gfn, 1))

    total = stream.total_events
    if total is not None:
        total += round(total * rate)
    return EventStream(gen, name=stream.name, pages=pages, chunk=stream.chunk, total_events=total)


def workload_parameters(name: str) -> dict[str, str]:
    """The parameters a workload's own generator takes besides ``pages``, ``seed`` and
    ``chunk``, each with its annotation (``"int | None"``, ``"float"``, …); every
    workload also takes `COMMON_PARAMETERS`."""
    if name.startswith("trace:"):
        get_workload(name)  # the path check
        from gmem.traces import trace_workload as fn
    else:
        fn = get_workload(name).generator
    return {
        k: str(v.annotation)
        for k, v in inspect.signature(fn).parameters.items()
        if v.kind is inspect.Parameter.KEYWORD_ONLY and k not in ("seed", "chunk", "pages")
    }


def make_workload(
    name: str, pages: int | None, *, seed: int = 0, chunk: int = DEFAULT_CHUNK, **params
) -> EventStream:
    """Create the `EventStream` of a workload by name.

    ``pages`` may be ``None`` only for ``trace:PATH``, whose extent then sets the size.
    ``hwpoison_rate`` (see `COMMON_PARAMETERS`) wraps the stream in
    `inject_memory_failures`.
    """
    spec = get_workload(name)
    rate = float(params.pop("hwpoison_rate", 0.0))
    if name.startswith("trace:"):
        stream = spec.generator(pages, chunk=chunk, **params)
    elif pages is None:
        raise ValueError(f"workload {name!r} needs a guest size in pages")
    else:
        stream = spec.generator(pages, seed=seed, chunk=chunk, **params)
    return inject_memory_failures(stream, rate, seed=seed)


def make_events(name: str, pages: int, *, seed: int = 0, **params) -> np.ndarray:
    """All events of a workload in one array (small guests, tests)."""
    return make_workload(name, pages, seed=seed, **params).to_array()
