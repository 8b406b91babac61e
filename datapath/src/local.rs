//! The local leg of a resource: the open provider, its metadata and its
//! activemap, with direct I/O through glommio.
//!
//! All methods run on the executor that owns the resource; interior
//! mutability is `RefCell`, never held across an await.

use std::cell::RefCell;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use glommio::io::{DmaBuffer, DmaFile, ReadResult};
use glommio::sync::Semaphore;

use crate::activemap::{ActiveMap, PersistBatch};
use crate::metadata::{round_down, round_up, Metadata, MetadataError, Role, METADATA_SIZE};
use crate::provider::{self, ProviderError, ProviderInfo};
use crate::rangelock::{Acquire, RangeLock};
use crate::stats::ResourceStats;

/// Largest zero-fill write issued at once when zeroing without hole
/// punching.
const ZERO_CHUNK: usize = 1 << 20;

/// Why a resource could not be opened or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// The provider could not be opened or probed.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The metadata block is missing, foreign or damaged.
    #[error("{path}: {source}")]
    Metadata {
        /// Provider path.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: MetadataError,
    },
    /// The provider holds another resource's data.
    #[error("{path}: provider belongs to resource '{found}', not '{expected}'")]
    WrongResource {
        /// Provider path.
        path: PathBuf,
        /// Name found in the metadata.
        found: String,
        /// Name of the configured resource.
        expected: String,
    },
    /// The provider's sector size grew since creation.
    #[error("{path}: sector size is now {now}, the metadata was created for {created}")]
    SectorSize {
        /// Provider path.
        path: PathBuf,
        /// Sector size now.
        now: u32,
        /// Sector size at creation.
        created: u32,
    },
}

/// Where a completed write's data stands ([`LocalDisk::write_complete`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Every leg holds it (or there is no other leg to hold it).
    InSync,
    /// The peer completed its copy, which may still be in its disk cache:
    /// the extent stays marked until a flush there (see
    /// [`ActiveMap::hold_until_peer_flush`]).
    PeerUnflushed,
    /// A leg lacks it: the extent needs synchronisation.
    NeedsSync,
}

/// The open local provider of one resource.
pub struct LocalDisk {
    file: DmaFile,
    path: PathBuf,
    info: ProviderInfo,
    md: RefCell<Metadata>,
    map: RefCell<ActiveMap>,
    /// One activemap batch (or metadata write) at a time.
    persist: Semaphore,
    metaflush: std::cell::Cell<bool>,
    locks: RangeLock,
    stats: Arc<ResourceStats>,
    zeros: Rc<DmaBuffer>,
}

fn io_err(e: glommio::GlommioError<()>) -> io::Error {
    e.into()
}

impl LocalDisk {
    /// Opens `path`, checks its metadata belongs to `resource`, and loads
    /// the activemap.
    pub async fn open(
        path: &Path,
        resource: &str,
        metaflush: bool,
        stats: Arc<ResourceStats>,
    ) -> Result<Rc<LocalDisk>, LocalError> {
        let info = provider::probe(path)?;
        if let Some(w) = std::fs::File::open(path)
            .ok()
            .and_then(|f| provider::sparse_warning(path, &f))
        {
            tracing::warn!(resource, "{w}");
        }
        let file = provider::open_direct(path).await?;
        let perr = |what, e| LocalError::Provider(ProviderError::new(path, what, e));
        let block = file
            .read_at_aligned(0, METADATA_SIZE)
            .await
            .map_err(|e| perr("read metadata", io_err(e)))?;
        let md =
            Metadata::decode(&block, info.mediasize).map_err(|source| LocalError::Metadata {
                path: path.to_owned(),
                source,
            })?;
        if md.resource != resource {
            return Err(LocalError::WrongResource {
                path: path.to_owned(),
                found: md.resource,
                expected: resource.to_owned(),
            });
        }
        if info.sectorsize > md.sectorsize {
            return Err(LocalError::SectorSize {
                path: path.to_owned(),
                now: info.sectorsize,
                created: md.sectorsize,
            });
        }
        let image = file
            .read_at_aligned(md.mapoff, md.mapsize as usize)
            .await
            .map_err(|e| perr("read activemap", io_err(e)))?;
        if image.len() as u64 != md.mapsize {
            return Err(perr(
                "read activemap",
                io::Error::new(io::ErrorKind::UnexpectedEof, "short read"),
            ));
        }
        let mut map = ActiveMap::new(md.datasize, md.extentsize, md.keepdirty, md.sectorsize);
        map.load(&image);
        stats.extentsize.store(u64::from(md.extentsize), Relaxed);
        stats.keepdirty.store(u64::from(md.keepdirty), Relaxed);
        stats.datasize.store(md.datasize, Relaxed);
        stats.dirty_bytes.store(map.dirty_bytes(), Relaxed);
        stats.ondisk_extents.store(map.ondisk_extents(), Relaxed);
        let zeros = Rc::new({
            let mut b = file.alloc_dma_buffer(ZERO_CHUNK);
            b.as_bytes_mut().fill(0);
            b
        });
        Ok(Rc::new(LocalDisk {
            file,
            path: path.to_owned(),
            info,
            md: RefCell::new(md),
            map: RefCell::new(map),
            persist: Semaphore::new(1),
            metaflush: std::cell::Cell::new(metaflush),
            locks: RangeLock::new(),
            stats,
            zeros,
        }))
    }

