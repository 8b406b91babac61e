//! Split-brain recovery beyond the original's full resync: the operator
//! picks the side whose changes are discarded, and only the extents either
//! side changed since the split are resynchronised.

use std::time::Duration;

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::*;

const MIB: u64 = 1 << 20;
const EXTENT: u64 = 2 * MIB;

fn in_sync(node: &TestNode) -> serde_json::Value {
    node.wait_in_sync("r1", Duration::from_secs(60))
}

/// Two nodes through proxies, A primary and B secondary, in sync.
fn proxied_pair() -> Cluster {
    let mut c = Cluster::new(
        vec![ResourceDef::file("r1", 96 * MIB)],
        ClusterOptions {
            with_proxy: true,
            ..Default::default()
        },
    );
    c.create_all();
    c.start();
    c.b.hastctl(&["role", "secondary", "r1"]);
    c.a.role("primary", "r1");
    c
}

fn split(c: &mut Cluster) {
    qemu_io(&c.a.uri("r1"), &["write -P 0x01 0 64M", "flush"]);
    in_sync(&c.a);
    c.proxy_ab().unwrap().partition();
    c.proxy_ba().unwrap().partition();
    c.a.wait_list("r1", Duration::from_secs(20), |j| j["status"] == "degraded");
}

#[test]
fn discarding_one_side_resyncs_only_the_touched_extents() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut c = proxied_pair();
    split(&mut c);
    // Both sides write while partitioned: A extents 0 and 10, B 1 and 20.
    c.b.role("primary", "r1");
    qemu_io(
        &c.a.uri("r1"),
        &["write -P 0xaa 0 1M", "write -P 0xab 20M 1M", "flush"],
    );
    qemu_io(
        &c.b.uri("r1"),
        &["write -P 0xbb 2M 1M", "write -P 0xbc 40M 1M", "flush"],
    );
    c.b.hastctl(&["role", "secondary", "r1"]);
    c.proxy_ab().unwrap().heal();
    c.proxy_ba().unwrap().heal();
    let a =
        c.a.wait_list("r1", Duration::from_secs(30), |j| j["split_brain"] == true);
    let synced_before = a["synced_bytes"].as_u64().unwrap();
    let touched = a["dirty"].as_u64().unwrap() + c.b.list("r1")["dirty"].as_u64().unwrap();
    assert_eq!(touched, 4 * EXTENT, "each side touched two extents");
    // Keep A's data: discard B's changes since the split.
    let out = c.b.hastctl_output(&["split-brain", "discard", "r1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        c.b.dump("r1")["flags"].as_u64().unwrap() & 2,
        2,
        "discard flag stored"
    );
    let a = in_sync(&c.a);
    let synced = a["synced_bytes"].as_u64().unwrap() - synced_before;
    assert!(
        synced > 0 && synced <= touched,
        "resynchronised {synced} bytes, touched {touched}"
    );
    assert_eq!(c.data_diff("r1"), None, "legs identical afterwards");
    // The kept side's data is intact; the discarded side's writes are gone.
    let data = c.b.read_provider_data("r1", 0, 3 * MIB as usize);
    assert!(data[..MIB as usize].iter().all(|&x| x == 0xaa));
    assert!(
        data[2 * MIB as usize..].iter().all(|&x| x == 0x01),
        "B's write discarded"
    );
    let far = c.b.read_provider_data("r1", 40 * MIB, MIB as usize);
    assert!(far.iter().all(|&x| x == 0x01), "B's second write discarded");
    assert!(!c.a.list("r1")["split_brain"].as_bool().unwrap());
    let d = c.b.dump("r1");
    assert_eq!(
        d["flags"].as_u64(),
        Some(0),
        "flags cleared after the resync"
    );
    assert_eq!(d["localcnt"], c.a.dump("r1")["localcnt"]);
    c.stop();
}

#[test]
fn discard_is_refused_on_the_primary() {
    let mut c = Cluster::new(
        vec![ResourceDef::file("r1", 32 * MIB)],
        ClusterOptions::default(),
    );
    c.create_all();
    c.start();
    c.a.role("primary", "r1");
    let out = c.a.hastctl_output(&["split-brain", "discard", "r1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("make it secondary first"));
    c.stop();
}

#[test]
fn a_node_promoted_without_writing_causes_no_split_brain() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut c = proxied_pair();
    split(&mut c);
    // B is promoted during the partition but nobody writes to it.
    c.b.role("primary", "r1");
    qemu_io(&c.b.uri("r1"), &["read -P 0x01 0 1M"]);
    qemu_io(&c.a.uri("r1"), &["write -P 0xaa 0 1M", "flush"]);
    c.b.hastctl(&["role", "secondary", "r1"]);
    c.proxy_ab().unwrap().heal();
    c.proxy_ba().unwrap().heal();
    let a = in_sync(&c.a);
    assert!(!a["split_brain"].as_bool().unwrap());
    assert_eq!(c.data_diff("r1"), None);
    c.stop();
}
