//! `gmem.Mapping`: a host (VMM) mapping and the host's accesses through it.

use std::sync::Arc;

use gmem_core::HostOp;
use pyo3::prelude::*;

use crate::host::Shared;

/// A host (VMM) mapping: anonymous memory or an mmap of a guest_memfd.
#[pyclass(name = "Mapping", module = "gmem", frozen)]
pub(crate) struct PyMapping {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: usize,
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
            .call(|h| h.map_access(self.id, offset, HostOp::Read))?)
    }
    fn write(&self, offset: u64, value: u64) -> PyResult<()> {
        self.shared
            .call(|h| h.map_access(self.id, offset, HostOp::Write(value)))?;
        Ok(())
    }
    fn pin(&self, offset: u64) -> PyResult<()> {
        self.shared
            .call(|h| h.map_access(self.id, offset, HostOp::Pin))?;
        Ok(())
    }
    fn unpin(&self, offset: u64) -> PyResult<()> {
        self.shared
            .call(|h| h.map_access(self.id, offset, HostOp::Unpin))?;
        Ok(())
    }
    /// discard(offset, length): madvise(MADV_DONTNEED).
    fn discard(&self, py: Python<'_>, offset: u64, length: u64) -> PyResult<()> {
        Ok(self
            .shared
            .call_detached(py, |h| h.map_discard(self.id, offset, length))?)
    }
    fn unmap(&self, py: Python<'_>) -> PyResult<()> {
        Ok(self.shared.call_detached(py, |h| h.map_unmap(self.id))?)
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
