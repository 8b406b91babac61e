//! The results of a harness run and their three forms: the printed table
//! (with ratios and the targets), JSON, and a markdown section for
//! docs/benchmarks.md.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use crate::fio::{self, FioResult};
use crate::machine::Machine;
use crate::memory::MemoryModel;
use crate::procmon::Usage;
use crate::util::{human_size, GIB, MIB};

/// System name of the raw-disk rows.
pub const RAW: &str = "raw disk";
/// System name of the qemu-nbd rows.
pub const QEMU: &str = "qemu-nbd";

/// System name of hastd rows in a replication mode.
pub fn hastd(mode: &str) -> String {
    format!("hastd {mode}")
}

/// System name of the `security` part's rows: memsync over the link
/// variant `key` (`plain`, `secret`, `tls`).
pub fn secured(key: &str) -> String {
    format!("hastd memsync, {key}")
}

/// Workload key of the one-resource half of the two-resource test.
pub const ONE_RES: &str = "randwrite-4k-qd32-1res";
/// Workload key of the two-resource half.
pub const TWO_RES: &str = "randwrite-4k-qd32-2res";
/// Workload key of the application load while no sync runs.
pub const SYNC_IDLE: &str = "sync-app-idle";
/// Workload key of the application load during a full sync.
pub const SYNC_BUSY: &str = "sync-app-during-sync";
/// Workload key of 4k randwrite QD32 over the big working set (`--big-size`).
pub const BIG: &str = "randwrite-4k-qd32-big";

/// One measured job.
#[derive(Debug, Clone)]
pub struct Row {
    /// `raw disk`, `qemu-nbd`, `hastd memsync`, …
    pub system: String,
    /// Workload key.
    pub workload: String,
    /// Workload label for the table.
    pub label: String,
    /// fio's figures.
    pub fio: FioResult,
    /// The server processes' CPU and memory (None for the raw disk).
    pub usage: Option<Usage>,
    /// Whether the row is compared with qemu-nbd and the raw disk (the same
    /// workload on the same size).
    pub compare: bool,
    /// hastd's request counters during the job (`hastctl list`
    /// statistics, per node: reads, writes, flushes, activemap updates).
    pub counters: Option<serde_json::Value>,
    /// Resources configured on each hastd node (0: not hastd), for the
    /// memory bound.
    pub resources: u64,
}

impl Row {
    /// Activemap updates per write, per node: `A 0.42, B 0.40`.
    pub fn activemap_summary(&self) -> Option<String> {
        let c = self.counters.as_ref()?.as_object()?;
        let parts: Vec<String> = c
            .iter()
            .filter_map(|(node, v)| {
                let w = v["writes"].as_u64().filter(|&w| w > 0)?;
                let a = v["activemap_updates"].as_u64()?;
                Some(format!("{node} {:.3}", a as f64 / w as f64))
            })
            .collect();
        (!parts.is_empty()).then(|| format!("activemap updates/write: {}", parts.join(", ")))
    }
}

impl Row {
    /// Server CPU seconds per GiB moved by fio.
    pub fn cpu_s_per_gib(&self) -> Option<f64> {
        let u = self.usage.as_ref()?;
        (self.fio.io_bytes > 0).then(|| u.cpu_s() / (self.fio.io_bytes as f64 / GIB as f64))
    }

    /// System calls of one watched process (or, with None, of all of them)
    /// per request fio completed: the process's calls per second over the
    /// monitor's window divided by fio's IOPS.
    fn syscalls_per_request_of(&self, label: Option<&str>) -> Option<f64> {
        let u = self.usage.as_ref()?;
        let n = match label {
            None => u.syscalls()?,
            Some(l) => u.procs.iter().find(|p| p.label == l)?.syscalls?,
        };
        (u.window_s > 0.0 && self.fio.iops > 0.0).then(|| n as f64 / u.window_s / self.fio.iops)
    }

    /// System calls per request of all server processes together (both
    /// hastd nodes, or qemu-nbd).
    pub fn syscalls_per_request(&self) -> Option<f64> {
        self.syscalls_per_request_of(None)
    }

    /// System calls per request of each server process.
    pub fn syscalls_by_process(&self) -> Vec<(String, f64)> {
        let Some(u) = &self.usage else {
            return Vec::new();
        };
        u.procs
            .iter()
            .filter_map(|p| {
                Some((
                    p.label.clone(),
                    self.syscalls_per_request_of(Some(&p.label))?,
                ))
            })
            .collect()
    }

    /// `system calls/request: A 31.2 + B 19.0 = 50.2` (one process: `14.0`).
    pub fn syscalls_summary(&self) -> Option<String> {
        let total = self.syscalls_per_request()?;
        let each = self.syscalls_by_process();
        let parts = if each.len() > 1 {
            let e: Vec<String> = each.iter().map(|(l, v)| format!("{l} {v:.1}")).collect();
            format!("{} = {total:.1}", e.join(" + "))
        } else {
            format!("{total:.1}")
        };
        Some(format!("system calls/request: {parts}"))
    }
}

