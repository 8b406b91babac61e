//! The fio jobs of the harness: the same five workloads against a local
//! file (io_uring, O_DIRECT) or an NBD export (fio's nbd engine), and the
//! parsing of fio's JSON output.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::util::{run_bounded, spawn_captured, Captured, MIB};

/// One fio workload; every target runs the same ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Short name (`randwrite-4k-qd32`), used on the command line and in
    /// the JSON.
    pub key: &'static str,
    /// Label for tables (`4k randwrite QD32`).
    pub label: &'static str,
    /// fio `rw`.
    pub rw: &'static str,
    /// fio `bs`.
    pub bs: &'static str,
    /// fio `iodepth`.
    pub qd: u32,
    /// fio `rwmixread` for mixed workloads.
    pub mix_read: Option<u32>,
}

/// 4 KiB random write, QD1.
pub const RANDWRITE_QD1: Workload = Workload {
    key: "randwrite-4k-qd1",
    label: "4k randwrite QD1",
    rw: "randwrite",
    bs: "4k",
    qd: 1,
    mix_read: None,
};
/// 4 KiB random write, QD32.
pub const RANDWRITE_QD32: Workload = Workload {
    key: "randwrite-4k-qd32",
    label: "4k randwrite QD32",
    rw: "randwrite",
    bs: "4k",
    qd: 32,
    mix_read: None,
};
/// 4 KiB random read, QD32 (over pre-written data).
pub const RANDREAD_QD32: Workload = Workload {
    key: "randread-4k-qd32",
    label: "4k randread QD32",
    rw: "randread",
    bs: "4k",
    qd: 32,
    mix_read: None,
};
/// 1 MiB sequential write, QD8.
pub const SEQWRITE_1M: Workload = Workload {
    key: "write-1m-qd8",
    label: "1M seq write QD8",
    rw: "write",
    bs: "1M",
    qd: 8,
    mix_read: None,
};
/// 70/30 random read/write of 4 KiB, QD16.
pub const MIXED_QD16: Workload = Workload {
    key: "randrw70-4k-qd16",
    label: "4k 70/30 randrw QD16",
    rw: "randrw",
    bs: "4k",
    qd: 16,
    mix_read: Some(70),
};

/// Every workload, in the order the harness runs them.
pub const WORKLOADS: [Workload; 5] = [
    RANDWRITE_QD1,
    RANDWRITE_QD32,
    RANDREAD_QD32,
    SEQWRITE_1M,
    MIXED_QD16,
];

/// A workload by key.
pub fn workload(key: &str) -> Option<Workload> {
    WORKLOADS.iter().copied().find(|w| w.key == key)
}

/// Where a job does its I/O.
#[derive(Debug, Clone)]
pub enum Target {
    /// A local file: io_uring, O_DIRECT.
    File(PathBuf),
    /// An NBD URI: fio's nbd engine (libnbd).
    Nbd(String),
}

/// How long and over how much a job runs.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Measured seconds (`runtime`).
    pub runtime: u32,
    /// Seconds before measuring (`ramp_time`).
    pub ramp: u32,
    /// Bytes of the file/export the job covers (`size`).
    pub size: u64,
}

/// What fio measured (reads and writes together: unified reporting).
#[derive(Debug, Clone, Default)]
pub struct FioResult {
    /// I/O operations per second.
    pub iops: f64,
    /// Megabytes (10^6) per second.
    pub mb_per_s: f64,
    /// Median completion latency (µs).
    pub p50_us: f64,
    /// 99th percentile completion latency (µs).
    pub p99_us: f64,
    /// Bytes moved in the measured window.
    pub io_bytes: u64,
    /// Measured window (s).
    pub runtime_s: f64,
    /// fio's own CPU (usr + sys, % of one CPU).
    pub client_cpu_pct: f64,
}

impl FioResult {
    /// Sum of jobs that ran in parallel: IOPS and bandwidth add up,
    /// latencies are the worse of the two.
    pub fn combine(parts: &[FioResult]) -> FioResult {
        let mut r = FioResult::default();
        for p in parts {
            r.iops += p.iops;
            r.mb_per_s += p.mb_per_s;
            r.p50_us = r.p50_us.max(p.p50_us);
            r.p99_us = r.p99_us.max(p.p99_us);
            r.io_bytes += p.io_bytes;
            r.runtime_s = r.runtime_s.max(p.runtime_s);
            r.client_cpu_pct += p.client_cpu_pct;
        }
        r
    }

