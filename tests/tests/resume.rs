//! An interrupted first (full) synchronisation of a re-created secondary
//! resumes where it stopped: the new secondary killed (SIGKILL or SIGTERM)
//! mid-copy and restarted, or the primary killed and restarted. Real hastd
//! processes; the copy is paced by the proxy so that the interruption
//! lands mid-copy whatever the load of the machine.

use std::time::Duration;

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::*;

const MIB: u64 = 1 << 20;
const EXTENT: u64 = 2 * MIB;
/// Extents the secondary keeps marked after a synchronisation write (the
/// providers are created with `-k KEEPDIRTY`).
const KEEPDIRTY: u64 = 4;
/// Synchronisation chunks in flight (node.rs SYNC_WINDOW) of 1 MiB.
const SYNC_WINDOW_BYTES: u64 = 16 * MIB;
const LIMIT: Duration = Duration::from_secs(120);
/// Latency the proxy adds to every chunk of the primary's connection: with
/// its 256 KiB buffer per direction the copy runs at about 10 MiB/s.
const PACE: Duration = Duration::from_millis(25);

/// A pair in sync with 80 MiB of data written through the primary (A),
/// then B re-created and made secondary again: A starts a full copy, paced
/// by the proxy. Returns once the copy has passed 12 MiB.
fn recreated_secondary_mid_sync() -> Cluster {
    if !require_tool("qemu-io") {
        panic!("qemu-io is required");
    }
    let mut c = Cluster::new(
        vec![ResourceDef::file("r1", 96 * MIB)],
        ClusterOptions {
            with_proxy: true,
            ..Default::default()
        },
    );
    let k = KEEPDIRTY.to_string();
    c.a.hastctl(&["create", "-k", &k, "r1"]);
    c.b.hastctl(&["create", "-k", &k, "r1"]);
    c.start();
    c.b.hastctl(&["role", "secondary", "r1"]);
    c.a.role("primary", "r1");
    c.a.wait_in_sync("r1", LIMIT);
    qemu_io(
        &c.a.uri("r1"),
        &["write -P 0x5a 0 40M", "write -P 0xc3 40M 40M", "flush"],
    );
    c.a.wait_in_sync("r1", LIMIT);
    let gen = c.a.dump("r1")["localcnt"].as_u64().unwrap();
    assert!(gen >= 1, "the pair agreed on a generation");

    // B's disk is replaced: a new secondary, fully synchronised.
    c.b.hastctl(&["role", "init", "r1"]);
    c.a.wait_list("r1", LIMIT, |j| j["status"] == "degraded");
    c.b.hastctl(&["create", "-k", &k, "r1"]);
    c.proxy_ab().expect("proxy").set_delay(PACE);
    c.b.hastctl(&["role", "secondary", "r1"]);
    let j = c.a.wait_list("r1", LIMIT, |j| {
        j["sync"]["done"].as_u64().unwrap_or(0) >= 12 * MIB
    });
    assert_eq!(j["sync"]["direction"], "to-secondary");
    assert!(
        j["sync"]["total"].as_u64().unwrap() >= 90 * MIB,
        "a full synchronisation: {j}"
    );
    c
}

/// What the primary had left to copy once the secondary was gone, and
/// what it had copied until then (`synced_bytes`).
fn left_after_loss(c: &Cluster) -> (u64, u64) {
    let j = c.a.wait_list("r1", LIMIT, |j| j["status"] == "degraded");
    let left = j["dirty"].as_u64().unwrap();
    let datasize = j["datasize"].as_u64().unwrap();
    assert!(
        left > 0 && left < datasize,
        "the copy was interrupted mid-way (left {left} of {datasize}): {j}"
    );
    (left, j["synced_bytes"].as_u64().unwrap())
}

/// The resumed synchronisation ends with identical legs; returns the bytes
/// it copied.
fn resumed(c: &mut Cluster, synced_before: u64) -> u64 {
    c.proxy_ab().expect("proxy").set_delay(Duration::ZERO);
    let j = c.a.wait_in_sync("r1", LIMIT);
    let log = c.a.log();
    assert!(
        log.contains("resuming it primary → secondary"),
        "the primary resumed the first synchronisation:\n{}",
        c.a.log_tail(40)
    );
    assert!(
        !log.contains("InconsistentCounters") && !c.b.log().contains("counters are inconsistent"),
        "no refusal:\n{}",
        c.a.log_tail(40)
    );
    assert_eq!(c.data_diff("r1"), None, "legs identical after the resume");
    let b = c.b.dump("r1");
    assert_eq!(
        b["localcnt"],
        j_gen(c),
        "both nodes recorded the generation"
    );
    assert_eq!(
        b["flags"].as_u64().unwrap_or(0) & 1,
        0,
        "INCONSISTENT cleared"
    );
    j["synced_bytes"].as_u64().unwrap() - synced_before
}

fn j_gen(c: &Cluster) -> serde_json::Value {
    c.a.dump("r1")["localcnt"].clone()
}

/// The secondary, killed or stopped mid-copy and restarted, resumes: at
/// most what was left is copied again, plus the extents the secondary
/// still marked (after a SIGKILL: its `keepdirty` extents and the chunks
/// in flight).
fn secondary_dies_mid_sync(signal_kill: bool) {
    let mut c = recreated_secondary_mid_sync();
    if signal_kill {
        c.b.kill9();
    } else {
        c.b.stop();
    }
    let (left, synced) = left_after_loss(&c);
    // The primary writes alone meanwhile: a new generation.
    qemu_io(&c.a.uri("r1"), &["write -P 0x77 84M 1M", "flush"]);
    c.b.start();
    c.b.hastctl(&["role", "secondary", "r1"]);
    let copied = resumed(&mut c, synced);
    println!("left {left} bytes after the loss, copied {copied} after the restart");
    let slack = if signal_kill {
        KEEPDIRTY * EXTENT + SYNC_WINDOW_BYTES
    } else {
        0
    };
    assert!(
        copied <= left + EXTENT + slack,
        "the resumed copy took {copied} bytes; {left} were left (+ {slack} the secondary may mark, + the extent written since)"
    );
    c.stop();
}

#[test]
fn killed_new_secondary_resumes_its_first_sync() {
    secondary_dies_mid_sync(true);
}

#[test]
fn stopped_new_secondary_resumes_its_first_sync() {
    secondary_dies_mid_sync(false);
}

/// The primary killed mid-copy: its on-disk map still marks what the new
/// secondary lacks, and the copy resumes from it (not from scratch: the
/// secondary is INCONSISTENT, and the decision is Resume).
#[test]
fn restarted_primary_resumes_the_first_sync_of_a_new_secondary() {
    let mut c = recreated_secondary_mid_sync();
    c.a.kill9();
    c.b.wait_list("r1", LIMIT, |j| j["connected"] == false);
    let marked = c.a.dump("r1")["ondisk_dirty_extents"].as_u64().unwrap();
    let extents = (c.a.dump("r1")["datasize"].as_u64().unwrap()).div_ceil(EXTENT);
    c.a.start();
    c.a.role("primary", "r1");
    let copied = resumed(&mut c, 0);
    println!("the primary's map marked {marked} of {extents} extents; copied {copied} bytes after the restart");
    assert!(
        copied <= (marked + KEEPDIRTY) * EXTENT + SYNC_WINDOW_BYTES,
        "copied {copied} bytes after the restart; the primary's map marked {marked} of {extents} extents"
    );
    c.stop();
}
