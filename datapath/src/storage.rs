//! The seam under the local leg: sector-addressed storage.
//!
//! [`crate::local::LocalDisk`] keeps the metadata, the activemap and the
//! range locks; where the bytes go is a [`Storage`]:
//!
//! * [`DirectFile`]: the provider (a file or block device) opened with
//!   O_DIRECT through glommio's `DmaFile` — what hastd runs on;
//! * [`MemStorage`]: memory, with a volatile write cache that a simulated
//!   power cut can drop — what the in-process tests and the crash
//!   simulation run on.
//!
//! Offsets and lengths are in bytes of the whole provider (metadata
//! included) and multiples of its sector size. A read returns
//! [`ReadData`], which is either glommio's buffer (no copy) or a slice of
//! a shared in-memory buffer.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::ops::Deref;
use std::pin::Pin;
use std::rc::Rc;

use std::os::fd::AsRawFd;

use glommio::io::{DmaBuffer, DmaFile, ReadResult};
use rand::Rng;

/// A boxed future of a storage operation (one allocation per I/O keeps
/// [`Storage`] object-safe; it is small beside the system call).
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + 'a>>;

/// Sector-addressed storage of one provider.
pub trait Storage {
    /// An aligned buffer for I/O of `len` bytes.
    fn alloc(&self, len: usize) -> DmaBuffer;
    /// Reads `len` bytes at `pos`. A read past the end returns fewer.
    fn read(&self, pos: u64, len: usize) -> IoFuture<'_, ReadData>;
    /// Writes `buf` at `pos`; returns the bytes written.
    fn write(&self, pos: u64, buf: DmaBuffer) -> IoFuture<'_, usize>;
    /// Writes a shared buffer (also being sent to the peer) at `pos`.
    fn write_rc(&self, pos: u64, buf: Rc<DmaBuffer>) -> IoFuture<'_, usize>;
    /// Makes every completed write durable.
    fn flush(&self) -> IoFuture<'_, ()>;
    /// Discards `[pos, pos+len)`: it reads back as zeros afterwards.
    /// Fails when the storage cannot (the caller then writes zeros).
    fn deallocate(&self, pos: u64, len: u64) -> IoFuture<'_, ()>;
    /// Closes the storage.
    fn close(self: Box<Self>) -> IoFuture<'static, ()>;
    /// The provider's size in bytes now (it may have been truncated or a
    /// block device shrunk under us). Synchronous and cheap (one `fstat`
    /// or ioctl): called once a second and after a short read.
    fn size(&self) -> io::Result<u64>;

    /// Where `[base + start, base + end)` may hold data, as segments of
    /// `[start, end)` in whole `align` units, at most `max_segments` (see
    /// [`crate::provider::file_allocation`]). The default: all data
    /// (always correct).
    fn allocation(
        &self,
        base: u64,
        start: u64,
        end: u64,
        align: u64,
        max_segments: usize,
    ) -> Vec<crate::provider::Segment> {
        let _ = (base, align, max_segments);
        if start >= end {
            return Vec::new();
        }
        vec![crate::provider::Segment {
            offset: start,
            len: end - start,
            allocation: crate::provider::Allocation::Data,
        }]
    }
}

/// Bytes read from a [`Storage`].
pub enum ReadData {
    /// Read by glommio into its own buffer.
    File(ReadResult),
    /// A slice of an in-memory buffer.
    Mem {
        /// The whole buffer.
        buf: Rc<Vec<u8>>,
        /// Where the slice starts.
        start: usize,
        /// Its length.
        len: usize,
    },
}

impl ReadData {
    /// `len` bytes from `offset` into this data, sharing the buffer.
    pub fn slice(&self, offset: usize, len: usize) -> Option<ReadData> {
        match self {
            ReadData::File(r) => ReadResult::slice(r, offset, len).map(ReadData::File),
            ReadData::Mem { buf, start, len: n } => {
                let end = offset.checked_add(len)?;
                (end <= *n).then(|| ReadData::Mem {
                    buf: buf.clone(),
                    start: start + offset,
                    len,
                })
            }
        }
    }
}

impl Deref for ReadData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadData::File(r) => r,
            ReadData::Mem { buf, start, len } => &buf[*start..*start + *len],
        }
    }
}

/// glommio's error as an `io::Error` that keeps the OS errno: glommio's
/// own conversion rebuilds its `EnhancedIoError` (every failed file
/// operation) from the error kind and a message, which loses the errno
/// (`ENOSPC` became `EIO` by the time the secondary reported it). The
/// operation and the path are added by our callers' messages.
fn io_err(e: glommio::GlommioError<()>) -> io::Error {
    match e {
        glommio::GlommioError::EnhancedIoError { source, .. } => source,
        other => other.into(),
    }
}

