//! `gmem.GuestMemfd`: a guest_memfd file and its file operations.

use std::sync::Arc;

use pyo3::prelude::*;

use crate::error::PyGmemErr;
use crate::host::Shared;
use crate::mapping::PyMapping;

/// A guest_memfd file.
#[pyclass(name = "GuestMemfd", module = "gmem", frozen)]
pub(crate) struct PyGuestMemfd {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: usize,
}

#[pymethods]
impl PyGuestMemfd {
    /// The fd number (-1 once closed).
    #[getter]
    fn fd(&self) -> i32 {
        self.shared.lock().file(self.id).fd().unwrap_or(-1)
    }
    #[getter]
    fn size(&self) -> u64 {
        self.shared.lock().file(self.id).size_pages() << gmem_core::PAGE_SHIFT
    }
    #[getter]
    fn flags(&self) -> u64 {
        self.shared.lock().file(self.id).flags()
    }
    #[getter]
    fn page_order(&self) -> u32 {
        self.shared.lock().file(self.id).order()
    }
    #[getter]
    fn inode(&self) -> u64 {
        self.shared.lock().file(self.id).inode()
    }
    #[getter]
    fn closed(&self) -> bool {
        self.shared.lock().file(self.id).fd().is_none()
    }
    /// Pages held by the page cache.
    #[getter]
    fn nr_pages(&self) -> u64 {
        self.shared.lock().file(self.id).nr_pages()
    }

    /// fallocate(mode, offset, length)
    fn fallocate(&self, py: Python<'_>, mode: u32, offset: u64, length: u64) -> PyResult<()> {
        Ok(self
            .shared
            .call_detached(py, |h| h.gmem_fallocate(self.id, mode, offset, length))?)
    }

    /// guest_memfd has no read(): always EINVAL.
    fn read(&self, n: u64) -> PyResult<()> {
        // Whatever the count, the call fails.
        let _ = n;
        Ok(self.shared.lock().gmem_read(self.id).map_err(PyGmemErr)?)
    }

    /// guest_memfd has no write(): always EINVAL.
    fn write(&self, data: &Bound<'_, PyAny>) -> PyResult<()> {
        // Whatever the data, the call fails.
        let _ = data;
        Ok(self.shared.lock().gmem_write(self.id).map_err(PyGmemErr)?)
    }

    /// guest_memfd cannot be resized: always EINVAL.
    fn truncate(&self, size: u64) -> PyResult<()> {
        // Whatever the size, the call fails.
        let _ = size;
        Ok(self
            .shared
            .lock()
            .gmem_truncate(self.id)
            .map_err(PyGmemErr)?)
    }

    /// mmap(offset=0, length=None, *, shared=True) -> Mapping
    #[pyo3(signature = (offset = 0, length = None, *, shared = true))]
    fn mmap(&self, offset: u64, length: Option<u64>, shared: bool) -> PyResult<PyMapping> {
        let id = self
            .shared
            .call(|h| h.gmem_mmap(self.id, offset, length, shared))?;
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
        Ok(self.shared.call_detached(py, |h| {
            h.set_memory_attributes2(self.id, offset, size, attributes, flags)
        })?)
    }

    /// The attribute at file `offset` (inplace / attr_hook).
    fn get_memory_attributes2(&self, offset: u64) -> PyResult<u64> {
        Ok(self
            .shared
            .lock()
            .get_memory_attributes2(self.id, offset)
            .map_err(PyGmemErr)?)
    }

    /// memory_failure(offset): the page at `offset` suffers an uncorrectable memory error
    /// (the kernel's `memory_failure()` reaching `kvm_gmem_error_folio()`): its stage-2
    /// mappings and host mappings go, it stays in the page cache poisoned; later guest
    /// accesses fail with `EHWPOISON`, host accesses with `HostFault` (SIGBUS); punching the
    /// hole drops it. `EINVAL` for an unaligned offset or one beyond the size, `ENOENT` where
    /// no page is present (a released file has none), `EHWPOISON` for a page already
    /// poisoned.
    fn memory_failure(&self, py: Python<'_>, offset: u64) -> PyResult<()> {
        Ok(self
            .shared
            .call_detached(py, |h| h.memory_failure(self.id, offset))?)
    }

    /// close() the fd.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        Ok(self.shared.call_detached(py, |h| h.gmem_close(self.id))?)
    }

    fn __repr__(&self) -> String {
        let h = self.shared.lock();
        let f = h.file(self.id);
        format!(
            "<gmem.GuestMemfd inode={} size={:#x} flags={:#x}>",
            f.inode(),
            f.size_pages() << 12,
            f.flags()
        )
    }
}
