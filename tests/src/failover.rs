//! Helpers for the failover tests: a host-wide lock and a zfs-fuse daemon
//! (userspace ZFS, one per host), nbdfuse mounts that turn an NBD export
//! into a file, pools over those files, and a raw NBD client that writes
//! numbered, self-checking records and remembers which ones a completed
//! FLUSH covered.
//!
//! Every process started here is a child of the test process and is
//! killed by its PID when its guard drops; every FUSE mount is unmounted
//! (lazily if it is busy or dead).

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::nbd::{Client, CMD_FLUSH, CMD_WRITE};
use crate::{reap, signal, TestNode};

/// Runs a command with a deadline; a command that overstays is killed
/// (SIGKILL, by its PID) and reported as an error.
pub fn run_limited(cmd: &mut Command, limit: Duration) -> Result<Output, String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {desc}: {e}"))?;
    // Drain the pipes in threads so a chatty command cannot block.
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let to = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = io::Read::read_to_end(&mut so, &mut v);
        v
    });
    let te = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = io::Read::read_to_end(&mut se, &mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{desc} did not finish within {limit:?} (killed)"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: to.join().unwrap_or_default(),
        stderr: te.join().unwrap_or_default(),
    })
}

/// Like [`run_limited`], asserting success; returns stdout.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run_limited(cmd, limit).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{desc} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An exclusive `flock` on a fixed path, shared by every test process on
/// this host (zfs-fuse is one daemon per host). Released on drop.
pub struct HostLock {
    _file: File,
}

/// How long one `zpool` command may take.
const ZPOOL_LIMIT: Duration = Duration::from_secs(120);

/// The lock file serialising every use of zfs-fuse on this host.
pub const ZFS_LOCK: &str = "/tmp/hast-tests-zfs-fuse.lock";

impl HostLock {
    /// Takes the lock at `path`, waiting at most `limit`.
    pub fn acquire(path: &Path, limit: Duration) -> HostLock {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let start = Instant::now();
        loop {
            // SAFETY: flock(2) on a descriptor we own; no memory involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return HostLock { _file: file };
            }
            assert!(
                start.elapsed() < limit,
                "{} stayed locked for {limit:?} (another test using zfs-fuse?)",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// PIDs of running processes whose command name is `comm`.
pub fn pids_named(comm: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // "pid (comm) state ...": a zombie is not running.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map(|x| x.1).unwrap_or("");
        if name == comm && !rest.trim_start().starts_with('Z') {
            out.push(pid);
        }
    }
    out
}

/// Is `path` a mount point (per /proc/self/mountinfo)?
pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == p))
}

/// Unmounts a FUSE mount: `fusermount3 -u`, then lazily (`-uz`) when it
/// is busy or its daemon is gone. Waits (bounded) until it is gone.
pub fn fuse_unmount(path: &Path) {
    if !is_mounted(path) {
        return;
    }
    let _ = run_limited(
        Command::new("fusermount3").arg("-u").arg(path),
        Duration::from_secs(20),
    );
    if is_mounted(path) {
        let _ = run_limited(
            Command::new("fusermount3").arg("-uz").arg(path),
            Duration::from_secs(20),
        );
    }
    let start = Instant::now();
    while is_mounted(path) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if is_mounted(path) {
        eprintln!("warning: {} is still mounted", path.display());
    }
}

/// Where zfs-fuse writes its PID: a fixed path, so that a daemon left by
/// an aborted run of these tests (SIGKILLed test binary) is recognised and
/// stopped by the next run.
pub const ZFS_PIDFILE: &str = "/tmp/hast-tests-zfs-fuse.pid";

/// The zfs-fuse daemon, run in the foreground (`-n`) as a child of the
/// test. Requires the [`HostLock`] on [`ZFS_LOCK`]. Dropping it kills the
/// daemon (SIGTERM, then SIGKILL) and lazily unmounts the registered pool
/// mount points.
pub struct ZfsFuse {
    child: Option<Child>,
    log: PathBuf,
    mounts: Vec<PathBuf>,
}

