//! hastd: configuration, pidfile, daemonisation, logging, signals, the
//! data-path node, the control socket and the metrics endpoint, and the
//! configuration reload (SIGHUP or `hastctl reload`).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use hast_datapath::metadata::Role;
use hast_datapath::node::{Applied, CpuPlacement, Node, NodeError, NodeOptions, ResourceSpec};
use hast_datapath::peer::compress::Compression as WireCompression;
use hast_datapath::peer::remote::ReplicationMode;
use hast_datapath::peer::sync::SyncMode as DataSyncMode;

use crate::config::{
    self, Compression, Config, NodeIdentity, PeerAddr, Replication, ResourceConfig, SyncMode,
};
use crate::control::{self, ControlServer};
use crate::events::{Broadcaster, Notifier};
use crate::exit;
use crate::hooks::{Event, EventKind, HookRunner};
use crate::metrics::{self, MetricsServer};
use crate::proto::{ErrorKind, ReloadReport, ResourceOutcome, Response, CONTROL_VERSION};
use crate::reload::{self, Plan};

/// Requests in flight per NBD connection.
pub const MAX_INFLIGHT: usize = 128;
/// Write payload bytes buffered per export.
pub const BUFFER_BUDGET: usize = 32 << 20;
/// Payload bytes of the replicated requests not yet written by the
/// secondary, per resource (with the request count, the replication window:
/// how far behind an async secondary can be, docs/failover.md).
pub const WINDOW_BYTES: usize = 32 << 20;
/// Events from the data path queued for the hooks and the event stream.
const EVENT_QUEUE: usize = 4096;
/// How long hooks still running at shutdown are waited for.
const HOOK_GRACE: Duration = Duration::from_secs(5);

/// Command-line options of hastd.
#[derive(Debug, Clone)]
pub struct Options {
    /// Configuration file.
    pub config: PathBuf,
    /// Stay in the foreground, log to stderr.
    pub foreground: bool,
    /// Debug level (number of -d).
    pub debug: u8,
    /// Pidfile overriding the configuration.
    pub pidfile: Option<PathBuf>,
    /// Node name overriding the host's identity.
    pub node: Option<String>,
    /// Only check the configuration.
    pub check: bool,
    /// CPUs to pin the executors to.
    pub cpus: Option<Vec<usize>>,
    /// Number of executors (default: one per CPU).
    pub threads: Option<usize>,
}

/// What kind of failure: decides hastd's exit code and a reload reply's
/// kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonErrorKind {
    /// The configuration is unreadable, invalid or names what does not
    /// resolve.
    Config,
    /// Another hastd holds the pidfile.
    Running,
    /// A system call failed (bind, fork, pidfile).
    Os,
    /// The data path failed.
    DataPath,
}

/// An error of hastd: its kind, what was being done, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{context}: {detail}")]
pub struct DaemonError {
    /// Kind.
    pub kind: DaemonErrorKind,
    /// What was being done (names the file, address or resource).
    pub context: String,
    /// Why it failed.
    pub detail: String,
}

impl DaemonError {
    fn new(
        kind: DaemonErrorKind,
        context: impl Into<String>,
        detail: impl std::fmt::Display,
    ) -> Self {
        DaemonError {
            kind,
            context: context.into(),
            detail: detail.to_string(),
        }
    }

    /// A configuration error.
    pub fn config(context: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self::new(DaemonErrorKind::Config, context, detail)
    }

    /// A failed system call.
    pub fn os(context: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self::new(DaemonErrorKind::Os, context, detail)
    }

    /// hastd's exit code for it (sysexits).
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            DaemonErrorKind::Config => exit::CONFIG,
            DaemonErrorKind::Running => exit::TEMPFAIL,
            DaemonErrorKind::Os | DaemonErrorKind::DataPath => exit::OSERR,
        }
    }

    /// The kind a control reply carries for it.
    pub fn reply_kind(&self) -> ErrorKind {
        match self.kind {
            DaemonErrorKind::Config => ErrorKind::Config,
            _ => ErrorKind::Failed,
        }
    }
}

