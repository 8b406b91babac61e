//! Two nodes on this host (127.0.0.1 / 127.0.0.2) replicating with real
//! clients: every replication mode, role switches, crashes of either node,
//! network partitions through a fault-injecting proxy, and split-brain.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::*;

const MIB: u64 = 1 << 20;
const EXTENT: u64 = 2 * MIB;
const SYNC_LIMIT: Duration = Duration::from_secs(90);

fn cluster(mode: &str, size: u64, proxy: bool, exec: Option<&Path>) -> Cluster {
    cluster_with(
        size,
        ClusterOptions {
            replication: mode.into(),
            timeout_secs: 5,
            with_proxy: proxy,
            exec: exec.map(Path::to_path_buf),
            ..Default::default()
        },
    )
}

/// A pair with one resource r1 of `size`, B secondary, A primary, in sync.
fn cluster_with(size: u64, opts: ClusterOptions) -> Cluster {
    let mut c = Cluster::new(vec![ResourceDef::file("r1", size)], opts);
    c.create_all();
    c.start();
    c.b.hastctl(&["role", "secondary", "r1"]);
    c.a.role("primary", "r1");
    wait_in_sync(&c.a);
    c
}

/// Waits until the primary's r1 is in sync.
fn wait_in_sync(node: &TestNode) -> serde_json::Value {
    node.wait_in_sync("r1", SYNC_LIMIT)
}

fn nbdcopy_in(uri: &str, file: &Path) {
    run(Command::new("nbdcopy").arg("--flush").arg(file).arg(uri));
}

fn nbdcopy_out(uri: &str, file: &Path) -> Vec<u8> {
    run(Command::new("nbdcopy").arg(uri).arg(file));
    read_file(file)
}

/// 64 MiB of random data through the primary, both data areas identical,
/// then a role switch and the same data read back from the other node.
fn replicate_and_switch(mode: &str) {
    if !require_tool("nbdcopy") {
        return;
    }
    let mut c = cluster(mode, 96 * MIB, false, None);
    let data = random_bytes(64 * MIB as usize, 0xa5a5 ^ mode.len() as u64);
    let src = c.a.dir.join("src.bin");
    std::fs::write(&src, &data).unwrap();
    nbdcopy_in(&c.a.uri("r1"), &src);
    let a = wait_in_sync(&c.a);
    assert_eq!(a["replication"], mode);
    assert_eq!(
        c.data_diff("r1"),
        None,
        "data areas differ after replication ({mode})"
    );
    let b = c.b.list("r1");
    assert_eq!(b["status"], "complete");
    assert!(
        b["statistics"]["writes"].as_u64().unwrap() > 0,
        "secondary applied writes"
    );
    // The primary keeps the extents marked until the secondary's flush; the
    // secondary writes no activemap for replicated data.
    assert_eq!(
        b["statistics"]["activemap_updates"], 0,
        "secondary activemap updates for replicated writes ({mode})"
    );

    // Role switch: demote A first (its export disappears), then promote B.
    c.a.hastctl(&["role", "secondary", "r1"]);
    assert!(
        !c.a.export_socket("r1").exists(),
        "old primary's export removed"
    );
    // A clean demotion settles every write (the secondary flushed them):
    // nothing is left to synchronise.
    assert_eq!(
        c.a.list("r1")["dirty"],
        0,
        "dirty after a clean demotion ({mode})"
    );
    c.b.role("primary", "r1");
    wait_in_sync(&c.b);
    let back = nbdcopy_out(&c.b.uri("r1"), &c.b.dir.join("back.bin"));
    assert!(
        back[..data.len()] == data[..],
        "data read from the new primary differs ({mode})"
    );
    // And writes on the new primary replicate back.
    qemu_io(&c.b.uri("r1"), &["write -P 0x3c 70M 1M", "flush"]);
    wait_in_sync(&c.b);
    assert_eq!(c.data_diff("r1"), None);
    c.stop();
}

#[test]
fn memsync_replicates_and_switches_roles() {
    replicate_and_switch("memsync");
}

#[test]
fn fullsync_replicates_and_switches_roles() {
    replicate_and_switch("fullsync");
}

#[test]
fn async_replicates_and_switches_roles() {
    replicate_and_switch("async");
}

