//! A chaos run: two real hastd nodes (memsync, `timeout` 3) talking
//! through the fault-injecting proxies, a verifying record writer on the
//! primary's export, and a seeded random sequence of faults: kill -9 of
//! either node, partitions and heals, SIGSTOP/SIGCONT of either node and
//! planned role switches. Every writer epoch (the stream between two
//! faults that end its connection) is read back from the primary: no
//! acknowledged or flushed record is missing, no write failed. At the end
//! the legs are byte-identical.
//!
//! `HAST_CHAOS_SECS` (default 120) sets the duration, `HAST_CHAOS_SEED`
//! the seed (default: from the clock; printed either way, and a run with
//! the same seed draws the same faults). `scripts/chaos.sh DURATION`
//! runs it.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::failover::{check_records, RecordWriter, WriterLog};
use hast_tests::*;

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(180);
const RES: &str = "r1";

#[derive(Default, Debug)]
struct Counts {
    kill_primary: u32,
    kill_secondary: u32,
    partitions: u32,
    stop_primary: u32,
    stop_secondary: u32,
    switches: u32,
    epochs: u32,
    records_checked: u64,
}

struct Chaos {
    c: Cluster,
    a_primary: bool,
    writer: Option<RecordWriter>,
    next_seq: u64,
    counts: Counts,
}

impl Chaos {
    fn primary(&mut self) -> &mut TestNode {
        if self.a_primary {
            &mut self.c.a
        } else {
            &mut self.c.b
        }
    }

    fn secondary(&mut self) -> &mut TestNode {
        if self.a_primary {
            &mut self.c.b
        } else {
            &mut self.c.a
        }
    }

    fn start_writer(&mut self) {
        let sock = self.primary().export_socket(RES);
        self.writer = Some(RecordWriter::start_from(&sock, RES, 8, 64, self.next_seq));
    }

    /// Ends the writer's epoch (stopping it unless `crashed`) and checks
    /// its records on the primary's export.
    fn end_epoch(&mut self, crashed: bool) -> WriterLog {
        let w = self.writer.take().expect("writer runs");
        if !crashed {
            w.stop();
        }
        let log = w.finish(LIMIT);
        self.next_seq = log.sent;
        assert_eq!(log.write_errors, 0, "a write failed ({})", log.end);
        if !crashed {
            assert_eq!(log.end, "stopped");
        }
        log
    }

    fn check(&mut self, log: &WriterLog) {
        let sock = self.primary().export_socket(RES);
        let check = check_records(&sock, RES, log);
        assert!(
            check.lost_acked.is_empty() && check.lost_flushed.is_empty(),
            "epoch {}: lost records: {check:?}",
            self.counts.epochs
        );
        self.counts.epochs += 1;
        self.counts.records_checked += log.acked;
    }

    /// Lets the writer run for a while and asserts it makes progress.
    fn run_writes(&mut self, d: Duration) {
        let before = self.writer.as_ref().expect("writer").acked();
        std::thread::sleep(d);
        let w = self.writer.as_ref().expect("writer");
        wait_until(LIMIT, "the writer progresses", || w.acked() > before);
    }

    fn restart(node: &mut TestNode) {
        let _ = std::fs::remove_file(node.export_socket(RES));
        node.try_start()
            .unwrap_or_else(|e| panic!("restart {}: {e}", node.name));
    }

    fn kill_secondary(&mut self, down: Duration) {
        self.counts.kill_secondary += 1;
        let s = self.secondary();
        s.kill9();
        std::thread::sleep(down);
        Chaos::restart(s);
        s.hastctl(&["role", "secondary", RES]);
    }

    fn kill_primary(&mut self, down: Duration) {
        self.counts.kill_primary += 1;
        self.primary().kill9();
        let log = self.end_epoch(true);
        std::thread::sleep(down);
        let p = self.primary();
        Chaos::restart(p);
        p.role("primary", RES);
        self.check(&log);
        self.start_writer();
    }

