//! A hostile or broken primary against a real hastd secondary: a fake
//! primary (tests/src/fakepeer.rs) completes a valid handshake, then
//!
//! - floods the secondary with large `Write` frames without reading a
//!   single reply, then with 32 MiB `Read` requests whose replies it never
//!   reads: the secondary's resident memory stays under its documented
//!   frame budget (`hast_control::daemon::WINDOW_BYTES`, docs/protocol.md
//!   "Replication modes") plus a fixed overhead, where without the budget
//!   the 1,024-request window alone would let it hold 1 GiB (writes) or
//!   2 GiB (the reads this test sends);
//! - sends garbage: the secondary drops that connection, logs why, keeps
//!   running and accepts the next primary.

use std::io::{ErrorKind, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hast_control::daemon::WINDOW_BYTES;
use hast_datapath::generation::Gen;
use hast_datapath::peer::proto::{Kind, MAX_DATA};
use hast_tests::cluster::{Cluster, ClusterOptions, IP_A};
use hast_tests::fakepeer::{hello, read_frame, FakePrimary};
use hast_tests::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 96 * MIB;
const LIMIT: Duration = Duration::from_secs(120);
/// What the secondary may hold besides the frames' payloads and its idle
/// footprint: the reader's buffered input, reply frames queued for the
/// socket, the allocator's slack and the executors' I/O rings. A stated
/// constant, not a measured margin: the flood would exceed it by an
/// order of magnitude without the budget.
const OVERHEAD: u64 = 24 * MIB;

/// Counters the fake primary presents: a used primary, the secondary new.
fn gen() -> Gen {
    Gen {
        resuid: 0x6861_7374_7465_7374,
        localcnt: 1,
        remotecnt: 0,
    }
}

/// B alone, secondary of r1, waiting for its primary at IP_A.
fn lone_secondary() -> Cluster {
    let mut c = Cluster::new(
        vec![ResourceDef::file("r1", SIZE)],
        ClusterOptions::default(),
    );
    c.b.create_all();
    c.b.try_start().unwrap_or_else(|e| panic!("{e}"));
    c.b.hastctl(&["role", "secondary", "r1"]);
    c
}

/// Connects a fake primary to B (retrying while B still tears down a
/// previous connection).
fn connect(c: &Cluster) -> FakePrimary {
    let md = c.b.dump("r1");
    let h = hello(
        "r1",
        md["datasize"].as_u64().unwrap(),
        md["extentsize"].as_u64().unwrap() as u32,
        gen(),
    );
    let target: SocketAddr = c.b_listen;
    let start = Instant::now();
    loop {
        match FakePrimary::connect(IP_A, target, &h) {
            Ok(p) => return p,
            Err(e) if start.elapsed() < LIMIT => {
                eprintln!("connect: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("fake primary cannot connect: {e}\n{}", c.b.log_tail(40)),
        }
    }
}

/// Bytes received on `s` and not yet read (FIONREAD).
fn unread_bytes(s: &std::net::TcpStream) -> u64 {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points
    // at a live local; the descriptor is open for the call.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    n as u64
}

/// Samples the resident memory of `pid` every 20 ms while the flood runs.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some((rss, _)) = proc_memory(pid) {
                    p.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        RssSampler {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    /// The highest VmRSS sampled.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("sampler");
        }
        self.peak.load(Ordering::Relaxed)
    }
}

#[test]
fn flood_of_large_frames_stays_within_the_frame_budget() {
    let c = lone_secondary();
    let pid = c.b.pid().expect("hastd runs");
    let mut p = connect(&c);
    // Idle footprint with the primary connected (executors, rings, maps).
    std::thread::sleep(Duration::from_millis(500));
    let (idle, _) = proc_memory(pid).expect("hastd status");
    let bound = idle + WINDOW_BYTES as u64 + OVERHEAD;
    let sampler = RssSampler::start(pid);

    // 1. Writes: 1,024 of 1 MiB (the whole request window: 1 GiB if held
    //    at once), then 16 of 32 MiB, sent as fast as the socket takes
    //    them; no reply is read until every frame is out.
    let data_area = SIZE - 32 * MIB;
    let mut sent = Vec::new();
    let small = vec![0x11u8; MIB as usize];
    for i in 0..1024u64 {
        let off = (i * MIB) % data_area;
        sent.push(
            p.request(Kind::Write, 0, off, MIB as u32, &small)
                .expect("send"),
        );
    }
    let big = vec![0x22u8; MAX_DATA as usize];
    for i in 0..16u64 {
        let off = (i % 2) * 32 * MIB;
        sent.push(
            p.request(Kind::Write, 0, off, MAX_DATA, &big)
                .expect("send"),
        );
    }
    let writes_hwm = proc_memory(pid).expect("hastd status").1;
    // Every write is answered Done, status 0, exactly once.
    let mut r = p.reader().expect("clone");
    let mut done = std::collections::BTreeSet::new();
    while done.len() < sent.len() {
        let (h, _) = read_frame(&mut r).expect("reply");
        assert_eq!(h.kind, Kind::Done, "reply {h:?}");
        assert_eq!(h.status, 0, "write {} failed: {h:?}", h.seq);
        assert!(done.insert(h.seq), "seq {} answered twice", h.seq);
    }
    assert_eq!(done.into_iter().collect::<Vec<_>>(), sent);
    // The last writes are on the disk: 0x22 over the first 64 MiB.
    for off in [0, 31 * MIB, 32 * MIB, 63 * MIB] {
        assert!(
            c.b.read_provider_data("r1", off, MIB as usize)
                .iter()
                .all(|&b| b == 0x22),
            "data at {off}"
        );
    }

    // 2. Reads of 32 MiB (64 of them: 2 GiB if held at once) whose
    //    replies are not read until the secondary has sent all it can:
    //    their data may be held only within the budget; the rest waits,
    //    unread, in the socket.
    const READS: u64 = 64;
    let mut read_seqs = Vec::new();
    for i in 0..READS {
        read_seqs.push(
            p.request(Kind::Read, 0, (i % 2) * 32 * MIB, MAX_DATA, &[])
                .expect("send"),
        );
    }
    // Wait until the replies stop arriving in our receive queue (the
    // secondary is blocked by back-pressure, holding what it holds).
    let mut queued = 0;
    let mut stable_since = Instant::now();
    let start = Instant::now();
    while stable_since.elapsed() < Duration::from_secs(2) {
        let q = unread_bytes(&r);
        if q != queued {
            queued = q;
            stable_since = Instant::now();
        }
        assert!(start.elapsed() < LIMIT, "replies never stopped arriving");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(queued > 0, "the secondary answered some reads");
    let peak = sampler.finish();
    let (_, hwm) = proc_memory(pid).expect("hastd status");
    eprintln!(
        "secondary RSS: idle {} MiB, peak sampled {} MiB, VmHWM {} MiB (after writes {} MiB), \
         bound {} MiB (idle + budget {} MiB + overhead {} MiB); {READS} reads of 32 MiB \
         unanswered, {} KiB of replies queued unread",
        idle / MIB,
        peak / MIB,
        hwm / MIB,
        writes_hwm / MIB,
        bound / MIB,
        WINDOW_BYTES as u64 / MIB,
        OVERHEAD / MIB,
        queued / 1024
    );
    assert!(
        hwm.max(peak) <= bound,
        "secondary peak RSS {} MiB above the bound {} MiB",
        hwm.max(peak) / MIB,
        bound / MIB
    );
    // Every read is answered in full, with the data written above.
    for &seq in &read_seqs {
        let (h, data) = read_frame(&mut r).expect("read reply");
        assert_eq!((h.kind, h.seq, h.status), (Kind::ReadReply, seq, 0));
        assert_eq!(data.len(), MAX_DATA as usize);
        assert!(
            data.iter().all(|&b| b == 0x22),
            "read {seq} returned other data"
        );
    }
    drop(r);
    drop(p);

    // The secondary survives the flood and serves the next primary.
    let mut p = connect(&c);
    let seq = p
        .request(Kind::Write, 0, 0, 4096, &[0x33; 4096])
        .expect("send");
    let (h, _) = read_frame(&mut p.stream).expect("reply");
    assert_eq!((h.kind, h.seq, h.status), (Kind::Done, seq, 0));
    assert!(alive(pid));
}

#[test]
fn garbage_after_the_handshake_is_refused_without_a_crash() {
    let c = lone_secondary();
    let pid = c.b.pid().expect("hastd runs");
    for (round, junk) in [
        random_bytes(4096, 7),
        // A well-formed header of an unknown kind would need the codec's
        // checksum; a header-sized run of 0xff is as hostile.
        vec![0xffu8; 48],
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
    ]
    .into_iter()
    .enumerate()
    {
        let mut p = connect(&c);
        std::io::Write::write_all(&mut p.stream, &junk).expect("send garbage");
        p.stream.set_read_timeout(Some(LIMIT)).expect("timeout");
        // The secondary closes the connection (EOF or reset), and sends no
        // reply to garbage.
        let mut buf = [0u8; 64];
        match p.stream.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("round {round}: {n} bytes answered garbage"),
            Err(e) => assert!(
                matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
                "round {round}: connection not closed: {e}"
            ),
        }
        assert!(alive(pid), "hastd died on garbage:\n{}", c.b.log_tail(40));
    }
    let log = c.b.log();
    assert!(
        log.to_lowercase().contains("magic") || log.to_lowercase().contains("protocol"),
        "the log says why the connection was dropped:\n{}",
        c.b.log_tail(40)
    );
    // Still a working secondary.
    let mut p = connect(&c);
    let seq = p
        .request(Kind::Write, 0, MIB, 4096, &[0x44; 4096])
        .expect("send");
    let (h, _) = read_frame(&mut p.stream).expect("reply");
    assert_eq!((h.kind, h.seq, h.status), (Kind::Done, seq, 0));
    assert_eq!(c.b.list("r1")["role"], "secondary");
}
