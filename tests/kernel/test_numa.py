"""NUMA nodes and memory policy: `Host(nodes=)`, `Mapping.mbind` / `get_mempolicy` /
`page_node`, `host.node_stats()`.

Linux 6.19: guest_memfd keeps one shared policy per inode (`vm_ops.set_policy` /
`get_policy`), which places every page allocated later at those offsets, by the guest or
the host; selftests `test_mbind` and `test_numa_allocation` (guest_memfd_test.c).
Anonymous MAP_SHARED memory is shmem: its inode's shared policy, interleaving by offset.
"""

from __future__ import annotations

import errno

import pytest

import gmem
from util import PAGE, raises_errno

MiB = 1 << 20
KEEP = gmem.FALLOC_FL_KEEP_SIZE
PUNCH = gmem.FALLOC_FL_PUNCH_HOLE | gmem.FALLOC_FL_KEEP_SIZE
SHARED_FILE = gmem.GUEST_MEMFD_FLAG_MMAP | gmem.GUEST_MEMFD_FLAG_INIT_SHARED


def gmem_map(memory=64 * MiB, nodes=2, size=4 * MiB):
    """A host of `nodes` nodes, and a shared guest_memfd (in-place design) mapped whole."""
    host = gmem.Host(memory, nodes=nodes)
    vm = host.create_vm("sw_protected", "inplace")
    f = vm.create_guest_memfd(size, SHARED_FILE)
    return host, vm, f, f.mmap()


def touch(m, pages):
    for i in pages:
        m.write(i * PAGE, i + 1)


def nodes_of(m, pages):
    return [m.page_node(i * PAGE) for i in pages]


def consistent(host):
    """node_stats agrees with itself, with host.stats() and with check()."""
    host.check()
    stats = host.node_stats()
    assert [n["node"] for n in stats] == list(range(host.nodes))
    for n in stats:
        assert n["free_pages"] + n["allocated_pages"] == n["total_pages"]
        assert sum(c << o for o, c in enumerate(n["free_blocks"])) == n["free_pages"]
        assert sum(c << o for o, c in enumerate(n["allocated_blocks"])) == n["allocated_pages"]
    whole = host.stats()
    assert sum(n["total_pages"] for n in stats) == whole["total_pages"]
    assert sum(n["free_pages"] for n in stats) == whole["free_pages"]
    return stats


# --------------------------------------------------------------------------- the host


def test_constants():
    assert (
        gmem.MPOL_DEFAULT,
        gmem.MPOL_PREFERRED,
        gmem.MPOL_BIND,
        gmem.MPOL_INTERLEAVE,
        gmem.MPOL_LOCAL,
        gmem.MPOL_PREFERRED_MANY,
        gmem.MPOL_WEIGHTED_INTERLEAVE,
    ) == (0, 1, 2, 3, 4, 5, 6)
    assert gmem.MPOL_NAMES["interleave"] == gmem.MPOL_INTERLEAVE


@pytest.mark.parametrize(
    ("memory", "nodes"),
    [(64 * MiB, 0), (64 * MiB, -1), (64 * MiB, 65), (3 * PAGE, 2), (MiB, 3), (0, 2)],
)
def test_host_nodes_rules(memory, nodes):
    """1..64 nodes, each the same whole number of pages; otherwise EINVAL (ValueError,
    as every bad Host() argument)."""
    with pytest.raises((ValueError, OverflowError)):
        gmem.Host(memory, nodes=nodes)


def test_host_split_evenly():
    host = gmem.Host(3 * 5 * PAGE, nodes=3)
    assert host.nodes == 3
    stats = consistent(host)
    assert [n["total_pages"] for n in stats] == [5, 5, 5]
    # Blocks aligned as physical frames: node 1 is frames 5..10 (5, 6-7, 8-9).
    assert stats[1]["free_blocks"][:3] == [1, 2, 0]
    assert gmem.Host(8 * MiB).nodes == 1
    assert len(gmem.Host(8 * MiB).node_stats()) == 1