    fn partition(&mut self, d: Duration) {
        self.counts.partitions += 1;
        for p in [self.c.proxy_ab(), self.c.proxy_ba()] {
            p.expect("proxy").partition();
        }
        self.run_writes(d);
        for p in [self.c.proxy_ab(), self.c.proxy_ba()] {
            p.expect("proxy").heal();
        }
    }

    fn stop_cont(&mut self, primary: bool, d: Duration) {
        let pid = if primary {
            self.counts.stop_primary += 1;
            self.primary().pid()
        } else {
            self.counts.stop_secondary += 1;
            self.secondary().pid()
        }
        .expect("running");
        signal(pid, libc::SIGSTOP);
        std::thread::sleep(d);
        signal(pid, libc::SIGCONT);
    }

    fn switch(&mut self) {
        self.counts.switches += 1;
        let log = self.end_epoch(false);
        self.check(&log);
        self.primary().wait_in_sync(RES, LIMIT);
        self.primary().hastctl(&["role", "secondary", RES]);
        self.a_primary = !self.a_primary;
        self.primary().role("primary", RES);
        self.start_writer();
    }
}

#[test]
fn chaos() {
    let secs: u64 = std::env::var("HAST_CHAOS_SECS")
        .ok()
        .map(|s| s.parse().expect("HAST_CHAOS_SECS: seconds"))
        .unwrap_or(120);
    let seed: u64 = std::env::var("HAST_CHAOS_SEED")
        .ok()
        .map(|s| s.parse().expect("HAST_CHAOS_SEED: a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
        });
    eprintln!("chaos: seed {seed} (HAST_CHAOS_SEED={seed} replays the faults), {secs} s");
    let mut rng = StdRng::seed_from_u64(seed);

    let mut c = Cluster::new(
        vec![ResourceDef::file(RES, 64 * MIB)],
        ClusterOptions {
            timeout_secs: 3,
            with_proxy: true,
            ..Default::default()
        },
    );
    c.create_all();
    c.start();
    c.b.hastctl(&["role", "secondary", RES]);
    c.a.role("primary", RES);
    c.a.wait_in_sync(RES, LIMIT);
    let mut ch = Chaos {
        c,
        a_primary: true,
        writer: None,
        next_seq: 0,
        counts: Counts::default(),
    };
    ch.start_writer();

    let start = Instant::now();
    let mut faults = 0u32;
    while start.elapsed() < Duration::from_secs(secs) {
        ch.run_writes(Duration::from_millis(rng.gen_range(500..3000)));
        let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.gen_range(lo..hi));
        let fault = rng.gen_range(0..6);
        eprintln!(
            "chaos: t={:?} fault {faults}: {}",
            start.elapsed(),
            [
                "kill -9 secondary",
                "kill -9 primary",
                "partition",
                "SIGSTOP secondary",
                "SIGSTOP primary",
                "role switch"
            ][fault]
        );
        match fault {
            0 => ch.kill_secondary(ms(&mut rng, 0, 3000)),
            1 => ch.kill_primary(ms(&mut rng, 0, 2000)),
            2 => ch.partition(ms(&mut rng, 500, 6000)),
            3 => ch.stop_cont(false, ms(&mut rng, 500, 6000)),
            4 => ch.stop_cont(true, ms(&mut rng, 200, 2500)),
            _ => ch.switch(),
        }
        faults += 1;
    }

    // The end: everything healed, the pair in sync, the last epoch read
    // back, the legs byte-identical.
    ch.run_writes(Duration::from_millis(500));
    let log = ch.end_epoch(false);
    ch.primary().wait_in_sync(RES, LIMIT);
    ch.check(&log);
    assert_eq!(ch.c.data_diff(RES), None, "legs byte-identical");
    eprintln!(
        "chaos: seed {seed}: {faults} faults in {:?}: {:?}; legs identical, no record lost",
        start.elapsed(),
        ch.counts
    );
    assert!(faults > 0);
}
