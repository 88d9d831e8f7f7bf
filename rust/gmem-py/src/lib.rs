//! Python binding of gmem-core: argument conversion, error mapping and GIL handling only.

use std::sync::{Arc, Mutex, MutexGuard};

use gmem_core::error::HostFaultKind;
use gmem_core::{Error, GmemArg, Host, HostOp, MemRegion, Packed, StrategyKind, VmType};
use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::{PyAssertionError, PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

/// jemalloc with transparent huge pages (see `Cargo.toml`).
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

pyo3::create_exception!(
    gmem,
    GmemError,
    PyOSError,
    "A KVM-shaped call failed; `errno` is the kernel's."
);
pyo3::create_exception!(
    gmem,
    MemoryFault,
    GmemError,
    "KVM_EXIT_MEMORY_FAULT: `.gpa`, `.size`, `.flags`."
);
pyo3::create_exception!(
    gmem,
    HostFault,
    GmemError,
    "A host access the kernel refuses (SIGBUS)."
);
pyo3::create_exception!(
    gmem,
    MmioExit,
    pyo3::exceptions::PyException,
    "KVM_EXIT_MMIO: no memslot backs the access; `.phys_addr`, `.len`, `.is_write`."
);
pyo3::create_exception!(
    gmem,
    ConversionBusy,
    GmemError,
    "EAGAIN: a page has elevated references; `.error_offset`."
);
pyo3::create_exception!(
    gmem,
    InvariantError,
    PyAssertionError,
    "A model invariant is broken."
);

/// The core error in Python clothes (the orphan rule wants a newtype).
struct PyGmemErr(Error);

impl From<Error> for PyGmemErr {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

impl From<PyGmemErr> for PyErr {
    fn from(PyGmemErr(e): PyGmemErr) -> PyErr {
        let msg = e.to_string();
        let errno = e.errno();
        Python::attach(|py| {
            let (err, attrs): (PyErr, Vec<(&str, Py<PyAny>)>) = match &e {
                Error::Errno(..) => (GmemError::new_err((errno, msg)), vec![]),
                Error::MemoryFault { gpa, size, flags } => (
                    MemoryFault::new_err((errno, msg)),
                    vec![
                        ("gpa", gpa.into_pyobject(py).unwrap().into_any().unbind()),
                        ("size", size.into_pyobject(py).unwrap().into_any().unbind()),
                        (
                            "flags",
                            flags.into_pyobject(py).unwrap().into_any().unbind(),
                        ),
                    ],
                ),
                Error::HostFault { addr, kind } => (
                    HostFault::new_err((errno, msg)),
                    vec![
                        ("addr", addr.into_pyobject(py).unwrap().into_any().unbind()),
                        (
                            "signal",
                            "SIGBUS".into_pyobject(py).unwrap().into_any().unbind(),
                        ),
                        (
                            "reason",
                            match kind {
                                HostFaultKind::Private => "private",
                                HostFaultKind::BeyondEof => "beyond_eof",
                            }
                            .into_pyobject(py)
                            .unwrap()
                            .into_any()
                            .unbind(),
                        ),
                    ],
                ),
                Error::Busy { error_offset } => (
                    ConversionBusy::new_err((errno, msg)),
                    vec![(
                        "error_offset",
                        error_offset.into_pyobject(py).unwrap().into_any().unbind(),
                    )],
                ),
                Error::Mmio {
                    phys_addr,
                    len,
                    is_write,
                } => (
                    MmioExit::new_err(msg),
                    vec![
                        (
                            "phys_addr",
                            phys_addr.into_pyobject(py).unwrap().into_any().unbind(),
                        ),
                        ("len", len.into_pyobject(py).unwrap().into_any().unbind()),
                        (
                            "is_write",
                            is_write
                                .into_pyobject(py)
                                .unwrap()
                                .to_owned()
                                .into_any()
                                .unbind(),
                        ),
                    ],
                ),
                Error::Invariant(_) => (InvariantError::new_err(msg), vec![]),
            };
            let value = err.value(py);
            for (k, v) in attrs {
                // Setting attributes on a fresh exception instance cannot fail.
                let _ = value.setattr(k, v);
            }
            err
        })
    }
}

type PyRes<T> = Result<T, PyGmemErr>;

/// One simulated host, shared by the Python objects made from it.
struct Shared {
    host: Mutex<Host>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Host> {
        // A panic cannot leave the model half-updated in a way later calls rely on: every
        // operation validates before it mutates. Keep serving after one.
        self.host
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Run `f` on the host; in strict mode check every invariant afterwards.
    fn with<T>(&self, f: impl FnOnce(&mut Host) -> gmem_core::Result<T>) -> PyRes<T> {
        let mut h = self.lock();
        let r = f(&mut h)?;
        if h.strict {
            h.check()?;
        }
        Ok(r)
    }

    /// Like `with`, with the GIL released: for calls whose work grows with their input.
    fn detached<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Host) -> gmem_core::Result<T> + Send,
    ) -> PyRes<T> {
        py.detach(|| self.with(f))
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
struct PyHost {
    shared: Arc<Shared>,
}

#[pymethods]
impl PyHost {
    /// Host(memory, *, costs=None): `memory` bytes of RAM (page aligned).
    #[new]
    #[pyo3(signature = (memory, *, costs = None))]
    fn new(memory: u64, costs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let mut host = Host::new(memory).map_err(|e| PyValueError::new_err(e.to_string()))?;
        host.strict = std::env::var("GMEM_STRICT").is_ok_and(|v| v == "1");
        if let Some(c) = costs {
            set_costs(&mut host, c)?;
        }
        Ok(Self {
            shared: Arc::new(Shared {
                host: Mutex::new(host),
            }),
        })
    }

    /// The `/dev/kvm` fd number.
    #[getter]
    fn fd(&self) -> i32 {
        self.shared.lock().kvm_fd()
    }

    /// create_vm(vm_type="sw_protected", strategy="dual") -> Vm
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
        let id = self.shared.with(|h| h.mmap_anonymous(length))?;
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
    fn save(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
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
fn load(py: Python<'_>, path: std::path::PathBuf) -> PyResult<PyHost> {
    let mut host = py.detach(|| Host::load(&path)).map_err(PyGmemErr)?;
    host.strict = std::env::var("GMEM_STRICT").is_ok_and(|v| v == "1");
    Ok(PyHost {
        shared: Arc::new(Shared {
            host: Mutex::new(host),
        }),
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

/// A VM on a host.
#[pyclass(name = "Vm", module = "gmem", frozen)]
struct PyVm {
    shared: Arc<Shared>,
    id: usize,
}

/// The fd a file argument stands for, seen from the host `host`; a file object of another
/// `Host` is `GmemArg::Foreign` (its fd number means nothing here).
fn gmem_arg(host: &Arc<Shared>, obj: Option<&Bound<'_, PyAny>>) -> PyResult<GmemArg> {
    let Some(o) = obj else {
        return Ok(GmemArg::None);
    };
    if o.is_none() {
        return Ok(GmemArg::None);
    }
    let foreign = |s: &Arc<Shared>| !Arc::ptr_eq(s, host);
    if let Ok(g) = o.cast::<PyGuestMemfd>() {
        if foreign(&g.get().shared) {
            return Ok(GmemArg::Foreign);
        }
        let fd = g.get().shared.lock().file(g.get().id).fd;
        // A closed file has no fd: the kernel sees a number that is no longer open.
        return Ok(GmemArg::Fd(fd.map_or(-1, i64::from)));
    }
    if let Ok(v) = o.cast::<PyVm>() {
        if foreign(&v.get().shared) {
            return Ok(GmemArg::Foreign);
        }
        return Ok(GmemArg::Fd(i64::from(
            v.get().shared.lock().vm(v.get().id).fd,
        )));
    }
    if let Ok(h) = o.cast::<PyHost>() {
        if foreign(&h.get().shared) {
            return Ok(GmemArg::Foreign);
        }
        return Ok(GmemArg::Fd(i64::from(h.get().shared.lock().kvm_fd())));
    }
    if let Ok(fd) = o.extract::<i64>() {
        return Ok(GmemArg::Fd(fd));
    }
    Err(PyTypeError::new_err(format!(
        "guest_memfd must be a GuestMemfd, an fd number or None, not {}",
        o.get_type().name()?
    )))
}

#[pymethods]
impl PyVm {
    #[getter]
    fn fd(&self) -> i32 {
        self.shared.lock().vm(self.id).fd
    }

    #[getter]
    fn vm_type(&self) -> &'static str {
        self.shared.lock().vm(self.id).vm_type.name()
    }

    #[getter]
    fn strategy(&self) -> &'static str {
        self.shared.lock().vm(self.id).strategy.name()
    }

    /// KVM_CHECK_EXTENSION on the VM fd.
    fn check_extension(&self, cap: u64) -> u64 {
        self.shared.lock().check_extension(self.id, cap)
    }

    /// KVM_CREATE_GUEST_MEMFD.
    #[pyo3(signature = (size, flags = 0, page_order = 0))]
    fn create_guest_memfd(&self, size: u64, flags: u64, page_order: u32) -> PyResult<PyGuestMemfd> {
        let id = self
            .shared
            .with(|h| h.create_guest_memfd(self.id, size, flags, page_order))?;
        Ok(PyGuestMemfd {
            shared: self.shared.clone(),
            id,
        })
    }

    /// KVM_SET_USER_MEMORY_REGION2 (plus the `two_offsets` shared range).
    #[pyo3(signature = (slot, flags, guest_phys_addr, memory_size, userspace_addr = 0,
        guest_memfd = None, guest_memfd_offset = 0, *, shared_guest_memfd = None, shared_offset = None))]
    fn set_user_memory_region2(
        &self,
        slot: u32,
        flags: u32,
        guest_phys_addr: u64,
        memory_size: u64,
        userspace_addr: u64,
        guest_memfd: Option<&Bound<'_, PyAny>>,
        guest_memfd_offset: u64,
        shared_guest_memfd: Option<&Bound<'_, PyAny>>,
        shared_offset: Option<u64>,
    ) -> PyResult<()> {
        let r = MemRegion {
            slot,
            flags,
            guest_phys_addr,
            memory_size,
            userspace_addr,
            guest_memfd: gmem_arg(&self.shared, guest_memfd)?,
            guest_memfd_offset,
            shared_guest_memfd: gmem_arg(&self.shared, shared_guest_memfd)?,
            shared_offset,
        };
        Ok(self
            .shared
            .with(|h| h.set_user_memory_region2(self.id, r))?)
    }

    /// KVM_SET_USER_MEMORY_REGION (v1): KVM_MEM_GUEST_MEMFD is not a v1 flag.
    fn set_user_memory_region(
        &self,
        slot: u32,
        flags: u32,
        guest_phys_addr: u64,
        memory_size: u64,
        userspace_addr: u64,
    ) -> PyResult<()> {
        if flags & gmem_core::uapi::KVM_MEM_GUEST_MEMFD != 0 {
            return Err(PyGmemErr(Error::Errno(
                gmem_core::error::errno::EINVAL,
                "KVM_MEM_GUEST_MEMFD needs KVM_SET_USER_MEMORY_REGION2".into(),
            ))
            .into());
        }
        self.set_user_memory_region2(
            slot,
            flags,
            guest_phys_addr,
            memory_size,
            userspace_addr,
            None,
            0,
            None,
            None,
        )
    }

    /// KVM_SET_MEMORY_ATTRIBUTES.
    #[pyo3(signature = (address, size, attributes, flags = 0))]
    fn set_memory_attributes(
        &self,
        py: Python<'_>,
        address: u64,
        size: u64,
        attributes: u64,
        flags: u64,
    ) -> PyResult<()> {
        Ok(self.shared.detached(py, |h| {
            h.set_memory_attributes(self.id, address, size, attributes, flags)
        })?)
    }

    /// populate(gpa, size, value=0) -> pages: kvm_gmem_populate (SNP LAUNCH_UPDATE / TDX
    /// INIT_MEM_REGION): load the initial image into private guest_memfd pages.
    #[pyo3(signature = (gpa, size, value = 0))]
    fn populate(&self, py: Python<'_>, gpa: u64, size: u64, value: u64) -> PyResult<u64> {
        Ok(self
            .shared
            .detached(py, |h| h.populate(self.id, gpa, size, value))?)
    }

    /// The attributes of `gfn`.
    fn get_memory_attributes(&self, gfn: u64) -> u64 {
        self.shared.lock().get_memory_attributes(self.id, gfn)
    }

    /// A guest read of the page at `gpa`.
    #[pyo3(signature = (gpa, *, private))]
    fn guest_read(&self, gpa: u64, private: bool) -> PyResult<u64> {
        Ok(self
            .shared
            .with(|h| h.guest_access(self.id, gpa, private, None))?)
    }

    /// A guest write of `value` to the page at `gpa`.
    #[pyo3(signature = (gpa, value, *, private))]
    fn guest_write(&self, gpa: u64, value: u64, private: bool) -> PyResult<()> {
        self.shared
            .with(|h| h.guest_access(self.id, gpa, private, Some(value)))?;
        Ok(())
    }

    /// Counters as a dict.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (s, intervals) = {
            let h = self.shared.lock();
            (h.stats(self.id), h.attr_intervals(self.id))
        };
        let d = PyDict::new(py);
        for (k, v) in s.items() {
            d.set_item(k, v)?;
        }
        d.set_item("attr_intervals", intervals)?;
        Ok(d)
    }

    /// Check every invariant; raises InvariantError naming the broken one.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        Ok(self.shared.detached(py, |h| h.check_vm(self.id))?)
    }

    /// set_options(fault_policy=None, merge=None, zero=None)
    #[pyo3(signature = (*, fault_policy = None, merge = None, zero = None))]
    fn set_options(
        &self,
        fault_policy: Option<&str>,
        merge: Option<&str>,
        zero: Option<&str>,
    ) -> PyResult<()> {
        use gmem_core::vm::{FaultPolicy, MergePolicy, ZeroPolicy};
        let mut h = self.shared.lock();
        let mut o = h.vm(self.id).opts;
        let bad = |e: Error| PyValueError::new_err(e.to_string());
        if let Some(f) = fault_policy {
            o.fault = FaultPolicy::parse(f).map_err(bad)?;
        }
        if let Some(m) = merge {
            o.merge = MergePolicy::parse(m).map_err(bad)?;
        }
        if let Some(z) = zero {
            o.zero = ZeroPolicy::parse(z).map_err(bad)?;
        }
        h.vm_mut(self.id).opts = o;
        Ok(())
    }

    /// Merge every split huge folio whose range is wholly private again.
    fn merge_pass(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.shared.detached(py, |h| Ok(h.merge_pass(self.id)))?)
    }

    /// apply(events, *, details=False): run an EVENT_DTYPE batch; int32 status per event
    /// (0 or -errno), and with details=True a DETAIL_DTYPE array too.
    #[pyo3(signature = (events, *, details = false))]
    fn apply<'py>(
        &self,
        py: Python<'py>,
        events: &Bound<'py, PyAny>,
        details: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let np = py.import("numpy")?;
        let names = events
            .getattr("dtype")
            .and_then(|d| d.getattr("names"))
            .map_err(|_| {
                PyTypeError::new_err("events must be a numpy array of gmem.EVENT_DTYPE")
            })?;
        if names.is_none() {
            return Err(PyTypeError::new_err(
                "events must be a structured array of gmem.EVENT_DTYPE",
            ));
        }
        if events.getattr("ndim")?.extract::<usize>()? != 1 {
            return Err(PyValueError::new_err("events must be one-dimensional"));
        }
        let id = self.id;
        // An EVENT_DTYPE array in one piece is read in place (no column copies).
        let event_dtype = py.import("gmem._events")?.getattr("EVENT_DTYPE")?;
        let in_place = cfg!(target_endian = "little")
            && events.getattr("dtype")?.eq(&event_dtype)?
            && events
                .getattr("flags")?
                .getattr("c_contiguous")?
                .extract::<bool>()?;
        let (status, dets) = if in_place {
            let bytes = events.call_method1("view", (np.getattr("uint8")?,))?;
            let bytes: PyReadonlyArray1<'py, u8> = bytes.extract()?;
            let b = bytes.as_slice()?;
            self.shared.detached(py, |h| {
                let mut d = details.then(Vec::new);
                let s = h.apply_events(id, &Packed::new(b)?, d.as_mut())?;
                Ok((s, d))
            })?
        } else {
            let column = |name: &str, dt: &str| -> PyResult<Bound<'py, PyAny>> {
                let field = events
                    .get_item(name)
                    .map_err(|_| PyTypeError::new_err(format!("events lack the field {name:?}")))?;
                let kw = PyDict::new(py);
                kw.set_item("casting", "safe")?;
                if let Ok(cast) = field.call_method("astype", (dt,), Some(&kw)) {
                    return np.call_method1("ascontiguousarray", (cast,));
                }
                // Integers of another width or signedness are fine when every value fits.
                let kind: String = field.getattr("dtype")?.getattr("kind")?.extract()?;
                if kind != "i" && kind != "u" {
                    return Err(PyTypeError::new_err(format!(
                        "events field {name:?} must hold integers, not {}",
                        field.getattr("dtype")?.str()?
                    )));
                }
                if field.getattr("size")?.extract::<usize>()? > 0 {
                    let lo = np.call_method1("iinfo", (dt,))?;
                    let (mn, mx) = (field.call_method0("min")?, field.call_method0("max")?);
                    if mn.lt(lo.getattr("min")?)? || mx.gt(lo.getattr("max")?)? {
                        return Err(PyValueError::new_err(format!(
                            "events field {name:?} holds values from {mn} to {mx}, outside {dt}"
                        )));
                    }
                }
                np.call_method1("ascontiguousarray", (field.call_method1("astype", (dt,))?,))
            };
            let (c_op, c_gfn, c_n, c_v) = (
                column("op", "u1")?,
                column("gfn", "u8")?,
                column("npages", "u8")?,
                column("value", "u8")?,
            );
            let ops: PyReadonlyArray1<'py, u8> = c_op.extract()?;
            let gfns: PyReadonlyArray1<'py, u64> = c_gfn.extract()?;
            let npages: PyReadonlyArray1<'py, u64> = c_n.extract()?;
            let values: PyReadonlyArray1<'py, u64> = c_v.extract()?;
            let (o, g, n, v) = (
                ops.as_slice()?,
                gfns.as_slice()?,
                npages.as_slice()?,
                values.as_slice()?,
            );
            self.shared.detached(py, |h| {
                let mut d = details.then(Vec::new);
                let s = h.apply(id, o, g, n, v, d.as_mut())?;
                Ok((s, d))
            })?
        };
        let status = status.into_pyarray(py).into_any();
        let Some(dets) = dets else { return Ok(status) };
        let dtype = py.import("gmem._events")?.getattr("DETAIL_DTYPE")?;
        let out = np.call_method1("zeros", (dets.len(), dtype))?;
        let cols: [(&str, Vec<u64>); 4] = [
            ("value", dets.iter().map(|d| d.value).collect()),
            ("fault_gpa", dets.iter().map(|d| d.fault_gpa).collect()),
            ("allocated", dets.iter().map(|d| d.allocated).collect()),
            ("freed", dets.iter().map(|d| d.freed).collect()),
        ];
        for (name, col) in cols {
            out.set_item(name, PyArray1::from_vec(py, col))?;
        }
        let flags: Vec<u32> = dets.iter().map(|d| d.fault_flags).collect();
        out.set_item("fault_flags", PyArray1::from_vec(py, flags))?;
        Ok(PyTuple::new(py, [status, out])?.into_any())
    }

    fn __repr__(&self) -> String {
        let h = self.shared.lock();
        let v = h.vm(self.id);
        format!(
            "<gmem.Vm fd={} vm_type={} strategy={}>",
            v.fd,
            v.vm_type.name(),
            v.strategy.name()
        )
    }
}

