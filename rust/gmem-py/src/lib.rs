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
    use crate::error::{ConversionBusy, GmemError, HostFault, InvariantError, MemoryFault};
    #[pymodule_export]
    use crate::guest_memfd::PyGuestMemfd;
    #[pymodule_export]
    use crate::host::{PyHost, load, set_strict_default};
    #[pymodule_export]
    use crate::mapping::PyMapping;
    #[pymodule_export]
    use crate::vm::PyVm;

    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))
    }
}
