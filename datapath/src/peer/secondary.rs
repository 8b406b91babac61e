//! The secondary's side: accept the primary's connection (handed over by
//! the listener once its pre-session is done, see
//! [`super::presession`]), answer the handshake, then apply the primary's
//! requests to the local provider.
//!
//! An established session is never disturbed by a new connection: the
//! newcomer is refused with `Busy` until the current session has ended
//! (the primary closed it, or it was silent for the whole peer timeout).
//! A peer that did not prove a shared secret learns nothing of the
//! resource's state from a refusal.
//!
//! Ordering: the reader takes each write's range-lock ticket before it
//! reads the next frame, so overlapping writes are applied in the order the
//! primary sent them. Flush is a barrier: it waits for every write received
//! before it, then flushes the provider.
//!
//! Bounds: at most `max_requests` requests are executed at once, and the
//! payloads held (received writes not yet applied, read replies not yet
//! sent) take at most `max_bytes` (a single larger one takes the whole
//! budget): no primary, honest or not, makes the secondary hold more.
//!
//! The connection is any async byte stream: TCP from the listener, or an
//! in-memory pipe in tests ([`Secondary::attach`]). It is torn down by a
//! stop signal its loops race against, never by shutting a descriptor
//! down from outside.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::io::BufReader;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::channels::local_channel::{self, LocalSender};
use glommio::net::TcpStream;
use glommio::sync::Gate;
use glommio::Task;

use super::checksum::digest_range;
use super::compress::{self, Compression, Wire};
use super::frame::{self, LinkError};
use super::handshake;
use super::presession::Transport;
use super::proto::{
    flags, hello_flags, ChecksumsRequest, Header, Hello, HelloReply, Kind, Refusal, SyncComplete,
    HEADER_LEN,
};
use super::remote::PeerStream;
use crate::batch::{self, SendEnd};
use crate::events::{EventKind, EventSink, Leg};
use crate::local::{LocalDisk, Settled};
use crate::metadata::{FLAG_DISCARD, FLAG_INCONSISTENT};
use crate::semaphore::{Semaphore, StaticPermit};
use crate::signal::Signal;
use crate::stats::ResourceStats;
use crate::storage::ReadData;

/// Hello flag: the primary has never been written (both sides virgin).
pub const HELLO_VIRGIN: u64 = super::proto::hello_flags::VIRGIN;

/// A connection handed over by the listener, its pre-session done.
pub struct Incoming {
    /// The accepted socket.
    pub fd: OwnedFd,
    /// How the session's bytes travel on it.
    pub transport: Transport,
    /// The introduction the listener read (resource, node, versions).
    pub intro: Hello,
    /// Who connected.
    pub peer: SocketAddr,
    /// The primary proved the shared secret.
    pub authenticated: bool,
    /// When the handshake's time is up.
    pub deadline: Instant,
}

impl Incoming {
    /// The session stream: the socket in its transport; MAC failures of
    /// the authenticated stream count in `stats`.
    fn into_stream(
        self,
        stats: Arc<ResourceStats>,
    ) -> (PeerStream, Hello, SocketAddr, bool, Instant) {
        let fd = self.fd.into_raw_fd();
        // SAFETY: fd is a connected TCP socket whose ownership we just took
        // from the OwnedFd; the glommio stream now owns and closes it.
        let tcp = unsafe { TcpStream::from_raw_fd(fd) };
        let _ = tcp.set_nodelay(true);
        let stream = self.transport.stream(tcp, move || {
            stats.auth_failures.fetch_add(1, Relaxed);
        });
        (
            stream,
            self.intro,
            self.peer,
            self.authenticated,
            self.deadline,
        )
    }
}

/// Reads the session Hello of a handed-over connection within what is
/// left of its handshake time.
async fn session_hello(stream: &mut PeerStream, deadline: Instant) -> Result<Hello, LinkError> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    frame::with_timeout(left, frame::read_hello(stream)).await
}

/// Sends a refusal that reveals no state, bounded by `timeout`.
async fn send_refusal<S: AsyncWrite + Unpin>(
    stream: &mut S,
    why: Refusal,
    message: String,
    timeout: Duration,
) {
    let body = HelloReply::refused(why, message).encode();
    let hdr = Header::reply(Kind::HelloReply, 0, 0).with_payload(&body);
    let _ = frame::with_timeout(timeout, frame::write_frame(stream, &hdr, &body)).await;
}

