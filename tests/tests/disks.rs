//! Failing disks with real processes: hastd on both nodes, qemu-io as the
//! client, providers that fail for real — a loop device over an nbdkit
//! disk with its error filter ([`FaultyDisk`]), a sparse provider on a
//! full filesystem ([`SmallFs`]), a provider file truncated under hastd.
//! The rows of docs/failover.md, "What each fault does".

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::faulty::{FaultyDisk, FaultyOptions, SmallFs};
use hast_tests::*;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(60);

/// A hook that appends `<node> <args>` to a log.
fn hook_script(dir: &Path) -> (PathBuf, PathBuf) {
    let log = dir.join("hooks.log");
    let script = dir.join("hook.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$HAST_NODE $* leg=${{HAST_LEG-unset}}\" >> {}\n",
            log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (script, log)
}

/// `hastctl events --json` of one node, written to a file until dropped.
struct EventLog {
    child: Child,
    out: PathBuf,
}

impl EventLog {
    fn start(node: &TestNode, dir: &Path) -> EventLog {
        let out = dir.join(format!("events-{}.json", node.name));
        let err = dir.join(format!("events-{}.err", node.name));
        let child = Command::new(bin_dir().join("hastctl"))
            .arg("-c")
            .arg(&node.conf)
            .arg("--node")
            .arg(&node.name)
            .args(["-d", "events", "--json", "r1"])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("hastctl events");
        wait_until(Duration::from_secs(10), "the event subscription", || {
            std::fs::read_to_string(&err).is_ok_and(|s| s.contains("subscribed"))
        });
        EventLog { child, out }
    }

    /// The `disk-failed` events so far, as their `leg`s.
    fn disk_failed(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|j| j["event"] == "disk-failed")
            .map(|j| j["leg"].as_str().unwrap_or("?").to_owned())
            .collect()
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two nodes with resource r1, A's and B's providers replaced by the
/// given devices or files, A primary, in sync.
fn pair(size: u64, a: Option<PathBuf>, b: Option<PathBuf>, exec: Option<PathBuf>) -> Cluster {
    let mut c = Cluster::new(
        vec![ResourceDef::file("r1", size)],
        ClusterOptions {
            exec,
            ..Default::default()
        },
    );
    for (node, p) in [(&mut c.a, a), (&mut c.b, b)] {
        if let Some(p) = p {
            node.resources[0].path = Some(p);
            node.write_conf();
        }
    }
    c.create_all();
    c.start();
    c.b.role("secondary", "r1");
    c.a.role("primary", "r1");
    c.a.wait_in_sync("r1", LONG);
    c
}

/// qemu-io `op`s (`write` or `read`) of six 8 MiB runs from 0, the run at
/// `i * 8M` with the pattern `base + i` (48 MiB: more than a 24 MiB
/// filesystem holds).
fn eight_mib_runs(op: &str, base: u32) -> Vec<String> {
    (0..6)
        .map(|i| format!("{op} -P {} {}M 8M", base + i, i * 8))
        .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn have(tools: &[&str]) -> bool {
    tools.iter().all(|t| require_tool(t))
}

fn is_mounted(mnt: &Path) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(&*mnt.to_string_lossy()))
}

#[test]
fn the_faulty_disk_fails_on_demand_and_cleans_up() {
    let Some(disk) = FaultyDisk::new(FaultyOptions {
        size: 16 * MIB,
        errno: "ENOSPC",
        ..Default::default()
    }) else {
        return;
    };
    let dev = disk.device();
    let dd = |args: &[&str]| {
        let out = Command::new("dd").args(args).output().expect("dd");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let of = format!("of={}", dev.display());
    let iff = format!("if={}", dev.display());
    let write = [
        "if=/dev/zero",
        of.as_str(),
        "bs=4096",
        "count=1",
        "oflag=direct",
    ];
    let read = [
        iff.as_str(),
        "of=/dev/null",
        "bs=4096",
        "count=1",
        "iflag=direct",
    ];
    assert!(dd(&write).0, "a write works");
    assert!(dd(&read).0, "a read works");
    disk.fail_writes(true);
    let (ok, err) = dd(&write);
    assert!(!ok && err.contains("No space left on device"), "{err}");
    assert!(dd(&read).0, "reads still work");
    disk.fail_writes(false);
    disk.fail_reads(true);
    assert!(!dd(&read).0, "reads fail");
    disk.fail_reads(false);
    assert!(dd(&read).0 && dd(&write).0, "both work again");
    let (pids, mnt) = (disk.pids(), disk.mountpoint());
    let name = dev.file_name().unwrap().to_string_lossy().into_owned();
    drop(disk);
    let backing = format!("/sys/block/{name}/loop/backing_file");
    assert!(!Path::new(&backing).exists(), "{name} detached");
    assert!(!is_mounted(&mnt), "{} unmounted", mnt.display());
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "{pid} ended");
    }
}

