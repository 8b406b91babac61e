//! The NBD server against real clients (qemu-io, nbdinfo, nbdcopy, fio) and
//! a raw-socket client that checks the protocol corner cases byte by byte,
//! with simple replies and with structured replies and `base:allocation`.
//!
//! Each test starts its own export of an in-memory backend on a glommio
//! executor thread, on a unix socket in a temporary directory, and drives
//! it from the test thread with blocking clients. Assertions are on the
//! data held by the backend and returned on the wire, not only on exit
//! codes.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use glommio::io::DmaBuffer;
use glommio::LocalExecutorBuilder;
use hast_datapath::export::{
    Allocation, BackendError, BackendGeometry, BlockBackend, Segment, WriteFlags,
};
use hast_datapath::nbd::proto::{
    self, Command as Cmd, InfoRequest, MetaContextRequest, OptionReply, OptionRequest, Request,
    SimpleReply, StructuredReply,
};
use hast_datapath::nbd::{NbdConfig, NbdExport, MAX_CONNECTIONS};

const EXPORT: &str = "r0";
const SIZE: u64 = 64 << 20;
const MAX_PAYLOAD: u32 = 1 << 20;
/// Requests touching [SLOW_START, SIZE) take SLOW_DELAY in the backend.
const SLOW_START: u64 = SIZE - (4 << 20);
const SLOW_DELAY: Duration = Duration::from_millis(300);
/// Allocation granularity of the in-memory backend: an all-zero block is a
/// hole; zeroing whole blocks is fast.
const BLOCK: u64 = 4096;

// ---------------------------------------------------------------------------
// In-memory backend
// ---------------------------------------------------------------------------

/// Counters shared with the test thread.
#[derive(Default)]
struct Stats {
    reads: AtomicU64,
    writes: AtomicU64,
    fua_writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
    caches: AtomicU64,
    block_status: AtomicU64,
    /// Backend operations in progress.
    running: AtomicU64,
    /// Highest number of backend operations in progress at once.
    max_concurrent: AtomicU64,
}

impl Stats {
    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::SeqCst)
    }
}

struct MemBackend {
    data: RefCell<Vec<u8>>,
    stats: Arc<Stats>,
    geometry: BackendGeometry,
}

/// Counts a backend operation in progress.
struct Running<'a>(&'a MemBackend);

