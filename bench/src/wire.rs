//! What crosses the wire: the checksum-based resynchronisation after a
//! primary crash under 4k random writes, against a full-extent one, and
//! each `compression` setting on 1M sequential writes of compressible and
//! of random data. Both nodes are real hastd processes; the bytes are
//! hastd's own counters (`net_sent_bytes`, `net_received_bytes` of
//! `hastctl list --json`), the times wall clock.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::{require_tool, wait_child, ResourceDef, TestNode};
use serde_json::json;

use crate::report::Results;
use crate::suite::Config;
use crate::util::{provider_size, MIB};

fn pair(size: u64, extra: &str) -> Cluster {
    let mut c = Cluster::new(
        vec![ResourceDef::file("r1", provider_size(size))],
        ClusterOptions {
            replication: "memsync".into(),
            timeout_secs: 10,
            extra_resource: extra.into(),
            ..Default::default()
        },
    );
    c.create_all();
    c.start();
    c.b.hastctl(&["role", "secondary", "r1"]);
    c.a.role("primary", "r1");
    c.a.wait_in_sync("r1", Duration::from_secs(300));
    c
}

fn fio(uri: &str, args: &[&str]) -> Child {
    Command::new("fio")
        .arg("--name=wire")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fio")
}

fn counter(j: &serde_json::Value, k: &str) -> u64 {
    j[k].as_u64().unwrap_or(0)
}

fn list(node: &TestNode) -> serde_json::Value {
    node.list("r1")
}

/// One resync after a primary crash under 4k random writes.
fn resync_once(size: u64, syncmode: &str) -> serde_json::Value {
    let mut c = pair(size, &format!("syncmode {syncmode}"));
    let uri = c.a.uri("r1");
    let sz = size.to_string();
    let mut w = fio(
        &uri,
        &[
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            &format!("--size={sz}"),
        ],
    );
    assert!(
        wait_child(&mut w, Duration::from_secs(600)).success(),
        "fill"
    );
    c.a.wait_in_sync("r1", Duration::from_secs(300));
    let mut load = fio(
        &uri,
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            &format!("--size={sz}"),
            "--time_based",
            "--runtime=30",
            "--continue_on_error=all",
        ],
    );
    std::thread::sleep(Duration::from_secs(4));
    c.a.kill9();
    let _ = wait_child(&mut load, Duration::from_secs(60));
    let marked = c.a.dump("r1")["ondisk_dirty_extents"].as_u64().unwrap_or(0);
    c.a.start();
    let t0 = Instant::now();
    c.a.role("primary", "r1");
    let a = c.a.wait_in_sync("r1", Duration::from_secs(600));
    let secs = t0.elapsed().as_secs_f64();
    let diff = c.data_diff("r1");
    assert_eq!(diff, None, "{syncmode}: legs identical after the resync");
    let sent = counter(&a, "net_sent_bytes");
    let received = counter(&a, "net_received_bytes");
    let j = json!({
        "syncmode": syncmode,
        "dirty_extents": marked,
        "resync_s": secs,
        "synced_bytes": counter(&a, "synced_bytes"),
        "identical_bytes": counter(&a, "sync_identical_bytes"),
        "sent_bytes": sent,
        "received_bytes": received,
        "wire_bytes": sent + received,
    });
    c.stop();
    j
}

/// `resync`: checksum vs full, in one run.
pub fn resync(cfg: &Config, res: &mut Results) {
    require_tool("fio");
    let size = cfg.size.min(1 << 30);
    let rows: Vec<serde_json::Value> = ["full", "checksum"]
        .iter()
        .map(|m| {
            eprintln!("== resync: syncmode {m}");
            resync_once(size, m)
        })
        .collect();
    let mut t = String::from(
        "| syncmode | extents marked | resync s | copied MiB | identical MiB | wire MiB (sent + received) |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for r in &rows {
        t.push_str(&format!(
            "| {} | {} | {:.2} | {:.1} | {:.1} | {:.2} |\n",
            r["syncmode"].as_str().unwrap_or(""),
            r["dirty_extents"],
            r["resync_s"].as_f64().unwrap_or(0.0),
            r["synced_bytes"].as_u64().unwrap_or(0) as f64 / MIB as f64,
            r["identical_bytes"].as_u64().unwrap_or(0) as f64 / MIB as f64,
            r["wire_bytes"].as_u64().unwrap_or(0) as f64 / MIB as f64,
        ));
    }
    let (full, sums) = (&rows[0]["wire_bytes"], &rows[1]["wire_bytes"]);
    let per_extent = |r: &serde_json::Value| {
        r["wire_bytes"].as_f64().unwrap_or(0.0) / r["synced_bytes"].as_f64().unwrap_or(1.0).max(1.0)
    };
    let ratio = per_extent(&rows[1]) / per_extent(&rows[0]).max(1e-9);
    t.push_str(&format!(
        "\nwire bytes per resynchronised byte, checksum / full: {ratio:.4} (target <= 0.2; full {full}, checksum {sums} bytes)\n"
    ));
    eprintln!("{t}");
    res.extra.push((
        "Resynchronisation after a primary crash under 4k random writes".into(),
        t,
        json!({"rows": rows, "ratio": ratio}),
    ));
}

/// `compression`: each setting on 1M writes of compressible and random
/// data, in one run.
pub fn compression(cfg: &Config, res: &mut Results) {
    require_tool("fio");
    let size = cfg.size.min(512 * MIB);
    let sz = size.to_string();
    let mut rows = Vec::new();
    for setting in ["none", "hole", "lzf", "lz4"] {
        let c = pair(size, &format!("compression {setting}"));
        let uri = c.a.uri("r1");
        for (data, extra) in [
            ("compressible", "--buffer_compress_percentage=70"),
            ("random", "--buffer_compress_percentage=0"),
        ] {
            eprintln!("== compression {setting}: {data}");
            let before = list(&c.a);
            let t0 = Instant::now();
            let mut w = fio(
                &uri,
                &[
                    "--rw=write",
                    "--bs=1M",
                    "--iodepth=8",
                    &format!("--size={sz}"),
                    "--refill_buffers",
                    extra,
                    "--buffer_compress_chunk=4k",
                ],
            );
            assert!(
                wait_child(&mut w, Duration::from_secs(600)).success(),
                "fio"
            );
            let secs = t0.elapsed().as_secs_f64();
            let after = c.a.wait_in_sync("r1", Duration::from_secs(300));
            let sent = counter(&after, "net_sent_bytes") - counter(&before, "net_sent_bytes");
            rows.push(json!({
                "compression": setting,
                "data": data,
                "mb_per_s": size as f64 / 1e6 / secs,
                "sent_bytes": sent,
                "sent_per_byte": sent as f64 / size as f64,
            }));
        }
        let mut c = c;
        c.stop();
    }
    let mut t = format!(
        "1M sequential writes, QD8, {} MiB per run, memsync\n\n| compression | data | MB/s | sent MiB | sent / written |\n|---|---|---:|---:|---:|\n",
        size / MIB
    );
    for r in &rows {
        t.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} | {:.3} |\n",
            r["compression"].as_str().unwrap_or(""),
            r["data"].as_str().unwrap_or(""),
            r["mb_per_s"].as_f64().unwrap_or(0.0),
            r["sent_bytes"].as_u64().unwrap_or(0) as f64 / MIB as f64,
            r["sent_per_byte"].as_f64().unwrap_or(0.0),
        ));
    }
    eprintln!("{t}");
    res.extra
        .push(("Wire compression".into(), t, json!({ "rows": rows })));
}
