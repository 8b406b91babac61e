//! The node runtime: glommio executors ("shards"), each owning a fixed set
//! of resources, and a thread-safe handle the control plane uses to change
//! roles, read counters and shut down.
//!
//! The control plane reaches a resource only through its shard's bounded
//! command channel and the resource's shared atomic counters: nothing on the
//! data path takes a lock or hops cores.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

use crate::events::{EventSink, PeerEvent};
use crate::local::LocalDisk;
use crate::metadata::Role;
use crate::nbd::{NbdConfig, NbdExport, NbdHandle};
use crate::peer::listener::{self, Listener, Route};
use crate::peer::proto::Refusal;
use crate::peer::remote::{Remote, RemoteConfig, ReplicationMode};
use crate::peer::secondary::{Incoming, Secondary, SecondaryCtx};
use crate::primary::Primary;
use crate::stats::ResourceStats;

/// How long a new primary waits for its peer before exposing its export
/// (at most; less if `timeout` is shorter).
pub const FIRST_CONTACT: Duration = Duration::from_secs(5);

/// Replicated requests not yet written by the secondary, at most: with
/// [`ResourceSpec::window_bytes`], the replication window. A write waits
/// for room in it, in every mode; so an async secondary is never more than
/// this far behind while connected (docs/failover.md).
pub const WINDOW_REQUESTS: usize = 1024;

/// Commands queued per shard at most (role changes are rare; the control
/// socket handles one request at a time).
const SHARD_QUEUE: usize = 64;

/// What the data path needs to know about one resource.
#[derive(Debug, Clone)]
pub struct ResourceSpec {
    /// Resource name (must match the provider's metadata).
    pub name: String,
    /// Provider name: the export name.
    pub provname: String,
    /// Local provider path.
    pub localpath: PathBuf,
    /// Flush the activemap after each update.
    pub metaflush: bool,
    /// Unix socket the primary serves NBD on.
    pub export_socket: PathBuf,
    /// Requests in flight per NBD connection.
    pub max_inflight: usize,
    /// Bytes of write payload buffered per export.
    pub buffer_budget: usize,
    /// This node's name (sent in the handshake, for logs).
    pub node: String,
    /// The peer's addresses; None for `remote none`.
    pub remote: Option<Vec<SocketAddr>>,
    /// Local address to connect from (`source`).
    pub source: Option<SocketAddr>,
    /// Replication mode.
    pub mode: ReplicationMode,
    /// Peer timeout.
    pub timeout: Duration,
    /// Payload bytes of the replicated requests not yet written by the
    /// secondary, at most (see [`WINDOW_REQUESTS`]).
    pub window_bytes: usize,
    /// `splitbrain auto` policy.
    pub splitbrain_auto: bool,
}

/// Node-wide settings.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Executors (at least one, at most one per resource).
    pub shards: usize,
    /// Executor placement.
    pub placement: CpuPlacement,
    /// Addresses the secondary listens on (used only when some resource
    /// has a remote).
    pub listen: Vec<SocketAddr>,
    /// Where events go (hooks, event stream).
    pub events: Option<flume::Sender<PeerEvent>>,
}

/// Executor placement.
#[derive(Debug, Clone, Default)]
pub enum CpuPlacement {
    /// Let the kernel schedule the executor threads.
    #[default]
    Unbound,
    /// Pin shard `i` to `cpus[i % cpus.len()]`.
    Pinned(Vec<usize>),
}

enum Cmd {
    /// Phase 1: take the new role, but do not expose the export yet.
    Prepare {
        name: String,
        role: Role,
        force: bool,
        reply: flume::Sender<Result<Role, String>>,
    },
    /// Mark the local changes since a split-brain for discarding.
    Discard {
        name: String,
        reply: flume::Sender<Result<(), String>>,
    },
    /// Phase 2: expose the export (primary).
    Commit {
        name: String,
        reply: flume::Sender<Result<(), String>>,
    },
    Incoming {
        name: String,
        incoming: Incoming,
    },
    Shutdown {
        reply: flume::Sender<()>,
    },
}

