//! The local leg of a resource: the open provider, its metadata and its
//! activemap. The bytes go to a [`Storage`]: the provider with direct I/O
//! through glommio, or memory in tests.
//!
//! All methods run on the executor that owns the resource; interior
//! mutability is `RefCell`, never held across an await.

use std::cell::{Cell, RefCell};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::semaphore::Semaphore;
use glommio::io::DmaBuffer;

use crate::activemap::{ActiveMap, PersistBatch};
use crate::events::{EventKind, EventSink, Leg};
use crate::generation::{bump_before_write, Writer};
use crate::health::Health;
use crate::metadata::{
    round_down, round_up, Metadata, MetadataError, Role, FLAG_INCONSISTENT, METADATA_SIZE,
};
use crate::peer::handshake;
use crate::provider::{self, Allocation, ProviderError, ProviderInfo, Segment};
use crate::rangelock::{Acquire, RangeLock};
use crate::signal::{Notify, Signal};
use crate::stats::ResourceStats;
use crate::storage::{DirectFile, ReadData, Storage};
use crate::writtenmap::{Sectors, WrittenMap};

/// Largest zero-fill write issued at once when zeroing without hole
/// punching.
const ZERO_CHUNK: usize = 1 << 20;

/// How often the provider's size is checked (a provider truncated or a
/// device shrunk under hastd is detached; see [`LocalDisk::watch_size`]).
pub const SIZE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The error of every operation on a detached provider (see
/// [`crate::health`]): nothing is read from or written to it any more.
#[derive(Debug, thiserror::Error)]
#[error("the provider is no longer used ({0})")]
pub struct Detached(pub String);

/// Is this the error of a detached provider (rather than of the disk)?
pub fn is_detached(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<Detached>())
}

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
    store: Box<dyn Storage>,
    path: PathBuf,
    info: ProviderInfo,
    md: RefCell<Metadata>,
    map: RefCell<ActiveMap>,
    /// One activemap batch (or metadata write) at a time.
    persist: Semaphore,
    /// One device flush at a time ([`LocalDisk::flush`]).
    flush_lock: Semaphore,
    flushes_begun: Cell<u64>,
    flushes_done: Cell<u64>,
    metaflush: Cell<bool>,
    locks: RangeLock,
    stats: Arc<ResourceStats>,
    zeros: Rc<DmaBuffer>,
    /// Notified when a completed write marks its extents for sync.
    marked: Notify,
    /// Notified when the held-only extents reach `held_bound`.
    held: Notify,
    held_bound: Cell<usize>,
    /// Whether the last hole punch worked (None: none tried yet).
    punch_works: Cell<Option<bool>>,
    /// Whether the provider is still used (see [`crate::health`]).
    health: RefCell<Health>,
    /// Fired when the provider is detached.
    detached: Signal,
    /// Where a detach is reported (the `disk-failed` event).
    events: RefCell<Option<EventSink>>,
    /// This disconnected epoch has its own generation (see
    /// [`bump_before_write`]).
    epoch_bumped: Cell<bool>,
    /// Extents written since `hastctl create` (format 2); None for a
    /// format 1 provider (every extent counts as written).
    written: RefCell<Option<WrittenMap>>,
}

fn closing(_: crate::semaphore::Closed) -> io::Error {
    io::Error::other("the provider is being closed")
}

