//! Watching a synchronisation (issue #14): the Prometheus endpoint scraped
//! with curl and checked against `hastctl list --json` and `promtool check
//! metrics`, and `hastctl wait in-sync` drawing its progress bar in a real
//! terminal (tmux).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hast_tests::cluster::{Cluster, ClusterOptions, IP_A};
use hast_tests::proxy::free_port;
use hast_tests::*;

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(120);
/// Written while the secondary is away (the new secondary gets a full
/// copy: these bytes as data, the rest of the device as zero runs).
const DIRTY_MIB: u64 = 64;
/// Latency each way on the primary's link: keeps the copy going for a few
/// seconds (16 chunks of 1 MiB per round trip).
const LINK_DELAY: Duration = Duration::from_millis(100);

/// nodeA primary with `DIRTY_MIB` written while nodeB was in init, and a
/// slow link to nodeB; the synchronisation starts when nodeB becomes
/// secondary (the caller does that).
fn pair_with_dirty_data(metrics: Option<SocketAddr>) -> Cluster {
    let mut c = Cluster::new(
        vec![ResourceDef::file("r1", (DIRTY_MIB + 32) * MIB)],
        ClusterOptions {
            with_proxy: true,
            ..Default::default()
        },
    );
    if let Some(m) = metrics {
        c.a.cfg.global_extra = format!("metrics listen tcp4://{m}");
        c.a.write_conf();
    }
    c.create_all();
    c.start();
    c.a.role("primary", "r1");
    qemu_io(
        &c.a.uri("r1"),
        &[&format!("write -P 0xab 0 {DIRTY_MIB}M"), "flush"],
    );
    assert!(c.a.list("r1")["dirty"].as_u64().unwrap() >= DIRTY_MIB * MIB);
    c.proxy_ab().expect("proxy").set_delay(LINK_DELAY);
    c.proxy_ba().expect("proxy").set_delay(LINK_DELAY);
    c
}

fn scrape(addr: SocketAddr) -> String {
    run(Command::new("curl").args(["-sf", "--max-time", "10", &format!("http://{addr}/metrics")]))
}

/// `name{labels} value` lines, by `name{labels}`.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn value(s: &HashMap<String, f64>, key: &str) -> u64 {
    *s.get(key).unwrap_or_else(|| panic!("no sample {key}")) as u64
}

