//! hast-bench: end-to-end benchmarks on this host with real processes.
//!
//! `hast-bench replication [--seconds N] [--modes memsync,fullsync,async]
//! [--json FILE]` starts two hastd nodes (127.0.0.1 / 127.0.0.2) with one
//! file-backed resource, makes node A primary, and measures its NBD export
//! with fio (nbd engine):
//!
//! - 4 KiB random write, queue depth 1: IOPS and p50/p99 completion latency;
//! - 1 MiB sequential write, queue depth 8: throughput.
//!
//! This is the baseline later performance work starts from; run it from a
//! release build: `cargo run --release -p hast-bench --bin hast-bench --
//! replication`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::{require_tool, run, ResourceDef};

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, Default)]
struct FioResult {
    iops: f64,
    mb_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

fn fio(uri: &str, rw: &str, bs: &str, depth: u32, seconds: u32, size: &str) -> FioResult {
    let out = run(Command::new("fio")
        .arg("--name=bench")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--size={size}"))
        .arg("--time_based")
        .arg(format!("--runtime={seconds}"))
        .arg("--ramp_time=1")
        .arg("--output-format=json"));
    let start = out.find('{').expect("fio prints JSON");
    let v: serde_json::Value = serde_json::from_str(&out[start..]).expect("fio JSON");
    let w = &v["jobs"][0]["write"];
    let pct = |p: &str| w["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    FioResult {
        iops: w["iops"].as_f64().unwrap_or(0.0),
        mb_per_s: w["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    }
}

fn replication(seconds: u32, modes: &[String], json: Option<PathBuf>) {
    assert!(require_tool("fio"), "fio is required");
    let mut rows = Vec::new();
    for mode in modes {
        eprintln!("== {mode}: starting two nodes");
        let mut c = Cluster::new(
            vec![ResourceDef::file("r1", 2048 * MIB)],
            ClusterOptions {
                replication: mode.clone(),
                timeout_secs: 10,
                ..Default::default()
            },
        );
        c.create_all();
        c.start();
        c.b.hastctl(&["role", "secondary", "r1"]);
        c.a.role("primary", "r1");
        c.a.wait_list("r1", Duration::from_secs(60), |j| {
            j["status"] == "complete" && j["dirty"].as_u64() == Some(0)
        });
        let uri = c.a.uri("r1");
        eprintln!("== {mode}: 4 KiB random write, QD1");
        let qd1 = fio(&uri, "randwrite", "4k", 1, seconds, "1G");
        eprintln!("== {mode}: 1 MiB sequential write, QD8");
        let seq = fio(&uri, "write", "1M", 8, seconds, "1G");
        let status = c.a.list("r1");
        eprintln!(
            "== {mode}: status {} dirty {}",
            status["status"], status["dirty"]
        );
        c.stop();
        rows.push((mode.clone(), qd1, seq));
    }
    println!(
        "{:<9} {:>12} {:>12} {:>12} {:>14}",
        "mode", "4k QD1 IOPS", "p50 (us)", "p99 (us)", "1M QD8 MB/s"
    );
    for (mode, qd1, seq) in &rows {
        println!(
            "{:<9} {:>12.0} {:>12.1} {:>12.1} {:>14.1}",
            mode, qd1.iops, qd1.p50_us, qd1.p99_us, seq.mb_per_s
        );
    }
    if let Some(path) = json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|(mode, qd1, seq)| {
                serde_json::json!({
                    "mode": mode,
                    "randwrite_4k_qd1": {"iops": qd1.iops, "p50_us": qd1.p50_us, "p99_us": qd1.p99_us},
                    "write_1m_qd8": {"mb_per_s": seq.mb_per_s},
                })
            })
            .collect();
        std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).expect("write JSON");
        eprintln!("results written to {}", path.display());
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: hast-bench replication [--seconds N] [--modes memsync,fullsync,async] [--json FILE]"
    );
    std::process::exit(64);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next() else { usage() };
    let mut seconds = 10u32;
    let mut modes: Vec<String> = vec!["memsync".into(), "fullsync".into(), "async".into()];
    let mut json = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--modes" => {
                modes = args
                    .next()
                    .unwrap_or_else(|| usage())
                    .split(',')
                    .map(str::to_owned)
                    .collect()
            }
            "--json" => json = Some(PathBuf::from(args.next().unwrap_or_else(|| usage()))),
            _ => usage(),
        }
    }
    match cmd.as_str() {
        "replication" => replication(seconds, &modes, json),
        _ => usage(),
    }
}