/// A guest_memfd file.
#[pyclass(name = "GuestMemfd", module = "gmem", frozen)]
struct PyGuestMemfd {
    shared: Arc<Shared>,
    id: usize,
}

#[pymethods]
impl PyGuestMemfd {
    /// The fd number (-1 once closed).
    #[getter]
    fn fd(&self) -> i32 {
        self.shared.lock().file(self.id).fd.unwrap_or(-1)
    }
    #[getter]
    fn size(&self) -> u64 {
        self.shared.lock().file(self.id).size_pages << gmem_core::PAGE_SHIFT
    }
    #[getter]
    fn flags(&self) -> u64 {
        self.shared.lock().file(self.id).flags
    }
    #[getter]
    fn page_order(&self) -> u32 {
        self.shared.lock().file(self.id).order
    }
    #[getter]
    fn inode(&self) -> u64 {
        self.shared.lock().file(self.id).inode
    }
    #[getter]
    fn closed(&self) -> bool {
        self.shared.lock().file(self.id).fd.is_none()
    }
    /// Pages held by the page cache.
    #[getter]
    fn nr_pages(&self) -> u64 {
        self.shared.lock().file(self.id).nr_pages
    }

    /// fallocate(mode, offset, length)
    fn fallocate(&self, py: Python<'_>, mode: u32, offset: u64, length: u64) -> PyResult<()> {
        Ok(self
            .shared
            .detached(py, |h| h.gmem_fallocate(self.id, mode, offset, length))?)
    }

