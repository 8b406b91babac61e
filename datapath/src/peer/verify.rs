//! Online verify (`hastctl verify`): the primary and the secondary compare
//! their data areas block by block by digest while the application runs.
//!
//! The primary walks the range in chunks; for each chunk it takes the
//! range lock (an application write to those bytes waits), sends a
//! `Checksums` request, digests its own copy meanwhile, and compares. The
//! lock makes the comparison exact: every write that released it before
//! was queued to the secondary first, and the secondary applies requests
//! to overlapping ranges in arrival order, so both digests see the same
//! writes. Chunks of extents never written since `hastctl create` (the
//! primary's written map) and of extents already marked for
//! synchronisation are skipped. The synchronisation's rate control
//! applies: under application load one chunk at a time, each followed by
//! a pause as long as it took.
//!
//! With `repair`, the extents of differing blocks are marked for
//! synchronisation (durably) as they are found; the remote leg copies
//! them from the primary.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::sync::Gate;

use super::checksum::{self, digest_range};
use super::frame::LinkError;
use super::link::PeerLink;
use super::proto::ChecksumsRequest;
use super::remote::Remote;
use super::sync::now_ms;
use crate::digest::{Algo, DIGEST_BLOCK};
use crate::events::EventKind;
use crate::metadata::{round_down, round_up};
use crate::semaphore::Semaphore;
use crate::signal::{Notify, Signal};
use crate::stats::{VerifyReport, VerifyState};

/// Bytes compared per request.
pub const VERIFY_CHUNK: u64 = 1 << 20;
/// Chunks in flight while the application is idle.
const VERIFY_WINDOW: u64 = 4;
/// Longest pause after a chunk under load.
const MAX_YIELD: Duration = Duration::from_millis(200);

/// What to verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyParams {
    /// Start in the data area (rounded down to a 4 KiB block).
    pub offset: u64,
    /// Bytes (None: to the end of the data area); the end is rounded up
    /// to a block.
    pub length: Option<u64>,
    /// The digest.
    pub algo: Algo,
    /// Mark differing extents for synchronisation.
    pub repair: bool,
}

/// A verify in progress.
pub struct VerifyRun {
    stop: Signal,
    done: Signal,
}

/// Why a verify cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not connected to the secondary.
    #[error("not connected to the secondary")]
    NotConnected,
    /// A synchronisation is running: its extents differ by design.
    #[error("a synchronisation is running; verify once the resource is in sync")]
    Syncing,
    /// Another verify runs.
    #[error("a verify is already running")]
    Running,
    /// The range is outside the data area.
    #[error("range [{offset}, +{length}) is outside the data area ({datasize} bytes)")]
    Range {
        /// Start asked.
        offset: u64,
        /// Length asked.
        length: u64,
        /// Size of the data area.
        datasize: u64,
    },
}

/// One chunk's result.
#[derive(Default)]
struct ChunkResult {
    compared: u64,
    skipped: u64,
    /// Differing ranges (offset, length), in order.
    ranges: Vec<(u64, u64)>,
}

impl Remote {
    /// Starts a verify of `params` in the background; progress and the
    /// result go to the resource's `stats.verify`.
    pub fn start_verify(self: &Rc<Self>, params: VerifyParams) -> Result<(), VerifyError> {
        if self
            .verify
            .borrow()
            .as_ref()
            .is_some_and(|v| !v.done.is_fired())
        {
            return Err(VerifyError::Running);
        }
        let link = self.link().ok_or(VerifyError::NotConnected)?;
        if self.stats.sync_state().is_some() {
            return Err(VerifyError::Syncing);
        }
        let datasize = self.disk.datasize();
        let length = params
            .length
            .unwrap_or_else(|| datasize.saturating_sub(params.offset));
        let end = params.offset.checked_add(length).filter(|&e| e <= datasize);
        let Some(end) = end.filter(|_| params.offset < datasize) else {
            return Err(VerifyError::Range {
                offset: params.offset,
                length,
                datasize,
            });
        };
        let block = u64::from(DIGEST_BLOCK);
        let start = round_down(params.offset, block);
        let end = round_up(end, block).min(datasize);
        let run = VerifyRun {
            stop: Signal::new(),
            done: Signal::new(),
        };
        let (stop, done) = (run.stop.clone(), run.done.clone());
        *self.verify.borrow_mut() = Some(run);
        if let Ok(mut v) = self.stats.verify.lock() {
            let mut r = VerifyReport::default();
            r.state = VerifyState::Running;
            r.algorithm = params.algo.to_string();
            r.offset = start;
            r.length = end - start;
            r.started_ms = now_ms();
            r.block = DIGEST_BLOCK;
            r.repair = params.repair;
            *v = Some(r);
        }
        tracing::info!(resource = %self.cfg.resource, offset = start, length = end - start,
            algorithm = %params.algo, repair = params.repair, "verify started");
        self.events.emit(EventKind::VerifyStart);
        let me = self.clone();
        glommio::spawn_local(async move {
            let r = futures_lite::future::or(me.verify_range(&link, start, end, params), async {
                stop.wait().await;
                Err(LinkError::Stopping)
            })
            .await;
            me.verify_finished(r);
            done.fire();
        })
        .detach();
        Ok(())
    }