/// The full synchronisation test.
#[derive(Debug, Clone, Default)]
pub struct SyncResult {
    /// Replication mode.
    pub mode: String,
    /// Data area synchronised (bytes).
    pub size: u64,
    /// Rate of filling the primary's data area locally (MB/s).
    pub fill_mb_s: f64,
    /// Seconds `dd` took to copy the data area to a new file (O_DIRECT).
    pub local_copy_s: f64,
    /// Seconds from the connection to `dirty 0`, no sync in progress.
    pub sync_s: f64,
    /// Seconds from `hastctl role secondary` to the connection.
    pub connect_s: f64,
    /// hastd CPU and memory during the sync.
    pub usage: Option<Usage>,
    /// Seconds of the second full sync, with the application load on.
    pub loaded_sync_s: Option<f64>,
    /// Fraction of fio's measured window during which the sync was still
    /// running (1.0: the whole window).
    pub load_overlap: f64,
    /// Queue depth of the application load.
    pub load_qd: u32,
    /// Measured seconds of the application load.
    pub load_runtime: u32,
    /// Progress of both syncs and the application's IOPS over time.
    pub timeline: SyncTimeline,
}

/// Samples taken during the full syncs, in seconds from the connection.
#[derive(Debug, Clone, Default)]
pub struct SyncTimeline {
    /// (seconds, bytes synchronised so far) of the sync alone
    /// (`synced_bytes` of `hastctl list --json` on the primary).
    pub alone: Vec<(f64, u64)>,
    /// The same for the sync with the application load.
    pub loaded: Vec<(f64, u64)>,
    /// (seconds, IOPS) of the application load during that sync (fio's
    /// IOPS log, averaged over half a second).
    pub app_iops: Vec<(f64, f64)>,
}

impl SyncTimeline {
    /// JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "alone": self.alone.iter().map(|(t, b)| json!([t, b])).collect::<Vec<_>>(),
            "loaded": self.loaded.iter().map(|(t, b)| json!([t, b])).collect::<Vec<_>>(),
            "app_iops": self.app_iops.iter().map(|(t, i)| json!([t, i])).collect::<Vec<_>>(),
        })
    }
}

impl SyncResult {
    /// Local copy rate (MB/s).
    pub fn local_mb_s(&self) -> f64 {
        self.size as f64 / 1e6 / self.local_copy_s
    }

    /// Synchronisation rate (MB/s).
    pub fn sync_mb_s(&self) -> f64 {
        self.size as f64 / 1e6 / self.sync_s
    }

    /// hastd CPU seconds (both nodes) per GiB synchronised.
    pub fn cpu_s_per_gib(&self) -> Option<f64> {
        self.usage
            .as_ref()
            .map(|u| u.cpu_s() / (self.size as f64 / GIB as f64))
    }
}

/// Everything a run measured.
#[derive(Debug, Clone, Default)]
pub struct Results {
    /// UTC date and time of the start.
    pub date: String,
    /// The command line.
    pub command: String,
    /// The machine.
    pub machine: Machine,
    /// Parameters of the run.
    pub config: serde_json::Value,
    /// Measured jobs, in order.
    pub rows: Vec<Row>,
    /// The sync test, if it ran.
    pub sync: Option<SyncResult>,
    /// Parts that failed, with their error.
    pub errors: Vec<String>,
    /// /proc/loadavg (1, 5, 15 minutes) at the start and at the end: other
    /// work on the host makes the figures noisier.
    pub load: (String, String),
    /// The memory bound's terms (hastd's defaults).
    pub memory: MemoryModel,
    /// hastd nodes' resident memory idle after start, per part.
    pub idle: Vec<IdleRss>,
    /// Why system calls could not be counted, if they could not.
    pub syscalls_unavailable: Option<String>,
    /// Charts written for the docs (path relative to the docs file).
    pub charts: Vec<ChartRef>,
    /// Parts measured outside the job table (`resync`, `compression`):
    /// title, text table, JSON.
    pub extra: Vec<(String, String, serde_json::Value)>,
}

/// Resident memory of the hastd nodes of a part, idle after start.
#[derive(Debug, Clone)]
pub struct IdleRss {
    /// The part (`hastd memsync`, …).
    pub system: String,
    /// Resources configured on each node.
    pub resources: u64,
    /// (node label, VmRSS KiB).
    pub procs: Vec<(String, u64)>,
}

/// A chart written next to the docs.
#[derive(Debug, Clone)]
pub struct ChartRef {
    /// What it shows (the image's alternative text).
    pub title: String,
    /// Its path relative to the docs file (or absolute).
    pub link: String,
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One target of the issue and how this run did.
#[derive(Debug, Clone)]
pub struct Check {
    /// What is compared.
    pub name: String,
    /// The achieved ratio, None when a part did not run.
    pub achieved: Option<f64>,
    /// The target ratio.
    pub target: f64,
    /// The ratio must stay at or below the target (latency).
    pub at_most: bool,
    /// The figures behind the ratio.
    pub detail: String,
}

impl Check {
    /// `a / b` against `target` (`(target, at_most)`), with the figures
    /// behind it as `detail(a, b)`; n/a unless both are known and `b` is
    /// not zero.
    pub fn ratio(
        name: String,
        a: Option<f64>,
        b: Option<f64>,
        (target, at_most): (f64, bool),
        detail: impl Fn(f64, f64) -> String,
    ) -> Check {
        let ab = a.zip(b).filter(|&(_, b)| b > 0.0);
        Check {
            name,
            achieved: ab.map(|(a, b)| a / b),
            target,
            at_most,
            detail: ab.map(|(a, b)| detail(a, b)).unwrap_or_default(),
        }
    }

