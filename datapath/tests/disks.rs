//! Failing disks, in process: the real primary and secondary over
//! in-memory disks that inject faults (`MemFaults`: read, write, flush
//! errors, bad sectors, a full filesystem under a sparse provider, a
//! provider truncated under hastd). Each test checks a row of
//! docs/failover.md, "What each fault does": what the client sees, which
//! leg serves, what is marked, what is reported, and that the legs end
//! identical once the fault is gone.

mod common;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, run, Hooks, NodeDisk, Opts, Pair};
use hast_datapath::events::{EventKind, Leg};
use hast_datapath::export::{BackendError, BlockBackend, WriteFlags};
use hast_datapath::health::FAIL_AFTER;
use hast_datapath::metadata::{Metadata, Role, FLAG_INCONSISTENT, METADATA_SIZE};
use hast_datapath::peer::remote::ReplicationMode;
use hast_datapath::primary::Primary;
use hast_datapath::stats::ResourceStats;
use hast_datapath::storage::{MemDisk, MemFaults, Tripwire};

const SIZE: usize = 16 << 20;
const EXTENT: u64 = 1 << 20;

fn disk() -> NodeDisk {
    NodeDisk::create(SIZE, EXTENT as u32, 4, false)
}

/// The same disk, for a restart of its node.
fn reopen(d: &NodeDisk) -> NodeDisk {
    NodeDisk {
        mem: d.mem.clone(),
        stats: Arc::new(ResourceStats::default()),
        md: d.md.clone(),
        wire: d.wire.clone(),
    }
}

async fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// Byte `pos` of the provider of the data area's `offset`.
fn at(d: &NodeDisk, offset: u64) -> u64 {
    d.md.localoff + offset
}

fn count(events: &[EventKind], kind: EventKind) -> usize {
    events.iter().filter(|k| **k == kind).count()
}

async fn try_write(p: &Primary, offset: u64, data: &[u8]) -> bool {
    let mut buf = p.alloc_buffer(data.len());
    buf.as_bytes_mut().copy_from_slice(data);
    p.write(offset, buf, WriteFlags::default()).await.is_ok()
}

/// The secondary holds the only copy: it started a new generation and
/// said so.
fn b_holds_the_only_copy(pair: &Pair) {
    let md = pair.secondary.disk().metadata();
    assert_eq!(
        md.localcnt,
        md.remotecnt + 1,
        "the secondary started a generation of its own: {md:?}"
    );
    assert!(pair.b.stats.peer_disk_failed.load(Relaxed));
}

#[test]
fn a_local_read_error_is_served_by_the_secondary() {
    run(|| async {
        let pair = Pair::start(disk(), disk(), ReplicationMode::MemSync).await;
        pair.wait_in_sync(Duration::from_secs(10)).await;
        let data = pattern(1, 64 << 10);
        pair.write(3 * EXTENT, &data).await;
        pair.primary.flush().await.expect("flush");
        pair.wait_in_sync(Duration::from_secs(10)).await;
        // Bad sectors on the primary under the data.
        let bad = at(&pair.a, 3 * EXTENT);
        pair.a.mem.borrow_mut().faults.bad = Some((bad, bad + 4096));
        assert_eq!(pair.read(3 * EXTENT, 64 << 10).await, data);
        let s = &pair.a.stats;
        assert_eq!(s.read_errors.load(Relaxed), 1);
        assert_eq!(s.reads_from_peer.load(Relaxed), 1);
        // One bad read does not detach the disk; good sectors are read
        // locally.
        assert!(!pair.primary.disk().failed());
        let before = pair.a.mem.borrow().counts.reads;
        assert_eq!(pair.read(3 * EXTENT + 8192, 4096).await, data[8192..12288]);
        assert_eq!(pair.a.mem.borrow().counts.reads, before + 1);
        assert!(!pair
            .events(true)
            .iter()
            .any(|k| matches!(k, EventKind::DiskFailed { .. })));
        pair.stop().await;
    });
}