/// Refuses a handed-over connection (not secondary, unknown here): reads
/// its Hello first (so that closing does not reset the connection and
/// lose the refusal), answers in its transport, closes.
pub async fn refuse_incoming(inc: Incoming, why: Refusal, message: &str) {
    let (mut stream, _, _, _, deadline) = inc.into_stream(Arc::new(ResourceStats::default()));
    let _ = session_hello(&mut stream, deadline).await;
    send_refusal(&mut stream, why, message.to_owned(), Duration::from_secs(1)).await;
}

/// What the secondary of one resource needs.
pub struct SecondaryCtx {
    /// Resource name.
    pub resource: String,
    /// This node's name (for logs).
    pub node: String,
    /// The open provider.
    pub disk: Rc<LocalDisk>,
    /// Counters.
    pub stats: Arc<ResourceStats>,
    /// Event reporting.
    pub events: EventSink,
    /// Peer timeout.
    pub timeout: Duration,
    /// `splitbrain auto`: resolve a split-brain where one side changed
    /// nothing.
    pub splitbrain_auto: bool,
    /// Requests executed at once, at most.
    pub max_requests: usize,
    /// Payload bytes held at once, at most.
    pub max_bytes: usize,
    /// How read replies travel (hast.conf `compression`).
    pub compression: Compression,
}

/// The secondary role of one resource: at most one primary connection.
pub struct Secondary {
    ctx: SecondaryCtx,
    current: RefCell<Option<Connection>>,
    split_brain_reported: Cell<bool>,
}

/// The current connection: what stops it, and its task.
struct Connection {
    stop: Signal,
    task: Task<()>,
    /// Set until the connection has ended (refused, or served and
    /// drained).
    live: Rc<Cell<bool>>,
}

impl Secondary {
    /// A secondary waiting for its primary.
    pub fn new(ctx: SecondaryCtx) -> Rc<Secondary> {
        ctx.stats.connected.store(false, Relaxed);
        Rc::new(Secondary {
            ctx,
            current: RefCell::new(None),
            split_brain_reported: Cell::new(false),
        })
    }

    /// The provider.
    pub fn disk(&self) -> &Rc<LocalDisk> {
        &self.ctx.disk
    }

    /// Drops the current connection (if any) and waits until its requests
    /// have completed.
    pub async fn disconnect(&self) {
        let cur = self.current.borrow_mut().take();
        if let Some(c) = cur {
            c.stop.fire();
            c.task.await;
        }
    }

