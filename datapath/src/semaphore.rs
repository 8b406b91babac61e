//! A FIFO semaphore for the tasks of one executor that never loses a
//! wake-up when a waiter is cancelled.
//!
//! glommio 0.9's `glommio::sync::Semaphore` wakes the first waiter that
//! fits when units are released and takes it off the queue, but leaves the
//! units unreserved: if that waiter's future is dropped before it is polled
//! again (its task cancelled, or it lost a `select`/`or` race), the wake-up
//! is lost — the units stay available while every other waiter sleeps until
//! some later release, which may never come (a lock then deadlocks). See
//! `docs/upstream.md` for a minimal reproduction; the power-loss simulation
//! found it (a peer flush waiting for the flush lock, cancelled with its
//! connection, left two later flushes waiting forever).
//!
//! Here a release *grants* units to the waiters at the front of the queue
//! (in order, as long as they fit); a granted waiter that is dropped before
//! it took its permit gives the units back, which grants them onwards.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// The semaphore was closed: no more permits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("semaphore closed")]
pub struct Closed;

#[derive(Default)]
struct Ticket {
    units: u64,
    granted: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

#[derive(Default)]
struct State {
    avail: u64,
    closed: bool,
    queue: VecDeque<Rc<Ticket>>,
}

/// A counting semaphore (see the module documentation).
#[derive(Default)]
pub struct Semaphore {
    state: RefCell<State>,
}

impl Semaphore {
    /// A semaphore with `units` available.
    pub fn new(units: u64) -> Semaphore {
        Semaphore {
            state: RefCell::new(State {
                avail: units,
                ..Default::default()
            }),
        }
    }

    /// Units available now.
    pub fn available(&self) -> u64 {
        self.state.borrow().avail
    }

    /// Closes it: every waiter and every later acquisition fails.
    pub fn close(&self) {
        let waiters = {
            let mut s = self.state.borrow_mut();
            s.closed = true;
            std::mem::take(&mut s.queue)
        };
        for t in waiters {
            if let Some(w) = t.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }

    /// Takes `units` now, if they are available and nobody waits before.
    fn take_now(&self, units: u64) -> Result<bool, Closed> {
        let mut s = self.state.borrow_mut();
        if s.closed {
            return Err(Closed);
        }
        if s.queue.is_empty() && s.avail >= units {
            s.avail -= units;
            return Ok(true);
        }
        Ok(false)
    }

    /// Gives units back and grants them to the waiters in front.
    fn release(&self, units: u64) {
        let woken = {
            let mut s = self.state.borrow_mut();
            s.avail += units;
            let mut woken = Vec::new();
            while let Some(front) = s.queue.front() {
                if front.units > s.avail {
                    break;
                }
                let t = s.queue.pop_front().expect("front exists");
                s.avail -= t.units;
                t.granted.set(true);
                woken.push(t);
            }
            woken
        };
        for t in woken {
            if let Some(w) = t.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }

    fn acquire(&self, units: u64) -> Acquire<'_> {
        Acquire {
            sem: self,
            units,
            ticket: None,
            done: false,
        }
    }

    /// Waits for `units` (in arrival order).
    pub async fn acquire_permit(&self, units: u64) -> Result<Permit<'_>, Closed> {
        self.acquire(units).await?;
        Ok(Permit { sem: self, units })
    }

    /// Takes `units` if they are available at once (and nobody waits).
    pub fn try_acquire_permit(&self, units: u64) -> Option<Permit<'_>> {
        match self.take_now(units) {
            Ok(true) => Some(Permit { sem: self, units }),
            _ => None,
        }
    }

    /// Waits for `units`; the permit owns a reference to the semaphore.
    pub async fn acquire_static_permit(
        self: &Rc<Self>,
        units: u64,
    ) -> Result<StaticPermit, Closed> {
        self.acquire(units).await?;
        Ok(StaticPermit {
            sem: self.clone(),
            units,
        })
    }
}

/// The future of an acquisition.
struct Acquire<'a> {
    sem: &'a Semaphore,
    units: u64,
    ticket: Option<Rc<Ticket>>,
    /// The units were taken (and belong to the caller now).
    done: bool,
}