#[test]
fn repeated_read_errors_detach_the_disk_and_the_secondary_serves_everything() {
    run(|| async {
        let pair = Pair::start(disk(), disk(), ReplicationMode::MemSync).await;
        pair.wait_in_sync(Duration::from_secs(10)).await;
        let data = pattern(2, 128 << 10);
        pair.write(EXTENT, &data).await;
        pair.primary.flush().await.expect("flush");
        pair.wait_in_sync(Duration::from_secs(10)).await;
        pair.a.mem.borrow_mut().faults.read_error = true;
        for i in 0..FAIL_AFTER + 4 {
            let off = u64::from(i % 4) * 32768;
            let got = pair.read(EXTENT + off, 32768).await;
            assert_eq!(got, data[off as usize..off as usize + 32768], "read {i}");
        }
        assert!(
            pair.primary.disk().failed(),
            "detached after {FAIL_AFTER} errors"
        );
        assert_eq!(
            pair.a.stats.read_errors.load(Relaxed),
            u64::from(FAIL_AFTER)
        );
        let why = pair.a.stats.disk_error.lock().unwrap().clone();
        assert!(why.contains("failed reads in a row"), "{why}");
        // Detached: nothing touches the disk any more.
        let before = pair.a.mem.borrow().counts;
        assert_eq!(pair.read(EXTENT, 4096).await, data[..4096]);
        let w = pattern(3, 8192);
        pair.write(5 * EXTENT, &w).await;
        assert_eq!(pair.read(5 * EXTENT, 8192).await, w);
        pair.primary
            .flush()
            .await
            .expect("a flush with the disk detached");
        assert_eq!(pair.a.mem.borrow().counts, before);
        // The write is on the secondary only, which knows and marked it.
        let b = pair.b.data();
        assert_eq!(&b[5 * EXTENT as usize..5 * EXTENT as usize + 8192], &w[..]);
        b_holds_the_only_copy(&pair);
        assert!(pair.b.stats.dirty_bytes.load(Relaxed) >= EXTENT);
        let (ea, eb) = (pair.events(true), pair.events(false));
        assert_eq!(
            count(&ea, EventKind::DiskFailed { leg: Leg::Local }),
            1,
            "{ea:?}"
        );
        assert_eq!(
            count(&eb, EventKind::DiskFailed { leg: Leg::Remote }),
            1,
            "{eb:?}"
        );
        pair.stop().await;
    });
}

#[test]
fn a_local_write_error_the_secondary_covers_is_acknowledged_and_detaches() {
    for mode in [
        ReplicationMode::FullSync,
        ReplicationMode::MemSync,
        ReplicationMode::Async,
    ] {
        // Bad sectors under the data, or a disk that fails every write
        // (the activemap mark fails first).
        for whole_disk in [false, true] {
            run(move || async move {
                let pair = Pair::start(disk(), disk(), mode).await;
                pair.wait_in_sync(Duration::from_secs(10)).await;
                let old = pattern(4, 64 << 10);
                pair.write(2 * EXTENT, &old).await;
                {
                    let mut m = pair.a.mem.borrow_mut();
                    if whole_disk {
                        m.faults.write_error = true;
                    } else {
                        let bad = pair.a.md.localoff + 2 * EXTENT;
                        m.faults.bad = Some((bad, bad + (64 << 10)));
                    }
                }
                let new = pattern(5, 64 << 10);
                assert!(
                    try_write(&pair.primary, 2 * EXTENT, &new).await,
                    "{mode:?}: the secondary has it: acknowledged"
                );
                assert!(
                    pair.primary.disk().failed(),
                    "{mode:?}: the stale disk is detached"
                );
                b_holds_the_only_copy(&pair);
                // Never the stale local copy.
                assert_eq!(pair.read(2 * EXTENT, 64 << 10).await, new, "{mode:?}");
                let b = pair.b.data();
                let e = 2 * EXTENT as usize;
                assert_eq!(&b[e..e + (64 << 10)], &new[..], "{mode:?}");
                let ea = pair.events(true);
                assert_eq!(
                    count(&ea, EventKind::DiskFailed { leg: Leg::Local }),
                    1,
                    "{ea:?}"
                );
                pair.stop().await;
            });
        }
    }
}