fn promtool_ok(text: &str, dir: &std::path::Path) {
    let file = dir.join("scrape.txt");
    std::fs::write(&file, text).unwrap();
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- exposition:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn metrics_during_a_sync_match_hastctl_list_and_pass_promtool() {
    if !require_tool("curl") || !require_tool("promtool") || !require_tool("qemu-io") {
        return;
    }
    let m = SocketAddr::new(IP_A, free_port(IP_A));
    let c = pair_with_dirty_data(Some(m));
    let idle = samples(&scrape(m));
    assert_eq!(
        value(&idle, "hast_sync_state{resource=\"r1\",state=\"idle\"}"),
        1
    );
    c.b.hastctl(&["role", "secondary", "r1"]);
    // During the copy: the scrape is taken before the list, so what it saw
    // copied is at most what the list says.
    let start = Instant::now();
    let (text, list) = loop {
        assert!(start.elapsed() < LIMIT, "never saw the synchronisation");
        let text = scrape(m);
        let list = c.a.list("r1");
        let s = samples(&text);
        if value(
            &s,
            "hast_sync_state{resource=\"r1\",state=\"to-secondary\"}",
        ) == 1
            && !list["sync"].is_null()
        {
            break (text, list);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    promtool_ok(&text, &c.a.dir);
    let s = samples(&text);
    let sync = &list["sync"];
    assert_eq!(
        value(&s, "hast_sync_total_bytes{resource=\"r1\"}"),
        sync["total"].as_u64().unwrap()
    );
    let done = value(&s, "hast_sync_done_bytes{resource=\"r1\"}");
    assert!(done <= sync["done"].as_u64().unwrap(), "{done} vs {sync}");
    assert!(done < sync["total"].as_u64().unwrap(), "scraped mid-copy");
    assert_eq!(
        value(
            &s,
            "hast_connection_state{resource=\"r1\",state=\"connected\"}"
        ),
        1
    );
    assert!(value(&s, "hast_peerdevice_outofsync_bytes{resource=\"r1\"}") > 0);
    // Once in sync, every counter equals what hastctl list says.
    let list = c.a.wait_in_sync("r1", LIMIT);
    let text = scrape(m);
    promtool_ok(&text, &c.a.dir);
    let s = samples(&text);
    let st = &list["statistics"];
    let eq = |key: &str, want: &serde_json::Value| {
        assert_eq!(value(&s, key), want.as_u64().unwrap(), "{key}\n{text}");
    };
    eq("hast_device_writes_total{resource=\"r1\"}", &st["writes"]);
    eq("hast_device_reads_total{resource=\"r1\"}", &st["reads"]);
    eq("hast_device_flushes_total{resource=\"r1\"}", &st["flushes"]);
    eq(
        "hast_device_alwrites_total{resource=\"r1\"}",
        &st["activemap_updates"],
    );
    eq(
        "hast_peerdevice_outofsync_bytes{resource=\"r1\"}",
        &list["dirty"],
    );
    eq(
        "hast_sync_bytes_total{resource=\"r1\"}",
        &list["synced_bytes"],
    );
    eq(
        "hast_window_waits_total{resource=\"r1\"}",
        &list["window_waits"],
    );
    eq(
        "hast_local_errors_total{resource=\"r1\",op=\"write\"}",
        &list["local_errors"]["write"],
    );
    eq(
        "hast_peerdevice_pending{resource=\"r1\"}",
        &list["queues"]["recv"],
    );
    eq("hast_device_size_bytes{resource=\"r1\"}", &list["datasize"]);
    eq(
        "hast_write_latency_seconds_count{resource=\"r1\"}",
        &st["writes"],
    );
    assert_eq!(
        value(&s, "hast_resource_role{resource=\"r1\",role=\"primary\"}"),
        1
    );
    assert_eq!(
        value(&s, "hast_sync_state{resource=\"r1\",state=\"idle\"}"),
        1
    );
    let synced = list["synced_bytes"].as_u64().unwrap();
    assert!(synced >= DIRTY_MIB * MIB, "{synced}");
    let sent = value(&s, "hast_peerdevice_sent_bytes_total{resource=\"r1\"}");
    // Zero runs travel without payload: the written data is what must
    // have gone over the link.
    assert!(
        sent > DIRTY_MIB * MIB,
        "the copied data went over the link: sent {sent}, synced {synced}"
    );
    assert!(value(&s, "hast_peerdevice_received_bytes_total{resource=\"r1\"}") > 0);
    assert_eq!(value(&s, "hastd_up"), 1);
    // Not a metrics path: 404; the endpoint stays up.
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{m}/nope"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
}

/// A tmux server of this test's own (its socket name), killed when
/// dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket]);
        c
    }

    fn start(width: u32) -> Tmux {
        let t = Tmux {
            socket: format!("hast-test-{}", std::process::id()),
        };
        run(t.cmd().args([
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            &width.to_string(),
            "-y",
            "20",
            "sh",
        ]));
        t
    }

    fn send(&self, line: &str) {
        run(self.cmd().args(["send-keys", "-t", "t", line, "Enter"]));
    }

    fn screen(&self) -> String {
        run(self.cmd().args(["capture-pane", "-p", "-t", "t"]))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").stderr(Stdio::null()).status();
    }
}

/// The percentage the bar of `res` shows on `screen`.
fn percent(screen: &str, res: &str) -> Option<u32> {
    let line = screen
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{res} sync [")))?;
    let end = line.find('%')?;
    line[..end].rsplit(' ').next()?.trim().parse().ok()
}

#[test]
fn wait_in_sync_draws_a_moving_progress_bar_in_a_terminal() {
    if !require_tool("tmux") || !require_tool("qemu-io") {
        return;
    }
    let c = pair_with_dirty_data(None);
    let tmux = Tmux::start(160);
    let hastctl = bin_dir().join("hastctl");
    c.b.hastctl(&["role", "secondary", "r1"]);
    tmux.send(&format!(
        "{} -c {} --node nodeA wait in-sync --timeout 120 r1; echo \"R\"\"C=$?\"",
        hastctl.display(),
        c.a.conf.display()
    ));
    let start = Instant::now();
    let mut seen: Vec<u32> = Vec::new();
    let last = loop {
        let screen = tmux.screen();
        if let Some(p) = percent(&screen, "r1") {
            if seen.last() != Some(&p) {
                seen.push(p);
            }
        }
        if screen.lines().any(|l| l.starts_with("RC=")) {
            break screen;
        }
        assert!(
            start.elapsed() < LIMIT,
            "hastctl did not finish; screen:\n{screen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(last.lines().any(|l| l == "RC=0"), "{last}");
    assert_eq!(
        percent(&last, "r1"),
        Some(100),
        "the bar ends at 100%:\n{last}"
    );
    assert!(
        seen.iter().any(|p| (1..100).contains(p)),
        "the bar was never seen between 0 and 100% (seen {seen:?})"
    );
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "the bar went backwards: {seen:?}"
    );
    assert!(seen.len() >= 3, "the bar did not move: {seen:?}");
    assert!(last.contains("in sync"), "{last}");
    c.a.wait_in_sync("r1", LIMIT);
}
