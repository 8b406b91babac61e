//! Whether a leg's disk is still used (pure: no I/O).
//!
//! Every operation on the local provider reports its outcome here. A disk
//! that keeps failing is **detached**: hastd stops using it, says so once
//! (log, `hastctl list`, the `disk-failed` event and hook) and serves from
//! the other leg, instead of erroring on every request forever (DRBD's
//! `on-io-error detach`). The rules (docs/failover.md, "What each fault
//! does"):
//!
//! * [`FAIL_AFTER`] failed reads in a row, or as many failed writes
//!   (data, activemap, written map, metadata, flushes) in a row, detach the
//!   disk. A successful data read or write resets the count of its kind
//!   (metadata, map and flush successes do not: those sectors are
//!   rewritten in place and prove nothing about the data): a disk with a few bad
//!   sectors stays in use (each bad read is served by the peer), and a
//!   disk that reads but cannot write (ENOSPC under a sparse provider
//!   while a synchronisation reads checksums there) is still detached.
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
    /// Failed reads since the last successful read.
    reads: u32,
    /// Failed writes since the last successful write.
    writes: u32,
    failed: Option<String>,
}

impl Health {
    /// An operation succeeded (`read`: a read, else a write or flush).
    pub fn success(&mut self, read: bool) {
        *self.streak(read) = 0;
    }

    fn streak(&mut self, read: bool) -> &mut u32 {
        if read {
            &mut self.reads
        } else {
            &mut self.writes
        }
    }

    /// An operation failed (`what`: the operation, where, the error).
    /// Returns the reason when this failure detaches the disk.
    pub fn error(&mut self, what: &str, read: bool) -> Option<String> {
        if self.failed.is_some() {
            return None;
        }
        let n = self.streak(read);
        *n += 1;
        if *n < FAIL_AFTER {
            return None;
        }
        let kind = if read { "reads" } else { "writes" };
        self.fail(format!(
            "{FAIL_AFTER} failed {kind} in a row, the last: {what}"
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

    /// The longer of the two streaks of failures.
    pub fn consecutive_errors(&self) -> u32 {
        self.reads.max(self.writes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_errors_detach_and_a_success_resets() {
        let mut h = Health::default();
        for _ in 0..FAIL_AFTER - 1 {
            assert_eq!(h.error("read at 0: EIO", true), None);
        }
        h.success(true);
        assert_eq!(h.consecutive_errors(), 0);
        // Successful reads do not reset failed writes.
        for _ in 0..FAIL_AFTER - 1 {
            assert_eq!(h.error("write at 0: ENOSPC", false), None);
            h.success(true);
        }
        let why = h.error("write at 4096: EIO", false).expect("detached");
        assert!(why.contains("8 failed writes in a row"), "{why}");
        assert!(why.contains("write at 4096: EIO"), "{why}");
        assert_eq!(h.failed(), Some(why.as_str()));
        // Reported once.
        assert_eq!(h.error("more", true), None);
        assert_eq!(h.fail("again".into()), None);
        h.success(false);
        assert!(h.failed().is_some(), "a detached disk stays detached");
    }

    #[test]
    fn fail_detaches_at_once() {
        let mut h = Health::default();
        assert_eq!(h.fail("shrank".into()), Some("shrank".into()));
        assert_eq!(h.failed(), Some("shrank"));
    }
}
