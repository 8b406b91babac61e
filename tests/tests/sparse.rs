//! A full synchronisation proportional to the data: a 15 TiB resource on
//! sparse files holding 1 GiB of data is synchronised to a new secondary
//! by copying the extents written since `hastctl create` only (the
//! written map), holes of the source without reading them. Target: under
//! two minutes on the test VM; asserted with a generous bound so that a
//! loaded machine does not fail it, the time measured is printed.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Where the 1 GiB goes: 16 runs of 64 MiB spread over the device, the
/// last one ending at the end of the data area.
fn runs(datasize: u64) -> Vec<u64> {
    (0..16u64)
        .map(|i| {
            if i == 15 {
                datasize - 64 * MIB
            } else {
                i * 937 * GIB + 5 * MIB
            }
        })
        .collect()
}

#[test]
fn full_sync_of_a_sparse_15_tib_resource_copies_only_the_data() {
    if !require_tool("qemu-io") {
        return;
    }
    let size = 15 * TIB;
    let mut c = Cluster::new(
        vec![ResourceDef::file("big", size)],
        ClusterOptions {
            timeout_secs: 20,
            ..Default::default()
        },
    );
    c.create_all();
    c.start();
    // The primary alone writes its 1 GiB (the secondary is not there yet).
    c.a.role("primary", "big");
    let datasize = c.a.dump("big")["datasize"].as_u64().unwrap();
    assert!(datasize > 15 * TIB - GIB, "{datasize}");
    let uri = c.a.uri("big");
    for (i, off) in runs(datasize).into_iter().enumerate() {
        qemu_io(
            &uri,
            &[&format!("write -P {} {off} 64M", 0x11 + i), "flush"],
        );
    }
    let extents: u64 = runs(datasize)
        .iter()
        .map(|&o| (o + 64 * MIB - 1) / (2 * MIB) - o / (2 * MIB) + 1)
        .sum();
    let before = c.a.list("big");
    assert_eq!(before["written_extents"], extents, "{before}");
    // A new secondary: full synchronisation, timed from the role change
    // to in sync.
    let t0 = Instant::now();
    c.b.hastctl(&["role", "secondary", "big"]);
    let a = c.a.wait_in_sync("big", Duration::from_secs(600));
    let took = t0.elapsed();
    eprintln!(
        "full sync of a 15 TiB resource holding 1 GiB: {:.1} s; copied {} bytes, skipped {}",
        took.as_secs_f64(),
        a["synced_bytes"],
        a["sync_skipped_bytes"],
    );
    assert!(
        took < Duration::from_secs(300),
        "the full sync took {took:?} (target < 2 min)"
    );
    // Only the written extents were copied.
    let copied = a["synced_bytes"].as_u64().unwrap();
    assert!(copied <= extents * 2 * MIB, "{copied}");
    assert!(copied >= GIB, "{copied}");
    let skipped = a["sync_skipped_bytes"].as_u64().unwrap();
    assert_eq!(skipped + copied, datasize, "every byte copied or skipped");
    // The legs are identical on the written ranges, read straight from
    // both providers.
    let area = |n: &TestNode| {
        let off = n.dump("big")["localoff"].as_u64().unwrap();
        (File::open(n.provider("big")).unwrap(), off)
    };
    let (fa, oa) = area(&c.a);
    let (fb, ob) = area(&c.b);
    let mut ba = vec![0u8; 4 * MIB as usize];
    let mut bb = vec![0u8; 4 * MIB as usize];
    for (i, off) in runs(datasize).into_iter().enumerate() {
        for k in 0..16 {
            let at = off + k * 4 * MIB;
            fa.read_exact_at(&mut ba, oa + at).unwrap();
            fb.read_exact_at(&mut bb, ob + at).unwrap();
            assert!(ba.iter().all(|&x| x == 0x11 + i as u8), "primary at {at}");
            assert!(ba == bb, "the legs differ at {at}");
        }
    }
    // Both providers stay sparse.
    use std::os::unix::fs::MetadataExt;
    for n in [&c.a, &c.b] {
        let m = std::fs::metadata(n.provider("big")).unwrap();
        assert!(
            m.blocks() * 512 < 3 * GIB,
            "{}: {} bytes allocated",
            n.name,
            m.blocks() * 512
        );
    }
    c.stop();
}
