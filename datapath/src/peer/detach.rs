//! The remote leg when a leg's disk is detached (see [`crate::health`]).
//!
//! * **This node's disk detached** (the primary's): the secondary's copy
//!   is the only one. Before any write that depends on it is acknowledged,
//!   the secondary records so, durably — a new generation, and every
//!   later write marked in its activemap — so that when this disk is
//!   attached again (a role change, a restart of hastd, after a crash
//!   too), the handshake finds the primary out of date and the
//!   synchronisation goes from the secondary (docs/protocol.md). A new
//!   connection says it in its Hello ([`hello_flags::DISK_FAILED`]); a
//!   live one with a [`Kind::DiskFailed`] request, once per connection
//!   ([`Remote::tell_disk_failed`]). Nothing is synchronised meanwhile:
//!   nothing can be written here.
//! * **The secondary's disk detached**: it refuses connections
//!   ([`Refusal::DiskFailed`]); the primary runs degraded, reports it once
//!   (`disk-failed` event, leg `remote`) and retries slowly
//!   ([`retry_pause`]).
//!
//! [`hello_flags::DISK_FAILED`]: super::proto::hello_flags::DISK_FAILED
//! [`Refusal::DiskFailed`]: super::proto::Refusal::DiskFailed

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::frame::LinkError;
use super::handshake::Agreement;
use super::link::{Payload, PeerLink};
use super::proto::{HelloReply, Kind, Refusal};
use super::remote::Remote;
use crate::events::{EventKind, Leg};
use crate::generation::{Decision, SyncDirection};
use crate::signal::Signal;

/// Longest pause between connection attempts while the secondary's disk
/// keeps failing (refused, or requests failing with its errno).
pub const MAX_RETRY_PAUSE: Duration = Duration::from_secs(30);

/// The secondary was told, on one connection, that it holds the only copy.
pub(super) struct Notice {
    link: PeerLink,
    done: Signal,
    ok: Cell<bool>,
}

impl Remote {
    /// Makes sure the secondary knows, on this connection, that this
    /// node's disk is detached and its copy is the only one; resolves with
    /// whether it recorded so (a failure closes the connection). One
    /// request per connection, shared by every caller.
    pub async fn tell_disk_failed(&self, link: &PeerLink) -> bool {
        let current = self
            .notice
            .borrow()
            .as_ref()
            .filter(|n| n.link.is_alive())
            .cloned();
        let notice = match current {
            Some(n) => n,
            None => {
                if !link.is_alive() {
                    return false;
                }
                let n = Rc::new(Notice {
                    link: link.clone(),
                    done: Signal::new(),
                    ok: Cell::new(false),
                });
                *self.notice.borrow_mut() = Some(n.clone());
                let task = n.clone();
                let resource = self.cfg.resource.clone();
                glommio::spawn_local(async move {
                    let r = task
                        .link
                        .call(Kind::DiskFailed, 0, 0, 0, Payload::None)
                        .await;
                    match r {
                        Ok(_) => {
                            tracing::warn!(resource = %resource,
                                "the secondary now holds the only copy of the data (this node's disk is detached)");
                            task.ok.set(true);
                        }
                        Err(e) => {
                            tracing::error!(resource = %resource, error = %e,
                                "the secondary could not record that it holds the only copy");
                            task.link.kill(e);
                        }
                    }
                    task.done.fire();
                })
                .detach();
                n
            }
        };
        notice.done.wait().await;
        notice.ok.get()
    }

    /// The Hello of this connection said the disk is detached, and the
    /// secondary accepted it: it knows.
    fn told_in_hello(&self, link: &PeerLink) {
        let n = Rc::new(Notice {
            link: link.clone(),
            done: Signal::new(),
            ok: Cell::new(true),
        });
        n.done.fire();
        *self.notice.borrow_mut() = Some(n);
    }