/// The provider opened with O_DIRECT through glommio.
pub struct DirectFile(DmaFile);

impl DirectFile {
    /// Wraps an open file (see [`crate::provider::open_direct`]).
    pub fn new(file: DmaFile) -> DirectFile {
        DirectFile(file)
    }
}

impl Storage for DirectFile {
    fn alloc(&self, len: usize) -> DmaBuffer {
        self.0.alloc_dma_buffer(len)
    }

    fn read(&self, pos: u64, len: usize) -> IoFuture<'_, ReadData> {
        Box::pin(async move {
            let r = self.0.read_at_aligned(pos, len).await.map_err(io_err)?;
            Ok(ReadData::File(r))
        })
    }

    fn write(&self, pos: u64, buf: DmaBuffer) -> IoFuture<'_, usize> {
        Box::pin(async move { self.0.write_at(buf, pos).await.map_err(io_err) })
    }

    fn write_rc(&self, pos: u64, buf: Rc<DmaBuffer>) -> IoFuture<'_, usize> {
        Box::pin(async move { self.0.write_rc_at(buf, pos).await.map_err(io_err) })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move { self.0.fdatasync().await.map_err(io_err) })
    }

    fn deallocate(&self, pos: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.0.deallocate(pos, len).await.map_err(io_err) })
    }

    fn close(self: Box<Self>) -> IoFuture<'static, ()> {
        Box::pin(async move { self.0.close().await.map_err(io_err) })
    }

    fn size(&self) -> io::Result<u64> {
        crate::provider::current_size(self.0.as_raw_fd())
    }

    fn allocation(
        &self,
        base: u64,
        start: u64,
        end: u64,
        align: u64,
        max_segments: usize,
    ) -> Vec<crate::provider::Segment> {
        crate::provider::file_allocation(&self.0, base, start, end, align, max_segments)
    }
}

/// The state of a [`MemStorage`], shared with the test that made it (which
/// inspects it, injects faults, and cuts the power).
#[derive(Debug)]
pub struct MemDisk {
    sector: usize,
    /// What reads see.
    current: Vec<u8>,
    /// What survives a power cut for sure (as of the last flush).
    durable: Vec<u8>,
    /// With a volatile cache: sectors written since the last flush, each
    /// with every version written since (oldest first).
    unflushed: std::collections::BTreeMap<usize, Vec<Vec<u8>>>,
    /// Sectors holding data (written since created, not deallocated): a
    /// sparse file's allocated blocks, for [`MemFaults::no_space`].
    allocated: Vec<bool>,
    /// Writes past the end extend the disk, as they extend a regular file
    /// (set by [`MemDisk::truncate`]); otherwise they fail with ENOSPC, as
    /// on a block device.
    grows: bool,
    /// Completed writes sit in a volatile cache until a flush.
    volatile: bool,
    /// Powered off: every operation fails (see [`MemDisk::power_cut`]).
    dead: bool,
    /// Power cycles so far: storage opened before the last cut stays dead
    /// (the processes of a crashed host do not come back).
    epoch: u64,
    /// Faults to inject.
    pub faults: MemFaults,
    /// Operations seen.
    pub counts: MemCounts,
}

/// Faults a [`MemStorage`] injects (each while set).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemFaults {
    /// Reads fail with EIO.
    pub read_error: bool,
    /// Writes fail with EIO.
    pub write_error: bool,
    /// Flushes fail with EIO.
    pub flush_error: bool,
    /// The filesystem under a sparse provider is full: a write touching a
    /// sector that holds no data yet (a hole) fails with ENOSPC; rewriting
    /// allocated sectors still works.
    pub no_space: bool,
    /// Bad sectors: reads and writes overlapping `[start, end)` (bytes of
    /// the whole provider) fail with EIO.
    pub bad: Option<(u64, u64)>,
}

impl MemFaults {
    fn hits_bad(&self, pos: u64, len: u64) -> bool {
        self.bad
            .is_some_and(|(s, e)| pos < e && pos.saturating_add(len) > s)
    }
}

/// Operations a [`MemStorage`] has served.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemCounts {
    /// Reads.
    pub reads: u64,
    /// Writes (and deallocations).
    pub writes: u64,
    /// Flushes.
    pub flushes: u64,
}