/// A fio random-write stream on a 16 MiB window of the export.
fn fio_stream(uri: &str, seconds: u32, offset_mib: u64) -> Child {
    Command::new("fio")
        .arg("--name=stream")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg("--rw=randwrite")
        .arg("--bs=4k")
        .arg(format!("--offset={}", offset_mib * MIB))
        .arg("--size=16M")
        .arg("--iodepth=16")
        .arg("--time_based")
        .arg(format!("--runtime={seconds}"))
        .arg("--continue_on_error=all")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fio")
}

#[test]
fn secondary_crash_resyncs_only_dirty_extents() {
    if !require_tool("fio") {
        return;
    }
    let mut c = cluster("memsync", 128 * MIB, false, None);
    let mut fio = fio_stream(&c.a.uri("r1"), 4, 32);
    std::thread::sleep(Duration::from_millis(1500));
    c.b.kill9();
    let st = wait_child(&mut fio, Duration::from_secs(60));
    assert!(
        st.success(),
        "the primary kept serving while the secondary was dead"
    );
    let a =
        c.a.wait_list("r1", Duration::from_secs(20), |j| j["status"] == "degraded");
    let dirty = a["dirty"].as_u64().unwrap();
    assert!(dirty > 0, "writes while the secondary was down are dirty");
    assert!(
        dirty <= 16 * MIB + EXTENT,
        "only the written window is dirty: {dirty}"
    );
    let b_marked = c.b.dump("r1")["ondisk_dirty_extents"].as_u64().unwrap();
    let synced_before = a["synced_bytes"].as_u64().unwrap();
    c.b.start();
    c.b.hastctl(&["role", "secondary", "r1"]);
    let a = wait_in_sync(&c.a);
    let synced = a["synced_bytes"].as_u64().unwrap() - synced_before;
    assert!(synced > 0, "something was resynchronised");
    let bound = dirty + b_marked * EXTENT;
    assert!(
        synced <= bound,
        "resynchronised {synced} bytes, more than the dirty extents ({dirty} + {b_marked} extents)"
    );
    let datasize = c.a.dump("r1")["datasize"].as_u64().unwrap();
    assert!(synced < datasize / 2, "incremental, not a full copy");
    assert_eq!(c.data_diff("r1"), None, "legs identical after the resync");
    c.stop();
}

#[test]
fn primary_crash_resyncs_extents_in_flight() {
    if !require_tool("fio") {
        return;
    }
    let mut c = cluster("memsync", 96 * MIB, false, None);
    let mut fio = fio_stream(&c.a.uri("r1"), 3, 8);
    std::thread::sleep(Duration::from_millis(1200));
    c.a.kill9();
    let _ = wait_child(&mut fio, Duration::from_secs(60));
    let marked = c.a.dump("r1")["ondisk_dirty_extents"].as_u64().unwrap();
    assert!(
        marked > 0,
        "extents in flight are marked on the primary's disk"
    );
    c.a.start();
    c.a.role("primary", "r1");
    let a = wait_in_sync(&c.a);
    assert!(
        a["synced_bytes"].as_u64().unwrap() > 0,
        "the marked extents were resynchronised"
    );
    assert_eq!(
        c.data_diff("r1"),
        None,
        "legs identical after the primary's crash"
    );
    c.stop();
}

#[test]
fn partition_degrades_then_heals_incrementally() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut c = cluster("memsync", 96 * MIB, true, None);
    qemu_io(&c.a.uri("r1"), &["write -P 0x11 0 4M", "flush"]);
    wait_in_sync(&c.a);
    c.proxy_ab().expect("proxy").partition();
    // The primary keeps serving writes; the resource degrades, dirty grows.
    qemu_io(
        &c.a.uri("r1"),
        &["write -P 0x22 20M 6M", "flush", "read -P 0x22 20M 6M"],
    );
    let a = c.a.wait_list("r1", Duration::from_secs(20), |j| {
        j["status"] == "degraded" && j["dirty"].as_u64().unwrap_or(0) >= 6 * MIB
    });
    let dirty = a["dirty"].as_u64().unwrap();
    let synced_before = a["synced_bytes"].as_u64().unwrap();
    assert_ne!(c.data_diff("r1"), None, "the secondary missed the writes");
    c.proxy_ab().unwrap().heal();
    let a = wait_in_sync(&c.a);
    let synced = a["synced_bytes"].as_u64().unwrap() - synced_before;
    assert!(synced <= dirty, "incremental resync: {synced} > {dirty}");
    assert_eq!(c.data_diff("r1"), None, "legs identical after healing");
    c.stop();
}

