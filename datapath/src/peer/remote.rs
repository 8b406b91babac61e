//! The primary's remote leg: connects to the secondary (from `source`),
//! handshakes, synchronises, and keeps the link for the write path;
//! reconnects on its own after any failure.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use glommio::net::TcpStream;
use glommio::sync::{Gate, Semaphore};
use glommio::Task;

use super::frame::{self, LinkError};
use super::link::{LinkLimits, Payload, PeerLink};
use super::proto::{
    flags, Header, Hello, HelloReply, Kind, Refusal, SyncComplete, PROTO_VERSION, PROTO_VERSION_MIN,
};
use super::secondary::HELLO_VIRGIN;
use crate::events::{EventSink, PeerEventKind};
use crate::generation::{
    decide, resolve_split_brain, target_generation, Decision, Gen, SyncDirection,
};
use crate::local::LocalDisk;
use crate::metadata::FLAG_INCONSISTENT;
use crate::stats::ResourceStats;

/// Synchronisation chunks in flight at most while the application has
/// requests in flight.
pub const SYNC_WINDOW_UNDER_LOAD: usize = 1;

/// How often the flusher looks at the extents waiting for the secondary's
/// flush.
pub const PEER_FLUSH_CHECK: Duration = Duration::from_millis(10);

/// The secondary is flushed when the extents marked only because it has
/// not flushed them reach this many times keepdirty (at least
/// [`PEER_FLUSH_MIN_HELD`]): after a crash, at most that many more extents
/// than keepdirty and the writes in flight are resynchronised.
pub const PEER_FLUSH_HELD_PER_KEEPDIRTY: usize = 2;

/// See [`PEER_FLUSH_HELD_PER_KEEPDIRTY`].
pub const PEER_FLUSH_MIN_HELD: usize = 16;

/// Writes idle this long: the secondary is flushed once, so an idle pair
/// holds nothing that is not durable on both sides.
pub const PEER_FLUSH_IDLE: Duration = Duration::from_secs(1);

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
    /// Requests in flight to the secondary at most.
    pub max_inflight: usize,
    /// Payload bytes of the requests not yet done at the secondary, at
    /// most (with `max_inflight`: the replication window).
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
}

/// The remote leg of a primary.
pub struct Remote {
    cfg: RemoteConfig,
    disk: Rc<LocalDisk>,
    /// One flush of the secondary at a time (peer_flush).
    flush_lock: Rc<Semaphore>,
    stats: Arc<ResourceStats>,
    events: EventSink,
    link: RefCell<Option<PeerLink>>,
    from_secondary: Cell<bool>,
    stopping: Cell<bool>,
    split_brain_reported: Cell<bool>,
    resolved_split: Cell<bool>,
    task: RefCell<Option<Task<()>>>,
    wake: Rc<Semaphore>,
    /// Signalled once the first connection attempt has concluded (peer
    /// unreachable, refused, or handshake done and the sync direction
    /// known).
    first: Rc<Semaphore>,
    first_done: Cell<bool>,
    /// `cfg.mode` and `cfg.timeout`, changeable while running (reload).
    mode: Cell<ReplicationMode>,
    timeout: Cell<Duration>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Remote {
    /// Starts the connection manager on the current executor.
    pub fn start(
        cfg: RemoteConfig,
        disk: Rc<LocalDisk>,
        stats: Arc<ResourceStats>,
        events: EventSink,
    ) -> Rc<Remote> {
        stats.connected.store(false, Relaxed);
        let r = Rc::new(Remote {
            mode: Cell::new(cfg.mode),
            timeout: Cell::new(cfg.timeout),
            cfg,
            disk,
            flush_lock: Rc::new(Semaphore::new(1)),
            stats,
            events,
            link: RefCell::new(None),
            from_secondary: Cell::new(false),
            stopping: Cell::new(false),
            split_brain_reported: Cell::new(false),
            resolved_split: Cell::new(false),
            task: RefCell::new(None),
            wake: Rc::new(Semaphore::new(0)),
            first: Rc::new(Semaphore::new(0)),
            first_done: Cell::new(false),
        });
        let me = r.clone();
        *r.task.borrow_mut() = Some(glommio::spawn_local(async move { me.manage().await }));
        r
    }

    /// Resolves once the first connection attempt has concluded, or after
    /// `limit`. A new primary waits for this before exposing its export,
    /// so that it learns whether it is out of date (and must read from the
    /// peer) before it serves a single read.
    pub async fn first_attempt(&self, limit: Duration) -> bool {
        if self.first_done.get() {
            return true;
        }
        let first = self.first.clone();
        futures_lite::future::or(
            async move {
                let ok = first.acquire(1).await.is_ok();
                first.signal(1);
                ok
            },
            async {
                glommio::timer::sleep(limit).await;
                false
            },
        )
        .await
    }

    fn first_attempt_done(&self) {
        if !self.first_done.replace(true) {
            self.first.signal(1);
        }
    }

    /// Replication mode.
    pub fn mode(&self) -> ReplicationMode {
        self.mode.get()
    }

    /// Changes the replication mode; applies from the next write.
    pub fn set_mode(&self, mode: ReplicationMode) {
        self.mode.set(mode);
    }

    /// Changes the peer timeout: of the open connection at once, of the
    /// next connection attempts and handshakes.
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout.set(timeout);
        if let Some(l) = self.link.borrow().as_ref() {
            l.set_timeouts(timeout / 3, timeout);
        }
    }

