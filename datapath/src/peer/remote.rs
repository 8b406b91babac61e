//! The primary's remote leg: the connection to the secondary. It connects
//! (from `source`), handshakes, synchronises, then lends the link to the
//! write path until the link dies, and starts again after a pause.
//!
//! One file per job: this one manages the connection and owns its state
//! ([`Conn`]); [`super::sync`] copies dirty extents; [`super::durability`]
//! decides when the secondary's disk is flushed so that held extents can
//! be released; [`super::detach`] handles a detached disk on either side;
//! [`super::handshake`] decides what the counters mean.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use glommio::Task;

use super::compress::Compression;
use super::detach::{self, Notice};
use super::frame::{self, LinkError};
use super::handshake::{self, Agreement};
use super::link::{LinkLimits, PeerLink};
use super::presession::{self, PeerSecurity};
use super::proto::{Header, Hello, HelloReply, Kind, Refusal};
use super::sync::SyncMode;
use crate::events::{EventKind, EventSink};
use crate::generation::{target_generation, Decision, Gen, SyncDirection};
use crate::local::LocalDisk;
use crate::semaphore::Semaphore;
use crate::signal::{Notify, Signal};
use crate::stats::ResourceStats;

/// When the primary acknowledges a write (hast.conf `replication`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationMode {
    /// Local write done and the secondary's write done.
    FullSync,
    /// Local write done and the secondary received the data.
    MemSync,
    /// Local write done; the request is queued for the secondary.
    Async,
}

/// Configuration of the remote leg.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Resource name.
    pub resource: String,
    /// This node's name.
    pub node: String,
    /// The secondary's addresses (tried in order).
    pub remote: Vec<SocketAddr>,
    /// Local address to connect from.
    pub source: Option<SocketAddr>,
    /// Peer timeout (connect, handshake, silence).
    pub timeout: Duration,
    /// Replication mode.
    pub mode: ReplicationMode,
    /// Requests not yet done at the secondary, at most (with `max_bytes`:
    /// the replication window).
    pub max_inflight: usize,
    /// Payload bytes of the requests not yet done at the secondary, at
    /// most.
    pub max_bytes: usize,
    /// Synchronisation chunks in flight at most.
    pub sync_window: usize,
    /// Bytes per synchronisation chunk.
    pub sync_chunk: u32,
    /// Pause between connection attempts.
    pub retry: Duration,
    /// `splitbrain auto`: resolve a split-brain where one side changed
    /// nothing.
    pub splitbrain_auto: bool,
    /// How data travels (hast.conf `compression`).
    pub compression: Compression,
    /// How a synchronisation moves data (hast.conf `syncmode`).
    pub syncmode: SyncMode,
}

/// A byte stream to the secondary.
pub trait Duplex: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Duplex for T {}

/// A connection to the secondary, of whatever transport.
pub type PeerStream = Box<dyn Duplex>;

/// A future of a new connection.
pub type Connecting = Pin<Box<dyn Future<Output = Result<PeerStream, LinkError>>>>;

/// How the remote leg reaches the secondary: TCP for hastd
/// ([`Remote::start`]); anything that yields a byte stream in tests.
pub type Connector = Box<dyn Fn() -> Connecting>;

/// The connection, as the write path and the control plane see it.
#[derive(Clone)]
enum Conn {
    /// No connection: connecting, refused, or waiting to retry.
    Down,
    /// Handshake accepted; the peer's dirty extents are being merged. The
    /// link carries no writes yet (they are local and marked), but reads
    /// of extents this node lacks already go to the peer when `sync` is
    /// from the secondary: they wait for the link
    /// ([`Remote::link_for_read`]).
    Preparing { sync: Option<SyncDirection> },
    /// The link carries writes; `sync` is the synchronisation running.
    Up {
        link: PeerLink,
        sync: Option<SyncDirection>,
    },
}