impl MemDisk {
    /// A zeroed disk of `size` bytes in sectors of `sector` bytes; with
    /// `volatile`, writes are only durable after a flush.
    pub fn new(size: usize, sector: usize, volatile: bool) -> Rc<RefCell<MemDisk>> {
        assert!(sector > 0 && size.is_multiple_of(sector));
        Rc::new(RefCell::new(MemDisk {
            sector,
            current: vec![0; size],
            durable: vec![0; size],
            unflushed: Default::default(),
            allocated: vec![false; size / sector],
            grows: false,
            volatile,
            dead: false,
            epoch: 0,
            faults: MemFaults::default(),
            counts: MemCounts::default(),
        }))
    }

    /// A disk of `size` bytes holding fresh metadata for `md` and a zeroed
    /// activemap, as `hastctl create` leaves a provider.
    pub fn with_metadata(
        md: &crate::metadata::Metadata,
        size: usize,
        volatile: bool,
    ) -> Rc<RefCell<MemDisk>> {
        let disk = MemDisk::new(size, md.sectorsize as usize, volatile);
        disk.borrow_mut().poke(0, &md.encode()[..]);
        disk
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.current.len()
    }

    /// Sector size.
    pub fn sector(&self) -> usize {
        self.sector
    }

    /// What a read sees now.
    pub fn contents(&self) -> &[u8] {
        &self.current
    }

    /// Writes behind the storage's back (a test corrupting a leg).
    pub fn poke(&mut self, pos: usize, data: &[u8]) {
        self.current[pos..pos + data.len()].copy_from_slice(data);
        self.durable[pos..pos + data.len()].copy_from_slice(data);
        self.allocate(pos, data.len());
    }

    /// Cuts the disk to `size` bytes (whole sectors), as `truncate -s`
    /// does to a provider file under a running hastd: reads past the new
    /// end return nothing, and from now on a write past the end extends
    /// the disk with zeros up to it (a regular file's hole).
    pub fn truncate(&mut self, size: usize) {
        let size = size - size % self.sector;
        self.current.truncate(size);
        self.durable.truncate(size);
        self.allocated.truncate(size / self.sector);
        let last = size / self.sector;
        self.unflushed.retain(|&s, _| s < last);
        self.grows = true;
    }

    /// Sectors holding data (see [`MemFaults::no_space`]).
    pub fn allocated_sectors(&self) -> usize {
        self.allocated.iter().filter(|&&a| a).count()
    }

    fn allocate(&mut self, pos: usize, len: usize) {
        let (first, end) = (pos / self.sector, (pos + len).div_ceil(self.sector));
        for a in &mut self.allocated[first..end] {
            *a = true;
        }
    }

    fn all_allocated(&self, pos: usize, len: usize) -> bool {
        let (first, end) = (pos / self.sector, (pos + len).div_ceil(self.sector));
        self.allocated[first..end].iter().all(|&a| a)
    }

    /// A regular file grows to hold a write past its end.
    fn grow_to(&mut self, end: usize) {
        if end > self.current.len() {
            self.current.resize(end, 0);
            self.durable.resize(end, 0);
            self.allocated.resize(end.div_ceil(self.sector), false);
        }
    }

    /// Sectors written since the last flush.
    pub fn unflushed_sectors(&self) -> usize {
        self.unflushed.len()
    }

    /// Is the disk powered off?
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Powers the disk on again after a [`MemDisk::power_cut`] (a
    /// restart of its host).
    pub fn power_on(&mut self) {
        self.dead = false;
    }

    fn store(&mut self, pos: usize, data: &[u8]) {
        self.allocate(pos, data.len());
        self.current[pos..pos + data.len()].copy_from_slice(data);
        if !self.volatile {
            self.durable[pos..pos + data.len()].copy_from_slice(data);
            return;
        }
        for (i, chunk) in data.chunks(self.sector).enumerate() {
            let s = pos / self.sector + i;
            self.unflushed.entry(s).or_default().push(chunk.to_vec());
        }
    }

    fn flush(&mut self) {
        self.durable.copy_from_slice(&self.current);
        self.unflushed.clear();
    }

    /// A power cut: each sector written since the last flush keeps its
    /// durable contents or any one of the versions written since (a
    /// volatile cache may have written back any of them, in any order; a
    /// torn write is this, sector by sector). Reads then see what
    /// survived. The disk is off until [`MemDisk::power_on`]: every
    /// operation fails meanwhile. Returns how many sectors lost their
    /// newest version.
    pub fn power_cut(&mut self, rng: &mut impl Rng) -> usize {
        self.dead = true;
        self.epoch += 1;
        let mut lost = 0;
        let unflushed = std::mem::take(&mut self.unflushed);
        for (s, versions) in unflushed {
            let pick = rng.gen_range(0..=versions.len());
            let at = s * self.sector;
            if pick < versions.len() {
                self.durable[at..at + self.sector].copy_from_slice(&versions[pick]);
            }
            if pick + 1 != versions.len() {
                lost += 1;
            }
        }
        self.current.copy_from_slice(&self.durable);
        lost
    }
}

/// Fires an action at the n-th storage operation of the disks that share
/// it (a simulated crash at a chosen point: the action runs before that
/// operation takes effect).
#[derive(Default)]
pub struct Tripwire {
    remaining: std::cell::Cell<Option<u64>>,
    /// Count only flushes (the moments a volatile cache is written back).
    flushes_only: std::cell::Cell<bool>,
    action: RefCell<Option<Box<dyn FnOnce()>>>,
    seen: std::cell::Cell<u64>,
}

impl Tripwire {
    /// Not armed.
    pub fn new() -> Rc<Tripwire> {
        Rc::new(Tripwire::default())
    }

