//! The results of a harness run and their three forms: the printed table
//! (with ratios and the targets), JSON, and a markdown section for
//! docs/benchmarks.md.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use crate::fio::{self, FioResult};
use crate::machine::Machine;
use crate::procmon::Usage;
use crate::util::{human_size, GIB};

/// System name of the raw-disk rows.
pub const RAW: &str = "raw disk";
/// System name of the qemu-nbd rows.
pub const QEMU: &str = "qemu-nbd";

/// System name of hastd rows in a replication mode.
pub fn hastd(mode: &str) -> String {
    format!("hastd {mode}")
}

/// Workload key of the one-resource half of the two-resource test.
pub const ONE_RES: &str = "randwrite-4k-qd32-1res";
/// Workload key of the two-resource half.
pub const TWO_RES: &str = "randwrite-4k-qd32-2res";
/// Workload key of the application load while no sync runs.
pub const SYNC_IDLE: &str = "sync-app-idle";
/// Workload key of the application load during a full sync.
pub const SYNC_BUSY: &str = "sync-app-during-sync";

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

    /// The targets of the issue.
    pub fn checks(&self) -> Vec<Check> {
        let mut out = Vec::new();
        let q32 = fio::RANDWRITE_QD32.key;
        for mode in ["memsync", "fullsync"] {
            let h = self.row(&hastd(mode), q32);
            let q = self.row(QEMU, q32);
            out.push(Check {
                name: format!("4k randwrite QD32 IOPS, {mode} / qemu-nbd"),
                achieved: h.zip(q).map(|(h, q)| h.fio.iops / q.fio.iops),
                target: 1.5,
                at_most: false,
                detail: h
                    .zip(q)
                    .map(|(h, q)| format!("{:.0} vs {:.0} IOPS", h.fio.iops, q.fio.iops))
                    .unwrap_or_default(),
            });
        }
        let q1 = fio::RANDWRITE_QD1.key;
        let h = self.row(&hastd("fullsync"), q1);
        let q = self.row(QEMU, q1);
        out.push(Check {
            name: "4k randwrite QD1 p50 latency, fullsync / qemu-nbd".into(),
            achieved: h.zip(q).map(|(h, q)| h.fio.p50_us / q.fio.p50_us),
            target: 1.0,
            at_most: true,
            detail: h
                .zip(q)
                .map(|(h, q)| format!("{:.0} vs {:.0} µs", h.fio.p50_us, q.fio.p50_us))
                .unwrap_or_default(),
        });
        let seq = fio::SEQWRITE_1M.key;
        let raw = self.row(RAW, seq);
        let mut modes = self.modes();
        if modes.is_empty() {
            modes = vec!["memsync".into(), "fullsync".into(), "async".into()];
        }
        for mode in &modes {
            let h = self.row(&hastd(mode), seq);
            out.push(Check {
                name: format!("1M seq write MB/s, {mode} / (raw disk / 2)"),
                achieved: h
                    .zip(raw)
                    .map(|(h, r)| h.fio.mb_per_s / (r.fio.mb_per_s / 2.0)),
                target: 0.85,
                at_most: false,
                detail: h
                    .zip(raw)
                    .map(|(h, r)| format!("{:.0} vs {:.0}/2 MB/s", h.fio.mb_per_s, r.fio.mb_per_s))
                    .unwrap_or_default(),
            });
        }
        let s = self.sync.as_ref();
        out.push(Check {
            name: "full sync rate / local copy rate".into(),
            achieved: s
                .filter(|s| s.sync_s > 0.0 && s.local_copy_s > 0.0)
                .map(|s| s.sync_mb_s() / s.local_mb_s()),
            target: 0.8,
            at_most: false,
            detail: s
                .map(|s| format!("{:.0} vs {:.0} MB/s", s.sync_mb_s(), s.local_mb_s()))
                .unwrap_or_default(),
        });
        let busy = self.rows.iter().find(|r| r.workload == SYNC_BUSY);
        let idle = self.rows.iter().find(|r| r.workload == SYNC_IDLE);
        let overlap = s.map_or(0.0, |s| s.load_overlap);
        out.push(Check {
            name: match s {
                Some(s) => format!("app 4k randwrite QD{} IOPS during sync / idle", s.load_qd),
                None => "app 4k randwrite IOPS during sync / idle".into(),
            },
            achieved: busy.zip(idle).map(|(b, i)| b.fio.iops / i.fio.iops),
            target: 0.5,
            at_most: false,
            detail: busy
                .zip(idle)
                .map(|(b, i)| {
                    let mut d = format!("{:.0} vs {:.0} IOPS", b.fio.iops, i.fio.iops);
                    if overlap < 0.99 {
                        let _ = write!(
                            d,
                            "; sync ran for only {:.0}% of the window",
                            overlap * 100.0
                        );
                    }
                    d
                })
                .unwrap_or_default(),
        });
        let one = self.rows.iter().find(|r| r.workload == ONE_RES);
        let two = self.rows.iter().find(|r| r.workload == TWO_RES);
        out.push(Check {
            name: "4k randwrite QD32 IOPS, two resources / one".into(),
            achieved: one.zip(two).map(|(o, t)| t.fio.iops / o.fio.iops),
            target: 1.6,
            at_most: false,
            detail: one
                .zip(two)
                .map(|(o, t)| format!("{:.0} vs {:.0} IOPS", t.fio.iops, o.fio.iops))
                .unwrap_or_default(),
        });
        out
    }

    /// The printed report: table, sync, targets, CPU by thread.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "hast-bench {} — {}", self.date, self.machine.line());
        let _ = writeln!(
            o,
            "load average at the start {}, at the end {}",
            self.load.0, self.load.1
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{:<20} {:<26} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7} {:>7}",
            "system",
            "workload",
            "IOPS",
            "MB/s",
            "p50 µs",
            "p99 µs",
            "CPU s/GiB",
            "RSS MiB",
            "×qemu",
            "×raw"
        );
        for r in &self.rows {
            let [system, label, iops, mbs, p50, p99, cpu, rss, xq, xr] = self.cells(r);
            let _ = writeln!(
                o,
                "{system:<20} {label:<26} {iops:>9} {mbs:>8} {p50:>8} {p99:>8} {cpu:>9} {rss:>9} {xq:>7} {xr:>7}",
            );
        }
        if let Some(s) = &self.sync {
            let _ = writeln!(o);
            o.push_str(&sync_text(s));
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "targets:");
        for c in self.checks() {
            let _ = writeln!(
                o,
                "  {:<4} {:<52} {:>6} (target {} {}) {}",
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
    fn cells(&self, r: &Row) -> [String; 10] {
        [
            r.system.clone(),
            r.label.clone(),
            format!("{:.0}", r.fio.iops),
            format!("{:.1}", r.fio.mb_per_s),
            format!("{:.0}", r.fio.p50_us),
            format!("{:.0}", r.fio.p99_us),
            opt(r.cpu_s_per_gib(), 2),
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
                if let Some(a) = r.activemap_summary() {
                    let _ = writeln!(o, "{indent}{:<20} {:<26} {a}", "", "");
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
            })),
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
             during the job (primary/secondary for hastd); ×qemu and ×raw are IOPS \
             ratios with the same workload on qemu-nbd and on the raw disk."
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "| system | workload | IOPS | MB/s | p50 µs | p99 µs | CPU s/GiB | RSS MiB | ×qemu | ×raw |"
        );
        let _ = writeln!(o, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
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
}
