//! Synchronisation: copying the extents that may differ, from the node
//! with the current data to the other, while the application runs.
//!
//! A pass walks the dirty extents in order and copies each in chunks
//! (`sync_chunk` bytes, `sync_window` chunks in flight), each chunk under
//! its range lock so that an application write to the same bytes waits.
//! An extent's bit is cleared only when every chunk of it was copied and
//! no write marked it again meanwhile; passes repeat until nothing is
//! dirty. Then both nodes record the same generation (the destination
//! first).
//!
//! Rate control: while the application has requests in flight, one chunk
//! is in flight at a time and each is followed by a pause as long as it
//! took, so the synchronisation takes about half of the disk and link
//! time; an idle application gets the full window.
//!
//! What a chunk costs (docs/protocol.md, "Synchronisation"):
//! - extents that neither node wrote since `hastctl create` (their
//!   written maps) are skipped without reading them;
//! - a chunk the source's provider has as a hole (`SEEK_HOLE`) is sent as
//!   a `Zero` without reading it;
//! - with checksums (`syncmode`), the destination's block digests are
//!   compared with the source's and only differing blocks move;
//! - data chunks travel compressed when `compression` says so and it
//!   pays.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use glommio::sync::Gate;

use crate::semaphore::Semaphore;

use std::fmt;
use std::str::FromStr;

use bitvec::prelude::*;

use super::checksum::{self, digest_range};
use super::compress::{self, Compression, Wire};
use super::frame::{self, LinkError};
use super::link::{Payload, PeerLink, Pending};
use super::proto::{flags, ChecksumsRequest, Kind, SyncComplete};
use super::remote::Remote;
use crate::digest::{Algo, DIGEST_BLOCK};
use crate::events::EventKind;
use crate::generation::{Gen, SyncDirection};
use crate::local::LocalDisk;
use crate::metadata::FLAG_INCONSISTENT;
use crate::provider::Allocation;
use crate::signal::Notify;

/// Synchronisation chunks in flight at most while the application has
/// requests in flight.
pub const SYNC_WINDOW_UNDER_LOAD: usize = 1;

/// Longest pause after a chunk while the application is busy.
const MAX_YIELD: Duration = Duration::from_millis(200);

/// Longest wait for the chunks in flight to drain when the application
/// becomes busy.
const MAX_DRAIN: Duration = Duration::from_secs(1);

/// Passes over the dirty extents before a synchronisation gives up (the
/// application keeps marking extents faster than they are copied); the
/// connection is then restarted, which starts over.
const MAX_PASSES: u32 = 1000;

/// How a synchronisation moves data (hast.conf `syncmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SyncMode {
    /// Checksums for resynchronisations (after a crash, a disconnect, a
    /// split-brain), a full copy for a new secondary (the default).
    #[default]
    Auto,
    /// Always copy every byte of a dirty extent.
    Full,
    /// Always compare block checksums first, a new secondary included (a
    /// provider re-created over a copy of the data, say).
    Checksum,
}

impl SyncMode {
    /// Every mode.
    pub const ALL: [SyncMode; 3] = [SyncMode::Auto, SyncMode::Full, SyncMode::Checksum];

    /// The hast.conf keyword.
    pub const fn as_str(self) -> &'static str {
        match self {
            SyncMode::Auto => "auto",
            SyncMode::Full => "full",
            SyncMode::Checksum => "checksum",
        }
    }

    /// Does a synchronisation compare checksums first? `new_secondary`:
    /// the destination was just created (a full synchronisation).
    pub const fn checksums(self, new_secondary: bool) -> bool {
        match self {
            SyncMode::Auto => !new_secondary,
            SyncMode::Full => false,
            SyncMode::Checksum => true,
        }
    }
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SyncMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown syncmode '{s}' (expected auto, full or checksum)"))
    }
}

/// How the chunks of one pass are copied.
#[derive(Debug, Clone, Copy)]
struct ChunkOpts {
    /// Compare checksums first (with this algorithm).
    checksums: Option<Algo>,
    /// How data travels to the secondary.
    compression: Compression,
}

/// What copying a chunk did, for the counters.
#[derive(Debug, Clone, Copy, Default)]
struct ChunkOutcome {
    /// Bytes found identical by their checksums (not moved).
    identical: u64,
}

/// Extents examined between two yields to the executor when skipping
/// extents nobody wrote (a 15 TiB resource has millions of them).
const SKIP_BATCH: u32 = 4096;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The chunks of one pass in flight, for rate control.
#[derive(Default)]
struct InFlight {
    count: Cell<usize>,
    /// How long the last chunk took.
    last: Cell<Duration>,
    /// Notified when a chunk finishes.
    finished: Notify,
}