def test_one_node_host_places_everything_on_node_0():
    host, _, _, m = gmem_map(nodes=1)
    m.mbind(0, 4 * PAGE, gmem.MPOL_INTERLEAVE, [0])
    touch(m, range(8))
    assert nodes_of(m, range(8)) == [0] * 8
    assert consistent(host)[0]["allocated_pages"] == 8


# --------------------------------------------------------------------------- test_mbind


def test_mbind_get_mempolicy_selftest():
    """`test_mbind`: INTERLEAVE and BIND read back with their nodes; DEFAULT over the
    whole mapping reads back MPOL_DEFAULT and no nodes; an invalid mode is EINVAL."""
    _, _, _, m = gmem_map()
    m.mbind(0, 2 * PAGE, gmem.MPOL_INTERLEAVE, [0])
    assert m.get_mempolicy(0) == (gmem.MPOL_INTERLEAVE, [0])
    m.mbind(2 * PAGE, 2 * PAGE, gmem.MPOL_BIND, [0])
    assert m.get_mempolicy(2 * PAGE) == (gmem.MPOL_BIND, [0])
    m.mbind(0, m.length, gmem.MPOL_DEFAULT)
    assert m.get_mempolicy(0) == (gmem.MPOL_DEFAULT, [])
    with raises_errno(errno.EINVAL):
        m.mbind(0, PAGE, 999, [0])


@pytest.mark.parametrize("mode", [7, 999, 1 << 15])
def test_unknown_mode_is_einval(mode):
    _, _, _, m = gmem_map()
    with raises_errno(errno.EINVAL):
        m.mbind(0, PAGE, mode, [0])


@pytest.mark.parametrize(
    "mode",
    [gmem.MPOL_BIND, gmem.MPOL_INTERLEAVE, gmem.MPOL_PREFERRED_MANY, gmem.MPOL_WEIGHTED_INTERLEAVE],
)
def test_empty_node_set_is_einval(mode):
    _, _, _, m = gmem_map()
    with raises_errno(errno.EINVAL):
        m.mbind(0, PAGE, mode, [])
    assert m.get_mempolicy(0) == (gmem.MPOL_DEFAULT, [])


@pytest.mark.parametrize("nodes", [[2], [5, 7], [64], [-1]])
def test_no_node_of_the_host_is_einval(nodes):
    """No node of the set on the host (or beyond MAX_NUMNODES): EINVAL."""
    _, _, _, m = gmem_map()
    with raises_errno(errno.EINVAL):
        m.mbind(0, PAGE, gmem.MPOL_BIND, nodes)


def test_nodes_the_host_lacks_are_dropped():
    """mpol_set_nodemask() masks the set with the nodes that have memory."""
    _, _, _, m = gmem_map()
    m.mbind(0, PAGE, gmem.MPOL_INTERLEAVE, [1, 0, 9])
    assert m.get_mempolicy(0) == (gmem.MPOL_INTERLEAVE, [0, 1])


def test_mode_node_rules():
    """mpol_new(): DEFAULT and LOCAL take no nodes; PREFERRED with none is LOCAL, and
    keeps only its first node."""
    _, _, _, m = gmem_map()
    with raises_errno(errno.EINVAL):
        m.mbind(0, PAGE, gmem.MPOL_DEFAULT, [0])
    with raises_errno(errno.EINVAL):
        m.mbind(0, PAGE, gmem.MPOL_LOCAL, [0])
    m.mbind(0, PAGE, gmem.MPOL_PREFERRED, [])
    assert m.get_mempolicy(0) == (gmem.MPOL_LOCAL, [])
    m.mbind(0, PAGE, gmem.MPOL_PREFERRED, [1, 0])
    assert m.get_mempolicy(0) == (gmem.MPOL_PREFERRED, [0])
    m.mbind(0, PAGE, gmem.MPOL_PREFERRED_MANY, [1, 0])
    assert m.get_mempolicy(0) == (gmem.MPOL_PREFERRED_MANY, [0, 1])
    m.mbind(0, PAGE, gmem.MPOL_LOCAL)
    assert m.get_mempolicy(0) == (gmem.MPOL_LOCAL, [])