    /// The live link, if connected.
    pub fn link(&self) -> Option<PeerLink> {
        let l = self.link.borrow();
        l.as_ref().filter(|l| l.is_alive()).cloned()
    }

    /// Must a read of this range be served by the secondary (the primary
    /// is being synchronised from it and the range is not done yet)?
    pub fn reads_from_peer(&self, offset: u64, len: u64) -> bool {
        if !self.from_secondary.get() {
            return false;
        }
        self.disk
            .with_map(|m| m.extent_range(offset, len).any(|e| m.needs_sync(e)))
    }

    /// Flushes the secondary's disk and releases the extents that were
    /// held marked until its copies are durable (those whose Done arrived
    /// before the flush was sent). On failure the held extents are marked
    /// for synchronisation. One at a time.
    pub async fn peer_flush(&self, link: &PeerLink) -> Result<(), LinkError> {
        let _one = self
            .flush_lock
            .acquire_permit(1)
            .await
            .map_err(|_| LinkError::Local("stopping".into()))?;
        if !link.is_alive() {
            return Err(LinkError::Disconnected);
        }
        self.disk.with_map(|m| m.peer_flush_begin());
        match link.flush().await {
            Ok(()) => {
                self.disk.with_map(|m| m.peer_flush_done());
                Ok(())
            }
            Err(e) => {
                self.disk.with_map(|m| m.peer_lost());
                Err(e)
            }
        }
    }

    /// Flushes the secondary when the extents marked only because it has
    /// not flushed them (evicted from keepdirty, nothing else in flight)
    /// reach the bound. Extents still in the keepdirty set are marked
    /// anyway, so a workload that stays within keepdirty costs no flush of
    /// the secondary while it runs; once writes stop for
    /// [`PEER_FLUSH_IDLE`], one flush makes everything durable there and
    /// releases the holds. Checks every [`PEER_FLUSH_CHECK`] while extents
    /// are held, ten times less often otherwise.
    async fn flusher(self: Rc<Self>, link: PeerLink) {
        let bound = (self.disk.metadata().keepdirty as usize * PEER_FLUSH_HELD_PER_KEEPDIRTY)
            .max(PEER_FLUSH_MIN_HELD);
        let writes = || self.stats.writes.load(Relaxed) + self.stats.deletes.load(Relaxed);
        let (mut seen, mut last_write) = (writes(), Instant::now());
        let mut holds = false;
        while link.is_alive() && !self.stopping.get() {
            let pause = if holds {
                PEER_FLUSH_CHECK
            } else {
                PEER_FLUSH_CHECK * 10
            };
            glommio::timer::sleep(pause).await;
            let now_writes = writes();
            if now_writes != seen {
                (seen, last_write) = (now_writes, Instant::now());
            }
            let only;
            (holds, only) = self.disk.with_map(|m| (m.holds(), m.held_only()));
            let due = only >= bound || (holds && last_write.elapsed() >= PEER_FLUSH_IDLE);
            if due && self.peer_flush(&link).await.is_err() {
                return;
            }
        }
    }