    /// Stops a running verify (the remote leg stops) and waits for it.
    pub async fn stop_verify(&self) {
        let run = self.verify.borrow_mut().take();
        if let Some(run) = run {
            run.stop.fire();
            run.done.wait().await;
        }
    }

    fn verify_finished(&self, r: Result<(), LinkError>) {
        let report = match self.stats.verify.lock() {
            Ok(mut g) => match g.as_mut() {
                Some(v) => {
                    v.finished_ms = now_ms();
                    match &r {
                        Ok(()) => v.state = VerifyState::Done,
                        Err(e) => {
                            v.state = VerifyState::Failed;
                            v.error = Some(e.to_string());
                        }
                    }
                    v.clone()
                }
                None => return,
            },
            Err(_) => return,
        };
        match &r {
            Ok(()) => tracing::info!(resource = %self.cfg.resource,
                compared = report.blocks_compared, different = report.blocks_different,
                ranges = report.ranges_total, skipped = report.bytes_skipped,
                "verify complete"),
            Err(e) => tracing::warn!(resource = %self.cfg.resource, error = %e,
                compared = report.blocks_compared, different = report.blocks_different,
                "verify stopped"),
        }
        if report.blocks_different > 0 {
            for (off, len) in report.ranges.iter().take(16) {
                tracing::warn!(resource = %self.cfg.resource, offset = off, length = len,
                    "blocks differ between the nodes");
            }
            self.events.emit(EventKind::OutOfSync {
                blocks: report.blocks_different,
                bytes: report.bytes_different,
                ranges: report.ranges_total,
            });
        }
        self.events.emit(EventKind::VerifyDone {
            ok: r.is_ok(),
            compared: report.blocks_compared,
            different: report.blocks_different,
        });
    }