#[test]
fn without_the_secondary_a_write_error_reaches_the_client() {
    run(|| async {
        let a = disk();
        let local = a.open(Role::Primary).await;
        let p = Primary::new(local.clone(), a.stats.clone(), None);
        let bad = a.md.localoff + EXTENT;
        a.mem.borrow_mut().faults.bad = Some((bad, bad + 4096));
        assert!(
            !try_write(&p, EXTENT, &pattern(6, 4096)).await,
            "no leg took it"
        );
        assert_eq!(a.stats.write_errors.load(Relaxed), 1);
        // Marked: the next synchronisation makes the legs agree on it.
        assert!(local.dirty_bytes() >= EXTENT);
        assert!(!local.failed(), "one error does not detach");
        assert!(try_write(&p, 3 * EXTENT, &pattern(7, 4096)).await);
        // Failures in a row detach it; then nothing is served.
        for _ in 0..FAIL_AFTER {
            assert!(!try_write(&p, EXTENT, &pattern(8, 4096)).await);
        }
        assert!(local.failed());
        assert!(!try_write(&p, 3 * EXTENT, &pattern(9, 4096)).await);
        assert!(p.read(3 * EXTENT, 4096).await.is_err());
        assert!(p.flush().await.is_err());
    });
}

#[test]
fn without_the_secondary_enospc_reaches_the_client_as_enospc() {
    run(|| async {
        let a = disk();
        let local = a.open(Role::Primary).await;
        let p = Primary::new(local.clone(), a.stats.clone(), None);
        assert!(try_write(&p, 0, &pattern(10, 8192)).await);
        // The filesystem under the sparse provider is full: new blocks
        // fail, allocated ones can be rewritten.
        a.mem.borrow_mut().faults.no_space = true;
        let mut buf = p.alloc_buffer(4096);
        buf.as_bytes_mut().fill(7);
        let r = p.write(5 * EXTENT, buf, WriteFlags::default()).await;
        assert_eq!(r, Err(BackendError::NoSpace));
        assert!(try_write(&p, 0, &pattern(11, 8192)).await, "a rewrite");
        assert_eq!(p.read(0, 8192).await.unwrap().to_vec(), pattern(11, 8192));
        assert!(!local.failed());
    });
}

#[test]
fn a_write_error_on_the_secondary_marks_the_extent_and_the_primary_keeps_serving() {
    run(|| async {
        let pair = Pair::start(disk(), disk(), ReplicationMode::FullSync).await;
        pair.wait_in_sync(Duration::from_secs(10)).await;
        let bad = at(&pair.b, 4 * EXTENT);
        pair.b.mem.borrow_mut().faults.bad = Some((bad, bad + 4096));
        let data = pattern(10, 16384);
        pair.write(4 * EXTENT, &data).await;
        assert_eq!(pair.read(4 * EXTENT, 16384).await, data);
        let s = &pair.a.stats;
        assert!(s.remote_errors.load(Relaxed) >= 1);
        wait_for(Duration::from_secs(5), "the cause reported", || {
            s.last_error
                .lock()
                .unwrap()
                .contains("Input/output error (os error 5)")
        })
        .await;
        // One bad sector does not detach the secondary's disk: the extent
        // stays marked and is retried, with a growing pause.
        assert!(s.dirty_bytes.load(Relaxed) >= EXTENT);
        assert!(!pair.secondary.disk().failed());
        pair.b.mem.borrow_mut().faults = MemFaults::default();
        pair.wait_in_sync(Duration::from_secs(30)).await;
        assert!(pair.a.data() == pair.b.data(), "the legs differ");
        pair.stop().await;
    });
}

#[test]
fn enospc_on_the_secondary_is_reported_as_such_and_retried_slowly() {
    run(|| async {
        let pair = Pair::start(disk(), disk(), ReplicationMode::MemSync).await;
        pair.wait_in_sync(Duration::from_secs(10)).await;
        // The filesystem under the secondary's sparse provider is full.
        pair.b.mem.borrow_mut().faults.no_space = true;
        // Whole extents: a synchronisation then sends only data, no Zero
        // for a hole (a hole punch works on a full filesystem, and a
        // success in between restarts the count towards a detach).
        let mut written = Vec::new();
        for i in 0..4u64 {
            let d = pattern(20 + i, EXTENT as usize);
            pair.write(i * 3 * EXTENT, &d).await;
            written.push((i * 3 * EXTENT, d));
        }
        let s = &pair.a.stats;
        // Every write and every synchronisation write fails there: the
        // secondary detaches its disk and refuses the primary, saying why.
        wait_for(
            Duration::from_secs(10),
            "the secondary's disk reported",
            || s.peer_disk_failed.load(Relaxed),
        )
        .await;
        let why = s.last_error.lock().unwrap().clone();
        assert!(
            why.contains("No space left on device (os error 28)"),
            "the real cause: {why}"
        );
        // Without a growing pause this would be ~150 attempts (20 ms).
        let first = pair.attempts.get();
        glommio::timer::sleep(Duration::from_secs(3)).await;
        let more = pair.attempts.get() - first;
        assert!(more <= 12, "{more} connection attempts in 3 s");
        // Nothing acknowledged is lost: the primary has it all, marked.
        for (off, d) in &written {
            assert_eq!(&pair.read(*off, EXTENT as u32).await, d);
        }
        assert_eq!(s.dirty_bytes.load(Relaxed), 4 * EXTENT);
        // Space freed and the secondary's disk attached again (its role
        // changed): caught up, identical.
        let (a, b) = (reopen(&pair.a), reopen(&pair.b));
        pair.stop().await;
        b.mem.borrow_mut().faults = MemFaults::default();
        let pair = Pair::start(a, b, ReplicationMode::MemSync).await;
        pair.wait_in_sync(Duration::from_secs(20)).await;
        assert!(pair.a.data() == pair.b.data(), "the legs differ");
        pair.stop().await;
    });
}