impl LocalDisk {
    /// Opens the provider at `path` (O_DIRECT), checks its metadata
    /// belongs to `resource`, and loads the activemap.
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
        let store = Box::new(DirectFile::new(file));
        let disk = Self::with_storage(store, path, info, resource, metaflush, stats).await?;
        disk.watch_size();
        Ok(disk)
    }

    /// Opens a resource on any storage (`info` describes it; `path` names
    /// it in messages): checks its metadata belongs to `resource` and
    /// loads the activemap.
    pub async fn with_storage(
        store: Box<dyn Storage>,
        path: &Path,
        info: ProviderInfo,
        resource: &str,
        metaflush: bool,
        stats: Arc<ResourceStats>,
    ) -> Result<Rc<LocalDisk>, LocalError> {
        let perr = |what, e| LocalError::Provider(ProviderError::new(path, what, e));
        let block = store
            .read(0, METADATA_SIZE)
            .await
            .map_err(|e| perr("read metadata", e))?;
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
        let image = store
            .read(md.mapoff, md.mapsize as usize)
            .await
            .map_err(|e| perr("read activemap", e))?;
        if image.len() as u64 != md.mapsize {
            return Err(perr(
                "read activemap",
                io::Error::new(io::ErrorKind::UnexpectedEof, "short read"),
            ));
        }
        let mut map = ActiveMap::new(md.datasize, md.extentsize, md.keepdirty, md.sectorsize);
        map.load(&image);
        let written = if md.datamapoff == 0 {
            None
        } else {
            let image = store
                .read(md.datamapoff, md.mapsize as usize)
                .await
                .map_err(|e| perr("read written map", e))?;
            if image.len() as u64 != md.mapsize {
                return Err(perr(
                    "read written map",
                    io::Error::new(io::ErrorKind::UnexpectedEof, "short read"),
                ));
            }
            let mut w = WrittenMap::new(md.datasize, md.extentsize, md.sectorsize);
            w.load(&image);
            stats.written_extents.store(w.written(), Relaxed);
            Some(w)
        };
        stats.extentsize.store(u64::from(md.extentsize), Relaxed);
        stats.keepdirty.store(u64::from(md.keepdirty), Relaxed);
        stats.datasize.store(md.datasize, Relaxed);
        stats.dirty_bytes.store(map.dirty_bytes(), Relaxed);
        stats.ondisk_extents.store(map.ondisk_extents(), Relaxed);
        // A newly opened disk is in use: the detach of the one before it
        // (`role init` after a disk failure) is over.
        stats.disk_failed.store(false, Relaxed);
        if let Ok(mut e) = stats.disk_error.lock() {
            e.clear();
        }
        let zeros = Rc::new({
            let mut b = store.alloc(ZERO_CHUNK);
            b.as_bytes_mut().fill(0);
            b
        });
        Ok(Rc::new(LocalDisk {
            store,
            path: path.to_owned(),
            info,
            md: RefCell::new(md),
            map: RefCell::new(map),
            persist: Semaphore::new(1),
            flush_lock: Semaphore::new(1),
            flushes_begun: Cell::new(0),
            flushes_done: Cell::new(0),
            metaflush: Cell::new(metaflush),
            locks: RangeLock::new(),
            stats,
            zeros,
            marked: Notify::new(),
            held: Notify::new(),
            held_bound: Cell::new(usize::MAX),
            punch_works: Cell::new(None),
            health: RefCell::new(Health::default()),
            detached: Signal::new(),
            events: RefCell::new(None),
            epoch_bumped: Cell::new(false),
            written: RefCell::new(written),
        }))
    }

    /// Reports a detach of this provider to `events` (the `disk-failed`
    /// event and hook).
    pub fn set_events(&self, events: EventSink) {
        *self.events.borrow_mut() = Some(events);
    }

    /// Has the provider been detached (see [`crate::health`])?
    pub fn failed(&self) -> bool {
        self.health.borrow().failed().is_some()
    }

    /// Why the provider was detached, if it was.
    pub fn failure(&self) -> Option<String> {
        self.health.borrow().failed().map(str::to_owned)
    }

    /// Resolves when the provider is detached (at once if it is).
    pub async fn failed_wait(&self) {
        self.detached.wait().await
    }

    /// Detaches the provider now (a fault that makes it untrustworthy at
    /// once, e.g. it misses a write the peer acknowledged). Nothing is
    /// read from or written to it afterwards. Reported once.
    pub fn fail(&self, why: String) {
        let now = self.health.borrow_mut().fail(why);
        if let Some(why) = now {
            self.detach(why);
        }
    }

    fn detach(&self, why: String) {
        tracing::error!(path = %self.path.display(),
            "the provider is detached: {why}; this node stops using its disk");
        self.stats.disk_failed.store(true, Relaxed);
        if let Ok(mut e) = self.stats.disk_error.lock() {
            e.clone_from(&why);
        }
        self.detached.fire();
        if let Some(ev) = self.events.borrow().as_ref() {
            ev.emit(EventKind::DiskFailed { leg: Leg::Local });
        }
    }

    /// Fails if the provider is detached.
    fn usable(&self) -> io::Result<()> {
        match self.health.borrow().failed() {
            Some(why) => Err(io::Error::other(Detached(why.to_owned()))),
            None => Ok(()),
        }
    }

    /// Records the outcome of an operation on the provider (`op` at `pos`
    /// of the provider, for the message); enough failures in a row detach
    /// it.
    fn note<T>(&self, op: &str, pos: Option<u64>, r: io::Result<T>) -> io::Result<T> {
        match &r {
            // Only the data area tells whether the disk still works: the
            // metadata and map sectors are rewritten in place (allocated
            // even under a full sparse provider), their success proves
            // nothing about the data.
            Ok(_)
                if !matches!(
                    op,
                    "metadata write" | "activemap write" | "written map write" | "flush"
                ) =>
            {
                self.health.borrow_mut().success(op == "read")
            }
            Ok(_) => {}
            Err(e) if is_detached(e) => {}
            Err(e) => {
                let at = pos.map(|p| format!(" at {p}")).unwrap_or_default();
                let why = self
                    .health
                    .borrow_mut()
                    .error(&format!("{op}{at}: {e}"), op == "read");
                if let Some(why) = why {
                    self.detach(why);
                }
            }
        }
        r
    }

    /// Checks the provider still has the size it was opened with;
    /// detaches it if it shrank (a truncated file reads zeros or nothing
    /// where the data was: it must not be served). Returns whether it is
    /// still whole.
    pub fn check_size(&self) -> bool {
        if self.failed() {
            return false;
        }
        match self.store.size() {
            Ok(now) if now < self.info.mediasize => {
                self.fail(format!(
                    "the provider shrank from {} to {now} bytes (truncated or resized under hastd)",
                    self.info.mediasize
                ));
                false
            }
            _ => true,
        }
    }

    /// Checks the provider's size every [`SIZE_CHECK_INTERVAL`] until it
    /// is closed or detached (see [`LocalDisk::check_size`]).
    pub fn watch_size(self: &Rc<Self>) {
        let me = Rc::downgrade(self);
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(SIZE_CHECK_INTERVAL).await;
                match me.upgrade() {
                    Some(d) if d.check_size() => {}
                    _ => return,
                }
            }
        })
        .detach();
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
        self.store.alloc(len)
    }

    /// Updates and durably writes the metadata block.
    pub async fn update_metadata(&self, f: impl FnOnce(&mut Metadata)) -> io::Result<()> {
        let _p = self.persist.acquire_permit(1).await.map_err(closing)?;
        let mut md = self.md.borrow().clone();
        f(&mut md);
        let block = md.encode();
        let mut buf = self.store.alloc(METADATA_SIZE);
        buf.as_bytes_mut().copy_from_slice(&block[..]);
        self.usable()?;
        let n = self.store.write(0, buf).await;
        self.note(
            "metadata write",
            Some(0),
            n.and_then(|n| check_len(n, METADATA_SIZE as u64)),
        )?;
        self.flush().await?;
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
        // The written map's bit goes with the activemap batch when one is
        // due (the data write checks it is durable, see ensure_written).
        self.want_written(offset, len);
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
        let held_full = map.held_only() >= self.held_bound.get();
        drop(map);
        if outcome == Settled::NeedsSync {
            self.marked.notify_all();
        }
        if held_full {
            self.held.notify_all();
        }
    }

    /// Resolves at the next write completed as needing synchronisation.
    pub async fn marked_for_sync(&self) {
        self.marked.notified().await
    }

    /// Resolves when the extents marked only because the peer has not
    /// flushed them reach `bound` (at once if they have).
    pub async fn held_reached(&self, bound: usize) {
        self.held_bound.set(bound);
        let map = &self.map;
        self.held
            .wait_until(|| map.borrow().held_only() >= bound)
            .await
    }

    async fn persist_until(&self, seq: u64) -> io::Result<()> {
        let _p = self.persist.acquire_permit(1).await.map_err(closing)?;
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
        let _p = self.persist.acquire_permit(1).await.map_err(closing)?;
        loop {
            let batch = self.map.borrow_mut().take_persist();
            match batch {
                Some(b) => self.write_batch(b).await?,
                None => return Ok(()),
            }
        }
    }

    /// Sets the written-map bits of the range in memory; true when some
    /// are not on disk yet.
    fn want_written(&self, offset: u64, len: u64) -> bool {
        match &mut *self.written.borrow_mut() {
            Some(w) => {
                let pending = w.want(offset, len);
                self.stats.written_extents.store(w.written(), Relaxed);
                pending
            }
            None => false,
        }
    }

    /// Makes the written-map bits of the range durable before data is
    /// written there: nothing to do once an extent was written (the common
    /// case: a bit test), else one sector write (and flush, with
    /// metaflush) shared by the writers waiting meanwhile.
    async fn ensure_written(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.want_written(offset, len) {
            return Ok(());
        }
        let _p = self.persist.acquire_permit(1).await.map_err(closing)?;
        loop {
            let sectors = {
                let w = self.written.borrow();
                match &*w {
                    Some(w) if !w.covers(offset, len) => {}
                    _ => return Ok(()),
                }
                drop(w);
                self.written
                    .borrow_mut()
                    .as_mut()
                    .map(WrittenMap::take)
                    .unwrap_or_default()
            };
            if sectors.is_empty() {
                return Err(io::Error::other(
                    "written map: bits wanted but no sector to write",
                ));
            }
            self.write_written(&sectors).await?;
            if self.metaflush.get() {
                if let Err(e) = self.flush().await {
                    self.written_failed(&sectors);
                    return Err(e);
                }
            }
            self.written_done(&sectors);
        }
    }

    /// Writes sectors of the written map (coalescing adjacent ones); on
    /// error they go with the next batch.
    async fn write_written(&self, sectors: &Sectors) -> io::Result<()> {
        let (off, ss) = {
            let md = self.md.borrow();
            (md.datamapoff, md.sectorsize as usize)
        };
        let mut i = 0;
        while i < sectors.len() {
            let mut j = i + 1;
            while j < sectors.len() && sectors[j].0 == sectors[j - 1].0 + 1 {
                j += 1;
            }
            let mut buf = self.store.alloc((j - i) * ss);
            for (k, (_, img)) in sectors[i..j].iter().enumerate() {
                buf.as_bytes_mut()[k * ss..(k + 1) * ss].copy_from_slice(img);
            }
            let pos = off + (sectors[i].0 * ss) as u64;
            if let Err(e) = self.write_noted("written map write", pos, buf).await {
                self.written_failed(sectors);
                if !is_detached(&e) {
                    tracing::error!(path = %self.path.display(), error = %e, "written map update failed");
                }
                return Err(e);
            }
            i = j;
        }
        Ok(())
    }

    fn written_failed(&self, sectors: &Sectors) {
        if let Some(w) = &mut *self.written.borrow_mut() {
            w.failed(sectors);
        }
    }

    fn written_done(&self, sectors: &Sectors) {
        if sectors.is_empty() {
            return;
        }
        if let Some(w) = &mut *self.written.borrow_mut() {
            w.persisted(sectors);
        }
        self.stats.written_map_updates.fetch_add(1, Relaxed);
    }

    /// Was extent `e` written since `hastctl create`? Always true for a
    /// format 1 provider (no written map).
    pub fn extent_written(&self, e: u32) -> bool {
        match &*self.written.borrow() {
            Some(w) => w.is_written(e),
            None => true,
        }
    }

    /// The first extent at or after `from` that was written since create.
    pub fn next_written(&self, from: u32) -> Option<u32> {
        match &*self.written.borrow() {
            Some(w) => w.next_written(from),
            None => (u64::from(from) < self.datasize().div_ceil(self.extentsize())).then_some(from),
        }
    }

    /// The written map as a bitmap of exactly `ceil(extents / 8)` bytes
    /// (LSB first); None for a format 1 provider.
    pub fn written_bitmap(&self) -> Option<Vec<u8>> {
        self.written.borrow().as_ref().map(WrittenMap::bitmap)
    }

    /// Does the provider keep a written map (format 2)?
    pub fn has_written_map(&self) -> bool {
        self.written.borrow().is_some()
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
        // Written-map bits wanted meanwhile share this batch's flush.
        let written = self
            .written
            .borrow_mut()
            .as_mut()
            .map(WrittenMap::take)
            .unwrap_or_default();
        self.write_written(&written).await?;
        let mut i = 0;
        while i < batch.sectors.len() {
            let mut j = i + 1;
            while j < batch.sectors.len() && batch.sectors[j].0 == batch.sectors[j - 1].0 + 1 {
                j += 1;
            }
            let mut buf = self.store.alloc((j - i) * ss);
            for (k, (_, img)) in batch.sectors[i..j].iter().enumerate() {
                buf.as_bytes_mut()[k * ss..(k + 1) * ss].copy_from_slice(img);
            }
            let pos = mapoff + (batch.sectors[i].0 * ss) as u64;
            if let Err(e) = self.write_noted("activemap write", pos, buf).await {
                // The written-map bits go with the next batch.
                self.written_failed(&written);
                return Err(e);
            }
            i = j;
        }
        if self.metaflush.get() {
            if let Err(e) = self.flush().await {
                self.written_failed(&written);
                return Err(e);
            }
        }
        self.written_done(&written);
        Ok(())
    }

    /// Reads `[offset, offset+len)` of the data area.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<ReadData> {
        let ss = self.sectorsize();
        let localoff = self.md.borrow().localoff;
        let start = round_down(offset, ss);
        let end = round_up(offset + len as u64, ss);
        let r = self.read_sectors(localoff + start, end - start).await?;
        let skip = (offset - start) as usize;
        r.slice(skip, len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "short read"))
    }

    /// Reads whole sectors of the provider; a short read (the provider
    /// ends early) is an error, and makes the size be checked at once.
    async fn read_sectors(&self, pos: u64, len: u64) -> io::Result<ReadData> {
        self.usable()?;
        let r = self.store.read(pos, len as usize).await;
        let r = r.and_then(|d| {
            if d.len() as u64 == len {
                Ok(d)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short read: {} of {len} bytes", d.len()),
                ))
            }
        });
        if r.is_err() {
            self.check_size();
        }
        self.note("read", Some(pos), r)
    }

    /// Writes whole sectors of the provider.
    async fn write_sectors_at(&self, pos: u64, buf: DmaBuffer) -> io::Result<()> {
        self.write_noted("write", pos, buf).await
    }

    /// Writes `buf` at `pos` of the provider, unless it is detached; the
    /// outcome counts towards a detach (`op` names it in the message).
    async fn write_noted(&self, op: &str, pos: u64, buf: DmaBuffer) -> io::Result<()> {
        self.usable()?;
        let len = buf.len() as u64;
        let r = self.store.write(pos, buf).await;
        self.note(op, Some(pos), r.and_then(|n| check_len(n, len)))
    }

    /// Starts a new generation before a write that needs one (see
    /// [`bump_before_write`]: the first write of each disconnected epoch
    /// when `alone`, the first write ever when linked), durably, before
    /// the data write, so that a reconnect tells who wrote.
    pub async fn bump_generation_if_needed(&self, alone: bool) -> io::Result<()> {
        let writer = |md: &Metadata| Writer {
            alone,
            epoch_bumped: self.epoch_bumped.get(),
            inconsistent: md.flags & FLAG_INCONSISTENT != 0,
        };
        let needed = {
            let md = self.md.borrow();
            bump_before_write(&mut handshake::gen_of(&md), writer(&md))
        };
        if !needed {
            return Ok(());
        }
        let mut bumped = false;
        self.update_metadata(|md| {
            let mut gen = handshake::gen_of(md);
            if bump_before_write(&mut gen, writer(md)) {
                md.localcnt = gen.localcnt;
                bumped = true;
            }
        })
        .await?;
        if bumped {
            self.epoch_bumped.set(true);
        }
        Ok(())
    }

    /// A new disconnected epoch begins (the link to the peer was lost):
    /// the next write made alone starts a new generation.
    pub fn new_epoch(&self) {
        self.epoch_bumped.set(false);
    }

    /// Writes a shared buffer at `offset` (the same buffer is being sent to
    /// the peer). The caller holds the range lock and has marked the
    /// activemap.
    pub async fn write_rc(&self, offset: u64, data: Rc<DmaBuffer>) -> io::Result<()> {
        let ss = self.sectorsize();
        let len = data.len() as u64;
        self.ensure_written(offset, len).await?;
        if offset.is_multiple_of(ss) && len.is_multiple_of(ss) {
            let localoff = self.md.borrow().localoff;
            self.usable()?;
            let r = self.store.write_rc(localoff + offset, data).await;
            return self.note(
                "write",
                Some(localoff + offset),
                r.and_then(|n| check_len(n, len)),
            );
        }
        self.write_unaligned(offset, data.as_bytes()).await
    }

    /// Writes `data` at `offset` of the data area. The caller holds the
    /// range lock and has marked the activemap.
    pub async fn write(&self, offset: u64, data: DmaBuffer) -> io::Result<()> {
        let ss = self.sectorsize();
        let len = data.len() as u64;
        self.ensure_written(offset, len).await?;
        let localoff = self.md.borrow().localoff;
        if offset.is_multiple_of(ss) && len.is_multiple_of(ss) {
            return self.write_sectors_at(localoff + offset, data).await;
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
        let old = self.read_sectors(localoff + start, end - start).await?;
        let mut buf = self.store.alloc((end - start) as usize);
        buf.as_bytes_mut().copy_from_slice(&old);
        let skip = (offset - start) as usize;
        buf.as_bytes_mut()[skip..skip + len as usize].copy_from_slice(data);
        self.write_sectors_at(localoff + start, buf).await
    }

    /// Zeroes `[offset, offset+len)` of the data area: partial sectors by
    /// read-modify-write, whole sectors by punching a hole (which reads
    /// back as zeros on files and block devices) or, where that is not
    /// supported, by writing zeros. The caller holds the range lock and has
    /// marked the activemap.
    pub async fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        self.ensure_written(offset, len).await?;
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
        self.usable()?;
        // A refused punch is no disk error: zeros are written instead.
        let punched = self.store.deallocate(localoff + a0, a1 - a0).await.is_ok();
        if self.punch_works.replace(Some(punched)) != Some(punched) && !punched {
            tracing::info!(path = %self.path.display(),
                "the provider refuses to punch holes; zeroing writes zeros");
        }
        if punched {
            return Ok(());
        }
        let mut pos = a0;
        while pos < a1 {
            let n = (a1 - pos).min(ZERO_CHUNK as u64);
            if n == ZERO_CHUNK as u64 {
                self.usable()?;
                let w = self
                    .store
                    .write_rc(localoff + pos, self.zeros.clone())
                    .await;
                self.note(
                    "write",
                    Some(localoff + pos),
                    w.and_then(|w| check_len(w, n)),
                )?;
            } else {
                let mut b = self.store.alloc(n as usize);
                b.as_bytes_mut().fill(0);
                self.write_sectors_at(localoff + pos, b).await?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Whether [`LocalDisk::zero`] of this range punches a hole (fast, no
    /// data written) rather than writing zeros: the range covers at least
    /// one whole sector (partial sectors around it are a read-modify-write
    /// each), and the provider punches holes: the last punch worked, or
    /// none was tried yet and the provider is a regular file (Linux
    /// filesystems punch holes; a block device does only with hardware
    /// zeroing offload, which cannot be known before trying).
    pub fn zero_punches(&self, offset: u64, len: u64) -> bool {
        let ss = self.sectorsize();
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        if round_up(offset, ss) >= round_down(end, ss) {
            return false;
        }
        self.punch_works.get().unwrap_or(!self.info.blockdev)
    }

    /// Where `[offset, offset + len)` of the data area (clipped to it) may
    /// hold data, in data-area coordinates and whole sectors: the
    /// provider's allocation from `SEEK_DATA`/`SEEK_HOLE` (see
    /// [`provider::file_allocation`]). A hole reads as zeros, so it need
    /// not be read or copied. A block device, or a filesystem that does not
    /// report holes, is all data. At most `max_segments` segments (at least
    /// 1), contiguous from `offset`; the map may stop short of the end of
    /// the range, and callers go on from the end of its last segment. Two
    /// `lseek`s per segment, no I/O on the data: cheap enough to call on
    /// the executor, with a bounded `max_segments`.
    ///
    /// Used by the NBD block status (through
    /// [`crate::primary::Primary::allocation`], which overrides it where
    /// reads come from the peer) and meant for a full synchronisation that
    /// skips what cannot hold data.
    pub fn allocation(&self, offset: u64, len: u64, max_segments: usize) -> Vec<Segment> {
        let (localoff, datasize) = {
            let md = self.md.borrow();
            (md.localoff, md.datasize)
        };
        let end = offset.saturating_add(len).min(datasize);
        if offset >= end {
            return Vec::new();
        }
        if self.info.blockdev {
            return vec![Segment {
                offset,
                len: end - offset,
                allocation: Allocation::Data,
            }];
        }
        self.store
            .allocation(localoff, offset, end, self.sectorsize(), max_segments)
    }

    async fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut b = self.store.alloc(len as usize);
        b.as_bytes_mut().fill(0);
        self.write(offset, b).await
    }

    /// Makes every completed write durable. Flushes run one at a time;
    /// a caller that finds one in progress waits for it and then for one
    /// begun after its call, which may have been started by another
    /// waiter (concurrent callers share a flush). The activemap learns
    /// which data became durable, so the marks vouching for it may be
    /// cleared on disk only afterwards.
    pub async fn flush(&self) -> io::Result<()> {
        // The first flush to begin after this call.
        let need = self.flushes_begun.get() + 1;
        let _one = self.flush_lock.acquire_permit(1).await.map_err(closing)?;
        if self.flushes_done.get() >= need {
            return Ok(());
        }
        self.usable()?;
        let n = self.flushes_begun.get() + 1;
        self.flushes_begun.set(n);
        self.map.borrow_mut().local_flush_begin();
        let r = self.store.flush().await;
        match self.note("flush", None, r) {
            Ok(()) => {
                self.map.borrow_mut().local_flush_done();
                self.flushes_done.set(n);
                Ok(())
            }
            Err(e) => {
                self.map.borrow_mut().local_flush_failed();
                Err(e)
            }
        }
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

    /// Marks the extents of `[offset, offset + len)` as needing
    /// synchronisation, durably (a verify found them different); the
    /// remote leg is woken to copy them.
    pub async fn mark_for_sync(&self, offset: u64, len: u64) -> io::Result<()> {
        let need = self.map.borrow_mut().need_sync(offset, len);
        self.after_marking(need).await?;
        self.marked.notify_all();
        Ok(())
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

    /// Makes the data durable, stores the activemap (lazy clears
    /// included) and the metadata with `role` as prevrole, then closes the
    /// provider.
    pub async fn close(self: Rc<Self>, role: Role) -> io::Result<()> {
        // Clean stop: nothing in flight, so keepdirty marks are not needed
        // (they would read back as "needs sync" at the next open).
        if self.map.borrow().inflight_extents() == 0 {
            self.map.borrow_mut().clear_keepdirty();
        }
        // Data durable first: only then may the clears be written.
        self.flush().await?;
        self.persist_all().await?;
        self.update_metadata(|md| md.prevrole = role).await?;
        match Rc::try_unwrap(self) {
            Ok(disk) => disk.store.close().await,
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
