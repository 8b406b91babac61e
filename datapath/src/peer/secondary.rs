//! The secondary's side: accept the primary's connection (handed over by
//! the listener with its already-read Hello), answer the handshake, then
//! apply the primary's requests to the local provider.
//!
//! Ordering: the reader takes each write's range-lock ticket before it
//! reads the next frame, so overlapping writes are applied in the order the
//! primary sent them. Flush is a barrier: it waits for every write received
//! before it, then flushes the provider.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_lite::io::{ReadHalf, WriteHalf};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::io::ReadResult;
use glommio::net::TcpStream;
use glommio::sync::Semaphore;
use glommio::Task;

use super::frame::{self, LinkError};
use super::proto::{
    flags, negotiate, Header, Hello, HelloReply, Kind, Refusal, SyncComplete, HEADER_LEN,
    PROTO_VERSION, PROTO_VERSION_MIN,
};
use crate::events::{EventSink, PeerEventKind};
use crate::generation::{decide, resolve_split_brain, Decision, Gen};
use crate::local::{LocalDisk, Settled};
use crate::metadata::{FLAG_DISCARD, FLAG_INCONSISTENT};
use crate::stats::ResourceStats;

/// Hello flag: the primary has never been written (both sides virgin).
pub const HELLO_VIRGIN: u64 = super::proto::hello_flags::VIRGIN;

/// Requests the secondary executes at once, at most.
const MAX_INFLIGHT: usize = 1024;

/// A connection handed over by the listener.
pub struct Incoming {
    /// The accepted socket.
    pub fd: OwnedFd,
    /// The Hello the listener already read from it.
    pub hello: Hello,
    /// Who connected.
    pub peer: SocketAddr,
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
}