#[test]
fn enospc_on_the_primary_is_covered_by_the_secondary() {
    run(|| async {
        let pair = Pair::start(disk(), disk(), ReplicationMode::MemSync).await;
        pair.wait_in_sync(Duration::from_secs(10)).await;
        pair.a.mem.borrow_mut().faults.no_space = true;
        let d = pattern(30, 65536);
        assert!(try_write(&pair.primary, 6 * EXTENT, &d).await);
        assert!(pair.primary.disk().failed());
        let why = pair.a.stats.disk_error.lock().unwrap().clone();
        assert!(why.contains("No space left on device"), "{why}");
        b_holds_the_only_copy(&pair);
        assert_eq!(pair.read(6 * EXTENT, 65536).await, d);
        pair.stop().await;
    });
}

#[test]
fn a_failing_secondary_disk_is_detached_and_the_primary_runs_degraded() {
    run(|| async {
        let pair = Pair::start(disk(), disk(), ReplicationMode::MemSync).await;
        pair.wait_in_sync(Duration::from_secs(10)).await;
        {
            let mut m = pair.b.mem.borrow_mut();
            m.faults.write_error = true;
            m.faults.read_error = true;
            m.faults.flush_error = true;
        }
        let mut written = Vec::new();
        for i in 0..(FAIL_AFTER as u64 + 4) {
            let d = pattern(40 + i, 4096);
            pair.write(i * EXTENT, &d).await;
            written.push((i * EXTENT, d));
        }
        let s = &pair.a.stats;
        wait_for(
            Duration::from_secs(10),
            "the secondary's disk reported",
            || s.peer_disk_failed.load(Relaxed),
        )
        .await;
        assert!(pair.secondary.disk().failed());
        assert!(!s.connected.load(Relaxed));
        // Several refused attempts: reported once on each side.
        glommio::timer::sleep(Duration::from_millis(300)).await;
        let (ea, eb) = (pair.events(true), pair.events(false));
        assert_eq!(
            count(&ea, EventKind::DiskFailed { leg: Leg::Remote }),
            1,
            "{ea:?}"
        );
        assert_eq!(
            count(&eb, EventKind::DiskFailed { leg: Leg::Local }),
            1,
            "{eb:?}"
        );
        assert!(s.last_error.lock().unwrap().contains("disk"));
        // The primary serves on alone, everything marked.
        let d = pattern(60, 4096);
        pair.write(15 * EXTENT, &d).await;
        written.push((15 * EXTENT, d));
        for (off, d) in &written {
            assert_eq!(&pair.read(*off, 4096).await, d);
        }
        // Every written extent (the last one is short).
        let dirty = s.dirty_bytes.load(Relaxed);
        let last = pair.a.md.datasize - 15 * EXTENT;
        assert_eq!(dirty, 12 * EXTENT + last);
        pair.stop().await;
    });
}

