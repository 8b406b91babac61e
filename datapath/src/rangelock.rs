//! An async range lock for one executor: overlapping writes and
//! synchronisation chunks to the same bytes run one after the other, in
//! arrival order, so both legs apply them in the same order. Waiting is
//! event driven: no sleeping and retrying.
//!
//! The number of holders and waiters is bounded by the callers' in-flight
//! windows; the lock itself allocates only for those.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct Inner {
    next_ticket: u64,
    /// Granted and queued ranges `(ticket, start, end)`, in ticket order.
    entries: Vec<Entry>,
}

struct Entry {
    ticket: u64,
    start: u64,
    end: u64,
    granted: bool,
    waker: Option<Waker>,
}

/// The lock. Cheap to clone (shared handle).
#[derive(Clone, Default)]
pub struct RangeLock {
    inner: Rc<RefCell<Inner>>,
}

/// A held range; dropping it releases the range and wakes waiters.
pub struct RangeGuard {
    inner: Rc<RefCell<Inner>>,
    ticket: u64,
}

/// Future returned by [`RangeLock::lock`].
pub struct Acquire {
    inner: Rc<RefCell<Inner>>,
    ticket: u64,
    done: bool,
}

impl RangeLock {
    /// A new, empty lock.
    pub fn new() -> Self {
        Self::default()
    }

    /// Locks `[start, end)`. Requests are granted in arrival order among
    /// overlapping ranges; disjoint ranges never wait for each other.
    pub fn lock(&self, start: u64, end: u64) -> Acquire {
        let mut inner = self.inner.borrow_mut();
        let ticket = inner.next_ticket;
        inner.next_ticket += 1;
        inner.entries.push(Entry {
            ticket,
            start,
            end: end.max(start + 1),
            granted: false,
            waker: None,
        });
        drop(inner);
        Acquire {
            inner: self.inner.clone(),
            ticket,
            done: false,
        }
    }

    /// Ranges currently held or waited for.
    pub fn len(&self) -> usize {
        self.inner.borrow().entries.len()
    }

    /// Nothing held or waited for?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Can the entry at `idx` be granted: no earlier entry overlaps it?
    fn grantable(&self, idx: usize) -> bool {
        let e = &self.entries[idx];
        self.entries[..idx]
            .iter()
            .all(|o| o.end <= e.start || e.end <= o.start)
    }

    fn wake_grantable(&mut self) {
        for i in 0..self.entries.len() {
            if !self.entries[i].granted && self.grantable(i) {
                if let Some(w) = self.entries[i].waker.take() {
                    w.wake();
                }
            }
        }
    }

    fn remove(&mut self, ticket: u64) {
        if let Some(pos) = self.entries.iter().position(|e| e.ticket == ticket) {
            self.entries.remove(pos);
            self.wake_grantable();
        }
    }
}

impl Future for Acquire {
    type Output = RangeGuard;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RangeGuard> {
        let mut inner = self.inner.borrow_mut();
        let idx = inner
            .entries
            .iter()
            .position(|e| e.ticket == self.ticket)
            .expect("range lock entry exists until granted or dropped");
        if inner.grantable(idx) {
            inner.entries[idx].granted = true;
            drop(inner);
            self.done = true;
            return Poll::Ready(RangeGuard {
                inner: self.inner.clone(),
                ticket: self.ticket,
            });
        }
        inner.entries[idx].waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        if !self.done {
            // Cancelled while waiting: leave the queue.
            self.inner.borrow_mut().remove(self.ticket);
        }
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.inner.borrow_mut().remove(self.ticket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{block_on, poll_once};

    #[test]
    fn disjoint_ranges_do_not_wait() {
        let l = RangeLock::new();
        let a = block_on(l.lock(0, 10));
        let b = block_on(l.lock(10, 20));
        assert_eq!(l.len(), 2);
        drop((a, b));
        assert!(l.is_empty());
    }

    #[test]
    fn overlapping_ranges_are_granted_in_order() {
        block_on(async {
            let l = RangeLock::new();
            let a = l.lock(0, 10).await;
            let mut b = Box::pin(l.lock(5, 15));
            let mut c = Box::pin(l.lock(12, 20));
            assert!(poll_once(&mut b).await.is_none());
            // c overlaps b (queued earlier): it waits behind b.
            assert!(poll_once(&mut c).await.is_none());
            drop(a);
            let gb = poll_once(&mut b)
                .await
                .expect("b granted once a is released");
            assert!(poll_once(&mut c).await.is_none());
            drop(gb);
            assert!(poll_once(&mut c).await.is_some());
        });
    }

    #[test]
    fn cancelled_waiter_leaves_the_queue() {
        block_on(async {
            let l = RangeLock::new();
            let a = l.lock(0, 10).await;
            let mut b = Box::pin(l.lock(0, 10));
            assert!(poll_once(&mut b).await.is_none());
            drop(b);
            let mut c = Box::pin(l.lock(5, 6));
            assert!(poll_once(&mut c).await.is_none());
            drop(a);
            assert!(poll_once(&mut c).await.is_some());
        });
    }
}
