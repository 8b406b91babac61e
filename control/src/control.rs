//! The control socket server: accepts hastctl connections, serves each on
//! a thread of its own (so one stuck client delays nobody), bounds how
//! long a client may take to send its request, answers anything it cannot
//! read with a JSON error, and dispatches requests to the [`Daemon`].
//!
//! Status requests run concurrently; requests that change something (role,
//! split-brain, reload) are serialised by the daemon.

use std::io::{ErrorKind as IoKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hast_datapath::metadata::Role;
use hast_datapath::node::{NodeError, NodeErrorKind};
use hast_datapath::stats::ResourceStats;

use crate::config::{Config, ResourceConfig};
use crate::daemon::{export_socket, Daemon, DaemonError, MAX_INFLIGHT};
use crate::hooks::{Event, EventKind};
use crate::proto::{
    ErrorKind, LocalErrors, Queues, Request, RequestEnvelope, ResourceReport, Response, Statistics,
    SyncReport, VerifyState, VerifySummary, CONTROL_VERSION, MAX_LINE,
};
use hast_datapath::digest::Algo;
use hast_datapath::peer::verify::VerifyParams;

/// How long a client may take to send its request line.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// How long writing the reply may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once, at most; more get a `busy` error.
pub const MAX_CLIENTS: usize = 64;

/// A listening control socket and its accept thread.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Binds the control socket, refusing to steal one a live hastd answers on.
pub fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    let err =
        |what: &str, e: std::io::Error| DaemonError::os(format!("{what} {}", path.display()), e);
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(DaemonError::os(
                format!("control socket {}", path.display()),
                "in use by another hastd",
            ));
        }
        std::fs::remove_file(path).map_err(|e| err("cannot remove stale control socket", e))?;
    }
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let l = UnixListener::bind(path).map_err(|e| err("cannot listen on control socket", e))?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(l)
}

impl ControlServer {
    /// Serves `listener` (bound at `path`) for `daemon`.
    pub fn start(listener: UnixListener, path: &Path, daemon: Arc<Daemon>) -> ControlServer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("hast-control".into())
            .spawn(move || accept_loop(&listener, &flag, &daemon))
            .map_err(|e| tracing::error!(error = %e, "cannot start the control thread"))
            .ok();
        ControlServer {
            path: path.to_owned(),
            stop,
            thread,
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting and removes the socket file. Requests being served
    /// finish on their threads.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocked accept(2).
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &UnixListener, stop: &AtomicBool, daemon: &Arc<Daemon>) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(
                max = MAX_CLIENTS,
                "too many control connections; refusing one"
            );
            let busy = Response::failure(
                ErrorKind::Busy,
                format!("hastd is serving {MAX_CLIENTS} control connections; try again"),
            );
            let _ = write_reply(&stream, &busy);
            continue;
        }
        let (daemon, active) = (daemon.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("hast-ctl-conn".into())
            .spawn(move || {
                if let Err(e) = serve(&stream, &daemon) {
                    tracing::debug!(error = %e, "control connection failed");
                }
                active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a control connection thread");
        }
    }
}

/// One connection: one request, one reply (or a stream of events).
fn serve(stream: &UnixStream, daemon: &Daemon) -> std::io::Result<()> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let env = read_request(stream, deadline).and_then(|line| {
        serde_json::from_str::<RequestEnvelope>(&line)
            .map_err(|e| format!("malformed request: {e}"))
    });
    let env = match env {
        Ok(env) => env,
        Err(why) => {
            tracing::warn!(error = %why, "bad control request");
            return write_reply(stream, &Response::failure(ErrorKind::BadRequest, why));
        }
    };
    let subscribe = matches!(env.request, Request::Events { .. });
    let response = dispatch(env.request, daemon);
    if subscribe && response.error.is_none() {
        // Streams on a thread of its own.
        return daemon.notifier().events().subscribe(stream, response);
    }
    write_reply(stream, &response)
}