struct Shard {
    tx: flume::Sender<Cmd>,
    join: std::sync::Mutex<Option<glommio::ExecutorJoinHandle<()>>>,
}

/// Handle on the running data path. `Send + Sync`: the control plane calls
/// it from its own threads.
pub struct Node {
    shards: Vec<Shard>,
    index: HashMap<String, (usize, Arc<ResourceStats>)>,
    listener: std::sync::Mutex<Option<Listener>>,
}

impl Node {
    /// Starts `shards` executors (at least one, at most one per resource)
    /// and assigns resources to them round-robin. Every resource starts in
    /// role init.
    pub fn start(specs: Vec<ResourceSpec>, opts: NodeOptions) -> std::io::Result<Node> {
        let (shards, placement) = (opts.shards, opts.placement.clone());
        let nshards = shards.clamp(1, specs.len().max(1));
        let replicated: Vec<(String, Vec<IpAddr>)> = specs
            .iter()
            .filter_map(|s| {
                s.remote
                    .as_ref()
                    .map(|r| (s.name.clone(), r.iter().map(|a| a.ip()).collect()))
            })
            .collect();
        let timeout = specs
            .iter()
            .map(|s| s.timeout)
            .max()
            .unwrap_or(Duration::from_secs(20));
        let mut per_shard: Vec<Vec<(ResourceSpec, Arc<ResourceStats>)>> =
            (0..nshards).map(|_| Vec::new()).collect();
        let mut index = HashMap::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let stats = Arc::new(ResourceStats::default());
            index.insert(spec.name.clone(), (i % nshards, stats.clone()));
            per_shard[i % nshards].push((spec, stats));
        }
        let mut out = Vec::with_capacity(nshards);
        for (i, resources) in per_shard.into_iter().enumerate() {
            let (tx, rx) = flume::bounded(SHARD_QUEUE);
            let events = opts.events.clone();
            let place = match &placement {
                CpuPlacement::Unbound => Placement::Unbound,
                CpuPlacement::Pinned(cpus) if !cpus.is_empty() => {
                    Placement::Fixed(cpus[i % cpus.len()])
                }
                CpuPlacement::Pinned(_) => Placement::Unbound,
            };
            let join = LocalExecutorBuilder::new(place)
                .name(&format!("hast-shard{i}"))
                .spawn(move || shard_main(rx, resources, events))
                .map_err(|e| std::io::Error::other(format!("cannot start executor {i}: {e}")))?;
            out.push(Shard {
                tx,
                join: std::sync::Mutex::new(Some(join)),
            });
        }
        let mut node = Node {
            shards: out,
            index,
            listener: std::sync::Mutex::new(None),
        };
        if !replicated.is_empty() {
            let mut routes = HashMap::new();
            for (name, allowed) in replicated {
                let shard = node.index[&name].0;
                let tx = node.shards[shard].tx.clone();
                let rname = name.clone();
                routes.insert(
                    name,
                    Route {
                        allowed,
                        deliver: Box::new(move |incoming| {
                            tx.try_send(Cmd::Incoming {
                                name: rname.clone(),
                                incoming,
                            })
                            .map_err(|e| match e.into_inner() {
                                Cmd::Incoming { incoming, .. } => Box::new(incoming),
                                _ => unreachable!("only Incoming is sent here"),
                            })
                        }),
                    },
                );
            }
            match Listener::start(&opts.listen, routes, timeout) {
                Ok(l) => node.listener = std::sync::Mutex::new(Some(l)),
                Err(e) => {
                    node.shutdown();
                    return Err(e);
                }
            }
        }
        Ok(node)
    }

    /// Counters of a resource.
    pub fn stats(&self, name: &str) -> Option<Arc<ResourceStats>> {
        self.index.get(name).map(|(_, s)| s.clone())
    }

    fn ask<T>(
        &self,
        name: &str,
        make: impl FnOnce(flume::Sender<Result<T, String>>) -> Cmd,
    ) -> Result<flume::Receiver<Result<T, String>>, String> {
        let (shard, _) = self
            .index
            .get(name)
            .ok_or_else(|| format!("unknown resource '{name}'"))?;
        let (reply, rx) = flume::bounded(1);
        self.shards[*shard]
            .tx
            .send(make(reply))
            .map_err(|_| "data path is not running".to_string())?;
        Ok(rx)
    }

    fn wait<T>(rx: Result<flume::Receiver<Result<T, String>>, String>) -> Result<T, String> {
        rx?.recv()
            .unwrap_or_else(|_| Err("data path stopped during the role change".into()))
    }

    /// Changes the role of the named resources as one operation: every
    /// resource takes the new role (concurrently across shards), and only
    /// when all succeeded do the primaries' exports appear. If any fails,
    /// the others are returned to their previous roles and every result
    /// carries the failure. `force` promotes a node that knows its data is
    /// out of date. Returns, per resource, the previous role or an error.
    pub fn set_roles(
        &self,
        names: &[String],
        role: Role,
        force: bool,
    ) -> Vec<(String, Result<Role, String>)> {
        let asked: Vec<_> = names
            .iter()
            .map(|n| {
                let name = n.clone();
                (
                    n.clone(),
                    self.ask(n, |reply| Cmd::Prepare {
                        name,
                        role,
                        force,
                        reply,
                    }),
                )
            })
            .collect();
        let prepared: Vec<(String, Result<Role, String>)> = asked
            .into_iter()
            .map(|(n, rx)| (n, Self::wait(rx)))
            .collect();
        let failures: Vec<String> = prepared
            .iter()
            .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e}")))
            .collect();
        if !failures.is_empty() {
            // All or none: put back the ones that changed.
            for (n, r) in &prepared {
                if let Ok(old) = r {
                    if *old != role {
                        let name = n.clone();
                        let old = *old;
                        let back = Self::wait(self.ask(n, |reply| Cmd::Prepare {
                            name,
                            role: old,
                            force: true,
                            reply,
                        }))
                        .and_then(|_| {
                            let name = n.clone();
                            Self::wait(self.ask(n, |reply| Cmd::Commit { name, reply }))
                        });
                        if let Err(e) = back {
                            tracing::error!(resource = %n, error = %e,
                                "cannot restore the previous role after a failed role change");
                        }
                    }
                }
            }
            let all = failures.join("; ");
            return prepared
                .into_iter()
                .map(|(n, r)| {
                    let r = match r {
                        Err(e) => Err(e),
                        Ok(_) => Err(format!(
                            "not changed: the role change of the group failed ({all})"
                        )),
                    };
                    (n, r)
                })
                .collect();
        }
        // Phase 2: expose the exports together.
        let commits: Vec<_> = prepared
            .iter()
            .map(|(n, _)| {
                let name = n.clone();
                self.ask(n, |reply| Cmd::Commit { name, reply })
            })
            .collect();
        prepared
            .into_iter()
            .zip(commits)
            .map(|((n, r), c)| {
                let r = r.and_then(|old| Self::wait(c).map(|()| old));
                (n, r)
            })
            .collect()
    }

    /// Marks each named resource so that, at its next handshake, this
    /// node discards the changes it made since a split-brain and takes the
    /// peer's data over the extents either side changed. The node must
    /// not be primary.
    pub fn discard(&self, names: &[String]) -> Vec<(String, Result<(), String>)> {
        let asked: Vec<_> = names
            .iter()
            .map(|n| {
                let name = n.clone();
                (n.clone(), self.ask(n, |reply| Cmd::Discard { name, reply }))
            })
            .collect();
        asked
            .into_iter()
            .map(|(n, rx)| (n, Self::wait(rx)))
            .collect()
    }

    /// Stops every resource cleanly (exports drained, activemaps and
    /// metadata stored) and joins the executors. Later calls do nothing.
    pub fn shutdown(&self) {
        let listener = self.listener.lock().map(|mut l| l.take()).unwrap_or(None);
        if let Some(l) = listener {
            l.stop();
        }
        let mut waits = Vec::new();
        for shard in &self.shards {
            let (reply, rx) = flume::bounded(1);
            if shard.tx.send(Cmd::Shutdown { reply }).is_ok() {
                waits.push(rx);
            }
        }
        for rx in waits {
            let _ = rx.recv();
        }
        for shard in &self.shards {
            let join = shard.join.lock().map(|mut j| j.take()).unwrap_or(None);
            if let Some(j) = join {
                if let Err(e) = j.join() {
                    tracing::error!(error = %e, "executor ended with an error");
                }
            }
        }
    }
}