impl<'a> Running<'a> {
    fn new(b: &'a MemBackend) -> Self {
        let now = b.stats.running.fetch_add(1, Ordering::SeqCst) + 1;
        b.stats.max_concurrent.fetch_max(now, Ordering::SeqCst);
        Self(b)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.stats.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl MemBackend {
    fn new(stats: Arc<Stats>) -> Self {
        Self {
            data: RefCell::new(vec![0; SIZE as usize]),
            stats,
            geometry: BackendGeometry {
                size: SIZE,
                min_block: 512,
                preferred_block: 4096,
                max_payload: MAX_PAYLOAD,
            },
        }
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, BackendError> {
        let end = offset.checked_add(len).ok_or(BackendError::Invalid)?;
        if end > SIZE {
            return Err(BackendError::Invalid);
        }
        Ok(offset as usize..end as usize)
    }

    async fn maybe_slow(&self, offset: u64) {
        if offset >= SLOW_START {
            glommio::timer::sleep(SLOW_DELAY).await;
        }
    }
}

impl BlockBackend for MemBackend {
    type ReadBuf = Vec<u8>;

    fn geometry(&self) -> BackendGeometry {
        self.geometry
    }

    fn alloc_buffer(&self, len: usize) -> DmaBuffer {
        glommio::allocate_dma_buffer(len)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, BackendError> {
        let _r = Running::new(self);
        self.maybe_slow(offset).await;
        let range = self.range(offset, u64::from(len))?;
        self.stats.reads.fetch_add(1, Ordering::SeqCst);
        Ok(self.data.borrow()[range].to_vec())
    }

    async fn write(
        &self,
        offset: u64,
        data: DmaBuffer,
        flags: WriteFlags,
    ) -> Result<(), BackendError> {
        let _r = Running::new(self);
        self.maybe_slow(offset).await;
        let range = self.range(offset, data.len() as u64)?;
        self.data.borrow_mut()[range].copy_from_slice(data.as_bytes());
        self.stats.writes.fetch_add(1, Ordering::SeqCst);
        if flags.fua {
            self.stats.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), BackendError> {
        let _r = Running::new(self);
        self.stats.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _flags: WriteFlags) -> Result<(), BackendError> {
        let _r = Running::new(self);
        let range = self.range(offset, len)?;
        self.data.borrow_mut()[range].fill(0);
        self.stats.trims.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _flags: WriteFlags,
    ) -> Result<(), BackendError> {
        let _r = Running::new(self);
        let range = self.range(offset, len)?;
        self.data.borrow_mut()[range].fill(0);
        self.stats.zeroes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// Fast only for whole blocks of [`BLOCK`].
    fn zeroes_are_fast(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(BLOCK) && len.is_multiple_of(BLOCK)
    }

    /// Blocks of [`BLOCK`] bytes that are all zeros are holes.
    async fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_segments: usize,
    ) -> Result<Vec<Segment>, BackendError> {
        self.range(offset, len)?;
        self.stats.block_status.fetch_add(1, Ordering::SeqCst);
        let data = self.data.borrow();
        let mut map: Vec<Segment> = Vec::new();
        let (mut pos, end) = (offset, offset + len);
        while pos < end {
            let block = pos - pos % BLOCK;
            let next = (block + BLOCK).min(end);
            let hole = data[block as usize..(block + BLOCK) as usize]
                .iter()
                .all(|&b| b == 0);
            let allocation = if hole {
                Allocation::Hole
            } else {
                Allocation::Data
            };
            let full = map.len() == max_segments;
            match map.last_mut() {
                Some(last) if last.allocation == allocation => last.len += next - pos,
                _ if full => break,
                _ => map.push(Segment {
                    offset: pos,
                    len: next - pos,
                    allocation,
                }),
            }
            pos = next;
        }
        Ok(map)
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.range(offset, len)?;
        self.stats.caches.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Log capture
// ---------------------------------------------------------------------------

/// A minimal tracing subscriber for the executor thread: every event becomes
/// one line "LEVEL span{fields}:span{fields} message fields".
#[derive(Default)]
struct Capture {
    lines: Arc<Mutex<Vec<String>>>,
    /// Formatted name and fields, and parent, of every span by id - 1.
    spans: Mutex<Vec<(String, Option<u64>)>>,
    stack: Mutex<Vec<u64>>,
}

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        let sep = if self.0.ends_with('{') { "" } else { " " };
        let _ = write!(self.0, "{sep}{}={:?}", field.name(), value);
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut s = format!("{}{{", attrs.metadata().name());
        attrs.record(&mut Fields(&mut s));
        s.push('}');
        let parent = if attrs.is_contextual() {
            self.stack.lock().expect("lock").last().copied()
        } else {
            attrs.parent().map(tracing::span::Id::into_u64)
        };
        let mut spans = self.spans.lock().expect("lock");
        spans.push((s, parent));
        tracing::span::Id::from_u64(spans.len() as u64)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let spans = self.spans.lock().expect("lock");
        // The innermost entered span and its ancestors, outermost first.
        let mut ctx = Vec::new();
        let mut cur = self.stack.lock().expect("lock").last().copied();
        while let Some(id) = cur {
            let (name, parent) = &spans[id as usize - 1];
            ctx.push(name.as_str());
            cur = *parent;
        }
        ctx.reverse();
        let mut line = format!("{} {}", event.metadata().level(), ctx.join(":"));
        event.record(&mut Fields(&mut line));
        self.lines.lock().expect("lock").push(line);
    }

    fn enter(&self, id: &tracing::span::Id) {
        self.stack.lock().expect("lock").push(id.into_u64());
    }

    fn exit(&self, id: &tracing::span::Id) {
        let mut stack = self.stack.lock().expect("lock");
        if let Some(pos) = stack.iter().rposition(|x| *x == id.into_u64()) {
            stack.remove(pos);
        }
    }
}

// ---------------------------------------------------------------------------
// Server harness
// ---------------------------------------------------------------------------

enum Ctl {
    Snapshot(flume::Sender<Vec<u8>>),
    Shutdown(flume::Sender<()>),
}

/// An export served on its own executor thread.
struct Server {
    dir: tempfile::TempDir,
    sock: PathBuf,
    stats: Arc<Stats>,
    logs: Arc<Mutex<Vec<String>>>,
    ctl: flume::Sender<Ctl>,
    thread: Option<glommio::ExecutorJoinHandle<()>>,
}

impl Server {
    fn start() -> Self {
        Self::start_with(false)
    }

    fn start_with(read_only: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let stats = Arc::new(Stats::default());
        let (ctl, ctl_rx) = flume::unbounded();
        let (ready_tx, ready_rx) = flume::bounded(1);
        let thread_sock = sock.clone();
        let thread_stats = stats.clone();
        let capture = Capture::default();
        let logs = capture.lines.clone();
        let thread = LocalExecutorBuilder::default()
            .name("nbd-test")
            .io_memory(1 << 20)
            .spawn(move || async move {
                let _log = tracing::subscriber::set_default(capture);
                serve(thread_sock, thread_stats, read_only, ctl_rx, ready_tx).await;
            })
            .expect("executor");
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("server ready");
        Self {
            dir,
            sock,
            stats,
            logs,
            ctl,
            thread: Some(thread),
        }
    }

    /// Log lines so far that contain every one of `parts`.
    fn log_lines(&self, parts: &[&str]) -> Vec<String> {
        self.logs
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .cloned()
            .collect()
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///{EXPORT}?socket={}", self.sock.display())
    }

    fn snapshot(&self) -> Vec<u8> {
        let (tx, rx) = flume::bounded(1);
        self.ctl.send(Ctl::Snapshot(tx)).expect("server alive");
        rx.recv_timeout(Duration::from_secs(10)).expect("snapshot")
    }

    /// Ask for shutdown; the returned receiver fires when it has completed.
    fn begin_shutdown(&self) -> flume::Receiver<()> {
        let (tx, rx) = flume::bounded(1);
        self.ctl.send(Ctl::Shutdown(tx)).expect("server alive");
        rx
    }

    fn shutdown(mut self) {
        let done = self.begin_shutdown();
        done.recv_timeout(Duration::from_secs(60))
            .expect("shutdown completes");
        if let Some(t) = self.thread.take() {
            t.join().expect("executor thread");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::env::var_os("NBD_TEST_LOGS").is_some() {
            for line in self.logs.lock().expect("lock").iter() {
                eprintln!("{line}");
            }
        }
        if let Some(t) = self.thread.take() {
            let (tx, _rx) = flume::bounded(1);
            let _ = self.ctl.send(Ctl::Shutdown(tx));
            let _ = t.join();
        }
    }
}

async fn serve(
    sock: PathBuf,
    stats: Arc<Stats>,
    read_only: bool,
    ctl: flume::Receiver<Ctl>,
    ready: flume::Sender<()>,
) {
    let backend = Rc::new(MemBackend::new(stats));
    let cfg = NbdConfig {
        export_name: EXPORT.into(),
        max_inflight: 16,
        buffer_budget: 8 << 20,
        read_only,
    };
    let export = NbdExport::bind(&sock, cfg, backend.clone()).expect("bind");
    let handle = export.start();
    ready.send(()).expect("test waiting");
    while let Ok(msg) = ctl.recv_async().await {
        match msg {
            Ctl::Snapshot(tx) => {
                let _ = tx.send(backend.data.borrow().clone());
            }
            Ctl::Shutdown(done) => {
                handle.shutdown().await;
                let _ = done.send(());
                return;
            }
        }
    }
    handle.shutdown().await;
}

// ---------------------------------------------------------------------------
// External clients
// ---------------------------------------------------------------------------

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Run a command, require success, return stdout (stderr is appended to the
/// panic message on failure).
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

fn qemu_io(server: &Server, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("raw");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(server.uri());
    let out = run(&mut c);
    assert!(
        !out.contains("verification failed") && !out.contains("failed:"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

fn require_qemu_io() {
    assert!(
        have("qemu-io"),
        "qemu-io is required for these tests (package qemu-utils)"
    );
}

#[test]
fn nbd_qemu_io_read_write_flush() {
    require_qemu_io();
    let server = Server::start();
    qemu_io(
        &server,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0x11 1 3",
            "read -P 0x11 1 3",
            "read -P 0xab 0 1",
            "read -P 0xab 4 508",
            "flush",
        ],
    );
    let data = server.snapshot();
    assert_eq!(data[0], 0xab);
    assert_eq!(&data[1..4], &[0x11; 3]);
    assert!(data[4..1 << 20].iter().all(|&b| b == 0xab));
    assert!(data[1 << 20..].iter().all(|&b| b == 0));
    assert!(
        Stats::get(&server.stats.flushes) >= 1,
        "flush reached the backend"
    );
    server.shutdown();
}

#[test]
fn nbd_qemu_io_zeroes_discard_fua() {
    require_qemu_io();
    let server = Server::start();
    let m = 1 << 20;
    qemu_io(
        &server,
        &[
            "write -P 0xcd 2M 128k",
            "write -z 2M 64k",
            "read -P 0 2M 64k",
            "read -P 0xcd 2162688 64k",
            "write -P 0xee 4M 64k",
            "discard 4M 64k",
            "write -f -P 0x5a 6M 4k",
        ],
    );
    let data = server.snapshot();
    assert!(data[2 * m..2 * m + 65536].iter().all(|&b| b == 0));
    assert!(data[2 * m + 65536..2 * m + 131072]
        .iter()
        .all(|&b| b == 0xcd));
    assert!(Stats::get(&server.stats.zeroes) >= 1, "WRITE_ZEROES used");
    assert!(Stats::get(&server.stats.trims) >= 1, "TRIM used");
    // This backend zeroes trimmed ranges.
    assert!(data[4 * m..4 * m + 65536].iter().all(|&b| b == 0));
    assert!(data[6 * m..6 * m + 4096].iter().all(|&b| b == 0x5a));
    assert!(
        Stats::get(&server.stats.fua_writes) >= 1,
        "FUA passed through"
    );
    server.shutdown();
}

#[test]
fn nbd_qemu_io_aio_in_flight() {
    require_qemu_io();
    let server = Server::start();
    let base = SLOW_START;
    let mut cmds: Vec<String> = (0..8u64)
        .map(|i| format!("aio_write -P {} {} 64k", 0x30 + i, base + i * 65536))
        .collect();
    cmds.push("aio_flush".into());
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&server, &refs);
    // Each of these writes spends SLOW_DELAY in the backend: they overlap
    // only if the server runs them concurrently.
    let concurrent = Stats::get(&server.stats.max_concurrent);
    assert!(concurrent >= 4, "only {concurrent} requests ran at once");
    let data = server.snapshot();
    for i in 0..8u64 {
        let at = (base + i * 65536) as usize;
        assert!(data[at..at + 65536].iter().all(|&b| b == 0x30 + i as u8));
    }
    server.shutdown();
}

#[test]
fn nbdinfo_reports_export() {
    if !have("nbdinfo") {
        println!("NOTICE: nbdinfo not installed (package libnbd-bin); skipping nbdinfo checks");
        return;
    }
    let server = Server::start();
    let json = run(Command::new("nbdinfo").arg("--json").arg(server.uri()));
    let compact: String = json.split_whitespace().collect();
    for want in [
        "\"export-name\":\"r0\"",
        &format!("\"export-size\":{SIZE}"),
        "\"block_size_minimum\":512",
        "\"block_size_preferred\":4096",
        &format!("\"block_size_maximum\":{MAX_PAYLOAD}"),
        "\"is_read_only\":false",
        "\"can_flush\":true",
        "\"can_fua\":true",
        "\"can_multi_conn\":true",
        "\"can_trim\":true",
        "\"can_zero\":true",
        "\"can_cache\":true",
        "\"can_fast_zero\":true",
        "\"can_df\":true",
    ] {
        assert!(
            compact.contains(want),
            "{want} missing in nbdinfo output:\n{json}"
        );
    }
    let list = run(Command::new("nbdinfo").arg("--list").arg(server.uri()));
    assert!(list.contains("r0"), "{list}");
    let size = run(Command::new("nbdinfo").arg("--size").arg(server.uri()));
    assert_eq!(size.trim(), SIZE.to_string());
    server.shutdown();
}

#[test]
fn nbdcopy_roundtrip() {
    if !have("nbdcopy") {
        println!("NOTICE: nbdcopy not installed (package libnbd-bin); skipping nbdcopy checks");
        return;
    }
    let server = Server::start();
    let len = 16usize << 20;
    let src = server.dir.path().join("src.img");
    let dst = server.dir.path().join("dst.img");
    let pattern: Vec<u8> = (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0])
        .collect();
    std::fs::write(&src, &pattern).expect("write source");
    // File (16 MiB) -> first 16 MiB of the export: several connections,
    // many requests in flight.
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(server.uri()));
    let data = server.snapshot();
    assert!(
        data[..len] == pattern[..],
        "export content differs from source"
    );
    assert!(Stats::get(&server.stats.flushes) >= 1);
    // Export -> file: the whole export.
    run(Command::new("nbdcopy").arg(server.uri()).arg(&dst));
    let copied = std::fs::read(&dst).expect("read copy");
    assert_eq!(copied.len() as u64, SIZE);
    assert!(copied[..len] == pattern[..], "copied content differs");
    assert!(copied[len..].iter().all(|&b| b == 0));
    server.shutdown();
}

#[test]
fn nbd_fio_verify() {
    let nbd_engine = Command::new("fio")
        .arg("--enghelp")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("nbd"));
    if !nbd_engine {
        println!("NOTICE: fio with the nbd engine not installed; skipping fio checks");
        return;
    }
    let server = Server::start();
    run(Command::new("fio")
        .arg("--name=verify")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", server.uri()))
        .arg("--rw=randwrite")
        .arg("--bs=4k")
        .arg("--size=8M")
        .arg("--iodepth=16")
        .arg("--verify=crc32c")
        .arg("--do_verify=1")
        .arg("--output-format=terse"));
    assert!(
        Stats::get(&server.stats.writes) >= 2048,
        "fio wrote 8 MiB in 4k blocks"
    );
    server.shutdown();
}

// ---------------------------------------------------------------------------
// Raw protocol client
// ---------------------------------------------------------------------------

struct Raw {
    s: UnixStream,
}

impl Raw {
    /// Connect and read the greeting.
    fn connect(sock: &Path) -> Self {
        let s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut r = Self { s };
        let g = r.read_n(proto::GREETING_LEN);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            proto::SERVER_HANDSHAKE_FLAGS
        );
        r
    }

    /// Connect, send client flags.
    fn negotiating(sock: &Path) -> Self {
        let mut r = Self::connect(sock);
        r.send(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes());
        r
    }

    /// Connect and enter transmission with NBD_OPT_GO.
    fn transmitting(sock: &Path) -> Self {
        let mut r = Self::negotiating(sock);
        let replies = r.option(proto::OPT_GO, &InfoRequest::encode(b"r0", &[]));
        assert_eq!(replies.last().map(|r| r.0), Some(proto::REP_ACK));
        r
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b).expect("read");
        b
    }

    /// Whether the server closed the connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    /// Send an option; return every (reply type, data) up to the final one.
    fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let hdr = OptionRequest {
            option,
            length: data.len() as u32,
        };
        self.send(&hdr.to_bytes());
        self.send(data);
        self.option_replies(option)
    }

    fn option_replies(&mut self, option: u32) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let h = self.read_n(proto::OPTION_REPLY_HEADER_LEN);
            let rep = OptionReply::parse(&h).expect("option reply magic");
            assert_eq!(rep.option, option);
            let data = self.read_n(rep.length as usize);
            let last = rep.reply_type == proto::REP_ACK || rep.reply_type & (1 << 31) != 0;
            out.push((rep.reply_type, data));
            if last {
                return out;
            }
        }
    }

