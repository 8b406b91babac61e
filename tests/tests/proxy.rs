//! The fault-injecting proxy, tested against plain std TCP servers on
//! loopback addresses; and the configs `Cluster::new` writes, checked with
//! the real `hastd -t` and parsed back.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hast_tests::cluster::{Cluster, ClusterOptions, IP_A, IP_B};
use hast_tests::proxy::Proxy;
use hast_tests::*;

const LO1: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const LO2: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const LO3: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

fn any_port(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, 0)
}

/// An echo server: every connection's bytes are written back; EOF from the
/// client closes the connection after the echo. Records the peer address
/// of each connection and how many are open. Drop stops it and joins its
/// threads.
struct Echo {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    open: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Echo {
    fn start(ip: IpAddr) -> Echo {
        let listener = TcpListener::bind(any_port(ip)).expect("bind echo");
        let addr = listener.local_addr().unwrap();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (peers, open, stop, conns) =
                (peers.clone(), open.clone(), stop.clone(), conns.clone());
            std::thread::spawn(move || {
                for s in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    // Reset before it was accepted: nothing to echo.
                    let Ok(s) = s else { continue };
                    let Ok(peer) = s.peer_addr() else { continue };
                    peers.lock().unwrap().push(peer);
                    open.fetch_add(1, Ordering::SeqCst);
                    let (open, stop) = (open.clone(), stop.clone());
                    let h = std::thread::spawn(move || {
                        echo_conn(s, &stop);
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                    conns.lock().unwrap().push(h);
                }
            })
        };
        Echo {
            addr,
            peers,
            open,
            stop,
            accept: Some(accept),
            conns,
        }
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// Echoes until EOF, an error or `stop`; polls `stop` through socket
/// timeouts.
fn echo_conn(mut s: TcpStream, stop: &AtomicBool) {
    let tick = Some(Duration::from_millis(50));
    s.set_read_timeout(tick).unwrap();
    s.set_write_timeout(tick).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        let n = match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if is_timeout(&e) => continue,
            Err(_) => return,
        };
        let mut off = 0;
        while off < n {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            match s.write(&buf[off..n]) {
                Ok(0) => return,
                Ok(k) => off += k,
                Err(e) if is_timeout(&e) => {}
                Err(_) => return,
            }
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for h in self.conns.lock().unwrap().drain(..) {
            let _ = h.join();
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Writes `data` and reads it back (echo), asserting equality.
fn roundtrip(s: &mut TcpStream, data: &[u8]) {
    s.write_all(data).expect("write");
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back).expect("read echo");
    assert!(back == data, "echo differs");
}

/// Writes `pattern` over and over until the peer pushes back (a write
/// blocks for 300 ms); returns the bytes written. Panics if 256 MiB went
/// through without pushback.
fn write_until_blocked(s: &mut TcpStream, pattern: &[u8]) -> usize {
    s.set_write_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut sent = 0;
    let mut pos = 0;
    while sent < 256 << 20 {
        match s.write(&pattern[pos..]) {
            Ok(n) => {
                sent += n;
                pos = (pos + n) % pattern.len();
            }
            Err(e) if is_timeout(&e) => {
                s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
                return sent;
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    panic!("no pushback after {sent} bytes");
}

/// Accepts one connection within `limit` (None if none came).
fn accept_within(l: &TcpListener, limit: Duration) -> Option<TcpStream> {
    l.set_nonblocking(true).unwrap();
    let start = Instant::now();
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                return Some(s);
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => panic!("accept: {e}"),
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Reads once with a deadline; what came of it.
#[derive(Debug, PartialEq)]
enum ReadResult {
    Data(Vec<u8>),
    Eof,
    /// An error other than a timeout (normally ECONNRESET).
    Error(io::ErrorKind),
    Timeout,
}

fn read_once(s: &mut TcpStream, limit: Duration) -> ReadResult {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return ReadResult::Timeout;
        }
        s.set_read_timeout(Some(left)).unwrap();
        // Signals interrupt socket reads that have a timeout (EINTR even
        // with SA_RESTART): retry for the time that is left.
        return match s.read(&mut buf) {
            Ok(0) => ReadResult::Eof,
            Ok(n) => ReadResult::Data(buf[..n].to_vec()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                ReadResult::Timeout
            }
            Err(e) => ReadResult::Error(e.kind()),
        };
    }
}

/// The connection is gone: EOF or reset, promptly, no data.
fn assert_dropped(s: &mut TcpStream, what: &str) {
    let start = Instant::now();
    let r = read_once(s, Duration::from_secs(3));
    assert!(
        matches!(r, ReadResult::Eof | ReadResult::Error(_)),
        "{what}: expected the connection to be dropped, got {r:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(2), "{what}: too slow");
}

#[test]
fn forwards_both_ways_from_the_source_ip() {
    let echo = Echo::start(LO1);
    for source in [LO2, LO3] {
        let proxy = Proxy::start(any_port(LO2), echo.addr, source).unwrap();
        assert_eq!(proxy.addr().ip(), LO2);
        let mut c = connect(proxy.addr());
        // Both directions at once, more than the proxy's buffers hold.
        let data = random_bytes(3 << 20, 7);
        let mut w = c.try_clone().unwrap();
        let back = std::thread::scope(|sc| {
            let writer = sc.spawn(|| w.write_all(&data).expect("write"));
            let mut back = vec![0u8; data.len()];
            c.read_exact(&mut back).expect("read");
            writer.join().unwrap();
            back
        });
        assert!(back == data, "data came back changed");
        assert_eq!(
            echo.peers().last().unwrap().ip(),
            source,
            "target saw the source IP"
        );
        // Counters are bumped after each write returns: they may lag
        // what the peers already saw by a moment.
        let n = data.len() as u64;
        wait_until(Duration::from_secs(5), "byte counters", || {
            let st = proxy.stats();
            st.to_target == n && st.to_client == n
        });
        let st = proxy.stats();
        assert_eq!((st.accepted, st.refused, st.open), (1, 0, 1));
        // A second connection in parallel.
        let mut c2 = connect(proxy.addr());
        roundtrip(&mut c2, b"second");
        roundtrip(&mut c, b"first again");
        assert_eq!(proxy.stats().accepted, 2);
        drop((c, c2, w));
        assert!(
            proxy.wait_open(0, Duration::from_secs(5)),
            "connections reaped"
        );
    }
    assert_eq!(echo.peers().len(), 4);
}

#[test]
fn half_close_is_forwarded() {
    let echo = Echo::start(LO1);
    let proxy = Proxy::start(any_port(LO1), echo.addr, LO2).unwrap();
    let mut c = connect(proxy.addr());
    c.write_all(b"hello, then EOF").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    c.read_to_end(&mut back).expect("read to EOF");
    assert_eq!(back, b"hello, then EOF");
    assert!(proxy.wait_open(0, Duration::from_secs(5)));
    wait_until(Duration::from_secs(5), "echo connection closed", || {
        echo.open() == 0
    });
}

#[test]
fn partition_drops_connections_and_refuses_new_ones_until_heal() {
    let echo = Echo::start(LO2);
    let proxy = Proxy::start(any_port(LO2), echo.addr, LO1).unwrap();
    let mut c1 = connect(proxy.addr());
    let mut c2 = connect(proxy.addr());
    roundtrip(&mut c1, b"before");
    roundtrip(&mut c2, b"before");
    assert_eq!(echo.open(), 2);

    proxy.partition();
    assert_dropped(&mut c1, "open connection 1");
    assert_dropped(&mut c2, "open connection 2");
    // The target's side is dropped too.
    wait_until(Duration::from_secs(3), "target side closed", || {
        echo.open() == 0
    });
    assert!(proxy.wait_open(0, Duration::from_secs(3)));

    // New connections do not get through while partitioned.
    for _ in 0..3 {
        match TcpStream::connect_timeout(&proxy.addr(), Duration::from_secs(2)) {
            Err(_) => {}
            Ok(mut s) => {
                let _ = s.write_all(b"anyone?");
                assert_dropped(&mut s, "connection made while partitioned");
            }
        }
    }
    assert_eq!(echo.peers().len(), 2, "nothing reached the target");
    assert_eq!(proxy.stats().refused, 3);

    proxy.heal();
    let mut c3 = connect(proxy.addr());
    roundtrip(&mut c3, b"after heal");
    assert_eq!(echo.peers().len(), 3);
    let st = proxy.stats();
    assert_eq!((st.accepted, st.refused), (3, 3));
}

#[test]
fn blackhole_stalls_both_directions_until_heal() {
    let server = TcpListener::bind(any_port(LO1)).unwrap();
    let proxy = Proxy::start(any_port(LO2), server.local_addr().unwrap(), LO3).unwrap();
    let mut c = connect(proxy.addr());
    let mut s = accept_within(&server, Duration::from_secs(5)).expect("proxied connection");
    assert_eq!(s.peer_addr().unwrap().ip(), LO3);
    c.write_all(b"up").unwrap();
    assert_eq!(
        read_once(&mut s, Duration::from_secs(5)),
        ReadResult::Data(b"up".to_vec())
    );

    proxy.blackhole();
    c.write_all(b"held up").unwrap();
    s.write_all(b"held down").unwrap();
    let short = Duration::from_millis(400);
    assert_eq!(
        read_once(&mut s, short),
        ReadResult::Timeout,
        "upstream stalls"
    );
    assert_eq!(
        read_once(&mut c, short),
        ReadResult::Timeout,
        "downstream stalls"
    );
    // A connection made meanwhile is held as well.
    let mut c2 = connect(proxy.addr());
    let mut s2 = accept_within(&server, Duration::from_secs(5)).expect("second connection");
    c2.write_all(b"new").unwrap();
    assert_eq!(read_once(&mut s2, short), ReadResult::Timeout);
    let st = proxy.stats();
    assert_eq!((st.to_target, st.to_client), (2, 0), "nothing forwarded");

    // More than the buffers hold: the sender is pushed back, not the
    // proxy's memory blown up.
    let big = random_bytes(1 << 20, 3);
    let sent = write_until_blocked(&mut c, &big);

    proxy.heal();
    let mut got = vec![0u8; 7];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"held up");
    let mut got = vec![0u8; 9];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"held down");
    let mut got = vec![0u8; 3];
    s2.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"new");
    // The backlog arrives intact and in order.
    let mut got = vec![0u8; big.len()];
    let mut left = sent;
    let mut pos = 0usize;
    while left > 0 {
        let n = left.min(big.len() - pos);
        s.read_exact(&mut got[..n]).unwrap();
        assert!(got[..n] == big[pos..pos + n], "backlog differs");
        pos = (pos + n) % big.len();
        left -= n;
    }
}

#[test]
fn delay_delays_each_direction() {
    let echo = Echo::start(LO1);
    let proxy = Proxy::start(any_port(LO1), echo.addr, LO2).unwrap();
    let mut c = connect(proxy.addr());
    let t = Instant::now();
    roundtrip(&mut c, b"x");
    let base = t.elapsed();

    let d = Duration::from_millis(200);
    proxy.set_delay(d);
    let t = Instant::now();
    roundtrip(&mut c, b"y");
    let rtt = t.elapsed();
    assert!(
        rtt >= 2 * d,
        "round trip {rtt:?} with a {d:?} delay each way"
    );
    assert!(rtt < 2 * d + Duration::from_secs(2), "round trip {rtt:?}");

    // A latency, not a stop-and-wait: 2 MiB in 64 KiB reads one at a time
    // would take more than 12 s.
    let data = random_bytes(2 << 20, 9);
    let mut w = c.try_clone().unwrap();
    let t = Instant::now();
    let back = std::thread::scope(|sc| {
        let writer = sc.spawn(|| w.write_all(&data).expect("write"));
        let mut back = vec![0u8; data.len()];
        c.read_exact(&mut back).expect("read");
        writer.join().unwrap();
        back
    });
    assert!(back == data);
    let bulk = t.elapsed();
    assert!(bulk < Duration::from_secs(8), "2 MiB took {bulk:?}");

    proxy.set_delay(Duration::ZERO);
    let t = Instant::now();
    roundtrip(&mut c, b"z");
    let after = t.elapsed();
    assert!(
        after < d,
        "round trip {after:?} after removing the delay (base {base:?})"
    );
}

#[test]
fn drop_closes_everything_quickly() {
    let echo = Echo::start(LO2);
    let proxy = Proxy::start(any_port(LO1), echo.addr, LO3).unwrap();
    let addr = proxy.addr();
    let mut idle = connect(addr);
    roundtrip(&mut idle, b"idle");
    // A connection whose client does not read: every buffer on the way
    // back fills and the proxy's writer is stuck in write().
    let mut stuck = connect(addr);
    write_until_blocked(&mut stuck, &random_bytes(1 << 20, 5));
    // And one blackholed connection.
    proxy.blackhole();
    let mut held = connect(addr);
    held.write_all(b"held").unwrap();
    assert!(proxy.wait_open(3, Duration::from_secs(5)));
    wait_until(
        Duration::from_secs(5),
        "3 connections at the target",
        || echo.open() == 3,
    );

    let t = Instant::now();
    assert!(proxy.shutdown(), "every proxy thread finished");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(2), "stopping took {took:?}");
    for (s, what) in [(&mut idle, "idle"), (&mut held, "held")] {
        assert_dropped(s, what);
    }
    // The stuck client has unread data queued; then EOF or reset.
    stuck
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match stuck.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(t.elapsed() < Duration::from_secs(3)),
        }
    }
    wait_until(Duration::from_secs(3), "target sides closed", || {
        echo.open() == 0
    });
    // The listener is closed.
    assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
}

#[test]
fn an_unreachable_target_resets_the_client() {
    // A port nothing listens on, kept reserved: the local end of a live
    // connection (a SYN to it finds no listener and is refused).
    let echo = Echo::start(LO1);
    let holder = TcpStream::connect(echo.addr).unwrap();
    let target = holder.local_addr().unwrap();
    let proxy = Proxy::start(any_port(LO1), target, LO1).unwrap();
    // Not `connect()`: the reset may come so fast that even connecting
    // (or setting options) reports it.
    if let Ok(mut c) = TcpStream::connect_timeout(&proxy.addr(), Duration::from_secs(5)) {
        assert_dropped(&mut c, "connection to an unreachable target");
    }
    assert_eq!(proxy.stats().refused, 1);
    assert_eq!(proxy.stats().accepted, 0);
}

/// A hast.conf as written by the harness, read back: the global `on`
/// blocks' listen addresses and, per resource, the statements of its
/// `on <node>` block.
#[derive(Debug, Default)]
struct ParsedConf {
    globals: HashMap<String, String>,
    listen: HashMap<String, Vec<String>>,
    /// (resource, node) -> statement -> value.
    res_on: HashMap<(String, String), HashMap<String, String>>,
}

fn parse_conf(text: &str) -> ParsedConf {
    let mut toks = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap();
        for w in line.split_whitespace() {
            toks.push(w.to_string());
        }
    }
    let mut p = ParsedConf::default();
    let mut i = 0;
    // Context: [] global, [on N] global on, [resource R], [resource R, on N].
    let mut ctx: Vec<(String, String)> = Vec::new();
    while i < toks.len() {
        let t = toks[i].as_str();
        if t == "}" {
            ctx.pop().expect("balanced braces");
            i += 1;
        } else if (t == "on" || t == "resource") && toks.get(i + 2).map(String::as_str) == Some("{")
        {
            ctx.push((t.to_string(), toks[i + 1].clone()));
            i += 3;
        } else {
            let (k, v) = (t.to_string(), toks[i + 1].clone());
            match ctx.as_slice() {
                [] => {
                    p.globals.insert(k, v);
                }
                [(o, n)] if o == "on" => {
                    assert_eq!(k, "listen");
                    p.listen.entry(n.clone()).or_default().push(v);
                }
                [(r, rn)] if r == "resource" => {
                    p.res_on
                        .entry((rn.clone(), String::new()))
                        .or_default()
                        .insert(k, v);
                }
                [(_, rn), (_, n)] => {
                    p.res_on
                        .entry((rn.clone(), n.clone()))
                        .or_default()
                        .insert(k, v);
                }
                _ => panic!("unexpected nesting {ctx:?}"),
            }
            i += 2;
        }
    }
    assert!(ctx.is_empty(), "unbalanced braces");
    p
}