/// State of one resource on its shard.
struct Res {
    spec: ResourceSpec,
    stats: Arc<ResourceStats>,
    events: EventSink,
    role: Role,
    active: Active,
}

enum Active {
    Idle,
    Primary {
        primary: Rc<Primary>,
        /// None between prepare and commit.
        export: Option<NbdHandle>,
    },
    Secondary {
        secondary: Rc<Secondary>,
    },
}

async fn shard_main(
    rx: flume::Receiver<Cmd>,
    resources: Vec<(ResourceSpec, Arc<ResourceStats>)>,
    events: Option<flume::Sender<PeerEvent>>,
) {
    let mut state: HashMap<String, Res> = resources
        .into_iter()
        .map(|(spec, stats)| {
            stats.set_role(Role::Init);
            (
                spec.name.clone(),
                Res {
                    events: EventSink::new(&spec.name, events.clone()),
                    spec,
                    stats,
                    role: Role::Init,
                    active: Active::Idle,
                },
            )
        })
        .collect();
    while let Ok(cmd) = rx.recv_async().await {
        match cmd {
            Cmd::Prepare {
                name,
                role,
                force,
                reply,
            } => {
                let res = match state.get_mut(&name) {
                    Some(r) => r.prepare_role(role, force).await,
                    None => Err(format!("resource '{name}' is not on this shard")),
                };
                let _ = reply.send(res);
            }
            Cmd::Discard { name, reply } => {
                let res = match state.get_mut(&name) {
                    Some(r) => r.discard().await,
                    None => Err(format!("resource '{name}' is not on this shard")),
                };
                let _ = reply.send(res);
            }
            Cmd::Commit { name, reply } => {
                let res = match state.get_mut(&name) {
                    Some(r) => r.commit_role().await,
                    None => Err(format!("resource '{name}' is not on this shard")),
                };
                let _ = reply.send(res);
            }
            Cmd::Incoming { name, incoming } => match state.get_mut(&name) {
                Some(r) => r.incoming(incoming).await,
                None => refuse_incoming(incoming, Refusal::UnknownResource, "unknown resource"),
            },
            Cmd::Shutdown { reply } => {
                for r in state.values_mut() {
                    r.deactivate().await;
                }
                let _ = reply.send(());
                return;
            }
        }
    }
    // The handle was dropped without a shutdown: still store the maps.
    for r in state.values_mut() {
        r.deactivate().await;
    }
}