impl Remote {
    /// Synchronises until no extent is dirty, then records the new
    /// generation on both sides.
    pub(super) async fn synchronise(
        &self,
        link: &PeerLink,
        dir: SyncDirection,
        target: u64,
        p_gen: &Gen,
    ) -> Result<(), LinkError> {
        let need =
            self.disk.dirty_bytes() > 0 || p_gen.localcnt != target || p_gen.remotecnt != target;
        if !need {
            return Ok(());
        }
        let lerr = |e| LinkError::disk("metadata update", None, e);
        match dir {
            SyncDirection::ToSecondary => {
                link.call(Kind::SyncStart, 0, 0, 0, Payload::None).await?;
            }
            SyncDirection::FromSecondary => {
                self.disk
                    .update_metadata(|m| m.flags |= FLAG_INCONSISTENT)
                    .await
                    .map_err(lerr)?;
            }
        }
        let stats = &self.stats;
        stats.sync_total.store(self.disk.dirty_bytes(), Relaxed);
        stats.sync_done.store(0, Relaxed);
        stats.sync_started_ms.store(now_ms(), Relaxed);
        self.set_sync(Some(dir));
        let started = Instant::now();
        let sent_before = stats.net_sent_bytes.load(Relaxed);
        let received_before = stats.net_received_bytes.load(Relaxed);
        tracing::info!(resource = %self.cfg.resource, direction = ?dir,
            bytes = self.disk.dirty_bytes(),
            checksums = self.pass_checksums(), compression = %self.compression(),
            "synchronisation started");
        self.events.emit(EventKind::SyncStart);
        let result = match self.copy_dirty(link, dir).await {
            Ok(()) => self.record_completion(link, dir, target).await,
            Err(e) => {
                tracing::warn!(resource = %self.cfg.resource, error = %e,
                    done = stats.sync_done.load(Relaxed), "synchronisation interrupted");
                self.events.emit(EventKind::SyncIntr);
                Err(e)
            }
        };
        // The pass ends (in the status) only once its result is recorded:
        // a client that sees no synchronisation running sees this node
        // current, never the moment between the last chunk and the new
        // generation. Whatever the direction, this node's data is current
        // once both legs recorded the copy.
        if result.is_ok() {
            self.set_lacks_data(false);
        }
        self.set_sync(None);
        let generation = result?;
        self.full_sync.set(false);
        let secs = started.elapsed().as_secs_f64();
        let bytes = stats.sync_done.load(Relaxed);
        tracing::info!(resource = %self.cfg.resource, bytes, seconds = secs,
            mib_per_s = bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
            sent = stats.net_sent_bytes.load(Relaxed) - sent_before,
            received = stats.net_received_bytes.load(Relaxed) - received_before,
            generation, "synchronisation complete");
        self.events.emit(EventKind::SyncDone);
        Ok(())
    }

    /// Records a finished copy on both legs (see [`Self::synchronise`]).
    async fn record_completion(
        &self,
        link: &PeerLink,
        dir: SyncDirection,
        target: u64,
    ) -> Result<u64, LinkError> {
        let lerr = |e| LinkError::disk("metadata update", None, e);
        // Everything copied: both legs are identical. The destination
        // records the new generation first (after flushing the copied
        // data), then the source: a crash in between is recognised at the
        // next handshake (see generation::decide). A generation this node
        // started meanwhile (a write before the link carried writes, the
        // first write ever) is part of what was copied: never record less.
        let target = match dir {
            SyncDirection::ToSecondary => target.max(self.disk.metadata().localcnt),
            SyncDirection::FromSecondary => target,
        };
        let body = SyncComplete { generation: target }.encode();
        let record_here = async {
            self.disk.flush().await?;
            self.disk.persist_all().await?;
            self.disk
                .update_metadata(|m| {
                    m.localcnt = target;
                    m.remotecnt = target;
                    m.flags &= !FLAG_INCONSISTENT;
                })
                .await
        };
        let tell_peer = || link.call(Kind::SyncComplete, 0, 0, 0, Payload::Bytes(body.to_vec()));
        match dir {
            SyncDirection::ToSecondary => {
                tell_peer().await?;
                // The secondary holds every byte and has recorded the
                // generation: a local failure now is this disk's (counted
                // towards its detach), not the connection's. Dropping the
                // link would fail the writes the secondary could cover.
                // The next handshake recognises the generation recorded
                // on one side only, as after a crash in between.
                if let Err(e) = record_here.await {
                    tracing::error!(resource = %self.cfg.resource, error = %e,
                        "cannot record the new generation on this node's disk; the secondary has it");
                }
            }
            SyncDirection::FromSecondary => {
                record_here.await.map_err(lerr)?;
                // This disk holds and has recorded every byte: it is
                // current even if the secondary never hears of it (the
                // next handshake settles its counters), so its writes
                // need not wait for the secondary any more.
                self.set_lacks_data(false);
                tell_peer().await?;
            }
        }
        Ok(target)
    }