    /// JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "iops": self.iops,
            "mb_per_s": self.mb_per_s,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "io_bytes": self.io_bytes,
            "runtime_s": self.runtime_s,
            "client_cpu_pct": self.client_cpu_pct,
        })
    }
}

/// The fio command line of a job.
pub fn command(w: &Workload, target: &Target, t: &Timing) -> Command {
    let mut c = Command::new("fio");
    c.arg(format!("--name={}", w.key));
    match target {
        Target::File(p) => {
            c.arg(format!("--filename={}", p.display()))
                .arg("--ioengine=io_uring")
                .arg("--direct=1");
        }
        Target::Nbd(uri) => {
            c.arg("--ioengine=nbd").arg(format!("--uri={uri}"));
        }
    }
    c.arg(format!("--rw={}", w.rw))
        .arg(format!("--bs={}", w.bs))
        .arg(format!("--iodepth={}", w.qd))
        .arg(format!("--size={}", t.size))
        .arg("--time_based")
        .arg(format!("--runtime={}", t.runtime))
        .arg(format!("--ramp_time={}", t.ramp))
        .arg("--unified_rw_reporting=mixed")
        .arg("--output-format=json");
    if let Some(r) = w.mix_read {
        c.arg(format!("--rwmixread={r}"));
    }
    c
}

/// The longest a job may take before it is killed.
pub fn limit(t: &Timing) -> Duration {
    Duration::from_secs(u64::from(t.runtime + t.ramp) + 60)
}

/// A job running in the background.
pub struct Running {
    proc: Captured,
    limit: Duration,
    what: String,
}

/// Starts a job.
pub fn spawn(w: &Workload, target: &Target, t: &Timing, dir: &Path) -> Running {
    spawn_command(command(w, target, t), w, t, dir)
}

/// Starts a job that also writes its IOPS every half second to
/// `<prefix>_iops.1.log` (read it with [`read_iops_log`]).
pub fn spawn_logged(
    w: &Workload,
    target: &Target,
    t: &Timing,
    dir: &Path,
    prefix: &Path,
) -> Running {
    let mut c = command(w, target, t);
    c.arg(format!("--write_iops_log={}", prefix.display()))
        .arg(format!("--log_avg_msec={IOPS_LOG_MSEC}"));
    spawn_command(c, w, t, dir)
}

/// Averaging interval of the IOPS log (ms).
const IOPS_LOG_MSEC: u32 = 500;

fn spawn_command(mut c: Command, w: &Workload, t: &Timing, dir: &Path) -> Running {
    let what = format!("fio {}", w.key);
    Running {
        proc: spawn_captured(&mut c, &what, dir),
        limit: limit(t),
        what,
    }
}

/// The IOPS log written by a job of [`spawn_logged`], then removed:
/// (seconds after the ramp, IOPS); empty if there is none.
pub fn read_iops_log(prefix: &Path) -> Vec<(f64, f64)> {
    let path = PathBuf::from(format!("{}_iops.1.log", prefix.display()));
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    parse_iops_log(&text)
}

/// Parses an fio IOPS log (`msec, iops, direction, bs, offset[, prio]` per
/// line, times from the end of the ramp) into (seconds, IOPS), summing
/// the directions of one instant.
pub fn parse_iops_log(text: &str) -> Vec<(f64, f64)> {
    let mut out: Vec<(u64, f64)> = Vec::new();
    for line in text.lines() {
        let mut f = line.split(',').map(str::trim);
        let (Some(Ok(ms)), Some(Ok(v))) = (
            f.next().map(str::parse::<u64>),
            f.next().map(str::parse::<f64>),
        ) else {
            continue;
        };
        match out.last_mut() {
            Some((t, sum)) if *t == ms => *sum += v,
            _ => out.push((ms, v)),
        }
    }
    out.into_iter()
        .map(|(ms, v)| (ms as f64 / 1000.0, v))
        .collect()
}

impl Running {
    /// Has fio exited?
    pub fn done(&mut self) -> bool {
        self.proc.proc.try_wait().is_some()
    }

    /// Waits for the job (killing it past its time limit) and parses it.
    pub fn wait(mut self) -> FioResult {
        let st = self.proc.proc.wait(self.limit);
        let (out, err) = self.proc.output();
        assert!(
            st.success(),
            "{} failed ({st}):\nstdout: {out}\nstderr: {err}",
            self.what
        );
        parse(&out).unwrap_or_else(|e| panic!("{}: {e}\nstdout: {out}\nstderr: {err}", self.what))
    }
}

