//! `gmem.Host` and `gmem.load`: one simulated host, shared by every Python object made
//! from it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use gmem_core::{Host, StrategyKind, VmType};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::{PyGmemErr, PyRes};
use crate::guest_memfd::PyGuestMemfd;
use crate::mapping::PyMapping;
use crate::vm::PyVm;

/// Strict mode of every new host; the Python layer sets it once, from `GMEM_STRICT`.
static STRICT_DEFAULT: AtomicBool = AtomicBool::new(false);

/// Whether hosts made from now on start in strict mode (`Host.strict`).
#[pyfunction(name = "_set_strict_default")]
pub(crate) fn set_strict_default(on: bool) {
    STRICT_DEFAULT.store(on, Ordering::Relaxed);
}

/// One simulated host, shared by the Python objects made from it.
pub(crate) struct Shared {
    host: Mutex<Host>,
}

impl Shared {
    fn new(mut host: Host) -> Arc<Self> {
        host.strict = STRICT_DEFAULT.load(Ordering::Relaxed);
        Arc::new(Self {
            host: Mutex::new(host),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Host> {
        // A panic cannot leave the model half-updated in a way later calls rely on: every
        // operation validates before it mutates. Keep serving after one.
        self.host
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One call of the core's API that may change the model (`Host::call`: in strict
    /// mode the core checks it).
    pub(crate) fn call<T>(&self, f: impl FnOnce(&mut Host) -> gmem_core::Result<T>) -> PyRes<T> {
        Ok(self.lock().call(f)?)
    }

    /// Like `call`, with the GIL released: for calls whose work grows with their input.
    pub(crate) fn call_detached<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Host) -> gmem_core::Result<T> + Send,
    ) -> PyRes<T> {
        py.detach(|| self.call(f))
    }

    /// Run `f` on the host with the GIL released, as it is: for checks, snapshots and
    /// batches, which make their own strict-mode checks or need none.
    pub(crate) fn detached<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Host) -> gmem_core::Result<T> + Send,
    ) -> PyRes<T> {
        Ok(py.detach(|| f(&mut self.lock()))?)
    }
}

fn parse_vm_type(s: &str) -> PyResult<VmType> {
    VmType::parse(s).map_err(|e| PyValueError::new_err(e.to_string()))
}