    /// PASS, MISS, or n/a.
    pub fn verdict(&self) -> &'static str {
        match self.achieved {
            None => "n/a",
            Some(a)
                if (self.at_most && a <= self.target) || (!self.at_most && a >= self.target) =>
            {
                "PASS"
            }
            Some(_) => "MISS",
        }
    }
}

impl Results {
    /// The row of a system and workload.
    pub fn row(&self, system: &str, workload: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.system == system && r.workload == workload)
    }

    /// IOPS of a row relative to the same workload on `base` (hastd rows
    /// against qemu-nbd and the raw disk, qemu-nbd rows against the raw
    /// disk).
    pub fn ratio(&self, r: &Row, base: &str) -> Option<f64> {
        if !r.compare || r.system == base || r.system == RAW {
            return None;
        }
        let b = self.row(base, &r.workload)?;
        (b.fio.iops > 0.0).then(|| r.fio.iops / b.fio.iops)
    }

    /// The hastd replication modes measured, in order.
    fn modes(&self) -> Vec<String> {
        let mut m: Vec<String> = Vec::new();
        for r in &self.rows {
            if let Some(mode) = r.system.strip_prefix("hastd ") {
                if r.compare && !m.iter().any(|x| x == mode) {
                    m.push(mode.to_owned());
                }
            }
        }
        m
    }

    /// The modes to check: those measured, or all three when none was (so
    /// that every target shows, as n/a).
    fn check_modes(&self) -> Vec<String> {
        let m = self.modes();
        if m.is_empty() {
            ["memsync", "fullsync", "async"].map(String::from).to_vec()
        } else {
            m
        }
    }

    /// A figure of the row of `system` and `workload`.
    fn figure(&self, system: &str, workload: &str, f: impl Fn(&Row) -> Option<f64>) -> Option<f64> {
        self.row(system, workload).and_then(f)
    }

    /// The targets of the issue.
    pub fn checks(&self) -> Vec<Check> {
        let mut out = Vec::new();
        let iops = |r: &Row| Some(r.fio.iops);
        let q32 = fio::RANDWRITE_QD32.key;
        let q1 = fio::RANDWRITE_QD1.key;
        let vs = |unit: &'static str, digits: usize| {
            move |a: f64, b: f64| format!("{a:.digits$} vs {b:.digits$} {unit}")
        };
        let big = self.row(QEMU, BIG).map_or_else(
            || "the big working set".to_owned(),
            |r| r.label.trim_start_matches("4k randwrite QD32, ").to_owned(),
        );
        for (w, over, target) in [
            (q32, String::new(), 1.5),
            (BIG, format!(" over {big}"), 1.0),
        ] {
            for mode in ["memsync", "fullsync"] {
                out.push(Check::ratio(
                    format!("4k randwrite QD32 IOPS{over}, {mode} / qemu-nbd"),
                    self.figure(&hastd(mode), w, iops),
                    self.figure(QEMU, w, iops),
                    (target, false),
                    vs("IOPS", 0),
                ));
            }
        }
        let p50 = |r: &Row| Some(r.fio.p50_us);
        out.push(Check::ratio(
            "4k randwrite QD1 p50 latency, fullsync / qemu-nbd".into(),
            self.figure(&hastd("fullsync"), q1, p50),
            self.figure(QEMU, q1, p50),
            (1.0, true),
            vs("µs", 0),
        ));
        let modes = self.check_modes();
        for mode in &modes {
            out.push(Check::ratio(
                format!("system calls per 4k QD1 write, {mode} (both nodes) / qemu-nbd"),
                self.figure(&hastd(mode), q1, Row::syscalls_per_request),
                self.figure(QEMU, q1, Row::syscalls_per_request),
                (1.0, true),
                vs("calls", 1),
            ));
        }
        for (w, label, target) in [(q32, "QD32", 1.5), (q1, "QD1", 2.0)] {
            for mode in &modes {
                out.push(Check::ratio(
                    format!("server CPU per GiB, 4k randwrite {label}, {mode} / qemu-nbd"),
                    self.figure(&hastd(mode), w, Row::cpu_s_per_gib),
                    self.figure(QEMU, w, Row::cpu_s_per_gib),
                    (target, true),
                    vs("s/GiB", 2),
                ));
            }
        }
        let seq = fio::SEQWRITE_1M.key;
        let mb = |r: &Row| Some(r.fio.mb_per_s);
        for mode in &modes {
            out.push(Check::ratio(
                format!("1M seq write MB/s, {mode} / (raw disk / 2)"),
                self.figure(&hastd(mode), seq, mb),
                self.figure(RAW, seq, mb).map(|r| r / 2.0),
                (0.85, false),
                |a, b| format!("{a:.0} vs {:.0}/2 MB/s", b * 2.0),
            ));
        }
        let one = self.rows.iter().find(|r| r.workload == ONE_RES);
        let two = self.rows.iter().find(|r| r.workload == TWO_RES);
        out.push(Check::ratio(
            "4k randwrite QD32 IOPS, two resources / one".into(),
            two.map(|r| r.fio.iops),
            one.map(|r| r.fio.iops),
            (1.6, false),
            vs("IOPS", 0),
        ));
        out.extend(self.memory_checks());
        let s = self.sync.as_ref();
        out.push(Check::ratio(
            "full sync rate / local copy rate".into(),
            s.filter(|s| s.sync_s > 0.0).map(SyncResult::sync_mb_s),
            s.filter(|s| s.local_copy_s > 0.0)
                .map(SyncResult::local_mb_s),
            (0.8, false),
            vs("MB/s", 0),
        ));
        let busy = self.rows.iter().find(|r| r.workload == SYNC_BUSY);
        let idle = self.rows.iter().find(|r| r.workload == SYNC_IDLE);
        let overlap = s.map_or(0.0, |s| s.load_overlap);
        out.push(Check::ratio(
            match s {
                Some(s) => format!("app 4k randwrite QD{} IOPS during sync / idle", s.load_qd),
                None => "app 4k randwrite IOPS during sync / idle".into(),
            },
            busy.map(|r| r.fio.iops),
            idle.map(|r| r.fio.iops),
            (0.5, false),
            |b, i| {
                let mut d = format!("{b:.0} vs {i:.0} IOPS");
                if overlap < 0.99 {
                    let _ = write!(
                        d,
                        "; sync ran for only {:.0}% of the window",
                        overlap * 100.0
                    );
                }
                d
            },
        ));
        out
    }

    /// The highest idle RSS of any node per resource count, against the
    /// bound's idle part: `16 MiB with 1 resource (allowed 20), …`.
    pub fn idle_summary(&self) -> String {
        let mut by_count: Vec<(u64, u64)> = Vec::new();
        for i in &self.idle {
            let top = i.procs.iter().map(|p| p.1).max().unwrap_or(0);
            match by_count.iter_mut().find(|(r, _)| *r == i.resources) {
                Some(e) => e.1 = e.1.max(top),
                None => by_count.push((i.resources, top)),
            }
        }
        by_count.sort_unstable();
        by_count
            .iter()
            .map(|&(r, kib)| {
                format!(
                    "{:.0} MiB with {r} resource{} (allowed {:.0})",
                    kib as f64 / 1024.0,
                    if r == 1 { "" } else { "s" },
                    self.memory.idle(r) as f64 / MIB as f64
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every hastd node's peak resident memory in every job against the
    /// bound of its configuration ([`crate::memory`]), and the bound of the
    /// default configuration against the issue's 128 MiB.
    fn memory_checks(&self) -> [Check; 2] {
        // (peak / bound, peak KiB, bound, process, job)
        let mut worst: Option<(f64, u64, u64, String, String)> = None;
        let jobs = self
            .rows
            .iter()
            .filter(|r| r.resources > 0)
            .filter_map(|r| {
                Some((
                    r.usage.as_ref()?,
                    r.resources,
                    format!("{} {}", r.system, r.label),
                ))
            })
            .chain(self.sync.iter().filter_map(|s| {
                Some((
                    s.usage.as_ref()?,
                    1,
                    format!("{} full sync", hastd(&s.mode)),
                ))
            }));
        for (u, resources, job) in jobs {
            let bound = self.memory.bound(resources);
            for p in &u.procs {
                let ratio = (p.peak_kib() * 1024) as f64 / bound as f64;
                if worst.as_ref().is_none_or(|w| ratio > w.0) {
                    worst = Some((ratio, p.peak_kib(), bound, p.label.clone(), job.clone()));
                }
            }
        }
        let idle = self.idle_summary();
        let peak = Check {
            name: "peak RSS / memory bound, every hastd node and job".into(),
            achieved: worst.as_ref().map(|w| w.0),
            target: 1.0,
            at_most: true,
            detail: worst
                .map(|(_, kib, bound, proc, job)| {
                    let mut d = format!(
                        "highest: {proc} {:.0} MiB in {job}, bound {:.0} MiB",
                        kib as f64 / 1024.0,
                        bound as f64 / MIB as f64
                    );
                    if !idle.is_empty() {
                        let _ = write!(d, "; idle after start: {idle}");
                    }
                    d
                })
                .unwrap_or_default(),
        };
        let limit = 128 * MIB;
        let default = Check {
            name: "memory bound per node, one resource, defaults / 128 MiB".into(),
            achieved: Some(self.memory.bound(1) as f64 / limit as f64),
            target: 1.0,
            at_most: true,
            detail: self.memory.describe(1),
        };
        [peak, default]
    }

    /// The printed report: table, sync, targets, CPU by thread.
    pub fn text(&self) -> String {
        let mut o = String::new();
        for (title, table, _) in &self.extra {
            let _ = writeln!(o, "{title}\n{table}");
        }
        let _ = writeln!(o, "hast-bench {} — {}", self.date, self.machine.line());
        let _ = writeln!(
            o,
            "load average at the start {}, at the end {}",
            self.load.0, self.load.1
        );
        let _ = writeln!(o);
        let header = COLUMNS.map(|(name, _)| name.to_owned());
        let _ = writeln!(o, "{}", text_line(&header));
        for r in &self.rows {
            let _ = writeln!(o, "{}", text_line(&self.cells(r)));
        }
        let _ = writeln!(
            o,
            "(sc/req: server system calls per request, both hastd nodes together{})",
            self.syscalls_unavailable
                .as_ref()
                .map(|why| format!("; not counted here: {why}"))
                .unwrap_or_default()
        );
        if let Some(s) = &self.sync {
            let _ = writeln!(o);
            o.push_str(&sync_text(s));
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "targets:");
        for c in self.checks() {
            let _ = writeln!(
                o,
                "  {:<4} {:<64} {:>6} (target {} {}) {}",
                c.verdict(),
                c.name,
                opt(c.achieved, 2),
                if c.at_most { "≤" } else { "≥" },
                c.target,
                c.detail
            );
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "server CPU by thread in each job (A = primary hastd, B = secondary):"
        );
        self.cpu_by_thread(&mut o, "  ", 4);
        for e in &self.errors {
            let _ = writeln!(o, "\nFAILED: {e}");
        }
        o
    }

    /// The table cells of a row, formatted (the text and Markdown tables
    /// only differ in layout).
    fn cells(&self, r: &Row) -> [String; 11] {
        [
            r.system.clone(),
            r.label.clone(),
            format!("{:.0}", r.fio.iops),
            format!("{:.1}", r.fio.mb_per_s),
            format!("{:.0}", r.fio.p50_us),
            format!("{:.0}", r.fio.p99_us),
            opt(r.cpu_s_per_gib(), 2),
            match (r.usage.is_some(), r.syscalls_per_request()) {
                (_, Some(v)) => format!("{v:.1}"),
                (true, None) => "n/a".into(),
                (false, None) => "-".into(),
            },
            r.usage.as_ref().map_or("-".into(), Usage::rss_mib),
            opt(self.ratio(r, QEMU), 2),
            opt(self.ratio(r, RAW), 2),
        ]
    }

    /// One line per job with server CPU by thread (the `top` busiest
    /// threads of each process), then its activemap line, then the sync.
    fn cpu_by_thread(&self, o: &mut String, indent: &str, top: usize) {
        for r in &self.rows {
            if let Some(u) = &r.usage {
                let _ = writeln!(
                    o,
                    "{indent}{:<20} {:<26} {}",
                    r.system,
                    r.label,
                    u.threads_summary(top)
                );
                for line in [r.syscalls_summary(), r.activemap_summary()]
                    .into_iter()
                    .flatten()
                {
                    let _ = writeln!(o, "{indent}{:<20} {:<26} {line}", "", "");
                }
            }
        }
        if let Some(u) = self.sync.as_ref().and_then(|s| s.usage.as_ref()) {
            let _ = writeln!(
                o,
                "{indent}{:<20} {:<26} {}",
                "hastd",
                "full sync",
                u.threads_summary(top)
            );
        }
    }

    /// JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "extra": self.extra.iter().map(|(t, _, j)| json!({"part": t, "results": j})).collect::<Vec<_>>(),
            "date": self.date,
            "command": self.command,
            "machine": self.machine.to_json(),
            "config": self.config,
            "results": self.rows.iter().map(|r| json!({
                "system": r.system,
                "workload": r.workload,
                "label": r.label,
                "fio": r.fio.to_json(),
                "server": r.usage.as_ref().map(Usage::to_json),
                "cpu_s_per_gib": r.cpu_s_per_gib(),
                "syscalls_per_request": r.syscalls_per_request(),
                "syscalls_per_request_by_process": r
                    .syscalls_by_process()
                    .into_iter()
                    .map(|(l, v)| (l, json!(v)))
                    .collect::<serde_json::Map<String, serde_json::Value>>(),
                "resources": r.resources,
                "memory_bound": (r.resources > 0).then(|| self.memory.bound(r.resources)),
                "vs_qemu_nbd": self.ratio(r, QEMU),
                "vs_raw": self.ratio(r, RAW),
                "hastd_counters": r.counters,
            })).collect::<Vec<_>>(),
            "sync": self.sync.as_ref().map(|s| json!({
                "mode": s.mode,
                "size": s.size,
                "fill_mb_per_s": s.fill_mb_s,
                "local_copy_s": s.local_copy_s,
                "local_copy_mb_per_s": s.local_mb_s(),
                "sync_s": s.sync_s,
                "sync_mb_per_s": s.sync_mb_s(),
                "connect_s": s.connect_s,
                "cpu_s_per_gib": s.cpu_s_per_gib(),
                "server": s.usage.as_ref().map(Usage::to_json),
                "loaded_sync_s": s.loaded_sync_s,
                "load_overlap": s.load_overlap,
                "load_qd": s.load_qd,
                "load_runtime": s.load_runtime,
                "timeline": s.timeline.to_json(),
            })),
            "memory_model": self.memory.to_json(),
            "idle_rss": self.idle.iter().map(|i| json!({
                "system": i.system,
                "resources": i.resources,
                "rss_kib": i.procs.iter().map(|(l, k)| (l.clone(), json!(k)))
                    .collect::<serde_json::Map<String, serde_json::Value>>(),
            })).collect::<Vec<_>>(),
            "syscalls_unavailable": self.syscalls_unavailable,
            "charts": self.charts.iter().map(|c| json!({"title": c.title, "link": c.link}))
                .collect::<Vec<_>>(),
            "targets": self.checks().iter().map(|c| json!({
                "name": c.name,
                "achieved": c.achieved,
                "target": c.target,
                "at_most": c.at_most,
                "verdict": c.verdict(),
                "detail": c.detail,
            })).collect::<Vec<_>>(),
            "errors": self.errors,
            "loadavg": {"start": self.load.0, "end": self.load.1},
        })
    }

    /// The markdown section for docs/benchmarks.md (between markers).
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let day = self.date.get(..10).unwrap_or(&self.date);
        let _ = writeln!(o, "{BEGIN}");
        let _ = writeln!(o, "## Harness run ({day})");
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "Generated by `hast-bench`; a new run replaces this section."
        );
        let _ = writeln!(o);
        let _ = writeln!(o, "- Machine: {}.", self.machine.line());
        let _ = writeln!(o, "- Command: `{}` ({} UTC).", self.command, self.date);
        let _ = writeln!(o, "- Parameters: `{}`.", self.config);
        let _ = writeln!(
            o,
            "- Load average (1/5/15 min) at the start {}, at the end {}.",
            self.load.0, self.load.1
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "IOPS and MB/s count reads and writes; latencies are fio's completion \
             latencies; CPU s/GiB is the server's CPU time (utime + stime of both \
             hastd, or qemu-nbd) per GiB moved by fio; RSS is the peak VmRSS sampled \
             during the job (primary/secondary for hastd); sc/req is the server's \
             system calls (both hastd nodes together, or qemu-nbd) per request in the \
             same window (a `raw_syscalls:sys_enter` counter per thread); ×qemu and \
             ×raw are IOPS ratios with the same workload on qemu-nbd and on the raw disk. \
             The memory bound of each node is {} per resource configured \
             (baseline + idle per resource + export buffer budget + replication window \
             + sync chunks; see bench/src/memory.rs).",
            self.memory.describe(1)
        );
        if let Some(why) = &self.syscalls_unavailable {
            let _ = writeln!(o);
            let _ = writeln!(o, "System calls were not counted (n/a): {why}.");
        }
        let _ = writeln!(o);
        let header = COLUMNS.map(|(name, _)| name);
        let align = COLUMNS.map(|(_, w)| if w < 0 { "---" } else { "---:" });
        let _ = writeln!(o, "| {} |", header.join(" | "));
        let _ = writeln!(o, "|{}|", align.join("|"));
        for r in &self.rows {
            let _ = writeln!(o, "| {} |", self.cells(r).join(" | "));
        }
        if let Some(s) = &self.sync {
            let _ = writeln!(o);
            let _ = writeln!(o, "Full synchronisation ({}):", s.mode);
            let _ = writeln!(o);
            let _ = writeln!(o, "```text");
            o.push_str(&sync_text(s));
            let _ = writeln!(o, "```");
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "Targets:");
        let _ = writeln!(o);
        let _ = writeln!(o, "| target | achieved | wanted | verdict | figures |");
        let _ = writeln!(o, "|---|---:|---:|---|---|");
        for c in self.checks() {
            let _ = writeln!(
                o,
                "| {} | {} | {} {} | {} | {} |",
                c.name,
                opt(c.achieved, 2),
                if c.at_most { "≤" } else { "≥" },
                c.target,
                c.verdict(),
                c.detail
            );
        }
        if !self.charts.is_empty() {
            let _ = writeln!(o);
            let _ = writeln!(o, "Charts:");
            for c in &self.charts {
                let _ = writeln!(o);
                let _ = writeln!(o, "![{}]({})", c.title, c.link);
            }
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "Server CPU by thread (seconds in each job's measured window; A = primary, B = secondary):");
        let _ = writeln!(o);
        let _ = writeln!(o, "```text");
        self.cpu_by_thread(&mut o, "", 3);
        let _ = writeln!(o, "```");
        for e in &self.errors {
            let _ = writeln!(
                o,
                "\nFailed: `{}`",
                e.replace('`', "'").lines().next().unwrap_or("")
            );
        }
        let _ = writeln!(o, "{END}");
        o
    }

    /// Replaces the generated section of `path` (or appends it).
    pub fn update_docs(&self, path: &Path) -> std::io::Result<()> {
        let old = std::fs::read_to_string(path).unwrap_or_default();
        let new = splice(&old, &self.markdown());
        std::fs::write(path, new)
    }
}

