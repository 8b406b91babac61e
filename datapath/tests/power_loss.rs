//! Power loss with a volatile write cache, simulated against the real
//! write path of both nodes (see `common`): each node's disk keeps a
//! completed write in a volatile cache until a flush, and a power cut
//! keeps, per sector, the durable contents or any version written since.
//!
//! A case runs a pair (memsync, fullsync or async) under concurrent
//! writes and flushes, and cuts the power at a storage operation chosen at
//! random (a `Tripwire` over every operation of both disks: activemap
//! marks and lazy clears, data writes, flushes, metadata updates, sync
//! chunks). The crash takes both hosts, the primary's only, or the
//! secondary's only; the hosts come back (the old primary, or a failover
//! to the secondary when it is not mid-synchronisation), sometimes crashing
//! again during the resynchronisation. A quarter of the rounds first
//! replace the secondary's disk by an empty one, so that the crash lands
//! in its first, full synchronisation (which the recovery resumes). After
//! each crash and recovery:
//!
//! * when both hosts lost power, every extent whose data differs between
//!   the two disks is marked in the activemap of at least one of them (or
//!   a full synchronisation is due);
//! * once synchronised, the two data areas are byte-identical;
//! * in memsync and fullsync, every sector holds its last write that was
//!   acknowledged before a completed FLUSH, or a later write.
//!
//! Seeded: a failure prints its seed, and `HAST_SIM_SEED=N` replays it.
//! `HAST_SIM_CASES=N` runs more cases (default 400).

mod common;

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hast_datapath::events::EventSink;
use hast_datapath::export::{BlockBackend, WriteFlags};
use hast_datapath::generation::{decide, Decision, Gen};
use hast_datapath::local::LocalDisk;
use hast_datapath::metadata::{Metadata, Role, FLAG_INCONSISTENT, METADATA_SIZE};
use hast_datapath::peer::frame;
use hast_datapath::peer::remote::{Connector, PeerStream, Remote, RemoteConfig, ReplicationMode};
use hast_datapath::peer::secondary::{Secondary, SecondaryCtx};
use hast_datapath::pipe::{pipe, Cutter};
use hast_datapath::primary::Primary;
use hast_datapath::provider::ProviderInfo;
use hast_datapath::stats::ResourceStats;
use hast_datapath::storage::{MemDisk, MemStorage, Tripwire};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SECTOR: usize = 4096;
const DISK: usize = 2 << 20;
const EXTENT: u32 = 64 << 10;
/// Writes per round.
const WRITES: usize = 120;
const WRITERS: usize = 4;
/// How long a recovery may take to reach in-sync.
const SYNC_LIMIT: Duration = Duration::from_secs(20);
/// How long one case may take at most.
const CASE_LIMIT: Duration = Duration::from_secs(60);

// ---- what was written ---------------------------------------------------

#[derive(Debug, Clone)]
struct Write {
    first: usize,
    sectors: usize,
    /// Acknowledgement order, once acknowledged.
    acked: Option<u64>,
}

/// The writes issued (id = index + 1), in issue order, and what the
/// completed flushes promise.
#[derive(Default)]
struct History {
    writes: Vec<Write>,
    acks: u64,
    /// Every write acknowledged before this many acknowledgements is
    /// promised (a FLUSH begun after it completed).
    promised: u64,
}

impl History {
    fn issue(&mut self, first: usize, sectors: usize) -> u64 {
        self.writes.push(Write {
            first,
            sectors,
            acked: None,
        });
        self.writes.len() as u64
    }

    fn ack(&mut self, id: u64) {
        self.writes[id as usize - 1].acked = Some(self.acks);
        self.acks += 1;
    }

    /// The primary's host died: what it acknowledged but no completed
    /// flush covered may be lost, and a flush of a later incarnation does
    /// not bring it back.
    fn primary_died(&mut self) {
        let promised = self.promised;
        for w in &mut self.writes {
            if w.acked.is_some_and(|a| a >= promised) {
                w.acked = None;
            }
        }
    }

    fn promised(&self, w: &Write) -> bool {
        w.acked.is_some_and(|a| a < self.promised)
    }

