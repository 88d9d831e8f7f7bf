//! Confidential-computing platforms (`vm_type`) and what a conversion means on each.

use crate::error::{Result, einval};
use crate::stage2::Level;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum VmType {
    /// `KVM_X86_SW_PROTECTED_VM`: software-only protection, content kept in place.
    SwProtected,
    /// pKVM: the hypervisor keeps content across share/unshare (in place).
    Pkvm,
    /// Intel TDX: private pages are added/augmented and accepted; removal scrubs.
    Tdx,
    /// AMD SEV-SNP: RMP assigns each private pfn to exactly one gpa; conversion scrubs.
    Snp,
}

impl VmType {
    pub const ALL: [VmType; 4] = [VmType::SwProtected, VmType::Pkvm, VmType::Tdx, VmType::Snp];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "sw_protected" => VmType::SwProtected,
            "pkvm" => VmType::Pkvm,
            "tdx" => VmType::Tdx,
            "snp" => VmType::Snp,
            _ => {
                return Err(einval(format!(
                    "unknown vm_type {s:?} (expected sw_protected, pkvm, tdx or snp)"
                )));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            VmType::SwProtected => "sw_protected",
            VmType::Pkvm => "pkvm",
            VmType::Tdx => "tdx",
            VmType::Snp => "snp",
        }
    }

    /// Whether an in-place conversion keeps the page's content (pKVM and software
    /// protection) or scrubs it (TDX, SNP: the memory is re-keyed / re-assigned).
    pub fn keeps_content(self) -> bool {
        matches!(self, VmType::SwProtected | VmType::Pkvm)
    }

    /// Whether the platform promises the guest that a page it shares keeps its content —
    /// pKVM's share/unshare ABI. A strategy that loses content breaks the promise.
    pub fn promises_content(self) -> bool {
        matches!(self, VmType::Pkvm)
    }

    /// Whether memslots may be `KVM_MEM_READONLY` (`kvm_arch_has_readonly_mem()`): on x86
    /// not for VMs with protected state (SEV-ES, SEV-SNP, TDX: writes to read-only memory
    /// are emulated MMIO, which KVM cannot emulate for them), on arm64 (pKVM) always.
    pub fn has_readonly_mem(self) -> bool {
        matches!(self, VmType::SwProtected | VmType::Pkvm)
    }

    /// Largest stage-2 level for private memory. TDX and SNP map private memory at most at
    /// 2 MiB (S-EPT / 2 MiB RMP entries); pKVM and software protection allow 1 GiB.
    pub fn max_private_level(self) -> Level {
        match self {
            VmType::SwProtected | VmType::Pkvm => Level::L1G,
            VmType::Tdx | VmType::Snp => Level::L2M,
        }
    }
}
