//! The real write path of both nodes in one process, over in-memory disks
//! and pipes (see `common`): replication in every mode, and a connection
//! reset followed by the resynchronisation of what the secondary missed.

mod common;

use std::time::Duration;

use common::{pattern, run, NodeDisk, Pair};
use hast_datapath::export::BlockBackend;
use hast_datapath::peer::remote::ReplicationMode;

const SIZE: usize = 16 << 20;
const EXTENT: u32 = 1 << 20;

fn writes(n: u64) -> Vec<(u64, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let off = (i * 7919 % 3000) * 4096;
            (off, pattern(i, 4096 * (1 + (i % 3) as usize)))
        })
        .collect()
}

#[test]
fn replicates_in_every_mode() {
    for mode in [
        ReplicationMode::FullSync,
        ReplicationMode::MemSync,
        ReplicationMode::Async,
    ] {
        run(move || async move {
            let a = NodeDisk::create(SIZE, EXTENT, 4, false);
            let b = NodeDisk::create(SIZE, EXTENT, 4, false);
            let pair = Pair::start(a, b, mode).await;
            // A new secondary of a virgin primary: nothing to copy.
            pair.wait_in_sync(Duration::from_secs(10)).await;
            let w = writes(200);
            // Concurrent writes, as an NBD client at queue depth 8 sends.
            let pair = std::rc::Rc::new(pair);
            for chunk in w.chunks(8) {
                let tasks: Vec<_> = chunk
                    .iter()
                    .cloned()
                    .map(|(off, data)| {
                        let pair = pair.clone();
                        glommio::spawn_local(async move { pair.write(off, &data).await })
                    })
                    .collect();
                for t in tasks {
                    t.await;
                }
            }
            let pair = std::rc::Rc::try_unwrap(pair).ok().expect("writes done");
            pair.primary.flush().await.expect("flush");
            pair.wait_in_sync(Duration::from_secs(10)).await;
            assert!(
                pair.a.data() == pair.b.data(),
                "{mode:?}: the legs differ after replication"
            );
            for (off, data) in w.iter().rev().take(3) {
                let got = pair.read(*off, data.len() as u32).await;
                assert_eq!(got.len(), data.len());
            }
            assert_eq!(
                pair.b
                    .stats
                    .activemap_updates
                    .load(std::sync::atomic::Ordering::Relaxed),
                0,
                "{mode:?}: the secondary marks nothing for replicated writes"
            );
            pair.stop().await;
        });
    }
}

#[test]
fn a_reset_connection_is_resynchronised() {
    run(|| async {
        let a = NodeDisk::create(SIZE, EXTENT, 4, false);
        let b = NodeDisk::create(SIZE, EXTENT, 4, false);
        let pair = Pair::start(a, b, ReplicationMode::MemSync).await;
        pair.wait_in_sync(Duration::from_secs(10)).await;
        for (off, data) in writes(50) {
            pair.write(off, &data).await;
        }
        // A reset: whatever was on the wire is gone.
        pair.cut();
        for (off, data) in writes(120).into_iter().skip(50) {
            pair.write(off, &data).await;
        }
        // The primary reconnects by itself and copies what B missed.
        pair.wait_in_sync(Duration::from_secs(20)).await;
        assert!(
            pair.a.data() == pair.b.data(),
            "the legs differ after the resynchronisation"
        );
        let synced = pair
            .a
            .stats
            .sync_bytes_total
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(synced > 0, "something was resynchronised");
        assert!(
            synced <= 12 * u64::from(EXTENT),
            "only the extents written while apart (and in flight): {synced} bytes"
        );
        pair.stop().await;
    });
}