/// Runs a job to completion.
pub fn run(w: &Workload, target: &Target, t: &Timing, dir: &Path) -> FioResult {
    spawn(w, target, t, dir).wait()
}

/// Parses fio's JSON output (the nbd engine prints a line before it).
pub fn parse(out: &str) -> Result<FioResult, String> {
    let start = out.find('{').ok_or("no JSON in fio's output")?;
    let v: serde_json::Value =
        serde_json::from_str(&out[start..]).map_err(|e| format!("fio JSON: {e}"))?;
    let job = &v["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        return Err(format!("fio reports error {}", job["error"]));
    }
    let m = &job["mixed"];
    if m.is_null() {
        return Err("fio JSON has no unified (\"mixed\") section".into());
    }
    let pct = |p: &str| m["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(FioResult {
        iops: m["iops"].as_f64().unwrap_or(0.0),
        mb_per_s: m["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        io_bytes: m["io_bytes"].as_u64().unwrap_or(0),
        runtime_s: m["runtime"].as_f64().unwrap_or(0.0) / 1000.0,
        client_cpu_pct: job["usr_cpu"].as_f64().unwrap_or(0.0)
            + job["sys_cpu"].as_f64().unwrap_or(0.0),
    })
}

/// Writes `size` bytes of non-zero, non-repeating data at `offset` of a
/// file with 1 MiB O_DIRECT writes (fio, io_uring, QD16); returns MB/s.
pub fn fill(path: &Path, offset: u64, size: u64, dir: &Path) -> f64 {
    let mut c = Command::new("fio");
    c.arg("--name=fill")
        .arg(format!("--filename={}", path.display()))
        .arg("--ioengine=io_uring")
        .arg("--direct=1")
        .arg("--rw=write")
        .arg("--bs=1M")
        .arg("--iodepth=16")
        .arg(format!("--offset={offset}"))
        .arg(format!("--size={size}"))
        .arg("--refill_buffers")
        .arg("--unified_rw_reporting=mixed")
        .arg("--output-format=json");
    // At 10 MB/s, the slowest disk worth benchmarking, plus a minute.
    let limit = Duration::from_secs(size / (10 * MIB) + 60);
    let (out, _) = run_bounded(&mut c, limit, "fio fill", dir);
    parse(&out).map(|r| r.mb_per_s).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unified_output() {
        let out = r#"fio: connected to NBD server
{"jobs":[{"error":0,"usr_cpu":5.5,"sys_cpu":10.0,"mixed":{"iops":1000.5,"bw_bytes":4096000,
"io_bytes":32768000,"runtime":8000,"clat_ns":{"percentile":{"50.000000":123000,"99.000000":456000}}}}]}"#;
        let r = parse(out).expect("parses");
        assert_eq!(r.iops, 1000.5);
        assert_eq!(r.mb_per_s, 4.096);
        assert_eq!(r.p50_us, 123.0);
        assert_eq!(r.p99_us, 456.0);
        assert_eq!(r.io_bytes, 32768000);
        assert_eq!(r.runtime_s, 8.0);
        assert_eq!(r.client_cpu_pct, 15.5);
    }

    #[test]
    fn iops_logs_parse() {
        let log = "499, 28286, 1, 0, 0\n999, 29502, 1, 0, 0\n999, 10, 0, 0, 0\nbad line\n1500, 30166, 1, 0, 0, 0\n";
        assert_eq!(
            parse_iops_log(log),
            vec![(0.499, 28286.0), (0.999, 29512.0), (1.5, 30166.0)]
        );
        assert!(parse_iops_log("").is_empty());
    }

    #[test]
    fn errors_are_reported() {
        assert!(parse("no json").is_err());
        assert!(parse(r#"{"jobs":[{"error":5}]}"#).is_err());
    }

    #[test]
    fn same_jobs_everywhere() {
        let t = Timing {
            runtime: 8,
            ramp: 1,
            size: 2 << 30,
        };
        let args = |target: &Target| -> Vec<String> {
            command(&MIXED_QD16, target, &t)
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .filter(|a| {
                    !a.starts_with("--filename")
                        && !a.starts_with("--uri")
                        && !a.starts_with("--ioengine")
                        && !a.starts_with("--direct")
                })
                .collect()
        };
        let f = args(&Target::File("/tmp/x".into()));
        assert_eq!(f, args(&Target::Nbd("nbd+unix:///?socket=/s".into())));
        assert!(f.contains(&"--rwmixread=70".to_owned()));
        assert!(f.contains(&"--size=2147483648".to_owned()));
    }
}