    /// guest_memfd has no read(): always EINVAL.
    fn read(&self, n: u64) -> PyResult<()> {
        let _ = n;
        Err(self.no_rw("read"))
    }

    /// guest_memfd has no write(): always EINVAL.
    fn write(&self, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let _ = data;
        Err(self.no_rw("write"))
    }

    /// guest_memfd cannot be resized: always EINVAL.
    fn truncate(&self, size: u64) -> PyResult<()> {
        let _ = size;
        Err(self.no_rw("truncate"))
    }

    /// mmap(offset=0, length=None, *, shared=True) -> Mapping
    #[pyo3(signature = (offset = 0, length = None, *, shared = true))]
    fn mmap(&self, offset: u64, length: Option<u64>, shared: bool) -> PyResult<PyMapping> {
        let id = self
            .shared
            .with(|h| h.gmem_mmap(self.id, offset, length, shared))?;
        Ok(PyMapping {
            shared: self.shared.clone(),
            id,
        })
    }

    /// KVM_SET_MEMORY_ATTRIBUTES2 (in-place series).
    #[pyo3(signature = (offset, size, attributes, flags = 0))]
    fn set_memory_attributes2(
        &self,
        py: Python<'_>,
        offset: u64,
        size: u64,
        attributes: u64,
        flags: u64,
    ) -> PyResult<()> {
        Ok(self.shared.detached(py, |h| {
            h.set_memory_attributes2(self.id, offset, size, attributes, flags)
        })?)
    }