def test_range_rules():
    """Unaligned offset: EINVAL; length rounds up to pages, 0 does nothing; a range past
    the mapping: EFAULT, nothing changed; get_mempolicy/page_node outside: EFAULT."""
    _, _, _, m = gmem_map()
    with raises_errno(errno.EINVAL):
        m.mbind(1, PAGE, gmem.MPOL_BIND, [1])
    m.mbind(PAGE, 1, gmem.MPOL_BIND, [1])
    assert m.get_mempolicy(2 * PAGE - 1) == (gmem.MPOL_BIND, [1])
    assert m.get_mempolicy(2 * PAGE) == (gmem.MPOL_DEFAULT, [])
    m.mbind(0, 0, gmem.MPOL_BIND, [1])
    assert m.get_mempolicy(0) == (gmem.MPOL_DEFAULT, [])
    with raises_errno(errno.EFAULT):
        m.mbind(m.length - PAGE, 2 * PAGE, gmem.MPOL_BIND, [1])
    assert m.get_mempolicy(m.length - PAGE) == (gmem.MPOL_DEFAULT, [])
    for call in (m.get_mempolicy, m.page_node):
        with raises_errno(errno.EFAULT):
            call(m.length)
    m.unmap()
    with raises_errno(errno.EFAULT):
        m.mbind(0, PAGE, gmem.MPOL_BIND, [1])
    with raises_errno(errno.EFAULT):
        m.get_mempolicy(0)


# --------------------------------------------------------------------------- test_numa_allocation


def test_numa_allocation_selftest():
    """`test_numa_allocation`: a policy set after allocation moves nothing; punching and
    re-touching allocates under the policy in force; changing it and doing it again
    follows the new one."""
    host, _, f, m = gmem_map()
    touch(m, [0])
    assert nodes_of(m, [0]) == [0]
    m.mbind(0, PAGE, gmem.MPOL_BIND, [1])
    assert nodes_of(m, [0]) == [0]
    f.fallocate(PUNCH, 0, PAGE)
    with raises_errno(errno.ENOENT):
        m.page_node(0)
    m.mbind(0, 2 * PAGE, gmem.MPOL_BIND, [1])
    m.mbind(2 * PAGE, 2 * PAGE, gmem.MPOL_BIND, [0])
    touch(m, range(4))
    assert nodes_of(m, range(4)) == [1, 1, 0, 0]
    f.fallocate(PUNCH, 0, f.size)
    m.mbind(0, 2 * PAGE, gmem.MPOL_BIND, [0])
    m.mbind(2 * PAGE, 2 * PAGE, gmem.MPOL_BIND, [1])
    touch(m, range(4))
    assert nodes_of(m, range(4)) == [0, 0, 1, 1]
    stats = consistent(host)
    assert [n["allocated_pages"] for n in stats] == [2, 2]


def test_fallocate_follows_the_policy():
    """fallocate allocates with the shared policy too (before and after the mbind, as the
    first selftest version does)."""
    host, _, f, m = gmem_map()
    m.mbind(0, 8 * PAGE, gmem.MPOL_BIND, [1])
    f.fallocate(KEEP, 0, 8 * PAGE)
    assert consistent(host)[1]["allocated_pages"] == 8
    # Not faulted into the host page table: move_pages sees nothing there.
    with raises_errno(errno.ENOENT):
        m.page_node(0)
    m.read(0)
    assert m.page_node(0) == 1


def test_policy_belongs_to_the_inode():
    """Another mapping of the file (at another offset) sees the policy at the same file
    offsets; it outlives the mapping that set it."""
    _, _, f, m = gmem_map()
    m.mbind(4 * PAGE, PAGE, gmem.MPOL_BIND, [1])
    m2 = f.mmap(2 * PAGE, 8 * PAGE)
    assert m2.get_mempolicy(2 * PAGE) == (gmem.MPOL_BIND, [1])
    m.unmap()
    touch(m2, [2])
    assert m2.page_node(2 * PAGE) == 1


