//! One batching writer for every socket the data path writes: the
//! primary's requests to the secondary, the secondary's replies, the NBD
//! replies.
//!
//! Frames queued together leave in one write: the head of each frame (and
//! its payload, when small) is copied into a staging buffer, which is
//! written when nothing more is queued or when it reaches
//! [`BATCH_BYTES`]. A large payload is written straight from its own
//! buffer (after what is staged), so bulk data is never copied. Frames are
//! dropped — their buffers and permits released — only once written.

use std::io;

use futures_lite::{AsyncWrite, AsyncWriteExt};
use glommio::channels::local_channel::LocalReceiver;

use crate::signal::Signal;

/// Largest payload copied into the staging buffer; larger ones are
/// written from their own buffers.
pub const SMALL_PAYLOAD: usize = 16 * 1024;

/// Largest batch written at once.
pub const BATCH_BYTES: usize = 256 * 1024;

/// Something the [`send`] loop writes: a head and a payload.
pub trait Frame {
    /// Appends the encoded head of the frame to `out`.
    fn encode_head(&self, out: &mut Vec<u8>);
    /// The payload (empty for none).
    fn payload(&self) -> &[u8];
}

/// Why [`send`] returned.
#[derive(Debug)]
pub enum SendEnd {
    /// Every sender is gone and everything queued was written.
    Drained,
    /// `stop` fired (what was queued may be unwritten).
    Stopped,
    /// A write failed.
    Failed(io::Error),
}

/// Writes the frames queued on `rx` to `w` in batches, until every sender
/// is gone, `stop` fires, or a write fails. `after_write` runs after each
/// batch is written, with the bytes it took.
pub async fn send<W, F>(
    w: &mut W,
    rx: &LocalReceiver<F>,
    stop: &Signal,
    mut after_write: impl FnMut(usize),
) -> SendEnd
where
    W: AsyncWrite + Unpin,
    F: Frame,
{
    let run = async {
        let mut staging = Vec::with_capacity(BATCH_BYTES.min(64 * 1024));
        // Frames whose bytes are staged; dropped once written.
        let mut held: Vec<F> = Vec::new();
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            let mut closed = false;
            let mut bytes = 0;
            while let Some(frame) = next.take() {
                bytes += stage(w, frame, &mut staging, &mut held).await?;
                if staging.len() >= BATCH_BYTES {
                    break;
                }
                // Take whatever else is already queued, without waiting.
                match futures_lite::future::poll_once(rx.recv()).await {
                    Some(Some(f)) => next = Some(f),
                    Some(None) => closed = true,
                    None => {}
                }
            }
            if !staging.is_empty() {
                w.write_all(&staging).await?;
                staging.clear();
            }
            w.flush().await?;
            held.clear();
            after_write(bytes);
            if closed {
                break;
            }
        }
        Ok::<_, io::Error>(SendEnd::Drained)
    };
    let stopped = async {
        stop.wait().await;
        Ok(SendEnd::Stopped)
    };
    match futures_lite::future::or(stopped, run).await {
        Ok(end) => end,
        Err(e) => SendEnd::Failed(e),
    }
}

/// Stages one frame, or writes it at once when its payload is large
/// (after what is staged); returns its size in bytes.
async fn stage<W, F>(
    w: &mut W,
    frame: F,
    staging: &mut Vec<u8>,
    held: &mut Vec<F>,
) -> io::Result<usize>
where
    W: AsyncWrite + Unpin,
    F: Frame,
{
    let payload = frame.payload();
    if payload.len() <= SMALL_PAYLOAD {
        let before = staging.len();
        frame.encode_head(staging);
        staging.extend_from_slice(payload);
        let n = staging.len() - before;
        held.push(frame);
        return Ok(n);
    }
    if !staging.is_empty() {
        w.write_all(staging).await?;
        staging.clear();
        held.clear();
    }
    let mut head = Vec::with_capacity(64);
    frame.encode_head(&mut head);
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    Ok(head.len() + payload.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::channels::local_channel;
    use glommio::LocalExecutorBuilder;
    use std::cell::RefCell;
    use std::pin::Pin;
    use std::rc::Rc;
    use std::task::{Context, Poll};

    struct F(Vec<u8>, Vec<u8>);
    impl Frame for F {
        fn encode_head(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(&self.0);
        }
        fn payload(&self) -> &[u8] {
            &self.1
        }
    }

    /// Records each write call.
    #[derive(Clone, Default)]
    struct Rec(Rc<RefCell<Vec<Vec<u8>>>>);
    impl AsyncWrite for Rec {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.borrow_mut().push(b.to_vec());
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn queued_frames_leave_together_and_large_payloads_alone() {
        LocalExecutorBuilder::default()
            .spawn(|| async {
                let (tx, rx) = local_channel::new_bounded(16);
                let big = vec![7u8; SMALL_PAYLOAD + 1];
                let big_len = big.len();
                tx.send(F(b"h1".to_vec(), b"p1".to_vec())).await.unwrap();
                tx.send(F(b"h2".to_vec(), Vec::new())).await.unwrap();
                tx.send(F(b"h3".to_vec(), big.clone())).await.unwrap();
                tx.send(F(b"h4".to_vec(), b"p4".to_vec())).await.unwrap();
                drop(tx);
                let rec = Rec::default();
                let mut w = rec.clone();
                let mut batches = 0;
                let mut bytes = 0;
                let end = send(&mut w, &rx, &Signal::new(), |n| {
                    batches += 1;
                    bytes += n;
                })
                .await;
                assert!(matches!(end, SendEnd::Drained), "{end:?}");
                let writes = rec.0.borrow().clone();
                assert_eq!(
                    writes,
                    vec![b"h1p1h2".to_vec(), b"h3".to_vec(), big, b"h4p4".to_vec()]
                );
                assert_eq!(batches, 1);
                assert_eq!(bytes, 2 + 2 + 2 + 2 + big_len + 2 + 2);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn stop_ends_a_waiting_writer() {
        LocalExecutorBuilder::default()
            .spawn(|| async {
                let (_tx, rx) = local_channel::new_bounded::<F>(4);
                let stop = Signal::new();
                let s2 = stop.clone();
                glommio::spawn_local(async move { s2.fire() }).detach();
                let mut w = Rec::default();
                let end = send(&mut w, &rx, &stop, |_| {}).await;
                assert!(matches!(end, SendEnd::Stopped), "{end:?}");
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