    /// The attribute at file `offset` (inplace / attr_hook).
    fn get_memory_attributes2(&self, offset: u64) -> PyResult<u64> {
        Ok(self
            .shared
            .with(|h| h.get_memory_attributes2(self.id, offset))?)
    }

    /// close() the fd.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        Ok(self.shared.detached(py, |h| h.gmem_close(self.id))?)
    }

    fn __repr__(&self) -> String {
        let h = self.shared.lock();
        let f = h.file(self.id);
        format!(
            "<gmem.GuestMemfd inode={} size={:#x} flags={:#x}>",
            f.inode,
            f.size_pages << 12,
            f.flags
        )
    }
}

impl PyGuestMemfd {
    fn no_rw(&self, what: &str) -> PyErr {
        let closed = self.shared.lock().file(self.id).fd.is_none();
        let (e, m) = if closed {
            (
                gmem_core::error::errno::EBADF,
                format!("{what}: guest_memfd is closed"),
            )
        } else {
            (
                gmem_core::error::errno::EINVAL,
                format!("guest_memfd does not support {what}()"),
            )
        };
        PyGmemErr(Error::Errno(e, m)).into()
    }
}

/// A host (VMM) mapping: anonymous memory or an mmap of a guest_memfd.
#[pyclass(name = "Mapping", module = "gmem", frozen)]
struct PyMapping {
    shared: Arc<Shared>,
    id: usize,
}

