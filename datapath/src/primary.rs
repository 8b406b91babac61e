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
use std::io;
use std::ops::Deref;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use glommio::io::DmaBuffer;

use crate::export::{BackendError, BackendGeometry, BlockBackend, WriteFlags};
use crate::local::{LocalDisk, Settled};
use crate::metadata::round_down;
use crate::peer::frame::LinkError;
use crate::peer::link::{compressed, Payload, PeerLink, Pending};
use crate::peer::proto::{flags, Kind};
use crate::peer::remote::{Remote, ReplicationMode};
use crate::provider::{push_segment, Allocation, Segment};
use crate::stats::ResourceStats;
use crate::storage::ReadData;

/// Largest payload of one request (NBD's customary maximum).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// The primary of one resource.
pub struct Primary {
    disk: Rc<LocalDisk>,
    stats: Arc<ResourceStats>,
    /// Replaceable (a reload changing `remote` or `source`).
    remote: RefCell<Option<Rc<Remote>>>,
}

/// Data returned by a read: from the local provider, or from the
/// secondary while the primary is being synchronised from it.
pub enum PrimaryRead {
    /// Read locally.
    Local(ReadData),
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

    /// Where the data of `[offset, offset + len)` is, as clients are told
    /// (NBD block status): the local provider's allocation
    /// ([`LocalDisk::allocation`]), except where reads are served by the
    /// peer ([`Remote::reads_from_peer`]: this node is being synchronised
    /// from the secondary and the extent is not copied yet), which is
    /// data: the local holes there are not the truth. This is the one place
    /// that rule lives. Same bounds as [`LocalDisk::allocation`].
    pub fn allocation(&self, offset: u64, len: u64, max_segments: usize) -> Vec<Segment> {
        let end = offset.saturating_add(len).min(self.disk.datasize());
        let max_segments = max_segments.max(1);
        let remote = self.remote().filter(|r| r.reads_from_peer(offset, len));
        let Some(remote) = remote else {
            return self.disk.allocation(offset, len, max_segments);
        };
        let es = self.disk.extentsize();
        let extent_end = |pos: u64| (round_down(pos, es) + es).min(end);
        let mut map = Vec::new();
        let mut pos = offset;
        while pos < end && map.len() < max_segments {
            let next = extent_end(pos);
            if remote.reads_from_peer(pos, next - pos) {
                push_segment(
                    &mut map,
                    Segment {
                        offset: pos,
                        len: next - pos,
                        allocation: Allocation::Data,
                    },
                );
                pos = next;
                continue;
            }
            // The run of extents read locally, asked about at once.
            let mut run_end = next;
            while run_end < end && !remote.reads_from_peer(run_end, extent_end(run_end) - run_end) {
                run_end = extent_end(run_end);
            }
            let room = max_segments - map.len();
            for s in self.disk.allocation(pos, run_end - pos, room) {
                push_segment(&mut map, s);
            }
            match map.last() {
                Some(last) if last.end() == run_end => pos = run_end,
                // The local map stopped short: so does this one.
                _ => break,
            }
        }
        map.truncate(max_segments);
        map
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

    /// Sends the remote leg of a change (it only queues it, after waiting
    /// for room in the replication window); None when the link failed.
    async fn send_remote(
        &self,
        link: &PeerLink,
        change: &Change,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> Option<Pending> {
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
        // `compression` (none: returned as is, the buffer still shared).
        let mode = self.remote().map(|r| r.compression()).unwrap_or_default();
        let (kind, f, payload) = compressed(mode, kind, f, payload);
        // Every mode waits for room in the replication window: that is
        // what bounds how far behind the secondary an async primary can
        // be, so what a crash of the primary can lose (docs/failover.md).
        if link.window_full(payload.len()) {
            self.stats.window_waits.fetch_add(1, Relaxed);
        }
        link.request(kind, f, offset, len, payload).await.ok()
    }

    /// Marks the range before any leg may write it: starts a new
    /// generation first when writing without the peer (once per
    /// disconnected epoch, so a later reconnect can tell who wrote), then
    /// makes the activemap mark durable.
    ///
    /// Our mark must be durable before the secondary can see the write,
    /// not just before our own data write: if we crash after sending, the
    /// secondary (still running) reports only its sync bits at the next
    /// handshake, so our on-disk map is what must cover every write it may
    /// have applied. (Overlapping the two metadata flushes is therefore not
    /// safe.)
    async fn mark(&self, offset: u64, len: u64, alone: bool) -> Result<(), String> {
        if alone {
            self.disk
                .bump_generation_if_needed()
                .await
                .map_err(|e| format!("cannot update the generation counter: {e}"))?;
        }
        self.disk
            .write_start(offset, len)
            .await
            .map_err(|e| format!("cannot mark the activemap: {e}"))
    }

    /// The local leg of a change (and its flush for FUA).
    async fn write_local(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        change: &Change,
    ) -> io::Result<()> {
        match change {
            Change::Write(buf) => self.disk.write_rc(offset, buf.clone()).await?,
            Change::Zero => self.disk.zero(offset, len).await?,
        }
        if fua {
            self.disk.flush().await?;
        }
        Ok(())
    }

    /// The common shape of every data-changing request: lock the range,
    /// mark it, send it, write it locally, then wait for the replication
    /// mode's acknowledgement point.
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
        // The wire carries 32-bit lengths (as NBD does).
        let length = u32::try_from(len).map_err(|_| BackendError::Invalid)?;
        let _q = self.stats.local_queue.enter();
        let range = self.disk.lock_range(offset, len).await;
        let link = self.remote().and_then(|r| r.link());
        if let Err(why) = self.mark(offset, len, link.is_none()).await {
            tracing::error!(path = %self.disk.path().display(), offset, len, "{why}; write refused");
            errors.fetch_add(1, Relaxed);
            return Err(BackendError::Io);
        }
        // Remote first (it only queues), then the local write runs while
        // the data travels.
        let pending = match &link {
            Some(l) => self.send_remote(l, &change, offset, length, fua).await,
            None => None,
        };
        let local = self.write_local(offset, len, fua, &change).await;
        if let Err(e) = &local {
            tracing::error!(path = %self.disk.path().display(), offset, len, error = %e,
                "local write failed");
            errors.fetch_add(1, Relaxed);
        }
        let local_ok = local.is_ok();
        let (Some(pending), Some(link)) = (pending, link) else {
            // No remote leg: the peer lacks this data.
            self.disk.write_complete(offset, len, Settled::NeedsSync);
            return local.map_err(|_| BackendError::Io);
        };
        let leg = RemoteLeg {
            disk: self.disk.clone(),
            stats: self.stats.clone(),
            link,
            offset,
            len,
            local_ok,
        };
        // The acknowledgement point of the replication mode. FUA always
        // waits for the secondary's Done (it flushed before sending it).
        match (self.mode(), fua) {
            (ReplicationMode::FullSync, _) | (_, true) => {
                let done = pending.done().await.map(|_| ());
                leg.settle(done);
            }
            (ReplicationMode::MemSync, false) => {
                // Received (or failed): either way the request is settled
                // from the client's point of view; a failure marks the
                // extent when it completes.
                let _ = pending.received().await;
                leg.settle_at_done(pending);
            }
            (ReplicationMode::Async, false) => leg.settle_at_done(pending),
        }
        drop(range);
        local.map_err(|_| BackendError::Io)
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

/// The remote leg of a write after its local leg completed: settled when
/// the secondary's Done (or the loss of the link) comes.
struct RemoteLeg {
    disk: Rc<LocalDisk>,
    stats: Arc<ResourceStats>,
    link: PeerLink,
    offset: u64,
    len: u64,
    local_ok: bool,
}

impl RemoteLeg {
    /// Records how the write ended on both legs. A copy the secondary
    /// completed may still sit in its disk cache: the extent stays marked
    /// until a flush there (Remote::peer_flush), or is marked for
    /// synchronisation if the connection is lost first. The link is checked
    /// here, with no await since the Done, so that a hold is never taken
    /// after the loss was recorded.
    fn settle(&self, remote: Result<(), LinkError>) {
        if let Err(e) = &remote {
            log_remote_failure(e, self.offset, self.len);
            self.stats.remote_errors.fetch_add(1, Relaxed);
        }
        let outcome = if self.local_ok && remote.is_ok() && self.link.is_alive() {
            Settled::PeerUnflushed
        } else {
            Settled::NeedsSync
        };
        self.disk.write_complete(self.offset, self.len, outcome);
    }

    /// Settles when the request completes, after the client's
    /// acknowledgement (no task waits: the completion runs it).
    fn settle_at_done(self, pending: Pending) {
        let stats = self.stats.clone();
        stats.remote_inflight.inc();
        pending.on_done(move |remote| {
            self.settle(remote);
            self.stats.remote_inflight.dec();
        });
    }
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
        let _q = self.stats.local_queue.enter();
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

    /// Zeroing sends a Zero request to the peer (no data on the wire) and
    /// punches a hole locally: fast when the local punch is
    /// ([`LocalDisk::zero_punches`]). The peer zeroes the same way; even
    /// if its provider writes zeros, nothing crosses the network, so it is
    /// still quicker than the same write.
    fn zeroes_are_fast(&self, offset: u64, len: u64) -> bool {
        self.check(offset, len).is_ok() && self.disk.zero_punches(offset, len)
    }

    async fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_segments: usize,
    ) -> Result<Vec<Segment>, BackendError> {
        self.check(offset, len)?;
        Ok(self.allocation(offset, len, max_segments))
    }
}
