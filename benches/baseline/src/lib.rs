//! Baselines for the gmem benchmarks, as their own Python module `gmem_bench_baseline`.
//!
//! * [`XaStore`]: what mainline KVM does for `KVM_SET_MEMORY_ATTRIBUTES` — one store per
//!   gfn into a radix tree of 64-slot nodes (the xarray's shape), each store walking from
//!   the root as `xa_store()` does. The loop runs in Rust so that the comparison with
//!   gmem's interval map is a fair fight between data structures, not between languages.
//! * [`CoreDriver`]: a gmem-core `Host` with the same guest layout as
//!   `gmem.guest.build_vm`, driven straight from Rust. It measures the work of
//!   `vm.apply` / `vm.set_memory_attributes` without the Python binding, so that the
//!   binding's overhead can be read off as a ratio.

use std::time::Instant;

use gmem_core::host::{GmemArg, MemRegion};
use gmem_core::{Host, PAGE_SHIFT, PAGE_SIZE, StrategyKind, VmType, uapi};
use numpy::PyReadonlyArray1;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

/// jemalloc with transparent huge pages (see `Cargo.toml`).
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const FANOUT_SHIFT: u32 = 6;
const FANOUT: usize = 1 << FANOUT_SHIFT;
const MASK: u64 = FANOUT as u64 - 1;

/// A per-gfn attribute store shaped like the kernel's xarray: 64-slot nodes, one
/// root-to-leaf walk per stored index, nodes allocated on first store below them.
#[pyclass(module = "gmem_bench_baseline")]
pub struct XaStore {
    /// Levels below the root; leaves are at depth `levels`.
    levels: u32,
    /// Inner nodes: child index + 1 per slot (0: no child). Node 0 is the root.
    inner: Vec<[u32; FANOUT]>,
    /// Leaf nodes: one value per slot (0 = absent, as `xa_store(NULL)` erases).
    leaves: Vec<[u64; FANOUT]>,
}

impl XaStore {
    fn with_pages(pages: u64) -> Self {
        let bits = 64 - pages.max(2).saturating_sub(1).leading_zeros();
        let levels = bits.div_ceil(FANOUT_SHIFT).max(1) - 1;
        Self {
            levels,
            inner: vec![[0; FANOUT]],
            leaves: Vec::new(),
        }
    }

    #[inline(never)]
    fn store(&mut self, idx: u64, value: u64) {
        if self.levels == 0 {
            if self.leaves.is_empty() {
                self.leaves.push([0; FANOUT]);
            }
            self.leaves[0][(idx & MASK) as usize] = value;
            return;
        }
        let mut node = 0usize;
        for level in (1..=self.levels).rev() {
            let slot = ((idx >> (level * FANOUT_SHIFT)) & MASK) as usize;
            let child = self.inner[node][slot];
            let next = if child != 0 {
                child as usize - 1
            } else if level > 1 {
                self.inner.push([0; FANOUT]);
                let n = self.inner.len() - 1;
                self.inner[node][slot] = n as u32 + 1;
                n
            } else {
                self.leaves.push([0; FANOUT]);
                let n = self.leaves.len() - 1;
                self.inner[node][slot] = n as u32 + 1;
                n
            };
            if level == 1 {
                self.leaves[next][(idx & MASK) as usize] = value;
                return;
            }
            node = next;
        }
    }

    fn load(&self, idx: u64) -> u64 {
        if self.levels == 0 {
            return self.leaves.first().map_or(0, |l| l[(idx & MASK) as usize]);
        }
        let mut node = 0usize;
        for level in (1..=self.levels).rev() {
            let slot = ((idx >> (level * FANOUT_SHIFT)) & MASK) as usize;
            let child = self.inner[node][slot];
            if child == 0 {
                return 0;
            }
            if level == 1 {
                return self.leaves[child as usize - 1][(idx & MASK) as usize];
            }
            node = child as usize - 1;
        }
        0
    }
}

#[pymethods]
impl XaStore {
    /// XaStore(pages): an empty store for indices below `pages`.
    #[new]
    fn new(pages: u64) -> Self {
        Self::with_pages(pages)
    }

    /// Store `value` at every index of `[start, end)`, one walk per index.
    fn set_range(&mut self, py: Python<'_>, start: u64, end: u64, value: u64) {
        py.detach(|| {
            for i in start..end {
                self.store(i, value);
            }
        });
    }

    /// Store `value` at each index of `idx`.
    fn set_points(
        &mut self,
        py: Python<'_>,
        idx: PyReadonlyArray1<'_, u64>,
        value: u64,
    ) -> PyResult<()> {
        let idx = idx.as_slice()?;
        py.detach(|| {
            for &i in idx {
                self.store(i, value);
            }
        });
        Ok(())
    }

    /// The value at `idx` (0 when absent).
    fn get(&self, idx: u64) -> u64 {
        self.load(idx)
    }

    /// Heap bytes of the nodes.
    fn heap_bytes(&self) -> usize {
        self.inner.len() * size_of::<[u32; FANOUT]>()
            + self.leaves.len() * size_of::<[u64; FANOUT]>()
    }
}

