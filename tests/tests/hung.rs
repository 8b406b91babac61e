//! A hung secondary: SIGSTOP keeps its sockets open and answers nothing.
//! While an application writes through the primary's export, the primary
//! must keep serving within the configured `timeout`, go degraded, mark
//! what the secondary misses, and after SIGCONT resynchronise the legs to
//! byte-identical (docs/failover.md: "once the link is declared dead").

use std::time::{Duration, Instant};

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::failover::{check_records, RecordWriter};
use hast_tests::*;

const MIB: u64 = 1 << 20;
const TIMEOUT_SECS: u32 = 3;
const LIMIT: Duration = Duration::from_secs(120);

/// How long a write may wait when the secondary hangs: the link is
/// declared dead after `timeout` without an answer, the waiting writes are
/// then completed locally. Twice that plus a load allowance for two
/// shared cores; the point is that it is bounded (without the timeout a
/// write would wait for as long as the secondary is stopped).
fn write_bound() -> Duration {
    Duration::from_secs(2 * u64::from(TIMEOUT_SECS) + 20)
}

/// Continues a stopped process when dropped (a failing test must not
/// leave it stopped; the node's own drop then kills it).
struct Stopped(u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

fn hung_secondary(replication: &str) {
    let mut c = Cluster::new(
        vec![ResourceDef::file("r1", 64 * MIB)],
        ClusterOptions {
            replication: replication.into(),
            timeout_secs: TIMEOUT_SECS,
            ..Default::default()
        },
    );
    c.create_all();
    c.start();
    c.b.hastctl(&["role", "secondary", "r1"]);
    c.a.role("primary", "r1");
    c.a.wait_in_sync("r1", LIMIT);

    // The application: a verifying record writer, 8 in flight, a FLUSH
    // every 64 writes.
    let writer = RecordWriter::start(&c.a.export_socket("r1"), "r1", 8, 64);
    wait_until(LIMIT, "first writes", || writer.acked() >= 200);

    let pid_b = c.b.pid().expect("B runs");
    signal(pid_b, libc::SIGSTOP);
    let stopped = Stopped(pid_b);
    let at_stop = writer.acked();

    // The writes go on within the bound: the record stream, which had
    // writes in flight to B when it stopped, completes 500 more.
    let t = Instant::now();
    let goal = at_stop + 500;
    wait_until(write_bound(), "writes after the secondary hung", || {
        writer.acked() >= goal
    });
    let waited = t.elapsed();
    // The primary has let go of the secondary and serves alone.
    let j = c.a.wait_list("r1", LIMIT, |j| j["status"] == "degraded");
    let j2 = c.a.list("r1");
    let dirty = j2["dirty"].as_u64().unwrap();
    assert!(dirty > 0, "what the secondary missed is marked: {j2}");
    eprintln!(
        "{replication}: 500 writes completed {waited:?} after SIGSTOP (bound {:?}); \
         degraded with {} bytes dirty; {} records acked at stop, {} now",
        write_bound(),
        j["dirty"],
        at_stop,
        writer.acked()
    );

    // SIGCONT: the pair reconnects and resynchronises.
    drop(stopped);
    let more = writer.acked() + 300;
    wait_until(LIMIT, "writes after SIGCONT", || writer.acked() >= more);
    writer.stop();
    let log = writer.finish(LIMIT);
    assert_eq!(log.write_errors, 0, "no write failed: {}", log.end);
    assert_eq!(log.end, "stopped");
    let j = c.a.wait_in_sync("r1", LIMIT);
    assert!(j["synced_bytes"].as_u64().unwrap() >= dirty.min(MIB), "{j}");
    assert_eq!(c.data_diff("r1"), None, "legs byte-identical after resync");
    let check = check_records(&c.a.export_socket("r1"), "r1", &log);
    assert!(
        check.lost_acked.is_empty() && check.lost_flushed.is_empty() && check.torn_slots.is_empty(),
        "records: {check:?}"
    );
    assert!(alive(pid_b));
}

#[test]
fn sigstopped_secondary_memsync() {
    hung_secondary("memsync");
}

#[test]
fn sigstopped_secondary_fullsync() {
    hung_secondary("fullsync");
}
