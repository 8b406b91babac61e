//! Wake-ups for the tasks of one executor: [`Signal`], a one-shot event
//! (once fired, every current and future [`Signal::wait`] completes), and
//! [`Notify`], a condition variable.
//!
//! Used to stop the accept loop and every connection of an export, to stop
//! one connection's reader when its writer fails, and to tear a peer
//! connection down (its reader and writer race their loops against it, so
//! no descriptor is shut down from outside the stream). Waiters deregister
//! when their future is dropped, so racing `wait()` against each request
//! read does not accumulate wakers: the waiter list holds at most one entry
//! per pending `wait()` future.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A cloneable handle to a one-shot event.
#[derive(Clone, Default)]
pub struct Signal {
    inner: Rc<Inner>,
}

#[derive(Default)]
struct Inner {
    fired: Cell<bool>,
    waiters: Notify,
}

impl Signal {
    /// A signal that has not fired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fire the signal, waking every waiter. Idempotent.
    pub fn fire(&self) {
        if !self.inner.fired.replace(true) {
            self.inner.waiters.notify_all();
        }
    }

    /// Whether the signal has fired.
    pub fn is_fired(&self) -> bool {
        self.inner.fired.get()
    }

    /// Completes once the signal has fired.
    pub async fn wait(&self) {
        let inner = &self.inner;
        inner.waiters.wait_until(|| inner.fired.get()).await
    }
}

/// Wakes the tasks waiting for a condition to change (a condition
/// variable for the tasks of one executor): a waiter checks its
/// condition, and if it does not hold awaits [`Notify::notified`], which
/// completes at the next [`Notify::notify_all`]. No wake-up is lost: tasks
/// of one executor do not run between the check and the first poll.
#[derive(Default)]
pub struct Notify {
    next_id: Cell<u64>,
    waiters: RefCell<Vec<(u64, Waker)>>,
}

impl Notify {
    /// No waiter yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes every current waiter.
    pub fn notify_all(&self) {
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for (_, waker) in waiters {
            waker.wake();
        }
    }

    /// Completes at the next [`Notify::notify_all`] after its first poll.
    pub fn notified(&self) -> Notified<'_> {
        Notified {
            notify: self,
            id: None,
        }
    }

    /// Waits until `cond` holds, re-checking at every notification.
    pub async fn wait_until(&self, mut cond: impl FnMut() -> bool) {
        while !cond() {
            self.notified().await;
        }
    }
}

/// Future returned by [`Notify::notified`].
pub struct Notified<'a> {
    notify: &'a Notify,
    id: Option<u64>,
}

impl Future for Notified<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let notify = self.notify;
        let mut waiters = notify.waiters.borrow_mut();
        match self.id {
            // Registered and still listed: not notified yet.
            Some(id) => match waiters.iter_mut().find(|(i, _)| *i == id) {
                Some(entry) => {
                    entry.1.clone_from(cx.waker());
                    Poll::Pending
                }
                None => Poll::Ready(()),
            },
            None => {
                let id = notify.next_id.get();
                notify.next_id.set(id.wrapping_add(1));
                waiters.push((id, cx.waker().clone()));
                self.id = Some(id);
                Poll::Pending
            }
        }
    }
}

impl Drop for Notified<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.notify.waiters.borrow_mut().retain(|(i, _)| *i != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future;

    #[test]
    fn fires_and_deregisters() {
        let s = Signal::new();
        {
            let mut w = Box::pin(s.wait());
            assert!(future::block_on(future::poll_once(&mut w)).is_none());
            assert_eq!(s.inner.waiters.waiters.borrow().len(), 1);
        }
        assert_eq!(s.inner.waiters.waiters.borrow().len(), 0);
        let mut w = Box::pin(s.wait());
        assert!(future::block_on(future::poll_once(&mut w)).is_none());
        s.fire();
        assert!(s.is_fired());
        assert!(future::block_on(future::poll_once(&mut w)).is_some());
        assert!(future::block_on(future::poll_once(s.wait())).is_some());
    }

    #[test]
    fn notify_wakes_registered_waiters_once() {
        let n = Notify::new();
        let mut w = Box::pin(n.notified());
        assert!(future::block_on(future::poll_once(&mut w)).is_none());
        assert_eq!(n.waiters.borrow().len(), 1);
        n.notify_all();
        assert!(future::block_on(future::poll_once(&mut w)).is_some());
        // A new waiter waits for the next notification.
        let mut w2 = Box::pin(n.notified());
        assert!(future::block_on(future::poll_once(&mut w2)).is_none());
        drop(w2);
        assert_eq!(n.waiters.borrow().len(), 0);
        let mut hits = 0;
        future::block_on(n.wait_until(|| {
            hits += 1;
            true
        }));
        assert_eq!(hits, 1);
    }
}
