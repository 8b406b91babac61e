//! The primary's side of an established peer connection: a pipelined,
//! bounded request stream to the secondary.
//!
//! - `request` assigns a sequence number, waits for room in the window
//!   (requests and payload bytes not yet `Done` at the secondary), and
//!   queues the frame for the writer task; it returns a [`Pending`] to
//!   await the secondary's `Received` and `Done`. The window is what bounds
//!   how far the secondary can be behind the primary while connected (the
//!   loss bound of async replication, docs/failover.md) and how much the
//!   secondary can be asked to hold.
//! - the writer task is the only one writing to the socket; the reader
//!   task is the only one reading from it and completes pending requests by
//!   sequence number; the keepalive task pings an idle peer and declares a
//!   silent one dead.
//! - when the connection dies ([`PeerLink::kill`], from any task) every
//!   pending request fails with [`LinkError::Disconnected`]; callers then
//!   mark their extents for sync. The reader and the writer race their
//!   loops against the death signal and drop their halves of the stream,
//!   which closes it: the link works over any async byte stream (TCP, an
//!   in-memory pipe in tests) and never touches a descriptor.
//! - a write's `Done` means the secondary wrote it, not that its copy is
//!   durable: the caller keeps the extent marked until a later
//!   [`PeerLink::flush`] has completed (see `Remote::peer_flush`).

use std::cell::{Cell, OnceCell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::io::{ReadHalf, WriteHalf};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::io::DmaBuffer;

use super::compress::{self, Compression, Wire};
use super::frame::{self, LinkError};
use super::proto::{Header, Kind, HEADER_LEN};
use crate::batch::{self, SendEnd};
use crate::semaphore::{Semaphore, StaticPermit};
use crate::signal::{Notify, Signal};
use crate::stats::ResourceStats;
use crate::storage::ReadData;

/// Payload of an outgoing request.
pub enum Payload {
    /// No payload.
    None,
    /// An application write buffer, shared with the local write.
    Dma(Rc<DmaBuffer>),
    /// Data read from the local provider (synchronisation).
    Read(ReadData),
    /// Small owned bytes (control messages).
    Bytes(Vec<u8>),
}

impl Payload {
    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    /// No payload bytes?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.bytes()
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Payload::None => &[],
            Payload::Dma(b) => b.as_bytes(),
            Payload::Read(r) => r,
            Payload::Bytes(v) => v,
        }
    }
}

/// How an application write's remote leg travels under `compression`
/// (see [`super::compress`]): a Write of zeros becomes a Zero (`hole`,
/// `lzf`, `lz4`), other payloads are compressed when that pays (`lzf`,
/// `lz4`). With `none` the request is returned as it is, at no cost: the
/// payload stays the shared buffer of the local write (no copy).
pub fn compressed(
    mode: Compression,
    kind: Kind,
    flags: u8,
    payload: Payload,
) -> (Kind, u8, Payload) {
    if mode == Compression::None || kind != Kind::Write {
        return (kind, flags, payload);
    }
    match compress::encode(mode, payload.bytes(), true) {
        Wire::AsIs => (kind, flags, payload),
        Wire::Zero => (Kind::Zero, flags, Payload::None),
        Wire::Compressed { flag, bytes } => (kind, flags | flag, Payload::Bytes(bytes)),
    }
}

struct Outgoing {
    header: Header,
    payload: Payload,
}

impl batch::Frame for Outgoing {
    fn encode_head(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header.encode());
    }
    fn payload(&self) -> &[u8] {
        self.payload.bytes()
    }
}

#[derive(Default)]
struct SlotState {
    received: bool,
    done: Option<Result<Option<DmaBuffer>, LinkError>>,
    waker: Option<Waker>,
    /// The request's room in the window (one request, its payload bytes),
    /// given back when it completes.
    permits: Option<(StaticPermit, Option<StaticPermit>)>,
    /// Run once at completion (see [`Pending::on_done`]).
    on_done: Option<OnDone>,
}

/// What [`Pending::on_done`] runs.
type OnDone = Box<dyn FnOnce(Result<(), LinkError>)>;

fn outcome(done: &Result<Option<DmaBuffer>, LinkError>) -> Result<(), LinkError> {
    match done {
        Ok(_) => Ok(()),
        Err(e) => Err(e.clone()),
    }
}