def test_guest_faults_follow_the_policy():
    """Pages the guest faults in (private, never host-mapped) are placed by the file's
    policy too; the host page table has none of them (ENOENT), node_stats counts them."""
    host = gmem.Host(64 * MiB, nodes=2)
    vm = host.create_vm("sw_protected", "dual")
    f = vm.create_guest_memfd(4 * MiB, gmem.GUEST_MEMFD_FLAG_MMAP)
    mem = host.mmap_anonymous(4 * MiB)
    vm.set_user_memory_region2(0, gmem.KVM_MEM_GUEST_MEMFD, 0, 4 * MiB, mem.addr, f, 0)
    vm.set_memory_attributes(0, 4 * MiB, gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE)
    m = f.mmap()
    m.mbind(0, 16 * PAGE, gmem.MPOL_BIND, [1])
    for i in range(16):
        vm.guest_write(i * PAGE, i, private=True)
    stats = consistent(host)
    assert stats[1]["allocated_pages"] == 16
    with raises_errno(errno.ENOENT):
        m.page_node(0)


# --------------------------------------------------------------------------- placement


def test_interleave_guest_memfd_follows_allocation_order():
    """6.19 guest_memfd allocates with NO_INTERLEAVE_INDEX: round-robin over the set in
    the order pages are allocated, whatever their offsets."""
    _, _, _, m = gmem_map()
    m.mbind(0, 64 * PAGE, gmem.MPOL_INTERLEAVE, [0, 1])
    order = [9, 3, 4, 60, 0, 1]
    for i in order:
        touch(m, [i])
    assert [m.page_node(i * PAGE) for i in order] == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("mode", [gmem.MPOL_INTERLEAVE, gmem.MPOL_WEIGHTED_INTERLEAVE])
def test_interleave_anonymous_by_offset(mode):
    """shmem interleaves by page offset (interleave index = offset, bias 0): the order
    of the faults does not matter; weights are all 1."""
    host = gmem.Host(64 * MiB, nodes=4)
    a = host.mmap_anonymous(MiB)
    a.mbind(0, MiB, mode, [1, 2, 3])
    order = [7, 2, 0, 5, 1, 3, 6, 4, 8]
    touch(a, order)
    assert nodes_of(a, range(9)) == [1, 2, 3] * 3


def test_interleave_distribution():
    """Interleaving 3 nodes of 4 spreads pages evenly and leaves node 0 alone."""
    host, _, _, m = gmem_map(memory=64 * MiB, nodes=4)
    m.mbind(0, 4 * MiB, gmem.MPOL_INTERLEAVE, [1, 2, 3])
    touch(m, range(300))
    got = [n["allocated_pages"] for n in consistent(host)]
    assert got == [0, 100, 100, 100]


def test_bind_full_is_enomem_though_another_node_has_room():
    host, _, _, m = gmem_map(memory=4 * MiB, nodes=2, size=4 * MiB)  # 512 pages a node
    m.mbind(0, m.length, gmem.MPOL_BIND, [1])
    touch(m, range(512))
    with raises_errno(errno.ENOMEM):
        m.write(512 * PAGE, 1)
    stats = consistent(host)
    assert stats[1]["free_pages"] == 0
    assert stats[0]["free_pages"] == 512


def test_preferred_and_default_fall_back():
    host, _, _, m = gmem_map(memory=4 * MiB, nodes=2, size=4 * MiB)
    m.mbind(0, m.length, gmem.MPOL_PREFERRED, [1])
    touch(m, range(512))
    assert set(nodes_of(m, range(512))) == {1}
    # Node 1 full: PREFERRED falls back to node 0, PREFERRED_MANY too.
    touch(m, [512])
    assert m.page_node(512 * PAGE) == 0
    m.mbind(513 * PAGE, PAGE, gmem.MPOL_PREFERRED_MANY, [1])
    touch(m, [513])
    assert m.page_node(513 * PAGE) == 0
    # Without a policy: the local node (0), falling back to the others.
    a = host.mmap_anonymous(2 * MiB)
    touch(a, range(510))
    with raises_errno(errno.ENOMEM):
        touch(a, [510])
    consistent(host)