/// The table's columns: name and text width (negative: left-aligned).
const COLUMNS: [(&str, i32); 11] = [
    ("system", -20),
    ("workload", -26),
    ("IOPS", 9),
    ("MB/s", 8),
    ("p50 µs", 8),
    ("p99 µs", 8),
    ("CPU s/GiB", 9),
    ("sc/req", 7),
    ("RSS MiB", 9),
    ("×qemu", 7),
    ("×raw", 7),
];

/// One line of the text table.
fn text_line(cells: &[String; 11]) -> String {
    let parts: Vec<String> = cells
        .iter()
        .zip(COLUMNS)
        .map(|(c, (_, w))| {
            let n = w.unsigned_abs() as usize;
            if w < 0 {
                format!("{c:<n$}")
            } else {
                format!("{c:>n$}")
            }
        })
        .collect();
    parts.join(" ").trim_end().to_owned()
}

const BEGIN: &str = "<!-- hast-bench: begin generated section -->";
const END: &str = "<!-- hast-bench: end generated section -->";

/// `doc` with the generated section replaced by `section` (which includes
/// its markers), or with `section` appended.
fn splice(doc: &str, section: &str) -> String {
    if let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) {
        if b < e {
            let after = &doc[e + END.len()..];
            let after = after.strip_prefix('\n').unwrap_or(after);
            return format!("{}{section}{after}", &doc[..b]);
        }
    }
    let mut out = doc.trim_end().to_owned();
    if !out.is_empty() {
        out.push_str("\n\n");
    }
    out.push_str(section);
    out
}