/// A request in flight.
#[derive(Clone)]
pub struct Pending {
    slot: Rc<RefCell<SlotState>>,
}

impl Pending {
    /// Resolves when the secondary has received the payload (or the
    /// request finished, successfully or not).
    pub fn received(&self) -> WaitReceived {
        WaitReceived(self.slot.clone())
    }

    /// Resolves with the outcome: `Ok(Some(data))` for a read.
    pub fn done(&self) -> WaitDone {
        WaitDone(self.slot.clone())
    }

    /// Runs `f` with the outcome when the request completes: in the task
    /// that completes it (the reader at the secondary's `Done`, or
    /// whoever kills the link), with no await in between — or now, if it
    /// has completed already. Cheaper than a task waiting for
    /// [`Pending::done`], and nothing can run between the completion and
    /// `f`.
    pub fn on_done(self, f: impl FnOnce(Result<(), LinkError>) + 'static) {
        let mut s = self.slot.borrow_mut();
        match &s.done {
            Some(done) => {
                let r = outcome(done);
                drop(s);
                f(r);
            }
            None => s.on_done = Some(Box::new(f)),
        }
    }
}

/// Future of [`Pending::received`].
pub struct WaitReceived(Rc<RefCell<SlotState>>);
/// Future of [`Pending::done`].
pub struct WaitDone(Rc<RefCell<SlotState>>);