    /// Does this pass compare checksums first (`syncmode`, and whether
    /// the destination is a new secondary)?
    fn pass_checksums(&self) -> bool {
        self.syncmode().checksums(self.full_sync.get())
    }

    /// Rate control (see the module documentation): before a chunk, while
    /// the application is busy, wait until fewer than
    /// [`SYNC_WINDOW_UNDER_LOAD`] chunks are in flight, then pause as long
    /// as the last chunk took.
    async fn yield_to_application(&self, inflight: &InFlight) {
        let busy = || self.stats.local_queue.busy();
        if !busy() {
            return;
        }
        // Bounded: progress is never stopped for long.
        let drained = inflight
            .finished
            .wait_until(|| inflight.count.get() < SYNC_WINDOW_UNDER_LOAD);
        futures_lite::future::or(drained, glommio::timer::sleep(MAX_DRAIN)).await;
        if busy() {
            glommio::timer::sleep(inflight.last.get().min(MAX_YIELD)).await;
        }
    }

    /// The extents the secondary wrote since its `hastctl create`, for
    /// skipping what neither node wrote; None when either provider keeps
    /// no written map (format 1: everything counts as written).
    async fn peer_written(&self, link: &PeerLink) -> Result<Option<BitVec<u8, Lsb0>>, LinkError> {
        if !self.disk.has_written_map() {
            return Ok(None);
        }
        match link.call(Kind::WrittenMap, 0, 0, 0, Payload::None).await {
            Ok(Some(buf)) => Ok(Some(BitVec::from_slice(buf.as_bytes()))),
            Ok(None) => Ok(Some(BitVec::new())),
            Err(LinkError::Remote(e)) if e == libc::ENODATA as u32 => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Skips the run of dirty extents from `from` that neither node wrote
    /// since `hastctl create` (at most [`SKIP_BATCH`] × 16 at once): they
    /// are done without a copy. Returns the bytes skipped and where to go
    /// on. No await between the test and the skip: a write sets its
    /// extent's written bit when it is marked, before it is sent, so one
    /// that starts later is replicated on its own.
    fn skip_unwritten(&self, from: u32, peer: &BitVec<u8, Lsb0>) -> (u64, u32) {
        let disk = &self.disk;
        disk.with_map(|m| {
            let mut e = from;
            let mut bytes = 0;
            let limit = from.saturating_add(SKIP_BATCH * 16).min(m.extents());
            while e < limit {
                if !m.needs_sync(e) {
                    e = m.next_dirty(e).unwrap_or(limit).min(limit);
                    continue;
                }
                if peer.get(e as usize).is_some_and(|b| *b) || disk.extent_written(e) {
                    break;
                }
                m.sync_begin(e);
                m.sync_finish(e);
                bytes += m.extent_bytes(e);
                e += 1;
            }
            (bytes, e)
        })
    }

    /// Copies every dirty extent, `sync_window` chunks in flight, until
    /// none is left. Extents marked again meanwhile are copied again.
    pub(super) async fn copy_dirty(
        &self,
        link: &PeerLink,
        dir: SyncDirection,
    ) -> Result<(), LinkError> {
        let stopping = || LinkError::Stopping;
        let window = Rc::new(Semaphore::new(self.cfg.sync_window.max(1) as u64));
        let failed: Rc<RefCell<Option<LinkError>>> = Rc::new(RefCell::new(None));
        let inflight = Rc::new(InFlight::default());
        // What neither node ever wrote needs no copy. Only from this node:
        // the secondary's data is not known here extent by extent.
        let peer_written = match dir {
            SyncDirection::ToSecondary => self.peer_written(link).await?,
            SyncDirection::FromSecondary => None,
        };
        let opts = ChunkOpts {
            checksums: self.pass_checksums().then_some(Algo::Xxh3),
            compression: self.compression(),
        };
        for _pass in 0..MAX_PASSES {
            let gate = Gate::new();
            let mut next = self.disk.with_map(|m| m.next_dirty(0));
            let mut examined = 0u32;
            while let Some(ext) = next {
                if failed.borrow().is_some() || !link.is_alive() || self.stop.is_fired() {
                    break;
                }
                examined += 1;
                if examined.is_multiple_of(SKIP_BATCH) {
                    glommio::yield_if_needed().await;
                }
                let es = self.disk.extentsize();
                let start = u64::from(ext) * es;
                let bytes = self.disk.with_map(|m| m.extent_bytes(ext));
                if let Some(peer) = &peer_written {
                    let (skipped, resume) = self.skip_unwritten(ext, peer);
                    if skipped > 0 {
                        self.stats.sync_done.fetch_add(skipped, Relaxed);
                        self.stats.sync_skipped_bytes.fetch_add(skipped, Relaxed);
                        glommio::yield_if_needed().await;
                        next = self.disk.with_map(|m| m.next_dirty(resume));
                        continue;
                    }
                }
                self.disk.with_map(|m| m.sync_begin(ext));
                let chunk = u64::from(self.cfg.sync_chunk).min(es);
                let nchunks = bytes.div_ceil(chunk);
                let remaining = Rc::new(Cell::new(nchunks));
                let ok = Rc::new(Cell::new(true));
                for i in 0..nchunks {
                    self.yield_to_application(&inflight).await;
                    let permit = window
                        .acquire_static_permit(1)
                        .await
                        .map_err(|_| stopping())?;
                    inflight.count.set(inflight.count.get() + 1);
                    let off = start + i * chunk;
                    let len = chunk.min(start + bytes - off) as u32;
                    let (disk, link, stats) = (self.disk.clone(), link.clone(), self.stats.clone());
                    let (remaining, ok, failed) = (remaining.clone(), ok.clone(), failed.clone());
                    let inflight = inflight.clone();
                    let fut = async move {
                        let started = Instant::now();
                        let r = copy_chunk(&disk, &link, dir, off, len, opts).await;
                        inflight.last.set(started.elapsed());
                        match r {
                            Ok(out) => {
                                stats.sync_done.fetch_add(u64::from(len), Relaxed);
                                stats.sync_bytes_total.fetch_add(u64::from(len), Relaxed);
                                stats.sync_identical_bytes.fetch_add(out.identical, Relaxed);
                            }
                            Err(e) => {
                                ok.set(false);
                                failed.borrow_mut().get_or_insert(e);
                            }
                        }
                        remaining.set(remaining.get() - 1);
                        if remaining.get() == 0 {
                            disk.with_map(|m| {
                                if ok.get() {
                                    m.sync_finish(ext);
                                } else {
                                    m.sync_abort(ext);
                                }
                            });
                        }
                        inflight.count.set(inflight.count.get() - 1);
                        inflight.finished.notify_all();
                        drop(permit);
                    };
                    gate.spawn(fut).map_err(|_| stopping())?.detach();
                }
                next = self.disk.with_map(|m| m.next_dirty(ext + 1));
            }
            let _ = gate.close().await;
            if let Some(e) = failed.borrow_mut().take() {
                return Err(e);
            }
            if !link.is_alive() {
                return Err(link.death_reason().unwrap_or(LinkError::Disconnected));
            }
            if self.stop.is_fired() {
                return Err(stopping());
            }
            if self.disk.dirty_bytes() == 0 {
                return Ok(());
            }
        }
        Err(LinkError::SyncStalled)
    }
}

/// Sends `data` (the bytes of `[off, off + data.len())`) to the
/// secondary as one synchronisation request: a Zero when it is all zeros,
/// else a Write, compressed when `compression` says so and it pays.
async fn send_data(
    link: &PeerLink,
    off: u64,
    data: Payload,
    compression: Compression,
) -> Result<Pending, LinkError> {
    let len = data.len() as u32;
    if frame::is_zero(data.as_slice()) {
        return link
            .request(Kind::Zero, flags::SYNC, off, len, Payload::None)
            .await;
    }
    match compress::encode(compression, data.as_slice(), false) {
        Wire::Compressed { flag, bytes } => {
            link.request(
                Kind::Write,
                flags::SYNC | flag,
                off,
                len,
                Payload::Bytes(bytes),
            )
            .await
        }
        _ => link.request(Kind::Write, flags::SYNC, off, len, data).await,
    }
}

/// Waits for every request and returns the first failure.
async fn all_done(pending: Vec<Pending>) -> Result<(), LinkError> {
    let mut first = Ok(());
    for p in pending {
        if let Err(e) = p.done().await {
            if first.is_ok() {
                first = Err(e);
            }
        }
    }
    first
}

/// Is the whole range a hole of the local provider (reads as zeros
/// without reading it)?
fn is_hole(disk: &LocalDisk, off: u64, len: u64) -> bool {
    let map = disk.allocation(off, len, 1);
    matches!(map.as_slice(), [s] if s.allocation == Allocation::Hole && s.len == len)
}

/// Copies one chunk in the given direction, holding its range lock so
/// that application writes to the same bytes wait.
async fn copy_chunk(
    disk: &Rc<LocalDisk>,
    link: &PeerLink,
    dir: SyncDirection,
    off: u64,
    len: u32,
    opts: ChunkOpts,
) -> Result<ChunkOutcome, LinkError> {
    let _guard = disk.lock_range(off, u64::from(len)).await;
    let rerr = |e| LinkError::disk("read", Some(off), e);
    let mut out = ChunkOutcome::default();
    match (dir, opts.checksums) {
        (SyncDirection::ToSecondary, None) => {
            let pending = if is_hole(disk, off, u64::from(len)) {
                link.request(Kind::Zero, flags::SYNC, off, len, Payload::None)
                    .await?
            } else {
                let data = disk.read(off, len as usize).await.map_err(rerr)?;
                send_data(link, off, Payload::Read(data), opts.compression).await?
            };
            pending.done().await?;
        }
        (SyncDirection::ToSecondary, Some(algo)) => {
            // Ask first: the secondary digests while we read and digest.
            let theirs = checksum::ask(link, flags::SYNC, off, len, algo).await?;
            let hole = is_hole(disk, off, u64::from(len));
            let data = if hole {
                None
            } else {
                Some(disk.read(off, len as usize).await.map_err(rerr)?)
            };
            let mut ours = Vec::new();
            match &data {
                Some(d) => crate::digest::digest_blocks(algo, d, DIGEST_BLOCK, &mut ours),
                None => {
                    let mut dg = crate::digest::BlockDigester::new(algo, DIGEST_BLOCK);
                    dg.zeros(u64::from(len));
                    ours = dg.finish();
                }
            }
            let runs = checksum::differences(theirs, &ours, algo, off, u64::from(len)).await?;
            let mut moved = 0u64;
            let mut pending = Vec::with_capacity(runs.len());
            for (at, n) in runs {
                moved += n;
                let p = match &data {
                    None => {
                        link.request(Kind::Zero, flags::SYNC, at, n as u32, Payload::None)
                            .await?
                    }
                    Some(d) => {
                        let piece = d
                            .slice((at - off) as usize, n as usize)
                            .ok_or_else(|| LinkError::Protocol("short chunk".into()))?;
                        send_data(link, at, Payload::Read(piece), opts.compression).await?
                    }
                };
                pending.push(p);
            }
            all_done(pending).await?;
            out.identical = u64::from(len) - moved;
        }
        (SyncDirection::FromSecondary, algo) => {
            // The runs to fetch: the whole chunk, or what differs.
            let runs = match algo {
                None => vec![(off, u64::from(len))],
                Some(algo) => {
                    let theirs = checksum::ask(link, 0, off, len, algo).await?;
                    let req = ChecksumsRequest {
                        block: DIGEST_BLOCK,
                        algo,
                    };
                    let ours = digest_range(disk, off, u64::from(len), req)
                        .await
                        .map_err(rerr)?;
                    let runs =
                        checksum::differences(theirs, &ours, algo, off, u64::from(len)).await?;
                    let moved: u64 = runs.iter().map(|r| r.1).sum();
                    out.identical = u64::from(len) - moved;
                    runs
                }
            };
            for (at, n) in runs {
                let n = n as u32;
                let data = link
                    .call(Kind::Read, flags::SYNC, at, n, Payload::None)
                    .await?
                    .ok_or_else(|| LinkError::Protocol("read reply without data".into()))?;
                if data.len() != n as usize {
                    return Err(LinkError::Protocol("short read reply".into()));
                }
                disk.write(at, data)
                    .await
                    .map_err(|e| LinkError::disk("write", Some(at), e))?;
            }
            // Durable before the extent's bit may be cleared on disk (the
            // identical blocks too: they may be in our cache only).
            disk.flush()
                .await
                .map_err(|e| LinkError::disk("flush", None, e))?;
        }
    }
    Ok(out)
}
