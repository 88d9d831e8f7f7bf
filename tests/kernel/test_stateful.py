"""Random API call sequences on gmem and on the reference model, in lock step.

Every rule makes the same call, valid or not, on the real core and on
:mod:`refmodel`; the two must agree on the result (value, errno, memory-fault gpa and
flags), and after every step on the VM's attributes and its memory accounting.
``vm.check()`` runs after every step.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import gmem
import refmodel
from util import PAGE, outcome

HOST_MEM = 16 << 20
GFNS = 64  # the guest physical space the machine plays in (a few more are probed)
MAP_PAGES = 48  # each anonymous mapping
FILE_PAGES = 48  # each guest_memfd
MAX_SLOT_PAGES = 16
SLOT_IDS = [0, 1, 2, 3]
COMPARED = ("pages_allocated", "double_backed_pages", "allocations", "frees")

GM = gmem.KVM_MEM_GUEST_MEMFD
LOG = gmem.KVM_MEM_LOG_DIRTY_PAGES
RO = gmem.KVM_MEM_READONLY
PRIV = gmem.KVM_MEMORY_ATTRIBUTE_PRIVATE
KEEP = gmem.FALLOC_FL_KEEP_SIZE
PUNCH = gmem.FALLOC_FL_PUNCH_HOLE

CREATE_FLAGS = [GM, GM, GM, GM, 0, 0, LOG, GM | LOG, GM | RO, 1 << 3, 1 << 31]
TARGETS = [
    "file0",
    "file1",
    "file0",
    "file1",
    "file0_fd",
    "file1_fd",
    "other",
    "other_fd",
    "vm",
    "vm_fd",
    "host",
    "host_fd",
    "bogus_fd",
    "none",
    "old",
]
SKEWS = [None] * 12 + ["gpa", "size", "uaddr", "offset"]


def u64s():
    return st.one_of(st.integers(0, 255), st.integers(0, (1 << 64) - 1))


class GmemMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.host = gmem.Host(HOST_MEM)
        self.mhost = refmodel.Host(HOST_MEM, kvm_fd=self.host.fd)
        self.vm = self.host.create_vm("sw_protected", "dual")
        self.mvm = self.mhost.create_vm("sw_protected", "dual", fd=self.vm.fd)
        self.maps = []
        for _ in range(2):
            m = self.host.mmap_anonymous(MAP_PAGES * PAGE)
            self.maps.append((m, self.mhost.mmap_anonymous(MAP_PAGES * PAGE, addr=m.addr)))
        self.files = []
        for _ in range(2):
            f = self.vm.create_guest_memfd(FILE_PAGES * PAGE)
            mf = self.mvm.create_guest_memfd(FILE_PAGES * PAGE, fd=f.fd, inode=f.inode)
            self.files.append((f, mf))
        self.other_vm = self.host.create_vm("sw_protected", "dual")
        mother_vm = self.mhost.create_vm("sw_protected", "dual", fd=self.other_vm.fd)
        o = self.other_vm.create_guest_memfd(FILE_PAGES * PAGE)
        self.other = (o, mother_vm.create_guest_memfd(FILE_PAGES * PAGE, fd=o.fd, inode=o.inode))
        self.old = None  # the last file closed and replaced (its number reused)
        self.log = []

    # -- helpers
    def same(self, name, real, model, *, returns=False):
        r = outcome(gmem, real)
        m = outcome(refmodel, model)
        if not returns and r[0] == "ok":
            r = ("ok", None)  # only reads return something worth comparing
        self.log.append((name, r))
        assert r == m, f"{name}: gmem {r} != model {m}"
        return r

    def target(self, name):
        f0, f1 = self.files
        return {
            "file0": f0,
            "file1": f1,
            "file0_fd": (f0[0].fd, f0[0].fd),
            "file1_fd": (f1[0].fd, f1[0].fd),
            "other": self.other,
            "other_fd": (self.other[0].fd, self.other[0].fd),
            "vm": (self.vm, self.mvm),
            "vm_fd": (self.vm.fd, self.vm.fd),
            "host": (self.host, self.mhost),
            "host_fd": (self.host.fd, self.host.fd),
            "bogus_fd": (1_000_003, 1_000_003),
            "none": (None, None),
            "old": self.old if self.old is not None else self.other,
        }[name]

    # -- memslots
    @rule(
        slot=st.sampled_from([*SLOT_IDS, *SLOT_IDS, gmem.KVM_USER_MEM_SLOTS, 1 << 16]),
        flags=st.sampled_from(CREATE_FLAGS),
        gfn=st.integers(0, GFNS - 1),
        npages=st.integers(1, MAX_SLOT_PAGES),
        map_idx=st.integers(0, 1),
        map_page=st.integers(0, MAP_PAGES - MAX_SLOT_PAGES),
        gm_target=st.sampled_from(TARGETS),
        off_page=st.integers(0, FILE_PAGES),
        skew=st.sampled_from(SKEWS),
    )
    def set_region(self, slot, flags, gfn, npages, map_idx, map_page, gm_target, off_page, skew):
        gpa = gfn * PAGE + (8 if skew == "gpa" else 0)
        size = npages * PAGE + (100 if skew == "size" else 0)
        uaddr = self.maps[map_idx][0].addr + map_page * PAGE + (8 if skew == "uaddr" else 0)
        offset = off_page * PAGE + (8 if skew == "offset" else 0)
        args = (slot, flags, gpa, size, uaddr)
        if flags & GM:
            rt, mt = self.target(gm_target)
            self.same(
                "set_user_memory_region2",
                lambda: self.vm.set_user_memory_region2(*args, rt, offset),
                lambda: self.mvm.set_user_memory_region2(*args, mt, offset),
            )
        else:
            self.same(
                "set_user_memory_region2",
                lambda: self.vm.set_user_memory_region2(*args),
                lambda: self.mvm.set_user_memory_region2(*args),
            )

    @rule(
        slot=st.sampled_from([*SLOT_IDS, gmem.KVM_USER_MEM_SLOTS]),
        flags=st.sampled_from([0, 0, GM, GM, LOG, GM | LOG]),
    )
    def delete_region(self, slot, flags):
        self.same(
            "delete",
            lambda: self.vm.set_user_memory_region2(slot, flags, 0, 0),
            lambda: self.mvm.set_user_memory_region2(slot, flags, 0, 0),
        )

    @precondition(lambda self: self.mvm.slots)
    @rule(
        data=st.data(),
        gfn=st.integers(0, GFNS - 1),
        flags=st.sampled_from([0, 0, LOG, GM, RO]),
    )
    def modify_region(self, data, gfn, flags):
        """Re-issue an existing slot with a new gpa and/or flags (MOVE / FLAGS_ONLY for
        plain memslots; EINVAL for guest_memfd ones)."""
        s = data.draw(st.sampled_from(sorted(self.mvm.slots)))
        old = self.mvm.slots[s]
        args = (s, flags, gfn * PAGE, old.npages * PAGE, old.userspace_addr)
        self.same(
            "modify",
            lambda: self.vm.set_user_memory_region2(*args),
            lambda: self.mvm.set_user_memory_region2(*args),
        )

    # -- attributes
    @rule(
        gfn=st.integers(0, GFNS + 8),
        npages=st.integers(0, 24),
        attrs=st.sampled_from([0, 0, PRIV, PRIV, PRIV, 1, 1 << 4, PRIV | 1]),
        flags=st.sampled_from([0] * 8 + [1]),
        skew=st.sampled_from([0] * 10 + [1, 2048]),
    )
    def set_attributes(self, gfn, npages, attrs, flags, skew):
        args = (gfn * PAGE + skew, npages * PAGE, attrs, flags)
        self.same(
            "set_memory_attributes",
            lambda: self.vm.set_memory_attributes(*args),
            lambda: self.mvm.set_memory_attributes(*args),
        )

    # -- guest accesses
    @rule(
        gfn=st.integers(0, GFNS + 4),
        private=st.booleans(),
        write=st.booleans(),
        value=u64s(),
        in_page=st.sampled_from([0] * 6 + [8, PAGE - 1]),
    )
    def guest_access(self, gfn, private, write, value, in_page):
        gpa = gfn * PAGE + in_page
        if write:
            self.same(
                "guest_write",
                lambda: self.vm.guest_write(gpa, value, private=private),
                lambda: self.mvm.guest_write(gpa, value, private=private),
            )
        else:
            self.same(
                "guest_read",
                lambda: self.vm.guest_read(gpa, private=private),
                lambda: self.mvm.guest_read(gpa, private=private),
                returns=True,
            )

    # -- guest_memfd
    @rule(
        idx=st.integers(0, 1),
        mode=st.sampled_from([KEEP, KEEP, PUNCH | KEEP, PUNCH | KEEP, PUNCH, 0x10 | KEEP]),
        off_page=st.integers(0, FILE_PAGES + 4),
        npages=st.integers(1, 20),
        skew=st.sampled_from([None] * 10 + ["offset", "length"]),
    )
    def fallocate(self, idx, mode, off_page, npages, skew):
        f, mf = self.files[idx]
        offset = off_page * PAGE + (1 if skew == "offset" else 0)
        length = npages * PAGE + (1 if skew == "length" else 0)
        self.same(
            "fallocate",
            lambda: f.fallocate(mode, offset, length),
            lambda: mf.fallocate(mode, offset, length),
        )

    @precondition(lambda self: sum(not mf.closed for _, mf in self.files) == 2)
    @rule(idx=st.integers(0, 1))
    def close_file(self, idx):
        f, mf = self.files[idx]
        self.same("close", f.close, mf.close)
        assert f.closed

    @rule(idx=st.integers(0, 1))
    def replace_closed_file(self, idx):
        """A new guest_memfd takes the lowest fd number not open: a closed file's."""
        f, mf = self.files[idx]
        if not f.closed:
            return
        open_fds = {self.host.fd, self.vm.fd, self.other_vm.fd, self.other[0].fd}
        open_fds |= {g.fd for g, _ in self.files if not g.closed}
        lowest = min(n for n in range(3, max(open_fds) + 2) if n not in open_fds)
        g = self.vm.create_guest_memfd(FILE_PAGES * PAGE)
        assert g.fd == lowest
        mg = self.mvm.create_guest_memfd(FILE_PAGES * PAGE, fd=g.fd, inode=g.inode)
        self.old = (f, mf)
        self.files[idx] = (g, mg)
        self.log.append(("replace", idx, g.fd))

    # -- the VMM's anonymous memory
    @rule(map_idx=st.integers(0, 1), page=st.integers(0, MAP_PAGES - 1), value=u64s())
    def host_write(self, map_idx, page, value):
        m, mm = self.maps[map_idx]
        self.same(
            "host_write", lambda: m.write(page * PAGE, value), lambda: mm.write(page * PAGE, value)
        )

    @rule(map_idx=st.integers(0, 1), page=st.integers(0, MAP_PAGES))
    def host_read(self, map_idx, page):
        m, mm = self.maps[map_idx]
        self.same(
            "host_read",
            lambda: m.read(page * PAGE),
            lambda: mm.read(page * PAGE),
            returns=True,
        )

    @rule(
        map_idx=st.integers(0, 1),
        page=st.integers(0, MAP_PAGES - 1),
        npages=st.integers(1, MAX_SLOT_PAGES),
    )
    def discard(self, map_idx, page, npages):
        m, mm = self.maps[map_idx]
        args = (page * PAGE, npages * PAGE)
        self.same("discard", lambda: m.discard(*args), lambda: mm.discard(*args))

    @rule(map_idx=st.integers(0, 1), page=st.integers(0, MAP_PAGES), unpin=st.booleans())
    def pin(self, map_idx, page, unpin):
        m, mm = self.maps[map_idx]
        name = "unpin" if unpin else "pin"
        self.same(
            name, lambda: getattr(m, name)(page * PAGE), lambda: getattr(mm, name)(page * PAGE)
        )

    # -- after every step
    @invariant()
    def agree(self):
        self.vm.check()
        self.host.check()
        real, model = self.vm.stats(), self.mvm.stats()
        for key in COMPARED:
            assert real[key] == model[key], f"{key}: gmem {real[key]} != model {model[key]}"
        attrs = [self.vm.get_memory_attributes(g) for g in range(GFNS + 10)]
        assert attrs == [self.mvm.get_memory_attributes(g) for g in range(GFNS + 10)]
        hs = self.host.stats()
        assert hs["pages_allocated"] == self.mhost.stats()["pages_allocated"]
        assert hs["total_pages"] == HOST_MEM // PAGE

    def teardown(self):
        self.host.check()


TestGmemMachine = GmemMachine.TestCase
