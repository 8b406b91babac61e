//! Exclusive use of a provider: a resource that leaves role init claims
//! its provider (flock; O_EXCL as well on block devices) until it returns
//! to role init. Another hastd cannot use it, `hastctl create` refuses it,
//! and `hastctl create` refuses a provider holding another resource's
//! metadata unless `-f`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::*;

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(60);

/// Can this process take the provider's flock now? (Released at once.)
fn lockable(p: &Path) -> bool {
    let f = File::open(p).expect("open provider");
    // SAFETY: flock on a descriptor we own; no memory involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    rc == 0
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The scenario from the issue: a second hastd (another node name,
/// `remote none`) is pointed at the provider a running secondary uses. It
/// cannot become primary, `hastctl create` of it is refused, the real
/// pair stays in sync with identical legs.
#[test]
fn a_second_hastd_cannot_take_a_provider_in_use() {
    let mut c = Cluster::new(
        vec![ResourceDef::file("r1", 32 * MIB)],
        ClusterOptions::default(),
    );
    c.create_all();
    c.start();
    c.b.hastctl(&["role", "secondary", "r1"]);
    c.a.role("primary", "r1");
    qemu_io(&c.a.uri("r1"), &["write -P 0x42 0 4M", "flush"]);
    c.a.wait_in_sync("r1", LIMIT);
    let shared = c.b.provider("r1");
    assert!(!lockable(&shared), "the secondary holds its provider");

    let mut intruder = TestNode::new(
        "nodeC",
        NodeConfig::default(),
        vec![ResourceDef {
            path: Some(shared.clone()),
            ..ResourceDef::file("r1", 32 * MIB)
        }],
    );
    intruder.start();
    let out = intruder.hastctl_output(&["role", "primary", "r1"]);
    assert!(!out.status.success(), "the intruder became primary");
    let err = stderr_of(&out);
    let b_pid = c.b.pid().expect("nodeB runs");
    assert!(
        err.contains("provider in use") && err.contains(&format!("hastd (pid {b_pid})")),
        "the refusal names the holder: {err}"
    );
    assert_eq!(intruder.list("r1")["role"], "init");
    let out = intruder.hastctl_output(&["create", "r1"]);
    assert!(!out.status.success(), "create of a provider in use");
    let err = stderr_of(&out);
    assert!(
        err.contains("provider in use") && err.contains(&format!("pid {b_pid}")),
        "{err}"
    );
    println!("intruder refused: {err}");
    intruder.stop();

    // Nothing was written: still in sync, legs identical, counters intact.
    qemu_io(&c.a.uri("r1"), &["write -P 0x43 4M 1M", "flush"]);
    c.a.wait_in_sync("r1", LIMIT);
    assert_eq!(c.data_diff("r1"), None);
    assert_eq!(c.a.dump("r1")["resuid"], c.b.dump("r1")["resuid"]);

    // The claim lasts across role changes and ends in role init.
    c.a.hastctl(&["role", "secondary", "r1"]);
    c.b.role("primary", "r1");
    assert!(!lockable(&shared), "held as primary");
    assert!(!lockable(&c.a.provider("r1")), "held as secondary");
    c.b.hastctl(&["role", "init", "r1"]);
    assert!(lockable(&shared), "released in role init");
    c.stop();
}

/// Two resources configured on one file: the second `create` is refused
/// (it would destroy the first's metadata) unless forced; in one hastd
/// the second resource cannot be activated while the first uses the file.
#[test]
fn create_refuses_another_resources_metadata() {
    let mut node = TestNode::standalone(vec![ResourceDef::file("r0", 16 * MIB)]);
    let file = node.provider("r0");
    node.resources.push(ResourceDef {
        path: Some(file.clone()),
        ..ResourceDef::file("r1", 16 * MIB)
    });
    node.write_conf();
    node.hastctl(&["create", "r0"]);
    let out = node.hastctl_output(&["create", "r1"]);
    assert!(!out.status.success(), "create r1 over r0's metadata");
    let err = stderr_of(&out);
    assert!(
        err.contains("holds the metadata of resource 'r0'") && err.contains("-f"),
        "{err}"
    );
    assert_eq!(node.dump("r0")["resource"], "r0", "r0's metadata intact");

    node.start();
    node.role("primary", "r0");
    qemu_io(&node.uri("r0"), &["write -P 0x11 0 1M", "flush"]);
    let out = node.hastctl_output(&["role", "primary", "r1"]);
    assert!(!out.status.success(), "r1 activated on r0's provider");
    let err = stderr_of(&out);
    assert!(err.contains("another resource of this node"), "{err}");
    let out = node.hastctl_output(&["create", "-f", "r1"]);
    assert!(
        !out.status.success(),
        "forced create while r0 uses the file"
    );
    assert!(stderr_of(&out).contains("provider in use"));
    qemu_io(&node.uri("r0"), &["read -P 0x11 0 1M"]);

    node.hastctl(&["role", "init", "r0"]);
    node.stop();
    node.hastctl(&["create", "--force", "r1"]);
    assert_eq!(node.dump("r1")["resource"], "r1", "forced create");
}