    fn request(&mut self, command: Cmd, flags: u16, handle: u64, offset: u64, length: u32) {
        let r = Request {
            command,
            flags,
            handle,
            offset,
            length,
        };
        self.send(&r.to_bytes());
    }

    fn write(&mut self, handle: u64, offset: u64, data: &[u8]) {
        self.request(Cmd::Write, 0, handle, offset, data.len() as u32);
        self.send(data);
    }

    /// Read one simple reply header.
    fn reply(&mut self) -> SimpleReply {
        let h = self.read_n(proto::SIMPLE_REPLY_HEADER_LEN);
        SimpleReply::parse(&h).expect("simple reply magic")
    }

    /// Expect a reply for `handle` with `error` (0: success).
    fn expect_reply(&mut self, handle: u64, error: u32) {
        let r = self.reply();
        assert_eq!((r.handle, r.error), (handle, error), "reply");
    }

    /// Read at `offset` and return the data (asserting success).
    fn read_ok(&mut self, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(Cmd::Read, 0, handle, offset, len);
        self.expect_reply(handle, 0);
        self.read_n(len as usize)
    }

    /// Connect, negotiate structured replies and `base:allocation`, enter
    /// transmission; returns the context id.
    fn structured(sock: &Path) -> (Self, u32) {
        let mut r = Self::negotiating(sock);
        let ack = r.option(proto::OPT_STRUCTURED_REPLY, b"");
        assert_eq!(ack, [(proto::REP_ACK, vec![])]);
        let q = MetaContextRequest::encode(b"r0", &[b"base:allocation"]);
        let set = r.option(proto::OPT_SET_META_CONTEXT, &q);
        assert_eq!(set.len(), 2, "{set:?}");
        assert_eq!(set[0].0, proto::REP_META_CONTEXT);
        assert_eq!(&set[0].1[4..], b"base:allocation");
        let id = u32::from_be_bytes(set[0].1[..4].try_into().expect("4 bytes"));
        assert_eq!(set[1].0, proto::REP_ACK);
        let go = r.option(proto::OPT_GO, &InfoRequest::encode(b"r0", &[]));
        assert_eq!(go.last().map(|x| x.0), Some(proto::REP_ACK));
        assert_eq!(
            go[0].1,
            proto::info_export_data(SIZE, proto::transmission_flags(false, true)),
            "SEND_DF once structured replies are negotiated"
        );
        (r, id)
    }