#[test]
fn silent_peer_is_detected_by_keepalive() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut c = cluster("memsync", 64 * MIB, true, None);
    c.proxy_ab().expect("proxy").blackhole();
    // Within the 5 s timeout plus a keepalive period the primary gives up
    // on the silent peer and serves degraded.
    c.a.wait_list("r1", Duration::from_secs(20), |j| j["status"] == "degraded");
    qemu_io(&c.a.uri("r1"), &["write -P 0x5e 0 1M", "read -P 0x5e 0 1M"]);
    c.proxy_ab().unwrap().heal();
    wait_in_sync(&c.a);
    assert_eq!(c.data_diff("r1"), None);
    c.stop();
}

fn hook_script(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let log = dir.join("hooks.log");
    let script = dir.join("hook.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$HAST_NODE $*\" >> {}\n", log.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, log)
}

#[test]
fn split_brain_is_detected_on_both_sides_and_nothing_is_overwritten() {
    if !require_tool("qemu-io") {
        return;
    }
    let hookdir = tempfile::tempdir_in(test_root()).unwrap();
    let (script, log) = hook_script(hookdir.path());
    let mut c = cluster("memsync", 64 * MIB, true, Some(&script));
    qemu_io(&c.a.uri("r1"), &["write -P 0x01 0 8M", "flush"]);
    wait_in_sync(&c.a);
    // Partition, then both nodes act as primary and write.
    c.proxy_ab().unwrap().partition();
    c.proxy_ba().unwrap().partition();
    c.a.wait_list("r1", Duration::from_secs(20), |j| j["status"] == "degraded");
    c.b.role("primary", "r1");
    qemu_io(&c.a.uri("r1"), &["write -P 0xaa 0 1M", "flush"]);
    qemu_io(&c.b.uri("r1"), &["write -P 0xbb 2M 1M", "flush"]);
    // B steps down to secondary (keeping its data), the network heals.
    c.b.hastctl(&["role", "secondary", "r1"]);
    c.proxy_ab().unwrap().heal();
    c.proxy_ba().unwrap().heal();
    let a =
        c.a.wait_list("r1", Duration::from_secs(30), |j| j["split_brain"] == true);
    assert_eq!(a["status"], "degraded", "no connection after a split-brain");
    c.b.wait_list("r1", Duration::from_secs(30), |j| j["split_brain"] == true);
    // Let the primary retry a few times: the hook must fire once per node.
    std::thread::sleep(Duration::from_secs(7));
    let hooks = std::fs::read_to_string(&log).unwrap_or_default();
    let count = |node: &str| {
        hooks
            .lines()
            .filter(|l| l.contains("split-brain r1") && l.starts_with(node))
            .count()
    };
    assert_eq!(
        count("nodeA"),
        1,
        "split-brain hook fired once on A:\n{hooks}"
    );
    assert_eq!(
        count("nodeB"),
        1,
        "split-brain hook fired once on B:\n{hooks}"
    );
    assert!(hooks.contains("connect r1"), "connect hook ran:\n{hooks}");
    assert!(hooks.contains("syncdone r1"), "syncdone hook ran:\n{hooks}");
    assert!(
        hooks.contains("role r1 init secondary"),
        "role hook ran:\n{hooks}"
    );
    assert!(
        hooks.contains("disconnect r1"),
        "disconnect hook ran:\n{hooks}"
    );
    // Nothing was overwritten: each side still has its own writes.
    let a_data = c.a.read_provider_data("r1", 0, 3 * MIB as usize);
    let b_data = c.b.read_provider_data("r1", 0, 3 * MIB as usize);
    assert!(a_data[..MIB as usize].iter().all(|&x| x == 0xaa));
    assert!(a_data[2 * MIB as usize..].iter().all(|&x| x == 0x01));
    assert!(b_data[..MIB as usize].iter().all(|&x| x == 0x01));
    assert!(b_data[2 * MIB as usize..].iter().all(|&x| x == 0xbb));
    let text = c.a.hastctl(&["list", "r1"]);
    assert!(text.contains("split-brain: yes"), "{text}");
    c.stop();
}