#[test]
fn a_provider_truncated_under_the_primary_is_detached_and_served_from_the_secondary() {
    // Read past the new end (a short read), or not read at all (found by
    // the size check); in the second case a write past the end makes a
    // hole that would read as zeros.
    for read_first in [true, false] {
        run(move || async move {
            let pair = Pair::start(disk(), disk(), ReplicationMode::MemSync).await;
            pair.wait_in_sync(Duration::from_secs(10)).await;
            // Extents 6 to 13 hold data; the provider is cut at extent 8.
            let data: Vec<u8> = (0..8)
                .flat_map(|i| pattern(70 + i, EXTENT as usize))
                .collect();
            let of = |e: u64| ((e - 6) * EXTENT) as usize;
            for e in 6..14u64 {
                pair.write(e * EXTENT, &data[of(e)..of(e) + EXTENT as usize])
                    .await;
            }
            pair.primary.flush().await.expect("flush");
            pair.wait_in_sync(Duration::from_secs(10)).await;
            pair.primary.disk().watch_size();
            let cut = at(&pair.a, 8 * EXTENT) as usize;
            pair.a.mem.borrow_mut().truncate(cut);
            if read_first {
                let got = pair.read(12 * EXTENT, 65536).await;
                assert_eq!(got, data[of(12)..of(12) + 65536]);
                assert!(pair.primary.disk().failed());
            } else {
                let w = pattern(90, 4096);
                pair.write(13 * EXTENT, &w).await;
                wait_for(Duration::from_secs(5), "the size check", || {
                    pair.primary.disk().failed()
                })
                .await;
                // The hole between the new end and that write.
                let got = pair.read(10 * EXTENT, 65536).await;
                assert_eq!(got, data[of(10)..of(10) + 65536]);
                assert_eq!(pair.read(13 * EXTENT, 4096).await, w);
            }
            let why = pair.a.stats.disk_error.lock().unwrap().clone();
            assert!(why.contains("shrank"), "{why}");
            b_holds_the_only_copy(&pair);
            pair.stop().await;
        });
    }
}

#[test]
fn after_a_detach_the_data_is_recovered_from_the_secondary() {
    // Promote the secondary (failover), or attach the repaired disk
    // again (a new role change on the same node): either way the node
    // that missed the writes is synchronised from the other.
    for failover in [true, false] {
        run(move || async move {
            let pair = Pair::start(disk(), disk(), ReplicationMode::FullSync).await;
            pair.wait_in_sync(Duration::from_secs(10)).await;
            for i in 0..6u64 {
                pair.write(i * 2 * EXTENT, &pattern(100 + i, 65536)).await;
            }
            pair.primary.flush().await.expect("flush");
            pair.wait_in_sync(Duration::from_secs(10)).await;
            let bad = at(&pair.a, 4 * EXTENT);
            pair.a.mem.borrow_mut().faults.bad = Some((bad, bad + 65536));
            // The first write detaches A; the others go to B only.
            for i in 0..6u64 {
                pair.write(i * 2 * EXTENT + 4096, &pattern(200 + i, 65536))
                    .await;
            }
            pair.write(2 * EXTENT, &pattern(300, 4096)).await;
            assert!(pair.primary.disk().failed());
            let expect = pair.b.data();
            let (a, b) = (reopen(&pair.a), reopen(&pair.b));
            pair.stop().await;
            a.mem.borrow_mut().faults = MemFaults::default();
            let (p, s) = if failover { (b, a) } else { (a, b) };
            let pair = Pair::start(p, s, ReplicationMode::FullSync).await;
            pair.wait_in_sync(Duration::from_secs(20)).await;
            assert!(
                pair.a.data() == expect,
                "failover {failover}: the new primary's data"
            );
            assert!(
                pair.b.data() == expect,
                "failover {failover}: the secondary's data"
            );
            let synced = pair.a.stats.sync_bytes_total.load(Relaxed);
            assert!(
                synced <= 10 * EXTENT,
                "only the extents written since the detach: {synced} bytes"
            );
            pair.stop().await;
        });
    }
}