def test_anonymous_mbind():
    """mbind on anonymous MAP_SHARED memory (shmem) places its pages; the policy is the
    mapping's own."""
    host = gmem.Host(64 * MiB, nodes=2)
    a, b = host.mmap_anonymous(MiB), host.mmap_anonymous(MiB)
    a.mbind(0, MiB, gmem.MPOL_BIND, [1])
    assert b.get_mempolicy(0) == (gmem.MPOL_DEFAULT, [])
    touch(a, range(4))
    touch(b, range(4))
    assert nodes_of(a, range(4)) == [1] * 4
    assert nodes_of(b, range(4)) == [0] * 4
    with raises_errno(errno.ENOENT):
        a.page_node(5 * PAGE)
    # Discarded and touched again: allocated anew under the policy in force.
    a.mbind(0, MiB, gmem.MPOL_BIND, [0])
    a.discard(0, 4 * PAGE)
    touch(a, range(4))
    assert nodes_of(a, range(4)) == [0] * 4
    consistent(host)


def test_punch_and_retouch_reallocates_under_the_new_policy():
    host, _, f, m = gmem_map()
    m.mbind(0, 32 * PAGE, gmem.MPOL_BIND, [0])
    touch(m, range(32))
    m.mbind(0, 32 * PAGE, gmem.MPOL_BIND, [1])
    assert set(nodes_of(m, range(32))) == {0}
    f.fallocate(PUNCH, 8 * PAGE, 8 * PAGE)
    touch(m, range(32))
    assert nodes_of(m, range(32)) == [0] * 8 + [1] * 8 + [0] * 16
    assert [n["allocated_pages"] for n in consistent(host)] == [24, 8]


def test_snapshot_keeps_nodes_and_policies(tmp_path):
    host, _, _, m = gmem_map()
    m.mbind(0, 8 * PAGE, gmem.MPOL_INTERLEAVE, [0, 1])
    touch(m, range(3))
    host.save(tmp_path / "h.snap")
    back = gmem.load(tmp_path / "h.snap")
    assert back.nodes == 2
    assert back.node_stats() == host.node_stats()
    m2 = back.mappings()[0]
    assert m2.get_mempolicy(0) == (gmem.MPOL_INTERLEAVE, [0, 1])
    # The interleave cursor came along: the next page goes where it would have.
    touch(m, [3])
    touch(m2, [3])
    assert m2.page_node(3 * PAGE) == m.page_node(3 * PAGE)


def test_task_policy():
    """Host.set_mempolicy (set_mempolicy(2) for the VMM): places pages where no mbind
    policy is set; mbind wins where set; get_mempolicy(MPOL_F_ADDR) reports only mbind's;
    errors as mbind's."""
    host, _, _, m = gmem_map()
    assert host.get_mempolicy() == (gmem.MPOL_DEFAULT, [])
    with raises_errno(errno.EINVAL):
        host.set_mempolicy(gmem.MPOL_BIND, [])
    with raises_errno(errno.EINVAL):
        host.set_mempolicy(99, [0])
    host.set_mempolicy(gmem.MPOL_BIND, [1])
    assert host.get_mempolicy() == (gmem.MPOL_BIND, [1])
    m.mbind(0, PAGE, gmem.MPOL_BIND, [0])
    touch(m, range(3))
    assert nodes_of(m, range(3)) == [0, 1, 1]
    assert m.get_mempolicy(PAGE) == (gmem.MPOL_DEFAULT, [])
    host.set_mempolicy(gmem.MPOL_DEFAULT)
    touch(m, [3])
    assert m.page_node(3 * PAGE) == 0
    consistent(host)
