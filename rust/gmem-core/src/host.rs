//! The host: page allocator, frame contents, and every VM, guest_memfd file and mapping.
//!
//! All state of one simulated host lives in one `Host` value; VMs, files and mappings are
//! addressed by index. Callers that share a host between threads wrap it in one lock.

use std::collections::{BTreeMap, BTreeSet};

use crate::alloc::MAX_PAGES;
use crate::cost::CostModel;
use crate::error::{Result, einval};
use crate::frames::HostFrames;
use crate::guest_memfd::Gmem;
use crate::mapping::{AddressSpace, MapKind, Mapping};
use crate::metrics::Stats;
use crate::numa::MAX_NUMNODES;
use crate::platform::VmType;
use crate::strategy::StrategyKind;
use crate::vm::Vm;
use crate::{PAGE_SHIFT, PAGE_SIZE, uapi};

/// Where the content of a frame lives: the host's frame store, or the page of a
/// guest_memfd whose page cache holds the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loc {
    Frame(u32),
    File(usize, u64),
}

/// Writer tag of a page last written by the host (the VMM).
pub const HOST_WRITER: u16 = u16::MAX;

/// What an fd number refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Fd {
    Kvm,
    Vm(usize),
    Gmem(usize),
}

/// The guest_memfd argument of `KVM_SET_USER_MEMORY_REGION2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GmemArg {
    None,
    Fd(i64),
    /// A file object of another `Host`: to the kernel, a guest_memfd of another VM.
    Foreign,
}

/// `struct kvm_userspace_memory_region2`, plus the `two_offsets` shared range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    pub slot: u32,
    pub flags: u32,
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
    pub guest_memfd: GmemArg,
    pub guest_memfd_offset: u64,
    pub shared_guest_memfd: GmemArg,
    pub shared_offset: Option<u64>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Host {
    /// Physical memory: allocator, frame contents, stale-data tags, RMP.
    pub(crate) frames: HostFrames,
    pub(crate) costs: CostModel,
    pub(crate) vms: Vec<Vm>,
    pub(crate) files: Vec<Gmem>,
    /// The VMM's mappings and the addresses they take.
    pub(crate) space: AddressSpace,
    pub(crate) fds: BTreeMap<i32, Fd>,
    /// Every number below `next_fd` is open (in `fds`) or free (here): a new fd is the
    /// lowest free number, as `get_unused_fd_flags()` gives.
    pub(crate) free_fds: BTreeSet<i32>,
    pub(crate) next_fd: i32,
    pub(crate) next_inode: u64,
    /// The last memory-fault exit the VMM answered by converting (fault policy
    /// `Convert`): `(gpa, flags)`, reported in event details.
    #[serde(skip)]
    pub(crate) implicit: Option<(u64, u64)>,
    /// Check every invariant after each operation (`GMEM_STRICT=1`).
    pub strict: bool,
}

impl Host {
    /// A host with `memory` bytes of RAM on one NUMA node.
    pub fn new(memory: u64) -> Result<Self> {
        Self::with_nodes(memory, 1)
    }

    /// A host with `memory` bytes of RAM split evenly over `nodes` NUMA nodes, node `k`
    /// holding frames `k * memory / nodes ..` (each its own buddy allocator). `nodes`
    /// must be `1..=MAX_NUMNODES` (64) and `memory` a positive multiple of `nodes` pages,
    /// so each node holds the same whole number of pages; otherwise `EINVAL`.
    pub fn with_nodes(memory: u64, nodes: u32) -> Result<Self> {
        if nodes == 0 || nodes > MAX_NUMNODES {
            return Err(einval(format!(
                "{nodes} NUMA nodes: a host has 1 to {MAX_NUMNODES}"
            )));
        }
        if memory == 0 || !memory.is_multiple_of(PAGE_SIZE) {
            return Err(einval(format!(
                "host memory {memory:#x} must be a positive multiple of the page size"
            )));
        }
        if !(memory >> PAGE_SHIFT).is_multiple_of(u64::from(nodes)) {
            return Err(einval(format!(
                "host memory {memory:#x} does not split into {nodes} nodes of whole pages"
            )));
        }
        let pages = memory >> PAGE_SHIFT;
        if pages > MAX_PAGES {
            return Err(einval(format!(
                "host memory {memory:#x} exceeds {MAX_PAGES} pages"
            )));
        }
        let mut h = Self {
            frames: HostFrames::new(pages, nodes),
            costs: CostModel::default(),
            vms: Vec::new(),
            files: Vec::new(),
            space: AddressSpace::new(),
            fds: BTreeMap::new(),
            free_fds: BTreeSet::new(),
            next_fd: 3,
            next_inode: 1,
            implicit: None,
            strict: false,
        };
        h.new_fd(Fd::Kvm);
        Ok(h)
    }

    pub fn kvm_fd(&self) -> i32 {
        3
    }

    /// The lowest fd number not open (POSIX `open(2)`; the kernel's
    /// `get_unused_fd_flags()`), numbers 0-2 being the VMM's standard streams.
    pub(crate) fn new_fd(&mut self, f: Fd) -> i32 {
        let fd = self.free_fds.pop_first().unwrap_or_else(|| {
            self.next_fd += 1;
            self.next_fd - 1
        });
        self.fds.insert(fd, f);
        fd
    }

    pub fn total_pages(&self) -> u64 {
        self.frames.total_pages()
    }

