//! The export tells clients where the data is: block status
//! (`base:allocation`) from the provider's holes, seen by real clients
//! (nbdinfo --map, qemu-img map, nbdcopy and qemu-img convert skipping
//! holes), FAST_ZERO and CACHE through libnbd and qemu-io, and a primary
//! being synchronised from its peer reporting data where reads come from
//! the peer.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::*;

const MIB: u64 = 1 << 20;

fn primary(size: u64) -> TestNode {
    let mut node = TestNode::standalone(vec![ResourceDef::file("r1", size)]);
    node.create_all();
    node.start();
    node.role("primary", "r1");
    node
}

fn datasize(node: &TestNode) -> u64 {
    node.dump("r1")["datasize"].as_u64().expect("datasize")
}

/// A map as (offset, length, data?) with neighbours of the same kind
/// merged.
type Map = Vec<(u64, u64, bool)>;

fn push(map: &mut Map, offset: u64, len: u64, data: bool) {
    match map.last_mut() {
        Some(last) if last.2 == data && last.0 + last.1 == offset => last.1 += len,
        _ => map.push((offset, len, data)),
    }
}

/// The map of a `size`-byte export whose only data is `data` (sorted,
/// disjoint ranges).
fn expected(size: u64, data: &[(u64, u64)]) -> Map {
    let mut map = Map::new();
    let mut pos = 0;
    for &(off, len) in data {
        if off > pos {
            push(&mut map, pos, off - pos, false);
        }
        push(&mut map, off, len, true);
        pos = off + len;
    }
    if pos < size {
        push(&mut map, pos, size - pos, false);
    }
    map
}

/// `nbdinfo --map --json`: data is type 0, a hole must be hole+zero (3).
fn nbdinfo_map(uri: &str) -> Map {
    let out = run(Command::new("nbdinfo").arg("--map").arg("--json").arg(uri));
    let v: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
    let mut map = Map::new();
    for e in v.as_array().expect("array") {
        let kind = e["type"].as_u64().expect("type");
        assert!(kind == 0 || kind == 3, "unexpected type in {out}");
        let (off, len) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        push(&mut map, off, len, kind == 0);
    }
    map
}

/// `qemu-img map --output=json` over NBD: data, or a hole reading as zeros.
fn qemu_img_map(uri: &str) -> Map {
    let out = run(Command::new("qemu-img")
        .args(["map", "-f", "raw", "--output=json"])
        .arg(uri));
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img json");
    let mut map = Map::new();
    for e in v.as_array().expect("array") {
        let data = e["data"].as_bool().expect("data");
        if !data {
            assert_eq!(e["zero"], true, "a hole reads as zeros: {out}");
        }
        let (off, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        push(&mut map, off, len, data);
    }
    map
}

/// Whether any byte of `[off, off + len)` of the data area is allocated in
/// the provider file (SEEK_DATA), bypassing hastd.
fn provider_has_data(node: &TestNode, off: u64, len: u64) -> bool {
    let localoff = node.dump("r1")["localoff"].as_u64().expect("localoff");
    let f = File::open(node.provider("r1")).expect("open provider");
    let start = (localoff + off) as libc::off_t;
    // SAFETY: lseek on a descriptor we own; no memory is involved.
    let at = unsafe { libc::lseek(f.as_raw_fd(), start, libc::SEEK_DATA) };
    at >= 0 && (at as u64) < localoff + off + len
}

/// Bytes allocated to a file.
fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).expect("stat").blocks() * 512
}

fn reads(node: &TestNode) -> u64 {
    node.list("r1")["statistics"]["reads"]
        .as_u64()
        .expect("reads")
}