    /// Changes `metaflush` (a configuration reload); applies from the
    /// next activemap update.
    pub fn set_metaflush(&self, on: bool) {
        self.metaflush.set(on);
    }

    /// The resource's counters.
    pub fn stats(&self) -> &Arc<ResourceStats> {
        &self.stats
    }

    /// Provider path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Provider facts.
    pub fn info(&self) -> ProviderInfo {
        self.info
    }

    /// A copy of the metadata as last written.
    pub fn metadata(&self) -> Metadata {
        self.md.borrow().clone()
    }

    /// Size of the data area.
    pub fn datasize(&self) -> u64 {
        self.md.borrow().datasize
    }

    /// Sector size used for alignment.
    pub fn sectorsize(&self) -> u64 {
        u64::from(self.md.borrow().sectorsize)
    }

    /// An aligned buffer for direct I/O.
    pub fn alloc(&self, len: usize) -> DmaBuffer {
        self.file.alloc_dma_buffer(len)
    }

    /// Updates and durably writes the metadata block.
    pub async fn update_metadata(&self, f: impl FnOnce(&mut Metadata)) -> io::Result<()> {
        let _p = self.persist.acquire_permit(1).await.map_err(io_err)?;
        let mut md = self.md.borrow().clone();
        f(&mut md);
        let block = md.encode();
        let mut buf = self.file.alloc_dma_buffer(METADATA_SIZE);
        buf.as_bytes_mut().copy_from_slice(&block[..]);
        self.file.write_at(buf, 0).await.map_err(io_err)?;
        self.file.fdatasync().await.map_err(io_err)?;
        *self.md.borrow_mut() = md;
        Ok(())
    }

    /// Records the role in the metadata (`prevrole`) and generates the
    /// resource unique ID on first use as primary.
    pub async fn set_prevrole(&self, role: Role) -> io::Result<()> {
        self.update_metadata(|md| {
            md.prevrole = role;
            if role == Role::Primary && md.resuid == 0 {
                md.resuid = loop {
                    let id: u64 = rand::random();
                    if id != 0 {
                        break id;
                    }
                };
            }
        })
        .await
    }

    /// Locks the sector-aligned span of `[offset, offset+len)`. The place
    /// in the queue is taken when this is called, not when the future is
    /// first polled, so callers fix the order of overlapping requests by
    /// the order of their calls.
    pub fn lock_range(&self, offset: u64, len: u64) -> Acquire {
        let ss = self.sectorsize();
        let start = round_down(offset, ss);
        let end = round_up(offset + len.max(1), ss);
        self.locks.lock(start, end)
    }

