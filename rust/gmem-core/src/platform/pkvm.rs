//! pKVM (arm64): the hypervisor keeps content across share/unshare, and promises it to the
//! guest — a strategy that loses a page's content across a conversion breaks the promise
//! (`strategy/lost_content.rs`). Read-only memslots are allowed (arm64 always has them);
//! private memory maps up to 1 GiB.

use super::Platform;
use crate::stage2::Level;

pub struct Pkvm;

impl Platform for Pkvm {
    const NAME: &'static str = "pkvm";
    const KEEPS_CONTENT: bool = true;
    const PROMISES_CONTENT: bool = true;
    const HAS_READONLY_MEM: bool = true;
    const MAX_PRIVATE_LEVEL: Level = Level::L1G;
}
