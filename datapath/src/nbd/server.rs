//! The NBD export: a unix-socket listener, its connections, and shutdown.
//!
//! Lifecycle, for a resource worker task on the resource's executor:
//!
//! ```ignore
//! let export = NbdExport::bind(&socket_path, cfg, backend.clone())?; // sync errors here
//! let handle = export.start();                                     // spawns the accept loop
//! // ... serve until the role changes ...
//! handle.shutdown().await; // stop accepting, remove the socket, drain, close
//! ```
//!
//! [`NbdHandle::shutdown`] returns once no connection task and no backend
//! operation started by this export is left. Dropping the handle without
//! calling it starts the same shutdown in the background.

use std::cell::Cell;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::future;
use glommio::net::{UnixListener, UnixStream};
use glommio::sync::Gate;

use crate::semaphore::Semaphore;
use glommio::Task;
use tracing::Instrument;

use super::handshake::{self, ExportInfo};
use super::proto::{self, ExportLimits, Negotiated};
use super::transmission::{self, ConnParams};
use crate::export::{BackendGeometry, BlockBackend};
use crate::signal::Signal;

/// Connections served at once per export; further ones are accepted and
/// closed immediately (with a warning).
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to finish option negotiation.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Mode of the socket file: only the owner (root) may connect; the
/// directory's permissions are the real access control.
const SOCKET_MODE: u32 = 0o600;

/// Configuration of one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConfig {
    /// The export's name (also served as the default export, name "").
    /// At most 4096 bytes, no NUL.
    pub export_name: String,
    /// Requests in flight per connection (at least 1).
    pub max_inflight: usize,
    /// Bytes of read and write payload buffers held at once by all the
    /// export's connections together; at least the backend's
    /// `max_payload`.
    pub buffer_budget: usize,
    /// Refuse writes and advertise the export as read-only.
    pub read_only: bool,
}

/// A bound, not yet serving, NBD export. Create with [`NbdExport::bind`],
/// then [`NbdExport::start`].
pub struct NbdExport<B: BlockBackend> {
    listener: UnixListener,
    socket: SocketFile,
    cfg: NbdConfig,
    backend: Rc<B>,
}

impl<B: BlockBackend> NbdExport<B>
where
    B::ReadBuf: 'static,
{
    /// Check `cfg` against the backend, remove a stale socket at `path`
    /// (refusing to touch anything that is not a socket, or a socket with a
    /// live listener) and listen on `path`.
    ///
    /// Must be called on the glommio executor that will serve the export.
    pub fn bind(path: &Path, cfg: NbdConfig, backend: Rc<B>) -> io::Result<Self> {
        check_config(&cfg, &backend.geometry())?;
        remove_stale_socket(path)?;
        let listener = UnixListener::bind(path)?;
        let socket = SocketFile::new(path)?;
        fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE))?;
        tracing::info!(export = %cfg.export_name, socket = %path.display(), "NBD export listening");
        Ok(Self {
            listener,
            socket,
            cfg,
            backend,
        })
    }

    /// Path of the listening socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket.path
    }

    /// Start serving on the current executor.
    pub fn start(self) -> NbdHandle {
        self.start_counting(None)
    }

    /// Start serving, also mirroring the number of connected clients into
    /// `gauge` (readable from other threads, e.g. for `hastctl list`).
    pub fn start_with_gauge(self, gauge: Arc<AtomicU64>) -> NbdHandle {
        self.start_counting(Some(gauge))
    }

    fn start_counting(self, gauge: Option<Arc<AtomicU64>>) -> NbdHandle {
        let stop = Signal::new();
        let active = Rc::new(Cell::new(0));
        let path = self.socket.path.clone();
        let span = tracing::info_span!("nbd", export = %self.cfg.export_name);
        let exporter = Exporter {
            backend: self.backend,
            budget: Rc::new(Semaphore::new(self.cfg.buffer_budget as u64)),
            stop: stop.clone(),
            active: active.clone(),
            gauge,
            cfg: self.cfg,
        };
        let task = glommio::spawn_local(
            accept_loop(exporter, self.listener, self.socket).instrument(span),
        );
        NbdHandle {
            stop,
            active,
            path,
            task: Some(task),
        }
    }
}

/// A running export.
pub struct NbdHandle {
    stop: Signal,
    active: Rc<Cell<usize>>,
    path: PathBuf,
    task: Option<Task<()>>,
}

impl NbdHandle {
    /// Stop the export and wait until it is fully stopped: no new
    /// connections (the socket file is removed), every request already read
    /// has completed and its reply has been sent (or the client stopped
    /// reading for longer than the drain timeout), every connection is
    /// closed.
    pub async fn shutdown(mut self) {
        self.stop.fire();
        if let Some(task) = self.task.take() {
            task.await;
        }
    }

    /// Connections currently open (negotiating or transmitting).
    pub fn active_connections(&self) -> usize {
        self.active.get()
    }

    /// Path of the listening socket.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }
}

