//! `hastctl verify` with real hastd processes and real clients: blocks of
//! the secondary's provider are corrupted behind hastd's back (direct
//! writes to the image file); verify reports exactly those ranges while
//! fio writes to the export, and `--repair` makes the legs identical.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::*;

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(120);

fn cluster(size: u64) -> Cluster {
    let mut c = Cluster::new(
        vec![ResourceDef::file("r1", size)],
        ClusterOptions {
            replication: "memsync".into(),
            timeout_secs: 10,
            ..Default::default()
        },
    );
    c.create_all();
    c.start();
    c.b.hastctl(&["role", "secondary", "r1"]);
    c.a.role("primary", "r1");
    c.a.wait_in_sync("r1", LIMIT);
    c
}

fn fio(uri: &str, rw: &str, offset: u64, size: u64, extra: &[&str]) -> Child {
    Command::new("fio")
        .arg("--name=verify")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg(format!("--rw={rw}"))
        .arg("--bs=4k")
        .arg(format!("--offset={offset}"))
        .arg(format!("--size={size}"))
        .arg("--iodepth=8")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fio")
}

/// XORs `len` bytes of node B's data area at `off`, bypassing hastd.
fn corrupt(c: &Cluster, off: u64, len: usize) {
    let localoff = c.b.dump("r1")["localoff"].as_u64().unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(c.b.provider("r1"))
        .unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, localoff + off).unwrap();
    for b in &mut buf {
        *b ^= 0xa5;
    }
    f.write_all_at(&buf, localoff + off).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn verify_reports_exactly_the_corrupted_ranges_and_repair_fixes_them() {
    if !require_tool("fio") {
        return;
    }
    let mut c = cluster(96 * MIB);
    let uri = c.a.uri("r1");
    // 48 MiB of data, then in sync.
    let mut w = fio(&uri, "write", 0, 48 * MIB, &["--bs=1M", "--refill_buffers"]);
    assert!(wait_child(&mut w, LIMIT).success(), "fio fill");
    c.a.wait_in_sync("r1", LIMIT);
    assert_eq!(c.data_diff("r1"), None);
    // Behind hastd's back: a block, a run of 3 blocks, 100 bytes
    // straddling two blocks, a block at the end of a chunk.
    corrupt(&c, 4096, 4096);
    corrupt(&c, 10 * MIB + 12288, 3 * 4096);
    corrupt(&c, 20 * MIB - 50, 100);
    corrupt(&c, 31 * MIB + MIB - 4096, 4096);
    let expected = [
        (4096u64, 4096u64),
        (10 * MIB + 12288, 3 * 4096),
        (20 * MIB - 4096, 8192),
        (32 * MIB - 4096, 4096),
    ];
    // fio writes to the export meanwhile, away from the corrupted blocks.
    let mut load = fio(
        &uri,
        "randwrite",
        36 * MIB,
        8 * MIB,
        &["--time_based", "--runtime=30"],
    );
    let out = c.a.hastctl_output(&["verify", "--json", "r1"]);
    let code = out.status.code();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        code,
        Some(1),
        "differences found: exit 1\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let rep = &v[0]["verify"];
    assert_eq!(rep["state"], "done", "{rep}");
    let ranges: Vec<(u64, u64)> = rep["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect();
    assert_eq!(ranges, expected, "exactly the corrupted ranges: {rep}");
    assert_eq!(rep["blocks_different"], 7);
    assert_eq!(rep["ranges_total"], 4);
    assert!(rep["blocks_compared"].as_u64().unwrap() >= 48 * MIB / 4096);
    // hastctl list shows the result, including the first ranges.
    let list = c.a.hastctl(&["list", "r1"]);
    assert!(list.contains("verify: done (xxh3)"), "{list}");
    assert!(list.contains("different: 7"), "{list}");
    assert!(
        list.contains("differ at: 4096+4096, 10498048+12288"),
        "{list}"
    );
    // Not on the secondary.
    let refused = c.b.hastctl_output(&["verify", "r1"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("run verify on the primary"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // --repair (sha256): marked and synchronised from the primary; the
    // writes go on.
    let out =
        c.a.hastctl_output(&["verify", "--repair", "--algorithm", "sha256", "r1"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "repaired: exit 0\n{text}");
    assert!(text.contains("7 differ"), "{text}");
    assert!(text.contains("repaired"), "{text}");
    let _ = wait_child(&mut load, Duration::from_secs(60));
    c.a.wait_in_sync("r1", LIMIT);
    assert_eq!(
        c.data_diff("r1"),
        None,
        "legs byte-identical after --repair"
    );
    // And a last verify of a range finds nothing.
    let out =
        c.a.hastctl_output(&["verify", "--offset", "8M", "--length", "16M", "r1"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("verified 16MB at 8388608"), "{text}");
    assert!(text.contains("4096 blocks compared, 0 differ"), "{text}");
    c.stop();
}