impl Res {
    async fn prepare_role(&mut self, role: Role, force: bool) -> Result<Role, String> {
        let old = self.role;
        if old == role {
            return Ok(old);
        }
        // Refuse before touching anything: a node that knows its data is
        // older than its peer's must not silently become the source of
        // truth.
        if role == Role::Primary && !force {
            if let Some(why) = self.out_of_date_reason() {
                return Err(format!(
                    "[{}] refusing to promote: {why}; use 'hastctl role --force primary {}' to promote anyway",
                    self.spec.name, self.spec.name
                ));
            }
        }
        self.deactivate().await;
        self.role = Role::Init;
        self.stats.set_role(Role::Init);
        let active = match role {
            Role::Init => Active::Idle,
            Role::Primary => self.activate_primary().await?,
            Role::Secondary => self.activate_secondary().await?,
        };
        self.active = active;
        self.role = role;
        self.stats.set_role(role);
        tracing::info!(resource = %self.spec.name, from = %old, to = %role, "role changed");
        Ok(old)
    }

    /// Opens the resource's provider (errors name the resource).
    async fn open_provider(&self) -> Result<Rc<LocalDisk>, String> {
        LocalDisk::open(
            &self.spec.localpath,
            &self.spec.name,
            self.spec.metaflush,
            self.stats.clone(),
        )
        .await
        .map_err(|e| format!("[{}] {e}", self.spec.name))
    }