/// Reads one request line before `deadline`; the error is what the client
/// is told.
fn read_request(stream: &UnixStream, deadline: Instant) -> Result<String, String> {
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    let secs = REQUEST_DEADLINE.as_secs();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no complete request line within {secs} s"));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match (&*stream).read(&mut chunk) {
            Ok(0) => return Err("connection closed before a complete request line".into()),
            Ok(n) => {
                line.extend_from_slice(&chunk[..n]);
                if let Some(end) = line.iter().position(|&b| b == b'\n') {
                    line.truncate(end);
                    break;
                }
                if line.len() > MAX_LINE {
                    return Err(format!("request line longer than {MAX_LINE} bytes"));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    IoKind::WouldBlock | IoKind::TimedOut | IoKind::Interrupted
                ) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    String::from_utf8(line).map_err(|_| "malformed request: not UTF-8".to_string())
}

fn write_reply(stream: &UnixStream, response: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_string(response).map_err(std::io::Error::other)?;
    out.push('\n');
    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
    (&*stream).write_all(out.as_bytes())
}

/// The reply kind of a data-path error.
pub fn error_kind(e: &NodeError) -> ErrorKind {
    match e.kind {
        NodeErrorKind::UnknownResource => ErrorKind::UnknownResource,
        NodeErrorKind::OutOfDate => ErrorKind::OutOfDate,
        NodeErrorKind::WrongRole => ErrorKind::WrongRole,
        NodeErrorKind::Provider => ErrorKind::Provider,
        _ => ErrorKind::Failed,
    }
}

fn dispatch(req: Request, daemon: &Daemon) -> Response {
    if matches!(req, Request::Reload) {
        return daemon.reload_response();
    }
    let cfg = daemon.config();
    let names = match &req {
        Request::Status { resources }
        | Request::Role { resources, .. }
        | Request::Events { resources }
        | Request::SplitBrain { resources, .. }
        | Request::Verify { resources, .. } => resources.clone(),
        Request::Reload => Vec::new(),
    };
    let selected = match cfg.select(&names) {
        Ok(s) => s,
        Err(e) => return Response::failure(ErrorKind::UnknownResource, e.to_string()),
    };
    let resources = match req {
        // For events: the snapshot sent before the stream.
        Request::Status { .. } | Request::Events { .. } | Request::Reload => selected
            .into_iter()
            .map(|r| report(&cfg, r, daemon))
            .collect(),
        Request::SplitBrain { action, .. } => {
            if action != "discard" {
                return Response::failure(
                    ErrorKind::BadRequest,
                    format!("unknown split-brain action '{action}' (expected 'discard')"),
                );
            }
            split_brain(&cfg, selected, daemon)
        }
        Request::Role { role, force, .. } => set_roles(&cfg, selected, role, force, daemon),
        Request::Verify {
            offset,
            length,
            algorithm,
            repair,
            ..
        } => {
            let algo = match algorithm.as_deref().unwrap_or("xxh3").parse::<Algo>() {
                Ok(a) => a,
                Err(e) => return Response::failure(ErrorKind::BadRequest, e),
            };
            let params = VerifyParams {
                offset,
                length,
                algo,
                repair,
            };
            verify(&cfg, selected, params, daemon)
        }
    };
    Response {
        version: CONTROL_VERSION,
        resources,
        ..Default::default()
    }
}

fn verify(
    cfg: &Config,
    selected: Vec<&ResourceConfig>,
    params: VerifyParams,
    daemon: &Daemon,
) -> Vec<ResourceReport> {
    let names: Vec<String> = selected.iter().map(|r| r.name.clone()).collect();
    tracing::info!(resources = ?names, offset = params.offset, length = ?params.length,
        algorithm = %params.algo, repair = params.repair, "verify requested");
    let results = daemon.node().verify(&names, params);
    reports_with_errors(cfg, selected, results, daemon)
}

/// The reports of `selected`, each with the error of its result.
fn reports_with_errors(
    cfg: &Config,
    selected: Vec<&ResourceConfig>,
    results: Vec<(String, Result<(), NodeError>)>,
    daemon: &Daemon,
) -> Vec<ResourceReport> {
    selected
        .into_iter()
        .zip(results)
        .map(|(r, (_, res))| {
            let mut rep = report(cfg, r, daemon);
            if let Err(e) = res {
                rep.error_kind = Some(error_kind(&e));
                rep.error = Some(e.to_string());
            }
            rep
        })
        .collect()
}

fn split_brain(
    cfg: &Config,
    selected: Vec<&ResourceConfig>,
    daemon: &Daemon,
) -> Vec<ResourceReport> {
    let names: Vec<String> = selected.iter().map(|r| r.name.clone()).collect();
    tracing::warn!(resources = ?names, "split-brain: discarding this node's changes");
    let results = {
        let _one = daemon.admin();
        daemon.node().discard(&names)
    };
    reports_with_errors(cfg, selected, results, daemon)
}

fn set_roles(
    cfg: &Config,
    selected: Vec<&ResourceConfig>,
    role: Role,
    force: bool,
    daemon: &Daemon,
) -> Vec<ResourceReport> {
    let names: Vec<String> = selected.iter().map(|r| r.name.clone()).collect();
    tracing::info!(resources = ?names, role = %role, "role change requested");
    let results = {
        let _one = daemon.admin();
        daemon.node().set_roles(&names, role, force)
    };
    let mut out = Vec::new();
    for (r, (_, res)) in selected.into_iter().zip(results) {
        let mut rep = report(cfg, r, daemon);
        match res {
            Ok(old) => {
                rep.previous_role = Some(old.to_string());
                if old != role {
                    daemon.notifier().submit(Event::new(
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
                rep.error_kind = Some(error_kind(&e));
                rep.error = Some(e.to_string());
            }
        }
        out.push(rep);
    }
    out
}

/// Everything `hastctl list` shows about one resource.
pub fn report(cfg: &Config, r: &ResourceConfig, daemon: &Daemon) -> ResourceReport {
    let stats = daemon
        .node()
        .stats(&r.name)
        .unwrap_or_else(|| Arc::new(ResourceStats::default()));
    let g = ResourceStats::get;
    let role = stats.role();
    let active = role != Role::Init;
    let local = stats.local_queue.get();
    let disk_failed = stats.disk_failed.load(Relaxed);
    let peer_disk_failed = stats.peer_disk_failed.load(Relaxed);
    let connected = stats.connected.load(Relaxed);
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
        // `complete`: the replication connection is up and both disks
        // are used. Not "in sync": that is `dirty: 0`.
        status: active.then(|| {
            if connected && !disk_failed && !peer_disk_failed {
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
        sync_skipped_bytes: g(&stats.sync_skipped_bytes),
        sync_identical_bytes: g(&stats.sync_identical_bytes),
        written_extents: g(&stats.written_extents),
        net_sent_bytes: g(&stats.net_sent_bytes),
        net_received_bytes: g(&stats.net_received_bytes),
        compression: r.compression.to_string(),
        syncmode: r.syncmode.to_string(),
        verify: verify_summary(&stats),
        connected: stats.connected.load(Relaxed),
        window_waits: g(&stats.window_waits),
        split_brain: stats.split_brain.load(Relaxed),
        out_of_date: role == Role::Primary && stats.out_of_date.load(Relaxed),
        disk: active.then(|| if disk_failed { "failed" } else { "ok" }.to_string()),
        disk_error: stats
            .disk_error
            .lock()
            .map(|e| e.clone())
            .ok()
            .filter(|e| disk_failed && !e.is_empty()),
        peer_disk: if peer_disk_failed {
            Some("failed".into())
        } else {
            (active && connected).then(|| "ok".into())
        },
        reads_from_peer: g(&stats.reads_from_peer),
        auth_failures: g(&stats.auth_failures),
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
        error_kind: None,
        previous_role: None,
    }
}

fn verify_summary(stats: &ResourceStats) -> Option<VerifySummary> {
    let report = stats.verify.lock().ok()?.clone()?;
    let end = if report.finished_ms != 0 {
        report.finished_ms
    } else {
        now_ms()
    };
    let secs = (end.saturating_sub(report.started_ms) as f64 / 1000.0).max(0.001);
    let rate = (report.done as f64 / secs) as u64;
    let eta_seconds = (report.state == VerifyState::Running && rate > 0)
        .then(|| report.length.saturating_sub(report.done) / rate);
    Some(VerifySummary {
        report,
        rate,
        eta_seconds,
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn sync_report(stats: &ResourceStats) -> Option<SyncReport> {
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
    Some(SyncReport {
        direction: dir.name().into(),
        done,
        total,
        rate,
        eta_seconds: eta,
    })
}

/// Control-socket requests from a hostile or broken client: arbitrary
/// bytes and mangled JSON through the real line reader and decoder never
/// panic, and a line longer than `MAX_LINE` is refused without reading on.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    fn decode(bytes: Vec<u8>) -> Result<RequestEnvelope, String> {
        let (a, b) = UnixStream::pair().unwrap();
        let w = std::thread::spawn(move || {
            let _ = (&a).write_all(&bytes);
        });
        let r = read_request(&b, Instant::now() + Duration::from_secs(5)).and_then(|l| {
            serde_json::from_str::<RequestEnvelope>(&l).map_err(|e| format!("malformed: {e}"))
        });
        drop(b);
        w.join().unwrap();
        r
    }

    fn json_soup() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("{".to_owned()),
            Just("}".to_owned()),
            Just("\"request\":".to_owned()),
            Just("\"version\":".to_owned()),
            Just("\"status\"".to_owned()),
            Just("\"role\"".to_owned()),
            Just("\"resources\":[\"r0\"]".to_owned()),
            Just(",".to_owned()),
            Just("null".to_owned()),
            Just("18446744073709551616".to_owned()),
            "[a-z\"\\\\]{0,8}",
        ];
        proptest::collection::vec(piece, 0..30).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_request_bytes_never_panic(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..3000),
            newline in any::<bool>(),
        ) {
            if newline {
                bytes.push(b'\n');
            }
            let _ = decode(bytes);
        }

        #[test]
        fn mangled_json_requests_never_panic(text in json_soup()) {
            let _ = decode(format!("{text}\n").into_bytes());
        }
    }

    #[test]
    fn an_endless_line_is_refused() {
        let e = decode(vec![b'x'; MAX_LINE * 3]).unwrap_err();
        assert!(e.contains("longer than"), "{e}");
    }
}
