//! The local provider: a regular file or a block device holding metadata,
//! activemap and data.
//!
//! Probing (size, sector sizes) uses plain synchronous syscalls so that
//! offline tools (`hastctl create`, `dump`) share it. Opening for the data
//! path goes through glommio's `DmaFile` with two workarounds for glommio
//! 0.9 (see `this-machine.md`):
//!
//! * glommio probes io_uring polled reads with a read at offset 0 of the
//!   first file it opens on a device and caches the answer per device; an
//!   empty or sparse file answers "supported" wrongly and every later read
//!   on that device fails with EOPNOTSUPP. We first open the path
//!   write-only: the probe read then fails with EBADF, which glommio caches
//!   as "not pollable", the right answer for the devices we run on.
//! * For block devices under /dev (a tmpfs) glommio skips O_DIRECT and
//!   guesses the alignment from the wrong device. We pass O_DIRECT
//!   ourselves, verify it with F_GETFL, and take sector sizes from the
//!   block device ioctls, never from glommio.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use glommio::io::{DmaFile, OpenOptions};

/// What we know about a provider before using it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderInfo {
    /// Size in bytes.
    pub mediasize: u64,
    /// Logical sector size: the O_DIRECT offset/length granularity.
    pub sectorsize: u32,
    /// Physical block size: the preferred I/O granularity.
    pub physsize: u32,
    /// A block device (as opposed to a regular file).
    pub blockdev: bool,
}

/// An error about a provider, naming its path.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}: {source}")]
pub struct ProviderError {
    /// The provider path.
    pub path: PathBuf,
    /// What was being done.
    pub what: &'static str,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

impl ProviderError {
    /// Wraps an I/O error with the path and the operation.
    pub fn new(path: &Path, what: &'static str, source: io::Error) -> Self {
        ProviderError {
            path: path.to_owned(),
            what,
            source,
        }
    }
}

mod ioctl {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    // BLKSSZGET = _IO(0x12, 104), returns an int through the pointer.
    nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
    // BLKPBSZGET = _IO(0x12, 123), returns an unsigned int.
    nix::ioctl_read_bad!(blkpbszget, nix::request_code_none!(0x12, 123), libc::c_uint);
}

/// Reads size and sector sizes of an open provider.
pub fn probe_file(path: &Path, file: &File) -> Result<ProviderInfo, ProviderError> {
    let err = |what, e| ProviderError::new(path, what, e);
    let meta = file.metadata().map_err(|e| err("stat", e))?;
    let fd = file.as_raw_fd();
    if meta.file_type().is_block_device() {
        let mut size = 0u64;
        let mut ssz: libc::c_int = 0;
        let mut psz: libc::c_uint = 0;
        // SAFETY: fd is an open block device; each ioctl writes one integer
        // of the declared type through a pointer to a live local.
        unsafe {
            ioctl::blkgetsize64(fd, &mut size).map_err(|e| err("BLKGETSIZE64", e.into()))?;
            ioctl::blksszget(fd, &mut ssz).map_err(|e| err("BLKSSZGET", e.into()))?;
            ioctl::blkpbszget(fd, &mut psz).map_err(|e| err("BLKPBSZGET", e.into()))?;
        }
        let sectorsize = u32::try_from(ssz).unwrap_or(512).max(512);
        Ok(ProviderInfo {
            mediasize: size,
            sectorsize,
            physsize: psz.max(sectorsize),
            blockdev: true,
        })
    } else if meta.file_type().is_file() {
        let sectorsize = dio_offset_align(file).unwrap_or(512).max(512);
        Ok(ProviderInfo {
            mediasize: meta.len(),
            sectorsize,
            physsize: 4096u32.max(sectorsize),
            blockdev: false,
        })
    } else {
        Err(err(
            "provider",
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ),
        ))
    }
}

/// The size of an open provider now: `st_size` of a regular file, the
/// block device's size (BLKGETSIZE64) of a device. One system call;
/// used to notice a provider that shrank under a running hastd.
pub fn current_size(fd: std::os::fd::RawFd) -> io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fd is an open descriptor; st points to writable memory of
    // the right type and size.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded and filled the structure.
    let st = unsafe { st.assume_init() };
    if st.st_mode & libc::S_IFMT == libc::S_IFBLK {
        let mut size = 0u64;
        // SAFETY: fd is an open block device; the ioctl writes one u64
        // through a pointer to a live local.
        unsafe { ioctl::blkgetsize64(fd, &mut size) }.map_err(io::Error::from)?;
        return Ok(size);
    }
    Ok(u64::try_from(st.st_size).unwrap_or(0))
}

