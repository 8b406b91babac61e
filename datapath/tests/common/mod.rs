//! A real primary and a real secondary of one resource in one process:
//! each over an in-memory disk ([`MemStorage`]), talking over in-memory
//! pipes instead of TCP. The code under test is the daemon's own
//! (`Primary`, `Remote`, `PeerLink`, `Secondary`, `LocalDisk`); only the
//! storage and the transport are replaced, through their seams.

#![allow(dead_code)]

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::io::DmaBuffer;
use hast_datapath::events::{Event, EventKind, EventSink};
use hast_datapath::export::{BlockBackend, WriteFlags};
use hast_datapath::local::LocalDisk;
use hast_datapath::metadata::{Metadata, Role};
use hast_datapath::peer::compress::Compression;
use hast_datapath::peer::frame;
use hast_datapath::peer::remote::{Connector, PeerStream, Remote, RemoteConfig, ReplicationMode};
use hast_datapath::peer::secondary::{Secondary, SecondaryCtx};
use hast_datapath::peer::sync::SyncMode;
use hast_datapath::pipe::{pipe, Cutter};
use hast_datapath::primary::Primary;
use hast_datapath::provider::ProviderInfo;
use hast_datapath::stats::ResourceStats;
use hast_datapath::storage::{MemDisk, MemStorage, Tripwire};

/// Sector size of the in-memory disks.
pub const SECTOR: usize = 4096;

/// One node's disk.
pub struct NodeDisk {
    pub mem: Rc<RefCell<MemDisk>>,
    pub stats: Arc<ResourceStats>,
    pub md: Metadata,
    /// Stepped by every operation of this disk (unarmed unless a test
    /// arms it).
    pub wire: Rc<Tripwire>,
}

impl NodeDisk {
    /// A disk as `hastctl create` leaves it.
    pub fn create(size: usize, extent: u32, keepdirty: u32, volatile: bool) -> NodeDisk {
        let md =
            Metadata::new("r0", size as u64, extent, keepdirty, SECTOR as u32).expect("metadata");
        NodeDisk {
            mem: MemDisk::with_metadata(&md, size, volatile),
            stats: Arc::new(ResourceStats::default()),
            md,
            wire: Tripwire::new(),
        }
    }

    /// Opens it as hastd opens a provider.
    pub async fn open(&self, role: Role) -> Rc<LocalDisk> {
        let info = ProviderInfo {
            mediasize: self.mem.borrow().size() as u64,
            sectorsize: SECTOR as u32,
            physsize: SECTOR as u32,
            blockdev: false,
        };
        let disk = LocalDisk::with_storage(
            Box::new(MemStorage::with_tripwire(
                self.mem.clone(),
                self.wire.clone(),
            )),
            Path::new("mem"),
            info,
            "r0",
            true,
            self.stats.clone(),
        )
        .await
        .expect("open the in-memory provider");
        disk.set_prevrole(role).await.expect("prevrole");
        disk
    }

    /// The data area as reads see it now.
    pub fn data(&self) -> Vec<u8> {
        let off = self.md.localoff as usize;
        let len = self.md.datasize as usize;
        self.mem.borrow().contents()[off..off + len].to_vec()
    }
}

/// Primary A and secondary B, connected through pipes.
pub struct Pair {
    pub a: NodeDisk,
    pub b: NodeDisk,
    pub primary: Rc<Primary>,
    pub remote: Rc<Remote>,
    pub secondary: Rc<Secondary>,
    /// Cuts or refuses A's connections.
    pub hooks: Hooks,
    /// Events of A (the primary) and B (the secondary), disk detaches
    /// included.
    pub events_a: flume::Receiver<Event>,
    pub events_b: flume::Receiver<Event>,
    /// Connection attempts of A so far.
    pub attempts: Rc<Cell<u32>>,
}

/// Handles on a [`Pair`]'s transport made before it starts (for a
/// tripwire's action that cuts or refuses the link).
#[derive(Clone, Default)]
pub struct Hooks {
    /// Cuts the current connection.
    pub wire: Rc<RefCell<Option<Cutter>>>,
    /// While set, A's connection attempts are refused.
    pub refuse: Rc<Cell<bool>>,
}

impl Hooks {
    /// Cuts the current connection (a reset).
    pub fn cut(&self) {
        if let Some(c) = self.wire.borrow().as_ref() {
            c.cut();
        }
    }
}

fn peer_addr() -> SocketAddr {
    "127.0.0.1:7771".parse().expect("address")
}

/// Settings of a [`Pair`] beyond the replication mode.
#[derive(Debug, Clone, Copy, Default)]
pub struct Opts {
    /// hast.conf `compression` (both nodes).
    pub compression: Compression,
    /// hast.conf `syncmode`.
    pub syncmode: SyncMode,
}

impl Pair {
    /// Both nodes open, B secondary, A primary in `mode`, connected.
    pub async fn start(a: NodeDisk, b: NodeDisk, mode: ReplicationMode) -> Pair {
        Self::start_opts(a, b, mode, Opts::default()).await
    }

    /// [`Pair::start`] with `opts`.
    pub async fn start_opts(a: NodeDisk, b: NodeDisk, mode: ReplicationMode, opts: Opts) -> Pair {
        Self::start_hooked(a, b, mode, opts, Hooks::default()).await
    }