impl From<NodeError> for DaemonError {
    fn from(e: NodeError) -> Self {
        DaemonError::new(DaemonErrorKind::DataPath, "data path", e)
    }
}

/// Runs hastd; returns the process exit code.
pub fn run(opts: Options) -> i32 {
    let ident = NodeIdentity::resolve(opts.node.as_deref());
    let cfg = match config::load(&opts.config, &ident) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hastd: {e}");
            return exit::CONFIG;
        }
    };
    // Secrets and certificates are checked before anything starts (and
    // by `hastd -t`).
    for r in &cfg.resources {
        if let Err(e) = crate::security::load(&cfg, r) {
            eprintln!("hastd: {e}");
            return exit::CONFIG;
        }
    }
    if opts.check {
        print_check(&opts, &cfg);
        return exit::OK;
    }
    // Hooks (and any hastctl they run) act as this node. Single-threaded
    // here: no other thread reads the environment yet.
    if let Some(r) = cfg.resources.first() {
        std::env::set_var(config::NODE_ENV, &r.node_name);
    }
    let pidpath = opts.pidfile.clone().unwrap_or_else(|| cfg.pidfile.clone());
    let (pidfile, control) = match lock_and_bind(&pidpath, &cfg, opts.foreground) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("hastd: {e}");
            return e.exit_code();
        }
    };
    init_logging(opts.foreground, opts.debug);
    let daemon = match pidfile_written(pidfile, &pidpath)
        .and_then(|pidfile| Daemon::start(&opts, ident, cfg, control).map(|d| (d, pidfile)))
    {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("{e}");
            return e.exit_code();
        }
    };
    let (daemon, pidfile) = daemon;
    wait_for_signals(&daemon);
    daemon.shutdown();
    drop(pidfile);
    let _ = std::fs::remove_file(&pidpath);
    tracing::info!("hastd stopped");
    exit::OK
}

/// `hastd -t`: the summary of a valid configuration.
fn print_check(opts: &Options, cfg: &Config) {
    let names: Vec<&str> = cfg.resources.iter().map(|r| r.name.as_str()).collect();
    println!(
        "hastd: {}: configuration OK for node {}: {} resource(s): {}",
        opts.config.display(),
        cfg.resources
            .first()
            .map(|r| r.node_name.as_str())
            .unwrap_or("(this host)"),
        names.len(),
        names.join(", ")
    );
}

/// Locks the pidfile, binds the control socket and daemonises (before any
/// thread exists: fork is only safe single-threaded).
fn lock_and_bind(
    pidpath: &Path,
    cfg: &Config,
    foreground: bool,
) -> Result<(Pidfile, UnixListener), DaemonError> {
    let pidfile = Pidfile::lock(pidpath)?;
    let control = control::bind(&cfg.control)?;
    if !foreground {
        if let Err(e) = nix::unistd::daemon(false, false) {
            let _ = std::fs::remove_file(&cfg.control);
            return Err(DaemonError::os("cannot daemonize", e));
        }
    }
    Ok((pidfile, control))
}

fn pidfile_written(mut pidfile: Pidfile, path: &Path) -> Result<Pidfile, DaemonError> {
    pidfile
        .write_pid()
        .map_err(|e| DaemonError::os(format!("cannot write pidfile {}", path.display()), e))?;
    Ok(pidfile)
}