    /// Marks the range in the activemap and waits until the mark is
    /// durable. On error the mark is undone and no data may be written.
    pub async fn write_start(self: &Rc<Self>, offset: u64, len: u64) -> io::Result<()> {
        let (need, ahead) = {
            let mut map = self.map.borrow_mut();
            let need = map.write_start(offset, len);
            (need, map.take_lookahead())
        };
        if let Some(seq) = ahead {
            // Marks laid ahead of a sequential stream: written in the
            // background (errors are logged by the batch writer and the
            // sectors retried with the next batch).
            let disk = self.clone();
            glommio::spawn_local(async move {
                let _ = disk.persist_until(seq).await;
            })
            .detach();
        }
        if let Some(seq) = need {
            if let Err(e) = self.persist_until(seq).await {
                self.map.borrow_mut().write_complete(offset, len);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Completes a write started with [`LocalDisk::write_start`], saying
    /// where its data now stands.
    pub fn write_complete(&self, offset: u64, len: u64, outcome: Settled) {
        let mut map = self.map.borrow_mut();
        match outcome {
            Settled::InSync => {}
            Settled::PeerUnflushed => map.hold_until_peer_flush(offset, len),
            Settled::NeedsSync => {
                // The bits are durable: the write was marked before it was
                // issued, so no metadata write is needed here.
                let extra = map.need_sync(offset, len);
                debug_assert!(extra.is_none());
            }
        }
        map.write_complete(offset, len);
        self.stats.dirty_bytes.store(map.dirty_bytes(), Relaxed);
    }

    async fn persist_until(&self, seq: u64) -> io::Result<()> {
        let _p = self.persist.acquire_permit(1).await.map_err(io_err)?;
        while !self.map.borrow().is_durable(seq) {
            let batch = self
                .map
                .borrow_mut()
                .take_persist()
                .expect("a batch is pending while a sequence is not durable");
            self.write_batch(batch).await?;
        }
        Ok(())
    }

    /// Writes every pending activemap change, lazy clears included (clean
    /// shutdown, role change).
    pub async fn persist_all(&self) -> io::Result<()> {
        let _p = self.persist.acquire_permit(1).await.map_err(io_err)?;
        loop {
            let batch = self.map.borrow_mut().take_persist();
            match batch {
                Some(b) => self.write_batch(b).await?,
                None => return Ok(()),
            }
        }
    }

    async fn write_batch(&self, batch: PersistBatch) -> io::Result<()> {
        let res = self.write_sectors(&batch).await;
        let mut map = self.map.borrow_mut();
        match res {
            Ok(()) => {
                map.persisted(&batch);
                self.stats.activemap_updates.fetch_add(1, Relaxed);
                self.stats
                    .ondisk_extents
                    .store(map.ondisk_extents(), Relaxed);
                Ok(())
            }
            Err(e) => {
                map.persist_failed(&batch);
                tracing::error!(path = %self.path.display(), error = %e, "activemap update failed");
                Err(e)
            }
        }
    }

    /// Writes the sectors of a batch, coalescing adjacent ones, then
    /// flushes when metaflush is on.
    async fn write_sectors(&self, batch: &PersistBatch) -> io::Result<()> {
        let (mapoff, ss) = {
            let md = self.md.borrow();
            (md.mapoff, md.sectorsize as usize)
        };
        let mut i = 0;
        while i < batch.sectors.len() {
            let mut j = i + 1;
            while j < batch.sectors.len() && batch.sectors[j].0 == batch.sectors[j - 1].0 + 1 {
                j += 1;
            }
            let mut buf = self.file.alloc_dma_buffer((j - i) * ss);
            for (k, (_, img)) in batch.sectors[i..j].iter().enumerate() {
                buf.as_bytes_mut()[k * ss..(k + 1) * ss].copy_from_slice(img);
            }
            let pos = mapoff + (batch.sectors[i].0 * ss) as u64;
            let n = self.file.write_at(buf, pos).await.map_err(io_err)?;
            if n != (j - i) * ss {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "short activemap write",
                ));
            }
            i = j;
        }
        if self.metaflush.get() {
            self.file.fdatasync().await.map_err(io_err)?;
        }
        Ok(())
    }

    /// Reads `[offset, offset+len)` of the data area.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<ReadResult> {
        let ss = self.sectorsize();
        let localoff = self.md.borrow().localoff;
        let start = round_down(offset, ss);
        let end = round_up(offset + len as u64, ss);
        let r = self
            .file
            .read_at_aligned(localoff + start, (end - start) as usize)
            .await
            .map_err(io_err)?;
        let skip = (offset - start) as usize;
        if r.len() < skip + len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read"));
        }
        ReadResult::slice(&r, skip, len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "short read"))
    }

    /// Starts a new generation before the first write made without the
    /// peer (`localcnt` is bumped once per disconnected epoch, durably,
    /// before the data write), so that a reconnect tells who wrote.
    pub async fn bump_generation_if_needed(&self) -> io::Result<()> {
        let needed = {
            let md = self.md.borrow();
            md.localcnt == md.remotecnt
        };
        if !needed {
            return Ok(());
        }
        self.update_metadata(|md| {
            if md.localcnt == md.remotecnt {
                md.localcnt += 1;
            }
        })
        .await
    }

    /// Writes a shared buffer at `offset` (the same buffer is being sent to
    /// the peer). The caller holds the range lock and has marked the
    /// activemap.
    pub async fn write_rc(&self, offset: u64, data: Rc<DmaBuffer>) -> io::Result<()> {
        let ss = self.sectorsize();
        let len = data.len() as u64;
        if offset.is_multiple_of(ss) && len.is_multiple_of(ss) {
            let localoff = self.md.borrow().localoff;
            let n = self
                .file
                .write_rc_at(data, localoff + offset)
                .await
                .map_err(io_err)?;
            return check_len(n, len);
        }
        self.write_unaligned(offset, data.as_bytes()).await
    }

    /// Writes `data` at `offset` of the data area. The caller holds the
    /// range lock and has marked the activemap.
    pub async fn write(&self, offset: u64, data: DmaBuffer) -> io::Result<()> {
        let ss = self.sectorsize();
        let len = data.len() as u64;
        let localoff = self.md.borrow().localoff;
        if offset.is_multiple_of(ss) && len.is_multiple_of(ss) {
            let n = self
                .file
                .write_at(data, localoff + offset)
                .await
                .map_err(io_err)?;
            return check_len(n, len);
        }
        self.write_unaligned(offset, data.as_bytes()).await
    }

    /// Read-modify-write of the sectors covering `[offset, offset+len)`:
    /// the payload is copied once, into the aligned buffer written out.
    async fn write_unaligned(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let ss = self.sectorsize();
        let len = data.len() as u64;
        let localoff = self.md.borrow().localoff;
        let start = round_down(offset, ss);
        let end = round_up(offset + len, ss);
        let old = self
            .file
            .read_at_aligned(localoff + start, (end - start) as usize)
            .await
            .map_err(io_err)?;
        check_len(old.len(), end - start)?;
        let mut buf = self.file.alloc_dma_buffer((end - start) as usize);
        buf.as_bytes_mut().copy_from_slice(&old);
        let skip = (offset - start) as usize;
        buf.as_bytes_mut()[skip..skip + len as usize].copy_from_slice(data);
        let n = self
            .file
            .write_at(buf, localoff + start)
            .await
            .map_err(io_err)?;
        check_len(n, end - start)
    }

    /// Zeroes `[offset, offset+len)` of the data area: partial sectors by
    /// read-modify-write, whole sectors by punching a hole (which reads
    /// back as zeros on files and block devices) or, where that is not
    /// supported, by writing zeros. The caller holds the range lock and has
    /// marked the activemap.
    pub async fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        let ss = self.sectorsize();
        let end = offset + len;
        let a0 = round_up(offset, ss);
        let a1 = round_down(end, ss);
        if a0 >= a1 {
            return self.write_zero_bytes(offset, len).await;
        }
        if a0 > offset {
            self.write_zero_bytes(offset, a0 - offset).await?;
        }
        if end > a1 {
            self.write_zero_bytes(a1, end - a1).await?;
        }
        let localoff = self.md.borrow().localoff;
        if self.file.deallocate(localoff + a0, a1 - a0).await.is_ok() {
            return Ok(());
        }
        let mut pos = a0;
        while pos < a1 {
            let n = (a1 - pos).min(ZERO_CHUNK as u64);
            if n == ZERO_CHUNK as u64 {
                let w = self
                    .file
                    .write_rc_at(self.zeros.clone(), localoff + pos)
                    .await
                    .map_err(io_err)?;
                check_len(w, n)?;
            } else {
                let mut b = self.file.alloc_dma_buffer(n as usize);
                b.as_bytes_mut().fill(0);
                let w = self
                    .file
                    .write_at(b, localoff + pos)
                    .await
                    .map_err(io_err)?;
                check_len(w, n)?;
            }
            pos += n;
        }
        Ok(())
    }

    async fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut b = self.file.alloc_dma_buffer(len as usize);
        b.as_bytes_mut().fill(0);
        self.write(offset, b).await
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> io::Result<()> {
        self.file.fdatasync().await.map_err(io_err)
    }

    /// Bytes needing synchronisation.
    pub fn dirty_bytes(&self) -> u64 {
        self.map.borrow().dirty_bytes()
    }

    /// The extents needing synchronisation, as an on-disk style bitmap.
    pub fn sync_bitmap(&self) -> Vec<u8> {
        self.map.borrow().sync_bitmap()
    }

    /// Forgets every sync bit (the peer confirmed both legs identical).
    pub fn clear_all_sync(&self) {
        let mut map = self.map.borrow_mut();
        map.clear_all_sync();
        self.stats.dirty_bytes.store(map.dirty_bytes(), Relaxed);
    }

    /// Marks the extents of `bitmap` (the peer's dirty map) as needing
    /// synchronisation, durably.
    pub async fn merge_peer_map(&self, bitmap: &[u8]) -> io::Result<()> {
        let need = self.map.borrow_mut().merge(bitmap);
        self.after_marking(need).await
    }

    /// Marks every extent as needing synchronisation, durably (full sync).
    pub async fn mark_all(&self) -> io::Result<()> {
        let need = self.map.borrow_mut().mark_all();
        self.after_marking(need).await
    }

    async fn after_marking(&self, need: Option<u64>) -> io::Result<()> {
        self.stats
            .dirty_bytes
            .store(self.map.borrow().dirty_bytes(), Relaxed);
        match need {
            Some(seq) => self.persist_until(seq).await,
            None => Ok(()),
        }
    }

    /// Runs `f` on the activemap (synchronisation bookkeeping).
    pub fn with_map<T>(&self, f: impl FnOnce(&mut ActiveMap) -> T) -> T {
        let mut map = self.map.borrow_mut();
        let out = f(&mut map);
        self.stats.dirty_bytes.store(map.dirty_bytes(), Relaxed);
        out
    }

    /// Extent size.
    pub fn extentsize(&self) -> u64 {
        u64::from(self.md.borrow().extentsize)
    }

    /// Stores the activemap (lazy clears included) and the metadata with
    /// `role` as prevrole, then closes the provider.
    pub async fn close(self: Rc<Self>, role: Role) -> io::Result<()> {
        // Clean stop: nothing in flight, so keepdirty marks are not needed
        // (they would read back as "needs sync" at the next open).
        if self.map.borrow().inflight_extents() == 0 {
            self.map.borrow_mut().clear_keepdirty();
        }
        self.persist_all().await?;
        self.update_metadata(|md| md.prevrole = role).await?;
        self.flush().await?;
        match Rc::try_unwrap(self) {
            Ok(disk) => disk.file.close().await.map_err(io_err),
            // Someone still holds a reference (a request being torn down):
            // the descriptor closes when the last one goes.
            Err(_) => Ok(()),
        }
    }
}

fn check_len(n: usize, want: u64) -> io::Result<()> {
    if n as u64 == want {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short transfer: {n} of {want} bytes"),
        ))
    }
}
