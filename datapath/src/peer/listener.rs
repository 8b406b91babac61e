//! The secondary's listener: plain threads accept on the `listen`
//! addresses and run the pre-session ([`super::presession`]) of each
//! connection, then hand the socket, with its [`Transport`], to the
//! executor that owns the resource. Refusals before that are answered
//! here, before any executor is involved.
//!
//! Hardening, in the order it applies:
//!
//! 1. A connection from an address that is no resource's `remote` is
//!    closed at once, before a byte is read, and costs no thread.
//! 2. Handshakes in progress are bounded: [`MAX_PER_SOURCE`] per source
//!    address and [`MAX_PENDING_HANDSHAKES`] in all. A source at its bound
//!    that connects again evicts its oldest handshake (a silent one first):
//!    half-open or slow connections cannot keep the real peer out.
//! 3. The whole pre-session, reading included, has one deadline (the
//!    peer timeout); a byte now and then does not stretch it.
//! 4. The resource's `remote` must match the source address, its security
//!    modes the primary's, and with a secret both proofs must hold, before
//!    anything about the resource's state is sent.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::presession::{self, Chan, Deadline, PeerSecurity, Transport};
use super::proto::{Header, HelloReply, Kind, Refusal};
use super::secondary::Incoming;
use crate::stats::ResourceStats;

/// Handshakes in progress at once, at most (more connections are
/// dropped).
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Handshakes in progress from one source address, at most.
pub const MAX_PER_SOURCE: usize = 8;

/// Where connections for one resource go.
pub struct Route {
    /// IPs the resource's primary may connect from (its `remote`).
    pub allowed: Vec<IpAddr>,
    /// This node's name (sent in the Challenge).
    pub node: String,
    /// How the resource's connections are secured.
    pub security: PeerSecurity,
    /// The resource's counters (authentication failures).
    pub stats: Arc<ResourceStats>,
    /// Hands the connection to the resource's executor; gives it back if
    /// that is not possible (queue full, stopping).
    pub deliver: Box<dyn Fn(Incoming) -> Result<(), Box<Incoming>> + Send + Sync>,
}

/// The routes, replaceable while the listener runs.
type Routes = Arc<RwLock<Arc<HashMap<String, Route>>>>;

/// Running listeners.
pub struct Listener {
    routes: Routes,
    stop: Arc<AtomicBool>,
    fds: Vec<RawFd>,
    threads: Vec<JoinHandle<()>>,
    _sockets: Vec<TcpListener>,
}

impl Listener {
    /// Binds every address and starts accepting. Fails if an address
    /// cannot be bound, naming it. `timeout` bounds each pre-session.
    pub fn start(
        addrs: &[SocketAddr],
        routes: HashMap<String, Route>,
        timeout: Duration,
    ) -> std::io::Result<Listener> {
        let routes: Routes = Arc::new(RwLock::new(Arc::new(routes)));
        let stop = Arc::new(AtomicBool::new(false));
        let slots = Arc::new(Slots::default());
        let mut sockets = Vec::new();
        for addr in addrs {
            sockets.push(bind(addr).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
            })?);
        }
        let mut threads = Vec::new();
        let mut fds = Vec::new();
        for sock in &sockets {
            let sock = sock.try_clone()?;
            fds.push(sock.as_raw_fd());
            let (routes, stop, slots) = (routes.clone(), stop.clone(), slots.clone());
            let local = sock.local_addr()?;
            tracing::info!(address = %local, "listening for primaries");
            threads.push(
                std::thread::Builder::new()
                    .name("hast-listen".into())
                    .spawn(move || accept_loop(sock, routes, stop, slots, timeout))?,
            );
        }
        Ok(Listener {
            routes,
            stop,
            fds,
            threads,
            _sockets: sockets,
        })
    }

    /// Replaces the routes (resources added or removed, a `remote`
    /// changed); handshakes already under way keep the old ones.
    pub fn set_routes(&self, routes: HashMap<String, Route>) {
        if let Ok(mut r) = self.routes.write() {
            *r = Arc::new(routes);
        }
    }

    /// Stops accepting and joins the threads.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for fd in &self.fds {
            // SAFETY: shutdown(2) on a listening socket we still own (the
            // listeners live in `_sockets` until after the join); it wakes
            // the blocked accept(2). No memory involved.
            unsafe {
                libc::shutdown(*fd, libc::SHUT_RDWR);
            }
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn bind(addr: &SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.bind(&(*addr).into())?;
    sock.listen(128)?;
    Ok(sock.into())
}

