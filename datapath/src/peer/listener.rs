//! The secondary's listener: plain threads accept on the `listen`
//! addresses, read the Hello (bounded in size and time), check that the
//! resource exists and that the connection comes from its configured
//! `remote` address, and hand the socket to the executor that owns the
//! resource. Refusals are answered here, before any executor is involved.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use super::proto::{Header, Hello, HelloReply, Kind, Refusal, HEADER_LEN, PROTO_VERSION};
use super::secondary::Incoming;
use crate::generation::Gen;

/// Handshakes being read at once, at most (more connections are dropped).
const MAX_PENDING_HANDSHAKES: usize = 32;

/// Where connections for one resource go.
pub struct Route {
    /// IPs the resource's primary may connect from (its `remote`).
    pub allowed: Vec<IpAddr>,
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
    /// cannot be bound, naming it.
    pub fn start(
        addrs: &[SocketAddr],
        routes: HashMap<String, Route>,
        timeout: Duration,
    ) -> std::io::Result<Listener> {
        let routes: Routes = Arc::new(RwLock::new(Arc::new(routes)));
        let stop = Arc::new(AtomicBool::new(false));
        let pending = Arc::new(AtomicUsize::new(0));
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
            let (routes, stop, pending) = (routes.clone(), stop.clone(), pending.clone());
            let local = sock.local_addr()?;
            tracing::info!(address = %local, "listening for primaries");
            threads.push(
                std::thread::Builder::new()
                    .name("hast-listen".into())
                    .spawn(move || accept_loop(sock, routes, stop, pending, timeout))?,
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

fn accept_loop(
    sock: TcpListener,
    routes: Routes,
    stop: Arc<AtomicBool>,
    pending: Arc<AtomicUsize>,
    timeout: Duration,
) {
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
        if pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING_HANDSHAKES {
            pending.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(peer = %peer, "too many handshakes in progress; dropping connection");
            continue;
        }
        let routes = routes.read().map(|r| r.clone()).unwrap_or_default();
        let pending = pending.clone();
        let spawned = std::thread::Builder::new()
            .name("hast-handshake".into())
            .spawn(move || {
                handshake(conn, peer, &routes, timeout);
                pending.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            tracing::error!("cannot start a handshake thread");
        }
    }
}

/// Answers a connection with a refusal (best effort).
pub fn refuse(mut conn: &TcpStream, why: Refusal, message: String) {
    let reply = HelloReply {
        version: PROTO_VERSION,
        refusal: Some(why),
        message,
        datasize: 0,
        extentsize: 0,
        gen: Gen::default(),
        flags: 0,
        bitmap: Vec::new(),
    };
    let body = reply.encode();
    let hdr = Header::reply(Kind::HelloReply, 0, 0).with_payload(&body);
    let mut out = hdr.encode().to_vec();
    out.extend_from_slice(&body);
    let _ = conn.write_all(&out);
}

fn read_hello(conn: &mut TcpStream) -> Result<Hello, String> {
    let mut head = [0u8; HEADER_LEN];
    conn.read_exact(&mut head)
        .map_err(|e| format!("reading hello: {e}"))?;
    let hdr = Header::decode(&head).map_err(|e| e.to_string())?;
    if hdr.kind != Kind::Hello {
        return Err(format!("expected Hello, got {:?}", hdr.kind));
    }
    let mut body = vec![0u8; hdr.payload_len as usize];
    conn.read_exact(&mut body)
        .map_err(|e| format!("reading hello: {e}"))?;
    hdr.check_payload(&body).map_err(|e| e.to_string())?;
    Hello::decode(&body).map_err(|e| e.to_string())
}

fn handshake(
    mut conn: TcpStream,
    peer: SocketAddr,
    routes: &HashMap<String, Route>,
    timeout: Duration,
) {
    let _ = conn.set_read_timeout(Some(timeout));
    let _ = conn.set_write_timeout(Some(timeout));
    let hello = match read_hello(&mut conn) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(peer = %peer, error = %e, "bad handshake; connection closed");
            return;
        }
    };
    let Some(route) = routes.get(&hello.resource) else {
        tracing::warn!(peer = %peer, resource = %hello.resource, "connection for an unknown resource refused");
        refuse(
            &conn,
            Refusal::UnknownResource,
            format!("no resource '{}' on this node", hello.resource),
        );
        return;
    };
    if !route.allowed.iter().any(|ip| same_ip(ip, &peer.ip())) {
        tracing::warn!(peer = %peer, resource = %hello.resource,
            "connection from an address that is not the resource's remote; refused");
        refuse(
            &conn,
            Refusal::Refused,
            format!(
                "{} may not connect for resource '{}'",
                peer.ip(),
                hello.resource
            ),
        );
        return;
    }
    let _ = conn.set_read_timeout(None);
    let _ = conn.set_write_timeout(None);
    let resource = hello.resource.clone();
    let fd: OwnedFd = conn.into();
    if let Err(back) = (route.deliver)(Incoming { fd, hello, peer }) {
        tracing::warn!(peer = %peer, resource = %resource, "resource busy; connection refused");
        let conn = TcpStream::from(back.fd);
        refuse(&conn, Refusal::Busy, "resource is busy; retry".into());
    }
}

fn same_ip(a: &IpAddr, b: &IpAddr) -> bool {
    let norm = |ip: &IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(*ip),
        v4 => *v4,
    };
    norm(a) == norm(b)
}