/// Runs hastd's parts and the control socket.
pub struct Daemon {
    /// Itself, for the control servers a reload starts.
    me: std::sync::Weak<Daemon>,
    config_path: PathBuf,
    ident: NodeIdentity,
    cfg: RwLock<Arc<Config>>,
    node: Arc<Node>,
    notifier: Notifier,
    hooks: Mutex<Option<HookRunner>>,
    /// The `exec` of each resource, as the hook runner looks it up.
    execs: Arc<RwLock<HashMap<String, PathBuf>>>,
    /// One change (role, split-brain, reload) at a time.
    admin: Mutex<()>,
    control: Mutex<Option<ControlServer>>,
    metrics: Mutex<Option<MetricsServer>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    /// Starts the hooks, the event stream, the data path, the metrics
    /// endpoint and the control socket (already bound).
    fn start(
        opts: &Options,
        ident: NodeIdentity,
        cfg: Config,
        control: UnixListener,
    ) -> Result<Arc<Daemon>, DaemonError> {
        let control_path = cfg.control.clone();
        let cleanup = |e: DaemonError| {
            let _ = std::fs::remove_file(&control_path);
            e
        };
        let mut specs = specs_of(&cfg).map_err(cleanup)?;
        let specs: Vec<ResourceSpec> = cfg
            .resources
            .iter()
            .filter_map(|r| specs.remove(&r.name))
            .collect();
        let listen = resolve_listen(&cfg).map_err(cleanup)?;
        let execs = Arc::new(RwLock::new(execs_of(&cfg)));
        let hooks = {
            let execs = execs.clone();
            HookRunner::start(move |res: &str| execs.read().ok()?.get(res).cloned())
        };
        // `hastctl events` subscribers get every event the hooks get.
        let notifier = Notifier::new(hooks.submitter(), Broadcaster::new());
        let node = Node::start(specs, node_options(opts, listen, &notifier))
            .map_err(|e| cleanup(DaemonError::from(e)))?;
        let daemon = Arc::new_cyclic(|me| Daemon {
            me: me.clone(),
            config_path: opts.config.clone(),
            ident,
            cfg: RwLock::new(Arc::new(cfg)),
            node: Arc::new(node),
            notifier,
            hooks: Mutex::new(Some(hooks)),
            execs,
            admin: Mutex::new(()),
            control: Mutex::new(None),
            metrics: Mutex::new(None),
        });
        let cfg = daemon.config();
        let metrics = match &cfg.metrics {
            Some(addr) => Some(daemon.serve_metrics(addr).map_err(|e| {
                daemon.shutdown();
                cleanup(e)
            })?),
            None => None,
        };
        *lock(&daemon.metrics) = metrics;
        daemon.start_progress_events();
        *lock(&daemon.control) = Some(ControlServer::start(control, &cfg.control, daemon.clone()));
        tracing::info!(
            config = %daemon.config_path.display(),
            control = %cfg.control.display(),
            resources = cfg.resources.len(),
            pid = std::process::id(),
            "hastd started"
        );
        Ok(daemon)
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.cfg.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The data path.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Where events go (hooks and the event stream).
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// Held while changing something: one change at a time.
    pub fn admin(&self) -> MutexGuard<'_, ()> {
        lock(&self.admin)
    }

    fn start_progress_events(&self) {
        let node = Arc::downgrade(&self.node);
        self.notifier.events().start_progress_sampler(move || {
            let Some(node) = node.upgrade() else {
                return Vec::new();
            };
            node.names()
                .into_iter()
                .filter_map(|n| Some((n.clone(), node.stats(&n)?)))
                .collect()
        });
    }

    /// The metrics endpoint on `addr`.
    fn serve_metrics(&self, addr: &PeerAddr) -> Result<MetricsServer, DaemonError> {
        let addrs = resolve(addr, "metrics")?;
        let sockets = MetricsServer::bind(&addrs).map_err(|e| DaemonError::os("metrics", e))?;
        MetricsServer::start(sockets, self.metrics_source())
            .map_err(|e| DaemonError::os("metrics", e))
    }

    fn metrics_source(&self) -> metrics::Source {
        let node = Arc::downgrade(&self.node);
        Arc::new(move || {
            let Some(node) = node.upgrade() else {
                return Vec::new();
            };
            let mut names = node.names();
            names.sort();
            names
                .into_iter()
                .filter_map(|name| {
                    let stats = node.stats(&name)?;
                    Some(metrics::Sample { name, stats })
                })
                .collect()
        })
    }

    /// Stops everything: the control socket, the metrics endpoint, the
    /// data path (exports drained, activemaps stored), the hooks.
    pub fn shutdown(&self) {
        tracing::info!("shutting down: draining exports and storing activemaps");
        if let Some(c) = lock(&self.control).take() {
            c.stop();
        }
        if let Some(m) = lock(&self.metrics).take() {
            m.stop();
        }
        self.node.shutdown();
        if let Some(h) = lock(&self.hooks).take() {
            h.shutdown(HOOK_GRACE);
        }
    }

