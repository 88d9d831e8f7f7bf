//! Python binding of gmem-core: argument conversion, error mapping and GIL handling only.
//!
//! One file per class, as in the core: `host.rs` (`Host`, `load`), `vm.rs` (`Vm`),
//! `guest_memfd.rs` (`GuestMemfd`), `mapping.rs` (`Mapping`), `events.rs` (the compiled
//! half of `Vm.apply`) and `error.rs` (the exceptions).

mod error;
mod events;
mod guest_memfd;
mod host;
mod mapping;
mod vm;

/// jemalloc with transparent huge pages (see `Cargo.toml`).
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[pyo3::pymodule(gil_used = false)]
mod _gmem {
    #[pymodule_export]
    use crate::error::{
        ConversionBusy, GmemError, HostFault, InvariantError, MemoryFault, MmioExit,
    };
    #[pymodule_export]
    use crate::guest_memfd::PyGuestMemfd;
    #[pymodule_export]
    use crate::host::{PyHost, load, set_strict_default};
    #[pymodule_export]
    use crate::mapping::PyMapping;
    #[pymodule_export]
    use crate::vm::PyVm;

    use gmem_core::StrategyKind;
    use gmem_core::strategy::SharedSide;
    use pyo3::prelude::*;
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
