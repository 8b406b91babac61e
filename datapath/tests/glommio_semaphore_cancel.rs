//! glommio 0.9's `Semaphore` loses a wake-up when a woken waiter is
//! cancelled before it runs (see `docs/upstream.md`): the released unit
//! stays available, and the next waiter sleeps. This test reproduces it
//! with glommio's semaphore — it fails, telling us the workaround
//! (`hast_datapath::semaphore`) can go, once upstream fixes it — and shows
//! that ours hands the unit on.

use std::rc::Rc;
use std::time::Duration;

use futures_lite::future::or;
use glommio::LocalExecutorBuilder;

/// Runs the scenario: a holder, a first waiter (cancelled right after the
/// release wakes it) and a second waiter. Returns whether the second got
/// the unit within a second.
async fn second_waiter_served<S, A, F>(sem: Rc<S>, acquire: A) -> bool
where
    S: 'static,
    A: Fn(Rc<S>) -> F + Clone + 'static,
    F: std::future::Future<Output = Box<dyn std::any::Any>> + 'static,
{
    let held = acquire.clone()(sem.clone()).await;
    let first = glommio::spawn_local(acquire.clone()(sem.clone()));
    let a2 = acquire.clone();
    let s2 = sem.clone();
    let second = glommio::spawn_local(async move { drop(a2(s2).await) });
    // Both spawned tasks run and queue up.
    futures_lite::future::yield_now().await;
    drop(held); // wakes `first`
    drop(first); // ...which is cancelled before it runs
    let served = async {
        second.await;
        true
    };
    let late = async {
        glommio::timer::sleep(Duration::from_secs(1)).await;
        false
    };
    or(served, late).await
}

#[test]
fn glommio_semaphore_loses_a_wakeup_ours_does_not() {
    LocalExecutorBuilder::default()
        .spawn(|| async {
            let theirs = second_waiter_served(
                Rc::new(glommio::sync::Semaphore::new(1)),
                |s: Rc<glommio::sync::Semaphore>| async move {
                    Box::new(s.acquire_static_permit(1).await.unwrap()) as Box<dyn std::any::Any>
                },
            )
            .await;
            let ours = second_waiter_served(
                Rc::new(hast_datapath::semaphore::Semaphore::new(1)),
                |s: Rc<hast_datapath::semaphore::Semaphore>| async move {
                    Box::new(s.acquire_static_permit(1).await.unwrap()) as Box<dyn std::any::Any>
                },
            )
            .await;
            assert!(ours, "our semaphore hands the unit to the next waiter");
            assert!(
                !theirs,
                "glommio's semaphore served the second waiter: the upstream bug is fixed, \
                 hast_datapath::semaphore may be replaced by glommio::sync::Semaphore again"
            );
        })
        .unwrap()
        .join()
        .unwrap();
}
