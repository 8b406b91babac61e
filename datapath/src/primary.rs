//! The primary's request path: what the export calls for each client
//! request. Today the remote leg is absent (`remote none`, or no peer), so
//! every write also marks its extents as needing synchronisation; the
//! replication issue adds the remote leg here.

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use glommio::io::{DmaBuffer, ReadResult};

use crate::export::{BackendError, BackendGeometry, BlockBackend, WriteFlags};
use crate::local::LocalDisk;
use crate::stats::ResourceStats;

/// Largest payload of one request (NBD's customary maximum).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// The primary of one resource.
pub struct Primary {
    disk: Rc<LocalDisk>,
    stats: Arc<ResourceStats>,
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

impl Primary {
    /// A primary over an open local disk.
    pub fn new(disk: Rc<LocalDisk>, stats: Arc<ResourceStats>) -> Primary {
        Primary { disk, stats }
    }

    /// The local leg.
    pub fn disk(&self) -> &Rc<LocalDisk> {
        &self.disk
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.disk.datasize() => Ok(()),
            _ => Err(BackendError::Invalid),
        }
    }

    /// The common shape of every data-changing request: lock the range,
    /// mark the activemap durably, apply locally, complete the mark.
    async fn modify<F, Fut>(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        errors: &AtomicU64,
        apply: F,
    ) -> Result<(), BackendError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = std::io::Result<()>>,
    {
        self.check(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _q = Gauge::enter(&self.stats.local_queue);
        let _range = self.disk.lock_range(offset, len).await;
        if let Err(e) = self.disk.write_start(offset, len).await {
            tracing::error!(path = %self.disk.path().display(), error = %e,
                "cannot mark the activemap; write refused");
            errors.fetch_add(1, Relaxed);
            return Err(BackendError::Io);
        }
        let local = apply().await;
        // No remote leg yet: the peer lacks this data, so the extents need
        // sync whatever the local outcome. A failed local leg marks them
        // too (the local copy is stale).
        self.disk.write_complete(offset, len, false);
        if let Err(e) = local {
            tracing::error!(path = %self.disk.path().display(), offset, len, error = %e,
                "local write failed");
            errors.fetch_add(1, Relaxed);
            return Err(BackendError::Io);
        }
        if fua {
            self.flush_inner().await?;
        }
        Ok(())
    }

    async fn flush_inner(&self) -> Result<(), BackendError> {
        self.disk.flush().await.map_err(|e| {
            tracing::error!(path = %self.disk.path().display(), error = %e, "flush failed");
            self.stats.flush_errors.fetch_add(1, Relaxed);
            BackendError::Io
        })
    }
}

impl BlockBackend for Primary {
    type ReadBuf = ReadResult;

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

    async fn read(&self, offset: u64, len: u32) -> Result<ReadResult, BackendError> {
        self.check(offset, u64::from(len))?;
        let _q = Gauge::enter(&self.stats.local_queue);
        self.stats.reads.fetch_add(1, Relaxed);
        self.disk.read(offset, len as usize).await.map_err(|e| {
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
        let len = data.len() as u64;
        let disk = &self.disk;
        self.modify(offset, len, flags.fua, &self.stats.write_errors, || {
            disk.write(offset, data)
        })
        .await
    }

    async fn flush(&self) -> Result<(), BackendError> {
        self.stats.flushes.fetch_add(1, Relaxed);
        self.flush_inner().await
    }

    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<(), BackendError> {
        self.stats.deletes.fetch_add(1, Relaxed);
        let disk = &self.disk;
        self.modify(offset, len, flags.fua, &self.stats.delete_errors, || {
            disk.zero(offset, len)
        })
        .await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> Result<(), BackendError> {
        self.stats.writes.fetch_add(1, Relaxed);
        let disk = &self.disk;
        self.modify(offset, len, flags.fua, &self.stats.write_errors, || {
            disk.zero(offset, len)
        })
        .await
    }
}