fn os_err(e: &gmem_core::Error) -> PyErr {
    PyOSError::new_err(e.to_string())
}

/// A gmem-core host with one VM laid out as `gmem.guest.build_vm(host, pages, "sw_protected",
/// strategy)` does, driven from Rust.
#[pyclass(module = "gmem_bench_baseline")]
pub struct CoreDriver {
    host: Host,
    vm: usize,
}

#[pymethods]
impl CoreDriver {
    /// CoreDriver(pages, strategy="dual", host_pages=None, vm_type="sw_protected").
    #[new]
    #[pyo3(signature = (pages, strategy = "dual", host_pages = None, vm_type = "sw_protected"))]
    fn new(pages: u64, strategy: &str, host_pages: Option<u64>, vm_type: &str) -> PyResult<Self> {
        let strat =
            StrategyKind::parse(strategy).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let vt = VmType::parse(vm_type).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let host_pages =
            host_pages.unwrap_or_else(|| (2 * pages.div_ceil(512) * 512 + 512).min((1 << 31) - 1));
        let mut host = Host::new(host_pages << PAGE_SHIFT).map_err(|e| os_err(&e))?;
        let vm = host.create_vm(vt, strat);
        let mmap = host.supported_gmem_flags(vm) & uapi::GUEST_MEMFD_FLAG_MMAP;
        let same_file = matches!(
            strat,
            StrategyKind::Inplace | StrategyKind::Realloc | StrategyKind::AttrHook
        );
        let size = pages * PAGE_SIZE;
        let file = host
            .create_guest_memfd(vm, size, if same_file { mmap } else { 0 }, 0)
            .map_err(|e| os_err(&e))?;
        let map = host.mmap_anonymous(size).map_err(|e| os_err(&e))?;
        let (shared_guest_memfd, shared_offset) = if strat == StrategyKind::TwoOffsets {
            let shared = host
                .create_guest_memfd(vm, size, mmap, 0)
                .map_err(|e| os_err(&e))?;
            let fd = host.file(shared).fd().expect("open");
            (GmemArg::Fd(i64::from(fd)), Some(0))
        } else {
            (GmemArg::None, None)
        };
        let region = MemRegion {
            slot: 0,
            flags: uapi::KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: host.mapping(map).addr,
            guest_memfd: GmemArg::Fd(i64::from(host.file(file).fd().expect("open"))),
            guest_memfd_offset: 0,
            shared_guest_memfd,
            shared_offset,
        };
        host.set_user_memory_region2(vm, region)
            .map_err(|e| os_err(&e))?;
        Ok(Self { host, vm })
    }

    /// Run the events through `Host::apply` in batches of `batch`; returns the elapsed
    /// nanoseconds measured in Rust (setup and argument passing excluded).
    #[pyo3(signature = (ops, gfns, npages, values, batch = usize::MAX))]
    fn apply(
        &mut self,
        py: Python<'_>,
        ops: PyReadonlyArray1<'_, u8>,
        gfns: PyReadonlyArray1<'_, u64>,
        npages: PyReadonlyArray1<'_, u64>,
        values: PyReadonlyArray1<'_, u64>,
        batch: usize,
    ) -> PyResult<u64> {
        let (o, g, n, v) = (
            ops.as_slice()?,
            gfns.as_slice()?,
            npages.as_slice()?,
            values.as_slice()?,
        );
        let batch = batch.max(1);
        let vm = self.vm;
        let host = &mut self.host;
        py.detach(|| {
            let t = Instant::now();
            let mut i = 0;
            while i < o.len() {
                let j = (i + batch).min(o.len());
                host.apply(vm, &o[i..j], &g[i..j], &n[i..j], &v[i..j], None)?;
                i = j;
            }
            Ok(t.elapsed().as_nanos() as u64)
        })
        .map_err(|e: gmem_core::Error| os_err(&e))
    }

    /// Call `KVM_SET_MEMORY_ATTRIBUTES` on `[address, address + size)` `reps` times,
    /// alternating private and shared; returns the elapsed nanoseconds measured in Rust.
    fn set_memory_attributes_loop(&mut self, address: u64, size: u64, reps: u64) -> PyResult<u64> {
        let t = Instant::now();
        for r in 0..reps {
            let attrs = if r % 2 == 0 {
                uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE
            } else {
                0
            };
            self.host
                .set_memory_attributes(self.vm, address, size, attrs, 0)
                .map_err(|e| os_err(&e))?;
        }
        Ok(t.elapsed().as_nanos() as u64)
    }

    /// `vm.stats()["modelled_ns"]` and `["events"]` of the driven VM.
    fn stats(&self) -> (u64, u64) {
        let s = self.host.stats(self.vm);
        (s.modelled_ns, s.events)
    }
}

#[pymodule(gil_used = false)]
mod gmem_bench_baseline {
    #[pymodule_export]
    use super::{CoreDriver, XaStore};
}