    /// Stops: says goodbye to the secondary, closes the link and waits for
    /// the manager.
    pub async fn stop(&self) {
        self.stopping.set(true);
        self.wake.signal(1);
        let link = self.link.borrow_mut().take();
        if let Some(l) = link {
            if l.is_alive() {
                // Let the requests in flight finish and their extents be
                // held, then make the secondary's copies durable, so that
                // they are released as in sync rather than marked for
                // synchronisation by the disconnect.
                let start = Instant::now();
                while l.is_alive() && l.inflight() > 0 && start.elapsed() < self.timeout.get() {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                glommio::timer::sleep(Duration::from_millis(1)).await;
                let _ = frame::with_timeout(self.timeout.get(), self.peer_flush(&l)).await;
                let _ = l.request(Kind::Bye, 0, 0, 0, Payload::None).await;
                // Give the writer a moment to send it.
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            l.kill(LinkError::Local("role change".into()));
        }
        // Whatever the secondary did not flush needs synchronisation.
        self.disk.with_map(|m| m.peer_lost());
        let task = self.task.borrow_mut().take();
        if let Some(t) = task {
            t.await;
        }
        self.stats.connected.store(false, Relaxed);
    }

    fn set_error(&self, msg: String) {
        if let Ok(mut e) = self.stats.last_error.lock() {
            *e = msg;
        }
    }

    async fn pause(&self, d: Duration) {
        // Woken early by stop().
        let _ = futures_lite::future::or(
            async {
                let _ = self.wake.acquire(1).await;
            },
            glommio::timer::sleep(d),
        )
        .await;
    }

    async fn manage(self: Rc<Self>) {
        let mut failures = 0u32;
        while !self.stopping.get() {
            let r = self.session().await;
            self.first_attempt_done();
            match r {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    // Log the first failure and then every 10th, so a dead
                    // peer does not flood the log.
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(resource = %self.cfg.resource, attempt = failures,
                            error = %e, "cannot replicate to the secondary");
                    }
                    self.set_error(e.to_string());
                }
            }
            if self.stopping.get() {
                break;
            }
            self.pause(self.cfg.retry).await;
        }
    }

