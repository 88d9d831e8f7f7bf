//! `KVM_X86_SW_PROTECTED_VM`: software-only protection. Content stays in place across a
//! conversion, read-only memslots are allowed, private memory maps up to 1 GiB; no
//! hardware step to count.

use super::Platform;
use crate::stage2::Level;

pub struct SwProtected;

impl Platform for SwProtected {
    const NAME: &'static str = "sw_protected";
    const KEEPS_CONTENT: bool = true;
    const HAS_READONLY_MEM: bool = true;
    const MAX_PRIVATE_LEVEL: Level = Level::L1G;
}
