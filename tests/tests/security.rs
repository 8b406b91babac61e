//! Authenticated replication with real hastd processes (issue 12): the
//! right secret replicates and fails over; a wrong or missing secret, a
//! replayed handshake and a frame altered in flight are refused, logged on
//! both sides, and leave the secondary's data area byte for byte as it
//! was; and the three attacks of the issue (an impostor with counters, a
//! Hello that kicks off the live primary, a slow-connection flood from a
//! third address) do no harm.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hast_datapath::generation::Gen;
use hast_datapath::peer::proto::{Header, Hello, HelloReply, Kind, HEADER_LEN};
use hast_tests::cluster::{Cluster, ClusterOptions, IP_A};
use hast_tests::*;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const LIMIT: Duration = Duration::from_secs(60);
const SECRET: &str = "0123456789abcdef-the-right-one";
const IP_C: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

fn cluster(proxy: bool, secret_a: Option<&str>, secret_b: Option<&str>) -> Cluster {
    let mut c = Cluster::new(
        vec![ResourceDef::file("r1", SIZE)],
        ClusterOptions {
            with_proxy: proxy,
            ..Default::default()
        },
    );
    for (n, s) in [(&mut c.a, secret_a), (&mut c.b, secret_b)] {
        if let Some(s) = s {
            n.cfg.resource_extra.push_str(&format!("\tsecret {s}\n"));
        }
        n.write_conf();
    }
    c.create_all();
    c
}

/// Starts both, B secondary, A primary.
fn start_roles(c: &mut Cluster) {
    c.start();
    c.b.hastctl(&["role", "secondary", "r1"]);
    c.a.role("primary", "r1");
}

/// The transports B logged for the primaries it accepted.
fn transports(n: &TestNode) -> Vec<String> {
    strip_ansi(&n.log())
        .lines()
        .filter(|l| l.contains("handing over the connection"))
        .filter_map(|l| l.split("transport=").nth(1))
        .map(|t| {
            t.split_whitespace()
                .next()
                .unwrap_or("")
                .trim_matches('"')
                .to_owned()
        })
        .collect()
}

/// The log without its terminal colours.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = false;
    for ch in s.chars() {
        match (esc, ch) {
            (false, '\u{1b}') => esc = true,
            (false, c) => out.push(c),
            (true, 'm') => esc = false,
            (true, _) => {}
        }
    }
    out
}

fn auth_failures(n: &TestNode) -> u64 {
    n.list("r1")["auth_failures"].as_u64().unwrap_or(0)
}

/// The secondary's whole data area, read from its provider.
fn b_area(c: &Cluster) -> Vec<u8> {
    let size = c.b.dump("r1")["datasize"].as_u64().expect("datasize");
    c.b.read_provider_data("r1", 0, size as usize)
}

#[test]
fn right_secret_replicates_and_fails_over() {
    let mut c = cluster(false, Some(SECRET), Some(SECRET));
    start_roles(&mut c);
    c.a.wait_in_sync("r1", LIMIT);
    qemu_io(&c.a.uri("r1"), &["write -P 0x5a 1M 3M", "flush"]);
    c.a.wait_in_sync("r1", LIMIT);
    assert_eq!(c.data_diff("r1"), None, "legs differ under the secret");
    assert!(
        c.b.log().contains("authenticated"),
        "B's log names the transport"
    );
    assert_eq!(auth_failures(&c.a), 0);
    assert_eq!(auth_failures(&c.b), 0);
    // Fail over: B becomes primary, writes come back to A.
    c.a.hastctl(&["role", "secondary", "r1"]);
    c.b.role("primary", "r1");
    c.b.wait_in_sync("r1", LIMIT);
    qemu_io(&c.b.uri("r1"), &["write -P 0xc3 8M 2M", "flush"]);
    c.b.wait_in_sync("r1", LIMIT);
    assert_eq!(c.data_diff("r1"), None, "legs differ after failover");
    let back = c.a.read_provider_data("r1", 8 * MIB, 2 * MIB as usize);
    assert!(back.iter().all(|&b| b == 0xc3));
    c.stop();
}