/// One handshake in progress.
struct Pending {
    id: u64,
    ip: IpAddr,
    /// The introduction was read: the peer speaks.
    spoke: Arc<AtomicBool>,
    /// A clone of the socket, to evict it.
    sock: TcpStream,
}

/// The handshakes in progress (see the module documentation).
#[derive(Default)]
struct Slots {
    state: Mutex<(u64, Vec<Pending>)>,
}

/// A handshake's place; given back when dropped.
struct Slot {
    slots: Arc<Slots>,
    id: u64,
    spoke: Arc<AtomicBool>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.slots.state.lock().unwrap_or_else(|e| e.into_inner());
        st.1.retain(|p| p.id != self.id);
    }
}

/// Why a connection got no handshake slot.
enum NoSlot {
    Full,
    Io(std::io::Error),
}

impl Slots {
    /// A slot for a connection from `ip`, evicting that source's oldest
    /// handshake (silent ones first) when it is at its bound.
    fn admit(self: &Arc<Self>, ip: IpAddr, sock: &TcpStream) -> Result<Slot, NoSlot> {
        let clone = sock.try_clone().map_err(NoSlot::Io)?;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let from_ip = st.1.iter().filter(|p| p.ip == ip).count();
        if from_ip >= MAX_PER_SOURCE {
            // Pending is in arrival order: the first silent one, else the
            // first.
            let victim =
                st.1.iter()
                    .position(|p| p.ip == ip && !p.spoke.load(Ordering::SeqCst))
                    .or_else(|| st.1.iter().position(|p| p.ip == ip));
            if let Some(i) = victim {
                let p = st.1.remove(i);
                let _ = p.sock.shutdown(Shutdown::Both);
                tracing::debug!(peer = %ip, "too many handshakes from this address; the oldest is dropped");
            }
        }
        if st.1.len() >= MAX_PENDING_HANDSHAKES {
            return Err(NoSlot::Full);
        }
        st.0 += 1;
        let id = st.0;
        let spoke = Arc::new(AtomicBool::new(false));
        st.1.push(Pending {
            id,
            ip,
            spoke: spoke.clone(),
            sock: clone,
        });
        Ok(Slot {
            slots: self.clone(),
            id,
            spoke,
        })
    }
}

/// Logs at most one line a second (with how many were left out).
struct Throttle {
    last: Mutex<Option<Instant>>,
    skipped: AtomicU64,
}

impl Throttle {
    fn new() -> Throttle {
        Throttle {
            last: Mutex::new(None),
            skipped: AtomicU64::new(0),
        }
    }

    /// Runs `log` with the count of lines left out since the last one, or
    /// counts this one.
    fn log(&self, log: impl FnOnce(u64)) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        log(self.skipped.swap(0, Ordering::Relaxed));
    }
}