impl Future for Acquire<'_> {
    type Output = Result<(), Closed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(t) = &self.ticket {
            if t.granted.get() {
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if self.sem.state.borrow().closed {
                return Poll::Ready(Err(Closed));
            }
            *t.waker.borrow_mut() = Some(cx.waker().clone());
            return Poll::Pending;
        }
        match self.sem.take_now(self.units) {
            Err(e) => Poll::Ready(Err(e)),
            Ok(true) => {
                self.done = true;
                Poll::Ready(Ok(()))
            }
            Ok(false) => {
                let t = Rc::new(Ticket {
                    units: self.units,
                    granted: Cell::new(false),
                    waker: RefCell::new(Some(cx.waker().clone())),
                });
                self.sem.state.borrow_mut().queue.push_back(t.clone());
                self.ticket = Some(t);
                Poll::Pending
            }
        }
    }
}

impl Drop for Acquire<'_> {
    fn drop(&mut self) {
        let Some(t) = self.ticket.take() else {
            return;
        };
        if self.done {
            return;
        }
        if t.granted.get() {
            // Granted but never taken: pass the units on.
            self.sem.release(t.units);
        } else {
            let mut s = self.sem.state.borrow_mut();
            s.queue.retain(|q| !Rc::ptr_eq(q, &t));
            drop(s);
            // Whoever waited behind us may fit now.
            self.sem.release(0);
        }
    }
}

/// Units held until dropped.
#[must_use = "the units are released when the permit is dropped"]
pub struct Permit<'a> {
    sem: &'a Semaphore,
    units: u64,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.sem.release(self.units);
    }
}

/// Units held until dropped, with a reference to their semaphore.
#[must_use = "the units are released when the permit is dropped"]
pub struct StaticPermit {
    sem: Rc<Semaphore>,
    units: u64,
}

impl Drop for StaticPermit {
    fn drop(&mut self) {
        self.sem.release(self.units);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::{block_on, poll_once};

    #[test]
    fn a_cancelled_woken_waiter_passes_its_units_on() {
        let sem = Semaphore::new(1);
        block_on(async {
            let held = sem.acquire_permit(1).await.unwrap();
            let mut first = Box::pin(sem.acquire_permit(1));
            let mut second = Box::pin(sem.acquire_permit(1));
            assert!(poll_once(&mut first).await.is_none());
            assert!(poll_once(&mut second).await.is_none());
            drop(held); // grants the unit to `first`
            drop(first); // cancelled before it took it
            let p = poll_once(&mut second).await;
            assert!(matches!(p, Some(Ok(_))), "the second waiter got the unit");
        });
    }

    #[test]
    fn fifo_and_bigger_requests_wait_in_turn() {
        let sem = Semaphore::new(3);
        block_on(async {
            let a = sem.acquire_permit(2).await.unwrap();
            let mut big = Box::pin(sem.acquire_permit(3));
            assert!(poll_once(&mut big).await.is_none());
            // A small request does not overtake the queued big one.
            assert!(sem.try_acquire_permit(1).is_none());
            drop(a);
            let got = poll_once(&mut big).await;
            assert!(matches!(got, Some(Ok(_))));
            assert_eq!(sem.available(), 0);
            drop(got);
            assert_eq!(sem.available(), 3);
        });
    }

    #[test]
    fn close_fails_waiters_and_later_callers() {
        let sem = Semaphore::new(0);
        block_on(async {
            let mut w = Box::pin(sem.acquire_permit(1));
            assert!(poll_once(&mut w).await.is_none());
            sem.close();
            assert!(matches!(poll_once(&mut w).await, Some(Err(Closed))));
            assert!(sem.acquire_permit(1).await.is_err());
        });
    }

    #[test]
    fn a_cancelled_queued_waiter_unblocks_those_behind() {
        let sem = Semaphore::new(1);
        block_on(async {
            let mut big = Box::pin(sem.acquire_permit(2));
            assert!(poll_once(&mut big).await.is_none());
            let mut small = Box::pin(sem.acquire_permit(1));
            assert!(poll_once(&mut small).await.is_none());
            drop(big);
            assert!(poll_once(&mut small).await.is_some());
        });
    }
}