    async fn verify_range(
        &self,
        link: &PeerLink,
        start: u64,
        end: u64,
        params: VerifyParams,
    ) -> Result<(), LinkError> {
        let window = Rc::new(Semaphore::new(VERIFY_WINDOW));
        let gate = Gate::new();
        let failed: Rc<RefCell<Option<LinkError>>> = Rc::new(RefCell::new(None));
        // Results are recorded in chunk order (chunks finish out of order).
        let pending: Rc<RefCell<BTreeMap<u64, ChunkResult>>> = Rc::default();
        let next_record = Rc::new(Cell::new(0u64));
        let inflight = Rc::new(Cell::new(0usize));
        let finished = Rc::new(Notify::new());
        let last = Rc::new(Cell::new(Duration::ZERO));
        let es = self.disk.extentsize();
        let mut pos = start;
        let mut index = 0u64;
        while pos < end {
            let failure = failed.borrow_mut().take();
            if let Some(e) = failure {
                let _ = gate.close().await;
                return Err(e);
            }
            if !link.is_alive() {
                let _ = gate.close().await;
                return Err(link.death_reason().unwrap_or(LinkError::Disconnected));
            }
            let chunk_end = (round_down(pos, VERIFY_CHUNK) + VERIFY_CHUNK).min(end);
            let (off, len) = (pos, chunk_end - pos);
            pos = chunk_end;
            let i = index;
            index += 1;
            // Never written on this node since create: nothing to compare.
            let first = (off / es) as u32;
            let last_ext = ((off + len - 1) / es) as u32;
            if (first..=last_ext).all(|e| !self.disk.extent_written(e)) {
                self.record(
                    &pending,
                    &next_record,
                    i,
                    ChunkResult {
                        skipped: len,
                        ..Default::default()
                    },
                );
                continue;
            }
            // Rate control, as the synchronisation's.
            if self.stats.local_queue.busy() {
                let drained = finished.wait_until(|| inflight.get() == 0);
                futures_lite::future::or(drained, glommio::timer::sleep(Duration::from_secs(1)))
                    .await;
                if self.stats.local_queue.busy() {
                    glommio::timer::sleep(last.get().min(MAX_YIELD)).await;
                }
            }
            let permit = window
                .acquire_static_permit(1)
                .await
                .map_err(|_| LinkError::Stopping)?;
            inflight.set(inflight.get() + 1);
            let me = (self.disk.clone(), link.clone(), self.stats.clone());
            let (failed, pending, next_record) =
                (failed.clone(), pending.clone(), next_record.clone());
            let (inflight, finished, last) = (inflight.clone(), finished.clone(), last.clone());
            let repair = params.repair;
            let algo = params.algo;
            let resource = self.cfg.resource.clone();
            let fut = async move {
                let (disk, link, stats) = me;
                let t0 = Instant::now();
                let r = verify_chunk(&disk, &link, off, len, algo).await;
                last.set(t0.elapsed());
                match r {
                    Ok(res) => {
                        if repair {
                            for &(o, l) in &res.ranges {
                                if let Err(e) = disk.mark_for_sync(o, l).await {
                                    tracing::error!(resource = %resource, error = %e,
                                        "verify: cannot mark differing extents for synchronisation");
                                    failed.borrow_mut().get_or_insert(LinkError::disk(
                                        "activemap update",
                                        Some(o),
                                        e,
                                    ));
                                }
                            }
                        }
                        record_into(&stats, &pending, &next_record, i, res);
                    }
                    Err(e) => {
                        failed.borrow_mut().get_or_insert(e);
                    }
                }
                inflight.set(inflight.get() - 1);
                finished.notify_all();
                drop(permit);
            };
            gate.spawn(fut).map_err(|_| LinkError::Stopping)?.detach();
        }
        let _ = gate.close().await;
        if let Some(e) = failed.borrow_mut().take() {
            return Err(e);
        }
        Ok(())
    }

    fn record(
        &self,
        pending: &Rc<RefCell<BTreeMap<u64, ChunkResult>>>,
        next: &Rc<Cell<u64>>,
        i: u64,
        res: ChunkResult,
    ) {
        record_into(&self.stats, pending, next, i, res);
    }
}

/// Adds chunk `i`'s result to the report, in chunk order: results that
/// arrive early wait in `pending`.
fn record_into(
    stats: &crate::stats::ResourceStats,
    pending: &Rc<RefCell<BTreeMap<u64, ChunkResult>>>,
    next: &Rc<Cell<u64>>,
    i: u64,
    res: ChunkResult,
) {
    let mut p = pending.borrow_mut();
    p.insert(i, res);
    let Ok(mut g) = stats.verify.lock() else {
        return;
    };
    let Some(v) = g.as_mut() else { return };
    while let Some(r) = p.remove(&next.get()) {
        next.set(next.get() + 1);
        let block = u64::from(v.block);
        v.done += r.compared + r.skipped;
        v.bytes_skipped += r.skipped;
        v.blocks_compared += r.compared.div_ceil(block);
        for (o, l) in r.ranges {
            v.blocks_different += l.div_ceil(block);
            v.add_range(o, l);
        }
    }
}

/// Compares one chunk under its range lock.
async fn verify_chunk(
    disk: &Rc<crate::local::LocalDisk>,
    link: &PeerLink,
    off: u64,
    len: u64,
    algo: Algo,
) -> Result<ChunkResult, LinkError> {
    let _guard = disk.lock_range(off, len).await;
    // Extents marked for synchronisation may differ by design.
    let dirty = disk.with_map(|m| m.extent_range(off, len).any(|e| m.needs_sync(e)));
    if dirty {
        return Ok(ChunkResult {
            skipped: len,
            ..Default::default()
        });
    }
    let theirs = checksum::ask(link, 0, off, len as u32, algo).await?;
    let req = ChecksumsRequest {
        block: DIGEST_BLOCK,
        algo,
    };
    let ours = digest_range(disk, off, len, req)
        .await
        .map_err(|e| LinkError::disk("read", Some(off), e))?;
    let ranges = checksum::differences(theirs, &ours, algo, off, len).await?;
    Ok(ChunkResult {
        compared: len,
        skipped: 0,
        ranges,
    })
}