    /// Handles a new TCP connection from the primary, its pre-session
    /// done (see [`Secondary::attach`]): reads its session Hello, which
    /// must match its introduction.
    pub async fn accept(self: &Rc<Self>, inc: Incoming) {
        let ctx = &self.ctx;
        let (mut stream, intro, peer, authenticated, deadline) = inc.into_stream(ctx.stats.clone());
        let hello = match session_hello(&mut stream, deadline).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(resource = %ctx.resource, peer = %peer, error = %e,
                    "handshake failed: no Hello from the primary");
                return;
            }
        };
        if (
            &hello.resource,
            &hello.node,
            hello.version_min,
            hello.version_max,
        ) != (
            &intro.resource,
            &intro.node,
            intro.version_min,
            intro.version_max,
        ) {
            tracing::warn!(resource = %ctx.resource, peer = %peer,
                "the primary's Hello does not match its introduction; connection closed");
            return;
        }
        self.attach_peer(stream, hello, peer, authenticated).await;
    }

    /// Serves a primary's connection whose Hello has been read, as an
    /// unauthenticated peer: answers the handshake and serves requests in
    /// a task — or refuses it with `Busy` while another primary's session
    /// is up.
    pub async fn attach<S>(self: &Rc<Self>, stream: S, hello: Hello, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        self.attach_peer(stream, hello, peer, false).await
    }

    /// Is a session up (handshaking or serving)?
    pub fn is_connected(&self) -> bool {
        self.current.borrow().as_ref().is_some_and(|c| c.live.get())
    }

    async fn attach_peer<S>(
        self: &Rc<Self>,
        mut stream: S,
        hello: Hello,
        peer: SocketAddr,
        authenticated: bool,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        if self.is_connected() {
            // The session up is never disturbed by a newcomer: it ends
            // when its primary closes it or falls silent for the timeout.
            tracing::warn!(resource = %self.ctx.resource, peer = %peer, node = %hello.node,
                "a primary is already connected; the new connection is refused (Busy)");
            send_refusal(
                &mut stream,
                Refusal::Busy,
                "the resource already has a connected primary; retry later".into(),
                self.ctx.timeout,
            )
            .await;
            return;
        }
        // The ended session's requests finish first so ordering is kept.
        self.disconnect().await;
        let me = self.clone();
        let stop = Signal::new();
        let live = Rc::new(Cell::new(true));
        let task = glommio::spawn_local({
            let (stop, live) = (stop.clone(), live.clone());
            async move {
                me.connection(stream, hello, peer, authenticated, stop)
                    .await;
                live.set(false);
            }
        });
        *self.current.borrow_mut() = Some(Connection { stop, task, live });
    }

    async fn connection<S>(
        self: Rc<Self>,
        mut stream: S,
        hello: Hello,
        peer: SocketAddr,
        authenticated: bool,
        stop: Signal,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        let ctx = &self.ctx;
        let mut reply = self.handshake(&hello).await;
        let refused = reply.refusal.is_some();
        let only_copy = !refused && hello.flags & hello_flags::DISK_FAILED != 0;
        let full_reply = reply.clone();
        if let (Some(why), false) = (reply.refusal, authenticated) {
            // A peer that proved no secret learns nothing of our state.
            reply = HelloReply::refused(why, format!("{why}: the secondary's log has the details"));
        }
        let body = reply.encode();
        let hdr = Header::reply(Kind::HelloReply, 0, 0).with_payload(&body);
        let sent =
            frame::with_timeout(ctx.timeout, frame::write_frame(&mut stream, &hdr, &body)).await;
        if refused {
            tracing::warn!(resource = %ctx.resource, peer = %peer,
                reason = ?full_reply.refusal, message = %full_reply.message, "refused the primary");
            return;
        }
        if let Err(e) = sent {
            tracing::warn!(resource = %ctx.resource, peer = %peer, error = %e, "handshake failed");
            return;
        }
        self.split_brain_reported.set(false);
        ctx.stats.connected.store(true, Relaxed);
        tracing::info!(resource = %ctx.resource, peer = %peer, "primary connected");
        ctx.events.emit(EventKind::Connect);
        let result = serve(ctx, stream, stop, only_copy).await;
        ctx.stats.connected.store(false, Relaxed);
        match result {
            Ok(()) => tracing::info!(resource = %ctx.resource, "primary disconnected (bye)"),
            Err(e) => {
                tracing::warn!(resource = %ctx.resource, error = %e, "primary connection lost")
            }
        }
        ctx.events.emit(EventKind::Disconnect);
    }

    /// Checks the primary's Hello (see [`handshake::secondary_decide`]);
    /// adopts its resource ID when new; reports a split-brain once.
    async fn handshake(&self, hello: &Hello) -> HelloReply {
        let ctx = &self.ctx;
        let md = ctx.disk.metadata();
        let dirty = ctx.disk.dirty_bytes() > 0;
        let mut outcome = handshake::secondary_decide(hello, &md, dirty, ctx.splitbrain_auto);
        if let Some(why) = ctx.disk.failure() {
            // No primary until the disk is attached again: it would only
            // get errors (and resynchronise forever).
            outcome = Err(handshake::Refused {
                reason: Refusal::DiskFailed,
                message: format!(
                    "the secondary's disk is detached ({why}); once it is repaired, attach it with 'hastctl role init {r}' then 'hastctl role secondary {r}' on that node",
                    r = ctx.resource
                ),
            });
        }
        match &outcome {
            Ok(a) => {
                if a.resolved_split {
                    tracing::warn!(resource = %ctx.resource, primary = %hello.gen,
                        secondary = %handshake::gen_of(&md), resolution = %a.decision,
                        "split-brain resolved: only the extents either side changed are resynchronised");
                }
                ctx.stats.split_brain.store(false, Relaxed);
            }
            Err(r) if r.reason == Refusal::SplitBrain => {
                if !self.split_brain_reported.replace(true) {
                    tracing::error!(resource = %ctx.resource, primary = %hello.gen,
                        secondary = %handshake::gen_of(&md),
                        "split-brain: both nodes wrote since they last agreed; refusing to synchronise");
                    ctx.events.emit(EventKind::SplitBrain);
                }
                ctx.stats.split_brain.store(true, Relaxed);
            }
            Err(_) => {}
        }
        if outcome.is_ok() && md.resuid == 0 {
            let resuid = hello.gen.resuid;
            match ctx.disk.update_metadata(|m| m.resuid = resuid).await {
                // The reply keeps our pre-adoption counters so that both
                // sides reach the same decision (a new secondary).
                Ok(()) => tracing::info!(resource = %ctx.resource,
                    resuid = format_args!("{resuid:#x}"),
                    "new secondary adopted the primary's resource ID"),
                Err(e) => {
                    outcome = Err(handshake::Refused {
                        reason: Refusal::Refused,
                        message: format!("cannot store the resource ID: {e}"),
                    })
                }
            }
        }
        if outcome.is_ok() {
            let only_copy = hello.flags & hello_flags::DISK_FAILED != 0;
            if let Err(e) = self.set_only_copy(only_copy).await {
                outcome = Err(handshake::Refused {
                    reason: Refusal::Refused,
                    message: format!("cannot record that this node holds the only copy: {e}"),
                });
            }
        }
        if let Ok(a) = &outcome {
            tracing::info!(resource = %ctx.resource, decision = %a.decision, "handshake accepted");
        }
        let bitmap = if outcome.is_ok() {
            ctx.disk.sync_bitmap()
        } else {
            Vec::new()
        };
        handshake::secondary_reply(&md, dirty, &outcome, bitmap)
    }
}