#[test]
fn out_of_date_primary_synchronises_from_the_secondary() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut c = cluster("memsync", 64 * MIB, false, None);
    qemu_io(&c.a.uri("r1"), &["write -P 0x10 0 8M", "flush"]);
    wait_in_sync(&c.a);
    // A dies; B takes over and writes (B is now ahead).
    c.a.kill9();
    c.b.role("primary", "r1");
    qemu_io(&c.b.uri("r1"), &["write -P 0x20 2M 4M", "flush"]);
    // B steps down; A comes back as primary without writing: A is out of
    // date and must pull B's writes, serving reads of not-yet-copied
    // extents from B meanwhile.
    c.b.hastctl(&["role", "secondary", "r1"]);
    c.a.start();
    c.a.role("primary", "r1");
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0x10 0 2M",
            "-c",
            "read -P 0x20 2M 4M",
        ])
        .args(["-c", "read -P 0x10 6M 2M", &c.a.uri("r1")])
        .output()
        .expect("run qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("Pattern verification"),
        "reads of an out-of-date primary:\n{text}\nA's log:\n{}\nB's log:\n{}",
        c.a.log_tail(40),
        c.b.log_tail(40)
    );
    let a = wait_in_sync(&c.a);
    assert!(
        a["synced_bytes"].as_u64().unwrap() > 0,
        "data came from the secondary"
    );
    assert_eq!(c.data_diff("r1"), None, "legs identical");
    let d = c.a.dump("r1");
    assert_eq!(
        d["localcnt"], d["remotecnt"],
        "counters agree after the sync"
    );
    assert_eq!(d["flags"].as_u64(), Some(0), "not inconsistent any more");
    c.stop();
}

/// An out-of-date primary that loses its secondary halfway through the
/// copy fails reads of the extents it has not received (EIO) instead of
/// serving its own older data, and serves the current data once a new
/// connection has finished the copy.
#[test]
fn out_of_date_primary_never_serves_its_older_copy() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut c = cluster_with(
        64 * MIB,
        ClusterOptions {
            timeout_secs: 60,
            with_proxy: true,
            ..Default::default()
        },
    );
    qemu_io(&c.a.uri("r1"), &["write -P 0x10 0 48M", "flush"]);
    wait_in_sync(&c.a);
    c.a.kill9();
    c.b.role("primary", "r1");
    qemu_io(&c.b.uri("r1"), &["write -P 0x20 0 48M", "flush"]);
    c.b.hastctl(&["role", "secondary", "r1"]);
    // Every chunk between the nodes takes 200 ms each way, and the proxy
    // holds 256 KiB per direction: the copy of 48 MiB B -> A runs at about
    // 1.25 MiB/s, so its last extents arrive half a minute after it starts
    // (and a read queued behind the 16 MiB of copy replies in flight takes
    // about 13 s).
    c.proxy_ab()
        .expect("proxy")
        .set_delay(Duration::from_millis(200));
    c.a.start();
    c.a.role("primary", "r1");
    let l = c.a.wait_list("r1", SYNC_LIMIT, |j| {
        j["sync"]["direction"] == "from-secondary"
    });
    assert_eq!(l["out_of_date"], true, "{l}");
    // While connected, a read of an extent not copied yet is served by
    // the secondary.
    qemu_io(&c.a.uri("r1"), &["read -P 0x20 46M 4k"]);
    // Cut the connection halfway.
    let proxy = c.proxy_ab().expect("proxy");
    // The read below fails whether or not A has noticed the reset yet (a
    // dead link serves nothing; a live one sends into the partition).
    proxy.partition();
    let d = c.a.dump("r1");
    assert_ne!(d["flags"].as_u64(), Some(0), "the copy did not finish: {d}");
    let (_, text) = qemu_io_result(&c.a.uri("r1"), &["read -v 46M 4k"]);
    assert!(
        text.contains("Input/output error"),
        "a read of an extent not copied from the secondary yet must fail, not return \
         this node's older data:\n{text}"
    );
    assert!(!text.contains("10 10 10 10"), "stale data served:\n{text}");
    // Nor does it take writes on its own: they would make its changes and
    // the secondary's (the data it has not copied yet) a split-brain.
    let (ok, text) = qemu_io_result(&c.a.uri("r1"), &["write -P 0x77 46M 4k"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("Input/output error"),
        "a write of an out-of-date primary without its secondary must fail:\n{text}"
    );
    let l = c.a.list("r1");
    assert_eq!(l["out_of_date"], true, "{l}");
    // A new connection finishes the copy; every byte is B's.
    proxy.set_delay(Duration::ZERO);
    proxy.heal();
    // Bounded by the peer timeout (60 s here) plus a retry pause.
    let l = c.a.wait_in_sync("r1", Duration::from_secs(180));
    assert_eq!(l["out_of_date"], false, "{l}");
    assert_eq!(l["split_brain"], false, "{l}");
    // The refused write left nothing behind: every byte is B's.
    qemu_io(&c.a.uri("r1"), &["read -P 0x20 0 48M"]);
    assert_eq!(c.data_diff("r1"), None, "legs identical");
    c.stop();
}

