//! A standalone primary (`remote none`) driven by real clients: qemu-io,
//! nbdcopy, fio, and a raw NBD client that knows what it sent.

use std::process::Command;
use std::time::Duration;

use hast_tests::nbd::{Client, CMD_WRITE};
use hast_tests::*;

const MIB: u64 = 1 << 20;

fn primary(size: u64) -> TestNode {
    let mut node = TestNode::standalone(vec![ResourceDef::file("r1", size)]);
    node.create_all();
    node.start();
    node.role("primary", "r1");
    node
}

#[test]
fn qemu_io_patterns_through_the_export() {
    if !require_tool("qemu-io") {
        return;
    }
    let node = primary(64 * MIB);
    let uri = node.uri("r1");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            // Unaligned write inside a sector: read-modify-write.
            "write -P 0x11 1 3",
            "read -P 0xab 0 1",
            "read -P 0x11 1 3",
            "read -P 0xab 4 508",
            // Spanning an extent boundary (2 MiB) unaligned.
            "write -P 0x22 2097000 1000",
            "read -P 0x22 2097000 1000",
            // Write zeroes and discard read back as zeros.
            "write -z 8192 65536",
            "read -P 0 8192 65536",
            "discard 4M 1M",
            "read -P 0 4M 1M",
            // FUA and flush.
            "write -f -P 0x33 6M 4k",
            "flush",
            "read -P 0x33 6M 4k",
            // Several requests in flight on one connection.
            "aio_write -P 0x44 10M 64k",
            "aio_write -P 0x45 11M 64k",
            "aio_write -P 0x46 12M 64k",
            "aio_flush",
            "read -P 0x44 10M 64k",
            "read -P 0x45 11M 64k",
            "read -P 0x46 12M 64k",
        ],
    );
    // The data landed in the provider's data area, not somewhere else.
    let direct = node.read_provider_data("r1", 6 * MIB, 4096);
    assert!(direct.iter().all(|&b| b == 0x33));
    let head = node.read_provider_data("r1", 0, 8);
    assert_eq!(head, [0xab, 0x11, 0x11, 0x11, 0xab, 0xab, 0xab, 0xab]);
    // Out of range: qemu-io refuses locally, so use the raw client.
    let mut c = Client::connect(&node.export_socket("r1"), "r1").expect("connect");
    let size = c.size;
    let r = c.write(size - 512, &[0u8; 1024]).expect("write past end");
    assert_eq!(r.error, 28, "ENOSPC for a write past the end (NBD spec)");
    let (r, _) = c.read(size - 512, 1024).expect("read past end");
    assert_eq!(r.error, 22, "EINVAL for a read past the end");
    let (r, data) = c.read(0, 4).expect("read after error");
    assert_eq!(r.error, 0, "connection still serves after an error");
    assert_eq!(data, [0xab, 0x11, 0x11, 0x11]);
    c.disconnect().expect("disc");
    let list = node.list("r1");
    assert_eq!(list["role"], "primary");
    assert_eq!(list["status"], "degraded");
    assert!(list["statistics"]["writes"].as_u64().unwrap() >= 8);
    assert!(list["statistics"]["flushes"].as_u64().unwrap() >= 1);
    assert!(list["statistics"]["deletes"].as_u64().unwrap() >= 1);
}

#[test]
fn nbdcopy_64mib_of_random_data_round_trips() {
    if !require_tool("nbdcopy") {
        return;
    }
    let node = primary(128 * MIB);
    let src = node.dir.join("src.bin");
    let back = node.dir.join("back.bin");
    let data = random_bytes(64 * MIB as usize, 0x5eed);
    std::fs::write(&src, &data).expect("write src");
    // nbdcopy uses several connections (multi-conn) and many requests in
    // flight per connection.
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(node.uri("r1")));
    run(Command::new("nbdcopy").arg(node.uri("r1")).arg(&back));
    let got = read_file(&back);
    let datasize = node.dump("r1")["datasize"].as_u64().unwrap();
    assert_eq!(got.len() as u64, datasize, "the whole export was copied");
    assert!(
        got[..data.len()] == data[..],
        "data read back through the export differs"
    );
    assert!(
        got[data.len()..].iter().all(|&b| b == 0),
        "the rest reads as zeros"
    );
    // And the provider holds exactly the same bytes.
    let direct = node.read_provider_data("r1", 0, data.len());
    assert!(
        direct == data,
        "provider data area differs from what was written"
    );
    // Every written extent needs sync (no peer): 64 MiB of 2 MiB extents.
    let list = node.list("r1");
    assert_eq!(list["dirty"].as_u64(), Some(64 * MIB));
}

