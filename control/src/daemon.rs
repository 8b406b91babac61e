//! hastd: configuration, pidfile, daemonisation, logging, the control
//! socket, signals, and the data-path node.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use hast_datapath::events::{PeerEvent, PeerEventKind};
use hast_datapath::metadata::Role;
use hast_datapath::node::{CpuPlacement, Node, NodeOptions, ResourceSpec};
use hast_datapath::peer::remote::ReplicationMode;
use hast_datapath::stats::ResourceStats;

use crate::config::{self, Config, NodeIdentity, Replication, ResourceConfig};
use crate::events::{Broadcaster, Notifier};
use crate::exit;
use crate::hooks::{Event, EventKind, HookRunner};
use crate::proto::{
    self, LocalErrors, Queues, Request, RequestEnvelope, ResourceReport, Response, Statistics,
    CONTROL_VERSION,
};

/// Requests in flight per NBD connection.
pub const MAX_INFLIGHT: usize = 128;
/// Write payload bytes buffered per export.
pub const BUFFER_BUDGET: usize = 64 << 20;
/// Payload bytes of the replicated requests not yet written by the
/// secondary, per resource (with the request count, the replication window:
/// how far behind an async secondary can be, docs/failover.md).
pub const WINDOW_BYTES: usize = 64 << 20;

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
    if opts.check {
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
        return exit::OK;
    }
    // Hooks (and any hastctl they run) act as this node.
    if let Some(r) = cfg.resources.first() {
        // Single-threaded here: no other thread reads the environment yet.
        std::env::set_var(config::NODE_ENV, &r.node_name);
    }
    let pidpath = opts.pidfile.clone().unwrap_or_else(|| cfg.pidfile.clone());
    let mut pidfile = match Pidfile::lock(&pidpath) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("hastd: {e}");
            return exit::TEMPFAIL;
        }
    };
    let control = match bind_control(&cfg.control) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hastd: {e}");
            return exit::OSERR;
        }
    };
    if !opts.foreground {
        // Before any thread exists: fork is only safe single-threaded.
        if let Err(e) = nix::unistd::daemon(false, false) {
            eprintln!("hastd: cannot daemonize: {e}");
            return exit::OSERR;
        }
    }
    init_logging(opts.foreground, opts.debug);
    if let Err(e) = pidfile.write_pid() {
        tracing::error!(pidfile = %pidpath.display(), error = %e, "cannot write pidfile");
        return exit::OSERR;
    }
    let specs = match cfg
        .resources
        .iter()
        .map(|r| spec_of(&cfg, r))
        .collect::<Result<Vec<_>, String>>()
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            let _ = std::fs::remove_file(&cfg.control);
            return exit::CONFIG;
        }
    };
    let listen = match resolve_listen(&cfg) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            let _ = std::fs::remove_file(&cfg.control);
            return exit::CONFIG;
        }
    };
    let hooks = {
        let execs: std::collections::HashMap<String, PathBuf> = cfg
            .resources
            .iter()
            .filter_map(|r| r.exec.clone().map(|e| (r.name.clone(), e)))
            .collect();
        HookRunner::start(move |res: &str| execs.get(res).cloned())
    };
    // `hastctl events` subscribers get every event the hooks get.
    let events = Broadcaster::new();
    let (ev_tx, ev_rx) = flume::bounded::<PeerEvent>(4096);
    {
        let submit = Notifier::new(hooks.submitter(), events.clone());
        std::thread::Builder::new()
            .name("hast-events".into())
            .spawn(move || {
                for ev in ev_rx.iter() {
                    submit.submit(Event::new(ev.resource, event_kind(ev.kind)));
                }
            })
            .expect("spawn event thread");
    }
    let threads = opts.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let placement = opts
        .cpus
        .clone()
        .map(CpuPlacement::Pinned)
        .unwrap_or_default();
    let node_opts = NodeOptions {
        shards: threads,
        placement,
        listen,
        events: Some(ev_tx),
    };
    let node = match Node::start(specs, node_opts) {
        Ok(n) => Arc::new(n),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the data path");
            let _ = std::fs::remove_file(&cfg.control);
            return exit::OSERR;
        }
    };
    let cfg = Arc::new(cfg);
    events.start_progress_sampler(
        cfg.resources
            .iter()
            .filter_map(|r| Some((r.name.clone(), node.stats(&r.name)?)))
            .collect(),
    );
    tracing::info!(
        config = %opts.config.display(),
        control = %cfg.control.display(),
        resources = cfg.resources.len(),
        pid = std::process::id(),
        "hastd started"
    );
    {
        let (cfg, node) = (cfg.clone(), node.clone());
        let submit = Notifier::new(hooks.submitter(), events.clone());
        std::thread::Builder::new()
            .name("hast-control".into())
            .spawn(move || control_loop(control, cfg, node, submit))
            .expect("spawn control thread");
    }
    wait_for_termination();
    tracing::info!("shutting down: draining exports and storing activemaps");
    node.shutdown();
    hooks.shutdown(std::time::Duration::from_secs(5));
    let _ = std::fs::remove_file(&cfg.control);
    drop(pidfile);
    let _ = std::fs::remove_file(&pidpath);
    tracing::info!("hastd stopped");
    exit::OK
}