    /// Read the next reply, simple or structured (with its payload; a
    /// simple reply here never has data).
    fn next_reply(&mut self) -> Reply {
        let magic = self.read_n(4);
        let magic_u32 = u32::from_be_bytes(magic[..].try_into().expect("4 bytes"));
        if magic_u32 == proto::SIMPLE_REPLY_MAGIC {
            let mut h = magic;
            h.extend(self.read_n(proto::SIMPLE_REPLY_HEADER_LEN - 4));
            return Reply::Simple(SimpleReply::parse(&h).expect("simple reply"));
        }
        let mut h = magic;
        h.extend(self.read_n(proto::STRUCTURED_REPLY_HEADER_LEN - 4));
        let chunk = StructuredReply::parse(&h).expect("structured reply magic");
        let payload = self.read_n(chunk.length as usize);
        Reply::Chunk(chunk, payload)
    }

    /// Expect a final chunk of `reply_type` for `handle`; its payload.
    fn expect_chunk(&mut self, handle: u64, reply_type: u16) -> Vec<u8> {
        match self.next_reply() {
            Reply::Chunk(c, payload) => {
                assert_eq!(
                    (c.handle, c.reply_type, c.flags),
                    (handle, reply_type, proto::REPLY_FLAG_DONE),
                    "chunk {payload:?}"
                );
                payload
            }
            other => panic!("expected a chunk for {handle}, got {other:?}"),
        }
    }

    /// Expect a final error chunk with `errno` for `handle`.
    fn expect_error_chunk(&mut self, handle: u64, errno: u32) {
        let p = self.expect_chunk(handle, proto::REPLY_TYPE_ERROR);
        assert_eq!(u32::from_be_bytes(p[..4].try_into().expect("4")), errno);
        let msg_len = u16::from_be_bytes([p[4], p[5]]) as usize;
        assert_eq!(msg_len, p.len() - 6, "message fills the chunk");
    }

    /// Structured read: one final OFFSET_DATA chunk; returns the data.
    fn read_chunk(&mut self, handle: u64, flags: u16, offset: u64, len: u32) -> Vec<u8> {
        self.request(Cmd::Read, flags, handle, offset, len);
        let p = self.expect_chunk(handle, proto::REPLY_TYPE_OFFSET_DATA);
        assert_eq!(u64::from_be_bytes(p[..8].try_into().expect("8")), offset);
        assert_eq!(p.len(), 8 + len as usize);
        p[8..].to_vec()
    }

    /// Block status: (context id, [(length, flags)]).
    fn block_status(
        &mut self,
        handle: u64,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> (u32, Vec<(u32, u32)>) {
        self.request(Cmd::BlockStatus, flags, handle, offset, len);
        let p = self.expect_chunk(handle, proto::REPLY_TYPE_BLOCK_STATUS);
        assert!(p.len() >= 12 && (p.len() - 4).is_multiple_of(8), "{p:?}");
        let be = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("4"));
        let d = p[4..]
            .chunks(8)
            .map(|c| (be(&c[..4]), be(&c[4..])))
            .collect();
        (be(&p[..4]), d)
    }

    /// Expect a simple success reply for `handle`.
    fn expect_simple_ok(&mut self, handle: u64) {
        match self.next_reply() {
            Reply::Simple(r) => assert_eq!((r.handle, r.error), (handle, 0)),
            other => panic!("expected a simple reply for {handle}, got {other:?}"),
        }
    }
}

/// One reply on a structured connection.
#[derive(Debug)]
enum Reply {
    Simple(SimpleReply),
    Chunk(StructuredReply, Vec<u8>),
}

