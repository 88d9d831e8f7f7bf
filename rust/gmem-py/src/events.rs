//! The compiled half of `Vm.apply`: `EVENT_DTYPE` records read in place, details written
//! as packed `DETAIL_DTYPE` records. Other inputs are converted by `gmem._events`.

use gmem_core::{Detail, Packed};
use numpy::{IntoPyArray, PyArrayDescr, PyArrayDescrMethods, PyReadonlyArray1};
use numpy::{PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyTypeError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyTuple;

use crate::host::Shared;

/// The layout `Packed` reads: `gmem.EVENT_DTYPE` with little-endian fields.
static EVENT_DTYPE: PyOnceLock<Py<PyArrayDescr>> = PyOnceLock::new();

fn event_dtype(py: Python<'_>) -> PyResult<&Bound<'_, PyArrayDescr>> {
    let spec = [
        ("op", "<u1"),
        ("gfn", "<u8"),
        ("npages", "<u8"),
        ("value", "<u8"),
    ];
    EVENT_DTYPE
        .get_or_try_init(py, || PyArrayDescr::new(py, spec).map(Bound::unbind))
        .map(|d| d.bind(py))
}

/// Run `events` (see `Vm._apply`) on VM `vm` with the GIL released.
pub(crate) fn apply<'py>(
    py: Python<'py>,
    shared: &Shared,
    vm: usize,
    events: &Bound<'py, PyAny>,
    details: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let dtype = event_dtype(py)?;
    let packed = events
        .cast::<PyUntypedArray>()
        .is_ok_and(|a| a.ndim() == 1 && a.is_c_contiguous() && a.dtype().is_equiv_to(dtype));
    if !packed {
        return Err(PyTypeError::new_err(
            "events must be a one-dimensional C-contiguous array of gmem.EVENT_DTYPE",
        ));
    }
    let bytes = events.call_method1(intern!(py, "view"), (PyArrayDescr::of::<u8>(py),))?;
    let bytes: PyReadonlyArray1<'py, u8> = bytes.extract()?;
    let b = bytes.as_slice()?;
    let (status, dets) = shared.detached(py, |h| {
        let mut d = details.then(Vec::new);
        let s = h.call_apply(vm, &Packed::new(b)?, d.as_mut())?;
        Ok((s, d))
    })?;
    let status = status.into_pyarray(py).into_any();
    let Some(dets) = dets else { return Ok(status) };
    let records = pack_details(&dets).into_pyarray(py).into_any();
    Ok(PyTuple::new(py, [status, records])?.into_any())
}

/// Bytes of one `gmem.DETAIL_DTYPE` record: `value`, `fault_gpa` (u64), `fault_flags`
/// (u32), `allocated`, `freed` (u64), packed, in native byte order.
const DETAIL_RECORD: usize = 36;

fn pack_details(details: &[Detail]) -> Vec<u8> {
    let mut out = Vec::with_capacity(details.len() * DETAIL_RECORD);
    for d in details {
        out.extend_from_slice(&d.value.to_ne_bytes());
        out.extend_from_slice(&d.fault_gpa.to_ne_bytes());
        out.extend_from_slice(&d.fault_flags.to_ne_bytes());
        out.extend_from_slice(&d.allocated.to_ne_bytes());
        out.extend_from_slice(&d.freed.to_ne_bytes());
    }
    out
}
