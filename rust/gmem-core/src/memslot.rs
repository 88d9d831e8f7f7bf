//! Memslots: a gfn range, its userspace address and its guest_memfd binding(s).

/// A guest_memfd range bound to a memslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Binding {
    /// Host-wide file id.
    pub file: usize,
    /// First file page of the binding.
    pub pgoff: u64,
    /// False once the file was released: the slot keeps existing but has no backing
    /// (mainline `kvm_gmem_release` sets `slot->gmem.file = NULL`).
    pub live: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Memslot {
    /// `as_id << 16 | slot`.
    pub id: u32,
    pub base_gfn: u64,
    pub npages: u64,
    pub flags: u32,
    pub userspace_addr: u64,
    /// The private side (`KVM_MEM_GUEST_MEMFD`).
    pub gmem: Option<Binding>,
    /// The shared side for `two_offsets`.
    pub shared: Option<Binding>,
}

impl Memslot {
    pub fn end_gfn(&self) -> u64 {
        self.base_gfn + self.npages
    }

    pub fn contains(&self, gfn: u64) -> bool {
        gfn >= self.base_gfn && gfn < self.end_gfn()
    }

    /// File page backing `gfn` on the private side.
    pub fn offset_of(&self, gfn: u64) -> Option<(usize, u64, bool)> {
        self.gmem
            .map(|b| (b.file, b.pgoff + (gfn - self.base_gfn), b.live))
    }

    /// File page backing `gfn` on the `two_offsets` shared side.
    pub fn shared_offset_of(&self, gfn: u64) -> Option<(usize, u64, bool)> {
        self.shared
            .map(|b| (b.file, b.pgoff + (gfn - self.base_gfn), b.live))
    }

    /// Host virtual address of `gfn`'s userspace memory.
    pub fn hva_of(&self, gfn: u64) -> u64 {
        self.userspace_addr + ((gfn - self.base_gfn) << crate::PAGE_SHIFT)
    }
}