/// The secondary role of one resource: at most one primary connection.
pub struct Secondary {
    ctx: SecondaryCtx,
    /// The connection: its descriptor (-1 once closed: the number may be
    /// reused by anything) and its task.
    current: RefCell<Option<Connection>>,
    split_brain_reported: Cell<bool>,
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
        if let Some((fd, task)) = cur {
            if fd.get() >= 0 {
                frame::shutdown_fd(fd.get());
            }
            task.await;
        }
    }

    /// Handles a new connection from the primary: replaces any current
    /// one, answers the handshake and serves requests in a task.
    pub async fn accept(self: &Rc<Self>, inc: Incoming) {
        // A reconnecting primary replaces a connection it gave up on; the
        // old one's requests finish first so ordering is kept.
        self.disconnect().await;
        let fd = inc.fd.into_raw_fd();
        // SAFETY: fd is a connected TCP socket whose ownership we just took
        // from the OwnedFd; the glommio stream now owns and closes it.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        let _ = stream.set_nodelay(true);
        let me = self.clone();
        let slot = Rc::new(Cell::new(fd));
        let guard = FdSlot(slot.clone());
        let task = glommio::spawn_local(async move {
            // Declared before the stream is moved in: however the
            // connection ends, the slot is cleared when the descriptor is
            // closed, with no await point in between.
            let _guard = guard;
            me.connection(stream, fd, inc.hello, inc.peer).await;
        });
        *self.current.borrow_mut() = Some((slot, task));
    }

    async fn connection(
        self: Rc<Self>,
        mut stream: TcpStream,
        fd: RawFd,
        hello: Hello,
        peer: SocketAddr,
    ) {
        let ctx = &self.ctx;
        let reply = self.handshake(&hello).await;
        let refused = reply.refusal.is_some();
        let body = reply.encode();
        let hdr = Header::reply(Kind::HelloReply, 0, 0).with_payload(&body);
        let sent =
            frame::with_timeout(ctx.timeout, frame::write_frame(&mut stream, &hdr, &body)).await;
        if refused {
            tracing::warn!(resource = %ctx.resource, peer = %peer,
                reason = ?reply.refusal, message = %reply.message, "refused the primary");
            return;
        }
        if let Err(e) = sent {
            tracing::warn!(resource = %ctx.resource, peer = %peer, error = %e, "handshake failed");
            return;
        }
        self.split_brain_reported.set(false);
        ctx.stats.connected.store(true, Relaxed);
        tracing::info!(resource = %ctx.resource, peer = %peer, "primary connected");
        ctx.events.emit(PeerEventKind::Connect);
        let result = serve(ctx, stream, fd).await;
        ctx.stats.connected.store(false, Relaxed);
        match result {
            Ok(()) => tracing::info!(resource = %ctx.resource, "primary disconnected (bye)"),
            Err(e) => {
                tracing::warn!(resource = %ctx.resource, error = %e, "primary connection lost")
            }
        }
        ctx.events.emit(PeerEventKind::Disconnect);
    }

    /// Checks the primary's Hello; adopts its resource ID when new.
    async fn handshake(&self, hello: &Hello) -> HelloReply {
        let ctx = &self.ctx;
        let md = ctx.disk.metadata();
        let mine = Gen {
            resuid: md.resuid,
            localcnt: md.localcnt,
            remotecnt: md.remotecnt,
        };
        let mut reply = HelloReply {
            version: PROTO_VERSION,
            refusal: None,
            message: String::new(),
            datasize: md.datasize,
            extentsize: md.extentsize,
            gen: mine,
            flags: (md.flags & FLAG_INCONSISTENT)
                | if md.flags & FLAG_DISCARD != 0 {
                    super::proto::hello_flags::DISCARD
                } else {
                    0
                }
                | if ctx.disk.dirty_bytes() == 0 {
                    super::proto::hello_flags::CLEAN
                } else {
                    0
                },
            bitmap: Vec::new(),
        };
        let refuse = |mut r: HelloReply, why: Refusal, msg: String| {
            r.refusal = Some(why);
            r.message = msg;
            r
        };
        let Some(v) = negotiate(
            PROTO_VERSION_MIN,
            PROTO_VERSION,
            hello.version_min,
            hello.version_max,
        ) else {
            return refuse(reply, Refusal::VersionUnsupported, format!(
                "no common protocol version (ours {PROTO_VERSION_MIN}..={PROTO_VERSION}, theirs {}..={})",
                hello.version_min, hello.version_max));
        };
        reply.version = v;
        if hello.datasize != md.datasize || hello.extentsize != md.extentsize {
            return refuse(reply, Refusal::GeometryMismatch, format!(
                "data size/extent size differ: primary {}/{}, secondary {}/{} (run 'hastctl create' with the same -e/-m on both nodes)",
                hello.datasize, hello.extentsize, md.datasize, md.extentsize));
        }
        let raw = decide(&hello.gen, &mine, hello.flags & HELLO_VIRGIN != 0);
        let decision = resolve_split_brain(
            raw,
            md.flags & FLAG_DISCARD != 0,
            ctx.splitbrain_auto,
            hello.flags & super::proto::hello_flags::CLEAN == 0,
            ctx.disk.dirty_bytes() > 0,
        );
        if raw == Decision::SplitBrain && decision != Decision::SplitBrain {
            tracing::warn!(resource = %ctx.resource, primary = %hello.gen, secondary = %mine,
                resolution = %decision,
                "split-brain resolved: only the extents either side changed are resynchronised");
        }
        match decision {
            Decision::SplitBrain => {
                if !self.split_brain_reported.replace(true) {
                    tracing::error!(resource = %ctx.resource, primary = %hello.gen, secondary = %mine,
                        "split-brain: both nodes wrote since they last agreed; refusing to synchronise");
                    ctx.events.emit(PeerEventKind::SplitBrain);
                }
                ctx.stats.split_brain.store(true, Relaxed);
                return refuse(reply, Refusal::SplitBrain, format!(
                    "split-brain: both nodes wrote since they last agreed (primary {}, secondary {})",
                    hello.gen, mine));
            }
            Decision::ResuidMismatch => {
                return refuse(
                    reply,
                    Refusal::ResuidMismatch,
                    format!(
                        "resource unique ID mismatch (primary {:#x}, secondary {:#x})",
                        hello.gen.resuid, mine.resuid
                    ),
                );
            }
            Decision::Inconsistent => {
                return refuse(
                    reply,
                    Refusal::InconsistentCounters,
                    crate::generation::explain_inconsistent(&hello.gen, &mine),
                );
            }
            _ => {}
        }
        ctx.stats.split_brain.store(false, Relaxed);
        if mine.resuid == 0 {
            let resuid = hello.gen.resuid;
            if let Err(e) = ctx.disk.update_metadata(|m| m.resuid = resuid).await {
                return refuse(
                    reply,
                    Refusal::Refused,
                    format!("cannot store the resource ID: {e}"),
                );
            }
            // The reply keeps our pre-adoption counters so that both sides
            // reach the same decision (a new secondary).
            tracing::info!(resource = %ctx.resource, resuid = format_args!("{resuid:#x}"),
                "new secondary adopted the primary's resource ID");
        }
        reply.bitmap = ctx.disk.sync_bitmap();
        tracing::info!(resource = %ctx.resource, decision = %decision, "handshake accepted");
        reply
    }
}

/// The current connection: its descriptor slot and its task.
type Connection = (Rc<Cell<RawFd>>, Task<()>);