#[test]
fn a_read_error_on_the_primary_is_served_from_the_secondary() {
    if !have(&["qemu-io"]) {
        return;
    }
    let Some(disk) = FaultyDisk::new(FaultyOptions::default()) else {
        return;
    };
    let c = pair(64 * MIB, Some(disk.device()), None, None);
    let uri = c.a.uri("r1");
    qemu_io(
        &uri,
        &["write -P 0xab 0 4M", "write -P 0xcd 4M 1M", "flush"],
    );
    c.a.wait_in_sync("r1", LONG);
    disk.fail_reads(true);
    // Byte for byte what was written, from the secondary.
    qemu_io(&uri, &["read -P 0xab 0 1M", "read -P 0xcd 4M 64k"]);
    disk.fail_reads(false);
    qemu_io(&uri, &["read -P 0xab 1M 1M"]);
    let l = c.a.list("r1");
    assert_eq!(l["reads_from_peer"].as_u64(), Some(2), "{l}");
    assert_eq!(l["local_errors"]["read"].as_u64(), Some(2), "{l}");
    assert_eq!(l["disk"], "ok", "two errors do not detach the disk: {l}");
    assert_eq!(l["status"], "complete", "{l}");
    assert!(c
        .a
        .log()
        .contains("local read failed; trying the secondary"));
    let text = c.a.hastctl(&["list", "r1"]);
    assert!(text.contains("    reads served by the peer: 2"), "{text}");
    drop(c);
}