impl ZfsFuse {
    /// Starts zfs-fuse (stopping a daemon a previous aborted run of these
    /// tests left behind) and waits until `zpool list` answers. Panics
    /// when a zfs-fuse not started by these tests is running: the tests
    /// must be able to kill and restart the daemon.
    pub fn start(dir: &Path) -> ZfsFuse {
        if let Ok(s) = std::fs::read_to_string(ZFS_PIDFILE) {
            if let Ok(pid) = s.trim().parse::<u32>() {
                if pids_named("zfs-fuse").contains(&pid) {
                    eprintln!("stopping zfs-fuse {pid} left by an earlier test run");
                    signal(pid, libc::SIGKILL);
                    wait_gone(pid, Duration::from_secs(10));
                }
            }
        }
        let others = pids_named("zfs-fuse");
        assert!(
            others.is_empty(),
            "zfs-fuse is already running (pid {others:?}) and was not started by these tests; \
             stop it (the failover tests kill and restart their own daemon)"
        );
        let mut z = ZfsFuse {
            child: None,
            log: dir.join("zfs-fuse.log"),
            mounts: Vec::new(),
        };
        z.spawn();
        z
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "zfs-fuse already running");
        let _ = std::fs::remove_file(ZFS_PIDFILE);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("zfs-fuse log");
        let child = Command::new("zfs-fuse")
            .args(["-n", "--no-kstat-mount", "-p", ZFS_PIDFILE])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn zfs-fuse");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    panic!(
                        "zfs-fuse exited at start ({st}):\n{}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
            }
            if let Ok(out) = run_limited(Command::new("zpool").arg("list"), Duration::from_secs(5))
            {
                if out.status.success() {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "zfs-fuse did not answer `zpool list` within 30 s:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// PID of the daemon.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Registers a pool mount point to unmount when the daemon dies.
    pub fn add_mount(&mut self, p: &Path) {
        self.mounts.push(p.to_path_buf());
    }

    /// Kills the daemon with SIGKILL (a crashed host's ZFS) and lazily
    /// unmounts the pool mount points it served.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
        for m in &self.mounts {
            fuse_unmount(m);
        }
    }

    /// Starts a new daemon after [`ZfsFuse::kill9`].
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// Stops the daemon: SIGTERM (it unmounts its file systems), SIGKILL
    /// after 10 s; then unmounts what is left.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGTERM);
            reap(&mut c, Duration::from_secs(10));
        }
        for m in &self.mounts {
            fuse_unmount(m);
        }
        let _ = std::fs::remove_file(ZFS_PIDFILE);
    }
}