const HOLE_ZERO: u32 = proto::STATE_HOLE | proto::STATE_ZERO;

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;
const EPERM: u32 = 1;
const ENOTSUP: u32 = 95;

#[test]
fn nbd_raw_options() {
    let server = Server::start();
    let mut c = Raw::negotiating(&server.sock);

    // INFO with a count that does not match the length: invalid, still
    // negotiating afterwards.
    let mut bad = InfoRequest::encode(b"r0", &[proto::INFO_NAME]);
    let n = bad.len();
    bad[n - 3] = 5;
    let r = c.option(proto::OPT_INFO, &bad);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, proto::REP_ERR_INVALID);
    // Name length beyond the data.
    let r = c.option(proto::OPT_GO, &[0, 0, 1, 0, b'x', 0, 0]);
    assert_eq!(r[0].0, proto::REP_ERR_INVALID);
    // LIST with data is invalid; without, one SERVER then ACK.
    assert_eq!(c.option(proto::OPT_LIST, b"x")[0].0, proto::REP_ERR_INVALID);
    let r = c.option(proto::OPT_LIST, b"");
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].0, proto::REP_SERVER);
    assert_eq!(r[0].1, proto::server_reply_data(b"r0"));
    assert_eq!(r[1].0, proto::REP_ACK);
    // Unsupported and refused options; metadata contexts need structured
    // replies first.
    assert_eq!(c.option(42, b"abc")[0].0, proto::REP_ERR_UNSUP);
    let q = MetaContextRequest::encode(b"r0", &[b"base:allocation"]);
    assert_eq!(
        c.option(proto::OPT_SET_META_CONTEXT, &q)[0].0,
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        c.option(proto::OPT_LIST_META_CONTEXT, &q)[0].0,
        proto::REP_ERR_INVALID
    );
    assert_eq!(
        c.option(proto::OPT_STARTTLS, b"")[0].0,
        proto::REP_ERR_POLICY
    );
    // Unknown export.
    let r = c.option(proto::OPT_INFO, &InfoRequest::encode(b"nope", &[]));
    assert_eq!(r[0].0, proto::REP_ERR_UNKNOWN);
    // INFO on the default export: EXPORT, BLOCK_SIZE, NAME (asked), ACK.
    let r = c.option(
        proto::OPT_INFO,
        &InfoRequest::encode(b"", &[proto::INFO_NAME]),
    );
    let types: Vec<u32> = r.iter().map(|x| x.0).collect();
    assert_eq!(
        types,
        [
            proto::REP_INFO,
            proto::REP_INFO,
            proto::REP_INFO,
            proto::REP_ACK
        ]
    );
    assert_eq!(
        r[0].1,
        proto::info_export_data(SIZE, proto::transmission_flags(false, false))
    );
    assert_eq!(r[1].1, proto::info_block_size_data(512, 4096, MAX_PAYLOAD));
    assert_eq!(r[2].1, proto::info_name_data(b"r0"));
    // GO enters transmission.
    let r = c.option(proto::OPT_GO, &InfoRequest::encode(b"r0", &[]));
    assert_eq!(r.last().map(|x| x.0), Some(proto::REP_ACK));
    let data = c.read_ok(1, 0, 512);
    assert!(data.iter().all(|&b| b == 0));

    // Option data above the limit: TOO_BIG, then the server hangs up
    // without reading the data.
    let mut c = Raw::negotiating(&server.sock);
    let hdr = OptionRequest {
        option: proto::OPT_GO,
        length: 1 << 20,
    };
    c.send(&hdr.to_bytes());
    let r = c.option_replies(proto::OPT_GO);
    assert_eq!(r[0].0, proto::REP_ERR_TOO_BIG);
    assert!(c.closed());

    // ABORT: ACK then close.
    let mut c = Raw::negotiating(&server.sock);
    assert_eq!(c.option(proto::OPT_ABORT, b"")[0].0, proto::REP_ACK);
    assert!(c.closed());

    // Unknown client flags: close.
    let mut c = Raw::connect(&server.sock);
    c.send(&0x8000_0001u32.to_be_bytes());
    assert!(c.closed());

    // Bad option magic: close.
    let mut c = Raw::negotiating(&server.sock);
    c.send(&[0u8; 16]);
    assert!(c.closed());

    // EXPORT_NAME with an unknown name: close (no error reply possible).
    let mut c = Raw::negotiating(&server.sock);
    c.send(
        &OptionRequest {
            option: proto::OPT_EXPORT_NAME,
            length: 4,
        }
        .to_bytes(),
    );
    c.send(b"nope");
    assert!(c.closed());

    // EXPORT_NAME without NO_ZEROES: size, flags, 124 zero bytes.
    let mut c = Raw::connect(&server.sock);
    c.send(&proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.send(
        &OptionRequest {
            option: proto::OPT_EXPORT_NAME,
            length: 2,
        }
        .to_bytes(),
    );
    c.send(b"r0");
    let reply = c.read_n(134);
    assert_eq!(
        reply,
        proto::export_name_reply(SIZE, proto::transmission_flags(false, false), false)
    );
    c.write(9, 512, &[7u8; 512]);
    c.expect_reply(9, 0);
    assert_eq!(c.read_ok(10, 512, 512), vec![7u8; 512]);

    server.shutdown();
}

