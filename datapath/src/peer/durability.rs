//! When the secondary's copies become durable.
//!
//! A write's `Done` means the secondary wrote it, not that it survives a
//! power loss there (its disk may cache writes). So the primary holds the
//! extent marked after the `Done` ([`crate::local::Settled::PeerUnflushed`])
//! until a flush of the secondary, begun after that `Done`, has completed
//! ([`Remote::peer_flush`]). This module decides when to send that flush:
//!
//! * when the extents marked *only* because they are held (evicted from
//!   keepdirty, nothing in flight) reach [`PEER_FLUSH_HELD_PER_KEEPDIRTY`]
//!   × keepdirty (at least [`PEER_FLUSH_MIN_HELD`]): after a crash of the
//!   primary, at most that many extents more than keepdirty are
//!   resynchronised. Extents still in the keepdirty set are marked anyway,
//!   so a workload that stays within keepdirty costs no flush of the
//!   secondary while it runs;
//! * once no write came for [`PEER_FLUSH_IDLE`]: one flush makes
//!   everything durable there and releases every hold, so an idle pair
//!   holds nothing that is not durable on both sides;
//! * when the application flushes (the primary's flush path calls
//!   [`Remote::peer_flush`]).
//!
//! The flusher sleeps until one of these can be due: the local disk wakes
//! it when the held-only count reaches the bound (a count kept by the
//! activemap, not a walk of its bits).

use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::frame::LinkError;
use super::link::PeerLink;
use super::remote::Remote;

/// The secondary is flushed when the extents marked only because it has
/// not flushed them reach this many times keepdirty (at least
/// [`PEER_FLUSH_MIN_HELD`]).
pub const PEER_FLUSH_HELD_PER_KEEPDIRTY: usize = 2;

/// See [`PEER_FLUSH_HELD_PER_KEEPDIRTY`].
pub const PEER_FLUSH_MIN_HELD: usize = 16;

/// Writes idle this long: the secondary is flushed once, so an idle pair
/// holds nothing that is not durable on both sides.
pub const PEER_FLUSH_IDLE: Duration = Duration::from_secs(1);

impl Remote {
    /// Flushes the secondary's disk and releases the extents that were
    /// held marked until its copies are durable (those whose Done arrived
    /// before the flush was sent). On failure the held extents are marked
    /// for synchronisation. One at a time.
    pub async fn peer_flush(&self, link: &PeerLink) -> Result<(), LinkError> {
        let _one = self
            .flush_lock
            .acquire_permit(1)
            .await
            .map_err(|_| LinkError::Stopping)?;
        if !link.is_alive() {
            return Err(LinkError::Disconnected);
        }
        self.disk.with_map(|m| m.peer_flush_begin());
        match link.flush().await {
            Ok(()) => {
                self.disk.with_map(|m| m.peer_flush_done());
                Ok(())
            }
            Err(e) => {
                self.disk.with_map(|m| m.peer_lost());
                Err(e)
            }
        }
    }

    /// The flush policy of one connection (see the module documentation);
    /// runs until the link dies or the session drops it.
    pub(super) async fn flusher(self: Rc<Self>, link: PeerLink) {
        let bound = (self.disk.metadata().keepdirty as usize * PEER_FLUSH_HELD_PER_KEEPDIRTY)
            .max(PEER_FLUSH_MIN_HELD);
        let writes = || self.stats.writes.load(Relaxed) + self.stats.deletes.load(Relaxed);
        while link.is_alive() && !self.stop.is_fired() {
            let before = writes();
            let full = self.disk.held_reached(bound);
            let idle = glommio::timer::sleep(PEER_FLUSH_IDLE);
            let stopped = futures_lite::future::or(link.dead(), self.stop.wait());
            futures_lite::future::or(full, futures_lite::future::or(idle, stopped)).await;
            let (holds, only) = self.disk.with_map(|m| (m.holds(), m.held_only()));
            let due = only >= bound || (holds && writes() == before);
            if due && link.is_alive() && self.peer_flush(&link).await.is_err() {
                return;
            }
        }
    }
}