    pub fn free_pages(&self) -> u64 {
        self.frames.free_pages()
    }

    pub fn costs(&self) -> &CostModel {
        &self.costs
    }

    pub fn costs_mut(&mut self) -> &mut CostModel {
        &mut self.costs
    }

    pub fn nr_vms(&self) -> usize {
        self.vms.len()
    }

    pub fn nr_files(&self) -> usize {
        self.files.len()
    }

    pub fn nr_mappings(&self) -> usize {
        self.space.maps.len()
    }

    pub fn vm(&self, id: usize) -> &Vm {
        &self.vms[id]
    }

    pub fn vm_mut(&mut self, id: usize) -> &mut Vm {
        &mut self.vms[id]
    }

    pub fn file(&self, id: usize) -> &Gmem {
        &self.files[id]
    }

    pub fn mapping(&self, id: usize) -> &Mapping {
        &self.space.maps[id]
    }

    /// Heap bytes held by the model's per-page structures (for footprint benchmarks).
    pub fn heap_bytes(&self) -> usize {
        let mut b = self.frames.heap_bytes();
        for f in &self.files {
            b += f.pages.heap_bytes() + f.content.heap_bytes() + f.folios.len() * 48;
        }
        for m in &self.space.maps {
            if let MapKind::Anon { pages, .. } = &m.kind {
                b += pages.heap_bytes();
            }
        }
        b
    }

    // ---------------------------------------------------------------- VMs

    pub fn create_vm(&mut self, vm_type: VmType, strategy: StrategyKind) -> usize {
        let id = self.vms.len();
        let fd = self.new_fd(Fd::Vm(id));
        self.vms.push(Vm::new(fd, vm_type, strategy));
        id
    }

    /// guest_memfd creation flags this VM accepts (`KVM_CAP_GUEST_MEMFD_FLAGS`,
    /// `kvm_gmem_get_supported_flags()`): the strategy's (`Strategy::GMEM_FLAGS`); on a VM
    /// without private memory `MMAP | INIT_SHARED` whatever the strategy (mainline 6.18:
    /// `kvm_arch_supports_gmem_init_shared()` is `!kvm_arch_has_private_mem()` on x86);
    /// plus `NO_DIRECT_MAP` where the platform supports it (series v12).
    pub fn supported_gmem_flags(&self, vm: usize) -> u64 {
        let v = &self.vms[vm];
        let mut flags = if v.vm_type.has_private_mem() {
            v.strategy.gmem_flags()
        } else {
            uapi::GUEST_MEMFD_FLAG_MMAP | uapi::GUEST_MEMFD_FLAG_INIT_SHARED
        };
        if v.vm_type.supports_no_direct_map() {
            flags |= uapi::GUEST_MEMFD_FLAG_NO_DIRECT_MAP;
        }
        flags
    }

    /// `KVM_CHECK_EXTENSION` on the VM fd.
    pub fn check_extension(&self, vm: usize, cap: u64) -> u64 {
        let v = &self.vms[vm];
        match cap {
            // Memory-fault exits fill `kvm_run.memory_fault` (x86 and arm64 report 1).
            uapi::KVM_CAP_USER_MEMORY2
            | uapi::KVM_CAP_GUEST_MEMFD
            | uapi::KVM_CAP_MEMORY_FAULT_INFO => 1,
            // `kvm_supported_mem_attributes()`: nothing without private memory.
            uapi::KVM_CAP_MEMORY_ATTRIBUTES if v.vm_type.has_private_mem() => {
                v.strategy.vm_attributes()
            }
            uapi::KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES if v.vm_type.has_private_mem() => {
                v.strategy.gmem_attributes()
            }
            uapi::KVM_CAP_GUEST_MEMFD_FLAGS => self.supported_gmem_flags(vm),
            uapi::KVM_CAP_NR_MEMSLOTS => u64::from(uapi::KVM_USER_MEM_SLOTS),
            uapi::KVM_CAP_READONLY_MEM => u64::from(v.vm_type.has_readonly_mem()),
            _ => 0,
        }
    }

    // ---------------------------------------------------------------- accounting

    #[inline]
    pub(crate) fn charge(&mut self, vm: usize, ns: u64) {
        self.vms[vm].stats.charge(ns);
    }

    // ---------------------------------------------------------------- guest_memfd

    // ---------------------------------------------------------------- memslots

    // ---------------------------------------------------------------- double backing

    /// Runs in the attribute maps that decide the VM's gfns: the VM map, plus the
    /// per-offset maps of its files for strategies that keep attributes there.
    pub fn attr_intervals(&self, vm: usize) -> u64 {
        let v = &self.vms[vm];
        let mut n = v.attrs.intervals() as u64;
        if v.strategy.file_attrs() {
            for f in self.files.iter().filter(|f| f.vm == vm && !f.released) {
                n += f.attrs.as_ref().map_or(0, |a| a.intervals() as u64);
            }
        }
        n
    }

    /// Snapshot of a VM's counters, the stage-2 leaf counts read from the table (they are
    /// kept there only: copying them into the counters after every map and zap stalled a
    /// single-page conversion on a store forward).
    pub fn stats(&self, vm: usize) -> Stats {
        let v = &self.vms[vm];
        let mut s = v.stats;
        [s.stage2_4k, s.stage2_2m, s.stage2_1g] = v.s2.counts();
        s
    }
}
