//! An in-memory, bounded, bidirectional byte stream between two tasks of
//! one executor: the wire of the in-process tests and of the crash
//! simulation, in place of TCP.
//!
//! Each direction buffers at most `capacity` bytes (a writer waits for
//! room, as on a full socket). Dropping an end closes it: the other end
//! reads what is buffered, then end of stream, and its writes fail with
//! `BrokenPipe`. [`PipeEnd::cut`] breaks the connection at once, losing
//! what is buffered, as a crashed host or a reset would.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use futures_lite::{AsyncRead, AsyncWrite};

#[derive(Default)]
struct Dir {
    buf: VecDeque<u8>,
    capacity: usize,
    /// The writing end is gone (end of stream after the buffer).
    write_closed: bool,
    /// The reading end is gone (writes fail).
    read_closed: bool,
    /// Broken: reads and writes fail at once.
    cut: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Dir {
    fn wake_all(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        if let Some(w) = self.writer.take() {
            w.wake();
        }
    }
}

/// One end of a [`pipe`].
pub struct PipeEnd {
    rx: Rc<RefCell<Dir>>,
    tx: Rc<RefCell<Dir>>,
}

/// Two connected ends, each direction buffering at most `capacity` bytes.
pub fn pipe(capacity: usize) -> (PipeEnd, PipeEnd) {
    let mk = || {
        Rc::new(RefCell::new(Dir {
            capacity: capacity.max(1),
            ..Default::default()
        }))
    };
    let (ab, ba) = (mk(), mk());
    (
        PipeEnd {
            rx: ba.clone(),
            tx: ab.clone(),
        },
        PipeEnd { rx: ab, tx: ba },
    )
}

impl PipeEnd {
    /// Breaks the connection in both directions, dropping what is
    /// buffered.
    pub fn cut(&self) {
        cut(&[self.rx.clone(), self.tx.clone()]);
    }

    /// Bytes buffered towards this end.
    pub fn pending(&self) -> usize {
        self.rx.borrow().buf.len()
    }

    /// A handle that can [`Cutter::cut`] this connection later, from
    /// outside whatever owns the end.
    pub fn cutter(&self) -> Cutter {
        Cutter {
            dirs: [self.rx.clone(), self.tx.clone()],
        }
    }
}

/// Cuts a pipe from outside (see [`PipeEnd::cutter`]).
#[derive(Clone)]
pub struct Cutter {
    dirs: [Rc<RefCell<Dir>>; 2],
}

impl Cutter {
    /// Breaks the connection in both directions, dropping what is
    /// buffered.
    pub fn cut(&self) {
        cut(&self.dirs);
    }
}

fn cut(dirs: &[Rc<RefCell<Dir>>; 2]) {
    for d in dirs {
        let mut d = d.borrow_mut();
        d.cut = true;
        d.buf.clear();
        d.wake_all();
    }
}

impl Drop for PipeEnd {
    fn drop(&mut self) {
        let mut rx = self.rx.borrow_mut();
        rx.read_closed = true;
        rx.wake_all();
        drop(rx);
        let mut tx = self.tx.borrow_mut();
        tx.write_closed = true;
        tx.wake_all();
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "pipe closed")
}

impl AsyncRead for PipeEnd {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut d = self.rx.borrow_mut();
        if d.cut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "pipe cut",
            )));
        }
        if d.buf.is_empty() {
            if d.write_closed || out.is_empty() {
                return Poll::Ready(Ok(0));
            }
            d.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = out.len().min(d.buf.len());
        for (o, b) in out.iter_mut().zip(d.buf.drain(..n)) {
            *o = b;
        }
        if let Some(w) = d.writer.take() {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for PipeEnd {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut d = self.tx.borrow_mut();
        if d.cut || d.read_closed {
            return Poll::Ready(Err(broken()));
        }
        let room = d.capacity - d.buf.len().min(d.capacity);
        if room == 0 {
            d.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(data.len());
        d.buf.extend(&data[..n]);
        if let Some(w) = d.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut d = self.tx.borrow_mut();
        d.write_closed = true;
        d.wake_all();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_lite::future::block_on;
    use futures_lite::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn bytes_flow_both_ways_and_close() {
        block_on(async {
            let (mut a, mut b) = pipe(4);
            let writer = async {
                a.write_all(b"hello world").await.unwrap();
                let mut back = [0u8; 2];
                a.read_exact(&mut back).await.unwrap();
                assert_eq!(&back, b"ok");
                drop(a);
            };
            let reader = async {
                let mut got = [0u8; 11];
                b.read_exact(&mut got).await.unwrap();
                assert_eq!(&got, b"hello world");
                b.write_all(b"ok").await.unwrap();
                let mut rest = Vec::new();
                b.read_to_end(&mut rest).await.unwrap();
                assert!(rest.is_empty());
                assert!(b.write_all(b"x").await.is_err());
            };
            futures_lite::future::zip(writer, reader).await;
        });
    }

    #[test]
    fn cut_fails_both_sides() {
        block_on(async {
            let (mut a, mut b) = pipe(64);
            a.write_all(b"lost").await.unwrap();
            a.cut();
            let mut buf = [0u8; 4];
            assert!(b.read(&mut buf).await.is_err());
            assert!(a.write_all(b"x").await.is_err());
        });
    }
}