#[test]
fn nbd_raw_invalid_requests_keep_connection() {
    let server = Server::start();
    let mut c = Raw::transmitting(&server.sock);
    c.write(1, 0, &[0x42; 4096]);
    c.expect_reply(1, 0);

    // Out of range.
    c.request(Cmd::Read, 0, 2, SIZE - 512, 1024);
    c.expect_reply(2, EINVAL);
    c.write(3, SIZE, &[1; 512]);
    c.expect_reply(3, ENOSPC);
    c.request(Cmd::Read, 0, 4, u64::MAX - 10, 512);
    c.expect_reply(4, EINVAL);
    c.request(Cmd::Trim, 0, 5, SIZE, 1);
    c.expect_reply(5, EINVAL);
    c.request(Cmd::WriteZeroes, 0, 6, SIZE - 1, 2);
    c.expect_reply(6, ENOSPC);
    // Too large: the payload is discarded and framing survives.
    let big = vec![0x99u8; MAX_PAYLOAD as usize + 4096];
    c.write(7, 0, &big);
    c.expect_reply(7, EOVERFLOW);
    c.request(Cmd::Read, 0, 8, 0, MAX_PAYLOAD + 1);
    c.expect_reply(8, EOVERFLOW);
    // Zero length, bad flags, unknown and unsupported commands.
    c.request(Cmd::Read, 0, 9, 0, 0);
    c.expect_reply(9, EINVAL);
    c.request(Cmd::Read, proto::CMD_FLAG_DF, 10, 0, 512);
    c.expect_reply(10, EINVAL);
    c.write(11, 0, &[0x13; 512]);
    // (write with a valid payload but after the bad ones: must succeed)
    c.expect_reply(11, 0);
    c.request(Cmd::Write, proto::CMD_FLAG_NO_HOLE, 12, 0, 512);
    c.send(&[0x77; 512]);
    c.expect_reply(12, EINVAL);
    c.request(Cmd::Unknown(200), 0, 13, 0, 512);
    c.expect_reply(13, EINVAL);
    // CACHE is validated and acknowledged; BLOCK_STATUS without a
    // metadata context and FAST_ZERO where zeroing is not fast are refused
    // (simple replies: nothing was negotiated).
    c.request(Cmd::Cache, 0, 14, 0, 512);
    c.expect_reply(14, 0);
    c.request(Cmd::Cache, 0, 141, SIZE, 512);
    c.expect_reply(141, EINVAL);
    c.request(Cmd::BlockStatus, 0, 15, 0, 512);
    c.expect_reply(15, EINVAL);
    c.request(Cmd::WriteZeroes, proto::CMD_FLAG_FAST_ZERO, 151, 512, 512);
    c.expect_reply(151, ENOTSUP);
    c.request(Cmd::Flush, 0, 16, 1, 0);
    c.expect_reply(16, EINVAL);

    // Still serving, and no rejected write reached the backend.
    let data = c.read_ok(17, 0, 4096);
    assert!(data[..512].iter().all(|&b| b == 0x13));
    assert!(data[512..].iter().all(|&b| b == 0x42));
    // Unaligned write and read.
    c.write(18, 1, &[0x11; 3]);
    c.expect_reply(18, 0);
    assert_eq!(c.read_ok(19, 0, 5), vec![0x13, 0x11, 0x11, 0x11, 0x13]);
    c.request(Cmd::Flush, proto::CMD_FLAG_FUA, 20, 0, 0);
    c.expect_reply(20, 0);
    assert!(Stats::get(&server.stats.flushes) >= 1);
    let snap = server.snapshot();
    assert!(snap[SIZE as usize - 512..].iter().all(|&b| b == 0));
    // Rejections are logged at warn with the export, the connection and
    // the request.
    let lines = server.log_lines(&[
        "WARN",
        "nbd{export=r0}:conn{conn=1}",
        "rejected request",
        "handle: 2,",
        "offset: 67108352",
        "error=EINVAL",
    ]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    server.shutdown();
}

#[test]
fn nbd_raw_pipelined_out_of_order() {
    let server = Server::start();
    let mut c = Raw::transmitting(&server.sock);
    c.write(1, SLOW_START, &[0xa1; 4096]);
    c.expect_reply(1, 0);
    // A slow read, then fast requests: the fast ones are answered first.
    c.request(Cmd::Read, 0, 100, SLOW_START, 4096);
    c.write(101, 0, &[0xb2; 8192]);
    c.request(Cmd::Read, 0, 102, 8192, 512);
    c.request(Cmd::Flush, 0, 103, 0, 0);
    let mut order = Vec::new();
    for _ in 0..4 {
        let r = c.reply();
        assert_eq!(r.error, 0);
        order.push(r.handle);
        match r.handle {
            100 => assert_eq!(c.read_n(4096), vec![0xa1; 4096]),
            102 => assert_eq!(c.read_n(512), vec![0; 512]),
            _ => {}
        }
    }
    assert_eq!(
        order.last(),
        Some(&100),
        "slow read answered last: {order:?}"
    );
    assert_eq!(c.read_ok(2, 0, 8192), vec![0xb2; 8192]);
    server.shutdown();
}

#[test]
fn nbd_raw_bad_magic_closes_after_in_flight() {
    let server = Server::start();
    let mut c = Raw::transmitting(&server.sock);
    c.request(Cmd::Read, 0, 1, SLOW_START, 512);
    let mut junk = Request {
        command: Cmd::Read,
        flags: 0,
        handle: 2,
        offset: 0,
        length: 512,
    }
    .to_bytes();
    junk[0] = 0xde;
    c.send(&junk);
    // The request read before the junk is still answered, then the server
    // hangs up.
    c.expect_reply(1, 0);
    assert_eq!(c.read_n(512), vec![0; 512]);
    assert!(c.closed());
    // Other connections are unaffected.
    let mut d = Raw::transmitting(&server.sock);
    d.read_ok(1, 0, 512);
    let lines = server.log_lines(&["WARN", "connection closed", "bad request magic 0xde609513"]);
    assert_eq!(lines.len(), 1, "{lines:?}");
    server.shutdown();
}

#[test]
fn nbd_raw_disc_finishes_in_flight() {
    let server = Server::start();
    let mut c = Raw::transmitting(&server.sock);
    c.write(1, SLOW_START + 8192, &[0x5e; 4096]);
    c.request(Cmd::Disc, 0, 2, 0, 0);
    c.expect_reply(1, 0);
    assert!(c.closed());
    let snap = server.snapshot();
    let at = (SLOW_START + 8192) as usize;
    assert!(snap[at..at + 4096].iter().all(|&b| b == 0x5e));
    server.shutdown();
}

#[test]
fn nbd_raw_read_only_export() {
    let server = Server::start_with(true);
    let mut c = Raw::negotiating(&server.sock);
    let r = c.option(proto::OPT_GO, &InfoRequest::encode(b"", &[]));
    assert_eq!(r[0].0, proto::REP_INFO);
    assert_eq!(
        r[0].1,
        proto::info_export_data(SIZE, proto::transmission_flags(true, false))
    );
    c.write(1, 0, &[1; 512]);
    c.expect_reply(1, EPERM);
    c.request(Cmd::Trim, 0, 2, 0, 512);
    c.expect_reply(2, EPERM);
    c.request(Cmd::WriteZeroes, 0, 3, 0, 512);
    c.expect_reply(3, EPERM);
    assert_eq!(c.read_ok(4, 0, 512), vec![0; 512]);
    server.shutdown();
}

#[test]
fn nbd_shutdown_completes_in_flight_requests() {
    let server = Server::start();
    let mut c = Raw::transmitting(&server.sock);
    let mut idle = Raw::negotiating(&server.sock);
    // Two slow requests in flight.
    c.write(1, SLOW_START, &[0x77; 4096]);
    c.request(Cmd::Read, 0, 2, SLOW_START + 65536, 4096);
    // Stop once both are in the backend (where each spends SLOW_DELAY).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Stats::get(&server.stats.running) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "requests never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let done = server.begin_shutdown();
    let mut got = Vec::new();
    for _ in 0..2 {
        let r = c.reply();
        assert_eq!(r.error, 0, "in-flight request completed normally");
        if r.handle == 2 {
            assert_eq!(c.read_n(4096), vec![0; 4096]);
        }
        got.push(r.handle);
    }
    got.sort_unstable();
    assert_eq!(got, [1, 2]);
    assert!(c.closed(), "connection closed after draining");
    assert!(idle.closed(), "negotiating connection closed");
    done.recv_timeout(Duration::from_secs(30))
        .expect("shutdown completes");
    assert!(!server.sock.exists(), "socket file removed");
    assert!(UnixStream::connect(&server.sock).is_err());
    assert_eq!(Stats::get(&server.stats.writes), 1);
}

#[test]
fn nbd_stale_socket_is_replaced_and_non_socket_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"keep me").expect("write");
    let (s, p) = (stale.clone(), plain.clone());
    let res = LocalExecutorBuilder::default()
        .io_memory(1 << 20)
        .spawn(move || async move {
            let stats = Arc::new(Stats::default());
            let cfg = NbdConfig {
                export_name: EXPORT.into(),
                max_inflight: 4,
                buffer_budget: 1 << 20,
                read_only: false,
            };
            let backend = Rc::new(MemBackend::new(stats));
            let refused = NbdExport::bind(&p, cfg.clone(), backend.clone()).is_err();
            let export = NbdExport::bind(&s, cfg.clone(), backend.clone()).expect("rebind");
            // A second bind on a live socket is refused, not stolen.
            let in_use = NbdExport::bind(&s, cfg, backend).is_err();
            let handle = export.start();
            handle.shutdown().await;
            (refused, in_use)
        })
        .expect("executor")
        .join()
        .expect("join");
    assert_eq!(res, (true, true));
    assert_eq!(std::fs::read(&plain).expect("plain file kept"), b"keep me");
    assert!(!stale.exists(), "socket removed at shutdown");
}

