//! A fault-injecting TCP proxy for tests: std threads and blocking I/O,
//! no async runtime.
//!
//! A [`Proxy`] listens on one address and forwards every accepted
//! connection to a target, connecting *from* a chosen source IP so that the
//! target sees the address it expects its peer to have (hastd recognises its
//! peer by the connection's source address). Faults are switched on and off
//! while connections are open:
//!
//! - [`Proxy::partition`]: every open connection is reset (RST to both
//!   sides) and new connections are accepted and reset at once, until
//!   [`Proxy::heal`].
//! - [`Proxy::blackhole`]: connections stay open but nothing is forwarded;
//!   bytes stay in the proxy's buffer and in the kernel's socket buffers
//!   (back-pressure), and are delivered after [`Proxy::heal`].
//! - [`Proxy::set_delay`]: every chunk is forwarded `d` after it was read
//!   (a latency, not a throughput limit: reading goes on meanwhile, up to
//!   the buffer bound).
//!
//! Each connection has four threads (a reader and a writer per direction)
//! and at most [`BUFFER_CAP`] bytes buffered per direction. Threads never
//! spin: they sleep on a condition variable, in a blocking read (woken by
//! `shutdown`), or in a write with a short timeout. Dropping the proxy
//! closes the listener, resets every connection and joins every thread
//! (bounded in time).

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{self as sock, sockopt, AddressFamily, SockFlag, SockType};

/// Largest number of bytes a connection buffers in one direction.
pub const BUFFER_CAP: usize = 256 * 1024;
/// Largest single read.
const CHUNK: usize = 64 * 1024;
/// How often a writer blocked by a full peer re-checks for teardown.
const WRITE_POLL: Duration = Duration::from_millis(100);
/// Limit for connecting to the target.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit for the threads to finish when the proxy is dropped.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward (possibly delayed).
    Forward,
    /// Reset open connections and new ones.
    Partitioned,
    /// Keep connections, forward nothing.
    Blackholed,
}

/// Counters of a proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Bytes written to the target (client -> target).
    pub to_target: u64,
    /// Bytes written back to clients (target -> client).
    pub to_client: u64,
    /// Connections accepted and forwarded to the target.
    pub accepted: u64,
    /// Connections accepted and reset at once: while partitioned, or
    /// because the target could not be reached.
    pub refused: u64,
    /// Connections currently open (being forwarded or being torn down).
    pub open: usize,
}

/// A fault-injecting TCP proxy; see the module documentation.
pub struct Proxy {
    inner: Arc<Inner>,
    addr: SocketAddr,
    stopped: bool,
}

/// One direction of a connection: chunks read and not yet written, each
/// with the time it may be written.
#[derive(Default)]
struct Pipe {
    queue: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
    /// The reader saw EOF: once the queue drains, the writer half-closes.
    eof: bool,
}

struct Conn {
    /// Clones of the two sockets, for teardown from any thread.
    client: TcpStream,
    server: TcpStream,
    /// [client -> server, server -> client].
    pipes: [Pipe; 2],
    /// Torn down: every thread of the connection exits.
    dead: bool,
    /// Threads of this connection still running; the last one removes it.
    threads: usize,
}

struct State {
    mode: Mode,
    delay: Duration,
    stop: bool,
    target: SocketAddr,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    /// Threads of the proxy still running (accept thread included).
    threads: usize,
    handles: Vec<JoinHandle<()>>,
    accepted: u64,
    refused: u64,
    /// Flip a bit in the next client -> target chunk of at least this
    /// many bytes (see [`Proxy::corrupt_next`]).
    corrupt: Option<usize>,
    /// Chunks corrupted so far.
    corrupted: u64,
    /// New connections are accepted and reset; open ones go on (see
    /// [`Proxy::refuse_new`]).
    refuse_new: bool,
}

struct Inner {
    state: Mutex<State>,
    cv: Condvar,
    source_ip: IpAddr,
    /// Bytes written, indexed like `Conn::pipes`.
    forwarded: [AtomicU64; 2],
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking proxy thread must not make the test's Drop panic too.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cv.wait(g).unwrap_or_else(|e| e.into_inner())
    }

    fn wait_timeout<'a>(&self, g: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
        match self.cv.wait_timeout(g, d) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        }
    }
}

