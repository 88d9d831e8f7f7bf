//! Conversion strategies: one trait, one implementation per design argued over in the
//! guest_memfd review (see `docs/strategies.md`).
//!
//! The shared conversion path (`Host::convert`) validates, asks the strategy's
//! `Strategy::gate` whether the conversion may proceed (before anything changes), stores
//! the attributes, zaps stage-2 mappings of the old type, then lets the strategy do its
//! backing work in `Strategy::after_convert`.

mod attr_hook;
mod dual;
mod inplace;
mod realloc;
mod two_offsets;

use crate::error::{Result, einval};
use crate::host::Host;

/// Where the shared view of a gfn lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedSide {
    /// Ordinary host memory at the memslot's `userspace_addr` (mainline TDX/SNP).
    Userspace,
    /// The same guest_memfd page as the private view (in place).
    SameFile,
    /// A second guest_memfd range bound to the memslot.
    SecondRange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum StrategyKind {
    Dual,
    Inplace,
    Realloc,
    TwoOffsets,
    AttrHook,
}

impl StrategyKind {
    pub const ALL: [StrategyKind; 5] = [
        StrategyKind::Dual,
        StrategyKind::Inplace,
        StrategyKind::Realloc,
        StrategyKind::TwoOffsets,
        StrategyKind::AttrHook,
    ];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "dual" => StrategyKind::Dual,
            "inplace" => StrategyKind::Inplace,
            "realloc" => StrategyKind::Realloc,
            "two_offsets" => StrategyKind::TwoOffsets,
            "attr_hook" => StrategyKind::AttrHook,
            _ => {
                return Err(einval(format!(
                    "unknown strategy {s:?} (expected dual, inplace, realloc, two_offsets or attr_hook)"
                )));
            }
        })
    }

    pub fn name(self) -> &'static str {
        self.imp().name()
    }

    pub(crate) fn imp(self) -> &'static dyn Strategy {
        match self {
            StrategyKind::Dual => &dual::Dual,
            StrategyKind::Inplace => &inplace::Inplace,
            StrategyKind::Realloc => &realloc::Realloc,
            StrategyKind::TwoOffsets => &two_offsets::TwoOffsets,
            StrategyKind::AttrHook => &attr_hook::AttrHook,
        }
    }

    /// Attributes of gfns bound to a guest_memfd live at the file's offsets (the same-page
    /// designs). A match, not a trait call: the conversion path asks on every event.
    pub fn file_attrs(self) -> bool {
        matches!(self, StrategyKind::Inplace | StrategyKind::AttrHook)
    }

    /// Whether the strategy's [`Strategy::gate`] can refuse a conversion (the in-place
    /// series' refcount check); the conversion path then checks for a no-op before asking,
    /// instead of storing first.
    pub(crate) fn has_gate(self) -> bool {
        matches!(self, StrategyKind::Inplace)
    }

    pub fn shared_side(self) -> SharedSide {
        self.imp().shared_side()
    }
}

/// One conversion design.
pub(crate) trait Strategy: Sync {
    fn name(&self) -> &'static str;

    fn shared_side(&self) -> SharedSide;

    /// Decide, before any state changes, whether converting `[start, end)` may go ahead
    /// (only strategies for which [`StrategyKind::has_gate`] holds ever refuse).
    fn gate(
        &self,
        _host: &mut Host,
        _vm: usize,
        _start: u64,
        _end: u64,
        _private: bool,
    ) -> Result<()> {
        Ok(())
    }

    /// The strategy's backing work once attributes are stored and stale stage-2 entries are
    /// zapped.
    fn after_convert(&self, host: &mut Host, vm: usize, start: u64, end: u64, private: bool);
}
