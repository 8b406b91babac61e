//! Whether a leg's disk is still used (pure: no I/O).
//!
//! Every operation on the local provider reports its outcome here. A disk
//! that keeps failing is **detached**: hastd stops using it, says so once
//! (log, `hastctl list`, the `disk-failed` event and hook) and serves from
//! the other leg, instead of erroring on every request forever (DRBD's
//! `on-io-error detach`). The rules (docs/failover.md, "What each fault
//! does"):
//!
//! * [`FAIL_AFTER`] failed operations in a row, with no successful one in
//!   between, detach the disk. A success resets the count: a disk with a
//!   few bad sectors stays in use (each bad read is served by the peer).
//! * Some faults detach at once ([`Health::fail`]): a provider that
//!   shrank, a write the peer acknowledged but this disk did not take (the
//!   leg is then stale).
//! * A detached disk is never attached again by itself: a role change (or
//!   a restart of hastd) opens the provider afresh.

/// Failed operations in a row that detach a disk.
pub const FAIL_AFTER: u32 = 8;

/// The error state of one disk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Health {
    consecutive: u32,
    failed: Option<String>,
}

impl Health {
    /// An operation succeeded.
    pub fn success(&mut self) {
        self.consecutive = 0;
    }

    /// An operation failed (`what`: the operation, where, the error).
    /// Returns the reason when this failure detaches the disk.
    pub fn error(&mut self, what: &str) -> Option<String> {
        if self.failed.is_some() {
            return None;
        }
        self.consecutive += 1;
        if self.consecutive < FAIL_AFTER {
            return None;
        }
        self.fail(format!(
            "{FAIL_AFTER} failed operations in a row, the last: {what}"
        ))
    }

    /// Detaches the disk now; returns the reason if it was attached.
    pub fn fail(&mut self, why: String) -> Option<String> {
        if self.failed.is_some() {
            return None;
        }
        self.failed = Some(why.clone());
        Some(why)
    }

    /// Why the disk was detached, if it was.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Failed operations since the last success.
    pub fn consecutive_errors(&self) -> u32 {
        self.consecutive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_errors_detach_and_a_success_resets() {
        let mut h = Health::default();
        for _ in 0..FAIL_AFTER - 1 {
            assert_eq!(h.error("read at 0: EIO"), None);
        }
        h.success();
        assert_eq!(h.consecutive_errors(), 0);
        for _ in 0..FAIL_AFTER - 1 {
            assert_eq!(h.error("read at 0: EIO"), None);
        }
        let why = h.error("write at 4096: EIO").expect("detached");
        assert!(why.contains("write at 4096: EIO"), "{why}");
        assert_eq!(h.failed(), Some(why.as_str()));
        // Reported once.
        assert_eq!(h.error("more"), None);
        assert_eq!(h.fail("again".into()), None);
        h.success();
        assert!(h.failed().is_some(), "a detached disk stays detached");
    }

    #[test]
    fn fail_detaches_at_once() {
        let mut h = Health::default();
        assert_eq!(h.fail("shrank".into()), Some("shrank".into()));
        assert_eq!(h.failed(), Some("shrank"));
    }
}