    /// Runs `action` just before the `n`-th operation from now (0: the
    /// next one).
    pub fn arm(&self, n: u64, action: impl FnOnce() + 'static) {
        self.flushes_only.set(false);
        self.remaining.set(Some(n));
        *self.action.borrow_mut() = Some(Box::new(action));
    }

    /// Like [`Tripwire::arm`], counting only flushes: the action runs
    /// just before the `n`-th flush from now.
    pub fn arm_at_flush(&self, n: u64, action: impl FnOnce() + 'static) {
        self.arm(n, action);
        self.flushes_only.set(true);
    }

    /// Disarms it; returns whether it had fired.
    pub fn disarm(&self) -> bool {
        self.remaining.set(None);
        self.action.borrow_mut().take().is_none()
    }

    /// Operations counted so far.
    pub fn seen(&self) -> u64 {
        self.seen.get()
    }

    fn step(&self, flush: bool) {
        self.seen.set(self.seen.get() + 1);
        if self.flushes_only.get() && !flush {
            return;
        }
        match self.remaining.get() {
            Some(0) => {
                self.remaining.set(None);
                let action = self.action.borrow_mut().take();
                if let Some(f) = action {
                    f();
                }
            }
            Some(n) => self.remaining.set(Some(n - 1)),
            None => {}
        }
    }
}

/// In-memory storage over a shared [`MemDisk`].
pub struct MemStorage {
    disk: Rc<RefCell<MemDisk>>,
    wire: Option<Rc<Tripwire>>,
    /// The disk's power epoch when this storage was opened.
    epoch: u64,
}

impl MemStorage {
    /// Storage over `disk`.
    pub fn new(disk: Rc<RefCell<MemDisk>>) -> MemStorage {
        let epoch = disk.borrow().epoch;
        MemStorage {
            disk,
            wire: None,
            epoch,
        }
    }

    /// Storage over `disk` whose operations step `wire`.
    pub fn with_tripwire(disk: Rc<RefCell<MemDisk>>, wire: Rc<Tripwire>) -> MemStorage {
        let mut s = MemStorage::new(disk);
        s.wire = Some(wire);
        s
    }