#[test]
fn data_survives_a_restart() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut node = primary(32 * MIB);
    qemu_io(&node.uri("r1"), &["write -P 0x5a 1M 3M", "flush"]);
    node.stop();
    assert!(!node.export_socket("r1").exists(), "export removed at stop");
    let dump = node.dump("r1");
    assert_eq!(dump["prevrole"], "primary");
    assert_ne!(dump["resuid"].as_u64(), Some(0), "resuid set on first use");
    node.start();
    assert_eq!(node.list("r1")["role"], "init", "resources start in init");
    node.role("primary", "r1");
    qemu_io(&node.uri("r1"), &["read -P 0x5a 1M 3M", "read -P 0 0 1M"]);
    // The extents written before the restart are still dirty (no peer).
    assert_eq!(node.list("r1")["dirty"].as_u64(), Some(4 * MIB));
}

#[test]
fn kill9_during_a_write_stream_leaves_every_written_extent_marked() {
    let mut node = primary(64 * MIB);
    let mut c = Client::connect(&node.export_socket("r1"), "r1").expect("connect");
    let extent = 2 * MIB;
    // Pipeline writes over all 32 extents, 16 in flight, and kill hastd
    // while requests are outstanding.
    let payload = random_bytes(256 * 1024, 7);
    let mut sent = Vec::new();
    let mut acked = Vec::new();
    let mut handle = 0u64;
    for round in 0..4u64 {
        for e in 0..32u64 {
            let off = e * extent + round * 256 * 1024;
            c.send(CMD_WRITE, 0, handle, off, &payload, payload.len() as u32)
                .expect("send");
            sent.push((handle, off));
            handle += 1;
            if sent.len() - acked.len() >= 16 {
                let (r, _) = c.recv(|_| 0).expect("reply");
                assert_eq!(r.error, 0);
                acked.push(r.handle);
            }
        }
        if round == 2 {
            break;
        }
    }
    assert!(sent.len() > acked.len(), "requests are in flight");
    node.kill9();
    // Offline: every acknowledged write's extent is marked on disk (it
    // needs sync), and so is every extent a write was sent to and started.
    let bits = node.ondisk_bitmap("r1");
    for h in &acked {
        let off = sent[*h as usize].1;
        assert!(
            bits[(off / extent) as usize],
            "acked extent {} not marked",
            off / extent
        );
    }
    let dump = node.dump("r1");
    let marked = dump["ondisk_dirty_extents"].as_u64().unwrap();
    assert!(marked >= 32, "all 32 extents were written, {marked} marked");
    let text = node.hastctl(&["dump", "r1"]);
    assert!(text.contains("dirty: 32 extents"), "{text}");
    // Restart: the marked extents are loaded as dirty, acked data intact.
    node.start();
    node.role("primary", "r1");
    let datasize = node.dump("r1")["datasize"].as_u64();
    assert_eq!(
        node.list("r1")["dirty"].as_u64(),
        datasize,
        "all 32 extents dirty"
    );
    let mut c = Client::connect(&node.export_socket("r1"), "r1").expect("reconnect");
    for h in acked.iter().take(8) {
        let off = sent[*h as usize].1;
        let (r, data) = c.read(off, payload.len() as u32).expect("read");
        assert_eq!(r.error, 0);
        assert!(data == payload, "acked write at {off} lost");
    }
}