fn event_kind(k: PeerEventKind) -> EventKind {
    match k {
        PeerEventKind::Connect => EventKind::Connect,
        PeerEventKind::Disconnect => EventKind::Disconnect,
        PeerEventKind::SyncStart => EventKind::Syncstart,
        PeerEventKind::SyncDone => EventKind::Syncdone,
        PeerEventKind::SyncIntr => EventKind::Syncintr,
        PeerEventKind::SplitBrain => EventKind::SplitBrain,
    }
}

fn spec_of(cfg: &Config, r: &ResourceConfig) -> Result<ResourceSpec, String> {
    let remote = match &r.remote {
        None => None,
        Some(a) => Some(
            a.resolve()
                .map_err(|e| format!("[{}] cannot resolve remote address {a}: {e}", r.name))?,
        ),
    };
    let source = match &r.source {
        None => None,
        Some(a) => Some(
            a.resolve()
                .map_err(|e| format!("[{}] cannot resolve source address {a}: {e}", r.name))?
                .into_iter()
                .next()
                .ok_or_else(|| format!("[{}] source address {a} resolves to nothing", r.name))?,
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
    })
}

fn resolve_listen(cfg: &Config) -> Result<Vec<std::net::SocketAddr>, String> {
    let mut out = Vec::new();
    for a in &cfg.listen {
        let addrs = a
            .resolve()
            .map_err(|e| format!("cannot resolve listen address {a}: {e}"))?;
        out.extend(addrs);
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

/// Blocks until SIGTERM or SIGINT; logs SIGHUP.
fn wait_for_termination() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return;
        }
    };
    for sig in signals.forever() {
        match sig {
            SIGHUP => tracing::warn!(
                "SIGHUP: configuration reload is not supported yet; restart hastd to apply changes"
            ),
            _ => {
                tracing::info!(signal = sig, "termination requested");
                return;
            }
        }
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
    fn lock(path: &Path) -> Result<Pidfile, String> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| format!("cannot open pidfile {}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            return Err(format!(
                "another hastd is running (pid {}, pidfile {})",
                pid.trim(),
                path.display()
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

/// Binds the control socket, refusing to steal one a live hastd answers on.
fn bind_control(path: &Path) -> Result<UnixListener, String> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "control socket {} is in use by another hastd",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale control socket {}: {e}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let l = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on control socket {}: {e}", path.display()))?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(l)
}

fn control_loop(listener: UnixListener, cfg: Arc<Config>, node: Arc<Node>, hooks: Notifier) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                if let Err(e) = handle_control(&stream, &cfg, &node, &hooks) {
                    tracing::warn!(error = %e, "control connection failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
        }
    }
}

fn handle_control(
    stream: &UnixStream,
    cfg: &Config,
    node: &Node,
    hooks: &Notifier,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let line = proto::read_line(stream)?;
    let mut subscribe = false;
    let response = match serde_json::from_str::<RequestEnvelope>(&line) {
        Ok(env) => {
            subscribe = matches!(env.request, Request::Events { .. });
            dispatch(env.request, cfg, node, hooks)
        }
        Err(e) => Response {
            version: CONTROL_VERSION,
            error: Some(format!("malformed request: {e}")),
            resources: vec![],
        },
    };
    if subscribe && response.error.is_none() {
        // Streams on a thread of its own: this thread serves the next
        // connection at once.
        return hooks.events().subscribe(stream, response);
    }
    let mut out = serde_json::to_string(&response).map_err(std::io::Error::other)?;
    out.push('\n');
    let mut w = stream;
    w.write_all(out.as_bytes())
}