    /// Counts an operation (which may fire the tripwire, and cut the
    /// power), then fails if the disk is off or was power-cycled since
    /// this storage was opened.
    fn begin(&self, flush: bool) -> io::Result<()> {
        if let Some(w) = &self.wire {
            w.step(flush);
        }
        let d = self.disk.borrow();
        if d.dead || d.epoch != self.epoch {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    fn check(&self, pos: u64, len: usize) -> io::Result<usize> {
        let mut d = self.disk.borrow_mut();
        let s = d.sector as u64;
        if !pos.is_multiple_of(s) || !(len as u64).is_multiple_of(s) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let end = pos.checked_add(len as u64);
        match end {
            Some(e) if e <= d.size() as u64 => Ok(pos as usize),
            // A regular file grows (the bytes between are a hole).
            Some(e) if d.grows => {
                d.grow_to(e as usize);
                Ok(pos as usize)
            }
            _ => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        }
    }

    fn write_bytes(&self, pos: u64, data: &[u8]) -> io::Result<usize> {
        self.begin(false)?;
        {
            let d = self.disk.borrow();
            if d.faults.write_error || d.faults.hits_bad(pos, data.len() as u64) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let inside = (pos as usize).saturating_add(data.len()) <= d.size();
            if d.faults.no_space && !(inside && d.all_allocated(pos as usize, data.len())) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        let at = self.check(pos, data.len())?;
        let mut d = self.disk.borrow_mut();
        d.counts.writes += 1;
        d.store(at, data);
        Ok(data.len())
    }
}

/// Runs `f` after yielding once, so that in-memory I/O completes later
/// than it was issued, like real I/O (other tasks run in between).
async fn later<T>(f: impl FnOnce() -> T) -> T {
    futures_lite::future::yield_now().await;
    f()
}

impl Storage for MemStorage {
    fn alloc(&self, len: usize) -> DmaBuffer {
        glommio::allocate_dma_buffer(len)
    }

    fn read(&self, pos: u64, len: usize) -> IoFuture<'_, ReadData> {
        Box::pin(later(move || {
            self.begin(false)?;
            let d = self.disk.borrow();
            if d.faults.read_error || d.faults.hits_bad(pos, len as u64) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let start = (pos as usize).min(d.size());
            let end = start.saturating_add(len).min(d.size());
            let data = d.current[start..end].to_vec();
            drop(d);
            self.disk.borrow_mut().counts.reads += 1;
            let len = data.len();
            Ok(ReadData::Mem {
                buf: Rc::new(data),
                start: 0,
                len,
            })
        }))
    }

    fn write(&self, pos: u64, buf: DmaBuffer) -> IoFuture<'_, usize> {
        Box::pin(later(move || self.write_bytes(pos, buf.as_bytes())))
    }

    fn write_rc(&self, pos: u64, buf: Rc<DmaBuffer>) -> IoFuture<'_, usize> {
        Box::pin(later(move || self.write_bytes(pos, buf.as_bytes())))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(later(move || {
            self.begin(true)?;
            let mut d = self.disk.borrow_mut();
            if d.faults.flush_error {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            d.counts.flushes += 1;
            d.flush();
            Ok(())
        }))
    }

    fn deallocate(&self, pos: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(later(move || {
            let n = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            self.begin(false)?;
            {
                let d = self.disk.borrow();
                if d.faults.write_error || d.faults.hits_bad(pos, len) {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
            }
            let at = self.check(pos, n)?;
            let mut d = self.disk.borrow_mut();
            // Punching a hole frees the blocks: it works on a full
            // filesystem, and the sectors are holes again.
            d.counts.writes += 1;
            d.store(at, &vec![0u8; n]);
            let (first, end) = (at / d.sector, (at + n) / d.sector);
            for a in &mut d.allocated[first..end] {
                *a = false;
            }
            Ok(())
        }))
    }

    fn close(self: Box<Self>) -> IoFuture<'static, ()> {
        Box::pin(async { Ok(()) })
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.disk.borrow().size() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn volatile_cache_keeps_a_version_per_sector() {
        let disk = MemDisk::new(4096, 512, true);
        let mut d = disk.borrow_mut();
        d.store(0, &[1u8; 1024]);
        d.flush();
        d.store(0, &[2u8; 1024]);
        d.store(512, &[3u8; 512]);
        assert_eq!(&d.contents()[..512], &[2u8; 512][..]);
        assert_eq!(d.unflushed_sectors(), 2);
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let mut copy = MemDisk {
                sector: d.sector,
                current: d.current.clone(),
                durable: d.durable.clone(),
                unflushed: d.unflushed.clone(),
                allocated: d.allocated.clone(),
                grows: false,
                volatile: true,
                dead: false,
                epoch: 0,
                faults: d.faults,
                counts: d.counts,
            };
            copy.power_cut(&mut rand::rngs::StdRng::seed_from_u64(seed));
            let (a, b) = (copy.contents()[0], copy.contents()[512]);
            assert!([1, 2].contains(&a), "sector 0 holds {a}");
            assert!([1, 2, 3].contains(&b), "sector 1 holds {b}");
            seen.insert((a, b));
        }
        // Old and new versions, in every mix, survive some cut.
        assert!(seen.len() >= 4, "{seen:?}");
    }

    #[test]
    fn flushed_writes_survive() {
        let disk = MemDisk::new(4096, 512, true);
        let mut d = disk.borrow_mut();
        d.store(1024, &[7u8; 512]);
        d.flush();
        d.power_cut(&mut rand::rngs::StdRng::seed_from_u64(1));
        assert_eq!(&d.contents()[1024..1536], &[7u8; 512][..]);
    }

    #[test]
    fn write_back_disk_is_always_durable() {
        let disk = MemDisk::new(4096, 512, false);
        let mut d = disk.borrow_mut();
        d.store(0, &[5u8; 512]);
        assert_eq!(d.power_cut(&mut rand::rngs::StdRng::seed_from_u64(2)), 0);
        assert_eq!(&d.contents()[..512], &[5u8; 512][..]);
    }
}