fn parse_strategy(s: &str) -> PyResult<StrategyKind> {
    StrategyKind::parse(s).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// A simulated host: RAM, the page allocator, and every VM made on it.
#[pyclass(name = "Host", module = "gmem", frozen)]
pub(crate) struct PyHost {
    pub(crate) shared: Arc<Shared>,
}

#[pymethods]
impl PyHost {
    /// Host(memory, *, nodes=1, costs=None): `memory` bytes of RAM (page aligned), split
    /// evenly over `nodes` NUMA nodes (1 to 64; `memory` a multiple of `nodes` pages).
    #[new]
    #[pyo3(signature = (memory, *, nodes = 1, costs = None))]
    fn new(memory: u64, nodes: u32, costs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut host =
            Host::with_nodes(memory, nodes).map_err(|e| PyValueError::new_err(e.to_string()))?;
        if let Some(c) = costs {
            set_costs(&mut host, c)?;
        }
        Ok(Self {
            shared: Shared::new(host),
        })
    }

    /// The `/dev/kvm` fd number.
    #[getter]
    fn fd(&self) -> i32 {
        self.shared.lock().kvm_fd()
    }

    /// create_vm(vm_type="sw_protected", strategy="dual") -> Vm: `vm_type` is "sw_protected",
    /// "pkvm", "tdx", "snp", or "default" (`KVM_X86_DEFAULT_VM`: no private memory).
    #[pyo3(signature = (vm_type = "sw_protected", strategy = "dual"))]
    fn create_vm(&self, vm_type: &str, strategy: &str) -> PyResult<PyVm> {
        let (t, s) = (parse_vm_type(vm_type)?, parse_strategy(strategy)?);
        let id = self.shared.lock().create_vm(t, s);
        Ok(PyVm {
            shared: self.shared.clone(),
            id,
        })
    }

    /// mmap_anonymous(length) -> Mapping: anonymous MAP_SHARED memory of the VMM.
    fn mmap_anonymous(&self, length: u64) -> PyResult<PyMapping> {
        let id = self.shared.call(|h| h.mmap_anonymous(length))?;
        Ok(PyMapping {
            shared: self.shared.clone(),
            id,
        })
    }

    /// Host-wide counters: total_pages, free_pages, pages_allocated, heap_bytes.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let h = self.shared.lock();
        let d = PyDict::new(py);
        d.set_item("total_pages", h.total_pages())?;
        d.set_item("free_pages", h.free_pages())?;
        d.set_item("pages_allocated", h.total_pages() - h.free_pages())?;
        d.set_item("heap_bytes", h.heap_bytes())?;
        Ok(d)
    }

    /// Number of NUMA nodes.
    #[getter]
    fn nodes(&self) -> u32 {
        self.shared.lock().nr_nodes()
    }

    /// One dict per NUMA node, node 0 first: node, total_pages, free_pages,
    /// allocated_pages, and free_blocks / allocated_blocks (block counts per order 0..18).
    fn node_stats<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let stats = self.shared.detached(py, |h| Ok(h.node_stats()))?;
        stats
            .into_iter()
            .map(|n| {
                let d = PyDict::new(py);
                d.set_item("node", n.node)?;
                d.set_item("total_pages", n.total_pages)?;
                d.set_item("free_pages", n.free_pages)?;
                d.set_item("allocated_pages", n.allocated_pages)?;
                d.set_item("free_blocks", n.free_blocks)?;
                d.set_item("allocated_blocks", n.allocated_blocks)?;
                Ok(d)
            })
            .collect()
    }

    /// set_mempolicy(mode, nodes=None): the VMM's own NUMA policy (set_mempolicy(2)): it
    /// places every page allocated where no mbind policy is set, guest faults included.
    #[pyo3(signature = (mode, nodes = None))]
    #[allow(clippy::needless_pass_by_value)] // PyO3 extracts sequences as owned Vec
    fn set_mempolicy(&self, mode: u32, nodes: Option<Vec<i64>>) -> PyResult<()> {
        let ids = crate::mapping::node_ids(nodes);
        Ok(self.shared.call(|h| h.set_mempolicy(mode, &ids))?)
    }

    /// get_mempolicy() -> (mode, nodes): the VMM's own policy; `(MPOL_DEFAULT, [])` when
    /// none is set.
    fn get_mempolicy(&self) -> (u32, Vec<u32>) {
        self.shared.lock().get_task_mempolicy()
    }

    /// The cost model, ns per step.
    fn costs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let h = self.shared.lock();
        let d = PyDict::new(py);
        for (k, v) in h.costs().items() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    /// Override costs (ns per step); unknown keys raise ValueError and change nothing.
    fn set_costs(&self, costs: &Bound<'_, PyDict>) -> PyResult<()> {
        set_costs(&mut self.shared.lock(), costs)
    }

    /// Check every invariant of every VM and of the allocator.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        Ok(self.shared.detached(py, |h| h.check())?)
    }

    /// save(path): write a snapshot of the whole host (all VMs, files, mappings)
    /// atomically.
    #[allow(clippy::needless_pass_by_value)] // PyO3 extracts paths as owned PathBuf
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        Ok(self.shared.detached(py, |h| h.save(&path))?)
    }

    /// The VMs of this host, in creation order.
    fn vms(&self) -> Vec<PyVm> {
        let n = self.shared.lock().nr_vms();
        self.handles(n, |shared, id| PyVm { shared, id })
    }

    /// The guest_memfd files of this host (closed ones included), in creation order.
    fn guest_memfds(&self) -> Vec<PyGuestMemfd> {
        let n = self.shared.lock().nr_files();
        self.handles(n, |shared, id| PyGuestMemfd { shared, id })
    }

    /// The mappings of this host (unmapped ones included), in creation order.
    fn mappings(&self) -> Vec<PyMapping> {
        let n = self.shared.lock().nr_mappings();
        self.handles(n, |shared, id| PyMapping { shared, id })
    }

    /// Whether every operation is followed by a full check (GMEM_STRICT=1).
    #[getter]
    fn strict(&self) -> bool {
        self.shared.lock().strict
    }

    #[setter]
    fn set_strict(&self, on: bool) {
        self.shared.lock().strict = on;
    }
}

/// load(path) -> Host: read a snapshot written by Host.save. A truncated, corrupted,
/// inconsistent or newer-version file raises GmemError(EINVAL) and loads nothing.
#[pyfunction]
#[allow(clippy::needless_pass_by_value)] // PyO3 extracts paths as owned PathBuf
pub(crate) fn load(py: Python<'_>, path: PathBuf) -> PyResult<PyHost> {
    let host = py.detach(|| Host::load(&path)).map_err(PyGmemErr)?;
    Ok(PyHost {
        shared: Shared::new(host),
    })
}

impl PyHost {
    /// One Python handle per object index `0..n`.
    fn handles<T>(&self, n: usize, make: impl Fn(Arc<Shared>, usize) -> T) -> Vec<T> {
        (0..n).map(|id| make(self.shared.clone(), id)).collect()
    }
}

fn set_costs(host: &mut Host, costs: &Bound<'_, PyDict>) -> PyResult<()> {
    let mut next = *host.costs();
    for (k, v) in costs.iter() {
        let k: String = k.extract()?;
        let v: u64 = v.extract()?;
        if !next.set(&k, v) {
            return Err(PyValueError::new_err(format!("unknown cost {k:?}")));
        }
    }
    *host.costs_mut() = next;
    Ok(())
}
