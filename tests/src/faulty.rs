//! Disks that fail on demand, for real hastd processes.
//!
//! * [`FaultyDisk`]: a block device whose reads or writes fail while a
//!   trigger file exists. nbdkit serves a memory disk behind its `error`
//!   filter (and optionally its `delay` filter) on a unix socket, nbdfuse
//!   turns the export into a file, and a loop device with direct I/O over
//!   that file is the provider hastd opens (O_DIRECT, sector sizes from the
//!   block-device ioctls):
//!
//!   ```text
//!   nbdkit -U SOCK --filter=error memory SIZE error=EIO
//!          error-pread-rate=100% error-pread-file=READS
//!          error-pwrite-rate=100% error-pwrite-file=WRITES  (zero, trim too)
//!   nbdfuse MNT nbd+unix:///?socket=SOCK
//!   losetup -f --show --direct-io=on --sector-size N MNT/nbd
//!   ```
//!
//! * [`SmallFs`]: a small ext4 filesystem, loop-mounted, to hold sparse
//!   provider files larger than itself: writes to holes fail with ENOSPC
//!   once it is full.
//!
//! Both clean up on drop, also when the test panics: the loop device is
//! detached, the FUSE mount or filesystem unmounted, nbdfuse and nbdkit
//! killed by PID. Declare them *before* the hastd nodes that use them, so
//! the nodes (dropped first) have let go of the devices.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{reap, require_tool, test_root};

/// How a [`FaultyDisk`] is made.
#[derive(Debug, Clone)]
pub struct FaultyOptions {
    /// Size in bytes.
    pub size: u64,
    /// The errno injected: `EIO`, `ENOSPC`, `EPERM`, `ENOMEM`, `EINVAL` or
    /// `ESHUTDOWN` (what nbdkit's error filter can return).
    pub errno: &'static str,
    /// Logical sector size of the loop device (512 or 4096).
    pub sector: u32,
    /// Delay added to every read, in milliseconds (nbdkit's delay filter).
    pub delay_read_ms: u32,
    /// Delay added to every write, in milliseconds.
    pub delay_write_ms: u32,
}

impl Default for FaultyOptions {
    fn default() -> Self {
        FaultyOptions {
            size: 64 << 20,
            errno: "EIO",
            sector: 512,
            delay_read_ms: 0,
            delay_write_ms: 0,
        }
    }
}

/// A block device whose reads and writes fail on demand (see the module
/// documentation).
pub struct FaultyDisk {
    dir: tempfile::TempDir,
    nbdkit: Option<Child>,
    nbdfuse: Option<Child>,
    mounted: bool,
    device: Option<PathBuf>,
}

/// Is every tool there? (A skip notice, or a panic, as [`require_tool`].)
fn tools(names: &[&str]) -> bool {
    names.iter().all(|t| require_tool(t))
}

fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<(), String> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > limit {
            return Err(format!("timed out after {limit:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Attaches `file` to a free loop device with direct I/O and the given
/// sector size; checks that direct I/O is really on.
fn attach_loop(file: &Path, sector: u32) -> Result<PathBuf, String> {
    let dev = output(
        Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on", "--sector-size"])
            .arg(sector.to_string())
            .arg(file),
    )?;
    let dev = PathBuf::from(dev);
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap_or_default();
    if dio.trim() != "1" {
        detach_loop(&dev);
        return Err(format!(
            "{}: the loop device over {} does not do direct I/O",
            dev.display(),
            file.display()
        ));
    }
    Ok(dev)
}

fn detach_loop(dev: &Path) {
    // A device still open is detached when its last user closes it.
    let _ = Command::new("losetup")
        .arg("-d")
        .arg(dev)
        .stderr(Stdio::null())
        .status();
}

fn unmount(mnt: &Path, fuse: bool) {
    let status = if fuse {
        Command::new("fusermount3")
            .arg("-u")
            .arg(mnt)
            .stderr(Stdio::null())
            .status()
    } else {
        Command::new("umount")
            .arg(mnt)
            .stderr(Stdio::null())
            .status()
    };
    if !status.is_ok_and(|s| s.success()) {
        // Busy: detach it lazily rather than leave it behind.
        let _ = if fuse {
            Command::new("fusermount3").arg("-uz").arg(mnt).status()
        } else {
            Command::new("umount").arg("-l").arg(mnt).status()
        };
    }
}

/// A failure to build a fixture: a panic, or a skip with
/// `HAST_ALLOW_MISSING_TOOLS=1` (as for a missing tool).
fn unavailable<T>(what: &str, why: String) -> Option<T> {
    if std::env::var("HAST_ALLOW_MISSING_TOOLS").as_deref() == Ok("1") {
        eprintln!("SKIP: cannot set up {what}: {why}");
        return None;
    }
    panic!("cannot set up {what} (root needed): {why}");
}

impl FaultyDisk {
    /// Starts nbdkit and nbdfuse and attaches the loop device; None (after
    /// a skip notice) when a tool is missing and `HAST_ALLOW_MISSING_TOOLS`
    /// allows it.
    pub fn new(opts: FaultyOptions) -> Option<FaultyDisk> {
        if !tools(&["nbdkit", "nbdfuse", "losetup", "fusermount3"]) {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("hast-faulty-")
            .tempdir_in(test_root())
            .expect("fixture directory");
        let mut disk = FaultyDisk {
            dir,
            nbdkit: None,
            nbdfuse: None,
            mounted: false,
            device: None,
        };
        match disk.set_up(&opts) {
            Ok(()) => Some(disk),
            // Dropping `disk` undoes what was set up.
            Err(e) => unavailable("a fault-injecting disk", e),
        }
    }

    fn set_up(&mut self, opts: &FaultyOptions) -> Result<(), String> {
        let d = self.dir.path().to_path_buf();
        let sock = d.join("nbdkit.sock");
        let (reads, writes) = (self.read_trigger(), self.write_trigger());
        let mut cmd = Command::new("nbdkit");
        cmd.arg("-f").arg("-U").arg(&sock).arg("--filter=error");
        if opts.delay_read_ms > 0 || opts.delay_write_ms > 0 {
            cmd.arg("--filter=delay");
        }
        cmd.arg("memory").arg(opts.size.to_string());
        cmd.arg(format!("error={}", opts.errno));
        cmd.arg("error-pread-rate=100%")
            .arg(format!("error-pread-file={}", reads.display()));
        for op in ["pwrite", "zero", "trim"] {
            cmd.arg(format!("error-{op}-rate=100%"))
                .arg(format!("error-{op}-file={}", writes.display()));
        }
        if opts.delay_read_ms > 0 {
            cmd.arg(format!("delay-read={}ms", opts.delay_read_ms));
        }
        if opts.delay_write_ms > 0 {
            cmd.arg(format!("delay-write={}ms", opts.delay_write_ms));
        }
        let log = std::fs::File::create(d.join("nbdkit.log")).map_err(|e| e.to_string())?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start nbdkit: {e}"))?;
        self.nbdkit = Some(child);
        wait_for(Duration::from_secs(10), "nbdkit's socket", || sock.exists())?;

        let mnt = self.mountpoint();
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(d.join("nbdfuse.log")).map_err(|e| e.to_string())?;
        let child = Command::new("nbdfuse")
            .arg(&mnt)
            .arg(format!("nbd+unix:///?socket={}", sock.display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start nbdfuse: {e}"))?;
        self.nbdfuse = Some(child);
        self.mounted = true;
        let file = mnt.join("nbd");
        wait_for(Duration::from_secs(10), "nbdfuse's file", || {
            std::fs::metadata(&file).is_ok_and(|m| m.len() == opts.size)
        })?;
        self.device = Some(attach_loop(&file, opts.sector)?);
        Ok(())
    }

    /// The block device (`/dev/loopN`) to use as a provider.
    pub fn device(&self) -> PathBuf {
        self.device.clone().expect("the device is attached")
    }

    /// While this file exists, reads fail.
    pub fn read_trigger(&self) -> PathBuf {
        self.dir.path().join("fail-reads")
    }

    /// While this file exists, writes (and zeroing, trimming) fail.
    pub fn write_trigger(&self) -> PathBuf {
        self.dir.path().join("fail-writes")
    }

    /// Makes reads fail (or work again).
    pub fn fail_reads(&self, on: bool) {
        trigger(&self.read_trigger(), on);
    }

    /// Makes writes fail (or work again).
    pub fn fail_writes(&self, on: bool) {
        trigger(&self.write_trigger(), on);
    }

    /// nbdkit's log (the errors it injected).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nbdkit.log")).unwrap_or_default()
    }

    /// The PIDs of nbdkit and nbdfuse (for checking the clean-up).
    pub fn pids(&self) -> Vec<u32> {
        [&self.nbdkit, &self.nbdfuse]
            .into_iter()
            .flatten()
            .map(Child::id)
            .collect()
    }

    /// The FUSE mount point.
    pub fn mountpoint(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

fn trigger(path: &Path, on: bool) {
    if on {
        std::fs::write(path, b"").expect("create trigger file");
    } else {
        let _ = std::fs::remove_file(path);
    }
}

impl Drop for FaultyDisk {
    fn drop(&mut self) {
        if let Some(dev) = self.device.take() {
            detach_loop(&dev);
        }
        if self.mounted {
            unmount(&self.mountpoint(), true);
        }
        for child in [self.nbdfuse.take(), self.nbdkit.take()]
            .into_iter()
            .flatten()
        {
            let mut c = child;
            // nbdfuse exits once unmounted; nbdkit is told to stop.
            crate::signal(c.id(), libc::SIGTERM);
            reap(&mut c, Duration::from_secs(5));
        }
    }
}

/// A small ext4 filesystem, loop-mounted (see the module documentation).
pub struct SmallFs {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl SmallFs {
    /// A filesystem of `size` bytes; None (after a skip notice) when a
    /// tool is missing and `HAST_ALLOW_MISSING_TOOLS` allows it.
    pub fn new(size: u64) -> Option<SmallFs> {
        if !tools(&["mkfs.ext4", "mount", "umount"]) {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("hast-smallfs-")
            .tempdir_in(test_root())
            .expect("fixture directory");
        let mut fs = SmallFs {
            dir,
            mounted: false,
        };
        match fs.set_up(size) {
            Ok(()) => Some(fs),
            Err(e) => unavailable("a small filesystem", e),
        }
    }

    fn set_up(&mut self, size: u64) -> Result<(), String> {
        let img = self.dir.path().join("fs.img");
        let f = std::fs::File::create(&img).map_err(|e| e.to_string())?;
        f.set_len(size).map_err(|e| e.to_string())?;
        output(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .arg(&img),
        )?;
        let mnt = self.mountpoint();
        std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
        output(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt),
        )?;
        self.mounted = true;
        Ok(())
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// A sparse file of `size` bytes in it (it may be larger than the
    /// filesystem).
    pub fn sparse_file(&self, name: &str, size: u64) -> PathBuf {
        let p = self.mountpoint().join(name);
        let f = std::fs::File::create(&p).expect("create a sparse file");
        f.set_len(size).expect("size the sparse file");
        p
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        if self.mounted {
            // The loop device of `mount -o loop` is freed with the mount.
            unmount(&self.mountpoint(), false);
        }
    }
}
