//! Strict mode (`Host::strict`) at the boundary of the public API: every call that
//! changes the model is followed by one check of every invariant of the host.

use crate::error::Result;
use crate::events::{Detail, Events};
use crate::host::Host;

/// Turns strict mode back on when dropped, even when the operation panics.
struct Suspended<'a>(&'a mut Host);

impl Drop for Suspended<'_> {
    fn drop(&mut self) {
        self.0.strict = true;
    }
}

impl Host {
    /// Run `op`, one call of the public API. In strict mode, once `op` succeeds, every
    /// invariant of the host is checked (`check`), once. Operations make no checks of
    /// their own: strict mode lives here, at the boundary, and in `call_apply`. While `op`
    /// runs, strict mode is off, so that a batch it runs makes no per-event checks that
    /// the one check after it covers. A failed `op` is not checked, as it changed nothing.
    #[inline]
    pub fn call<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.strict {
            self.call_strict(op)
        } else {
            op(self)
        }
    }

    // Kept out of line: the common, non-strict call stays as short as the operation.
    #[cold]
    fn call_strict<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let out = {
            let s = Suspended(self);
            s.0.strict = false;
            op(s.0)?
        };
        self.check()?;
        Ok(out)
    }

    /// `apply_events` as one call of the public API. In strict mode the batch checks its
    /// VM after every event (so that the first event to break an invariant stops it), and
    /// the call then checks the whole host once.
    pub fn call_apply(
        &mut self,
        vm: usize,
        events: &impl Events,
        details: Option<&mut Vec<Detail>>,
    ) -> Result<Vec<i32>> {
        let status = self.apply_events(vm, events, details)?;
        if self.strict {
            self.check()?;
        }
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use std::panic::{AssertUnwindSafe, catch_unwind};

    use crate::error::{Error, errno};
    use crate::{Host, Packed, StrategyKind, VmType};

    const MIB: u64 = 1 << 20;

    /// A host whose guest_memfd mmap count disagrees with its mappings: only the
    /// host-wide `check` sees it, no VM's `check_vm`.
    fn broken(strict: bool) -> Host {
        let mut h = Host::new(4 * MIB).unwrap();
        h.create_vm(VmType::SwProtected, StrategyKind::Dual);
        h.space.gmem_mmaps += 1;
        h.strict = strict;
        h
    }

    fn is_invariant<T>(r: &crate::Result<T>) -> bool {
        matches!(r, Err(Error::Invariant(m)) if m.contains("mmaps"))
    }

    #[test]
    fn strict_call_checks_the_whole_host_after_success() {
        assert!(is_invariant(&broken(true).call(|h| h.mmap_anonymous(MIB))));
        assert!(broken(false).call(|h| h.mmap_anonymous(MIB)).is_ok());
    }

    #[test]
    fn failed_call_is_not_checked() {
        // Unknown flags: EINVAL.
        let r = broken(true).call(|h| h.set_memory_attributes(0, 0, 4096, 0, 1));
        assert_eq!(r.unwrap_err().errno(), errno::EINVAL);
    }

    #[test]
    fn inner_checks_are_suspended_and_strict_mode_restored() {
        let mut h = broken(true);
        let seen = h.call(|h| Ok(h.strict));
        assert!(is_invariant(&seen));
        assert!(h.strict);
        let mut ok = Host::new(4 * MIB).unwrap();
        ok.strict = true;
        assert_eq!(ok.call(|h| Ok(h.strict)), Ok(false));
        assert!(ok.strict);
    }

    #[test]
    fn strict_mode_survives_a_panicking_call() {
        let mut h = Host::new(4 * MIB).unwrap();
        h.strict = true;
        let r = catch_unwind(AssertUnwindSafe(|| {
            h.call::<()>(|_| panic!("an operation panics"))
        }));
        assert!(r.is_err());
        assert!(h.strict);
    }

    #[test]
    fn strict_batch_checks_the_whole_host_at_the_end() {
        let empty = Packed::new(&[]).unwrap();
        assert!(is_invariant(&broken(true).call_apply(0, &empty, None)));
        assert_eq!(broken(false).call_apply(0, &empty, None), Ok(vec![]));
    }
}