    /// `reload` on the control socket.
    pub fn reload_response(&self) -> Response {
        match self.reload() {
            Ok(report) => Response {
                version: CONTROL_VERSION,
                reload: Some(report),
                ..Default::default()
            },
            Err(e) => Response::failure(e.reply_kind(), e.to_string()),
        }
    }

    /// Reads hast.conf again and applies the differences
    /// (docs/hast.conf.md, "Reloading"). A file that does not parse, or
    /// addresses that cannot be bound, change nothing.
    pub fn reload(&self) -> Result<ReloadReport, DaemonError> {
        let _one = self.admin();
        let old = self.config();
        let path = &self.config_path;
        tracing::info!(config = %path.display(), "reloading the configuration");
        let new = config::load(path, &self.ident).map_err(|e| {
            let e = DaemonError::config("reload refused, nothing changed", e);
            tracing::error!("{e}");
            e
        })?;
        let plan = reload::plan(&old, &new);
        let specs = specs_of(&new)?;
        self.rebind(&plan, &old, &new)?;
        *self.execs.write().unwrap_or_else(|e| e.into_inner()) = execs_of(&new);
        let resources = self.apply_resources(&plan, specs);
        for s in &plan.settings {
            if s.applied {
                tracing::info!(setting = %s.setting, old = %s.old, new = %s.new, "changed");
            } else {
                tracing::warn!(setting = %s.setting, old = %s.old, new = %s.new,
                    "changed in the file; takes effect when hastd restarts");
            }
        }
        let report = ReloadReport {
            config: path.display().to_string(),
            settings: plan.settings.clone(),
            resources,
        };
        *self.cfg.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        tracing::info!(
            removed = plan.removed.len(),
            added = plan.added.len(),
            changed = plan.changed.len(),
            "configuration reloaded"
        );
        Ok(report)
    }

    /// Moves the control socket, the peer listener and the metrics
    /// endpoint to their new addresses: all of them, or none.
    fn rebind(&self, plan: &Plan, old: &Config, new: &Config) -> Result<(), DaemonError> {
        let new_control = match plan.setting("control") {
            Some(_) => Some(control::bind(&new.control)?),
            None => None,
        };
        let undo_control = |e: DaemonError| {
            if new_control.is_some() {
                let _ = std::fs::remove_file(&new.control);
            }
            tracing::error!("reload refused, nothing changed: {e}");
            e
        };
        let listen = resolve_listen(new).map_err(undo_control)?;
        let old_listen = resolve_listen(old).map_err(undo_control)?;
        self.node
            .set_listen(listen)
            .map_err(|e| undo_control(DaemonError::from(e)))?;
        if plan.setting("metrics").is_some() {
            if let Err(e) = self.move_metrics(old, new) {
                let _ = self.node.set_listen(old_listen);
                return Err(undo_control(e));
            }
        }
        if let Some(listener) = new_control {
            if let Some(me) = self.me.upgrade() {
                let server = ControlServer::start(listener, &new.control, me);
                if let Some(old) = lock(&self.control).replace(server) {
                    old.stop();
                }
            }
        }
        Ok(())
    }

    /// The metrics endpoint moves (or starts, or stops); on failure the old
    /// one is served again.
    fn move_metrics(&self, old: &Config, new: &Config) -> Result<(), DaemonError> {
        let mut slot = lock(&self.metrics);
        if let Some(m) = slot.take() {
            m.stop();
        }
        let Some(addr) = &new.metrics else {
            return Ok(());
        };
        match self.serve_metrics(addr) {
            Ok(m) => {
                *slot = Some(m);
                Ok(())
            }
            Err(e) => {
                *slot = old
                    .metrics
                    .as_ref()
                    .and_then(|a| self.serve_metrics(a).ok());
                Err(e)
            }
        }
    }