/// The remote leg of a primary.
pub struct Remote {
    pub(super) cfg: RemoteConfig,
    pub(super) disk: Rc<LocalDisk>,
    pub(super) stats: Arc<ResourceStats>,
    pub(super) events: EventSink,
    connector: Connector,
    conn: RefCell<Conn>,
    /// Woken at every change of `conn`.
    conn_changed: Notify,
    /// One flush of the secondary at a time (see `durability`).
    pub(super) flush_lock: Semaphore,
    /// Fired by [`Remote::stop`].
    pub(super) stop: Signal,
    /// Fired once the first connection attempt has concluded.
    first: Signal,
    split_brain_reported: Cell<bool>,
    task: RefCell<Option<Task<()>>>,
    /// `cfg.mode` and `cfg.timeout`, changeable while running (reload).
    mode: Cell<ReplicationMode>,
    timeout: Cell<Duration>,
    /// `cfg.compression` and `cfg.syncmode`, changeable while running.
    compression: Cell<Compression>,
    syncmode: Cell<SyncMode>,
    /// The synchronisation of this connection goes to a new secondary.
    pub(super) full_sync: Cell<bool>,
    /// This node is the destination of a synchronisation from the
    /// secondary that has not completed: its extents that need
    /// synchronisation hold older data than the secondary's, and are read
    /// from the secondary or not at all (EIO while disconnected), never
    /// from here. Set when a handshake finds this node out of date,
    /// cleared when that synchronisation completes; it outlives the
    /// connection, so a primary that loses its peer halfway does not fall
    /// back to its stale copy. (A node promoted with `--force` starts
    /// without it: the operator chose its data.)
    lacks_data: Cell<bool>,
    /// The verify running or last run (see `super::verify`).
    pub(super) verify: RefCell<Option<super::verify::VerifyRun>>,
    /// The TCP connector's timeout, when it is ours.
    connect_timeout: RefCell<Option<Rc<Cell<Duration>>>>,
    /// The secondary was told this node's disk is detached, on this link
    /// (see [`super::detach`]).
    pub(super) notice: RefCell<Option<Rc<Notice>>>,
}

impl Remote {
    /// Starts the connection manager on the current executor, reaching the
    /// secondary over TCP, secured as `security` says (see
    /// [`super::presession`]).
    pub fn start(
        cfg: RemoteConfig,
        security: PeerSecurity,
        disk: Rc<LocalDisk>,
        stats: Arc<ResourceStats>,
        events: EventSink,
    ) -> Rc<Remote> {
        let (addrs, source) = (cfg.remote.clone(), cfg.source);
        let timeout = Rc::new(Cell::new(cfg.timeout));
        let connect_timeout = timeout.clone();
        let intro = Arc::new(presession::introduction(
            &cfg.resource,
            &cfg.node,
            &security,
        ));
        let security = Arc::new(security);
        let counters = stats.clone();
        let connector: Connector = Box::new(move || {
            let (addrs, timeout) = (addrs.clone(), connect_timeout.get());
            let (intro, security, stats) = (intro.clone(), security.clone(), counters.clone());
            Box::pin(async move {
                let (s, opened) = secure_connect(addrs, source, timeout, intro, security).await?;
                tracing::info!(secondary = %opened.peer_node, transport = opened.transport.name(),
                    "pre-session with the secondary done");
                Ok(opened.transport.stream(s, move || {
                    stats.auth_failures.fetch_add(1, Relaxed);
                }))
            })
        });
        let r = Self::start_with(cfg, connector, disk, stats, events);
        *r.connect_timeout.borrow_mut() = Some(timeout);
        r
    }