/// `tcp4://ip:port` -> SocketAddr.
fn addr_of(v: &str) -> SocketAddr {
    v.strip_prefix("tcp4://")
        .unwrap_or_else(|| panic!("no tcp4:// in {v}"))
        .parse()
        .unwrap_or_else(|e| panic!("{v}: {e}"))
}

fn hastd_check(conf: &std::path::Path, node: &str) -> std::process::Output {
    Command::new(bin_dir().join("hastd"))
        .arg("-t")
        .arg("--node")
        .arg(node)
        .arg("-c")
        .arg(conf)
        .output()
        .expect("run hastd -t")
}

#[test]
fn cluster_configs_are_accepted_by_hastd_and_point_at_each_other() {
    const MIB: u64 = 1 << 20;
    for with_proxy in [false, true] {
        let opts = ClusterOptions {
            replication: "fullsync".into(),
            timeout_secs: 7,
            with_proxy,
            exec: Some(PathBuf::from("/bin/true")),
            extra_resource: "checksum crc32".into(),
        };
        let c = Cluster::new(
            vec![
                ResourceDef::file("r1", 8 * MIB),
                ResourceDef::file("r2", 4 * MIB),
            ],
            opts,
        );
        assert_eq!(c.proxy_ab().is_some(), with_proxy);
        assert_eq!(c.proxy_ba().is_some(), with_proxy);
        for n in [&c.a, &c.b] {
            let out = hastd_check(&n.conf, &n.name);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "hastd -t --node {} rejected {}:\n{}\n{}\n{}",
                n.name,
                n.conf.display(),
                stdout,
                String::from_utf8_lossy(&out.stderr),
                n.render_conf()
            );
            assert!(
                stdout.contains(&format!(
                    "configuration OK for node {}: 2 resource(s): r1, r2",
                    n.name
                )),
                "{stdout}"
            );
        }
        // Each file is for its own node only.
        assert!(!hastd_check(&c.a.conf, "nodeB").status.success());

        let pa = parse_conf(&std::fs::read_to_string(&c.a.conf).unwrap());
        let pb = parse_conf(&std::fs::read_to_string(&c.b.conf).unwrap());
        for (p, n, ip, listen) in [(&pa, &c.a, IP_A, c.a_listen), (&pb, &c.b, IP_B, c.b_listen)] {
            assert_eq!(n.cfg.ip, Some(ip));
            assert_eq!(p.globals["replication"], "fullsync");
            assert_eq!(p.globals["timeout"], "7");
            assert_eq!(p.globals["exec"], "/bin/true");
            assert_eq!(p.listen[&n.name], vec![format!("tcp4://{listen}")]);
            assert_eq!(listen.ip(), ip);
            for r in ["r1", "r2"] {
                let on = &p.res_on[&(r.to_string(), n.name.clone())];
                assert_eq!(on["source"], format!("tcp4://{ip}"));
                assert_eq!(PathBuf::from(&on["local"]), n.provider(r));
                assert!(n.provider(r).starts_with(&n.dir));
                assert_eq!(
                    p.res_on[&(r.to_string(), String::new())]["checksum"],
                    "crc32"
                );
            }
        }
        assert_ne!(c.a.dir, c.b.dir);
        assert_ne!(c.a_listen.port(), 0);
        assert_ne!(c.b_listen.port(), 0);

        for r in ["r1", "r2"] {
            let remote_a = addr_of(&pa.res_on[&(r.to_string(), "nodeA".into())]["remote"]);
            let remote_b = addr_of(&pb.res_on[&(r.to_string(), "nodeB".into())]["remote"]);
            match (c.proxy_ab(), c.proxy_ba()) {
                (None, None) => {
                    assert_eq!(remote_a, c.b_listen);
                    assert_eq!(remote_b, c.a_listen);
                }
                (Some(ab), Some(ba)) => {
                    assert_eq!(remote_a, ab.addr());
                    assert_eq!(remote_b, ba.addr());
                    assert_eq!(ab.target(), c.b_listen);
                    assert_eq!(ba.target(), c.a_listen);
                    // Each node sees its peer at the IP its remote names.
                    assert_eq!(ab.source_ip(), IP_A);
                    assert_eq!(ba.source_ip(), IP_B);
                    assert_eq!(remote_b.ip(), IP_A);
                    assert_eq!(remote_a.ip(), IP_B);
                }
                _ => unreachable!(),
            }
        }

        if with_proxy {
            // Route for real: A's remote leads to B's listen address, and
            // B sees the connection coming from A's IP.
            let b_side = TcpListener::bind(c.b_listen).expect("B's port is free");
            let remote_a = addr_of(&pa.res_on[&("r1".to_string(), "nodeA".into())]["remote"]);
            let mut from_a = connect(remote_a);
            let mut at_b = accept_within(&b_side, Duration::from_secs(5)).expect("reached B");
            assert_eq!(at_b.peer_addr().unwrap().ip(), IP_A);
            from_a.write_all(b"hello B").unwrap();
            assert_eq!(
                read_once(&mut at_b, Duration::from_secs(5)),
                ReadResult::Data(b"hello B".to_vec())
            );
        }
    }
}

#[test]
fn wait_list_polls_until_the_predicate_holds() {
    let mut node = TestNode::standalone(vec![ResourceDef::file("r1", 8 << 20)]);
    node.create_all();
    node.start();
    let j = node.wait_list("r1", Duration::from_secs(10), |j| j["role"] == "init");
    assert_eq!(j["name"], "r1");
    node.hastctl(&["role", "primary", "r1"]);
    node.wait_list("r1", Duration::from_secs(10), |j| j["role"] == "primary");
    // A predicate that never holds: the panic shows the last answer.
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        node.wait_list("r1", Duration::from_millis(300), |_| false);
    }))
    .expect_err("wait_list must time out");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("last `hastctl list --json`"), "{msg}");
    assert!(msg.contains("\"primary\""), "{msg}");
    node.stop();
}