impl Secondary {
    /// Records whether the primary's disk is detached (this node then
    /// holds the only copy of what it is written): with it, a new
    /// generation is started, durably, before anything is written (once per
    /// disconnected epoch, as a primary writing alone does), so that the
    /// primary, once its disk is attached again, is found out of date and
    /// synchronised from here. Reported (event `disk-failed`, leg
    /// `remote`) when it becomes true.
    async fn set_only_copy(&self, on: bool) -> std::io::Result<()> {
        set_only_copy(&self.ctx, on).await
    }
}

async fn set_only_copy(ctx: &SecondaryCtx, on: bool) -> std::io::Result<()> {
    if on {
        ctx.disk.bump_generation_if_needed(true).await?;
    }
    let was = ctx.stats.peer_disk_failed.swap(on, Relaxed);
    if on && !was {
        tracing::warn!(resource = %ctx.resource,
            "the primary's disk is detached: this node holds the only copy of the data");
        ctx.events.emit(EventKind::DiskFailed { leg: Leg::Remote });
    } else if was && !on {
        tracing::info!(resource = %ctx.resource, "the primary's disk is attached again");
    }
    Ok(())
}

/// Counts writes in flight per flush epoch so a flush waits exactly for
/// the writes received before it.
#[derive(Default)]
struct Barrier {
    epoch: Cell<u64>,
    counts: RefCell<BTreeMap<u64, u64>>,
    wakers: RefCell<Vec<Waker>>,
}

impl Barrier {
    fn enter(&self) -> u64 {
        let e = self.epoch.get();
        *self.counts.borrow_mut().entry(e).or_default() += 1;
        e
    }

    fn leave(&self, e: u64) {
        let mut c = self.counts.borrow_mut();
        if let Some(n) = c.get_mut(&e) {
            *n -= 1;
            if *n == 0 {
                c.remove(&e);
            }
        }
        drop(c);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Closes the current epoch; the returned future resolves when every
    /// write of this and earlier epochs has left.
    fn close_epoch(self: &Rc<Self>) -> BarrierWait {
        let e = self.epoch.get();
        self.epoch.set(e + 1);
        BarrierWait(self.clone(), e)
    }
}

struct BarrierWait(Rc<Barrier>, u64);

impl Future for BarrierWait {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let busy = self.0.counts.borrow().range(..=self.1).next().is_some();
        if busy {
            self.0.wakers.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

enum ReplyPayload {
    None,
    Read(ReadData),
    Bytes(Vec<u8>),
}

struct Reply {
    header: Header,
    payload: ReplyPayload,
    /// The payload's share of the byte budget, released once sent.
    _bytes: Option<StaticPermit>,
}

impl batch::Frame for Reply {
    fn encode_head(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header.encode());
    }
    fn payload(&self) -> &[u8] {
        match &self.payload {
            ReplyPayload::None => &[],
            ReplyPayload::Read(r) => r,
            ReplyPayload::Bytes(b) => b,
        }
    }
}

/// Where replies go: the writer's queue, unless the connection stops.
#[derive(Clone)]
struct Replies {
    tx: Rc<LocalSender<Reply>>,
    stop: Signal,
}

impl Replies {
    /// Queues a reply (dropped if the connection is stopping: nobody
    /// would send it).
    async fn send(&self, reply: Reply) {
        let queued = async {
            let _ = self.tx.send(reply).await;
        };
        futures_lite::future::or(queued, self.stop.wait()).await
    }

