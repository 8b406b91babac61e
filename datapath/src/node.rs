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
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use glommio::{LocalExecutorBuilder, Placement};

use crate::events::{Event, EventSink};
use crate::local::LocalDisk;
use crate::metadata::Role;
use crate::nbd::{NbdConfig, NbdExport, NbdHandle};
use crate::peer::compress::Compression;
use crate::peer::listener::{Listener, Route};
use crate::peer::presession::PeerSecurity;
use crate::peer::proto::Refusal;
use crate::peer::remote::{Remote, RemoteConfig, ReplicationMode};
use crate::peer::secondary::{refuse_incoming, Incoming, Secondary, SecondaryCtx};
use crate::peer::sync::SyncMode;
use crate::peer::verify::VerifyParams;
use crate::primary::Primary;
use crate::provider::ProviderLock;
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
/// plane makes one change at a time).
const SHARD_QUEUE: usize = 64;

/// Synchronisation chunks in flight at most (when the application is
/// idle).
pub const SYNC_WINDOW: usize = 16;
/// Bytes per synchronisation chunk.
pub const SYNC_CHUNK: u32 = 1 << 20;
/// Pause between connection attempts to the secondary, at most (less when
/// `timeout` is shorter).
pub const RETRY_MAX: Duration = Duration::from_secs(2);

/// What went wrong, by kind: the control plane chooses its exit codes and
/// wording by kind, never by the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeErrorKind {
    /// No such resource on this node.
    UnknownResource,
    /// The data path has stopped.
    NotRunning,
    /// The node knows its data is older than its peer's (promotion
    /// refused without `force`).
    OutOfDate,
    /// Not possible in the resource's current role.
    WrongRole,
    /// The provider cannot be opened, or its metadata not written.
    Provider,
    /// The export cannot be served.
    Export,
    /// The listen addresses cannot be bound.
    Listen,
    /// Not changed because another resource of the same group change
    /// failed.
    Group,
}

/// An error of the data path: its kind, the resource (if one), what was
/// being done and why it failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{operation}: {detail}", resource.as_ref().map(|r| format!("[{r}] ")).unwrap_or_default())]
pub struct NodeError {
    /// What kind of failure.
    pub kind: NodeErrorKind,
    /// The resource concerned.
    pub resource: Option<String>,
    /// The operation, with its object (e.g. `cannot serve /run/hast/r.sock`).
    pub operation: String,
    /// Why.
    pub detail: String,
}

impl NodeError {
    /// An error of resource `resource`.
    pub fn new(
        kind: NodeErrorKind,
        resource: &str,
        operation: impl Into<String>,
        detail: impl std::fmt::Display,
    ) -> NodeError {
        NodeError {
            kind,
            resource: Some(resource.to_owned()),
            operation: operation.into(),
            detail: detail.to_string(),
        }
    }

    fn unknown(name: &str) -> NodeError {
        NodeError::new(
            NodeErrorKind::UnknownResource,
            name,
            "unknown resource",
            "not configured on this node",
        )
    }

    fn stopped(name: &str) -> NodeError {
        NodeError::new(NodeErrorKind::NotRunning, name, "data path", "not running")
    }
}

/// What changed in a resource's specification (see
/// [`Node::reconfigure`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecChange {
    /// The provider, its device name or the export socket changed: the
    /// resource restarts in every role.
    pub provider: bool,
    /// `remote` or `source` changed.
    pub peer: bool,
    /// Anything else (replication, timeout, metaflush, hooks, ...).
    pub other: bool,
}

impl SpecChange {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        !(self.provider || self.peer || self.other)
    }
}

/// What [`Node::reconfigure`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Nothing runs (role init): the new specification is used from the
    /// next role change.
    Stored,
    /// Stopped and started again in this role.
    Restarted(Role),
    /// Applied to the running primary without a restart (a changed peer
    /// address reconnects).
    Live,
}

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
    /// How the replication connection is secured (secret, TLS).
    pub security: PeerSecurity,
    /// How data travels (`compression`).
    pub compression: Compression,
    /// How a synchronisation moves data (`syncmode`).
    pub syncmode: SyncMode,
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
    pub events: Option<flume::Sender<Event>>,
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

