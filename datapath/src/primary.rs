//! The primary's request path: what the export calls for each client
//! request.
//!
//! A write: lock the range (in arrival order), mark the activemap durably,
//! send to the secondary and write locally in parallel, acknowledge at the
//! replication mode's point, and release the extent only when the
//! secondary's copy is durable: its Done, then a flush there (or mark it
//! for sync when it failed, was lost or is absent).
//! With no peer (`remote none`, or disconnected) the write is local and
//! its extents need synchronisation; the first such write of a
//! disconnected epoch bumps the generation counter first.

use std::cell::RefCell;
use std::ops::Deref;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use glommio::io::{DmaBuffer, ReadResult};

use crate::export::{BackendError, BackendGeometry, BlockBackend, WriteFlags};
use crate::inflight::Inflight;
use crate::local::{LocalDisk, Settled};
use crate::peer::frame::LinkError;
use crate::peer::link::{Payload, PeerLink, Pending};
use crate::peer::proto::{flags, Kind};
use crate::peer::remote::{Remote, ReplicationMode};
use crate::stats::ResourceStats;

/// Largest payload of one request (NBD's customary maximum).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// The primary of one resource.
pub struct Primary {
    disk: Rc<LocalDisk>,
    stats: Arc<ResourceStats>,
    /// Replaceable (a reload changing `remote` or `source`).
    remote: RefCell<Option<Rc<Remote>>>,
    /// Writes acknowledged and still waiting for the secondary's Done.
    remote_inflight: Rc<Inflight>,
}

/// Data returned by a read: from the local provider, or from the
/// secondary while the primary is being synchronised from it.
pub enum PrimaryRead {
    /// Read locally.
    Local(ReadResult),
    /// Read from the secondary.
    Remote(DmaBuffer),
}

impl Deref for PrimaryRead {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            PrimaryRead::Local(r) => r,
            PrimaryRead::Remote(b) => b.as_bytes(),
        }
    }
}