/// Sets SO_LINGER to 0, so that closing the socket sends RST.
fn set_linger0(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let _ = sock::setsockopt(s, sockopt::Linger, &l);
}

/// Marks a connection dead and wakes its threads: readers blocked in
/// `read` return (shutdown of the read side), writers notice within
/// [`WRITE_POLL`]. The sockets are closed with RST when the last clone
/// drops.
fn kill(conn: &mut Conn) {
    if conn.dead {
        return;
    }
    conn.dead = true;
    for s in [&conn.client, &conn.server] {
        set_linger0(s);
        let _ = s.shutdown(Shutdown::Read);
    }
    for p in &mut conn.pipes {
        p.queue.clear();
        p.bytes = 0;
    }
}

/// Connects to `target` from `source` (any port): what the proxy does,
/// usable by tests that need a specific source address.
pub fn connect_from(source: IpAddr, target: SocketAddr) -> io::Result<TcpStream> {
    let family = if target.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd: OwnedFd = sock::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    let stream = TcpStream::from(fd);
    // SO_SNDTIMEO bounds a blocking connect on Linux.
    stream.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    let fd = stream.as_raw_fd();
    with_raw_addr(SocketAddr::new(source, 0), |p, len| {
        // SAFETY: `fd` is an open socket owned by `stream`; `p` points to a
        // live socket address of `len` bytes for the duration of the call.
        check(unsafe { libc::bind(fd, p, len) })
    })?;
    // A signal interrupts a connect with a timeout (EINTR) while the
    // handshake goes on: ask again until it is done.
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let res = with_raw_addr(target, |p, len| {
            // SAFETY: as for bind above.
            check(unsafe { libc::connect(fd, p, len) })
        });
        match res {
            Ok(()) => return Ok(stream),
            Err(e) if e.raw_os_error() == Some(libc::EISCONN) => return Ok(stream),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EALREADY | libc::EINPROGRESS)
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Calls `f` with `a` as a C socket address (nix's conversions need its
/// `net` feature, which the workspace does not enable).
fn with_raw_addr<R>(
    a: SocketAddr,
    f: impl FnOnce(*const libc::sockaddr, libc::socklen_t) -> R,
) -> R {
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            f(
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo().to_be(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            f(
                (&sin6 as *const libc::sockaddr_in6).cast(),
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}

/// Spawns a proxy thread that is counted in `State::threads`.
fn spawn(inner: &Arc<Inner>, name: String, f: impl FnOnce(&Arc<Inner>) + Send + 'static) {
    struct Exit(Arc<Inner>);
    impl Drop for Exit {
        fn drop(&mut self) {
            let mut g = self.0.lock();
            g.threads -= 1;
            drop(g);
            self.0.cv.notify_all();
        }
    }
    inner.lock().threads += 1;
    // If spawning fails, the closure and its Exit are dropped, which
    // undoes the count.
    let exit = Exit(inner.clone());
    let h = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let exit = exit;
            f(&exit.0);
        })
        .unwrap_or_else(|e| panic!("cannot spawn a proxy thread: {e}"));
    let mut g = inner.lock();
    g.handles.retain(|h| !h.is_finished());
    g.handles.push(h);
}

impl Proxy {
    /// Listens on `listen` (e.g. `127.0.0.1:0`) and forwards each accepted
    /// connection to `target`, connecting from `source_ip` (bound before
    /// connecting, any port) so that the target sees the configured peer IP.
    pub fn start(listen: SocketAddr, target: SocketAddr, source_ip: IpAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                mode: Mode::Forward,
                delay: Duration::ZERO,
                stop: false,
                target,
                conns: HashMap::new(),
                next_id: 0,
                threads: 0,
                handles: Vec::new(),
                accepted: 0,
                refused: 0,
                corrupt: None,
                corrupted: 0,
                refuse_new: false,
            }),
            cv: Condvar::new(),
            source_ip,
            forwarded: [AtomicU64::new(0), AtomicU64::new(0)],
        });
        spawn(
            &inner,
            format!("proxy-accept-{}", addr.port()),
            move |inner| accept_loop(inner, listener),
        );
        Ok(Proxy {
            inner,
            addr,
            stopped: false,
        })
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address connections are forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.inner.lock().target
    }

    /// The source IP of the connections to the target.
    pub fn source_ip(&self) -> IpAddr {
        self.inner.source_ip
    }

    /// Forwards new connections to `target` (open ones are unaffected).
    pub fn set_target(&self, target: SocketAddr) {
        self.inner.lock().target = target;
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.inner.lock().mode
    }

    /// Partition: resets every open connection (RST to both sides) and
    /// resets new ones right after accepting them, until [`Proxy::heal`].
    pub fn partition(&self) {
        let mut g = self.inner.lock();
        g.mode = Mode::Partitioned;
        for c in g.conns.values_mut() {
            kill(c);
        }
        drop(g);
        self.inner.cv.notify_all();
    }

    /// Blackhole: keeps connections open (new ones too) but forwards
    /// nothing in either direction until [`Proxy::heal`]; the bytes are
    /// held (proxy buffer, then the senders' socket buffers) and delivered
    /// after healing.
    pub fn blackhole(&self) {
        self.set_mode(Mode::Blackholed);
    }

    /// Back to forwarding.
    pub fn heal(&self) {
        self.set_mode(Mode::Forward);
    }

    fn set_mode(&self, m: Mode) {
        self.inner.lock().mode = m;
        self.inner.cv.notify_all();
    }

    /// Delays every chunk read from now on by `d` (zero: none).
    pub fn set_delay(&self, d: Duration) {
        self.inner.lock().delay = d;
        self.inner.cv.notify_all();
    }

    /// Alters data in flight: flips one bit in the middle of the next
    /// chunk of at least `min_len` bytes forwarded from a client to the
    /// target (once).
    pub fn corrupt_next(&self, min_len: usize) {
        self.inner.lock().corrupt = Some(min_len.max(1));
    }

    /// While `on`, new connections are accepted and reset at once, while
    /// the open ones keep being forwarded (a peer that cannot reconnect
    /// after its connection dropped).
    pub fn refuse_new(&self, on: bool) {
        self.inner.lock().refuse_new = on;
    }

    /// Chunks altered by [`Proxy::corrupt_next`] so far.
    pub fn corrupted(&self) -> u64 {
        self.inner.lock().corrupted
    }

    /// Counters so far.
    pub fn stats(&self) -> ProxyStats {
        let g = self.inner.lock();
        ProxyStats {
            to_target: self.inner.forwarded[0].load(Ordering::Relaxed),
            to_client: self.inner.forwarded[1].load(Ordering::Relaxed),
            accepted: g.accepted,
            refused: g.refused,
            open: g.conns.len(),
        }
    }

    /// Waits until exactly `n` connections are open; false on timeout.
    pub fn wait_open(&self, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut g = self.inner.lock();
        loop {
            if g.conns.len() == n {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self.inner.wait_timeout(g, deadline - now);
        }
    }
}

