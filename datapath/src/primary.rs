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
use crate::local::{is_detached, LocalDisk, Settled};
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
    /// generation first when the write needs one (alone: once per
    /// disconnected epoch, so a later reconnect can tell who wrote; the
    /// first write ever), then makes the activemap mark durable.
    ///
    /// Our mark must be durable before the secondary can see the write,
    /// not just before our own data write: if we crash after sending, the
    /// secondary (still running) reports only its sync bits at the next
    /// handshake, so our on-disk map is what must cover every write it may
    /// have applied. (Overlapping the two metadata flushes is therefore not
    /// safe.)
    async fn mark(&self, offset: u64, len: u64, alone: bool) -> Result<(), String> {
        self.disk
            .bump_generation_if_needed(alone)
            .await
            .map_err(|e| format!("cannot update the generation counter: {e}"))?;
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
    ///
    /// Faults (docs/failover.md, "What each fault does"): a local failure
    /// the secondary covers (its Done arrived) is acknowledged, and this
    /// disk, which now misses an acknowledged write, is detached; without
    /// the secondary the client gets the error and the extent stays marked.
    /// A detached disk is skipped: the write goes to the secondary only,
    /// which has been told it holds the only copy, and waits for its Done.
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
        let remote = self.remote();
        let link = remote.as_ref().and_then(|r| r.link());
        // An out-of-date node's copy is not the data: a write counts only
        // once the secondary, which holds the data, has it. Without the
        // secondary it is refused, so this node never writes alone (a new
        // generation here would make the two nodes' changes a split-brain).
        let stale = remote.as_ref().is_some_and(|r| r.out_of_date());
        // Only the secondary's copy would count, and there is none.
        if link.is_none() && (stale || self.disk.failed()) {
            let why = if stale {
                "this node is out of date"
            } else {
                "the disk is detached"
            };
            tracing::debug!(
                offset,
                len,
                "write refused: {why} and the secondary is not connected"
            );
            errors.fetch_add(1, Relaxed);
            return Err(BackendError::Io);
        }
        // The local mark, while the disk is used.
        let mut marked = false;
        if !self.disk.failed() {
            match self.mark(offset, len, link.is_none()).await {
                Ok(()) => marked = true,
                Err(why) if link.is_some() => {
                    // The secondary can take the write; this disk, which
                    // cannot record it, is not used any more.
                    errors.fetch_add(1, Relaxed);
                    self.disk.fail(format!("{why} (a write at {offset})"));
                }
                Err(why) => {
                    tracing::error!(path = %self.disk.path().display(), offset, len,
                        "{why}; write refused");
                    errors.fetch_add(1, Relaxed);
                    return Err(BackendError::Io);
                }
            }
        }
        // Remote first (it only queues), then the local write runs while
        // the data travels.
        let pending = match &link {
            Some(l) => self.send_remote(l, &change, offset, length, fua).await,
            None => None,
        };
        let local = if marked {
            self.write_local(offset, len, fua, &change).await
        } else {
            Err(io::Error::other(crate::local::Detached(
                "detached before this write".into(),
            )))
        };
        if let Err(e) = &local {
            if !is_detached(e) {
                tracing::error!(path = %self.disk.path().display(), offset, len, error = %e,
                    "local write failed");
                errors.fetch_add(1, Relaxed);
            }
        }
        let local_ok = local.is_ok();
        let (Some(pending), Some(link), Some(remote)) = (pending, link, remote) else {
            // No remote leg: the peer lacks this data.
            if marked {
                self.disk.write_complete(offset, len, Settled::NeedsSync);
            }
            if stale {
                // Lost with the connection: only the secondary's copy
                // counts (the extent is copied back from it).
                return Err(BackendError::Io);
            }
            return local.map_err(|e| client_error(&e, None));
        };
        let leg = RemoteLeg {
            disk: self.disk.clone(),
            stats: self.stats.clone(),
            link,
            offset,
            len,
            local_ok,
            marked,
        };
        // The acknowledgement point of the replication mode. FUA always
        // waits for the secondary's Done (it flushed before sending it),
        // and so does a write this disk did not take, or one of an
        // out-of-date node: the secondary's copy is then the one that
        // counts.
        let acked = match (self.mode(), fua || !local_ok || stale) {
            (ReplicationMode::FullSync, _) | (_, true) => {
                let done = pending.done().await.map(|_| ());
                let remote_err = done.as_ref().err().cloned();
                let link = leg.link.clone();
                leg.settle(done);
                match (&local, remote_err) {
                    (Ok(()), Some(r)) if stale => {
                        tracing::debug!(offset, len, error = %r,
                            "write failed: this node is out of date and the secondary did not take it");
                        Err(BackendError::Io)
                    }
                    (Ok(()), _) => Ok(()),
                    (Err(e), None) => self.covered_by_peer(&remote, &link, offset, len, e).await,
                    (Err(e), Some(r)) => Err(client_error(e, Some(&r))),
                }
            }
            (ReplicationMode::MemSync, false) => {
                // Received (or failed): either way the request is settled
                // from the client's point of view; a failure marks the
                // extent when it completes.
                let _ = pending.received().await;
                leg.settle_at_done(pending);
                Ok(())
            }
            (ReplicationMode::Async, false) => {
                leg.settle_at_done(pending);
                Ok(())
            }
        };
        drop(range);
        acked
    }

    /// A write (or flush) the secondary completed and this disk did not:
    /// the data is safe on the secondary, so the client is told it
    /// succeeded, but this disk now misses it and is detached; before the
    /// answer the secondary records that its copy is the only one (so that
    /// a later synchronisation goes its way, even after a crash of this
    /// node).
    async fn covered_by_peer(
        &self,
        remote: &Remote,
        link: &PeerLink,
        offset: u64,
        len: u64,
        e: &io::Error,
    ) -> Result<(), BackendError> {
        if !self.disk.failed() {
            self.disk.fail(format!(
                "the secondary completed a request at {offset} ({len} bytes) that failed here ({e}): this disk misses it"
            ));
        }
        if remote.tell_disk_failed(link).await {
            Ok(())
        } else {
            tracing::error!(
                offset,
                len,
                "the secondary did not record that it holds the only copy; request failed"
            );
            Err(BackendError::Io)
        }
    }

    /// Reads `[offset, offset + len)` from the secondary; None (logged)
    /// when it cannot. `PeerCopy::Replica`: the secondary holds a copy of
    /// this node's data, and a reply for an extent that turned out to be
    /// one the secondary lacks (a write's remote leg failed meanwhile) is
    /// refused. `PeerCopy::Current`: this node is out of date and the
    /// secondary holds the current data of the extents marked here.
    async fn read_peer(
        &self,
        remote: &Remote,
        offset: u64,
        len: u32,
        source: PeerCopy,
    ) -> Option<DmaBuffer> {
        let Some(link) = remote.link_for_read().await else {
            tracing::debug!(
                offset,
                len,
                "read refused: it needs the secondary, which is not connected"
            );
            return None;
        };
        match link.call(Kind::Read, 0, offset, len, Payload::None).await {
            Ok(Some(buf)) if buf.len() == len as usize => {
                let refused =
                    source == PeerCopy::Replica && self.peer_lacks(offset, u64::from(len));
                (!refused).then_some(buf)
            }
            Ok(_) => {
                tracing::warn!(
                    offset,
                    len,
                    "the secondary's read reply has the wrong length"
                );
                None
            }
            Err(e) => {
                tracing::warn!(offset, len, error = %e, "read from the secondary failed");
                None
            }
        }
    }

    /// Does the secondary lack the current data of part of this range (an
    /// extent marked for synchronisation towards it)?
    fn peer_lacks(&self, offset: u64, len: u64) -> bool {
        self.disk
            .with_map(|m| m.extent_range(offset, len).any(|e| m.needs_sync(e)))
    }

    /// A client flush: the local disk and (except in async mode) the
    /// secondary's, at once. A local flush that fails while the secondary
    /// flushed is covered by it (see [`Primary::covered_by_peer`]).
    async fn flush_inner(&self) -> Result<(), BackendError> {
        let remote_leg = self.remote();
        let link = remote_leg.as_ref().and_then(|r| r.link());
        // An out-of-date node's writes count on the secondary only: its
        // flush is what makes them durable, in every mode.
        let stale = remote_leg.as_ref().is_some_and(|r| r.out_of_date());
        let remote = async {
            match (&link, &remote_leg) {
                (Some(l), Some(r)) if self.mode() != ReplicationMode::Async || stale => {
                    // Also releases the extents held for the secondary's
                    // flush. A failed flush there drops the link, so the
                    // reconnect resynchronises every extent still marked.
                    r.peer_flush(l).await.is_ok()
                }
                _ => false,
            }
        };
        let (local, remote_ok) = futures_lite::future::zip(self.disk.flush(), remote).await;
        if stale && !remote_ok {
            tracing::debug!(
                "flush failed: this node is out of date and the secondary did not flush"
            );
            return Err(BackendError::Io);
        }
        let Err(e) = local else {
            return Ok(());
        };
        if !is_detached(&e) {
            tracing::error!(path = %self.disk.path().display(), error = %e, "flush failed");
            self.stats.flush_errors.fetch_add(1, Relaxed);
        }
        match (remote_ok, &remote_leg, &link) {
            (true, Some(r), Some(l)) => self.covered_by_peer(r, l, 0, 0, &e).await,
            _ => Err(BackendError::Io),
        }
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
    /// The write was marked in the local activemap (the disk was used).
    marked: bool,
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
        if !self.marked {
            // The disk was detached before this write: there is no local
            // mark to settle.
            return;
        }
        let outcome = match (self.local_ok, remote.is_ok()) {
            (true, true) if self.link.is_alive() => Settled::PeerUnflushed,
            // Only the secondary took it: this disk is detached (its map is
            // no longer written) and the secondary holds the data.
            (false, true) => Settled::InSync,
            _ => Settled::NeedsSync,
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

/// What the secondary's copy of a range is, for a read served from it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PeerCopy {
    /// A replica of this node's data (valid unless marked towards it).
    Replica,
    /// The current data, which this node lacks (valid where marked here).
    Current,
}

/// What the client is told when no leg took a write: ENOSPC when a leg
/// ran out of space (the filesystem under a sparse provider is full),
/// else EIO.
fn client_error(local: &io::Error, remote: Option<&LinkError>) -> BackendError {
    let enospc = libc::ENOSPC as u32;
    let local_full =
        local.raw_os_error() == Some(libc::ENOSPC) || local.kind() == io::ErrorKind::StorageFull;
    if local_full || matches!(remote, Some(LinkError::Remote(n)) if *n == enospc) {
        BackendError::NoSpace
    } else {
        BackendError::Io
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

    /// A read: from the local disk, or from the secondary where this node
    /// lacks the data (being synchronised from it), where the local read
    /// failed (as the original, "trying remote node"; counted in
    /// `reads_from_peer`), or when the local disk is detached. Never from a
    /// secondary that lacks the extent.
    async fn read(&self, offset: u64, len: u32) -> Result<PrimaryRead, BackendError> {
        self.check(offset, u64::from(len))?;
        let _q = self.stats.local_queue.enter();
        self.stats.reads.fetch_add(1, Relaxed);
        let remote = self.remote();
        let fail = || {
            self.stats.read_errors.fetch_add(1, Relaxed);
            BackendError::Io
        };
        if let Some(r) = &remote {
            if r.reads_from_peer(offset, u64::from(len)) {
                // Not synchronised yet: the secondary has the current data.
                return match self.read_peer(r, offset, len, PeerCopy::Current).await {
                    Some(buf) => Ok(PrimaryRead::Remote(buf)),
                    None => Err(fail()),
                };
            }
        }
        if self.disk.failed() {
            let peer = remote.filter(|_| !self.peer_lacks(offset, u64::from(len)));
            return match peer {
                Some(r) => match self.read_peer(&r, offset, len, PeerCopy::Replica).await {
                    Some(buf) => Ok(PrimaryRead::Remote(buf)),
                    None => Err(fail()),
                },
                None => {
                    tracing::debug!(
                        offset,
                        len,
                        "read refused: the disk is detached and the secondary cannot serve it"
                    );
                    Err(fail())
                }
            };
        }
        let e = match self.disk.read(offset, len as usize).await {
            Ok(data) => return Ok(PrimaryRead::Local(data)),
            Err(e) => e,
        };
        self.stats.read_errors.fetch_add(1, Relaxed);
        let peer =
            remote.filter(|r| r.link().is_some() && !self.peer_lacks(offset, u64::from(len)));
        let Some(r) = peer else {
            tracing::error!(path = %self.disk.path().display(), offset, len, error = %e,
                "local read failed");
            return Err(BackendError::Io);
        };
        tracing::warn!(path = %self.disk.path().display(), offset, len, error = %e,
            "local read failed; trying the secondary");
        match self.read_peer(&r, offset, len, PeerCopy::Replica).await {
            Some(buf) => {
                self.stats.reads_from_peer.fetch_add(1, Relaxed);
                Ok(PrimaryRead::Remote(buf))
            }
            None => Err(BackendError::Io),
        }
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
