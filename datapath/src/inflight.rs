//! A count of tasks in flight that can be awaited until it drops to zero:
//! the primary counts the writes still waiting for the secondary's `Done`
//! (their extents settle when it arrives or the link fails), and
//! deactivation waits for them before the activemap is stored, instead of
//! polling the counter.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// Tasks in flight, mirrored into a shared gauge (what `hastctl list`
/// shows); single executor.
#[derive(Debug)]
pub struct Inflight {
    count: Cell<u64>,
    waiters: RefCell<Vec<Waker>>,
    gauge: Arc<dyn Gauge>,
}

/// Where the count is published.
pub trait Gauge: std::fmt::Debug {
    /// The counter to mirror the count into.
    fn counter(&self) -> &AtomicU64;
}

impl Gauge for crate::stats::ResourceStats {
    fn counter(&self) -> &AtomicU64 {
        &self.remote_inflight
    }
}

impl Inflight {
    /// An empty count, published to `gauge`.
    pub fn new(gauge: Arc<dyn Gauge>) -> Rc<Inflight> {
        Rc::new(Inflight {
            count: Cell::new(0),
            waiters: RefCell::new(Vec::new()),
            gauge,
        })
    }

    /// One more in flight until the guard drops.
    pub fn enter(self: &Rc<Self>) -> InflightGuard {
        self.count.set(self.count.get() + 1);
        self.gauge.counter().fetch_add(1, Relaxed);
        InflightGuard(self.clone())
    }

    /// In flight now.
    pub fn get(&self) -> u64 {
        self.count.get()
    }

    /// Resolves once nothing is in flight.
    pub fn idle(&self) -> Idle<'_> {
        Idle(self)
    }

    fn leave(&self) {
        let n = self.count.get() - 1;
        self.count.set(n);
        self.gauge.counter().fetch_sub(1, Relaxed);
        if n == 0 {
            for w in self.waiters.borrow_mut().drain(..) {
                w.wake();
            }
        }
    }
}

/// Held by a task in flight.
#[derive(Debug)]
pub struct InflightGuard(Rc<Inflight>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// Future of [`Inflight::idle`].
#[derive(Debug)]
pub struct Idle<'a>(&'a Inflight);

impl Future for Idle<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.count.get() == 0 {
            return Poll::Ready(());
        }
        let mut w = self.0.waiters.borrow_mut();
        w.retain(|x| !x.will_wake(cx.waker()));
        w.push(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::ResourceStats;

    #[test]
    fn idle_resolves_when_the_last_guard_drops() {
        let stats = Arc::new(ResourceStats::default());
        let f = Inflight::new(stats.clone());
        let (a, b) = (f.enter(), f.enter());
        assert_eq!(stats.remote_inflight.load(Relaxed), 2);
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut idle = Box::pin(f.idle());
        assert!(idle.as_mut().poll(&mut cx).is_pending());
        drop(a);
        assert!(idle.as_mut().poll(&mut cx).is_pending());
        drop(b);
        assert!(idle.as_mut().poll(&mut cx).is_ready());
        assert_eq!(stats.remote_inflight.load(Relaxed), 0);
        assert_eq!(f.get(), 0);
    }
}