    /// Removes, adds and reconfigures resources as planned.
    fn apply_resources(
        &self,
        plan: &Plan,
        mut specs: HashMap<String, ResourceSpec>,
    ) -> Vec<ResourceOutcome> {
        let mut out = Vec::new();
        for name in &plan.removed {
            out.push(self.remove_resource(name));
        }
        for name in &plan.added {
            let Some(spec) = specs.remove(name) else {
                continue;
            };
            let error = self.node.add(spec).err().map(|e| e.to_string());
            tracing::info!(resource = %name, "added in role init");
            out.push(outcome(name, "added", Role::Init, Vec::new(), error));
        }
        for diff in &plan.changed {
            let Some(spec) = specs.remove(&diff.name) else {
                continue;
            };
            let fields: Vec<String> = diff.fields.iter().map(|f| f.to_string()).collect();
            let role = self
                .node
                .stats(&diff.name)
                .map(|s| s.role())
                .unwrap_or(Role::Init);
            let o = match self.node.reconfigure(spec, diff.change) {
                Ok(Applied::Stored) => outcome(&diff.name, "stored", role, fields, None),
                Ok(Applied::Restarted(r)) => outcome(&diff.name, "restarted", r, fields, None),
                Ok(Applied::Live) => outcome(&diff.name, "live", role, fields, None),
                Err(e) => {
                    tracing::error!(resource = %diff.name, error = %e, "reload: change not applied");
                    let now = self
                        .node
                        .stats(&diff.name)
                        .map(|s| s.role())
                        .unwrap_or(Role::Init);
                    outcome(&diff.name, "failed", now, fields, Some(e.to_string()))
                }
            };
            out.push(o);
        }
        for name in &plan.unchanged {
            let role = self
                .node
                .stats(name)
                .map(|s| s.role())
                .unwrap_or(Role::Init);
            out.push(outcome(name, "unchanged", role, Vec::new(), None));
        }
        out
    }

    fn remove_resource(&self, name: &str) -> ResourceOutcome {
        let role = self
            .node
            .stats(name)
            .map(|s| s.role())
            .unwrap_or(Role::Init);
        let error = self.node.remove(name).err().map(|e| e.to_string());
        if error.is_none() && role != Role::Init {
            self.notifier.submit(Event::new(
                name,
                EventKind::Role {
                    old: role.to_string(),
                    new: Role::Init.to_string(),
                },
            ));
        }
        tracing::info!(resource = %name, role = %role, "removed from the configuration");
        outcome(name, "removed", role, Vec::new(), error)
    }
}

fn outcome(
    name: &str,
    action: &str,
    role: Role,
    changed: Vec<String>,
    error: Option<String>,
) -> ResourceOutcome {
    ResourceOutcome {
        name: name.to_owned(),
        action: action.to_owned(),
        role: role.to_string(),
        changed,
        error,
    }
}

fn execs_of(cfg: &Config) -> HashMap<String, PathBuf> {
    cfg.resources
        .iter()
        .filter_map(|r| r.exec.clone().map(|e| (r.name.clone(), e)))
        .collect()
}