impl Drop for ZfsFuse {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_gone(pid: u32, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        if stat.is_empty() || zombie {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `zpool ARGS` with a 120 s deadline; returns its output.
pub fn zpool(args: &[&str]) -> Output {
    run_limited(Command::new("zpool").args(args), ZPOOL_LIMIT).unwrap_or_else(|e| panic!("{e}"))
}

/// `zpool ARGS`, asserting success; returns stdout.
pub fn zpool_ok(args: &[&str]) -> String {
    run_ok(Command::new("zpool").args(args), ZPOOL_LIMIT)
}

/// The result of a finished scrub, parsed from `zpool status`.
#[derive(Debug, Clone)]
pub struct ScrubResult {
    /// "N" of zfs-fuse's "scrub completed after XhYm with N errors".
    pub errors: u64,
    /// The whole `zpool status` text.
    pub status: String,
}

/// Starts `zpool scrub POOL` and waits (bounded) for zfs-fuse's
/// " scrub: scrub completed after 0h0m with 0 errors on <date>".
pub fn scrub(pool: &str, limit: Duration) -> ScrubResult {
    zpool_ok(&["scrub", pool]);
    let start = Instant::now();
    loop {
        let status = zpool_ok(&["status", pool]);
        let line = status
            .lines()
            .find(|l| l.trim_start().starts_with("scrub:"))
            .unwrap_or("")
            .to_string();
        if let Some(rest) = line.split("scrub completed").nth(1) {
            let errors = rest
                .split(" with ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("cannot parse the scrub result: {line:?}\n{status}"));
            return ScrubResult { errors, status };
        }
        assert!(
            start.elapsed() < limit,
            "scrub of {pool} did not finish within {limit:?}:\n{status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Device rows (name, read, write, cksum errors) of `zpool status`'s
/// config section.
pub fn device_errors(status: &str) -> Vec<(String, u64, u64, u64)> {
    let mut rows = Vec::new();
    let mut in_config = false;
    for l in status.lines() {
        let t = l.trim();
        if t.starts_with("NAME") && t.contains("CKSUM") {
            in_config = true;
            continue;
        }
        if in_config {
            if t.is_empty() || t.starts_with("errors:") {
                break;
            }
            let f: Vec<&str> = t.split_whitespace().collect();
            if f.len() >= 5 {
                let n = |s: &str| s.parse::<u64>().unwrap_or(u64::MAX);
                rows.push((f[0].to_string(), n(f[2]), n(f[3]), n(f[4])));
            }
        }
    }
    rows
}

/// An NBD export exposed as a file with `nbdfuse MNT/NAME URI`. Dropping
/// it unmounts (lazily if busy) and reaps nbdfuse (SIGKILL by PID if it
/// does not exit).
pub struct NbdFuse {
    child: Option<Child>,
    mnt: PathBuf,
    file: PathBuf,
    log: PathBuf,
}

impl NbdFuse {
    /// Mounts `uri` as the file `mnt/name` (creating `mnt`), waiting until
    /// nbdfuse has written its pidfile (it is then serving).
    pub fn mount(mnt: &Path, name: &str, uri: &str) -> NbdFuse {
        std::fs::create_dir_all(mnt).expect("create mount point");
        let pidfile = mnt.with_extension("pid");
        let log = mnt.with_extension("log");
        let _ = std::fs::remove_file(&pidfile);
        let logf = File::create(&log).expect("nbdfuse log");
        let file = mnt.join(name);
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&file)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup"))
            .stderr(logf)
            .spawn()
            .expect("spawn nbdfuse");
        let mut me = NbdFuse {
            child: Some(child),
            mnt: mnt.to_path_buf(),
            file,
            log,
        };
        let start = Instant::now();
        loop {
            if let Some(Ok(Some(st))) = me.child.as_mut().map(Child::try_wait) {
                me.child = None;
                panic!(
                    "nbdfuse {uri} exited ({st}):\n{}",
                    std::fs::read_to_string(&me.log).unwrap_or_default()
                );
            }
            let ready = std::fs::read_to_string(&pidfile)
                .map(|s| s.trim().parse::<u32>().is_ok())
                .unwrap_or(false);
            if ready && me.file.exists() {
                return me;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nbdfuse {uri} not ready within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The file standing for the export.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Unmounts and reaps nbdfuse.
    pub fn unmount(&mut self) {
        fuse_unmount(&self.mnt);
        if let Some(mut c) = self.child.take() {
            if !reap(&mut c, Duration::from_secs(10)) {
                fuse_unmount(&self.mnt);
            }
        }
    }
}

impl Drop for NbdFuse {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// The exports of `resources` on `node` as files, plus a directory `devs`
/// of symlinks (one per resource, named after it) for `zpool import -d`.
pub struct Exposed {
    /// The nbdfuse mounts, in resource order.
    pub mounts: Vec<NbdFuse>,
    /// Directory of symlinks to the files.
    pub devs: PathBuf,
}

impl Exposed {
    /// Mounts every export of `resources` on `node` under `dir`.
    pub fn new(node: &TestNode, resources: &[&str], dir: &Path) -> Exposed {
        let devs = dir.join("devs");
        let _ = std::fs::remove_dir_all(&devs);
        std::fs::create_dir_all(&devs).expect("devs dir");
        let mut mounts = Vec::new();
        for r in resources {
            let m = NbdFuse::mount(&dir.join(format!("mnt-{r}")), r, &node.uri(r));
            std::os::unix::fs::symlink(m.file(), devs.join(r)).expect("symlink");
            mounts.push(m);
        }
        Exposed { mounts, devs }
    }

    /// The device paths (symlinks) in resource order.
    pub fn dev_paths(&self, resources: &[&str]) -> Vec<PathBuf> {
        resources.iter().map(|r| self.devs.join(r)).collect()
    }

    /// Unmounts everything.
    pub fn unmount(&mut self) {
        for m in &mut self.mounts {
            m.unmount();
        }
    }
}

/// `hastctl role primary` on resources of a node (which must succeed,
/// reply included), then waits for each export socket.
pub fn promote(node: &TestNode, resources: &[&str]) {
    let mut args = vec!["role", "primary"];
    args.extend(resources);
    node.hastctl(&args);
    for r in resources {
        let sock = node.export_socket(r);
        crate::wait_until(Duration::from_secs(20), "export socket", || sock.exists());
        assert_eq!(node.list(r)["role"], "primary", "{r} is primary");
    }
}

/// Waits until a primary's resource is in sync (see
/// [`TestNode::wait_in_sync`]).
pub fn wait_in_sync(node: &TestNode, res: &str, limit: Duration) -> serde_json::Value {
    node.wait_in_sync(res, limit)
}

/// Size of one record written by [`RecordWriter`].
pub const RECORD: usize = 4096;
const RECORD_MAGIC: &[u8; 8] = b"HASTREC1";

/// FNV-1a, 64 bits.
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The record with sequence number `seq`: magic, seq, slot, a payload
/// derived from seq, and an FNV-1a checksum of everything before it.
pub fn record(seq: u64, slots: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD);
    r.extend_from_slice(RECORD_MAGIC);
    r.extend_from_slice(&seq.to_le_bytes());
    r.extend_from_slice(&(seq % slots).to_le_bytes());
    r.extend_from_slice(&crate::random_bytes(
        RECORD - 32,
        seq.wrapping_mul(0x9e37_79b9),
    ));
    r.extend_from_slice(&[0; 8]);
    let sum = fnv64(&r[..RECORD - 8]);
    r[RECORD - 8..].copy_from_slice(&sum.to_le_bytes());
    r
}

/// The sequence number of a block that is an intact record for `slot`,
/// or None (zeroes, torn, foreign, wrong slot).
pub fn parse_record(b: &[u8], slot: u64, slots: u64) -> Option<u64> {
    if b.len() != RECORD || &b[..8] != RECORD_MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let sum = u64::from_le_bytes(b[RECORD - 8..].try_into().ok()?);
    if seq % slots != slot || fnv64(&b[..RECORD - 8]) != sum || b != record(seq, slots) {
        return None;
    }
    Some(seq)
}

/// What a [`RecordWriter`] saw.
#[derive(Debug, Clone, Default)]
pub struct WriterLog {
    /// Number of slots (records wrap around the device).
    pub slots: u64,
    /// Sequence numbers sent (0..sent).
    pub sent: u64,
    /// For each sequence number, its position in acknowledgement order
    /// (u64::MAX: never acknowledged, or failed).
    pub ack_order: Vec<u64>,
    /// Writes acknowledged successfully.
    pub acked: u64,
    /// Writes answered with an error.
    pub write_errors: u64,
    /// FLUSHes completed successfully.
    pub flushes: u64,
    /// Acknowledgements counted when the last successfully completed
    /// FLUSH was sent: every write among the first `flushed_acks`
    /// acknowledgements is promised durable.
    pub flushed_acks: u64,
    /// Why the stream ended.
    pub end: String,
}

impl WriterLog {
    /// Was `seq` acknowledged before the last completed FLUSH was sent?
    pub fn promised(&self, seq: u64) -> bool {
        self.ack_order[seq as usize] < self.flushed_acks
    }

    /// Was `seq` acknowledged at all?
    pub fn acknowledged(&self, seq: u64) -> bool {
        self.ack_order[seq as usize] != u64::MAX
    }
}

/// Writes records `0, 1, 2, …` (record `s` in slot `s % slots` of the
/// export) with `depth` requests in flight and a FLUSH after every
/// `flush_every` writes, until `stop` is set or the connection fails.
/// Runs in its own thread; [`RecordWriter::finish`] returns the log.
pub struct RecordWriter {
    handle: Option<std::thread::JoinHandle<WriterLog>>,
    stop: Arc<AtomicBool>,
    progress: Arc<std::sync::atomic::AtomicU64>,
}

const FLUSH_TAG: u64 = 1 << 63;

impl RecordWriter {
    /// Starts the stream against `socket`/`export` (a device of `size`
    /// bytes).
    pub fn start(socket: &Path, export: &str, depth: usize, flush_every: u64) -> RecordWriter {
        RecordWriter::start_from(socket, export, depth, flush_every, 0)
    }

    /// Like [`RecordWriter::start`], numbering records from `first`: a
    /// stream continued on another connection (after a crash or a role
    /// switch) stays ordered, so [`check_records`] on the new log never
    /// takes an earlier stream's record for a newer one.
    pub fn start_from(
        socket: &Path,
        export: &str,
        depth: usize,
        flush_every: u64,
        first: u64,
    ) -> RecordWriter {
        let mut client = Client::connect(socket, export).expect("connect to the export");
        let slots = client.size / RECORD as u64;
        assert!(slots > 0, "export too small");
        let stop = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop2, progress2) = (stop.clone(), progress.clone());
        let handle = std::thread::spawn(move || {
            let mut log = WriterLog {
                slots,
                sent: first,
                ack_order: vec![u64::MAX; first as usize],
                ..Default::default()
            };
            // handle -> acknowledgements counted when the flush was sent.
            let mut flush_cover: std::collections::HashMap<u64, u64> = Default::default();
            let mut inflight = 0usize;
            let mut since_flush = 0u64;
            let mut flush_no = 0u64;
            let mut stopping = false;
            loop {
                if stop2.load(Ordering::Relaxed) {
                    stopping = true;
                }
                while !stopping && inflight < depth {
                    let r = if since_flush >= flush_every && flush_cover.is_empty() {
                        since_flush = 0;
                        flush_no += 1;
                        let h = FLUSH_TAG | flush_no;
                        flush_cover.insert(h, log.acked);
                        client.send(CMD_FLUSH, 0, h, 0, &[], 0)
                    } else {
                        let seq = log.sent;
                        let data = record(seq, slots);
                        let off = (seq % slots) * RECORD as u64;
                        log.sent += 1;
                        log.ack_order.push(u64::MAX);
                        since_flush += 1;
                        client.send(CMD_WRITE, 0, seq, off, &data, RECORD as u32)
                    };
                    if let Err(e) = r {
                        log.end = format!("send failed: {e}");
                        return log;
                    }
                    inflight += 1;
                }
                if inflight == 0 {
                    log.end = "stopped".into();
                    return log;
                }
                match client.recv(|_| 0) {
                    Ok((rep, _)) => {
                        inflight -= 1;
                        if rep.handle & FLUSH_TAG != 0 {
                            let cover = flush_cover.remove(&rep.handle).unwrap_or(0);
                            if rep.error == 0 {
                                log.flushes += 1;
                                log.flushed_acks = log.flushed_acks.max(cover);
                            }
                        } else if rep.error == 0 {
                            log.ack_order[rep.handle as usize] = log.acked;
                            log.acked += 1;
                            progress2.store(log.acked, Ordering::Relaxed);
                        } else {
                            log.write_errors += 1;
                        }
                    }
                    Err(e) => {
                        log.end = format!("connection ended: {e}");
                        return log;
                    }
                }
            }
        });
        RecordWriter {
            handle: Some(handle),
            stop,
            progress,
        }
    }

    /// Writes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    /// Waits (bounded) for the stream to end (it ends by itself when the
    /// server dies) and returns its log.
    pub fn finish(mut self, limit: Duration) -> WriterLog {
        let h = self.handle.take().expect("running");
        let start = Instant::now();
        while !h.is_finished() {
            assert!(
                start.elapsed() < limit,
                "the record writer did not end within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h.join().expect("writer thread panicked")
    }

    /// Asks the stream to stop after the requests in flight.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for RecordWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What reading the records back found.
#[derive(Debug, Clone, Default)]
pub struct RecordCheck {
    /// Slots holding an intact record.
    pub intact_slots: u64,
    /// Writes promised by a completed FLUSH whose data is not there
    /// (neither it nor a later record of the same slot).
    pub lost_flushed: Vec<u64>,
    /// Writes acknowledged (but not covered by a completed FLUSH) whose
    /// data is not there.
    pub lost_acked: Vec<u64>,
    /// Slots holding neither zeroes nor an intact record.
    pub torn_slots: Vec<u64>,
}

/// Reads every slot through `socket`/`export` and compares with `log`.
pub fn check_records(socket: &Path, export: &str, log: &WriterLog) -> RecordCheck {
    let mut c = Client::connect(socket, export).expect("connect to the export");
    let slots = log.slots;
    // The newest write of each slot that was acknowledged / promised.
    let mut want_acked = vec![None::<u64>; slots as usize];
    let mut want_flushed = vec![None::<u64>; slots as usize];
    for seq in 0..log.sent {
        let s = (seq % slots) as usize;
        if log.acknowledged(seq) {
            want_acked[s] = Some(seq);
        }
        if log.promised(seq) {
            want_flushed[s] = Some(seq);
        }
    }
    let mut out = RecordCheck::default();
    const CHUNK: u64 = 64;
    let mut slot = 0u64;
    while slot < slots {
        let n = CHUNK.min(slots - slot);
        let (rep, data) = c
            .read(slot * RECORD as u64, (n as usize * RECORD) as u32)
            .expect("read records");
        assert_eq!(rep.error, 0, "read error at slot {slot}");
        for i in 0..n {
            let s = slot + i;
            let b = &data[(i as usize) * RECORD..(i as usize + 1) * RECORD];
            let got = parse_record(b, s, slots);
            if got.is_some() {
                out.intact_slots += 1;
            } else if b.iter().any(|&x| x != 0) {
                out.torn_slots.push(s);
            }
            let have = got.map_or(-1i128, i128::from);
            if let Some(w) = want_flushed[s as usize] {
                if have < i128::from(w) {
                    out.lost_flushed.push(w);
                }
            }
            if let Some(w) = want_acked[s as usize] {
                if have < i128::from(w) && !log.promised(w) {
                    out.lost_acked.push(w);
                }
            }
        }
        slot += n;
    }
    let _ = c.disconnect();
    out
}

/// Files written into a pool by [`FileWriter`]: `w<N>` holds
/// [`file_content`]`(N)`.
pub fn file_content(n: u64) -> Vec<u8> {
    let len = 64 * 1024 + (n as usize * 7919) % (192 * 1024);
    crate::random_bytes(len, 0x5eed_0000 + n)
}

/// A thread creating files `w0, w1, …` in a directory, each written and
/// fsynced; remembers which fsyncs returned success (and when).
pub struct FileWriter {
    handle: Option<std::thread::JoinHandle<()>>,
    done: Arc<std::sync::Mutex<Vec<(u64, Instant)>>>,
    stop: Arc<AtomicBool>,
    error: Arc<std::sync::Mutex<Option<String>>>,
}

impl FileWriter {
    /// Starts writing into `dir`.
    pub fn start(dir: &Path) -> FileWriter {
        let done = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let error = Arc::new(std::sync::Mutex::new(None));
        let (d, s, e, dir) = (done.clone(), stop.clone(), error.clone(), dir.to_path_buf());
        let handle = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                let res = (|| -> io::Result<()> {
                    let mut f = File::create(dir.join(format!("w{n}")))?;
                    io::Write::write_all(&mut f, &file_content(n))?;
                    f.sync_all()
                })();
                match res {
                    Ok(()) => d.lock().expect("lock").push((n, Instant::now())),
                    Err(err) => {
                        *e.lock().expect("lock") = Some(format!("w{n}: {err}"));
                        return;
                    }
                }
                n += 1;
            }
        });
        FileWriter {
            handle: Some(handle),
            done,
            stop,
            error,
        }
    }

    /// Files whose fsync has returned success so far.
    pub fn fsynced(&self) -> Vec<(u64, Instant)> {
        self.done.lock().expect("lock").clone()
    }

    /// The error that ended the stream, if any.
    pub fn error(&self) -> Option<String> {
        self.error.lock().expect("lock").clone()
    }

    /// Asks the thread to stop, waits for it at most `limit`; returns
    /// whether it ended.
    pub fn finish(&mut self, limit: Duration) -> bool {
        self.stop.store(true, Ordering::Relaxed);
        let start = Instant::now();
        if let Some(h) = &self.handle {
            while !h.is_finished() {
                if start.elapsed() > limit {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        true
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
