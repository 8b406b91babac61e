//! Role changes as an operator sees them: a group role change is all or
//! none, and a node that knows its data is older than its peer's is not
//! promoted without --force.

use std::time::Duration;

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::*;

const MIB: u64 = 1 << 20;

#[test]
fn a_group_role_change_is_all_or_none() {
    let mut node = TestNode::standalone(vec![
        ResourceDef::file("a", 16 * MIB),
        ResourceDef::file("b", 16 * MIB),
    ]);
    node.create_all();
    // Break b: its provider now holds another resource's metadata.
    let pa = node.provider("a");
    std::fs::copy(&pa, node.provider("b")).unwrap();
    node.start();
    node.hastctl(&["role", "secondary", "a"]);
    let out = node.hastctl_output(&["role", "primary", "a", "b"]);
    assert!(!out.status.success(), "the group change fails");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to resource 'a'"), "{err}");
    assert!(
        err.contains("[a]") || err.contains("a:") || err.contains("not changed"),
        "{err}"
    );
    // a went back to its previous role and never exposed an export.
    assert_eq!(node.list("a")["role"], "secondary");
    assert_eq!(node.list("b")["role"], "init");
    assert!(
        !node.export_socket("a").exists(),
        "no export appeared for a"
    );
    assert!(!node.export_socket("b").exists());
    // A valid group change works and exposes both exports.
    node.hastctl(&["role", "init", "a"]);
    std::fs::copy(&pa, node.provider("b")).unwrap();
    node.resources[1].path = Some(node.provider("b"));
    // b holds a copy of a's metadata: re-creating it takes -f.
    node.hastctl(&["create", "-f", "b"]);
    node.hastctl(&["role", "primary", "a", "b"]);
    assert!(node.export_socket("a").exists() && node.export_socket("b").exists());
}

#[test]
fn an_inconsistent_node_is_not_promoted_without_force() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut c = Cluster::new(
        vec![ResourceDef::file("r1", 192 * MIB)],
        ClusterOptions {
            with_proxy: true,
            timeout_secs: 20,
            ..Default::default()
        },
    );
    c.create_all();
    c.start();
    // A writes 128 MiB while B is not there: B will need all of it.
    c.a.role("primary", "r1");
    qemu_io(&c.a.uri("r1"), &["write -P 0x77 0 128M", "flush"]);
    // Slow link: the synchronisation takes seconds.
    c.proxy_ab().unwrap().set_delay(Duration::from_millis(700));
    c.b.hastctl(&["role", "secondary", "r1"]);
    c.b.wait_until_log(
        "synchronisation from the primary starting",
        Duration::from_secs(30),
    );
    // The primary dies mid-synchronisation.
    c.a.kill9();
    let d = c.b.dump("r1");
    assert_eq!(
        d["flags"].as_u64().unwrap() & 1,
        1,
        "the secondary knows it is mid-synchronisation: {d}"
    );
    let out = c.b.hastctl_output(&["role", "primary", "r1"]);
    assert!(!out.status.success(), "promotion refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to promote") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(c.b.list("r1")["role"], "secondary", "role unchanged");
    // The operator insists: --force promotes it.
    c.b.hastctl(&["role", "--force", "primary", "r1"]);
    assert_eq!(c.b.list("r1")["role"], "primary");
    assert!(c.b.export_socket("r1").exists());
    c.stop();
}