fn sync_text(s: &SyncResult) -> String {
    let mut o = String::new();
    let size = human_size(s.size);
    let _ = writeln!(
        o,
        "full sync of {size}: local copy (dd | dd, O_DIRECT, 4 MiB) {:.1} s = {:.0} MB/s; \
         hastd {:.1} s = {:.0} MB/s (×{:.2}); CPU {} s/GiB; RSS {} MiB",
        s.local_copy_s,
        s.local_mb_s(),
        s.sync_s,
        s.sync_mb_s(),
        s.sync_mb_s() / s.local_mb_s(),
        opt(s.cpu_s_per_gib(), 2),
        s.usage.as_ref().map_or("-".into(), Usage::rss_mib),
    );
    let _ = writeln!(
        o,
        "  (filling the primary locally ran at {:.0} MB/s; connecting took {:.1} s after `role secondary`)",
        s.fill_mb_s, s.connect_s
    );
    if let Some(l) = s.loaded_sync_s {
        let _ = writeln!(
            o,
            "  with 4k randwrite QD{} for {} s on the export: sync {:.1} s = {:.0} MB/s; \
             the sync ran during {:.0}% of the load's window",
            s.load_qd,
            s.load_runtime,
            l,
            s.size as f64 / 1e6 / l,
            s.load_overlap * 100.0
        );
    }
    o
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_appends_then_replaces() {
        let doc = "# Benchmarks\n\nhistory\n";
        let s1 = format!("{BEGIN}\none\n{END}\n");
        let d1 = splice(doc, &s1);
        assert_eq!(d1, format!("# Benchmarks\n\nhistory\n\n{s1}"));
        let s2 = format!("{BEGIN}\ntwo\n{END}\n");
        let d2 = splice(&format!("{d1}\ntrailer\n"), &s2);
        assert_eq!(d2, format!("# Benchmarks\n\nhistory\n\n{s2}\ntrailer\n"));
    }

    fn row(system: &str, w: &fio::Workload, iops: f64, p50: f64, mb: f64) -> Row {
        Row {
            system: system.into(),
            workload: w.key.into(),
            label: w.label.into(),
            fio: FioResult {
                iops,
                p50_us: p50,
                mb_per_s: mb,
                io_bytes: GIB,
                ..Default::default()
            },
            usage: None,
            compare: true,
            counters: None,
            resources: 0,
        }
    }

    #[test]
    fn checks_compute_ratios() {
        let r = Results {
            rows: vec![
                row(QEMU, &fio::RANDWRITE_QD32, 20000.0, 1000.0, 80.0),
                row(
                    &hastd("memsync"),
                    &fio::RANDWRITE_QD32,
                    40000.0,
                    500.0,
                    160.0,
                ),
                row(RAW, &fio::SEQWRITE_1M, 1000.0, 0.0, 1000.0),
                row(&hastd("memsync"), &fio::SEQWRITE_1M, 400.0, 0.0, 400.0),
            ],
            ..Default::default()
        };
        let c = r.checks();
        let memsync = c
            .iter()
            .find(|c| c.name.contains("QD32 IOPS, memsync"))
            .unwrap();
        assert_eq!(memsync.achieved, Some(2.0));
        assert_eq!(memsync.verdict(), "PASS");
        let fullsync = c
            .iter()
            .find(|c| c.name.contains("QD32 IOPS, fullsync"))
            .unwrap();
        assert_eq!(fullsync.verdict(), "n/a");
        let seq = c
            .iter()
            .find(|c| c.name.contains("1M seq write MB/s, memsync"))
            .unwrap();
        assert_eq!(seq.achieved, Some(0.8));
        assert_eq!(seq.verdict(), "MISS");
        assert_eq!(r.ratio(&r.rows[1], QEMU), Some(2.0));
        assert_eq!(r.ratio(&r.rows[0], QEMU), None);
    }

    /// A server process's usage: `cpu_s` CPU seconds, `syscalls` calls
    /// over a window of `window_s`, peak RSS `peak_mib`.
    fn proc_usage(
        label: &str,
        cpu_s: f64,
        syscalls: u64,
        peak_mib: u64,
    ) -> crate::procmon::ProcUsage {
        crate::procmon::ProcUsage {
            label: label.into(),
            cpu_s,
            rss_peak_kib: peak_mib * 1024,
            syscalls: Some(syscalls),
            ..Default::default()
        }
    }

    fn with_usage(mut r: Row, procs: Vec<crate::procmon::ProcUsage>, resources: u64) -> Row {
        r.usage = Some(Usage {
            procs,
            window_s: 2.0,
        });
        r.resources = resources;
        r
    }

    fn find<'a>(c: &'a [Check], name: &str) -> &'a Check {
        c.iter()
            .find(|c| c.name.contains(name))
            .unwrap_or_else(|| panic!("no check {name:?}"))
    }

    #[test]
    fn system_call_and_cpu_targets() {
        let q1 = &fio::RANDWRITE_QD1;
        // qemu-nbd: 10,000 IOPS, 300,000 calls in 2 s: 15 per request,
        // 1 CPU s per 1 GiB.
        let qemu = with_usage(
            row(QEMU, q1, 10000.0, 70.0, 40.0),
            vec![proc_usage("qemu-nbd", 1.0, 300_000, 8)],
            0,
        );
        // hastd: 2,000 IOPS; A 100,000 + B 60,000 calls in 2 s: 25 + 15.
        let h = with_usage(
            row(&hastd("fullsync"), q1, 2000.0, 140.0, 8.0),
            vec![
                proc_usage("A", 1.5, 100_000, 20),
                proc_usage("B", 0.5, 60_000, 30),
            ],
            1,
        );
        let r = Results {
            rows: vec![qemu, h],
            ..Default::default()
        };
        assert_eq!(r.rows[1].syscalls_per_request(), Some(40.0));
        assert_eq!(
            r.rows[1].syscalls_summary().as_deref(),
            Some("system calls/request: A 25.0 + B 15.0 = 40.0")
        );
        let c = r.checks();
        let sc = find(&c, "system calls per 4k QD1 write, fullsync");
        assert_eq!(sc.achieved, Some(40.0 / 15.0));
        assert_eq!(
            (sc.verdict(), sc.detail.as_str()),
            ("MISS", "40.0 vs 15.0 calls")
        );
        let cpu = find(&c, "server CPU per GiB, 4k randwrite QD1, fullsync");
        assert_eq!(cpu.achieved, Some(2.0));
        assert_eq!(cpu.verdict(), "PASS");
        assert_eq!(find(&c, "QD32, fullsync / qemu-nbd").verdict(), "n/a");
        assert_eq!(find(&c, "p50 latency, fullsync").achieved, Some(2.0));
        // Only the measured mode has rows: no memsync/async system-call rows.
        assert!(!c.iter().any(|c| c.name.contains("QD1 write, memsync")));
    }

    #[test]
    fn memory_targets() {
        let w = &fio::RANDWRITE_QD32;
        let m = MemoryModel::default();
        let mut r = Results {
            rows: vec![
                with_usage(
                    row(&hastd("async"), w, 1.0, 1.0, 1.0),
                    vec![proc_usage("A", 1.0, 0, 40), proc_usage("B", 1.0, 0, 50)],
                    1,
                ),
                // Two resources: twice the budgets.
                with_usage(
                    row(&hastd("async"), &fio::SEQWRITE_1M, 1.0, 1.0, 1.0),
                    vec![proc_usage("A", 1.0, 0, 150), proc_usage("B", 1.0, 0, 30)],
                    2,
                ),
            ],
            idle: vec![IdleRss {
                system: hastd("async"),
                resources: 1,
                procs: vec![("A".into(), 16 * 1024), ("B".into(), 15 * 1024)],
            }],
            ..Default::default()
        };
        let c = r.checks();
        let peak = find(&c, "peak RSS / memory bound");
        assert_eq!(peak.achieved, Some(150.0 * MIB as f64 / m.bound(2) as f64));
        assert_eq!(peak.verdict(), "PASS");
        assert!(peak
            .detail
            .starts_with("highest: A 150 MiB in hastd async 1M seq write QD8"));
        assert!(peak
            .detail
            .ends_with("idle after start: 16 MiB with 1 resource (allowed 20)"));
        let default = find(&c, "memory bound per node");
        assert_eq!(
            default.achieved,
            Some(m.bound(1) as f64 / (128 * MIB) as f64)
        );
        assert_eq!(default.detail, m.describe(1));
        r.rows[0].usage.as_mut().unwrap().procs[1].hwm_kib = m.bound(1) / 1024 + 1;
        assert_eq!(
            find(&r.checks(), "peak RSS / memory bound").verdict(),
            "MISS"
        );
    }

    #[test]
    fn big_working_set_rows_compare_with_qemu() {
        let w = &fio::RANDWRITE_QD32;
        let big = |system: &str, iops: f64| Row {
            workload: BIG.into(),
            label: "4k randwrite QD32, 8 GiB".into(),
            ..row(system, w, iops, 1.0, 1.0)
        };
        let r = Results {
            rows: vec![big(QEMU, 20000.0), big(&hastd("memsync"), 25000.0)],
            ..Default::default()
        };
        let c = r.checks();
        let m = find(&c, "over 8 GiB, memsync");
        assert_eq!((m.achieved, m.verdict()), (Some(1.25), "PASS"));
        assert_eq!(find(&c, "over 8 GiB, fullsync").verdict(), "n/a");
        // The 2 GiB target is not fed by the big rows.
        assert_eq!(find(&c, "QD32 IOPS, memsync / qemu-nbd").verdict(), "n/a");
        assert_eq!(r.ratio(&r.rows[1], QEMU), Some(1.25));
    }
}