/// For a regular file, the fraction of its size that is allocated (1.0
/// for a fully written file; None for block devices). A sparse provider
/// works, but every activemap flush then also commits the filesystem
/// journal for the blocks allocated by recent writes, which makes writes
/// to new extents several times slower.
pub fn allocated_fraction(file: &File) -> Option<f64> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().ok()?;
    if !m.file_type().is_file() || m.len() == 0 {
        return None;
    }
    Some(((m.blocks() * 512) as f64 / m.len() as f64).min(1.0))
}

/// The warning printed for a sparse provider, if it is one.
pub fn sparse_warning(path: &Path, file: &File) -> Option<String> {
    let f = allocated_fraction(file)?;
    (f < 0.95).then(|| {
        format!(
            "{}: provider file is sparse ({:.0}% allocated): writes that allocate blocks make every activemap update commit the filesystem journal; for performance use a block device or a fully written file (e.g. dd if=/dev/zero of=FILE bs=1M count=N oflag=direct)",
            path.display(),
            f * 100.0
        )
    })
}

/// Opens `path` read-only and probes it.
pub fn probe(path: &Path) -> Result<ProviderInfo, ProviderError> {
    let file = File::open(path).map_err(|e| ProviderError::new(path, "open", e))?;
    probe_file(path, &file)
}

/// O_DIRECT offset alignment of a regular file (statx STATX_DIOALIGN,
/// Linux 6.1+), if the kernel reports it.
fn dio_offset_align(file: &File) -> Option<u32> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: the fd is open, the empty path with AT_EMPTY_PATH refers to
    // it, and stx points to writable memory of the right type and size.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: statx succeeded and filled the structure (it was zeroed, so
    // fields it did not fill are 0).
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        Some(stx.stx_dio_offset_align)
    } else {
        None
    }
}

/// Does the descriptor have O_DIRECT set?
pub fn has_o_direct(fd: i32) -> io::Result<bool> {
    // SAFETY: F_GETFL takes no argument and only reads descriptor flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags & libc::O_DIRECT != 0)
}

/// Is there allocated data at offset 0 (not a hole, not an empty file)?
/// Block devices always answer yes.
pub fn data_at_zero(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    match file.metadata() {
        Ok(m) if m.file_type().is_block_device() => return true,
        Ok(m) if m.len() == 0 => return false,
        Ok(_) => {}
        Err(_) => return false,
    }
    // SAFETY: lseek on a descriptor we own; no memory is involved.
    let off = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    off == 0
}

/// Whether a stretch of a provider can hold anything but zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Allocation {
    /// Allocated, or not known to be a hole: may hold any bytes.
    Data,
    /// Not allocated: reads as zeros.
    Hole,
}

/// The stretch `[offset, offset + len)` in one allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Start.
    pub offset: u64,
    /// Length (never 0 in a map).
    pub len: u64,
    /// What is there.
    pub allocation: Allocation,
}