#[test]
fn nbd_connection_limit() {
    let server = Server::start();
    let mut idle: Vec<Raw> = (0..MAX_CONNECTIONS)
        .map(|_| Raw::negotiating(&server.sock))
        .collect();
    // One more is accepted and closed at once (before the greeting).
    let mut extra = UnixStream::connect(&server.sock).expect("connect");
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut b = [0u8; 1];
    assert!(matches!(extra.read(&mut b), Ok(0) | Err(_)));
    assert_eq!(server.log_lines(&["too many connections"]).len(), 1);
    // Freeing a slot lets a new client in.
    let mut one = idle.pop().expect("one idle");
    assert_eq!(one.option(proto::OPT_ABORT, b"")[0].0, proto::REP_ACK);
    assert!(one.closed());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Raw::negotiating(&server.sock);
        let r = c.option(proto::OPT_LIST, b"");
        if r.last().map(|x| x.0) == Some(proto::REP_ACK) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot never freed");
    }
    // Shutdown closes the idle negotiations.
    let done = server.begin_shutdown();
    for c in idle.iter_mut() {
        assert!(c.closed());
    }
    done.recv_timeout(Duration::from_secs(30))
        .expect("shutdown completes");
}

#[test]
fn nbd_raw_structured_replies_and_block_status() {
    let server = Server::start();
    let (mut c, ctx) = Raw::structured(&server.sock);
    // Writes still get simple replies.
    c.write(1, 8192, &[0x61; 4096]);
    c.expect_simple_ok(1);
    c.write(2, 1 << 20, &[0x62; 3 * 4096]);
    c.expect_simple_ok(2);
    // Reads: one final OFFSET_DATA chunk, small and large, with DF too.
    assert_eq!(c.read_chunk(3, 0, 8192, 512), vec![0x61; 512]);
    let big = c.read_chunk(4, proto::CMD_FLAG_DF, (1 << 20) - 4096, 5 * 4096);
    assert!(big[..4096].iter().all(|&b| b == 0));
    assert!(big[4096..4 * 4096].iter().all(|&b| b == 0x62));
    assert!(big[4 * 4096..].iter().all(|&b| b == 0));
    // A bad read gets an error chunk, never a simple reply.
    c.request(Cmd::Read, 0, 5, SIZE - 512, 1024);
    c.expect_error_chunk(5, EINVAL);
    c.request(Cmd::Read, proto::CMD_FLAG_REQ_ONE, 6, 0, 512);
    c.expect_error_chunk(6, EINVAL);

    // Block status of the first 2 MiB: hole, data, hole, data, hole.
    let (id, d) = c.block_status(7, 0, 0, 2 << 20);
    assert_eq!(id, ctx);
    assert_eq!(
        d,
        [
            (8192, HOLE_ZERO),
            (4096, 0),
            ((1 << 20) - 12288, HOLE_ZERO),
            (3 * 4096, 0),
            ((1 << 20) - 3 * 4096, HOLE_ZERO),
        ]
    );
    // REQ_ONE: exactly one descriptor, within the request.
    assert_eq!(
        c.block_status(8, proto::CMD_FLAG_REQ_ONE, 0, 2 << 20).1,
        [(8192, HOLE_ZERO)]
    );
    assert_eq!(
        c.block_status(9, proto::CMD_FLAG_REQ_ONE, 8192 + 100, 1000)
            .1,
        [(1000, 0)]
    );
    // Unaligned start inside a hole.
    assert_eq!(
        c.block_status(10, 0, 100, 9000).1,
        [(8092, HOLE_ZERO), (908, 0)]
    );
    // Invalid block status requests: error chunks.
    c.request(Cmd::BlockStatus, 0, 11, SIZE - 512, 1024);
    c.expect_error_chunk(11, EINVAL);
    c.request(Cmd::BlockStatus, proto::CMD_FLAG_DF, 12, 0, 512);
    c.expect_error_chunk(12, EINVAL);

    // FAST_ZERO: whole blocks are fast here, so they are zeroed; a partial
    // block is refused at once with ENOTSUP and left untouched.
    c.request(
        Cmd::WriteZeroes,
        proto::CMD_FLAG_FAST_ZERO,
        13,
        1 << 20,
        4096,
    );
    c.expect_simple_ok(13);
    c.request(
        Cmd::WriteZeroes,
        proto::CMD_FLAG_FAST_ZERO,
        14,
        (1 << 20) + 4096,
        512,
    );
    c.expect_error_chunk(14, ENOTSUP);
    let after = c.read_chunk(15, 0, 1 << 20, 3 * 4096);
    assert!(after[..4096].iter().all(|&b| b == 0));
    assert!(
        after[4096..].iter().all(|&b| b == 0x62),
        "ENOTSUP changed nothing"
    );
    assert_eq!(
        c.block_status(16, 0, 1 << 20, 3 * 4096).1,
        [(4096, HOLE_ZERO), (8192, 0)]
    );
    // Without FAST_ZERO the same partial block is zeroed.
    c.request(
        Cmd::WriteZeroes,
        proto::CMD_FLAG_NO_HOLE,
        17,
        (1 << 20) + 4096,
        512,
    );
    c.expect_simple_ok(17);
    assert!(c
        .read_chunk(18, 0, (1 << 20) + 4096, 512)
        .iter()
        .all(|&b| b == 0));

    // CACHE: acknowledged, reaches the backend; out of range refused.
    c.request(Cmd::Cache, 0, 19, 0, 1 << 20);
    c.expect_simple_ok(19);
    c.request(Cmd::Cache, 0, 20, SIZE, 1);
    c.expect_error_chunk(20, EINVAL);
    assert_eq!(Stats::get(&server.stats.caches), 1);

    // Pipelined: a slow read and block status requests interleave; every
    // reply is complete and matched by its handle.
    c.write(21, SLOW_START, &[0x63; 8192]);
    c.expect_simple_ok(21);
    c.request(Cmd::Read, 0, 100, SLOW_START, 8192);
    for h in 101..105 {
        c.request(Cmd::BlockStatus, 0, h, 0, 16384);
    }
    c.request(Cmd::Flush, 0, 105, 0, 0);
    let mut seen = Vec::new();
    for _ in 0..6 {
        match c.next_reply() {
            Reply::Chunk(ch, p) if ch.handle == 100 => {
                assert_eq!(ch.reply_type, proto::REPLY_TYPE_OFFSET_DATA);
                assert!(p[8..].iter().all(|&b| b == 0x63));
                seen.push(100);
            }
            Reply::Chunk(ch, p) => {
                assert_eq!(ch.reply_type, proto::REPLY_TYPE_BLOCK_STATUS);
                assert_eq!(p.len(), 4 + 3 * 8);
                seen.push(ch.handle);
            }
            Reply::Simple(r) => {
                assert_eq!((r.handle, r.error), (105, 0));
                seen.push(105);
            }
        }
    }
    assert_eq!(seen.last(), Some(&100), "the slow read came last: {seen:?}");
    seen.sort_unstable();
    assert_eq!(seen, [100, 101, 102, 103, 104, 105]);
    server.shutdown();
}