    /// Starts the connection manager with any way of reaching the
    /// secondary.
    pub fn start_with(
        cfg: RemoteConfig,
        connector: Connector,
        disk: Rc<LocalDisk>,
        stats: Arc<ResourceStats>,
        events: EventSink,
    ) -> Rc<Remote> {
        // The report's copy of `lacks_data`: a new leg starts current.
        stats.out_of_date.store(false, Relaxed);
        let r = Rc::new(Remote {
            mode: Cell::new(cfg.mode),
            timeout: Cell::new(cfg.timeout),
            compression: Cell::new(cfg.compression),
            syncmode: Cell::new(cfg.syncmode),
            full_sync: Cell::new(false),
            lacks_data: Cell::new(false),
            verify: RefCell::new(None),
            connect_timeout: RefCell::new(None),
            cfg,
            disk,
            stats,
            events,
            connector,
            conn: RefCell::new(Conn::Down),
            conn_changed: Notify::new(),
            flush_lock: Semaphore::new(1),
            stop: Signal::new(),
            first: Signal::new(),
            split_brain_reported: Cell::new(false),
            task: RefCell::new(None),
            notice: RefCell::new(None),
        });
        r.set_conn(Conn::Down);
        let me = r.clone();
        *r.task.borrow_mut() = Some(glommio::spawn_local(async move { me.manage().await }));
        r
    }

    /// Changes the connection state; the control plane's view follows.
    fn set_conn(&self, c: Conn) {
        let (connected, sync) = match &c {
            Conn::Down => (false, None),
            Conn::Preparing { sync } => (false, *sync),
            Conn::Up { sync, .. } => (true, *sync),
        };
        self.stats.connected.store(connected, Relaxed);
        // The counters of a pass are set by the pass; only the direction
        // lives here.
        if sync.is_none() || self.stats.sync_state() != sync {
            self.stats.set_sync_state(sync);
        }
        *self.conn.borrow_mut() = c;
        self.conn_changed.notify_all();
    }

    /// Records the synchronisation running on the live connection.
    pub(super) fn set_sync(&self, sync: Option<SyncDirection>) {
        let c = match &*self.conn.borrow() {
            Conn::Down => return,
            Conn::Preparing { .. } => Conn::Preparing { sync },
            Conn::Up { link, .. } => Conn::Up {
                link: link.clone(),
                sync,
            },
        };
        self.set_conn(c);
    }

    /// Resolves once the first connection attempt has concluded, or after
    /// `limit`. A new primary waits for this before exposing its export,
    /// so that it learns whether it is out of date (and must read from the
    /// peer) before it serves a single read.
    pub async fn first_attempt(&self, limit: Duration) -> bool {
        let concluded = async {
            self.first.wait().await;
            true
        };
        let late = async {
            glommio::timer::sleep(limit).await;
            false
        };
        futures_lite::future::or(concluded, late).await
    }

    /// Replication mode.
    pub fn mode(&self) -> ReplicationMode {
        self.mode.get()
    }

    /// Changes the replication mode; applies from the next write.
    pub fn set_mode(&self, mode: ReplicationMode) {
        self.mode.set(mode);
    }

    /// How data travels to the secondary.
    pub fn compression(&self) -> Compression {
        self.compression.get()
    }

    /// Changes `compression`; applies from the next request.
    pub fn set_compression(&self, c: Compression) {
        self.compression.set(c);
    }

    /// How a synchronisation moves data.
    pub fn syncmode(&self) -> SyncMode {
        self.syncmode.get()
    }

    /// Changes `syncmode`; applies from the next synchronisation pass.
    pub fn set_syncmode(&self, m: SyncMode) {
        self.syncmode.set(m);
    }

