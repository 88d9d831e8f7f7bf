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
    /// mbind(offset, length, mode, nodes=None): set the NUMA policy of the pages at
    /// `[offset, offset + length)` (mbind(2); on a guest_memfd mapping, the file's shared
    /// policy). It places pages allocated later; allocated ones stay.
    #[pyo3(signature = (offset, length, mode, nodes = None))]
    #[allow(clippy::needless_pass_by_value)] // PyO3 extracts sequences as owned Vec
    fn mbind(&self, offset: u64, length: u64, mode: u32, nodes: Option<Vec<i64>>) -> PyResult<()> {
        let ids = node_ids(nodes);
        self.shared
            .call(|h| h.map_mbind(self.id, offset, length, mode, &ids))?;
        Ok(())
    }
    /// get_mempolicy(offset) -> (mode, nodes): the policy of the page at `offset`
    /// (`get_mempolicy(MPOL_F_ADDR)`); `(MPOL_DEFAULT, [])` where none is set.
    fn get_mempolicy(&self, offset: u64) -> PyResult<(u32, Vec<u32>)> {
        Ok(self.shared.call(|h| h.map_get_mempolicy(self.id, offset))?)
    }
    /// page_node(offset) -> int: the NUMA node of the page mapped at `offset`, as
    /// move_pages(2) reports it; GmemError(ENOENT) when none is mapped there.
    fn page_node(&self, offset: u64) -> PyResult<u32> {
        Ok(self.shared.call(|h| h.map_page_node(self.id, offset))?)
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

/// Node ids as the core takes them: a negative one stands for a bit beyond
/// `MAX_NUMNODES` (`get_nodes()`: EINVAL), as no bit of a node mask is negative.
pub(crate) fn node_ids(nodes: Option<Vec<i64>>) -> Vec<u32> {
    nodes
        .unwrap_or_default()
        .into_iter()
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
        .collect()
}