#[test]
fn role_switch_under_a_write_stream_is_clean() {
    if !require_tool("fio") {
        return;
    }
    let mut c = cluster("memsync", 96 * MIB, false, None);
    let mut fio = fio_stream(&c.a.uri("r1"), 4, 0);
    std::thread::sleep(Duration::from_millis(1500));
    // Demote A mid-stream: its export goes first (fio sees errors), its
    // in-flight requests complete or fail cleanly, hastd keeps running.
    c.a.hastctl(&["role", "secondary", "r1"]);
    assert!(!c.a.export_socket("r1").exists());
    // Writes acknowledged before the demotion were flushed on the secondary
    // first: none is left marked for synchronisation.
    assert_eq!(
        c.a.list("r1")["dirty"],
        0,
        "dirty after demotion mid-stream"
    );
    let _ = wait_child(&mut fio, Duration::from_secs(60));
    c.b.role("primary", "r1");
    wait_in_sync(&c.b);
    assert_eq!(c.data_diff("r1"), None, "legs identical after the switch");
    assert_eq!(c.a.list("r1")["role"], "secondary");
    assert_eq!(c.a.list("r1")["status"], "complete");
    c.stop();
}

#[test]
fn garbage_on_the_replication_port_is_refused_and_logged() {
    use std::io::{Read, Write};
    let mut c = cluster("memsync", 32 * MIB, false, None);
    // From the right address (the primary's IP) but not our protocol.
    let mut sock = socket_from(std::net::IpAddr::from([127, 0, 0, 1]), c.b_listen);
    sock.write_all(&[0x55; 48]).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let n = sock.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "connection closed without a reply");
    c.b.wait_until_log("bad handshake", Duration::from_secs(5));
    // The real primary is unaffected.
    qemu_io(&c.a.uri("r1"), &["write -P 0x66 0 1M", "flush"]);
    wait_in_sync(&c.a);
    assert_eq!(c.data_diff("r1"), None);
    c.stop();
}

fn socket_from(ip: std::net::IpAddr, to: std::net::SocketAddr) -> std::net::TcpStream {
    hast_tests::proxy::connect_from(ip, to)
        .unwrap_or_else(|e| panic!("cannot connect to {to} from {ip}: {e}"))
}

/// Writes that stay within keepdirty cost the secondary no flush while
/// they run; once they stop, one flush makes them durable there (and
/// releases the primary's holds), and an idle pair flushes no more.
#[test]
fn idle_primary_flushes_the_secondary_once() {
    let mut c = cluster("memsync", 96 * MIB, false, None);
    let flushes = |c: &Cluster| c.b.list("r1")["statistics"]["flushes"].as_u64().unwrap();
    let before = flushes(&c);
    // A raw NBD client: no flush on disconnect (qemu-io would send one).
    let mut client = hast_tests::nbd::Client::connect(&c.a.export_socket("r1"), "r1").unwrap();
    for i in 0..8u64 {
        let r = client.write(i * EXTENT, &vec![0x5a; 64 * 1024]).unwrap();
        assert_eq!(r.error, 0);
    }
    client.disconnect().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        flushes(&c),
        before,
        "no flush of the secondary while writes run"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while flushes(&c) == before {
        assert!(std::time::Instant::now() < deadline, "no flush once idle");
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = flushes(&c);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        flushes(&c),
        after,
        "an idle pair flushes once, not periodically"
    );
    c.stop();
}