impl Drop for NbdHandle {
    /// Without [`NbdHandle::shutdown`], the same shutdown runs in the
    /// background.
    fn drop(&mut self) {
        self.stop.fire();
        if let Some(task) = self.task.take() {
            task.detach();
        }
    }
}

/// State shared by the accept loop and the connections of one export.
struct Exporter<B: BlockBackend> {
    cfg: NbdConfig,
    backend: Rc<B>,
    budget: Rc<Semaphore>,
    stop: Signal,
    active: Rc<Cell<usize>>,
    gauge: Option<Arc<AtomicU64>>,
}

/// Accept connections until stopped, then close the listener, remove the
/// socket file and wait for every connection to finish.
async fn accept_loop<B: BlockBackend>(
    exporter: Exporter<B>,
    listener: UnixListener,
    socket: SocketFile,
) where
    B::ReadBuf: 'static,
{
    let exporter = Rc::new(exporter);
    let connections = Gate::new();
    let mut next_id = 0u64;
    while !exporter.stop.is_fired() {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            exporter.stop.wait().await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                next_id += 1;
                spawn_connection(&exporter, &connections, stream, next_id);
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "accept failed");
                glommio::timer::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
    drop(listener);
    drop(socket);
    tracing::info!(connections = exporter.active.get(), "NBD export stopping");
    let _ = connections.close().await;
    tracing::info!("NBD export stopped");
}

/// Start serving `stream`, unless the export is at its connection limit.
fn spawn_connection<B: BlockBackend>(
    exporter: &Rc<Exporter<B>>,
    connections: &Gate,
    stream: UnixStream,
    id: u64,
) where
    B::ReadBuf: 'static,
{
    if exporter.active.get() >= MAX_CONNECTIONS {
        tracing::warn!(
            conn = id,
            limit = MAX_CONNECTIONS,
            "too many connections; closing new one"
        );
        return;
    }
    // Counted from here (not from when the task first runs), so that a burst
    // of accepts cannot overshoot the limit.
    let active = ActiveGuard::new(&exporter.active, exporter.gauge.clone());
    let span = tracing::info_span!("conn", conn = id);
    let fut = run_connection(exporter.clone(), stream, active).instrument(span);
    match connections.spawn(fut) {
        Ok(task) => {
            task.detach();
        }
        Err(_) => tracing::warn!(conn = id, "export stopping; connection dropped"),
    }
}

/// Decrements the active connection count when a connection task ends,
/// however it ends.
struct ActiveGuard(Rc<Cell<usize>>, Option<Arc<AtomicU64>>);