impl Future for WaitReceived {
    type Output = Result<(), LinkError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.0.borrow_mut();
        if s.received {
            return Poll::Ready(Ok(()));
        }
        match &s.done {
            Some(Ok(_)) => Poll::Ready(Ok(())),
            Some(Err(e)) => Poll::Ready(Err(e.clone())),
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Future for WaitDone {
    type Output = Result<Option<DmaBuffer>, LinkError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut s = self.0.borrow_mut();
        match s.done.take() {
            Some(r) => {
                // Keep a marker so a second poll (or `received`) sees it.
                s.done = Some(match &r {
                    Ok(_) => Ok(None),
                    Err(e) => Err(e.clone()),
                });
                Poll::Ready(r)
            }
            None => {
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

fn complete(slot: &Rc<RefCell<SlotState>>, r: Result<Option<DmaBuffer>, LinkError>) {
    let mut s = slot.borrow_mut();
    let then = s.on_done.take().map(|f| (f, outcome(&r)));
    s.done = Some(r);
    s.permits = None;
    let waker = s.waker.take();
    drop(s);
    if let Some(w) = waker {
        w.wake();
    }
    if let Some((f, r)) = then {
        f(r);
    }
}

/// Limits of one link.
#[derive(Debug, Clone, Copy)]
pub struct LinkLimits {
    /// Requests not yet `Done` at the secondary, at most.
    pub max_inflight: usize,
    /// Keepalive interval when idle.
    pub keepalive: Duration,
    /// A peer silent this long is dead.
    pub timeout: Duration,
    /// Payload bytes of the requests not yet `Done` at the secondary, at
    /// most (a single larger request takes the whole budget).
    pub max_bytes: usize,
}

struct Inner {
    out: LocalSender<Outgoing>,
    inflight: RefCell<HashMap<u64, Rc<RefCell<SlotState>>>>,
    /// Notified whenever a request completes (see [`PeerLink::idle`]).
    completed: Notify,
    next_seq: Cell<u64>,
    window: Rc<Semaphore>,
    bytes: Rc<Semaphore>,
    /// Fired once, when the connection dies.
    death: Signal,
    /// We said goodbye: the peer closing the connection is expected.
    leaving: Cell<bool>,
    reason: RefCell<Option<LinkError>>,
    last_rx: Cell<Instant>,
    last_tx: Cell<Instant>,
    alloc: Box<dyn Fn(usize) -> DmaBuffer>,
    /// Timeouts change with a reload.
    limits: Cell<LinkLimits>,
    /// Where the bytes sent and received are counted.
    counters: OnceCell<Arc<ResourceStats>>,
}

/// An established connection to the secondary. Cheap to clone.
#[derive(Clone)]
pub struct PeerLink {
    inner: Rc<Inner>,
}

impl PeerLink {
    /// Takes over an established (handshaken) connection and starts its
    /// writer, reader and keepalive tasks on the current executor.
    /// `alloc` provides aligned buffers for read replies.
    pub fn start<S>(
        stream: S,
        limits: LinkLimits,
        alloc: impl Fn(usize) -> DmaBuffer + 'static,
    ) -> PeerLink
    where
        S: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        // Room for every request of the window and a keepalive.
        let (tx, rx) = local_channel::new_bounded(limits.max_inflight.max(1) + 1);
        let inner = Rc::new(Inner {
            out: tx,
            inflight: RefCell::new(HashMap::new()),
            completed: Notify::new(),
            next_seq: Cell::new(1),
            window: Rc::new(Semaphore::new(limits.max_inflight.max(1) as u64)),
            bytes: Rc::new(Semaphore::new(limits.max_bytes.max(1 << 20) as u64)),
            death: Signal::new(),
            leaving: Cell::new(false),
            reason: RefCell::new(None),
            last_rx: Cell::new(Instant::now()),
            last_tx: Cell::new(Instant::now()),
            alloc: Box::new(alloc),
            limits: Cell::new(limits),
            counters: OnceCell::new(),
        });
        let (reader, writer) = futures_lite::io::split(stream);
        let link = PeerLink { inner };
        glommio::spawn_local(writer_task(link.clone(), writer, rx)).detach();
        glommio::spawn_local(reader_task(link.clone(), reader)).detach();
        glommio::spawn_local(keepalive_task(link.clone())).detach();
        link
    }

    /// Flushes the secondary's disk: every write it completed before
    /// (every write whose `Done` has arrived) is durable there once this
    /// returns `Ok`. A secondary that cannot flush is disconnected (its
    /// extents are then resynchronised).
    pub async fn flush(&self) -> Result<(), LinkError> {
        match self.call(Kind::Flush, 0, 0, 0, Payload::None).await {
            Ok(_) => Ok(()),
            Err(LinkError::Remote(errno)) => {
                tracing::error!(errno, "secondary flush failed; reconnecting");
                self.kill(LinkError::Remote(errno));
                Err(LinkError::Remote(errno))
            }
            Err(e) => Err(e),
        }
    }

    /// Counts the bytes of every frame sent and received in `stats`
    /// (`net_sent_bytes`, `net_received_bytes`); the first call wins.
    pub fn count_into(&self, stats: Arc<ResourceStats>) {
        let _ = self.inner.counters.set(stats);
    }

    /// Changes the keepalive interval and the silence after which the peer
    /// is declared dead, for this open connection.
    pub fn set_timeouts(&self, keepalive: Duration, timeout: Duration) {
        let mut l = self.inner.limits.get();
        (l.keepalive, l.timeout) = (keepalive, timeout);
        self.inner.limits.set(l);
    }

    fn count(&self, sent: usize, received: usize) {
        if let Some(c) = self.inner.counters.get() {
            c.net_sent_bytes.fetch_add(sent as u64, Relaxed);
            c.net_received_bytes.fetch_add(received as u64, Relaxed);
        }
    }

    /// Is the connection still up?
    pub fn is_alive(&self) -> bool {
        !self.inner.death.is_fired()
    }

    /// Why the connection died, if it did.
    pub fn death_reason(&self) -> Option<LinkError> {
        self.inner.reason.borrow().clone()
    }

    /// Requests in flight.
    pub fn inflight(&self) -> usize {
        self.inner.inflight.borrow().len()
    }

    /// Resolves when no request is in flight (or the link is dead).
    pub async fn idle(&self) {
        let inner = &self.inner;
        let idle = inner
            .completed
            .wait_until(|| inner.inflight.borrow().is_empty());
        futures_lite::future::or(idle, inner.death.wait()).await
    }

    /// Would a request with `payload` bytes wait for room in the window
    /// now?
    pub fn window_full(&self, payload: usize) -> bool {
        let n = (payload as u64).min(self.inner.limits.get().max_bytes as u64);
        self.inner.window.available() == 0 || (n > 0 && self.inner.bytes.available() < n)
    }

    /// Sends a request; returns once it is queued for sending, after
    /// waiting for room in the window (requests and payload bytes). The
    /// room is given back when the request completes.
    pub async fn request(
        &self,
        kind: Kind,
        flags: u8,
        offset: u64,
        length: u32,
        payload: Payload,
    ) -> Result<Pending, LinkError> {
        if !self.is_alive() {
            return Err(LinkError::Disconnected);
        }
        let permit = take(&self.inner.window, 1).await?;
        // A compressed Write takes the room of its data: the secondary
        // holds it decompressed.
        let n = if kind == Kind::Write {
            u64::from(length)
        } else {
            payload.bytes().len() as u64
        };
        let bytes = if n > 0 {
            let n = n.min(self.inner.limits.get().max_bytes as u64);
            Some(take(&self.inner.bytes, n).await?)
        } else {
            None
        };
        self.enqueue(kind, flags, offset, length, payload, permit, bytes)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn enqueue(
        &self,
        kind: Kind,
        flags: u8,
        offset: u64,
        length: u32,
        payload: Payload,
        permit: StaticPermit,
        bytes: Option<StaticPermit>,
    ) -> Result<Pending, LinkError> {
        if !self.is_alive() {
            return Err(LinkError::Disconnected);
        }
        let seq = self.inner.next_seq.get();
        self.inner.next_seq.set(seq + 1);
        let header =
            Header::request(kind, flags, seq, offset, length).with_payload(payload.bytes());
        let slot = Rc::new(RefCell::new(SlotState {
            permits: Some((permit, bytes)),
            ..Default::default()
        }));
        self.inner.inflight.borrow_mut().insert(seq, slot.clone());
        let out = Outgoing { header, payload };
        // Raced against the link's death: glommio's bounded `send` stays
        // pending when the receiver (the writer task) is dropped while the
        // queue is full (docs/upstream.md), and the writer stops at once
        // when the link dies.
        let queued = async { self.inner.out.send(out).await.is_ok() };
        let died = async {
            self.inner.death.wait().await;
            false
        };
        if !futures_lite::future::or(died, queued).await {
            self.inner.inflight.borrow_mut().remove(&seq);
            return Err(self.death_reason().unwrap_or(LinkError::Disconnected));
        }
        Ok(Pending { slot })
    }

    /// Sends a request and waits for its completion.
    pub async fn call(
        &self,
        kind: Kind,
        flags: u8,
        offset: u64,
        length: u32,
        payload: Payload,
    ) -> Result<Option<DmaBuffer>, LinkError> {
        self.request(kind, flags, offset, length, payload)
            .await?
            .done()
            .await
    }

    /// Tears the connection down (idempotent); pending requests fail. The
    /// reader and the writer stop at their next poll and close the stream.
    pub fn kill(&self, reason: LinkError) {
        let inner = &self.inner;
        if inner.death.is_fired() {
            return;
        }
        tracing::debug!(reason = %reason, "peer link closing");
        *inner.reason.borrow_mut() = Some(reason);
        inner.death.fire();
        inner.window.close();
        inner.bytes.close();
        let pending: Vec<_> = inner
            .inflight
            .borrow_mut()
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in pending {
            complete(&s, Err(LinkError::Disconnected));
        }
        inner.completed.notify_all();
    }

    /// Resolves when the connection is dead.
    pub async fn dead(&self) {
        self.inner.death.wait().await
    }

    /// Ends the connection cleanly: sends `Bye`, waits (at most the peer
    /// timeout) for the secondary to close its side — it does once the
    /// requests it read are done — and closes ours.
    pub async fn bye(&self) {
        self.inner.leaving.set(true);
        if self
            .request(Kind::Bye, 0, 0, 0, Payload::None)
            .await
            .is_ok()
        {
            let closed = async {
                self.dead().await;
                Ok(())
            };
            let _ = frame::with_timeout(self.inner.limits.get().timeout, closed).await;
        }
        self.kill(LinkError::Stopping);
    }
}

/// Takes `n` permits, waiting for them (a closed semaphore means the link
/// died).
async fn take(sem: &Rc<Semaphore>, n: u64) -> Result<StaticPermit, LinkError> {
    sem.acquire_static_permit(n)
        .await
        .map_err(|_| LinkError::Disconnected)
}

async fn writer_task<S: AsyncWrite + Unpin>(
    link: PeerLink,
    mut w: WriteHalf<S>,
    rx: LocalReceiver<Outgoing>,
) {
    let inner = &link.inner;
    let end = batch::send(&mut w, &rx, &inner.death, |bytes| {
        inner.last_tx.set(Instant::now());
        link.count(bytes, 0);
    })
    .await;
    if let SendEnd::Failed(e) = end {
        link.kill(e.into());
    }
}

async fn reader_task<S: AsyncRead + Unpin>(link: PeerLink, r: ReadHalf<S>) {
    let mut r = futures_lite::io::BufReader::with_capacity(frame::RECV_BUFFER, r);
    let read_all = async {
        loop {
            let hdr = match frame::read_header(&mut r).await {
                Ok(h) => h,
                Err(e) => break e,
            };
            link.inner.last_rx.set(Instant::now());
            link.count(0, HEADER_LEN + hdr.payload_len as usize);
            let slot = match hdr.kind {
                Kind::KeepaliveReply => continue,
                Kind::Received => {
                    if let Some(s) = link.inner.inflight.borrow().get(&hdr.seq) {
                        let mut st = s.borrow_mut();
                        st.received = true;
                        if let Some(w) = st.waker.take() {
                            w.wake();
                        }
                    }
                    continue;
                }
                // Left in the map until its payload is read: a death
                // meanwhile (this read cut short, or the reader cancelled
                // by a kill from elsewhere) completes it with the rest.
                Kind::Done | Kind::ReadReply | Kind::ChecksumsReply | Kind::WrittenMapReply => {
                    link.inner.inflight.borrow().get(&hdr.seq).cloned()
                }
                other => {
                    break LinkError::Protocol(format!("unexpected {other:?} from the secondary"));
                }
            };
            let mut data = None;
            if hdr.payload_len > 0 {
                // A compressed ReadReply is decompressed into its buffer.
                let mut buf = (link.inner.alloc)(hdr.data_len() as usize);
                if let Err(e) = frame::read_data_payload(&mut r, &hdr, buf.as_bytes_mut()).await {
                    break e;
                }
                data = Some(buf);
            }
            let Some(slot) = slot else {
                break LinkError::Protocol(format!("reply for unknown request {}", hdr.seq));
            };
            link.inner.inflight.borrow_mut().remove(&hdr.seq);
            let result = if hdr.status != 0 {
                Err(LinkError::Remote(hdr.status))
            } else {
                Ok(data)
            };
            complete(&slot, result);
            link.inner.completed.notify_all();
        }
    };
    let died = async {
        link.inner.death.wait().await;
        LinkError::Disconnected
    };
    let err = futures_lite::future::or(died, read_all).await;
    if link.is_alive() {
        if link.inner.leaving.get() && matches!(err, LinkError::Closed) {
            tracing::debug!("secondary closed the connection after our Bye");
        } else {
            tracing::warn!(error = %err, "peer connection lost");
        }
    }
    link.kill(err);
}

async fn keepalive_task(link: PeerLink) {
    while link.is_alive() {
        // Re-read each tick: a reload may change the timeouts.
        let limits = link.inner.limits.get();
        let tick = limits
            .keepalive
            .min(limits.timeout / 2)
            .max(Duration::from_millis(100));
        futures_lite::future::or(glommio::timer::sleep(tick), link.dead()).await;
        if !link.is_alive() {
            break;
        }
        let now = Instant::now();
        let silent = now.duration_since(link.inner.last_rx.get());
        if silent >= limits.timeout {
            tracing::warn!(silent = ?silent, "peer is silent; closing the connection");
            link.kill(LinkError::Timeout(silent));
            break;
        }
        let idle_tx = now.duration_since(link.inner.last_tx.get());
        // Only into an empty queue: frames already queued prompt the
        // peer's replies as well, and keepalives piling up behind a slow
        // writer would take the room the window's requests count on.
        let queue_empty = link.inner.out.len() == 0;
        if queue_empty && (idle_tx >= limits.keepalive || silent >= limits.keepalive) {
            // Fire and forget: the reply only refreshes last_rx.
            let seq = 0;
            let hdr = Header::request(Kind::Keepalive, 0, seq, 0, 0);
            if link
                .inner
                .out
                .try_send(Outgoing {
                    header: hdr,
                    payload: Payload::None,
                })
                .is_ok()
            {
                link.inner.last_tx.set(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request queued while the writer is stuck (the peer reads
    /// nothing) must fail when the link is killed, not wait forever for
    /// room in a queue nobody drains (glommio's bounded `send` does not
    /// return when the receiver is dropped with the queue full:
    /// docs/upstream.md).
    #[test]
    fn a_request_queued_behind_a_stuck_writer_fails_when_the_link_dies() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                // The far end never reads: the writer blocks once 4 KiB
                // are buffered.
                let (a, _b) = crate::pipe::pipe(4096);
                let limits = LinkLimits {
                    max_inflight: 4,
                    keepalive: Duration::from_millis(100),
                    timeout: Duration::from_secs(3600),
                    max_bytes: 1 << 20,
                };
                let link = PeerLink::start(a, limits, |_| unreachable!("no replies"));
                let big = Payload::Bytes(vec![7u8; 64 * 1024]);
                let first = link
                    .request(Kind::Write, 0, 0, 64 * 1024, big)
                    .await
                    .expect("queued");
                // Keepalive ticks while the writer is stuck: one at most
                // is queued.
                glommio::timer::sleep(Duration::from_millis(800)).await;
                assert!(link.inner.out.len() <= 1, "{}", link.inner.out.len());
                // Fill the queue (as keepalives piling up once did): the
                // next request waits for room.
                let ka = || Outgoing {
                    header: Header::request(Kind::Keepalive, 0, 0, 0, 0),
                    payload: Payload::None,
                };
                while link.inner.out.try_send(ka()).is_ok() {}
                let l2 = link.clone();
                let second = glommio::spawn_local(async move {
                    l2.call(Kind::Flush, 0, 0, 0, Payload::None).await
                });
                glommio::timer::sleep(Duration::from_millis(100)).await;
                link.kill(LinkError::Disconnected);
                let ended = futures_lite::future::or(async { Some(second.await) }, async {
                    glommio::timer::sleep(Duration::from_secs(5)).await;
                    None
                })
                .await;
                let r = ended.expect("the request returned after the link died");
                assert!(r.is_err(), "{r:?}");
                assert!(first.done().await.is_err());
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// A read whose reply the connection cut halfway through its payload
    /// fails, and so does one whose link is killed (from another task)
    /// meanwhile: neither is left waiting (its slot once left the map
    /// before its payload was read).
    #[test]
    fn a_read_whose_reply_is_cut_short_fails() {
        for killed in [false, true] {
            read_cut_short(killed);
        }
    }

    fn read_cut_short(killed: bool) {
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let (a, mut b) = crate::pipe::pipe(1 << 20);
                let limits = LinkLimits {
                    max_inflight: 4,
                    keepalive: Duration::from_secs(3600),
                    timeout: Duration::from_secs(3600),
                    max_bytes: 1 << 20,
                };
                let link = PeerLink::start(a, limits, glommio::allocate_dma_buffer);
                let l2 = link.clone();
                let read = glommio::spawn_local(async move {
                    l2.call(Kind::Read, 0, 0, 4096, Payload::None).await
                });
                // The secondary: the request, then a reply header and a
                // tenth of its payload, then the connection is gone.
                let req = frame::read_header(&mut b).await.expect("request");
                assert_eq!(req.kind, Kind::Read);
                let payload = vec![0x5au8; 4096];
                let reply = Header::reply(Kind::ReadReply, req.seq, 0).with_payload(&payload);
                futures_lite::AsyncWriteExt::write_all(&mut b, &reply.encode())
                    .await
                    .unwrap();
                futures_lite::AsyncWriteExt::write_all(&mut b, &payload[..400])
                    .await
                    .unwrap();
                if killed {
                    // The reader waits for the rest of the payload.
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                    link.kill(LinkError::Disconnected);
                } else {
                    drop(b);
                }
                let ended = futures_lite::future::or(async { Some(read.await) }, async {
                    glommio::timer::sleep(Duration::from_secs(5)).await;
                    None
                })
                .await;
                let r = ended.expect("the read returned after the connection broke");
                assert!(r.is_err(), "{:?}", r.map(|d| d.map(|b| b.len())));
                assert!(!link.is_alive());
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