impl Segment {
    /// First byte after the segment.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Appends `s` to a map, merging it into the last segment when it has the
/// same state and starts where that one ends. Empty segments are dropped.
pub fn push_segment(map: &mut Vec<Segment>, s: Segment) {
    if s.len == 0 {
        return;
    }
    match map.last_mut() {
        Some(last) if last.allocation == s.allocation && last.end() == s.offset => {
            last.len += s.len;
        }
        _ => map.push(s),
    }
}

/// What the file holds at a position, and up to where (exclusive; it may
/// lie beyond the range asked about).
type Probe = (Allocation, u64);

/// The allocation map of `[start, end)` in `align`-sized blocks (a power
/// of two), from `probe`, which tells the state at an `align`-aligned
/// position and where that state ends.
///
/// Holes are shrunk to whole blocks (a block that is partly a hole is
/// data), then the map is clipped to `[start, end)`. At most
/// `max_segments` segments (at least 1) and about as many probes: the map
/// is contiguous from `start` but may stop short of `end`; callers go on
/// from the end of its last segment. Empty only when `start >= end`. A
/// probe error makes the rest of the range data.
fn walk(
    start: u64,
    end: u64,
    align: u64,
    max_segments: usize,
    mut probe: impl FnMut(u64) -> io::Result<Probe>,
) -> Vec<Segment> {
    debug_assert!(align.is_power_of_two());
    let max_segments = max_segments.max(1);
    let max_probes = 2 * max_segments + 8;
    let mut map = Vec::new();
    let mut cur = start & !(align - 1);
    let mut probes = 0;
    while cur < end && map.len() < max_segments && probes < max_probes {
        probes += 1;
        let (allocation, next) = match probe(cur) {
            Ok((Allocation::Hole, hole_end)) if hole_end & !(align - 1) > cur => {
                (Allocation::Hole, hole_end & !(align - 1))
            }
            // A hole smaller than a block at `cur`: that block is data.
            Ok((_, run_end)) => (
                Allocation::Data,
                run_end.max(cur + 1).saturating_add(align - 1) & !(align - 1),
            ),
            Err(_) => (Allocation::Data, end),
        };
        let (from, to) = (cur.max(start), next.min(end));
        push_segment(
            &mut map,
            Segment {
                offset: from,
                len: to - from,
                allocation,
            },
        );
        cur = next;
    }
    map
}

/// The allocation map of `[start, end)` of the data area of a regular
/// file that begins at byte `base` of `file`, in data-area coordinates,
/// from `SEEK_DATA`/`SEEK_HOLE`: see [`walk`] for the alignment (`align`,
/// the sector size; `base` must be a multiple of it) and the bounds. A
/// filesystem without hole support reports everything as data (the
/// kernel's generic `SEEK_HOLE` answers "end of file"), and so does any
/// `lseek` error other than "no data after this point". Cheap system calls
/// that never touch the data; the file offset of `file` is moved, which
/// positional I/O (all of glommio's) does not use.
pub fn file_allocation(
    file: &impl AsRawFd,
    base: u64,
    start: u64,
    end: u64,
    align: u64,
    max_segments: usize,
) -> Vec<Segment> {
    let fd = file.as_raw_fd();
    walk(start, end, align, max_segments, |pos| {
        let abs = base
            .checked_add(pos)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        match seek(fd, abs, libc::SEEK_DATA) {
            Ok(d) if d == abs => {
                let hole = seek(fd, abs, libc::SEEK_HOLE)?;
                Ok((Allocation::Data, hole.max(abs + 1) - base))
            }
            Ok(d) => Ok((Allocation::Hole, d - base)),
            // No data from here to the end of the file.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok((Allocation::Hole, u64::MAX)),
            Err(e) => Err(e),
        }
    })
}

/// `lseek(fd, offset, whence)` for `SEEK_DATA` / `SEEK_HOLE`.
fn seek(fd: i32, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a descriptor the caller keeps open for the call;
    // no memory is passed.
    let r = unsafe { libc::lseek(fd, off, whence) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

/// Exclusive use of a provider: held for as long as a resource of a hastd
/// uses it (see `node.rs`), and by `hastctl create` while it writes. Two
/// layers: a block device is opened with `O_EXCL` (the kernel then refuses
/// other exclusive openers and mounts, and refuses us if it is mounted or
/// claimed), and every provider is `flock`ed (`LOCK_EX`), which is what
/// another hastd or hastctl finds, and which `/proc/locks` attributes to a
/// process for the error message. Released when dropped (the descriptor
/// closes).
#[derive(Debug)]
pub struct ProviderLock {
    _file: File,
}

impl ProviderLock {
    /// Claims `path`, or says who holds it.
    pub fn acquire(path: &Path) -> Result<ProviderLock, ProviderError> {
        use std::os::unix::fs::OpenOptionsExt;
        let meta = std::fs::metadata(path).map_err(|e| ProviderError::new(path, "stat", e))?;
        let blockdev = meta.file_type().is_block_device();
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true);
        if blockdev {
            opts.custom_flags(libc::O_EXCL);
        }
        let file = opts.open(path).map_err(|e| {
            if blockdev && e.raw_os_error() == Some(libc::EBUSY) {
                ProviderError::new(
                    path,
                    "provider in use",
                    io::Error::new(
                        e.kind(),
                        "the block device is mounted or claimed by another program (opened with O_EXCL: another hastd, a file system, LVM, md)",
                    ),
                )
            } else {
                ProviderError::new(path, "open", e)
            }
        })?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(ProviderError::new(path, "flock", e));
            }
            let who = lock_holder(&meta).unwrap_or_else(|| "another process".into());
            return Err(ProviderError::new(
                path,
                "provider in use",
                io::Error::new(e.kind(), format!("locked by {who}")),
            ));
        }
        Ok(ProviderLock { _file: file })
    }
}

/// Who holds the `flock` of the file `meta` describes, from
/// `/proc/locks`: `hastd (pid 4242)`, or `this process` for our own.
fn lock_holder(meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = meta.dev();
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        meta.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid: u32 = locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234 0 EOF"
        (f.len() >= 6 && f[1] == "FLOCK" && f[5] == want)
            .then(|| f[4].parse().ok())
            .flatten()
    })?;
    if pid == std::process::id() {
        return Some(format!(
            "this process (pid {pid}): another resource of this node uses it"
        ));
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let comm = comm.trim();
    Some(if comm.is_empty() {
        format!("pid {pid}")
    } else {
        format!("{comm} (pid {pid})")
    })
}