impl ActiveGuard {
    fn new(active: &Rc<Cell<usize>>, gauge: Option<Arc<AtomicU64>>) -> Self {
        active.set(active.get() + 1);
        if let Some(g) = &gauge {
            g.fetch_add(1, Ordering::Relaxed);
        }
        Self(active.clone(), gauge)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
        if let Some(g) = &self.1 {
            g.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One connection: negotiation, then transmission. `_active` counts it
/// until it ends.
async fn run_connection<B: BlockBackend>(
    exporter: Rc<Exporter<B>>,
    mut stream: UnixStream,
    _active: ActiveGuard,
) where
    B::ReadBuf: 'static,
{
    let peer = stream.peer_addr().ok();
    tracing::info!(?peer, "client connected");
    let geometry = exporter.backend.geometry();
    let limits = connection_limits(&geometry, &exporter.cfg);
    let info = ExportInfo {
        name: &exporter.cfg.export_name,
        size: geometry.size,
        read_only: exporter.cfg.read_only,
        min_block: geometry.min_block,
        preferred_block: geometry.preferred_block,
        max_payload: limits.max_payload,
    };
    let Some(negotiated) = negotiate(&exporter, &mut stream, &info).await else {
        return;
    };
    let params = ConnParams {
        negotiated,
        backend: exporter.backend.clone(),
        limits,
        max_inflight: exporter.cfg.max_inflight,
        budget: exporter.budget.clone(),
        stop: exporter.stop.clone(),
    };
    let (end, requests) = transmission::serve(stream, params).await;
    if end.is_ordinary() {
        tracing::info!(requests, reason = %end, "connection closed");
    } else {
        tracing::warn!(requests, reason = %end, "connection closed");
    }
}

/// Run the handshake, bounded by [`HANDSHAKE_TIMEOUT`] and the stop signal.
/// What the client negotiated if it entered transmission.
async fn negotiate<B: BlockBackend>(
    exporter: &Exporter<B>,
    stream: &mut UnixStream,
    info: &ExportInfo<'_>,
) -> Option<Negotiated> {
    let outcome = future::or(
        async { Some(handshake::negotiate(stream, info).await) },
        async {
            future::or(
                exporter.stop.wait(),
                glommio::timer::sleep(HANDSHAKE_TIMEOUT),
            )
            .await;
            None
        },
    )
    .await;
    match outcome {
        Some(Ok((how, negotiated))) => {
            tracing::debug!(?how, ?negotiated, "negotiation done");
            Some(negotiated)
        }
        Some(Err(end)) if end.is_ordinary() => {
            tracing::debug!(reason = %end, "connection closed during negotiation");
            None
        }
        Some(Err(end)) => {
            tracing::warn!(reason = %end, "negotiation failed");
            None
        }
        None if exporter.stop.is_fired() => {
            tracing::info!("export stopping; negotiation abandoned");
            None
        }
        None => {
            tracing::warn!("negotiation timed out after {HANDSHAKE_TIMEOUT:?}");
            None
        }
    }
}

/// Limits of a connection: the backend's, with the payload limit also
/// capped by the export's buffer budget (rounded down to the minimum block
/// size so that it stays a valid advertisement).
fn connection_limits(geometry: &BackendGeometry, cfg: &NbdConfig) -> ExportLimits {
    let mut limits = ExportLimits::new(geometry, cfg.read_only);
    let budget = u32::try_from(cfg.buffer_budget).unwrap_or(u32::MAX);
    if limits.max_payload > budget {
        let min = geometry.min_block.max(1);
        limits.max_payload = (budget - budget % min).max(min);
    }
    limits
}

/// Reject configurations the server cannot honour.
fn check_config(cfg: &NbdConfig, geometry: &BackendGeometry) -> io::Result<()> {
    let invalid = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
    if cfg.export_name.len() > proto::MAX_STRING_LEN || cfg.export_name.contains('\0') {
        return invalid(format!("invalid NBD export name {:?}", cfg.export_name));
    }
    if cfg.max_inflight == 0 {
        return invalid("max_inflight must be at least 1".into());
    }
    if let Err(e) = proto::check_geometry(geometry) {
        return invalid(format!("backend geometry: {e}"));
    }
    if (cfg.buffer_budget as u64) < u64::from(geometry.max_payload) {
        return invalid(format!(
            "buffer_budget {} is smaller than the maximum payload {}",
            cfg.buffer_budget, geometry.max_payload
        ));
    }
    Ok(())
}

/// Remove a socket left behind at `path` by a server that is gone. Refuses
/// if `path` is not a socket, or if something accepts connections on it.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if socket_is_live(path)? {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running server", path.display()),
        ));
    }
    tracing::info!(socket = %path.display(), "removing stale socket");
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether a server accepts connections on the socket at `path`. The probe
/// connect is non-blocking, so a live server with a full backlog (EAGAIN)
/// cannot stall the executor; it counts as live.
fn socket_is_live(path: &Path) -> io::Result<bool> {
    use nix::errno::Errno;
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};

    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    match connect(fd.as_raw_fd(), &addr) {
        Ok(()) | Err(Errno::EAGAIN) | Err(Errno::EINPROGRESS) => Ok(true),
        Err(Errno::ECONNREFUSED) | Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The socket file we created; removed on drop if it is still ours (same
/// inode), so a newer export bound to the same path is left alone.
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn new(path: &Path) -> io::Result<Self> {
        let meta = fs::symlink_metadata(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino);
        if ours {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!(socket = %self.path.display(), error = %e, "cannot remove socket");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GEO: BackendGeometry = BackendGeometry {
        size: 1 << 30,
        min_block: 4096,
        preferred_block: 4096,
        max_payload: 1 << 20,
    };

    fn cfg() -> NbdConfig {
        NbdConfig {
            export_name: "r0".into(),
            max_inflight: 16,
            buffer_budget: 1 << 20,
            read_only: false,
        }
    }

    #[test]
    fn config_checks() {
        assert!(check_config(&cfg(), &GEO).is_ok());
        let small = NbdConfig {
            buffer_budget: 1000,
            ..cfg()
        };
        assert!(check_config(&small, &GEO).is_err());
        let zero = NbdConfig {
            max_inflight: 0,
            ..cfg()
        };
        assert!(check_config(&zero, &GEO).is_err());
        let nul = NbdConfig {
            export_name: "a\0b".into(),
            ..cfg()
        };
        assert!(check_config(&nul, &GEO).is_err());
        let bad_geo = BackendGeometry {
            max_payload: 5000,
            ..GEO
        };
        assert!(check_config(&cfg(), &bad_geo).is_err());
    }

    #[test]
    fn limits_capped_by_budget() {
        let l = connection_limits(&GEO, &cfg());
        assert_eq!(l.max_payload, 1 << 20);
        let small = NbdConfig {
            buffer_budget: 10_000,
            ..cfg()
        };
        assert_eq!(connection_limits(&GEO, &small).max_payload, 8192);
    }

    #[test]
    fn stale_socket_handling() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("file");
        fs::write(&file, b"x").expect("write");
        assert!(remove_stale_socket(&file).is_err());
        assert!(file.exists());

        let sock = dir.path().join("sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        assert_eq!(
            remove_stale_socket(&sock).map_err(|e| e.kind()),
            Err(io::ErrorKind::AddrInUse)
        );
        drop(listener);
        assert!(sock.exists());
        remove_stale_socket(&sock).expect("stale socket removed");
        assert!(!sock.exists());
        remove_stale_socket(&sock).expect("missing path is fine");
    }
}