/// A primary with `sa`, a secondary with `sb`: every attempt refused,
/// both sides log why, the secondary's data area unchanged.
fn refused(sa: Option<&str>, sb: Option<&str>, a_log: &str, b_log: &str) {
    let mut c = cluster(false, sa, sb);
    let before = b_area(&c);
    start_roles(&mut c);
    // The primary exposes its export once the first contact failed; its
    // writes must not reach B.
    qemu_io(&c.a.uri("r1"), &["write -P 0x77 0 4M", "flush"]);
    c.a.wait_until_log(a_log, LIMIT);
    c.b.wait_until_log(b_log, LIMIT);
    let l = c.a.list("r1");
    assert_eq!(l["connected"], false, "{l}");
    assert!(l["dirty"].as_u64().unwrap() > 0, "{l}");
    assert!(b_area(&c) == before, "the secondary's data area changed");
    assert_eq!(c.b.list("r1")["statistics"]["writes"], 0);
    c.stop();
}

#[test]
fn wrong_secret_is_refused_on_both_sides() {
    refused(
        Some(SECRET),
        Some("a-wrong-secret-of-the-same-kind"),
        "authentication with the secondary failed",
        "authentication of the primary failed",
    );
}

#[test]
fn secret_on_the_primary_only_is_refused() {
    refused(
        Some(SECRET),
        None,
        "neither TLS nor a secret",
        "neither TLS nor a secret",
    );
}

#[test]
fn secret_on_the_secondary_only_is_refused() {
    refused(
        None,
        Some(SECRET),
        "neither TLS nor a secret",
        "neither TLS nor a secret",
    );
}