    /// The write ids a sector may hold now: its last promised write or any
    /// later one (0 stands for never written).
    fn acceptable(&self, sector: usize) -> Vec<u64> {
        let mut ok = vec![0];
        for (i, w) in self.writes.iter().enumerate() {
            if (w.first..w.first + w.sectors).contains(&sector) {
                if self.promised(w) {
                    ok.clear();
                }
                ok.push(i as u64 + 1);
            }
        }
        ok
    }
}

fn sector_bytes(id: u64, sector: usize) -> Vec<u8> {
    let mut b = vec![(id as u8).wrapping_mul(7) | 1; SECTOR];
    b[..8].copy_from_slice(&id.to_le_bytes());
    b[8..16].copy_from_slice(&(sector as u64).to_le_bytes());
    b
}

/// Which write a sector holds (0: never written); Err when it is neither.
fn sector_id(data: &[u8], sector: usize) -> Result<u64, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let id = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    if data == sector_bytes(id, sector).as_slice() {
        Ok(id)
    } else {
        Err(format!("sector {sector} holds bytes of no write"))
    }
}

// ---- the two hosts ------------------------------------------------------

fn peer_addr() -> SocketAddr {
    "127.0.0.1:7771".parse().expect("address")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    Both,
    Primary,
    Secondary,
}

struct Host {
    mem: Rc<RefCell<MemDisk>>,
    /// The current incarnation is running (false once its power is cut;
    /// each restart gets a new flag, so that what is left of a dead
    /// incarnation never comes back to life).
    alive: Rc<Cell<bool>>,
    /// The current incarnation's counters.
    stats: Arc<ResourceStats>,
}

enum Running {
    Primary(Rc<Primary>, Rc<Remote>),
    Secondary(Rc<Secondary>),
}