    /// A connection of a primary whose disk is detached (the Hello said
    /// so): nothing is synchronised. What the secondary lacks (its own
    /// dirty extents, ours when it is out of date, everything when it is
    /// new) is remembered in memory, where reads look: those fail rather
    /// than return old data. When this node is the one out of date, the
    /// secondary has everything current.
    pub(super) fn adopt_detached(
        &self,
        link: &PeerLink,
        agreement: &Agreement,
        reply: &HelloReply,
    ) {
        self.told_in_hello(link);
        let dir = agreement.decision.direction();
        self.disk.with_map(|m| {
            if dir == Some(SyncDirection::FromSecondary) {
                m.clear_all_sync();
            } else {
                // In memory only: the detached disk is never written.
                let _ = m.merge(&reply.bitmap);
                if matches!(agreement.decision, Decision::ToSecondary { full: true }) {
                    let _ = m.mark_all();
                }
            }
        });
        tracing::warn!(resource = %self.cfg.resource, decision = %agreement.decision,
            unreadable = self.disk.dirty_bytes(),
            "connected with this node's disk detached: reads and writes go to the secondary, which holds the only copy; nothing is synchronised");
    }

    /// Sends the notice as soon as the disk is detached during this
    /// connection (the secondary then says so at once); the task is
    /// dropped with the connection.
    pub(super) fn watch_detach(self: &Rc<Self>, link: &PeerLink) -> glommio::Task<()> {
        let (me, link) = (self.clone(), link.clone());
        glommio::spawn_local(async move {
            me.disk.failed_wait().await;
            me.tell_disk_failed(&link).await;
        })
    }

    /// Records what a handshake says about the secondary's disk: refused
    /// for it (reported once, until a connection is accepted again), or
    /// accepted (working).
    pub(super) fn peer_disk(&self, refusal: Option<(Refusal, &str)>) {
        match refusal {
            Some((Refusal::DiskFailed, message)) => {
                if !self.stats.peer_disk_failed.swap(true, Relaxed) {
                    tracing::error!(resource = %self.cfg.resource, message,
                        "the secondary's disk is detached; running degraded until it is attached again");
                    self.events.emit(EventKind::DiskFailed { leg: Leg::Remote });
                }
            }
            Some(_) => {}
            None => {
                if self.stats.peer_disk_failed.swap(false, Relaxed) {
                    tracing::info!(resource = %self.cfg.resource, "the secondary's disk is attached again");
                }
            }
        }
    }
}

/// Does this failure come from the secondary's disk (it refused us for
/// it, or requests failed there with its errno)? Then reconnecting at once
/// only repeats it: the pause grows.
pub(super) fn peer_disk_error(e: &LinkError) -> bool {
    match e {
        LinkError::Refused {
            reason: Refusal::DiskFailed,
            ..
        }
        | LinkError::Remote(_) => true,
        LinkError::Lost(inner) => peer_disk_error(inner),
        _ => false,
    }
}

/// Is this failure a request that failed on the secondary's disk, with
/// its errno?
pub(super) fn reported_by_peer_disk(e: &LinkError) -> bool {
    match e {
        LinkError::Remote(_) => true,
        LinkError::Lost(inner) => reported_by_peer_disk(inner),
        _ => false,
    }
}

/// The pause before the next connection attempt: `retry`, doubled for
/// each failure in a row caused by the secondary's disk (`streak`), at
/// most [`MAX_RETRY_PAUSE`] (or `retry` if that is longer).
pub fn retry_pause(retry: Duration, streak: u32) -> Duration {
    let factor = 1u32 << streak.min(16);
    retry.saturating_mul(factor).min(MAX_RETRY_PAUSE.max(retry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_doubles_up_to_the_bound() {
        let r = Duration::from_secs(2);
        assert_eq!(retry_pause(r, 0), r);
        assert_eq!(retry_pause(r, 1), Duration::from_secs(4));
        assert_eq!(retry_pause(r, 3), Duration::from_secs(16));
        assert_eq!(retry_pause(r, 4), MAX_RETRY_PAUSE);
        assert_eq!(retry_pause(r, 40), MAX_RETRY_PAUSE);
        let ms = Duration::from_millis(20);
        assert_eq!(retry_pause(ms, 2), Duration::from_millis(80));
    }

    #[test]
    fn disk_errors_of_the_peer_are_recognised() {
        assert!(peer_disk_error(&LinkError::Remote(28)));
        assert!(peer_disk_error(&LinkError::Lost(Box::new(
            LinkError::Remote(5)
        ))));
        assert!(peer_disk_error(&LinkError::Refused {
            reason: Refusal::DiskFailed,
            message: String::new()
        }));
        assert!(!peer_disk_error(&LinkError::Closed));
        assert!(!peer_disk_error(&LinkError::Refused {
            reason: Refusal::Busy,
            message: String::new()
        }));
    }
}