/// Marks a connection's descriptor as closed when dropped.
struct FdSlot(Rc<Cell<RawFd>>);

impl Drop for FdSlot {
    fn drop(&mut self) {
        self.0.set(-1);
    }
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
    Read(ReadResult),
}

struct Reply {
    header: Header,
    payload: ReplyPayload,
}

/// The request loop of one connection.
async fn serve(ctx: &SecondaryCtx, stream: TcpStream, fd: RawFd) -> Result<(), LinkError> {
    let (r, w) = futures_lite::io::split(stream);
    let mut r = futures_lite::io::BufReader::with_capacity(frame::RECV_BUFFER, r);
    let (tx, rx) = local_channel::new_bounded::<Reply>(MAX_INFLIGHT + 16);
    let writer = glommio::spawn_local(reply_writer(w, rx, fd, ctx.stats.clone()));
    let window = Rc::new(Semaphore::new(MAX_INFLIGHT as u64));
    let barrier = Rc::new(Barrier::default());
    let tx = Rc::new(tx);
    let tasks = glommio::sync::Gate::new();
    let result = loop {
        let hdr = match frame::with_timeout(ctx.timeout, frame::read_header(&mut r)).await {
            Ok(h) => h,
            Err(LinkError::Closed) => break Err(LinkError::Closed),
            Err(e) => break Err(e),
        };
        let frame_len = HEADER_LEN as u64 + u64::from(hdr.payload_len);
        ctx.stats.net_received_bytes.fetch_add(frame_len, Relaxed);
        match handle(ctx, &mut r, &hdr, &window, &barrier, &tx, &tasks).await {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = &result {
        if !matches!(e, LinkError::Closed) {
            tracing::warn!(resource = %ctx.resource, error = %e, "closing the primary's connection");
        }
    }
    // Requests already read complete (their data is applied); then stop
    // the writer.
    let _ = tasks.close().await;
    drop(tx);
    frame::shutdown_fd(fd);
    writer.await;
    result
}

async fn reply_writer(
    mut w: WriteHalf<TcpStream>,
    rx: LocalReceiver<Reply>,
    fd: RawFd,
    stats: Arc<ResourceStats>,
) {
    let mut batch = frame::Batch::default();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut stop = false;
        while let Some(rep) = next.take() {
            let payload: &[u8] = match &rep.payload {
                ReplyPayload::None => &[],
                ReplyPayload::Read(r) => r,
            };
            let frame_len = HEADER_LEN + payload.len();
            stats.net_sent_bytes.fetch_add(frame_len as u64, Relaxed);
            if !batch.push(&rep.header, payload) {
                let r = match batch.flush(&mut w).await {
                    Ok(()) => frame::write_frame(&mut w, &rep.header, payload).await,
                    Err(e) => Err(e),
                };
                if r.is_err() {
                    frame::shutdown_fd(fd);
                    return;
                }
            }
            if batch.full() {
                break;
            }
            // Replies completed together leave in one send.
            match futures_lite::future::poll_once(rx.recv()).await {
                Some(Some(r)) => next = Some(r),
                Some(None) => stop = true,
                None => {}
            }
        }
        if batch.flush(&mut w).await.is_err() {
            frame::shutdown_fd(fd);
            return;
        }
        if stop {
            break;
        }
    }
}

fn errno_of(e: &std::io::Error) -> u32 {
    e.raw_os_error()
        .map(|n| n as u32)
        .unwrap_or(libc::EIO as u32)
}

async fn send(tx: &LocalSender<Reply>, header: Header) {
    let _ = tx
        .send(Reply {
            header,
            payload: ReplyPayload::None,
        })
        .await;
}

/// Handles one request; Ok(false) ends the connection cleanly.
async fn handle(
    ctx: &SecondaryCtx,
    r: &mut futures_lite::io::BufReader<ReadHalf<TcpStream>>,
    hdr: &Header,
    window: &Rc<Semaphore>,
    barrier: &Rc<Barrier>,
    tx: &Rc<LocalSender<Reply>>,
    tasks: &glommio::sync::Gate,
) -> Result<bool, LinkError> {
    let disk = ctx.disk.clone();
    let seq = hdr.seq;
    match hdr.kind {
        Kind::Keepalive => {
            send(tx, Header::reply(Kind::KeepaliveReply, seq, 0)).await;
        }
        Kind::Write | Kind::Zero => {
            let permit = window
                .acquire_static_permit(1)
                .await
                .map_err(|_| LinkError::Local("stopping".into()))?;
            let (offset, len) = (hdr.offset, u64::from(hdr.length));
            let data = if hdr.kind == Kind::Write {
                let mut buf = disk.alloc(hdr.length as usize);
                frame::read_payload(r, hdr, buf.as_bytes_mut()).await?;
                Some(buf)
            } else {
                None
            };
            if offset
                .checked_add(len)
                .is_none_or(|end| end > disk.datasize())
            {
                send(tx, Header::reply(Kind::Done, seq, libc::EINVAL as u32)).await;
                return Ok(true);
            }
            if hdr.flags & flags::WANT_RECEIVED != 0 {
                send(tx, Header::reply(Kind::Received, seq, 0)).await;
            }
            // Take the range-lock ticket now, in arrival order.
            let ticket = disk.lock_range(offset, len);
            let epoch = barrier.enter();
            let (tx, barrier, stats) = (tx.clone(), barrier.clone(), ctx.stats.clone());
            let fua = hdr.flags & flags::FUA != 0;
            let sync = hdr.flags & flags::SYNC != 0;
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
                    if sync {
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
                send(&tx, Header::reply(Kind::Done, seq, status)).await;
            };
            spawn_tracked(tasks, fut)?;
        }
        Kind::Flush => {
            let wait = barrier.close_epoch();
            let (tx, stats) = (tx.clone(), ctx.stats.clone());
            spawn_tracked(tasks, async move {
                wait.await;
                stats.flushes.fetch_add(1, Relaxed);
                let status = match disk.flush().await {
                    Ok(()) => 0,
                    Err(e) => {
                        stats.flush_errors.fetch_add(1, Relaxed);
                        errno_of(&e)
                    }
                };
                send(&tx, Header::reply(Kind::Done, seq, status)).await;
            })?;
        }
        Kind::Read => {
            let permit = window
                .acquire_static_permit(1)
                .await
                .map_err(|_| LinkError::Local("stopping".into()))?;
            let (offset, len) = (hdr.offset, hdr.length);
            let (tx, stats) = (tx.clone(), ctx.stats.clone());
            let ticket = disk.lock_range(offset, u64::from(len));
            spawn_tracked(tasks, async move {
                let _permit = permit;
                let valid = offset
                    .checked_add(u64::from(len))
                    .is_some_and(|end| end <= disk.datasize());
                let reply = if !valid {
                    Reply {
                        header: Header::reply(Kind::ReadReply, seq, libc::EINVAL as u32),
                        payload: ReplyPayload::None,
                    }
                } else {
                    let _guard = ticket.await;
                    stats.reads.fetch_add(1, Relaxed);
                    match disk.read(offset, len as usize).await {
                        Ok(data) => Reply {
                            header: Header::reply(Kind::ReadReply, seq, 0).with_payload(&data),
                            payload: ReplyPayload::Read(data),
                        },
                        Err(e) => {
                            stats.read_errors.fetch_add(1, Relaxed);
                            Reply {
                                header: Header::reply(Kind::ReadReply, seq, errno_of(&e)),
                                payload: ReplyPayload::None,
                            }
                        }
                    }
                };
                let _ = tx.send(reply).await;
            })?;
        }
        Kind::SyncStart => {
            // Mark ourselves inconsistent before any synchronisation data
            // lands: a promotion must know this node is mid-sync.
            barrier.close_epoch().await;
            let status = match disk.update_metadata(|m| m.flags |= FLAG_INCONSISTENT).await {
                Ok(()) => 0,
                Err(e) => errno_of(&e),
            };
            tracing::info!(resource = %ctx.resource, "synchronisation from the primary starting");
            send(tx, Header::reply(Kind::Done, seq, status)).await;
        }
        Kind::SyncComplete => {
            let mut body = vec![0u8; hdr.payload_len as usize];
            frame::read_payload(r, hdr, &mut body).await?;
            let sc = SyncComplete::decode(&body)?;
            barrier.close_epoch().await;
            let g = sc.generation;
            disk.clear_all_sync();
            let res = async {
                // Copied data durable before the generation that vouches
                // for it.
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
            send(tx, Header::reply(Kind::Done, seq, status)).await;
        }
        Kind::Bye => return Ok(false),
        other => {
            return Err(LinkError::Local(format!(
                "unexpected {other:?} from the primary"
            )))
        }
    }
    Ok(true)
}

fn spawn_tracked(
    tasks: &glommio::sync::Gate,
    fut: impl Future<Output = ()> + 'static,
) -> Result<(), LinkError> {
    tasks
        .spawn(fut)
        .map(|t| {
            t.detach();
        })
        .map_err(|_| LinkError::Local("connection is closing".into()))
}