#[test]
fn block_status_shows_the_written_ranges_and_copies_skip_holes() {
    if !require_tool("nbdinfo") || !require_tool("qemu-img") || !require_tool("nbdcopy") {
        return;
    }
    let node = primary(64 * MIB);
    let uri = node.uri("r1");
    let size = datasize(&node);
    // A fresh sparse provider: nothing but holes.
    assert_eq!(nbdinfo_map(&uri), expected(size, &[]));
    let last = size - 4096;
    let written = [(MIB, 64 << 10), (8 * MIB, MIB), (last, 4096)];
    qemu_io(
        &uri,
        &[
            "write -P 0x11 1M 64k",
            "write -P 0x22 8M 1M",
            &format!("write -P 0x33 {last} 4k"),
            "flush",
        ],
    );
    let want = expected(size, &written);
    assert_eq!(nbdinfo_map(&uri), want, "nbdinfo --map");
    assert_eq!(qemu_img_map(&uri), want, "qemu-img map");

    // Zeroing punches: the range becomes a hole again.
    qemu_io(&uri, &["write -z -u 8M 512k"]);
    let written = [
        (MIB, 64 << 10),
        (8 * MIB + 512 * 1024, 512 << 10),
        (last, 4096),
    ];
    assert_eq!(nbdinfo_map(&uri), expected(size, &written), "after zeroing");

    // nbdcopy reads only the data and leaves the holes sparse.
    let before = reads(&node);
    let copy = node.dir.join("copy.img");
    run(Command::new("nbdcopy").arg(&uri).arg(&copy));
    let copied = read_file(&copy);
    let direct = node.read_provider_data("r1", 0, size as usize);
    assert_eq!(copied.len() as u64, size);
    assert!(copied == direct, "the copy is the export's content");
    let data_bytes: u64 = written.iter().map(|w| w.1).sum();
    assert!(
        allocated(&copy) <= data_bytes + MIB,
        "the copy is sparse: {} bytes allocated for {data_bytes} bytes of data",
        allocated(&copy)
    );
    // 580 KiB of data in three ranges: a handful of reads (nbdcopy reads
    // at most 256 KiB at once), where 64 MiB would take 256.
    let nreads = reads(&node) - before;
    assert!(nreads <= 12, "nbdcopy read {nreads} times");

    // qemu-img convert too.
    let conv = node.dir.join("convert.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&conv));
    assert!(read_file(&conv) == direct, "qemu-img convert copy differs");
    assert!(
        allocated(&conv) <= data_bytes + MIB,
        "the convert copy is sparse"
    );
}

/// A Python using libnbd (`python3-libnbd`, which also provides nbdsh);
/// the system interpreter, since a PATH `python3` may be another one.
fn libnbd_python() -> Option<Command> {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(Command::new("/usr/bin/python3"));
    }
    if std::env::var("HAST_ALLOW_MISSING_TOOLS").as_deref() == Ok("1") {
        eprintln!("SKIP: python3-libnbd is not installed (HAST_ALLOW_MISSING_TOOLS=1)");
        return None;
    }
    panic!("python3-libnbd (libnbd's Python binding) is not installed: run scripts/install-test-deps.sh");
}

/// FAST_ZERO, CACHE, DF and block status through libnbd: what the client
/// sees, byte for byte.
const LIBNBD_SCRIPT: &str = r#"
import errno, sys
import nbd

M = 1 << 20
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
assert h.can_fast_zero() and h.can_cache() and h.can_df() and h.can_zero()
assert h.can_meta_context("base:allocation")

def status(count, offset, flags=0):
    out = []
    def cb(meta, off, entries, err):
        assert meta == "base:allocation"
        out.extend(entries)
        return 0
    h.block_status(count, offset, cb, flags)
    return [(out[i], out[i + 1]) for i in range(0, len(out), 2)]

