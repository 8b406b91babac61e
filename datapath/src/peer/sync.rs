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

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use glommio::sync::Gate;

use crate::semaphore::Semaphore;

use super::frame::{self, LinkError};
use super::link::{Payload, PeerLink};
use super::proto::{flags, Kind, SyncComplete};
use super::remote::Remote;
use crate::events::PeerEventKind;
use crate::generation::{Gen, SyncDirection};
use crate::local::LocalDisk;
use crate::metadata::FLAG_INCONSISTENT;
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

fn now_ms() -> u64 {
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
        tracing::info!(resource = %self.cfg.resource, direction = ?dir,
            bytes = self.disk.dirty_bytes(), "synchronisation started");
        self.events.emit(PeerEventKind::SyncStart);
        let result = self.copy_dirty(link, dir).await;
        self.set_sync(None);
        if let Err(e) = result {
            tracing::warn!(resource = %self.cfg.resource, error = %e,
                done = stats.sync_done.load(Relaxed), "synchronisation interrupted");
            self.events.emit(PeerEventKind::SyncIntr);
            return Err(e);
        }
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
                record_here.await.map_err(lerr)?;
            }
            SyncDirection::FromSecondary => {
                record_here.await.map_err(lerr)?;
                tell_peer().await?;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let bytes = stats.sync_done.load(Relaxed);
        tracing::info!(resource = %self.cfg.resource, bytes, seconds = secs,
            mib_per_s = bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
            generation = target, "synchronisation complete");
        self.events.emit(PeerEventKind::SyncDone);
        Ok(())
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
        for _pass in 0..MAX_PASSES {
            let gate = Gate::new();
            let mut next = self.disk.with_map(|m| m.next_dirty(0));
            while let Some(ext) = next {
                if failed.borrow().is_some() || !link.is_alive() || self.stop.is_fired() {
                    break;
                }
                self.disk.with_map(|m| m.sync_begin(ext));
                let es = self.disk.extentsize();
                let start = u64::from(ext) * es;
                let bytes = self.disk.with_map(|m| m.extent_bytes(ext));
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
                        let r = copy_chunk(&disk, &link, dir, off, len).await;
                        inflight.last.set(started.elapsed());
                        match r {
                            Ok(()) => {
                                stats.sync_done.fetch_add(u64::from(len), Relaxed);
                                stats.sync_bytes_total.fetch_add(u64::from(len), Relaxed);
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

/// Copies one chunk in the given direction, holding its range lock so
/// that application writes to the same bytes wait.
async fn copy_chunk(
    disk: &Rc<LocalDisk>,
    link: &PeerLink,
    dir: SyncDirection,
    off: u64,
    len: u32,
) -> Result<(), LinkError> {
    let _guard = disk.lock_range(off, u64::from(len)).await;
    match dir {
        SyncDirection::ToSecondary => {
            let data = disk
                .read(off, len as usize)
                .await
                .map_err(|e| LinkError::disk("read", Some(off), e))?;
            if frame::is_zero(&data) {
                link.call(Kind::Zero, flags::SYNC, off, len, Payload::None)
                    .await?;
            } else {
                link.call(Kind::Write, flags::SYNC, off, len, Payload::Read(data))
                    .await?;
            }
        }
        SyncDirection::FromSecondary => {
            let data = link
                .call(Kind::Read, flags::SYNC, off, len, Payload::None)
                .await?
                .ok_or_else(|| LinkError::Protocol("read reply without data".into()))?;
            if data.len() != len as usize {
                return Err(LinkError::Protocol("short read reply".into()));
            }
            disk.write(off, data)
                .await
                .map_err(|e| LinkError::disk("write", Some(off), e))?;
            // Durable before the extent's bit may be cleared on disk.
            disk.flush()
                .await
                .map_err(|e| LinkError::disk("flush", None, e))?;
        }
    }
    Ok(())
}
