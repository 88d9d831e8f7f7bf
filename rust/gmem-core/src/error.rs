//! Errors of the model: each variant stands for the errno the kernel returns.

use std::fmt;

/// Linux errno values used by the model (x86-64 numbering).
pub mod errno {
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const EBADF: i32 = 9;
    pub const EAGAIN: i32 = 11;
    pub const ENOMEM: i32 = 12;
    pub const EFAULT: i32 = 14;
    pub const EEXIST: i32 = 17;
    pub const ENODEV: i32 = 19;
    pub const EINVAL: i32 = 22;
    pub const ENOTTY: i32 = 25;
    pub const EFBIG: i32 = 27;
    pub const EOPNOTSUPP: i32 = 95;
    /// `EHWPOISON`: the page is hardware-poisoned (`kvm_gmem_get_pfn()` on a page that
    /// `memory_failure()` marked).
    pub const EHWPOISON: i32 = 133;
}

/// Why a host access was refused (the kernel would deliver SIGBUS or fail GUP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFaultKind {
    /// The page is private: the host may not map it.
    Private,
    /// The access lies beyond the end of the file.
    BeyondEof,
    /// The page is hardware-poisoned (`VM_FAULT_HWPOISON`: SIGBUS with `BUS_MCEERR_AR`).
    Poisoned,
}

/// An error of a model operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A plain errno failure with a message saying what was wrong.
    Errno(i32, String),
    /// `KVM_EXIT_MEMORY_FAULT`: the access exits to userspace (`KVM_RUN` returns `EFAULT`).
    MemoryFault { gpa: u64, size: u64, flags: u64 },
    /// `KVM_EXIT_MMIO`: no memslot backs the access, so KVM hands it to the VMM to
    /// emulate (`KVM_RUN` returns 0). Not a failure: the exit's data.
    Mmio {
        phys_addr: u64,
        len: u32,
        is_write: bool,
    },
    /// A host access the kernel refuses (SIGBUS on a mapping, EFAULT from GUP).
    HostFault { addr: u64, kind: HostFaultKind },
    /// An in-place to-private conversion found a page with elevated references.
    Busy { error_offset: u64 },
    /// `check()` found a broken invariant.
    Invariant(String),
}

impl Error {
    /// The errno this error stands for (0 for an invariant failure).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Errno(e, _) => *e,
            Error::MemoryFault { .. } | Error::HostFault { .. } => errno::EFAULT,
            Error::Busy { .. } => errno::EAGAIN,
            Error::Mmio { .. } | Error::Invariant(_) => 0,
        }
    }

    /// The status `apply` reports for an event that ended with this error: `-errno`, or
    /// `KVM_EXIT_MMIO` (positive) for an emulated-MMIO exit.
    pub fn status(&self) -> i32 {
        match self {
            Error::Mmio { .. } => crate::uapi::KVM_EXIT_MMIO,
            e => -e.errno(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Errno(_, msg) | Error::Invariant(msg) => f.write_str(msg),
            Error::MemoryFault { gpa, size, flags } => write!(
                f,
                "KVM_EXIT_MEMORY_FAULT at gpa {gpa:#x} size {size:#x} flags {flags:#x}"
            ),
            Error::HostFault { addr, kind } => match kind {
                HostFaultKind::Private => {
                    write!(f, "host access to private page at {addr:#x} (SIGBUS)")
                }
                HostFaultKind::BeyondEof => {
                    write!(f, "host access beyond end of file at {addr:#x} (SIGBUS)")
                }
                HostFaultKind::Poisoned => {
                    write!(f, "host access to hwpoisoned page at {addr:#x} (SIGBUS)")
                }
            },
            Error::Mmio {
                phys_addr,
                len,
                is_write,
            } => write!(
                f,
                "KVM_EXIT_MMIO: {} of {len} bytes at gpa {phys_addr:#x} (no memslot)",
                if *is_write { "write" } else { "read" }
            ),
            Error::Busy { error_offset } => write!(
                f,
                "conversion refused: page at offset {error_offset:#x} has elevated references"
            ),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand constructors used throughout the model.
pub(crate) fn einval(msg: impl Into<String>) -> Error {
    Error::Errno(errno::EINVAL, msg.into())
}

pub(crate) fn err(errno: i32, msg: impl Into<String>) -> Error {
    Error::Errno(errno, msg.into())
}