/// Connects from `ip` (any port) to `to`.
fn connect_from(ip: IpAddr, to: SocketAddr) -> TcpStream {
    let s = hast_tests::proxy::connect_from(ip, to)
        .unwrap_or_else(|e| panic!("connect from {ip} to {to}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn send_frame(s: &mut TcpStream, h: Header, payload: &[u8]) -> std::io::Result<()> {
    s.write_all(&h.with_payload(payload).encode())?;
    s.write_all(payload)
}

/// Reads one frame (at most 1 MiB of payload); None at EOF or error.
fn read_frame(s: &mut TcpStream) -> Option<(Header, Vec<u8>)> {
    let mut hb = [0u8; HEADER_LEN];
    s.read_exact(&mut hb).ok()?;
    let h = Header::decode(&hb).ok()?;
    let mut p = vec![0u8; (h.payload_len as usize).min(1 << 20)];
    s.read_exact(&mut p).ok()?;
    Some((h, p))
}

/// A Hello as an impostor would forge it: `version`, the counters it
/// learnt, the geometry.
fn forged_hello(version: u16, gen: Gen) -> Vec<u8> {
    Hello {
        version_min: version,
        version_max: version,
        resource: "r1".into(),
        node: "nodeA".into(),
        datasize: SIZE - MIB,
        extentsize: 2 << 20,
        gen,
        flags: 0,
    }
    .encode()
}

/// The impostor's whole attempt: Hello, then a Write, a Flush and Bye
/// without waiting. Returns the refusal it got, if any.
fn impostor(to: SocketAddr, version: u16, gen: Gen) -> Option<HelloReply> {
    let mut s = connect_from(IP_A, to);
    let hello = forged_hello(version, gen);
    let _ = send_frame(&mut s, Header::request(Kind::Hello, 0, 0, 0, 0), &hello);
    let data = vec![0xeeu8; 64 * 1024];
    let _ = send_frame(
        &mut s,
        Header::request(Kind::Write, 0, 1, 0, data.len() as u32),
        &data,
    );
    let _ = send_frame(&mut s, Header::request(Kind::Flush, 0, 2, 0, 0), &[]);
    let _ = send_frame(&mut s, Header::request(Kind::Bye, 0, 3, 0, 0), &[]);
    let (h, p) = read_frame(&mut s)?;
    (h.kind == Kind::HelloReply).then(|| HelloReply::decode(&p).ok())?
}

fn assert_reveals_nothing(r: &HelloReply) {
    assert!(r.refusal.is_some(), "{r:?}");
    assert_eq!(r.gen, Gen::default(), "a refusal gave counters away: {r:?}");
    assert_eq!((r.datasize, r.extentsize, r.flags), (0, 0, 0), "{r:?}");
    assert!(r.bitmap.is_empty());
}

/// Attack 1: the real primary is stopped; an impostor on its address
/// sends Hellos with the secondary's real counters (protocol 2 and 3
/// style), then Write, Flush, Bye. Nothing lands; refusals reveal no
/// state; the real primary comes back complete with identical legs.
#[test]
fn impostor_with_the_counters_writes_nothing() {
    let mut c = cluster(false, Some(SECRET), Some(SECRET));
    start_roles(&mut c);
    qemu_io(&c.a.uri("r1"), &["write -P 0x11 0 2M", "flush"]);
    c.a.wait_in_sync("r1", LIMIT);
    c.a.hastctl(&["role", "init", "r1"]);
    let md = c.b.dump("r1");
    let gen = Gen {
        resuid: md["resuid"].as_u64().unwrap(),
        localcnt: md["localcnt"].as_u64().unwrap(),
        remotecnt: md["remotecnt"].as_u64().unwrap(),
    };
    let before = b_area(&c);
    let writes = c.b.list("r1")["statistics"]["writes"].clone();
    let mut answered = 0;
    for version in [1, 2, 3] {
        if let Some(r) = impostor(c.b_listen, version, gen) {
            assert_reveals_nothing(&r);
            answered += 1;
        }
    }
    assert!(answered > 0, "no refusal was sent to the impostor");
    assert!(b_area(&c) == before, "the impostor's data landed");
    assert_eq!(c.b.list("r1")["statistics"]["writes"], writes);
    c.a.role("primary", "r1");
    let l = c.a.wait_in_sync("r1", LIMIT);
    assert_eq!(l["dirty"], 0);
    assert_eq!(c.data_diff("r1"), None, "legs differ after the impostor");
    c.stop();
}

/// Attack 2: while the real primary is connected, Hellos from its address
/// every 200 ms (wrong geometry, right counters, the introduction) never
/// end the session; writes go on and the legs stay identical.
#[test]
fn hellos_from_the_peer_address_do_not_kick_off_the_primary() {
    for secret in [None, Some(SECRET)] {
        let mut c = cluster(false, secret, secret);
        start_roles(&mut c);
        c.a.wait_in_sync("r1", LIMIT);
        let connects = |n: &TestNode| n.log().matches("primary connected").count();
        let b_connects = connects(&c.b);
        let md = c.b.dump("r1");
        let gen = Gen {
            resuid: md["resuid"].as_u64().unwrap(),
            localcnt: md["localcnt"].as_u64().unwrap(),
            remotecnt: md["remotecnt"].as_u64().unwrap(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let to = c.b_listen;
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let t = {
            let (stop, refusals) = (stop.clone(), refusals.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let g = if i.is_multiple_of(2) {
                        gen
                    } else {
                        Gen::default()
                    };
                    if let Some(r) = impostor(to, 2 + (i % 2) as u16, g) {
                        refusals.lock().unwrap().push(r);
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        for k in 0..5u64 {
            let cmd = format!("write -P {} {}M 1M", 0x20 + k, k);
            qemu_io(&c.a.uri("r1"), &[cmd.as_str(), "flush"]);
            std::thread::sleep(Duration::from_millis(400));
        }
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
        let l = c.a.wait_in_sync("r1", LIMIT);
        assert_eq!(l["dirty"], 0, "{l}");
        assert_eq!(connects(&c.b), b_connects, "the session was replaced");
        assert!(
            !c.a.log().contains("connection lost"),
            "{}",
            c.a.log_tail(30)
        );
        let refusals = refusals.lock().unwrap();
        assert!(!refusals.is_empty(), "the forged Hellos were not answered");
        for r in refusals.iter() {
            assert_reveals_nothing(r);
        }
        assert_eq!(c.data_diff("r1"), None);
        c.stop();
    }
}

/// Attack 3: 40 slow connections from 127.0.0.3 (one byte a second) and
/// 12 from the peer's own address do not keep the real primary out.
#[test]
fn slow_connection_flood_does_not_lock_out_the_primary() {
    let mut c = cluster(false, Some(SECRET), Some(SECRET));
    c.start();
    c.b.hastctl(&["role", "secondary", "r1"]);
    let stop = Arc::new(AtomicBool::new(false));
    let mut socks: Vec<TcpStream> = Vec::new();
    for i in 0..52 {
        let ip = if i < 40 { IP_C } else { IP_A };
        socks.push(connect_from(ip, c.b_listen));
    }
    let dribble = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for s in &mut socks {
                    let _ = s.write(&[0]);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    let t0 = Instant::now();
    c.a.role("primary", "r1");
    c.a.wait_in_sync("r1", Duration::from_secs(30));
    let took = t0.elapsed();
    stop.store(true, Ordering::SeqCst);
    dribble.join().unwrap();
    assert!(took < Duration::from_secs(30), "the primary took {took:?}");
    assert!(
        c.b.log().contains("no resource's remote"),
        "{}",
        c.b.log_tail(30)
    );
    qemu_io(&c.a.uri("r1"), &["write -P 0x42 0 1M", "flush"]);
    c.a.wait_in_sync("r1", LIMIT);
    assert_eq!(c.data_diff("r1"), None);
    c.stop();
}

/// A bit flipped in a record of the primary's stream (through the proxy):
/// the secondary drops the connection, nothing of the altered write lands,
/// and once the primary may reconnect the legs become identical.
#[test]
fn frame_altered_in_flight_is_rejected() {
    altered_in_flight(
        cluster(true, Some(SECRET), Some(SECRET)),
        "failed authentication",
        true,
    );
}

/// A bit flipped in the next chunk of at least 32 KiB from A to B (a
/// 1 MiB write) while A may not reconnect: B logs `b_says` and drops the
/// connection, its data area is unchanged; once A may reconnect the legs
/// become identical. `counted`: B counts it as an authentication failure.
fn altered_in_flight(mut c: Cluster, b_says: &str, counted: bool) {
    start_roles(&mut c);
    c.a.wait_in_sync("r1", LIMIT);
    let before = b_area(&c);
    let p = c.proxy_ab().unwrap();
    p.refuse_new(true);
    p.corrupt_next(32 * 1024);
    qemu_io(&c.a.uri("r1"), &["write -P 0x99 4M 1M", "flush"]);
    wait_until(LIMIT, "the corruption", || p.corrupted() == 1);
    c.b.wait_until_log(b_says, LIMIT);
    wait_until(LIMIT, "the primary sees the loss", || {
        c.a.list("r1")["connected"] == false
    });
    assert!(b_area(&c) == before, "an altered frame reached the disk");
    if counted {
        assert!(auth_failures(&c.b) >= 1);
    }
    p.refuse_new(false);
    c.a.wait_in_sync("r1", LIMIT);
    assert_eq!(c.data_diff("r1"), None);
    c.stop();
}

/// A recorded handshake of the real primary, replayed from its address
/// after it stopped: refused (fresh nonce), nothing written.
#[test]
fn replayed_handshake_is_refused() {
    let mut c = cluster(false, Some(SECRET), Some(SECRET));
    // A recorder between A and B: A's remote is the recorder on B's IP;
    // it connects to B from A's IP and keeps what A sent.
    let rec = TcpListener::bind(SocketAddr::new(c.b_listen.ip(), 0)).unwrap();
    let rec_addr = rec.local_addr().unwrap();
    c.a.cfg.remote = Some(format!("tcp4://{rec_addr}"));
    c.a.write_conf();
    let sent = Arc::new(Mutex::new(Vec::new()));
    let to = c.b_listen;
    let recorder = {
        let sent = sent.clone();
        std::thread::spawn(move || {
            let (mut a, _) = rec.accept().unwrap();
            let mut b = connect_from(IP_A, to);
            let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let back = std::thread::spawn(move || {
                let _ = std::io::copy(&mut b2, &mut a2);
            });
            let mut buf = [0u8; 65536];
            while let Ok(n) = a.read(&mut buf) {
                if n == 0 || b.write_all(&buf[..n]).is_err() {
                    break;
                }
                let mut s = sent.lock().unwrap();
                if s.len() < 4 << 20 {
                    s.extend_from_slice(&buf[..n]);
                }
            }
            let _ = b.shutdown(std::net::Shutdown::Both);
            let _ = back.join();
        })
    };
    start_roles(&mut c);
    qemu_io(&c.a.uri("r1"), &["write -P 0x31 0 1M", "flush"]);
    c.a.wait_in_sync("r1", LIMIT);
    c.a.stop();
    recorder.join().unwrap();
    let before = b_area(&c);
    let fails = auth_failures(&c.b);
    let recorded = sent.lock().unwrap().clone();
    assert!(
        recorded.len() > 1 << 20,
        "recorded {} bytes",
        recorded.len()
    );
    let mut s = connect_from(IP_A, c.b_listen);
    let _ = s.write_all(&recorded);
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    c.b.wait_until_log("authentication of the primary failed", LIMIT);
    assert!(auth_failures(&c.b) > fails);
    assert!(b_area(&c) == before, "the replay wrote to the disk");
    c.b.stop();
}

/// A cluster with `tls on` (and the secret): A's and B's certificates from
/// `ca_a` / `ca_b`, both trusting `trust`.
fn tls_cluster(proxy: bool, rogue_b: bool) -> Cluster {
    let mut c = cluster(proxy, Some(SECRET), Some(SECRET));
    let dir = c.a.dir.join("pki");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = hast_tests::certs::TestCa::new(&dir, "cluster-ca");
    let rogue = hast_tests::certs::TestCa::new(&dir, "rogue-ca");
    let ca_a = ca.node(&dir, "nodeA", IP_A);
    let ca_b = if rogue_b { &rogue } else { &ca }.node(&dir, "nodeB", c.b_listen.ip());
    for (n, cert) in [(&mut c.a, &ca_a), (&mut c.b, &ca_b)] {
        let s = hast_tests::certs::tls_statements(&ca.pem_path, cert);
        n.cfg.resource_extra.push_str(&s);
        n.write_conf();
    }
    c
}

#[test]
fn right_certificates_replicate_and_fail_over() {
    let mut c = tls_cluster(false, false);
    start_roles(&mut c);
    c.a.wait_in_sync("r1", LIMIT);
    qemu_io(&c.a.uri("r1"), &["write -P 0x6b 2M 3M", "flush"]);
    c.a.wait_in_sync("r1", LIMIT);
    assert_eq!(c.data_diff("r1"), None);
    let t = transports(&c.b);
    assert!(
        !t.is_empty() && t.iter().all(|t| t == "TLS"),
        "{t:?}\n{}",
        c.b.log_tail(40)
    );
    c.a.hastctl(&["role", "secondary", "r1"]);
    c.b.role("primary", "r1");
    c.b.wait_in_sync("r1", LIMIT);
    qemu_io(&c.b.uri("r1"), &["write -P 0x6c 9M 1M", "flush"]);
    c.b.wait_in_sync("r1", LIMIT);
    assert_eq!(c.data_diff("r1"), None);
    c.stop();
}

/// B's certificate is signed by a CA A does not trust: refused, both
/// logs say so, B's data area unchanged.
#[test]
fn untrusted_certificate_is_refused() {
    let mut c = tls_cluster(false, true);
    let before = b_area(&c);
    start_roles(&mut c);
    qemu_io(&c.a.uri("r1"), &["write -P 0x70 0 2M", "flush"]);
    c.a.wait_until_log("not signed by the CA", LIMIT);
    c.b.wait_until_log("refused this node's certificate", LIMIT);
    assert_eq!(c.a.list("r1")["connected"], false);
    assert!(auth_failures(&c.a) >= 1);
    assert!(b_area(&c) == before, "the secondary's data area changed");
    c.stop();
}

/// A bit flipped in a TLS record: the connection drops, nothing lands.
#[test]
fn tls_record_altered_in_flight_is_rejected() {
    altered_in_flight(tls_cluster(true, false), "primary connection lost", false);
}