    /// Queues a reply without payload.
    async fn status(&self, kind: Kind, seq: u64, status: u32) {
        self.send(Reply {
            header: Header::reply(kind, seq, status),
            payload: ReplyPayload::None,
            _bytes: None,
        })
        .await
    }
}

/// What the requests of one connection share.
struct Session<'a> {
    ctx: &'a SecondaryCtx,
    /// Requests executing.
    window: Rc<Semaphore>,
    /// Payload bytes held.
    bytes: Rc<Semaphore>,
    barrier: Rc<Barrier>,
    replies: Replies,
    tasks: Gate,
    /// The primary's disk is detached: every write is marked here (this
    /// node holds the only copy of it).
    only_copy: Cell<bool>,
}

/// The request loop of one connection.
async fn serve<S>(
    ctx: &SecondaryCtx,
    stream: S,
    stop: Signal,
    only_copy: bool,
) -> Result<(), LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (r, mut w) = futures_lite::io::split(stream);
    let mut r = BufReader::with_capacity(frame::RECV_BUFFER, r);
    // Every executing request (the window) sends one reply, plus the
    // handful of control requests handled in line.
    let (tx, rx) = local_channel::new_bounded::<Reply>(ctx.max_requests + 16);
    let writer = glommio::spawn_local({
        let (stop, stats) = (stop.clone(), ctx.stats.clone());
        async move {
            let count = |n: usize| {
                stats.net_sent_bytes.fetch_add(n as u64, Relaxed);
            };
            if let SendEnd::Failed(e) = batch::send(&mut w, &rx, &stop, count).await {
                tracing::debug!(error = %e, "cannot send to the primary");
                // The reader stops too.
                stop.fire();
            }
        }
    });
    let session = Session {
        ctx,
        window: Rc::new(Semaphore::new(ctx.max_requests.max(1) as u64)),
        bytes: Rc::new(Semaphore::new(ctx.max_bytes.max(1 << 20) as u64)),
        barrier: Rc::new(Barrier::default()),
        replies: Replies {
            tx: Rc::new(tx),
            stop: stop.clone(),
        },
        tasks: Gate::new(),
        only_copy: Cell::new(only_copy),
    };
    let requests = async {
        loop {
            let hdr = frame::with_timeout(ctx.timeout, frame::read_header(&mut r)).await?;
            let frame_len = HEADER_LEN as u64 + u64::from(hdr.payload_len);
            ctx.stats.net_received_bytes.fetch_add(frame_len, Relaxed);
            if !session.handle(&mut r, &hdr).await? {
                return Ok(());
            }
        }
    };
    let stopped = async {
        futures_lite::future::or(stop.wait(), ctx.disk.failed_wait()).await;
        match ctx.disk.failure() {
            // The disk was detached: refuse this primary (and the next
            // ones) rather than fail every request.
            Some(why) => Err(LinkError::disk(
                "disk detached",
                None,
                std::io::Error::other(why),
            )),
            None => Err(LinkError::Stopping),
        }
    };
    let result = futures_lite::future::or(stopped, requests).await;
    if let Err(e) = &result {
        if !matches!(e, LinkError::Closed) {
            tracing::warn!(resource = %ctx.resource, error = %e, "closing the primary's connection");
        }
    }
    // Requests already read complete (their data is applied), their
    // replies are sent, then the writer ends and the stream closes.
    let _ = session.tasks.close().await;
    drop(session);
    writer.await;
    result
}