#[test]
fn nbd_raw_block_status_is_bounded() {
    let server = Server::start();
    // Alternate data and holes over 16 MiB: 4096 extents of 4 KiB.
    let (mut c, _) = Raw::structured(&server.sock);
    for i in 0..2048u64 {
        c.write(i, i * 2 * BLOCK, &[1; BLOCK as usize]);
        c.expect_simple_ok(i);
    }
    let (_, d) = c.block_status(5000, 0, 0, 16 << 20);
    assert_eq!(d.len(), proto::MAX_STATUS_DESCRIPTORS);
    assert!(d.iter().all(|&(len, _)| len == BLOCK as u32));
    // The client goes on from where the reply stopped.
    let done: u64 = d.iter().map(|&(len, _)| u64::from(len)).sum();
    let (_, d2) = c.block_status(5001, 0, done, (16 << 20) - done as u32);
    assert_eq!(d2.len(), proto::MAX_STATUS_DESCRIPTORS);
    assert_eq!(d2[0], (BLOCK as u32, 0));
    server.shutdown();
}

#[test]
fn nbd_raw_meta_context_negotiation() {
    let server = Server::start();
    let mut c = Raw::negotiating(&server.sock);
    assert_eq!(
        c.option(proto::OPT_STRUCTURED_REPLY, b"x")[0].0,
        proto::REP_ERR_INVALID,
        "structured reply option carries no data"
    );
    assert_eq!(
        c.option(proto::OPT_STRUCTURED_REPLY, b""),
        [(proto::REP_ACK, vec![])]
    );
    // Listing: everything, the base: wildcard; unknown namespaces ignored.
    let list = |c: &mut Raw, queries: &[&[u8]]| {
        c.option(
            proto::OPT_LIST_META_CONTEXT,
            &MetaContextRequest::encode(b"", queries),
        )
    };
    let ctx0 = (
        proto::REP_META_CONTEXT,
        proto::meta_context_data(0, proto::BASE_ALLOCATION),
    );
    let ack = (proto::REP_ACK, vec![]);
    assert_eq!(list(&mut c, &[]), [ctx0.clone(), ack.clone()]);
    assert_eq!(list(&mut c, &[b"base:"]), [ctx0.clone(), ack.clone()]);
    assert_eq!(
        list(&mut c, &[b"qemu:dirty-bitmap:a"]),
        [(proto::REP_ACK, vec![])]
    );
    assert_eq!(list(&mut c, &[b"nocolon"])[0].0, proto::REP_ERR_INVALID);
    // Unknown export.
    let q = MetaContextRequest::encode(b"nope", &[b"base:allocation"]);
    assert_eq!(
        c.option(proto::OPT_SET_META_CONTEXT, &q)[0].0,
        proto::REP_ERR_UNKNOWN
    );
    // Selecting base:allocation, then a failing selection: the failure
    // replaces it, so BLOCK_STATUS is refused in transmission.
    let q = MetaContextRequest::encode(b"r0", &[b"base:allocation"]);
    assert_eq!(c.option(proto::OPT_SET_META_CONTEXT, &q).len(), 2);
    let bad = MetaContextRequest::encode(b"r0", &[b"base:allocation"]);
    assert_eq!(
        c.option(proto::OPT_SET_META_CONTEXT, &bad[..bad.len() - 1])[0].0,
        proto::REP_ERR_INVALID
    );
    // "base:" selects nothing when setting.
    let q = MetaContextRequest::encode(b"r0", &[b"base:"]);
    assert_eq!(c.option(proto::OPT_SET_META_CONTEXT, &q), [ack]);
    let go = c.option(proto::OPT_GO, &InfoRequest::encode(b"", &[]));
    assert_eq!(go.last().map(|x| x.0), Some(proto::REP_ACK));
    c.request(Cmd::BlockStatus, 0, 1, 0, 512);
    c.expect_error_chunk(1, EINVAL);
    // Structured reads work without a context.
    assert_eq!(c.read_chunk(2, 0, 0, 512), vec![0; 512]);
    server.shutdown();
}