    async fn open_disk(&self, role: Role) -> Result<Rc<LocalDisk>, String> {
        let disk = self.open_provider().await?;
        if let Err(e) = disk.set_prevrole(role).await {
            let msg = format!(
                "[{}] {}: cannot write metadata: {e}",
                self.spec.name,
                self.spec.localpath.display()
            );
            let _ = disk.close(role).await;
            return Err(msg);
        }
        Ok(disk)
    }

    /// Sets the discard flag (see [`Node::discard`]).
    async fn discard(&mut self) -> Result<(), String> {
        let flag = |m: &mut crate::metadata::Metadata| m.flags |= crate::metadata::FLAG_DISCARD;
        let name = self.spec.name.clone();
        let fail = |e: std::io::Error| format!("[{name}] cannot write metadata: {e}");
        match &self.active {
            Active::Primary { .. } => Err(format!(
                "[{}] this node is primary: make it secondary first (the data that is kept is the primary's)",
                self.spec.name
            )),
            Active::Secondary { secondary } => {
                secondary.disk().update_metadata(flag).await.map_err(fail)?;
                tracing::warn!(resource = %self.spec.name,
                    "this node's changes since the split-brain will be discarded at the next connection");
                Ok(())
            }
            Active::Idle => {
                let disk = self.open_provider().await?;
                let res = disk.update_metadata(flag).await.map_err(fail);
                let prev = disk.metadata().prevrole;
                let _ = disk.close(prev).await;
                res?;
                tracing::warn!(resource = %self.spec.name,
                    "this node's changes since the split-brain will be discarded at the next connection");
                Ok(())
            }
        }
    }

