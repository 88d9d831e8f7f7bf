//! `KVM_SET_USER_MEMORY_REGION`, the v1 memslot ioctl: a subset of
//! `KVM_SET_USER_MEMORY_REGION2` without a guest_memfd.

use crate::error::{Result, einval};
use crate::host::{GmemArg, Host, MemRegion};
use crate::uapi;

impl Host {
    /// `KVM_SET_USER_MEMORY_REGION` (v1): `struct kvm_userspace_memory_region` has no
    /// guest_memfd field, so `KVM_MEM_GUEST_MEMFD` is refused with `EINVAL` (KERNEL.md §1,
    /// check 1); everything else is `set_user_memory_region2` without a guest_memfd.
    pub fn set_user_memory_region(
        &mut self,
        vm: usize,
        slot: u32,
        flags: u32,
        guest_phys_addr: u64,
        memory_size: u64,
        userspace_addr: u64,
    ) -> Result<()> {
        if flags & uapi::KVM_MEM_GUEST_MEMFD != 0 {
            return Err(einval(
                "KVM_MEM_GUEST_MEMFD needs KVM_SET_USER_MEMORY_REGION2",
            ));
        }
        self.set_user_memory_region2(
            vm,
            MemRegion {
                slot,
                flags,
                guest_phys_addr,
                memory_size,
                userspace_addr,
                guest_memfd: GmemArg::None,
                guest_memfd_offset: 0,
                shared_guest_memfd: GmemArg::None,
                shared_offset: None,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::error::{Error, errno};
    use crate::{Host, StrategyKind, VmType, uapi};

    const MIB: u64 = 1 << 20;

    fn host_and_vm() -> (Host, usize, u64) {
        let mut h = Host::new(16 * MIB).unwrap();
        let vm = h.create_vm(VmType::SwProtected, StrategyKind::Dual);
        let m = h.mmap_anonymous(MIB).unwrap();
        let addr = h.mapping(m).addr;
        (h, vm, addr)
    }

    #[test]
    fn guest_memfd_flag_is_einval_and_adds_no_slot() {
        let (mut h, vm, addr) = host_and_vm();
        let e = h
            .set_user_memory_region(vm, 0, uapi::KVM_MEM_GUEST_MEMFD, 0, MIB, addr)
            .unwrap_err();
        assert!(matches!(e, Error::Errno(errno::EINVAL, ref m) if m.contains("REGION2")));
        // The slot is still free: the same region without the flag is accepted.
        h.set_user_memory_region(vm, 0, 0, 0, MIB, addr).unwrap();
        h.check().unwrap();
    }

    #[test]
    fn v1_region_backs_guest_memory_with_the_mapping() {
        let (mut h, vm, addr) = host_and_vm();
        h.set_user_memory_region(vm, 0, 0, 0, MIB, addr).unwrap();
        h.guest_access(vm, 0x2000, false, Some(5)).unwrap();
        assert_eq!(h.guest_access(vm, 0x2000, false, None).unwrap(), 5);
        h.check().unwrap();
    }

    #[test]
    fn other_errors_are_those_of_region2() {
        let (mut h, vm, addr) = host_and_vm();
        // Unaligned size: the v2 ioctl's EINVAL.
        let e = h
            .set_user_memory_region(vm, 0, 0, 0, MIB + 1, addr)
            .unwrap_err();
        assert_eq!(e.errno(), errno::EINVAL);
        let r2 = h
            .set_user_memory_region2(
                vm,
                crate::MemRegion {
                    slot: 0,
                    flags: 0,
                    guest_phys_addr: 0,
                    memory_size: MIB + 1,
                    userspace_addr: addr,
                    guest_memfd: crate::GmemArg::None,
                    guest_memfd_offset: 0,
                    shared_guest_memfd: crate::GmemArg::None,
                    shared_offset: None,
                },
            )
            .unwrap_err();
        assert_eq!(e, r2);
    }
}
