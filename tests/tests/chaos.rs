//! A chaos run: two real hastd nodes (memsync, `timeout` 3) talking
//! through the fault-injecting proxies, a verifying record writer on the
//! primary's export, and a seeded random sequence of faults: kill -9 of
//! either node, partitions and heals, SIGSTOP/SIGCONT of either node and
//! planned role switches, and — where the fault-injecting disks of
//! `hast_tests::faulty` can be built (root, nbdkit, nbdfuse) — failing
//! disks: write errors on the secondary's disk (it detaches it; repaired
//! and re-attached with `role init` + `role secondary`), read and write
//! errors on the primary's disk (reads and writes go to the secondary; the
//! repaired disk is reopened with `role init` + `role primary` and
//! synchronised from the secondary). Every writer epoch (the stream between two
//! faults that end its connection) is read back from the primary: no
//! acknowledged or flushed record is missing, no write failed. At the end
//! the legs are byte-identical.
//!
//! `HAST_CHAOS_SECS` (default 120) sets the duration, `HAST_CHAOS_SEED`
//! the seed (default: from the clock; printed either way, and a run with
//! the same seed draws the same faults), `HAST_CHAOS_DISKS=0` leaves the
//! disk faults out. `scripts/chaos.sh DURATION`
//! runs it.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::failover::{check_records, RecordWriter, WriterLog};
use hast_tests::faulty::{FaultyDisk, FaultyOptions};
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
    secondary_disk_errors: u32,
    secondary_disk_detached: u32,
    primary_disk_errors: u32,
    epochs: u32,
    records_checked: u64,
}

struct Chaos {
    // Declared (so dropped) before the disks the nodes use.
    c: Cluster,
    /// nodeA's and nodeB's fault-injecting providers, when they exist.
    disks: Option<[FaultyDisk; 2]>,
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

    fn disk(&self, primary: bool) -> &FaultyDisk {
        let d = self.disks.as_ref().expect("faulty disks");
        &d[usize::from(primary != self.a_primary)]
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
        // An out-of-date primary reads what it lacks from the secondary
        // (docs/failover.md): wait for the connection, if it broke.
        self.primary().wait_list(RES, LIMIT, |j| {
            j["out_of_date"] != true || j["connected"] == true
        });
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

    /// Write errors on the secondary's disk for `d`: the primary goes on
    /// serving; a secondary that detached its disk is re-attached.
    fn secondary_disk_errors(&mut self, d: Duration) {
        self.counts.secondary_disk_errors += 1;
        self.disk(false).fail_writes(true);
        self.run_writes(d);
        self.disk(false).fail_writes(false);
        let s = self.secondary();
        if s.list(RES)["disk"] == "failed" {
            s.hastctl(&["role", "init", RES]);
            s.hastctl(&["role", "secondary", RES]);
            self.counts.secondary_disk_detached += 1;
        }
    }

    /// Read and write errors on the primary's disk for `d` while the
    /// secondary is connected: the primary detaches its disk and serves
    /// from the secondary, the epoch is read back through it; then the
    /// repaired disk is reopened and synchronised from the secondary.
    fn primary_disk_errors(&mut self, d: Duration) {
        self.counts.primary_disk_errors += 1;
        // Only with a connected secondary is a local write error hidden
        // from the client.
        self.primary().wait_in_sync(RES, LIMIT);
        self.disk(true).fail_writes(true);
        self.disk(true).fail_reads(true);
        self.run_writes(d);
        let l = self.primary().list(RES);
        let log = self.end_epoch(false);
        self.check(&log);
        self.disk(true).fail_writes(false);
        self.disk(true).fail_reads(false);
        if l["disk"] == "failed" || self.primary().list(RES)["disk"] == "failed" {
            let p = self.primary();
            p.hastctl(&["role", "init", RES]);
            p.role("primary", RES);
        }
        self.start_writer();
        // Written while the reopened disk is synchronised from the
        // secondary; the next fault comes once the copy is done (an
        // out-of-date primary refuses writes while its secondary is
        // away: docs/failover.md).
        self.run_writes(Duration::from_millis(500));
        self.primary()
            .wait_list(RES, LIMIT, |j| j["out_of_date"] == false);
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

    // Built first, dropped last (after the nodes).
    let disks = if std::env::var("HAST_CHAOS_DISKS").as_deref() == Ok("0") {
        None
    } else {
        let opts = FaultyOptions {
            size: 64 * MIB,
            ..Default::default()
        };
        FaultyDisk::new(opts.clone())
            .zip(FaultyDisk::new(opts))
            .map(|(a, b)| [a, b])
    };
    eprintln!(
        "chaos: {}",
        if disks.is_some() {
            "failing disks included"
        } else {
            "file providers, no disk faults"
        }
    );
    let mut c = Cluster::new(
        vec![ResourceDef::file(RES, 64 * MIB)],
        ClusterOptions {
            timeout_secs: 3,
            with_proxy: true,
            ..Default::default()
        },
    );
    if let Some(d) = &disks {
        for (node, disk) in [(&mut c.a, &d[0]), (&mut c.b, &d[1])] {
            node.resources[0].path = Some(disk.device());
            node.write_conf();
        }
    }
    c.create_all();
    c.start();
    c.b.hastctl(&["role", "secondary", RES]);
    c.a.role("primary", RES);
    c.a.wait_in_sync(RES, LIMIT);
    let mut ch = Chaos {
        c,
        disks,
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
        let kinds = if ch.disks.is_some() { 8 } else { 6 };
        let fault = rng.gen_range(0..kinds);
        eprintln!(
            "chaos: t={:?} fault {faults}: {}",
            start.elapsed(),
            [
                "kill -9 secondary",
                "kill -9 primary",
                "partition",
                "SIGSTOP secondary",
                "SIGSTOP primary",
                "role switch",
                "write errors on the secondary's disk",
                "read and write errors on the primary's disk",
            ][fault]
        );
        match fault {
            0 => ch.kill_secondary(ms(&mut rng, 0, 3000)),
            1 => ch.kill_primary(ms(&mut rng, 0, 2000)),
            2 => ch.partition(ms(&mut rng, 500, 6000)),
            3 => ch.stop_cont(false, ms(&mut rng, 500, 6000)),
            4 => ch.stop_cont(true, ms(&mut rng, 200, 2500)),
            5 => ch.switch(),
            6 => ch.secondary_disk_errors(ms(&mut rng, 200, 3000)),
            _ => ch.primary_disk_errors(ms(&mut rng, 200, 3000)),
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