#[test]
fn fio_random_writes_verify() {
    if !require_tool("fio") {
        return;
    }
    let node = primary(96 * MIB);
    let out = run(Command::new("fio")
        .arg("--name=verify")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", node.uri("r1")))
        .arg("--rw=randwrite")
        .arg("--bs=4k")
        .arg("--size=32M")
        .arg("--iodepth=32")
        .arg("--verify=crc32c")
        .arg("--do_verify=1")
        .arg("--verify_fatal=1")
        .arg("--verify_state_save=0")
        .arg("--output-format=json"));
    let json_start = out.find('{').expect("fio json");
    let v: serde_json::Value = serde_json::from_str(&out[json_start..]).expect("fio json");
    let job = &v["jobs"][0];
    assert_eq!(
        job["error"].as_i64(),
        Some(0),
        "fio reported an error: {out}"
    );
    assert!(job["write"]["io_bytes"].as_u64().unwrap() >= 32 * MIB);
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() >= 32 * MIB,
        "verify read back"
    );
}

#[test]
fn role_changes_add_and_remove_the_export() {
    let node = primary(16 * MIB);
    let sock = node.export_socket("r1");
    assert!(sock.exists());
    node.hastctl(&["role", "init", "r1"]);
    assert!(!sock.exists(), "role init removes the export");
    assert_eq!(node.list("r1")["role"], "init");
    node.hastctl(&["role", "secondary", "r1"]);
    assert!(!sock.exists(), "a secondary has no export");
    let l = node.list("r1");
    assert_eq!(l["role"], "secondary");
    assert_eq!(node.dump("r1")["prevrole"], "secondary");
    node.role("primary", "r1");
    assert!(sock.exists());
    let status = node.hastctl(&["status"]);
    assert!(
        status.starts_with("Name\tStatus\t Role\t\tComponents\n"),
        "{status}"
    );
    assert!(status.contains("r1\tdegraded primary"), "{status}");
    // `all` works for role too.
    node.hastctl(&["role", "init", "all"]);
    assert!(!sock.exists());
}

#[test]
fn sigterm_with_a_client_connected_exits_cleanly() {
    let mut node = primary(16 * MIB);
    let mut c = Client::connect(&node.export_socket("r1"), "r1").expect("connect");
    assert_eq!(c.write(0, &[0x77; 4096]).expect("write").error, 0);
    assert_eq!(
        node.list("r1")["clients"].as_u64(),
        Some(1),
        "list counts the client"
    );
    let start = std::time::Instant::now();
    node.stop();
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "stop took {:?}",
        start.elapsed()
    );
    // The client sees the connection closed.
    let r = c.read(0, 4096);
    assert!(r.is_err() || r.unwrap().0.error != 0);
    let d = node.dump("r1");
    assert_eq!(d["prevrole"], "primary");
    assert_eq!(d["ondisk_dirty_extents"].as_u64(), Some(1));
}

#[test]
fn two_resources_are_independent() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut node = TestNode::standalone(vec![
        ResourceDef::file("a", 16 * MIB),
        ResourceDef::file("b", 24 * MIB),
    ]);
    node.create_all();
    node.start();
    node.hastctl(&["role", "primary", "all"]);
    wait_until(Duration::from_secs(10), "exports", || {
        node.export_socket("a").exists() && node.export_socket("b").exists()
    });
    qemu_io(&node.uri("a"), &["write -P 0xaa 0 1M"]);
    qemu_io(&node.uri("b"), &["write -P 0xbb 0 1M"]);
    qemu_io(&node.uri("a"), &["read -P 0xaa 0 1M"]);
    qemu_io(&node.uri("b"), &["read -P 0xbb 0 1M"]);
    node.hastctl(&["role", "init", "a"]);
    assert!(!node.export_socket("a").exists());
    qemu_io(&node.uri("b"), &["read -P 0xbb 0 1M"]);
    let b = node.list("b");
    assert!(b["datasize"].as_u64().unwrap() > 20 * MIB);
}
