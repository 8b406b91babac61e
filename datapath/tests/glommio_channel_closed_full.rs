//! glommio 0.9's bounded `local_channel`: a `send` waiting for room is
//! woken when the receiver is dropped, but it only checks for room again —
//! the queue is still full (the items are not dropped with the receiver),
//! so it waits again, forever, instead of returning an error (see
//! `docs/upstream.md`). This test reproduces it; it fails once upstream
//! fixes it, telling us the workaround in `peer::link` (every queued
//! request races the link's death) is no longer needed there.

use std::time::Duration;

use futures_lite::future::or;
use glommio::channels::local_channel;
use glommio::LocalExecutorBuilder;

#[test]
fn glommio_send_into_a_full_channel_hangs_when_the_receiver_goes() {
    LocalExecutorBuilder::default()
        .spawn(|| async {
            let (tx, rx) = local_channel::new_bounded::<u32>(1);
            tx.try_send(1).expect("room for one");
            let sender = glommio::spawn_local(async move { tx.send(2).await.is_err() });
            // The sender waits for room.
            futures_lite::future::yield_now().await;
            drop(rx);
            let returned = or(async { Some(sender.await) }, async {
                glommio::timer::sleep(Duration::from_secs(1)).await;
                None
            })
            .await;
            assert_eq!(
                returned, None,
                "glommio's send returned after the receiver was dropped: \
                 the upstream bug is fixed (docs/upstream.md)"
            );
        })
        .unwrap()
        .join()
        .unwrap();
}