type Reply<T> = flume::Sender<Result<T, NodeError>>;

enum Cmd {
    /// Phase 1: take the new role, but do not expose the export yet.
    Prepare {
        name: String,
        role: Role,
        force: bool,
        reply: Reply<Role>,
    },
    /// Mark the local changes since a split-brain for discarding.
    Discard {
        name: String,
        reply: Reply<()>,
    },
    /// Start a verify (primary).
    Verify {
        name: String,
        params: VerifyParams,
        reply: Reply<()>,
    },
    /// Phase 2: expose the export (primary).
    Commit {
        name: String,
        reply: Reply<()>,
    },
    /// A new resource, in role init.
    Add {
        spec: Box<ResourceSpec>,
        stats: Arc<ResourceStats>,
        reply: Reply<()>,
    },
    /// Back to init, then forgotten.
    Remove {
        name: String,
        reply: Reply<()>,
    },
    /// A new specification.
    Reconfigure {
        spec: Box<ResourceSpec>,
        change: SpecChange,
        reply: Reply<Applied>,
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

/// Where a resource lives, and what it was last configured as.
struct Entry {
    shard: usize,
    stats: Arc<ResourceStats>,
    spec: ResourceSpec,
}

/// The peer listener and what it was started with.
#[derive(Default)]
struct Listening {
    addrs: Vec<SocketAddr>,
    listener: Option<Listener>,
}

/// Handle on the running data path. `Send + Sync`: the control plane calls
/// it from its own threads.
pub struct Node {
    shards: Vec<Shard>,
    index: RwLock<HashMap<String, Entry>>,
    listening: Mutex<Listening>,
}

impl Node {
    /// Starts `shards` executors (at least one, at most one per resource)
    /// and assigns resources to them round-robin. Every resource starts in
    /// role init.
    pub fn start(specs: Vec<ResourceSpec>, opts: NodeOptions) -> Result<Node, NodeError> {
        let (shards, placement) = (opts.shards, opts.placement.clone());
        let nshards = shards.clamp(1, specs.len().max(1));
        let mut per_shard: Vec<Vec<(ResourceSpec, Arc<ResourceStats>)>> =
            (0..nshards).map(|_| Vec::new()).collect();
        let mut index = HashMap::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let stats = Arc::new(ResourceStats::default());
            per_shard[i % nshards].push((spec.clone(), stats.clone()));
            index.insert(
                spec.name.clone(),
                Entry {
                    shard: i % nshards,
                    stats,
                    spec,
                },
            );
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
                .map_err(|e| NodeError {
                    kind: NodeErrorKind::NotRunning,
                    resource: None,
                    operation: format!("cannot start executor {i}"),
                    detail: e.to_string(),
                })?;
            out.push(Shard {
                tx,
                join: std::sync::Mutex::new(Some(join)),
            });
        }
        let node = Node {
            shards: out,
            index: RwLock::new(index),
            listening: Mutex::new(Listening {
                addrs: opts.listen,
                listener: None,
            }),
        };
        if let Err(e) = node.refresh_routes() {
            node.shutdown();
            return Err(e);
        }
        Ok(node)
    }

    fn index(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Entry>> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the listener sends each replicated resource's connections.
    fn routes(&self) -> HashMap<String, Route> {
        let mut routes = HashMap::new();
        for (name, e) in self.index().iter() {
            let Some(remote) = &e.spec.remote else {
                continue;
            };
            let tx = self.shards[e.shard].tx.clone();
            let rname = name.clone();
            routes.insert(
                name.clone(),
                Route {
                    allowed: remote.iter().map(|a| a.ip()).collect::<Vec<IpAddr>>(),
                    node: e.spec.node.clone(),
                    security: e.spec.security.clone(),
                    stats: e.stats.clone(),
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
        routes
    }

    /// The handshake timeout of the listener: the longest of the
    /// resources'.
    fn listen_timeout(&self) -> Duration {
        self.index()
            .values()
            .map(|e| e.spec.timeout)
            .max()
            .unwrap_or(Duration::from_secs(20))
    }

    /// Gives the listener the current routes; starts it when the first
    /// resource with a peer appears.
    fn refresh_routes(&self) -> Result<(), NodeError> {
        let mut l = self.listening.lock().unwrap_or_else(|e| e.into_inner());
        let routes = self.routes();
        if let Some(listener) = &l.listener {
            listener.set_routes(routes);
            return Ok(());
        }
        if routes.is_empty() {
            return Ok(());
        }
        l.listener =
            Some(Listener::start(&l.addrs, routes, self.listen_timeout()).map_err(listen_error)?);
        Ok(())
    }

    /// Listens on `addrs` instead (a reload). The old sockets are closed
    /// first (the new set may share addresses with them); if the new ones
    /// cannot all be bound, the old ones are bound again and the error is
    /// returned: either every address changes or none does.
    pub fn set_listen(&self, addrs: Vec<SocketAddr>) -> Result<bool, NodeError> {
        let mut l = self.listening.lock().unwrap_or_else(|e| e.into_inner());
        if l.addrs == addrs {
            return Ok(false);
        }
        let Some(old) = l.listener.take() else {
            // Not listening (no resource has a peer): nothing to bind yet.
            l.addrs = addrs;
            return Ok(true);
        };
        old.stop();
        let timeout = self.listen_timeout();
        match Listener::start(&addrs, self.routes(), timeout) {
            Ok(new) => {
                l.listener = Some(new);
                l.addrs = addrs;
                Ok(true)
            }
            Err(e) => {
                match Listener::start(&l.addrs, self.routes(), timeout) {
                    Ok(back) => l.listener = Some(back),
                    Err(e2) => tracing::error!(error = %e2,
                        "cannot listen on the previous addresses again; not listening"),
                }
                Err(listen_error(e))
            }
        }
    }

    /// Names of the resources, in no particular order.
    pub fn names(&self) -> Vec<String> {
        self.index().keys().cloned().collect()
    }

    /// Counters of a resource.
    pub fn stats(&self, name: &str) -> Option<Arc<ResourceStats>> {
        self.index().get(name).map(|e| e.stats.clone())
    }

    fn send<T>(
        &self,
        shard: usize,
        name: &str,
        make: impl FnOnce(Reply<T>) -> Cmd,
    ) -> Result<flume::Receiver<Result<T, NodeError>>, NodeError> {
        let (reply, rx) = flume::bounded(1);
        self.shards[shard]
            .tx
            .send(make(reply))
            .map_err(|_| NodeError::stopped(name))?;
        Ok(rx)
    }

    fn ask<T>(
        &self,
        name: &str,
        make: impl FnOnce(Reply<T>) -> Cmd,
    ) -> Result<flume::Receiver<Result<T, NodeError>>, NodeError> {
        let shard = self
            .index()
            .get(name)
            .map(|e| e.shard)
            .ok_or_else(|| NodeError::unknown(name))?;
        self.send(shard, name, make)
    }

    fn wait<T>(
        name: &str,
        rx: Result<flume::Receiver<Result<T, NodeError>>, NodeError>,
    ) -> Result<T, NodeError> {
        rx?.recv().unwrap_or_else(|_| Err(NodeError::stopped(name)))
    }

    /// Adds a resource in role init (a reload), on the shard with the
    /// fewest resources.
    pub fn add(&self, spec: ResourceSpec) -> Result<(), NodeError> {
        let name = spec.name.clone();
        let shard = {
            let index = self.index();
            if index.contains_key(&name) {
                return Ok(());
            }
            (0..self.shards.len())
                .min_by_key(|i| index.values().filter(|e| e.shard == *i).count())
                .unwrap_or(0)
        };
        let stats = Arc::new(ResourceStats::default());
        let boxed = Box::new(spec.clone());
        let st = stats.clone();
        Self::wait(
            &name,
            self.send(shard, &name, |reply| Cmd::Add {
                spec: boxed,
                stats: st,
                reply,
            }),
        )?;
        self.index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, Entry { shard, stats, spec });
        self.refresh_routes()
    }

    /// Takes a resource to role init and forgets it (a reload).
    pub fn remove(&self, name: &str) -> Result<(), NodeError> {
        let n = name.to_owned();
        Self::wait(name, self.ask(name, |reply| Cmd::Remove { name: n, reply }))?;
        self.index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        self.refresh_routes()
    }

    /// Gives a resource a new specification (a reload). In role init it is
    /// stored for the next role change; a secondary restarts on any change;
    /// a primary restarts when its provider or export changed, and
    /// otherwise applies the change while it runs: a new `remote` or
    /// `source` closes the replication connection and opens a new one, a
    /// new timeout applies to the open connection, a new replication mode
    /// or metaflush to the next write. Its export stays up.
    pub fn reconfigure(
        &self,
        spec: ResourceSpec,
        change: SpecChange,
    ) -> Result<Applied, NodeError> {
        let name = spec.name.clone();
        let boxed = Box::new(spec.clone());
        let applied = Self::wait(
            &name,
            self.ask(&name, |reply| Cmd::Reconfigure {
                spec: boxed,
                change,
                reply,
            }),
        )?;
        if let Some(e) = self
            .index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&name)
        {
            e.spec = spec;
        }
        self.refresh_routes()?;
        Ok(applied)
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
    ) -> Vec<(String, Result<Role, NodeError>)> {
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
        let prepared: Vec<(String, Result<Role, NodeError>)> = asked
            .into_iter()
            .map(|(n, rx)| {
                let r = Self::wait(&n, rx);
                (n, r)
            })
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
                        let back = Self::wait(
                            n,
                            self.ask(n, |reply| Cmd::Prepare {
                                name,
                                role: old,
                                force: true,
                                reply,
                            }),
                        )
                        .and_then(|_| {
                            let name = n.clone();
                            Self::wait(n, self.ask(n, |reply| Cmd::Commit { name, reply }))
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
                        Ok(_) => Err(NodeError::new(
                            NodeErrorKind::Group,
                            &n,
                            "not changed",
                            format!("the role change of the group failed ({all})"),
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
                let r = r.and_then(|old| Self::wait(&n, c).map(|()| old));
                (n, r)
            })
            .collect()
    }

    /// Marks each named resource so that, at its next handshake, this
    /// node discards the changes it made since a split-brain and takes the
    /// peer's data over the extents either side changed. The node must
    /// not be primary.
    pub fn discard(&self, names: &[String]) -> Vec<(String, Result<(), NodeError>)> {
        self.each(names, |name, reply| Cmd::Discard { name, reply })
    }

    /// Starts `hastctl verify` on each named resource (which must be
    /// primary and connected); it runs in the background, its progress and
    /// result in the resource's counters (`ResourceStats::verify`).
    pub fn verify(
        &self,
        names: &[String],
        params: VerifyParams,
    ) -> Vec<(String, Result<(), NodeError>)> {
        self.each(names, |name, reply| Cmd::Verify {
            name,
            params,
            reply,
        })
    }

    /// Sends the command `make` builds to each named resource (all at
    /// once, across shards) and collects the answers in order.
    fn each<T>(
        &self,
        names: &[String],
        make: impl Fn(String, Reply<T>) -> Cmd,
    ) -> Vec<(String, Result<T, NodeError>)> {
        let asked: Vec<_> = names
            .iter()
            .map(|n| (n.clone(), self.ask(n, |reply| make(n.clone(), reply))))
            .collect();
        asked
            .into_iter()
            .map(|(n, rx)| {
                let r = Self::wait(&n, rx);
                (n, r)
            })
            .collect()
    }

    /// Stops every resource cleanly (exports drained, activemaps and
    /// metadata stored) and joins the executors. Later calls do nothing.
    pub fn shutdown(&self) {
        let listener = self
            .listening
            .lock()
            .map(|mut l| l.listener.take())
            .unwrap_or(None);
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
    /// The exclusive claim on the provider: taken when the resource
    /// leaves role init, kept across changes between primary and
    /// secondary (no other process can take the provider in between),
    /// released in role init (and when the resource goes away).
    lock: Option<ProviderLock>,
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
    events: Option<flume::Sender<Event>>,
) {
    let new_res = |spec: ResourceSpec, stats: Arc<ResourceStats>| {
        stats.set_role(Role::Init);
        Res {
            events: EventSink::new(&spec.name, events.clone()),
            spec,
            stats,
            role: Role::Init,
            active: Active::Idle,
            lock: None,
        }
    };
    let mut state: HashMap<String, Res> = resources
        .into_iter()
        .map(|(spec, stats)| (spec.name.clone(), new_res(spec, stats)))
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
                    None => Err(NodeError::unknown(&name)),
                };
                let _ = reply.send(res);
            }
            Cmd::Discard { name, reply } => {
                let res = match state.get_mut(&name) {
                    Some(r) => r.discard().await,
                    None => Err(NodeError::unknown(&name)),
                };
                let _ = reply.send(res);
            }
            Cmd::Verify {
                name,
                params,
                reply,
            } => {
                let res = match state.get_mut(&name) {
                    Some(r) => r.verify(params),
                    None => Err(NodeError::unknown(&name)),
                };
                let _ = reply.send(res);
            }
            Cmd::Commit { name, reply } => {
                let res = match state.get_mut(&name) {
                    Some(r) => r.commit_role().await,
                    None => Err(NodeError::unknown(&name)),
                };
                let _ = reply.send(res);
            }
            Cmd::Add { spec, stats, reply } => {
                tracing::info!(resource = %spec.name, "resource added (role init)");
                state.insert(spec.name.clone(), new_res(*spec, stats));
                let _ = reply.send(Ok(()));
            }
            Cmd::Remove { name, reply } => {
                let res = match state.remove(&name) {
                    Some(mut r) => {
                        r.deactivate().await;
                        r.stats.set_role(Role::Init);
                        tracing::info!(resource = %name, from = %r.role, "resource removed");
                        Ok(())
                    }
                    None => Err(NodeError::unknown(&name)),
                };
                let _ = reply.send(res);
            }
            Cmd::Reconfigure {
                spec,
                change,
                reply,
            } => {
                let res = match state.get_mut(&spec.name) {
                    Some(r) => r.reconfigure(*spec, change).await,
                    None => Err(NodeError::unknown(&spec.name)),
                };
                let _ = reply.send(res);
            }
            Cmd::Incoming { name, incoming } => match state.get_mut(&name) {
                Some(r) => r.incoming(incoming).await,
                None => {
                    refuse_incoming(incoming, Refusal::UnknownResource, "unknown resource").await
                }
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
    fn error(
        &self,
        kind: NodeErrorKind,
        operation: impl Into<String>,
        detail: impl std::fmt::Display,
    ) -> NodeError {
        NodeError::new(kind, &self.spec.name, operation, detail)
    }

    async fn prepare_role(&mut self, role: Role, force: bool) -> Result<Role, NodeError> {
        let old = self.role;
        if old == role {
            return Ok(old);
        }
        // Refuse before touching anything: a node that knows its data is
        // older than its peer's must not silently become the source of
        // truth.
        if role == Role::Primary && !force {
            if let Some(why) = self.out_of_date_reason() {
                return Err(self.error(
                    NodeErrorKind::OutOfDate,
                    "refusing to promote",
                    format!(
                        "{why}; use 'hastctl role --force primary {}' to promote anyway",
                        self.spec.name
                    ),
                ));
            }
        }
        self.deactivate().await;
        self.role = Role::Init;
        self.stats.set_role(Role::Init);
        let active = match role {
            Role::Init => Ok(Active::Idle),
            Role::Primary => self.activate_primary().await,
            Role::Secondary => self.activate_secondary().await,
        };
        let active = match active {
            Ok(Active::Idle) | Err(_) => {
                self.lock = None;
                active?
            }
            Ok(a) => a,
        };
        self.active = active;
        self.role = role;
        self.stats.set_role(role);
        tracing::info!(resource = %self.spec.name, from = %old, to = %role, "role changed");
        Ok(old)
    }

    /// A new specification (see [`Node::reconfigure`]).
    async fn reconfigure(
        &mut self,
        spec: ResourceSpec,
        change: SpecChange,
    ) -> Result<Applied, NodeError> {
        let role = self.role;
        if role == Role::Init || change.is_empty() {
            self.spec = spec;
            return Ok(Applied::Stored);
        }
        if role == Role::Primary && !change.provider {
            self.apply_live(spec, change).await;
            return Ok(Applied::Live);
        }
        tracing::info!(resource = %self.spec.name, role = %role,
            "configuration changed; restarting the resource");
        self.prepare_role(Role::Init, true).await?;
        self.spec = spec;
        self.prepare_role(role, true).await?;
        self.commit_role().await?;
        Ok(Applied::Restarted(role))
    }

    /// Applies a new specification to the running primary, export kept.
    async fn apply_live(&mut self, spec: ResourceSpec, change: SpecChange) {
        let Active::Primary { primary, .. } = &self.active else {
            self.spec = spec;
            return;
        };
        let primary = primary.clone();
        primary.disk().set_metaflush(spec.metaflush);
        self.spec = spec;
        if change.peer {
            tracing::info!(resource = %self.spec.name,
                "peer address changed; reconnecting to the secondary");
            // The old connection goes first (the secondary takes one
            // primary at a time); writes meanwhile are local and marked.
            if let Some(old) = primary.set_remote(None) {
                old.stop().await;
            }
            primary.set_remote(self.start_remote(primary.disk()));
        } else if let Some(r) = primary.remote() {
            r.set_mode(self.spec.mode);
            r.set_timeout(self.spec.timeout);
            r.set_compression(self.spec.compression);
            r.set_syncmode(self.spec.syncmode);
        }
        tracing::info!(resource = %self.spec.name, "configuration applied to the running primary");
    }

    /// Claims the provider for this resource unless it holds it already
    /// (see [`Res::lock`]); refused when another process (another hastd,
    /// `hastctl create`) or another resource uses it.
    fn claim(&mut self) -> Result<(), NodeError> {
        if self.lock.is_none() {
            let lock = ProviderLock::acquire(&self.spec.localpath)
                .map_err(|e| self.error(NodeErrorKind::Provider, "cannot claim the provider", e))?;
            self.lock = Some(lock);
        }
        Ok(())
    }

    /// Opens the resource's provider (errors name the resource).
    async fn open_provider(&self) -> Result<Rc<LocalDisk>, NodeError> {
        LocalDisk::open(
            &self.spec.localpath,
            &self.spec.name,
            self.spec.metaflush,
            self.stats.clone(),
        )
        .await
        .map_err(|e| self.error(NodeErrorKind::Provider, "cannot open the provider", e))
    }

    async fn open_disk(&self, role: Role) -> Result<Rc<LocalDisk>, NodeError> {
        let disk = self.open_provider().await?;
        // A detach of the provider is reported as `disk-failed`.
        disk.set_events(self.events.clone());
        if let Err(e) = disk.set_prevrole(role).await {
            let err = self.error(
                NodeErrorKind::Provider,
                format!("{}: cannot write metadata", self.spec.localpath.display()),
                e,
            );
            let _ = disk.close(role).await;
            return Err(err);
        }
        Ok(disk)
    }

    /// Sets the discard flag (see [`Node::discard`]).
    async fn discard(&mut self) -> Result<(), NodeError> {
        let flag = |m: &mut crate::metadata::Metadata| m.flags |= crate::metadata::FLAG_DISCARD;
        let fail =
            |e: std::io::Error| self.error(NodeErrorKind::Provider, "cannot write metadata", e);
        match &self.active {
            Active::Primary { .. } => Err(self.error(
                NodeErrorKind::WrongRole,
                "this node is primary",
                "make it secondary first (the data that is kept is the primary's)",
            )),
            Active::Secondary { secondary } => {
                secondary.disk().update_metadata(flag).await.map_err(fail)?;
                tracing::warn!(resource = %self.spec.name,
                    "this node's changes since the split-brain will be discarded at the next connection");
                Ok(())
            }
            Active::Idle => {
                let _claim = ProviderLock::acquire(&self.spec.localpath).map_err(|e| {
                    self.error(NodeErrorKind::Provider, "cannot claim the provider", e)
                })?;
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

    /// Starts a verify (see [`Node::verify`]).
    fn verify(&self, params: VerifyParams) -> Result<(), NodeError> {
        let Active::Primary { primary, .. } = &self.active else {
            return Err(self.error(
                NodeErrorKind::WrongRole,
                "cannot verify",
                format!("this node is {}; run verify on the primary", self.role),
            ));
        };
        let Some(remote) = primary.remote() else {
            return Err(self.error(
                NodeErrorKind::WrongRole,
                "cannot verify",
                "the resource has no peer (remote none)",
            ));
        };
        remote
            .start_verify(params)
            .map_err(|e| self.error(NodeErrorKind::WrongRole, "cannot verify", e))
    }

    /// Phase 2 of a role change: a primary's export appears.
    async fn commit_role(&mut self) -> Result<(), NodeError> {
        let name = self.spec.name.clone();
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
                tracing::warn!(resource = %name,
                    "peer did not answer in time; exporting without knowing whether it holds newer data");
            }
        }
        let cfg = NbdConfig {
            export_name: self.spec.provname.clone(),
            max_inflight: self.spec.max_inflight,
            buffer_budget: self.spec.buffer_budget,
            read_only: false,
        };
        let sock = &self.spec.export_socket;
        let export_error =
            |op: String, e: std::io::Error| NodeError::new(NodeErrorKind::Export, &name, op, e);
        if let Some(dir) = sock.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                export_error(
                    format!("cannot create export directory {}", dir.display()),
                    e,
                )
            })?;
        }
        let bound = NbdExport::bind(sock, cfg, primary.clone())
            .map_err(|e| export_error(format!("cannot serve {}", sock.display()), e))?;
        *export = Some(bound.start_with_gauge(self.stats.clients_gauge()));
        tracing::info!(resource = %name, socket = %sock.display(), "export ready");
        Ok(())
    }

    /// The remote leg of a primary over `disk`; None for `remote none`.
    fn start_remote(&self, disk: &Rc<LocalDisk>) -> Option<Rc<Remote>> {
        let addrs = self.spec.remote.as_ref()?;
        Some(Remote::start(
            RemoteConfig {
                resource: self.spec.name.clone(),
                node: self.spec.node.clone(),
                remote: addrs.clone(),
                source: self.spec.source,
                timeout: self.spec.timeout,
                mode: self.spec.mode,
                max_inflight: WINDOW_REQUESTS,
                max_bytes: self.spec.window_bytes,
                sync_window: SYNC_WINDOW,
                sync_chunk: SYNC_CHUNK,
                retry: self.spec.timeout.min(RETRY_MAX),
                splitbrain_auto: self.spec.splitbrain_auto,
                compression: self.spec.compression,
                syncmode: self.spec.syncmode,
            },
            self.spec.security.clone(),
            disk.clone(),
            self.stats.clone(),
            self.events.clone(),
        ))
    }

    async fn activate_primary(&mut self) -> Result<Active, NodeError> {
        self.claim()?;
        let disk = self.open_disk(Role::Primary).await?;
        let remote = self.start_remote(&disk);
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
        // A secondary that adopted its peer's resource ID and never
        // completed a synchronisation (counters still 0) holds none of the
        // peer's data.
        let never_synced = md.resuid != 0 && md.localcnt == 0 && md.remotecnt == 0;
        if self.spec.remote.is_some() && never_synced && md.prevrole == Role::Secondary {
            return Some(
                "it is a new secondary that never completed its first synchronisation from the peer"
                    .into(),
            );
        }
        None
    }

    async fn activate_secondary(&mut self) -> Result<Active, NodeError> {
        self.claim()?;
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
            compression: self.spec.compression,
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
                )
                .await;
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

fn listen_error(e: std::io::Error) -> NodeError {
    NodeError {
        kind: NodeErrorKind::Listen,
        resource: None,
        operation: "cannot listen for the peer".into(),
        detail: e.to_string(),
    }
}
