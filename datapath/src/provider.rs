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