    /// Changes the peer timeout: of the open connection at once, of the
    /// next connection attempts and handshakes.
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout.set(timeout);
        if let Some(t) = self.connect_timeout.borrow().as_ref() {
            t.set(timeout);
        }
        if let Some(l) = self.link() {
            l.set_timeouts(timeout / 3, timeout);
        }
    }

    /// The live link, if connected.
    pub fn link(&self) -> Option<PeerLink> {
        match &*self.conn.borrow() {
            Conn::Up { link, .. } if link.is_alive() => Some(link.clone()),
            _ => None,
        }
    }

    /// The link for a read this node cannot serve itself. While the
    /// connection is being prepared (between an accepted handshake and the
    /// link carrying requests) it waits, at most the peer timeout, for the
    /// link to come up, so that a read arriving in that window (an out of
    /// date primary that has just connected) is served, not failed.
    pub async fn link_for_read(&self) -> Option<PeerLink> {
        let preparing = || matches!(&*self.conn.borrow(), Conn::Preparing { .. });
        if preparing() {
            let up = self.conn_changed.wait_until(|| !preparing());
            let late = glommio::timer::sleep(self.timeout.get());
            futures_lite::future::or(up, async {
                late.await;
            })
            .await;
        }
        self.link()
    }

    /// Is this node's data out of date (being synchronised from the
    /// secondary, or it was when the connection broke)? Its writes then
    /// count only once the secondary has them.
    pub fn out_of_date(&self) -> bool {
        self.lacks_data.get()
    }

    pub(super) fn set_lacks_data(&self, on: bool) {
        self.lacks_data.set(on);
        self.stats.out_of_date.store(on, Relaxed);
    }

    /// Must a read of this range be served by the secondary (the primary
    /// is being synchronised from it and the range is not done yet)?
    pub fn reads_from_peer(&self, offset: u64, len: u64) -> bool {
        self.lacks_data.get()
            && self
                .disk
                .with_map(|m| m.extent_range(offset, len).any(|e| m.needs_sync(e)))
    }

    /// Stops: lets the requests in flight finish, makes the secondary's
    /// copies durable (so their extents are released as in sync rather
    /// than marked by the disconnect), says goodbye, and waits for the
    /// manager.
    pub async fn stop(&self) {
        self.stop.fire();
        self.stop_verify().await;
        if let Some(l) = self.link() {
            let t = self.timeout.get();
            let idle = async {
                l.idle().await;
                Ok(())
            };
            let _ = frame::with_timeout(t, idle).await;
            let _ = frame::with_timeout(t, self.peer_flush(&l)).await;
            l.bye().await;
        }
        let task = self.task.borrow_mut().take();
        if let Some(t) = task {
            t.await;
        }
        // Whatever the secondary did not flush needs synchronisation.
        self.disk.with_map(|m| m.peer_lost());
        self.set_conn(Conn::Down);
    }

    fn set_error(&self, msg: String) {
        if let Ok(mut e) = self.stats.last_error.lock() {
            *e = msg;
        }
    }

    async fn manage(self: Rc<Self>) {
        let mut failures = 0u32;
        // Failures in a row caused by the secondary's disk: the pause grows
        // (reconnecting at once would only repeat them).
        let mut disk_streak = 0u32;
        let mut last = String::new();
        // The last disk error the secondary reported for a request: its
        // refusal of a detached disk says no more to a peer that proved no
        // secret, so the cause shown is this one.
        let mut disk_cause: Option<String> = None;
        while !self.stop.is_fired() {
            let r = self.session().await;
            self.first.fire();
            self.set_conn(Conn::Down);
            match r {
                Ok(()) => {
                    (failures, disk_streak) = (0, 0);
                    disk_cause = None;
                }
                Err(e) => {
                    failures += 1;
                    let text = e.to_string();
                    if is_auth_failure(&e) {
                        self.stats.auth_failures.fetch_add(1, Relaxed);
                    }
                    // Log the first failure, a new reason, and every 10th,
                    // so a dead peer does not flood the log.
                    if failures == 1 || failures.is_multiple_of(10) || text != last {
                        if is_auth_failure(&e) {
                            tracing::error!(resource = %self.cfg.resource, attempt = failures,
                                error = %e, "authentication with the secondary failed");
                        } else {
                            tracing::warn!(resource = %self.cfg.resource, attempt = failures,
                                error = %e, "cannot replicate to the secondary");
                        }
                    }
                    if detach::reported_by_peer_disk(&e) {
                        disk_cause = Some(text.clone());
                    }
                    let from_peer_disk = detach::peer_disk_error(&e);
                    match (&disk_cause, from_peer_disk) {
                        (Some(cause), true) if *cause != text => self.set_error(format!(
                            "{text} (the last error the secondary reported: {cause})"
                        )),
                        _ => self.set_error(text.clone()),
                    }
                    last = text;
                    if from_peer_disk {
                        disk_streak += 1;
                    } else {
                        disk_streak = 0;
                    }
                }
            }
            let wait = detach::retry_pause(self.cfg.retry, disk_streak.saturating_sub(1));
            if disk_streak > 0 {
                tracing::debug!(resource = %self.cfg.resource, pause = ?wait,
                    "the secondary's disk keeps failing; waiting before the next attempt");
            }
            let pause = glommio::timer::sleep(wait);
            futures_lite::future::or(pause, self.stop.wait()).await;
        }
    }

    /// One connection: connect, handshake, prepare, synchronise, then serve
    /// until the link dies.
    async fn session(self: &Rc<Self>) -> Result<(), LinkError> {
        let mut stream = (self.connector)().await?;
        let (agreement, reply, p_gen, detached) = self.handshake(&mut stream).await?;
        if self.stop.is_fired() {
            return Ok(());
        }
        let dir = agreement
            .decision
            .direction()
            .unwrap_or(SyncDirection::ToSecondary);
        // Out of date: reads of not-yet-copied extents go to the peer from
        // the moment anything can see this connection.
        if dir == SyncDirection::FromSecondary && !detached {
            self.set_lacks_data(true);
            self.set_conn(Conn::Preparing { sync: Some(dir) });
        }
        let link = self.start_link(stream);
        if detached {
            self.adopt_detached(&link, &agreement, &reply);
        } else if let Err(e) = self.prepare(&agreement.decision, &reply).await {
            let e = LinkError::disk("activemap update", None, e);
            link.kill(e.clone());
            self.disk.new_epoch();
            return Err(e);
        }
        let initial = (dir == SyncDirection::FromSecondary && !detached).then_some(dir);
        self.set_conn(Conn::Up {
            link: link.clone(),
            sync: initial,
        });
        self.stats.split_brain.store(false, Relaxed);
        self.split_brain_reported.set(false);
        self.set_error(String::new());
        tracing::info!(resource = %self.cfg.resource, decision = %agreement.decision,
            "connected to the secondary");
        self.events.emit(EventKind::Connect);
        self.first.fire();

        let target = if agreement.resolved_split {
            // Never move a generation backwards.
            p_gen.localcnt.max(reply.gen.localcnt).max(1)
        } else {
            target_generation(&agreement.decision, &p_gen, &reply.gen).unwrap_or(p_gen.localcnt)
        };
        // Cancelled (dropped) when the session ends.
        let _flusher = glommio::spawn_local(self.clone().flusher(link.clone()));
        let _detach = self.watch_detach(&link);
        if detached {
            // Nothing can be written here: no synchronisation.
        } else {
            match self.synchronise(&link, dir, target, &p_gen).await {
                // Whatever the direction, this node's data is now current.
                Ok(()) => self.set_lacks_data(false),
                Err(e) if link.is_alive() && !self.stop.is_fired() => {
                    tracing::warn!(resource = %self.cfg.resource, error = %e, "synchronisation failed");
                    link.kill(e);
                }
                Err(_) => {}
            }
        }
        self.serve(&link).await;
        drop(_flusher);
        drop(_detach);
        self.set_conn(Conn::Down);
        // Writes from now on are alone: a new epoch, a new generation.
        self.disk.new_epoch();
        if self.stop.is_fired() {
            // stop() flushes the secondary, then records what is left.
            return Ok(());
        }
        // Copies the secondary completed but did not flush may be lost
        // with it: their extents need synchronisation.
        self.disk.with_map(|m| m.peer_lost());
        let why = link.death_reason().unwrap_or(LinkError::Closed);
        tracing::warn!(resource = %self.cfg.resource, reason = %why, "disconnected from the secondary");
        self.events.emit(EventKind::Disconnect);
        Err(LinkError::Lost(Box::new(why)))
    }

    fn start_link(&self, stream: PeerStream) -> PeerLink {
        let disk = self.disk.clone();
        let link = PeerLink::start(
            stream,
            LinkLimits {
                max_inflight: self.cfg.max_inflight,
                keepalive: self.timeout.get() / 3,
                timeout: self.timeout.get(),
                max_bytes: self.cfg.max_bytes,
            },
            move |n| disk.alloc(n),
        );
        link.count_into(self.stats.clone());
        link
    }

    /// Marks what the synchronisation must copy: the secondary's dirty
    /// extents, and every extent for a new secondary.
    async fn prepare(&self, decision: &Decision, reply: &HelloReply) -> std::io::Result<()> {
        self.disk.merge_peer_map(&reply.bitmap).await?;
        let full = matches!(decision, Decision::ToSecondary { full: true });
        self.full_sync.set(full);
        if full {
            tracing::info!(resource = %self.cfg.resource, "new secondary: full synchronisation");
            self.disk.mark_all().await?;
        }
        Ok(())
    }

    /// Connected and in sync: serves until the link dies or the leg stops.
    /// Extents marked meanwhile (a remote leg that failed while the link
    /// stayed up) are caught up in the background.
    async fn serve(&self, link: &PeerLink) {
        while link.is_alive() && !self.stop.is_fired() {
            // A detached disk cannot be a source: its extents stay marked.
            if self.disk.dirty_bytes() > 0 && !self.disk.failed() {
                tracing::debug!(resource = %self.cfg.resource, bytes = self.disk.dirty_bytes(),
                    "catching up extents marked while connected");
                if let Err(e) = self.copy_dirty(link, SyncDirection::ToSecondary).await {
                    if link.is_alive() && !self.stop.is_fired() {
                        link.kill(e);
                    }
                }
                continue;
            }
            let marked = self.disk.marked_for_sync();
            let ended = futures_lite::future::or(link.dead(), self.stop.wait());
            futures_lite::future::or(marked, ended).await;
        }
    }

    /// Sends the Hello and reads the answer; returns what both sides
    /// agreed, the reply, this node's counters, and whether the Hello said
    /// this node's disk is detached (see [`super::detach`]).
    async fn handshake(
        &self,
        stream: &mut PeerStream,
    ) -> Result<(Agreement, HelloReply, Gen, bool), LinkError> {
        let md = self.disk.metadata();
        let dirty = self.disk.dirty_bytes() > 0;
        let mut hello = handshake::primary_hello(&self.cfg.resource, &self.cfg.node, &md, dirty);
        let detached = self.disk.failed();
        if detached {
            hello.flags |= super::proto::hello_flags::DISK_FAILED;
        }
        let body = hello.encode();
        let hdr = Header::request(Kind::Hello, 0, 0, 0, 0).with_payload(&body);
        let t = self.timeout.get();
        frame::with_timeout(t, frame::write_frame(stream, &hdr, &body)).await?;
        let rh = frame::with_timeout(t, frame::read_header(stream)).await?;
        if rh.kind != Kind::HelloReply {
            return Err(LinkError::Protocol(format!(
                "expected HelloReply, got {:?}",
                rh.kind
            )));
        }
        let mut payload = vec![0u8; rh.payload_len as usize];
        frame::with_timeout(t, frame::read_payload(stream, &rh, &mut payload)).await?;
        let reply = HelloReply::decode(&payload)?;
        self.peer_disk(reply.refusal.map(|r| (r, reply.message.as_str())));
        if let Some(reason) = reply.refusal {
            if reason == Refusal::SplitBrain {
                self.report_split_brain(&hello.gen, &reply.gen);
            }
            return Err(LinkError::Refused {
                reason,
                message: reply.message,
            });
        }
        match handshake::primary_decide(&hello, &reply, dirty, self.cfg.splitbrain_auto) {
            Ok(a) => {
                if a.resolved_split {
                    tracing::warn!(resource = %self.cfg.resource, primary = %hello.gen,
                        secondary = %reply.gen, resolution = %a.decision,
                        "split-brain resolved: only the extents either side changed are resynchronised");
                }
                Ok((a, reply, hello.gen, detached))
            }
            Err(r) => {
                if r.reason == Refusal::SplitBrain {
                    self.report_split_brain(&hello.gen, &reply.gen);
                }
                Err(LinkError::Refused {
                    reason: r.reason,
                    message: r.message,
                })
            }
        }
    }

    fn report_split_brain(&self, p: &Gen, s: &Gen) {
        self.stats.split_brain.store(true, Relaxed);
        if !self.split_brain_reported.replace(true) {
            tracing::error!(resource = %self.cfg.resource, primary = %p, secondary = %s,
                "split-brain: both nodes wrote since they last agreed; not synchronising");
            self.events.emit(EventKind::SplitBrain);
        }
    }
}