/// A synchronisation to the secondary whose last step fails on the
/// primary: the secondary recorded the new generation, then the primary
/// cannot flush its own disk to record it. The connection stays (the
/// secondary holds every byte; dropping the link would fail writes it
/// covers), writes keep replicating over it, and the next handshake
/// recognises the generation recorded on one side only: no split-brain,
/// legs identical.
#[test]
fn a_local_failure_to_record_a_completed_sync_keeps_the_connection() {
    run(|| async {
        let pair = Pair::start(disk(), disk(), ReplicationMode::MemSync).await;
        pair.wait_in_sync(Duration::from_secs(10)).await;
        for i in 0..4u64 {
            pair.write(i * EXTENT, &pattern(i, 64 << 10)).await;
        }
        pair.primary.flush().await.expect("flush");
        pair.wait_in_sync(Duration::from_secs(10)).await;
        assert_eq!(pair.attempts.get(), 1);
        let b_before = pair.secondary.disk().metadata();

        // Armed before the cut: the first flush of A once B recorded a
        // new generation fails, and so does every flush of A until the
        // pass has ended.
        let fired = Rc::new(Cell::new(false));
        {
            let sec = pair.secondary.clone();
            let cond = Rc::new(move || sec.disk().metadata().localcnt > b_before.localcnt);
            let (mem, fired) = (pair.a.mem.clone(), fired.clone());
            let on = Rc::new(move || {
                mem.borrow_mut().faults.flush_error = true;
                fired.set(true);
            });
            at_first_when(&pair.a.wire, true, cond, on);
        }
        // Apart: A writes alone, then reconnects and copies to B.
        pair.cut();
        for i in 4..8u64 {
            pair.write(i * EXTENT, &pattern(i, 64 << 10)).await;
        }
        wait_for(
            Duration::from_secs(20),
            "the fault at the end of the pass",
            || fired.get() && pair.a.stats.sync_state().is_none(),
        )
        .await;
        pair.a.mem.borrow_mut().faults.flush_error = false;
        let (a_md, b_md) = (
            pair.primary.disk().metadata(),
            pair.secondary.disk().metadata(),
        );
        assert_eq!(
            b_md.localcnt, b_md.remotecnt,
            "B recorded the pass: {b_md:?}"
        );
        assert_ne!(
            (a_md.localcnt, a_md.remotecnt),
            (b_md.localcnt, b_md.remotecnt),
            "A could not record it"
        );
        assert_eq!(pair.attempts.get(), 2, "one reconnection, after the cut");
        assert!(
            !pair.primary.disk().failed(),
            "one failed flush does not detach"
        );

        // The same connection carries new writes to B.
        let late = pattern(99, 32 << 10);
        pair.write(9 * EXTENT, &late).await;
        pair.primary
            .flush()
            .await
            .expect("flush once the fault is gone");
        pair.wait_in_sync(Duration::from_secs(10)).await;
        let off = 9 * EXTENT as usize;
        assert_eq!(pair.b.data()[off..off + late.len()], late[..]);
        assert_eq!(pair.attempts.get(), 2, "the link was never dropped");
        let ev = pair.events(true);
        assert_eq!(count(&ev, EventKind::Disconnect), 1, "{ev:?}");
        // The first connection's pass and this one: the legs are
        // identical, though only B recorded it.
        assert_eq!(count(&ev, EventKind::SyncDone), 2, "{ev:?}");

        // The next handshake settles the generation A missed.
        pair.cut();
        wait_for(Duration::from_secs(10), "the reconnection", || {
            pair.attempts.get() >= 3
        })
        .await;
        pair.wait_in_sync(Duration::from_secs(20)).await;
        assert!(!pair.a.stats.split_brain.load(Relaxed), "no split-brain");
        let (a_md, b_md) = (
            pair.primary.disk().metadata(),
            pair.secondary.disk().metadata(),
        );
        assert_eq!(
            (a_md.localcnt, a_md.remotecnt),
            (b_md.localcnt, b_md.remotecnt),
            "both record one generation"
        );
        assert!(pair.a.data() == pair.b.data(), "the legs are identical");
        for i in 0..8u64 {
            let off = (i * EXTENT) as usize;
            assert_eq!(
                pair.a.data()[off..off + (64 << 10)],
                pattern(i, 64 << 10)[..]
            );
        }
        pair.stop().await;
    });
}

