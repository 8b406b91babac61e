//! Operations (issue #14): configuration reload (SIGHUP and `hastctl
//! reload`) with the original's rules, the control socket under hostile or
//! stuck clients (#11), and what hastctl shows.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hast_tests::cluster::{Cluster, ClusterOptions, IP_A, IP_B};
use hast_tests::failover::{check_records, RecordWriter};
use hast_tests::proxy::free_port;
use hast_tests::*;

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(60);

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `hastctl reload --json` on `node`, asserting success.
fn reload(node: &TestNode) -> serde_json::Value {
    json(&node.hastctl(&["reload", "--json"]))
}

/// The outcome of resource `name` in a reload report.
fn outcome<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["resources"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no outcome for {name} in {report:#}"))
}

fn changed(o: &serde_json::Value) -> Vec<String> {
    o["changed"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A control request written by hand; returns the one reply line.
fn raw_request(sock: &Path, bytes: &[u8]) -> serde_json::Value {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(bytes).expect("send");
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("reply");
    json(&line)
}

fn standalone(names: &[&str]) -> TestNode {
    let mut node = TestNode::standalone(
        names
            .iter()
            .map(|n| ResourceDef::file(n, 16 * MIB))
            .collect(),
    );
    node.create_all();
    node.start();
    node
}

fn tcp4(a: SocketAddr) -> String {
    format!("tcp4://{a}")
}

fn accepts(a: SocketAddr) -> bool {
    TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok()
}

// ------------------------------------------------------- control socket

/// #11: idle clients no longer delay everyone else; anything unreadable
/// gets a JSON error; a client that sends nothing is answered and closed
/// after the request deadline.
#[test]
fn control_socket_serves_clients_concurrently_and_answers_garbage() {
    let node = standalone(&["r1"]);
    let sock = node.control_socket();
    let idle: Vec<UnixStream> = (0..5)
        .map(|_| UnixStream::connect(&sock).expect("connect"))
        .collect();
    let t = Instant::now();
    let out = node.hastctl(&["status", "r1"]);
    assert!(out.contains("r1"), "{out}");
    // One at a time, this took 5 x 10 s.
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "status took {:?} with 5 idle clients",
        t.elapsed()
    );
    let r = raw_request(&sock, b"hello\n");
    assert_eq!(r["error_kind"], "bad-request", "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("malformed request"),
        "{r}"
    );
    let r = raw_request(&sock, b"\xff\xfe{\n");
    assert!(r["error"].as_str().unwrap().contains("not UTF-8"), "{r}");
    let r = raw_request(&sock, b"{\"version\":1,\"cmd\":\"nosuch\"}\n");
    assert_eq!(r["error_kind"], "bad-request", "{r}");
    // The idle ones are told why, then closed.
    for mut c in idle {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut reader = BufReader::new(&mut c);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .expect("reply to an idle client");
        let r = json(&line);
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("no complete request line within 10 s"),
            "{r}"
        );
        line.clear();
        assert_eq!(
            reader.read_line(&mut line).unwrap(),
            0,
            "closed after the reply"
        );
    }
    assert!(node.hastctl(&["status"]).contains("r1"));
}

// --------------------------------------------------------------- reload

/// A file that does not parse changes nothing and says where; so does
/// SIGHUP with it. extentsize/keepdirty are not statements (they live in
/// the metadata) and stay as created.
#[test]
fn reload_of_a_bad_file_changes_nothing_and_says_where() {
    let node = standalone(&["r1", "r2"]);
    node.role("primary", "r1");
    let before = node.list("r1");
    let good = node.render_conf();
    std::fs::write(
        &node.conf,
        format!("{good}resource r3 {{\n  extentsize 1M\n  on nodeA {{ local /tmp/r3 remote none }}\n}}\n"),
    )
    .unwrap();
    let line = good.lines().count() + 2;
    let out = node.hastctl_output(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains(&format!(
            "hast.conf:{line}:3: unknown statement 'extentsize'"
        )) && err.contains("nothing changed"),
        "{err}"
    );
    signal(node.pid().unwrap(), libc::SIGHUP);
    node.wait_until_log("SIGHUP: reloading", LIMIT);
    let log_line = format!("hast.conf:{line}:3");
    wait_until(LIMIT, "the refused reload in the log", || {
        node.log().contains(&log_line)
    });
    // hastd still runs on the old configuration (hastctl needs a good file).
    node.write_conf();
    let after = node.list("r1");
    assert_eq!(after["role"], "primary");
    assert!(node.export_socket("r1").exists());
    for k in ["extentsize", "keepdirty", "datasize"] {
        assert_eq!(after[k], before[k], "{k}");
    }
    assert!(!node.hastctl_output(&["list", "r3"]).status.success());
    // A reload with nothing to do.
    let r = reload(&node);
    assert!(r["settings"].as_array().unwrap().is_empty(), "{r:#}");
    assert_eq!(outcome(&r, "r1")["action"], "unchanged");
    assert_eq!(outcome(&r, "r1")["role"], "primary");
}

/// Removed resources go to init and are dropped (a primary's export
/// disappears); new ones start in role init and work.
#[test]
fn reload_adds_and_removes_resources() {
    let mut node = standalone(&["r1", "r2"]);
    node.role("primary", "r1");
    node.hastctl(&["role", "secondary", "r2"]);
    let p3 = node.dir.join("r3.img");
    std::fs::File::create(&p3)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    node.resources.retain(|r| r.name == "r2");
    node.resources.push(ResourceDef {
        path: Some(p3),
        ..ResourceDef::file("r3", 16 * MIB)
    });
    node.write_conf();
    let text = node.hastctl(&["reload"]);
    for line in [
        "  r1: removed (was primary)",
        "  r3: added in role init",
        "  r2: unchanged",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(!node.export_socket("r1").exists(), "r1's export is gone");
    let out = node.hastctl_output(&["list", "r1"]);
    assert_eq!(out.status.code(), Some(65));
    assert_eq!(node.list("r2")["role"], "secondary");
    assert_eq!(node.list("r3")["role"], "init");
    node.hastctl(&["create", "r3"]);
    node.role("primary", "r3");
    qemu_io(
        &node.uri("r3"),
        &["write -P 0x5a 0 1M", "read -P 0x5a 0 1M"],
    );
    assert!(node.log().contains("removed from the configuration"));
}

/// A new `local` or device name restarts the resource in its role: the
/// primary's export disappears and comes back, serving the new provider.
#[test]
fn reload_restarts_a_primary_whose_provider_or_name_changed() {
    let mut node = standalone(&["r1"]);
    node.role("primary", "r1");
    qemu_io(&node.uri("r1"), &["write -P 0xab 0 1M", "flush"]);
    // A second provider, created through a configuration of its own (the
    // resource is active in this hastd).
    let other = node.dir.join("r1b.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let conf2 = node.dir.join("create.conf");
    std::fs::write(
        &conf2,
        format!(
            "control uds://{}/none.sock\nresource r1 {{ on nodeA {{ local {} remote none }} }}\n",
            node.dir.display(),
            other.display()
        ),
    )
    .unwrap();
    run(Command::new(bin_dir().join("hastctl"))
        .args(["-c"])
        .arg(&conf2)
        .args(["--node", "nodeA", "create", "r1"]));
    node.resources[0].path = Some(other.clone());
    node.write_conf();
    let r = reload(&node);
    let o = outcome(&r, "r1");
    assert_eq!(
        (o["action"].as_str(), o["role"].as_str()),
        (Some("restarted"), Some("primary")),
        "{r:#}"
    );
    assert_eq!(changed(o), ["local"]);
    wait_until(LIMIT, "export back", || node.export_socket("r1").exists());
    assert_eq!(node.list("r1")["localpath"], other.display().to_string());
    qemu_io(&node.uri("r1"), &["read -P 0 0 1M", "write -P 0xcd 0 1M"]);
    // A new device name: the export moves.
    node.resources[0].extra = "name disk7".into();
    node.write_conf();
    let r = reload(&node);
    assert_eq!(changed(outcome(&r, "r1")), ["name"]);
    let moved = node.dir.join("export").join("disk7.sock");
    wait_until(LIMIT, "export under the new name", || moved.exists());
    assert!(!node.export_socket("r1").exists(), "old export removed");
    qemu_io(
        &format!("nbd+unix:///disk7?socket={}", moved.display()),
        &["read -P 0xcd 0 1M"],
    );
}

fn pair(resources: &[&str], proxy: bool) -> Cluster {
    let mut c = Cluster::new(
        resources
            .iter()
            .map(|n| ResourceDef::file(n, 32 * MIB))
            .collect(),
        ClusterOptions {
            with_proxy: proxy,
            ..Default::default()
        },
    );
    c.create_all();
    c.start();
    c.b.hastctl(&["role", "secondary", resources[0]]);
    c.a.role("primary", resources[0]);
    c.a.wait_in_sync(resources[0], LIMIT);
    c
}

fn hook(dir: &Path) -> (PathBuf, PathBuf) {
    let script = dir.join("hook.sh");
    let out = dir.join("hook.out");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", out.display()),
    )
    .unwrap();
    run(Command::new("chmod").arg("755").arg(&script));
    (script, out)
}

/// Other settings restart a secondary, are stored for a resource in init,
/// and are applied to a running primary without touching its export.
#[test]
fn reload_restarts_a_secondary_and_applies_live_on_the_primary() {
    let mut c = pair(&["r1", "r2"], false);
    let sock = c.a.export_socket("r1");
    let inode = std::fs::metadata(&sock).unwrap().ino();
    let (script, hook_out) = hook(&c.a.dir);
    for n in [&mut c.a, &mut c.b] {
        n.cfg.timeout = Some(7);
        n.cfg.replication = Some("fullsync".into());
        n.cfg.resource_extra = "checksum crc32\n  compression none\n  metaflush off".into();
    }
    c.a.cfg.exec = Some(script);
    c.a.write_conf();
    c.b.write_conf();
    let fields = [
        "replication",
        "checksum",
        "compression",
        "timeout",
        "metaflush",
    ];
    let rb = reload(&c.b);
    let o = outcome(&rb, "r1");
    assert_eq!(
        (o["action"].as_str(), o["role"].as_str()),
        (Some("restarted"), Some("secondary")),
        "{rb:#}"
    );
    assert_eq!(changed(o), fields);
    assert_eq!(outcome(&rb, "r2")["action"], "stored");
    let ra = reload(&c.a);
    let o = outcome(&ra, "r1");
    assert_eq!(
        (o["action"].as_str(), o["role"].as_str()),
        (Some("live"), Some("primary")),
        "{ra:#}"
    );
    let mut with_exec = fields.to_vec();
    with_exec.insert(4, "exec");
    assert_eq!(changed(o), with_exec);
    assert_eq!(outcome(&ra, "r2")["action"], "stored");
    assert_eq!(
        std::fs::metadata(&sock).unwrap().ino(),
        inode,
        "export kept"
    );
    let a = c.a.wait_in_sync("r1", LIMIT);
    assert_eq!(a["replication"], "fullsync");
    qemu_io(&c.a.uri("r1"), &["write -P 0x77 1M 2M", "flush"]);
    c.a.wait_in_sync("r1", LIMIT);
    assert_eq!(c.data_diff("r1"), None);
    // The new exec runs for the next event.
    c.a.hastctl(&["role", "secondary", "r2"]);
    wait_until(LIMIT, "hook run", || {
        std::fs::read_to_string(&hook_out).is_ok_and(|s| s.contains("role r2 init secondary"))
    });
}

/// The peer's new address: the secondary rebinds its listen address, the
/// primary closes its connection and connects to the new one.
#[test]
fn reload_moves_listen_and_reconnects_to_a_new_remote() {
    let mut c = pair(&["r1"], false);
    let old = c.b_listen;
    let new = SocketAddr::new(IP_B, free_port(IP_B));
    c.b.cfg.listen = vec![tcp4(new)];
    c.b.write_conf();
    let rb = reload(&c.b);
    let s = &rb["settings"][0];
    assert_eq!(
        (s["setting"].as_str(), s["new"].as_str()),
        (Some("listen"), Some(tcp4(new).as_str())),
        "{rb:#}"
    );
    assert_eq!(outcome(&rb, "r1")["action"], "unchanged");
    assert!(!accepts(old), "old listen address closed");
    assert!(accepts(new), "new listen address open");
    let connects = |n: &TestNode| n.log().matches("connected to the secondary").count();
    let before = connects(&c.a);
    c.a.cfg.remote = Some(tcp4(new));
    c.a.write_conf();
    let ra = reload(&c.a);
    assert_eq!(changed(outcome(&ra, "r1")), ["remote"]);
    assert_eq!(outcome(&ra, "r1")["action"], "live");
    wait_until(LIMIT, "reconnection", || connects(&c.a) > before);
    c.a.wait_in_sync("r1", LIMIT);
    qemu_io(&c.a.uri("r1"), &["write -P 0x42 0 4M", "flush"]);
    c.a.wait_in_sync("r1", LIMIT);
    assert_eq!(c.data_diff("r1"), None);
    assert_eq!(c.a.list("r1")["remoteaddr"], tcp4(new));
}

/// control, listen and metrics change together or not at all.
#[test]
fn reload_rebinds_control_listen_and_metrics_together_or_not_at_all() {
    let l1 = SocketAddr::new(IP_A, free_port(IP_A));
    let cfg = NodeConfig {
        listen: vec![tcp4(l1)],
        remote: Some("tcp4://127.0.0.2:9".into()),
        ..Default::default()
    };
    let mut node = TestNode::new("nodeA", cfg, vec![ResourceDef::file("r1", 16 * MIB)]);
    node.create_all();
    node.start();
    assert!(accepts(l1));
    let old_conf = node.dir.join("old.conf");
    std::fs::copy(&node.conf, &old_conf).unwrap();
    let taken = TcpListener::bind((IP_A, 0)).unwrap();
    let busy = taken.local_addr().unwrap();
    let l2 = SocketAddr::new(IP_A, free_port(IP_A));
    let ctl2 = node.dir.join("ctl2.sock");
    let with = |control: &Path, listen: SocketAddr, metrics: Option<SocketAddr>| {
        let mut text = node.render_conf().replace(
            &format!("control uds://{}", node.control_socket().display()),
            &format!("control uds://{}", control.display()),
        );
        text = text.replace(&tcp4(l1), &tcp4(listen));
        if let Some(m) = metrics {
            text.push_str(&format!("metrics listen {}\n", tcp4(m)));
        }
        std::fs::write(&node.conf, text).unwrap();
    };
    let old_ctl = |args: &[&str]| {
        Command::new(bin_dir().join("hastctl"))
            .arg("-c")
            .arg(&old_conf)
            .args(["--node", "nodeA"])
            .args(args)
            .output()
            .unwrap()
    };
    let refused = |n: usize| {
        signal(node.pid().unwrap(), libc::SIGHUP);
        wait_until(LIMIT, "refused reload", || {
            node.log()
                .matches("reload refused, nothing changed")
                .count()
                >= n
        });
    };
    // The listen address is taken: neither the control socket nor the
    // listen address moves.
    with(&ctl2, busy, None);
    refused(1);
    assert!(!ctl2.exists(), "new control socket not left behind");
    assert!(
        old_ctl(&["status"]).status.success(),
        "old control socket still served"
    );
    assert!(accepts(l1), "old listen address still open");
    // Listen would move, but the metrics address is taken: listen goes
    // back to the old address.
    with(&ctl2, l2, Some(busy));
    refused(2);
    assert!(!ctl2.exists());
    assert!(accepts(l1) && !accepts(l2), "listen rolled back");
    assert!(old_ctl(&["status"]).status.success());
    // Everything free: all three move.
    drop(taken);
    with(&ctl2, l2, Some(busy));
    signal(node.pid().unwrap(), libc::SIGHUP);
    node.wait_until_log("configuration reloaded", LIMIT);
    wait_until(LIMIT, "new control socket", || ctl2.exists());
    assert!(
        node.hastctl(&["status"]).contains("r1"),
        "served on the new socket"
    );
    assert!(
        !node.control_socket().exists(),
        "old control socket removed"
    );
    assert!(accepts(l2) && !accepts(l1), "listen moved");
    let metrics = run(Command::new("curl").args(["-sf", &format!("http://{busy}/metrics")]));
    assert!(metrics.contains("hastd_up 1"), "{metrics}");
}

/// Reloads while a client writes: live changes on the primary (timeout,
/// replication, a new remote through the proxy and back) lose no
/// acknowledged write, and both legs end identical.
#[test]
fn reload_under_a_write_stream_loses_nothing() {
    let mut c = pair(&["r1"], true);
    let via_proxy = c.a.cfg.remote.clone();
    let direct = Some(tcp4(c.b_listen));
    let w = RecordWriter::start(&c.a.export_socket("r1"), "r1", 16, 64);
    let changes: [(Option<&str>, u32, &Option<String>); 4] = [
        (Some("fullsync"), 8, &direct),
        (Some("async"), 6, &via_proxy),
        (Some("memsync"), 9, &direct),
        (Some("memsync"), 5, &via_proxy),
    ];
    for (i, (mode, timeout, remote)) in changes.into_iter().enumerate() {
        let seen = w.acked();
        wait_until(LIMIT, "writes between reloads", || w.acked() > seen + 100);
        c.a.cfg.replication = mode.map(String::from);
        c.a.cfg.timeout = Some(timeout);
        c.a.cfg.remote = remote.clone();
        c.a.write_conf();
        let r = reload(&c.a);
        let o = outcome(&r, "r1");
        assert_eq!(o["action"], "live", "reload {i}: {r:#}");
        assert!(o["error"].is_null(), "reload {i}: {r:#}");
    }
    let seen = w.acked();
    wait_until(LIMIT, "writes after the reloads", || w.acked() > seen + 100);
    w.stop();
    let log = w.finish(LIMIT);
    assert_eq!(log.write_errors, 0, "{}", log.end);
    c.a.wait_in_sync("r1", LIMIT);
    let check = check_records(&c.a.export_socket("r1"), "r1", &log);
    assert!(
        check.lost_acked.is_empty() && check.lost_flushed.is_empty() && check.torn_slots.is_empty(),
        "{} acked: lost {:?} / flushed lost {:?} / torn {:?}",
        log.acked,
        check.lost_acked.len(),
        check.lost_flushed.len(),
        check.torn_slots.len()
    );
    assert_eq!(c.data_diff("r1"), None, "the legs differ after the reloads");
    let a = c.a.list("r1");
    assert_eq!(a["local_errors"]["write"], 0);
    assert_eq!(a["remoteaddr"], via_proxy.unwrap());
}

// --------------------------------------------------------------- hastctl

#[test]
fn help_lists_defaults_and_completions_are_generated() {
    let hastctl = || Command::new(bin_dir().join("hastctl"));
    let help = run(hastctl().arg("--help"));
    assert!(help.contains("[default: /etc/hast.conf]"), "{help}");
    for cmd in [
        "create",
        "role",
        "list",
        "status",
        "wait",
        "events",
        "dump",
        "reload",
        "split-brain",
        "completions",
    ] {
        let h = run(hastctl().args([cmd, "--help"]));
        assert!(h.contains("Usage: hastctl"), "{cmd}: {h}");
    }
    let create = run(hastctl().args(["create", "--help"]));
    for d in ["[default: 2M]", "[default: 1024]", "[default: all of it]"] {
        assert!(create.contains(d), "create --help lacks {d}: {create}");
    }
    let wait = run(hastctl().args(["wait", "--help"]));
    assert!(wait.contains("[default: 60]"), "{wait}");
    let role = run(hastctl().args(["role", "--help"]));
    assert!(
        role.contains("[possible values: init, primary, secondary]"),
        "{role}"
    );
    let bash = run(hastctl().args(["completions", "bash"]));
    assert!(
        bash.contains("complete -F") && bash.contains("reload"),
        "{bash}"
    );
    let zsh = run(hastctl().args(["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef hastctl"), "{zsh}");
}

#[test]
fn status_is_not_coloured_off_a_terminal() {
    let node = standalone(&["r1"]);
    node.role("primary", "r1");
    let out = node.hastctl(&["status"]);
    assert!(out.contains("degraded"), "{out}");
    assert!(
        !out.contains('\u{1b}'),
        "escape codes off a terminal: {out:?}"
    );
    // wait in-sync draws nothing off a terminal either.
    let out = node.hastctl_output(&["wait", "in-sync", "--timeout", "0.3", "r1"]);
    assert_eq!(out.status.code(), Some(75));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains('\u{1b}') && !err.contains('%'), "{err:?}");
    let _ = IP_B;
}