fn node_options(
    opts: &Options,
    listen: Vec<std::net::SocketAddr>,
    notifier: &Notifier,
) -> NodeOptions {
    let (ev_tx, ev_rx) = flume::bounded::<Event>(EVENT_QUEUE);
    let submit = notifier.clone();
    let spawned = std::thread::Builder::new()
        .name("hast-events".into())
        .spawn(move || {
            for ev in ev_rx.iter() {
                submit.submit(ev);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the event thread; no hooks or events");
    }
    let threads = opts.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    NodeOptions {
        shards: threads,
        placement: opts
            .cpus
            .clone()
            .map(CpuPlacement::Pinned)
            .unwrap_or_default(),
        listen,
        events: Some(ev_tx),
    }
}

/// The data-path specification of every resource, by name.
fn specs_of(cfg: &Config) -> Result<HashMap<String, ResourceSpec>, DaemonError> {
    cfg.resources
        .iter()
        .map(|r| Ok((r.name.clone(), spec_of(cfg, r)?)))
        .collect()
}

fn resolve(a: &PeerAddr, what: &str) -> Result<Vec<std::net::SocketAddr>, DaemonError> {
    a.resolve()
        .map_err(|e| DaemonError::config(format!("cannot resolve {what} address {a}"), e))
}

fn spec_of(cfg: &Config, r: &ResourceConfig) -> Result<ResourceSpec, DaemonError> {
    let in_res = |e: DaemonError| DaemonError {
        context: format!("[{}] {}", r.name, e.context),
        ..e
    };
    let remote = match &r.remote {
        None => None,
        Some(a) => Some(resolve(a, "remote").map_err(in_res)?),
    };
    let source = match &r.source {
        None => None,
        Some(a) => Some(
            resolve(a, "source")
                .map_err(in_res)?
                .into_iter()
                .next()
                .ok_or_else(|| {
                    DaemonError::config(
                        format!("[{}] source address {a}", r.name),
                        "resolves to nothing",
                    )
                })?,
        ),
    };
    Ok(ResourceSpec {
        name: r.name.clone(),
        provname: r.provname.clone(),
        localpath: r.localpath.clone(),
        metaflush: r.metaflush,
        export_socket: export_socket(cfg, r),
        max_inflight: MAX_INFLIGHT,
        buffer_budget: BUFFER_BUDGET,
        node: r.node_name.clone(),
        remote,
        source,
        mode: match r.replication {
            Replication::FullSync => ReplicationMode::FullSync,
            Replication::MemSync => ReplicationMode::MemSync,
            Replication::Async => ReplicationMode::Async,
        },
        timeout: r.timeout,
        window_bytes: WINDOW_BYTES,
        splitbrain_auto: r.splitbrain == crate::config::SplitBrainPolicy::Auto,
        security: crate::security::load(cfg, r)
            .map_err(|e| DaemonError::config(format!("[{}] secret or TLS files", r.name), e))?,
        compression: match r.compression {
            Compression::None => WireCompression::None,
            Compression::Hole => WireCompression::Hole,
            Compression::Lzf => WireCompression::Lzf,
            Compression::Lz4 => WireCompression::Lz4,
        },
        syncmode: match r.syncmode {
            SyncMode::Auto => DataSyncMode::Auto,
            SyncMode::Full => DataSyncMode::Full,
            SyncMode::Checksum => DataSyncMode::Checksum,
        },
    })
}

fn resolve_listen(cfg: &Config) -> Result<Vec<std::net::SocketAddr>, DaemonError> {
    let mut out = Vec::new();
    for a in &cfg.listen {
        out.extend(resolve(a, "listen")?);
    }
    // The built-in defaults include IPv6; skip it where the host has none.
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        out.retain(|a| a.is_ipv4());
    }
    Ok(out)
}

/// Where the primary serves resource `r`.
pub fn export_socket(cfg: &Config, r: &ResourceConfig) -> PathBuf {
    cfg.exportdir.join(format!("{}.sock", r.provname))
}

/// Blocks until SIGTERM or SIGINT; SIGHUP reloads the configuration.
fn wait_for_signals(daemon: &Daemon) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return;
        }
    };
    for sig in signals.forever() {
        if sig == SIGHUP {
            tracing::info!("SIGHUP: reloading the configuration");
            // Errors are logged by reload itself.
            let _ = daemon.reload();
            continue;
        }
        tracing::info!(signal = sig, "termination requested");
        return;
    }
}

fn init_logging(foreground: bool, debug: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match debug {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("HAST_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if foreground {
        let _ = builder.with_writer(std::io::stderr).try_init();
    } else {
        let _ = builder
            .with_ansi(false)
            .without_time()
            .with_writer(crate::syslog::SyslogWriter::new("hastd"))
            .try_init();
    }
}

/// An exclusively locked pidfile.
struct Pidfile {
    file: File,
}

impl Pidfile {
    fn lock(path: &Path) -> Result<Pidfile, DaemonError> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| DaemonError::os(format!("cannot open pidfile {}", path.display()), e))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            return Err(DaemonError::new(
                DaemonErrorKind::Running,
                format!("pidfile {}", path.display()),
                format!("another hastd is running (pid {})", pid.trim()),
            ));
        }
        Ok(Pidfile { file })
    }

    fn write_pid(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        writeln!(self.file, "{}", std::process::id())?;
        self.file.sync_all()
    }
}