/// Does a failure mean the peers could not authenticate each other (a
/// wrong or missing secret, a certificate refused, security settings that
/// differ, or an authenticated stream that failed its MAC)?
pub fn is_auth_failure(e: &LinkError) -> bool {
    match e {
        LinkError::Auth(_) => true,
        LinkError::Refused { reason, .. } => {
            matches!(reason, Refusal::AuthFailed | Refusal::AuthMismatch)
        }
        LinkError::Lost(inner) => is_auth_failure(inner),
        LinkError::Io(io) => io
            .get_ref()
            .is_some_and(|i| i.downcast_ref::<super::seal::SealError>().is_some()),
        _ => false,
    }
}

/// Connects over TCP (from `source`, to each address in turn) and runs the
/// pre-session, on a helper thread, so the executor keeps serving; the
/// whole takes at most `timeout`.
async fn secure_connect(
    addrs: Vec<SocketAddr>,
    source: Option<SocketAddr>,
    timeout: Duration,
    intro: Arc<Hello>,
    security: Arc<PeerSecurity>,
) -> Result<(TcpStream, presession::Opened), LinkError> {
    let (tx, rx) = flume::bounded(1);
    std::thread::Builder::new()
        .name("hast-connect".into())
        .spawn(move || {
            let until = std::time::Instant::now() + timeout;
            let r = connect_blocking(&addrs, source, timeout)
                .map_err(LinkError::from)
                .and_then(|sock| {
                    let _ = sock.set_nodelay(true);
                    let opened = presession::initiate(&sock, &intro, &security, until)?;
                    let _ = sock.set_read_timeout(None);
                    let _ = sock.set_write_timeout(None);
                    Ok((sock, opened))
                });
            let _ = tx.send(r);
        })
        .map_err(LinkError::from)?;
    let (sock, opened) = rx
        .recv_async()
        .await
        .map_err(|_| LinkError::Io(Arc::new(std::io::Error::other("connect thread vanished"))))??;
    let fd = sock.into_raw_fd();
    // SAFETY: fd is a connected TCP socket we own (just released from the
    // std stream); the glommio stream takes ownership and closes it.
    Ok((unsafe { TcpStream::from_raw_fd(fd) }, opened))
}

fn connect_blocking(
    addrs: &[SocketAddr],
    source: Option<SocketAddr>,
    timeout: Duration,
) -> std::io::Result<std::net::TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no remote address");
    for addr in addrs {
        let sock = Socket::new(
            Domain::for_address(*addr),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        if let Some(src) = source {
            if src.is_ipv4() == addr.is_ipv4() {
                sock.set_reuse_address(true)?;
                sock.bind(&src.into())?;
            }
        }
        match sock.connect_timeout(&(*addr).into(), timeout) {
            Ok(()) => return Ok(sock.into()),
            Err(e) => last = std::io::Error::new(e.kind(), format!("{addr}: {e}")),
        }
    }
    Err(last)
}