#[test]
fn repeated_errors_detach_the_primary_disk_once_and_the_secondary_serves() {
    if !have(&["qemu-io"]) {
        return;
    }
    let hooks = tempfile::tempdir_in(test_root()).unwrap();
    let (script, log) = hook_script(hooks.path());
    let Some(disk) = FaultyDisk::new(FaultyOptions::default()) else {
        return;
    };
    let c = pair(64 * MIB, Some(disk.device()), None, Some(script));
    let (ev_a, ev_b) = (
        EventLog::start(&c.a, hooks.path()),
        EventLog::start(&c.b, hooks.path()),
    );
    let uri = c.a.uri("r1");
    qemu_io(&uri, &["write -P 0x3c 0 2M", "flush"]);
    c.a.wait_in_sync("r1", LONG);
    disk.fail_reads(true);
    let reads: Vec<String> = (0..12)
        .map(|i| format!("read -P 0x3c {}k 64k", i * 64))
        .collect();
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    qemu_io(&uri, &reads);
    let l = c.a.wait_list("r1", LONG, |j| j["disk"] == "failed");
    assert_eq!(l["status"], "degraded", "{l}");
    let why = l["disk_error"].as_str().unwrap_or_default();
    assert!(why.contains("8 failed reads in a row"), "{why}");
    assert_eq!(l["local_errors"]["read"].as_u64(), Some(8), "{l}");
    // The secondary knows it holds the only copy.
    let lb = c.b.wait_list("r1", LONG, |j| j["peer_disk"] == "failed");
    assert_eq!(lb["disk"], "ok", "{lb}");
    let text = c.b.hastctl(&["list", "r1"]);
    assert!(
        text.contains("warning: the primary's disk failed: this node holds the only copy"),
        "{text}"
    );
    let text = c.a.hastctl(&["list", "r1"]);
    assert!(text.contains("  disk: failed ("), "{text}");
    assert!(text.contains("which holds the only copy"), "{text}");
    // Reads and writes go on, through the secondary; errors stop.
    disk.fail_reads(false);
    disk.fail_writes(true);
    qemu_io(
        &uri,
        &[
            "write -P 0x5a 8M 1M",
            "read -P 0x5a 8M 1M",
            "read -P 0x3c 0 1M",
            "flush",
        ],
    );
    let b = c.b.read_provider_data("r1", 8 * MIB, MIB as usize);
    assert!(
        b.iter().all(|&x| x == 0x5a),
        "the write is on the secondary"
    );
    let l = c.a.list("r1");
    assert_eq!(
        l["local_errors"]["write"].as_u64(),
        Some(0),
        "the disk is not used: {l}"
    );
    // Reported once on each node, whatever followed: wait for the
    // reports (events and hooks run asynchronously), then give duplicates
    // time to show.
    wait_until(LONG, "the disk-failed events and hooks", || {
        !ev_a.disk_failed().is_empty()
            && !ev_b.disk_failed().is_empty()
            && std::fs::read_to_string(&log).is_ok_and(|h| h.matches("disk-failed").count() >= 2)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(ev_a.disk_failed(), ["local"]);
    assert_eq!(ev_b.disk_failed(), ["remote"]);
    let hooks_ran = std::fs::read_to_string(&log).unwrap_or_default();
    // Each node runs its own hooks: in no particular order between them.
    let mut lines: Vec<&str> = hooks_ran
        .lines()
        .filter(|l| l.contains("disk-failed"))
        .collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        [
            "nodeA disk-failed r1 local leg=local",
            "nodeB disk-failed r1 remote leg=remote"
        ],
        "{hooks_ran}"
    );
    drop(ev_a);
    drop(ev_b);
    drop(c);
}

#[test]
fn a_write_error_on_the_primary_is_covered_by_the_secondary_or_reaches_the_client() {
    if !have(&["qemu-io"]) {
        return;
    }
    // With the secondary: acknowledged, and the disk that missed it is
    // detached at once.
    {
        let Some(disk) = FaultyDisk::new(FaultyOptions::default()) else {
            return;
        };
        let c = pair(64 * MIB, Some(disk.device()), None, None);
        let uri = c.a.uri("r1");
        qemu_io(&uri, &["write -P 0x11 0 1M", "flush"]);
        c.a.wait_in_sync("r1", LONG);
        disk.fail_writes(true);
        qemu_io(&uri, &["write -P 0x22 0 64k"]);
        let l = c.a.wait_list("r1", LONG, |j| j["disk"] == "failed");
        assert!(l["local_errors"]["write"].as_u64() >= Some(1), "{l}");
        disk.fail_writes(false);
        // Never the stale local copy.
        qemu_io(&uri, &["read -P 0x22 0 64k", "read -P 0x11 64k 960k"]);
        let b = c.b.read_provider_data("r1", 0, 65536);
        assert!(b.iter().all(|&x| x == 0x22));
        drop(c);
    }
    // Alone: the client gets the error; the extent is marked.
    let Some(disk) = FaultyDisk::new(FaultyOptions::default()) else {
        return;
    };
    let mut node = TestNode::standalone(vec![ResourceDef::file("r1", 64 * MIB)]);
    node.resources[0].path = Some(disk.device());
    node.write_conf();
    node.create_all();
    node.start();
    node.role("primary", "r1");
    let uri = node.uri("r1");
    qemu_io(&uri, &["write -P 0x33 0 1M", "flush"]);
    disk.fail_writes(true);
    let (ok, out) = qemu_io_result(&uri, &["write -P 0x44 4M 64k"]);
    assert!(!ok && out.contains("Input/output error"), "{out}");
    disk.fail_writes(false);
    let l = node.list("r1");
    assert_eq!(l["local_errors"]["write"].as_u64(), Some(1), "{l}");
    assert_eq!(l["disk"], "ok", "{l}");
    qemu_io(
        &uri,
        &[
            "read -P 0x33 0 1M",
            "write -P 0x55 4M 64k",
            "read -P 0x55 4M 64k",
        ],
    );
    drop(node);
}

#[test]
fn enospc_on_a_sparse_secondary_provider_is_reported_and_retried_slowly() {
    if !have(&["qemu-io"]) {
        return;
    }
    let Some(fs) = SmallFs::new(24 * MIB) else {
        return;
    };
    let b_path = fs.sparse_file("r1.img", 64 * MIB);
    let c = pair(64 * MIB, None, Some(b_path), None);
    let uri = c.a.uri("r1");
    // More than the secondary's filesystem holds: every write is
    // acknowledged (the primary has it).
    let mut cmds = eight_mib_runs("write", 0x40);
    cmds.push("flush".into());
    qemu_io(&uri, &strs(&cmds));
    let l = c.a.wait_list("r1", LONG, |j| j["peer_disk"] == "failed");
    assert_eq!(l["status"], "degraded", "{l}");
    let why = l["last_error"].as_str().unwrap_or_default();
    assert!(
        why.contains("No space left on device"),
        "the real cause: {why}"
    );
    let lb = c.b.list("r1");
    assert_eq!(lb["disk"], "failed", "{lb}");
    assert!(
        lb["disk_error"]
            .as_str()
            .unwrap_or_default()
            .contains("No space left on device (os error 28)"),
        "{lb}"
    );
    // The primary retries, ever more slowly (every 2 s without the
    // growing pause: 6 refusals in 12 s).
    let refusals = || c.b.log().matches("refused the primary").count();
    let before = refusals();
    std::thread::sleep(Duration::from_secs(12));
    let during = refusals() - before;
    assert!(during <= 4, "{during} connection attempts in 12 s");
    // No crash, nothing acknowledged lost, everything still marked.
    c.b.hastctl(&["status"]);
    qemu_io(&uri, &strs(&eight_mib_runs("read", 0x40)));
    let l = c.a.list("r1");
    assert!(l["dirty"].as_u64() >= Some(24 * MIB), "{l}");
    drop(c);
    drop(fs);
}

#[test]
fn a_repaired_secondary_disk_is_attached_again_by_role_init_and_catches_up() {
    if !have(&["qemu-io"]) {
        return;
    }
    let Some(disk) = FaultyDisk::new(FaultyOptions::default()) else {
        return;
    };
    let c = pair(64 * MIB, None, Some(disk.device()), None);
    let uri = c.a.uri("r1");
    disk.fail_writes(true);
    // Sixteen writes in flight at once: the primary drops the connection
    // at the first error, and the others reach the secondary meanwhile,
    // which detaches its disk after 8 failures in a row (more may need a
    // reconnection or two: each retry's synchronisation start fails too).
    let mut cmds: Vec<String> = (0..16)
        .map(|i| format!("aio_write -P 0x61 {}k 64k", i * 64))
        .collect();
    cmds.push("aio_flush".into());
    qemu_io(&uri, &strs(&cmds));
    let lb =
        c.b.wait_list("r1", Duration::from_secs(180), |j| j["disk"] == "failed");
    assert!(lb["disk_error"].as_str().is_some(), "{lb}");
    c.a.wait_list("r1", LONG, |j| j["peer_disk"] == "failed");
    // Written while the secondary's disk is detached: marked on the
    // primary.
    qemu_io(&uri, &["write -P 0x62 8M 1M", "flush"]);
    disk.fail_writes(false);
    // Repaired: `role init` lets go of the disk, `role secondary` opens it
    // again — in use, no failure reported any more.
    c.b.hastctl(&["role", "init", "r1"]);
    c.b.hastctl(&["role", "secondary", "r1"]);
    let lb = c.b.list("r1");
    assert_eq!(lb["disk"], "ok", "{lb}");
    assert!(lb["disk_error"].is_null(), "{lb}");
    // The primary reconnects within its retry pause (at most 30 s).
    let l = c.a.wait_in_sync("r1", Duration::from_secs(90));
    assert_eq!(l["peer_disk"], "ok", "{l}");
    assert_eq!(c.data_diff("r1"), None, "legs byte-identical");
    assert!(c
        .b
        .read_provider_data("r1", 8 * MIB, MIB as usize)
        .iter()
        .all(|&x| x == 0x62));
    drop(c);
    drop(disk);
}

#[test]
fn enospc_on_a_sparse_primary_provider_is_covered_by_the_secondary() {
    if !have(&["qemu-io"]) {
        return;
    }
    let Some(fs) = SmallFs::new(24 * MIB) else {
        return;
    };
    let a_path = fs.sparse_file("r1.img", 64 * MIB);
    let c = pair(64 * MIB, Some(a_path), None, None);
    let uri = c.a.uri("r1");
    let mut cmds = eight_mib_runs("write", 0x60);
    cmds.push("flush".into());
    qemu_io(&uri, &strs(&cmds));
    let l = c.a.wait_list("r1", LONG, |j| j["disk"] == "failed");
    let why = l["disk_error"].as_str().unwrap_or_default();
    assert!(why.contains("No space left on device"), "{why}");
    qemu_io(&uri, &strs(&eight_mib_runs("read", 0x60)));
    c.b.wait_list("r1", LONG, |j| j["peer_disk"] == "failed");
    drop(c);
    drop(fs);
    // Alone, the client is told ENOSPC for the writes that need new
    // blocks, and the disk stays in use for the others.
    let Some(fs) = SmallFs::new(24 * MIB) else {
        return;
    };
    let mut node = TestNode::standalone(vec![ResourceDef::file("r1", 64 * MIB)]);
    node.resources[0].path = Some(fs.sparse_file("r1.img", 64 * MIB));
    node.write_conf();
    node.create_all();
    node.start();
    node.role("primary", "r1");
    let uri = node.uri("r1");
    qemu_io(&uri, &["write -P 0x70 0 1M", "flush"]);
    let (ok, out) = qemu_io_result(&uri, &["write -P 0x71 8M 32M"]);
    assert!(!ok && out.contains("No space left on device"), "{out}");
    qemu_io(&uri, &["write -P 0x72 0 1M", "read -P 0x72 0 1M"]);
    let l = node.list("r1");
    assert_eq!(l["disk"], "ok", "{l}");
    assert!(l["local_errors"]["write"].as_u64() >= Some(1), "{l}");
    drop(node);
    drop(fs);
}

#[test]
fn a_provider_truncated_under_the_primary_is_detected_and_served_from_the_secondary() {
    if !have(&["qemu-io", "truncate"]) {
        return;
    }
    let hooks = tempfile::tempdir_in(test_root()).unwrap();
    let (script, log) = hook_script(hooks.path());
    let c = pair(64 * MIB, None, None, Some(script));
    let uri = c.a.uri("r1");
    qemu_io(&uri, &["write -P 0x77 16M 32M", "flush"]);
    c.a.wait_in_sync("r1", LONG);
    run(Command::new("truncate")
        .args(["-s", "32M"])
        .arg(c.a.provider("r1")));
    // Found without any I/O, by the size check (nothing reads or
    // writes the resource until it is reported).
    let l = c.a.wait_list("r1", LONG, |j| j["disk"] == "failed");
    assert_eq!(l["status"], "degraded", "{l}");
    let why = l["disk_error"].as_str().unwrap_or_default();
    assert!(
        why.contains("shrank from 67108864 to 33554432 bytes"),
        "{why}"
    );
    // Past the new end, and before it: the secondary's data, not an
    // error, not zeros.
    qemu_io(&uri, &["read -P 0x77 40M 4M", "read -P 0x77 16M 4M"]);
    qemu_io(
        &uri,
        &[
            "write -P 0x78 60M 1M",
            "read -P 0x78 60M 1M",
            "read -P 0x77 47M 1M",
        ],
    );
    let b = c.b.read_provider_data("r1", 60 * MIB, MIB as usize);
    assert!(b.iter().all(|&x| x == 0x78));
    wait_until(LONG, "the hook", || {
        std::fs::read_to_string(&log).is_ok_and(|h| h.contains("nodeA disk-failed r1 local"))
    });
    drop(c);
}