/// Decrements a gauge when dropped (request finished or cancelled).
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn enter(g: &'a AtomicU64) -> Self {
        g.fetch_add(1, Relaxed);
        Gauge(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// What a data-changing request does.
enum Change {
    Write(Rc<DmaBuffer>),
    Zero,
}

impl Primary {
    /// A primary over an open local disk, replicating through `remote`
    /// (None for `remote none`).
    pub fn new(
        disk: Rc<LocalDisk>,
        stats: Arc<ResourceStats>,
        remote: Option<Rc<Remote>>,
    ) -> Primary {
        Primary {
            remote_inflight: Inflight::new(stats.clone()),
            disk,
            stats,
            remote: RefCell::new(remote),
        }
    }

    /// The local leg.
    pub fn disk(&self) -> &Rc<LocalDisk> {
        &self.disk
    }

    /// The remote leg.
    pub fn remote(&self) -> Option<Rc<Remote>> {
        self.remote.borrow().clone()
    }

    /// Replaces the remote leg; returns the old one, for the caller to
    /// stop. Writes after this go to the new leg.
    pub fn set_remote(&self, remote: Option<Rc<Remote>>) -> Option<Rc<Remote>> {
        self.remote.replace(remote)
    }

    /// Writes acknowledged and still waiting for the secondary's Done
    /// (awaitable until none is left).
    pub fn remote_inflight(&self) -> &Inflight {
        &self.remote_inflight
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.disk.datasize() => Ok(()),
            _ => Err(BackendError::Invalid),
        }
    }

    fn mode(&self) -> ReplicationMode {
        self.remote
            .borrow()
            .as_ref()
            .map(|r| r.mode())
            .unwrap_or(ReplicationMode::MemSync)
    }

    /// Sends the remote leg of a change; None when there is no peer.
    async fn send_remote(
        &self,
        link: &Option<PeerLink>,
        change: &Change,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Option<Pending> {
        let link = link.as_ref()?;
        let mut f = 0u8;
        if self.mode() == ReplicationMode::MemSync {
            f |= flags::WANT_RECEIVED;
        }
        if fua {
            f |= flags::FUA;
        }
        let (kind, payload) = match change {
            Change::Write(buf) => (Kind::Write, Payload::Dma(buf.clone())),
            Change::Zero => (Kind::Zero, Payload::None),
        };
        // Every mode waits for room in the replication window: that is
        // what bounds how far behind the secondary an async primary can
        // be, so what a crash of the primary can lose (docs/failover.md).
        if link.window_full(payload.len()) {
            self.stats.window_waits.fetch_add(1, Relaxed);
        }
        link.request(kind, f, offset, len as u32, payload)
            .await
            .ok()
    }

    /// The common shape of every data-changing request.
    async fn modify(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        errors: &AtomicU64,
        change: Change,
    ) -> Result<(), BackendError> {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _q = Gauge::enter(&self.stats.local_queue);
        let range = self.disk.lock_range(offset, len).await;
        let link = self.remote().and_then(|r| r.link());
        if link.is_none() {
            // Writing without the peer: start a new generation first (once
            // per disconnected epoch), so a later reconnect can tell who
            // wrote.
            if let Err(e) = self.disk.bump_generation_if_needed().await {
                tracing::error!(path = %self.disk.path().display(), error = %e,
                    "cannot update the generation counter; write refused");
                errors.fetch_add(1, Relaxed);
                return Err(BackendError::Io);
            }
        }
        // Our mark must be durable before the secondary can see the write,
        // not just before our own data write: if we crash after sending, the
        // secondary (still running) reports only its sync bits at the next
        // handshake, so our on-disk map is what must cover every write it
        // may have applied. (Overlapping the two metadata flushes is
        // therefore not safe.)
        if let Err(e) = self.disk.write_start(offset, len).await {
            tracing::error!(path = %self.disk.path().display(), error = %e,
                "cannot mark the activemap; write refused");
            errors.fetch_add(1, Relaxed);
            return Err(BackendError::Io);
        }
        // Remote first (it only queues), then the local write runs while
        // the data travels.
        let pending = self.send_remote(&link, &change, offset, len, fua).await;
        let local = match &change {
            Change::Write(buf) => self.disk.write_rc(offset, buf.clone()).await,
            Change::Zero => self.disk.zero(offset, len).await,
        };
        let local = match local {
            Ok(()) if fua => self.disk.flush().await,
            other => other,
        };
        let local_ok = local.is_ok();
        if let Err(e) = &local {
            tracing::error!(path = %self.disk.path().display(), offset, len, error = %e,
                "local write failed");
            errors.fetch_add(1, Relaxed);
        }
        let (Some(pending), Some(link)) = (pending, link) else {
            // No remote leg: the peer lacks this data.
            self.disk.write_complete(offset, len, Settled::NeedsSync);
            return if local_ok {
                Ok(())
            } else {
                Err(BackendError::Io)
            };
        };
        // Acknowledgement point of the replication mode. FUA always waits
        // for the secondary's Done (it flushed before sending it).
        let mode = self.mode();
        if mode == ReplicationMode::FullSync || fua {
            let remote_ok = self.wait_done(&pending).await;
            settle(&self.disk, &link, offset, len, local_ok, remote_ok);
            drop(range);
        } else {
            if mode == ReplicationMode::MemSync {
                // Received (or failed): either way the request is settled
                // from the client's point of view; a failure marks the
                // extent below.
                let _ = pending.received().await;
            }
            drop(range);
            // The extent stays marked until the secondary is done.
            let (disk, inflight) = (self.disk.clone(), self.remote_inflight.enter());
            glommio::spawn_local(async move {
                let remote_ok = match pending.done().await {
                    Ok(_) => true,
                    Err(e) => {
                        log_remote_failure(&e, offset, len);
                        false
                    }
                };
                settle(&disk, &link, offset, len, local_ok, remote_ok);
                drop(inflight);
            })
            .detach();
        }
        if local_ok {
            Ok(())
        } else {
            Err(BackendError::Io)
        }
    }

    async fn wait_done(&self, pending: &Pending) -> bool {
        match pending.done().await {
            Ok(_) => true,
            Err(e) => {
                log_remote_failure(&e, 0, 0);
                false
            }
        }
    }

    async fn flush_inner(&self) -> Result<(), BackendError> {
        let remote_leg = self.remote();
        let link = remote_leg.as_ref().and_then(|r| r.link());
        let remote = async {
            match &link {
                Some(l) if self.mode() != ReplicationMode::Async => {
                    // Also releases the extents held for the secondary's
                    // flush. A failed flush there drops the link, so the
                    // reconnect resynchronises every extent still marked.
                    if let Some(r) = &remote_leg {
                        let _ = r.peer_flush(l).await;
                    }
                }
                _ => {}
            }
        };
        let (local, ()) = futures_lite::future::zip(self.disk.flush(), remote).await;
        local.map_err(|e| {
            tracing::error!(path = %self.disk.path().display(), error = %e, "flush failed");
            self.stats.flush_errors.fetch_add(1, Relaxed);
            BackendError::Io
        })
    }
}

/// Records how a write ended on both legs. A copy the secondary completed
/// may still sit in its disk cache: the extent stays marked until a flush
/// there (Remote::peer_flush), or is marked for synchronisation if the
/// connection is lost first. The link is checked here, with no await since
/// the Done, so that a hold is never taken after the loss was recorded.
fn settle(
    disk: &LocalDisk,
    link: &PeerLink,
    offset: u64,
    len: u64,
    local_ok: bool,
    remote_ok: bool,
) {
    if !remote_ok {
        disk.stats().remote_errors.fetch_add(1, Relaxed);
    }
    let outcome = if local_ok && remote_ok && link.is_alive() {
        Settled::PeerUnflushed
    } else {
        Settled::NeedsSync
    };
    disk.write_complete(offset, len, outcome);
}

fn log_remote_failure(e: &LinkError, offset: u64, len: u64) {
    match e {
        LinkError::Disconnected | LinkError::Closed => {
            tracing::debug!(
                offset,
                len,
                "remote leg lost with the connection; extent marked for sync"
            )
        }
        other => {
            tracing::warn!(offset, len, error = %other, "remote leg failed; extent marked for sync")
        }
    }
}

impl BlockBackend for Primary {
    type ReadBuf = PrimaryRead;

    fn geometry(&self) -> BackendGeometry {
        let info = self.disk.info();
        BackendGeometry {
            size: self.disk.datasize(),
            min_block: self.disk.sectorsize() as u32,
            preferred_block: info.physsize.max(4096),
            max_payload: MAX_PAYLOAD,
        }
    }

    fn alloc_buffer(&self, len: usize) -> DmaBuffer {
        self.disk.alloc(len)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<PrimaryRead, BackendError> {
        self.check(offset, u64::from(len))?;
        let _q = Gauge::enter(&self.stats.local_queue);
        self.stats.reads.fetch_add(1, Relaxed);
        if let Some(r) = self.remote() {
            if r.reads_from_peer(offset, u64::from(len)) {
                // Not synchronised yet: the secondary has the current data.
                let Some(link) = r.link() else {
                    self.stats.read_errors.fetch_add(1, Relaxed);
                    return Err(BackendError::Io);
                };
                return match link.call(Kind::Read, 0, offset, len, Payload::None).await {
                    Ok(Some(buf)) if buf.len() == len as usize => Ok(PrimaryRead::Remote(buf)),
                    _ => {
                        self.stats.read_errors.fetch_add(1, Relaxed);
                        Err(BackendError::Io)
                    }
                };
            }
        }
        self.disk
            .read(offset, len as usize)
            .await
            .map(PrimaryRead::Local)
            .map_err(|e| {
                tracing::error!(path = %self.disk.path().display(), offset, len, error = %e,
                    "local read failed");
                self.stats.read_errors.fetch_add(1, Relaxed);
                BackendError::Io
            })
    }

    async fn write(
        &self,
        offset: u64,
        data: DmaBuffer,
        flags: WriteFlags,
    ) -> Result<(), BackendError> {
        self.stats.writes.fetch_add(1, Relaxed);
        let (len, started) = (data.len() as u64, std::time::Instant::now());
        let r = self
            .modify(
                offset,
                len,
                flags.fua,
                &self.stats.write_errors,
                Change::Write(Rc::new(data)),
            )
            .await;
        self.stats.write_latency.observe(started.elapsed());
        r
    }

    async fn flush(&self) -> Result<(), BackendError> {
        self.stats.flushes.fetch_add(1, Relaxed);
        self.flush_inner().await
    }

    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<(), BackendError> {
        self.stats.deletes.fetch_add(1, Relaxed);
        self.modify(
            offset,
            len,
            flags.fua,
            &self.stats.delete_errors,
            Change::Zero,
        )
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> Result<(), BackendError> {
        self.stats.writes.fetch_add(1, Relaxed);
        self.modify(
            offset,
            len,
            flags.fua,
            &self.stats.write_errors,
            Change::Zero,
        )
        .await
    }
}