impl Session<'_> {
    /// Handles one request; Ok(false) ends the connection cleanly.
    async fn handle<R: AsyncRead + Unpin>(
        &self,
        r: &mut R,
        hdr: &Header,
    ) -> Result<bool, LinkError> {
        match hdr.kind {
            Kind::Keepalive => {
                self.replies.status(Kind::KeepaliveReply, hdr.seq, 0).await;
            }
            Kind::Write | Kind::Zero => self.write(r, hdr).await?,
            Kind::Flush => self.flush(hdr).await?,
            Kind::Read => self.read(hdr).await?,
            Kind::Checksums => self.checksums(r, hdr).await?,
            Kind::WrittenMap => self.written_map(hdr).await,
            Kind::SyncStart => self.sync_start(hdr).await,
            Kind::SyncComplete => self.sync_complete(r, hdr).await?,
            Kind::DiskFailed => self.disk_failed(hdr).await?,
            Kind::Bye => return Ok(false),
            other => {
                return Err(LinkError::Protocol(format!(
                    "unexpected {other:?} from the primary"
                )))
            }
        }
        Ok(true)
    }

    async fn permit(&self) -> Result<StaticPermit, LinkError> {
        self.window
            .acquire_static_permit(1)
            .await
            .map_err(|_| LinkError::Stopping)
    }

    /// Takes `len` bytes of the budget (all of it for a larger request).
    async fn budget(&self, len: u32) -> Result<Option<StaticPermit>, LinkError> {
        if len == 0 {
            return Ok(None);
        }
        let n = u64::from(len).min(self.ctx.max_bytes.max(1 << 20) as u64);
        self.bytes
            .acquire_static_permit(n)
            .await
            .map(Some)
            .map_err(|_| LinkError::Stopping)
    }

    fn spawn(&self, fut: impl Future<Output = ()> + 'static) -> Result<(), LinkError> {
        self.tasks
            .spawn(fut)
            .map(|t| {
                t.detach();
            })
            .map_err(|_| LinkError::Stopping)
    }

    /// A replicated or synchronisation write: read its payload, take its
    /// range-lock ticket (arrival order), apply it in a task.
    async fn write<R: AsyncRead + Unpin>(&self, r: &mut R, hdr: &Header) -> Result<(), LinkError> {
        let permit = self.permit().await?;
        let bytes = self.budget(hdr.data_len()).await?;
        let disk = self.ctx.disk.clone();
        let seq = hdr.seq;
        let (offset, len) = (hdr.offset, u64::from(hdr.length));
        let data = if hdr.kind == Kind::Write {
            let mut buf = disk.alloc(hdr.length as usize);
            frame::read_data_payload(r, hdr, buf.as_bytes_mut()).await?;
            Some(buf)
        } else {
            None
        };
        if offset
            .checked_add(len)
            .is_none_or(|end| end > disk.datasize())
        {
            self.replies
                .status(Kind::Done, seq, libc::EINVAL as u32)
                .await;
            return Ok(());
        }
        if hdr.flags & flags::WANT_RECEIVED != 0 {
            self.replies.status(Kind::Received, seq, 0).await;
        }
        let ticket = disk.lock_range(offset, len);
        let epoch = self.barrier.enter();
        let (replies, barrier, stats) = (
            self.replies.clone(),
            self.barrier.clone(),
            self.ctx.stats.clone(),
        );
        let fua = hdr.flags & flags::FUA != 0;
        let sync = hdr.flags & flags::SYNC != 0;
        // Marked here: synchronisation writes, and every write while this
        // node holds the only copy (then for the primary's sake: its disk
        // lacks it).
        let mark_here = sync || self.only_copy.get();
        let fut = async move {
            let _permit = permit;
            let _guard = ticket.await;
            // Replicated writes need no mark here: the primary keeps the
            // extent marked until a flush on this side after our Done
            // (see Remote::peer_flush). Synchronisation writes are marked,
            // together with the data write (Done waits for both): the
            // primary forgets a synchronised extent at our Done, so after
            // it our own map covers the extent until a later metadata
            // flush (which flushes the disk cache too) made it durable.
            let data_write = async {
                let res = match data {
                    Some(buf) => disk.write(offset, buf).await,
                    None => disk.zero(offset, len).await,
                };
                match res {
                    Ok(()) if fua => disk.flush().await,
                    other => other,
                }
            };
            let mark = async {
                if mark_here {
                    disk.write_start(offset, len).await
                } else {
                    Ok(())
                }
            };
            let (marked, res) = futures_lite::future::zip(mark, data_write).await;
            let status = match (marked, res) {
                (Ok(()), res) => {
                    if sync {
                        disk.write_complete(offset, len, Settled::InSync);
                    } else if mark_here {
                        // The primary's disk lacks it: stays marked until a
                        // synchronisation towards the primary.
                        disk.write_complete(offset, len, Settled::NeedsSync);
                    }
                    match res {
                        Ok(()) => 0,
                        Err(e) => {
                            stats.write_errors.fetch_add(1, Relaxed);
                            tracing::error!(offset, len, error = %e, "local write failed");
                            errno_of(&e)
                        }
                    }
                }
                // write_start undid its own mark; a failed Done makes the
                // primary mark the extent for synchronisation.
                (Err(e), _) => errno_of(&e),
            };
            if sync {
                stats.sync_received.fetch_add(len, Relaxed);
            } else {
                stats.writes.fetch_add(1, Relaxed);
            }
            barrier.leave(epoch);
            drop(bytes);
            replies.status(Kind::Done, seq, status).await;
        };
        self.spawn(fut)
    }

    /// A barrier: waits for the writes received before it, then flushes.
    async fn flush(&self, hdr: &Header) -> Result<(), LinkError> {
        let permit = self.permit().await?;
        let wait = self.barrier.close_epoch();
        let (disk, replies, stats, seq) = (
            self.ctx.disk.clone(),
            self.replies.clone(),
            self.ctx.stats.clone(),
            hdr.seq,
        );
        self.spawn(async move {
            let _permit = permit;
            wait.await;
            stats.flushes.fetch_add(1, Relaxed);
            let status = match disk.flush().await {
                Ok(()) => 0,
                Err(e) => {
                    stats.flush_errors.fetch_add(1, Relaxed);
                    errno_of(&e)
                }
            };
            replies.status(Kind::Done, seq, status).await;
        })
    }

    /// A read (the primary is synchronised from us, or reads through).
    async fn read(&self, hdr: &Header) -> Result<(), LinkError> {
        let permit = self.permit().await?;
        let (offset, len, seq) = (hdr.offset, hdr.length, hdr.seq);
        let disk = self.ctx.disk.clone();
        let valid = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= disk.datasize());
        if !valid {
            drop(permit);
            self.replies
                .status(Kind::ReadReply, seq, libc::EINVAL as u32)
                .await;
            return Ok(());
        }
        let bytes = self.budget(len).await?;
        let (replies, stats) = (self.replies.clone(), self.ctx.stats.clone());
        let ticket = disk.lock_range(offset, u64::from(len));
        let compression = self.ctx.compression;
        self.spawn(async move {
            let _permit = permit;
            let _guard = ticket.await;
            stats.reads.fetch_add(1, Relaxed);
            let reply = match disk.read(offset, len as usize).await {
                Ok(data) => match compress::encode(compression, &data, false) {
                    Wire::Compressed { flag, bytes: c } => Reply {
                        header: Header {
                            flags: flag,
                            length: len,
                            ..Header::reply(Kind::ReadReply, seq, 0)
                        }
                        .with_payload(&c),
                        payload: ReplyPayload::Bytes(c),
                        _bytes: bytes,
                    },
                    _ => Reply {
                        header: Header::reply(Kind::ReadReply, seq, 0).with_payload(&data),
                        payload: ReplyPayload::Read(data),
                        _bytes: bytes,
                    },
                },
                Err(e) => {
                    stats.read_errors.fetch_add(1, Relaxed);
                    Reply {
                        header: Header::reply(Kind::ReadReply, seq, errno_of(&e)),
                        payload: ReplyPayload::None,
                        _bytes: None,
                    }
                }
            };
            replies.send(reply).await;
        })
    }

    /// The primary's disk was detached: from the next request on, this
    /// node holds the only copy (see [`set_only_copy`]). In line, so that
    /// every write read after it is marked. A failure closes the
    /// connection: no write may be applied unmarked.
    async fn disk_failed(&self, hdr: &Header) -> Result<(), LinkError> {
        let res = set_only_copy(self.ctx, true).await;
        match res {
            Ok(()) => {
                self.only_copy.set(true);
                self.replies.status(Kind::Done, hdr.seq, 0).await;
                Ok(())
            }
            Err(e) => {
                self.replies.status(Kind::Done, hdr.seq, errno_of(&e)).await;
                Err(LinkError::disk("generation update", None, e))
            }
        }
    }

    /// The digests of a range (verify, checksum-based synchronisation),
    /// read after every write received before the request (its range-lock
    /// ticket is taken in arrival order). With SYNC the range is marked
    /// like a synchronisation write: the primary forgets the extent once
    /// it has the digests, so until our next flush our own map must cover
    /// whatever of it may still be in our disk cache.
    async fn checksums<R: AsyncRead + Unpin>(
        &self,
        r: &mut R,
        hdr: &Header,
    ) -> Result<(), LinkError> {
        let mut body = [0u8; super::proto::CHECKSUMS_REQUEST_LEN];
        frame::read_payload(r, hdr, &mut body).await?;
        let req = ChecksumsRequest::decode(&body)?;
        let permit = self.permit().await?;
        let (offset, len, seq) = (hdr.offset, u64::from(hdr.length), hdr.seq);
        let disk = self.ctx.disk.clone();
        let valid = offset
            .checked_add(len)
            .is_some_and(|end| end <= disk.datasize());
        if !valid || len == 0 {
            drop(permit);
            self.replies
                .status(Kind::ChecksumsReply, seq, libc::EINVAL as u32)
                .await;
            return Ok(());
        }
        let bytes = self.budget(hdr.length).await?;
        let (replies, stats) = (self.replies.clone(), self.ctx.stats.clone());
        let ticket = disk.lock_range(offset, len);
        let epoch = self.barrier.enter();
        let barrier = self.barrier.clone();
        let sync = hdr.flags & flags::SYNC != 0;
        self.spawn(async move {
            let _permit = permit;
            let _guard = ticket.await;
            let marked = if sync {
                disk.write_start(offset, len).await
            } else {
                Ok(())
            };
            let result = match marked {
                Ok(()) => {
                    let r = digest_range(&disk, offset, len, req).await;
                    if sync {
                        disk.write_complete(offset, len, Settled::InSync);
                    }
                    r
                }
                Err(e) => Err(e),
            };
            stats.checksummed_bytes.fetch_add(len, Relaxed);
            barrier.leave(epoch);
            let reply = match result {
                Ok(d) => Reply {
                    header: Header::reply(Kind::ChecksumsReply, seq, 0).with_payload(&d),
                    payload: ReplyPayload::Bytes(d),
                    _bytes: None,
                },
                Err(e) => {
                    stats.read_errors.fetch_add(1, Relaxed);
                    tracing::error!(offset, len, error = %e, "cannot checksum the local data");
                    Reply {
                        header: Header::reply(Kind::ChecksumsReply, seq, errno_of(&e)),
                        payload: ReplyPayload::None,
                        _bytes: None,
                    }
                }
            };
            drop(bytes);
            replies.send(reply).await;
        })
    }

    /// Our written map, so that a synchronisation skips what neither node
    /// ever wrote.
    async fn written_map(&self, hdr: &Header) {
        let reply = match self.ctx.disk.written_bitmap() {
            Some(bits) => Reply {
                header: Header::reply(Kind::WrittenMapReply, hdr.seq, 0).with_payload(&bits),
                payload: ReplyPayload::Bytes(bits),
                _bytes: None,
            },
            None => Reply {
                header: Header::reply(Kind::WrittenMapReply, hdr.seq, libc::ENODATA as u32),
                payload: ReplyPayload::None,
                _bytes: None,
            },
        };
        self.replies.send(reply).await;
    }

    /// Marks this node inconsistent before any synchronisation data lands:
    /// a promotion must know this node is mid-sync.
    async fn sync_start(&self, hdr: &Header) {
        let ctx = self.ctx;
        self.barrier.close_epoch().await;
        let status = match ctx
            .disk
            .update_metadata(|m| m.flags |= FLAG_INCONSISTENT)
            .await
        {
            Ok(()) => 0,
            Err(e) => errno_of(&e),
        };
        tracing::info!(resource = %ctx.resource, "synchronisation from the primary starting");
        self.replies.status(Kind::Done, hdr.seq, status).await;
    }

    /// Both legs are identical: record the new generation (after the
    /// copied data is durable).
    async fn sync_complete<R: AsyncRead + Unpin>(
        &self,
        r: &mut R,
        hdr: &Header,
    ) -> Result<(), LinkError> {
        let ctx = self.ctx;
        let disk = &ctx.disk;
        let mut body = vec![0u8; hdr.payload_len as usize];
        frame::read_payload(r, hdr, &mut body).await?;
        let sc = SyncComplete::decode(&body)?;
        self.barrier.close_epoch().await;
        let g = sc.generation;
        disk.clear_all_sync();
        let res = async {
            // Copied data durable before the generation that vouches for it.
            disk.flush().await?;
            disk.persist_all().await?;
            disk.update_metadata(|m| {
                m.localcnt = g;
                m.remotecnt = g;
                m.flags &= !(FLAG_INCONSISTENT | FLAG_DISCARD);
            })
            .await
        }
        .await;
        let status = match res {
            Ok(()) => {
                ctx.stats.dirty_bytes.store(0, Relaxed);
                tracing::info!(resource = %ctx.resource, generation = g,
                    "synchronised with the primary");
                0
            }
            Err(e) => errno_of(&e),
        };
        self.replies.status(Kind::Done, hdr.seq, status).await;
        Ok(())
    }
}

/// The errno a failed request is answered with: the OS's own when the
/// error carries one (ENOSPC stays ENOSPC), else the closest to its kind,
/// else EIO.
pub fn errno_of(e: &std::io::Error) -> u32 {
    use std::io::ErrorKind as K;
    if let Some(n) = e.raw_os_error() {
        return n as u32;
    }
    let n = match e.kind() {
        K::StorageFull => libc::ENOSPC,
        K::InvalidInput => libc::EINVAL,
        K::PermissionDenied => libc::EACCES,
        K::ReadOnlyFilesystem => libc::EROFS,
        K::FileTooLarge => libc::EFBIG,
        K::OutOfMemory => libc::ENOMEM,
        K::Unsupported => libc::EOPNOTSUPP,
        _ => libc::EIO,
    };
    n as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_kept_or_derived_from_the_kind() {
        let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(errno_of(&e), libc::ENOSPC as u32);
        let e = std::io::Error::new(std::io::ErrorKind::StorageFull, "full");
        assert_eq!(errno_of(&e), libc::ENOSPC as u32);
        let e = std::io::Error::other(crate::local::Detached("x".into()));
        assert_eq!(errno_of(&e), libc::EIO as u32);
    }
}
