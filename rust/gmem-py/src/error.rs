//! The exceptions of `gmem` and the one mapping from the core's errors onto them.

use gmem_core::Error;
use gmem_core::error::HostFaultKind;
use pyo3::exceptions::{PyAssertionError, PyOSError};
use pyo3::prelude::*;

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
pub(crate) struct PyGmemErr(pub(crate) Error);

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
                                HostFaultKind::Poisoned => "hwpoison",
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

pub(crate) type PyRes<T> = Result<T, PyGmemErr>;