impl Proxy {
    /// Stops the proxy as dropping it does; returns whether every thread
    /// finished in time (false: some were left running, which is a bug).
    pub fn shutdown(mut self) -> bool {
        self.stop()
    }

    fn stop(&mut self) -> bool {
        if self.stopped {
            return true;
        }
        self.stopped = true;
        let mut g = self.inner.lock();
        g.stop = true;
        for c in g.conns.values_mut() {
            kill(c);
        }
        drop(g);
        self.inner.cv.notify_all();
        // Wake the accept thread with a connection of our own; it sees
        // `stop` and closes the listener.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        let deadline = Instant::now() + STOP_LIMIT;
        let mut g = self.inner.lock();
        while g.threads > 0 {
            let now = Instant::now();
            if now >= deadline {
                eprintln!(
                    "proxy {}: {} thread(s) still running after {STOP_LIMIT:?}; leaving them",
                    self.addr, g.threads
                );
                return false;
            }
            g = self.inner.wait_timeout(g, deadline - now);
        }
        let handles = std::mem::take(&mut g.handles);
        drop(g);
        for h in handles {
            // Every thread has finished its work: join returns at once.
            let _ = h.join();
        }
        true
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(inner: &Arc<Inner>, listener: TcpListener) {
    loop {
        let res = listener.accept();
        let (target, mode, stop, refuse_new) = {
            let g = inner.lock();
            (g.target, g.mode, g.stop, g.refuse_new)
        };
        if stop {
            return;
        }
        let client = match res {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        if mode == Mode::Partitioned || refuse_new {
            refuse(inner, client);
            continue;
        }
        let server = match connect_from(inner.source_ip, target) {
            Ok(s) => s,
            Err(_) => {
                refuse(inner, client);
                continue;
            }
        };
        if let Err(e) = register(inner, client, server) {
            eprintln!("proxy: cannot set up a connection: {e}");
        }
    }
}

fn refuse(inner: &Inner, client: TcpStream) {
    // Counted before the client can see the reset.
    inner.lock().refused += 1;
    set_linger0(&client);
    drop(client);
}

fn register(inner: &Arc<Inner>, client: TcpStream, server: TcpStream) -> io::Result<()> {
    for s in [&client, &server] {
        s.set_nodelay(true)?;
        s.set_write_timeout(Some(WRITE_POLL))?;
        s.set_read_timeout(None)?;
    }
    let streams = [
        client.try_clone()?,
        server.try_clone()?,
        server.try_clone()?,
        client.try_clone()?,
    ];
    let mut g = inner.lock();
    if g.stop || g.mode == Mode::Partitioned {
        // Partitioned (or stopped) while connecting to the target.
        set_linger0(&server);
        drop(g);
        refuse(inner, client);
        return Ok(());
    }
    let id = g.next_id;
    g.next_id += 1;
    g.accepted += 1;
    g.conns.insert(
        id,
        Conn {
            client,
            server,
            pipes: Default::default(),
            dead: false,
            threads: 4,
        },
    );
    drop(g);
    inner.cv.notify_all();
    let [c_read, s_write, s_read, c_write] = streams;
    spawn(inner, format!("proxy-{id}-c2s-r"), move |i| {
        reader(i, id, 0, c_read)
    });
    spawn(inner, format!("proxy-{id}-c2s-w"), move |i| {
        writer(i, id, 0, s_write)
    });
    spawn(inner, format!("proxy-{id}-s2c-r"), move |i| {
        reader(i, id, 1, s_read)
    });
    spawn(inner, format!("proxy-{id}-s2c-w"), move |i| {
        writer(i, id, 1, c_write)
    });
    Ok(())
}

/// Called by each connection thread when it exits; the last one removes
/// the connection (dropping the remaining socket clones).
fn thread_done(inner: &Inner, id: u64) {
    let mut g = inner.lock();
    if let Some(c) = g.conns.get_mut(&id) {
        c.threads -= 1;
        if c.threads == 0 {
            g.conns.remove(&id);
        }
    }
    drop(g);
    inner.cv.notify_all();
}

/// Tears a connection down after an I/O error on one side: the other side
/// gets RST too.
fn fail(inner: &Inner, id: u64) {
    let mut g = inner.lock();
    if let Some(c) = g.conns.get_mut(&id) {
        kill(c);
    }
    drop(g);
    inner.cv.notify_all();
}

fn reader(inner: &Inner, id: u64, dir: usize, mut src: TcpStream) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let room = {
            let mut g = inner.lock();
            loop {
                if g.stop {
                    break 0;
                }
                let mode = g.mode;
                let Some(c) = g.conns.get(&id) else { break 0 };
                if c.dead {
                    break 0;
                }
                let bytes = c.pipes[dir].bytes;
                if mode != Mode::Blackholed && bytes < BUFFER_CAP {
                    break (BUFFER_CAP - bytes).min(CHUNK);
                }
                g = inner.wait(g);
            }
        };
        if room == 0 {
            break;
        }
        let res = src.read(&mut buf[..room]);
        let mut g = inner.lock();
        let delay = g.delay;
        let Some(c) = g.conns.get_mut(&id) else { break };
        if c.dead {
            break;
        }
        match res {
            Ok(0) => {
                c.pipes[dir].eof = true;
                drop(g);
                inner.cv.notify_all();
                break;
            }
            Ok(n) => {
                let corrupt = dir == 0 && g.corrupt.is_some_and(|min| n >= min);
                if corrupt {
                    g.corrupt = None;
                    g.corrupted += 1;
                    buf[n / 2] ^= 0x10;
                }
                let Some(c) = g.conns.get_mut(&id) else { break };
                let p = &mut c.pipes[dir];
                p.queue
                    .push_back((Instant::now() + delay, buf[..n].to_vec()));
                p.bytes += n;
                drop(g);
                inner.cv.notify_all();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                kill(c);
                drop(g);
                inner.cv.notify_all();
                break;
            }
        }
    }
    thread_done(inner, id);
}

/// What a writer does next.
enum Next {
    Write(Vec<u8>),
    HalfClose,
    Exit,
}

fn writer(inner: &Inner, id: u64, dir: usize, mut dst: TcpStream) {
    'outer: loop {
        let next = {
            let mut g = inner.lock();
            loop {
                if g.stop {
                    break Next::Exit;
                }
                let mode = g.mode;
                let Some(c) = g.conns.get_mut(&id) else {
                    break Next::Exit;
                };
                if c.dead {
                    break Next::Exit;
                }
                if mode == Mode::Blackholed {
                    g = inner.wait(g);
                    continue;
                }
                let p = &mut c.pipes[dir];
                match p.queue.front().map(|(due, _)| *due) {
                    Some(due) => {
                        let now = Instant::now();
                        if due <= now {
                            let (_, chunk) = p.queue.pop_front().expect("front");
                            p.bytes -= chunk.len();
                            drop(g);
                            // The reader may be waiting for room.
                            inner.cv.notify_all();
                            break Next::Write(chunk);
                        }
                        g = inner.wait_timeout(g, due - now);
                    }
                    None if p.eof => break Next::HalfClose,
                    None => g = inner.wait(g),
                }
            }
        };
        match next {
            Next::Exit => break,
            Next::HalfClose => {
                let _ = dst.shutdown(Shutdown::Write);
                break;
            }
            Next::Write(chunk) => {
                let mut off = 0;
                while off < chunk.len() {
                    match dst.write(&chunk[off..]) {
                        Ok(0) => {
                            fail(inner, id);
                            break 'outer;
                        }
                        Ok(n) => {
                            off += n;
                            inner.forwarded[dir].fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock
                                    | io::ErrorKind::TimedOut
                                    | io::ErrorKind::Interrupted
                            ) =>
                        {
                            let g = inner.lock();
                            let gone = g.stop || g.conns.get(&id).is_none_or(|c| c.dead);
                            if gone {
                                break 'outer;
                            }
                        }
                        Err(_) => {
                            fail(inner, id);
                            break 'outer;
                        }
                    }
                }
            }
        }
    }
    thread_done(inner, id);
}

/// A port on `ip` that is free now, preferably outside the kernel's
/// ephemeral range (so that no outgoing connection takes it meanwhile),
/// and never handed out twice by this process. Whoever binds it later must
/// still be ready for EADDRINUSE (another process may take it): retry with
/// a new port.
pub fn free_port(ip: IpAddr) -> u16 {
    use rand::Rng;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let eph_lo = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if eph_lo > 12000 {
        let mut rng = rand::thread_rng();
        for _ in 0..1000 {
            let port = rng.gen_range(10000..eph_lo);
            if !given.contains(&port) && TcpListener::bind(SocketAddr::new(ip, port)).is_ok() {
                given.push(port);
                return port;
            }
        }
    }
    // No room below the ephemeral range: let the kernel choose.
    for _ in 0..1000 {
        let l = TcpListener::bind(SocketAddr::new(ip, 0))
            .unwrap_or_else(|e| panic!("cannot bind {ip}:0: {e}"));
        let port = l.local_addr().expect("local_addr").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no free port on {ip}");
}