struct World {
    md: Metadata,
    hosts: [Host; 2],
    running: [Option<Running>; 2],
    primary: usize,
    mode: ReplicationMode,
    wire: Rc<Tripwire>,
    cutters: Rc<RefCell<Vec<Cutter>>>,
    /// The secondary a connecting primary reaches.
    target: Rc<RefCell<Option<Rc<Secondary>>>>,
    crashed: Rc<Cell<Option<Crash>>>,
    hist: Rc<RefCell<History>>,
    rng: StdRng,
    /// One write in this many is a FLUSH (`u32::MAX`: none).
    flush_every: u32,
    /// Writes go to the first this many extents.
    hot_extents: usize,
    /// Crash points reached.
    crashes: usize,
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let keepdirty = rng.gen_range(1..=8);
        let md =
            Metadata::new("r0", DISK as u64, EXTENT, keepdirty, SECTOR as u32).expect("metadata");
        // How the application writes: how often it flushes (never, in
        // some cases), and over how many extents.
        let flush_every = [4, 16, 64, u32::MAX][rng.gen_range(0..4)];
        let hot_extents = [2, 8, 32][rng.gen_range(0..3)];
        let host = || Host {
            mem: MemDisk::with_metadata(&md, DISK, true),
            alive: Rc::new(Cell::new(false)),
            stats: Arc::new(ResourceStats::default()),
        };
        let mode = match rng.gen_range(0..3) {
            0 => ReplicationMode::MemSync,
            1 => ReplicationMode::FullSync,
            _ => ReplicationMode::Async,
        };
        World {
            hosts: [host(), host()],
            md,
            running: [None, None],
            primary: 0,
            mode,
            wire: Tripwire::new(),
            cutters: Rc::new(RefCell::new(Vec::new())),
            target: Rc::new(RefCell::new(None)),
            crashed: Rc::new(Cell::new(None)),
            hist: Rc::new(RefCell::new(History::default())),
            rng,
            flush_every,
            hot_extents,
            crashes: 0,
        }
    }

    fn secondary_host(&self) -> usize {
        1 - self.primary
    }

    async fn open(&mut self, h: usize, role: Role) -> Rc<LocalDisk> {
        let host = &mut self.hosts[h];
        host.mem.borrow_mut().power_on();
        host.alive = Rc::new(Cell::new(true));
        host.stats = Arc::new(ResourceStats::default());
        let host = &self.hosts[h];
        let info = ProviderInfo {
            mediasize: DISK as u64,
            sectorsize: SECTOR as u32,
            physsize: SECTOR as u32,
            blockdev: false,
        };
        let disk = LocalDisk::with_storage(
            Box::new(MemStorage::with_tripwire(
                host.mem.clone(),
                self.wire.clone(),
            )),
            Path::new("mem"),
            info,
            "r0",
            true,
            host.stats.clone(),
        )
        .await
        .expect("open the in-memory provider");
        disk.set_prevrole(role).await.expect("prevrole");
        disk
    }

    async fn start_secondary(&mut self, h: usize) {
        let disk = self.open(h, Role::Secondary).await;
        let sec = Secondary::new(SecondaryCtx {
            resource: "r0".into(),
            node: format!("n{h}"),
            disk,
            stats: self.hosts[h].stats.clone(),
            events: EventSink::new("r0", None),
            timeout: Duration::from_secs(5),
            splitbrain_auto: false,
            max_requests: 1024,
            max_bytes: 64 << 20,
            compression: Default::default(),
        });
        *self.target.borrow_mut() = Some(sec.clone());
        self.running[h] = Some(Running::Secondary(sec));
    }

    async fn start_primary(&mut self, h: usize) {
        let disk = self.open(h, Role::Primary).await;
        let alive = self.hosts[h].alive.clone();
        let (target, cutters) = (self.target.clone(), self.cutters.clone());
        let connector: Connector = Box::new(move || {
            let target = target.borrow().clone();
            let Some(sec) = target.filter(|_| alive.get()) else {
                return Box::pin(async {
                    Err(hast_datapath::peer::frame::LinkError::Disconnected)
                });
            };
            let (ours, mut theirs) = pipe(256 << 10);
            cutters.borrow_mut().push(ours.cutter());
            glommio::spawn_local(async move {
                if let Ok(hello) = frame::read_hello(&mut theirs).await {
                    sec.attach(theirs, hello, peer_addr()).await;
                }
            })
            .detach();
            Box::pin(async move { Ok(Box::new(ours) as PeerStream) })
        });
        let remote = Remote::start_with(
            RemoteConfig {
                resource: "r0".into(),
                node: format!("n{h}"),
                remote: vec![peer_addr()],
                source: None,
                timeout: Duration::from_secs(5),
                mode: self.mode,
                max_inflight: 1024,
                max_bytes: 64 << 20,
                sync_window: 4,
                sync_chunk: 32 << 10,
                retry: Duration::from_millis(2),
                splitbrain_auto: false,
                compression: Default::default(),
                syncmode: Default::default(),
            },
            connector,
            disk.clone(),
            self.hosts[h].stats.clone(),
            EventSink::new("r0", None),
        );
        remote.first_attempt(Duration::from_secs(2)).await;
        let primary = Rc::new(Primary::new(
            disk,
            self.hosts[h].stats.clone(),
            Some(remote.clone()),
        ));
        self.primary = h;
        let (pstats, r2) = (self.hosts[h].stats.clone(), remote.clone());
        let sstats = self.hosts[1 - h].stats.clone();
        let crashed = self.crashed.clone();
        STATE.with(|st| {
            *st.borrow_mut() = Some(Box::new(move || {
                let link = r2.link();
                format!(
                    "crashed {:?}; primary: connected {}, dirty {}, sync {:?}, remote in flight {}, link in flight {:?}, window waits {}, activemap updates {}; secondary: connected {}, writes {}, flushes {}",
                    crashed.get(),
                    pstats.connected.load(Relaxed),
                    pstats.dirty_bytes.load(Relaxed),
                    pstats.sync_state(),
                    pstats.remote_inflight.get(),
                    link.map(|l| l.inflight()),
                    pstats.window_waits.load(Relaxed),
                    pstats.activemap_updates.load(Relaxed),
                    sstats.connected.load(Relaxed),
                    sstats.writes.load(Relaxed),
                    sstats.flushes.load(Relaxed),
                )
            }))
        });
        self.running[h] = Some(Running::Primary(primary, remote));
    }

    /// Arms a power cut at one of the next `within` storage operations.
    fn arm(&mut self, within: u64) {
        let n = self.rng.gen_range(0..within.max(1));
        let kind = match self.rng.gen_range(0..4) {
            0 | 1 => Crash::Both,
            2 => Crash::Primary,
            _ => Crash::Secondary,
        };
        let cut_seed: u64 = self.rng.gen();
        let p = self.primary;
        type Victim = (Rc<RefCell<MemDisk>>, Rc<Cell<bool>>);
        let victims: Vec<Victim> = match kind {
            Crash::Both => vec![0, 1],
            Crash::Primary => vec![p],
            Crash::Secondary => vec![1 - p],
        }
        .into_iter()
        .map(|h| (self.hosts[h].mem.clone(), self.hosts[h].alive.clone()))
        .collect();
        let (cutters, crashed, target) = (
            self.cutters.clone(),
            self.crashed.clone(),
            self.target.clone(),
        );
        let at_flush = self.rng.gen_bool(0.5);
        let fire = move || {
            let mut rng = StdRng::seed_from_u64(cut_seed);
            for (mem, alive) in &victims {
                alive.set(false);
                mem.borrow_mut().power_cut(&mut rng);
            }
            // The network of a dead host goes with it.
            for c in cutters.borrow_mut().drain(..) {
                c.cut();
            }
            if kind != Crash::Primary {
                *target.borrow_mut() = None;
            }
            crashed.set(Some(kind));
        };
        // Half the crashes at a flush: where a volatile cache is written
        // back, and where ordering mistakes show.
        if at_flush {
            self.wire.arm_at_flush(n / 8, fire);
        } else {
            self.wire.arm(n, fire);
        }
    }

    fn primary_obj(&self) -> Option<Rc<Primary>> {
        match &self.running[self.primary] {
            Some(Running::Primary(p, _)) => Some(p.clone()),
            _ => None,
        }
    }

    /// Writes and flushes from several tasks until `WRITES` writes were
    /// issued or the primary's host died.
    async fn workload(&mut self) {
        let Some(primary) = self.primary_obj() else {
            return;
        };
        let nsectors =
            (self.md.datasize as usize / SECTOR).min(self.hot_extents * EXTENT as usize / SECTOR);
        let flush_every = self.flush_every;
        let left = Rc::new(Cell::new(WRITES));
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let (primary, hist, left) = (primary.clone(), self.hist.clone(), left.clone());
            let alive = self.hosts[self.primary].alive.clone();
            let mut rng = StdRng::seed_from_u64(self.rng.gen());
            tasks.push(glommio::spawn_local(async move {
                while left.get() > 0 && alive.get() {
                    left.set(left.get() - 1);
                    // The secondary flushed alone, as the durability
                    // policy does when many extents are held: the holds are
                    // released while the primary's own cache is not
                    // flushed.
                    if rng.gen_range(0..12) == 0 {
                        if let Some(link) = primary.remote().and_then(|r| r.link()) {
                            let remote = primary.remote().expect("remote").clone();
                            doing(writer, "peer flush".into());
                            let _ = remote.peer_flush(&link).await;
                        }
                        continue;
                    }
                    if flush_every != u32::MAX && rng.gen_range(0..flush_every) == 0 {
                        let upto = hist.borrow().acks;
                        doing(writer, "flush".into());
                        if primary.flush().await.is_ok() && alive.get() {
                            let mut h = hist.borrow_mut();
                            h.promised = h.promised.max(upto);
                        }
                        continue;
                    }
                    let sectors = rng.gen_range(1..=3);
                    let first = rng.gen_range(0..nsectors - sectors);
                    let id = hist.borrow_mut().issue(first, sectors);
                    let mut buf = primary.alloc_buffer(sectors * SECTOR);
                    for i in 0..sectors {
                        buf.as_bytes_mut()[i * SECTOR..(i + 1) * SECTOR]
                            .copy_from_slice(&sector_bytes(id, first + i));
                    }
                    let fua = rng.gen_range(0..16) == 0;
                    doing(
                        writer,
                        format!("write {id} at sector {first} (+{sectors}), fua {fua}"),
                    );
                    let r = primary
                        .write((first * SECTOR) as u64, buf, WriteFlags { fua })
                        .await;
                    // A reply sent by a dying host never reaches anyone.
                    if r.is_ok() && alive.get() {
                        let mut h = hist.borrow_mut();
                        h.ack(id);
                        if fua {
                            // FUA: durable on both legs when acknowledged.
                            let a = h.acks;
                            if a == h.promised + 1 {
                                h.promised = a;
                            }
                        }
                    } else if r.is_err() {
                        break;
                    }
                }
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            t.await;
            doing(i, "done".into());
        }
        DOING.with(|d| d.borrow_mut().clear());
    }

    /// Is the pair connected, clean and quiet?
    fn in_sync(&self) -> bool {
        let Some(Running::Primary(_, remote)) = &self.running[self.primary] else {
            return false;
        };
        let s = &self.hosts[self.primary].stats;
        s.connected.load(Relaxed)
            && s.dirty_bytes.load(Relaxed) == 0
            && s.sync_state().is_none()
            && s.remote_inflight.get() == 0
            && remote.link().is_some_and(|l| l.inflight() == 0)
    }

    /// Waits for in-sync or a crash.
    async fn settle(&self) -> Result<(), String> {
        let start = Instant::now();
        while self.crashed.get().is_none() {
            if self.in_sync() {
                return Ok(());
            }
            if start.elapsed() > SYNC_LIMIT {
                let s = &self.hosts[self.primary].stats;
                return Err(format!(
                    "not in sync after {SYNC_LIMIT:?}: connected {}, dirty {}, sync {:?}, last error {:?}",
                    s.connected.load(Relaxed),
                    s.dirty_bytes.load(Relaxed),
                    s.sync_state(),
                    s.last_error.lock().map(|e| e.clone()).unwrap_or_default()
                ));
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// What a host's disk says now: metadata and activemap bits.
    fn on_disk(&self, h: usize) -> (Metadata, Vec<bool>) {
        let mem = self.hosts[h].mem.borrow();
        let img = mem.contents();
        let md = Metadata::decode(&img[..METADATA_SIZE], DISK as u64).expect("metadata on disk");
        let map = &img[md.mapoff as usize..(md.mapoff + md.mapsize) as usize];
        let n = md.datasize.div_ceil(u64::from(md.extentsize)) as usize;
        let bits = (0..n).map(|e| map[e / 8] & (1 << (e % 8)) != 0).collect();
        (md, bits)
    }

    fn data(&self, h: usize) -> Vec<u8> {
        let off = self.md.localoff as usize;
        self.hosts[h].mem.borrow().contents()[off..off + self.md.datasize as usize].to_vec()
    }

    /// The write ids in the sector named by HAST_SIM_WATCH, on each disk.
    fn watched(&self) -> Option<(u64, u64, Vec<u64>)> {
        let s: usize = std::env::var("HAST_SIM_WATCH").ok()?.parse().ok()?;
        let id = |h| sector_id(&self.data(h)[s * SECTOR..(s + 1) * SECTOR], s).unwrap_or(u64::MAX);
        Some((id(0), id(1), self.hist.borrow().acceptable(s)))
    }

    fn gens(&self, h: usize) -> (u64, u64, u64, u64, usize) {
        let (m, bits) = self.on_disk(h);
        (
            m.resuid,
            m.localcnt,
            m.remotecnt,
            m.flags,
            bits.iter().filter(|b| **b).count(),
        )
    }

    /// Both hosts lost power: every extent that differs is marked on one
    /// of them, unless a full synchronisation is due anyway.
    fn check_marks(&self) -> Result<(), String> {
        let (ma, bits_a) = self.on_disk(0);
        let (mb, bits_b) = self.on_disk(1);
        let gen = |m: &Metadata| Gen {
            resuid: m.resuid,
            localcnt: m.localcnt,
            remotecnt: m.remotecnt,
        };
        let (p, s) = if self.primary == 0 {
            (&ma, &mb)
        } else {
            (&mb, &ma)
        };
        if matches!(
            decide(&gen(p), &gen(s), false, s.flags & FLAG_INCONSISTENT != 0),
            Decision::ToSecondary { full: true }
        ) {
            return Ok(());
        }
        let (da, db) = (self.data(0), self.data(1));
        let es = EXTENT as usize;
        for e in 0..bits_a.len() {
            let r = e * es..((e + 1) * es).min(da.len());
            if da[r.clone()] != db[r.clone()] && !bits_a[e] && !bits_b[e] {
                let sector = (r.start..r.end)
                    .step_by(SECTOR)
                    .find(|&o| da[o..o + SECTOR] != db[o..o + SECTOR])
                    .map(|o| o / SECTOR);
                return Err(format!(
                    "extent {e} differs between the disks (first at sector {sector:?}: {:?} vs {:?}) \
                     but neither activemap marks it (primary was n{})",
                    sector.map(|s| sector_id(&da[s * SECTOR..(s + 1) * SECTOR], s)),
                    sector.map(|s| sector_id(&db[s * SECTOR..(s + 1) * SECTOR], s)),
                    self.primary
                ));
            }
        }
        Ok(())
    }

    /// In sync: the legs are identical and hold what was promised.
    fn check_data(&self) -> Result<(), String> {
        let (da, db) = (self.data(0), self.data(1));
        if da != db {
            let s = (0..da.len() / SECTOR)
                .find(|&s| da[s * SECTOR..(s + 1) * SECTOR] != db[s * SECTOR..(s + 1) * SECTOR]);
            return Err(format!(
                "the legs differ once in sync (first at sector {s:?})"
            ));
        }
        if self.mode == ReplicationMode::Async {
            return Ok(());
        }
        let hist = self.hist.borrow();
        for s in 0..da.len() / SECTOR {
            let id = sector_id(&da[s * SECTOR..(s + 1) * SECTOR], s)?;
            let ok = hist.acceptable(s);
            if !ok.contains(&id) {
                return Err(format!(
                    "{:?}: sector {s} holds write {id}, not its last promised write or a later one ({ok:?})",
                    self.mode
                ));
            }
        }
        Ok(())
    }

    /// The secondary's disk is replaced by an empty one and `hastctl
    /// create`d: the primary copies everything to it (a crash armed after
    /// this lands in that first synchronisation, and recovery resumes it).
    async fn recreate_secondary(&mut self) {
        let s = self.secondary_host();
        trace(format_args!("re-create the secondary n{s}"));
        if let Some(Running::Secondary(sec)) = self.running[s].take() {
            *self.target.borrow_mut() = None;
            sec.disconnect().await;
            let disk = sec.disk().clone();
            drop(sec);
            let _ = disk.close(Role::Secondary).await;
        }
        self.hosts[s].mem = MemDisk::with_metadata(&self.md, DISK, true);
        self.start_secondary(s).await;
    }

    /// May `h` be promoted? Not when it knows it is out of date (what
    /// `hastctl role primary` refuses without `--force`): INCONSISTENT, or
    /// a new secondary that never completed its first synchronisation; and
    /// an operator does not promote a disk just replaced (no resuid).
    fn promotable(&self, h: usize) -> bool {
        let (m, _) = self.on_disk(h);
        let never_synced = m.localcnt == 0 && m.remotecnt == 0;
        m.flags & FLAG_INCONSISTENT == 0 && m.resuid != 0 && !never_synced
    }

    /// Brings the hosts back after a crash.
    async fn recover(&mut self, kind: Crash) {
        self.crashes += 1;
        if kind != Crash::Secondary {
            self.hist.borrow_mut().primary_died();
        }
        trace(format_args!(
            "crash {kind:?} (primary n{}, ops seen {}); disks: n0 {:?}, n1 {:?}; watched: {:?}",
            self.primary,
            self.wire.seen(),
            self.gens(0),
            self.gens(1),
            self.watched()
        ));
        self.crashed.set(None);
        let p = self.primary;
        let s = self.secondary_host();
        // The dead incarnations are abandoned (their storage stays dead).
        match kind {
            Crash::Both => {
                self.running = [None, None];
                // Fail over when the secondary's data is usable.
                let promote = self.rng.gen_bool(0.5) && self.promotable(s);
                let (np, ns) = if promote { (s, p) } else { (p, s) };
                trace(format_args!("recover: n{np} primary, n{ns} secondary"));
                self.start_secondary(ns).await;
                self.start_primary(np).await;
            }
            Crash::Primary => {
                self.running[p] = None;
                let promote = self.rng.gen_bool(0.5)
                    && self.hosts[s].stats.sync_received.load(Relaxed) == 0
                    && self.promotable(s);
                trace(format_args!("recover: promote survivor {promote}"));
                if promote {
                    // A planned promotion of the surviving secondary.
                    if let Some(Running::Secondary(sec)) = self.running[s].take() {
                        sec.disconnect().await;
                        let disk = sec.disk().clone();
                        drop(sec);
                        *self.target.borrow_mut() = None;
                        let _ = disk.close(Role::Secondary).await;
                    }
                    self.start_secondary(p).await;
                    self.start_primary(s).await;
                } else {
                    self.start_primary(p).await;
                }
            }
            Crash::Secondary => {
                self.running[s] = None;
                self.start_secondary(s).await;
            }
        }
    }
}

thread_local! {
    /// What the current case did (printed when it fails).
    static TRACE: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    /// What each writer is waiting for (printed when a case hangs).
    static DOING: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    /// The state of the live nodes (printed when a case hangs).
    static STATE: RefCell<Option<Box<dyn Fn() -> String>>> = const { RefCell::new(None) };
}

fn doing(writer: usize, what: String) {
    DOING.with(|d| {
        let mut d = d.borrow_mut();
        if d.len() <= writer {
            d.resize(writer + 1, String::new());
        }
        d[writer] = what;
    });
}

fn trace(args: std::fmt::Arguments<'_>) {
    let line = args.to_string();
    if std::env::var_os("HAST_SIM_TRACE").is_some() {
        eprintln!("sim: {line}");
    }
    TRACE.with(|t| t.borrow_mut().push(line));
}

/// One case: rounds of writes with a crash somewhere, recoveries, checks.
async fn case(seed: u64) -> Result<usize, String> {
    let mut w = World::new(seed);
    w.start_secondary(1).await;
    w.start_primary(0).await;
    w.settle().await?;
    trace(format_args!(
        "mode {:?}, keepdirty {}, flush every {}, {} hot extents",
        w.mode, w.md.keepdirty, w.flush_every, w.hot_extents
    ));
    for round in 0..3 {
        trace(format_args!("round {round}"));
        if w.rng.gen_bool(0.25) {
            w.recreate_secondary().await;
        }
        w.arm(400);
        w.workload().await;
        w.settle().await?;
        // Crash, recover, maybe crash again during the resynchronisation.
        let mut nested = 0;
        while let Some(kind) = w.crashed.get() {
            if kind == Crash::Both {
                w.check_marks()
                    .map_err(|e| format!("after a power cut of both hosts: {e}"))?;
            }
            w.recover(kind).await;
            nested += 1;
            if nested < 3 && w.rng.gen_bool(0.3) {
                w.arm(60);
            } else {
                w.wire.disarm();
            }
            w.settle().await?;
        }
        w.wire.disarm();
        w.settle().await?;
        trace(format_args!("in sync; watched {:?}", w.watched()));
        w.check_data()?;
    }
    Ok(w.crashes)
}

fn run_case(seed: u64) -> Result<usize, String> {
    glommio::LocalExecutorBuilder::default()
        .spawn(move || async move {
            TRACE.with(|t| t.borrow_mut().clear());
            let hung = async {
                glommio::timer::sleep(CASE_LIMIT).await;
                let doing = DOING.with(|d| d.borrow().join("; "));
                let state = STATE.with(|st| st.borrow().as_ref().map(|f| f()));
                Err(format!(
                    "the case did not end within {CASE_LIMIT:?}; writers: {doing}; {state:?}"
                ))
            };
            futures_lite::future::or(case(seed), hung)
                .await
                .map_err(|e| {
                    let lines = TRACE.with(|t| t.borrow().join("\n  "));
                    format!("{e}\n  {lines}")
                })
        })
        .expect("executor")
        .join()
        .expect("case panicked")
}

#[test]
fn power_loss_loses_nothing_promised() {
    if std::env::var_os("HAST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("HAST_LOG"))
            .try_init();
    }
    let cases: u64 = std::env::var("HAST_SIM_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let seeds: Vec<u64> = match std::env::var("HAST_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(s) => vec![s],
        None => {
            let base: u64 = rand::random();
            (0..cases).map(|i| base.wrapping_add(i)).collect()
        }
    };
    let start = Instant::now();
    let mut crashes = 0;
    for seed in &seeds {
        match run_case(*seed) {
            Ok(n) => crashes += n,
            Err(e) => panic!("seed {seed} failed (replay: HAST_SIM_SEED={seed}): {e}"),
        }
    }
    println!(
        "{} cases, {crashes} crash points, {:.1} s",
        seeds.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        crashes >= seeds.len(),
        "the tripwires fired too rarely: {crashes}"
    );
}