/// Opens `path` write-only through glommio once, so that its polled-I/O
/// probe fails (EBADF) and caches "not pollable" for the device.
pub async fn prime_iopoll_probe(path: &Path) -> Result<(), glommio::GlommioError<()>> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .dma_open(path)
        .await?;
    let _ = f.close().await;
    Ok(())
}

/// Opens a provider for direct I/O on the current glommio executor.
pub async fn open_direct(path: &Path) -> Result<DmaFile, ProviderError> {
    let err = |what, e: glommio::GlommioError<()>| ProviderError::new(path, what, e.into());
    // Prime glommio's per-device polled-I/O cache (see the module docs)
    // unless offset 0 holds real data, in which case glommio's own probe
    // gets the right answer.
    if !data_at_zero(path) {
        prime_iopoll_probe(path)
            .await
            .map_err(|e| err("open for writing", e))?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .dma_open(path)
        .await
        .map_err(|e| err("open", e))?;
    match has_o_direct(file.as_raw_fd()) {
        Ok(true) => Ok(file),
        Ok(false) => Err(ProviderError::new(
            path,
            "open",
            io::Error::other("O_DIRECT could not be set on the descriptor"),
        )),
        Err(e) => Err(ProviderError::new(path, "fcntl(F_GETFL)", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk");
        let f = File::create(&p).unwrap();
        f.set_len(10 << 20).unwrap();
        let info = probe(&p).unwrap();
        assert_eq!(info.mediasize, 10 << 20);
        assert!(!info.blockdev);
        assert!(info.sectorsize >= 512 && info.sectorsize.is_power_of_two());
    }

    #[test]
    fn a_provider_is_claimed_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk");
        File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let held = ProviderLock::acquire(&p).expect("first claim");
        // flock locks conflict between open file descriptions, even in
        // one process: a second resource on the same file is refused.
        let e = ProviderLock::acquire(&p).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("provider in use"), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "names the holder: {msg}"
        );
        assert!(msg.contains(&p.display().to_string()), "{msg}");
        drop(held);
        ProviderLock::acquire(&p).expect("claimed again once released");
    }

    #[test]
    fn rejects_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let e = probe(dir.path()).unwrap_err();
        assert!(
            e.to_string().contains("not a regular file or block device"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod sparse_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sparse_files_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let f = File::create(&p).unwrap();
        f.set_len(8 << 20).unwrap();
        assert!(allocated_fraction(&f).unwrap() < 0.01);
        let w = sparse_warning(&p, &f).expect("warned");
        assert!(w.contains("sparse") && w.contains("0% allocated"), "{w}");
        let q = dir.path().join("full");
        let mut g = File::create(&q).unwrap();
        g.write_all(&vec![1u8; 1 << 20]).unwrap();
        g.sync_all().unwrap();
        assert!(sparse_warning(&q, &g).is_none());
        assert!(allocated_fraction(&File::open(dir.path()).unwrap()).is_none());
    }
}

#[cfg(test)]
mod allocation_tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::FileExt;

    /// A probe over a model: sorted, disjoint, non-adjacent data ranges.
    fn model_probe(data: &[(u64, u64)]) -> impl FnMut(u64) -> io::Result<Probe> + '_ {
        move |pos| {
            for &(a, b) in data {
                if pos < a {
                    return Ok((Allocation::Hole, a));
                }
                if pos < b {
                    return Ok((Allocation::Data, b));
                }
            }
            Ok((Allocation::Hole, u64::MAX))
        }
    }

    fn is_data(data: &[(u64, u64)], from: u64, to: u64) -> bool {
        data.iter().any(|&(a, b)| a < to && from < b)
    }

    #[test]
    fn walk_shrinks_holes_to_blocks_and_clips() {
        // Data [1000, 1100) and [8192, 12288); blocks of 512.
        let data = [(1000, 1100), (8192, 12288)];
        let map = walk(0, 16384, 512, 100, model_probe(&data));
        let seg = |offset, len, allocation| Segment {
            offset,
            len,
            allocation,
        };
        assert_eq!(
            map,
            vec![
                seg(0, 512, Allocation::Hole),
                seg(512, 1024, Allocation::Data),
                seg(1536, 8192 - 1536, Allocation::Hole),
                seg(8192, 4096, Allocation::Data),
                seg(12288, 4096, Allocation::Hole),
            ]
        );
        // Unaligned ends are clipped, not rounded.
        let map = walk(100, 1200, 512, 100, model_probe(&data));
        assert_eq!(
            map,
            vec![
                seg(100, 412, Allocation::Hole),
                seg(512, 688, Allocation::Data)
            ]
        );
        // Bounded: one segment, from the start.
        let map = walk(0, 16384, 512, 1, model_probe(&data));
        assert_eq!(map, vec![seg(0, 512, Allocation::Hole)]);
        // Errors: the rest is data.
        let map = walk(0, 4096, 512, 10, |_| Err(io::Error::other("x")));
        assert_eq!(map, vec![seg(0, 4096, Allocation::Data)]);
        assert!(walk(10, 10, 512, 10, model_probe(&data)).is_empty());
    }

    #[test]
    fn file_allocation_follows_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let f = File::create(&p).unwrap();
        let base = 8192u64;
        f.set_len(base + (4 << 20)).unwrap();
        f.write_all_at(&[1u8; 4096], base + (1 << 20)).unwrap();
        f.write_all_at(&[2u8; 8192], base + (3 << 20)).unwrap();
        f.write_all_at(&[3u8; 4096], 0).unwrap(); // before the data area
        f.sync_all().unwrap();
        let map = file_allocation(&f, base, 0, 4 << 20, 512, 100);
        let data: Vec<(u64, u64)> = map
            .iter()
            .filter(|s| s.allocation == Allocation::Data)
            .map(|s| (s.offset, s.len))
            .collect();
        // Filesystems allocate at least what was written, in blocks.
        assert_eq!(map.first().unwrap().offset, 0);
        assert_eq!(map.last().unwrap().end(), 4 << 20);
        if data == [(0, 4 << 20)] {
            eprintln!("NOTICE: this filesystem does not report holes");
            return;
        }
        assert_eq!(data.len(), 2, "{map:?}");
        assert!(data[0].0 <= 1 << 20 && data[0].0 + data[0].1 >= (1 << 20) + 4096);
        assert!(data[1].0 <= 3 << 20 && data[1].0 + data[1].1 >= (3 << 20) + 8192);
        assert!(data[0].1 < 1 << 20 && data[1].1 < 1 << 20, "{map:?}");
        // A sub-range starting inside a hole.
        let map = file_allocation(&f, base, 100, 1 << 20, 512, 100);
        assert_eq!(map.len(), 1);
        assert_eq!(map[0].allocation, Allocation::Hole);
        assert_eq!((map[0].offset, map[0].end()), (100, data[0].0.min(1 << 20)));
    }

    fn ranges() -> impl Strategy<Value = Vec<(u64, u64)>> {
        proptest::collection::vec((1u64..5000, 1u64..5000), 0..12).prop_map(|gaps| {
            let mut pos = 0;
            gaps.into_iter()
                .map(|(gap, len)| {
                    let a = pos + gap;
                    pos = a + len;
                    (a, pos)
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn walk_is_truthful_and_complete(
            data in ranges(),
            start in 0u64..20_000,
            len in 1u64..40_000,
            shift in 0u32..4,
            max in 1usize..40,
        ) {
            let align = 512u64 << shift;
            let end = start + len;
            let map = walk(start, end, align, max, model_probe(&data));
            prop_assert!(!map.is_empty() && map.len() <= max);
            prop_assert_eq!(map[0].offset, start);
            for w in map.windows(2) {
                prop_assert_eq!(w[0].end(), w[1].offset);
                prop_assert_ne!(w[0].allocation, w[1].allocation);
            }
            let covered = map.last().unwrap().end();
            prop_assert!(covered <= end);
            // Complete when the bound is not what stopped it (each model
            // range costs at most two probes and two segments).
            if max >= 2 * data.len() + 2 {
                prop_assert_eq!(covered, end);
            }
            for s in &map {
                prop_assert!(s.len > 0);
                if s.allocation == Allocation::Hole {
                    // Never a hole where there is data; whole blocks only
                    // (except where clipped to the range).
                    prop_assert!(!is_data(&data, s.offset, s.end()));
                    prop_assert!(s.offset == start || s.offset % align == 0);
                    prop_assert!(s.end() == end || s.end() % align == 0);
                } else {
                    // Data only in blocks that hold some.
                    let mut b = s.offset & !(align - 1);
                    while b < s.end() {
                        let (lo, hi) = (b.max(start), (b + align).min(end));
                        prop_assert!(is_data(&data, b, b + align),
                            "block {}..{} reported data: {:?}", lo, hi, map);
                        b += align;
                    }
                }
            }
        }
    }
}
