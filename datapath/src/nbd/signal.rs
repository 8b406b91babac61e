//! A one-shot event for tasks of one executor: once fired, every current and
//! future [`Signal::wait`] completes.
//!
//! Used to stop the accept loop and every connection of an export, and to
//! stop one connection's reader when its writer fails. Waiters deregister
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
pub(crate) struct Signal {
    inner: Rc<Inner>,
}

#[derive(Default)]
struct Inner {
    fired: Cell<bool>,
    next_id: Cell<u64>,
    waiters: RefCell<Vec<(u64, Waker)>>,
}

impl Signal {
    /// A signal that has not fired.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Fire the signal, waking every waiter. Idempotent.
    pub(crate) fn fire(&self) {
        if self.inner.fired.replace(true) {
            return;
        }
        // Take the list first: waking must not happen under the borrow.
        let waiters = std::mem::take(&mut *self.inner.waiters.borrow_mut());
        for (_, waker) in waiters {
            waker.wake();
        }
    }

    /// Whether the signal has fired.
    pub(crate) fn is_fired(&self) -> bool {
        self.inner.fired.get()
    }

    /// A future that completes once the signal has fired.
    pub(crate) fn wait(&self) -> Wait<'_> {
        Wait {
            inner: &self.inner,
            id: None,
        }
    }
}

/// Future returned by [`Signal::wait`].
pub(crate) struct Wait<'a> {
    inner: &'a Inner,
    id: Option<u64>,
}

impl Future for Wait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let inner = self.inner;
        if inner.fired.get() {
            return Poll::Ready(());
        }
        let mut waiters = inner.waiters.borrow_mut();
        match self.id {
            Some(id) => {
                if let Some(entry) = waiters.iter_mut().find(|(i, _)| *i == id) {
                    entry.1.clone_from(cx.waker());
                }
            }
            None => {
                let id = inner.next_id.get();
                inner.next_id.set(id.wrapping_add(1));
                waiters.push((id, cx.waker().clone()));
                self.id = Some(id);
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.inner.waiters.borrow_mut().retain(|(i, _)| *i != id);
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
            assert_eq!(s.inner.waiters.borrow().len(), 1);
        }
        assert_eq!(s.inner.waiters.borrow().len(), 0);
        let mut w = Box::pin(s.wait());
        assert!(future::block_on(future::poll_once(&mut w)).is_none());
        s.fire();
        assert!(s.is_fired());
        assert!(future::block_on(future::poll_once(&mut w)).is_some());
        assert!(future::block_on(future::poll_once(s.wait())).is_some());
    }
}