fn dispatch(req: Request, cfg: &Config, node: &Node, hooks: &Notifier) -> Response {
    let names = match &req {
        Request::Status { resources }
        | Request::Role { resources, .. }
        | Request::Events { resources }
        | Request::SplitBrain { resources, .. } => resources.clone(),
    };
    let selected = match cfg.select(&names) {
        Ok(s) => s,
        Err(e) => {
            return Response {
                version: CONTROL_VERSION,
                error: Some(e.to_string()),
                resources: vec![],
            }
        }
    };
    let mut resources = Vec::new();
    match req {
        // For events: the snapshot sent before the stream.
        Request::Status { .. } | Request::Events { .. } => {
            for r in selected {
                resources.push(report(cfg, r, node));
            }
        }
        Request::SplitBrain { action, .. } => {
            if action != "discard" {
                return Response {
                    version: CONTROL_VERSION,
                    error: Some(format!(
                        "unknown split-brain action '{action}' (expected 'discard')"
                    )),
                    resources: vec![],
                };
            }
            let names: Vec<String> = selected.iter().map(|r| r.name.clone()).collect();
            tracing::warn!(resources = ?names, "split-brain: discarding this node's changes");
            let results = node.discard(&names);
            for (r, (_, res)) in selected.into_iter().zip(results) {
                let mut rep = report(cfg, r, node);
                rep.error = res.err();
                resources.push(rep);
            }
        }
        Request::Role { role, force, .. } => {
            let names: Vec<String> = selected.iter().map(|r| r.name.clone()).collect();
            tracing::info!(resources = ?names, role = %role, "role change requested");
            let results = node.set_roles(&names, role, force);
            for (r, (_, res)) in selected.into_iter().zip(results) {
                let mut rep = report(cfg, r, node);
                match res {
                    Ok(old) => {
                        rep.previous_role = Some(old.to_string());
                        if old != role {
                            hooks.submit(Event::new(
                                r.name.clone(),
                                EventKind::Role {
                                    old: old.to_string(),
                                    new: role.to_string(),
                                },
                            ));
                        }
                    }
                    Err(e) => {
                        tracing::error!(resource = %r.name, error = %e, "role change failed");
                        rep.error = Some(e);
                    }
                }
                resources.push(rep);
            }
        }
    }
    Response {
        version: CONTROL_VERSION,
        error: None,
        resources,
    }
}

fn report(cfg: &Config, r: &ResourceConfig, node: &Node) -> ResourceReport {
    let stats = node
        .stats(&r.name)
        .unwrap_or_else(|| Arc::new(ResourceStats::default()));
    let g = ResourceStats::get;
    let role = stats.role();
    let active = role != Role::Init;
    let local = stats.local_queue.get();
    ResourceReport {
        name: r.name.clone(),
        role: role.to_string(),
        provname: r.provname.clone(),
        localpath: r.localpath.display().to_string(),
        extentsize: g(&stats.extentsize),
        keepdirty: g(&stats.keepdirty),
        remoteaddr: r
            .remote
            .as_ref()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "none".into()),
        sourceaddr: r.source.as_ref().map(|a| a.to_string()),
        replication: r.replication.to_string(),
        // `complete`: the replication connection is up. Not "in sync":
        // that is `dirty: 0`.
        status: active.then(|| {
            if stats.connected.load(Relaxed) {
                "complete".to_string()
            } else {
                "degraded".to_string()
            }
        }),
        workerpid: if active { std::process::id() } else { 0 },
        dirty: g(&stats.dirty_bytes),
        ondisk_extents: g(&stats.ondisk_extents),
        datasize: if active { g(&stats.datasize) } else { 0 },
        export: (role == Role::Primary).then(|| export_socket(cfg, r).display().to_string()),
        clients: stats.clients.load(Relaxed),
        statistics: Statistics {
            reads: g(&stats.reads),
            writes: g(&stats.writes),
            deletes: g(&stats.deletes),
            flushes: g(&stats.flushes),
            activemap_updates: g(&stats.activemap_updates),
        },
        local_errors: LocalErrors {
            read: g(&stats.read_errors),
            write: g(&stats.write_errors),
            delete: g(&stats.delete_errors),
            flush: g(&stats.flush_errors),
        },
        sync: sync_report(&stats),
        synced_bytes: g(&stats.sync_bytes_total),
        connected: stats.connected.load(Relaxed),
        window_waits: g(&stats.window_waits),
        split_brain: stats.split_brain.load(Relaxed),
        last_error: stats
            .last_error
            .lock()
            .map(|e| e.clone())
            .ok()
            .filter(|e| !e.is_empty()),
        queues: Queues {
            local,
            send: 0,
            recv: stats.remote_inflight.get(),
            done: 0,
            idle: if active {
                (MAX_INFLIGHT as u64).saturating_sub(local)
            } else {
                0
            },
        },
        error: None,
        previous_role: None,
    }
}

fn sync_report(stats: &ResourceStats) -> Option<crate::proto::SyncReport> {
    let dir = stats.sync_state()?;
    let total = stats.sync_total.load(Relaxed);
    let done = stats.sync_done.load(Relaxed).min(total.max(1));
    let started = stats.sync_started_ms.load(Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let secs = (now.saturating_sub(started) as f64 / 1000.0).max(0.001);
    let rate = (done as f64 / secs) as u64;
    let eta = if rate > 0 {
        Some(total.saturating_sub(done) / rate.max(1))
    } else {
        None
    };
    Some(crate::proto::SyncReport {
        direction: dir.name().into(),
        done,
        total,
        rate,
        eta_seconds: eta,
    })
}