    /// Phase 2 of a role change: a primary's export appears.
    async fn commit_role(&mut self) -> Result<(), String> {
        let Active::Primary { primary, export } = &mut self.active else {
            return Ok(());
        };
        if export.is_some() {
            return Ok(());
        }
        if let Some(remote) = primary.remote() {
            // Learn from the peer whether our data is current before
            // serving anything. Bounded: a live peer answers within
            // milliseconds; one that does not answer in FIRST_CONTACT is
            // most likely down (the failover case) and cannot tell anyway.
            let limit = self.spec.timeout.min(FIRST_CONTACT) + Duration::from_secs(1);
            if !remote.first_attempt(limit).await {
                tracing::warn!(resource = %self.spec.name,
                    "peer did not answer in time; exporting without knowing whether it holds newer data");
            }
        }
        let cfg = NbdConfig {
            export_name: self.spec.provname.clone(),
            max_inflight: self.spec.max_inflight,
            buffer_budget: self.spec.buffer_budget,
            read_only: false,
        };
        if let Some(dir) = self.spec.export_socket.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                format!(
                    "[{}] cannot create export directory {}: {e}",
                    self.spec.name,
                    dir.display()
                )
            })?;
        }
        let bound =
            NbdExport::bind(&self.spec.export_socket, cfg, primary.clone()).map_err(|e| {
                format!(
                    "[{}] cannot serve {}: {e}",
                    self.spec.name,
                    self.spec.export_socket.display()
                )
            })?;
        *export = Some(bound.start_with_gauge(self.stats.clients_gauge()));
        tracing::info!(resource = %self.spec.name,
            socket = %self.spec.export_socket.display(), "export ready");
        Ok(())
    }

    async fn activate_primary(&mut self) -> Result<Active, String> {
        let disk = self.open_disk(Role::Primary).await?;
        let remote = self.spec.remote.as_ref().map(|addrs| {
            Remote::start(
                RemoteConfig {
                    resource: self.spec.name.clone(),
                    node: self.spec.node.clone(),
                    remote: addrs.clone(),
                    source: self.spec.source,
                    timeout: self.spec.timeout,
                    mode: self.spec.mode,
                    max_inflight: WINDOW_REQUESTS,
                    max_bytes: self.spec.window_bytes,
                    sync_window: 16,
                    sync_chunk: 1 << 20,
                    retry: self.spec.timeout.min(Duration::from_secs(2)),
                    splitbrain_auto: self.spec.splitbrain_auto,
                },
                disk.clone(),
                self.stats.clone(),
                self.events.clone(),
            )
        });
        let primary = Rc::new(Primary::new(disk.clone(), self.stats.clone(), remote));
        Ok(Active::Primary {
            primary,
            export: None,
        })
    }

    /// Why this node's data is known to be older than the peer's, if it
    /// is: an unfinished synchronisation from the peer (metadata flag), or
    /// a handshake that found the peer ahead.
    fn out_of_date_reason(&self) -> Option<String> {
        let path = &self.spec.localpath;
        let file = std::fs::File::open(path).ok()?;
        let mut block = vec![0u8; crate::metadata::METADATA_SIZE];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut block, 0).ok()?;
        let info = crate::provider::probe_file(path, &file).ok()?;
        let md = crate::metadata::Metadata::decode(&block, info.mediasize).ok()?;
        if md.flags & crate::metadata::FLAG_INCONSISTENT != 0 {
            return Some(
                "its data is older than the peer's (a synchronisation from the peer did not finish)"
                    .into(),
            );
        }
        None
    }

    async fn activate_secondary(&mut self) -> Result<Active, String> {
        let disk = self.open_disk(Role::Secondary).await?;
        let secondary = Secondary::new(SecondaryCtx {
            resource: self.spec.name.clone(),
            node: self.spec.node.clone(),
            disk,
            stats: self.stats.clone(),
            events: self.events.clone(),
            timeout: self.spec.timeout,
            splitbrain_auto: self.spec.splitbrain_auto,
            max_requests: WINDOW_REQUESTS,
            max_bytes: self.spec.window_bytes,
        });
        Ok(Active::Secondary { secondary })
    }

    /// A primary connected for this resource.
    async fn incoming(&mut self, incoming: Incoming) {
        match &self.active {
            Active::Secondary { secondary } => secondary.accept(incoming).await,
            _ => {
                let role = self.role;
                tracing::warn!(resource = %self.spec.name, peer = %incoming.peer, role = %role,
                    "a primary connected but this node is not secondary; refused");
                refuse_incoming(
                    incoming,
                    Refusal::NotSecondary,
                    &format!("this node is {role}, not secondary"),
                );
            }
        }
    }

    /// Tears down whatever runs: the export first (so clients see the
    /// device go before anything else changes), then the provider.
    async fn deactivate(&mut self) {
        let role = self.role;
        match std::mem::replace(&mut self.active, Active::Idle) {
            Active::Idle => {}
            Active::Primary { primary, export } => {
                if let Some(export) = export {
                    export.shutdown().await;
                }
                if let Some(r) = primary.remote() {
                    r.stop().await;
                }
                // Writes waiting for the secondary's Done were settled
                // when the link closed (their completion runs with it).
                debug_assert_eq!(self.stats.remote_inflight.get(), 0);
                self.stats.connected.store(false, Relaxed);
                let disk = primary.disk().clone();
                drop(primary);
                if let Err(e) = disk.close(role).await {
                    tracing::error!(resource = %self.spec.name, error = %e,
                        "cannot store the activemap and metadata");
                }
            }
            Active::Secondary { secondary } => {
                secondary.disconnect().await;
                self.stats.connected.store(false, Relaxed);
                let disk = secondary.disk().clone();
                drop(secondary);
                if let Err(e) = disk.close(role).await {
                    tracing::error!(resource = %self.spec.name, error = %e,
                        "cannot store the activemap and metadata");
                }
            }
        }
    }
}

/// Answers a handed-over connection with a refusal and closes it.
fn refuse_incoming(incoming: Incoming, why: Refusal, msg: &str) {
    let conn = std::net::TcpStream::from(incoming.fd);
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
    listener::refuse(&conn, why, msg.to_owned());
}
