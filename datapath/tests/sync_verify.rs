//! Verify, checksum-based resynchronisation, wire compression and the
//! full synchronisation's skipping of never-written extents, with the
//! real primary and secondary over in-memory disks and pipes (see
//! `common`). Corruption is made "behind hastd's back" by poking the
//! secondary's in-memory disk.

mod common;

use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::{pattern, run, NodeDisk, Opts, Pair};
use hast_datapath::digest::Algo;
use hast_datapath::export::BlockBackend;
use hast_datapath::peer::compress::Compression;
use hast_datapath::peer::remote::ReplicationMode;
use hast_datapath::peer::sync::SyncMode;
use hast_datapath::peer::verify::VerifyParams;
use hast_datapath::stats::{VerifyReport, VerifyState};

const SIZE: usize = 64 << 20;
const EXTENT: u32 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(30);

fn random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Writes `len` random bytes at `off` through the primary.
async fn fill(pair: &Pair, off: u64, len: usize, seed: u64) {
    for (i, piece) in random(len, seed).chunks(1 << 20).enumerate() {
        pair.write(off + (i as u64) * (1 << 20), piece).await;
    }
}

/// Waits for the verify to end and returns its report.
async fn verify_result(pair: &Pair) -> VerifyReport {
    let start = Instant::now();
    loop {
        let r = pair.a.stats.verify.lock().unwrap().clone();
        if let Some(r) = r.filter(|r| r.state != VerifyState::Running) {
            return r;
        }
        assert!(start.elapsed() < LIMIT, "verify did not end");
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

fn params(repair: bool) -> VerifyParams {
    VerifyParams {
        offset: 0,
        length: None,
        algo: Algo::Xxh3,
        repair,
    }
}

/// The secondary's data area, behind its back.
fn corrupt(node: &NodeDisk, off: u64, len: usize) {
    let at = node.md.localoff as usize + off as usize;
    let bytes: Vec<u8> = node.mem.borrow().contents()[at..at + len]
        .iter()
        .map(|b| b ^ 0x5a)
        .collect();
    node.mem.borrow_mut().poke(at, &bytes);
}

#[test]
fn verify_reports_exactly_the_corrupted_blocks_and_repair_fixes_them() {
    for algo in [Algo::Xxh3, Algo::Sha256] {
        run(move || async move {
            let a = NodeDisk::create(SIZE, EXTENT, 8, false);
            let b = NodeDisk::create(SIZE, EXTENT, 8, false);
            let pair = Pair::start(a, b, ReplicationMode::MemSync).await;
            pair.wait_in_sync(LIMIT).await;
            fill(&pair, 0, 24 << 20, 7).await;
            pair.primary.flush().await.unwrap();
            pair.wait_in_sync(LIMIT).await;
            assert!(pair.a.data() == pair.b.data());
            // Three corruptions: one block, two adjacent blocks, a block
            // straddling a chunk boundary (two blocks).
            corrupt(&pair.b, 3 * 4096, 4096);
            corrupt(&pair.b, (5 << 20) + 8192, 8192);
            corrupt(&pair.b, (8 << 20) - 100, 200);
            let mut p = params(false);
            p.algo = algo;
            pair.remote.start_verify(p).expect("verify starts");
            let r = verify_result(&pair).await;
            assert_eq!(r.state, VerifyState::Done, "{r:?}");
            assert_eq!(
                r.ranges,
                vec![
                    (3 * 4096, 4096),
                    ((5 << 20) + 8192, 8192),
                    ((8 << 20) - 4096, 8192)
                ],
                "{algo}: exactly the corrupted blocks"
            );
            assert_eq!(r.blocks_different, 5);
            assert_eq!(r.ranges_total, 3);
            // Only the 24 MiB written are compared; the rest was never
            // written since create.
            assert_eq!(r.blocks_compared, (24 << 20) / 4096);
            assert_eq!(
                r.bytes_skipped,
                SIZE as u64
                    - pair.a.md.localoff
                    - (24 << 20) as u64
                    - (SIZE as u64 - pair.a.md.localoff - pair.a.md.datasize)
            );
            assert!(pair.a.data() != pair.b.data());
            // --repair: marked, synchronised, identical.
            pair.remote
                .start_verify(params(true))
                .expect("verify starts");
            let r = verify_result(&pair).await;
            assert_eq!(r.blocks_different, 5);
            pair.wait_in_sync(LIMIT).await;
            assert!(pair.a.data() == pair.b.data(), "repaired");
            pair.remote
                .start_verify(params(false))
                .expect("verify starts");
            let r = verify_result(&pair).await;
            assert_eq!((r.blocks_different, r.ranges.len()), (0, 0), "{r:?}");
            pair.stop().await;
        });
    }
}

#[test]
fn verify_during_writes_finds_no_false_difference() {
    run(|| async {
        let a = NodeDisk::create(SIZE, EXTENT, 8, false);
        let b = NodeDisk::create(SIZE, EXTENT, 8, false);
        let pair = Rc::new(Pair::start(a, b, ReplicationMode::Async).await);
        pair.wait_in_sync(LIMIT).await;
        fill(&pair, 0, 32 << 20, 11).await;
        pair.wait_in_sync(LIMIT).await;
        corrupt(&pair.b, 20 << 20, 4096);
        // Writes all over the verified range while it runs (none to the
        // corrupted block).
        let writer = {
            let pair = pair.clone();
            glommio::spawn_local(async move {
                let mut n = 0u64;
                loop {
                    let off = (n * 7919 % 8000) * 4096;
                    if off != 20 << 20 {
                        pair.write(off, &pattern(n, 4096)).await;
                    }
                    n += 1;
                    let done = pair
                        .a
                        .stats
                        .verify
                        .lock()
                        .unwrap()
                        .as_ref()
                        .is_some_and(|r| r.state != VerifyState::Running);
                    if done {
                        return n;
                    }
                    glommio::yield_if_needed().await;
                }
            })
        };
        pair.remote
            .start_verify(params(false))
            .expect("verify starts");
        let writes = writer.await;
        let r = verify_result(&pair).await;
        assert!(writes > 10, "writes ran during the verify: {writes}");
        assert_eq!(r.state, VerifyState::Done);
        assert_eq!(r.ranges, vec![(20 << 20, 4096)], "{r:?}");
        let pair = Rc::try_unwrap(pair).ok().expect("writer done");
        pair.stop().await;
    });
}

/// A crash-like resync of the extents written while apart: with
/// checksums, only the blocks that differ cross the wire.
#[test]
fn checksum_resync_moves_only_differing_blocks() {
    let sent = |syncmode: SyncMode| {
        let (tx, rx) = std::sync::mpsc::channel();
        run(move || async move {
            let a = NodeDisk::create(SIZE, EXTENT, 64, false);
            let b = NodeDisk::create(SIZE, EXTENT, 64, false);
            let opts = Opts {
                syncmode,
                ..Opts::default()
            };
            let pair = Pair::start_opts(a, b, ReplicationMode::MemSync, opts).await;
            pair.wait_in_sync(LIMIT).await;
            fill(&pair, 0, 32 << 20, 3).await;
            pair.primary.flush().await.unwrap();
            pair.wait_in_sync(LIMIT).await;
            // Apart: 4k writes to 16 extents, then the whole extents are
            // dirty, one block each differs.
            pair.cut();
            for i in 0..16u64 {
                pair.write(i * (2 << 20) + 4096, &pattern(i + 100, 4096))
                    .await;
            }
            let before = pair.a.stats.net_sent_bytes.load(Relaxed);
            pair.wait_in_sync(LIMIT).await;
            let bytes = pair.a.stats.net_sent_bytes.load(Relaxed) - before;
            assert!(pair.a.data() == pair.b.data(), "{syncmode}: identical");
            let identical = pair.a.stats.sync_identical_bytes.load(Relaxed);
            tx.send((bytes, identical)).unwrap();
            pair.stop().await;
        });
        rx.recv().unwrap()
    };
    let (full, full_same) = sent(SyncMode::Full);
    let (sums, sums_same) = sent(SyncMode::Checksum);
    assert_eq!(full_same, 0);
    // Every dirty extent but its one rewritten block was found identical.
    assert!(sums_same >= 1 << 20, "{sums_same}");
    eprintln!("resync bytes sent: full {full}, checksum {sums} ({sums_same} bytes identical)");
    assert!(
        sums * 5 <= full,
        "checksum resync sent {sums} bytes, full {full}: not <= 0.2x"
    );
}

#[test]
fn compression_settings_replicate_identically() {
    for c in Compression::ALL {
        run(move || async move {
            let a = NodeDisk::create(SIZE, EXTENT, 8, false);
            let b = NodeDisk::create(SIZE, EXTENT, 8, false);
            let opts = Opts {
                compression: c,
                ..Opts::default()
            };
            let pair = Pair::start_opts(a, b, ReplicationMode::FullSync, opts).await;
            pair.wait_in_sync(LIMIT).await;
            let before = pair.a.stats.net_sent_bytes.load(Relaxed);
            // 8 MiB compressible, 8 MiB random, 1 MiB of zeros.
            for i in 0..8u64 {
                pair.write(i << 20, &pattern(i, 1 << 20)).await;
            }
            fill(&pair, 8 << 20, 8 << 20, 5).await;
            pair.write(16 << 20, &vec![0u8; 1 << 20]).await;
            pair.primary.flush().await.unwrap();
            pair.wait_in_sync(LIMIT).await;
            let sent = pair.a.stats.net_sent_bytes.load(Relaxed) - before;
            assert!(pair.a.data() == pair.b.data(), "{c}: identical");
            match c {
                Compression::None => assert!(sent > 17 << 20, "{c}: {sent}"),
                Compression::Hole => {
                    assert!(
                        sent > 16 << 20 && sent < 17 << 20,
                        "{c}: zeros as Zero: {sent}"
                    )
                }
                Compression::Lzf | Compression::Lz4 => {
                    assert!(
                        sent > 8 << 20 && sent < 10 << 20,
                        "{c}: the patterned 8 MiB compress, the random 8 MiB do not: {sent}"
                    )
                }
            }
            // Reads from the peer come back decompressed too.
            let got = pair.read(0, 1 << 20).await;
            assert_eq!(got, pattern(0, 1 << 20));
            pair.stop().await;
        });
    }
}

/// A new secondary gets only the extents the primary wrote; a resumed
/// or later synchronisation skips what neither node wrote.
#[test]
fn full_sync_skips_never_written_extents() {
    run(|| async {
        let a = NodeDisk::create(SIZE, EXTENT, 8, false);
        let b = NodeDisk::create(SIZE, EXTENT, 8, false);
        // The primary alone first: it writes 3 extents.
        let pair = Pair::start(
            a,
            NodeDisk::create(SIZE, EXTENT, 8, false),
            ReplicationMode::MemSync,
        )
        .await;
        pair.wait_in_sync(LIMIT).await;
        pair.cut();
        let (a, _) = {
            fill(&pair, 10 << 20, 3 << 20, 9).await;
            let Pair {
                a,
                b,
                remote,
                secondary,
                ..
            } = pair;
            remote.stop().await;
            secondary.disconnect().await;
            (a, b)
        };
        assert_eq!(a.stats.written_extents.load(Relaxed), 3);
        // Then a brand-new secondary: full synchronisation.
        let pair = Pair::start(a, b, ReplicationMode::MemSync).await;
        pair.wait_in_sync(LIMIT).await;
        let s = &pair.a.stats;
        let datasize = pair.a.md.datasize;
        assert_eq!(s.sync_skipped_bytes.load(Relaxed), datasize - (3 << 20));
        assert!(pair.a.data() == pair.b.data());
        assert_eq!(pair.b.stats.written_extents.load(Relaxed), 3);
        pair.stop().await;
    });
}
