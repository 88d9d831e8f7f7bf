//! `KVM_X86_DEFAULT_VM` (mainline 6.18): a VM without private memory that may still back
//! its RAM with guest_memfd. Nothing is private: `KVM_CAP_MEMORY_ATTRIBUTES` reports 0 and
//! `KVM_SET_MEMORY_ATTRIBUTES` refuses PRIVATE (`EINVAL`, `kvm_supported_mem_attributes()`
//! is 0 without `kvm_arch_has_private_mem()`); the in-place series' guest_memfd ioctl
//! refuses it too. Because the VM has no private memory, x86
//! `kvm_arch_supports_gmem_init_shared()` is true: `GUEST_MEMFD_FLAG_INIT_SHARED` is
//! offered with `GUEST_MEMFD_FLAG_MMAP`. A memslot bound to a guest_memfd created with
//! `MMAP` is guest_memfd-only (`KVM_MEMSLOT_GMEM_ONLY`): every guest fault is served from
//! guest_memfd, `userspace_addr` is used only by host accesses. Read-only memslots are
//! allowed (`kvm_arch_has_readonly_mem()`: no protected state). The NO_DIRECT_MAP series
//! (v12) supports the VM type (`kvm_arch_gmem_supports_no_direct_map()` excludes only TDX
//! and SNP).
//!
//! Guest accesses are all shared: the hardware of a default VM cannot make a private access
//! (no private bit in the fault error code). The model keeps its one rule for a guest
//! access whose private-ness differs from the gfn's attribute, a memory-fault exit.

use super::Platform;
use crate::stage2::Level;

pub struct DefaultVm;

impl Platform for DefaultVm {
    const NAME: &'static str = "default";
    // Nothing converts; content is never scrubbed.
    const KEEPS_CONTENT: bool = true;
    const HAS_READONLY_MEM: bool = true;
    const MAX_PRIVATE_LEVEL: Level = Level::L1G;
    const HAS_PRIVATE_MEM: bool = false;
}

#[cfg(test)]
mod tests {
    use crate::error::{Error, errno};
    use crate::{Host, HostOp, PAGE_SIZE, StrategyKind, VmType, uapi};

    const MMAP_SHARED: u64 = uapi::GUEST_MEMFD_FLAG_MMAP | uapi::GUEST_MEMFD_FLAG_INIT_SHARED;

    fn errno_of<T: std::fmt::Debug>(r: crate::Result<T>) -> i32 {
        match r {
            Err(Error::Errno(e, _)) => e,
            other => panic!("expected an errno, got {other:?}"),
        }
    }

    /// A default VM with one guest_memfd (flags `flags`) bound at gpa 0, `userspace_addr`
    /// pointing at anonymous memory.
    fn guest(strategy: StrategyKind, flags: u64) -> (Host, usize, usize) {
        let mut h = Host::new(16 << 20).unwrap();
        let vm = h.create_vm(VmType::Default, strategy);
        let f = h.create_guest_memfd(vm, 1 << 20, flags, 0).unwrap();
        h.bind_at_zero(vm, f, 1 << 20);
        (h, vm, f)
    }

    #[test]
    fn parses_and_reports_no_private_memory() {
        assert_eq!(VmType::parse("default").unwrap(), VmType::Default);
        assert!(!VmType::Default.has_private_mem());
        assert!(VmType::ALL.iter().all(|t| t.has_private_mem()));
        assert!(VmType::Default.has_readonly_mem());
    }

    #[test]
    fn capabilities_of_every_design() {
        for s in StrategyKind::ALL {
            let mut h = Host::new(1 << 20).unwrap();
            let vm = h.create_vm(VmType::Default, s);
            assert_eq!(h.check_extension(vm, uapi::KVM_CAP_MEMORY_ATTRIBUTES), 0);
            assert_eq!(
                h.check_extension(vm, uapi::KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES),
                0
            );
            assert_eq!(h.check_extension(vm, uapi::KVM_CAP_GUEST_MEMFD), 1);
            assert_eq!(
                h.check_extension(vm, uapi::KVM_CAP_GUEST_MEMFD_FLAGS),
                MMAP_SHARED | uapi::GUEST_MEMFD_FLAG_NO_DIRECT_MAP,
                "{s:?}"
            );
        }
    }

    #[test]
    fn private_attribute_is_einval_shared_is_a_no_op() {
        let (mut h, vm, _) = guest(StrategyKind::Dual, MMAP_SHARED);
        let p = uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE;
        assert_eq!(
            errno_of(h.set_memory_attributes(vm, 0, PAGE_SIZE, p, 0)),
            errno::EINVAL
        );
        h.set_memory_attributes(vm, 0, PAGE_SIZE, 0, 0).unwrap();
        assert_eq!(errno_of(h.convert(vm, 0, 1, true)), errno::EINVAL);
        h.convert(vm, 0, 1, false).unwrap();
        assert_eq!(h.stats(vm).conversions, 0);
        assert_eq!(h.get_memory_attributes(vm, 0), 0);
        h.check().unwrap();
    }

    #[test]
    fn in_place_ioctl_is_einval() {
        let (mut h, _, f) = guest(StrategyKind::Inplace, MMAP_SHARED);
        let p = uapi::KVM_MEMORY_ATTRIBUTE_PRIVATE;
        assert_eq!(
            errno_of(h.set_memory_attributes2(f, 0, PAGE_SIZE, p, 0)),
            errno::EINVAL
        );
    }

    #[test]
    fn guest_faults_come_from_guest_memfd_for_every_design() {
        for s in StrategyKind::ALL {
            let (mut h, vm, f) = guest(s, MMAP_SHARED);
            assert_eq!(h.guest_access(vm, 0, false, Some(7)).unwrap(), 7);
            // The page is the guest_memfd's: the host sees it through the file's mmap.
            let m = h.gmem_mmap(f, 0, None, true).unwrap();
            assert_eq!(h.map_access(m, 0, HostOp::Read).unwrap(), 7, "{s:?}");
            assert_eq!(h.file(f).nr_pages(), 1);
            // Nothing is private: a private access exits as a memory fault.
            assert!(matches!(
                h.guest_access(vm, PAGE_SIZE, true, None),
                Err(Error::MemoryFault { .. })
            ));
            h.check().unwrap();
        }
    }

    #[test]
    fn host_mapping_needs_init_shared() {
        for s in StrategyKind::ALL {
            let (mut h, vm, f) = guest(s, uapi::GUEST_MEMFD_FLAG_MMAP);
            let m = h.gmem_mmap(f, 0, None, true).unwrap();
            assert!(matches!(
                h.map_access(m, 0, HostOp::Read),
                Err(Error::HostFault { .. })
            ));
            // The guest still reaches the page (mainline 6.18 checks no attribute).
            assert_eq!(h.guest_access(vm, 0, false, Some(3)).unwrap(), 3, "{s:?}");
        }
    }

    #[test]
    fn without_mmap_shared_faults_use_userspace_addr() {
        let (mut h, vm, f) = guest(StrategyKind::Dual, 0);
        h.guest_access(vm, 0, false, Some(1)).unwrap();
        assert_eq!(h.file(f).nr_pages(), 0);
    }
}
