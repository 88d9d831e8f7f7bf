//! The file operations guest_memfd does not have: `read`, `write`, `ftruncate`.
//!
//! `kvm_gmem_fops` defines no `read`/`write` and `kvm_gmem_setattr` refuses every size
//! change, so each call fails: `EBADF` once the fd is closed (the kernel looks the fd up
//! first), `EINVAL` otherwise.

use crate::error::{Result, err, errno};
use crate::host::Host;

impl Host {
    /// `read(2)` on guest_memfd `file`: always fails, whatever the count.
    pub fn gmem_read(&self, file: usize) -> Result<()> {
        self.gmem_no_fop(file, "read")
    }

    /// `write(2)` on guest_memfd `file`: always fails, whatever the data.
    pub fn gmem_write(&self, file: usize) -> Result<()> {
        self.gmem_no_fop(file, "write")
    }

    /// `ftruncate(2)` on guest_memfd `file`: always fails, whatever the size.
    pub fn gmem_truncate(&self, file: usize) -> Result<()> {
        self.gmem_no_fop(file, "truncate")
    }

    fn gmem_no_fop(&self, file: usize, what: &str) -> Result<()> {
        if self.file(file).fd.is_none() {
            Err(err(errno::EBADF, format!("{what}: guest_memfd is closed")))
        } else {
            Err(err(
                errno::EINVAL,
                format!("guest_memfd does not support {what}()"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::error::{Error, errno};
    use crate::{Host, StrategyKind, VmType};

    type Fop = fn(&Host, usize) -> crate::Result<()>;
    const FOPS: [(Fop, &str); 3] = [
        (Host::gmem_read, "read"),
        (Host::gmem_write, "write"),
        (Host::gmem_truncate, "truncate"),
    ];

    fn host_and_file() -> (Host, usize) {
        let mut h = Host::new(1 << 20).unwrap();
        let vm = h.create_vm(VmType::SwProtected, StrategyKind::Dual);
        let f = h.create_guest_memfd(vm, 1 << 20, 0, 0).unwrap();
        (h, f)
    }

    #[test]
    fn open_file_is_einval() {
        let (h, f) = host_and_file();
        for (fop, what) in FOPS {
            assert_eq!(
                fop(&h, f),
                Err(Error::Errno(
                    errno::EINVAL,
                    format!("guest_memfd does not support {what}()")
                ))
            );
        }
    }

    #[test]
    fn closed_file_is_ebadf() {
        let (mut h, f) = host_and_file();
        h.gmem_close(f).unwrap();
        for (fop, what) in FOPS {
            assert_eq!(
                fop(&h, f),
                Err(Error::Errno(
                    errno::EBADF,
                    format!("{what}: guest_memfd is closed")
                ))
            );
        }
    }
}