/// A synchronisation from the secondary (the primary was out of date)
/// whose last reply is lost: the primary had copied everything and
/// recorded the new generation, then the link broke before the secondary
/// answered `SyncComplete`. The primary is current: it serves and writes
/// alone at once (it is not held back as out of date until a reconnection),
/// and the next handshake settles the counters — no split-brain, legs
/// identical.
#[test]
fn a_primary_that_recorded_its_sync_from_the_secondary_is_current_without_the_last_reply() {
    run(|| async {
        let pair = Pair::start(disk(), disk(), ReplicationMode::MemSync).await;
        pair.wait_in_sync(Duration::from_secs(10)).await;
        for i in 0..4u64 {
            pair.write(i * EXTENT, &pattern(i, 64 << 10)).await;
        }
        pair.primary.flush().await.expect("flush");
        pair.wait_in_sync(Duration::from_secs(10)).await;
        let (a, b) = (reopen(&pair.a), reopen(&pair.b));
        pair.stop().await;

        // A is gone; B becomes primary and writes alone: A is out of date.
        let newer: Vec<_> = (1..3u64).map(|i| pattern(i + 10, 64 << 10)).collect();
        {
            let bd = b.open(Role::Primary).await;
            let p = Primary::new(bd.clone(), b.stats.clone(), None);
            for (i, data) in (1..3u64).zip(&newer) {
                assert!(try_write(&p, i * EXTENT, data).await, "B alone");
            }
            p.flush().await.expect("flush B");
            drop(p);
            bd.close(Role::Primary).await.expect("close B");
        }
        let b_md = md_of(&b.mem.borrow());
        assert_eq!(b_md.localcnt, b_md.remotecnt + 1, "B wrote alone: {b_md:?}");
        let target = b_md.localcnt;

        // A comes back as primary without writing and pulls B's writes.
        // At B's first disk operation after A recorded the new generation
        // (the flush for SyncComplete), the link breaks and stays down.
        let hooks = Hooks::default();
        let recorded = Rc::new(Cell::new(false));
        {
            let a_mem = a.mem.clone();
            let cond = Rc::new(move || {
                let md = md_of(&a_mem.borrow());
                md.localcnt == target && md.flags & FLAG_INCONSISTENT == 0
            });
            let (hooks, recorded) = (hooks.clone(), recorded.clone());
            let on = Rc::new(move || {
                hooks.refuse.set(true);
                hooks.cut();
                recorded.set(true);
            });
            at_first_when(&b.wire, false, cond, on);
        }
        let pair = Pair::start_hooked(a, b, ReplicationMode::MemSync, Opts::default(), hooks).await;
        wait_for(
            Duration::from_secs(20),
            "the link to break after A recorded",
            || {
                recorded.get()
                    && pair.a.stats.sync_state().is_none()
                    && !pair.a.stats.connected.load(Relaxed)
            },
        )
        .await;
        assert!(
            !pair.remote.out_of_date(),
            "A holds and recorded every byte"
        );
        assert!(!pair.a.stats.out_of_date.load(Relaxed));
        let a_md = pair.primary.disk().metadata();
        assert_eq!(
            (a_md.localcnt, a_md.remotecnt),
            (target, target),
            "{a_md:?}"
        );
        // Served and written alone.
        for (i, data) in (1..3u64).zip(&newer) {
            assert_eq!(&pair.read(i * EXTENT, 64 << 10).await, data);
        }
        let late = pattern(77, 32 << 10);
        assert!(
            try_write(&pair.primary, 6 * EXTENT, &late).await,
            "a current primary writes without its secondary"
        );
        assert_eq!(pair.read(6 * EXTENT, 32 << 10).await, late);

        // The secondary comes back: counters settled, legs identical.
        pair.hooks.refuse.set(false);
        pair.wait_in_sync(Duration::from_secs(20)).await;
        assert!(!pair.a.stats.split_brain.load(Relaxed), "no split-brain");
        assert!(pair.a.data() == pair.b.data(), "the legs are identical");
        let (a_md, b_md) = (
            pair.primary.disk().metadata(),
            pair.secondary.disk().metadata(),
        );
        assert_eq!(
            (a_md.localcnt, a_md.remotecnt),
            (b_md.localcnt, b_md.remotecnt),
            "both record one generation"
        );
        let off = (6 * EXTENT) as usize;
        assert_eq!(pair.b.data()[off..off + late.len()], late[..]);
        pair.stop().await;
    });
}

/// Arms `wire` to run `on` at the first operation (only flushes when
/// `flushes`) at which `cond` holds, checked just before each one.
fn at_first_when(wire: &Rc<Tripwire>, flushes: bool, cond: Rc<dyn Fn() -> bool>, on: Rc<dyn Fn()>) {
    let again = wire.clone();
    let action = move || {
        if cond() {
            on();
        } else {
            at_first_when(&again, flushes, cond, on);
        }
    };
    if flushes {
        wire.arm_at_flush(0, action);
    } else {
        wire.arm(0, action);
    }
}

/// The metadata stored on an in-memory disk now.
fn md_of(d: &MemDisk) -> Metadata {
    Metadata::decode(&d.contents()[..METADATA_SIZE], d.size() as u64).expect("metadata")
}
