//! CPU time and memory of server processes (hastd, qemu-nbd) during a
//! benchmark job, read from /proc.
//!
//! A [`Monitor`] samples every watched process every 100 ms: resident
//! memory (VmRSS, peak kept) and, once the fio ramp is over and again at
//! the end, CPU time (utime + stime of /proc/PID/stat, all threads) and the
//! CPU time of each thread (/proc/PID/task/TID/stat), so that the job's CPU
//! covers the same window as fio's figures; over the same window it counts
//! each process's system calls ([`crate::syscalls`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::syscalls::SyscallCounter;

/// Clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`, 100 if
/// that fails).
pub fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        crate::util::command_line("getconf", &["CLK_TCK"])
            .parse()
            .unwrap_or(100.0)
    })
}

/// The name, utime and stime (ticks) from a `stat` file's text.
fn parse_stat_split(text: &str) -> Option<(String, u64, u64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // f[0] is field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((comm, utime, stime))
}

/// utime + stime (ticks) and the name from a `stat` file's text.
fn parse_stat(text: &str) -> Option<(String, u64)> {
    parse_stat_split(text).map(|(c, u, s)| (c, u + s))
}

/// CPU ticks (all threads) of a process.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    cpu_split(pid).map(|(u, s)| u + s)
}

/// (utime, stime) ticks (all threads) of a process.
pub fn cpu_split(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_split(&text).map(|(_, u, s)| (u, s))
}

/// (tid, name, ticks) of every thread of a process.
pub fn thread_ticks(pid: u32) -> Vec<(u32, String, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let tid: u32 = e.file_name().to_str()?.parse().ok()?;
        let text = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let (comm, t) = parse_stat(&text)?;
        Some((tid, comm, t))
    })
    .collect()
}

/// A thread name without the thread id the kernel's io_uring workers
/// carry (`iou-wrk-1234` → `iou-wrk`), so that workers add up.
fn thread_kind(name: &str) -> String {
    for p in ["iou-wrk-", "iou-sqp-"] {
        if let Some(rest) = name.strip_prefix(p) {
            if rest.bytes().all(|b| b.is_ascii_digit()) {
                return p.trim_end_matches('-').to_owned();
            }
        }
    }
    name.to_owned()
}

/// (VmRSS, VmHWM) in KiB.
pub fn mem_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// A process to watch, with a label for the report ("A", "B", "qemu-nbd").
#[derive(Debug, Clone)]
pub struct Watched {
    /// Label.
    pub label: String,
    /// PID.
    pub pid: u32,
}

impl Watched {
    /// A labelled PID.
    pub fn new(label: &str, pid: u32) -> Watched {
        Watched {
            label: label.into(),
            pid,
        }
    }
}

/// What one process used during a job.
#[derive(Debug, Clone, Default)]
pub struct ProcUsage {
    /// Label.
    pub label: String,
    /// CPU seconds in the measured window (after the ramp).
    pub cpu_s: f64,
    /// Of which in the kernel (stime).
    pub sys_s: f64,
    /// Highest VmRSS sampled during the job (KiB).
    pub rss_peak_kib: u64,
    /// VmHWM at the end of the job (KiB): the peak since the process
    /// started.
    pub hwm_kib: u64,
    /// CPU seconds per thread name in the window, largest first.
    pub threads: Vec<(String, f64)>,
    /// System calls in the window (None: not countable here).
    pub syscalls: Option<u64>,
}

impl ProcUsage {
    /// The peak resident memory seen (KiB): the highest VmRSS sampled or,
    /// if higher, VmHWM (which no sampling interval can miss).
    pub fn peak_kib(&self) -> u64 {
        self.rss_peak_kib.max(self.hwm_kib)
    }
}

/// What the watched processes used during a job.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// Per process, in the order given.
    pub procs: Vec<ProcUsage>,
    /// Length of the CPU window (seconds).
    pub window_s: f64,
}

impl Usage {
    /// CPU seconds of all watched processes.
    pub fn cpu_s(&self) -> f64 {
        self.procs.iter().map(|p| p.cpu_s).sum()
    }

    /// System calls of all watched processes in the window.
    pub fn syscalls(&self) -> Option<u64> {
        self.procs.iter().map(|p| p.syscalls).sum()
    }

