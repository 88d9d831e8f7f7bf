//! `gmem.Vm`: the KVM VM ioctls, guest accesses and the batch entry point.

use std::sync::Arc;

use gmem_core::{Error, GmemArg, MemRegion};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::guest_memfd::PyGuestMemfd;
use crate::host::{PyHost, Shared};

/// A VM on a host.
#[pyclass(name = "Vm", module = "gmem", frozen)]
pub(crate) struct PyVm {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: usize,
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
        let fd = g.get().shared.lock().file(g.get().id).fd();
        // A closed file has no fd: the kernel sees a number that is no longer open.
        return Ok(GmemArg::Fd(fd.map_or(-1, i64::from)));
    }
    if let Ok(v) = o.cast::<PyVm>() {
        if foreign(&v.get().shared) {
            return Ok(GmemArg::Foreign);
        }
        return Ok(GmemArg::Fd(i64::from(
            v.get().shared.lock().vm(v.get().id).fd(),
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
        self.shared.lock().vm(self.id).fd()
    }

    #[getter]
    fn vm_type(&self) -> &'static str {
        self.shared.lock().vm(self.id).vm_type().name()
    }

    #[getter]
    fn strategy(&self) -> &'static str {
        self.shared.lock().vm(self.id).strategy().name()
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
            .call(|h| h.create_guest_memfd(self.id, size, flags, page_order))?;
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
            .call(|h| h.set_user_memory_region2(self.id, r))?)
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
        Ok(self.shared.call(|h| {
            h.set_user_memory_region(
                self.id,
                slot,
                flags,
                guest_phys_addr,
                memory_size,
                userspace_addr,
            )
        })?)
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
        Ok(self.shared.call_detached(py, |h| {
            h.set_memory_attributes(self.id, address, size, attributes, flags)
        })?)
    }

    /// populate(gpa, size, value=0) -> pages: kvm_gmem_populate (SNP LAUNCH_UPDATE / TDX
    /// INIT_MEM_REGION): load the initial image into private guest_memfd pages.
    #[pyo3(signature = (gpa, size, value = 0))]
    fn populate(&self, py: Python<'_>, gpa: u64, size: u64, value: u64) -> PyResult<u64> {
        Ok(self
            .shared
            .call_detached(py, |h| h.populate(self.id, gpa, size, value))?)
    }

    /// KVM_PRE_FAULT_MEMORY (6.11): map `[gpa, gpa + size)` into stage-2 ahead of the
    /// guest, as the current attributes say; returns the bytes processed.
    fn pre_fault_memory(&self, py: Python<'_>, gpa: u64, size: u64) -> PyResult<u64> {
        Ok(self
            .shared
            .call_detached(py, |h| h.pre_fault_memory(self.id, gpa, size))?)
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
            .call(|h| h.guest_access(self.id, gpa, private, None))?)
    }

    /// A guest write of `value` to the page at `gpa`.
    #[pyo3(signature = (gpa, value, *, private))]
    fn guest_write(&self, gpa: u64, value: u64, private: bool) -> PyResult<()> {
        self.shared
            .call(|h| h.guest_access(self.id, gpa, private, Some(value)))?;
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
        let mut o = h.vm(self.id).opts();
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
        h.vm_mut(self.id).set_opts(o);
        Ok(())
    }

    /// Merge every split huge folio whose range is wholly private again.
    fn merge_pass(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self
            .shared
            .call_detached(py, |h| Ok(h.merge_pass(self.id)))?)
    }

    /// _apply(events, details): the compiled half of `Vm.apply` (`gmem._events.apply`,
    /// which converts other inputs to this). `events` is a one-dimensional C-contiguous
    /// `EVENT_DTYPE` array; returns the int32 status per event (0 or -errno), and with
    /// `details` also the `DETAIL_DTYPE` records packed in a uint8 array.
    #[pyo3(name = "_apply")]
    fn apply_packed<'py>(
        &self,
        py: Python<'py>,
        events: &Bound<'py, PyAny>,
        details: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        crate::events::apply(py, &self.shared, self.id, events, details)
    }

    fn __repr__(&self) -> String {
        let h = self.shared.lock();
        let v = h.vm(self.id);
        format!(
            "<gmem.Vm fd={} vm_type={} strategy={}>",
            v.fd(),
            v.vm_type().name(),
            v.strategy().name()
        )
    }
}