    /// One connection: connect, handshake, synchronise, then serve until
    /// the link dies.
    async fn session(self: &Rc<Self>) -> Result<(), LinkError> {
        let (mut stream, fd) = self.connect().await?;
        let (decision, reply, p_gen) = self.handshake(&mut stream).await?;
        if self.stopping.get() {
            return Ok(());
        }
        // Out of date: reads of not-yet-copied extents must go to the peer
        // from the moment anything can see this connection.
        if decision.direction() == Some(SyncDirection::FromSecondary) {
            self.from_secondary.set(true);
        }
        let link = PeerLink::start(
            stream,
            fd,
            LinkLimits {
                max_inflight: self.cfg.max_inflight,
                keepalive: self.timeout.get() / 3,
                timeout: self.timeout.get(),
                max_bytes: self.cfg.max_bytes,
            },
            {
                let disk = self.disk.clone();
                move |n| disk.alloc(n)
            },
        );
        link.count_into(self.stats.clone());
        // The secondary's dirty extents need synchronisation too.
        let prep = async {
            self.disk.merge_peer_map(&reply.bitmap).await?;
            if matches!(decision, Decision::ToSecondary { full: true }) {
                tracing::info!(resource = %self.cfg.resource,
                    "new secondary: full synchronisation");
                self.disk.mark_all().await?;
            }
            Ok::<(), std::io::Error>(())
        };
        if let Err(e) = prep.await {
            link.kill(LinkError::Local(e.to_string()));
            return Err(LinkError::Local(format!("cannot mark the activemap: {e}")));
        }
        *self.link.borrow_mut() = Some(link.clone());
        self.stats.connected.store(true, Relaxed);
        self.stats.split_brain.store(false, Relaxed);
        self.split_brain_reported.set(false);
        self.set_error(String::new());
        tracing::info!(resource = %self.cfg.resource, decision = %decision, "connected to the secondary");
        self.events.emit(PeerEventKind::Connect);
        self.first_attempt_done();

        let target = if self.resolved_split.get() {
            // Never move a generation backwards.
            p_gen.localcnt.max(reply.gen.localcnt).max(1)
        } else {
            target_generation(&decision, &p_gen, &reply.gen).unwrap_or(p_gen.localcnt)
        };
        let dir = decision.direction().unwrap_or(SyncDirection::ToSecondary);
        // Cancelled (dropped) when the session ends.
        let _flusher = glommio::spawn_local(self.clone().flusher(link.clone()));
        let synced = self.synchronise(&link, dir, target, &p_gen).await;
        if let Err(e) = &synced {
            if link.is_alive() && !self.stopping.get() {
                tracing::warn!(resource = %self.cfg.resource, error = %e, "synchronisation failed");
                link.kill(e.clone());
            }
        }
        // Connected and in sync. Extents marked later (a remote leg that
        // failed while the link stayed up) are caught up in the background.
        while link.is_alive() && !self.stopping.get() {
            futures_lite::future::or(link.dead(), glommio::timer::sleep(Duration::from_secs(1)))
                .await;
            if !link.is_alive() || self.stopping.get() {
                break;
            }
            if self.disk.dirty_bytes() > 0 {
                tracing::debug!(resource = %self.cfg.resource, bytes = self.disk.dirty_bytes(),
                    "catching up extents marked while connected");
                if let Err(e) = self.copy_dirty(&link, SyncDirection::ToSecondary).await {
                    if link.is_alive() && !self.stopping.get() {
                        link.kill(e);
                    }
                }
            }
        }
        *self.link.borrow_mut() = None;
        self.stats.connected.store(false, Relaxed);
        drop(_flusher);
        if self.stopping.get() {
            // stop() flushes the secondary, then records what is left.
            return Ok(());
        }
        // Copies the secondary completed but did not flush may be lost
        // with it: their extents need synchronisation.
        self.disk.with_map(|m| m.peer_lost());
        let why = link
            .death_reason()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "closed".into());
        tracing::warn!(resource = %self.cfg.resource, reason = %why, "disconnected from the secondary");
        self.events.emit(PeerEventKind::Disconnect);
        Err(LinkError::Local(format!("connection lost: {why}")))
    }

    async fn connect(&self) -> Result<(TcpStream, RawFd), LinkError> {
        let (addrs, source, timeout) =
            (self.cfg.remote.clone(), self.cfg.source, self.timeout.get());
        let (tx, rx) = flume::bounded(1);
        // Blocking connect on a helper thread: the executor keeps serving.
        std::thread::Builder::new()
            .name("hast-connect".into())
            .spawn(move || {
                let _ = tx.send(connect_blocking(&addrs, source, timeout));
            })
            .map_err(|e| LinkError::Io(e.to_string()))?;
        let sock = rx
            .recv_async()
            .await
            .map_err(|_| LinkError::Local("connect thread vanished".into()))?
            .map_err(|e| LinkError::Io(e.to_string()))?;
        let _ = sock.set_nodelay(true);
        let fd = sock.into_raw_fd();
        // SAFETY: fd is a connected TCP socket we own (just released from
        // the std stream); the glommio stream takes ownership and closes it.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        Ok((stream, fd))
    }

    async fn handshake(
        &self,
        stream: &mut TcpStream,
    ) -> Result<(Decision, HelloReply, Gen), LinkError> {
        let md = self.disk.metadata();
        let gen = Gen {
            resuid: md.resuid,
            localcnt: md.localcnt,
            remotecnt: md.remotecnt,
        };
        let virgin = md.localcnt == 0 && md.remotecnt == 0 && self.disk.dirty_bytes() == 0;
        let hello = Hello {
            version_min: PROTO_VERSION_MIN,
            version_max: PROTO_VERSION,
            resource: self.cfg.resource.clone(),
            node: self.cfg.node.clone(),
            datasize: md.datasize,
            extentsize: md.extentsize,
            gen,
            flags: (md.flags & FLAG_INCONSISTENT)
                | if virgin { HELLO_VIRGIN } else { 0 }
                | if self.disk.dirty_bytes() == 0 {
                    super::proto::hello_flags::CLEAN
                } else {
                    0
                },
        };
        let body = hello.encode();
        let hdr = Header::request(Kind::Hello, 0, 0, 0, 0).with_payload(&body);
        let t = self.timeout.get();
        frame::with_timeout(t, frame::write_frame(stream, &hdr, &body)).await?;
        let rh = frame::with_timeout(t, frame::read_header(stream)).await?;
        if rh.kind != Kind::HelloReply {
            return Err(LinkError::Local(format!(
                "expected HelloReply, got {:?}",
                rh.kind
            )));
        }
        let mut payload = vec![0u8; rh.payload_len as usize];
        frame::with_timeout(t, frame::read_payload(stream, &rh, &mut payload)).await?;
        let reply = HelloReply::decode(&payload)?;
        if let Some(reason) = reply.refusal {
            if reason == Refusal::SplitBrain {
                self.report_split_brain(&gen, &reply.gen);
            }
            return Err(LinkError::Refused {
                reason,
                message: reply.message,
            });
        }
        let raw = decide(&gen, &reply.gen, virgin);
        let decision = resolve_split_brain(
            raw,
            reply.flags & super::proto::hello_flags::DISCARD != 0,
            self.cfg.splitbrain_auto,
            self.disk.dirty_bytes() > 0,
            reply.flags & super::proto::hello_flags::CLEAN == 0,
        );
        if raw == Decision::SplitBrain && decision != Decision::SplitBrain {
            tracing::warn!(resource = %self.cfg.resource, primary = %gen, secondary = %reply.gen,
                resolution = %decision,
                "split-brain resolved: only the extents either side changed are resynchronised");
            self.resolved_split.set(true);
        } else {
            self.resolved_split.set(false);
        }
        match decision {
            Decision::SplitBrain => {
                self.report_split_brain(&gen, &reply.gen);
                Err(LinkError::Refused {
                    reason: Refusal::SplitBrain,
                    message: "split-brain".into(),
                })
            }
            Decision::ResuidMismatch => Err(LinkError::Refused {
                reason: Refusal::ResuidMismatch,
                message: format!(
                    "resource unique ID mismatch (primary {:#x}, secondary {:#x})",
                    gen.resuid, reply.gen.resuid
                ),
            }),
            Decision::Inconsistent => Err(LinkError::Refused {
                reason: Refusal::InconsistentCounters,
                message: crate::generation::explain_inconsistent(&gen, &reply.gen),
            }),
            d => Ok((d, reply, gen)),
        }
    }

    fn report_split_brain(&self, p: &Gen, s: &Gen) {
        self.stats.split_brain.store(true, Relaxed);
        if !self.split_brain_reported.replace(true) {
            tracing::error!(resource = %self.cfg.resource, primary = %p, secondary = %s,
                "split-brain: both nodes wrote since they last agreed; not synchronising");
            self.events.emit(PeerEventKind::SplitBrain);
        }
    }

    /// Synchronises until no extent is dirty, then records the new
    /// generation on both sides.
    async fn synchronise(
        &self,
        link: &PeerLink,
        dir: SyncDirection,
        target: u64,
        p_gen: &Gen,
    ) -> Result<(), LinkError> {
        let need =
            self.disk.dirty_bytes() > 0 || p_gen.localcnt != target || p_gen.remotecnt != target;
        if !need {
            return Ok(());
        }
        let lerr = |e: std::io::Error| LinkError::Local(e.to_string());
        match dir {
            SyncDirection::ToSecondary => {
                link.call(Kind::SyncStart, 0, 0, 0, Payload::None).await?;
            }
            SyncDirection::FromSecondary => {
                self.disk
                    .update_metadata(|m| m.flags |= FLAG_INCONSISTENT)
                    .await
                    .map_err(lerr)?;
                self.from_secondary.set(true);
            }
        }
        let stats = &self.stats;
        stats.sync_direction.store(
            match dir {
                SyncDirection::ToSecondary => 1,
                SyncDirection::FromSecondary => 2,
            },
            Relaxed,
        );
        stats.sync_total.store(self.disk.dirty_bytes(), Relaxed);
        stats.sync_done.store(0, Relaxed);
        stats.sync_started_ms.store(now_ms(), Relaxed);
        let started = Instant::now();
        tracing::info!(resource = %self.cfg.resource, direction = ?dir,
            bytes = self.disk.dirty_bytes(), "synchronisation started");
        self.events.emit(PeerEventKind::SyncStart);
        let result = self.copy_dirty(link, dir).await;
        stats.sync_direction.store(0, Relaxed);
        self.from_secondary.set(false);
        if let Err(e) = result {
            tracing::warn!(resource = %self.cfg.resource, error = %e,
                done = stats.sync_done.load(Relaxed), "synchronisation interrupted");
            self.events.emit(PeerEventKind::SyncIntr);
            return Err(e);
        }
        // Everything copied: both legs are identical. The destination
        // records the new generation first (after flushing the copied
        // data), then the source: a crash in between is recognised at the
        // next handshake (see generation::decide).
        let body = SyncComplete { generation: target }.encode();
        let record_here = async {
            self.disk.flush().await?;
            self.disk.persist_all().await?;
            self.disk
                .update_metadata(|m| {
                    m.localcnt = target;
                    m.remotecnt = target;
                    m.flags &= !FLAG_INCONSISTENT;
                })
                .await
        };
        match dir {
            SyncDirection::ToSecondary => {
                link.call(Kind::SyncComplete, 0, 0, 0, Payload::Bytes(body.to_vec()))
                    .await?;
                record_here.await.map_err(lerr)?;
            }
            SyncDirection::FromSecondary => {
                record_here.await.map_err(lerr)?;
                link.call(Kind::SyncComplete, 0, 0, 0, Payload::Bytes(body.to_vec()))
                    .await?;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let bytes = stats.sync_done.load(Relaxed);
        tracing::info!(resource = %self.cfg.resource, bytes, seconds = secs,
            mib_per_s = bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
            generation = target, "synchronisation complete");
        self.events.emit(PeerEventKind::SyncDone);
        Ok(())
    }

    /// Rate control: while application requests are being served, the
    /// synchronisation runs one chunk at a time and, after each, pauses as
    /// long as the chunk took, so it takes at most about half of the disk
    /// and link time; when the application is idle it runs `sync_window`
    /// chunks in flight at full speed.
    async fn yield_to_application(&self, inflight: &Cell<usize>, last: &Cell<Duration>) {
        let busy = || self.stats.local_queue.load(Relaxed) > 0;
        if !busy() {
            return;
        }
        // Let the chunks in flight finish (bounded: progress is never
        // stopped for long).
        let mut waited = 0;
        while inflight.get() >= SYNC_WINDOW_UNDER_LOAD && waited < 1000 {
            glommio::timer::sleep(Duration::from_millis(1)).await;
            waited += 1;
        }
        if busy() {
            glommio::timer::sleep(last.get().min(Duration::from_millis(200))).await;
        }
    }

    /// Copies every dirty extent, `sync_window` chunks in flight, until
    /// none is left. Extents marked again meanwhile are copied again.
    async fn copy_dirty(&self, link: &PeerLink, dir: SyncDirection) -> Result<(), LinkError> {
        let window = Rc::new(Semaphore::new(self.cfg.sync_window.max(1) as u64));
        let failed: Rc<RefCell<Option<LinkError>>> = Rc::new(RefCell::new(None));
        let inflight = Rc::new(Cell::new(0usize));
        let last_chunk = Rc::new(Cell::new(Duration::ZERO));
        let mut passes = 0u32;
        loop {
            passes += 1;
            let gate = Gate::new();
            let mut next = self.disk.with_map(|m| m.next_dirty(0));
            while let Some(ext) = next {
                if failed.borrow().is_some() || !link.is_alive() || self.stopping.get() {
                    break;
                }
                self.disk.with_map(|m| m.sync_begin(ext));
                let es = self.disk.extentsize();
                let start = u64::from(ext) * es;
                let bytes = self.disk.with_map(|m| m.extent_bytes(ext));
                let chunk = u64::from(self.cfg.sync_chunk).min(es);
                let nchunks = bytes.div_ceil(chunk);
                let remaining = Rc::new(Cell::new(nchunks));
                let ok = Rc::new(Cell::new(true));
                for i in 0..nchunks {
                    self.yield_to_application(&inflight, &last_chunk).await;
                    let permit = window
                        .acquire_static_permit(1)
                        .await
                        .map_err(|_| LinkError::Local("stopping".into()))?;
                    inflight.set(inflight.get() + 1);
                    let off = start + i * chunk;
                    let len = chunk.min(start + bytes - off) as u32;
                    let (disk, link, stats) = (self.disk.clone(), link.clone(), self.stats.clone());
                    let (remaining, ok, failed) = (remaining.clone(), ok.clone(), failed.clone());
                    let inflight = inflight.clone();
                    let last_chunk = last_chunk.clone();
                    let fut = async move {
                        let started = Instant::now();
                        let r = copy_chunk(&disk, &link, dir, off, len).await;
                        last_chunk.set(started.elapsed());
                        match r {
                            Ok(()) => {
                                stats.sync_done.fetch_add(u64::from(len), Relaxed);
                                stats.sync_bytes_total.fetch_add(u64::from(len), Relaxed);
                            }
                            Err(e) => {
                                ok.set(false);
                                failed.borrow_mut().get_or_insert(e);
                            }
                        }
                        remaining.set(remaining.get() - 1);
                        if remaining.get() == 0 {
                            disk.with_map(|m| {
                                if ok.get() {
                                    m.sync_finish(ext);
                                } else {
                                    m.sync_abort(ext);
                                }
                            });
                        }
                        inflight.set(inflight.get() - 1);
                        drop(permit);
                    };
                    gate.spawn(fut)
                        .map_err(|_| LinkError::Local("stopping".into()))?
                        .detach();
                }
                next = self.disk.with_map(|m| m.next_dirty(ext + 1));
            }
            let _ = gate.close().await;
            if let Some(e) = failed.borrow_mut().take() {
                return Err(e);
            }
            if !link.is_alive() {
                return Err(link.death_reason().unwrap_or(LinkError::Disconnected));
            }
            if self.stopping.get() {
                return Err(LinkError::Local("stopping".into()));
            }
            if self.disk.dirty_bytes() == 0 {
                return Ok(());
            }
            if passes > 1000 {
                return Err(LinkError::Local(
                    "extents keep being marked dirty; giving up this pass".into(),
                ));
            }
        }
    }
}

/// Copies one chunk in the given direction, holding its range lock so
/// that application writes to the same bytes wait.
async fn copy_chunk(
    disk: &Rc<LocalDisk>,
    link: &PeerLink,
    dir: SyncDirection,
    off: u64,
    len: u32,
) -> Result<(), LinkError> {
    let _guard = disk.lock_range(off, u64::from(len)).await;
    match dir {
        SyncDirection::ToSecondary => {
            let data = disk
                .read(off, len as usize)
                .await
                .map_err(|e| LinkError::Local(format!("local read at {off} failed: {e}")))?;
            if frame::is_zero(&data) {
                link.call(Kind::Zero, flags::SYNC, off, len, Payload::None)
                    .await?;
            } else {
                link.call(Kind::Write, flags::SYNC, off, len, Payload::Read(data))
                    .await?;
            }
        }
        SyncDirection::FromSecondary => {
            let data = link
                .call(Kind::Read, flags::SYNC, off, len, Payload::None)
                .await?
                .ok_or_else(|| LinkError::Local("read reply without data".into()))?;
            if data.len() != len as usize {
                return Err(LinkError::Local("short read reply".into()));
            }
            disk.write(off, data)
                .await
                .map_err(|e| LinkError::Local(format!("local write at {off} failed: {e}")))?;
            // Durable before the extent's bit may be cleared on disk.
            disk.flush()
                .await
                .map_err(|e| LinkError::Local(format!("local flush failed: {e}")))?;
        }
    }
    Ok(())
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