    /// Peak RSS per process in MiB, `A/B` style.
    pub fn rss_mib(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("{:.0}", p.rss_peak_kib as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The busiest threads of every process: `A: exec-0 3.1s, …`.
    pub fn threads_summary(&self, per_proc: usize) -> String {
        self.procs
            .iter()
            .map(|p| {
                let t: Vec<String> = p
                    .threads
                    .iter()
                    .filter(|(_, s)| *s >= 0.01)
                    .take(per_proc)
                    .map(|(n, s)| format!("{n} {s:.2}s"))
                    .collect();
                format!(
                    "{} {:.2}s ({:.0}% sys) [{}]",
                    p.label,
                    p.cpu_s,
                    if p.cpu_s > 0.0 {
                        100.0 * p.sys_s / p.cpu_s
                    } else {
                        0.0
                    },
                    t.join(", ")
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "window_s": self.window_s,
            "processes": self.procs.iter().map(|p| json!({
                "label": p.label,
                "cpu_s": p.cpu_s,
                "sys_s": p.sys_s,
                "rss_peak_kib": p.rss_peak_kib,
                "hwm_kib": p.hwm_kib,
                "threads": p.threads.iter().map(|(n, s)| json!({"name": n, "cpu_s": s})).collect::<Vec<_>>(),
                "syscalls": p.syscalls,
            })).collect::<Vec<_>>(),
        })
    }
}

struct Snapshot {
    at: Instant,
    total: Vec<(u64, u64)>,
    threads: Vec<Vec<(u32, String, u64)>>,
}

fn snapshot(procs: &[Watched]) -> Snapshot {
    Snapshot {
        at: Instant::now(),
        total: procs
            .iter()
            .map(|p| cpu_split(p.pid).unwrap_or((0, 0)))
            .collect(),
        threads: procs.iter().map(|p| thread_ticks(p.pid)).collect(),
    }
}

/// Samples watched processes in a thread until [`Monitor::finish`].
pub struct Monitor {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Usage>>,
}

impl Monitor {
    /// Starts sampling `procs`; the CPU window opens `skip` from now (the
    /// fio ramp) and closes at [`Monitor::finish`].
    pub fn start(procs: Vec<Watched>, skip: Duration) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("bench-monitor".into())
            .spawn(move || sample(&procs, skip, &flag))
            .expect("spawn monitor thread");
        Monitor {
            stop,
            handle: Some(handle),
        }
    }

    /// Closes the window and returns what the processes used.
    pub fn finish(mut self) -> Usage {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("monitor running")
            .join()
            .expect("monitor thread")
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A system-call counter per process where counting works (see
/// [`crate::syscalls::availability`]).
fn start_counters(procs: &[Watched]) -> Vec<Option<SyscallCounter>> {
    if crate::syscalls::availability().is_err() {
        return Vec::new();
    }
    procs
        .iter()
        .map(|p| {
            SyscallCounter::start(p.pid)
                .map_err(|e| eprintln!("   warning: {} (pid {}): {e}", p.label, p.pid))
                .ok()
        })
        .collect()
}

fn sample(procs: &[Watched], skip: Duration, stop: &AtomicBool) -> Usage {
    let start = Instant::now();
    let mut peak = vec![0u64; procs.len()];
    let mut first: Option<Snapshot> = None;
    let mut counters: Vec<Option<SyscallCounter>> = Vec::new();
    let sample_mem = |peak: &mut Vec<u64>| {
        for (i, p) in procs.iter().enumerate() {
            if let Some((rss, _)) = mem_kib(p.pid) {
                peak[i] = peak[i].max(rss);
            }
        }
    };
    loop {
        sample_mem(&mut peak);
        if first.is_none() && start.elapsed() >= skip {
            counters = start_counters(procs);
            first = Some(snapshot(procs));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let syscalls: Vec<Option<u64>> = counters
        .iter()
        .map(|c| c.as_ref().and_then(SyscallCounter::read))
        .collect();
    let last = snapshot(procs);
    let first = first.unwrap_or_else(|| snapshot(procs));
    let tck = clk_tck();
    let procs = procs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut by_name: BTreeMap<String, u64> = BTreeMap::new();
            for (tid, name, t) in &last.threads[i] {
                let before = first.threads[i]
                    .iter()
                    .find(|(t0, _, _)| t0 == tid)
                    .map_or(0, |x| x.2);
                *by_name.entry(thread_kind(name)).or_default() += t.saturating_sub(before);
            }
            let mut threads: Vec<(String, f64)> = by_name
                .into_iter()
                .map(|(n, t)| (n, t as f64 / tck))
                .collect();
            threads.sort_by(|a, b| b.1.total_cmp(&a.1));
            ProcUsage {
                label: p.label.clone(),
                cpu_s: (last.total[i].0 + last.total[i].1)
                    .saturating_sub(first.total[i].0 + first.total[i].1)
                    as f64
                    / tck,
                sys_s: last.total[i].1.saturating_sub(first.total[i].1) as f64 / tck,
                rss_peak_kib: peak[i],
                hwm_kib: mem_kib(p.pid).map_or(0, |m| m.1),
                threads,
                syscalls: syscalls.get(i).copied().flatten(),
            }
        })
        .collect();
    Usage {
        procs,
        window_s: last.at.duration_since(first.at).as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing() {
        let s =
            "1234 (hast exec) 0) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_stat(s), Some(("hast exec) 0".into(), 325)));
    }

    #[test]
    fn io_uring_workers_add_up() {
        assert_eq!(thread_kind("iou-wrk-7657"), "iou-wrk");
        assert_eq!(thread_kind("hast-shard0-1"), "hast-shard0-1");
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        assert!(!thread_ticks(me).is_empty());
        let (rss, hwm) = mem_kib(me).expect("status");
        assert!(rss > 0 && hwm >= rss);
    }
}