    /// [`Pair::start_opts`] over the transport handles `hooks`.
    pub async fn start_hooked(
        a: NodeDisk,
        b: NodeDisk,
        mode: ReplicationMode,
        opts: Opts,
        hooks: Hooks,
    ) -> Pair {
        let (tx_a, events_a) = flume::bounded(1024);
        let (tx_b, events_b) = flume::bounded(1024);
        let (sink_a, sink_b) = (
            EventSink::new("r0", Some(tx_a)),
            EventSink::new("r0", Some(tx_b)),
        );
        let bdisk = b.open(Role::Secondary).await;
        bdisk.set_events(sink_b.clone());
        let secondary = Secondary::new(SecondaryCtx {
            resource: "r0".into(),
            node: "b".into(),
            disk: bdisk,
            stats: b.stats.clone(),
            events: sink_b,
            timeout: Duration::from_secs(5),
            splitbrain_auto: false,
            max_requests: 1024,
            max_bytes: 64 << 20,
            compression: opts.compression,
        });
        let attempts = Rc::new(Cell::new(0u32));
        let connector: Connector = {
            let (secondary, wire, attempts, refuse) = (
                secondary.clone(),
                hooks.wire.clone(),
                attempts.clone(),
                hooks.refuse.clone(),
            );
            Box::new(move || {
                attempts.set(attempts.get() + 1);
                if refuse.get() {
                    let e = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
                    return Box::pin(async move { Err(e.into()) });
                }
                let (ours, mut theirs) = pipe(256 << 10);
                *wire.borrow_mut() = Some(ours.cutter());
                let secondary = secondary.clone();
                glommio::spawn_local(async move {
                    if let Ok(hello) = frame::read_hello(&mut theirs).await {
                        secondary.attach(theirs, hello, peer_addr()).await;
                    }
                })
                .detach();
                Box::pin(async move { Ok(Box::new(ours) as PeerStream) })
            })
        };
        let adisk = a.open(Role::Primary).await;
        adisk.set_events(sink_a.clone());
        let remote = Remote::start_with(
            RemoteConfig {
                resource: "r0".into(),
                node: "a".into(),
                remote: vec![peer_addr()],
                source: None,
                timeout: Duration::from_secs(5),
                mode,
                max_inflight: 1024,
                max_bytes: 64 << 20,
                sync_window: 16,
                sync_chunk: 1 << 20,
                retry: Duration::from_millis(20),
                splitbrain_auto: false,
                compression: opts.compression,
                syncmode: opts.syncmode,
            },
            connector,
            adisk.clone(),
            a.stats.clone(),
            sink_a,
        );
        assert!(
            remote.first_attempt(Duration::from_secs(5)).await,
            "first connection"
        );
        let primary = Rc::new(Primary::new(adisk, a.stats.clone(), Some(remote.clone())));
        Pair {
            a,
            b,
            primary,
            remote,
            secondary,
            hooks,
            events_a,
            events_b,
            attempts,
        }
    }

    /// The events of A (`a`) or B so far, without waiting.
    pub fn events(&self, a: bool) -> Vec<EventKind> {
        let rx = if a { &self.events_a } else { &self.events_b };
        rx.try_iter().map(|e| e.kind).collect()
    }

    /// Waits until A is connected, nothing is dirty or in flight and no
    /// synchronisation runs.
    pub async fn wait_in_sync(&self, limit: Duration) {
        let s = &self.a.stats;
        let start = Instant::now();
        loop {
            let link_idle = self.remote.link().is_some_and(|l| l.inflight() == 0);
            if s.connected.load(Relaxed)
                && s.dirty_bytes.load(Relaxed) == 0
                && s.sync_state().is_none()
                && s.remote_inflight.get() == 0
                && link_idle
            {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "not in sync after {limit:?}: connected {}, dirty {}, sync {:?}, remote in flight {}",
                s.connected.load(Relaxed),
                s.dirty_bytes.load(Relaxed),
                s.sync_state(),
                s.remote_inflight.get()
            );
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Cuts the current connection (a reset: what was buffered is lost).
    pub fn cut(&self) {
        self.hooks.cut();
    }

    /// Writes `data` at `offset` through the primary, as the export does.
    pub async fn write(&self, offset: u64, data: &[u8]) {
        let mut buf: DmaBuffer = self.primary.alloc_buffer(data.len());
        buf.as_bytes_mut().copy_from_slice(data);
        self.primary
            .write(offset, buf, WriteFlags::default())
            .await
            .expect("write through the primary");
    }

    /// Reads through the primary.
    pub async fn read(&self, offset: u64, len: u32) -> Vec<u8> {
        self.primary
            .read(offset, len)
            .await
            .expect("read through the primary")
            .to_vec()
    }

    /// Stops both roles cleanly (as a role change does).
    pub async fn stop(self) {
        self.remote.stop().await;
        self.secondary.disconnect().await;
    }
}

/// Runs `f` on a glommio executor of its own.
pub fn run<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    glommio::LocalExecutorBuilder::default()
        .spawn(f)
        .expect("executor")
        .join()
        .expect("test task");
}

/// Bytes of a recognisable pattern for write `n`.
pub fn pattern(n: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (n.wrapping_mul(31).wrapping_add(i as u64 / 512) % 251) as u8 + 1)
        .collect()
}