#[pymethods]
impl PyMapping {
    #[getter]
    fn addr(&self) -> u64 {
        self.shared.lock().mapping(self.id).addr
    }
    #[getter]
    fn length(&self) -> u64 {
        self.shared.lock().mapping(self.id).pages << gmem_core::PAGE_SHIFT
    }
    #[getter]
    fn kind(&self) -> &'static str {
        match self.shared.lock().mapping(self.id).kind {
            gmem_core::mapping::MapKind::Anon { .. } => "anonymous",
            gmem_core::mapping::MapKind::Gmem { .. } => "guest_memfd",
        }
    }
    fn read(&self, offset: u64) -> PyResult<u64> {
        Ok(self
            .shared
            .with(|h| h.map_access(self.id, offset, HostOp::Read))?)
    }
    fn write(&self, offset: u64, value: u64) -> PyResult<()> {
        self.shared
            .with(|h| h.map_access(self.id, offset, HostOp::Write(value)))?;
        Ok(())
    }
    fn pin(&self, offset: u64) -> PyResult<()> {
        self.shared
            .with(|h| h.map_access(self.id, offset, HostOp::Pin))?;
        Ok(())
    }
    fn unpin(&self, offset: u64) -> PyResult<()> {
        self.shared
            .with(|h| h.map_access(self.id, offset, HostOp::Unpin))?;
        Ok(())
    }
    /// discard(offset, length): madvise(MADV_DONTNEED).
    fn discard(&self, py: Python<'_>, offset: u64, length: u64) -> PyResult<()> {
        Ok(self
            .shared
            .detached(py, |h| h.map_discard(self.id, offset, length))?)
    }
    fn unmap(&self, py: Python<'_>) -> PyResult<()> {
        Ok(self.shared.detached(py, |h| h.map_unmap(self.id))?)
    }
    fn __repr__(&self) -> String {
        format!(
            "<gmem.Mapping addr={:#x} length={:#x} kind={}>",
            self.addr(),
            self.length(),
            self.kind()
        )
    }
}

#[pymodule(gil_used = false)]
mod _gmem {
    #[pymodule_export]
    use super::{
        ConversionBusy, GmemError, HostFault, InvariantError, MemoryFault, MmioExit, PyGuestMemfd,
        PyHost, PyMapping, PyVm, load,
    };

    use pyo3::prelude::*;

    use gmem_core::StrategyKind;
    use gmem_core::strategy::SharedSide;
    use pyo3::types::{PyDict, PyFrozenSet};

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        // What each design is, so that the Python layer reads it instead of restating it:
        // where the shared view lives, and which designs keep attributes per file.
        let sides = PyDict::new(m.py());
        for s in StrategyKind::ALL {
            let side = match s.shared_side() {
                SharedSide::Userspace => "userspace",
                SharedSide::SameFile => "same_file",
                SharedSide::SecondRange => "second_range",
            };
            sides.set_item(s.name(), side)?;
        }
        m.add("SHARED_SIDE", sides)?;
        let per_file = StrategyKind::ALL
            .iter()
            .filter(|s| s.file_attrs())
            .map(|s| s.name());
        m.add("FILE_ATTRIBUTES", PyFrozenSet::new(m.py(), per_file)?)
    }
}
