//! Operator tooling against real hastd processes: `hastctl wait`,
//! `hastctl events`, `hastctl role --force`, and the keepalived notify
//! script (contrib/keepalived/hast-notify.sh) switching a two-node cluster.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::*;

const MIB: u64 = 1 << 20;
const EX_TEMPFAIL: i32 = 75;
const EX_UNAVAILABLE: i32 = 69;

fn cluster(names: &[&str], size: u64, proxy: bool) -> Cluster {
    let mut c = Cluster::new(
        names.iter().map(|n| ResourceDef::file(n, size)).collect(),
        ClusterOptions {
            with_proxy: proxy,
            ..Default::default()
        },
    );
    c.create_all();
    c.start();
    c
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `hastctl wait ARGS` and returns its output and how long it took.
fn wait(node: &TestNode, args: &[&str]) -> (Output, Duration) {
    let mut all = vec!["wait"];
    all.extend_from_slice(args);
    let start = Instant::now();
    let out = node.hastctl_output(&all);
    (out, start.elapsed())
}

/// Asserts `hastctl wait ARGS` succeeds.
fn wait_ok(node: &TestNode, args: &[&str]) {
    let (out, took) = wait(node, args);
    assert_eq!(
        code(&out),
        0,
        "hastctl wait {args:?} failed after {took:?}: {}\nhastd log:\n{}",
        stderr(&out),
        node.log_tail(40)
    );
}

/// Asserts `hastctl wait ARGS` times out (exit 75); returns its message.
fn wait_times_out(node: &TestNode, args: &[&str]) -> String {
    let (out, took) = wait(node, args);
    let msg = stderr(&out);
    assert_eq!(
        code(&out),
        EX_TEMPFAIL,
        "hastctl wait {args:?}: expected a timeout, got {} after {took:?}: {msg}",
        out.status
    );
    assert!(msg.contains("timed out"), "{msg}");
    assert!(
        took < Duration::from_secs(10),
        "the timeout was honoured: {took:?}"
    );
    msg
}

/// `hastctl` with a node's config and identity, not waited for.
fn hastctl_cmd(node: &TestNode, args: &[&str]) -> Command {
    let mut c = Command::new(bin_dir().join("hastctl"));
    c.arg("-c")
        .arg(&node.conf)
        .arg("--node")
        .arg(&node.name)
        .args(args);
    c
}

#[test]
fn wait_states_and_timeouts() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut c = cluster(&["r1", "r2"], 32 * MIB, false);

    // Usage errors fail at once.
    let (out, _) = wait(&c.a, &["bogus", "r1"]);
    assert_eq!(code(&out), 64, "unknown state: {}", stderr(&out));
    let (out, _) = wait(&c.a, &["role:boss", "r1"]);
    assert_eq!(code(&out), 64, "unknown role: {}", stderr(&out));
    let (out, took) = wait(&c.a, &["complete", "nosuch"]);
    assert_eq!(code(&out), 65, "unknown resource: {}", stderr(&out));
    assert!(took < Duration::from_secs(5));

    wait_ok(&c.a, &["role:init", "--timeout", "5", "all"]);
    let msg = wait_times_out(&c.a, &["export", "--timeout", "0.5", "r1"]);
    assert!(msg.contains("r1 (role init"), "{msg}");
    let msg = wait_times_out(&c.a, &["complete", "--timeout", "0.3", "all"]);
    assert!(
        msg.contains("r1 (role init, status -, dirty") && msg.contains("r2 (role init"),
        "names every resource not there yet: {msg}"
    );

    // `wait export` returns once the export accepts NBD connections.
    let mut waiter = hastctl_cmd(&c.a, &["wait", "export", "--timeout", "30", "r1"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hastctl wait");
    std::thread::sleep(Duration::from_millis(300));
    assert!(waiter.try_wait().unwrap().is_none(), "still waiting");
    c.b.hastctl(&["role", "secondary", "all"]);
    c.a.hastctl(&["role", "primary", "r1"]);
    let st = wait_child(&mut waiter, Duration::from_secs(40));
    assert!(st.success(), "wait export: {st}");
    qemu_io(&c.a.uri("r1"), &["read 0 4k"]);

    wait_ok(&c.a, &["complete", "--timeout", "30", "r1"]);
    assert_eq!(c.a.list("r1")["status"], "complete");
    wait_ok(&c.a, &["in-sync", "--timeout", "90", "r1"]);
    let j = c.a.list("r1");
    assert_eq!(j["dirty"], 0);
    assert!(j["sync"].is_null());
    assert_eq!(j["queues"]["recv"], 0);
    wait_ok(&c.a, &["role:primary", "r1"]);
    wait_ok(&c.b, &["role:secondary", "all"]);
    let msg = wait_times_out(&c.a, &["role:secondary", "--timeout", "0.3", "r1", "r2"]);
    assert!(msg.contains("r1 (role primary, status complete"), "{msg}");
    assert!(msg.contains("r2 (role init"), "{msg}");
    assert!(!msg.contains("r2 (role secondary"), "{msg}");

    // The secondary goes away: not in sync, and dirty once written to.
    c.b.stop();
    wait_ok(&c.a, &["disconnected", "--timeout", "20", "r1"]);
    qemu_io(&c.a.uri("r1"), &["write -P 0x5a 1M 2M", "flush"]);
    let msg = wait_times_out(&c.a, &["in-sync", "--timeout", "0.5", "r1"]);
    assert!(msg.contains("status degraded"), "{msg}");
    assert!(!msg.contains("dirty 0B"), "dirty is reported: {msg}");
    wait_times_out(&c.a, &["complete", "--timeout", "0.3", "r1"]);

    // It comes back: in sync again.
    c.b.start();
    c.b.hastctl(&["role", "secondary", "r1"]);
    wait_ok(&c.a, &["in-sync", "--timeout", "90", "r1"]);
    assert_eq!(c.data_diff("r1"), None);

    // --timeout 0 waits for as long as it takes.
    let mut forever = hastctl_cmd(&c.a, &["wait", "role:primary", "--timeout", "0", "r2"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hastctl wait");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(forever.try_wait().unwrap().is_none(), "--timeout 0 waits");
    c.a.hastctl(&["role", "primary", "r2"]);
    let st = wait_child(&mut forever, Duration::from_secs(20));
    assert!(st.success(), "wait role:primary: {st}");
    c.stop();
}

/// A running `hastctl -d events ARGS`, its stdout lines on a channel.
struct Subscriber {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Subscriber {
    /// Starts it and waits until hastd has acknowledged the subscription.
    fn start(node: &TestNode, args: &[&str]) -> Subscriber {
        let mut all = vec!["-d", "events"];
        all.extend_from_slice(args);
        let mut child = hastctl_cmd(node, &all)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hastctl events");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let sub = Subscriber {
            child,
            lines,
            stderr,
        };
        let start = Instant::now();
        while !sub.stderr().contains("subscribed") {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "hastctl events did not subscribe: {}",
                sub.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sub
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Lines until one satisfies `done` (included); panics after `limit`.
    fn until(&self, limit: Duration, mut done: impl FnMut(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let stop = done(&line);
                    got.push(line);
                    if stop {
                        return got;
                    }
                }
                Err(_) => panic!(
                    "event not seen within {limit:?}; lines so far:\n{}\nstderr: {}",
                    got.join("\n"),
                    self.stderr()
                ),
            }
        }
    }

    /// Waits for the process to exit; returns its exit code.
    fn exit_code(&mut self, limit: Duration) -> i32 {
        wait_child(&mut self.child, limit).code().unwrap_or(-1)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

fn event_name(line: &str) -> String {
    json(line)["event"].as_str().unwrap_or("").to_owned()
}

/// Index of the first JSON event named `name` in `lines`.
fn pos(lines: &[String], name: &str) -> usize {
    lines
        .iter()
        .position(|l| event_name(l) == name)
        .unwrap_or_else(|| panic!("no {name} event in:\n{}", lines.join("\n")))
}

/// Is `s` a `YYYY-MM-DDTHH:MM:SSZ` timestamp?
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 | 16 => c == b':',
            19 => c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

#[test]
fn events_stream_a_scripted_sequence_to_concurrent_subscribers() {
    let mut c = cluster(&["r1"], 32 * MIB, false);
    let js = Subscriber::start(&c.a, &["--json", "r1"]);
    let text = Subscriber::start(&c.a, &[]);
    let on_b = Subscriber::start(&c.b, &["--json", "all"]);

    // Other commands are answered while subscribers are connected.
    let start = Instant::now();
    c.a.hastctl(&["status"]);
    assert!(start.elapsed() < Duration::from_secs(3), "status answered");

    c.b.hastctl(&["role", "secondary", "r1"]);
    c.a.hastctl(&["role", "primary", "r1"]);
    let lines = js.until(Duration::from_secs(90), |l| event_name(l) == "syncdone");
    wait_ok(&c.a, &["in-sync", "--timeout", "60", "r1"]);
    // Stop the secondary: the primary reports the disconnect.
    c.b.stop();
    let more = js.until(Duration::from_secs(30), |l| event_name(l) == "disconnect");
    let lines: Vec<String> = lines.into_iter().chain(more).collect();

    for l in &lines {
        let j = json(l);
        assert_eq!(j["resource"], "r1", "{l}");
        assert!(
            j["time_unix_ms"].as_u64().unwrap() > 1_600_000_000_000,
            "{l}"
        );
    }
    let role = &lines[pos(&lines, "role")];
    assert_eq!(json(role)["old"], "init", "{role}");
    assert_eq!(json(role)["new"], "primary", "{role}");
    let (connect, syncstart, syncdone, disconnect) = (
        pos(&lines, "connect"),
        pos(&lines, "syncstart"),
        pos(&lines, "syncdone"),
        pos(&lines, "disconnect"),
    );
    assert!(
        connect < syncstart && syncstart < syncdone && syncdone < disconnect,
        "order: {lines:#?}"
    );
    // The role event is reported once the role change has completed (the
    // export ready), which happens after the first contact with the
    // peer: it may come after `connect` and within the first sync.
    for l in &lines[syncstart + 1..syncdone] {
        if event_name(l) == "role" {
            assert_eq!(json(l)["new"], "primary", "{l}");
            continue;
        }
        assert_eq!(
            event_name(l),
            "progress",
            "only progress (and the role change) within a sync: {l}"
        );
        let j = json(l);
        assert!(j["done"].as_u64().unwrap() <= j["total"].as_u64().unwrap());
    }

    // The text subscriber saw the same, in the text form.
    let tl = text.until(Duration::from_secs(10), |l| l.ends_with(" r1 disconnect"));
    for l in &tl {
        let mut parts = l.split(' ');
        assert!(is_timestamp(parts.next().unwrap()), "timestamp: {l}");
        assert_eq!(parts.next(), Some("r1"), "{l}");
    }
    let rest: Vec<&str> = tl.iter().map(|l| &l[21..]).collect();
    for want in [
        "r1 role init primary",
        "r1 connect",
        "r1 syncstart",
        "r1 syncdone",
        "r1 disconnect",
    ] {
        assert!(rest.contains(&want), "{want:?} in {rest:#?}");
    }
    assert!(
        rest.iter()
            .all(|l| !l.starts_with("r1 sync ") || l.contains("B/")),
        "progress as done/total: {rest:#?}"
    );

    // The secondary's subscriber saw its role change and the connection.
    let bl = on_b.until(Duration::from_secs(10), |l| event_name(l) == "connect");
    let role = &bl[pos(&bl, "role")];
    assert_eq!(json(role)["new"], "secondary", "{role}");

    // hastd stops: the stream ends with EX_UNAVAILABLE.
    drop(on_b);
    c.a.stop();
    let mut js = js;
    assert_eq!(js.exit_code(Duration::from_secs(10)), EX_UNAVAILABLE);
    assert!(
        js.stderr().contains("closed the event stream"),
        "{}",
        js.stderr()
    );
}

#[test]
fn events_report_sync_progress_at_most_once_a_second() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut c = cluster(&["r1"], 64 * MIB, true);
    c.b.hastctl(&["role", "secondary", "r1"]);
    c.a.hastctl(&["role", "primary", "r1"]);
    wait_ok(&c.a, &["in-sync", "--timeout", "90", "r1"]);
    // Writes while partitioned leave 24 MiB dirty; the proxy then delays
    // the primary's traffic, so that the resync takes several seconds.
    c.proxy_ab().unwrap().partition();
    wait_ok(&c.a, &["disconnected", "--timeout", "30", "r1"]);
    qemu_io(&c.a.uri("r1"), &["write -P 0x42 0 24M", "flush"]);
    let sub = Subscriber::start(&c.a, &["--json"]);
    c.proxy_ab().unwrap().set_delay(Duration::from_millis(100));
    c.proxy_ab().unwrap().heal();
    let lines = sub.until(Duration::from_secs(180), |l| {
        matches!(event_name(l).as_str(), "syncdone" | "syncintr")
    });
    let start = pos(&lines, "syncstart");
    assert_eq!(event_name(lines.last().unwrap()), "syncdone", "{lines:#?}");
    let progress: Vec<serde_json::Value> = lines[start + 1..lines.len() - 1]
        .iter()
        .map(|l| json(l))
        .collect();
    assert!(
        !progress.is_empty(),
        "a sync of several seconds reports progress: {lines:#?}"
    );
    let mut last_time = 0u64;
    let mut last_done = 0u64;
    for p in &progress {
        assert_eq!(p["event"], "progress", "{p}");
        assert_eq!(p["resource"], "r1");
        assert_eq!(p["direction"], "to-secondary");
        let (done, total) = (p["done"].as_u64().unwrap(), p["total"].as_u64().unwrap());
        assert!(total > 0 && done <= total, "{p}");
        assert!(done >= last_done, "progress goes forward: {p}");
        let t = p["time_unix_ms"].as_u64().unwrap();
        assert!(
            last_time == 0 || t >= last_time + 900,
            "at most one sample a second: {progress:#?}"
        );
        last_time = t;
        last_done = done;
    }
    c.proxy_ab().unwrap().set_delay(Duration::ZERO);
    wait_ok(&c.a, &["in-sync", "--timeout", "60", "r1"]);
    assert_eq!(c.data_diff("r1"), None);
    c.stop();
}

#[test]
fn event_subscribers_are_limited_and_do_not_block_the_control_socket() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let mut node = TestNode::standalone(vec![ResourceDef::file("r1", 16 * MIB)]);
    node.create_all();
    node.start();
    // 32 raw subscribers, each acknowledged.
    let mut raw = Vec::new();
    for _ in 0..32 {
        let mut s = UnixStream::connect(node.control_socket()).unwrap();
        s.write_all(b"{\"version\":1,\"cmd\":\"events\",\"resources\":[\"all\"]}\n")
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s);
        let mut ack = String::new();
        r.read_line(&mut ack).unwrap();
        let ack = json(&ack);
        assert!(ack["error"].is_null(), "{ack}");
        assert_eq!(ack["resources"][0]["name"], "r1", "the snapshot");
        raw.push(r);
    }
    // The 33rd is refused (temporary failure); everything else works.
    let out = node.hastctl_output(&["events"]);
    assert_eq!(code(&out), EX_TEMPFAIL, "{}", stderr(&out));
    assert!(stderr(&out).contains("too many event subscribers"));
    let start = Instant::now();
    node.hastctl(&["role", "primary", "r1"]);
    node.hastctl(&["status"]);
    wait_ok(&node, &["export", "--timeout", "10", "r1"]);
    assert!(start.elapsed() < Duration::from_secs(10));
    // Every subscriber got the role change.
    for r in &mut raw {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let j = json(&line);
        assert_eq!(
            (j["event"].as_str(), j["new"].as_str()),
            (Some("role"), Some("primary"))
        );
    }
    // One leaves: its slot is freed (closed connections are noticed
    // within about a second).
    drop(raw.pop());
    let start = Instant::now();
    let sub = loop {
        let mut s = hastctl_cmd(&node, &["-d", "events"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        match s.try_wait().unwrap() {
            None => break s,
            Some(st) => {
                assert_eq!(st.code(), Some(EX_TEMPFAIL));
                assert!(start.elapsed() < Duration::from_secs(10), "slot not freed");
            }
        }
    };
    let mut sub = sub;
    let _ = sub.kill();
    let _ = sub.wait();
    node.stop();
}

#[test]
fn role_accepts_force() {
    let mut node = TestNode::standalone(vec![ResourceDef::file("r1", 16 * MIB)]);
    node.create_all();
    node.start();
    let help = node.hastctl(&["role", "--help"]);
    assert!(help.contains("--force"), "{help}");
    node.hastctl(&["role", "--force", "primary", "r1"]);
    assert_eq!(node.list("r1")["role"], "primary");
    node.hastctl(&["role", "secondary", "--force", "r1"]);
    assert_eq!(node.list("r1")["role"], "secondary");
    node.stop();
}

fn notify_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib/keepalived/hast-notify.sh")
        .canonicalize()
        .expect("contrib/keepalived/hast-notify.sh")
}

/// The files of one node's notify script runs: what the substituted
/// import/export commands and logger recorded.
struct NotifyEnv {
    record: PathBuf,
    logger_log: PathBuf,
    fake_logger: PathBuf,
    lock: PathBuf,
}

impl NotifyEnv {
    fn new(node: &TestNode) -> NotifyEnv {
        let fake_logger = node.dir.join("fake-logger.sh");
        let logger_log = node.dir.join("logger.log");
        std::fs::write(
            &fake_logger,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{}'\n",
                logger_log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake_logger, std::fs::Permissions::from_mode(0o755)).unwrap();
        NotifyEnv {
            record: node.dir.join("failover.record"),
            logger_log,
            fake_logger,
            lock: node.dir.join("notify.lock"),
        }
    }

    fn record(&self) -> String {
        std::fs::read_to_string(&self.record).unwrap_or_default()
    }
}

/// Runs hast-notify.sh ARGS as keepalived would, for `node`.
fn notify(node: &TestNode, env: &NotifyEnv, args: &[&str], extra: &[(&str, &str)]) -> Output {
    let exports = node.dir.join("export");
    // The import records, per resource, whether its export socket exists
    // and the resource's role at that moment.
    let import = format!(
        "for r in $HAST_RESOURCES; do \
           if [ -S '{e}'/$r.sock ]; then s=export-present; else s=export-missing; fi; \
           role=$(\"$HASTCTL\" -c \"$HAST_CONF\" list $r | sed -n 's/^  role: //p'); \
           echo \"import $HAST_STATE $r $s $role\"; \
         done >> '{rec}'",
        e = exports.display(),
        rec = env.record.display()
    );
    let export = format!(
        "echo \"export $HAST_STATE $HAST_RESOURCES\" >> '{}'",
        env.record.display()
    );
    let mut cmd = Command::new(notify_script());
    cmd.args(args)
        .env("HAST_NOTIFY_CONF", "/dev/null")
        .env("HASTCTL", bin_dir().join("hastctl"))
        .env("HAST_CONF", &node.conf)
        .env("HAST_NODE", &node.name)
        .env("HAST_RESOURCES", "r1 r2")
        .env("HAST_IMPORT_CMD", import)
        .env("HAST_EXPORT_CMD", export)
        .env("HAST_LOGGER", &env.fake_logger)
        .env("HAST_LOCKFILE", &env.lock)
        .env("HAST_EXPORT_TIMEOUT", "20")
        .env("HAST_PEER_TIMEOUT", "20");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().expect("run hast-notify.sh")
}

fn notify_ok(node: &TestNode, env: &NotifyEnv, args: &[&str]) -> String {
    let out = notify(node, env, args, &[]);
    let err = stderr(&out);
    assert!(
        out.status.success(),
        "{} hast-notify.sh {args:?} failed ({}):\n{err}\nhastd log:\n{}",
        node.name,
        out.status,
        node.log_tail(40)
    );
    err
}

fn roles(node: &TestNode) -> (String, String) {
    let r = |n: &str| node.list(n)["role"].as_str().unwrap().to_owned();
    (r("r1"), r("r2"))
}

fn both(role: &str) -> (String, String) {
    (role.to_owned(), role.to_owned())
}

#[test]
fn keepalived_notify_script_fails_over() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut c = cluster(&["r1", "r2"], 32 * MIB, false);
    let (ea, eb) = (NotifyEnv::new(&c.a), NotifyEnv::new(&c.b));

    // keepalived starts both nodes as BACKUP: both release and go secondary.
    notify_ok(&c.a, &ea, &["INSTANCE", "VI_HAST", "BACKUP"]);
    notify_ok(&c.b, &eb, &["INSTANCE", "VI_HAST", "BACKUP", "100"]);
    assert_eq!(roles(&c.a), both("secondary"));
    assert_eq!(roles(&c.b), both("secondary"));
    assert_eq!(ea.record(), "export BACKUP r1 r2\n");

    // A wins the election.
    let log = notify_ok(&c.a, &ea, &["INSTANCE", "VI_HAST", "MASTER"]);
    assert_eq!(roles(&c.a), both("primary"));
    assert_eq!(
        ea.record(),
        "export BACKUP r1 r2\n\
         import MASTER r1 export-present primary\n\
         import MASTER r2 export-present primary\n",
        "the import ran after the exports appeared; log:\n{log}"
    );
    wait_ok(&c.a, &["in-sync", "--timeout", "90", "all"]);
    qemu_io(&c.a.uri("r1"), &["write -P 0x7e 0 4M", "flush"]);
    wait_ok(&c.a, &["in-sync", "--timeout", "60", "r1"]);

    // B must not promote itself while A still serves: it waits for A to
    // let go, gives up, and stays secondary.
    let out = notify(
        &c.b,
        &eb,
        &["INSTANCE", "VI_HAST", "MASTER"],
        &[("HAST_PEER_TIMEOUT", "1")],
    );
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert!(stderr(&out).contains("still connected"), "{}", stderr(&out));
    assert_eq!(roles(&c.b), both("secondary"));
    assert!(!eb.record().contains("import"), "{}", eb.record());

    // Failover: A goes BACKUP (releases, demotes), then B goes MASTER.
    notify_ok(&c.a, &ea, &["INSTANCE", "VI_HAST", "BACKUP"]);
    assert_eq!(roles(&c.a), both("secondary"));
    assert!(ea.record().ends_with("export BACKUP r1 r2\n"));
    let log = notify_ok(&c.b, &eb, &["INSTANCE", "VI_HAST", "MASTER"]);
    assert_eq!(roles(&c.b), both("primary"));
    assert_eq!(
        eb.record(),
        "export BACKUP r1 r2\n\
         import MASTER r1 export-present primary\n\
         import MASTER r2 export-present primary\n"
    );
    qemu_io(&c.b.uri("r1"), &["read -P 0x7e 0 4M"]);
    // Each step is logged, to stderr and through logger(1).
    let steps = [
        "MASTER (INSTANCE VI_HAST): switching r1 r2 to primary",
        "role primary r1 r2",
        "wait export --timeout 20 r1 r2",
        "exports ready; importing the data",
        "r1 r2 primary, data imported",
    ];
    let mut at = 0;
    for step in steps {
        let found = log[at..]
            .find(step)
            .unwrap_or_else(|| panic!("step {step:?} logged in order:\n{log}"));
        at += found;
    }
    assert!(
        log.lines().all(|l| l.starts_with("hast-failover[")),
        "{log}"
    );
    let syslog = std::fs::read_to_string(&eb.logger_log).unwrap();
    assert!(
        syslog.contains("-t hast-failover -p daemon.notice -- MASTER (INSTANCE VI_HAST)"),
        "{syslog}"
    );
    assert!(syslog.contains("role primary r1 r2"), "{syslog}");

    // Idempotent: MASTER again changes nothing.
    notify_ok(&c.b, &eb, &["INSTANCE", "VI_HAST", "MASTER"]);
    assert_eq!(roles(&c.b), both("primary"));

    // Dry run: logs, changes nothing.
    let before = eb.record();
    let log = notify_ok(&c.b, &eb, &["-n", "INSTANCE", "VI_HAST", "BACKUP"]);
    assert!(log.contains("dry-run: would run:"), "{log}");
    assert!(log.contains("role secondary r1 r2"), "{log}");
    assert_eq!(roles(&c.b), both("primary"));
    assert_eq!(eb.record(), before);

    // The short form (notify_fault "hast-notify.sh fault").
    notify_ok(&c.b, &eb, &["fault"]);
    assert_eq!(roles(&c.b), both("secondary"));
    assert!(eb.record().ends_with("export FAULT r1 r2\n"));

    // Usage errors.
    let out = notify(&c.b, &eb, &["INSTANCE", "VI_HAST", "SLEEPY"], &[]);
    assert_eq!(code(&out), 64, "{}", stderr(&out));
    let out = notify(&c.b, &eb, &[], &[]);
    assert_eq!(code(&out), 64, "{}", stderr(&out));

    // A failed release leaves the role alone.
    notify_ok(&c.b, &eb, &["INSTANCE", "VI_HAST", "MASTER"]);
    let out = notify(
        &c.b,
        &eb,
        &["INSTANCE", "VI_HAST", "BACKUP"],
        &[("HAST_EXPORT_CMD", "echo pool busy >&2; exit 1")],
    );
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(stderr(&out).contains("pool busy"), "{}", stderr(&out));
    assert_eq!(roles(&c.b), both("primary"));
    c.stop();
}