fn accept_loop(
    sock: TcpListener,
    routes: Routes,
    stop: Arc<AtomicBool>,
    slots: Arc<Slots>,
    timeout: Duration,
) {
    let (strangers, full) = (Throttle::new(), Throttle::new());
    loop {
        let accepted = sock.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let (conn, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let deadline = Instant::now() + timeout;
        let routes = routes.read().map(|r| r.clone()).unwrap_or_default();
        // Before anything is read: is this the peer of any resource?
        let known = routes
            .values()
            .any(|r| r.allowed.iter().any(|ip| same_ip(ip, &peer.ip())));
        if !known {
            strangers.log(|skipped| {
                tracing::warn!(peer = %peer, also_refused = skipped,
                    "connection from an address that is no resource's remote; closed unread")
            });
            continue;
        }
        let slot = match slots.admit(canonical(peer.ip()), &conn) {
            Ok(s) => s,
            Err(NoSlot::Full) => {
                full.log(|skipped| {
                    tracing::warn!(peer = %peer, also_dropped = skipped,
                        "too many handshakes in progress; dropping connection")
                });
                continue;
            }
            Err(NoSlot::Io(e)) => {
                tracing::warn!(peer = %peer, error = %e, "cannot track the connection; dropped");
                continue;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("hast-handshake".into())
            .spawn(move || {
                handshake(conn, peer, &routes, deadline, &slot);
                drop(slot);
            });
        if spawned.is_err() {
            tracing::error!("cannot start a handshake thread");
        }
    }
}

fn handshake(
    conn: TcpStream,
    peer: SocketAddr,
    routes: &HashMap<String, Route>,
    deadline: Instant,
    slot: &Slot,
) {
    let mut chan = Chan::new(Deadline::new(&conn, deadline));
    let intro = match presession::read_introduction(&mut chan) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(peer = %peer, error = %e, "bad handshake; connection closed");
            return;
        }
    };
    slot.spoke.store(true, Ordering::SeqCst);
    let Some(route) = routes.get(&intro.resource) else {
        tracing::warn!(peer = %peer, resource = %intro.resource, "connection for an unknown resource refused");
        chan.refuse(
            Refusal::UnknownResource,
            format!("no resource '{}' on this node", intro.resource),
        );
        return;
    };
    if !route.allowed.iter().any(|ip| same_ip(ip, &peer.ip())) {
        tracing::warn!(peer = %peer, resource = %intro.resource,
            "connection from an address that is not the resource's remote; refused");
        chan.refuse(
            Refusal::Refused,
            format!(
                "{} may not connect for resource '{}'",
                peer.ip(),
                intro.resource
            ),
        );
        return;
    }
    let transport = match presession::respond(chan, &intro, &route.node, &route.security) {
        Ok(t) => t,
        Err(f) => {
            if f.auth {
                route
                    .stats
                    .auth_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(peer = %peer, resource = %intro.resource, node = %intro.node,
                    reason = %f.message, "authentication of the primary failed; connection closed");
            } else {
                tracing::warn!(peer = %peer, resource = %intro.resource, error = %f.message,
                    "handshake failed; connection closed");
            }
            linger(&conn, deadline);
            return;
        }
    };
    tracing::info!(peer = %peer, resource = %intro.resource, transport = transport.name(),
        "primary authenticated; handing over the connection");
    let _ = conn.set_read_timeout(None);
    let _ = conn.set_write_timeout(None);
    let resource = intro.resource.clone();
    let authenticated = route.security.secret.is_some();
    let fd: OwnedFd = conn.into();
    let inc = Incoming {
        fd,
        transport,
        intro,
        peer,
        authenticated,
        deadline,
    };
    if let Err(back) = (route.deliver)(inc) {
        tracing::warn!(peer = %peer, resource = %resource, "resource busy; connection refused");
        let Incoming { fd, transport, .. } = *back;
        refuse_after(
            TcpStream::from(fd),
            transport,
            Refusal::Busy,
            "resource is busy; retry",
        );
    }
}

/// Answers a connection past its pre-session with a refusal in its
/// transport, then waits (briefly) for the primary to close first, so
/// that the unread Hello does not turn our close into a reset that would
/// lose the refusal.
pub fn refuse_after(mut sock: TcpStream, transport: Transport, why: Refusal, message: &str) {
    let _ = sock.set_nonblocking(false);
    let _ = sock.set_write_timeout(Some(Duration::from_secs(1)));
    let body = HelloReply::refused(why, message).encode();
    let hdr = Header::reply(Kind::HelloReply, 0, 0).with_payload(&body);
    if transport.send_frame(&mut sock, &hdr, &body).is_ok() {
        let _ = sock.flush();
        linger(&sock, Instant::now() + Duration::from_secs(1));
    }
}

/// Closes our side, then reads (and drops) what the peer still sends
/// until it closes too, for a second at most: data left unread would
/// turn our close into a reset, and the peer could lose the refusal or
/// the TLS alert we sent it.
fn linger(sock: &TcpStream, deadline: Instant) {
    let _ = sock.shutdown(Shutdown::Write);
    let until = deadline.min(Instant::now() + Duration::from_secs(1));
    let mut sink = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return;
        }
        if !matches!((&mut &*sock).read(&mut sink), Ok(n) if n > 0) {
            return;
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn same_ip(a: &IpAddr, b: &IpAddr) -> bool {
    canonical(*a) == canonical(*b)
}