# FAST_ZERO over whole sectors: accepted, zeroed, a hole again.
h.pwrite(b"\x55" * (2 * M), 4 * M)
assert status(2 * M, 4 * M) == [(2 * M, 0)], status(2 * M, 4 * M)
h.zero(M, 4 * M, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(2 * M, 4 * M) == bytes(M) + b"\x55" * M
assert status(2 * M, 4 * M) == [(M, 3), (M, 0)], status(2 * M, 4 * M)
# REQ_ONE: one extent, within the request.
assert status(4096, 4 * M, nbd.CMD_FLAG_REQ_ONE) == [(4096, 3)]

# FAST_ZERO inside one sector cannot punch: ENOTSUP at once, data kept.
# (libnbd refuses unaligned or out-of-range requests itself unless told
# not to.)
h.set_strict_mode(h.get_strict_mode() & ~(nbd.STRICT_ALIGN | nbd.STRICT_BOUNDS))
h.pwrite(b"\x66" * 4096, 8 * M)
try:
    h.zero(100, 8 * M + 8, nbd.CMD_FLAG_FAST_ZERO)
    sys.exit("a sub-sector FAST_ZERO was accepted")
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
assert h.pread(4096, 8 * M) == b"\x66" * 4096
# The same without FAST_ZERO zeroes it.
h.zero(100, 8 * M + 8)
assert h.pread(4096, 8 * M) == b"\x66" * 8 + bytes(100) + b"\x66" * (4096 - 108)

# CACHE: acknowledged; out of range refused.
h.cache(2 * M, 4 * M)
try:
    h.cache(4096, h.get_size())
    sys.exit("CACHE beyond the end was accepted")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
# DF read: one data chunk.
chunks = []
def chunk(buf, off, status, err):
    chunks.append((bytes(buf), off, status))
    return 0
buf = h.pread_structured(4096, 5 * M, chunk, nbd.CMD_FLAG_DF)
assert chunks == [(b"\x55" * 4096, 5 * M, nbd.READ_DATA)], chunks
assert bytes(buf) == b"\x55" * 4096
h.shutdown()
print("libnbd checks passed")
"#;

#[test]
fn fast_zero_and_cache_with_real_clients() {
    let Some(mut py) = libnbd_python() else {
        return;
    };
    if !require_tool("qemu-io") {
        return;
    }
    let node = primary(32 * MIB);
    let uri = node.uri("r1");
    let out = run(py.arg("-c").arg(LIBNBD_SCRIPT).arg(&uri));
    assert!(out.contains("libnbd checks passed"), "{out}");
    // The provider agrees: the zeroed MiB is a hole, the rest data.
    assert!(!provider_has_data(&node, 4 * MIB, MIB));
    assert!(provider_has_data(&node, 5 * MIB, MIB));
    // qemu-io's "write -z -n" (no slow fallback) is FAST_ZERO.
    qemu_io(
        &uri,
        &[
            "write -P 0x77 12M 1M",
            "write -z -n 12M 1M",
            "read -P 0 12M 1M",
        ],
    );
    assert!(!provider_has_data(&node, 12 * MIB, MIB));
    let list = node.list("r1");
    assert_eq!(list["local_errors"]["write"].as_u64(), Some(0));
}

/// A node synchronised from its secondary reports data for the extents it
/// has not copied yet (reads there come from the peer, whatever holes its
/// own provider has), and its own allocation elsewhere.
#[test]
fn a_primary_synchronised_from_its_peer_reports_data_where_reads_come_from_it() {
    if !require_tool("nbdinfo") || !require_tool("qemu-io") {
        return;
    }
    let mut c = Cluster::new(
        vec![ResourceDef::file("r1", 96 * MIB)],
        ClusterOptions {
            timeout_secs: 60,
            with_proxy: true,
            ..Default::default()
        },
    );
    c.create_all();
    c.start();
    c.b.hastctl(&["role", "secondary", "r1"]);
    c.a.role("primary", "r1");
    c.a.wait_in_sync("r1", Duration::from_secs(90));
    qemu_io(&c.a.uri("r1"), &["write -P 0x10 0 1M", "flush"]);
    c.a.wait_in_sync("r1", Duration::from_secs(90));
    // A dies; B takes over and writes 48 MiB (24 extents) where A's
    // provider has holes.
    c.a.kill9();
    c.b.role("primary", "r1");
    qemu_io(&c.b.uri("r1"), &["write -P 0x20 8M 48M", "flush"]);
    c.b.hastctl(&["role", "secondary", "r1"]);
    // A returns as primary and must copy B's extents. Every chunk between
    // them takes 2 s each way, and 16 chunks of 1 MiB are in flight at
    // most: the last extents arrive many seconds after the copy starts.
    c.proxy_ab()
        .expect("proxy")
        .set_delay(Duration::from_secs(2));
    c.a.start();
    c.a.role("primary", "r1");
    c.a.wait_list("r1", Duration::from_secs(120), |j| {
        j["sync"]["direction"] == "from-secondary"
    });
    // Freeze the copy where it is.
    let proxy = c.proxy_ab().expect("proxy");
    proxy.blackhole();
    let sync = c.a.list("r1")["sync"].clone();
    assert!(
        sync["done"].as_u64().unwrap() < sync["total"].as_u64().unwrap(),
        "the copy is still running: {sync}"
    );
    assert!(
        !provider_has_data(&c.a, 52 * MIB, 4 * MIB),
        "precondition: the last extents are not copied yet (the copy got there \
         within the proxy's delay)"
    );
    let size = c.a.dump("r1")["datasize"].as_u64().unwrap();
    let covers = |map: &Map, from: u64, to: u64, data: bool| {
        map.iter()
            .filter(|&&(o, l, _)| o < to && from < o + l)
            .all(|&(_, _, d)| d == data)
    };
    let map = nbdinfo_map(&c.a.uri("r1"));
    assert!(covers(&map, 0, MIB, true), "A's own data: {map:?}");
    assert!(
        covers(&map, 2 * MIB, 8 * MIB, false),
        "holes on both: {map:?}"
    );
    assert!(
        covers(&map, 8 * MIB, 56 * MIB, true),
        "not yet copied from B, yet data: {map:?}"
    );
    assert!(covers(&map, 56 * MIB, size, false), "holes: {map:?}");
    // Once the copy is done, the same map comes from A's own provider.
    let proxy = c.proxy_ab().expect("proxy");
    proxy.set_delay(Duration::ZERO);
    proxy.heal();
    c.a.wait_in_sync("r1", Duration::from_secs(120));
    assert!(provider_has_data(&c.a, 52 * MIB, 4 * MIB));
    let map = nbdinfo_map(&c.a.uri("r1"));
    assert!(covers(&map, 8 * MIB, 56 * MIB, true), "{map:?}");
    assert!(covers(&map, 2 * MIB, 8 * MIB, false), "{map:?}");
    assert!(covers(&map, 56 * MIB, size, false), "{map:?}");
    qemu_io(
        &c.a.uri("r1"),
        &[
            "read -P 0x10 0 1M",
            "read -P 0x20 8M 48M",
            "read -P 0 56M 1M",
        ],
    );
    assert_eq!(c.data_diff("r1"), None, "legs identical");
    c.stop();
}
