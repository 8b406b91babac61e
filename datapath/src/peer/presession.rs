//! The start of every connection, before the session (protocol 3): the
//! introduction, the challenge, TLS and the proofs of the shared secret.
//! It runs on plain threads with blocking sockets and one deadline for
//! the whole of it — the primary's connecting thread, the secondary's
//! handshake thread — and yields a [`Transport`]: how the session's bytes
//! travel (plain, authenticated records, or TLS), which the executor then
//! wraps around the socket ([`Transport::stream`]).
//!
//! ```text
//! primary                                      secondary
//!  Hello (versions, resource, node,      --->  source address, resource,
//!         modes in flags; no state)             version, modes checked
//!                                        <---  Challenge (version, modes,
//!                                              node, nonce_s)  | HelloReply refusal
//!  [TLS handshake, both certificates verified]
//!  Proof (nonce_p, proof_p)              --->  proof_p checked
//!                                        <---  Proof (0, proof_s) | HelloReply AuthFailed
//!  proof_s checked
//!  session: Hello with state, HelloReply, requests ... in the transport
//! ```
//!
//! Nothing about the resource's state crosses before both proofs did (or,
//! without a secret, before the session Hello): refusals here carry no
//! counters or geometry.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncWrite};
use rustls::Connection;

use super::auth::{self, Nonce, Secret, Side, Transcript, NONCE_LEN, PROOF_LEN};
use super::frame::LinkError;
use super::proto::{
    modes, negotiate, Challenge, FrameError, Header, Hello, HelloReply, Kind, Proof, Refusal,
    HEADER_LEN, MAX_NODE_LEN, MAX_RESOURCE_LEN, PROTO_VERSION, PROTO_VERSION_MIN,
};
use super::remote::PeerStream;
use super::seal::Sealed;
use super::tls::{self, TlsIdentity, TlsStream};
use crate::generation::Gen;

/// Largest introduction payload: the fixed Hello and both names.
pub const MAX_INTRO_LEN: usize =
    super::proto::HELLO_FIXED_LEN + 2 + MAX_RESOURCE_LEN + 2 + MAX_NODE_LEN;

/// Largest pre-session reply a primary reads (a refusal with its message).
const MAX_REPLY_LEN: usize = super::proto::HELLO_REPLY_FIXED_LEN + 2 + 4096 + 4;

/// How a resource's connections are secured (`secret`/`secretfile`,
/// `tls`/`tlscert`/`tlskey`/`tlsca`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerSecurity {
    /// The shared secret both nodes prove.
    pub secret: Option<Secret>,
    /// This node's TLS identity when `tls on`.
    pub tls: Option<TlsIdentity>,
    /// The peer's host as this node knows it (the host of `remote`): the
    /// name its TLS certificate must carry.
    pub peer_name: String,
}

impl PeerSecurity {
    /// The [`modes`] bits of this configuration.
    pub fn modes(&self) -> u16 {
        let mut m = 0;
        if self.tls.is_some() {
            m |= modes::TLS;
        }
        if self.secret.is_some() {
            m |= modes::SECRET;
        }
        m
    }
}

/// How the session's bytes travel once the pre-session is done.
pub enum Transport {
    /// As they are (no secret, no TLS).
    Plain,
    /// In authenticated records ([`super::seal`]).
    Sealed(auth::StreamKeys),
    /// In the TLS session (with or without a secret).
    Tls(Box<Connection>),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Transport {
    /// "plain", "authenticated" or "TLS" (for logs).
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Plain => "plain",
            Transport::Sealed(_) => "authenticated",
            Transport::Tls(_) => "TLS",
        }
    }

    /// The session stream over `s`. `on_auth_failure` runs when received
    /// records fail their MAC (authenticated transport).
    pub fn stream<S>(self, s: S, on_auth_failure: impl Fn() + 'static) -> PeerStream
    where
        S: AsyncRead + AsyncWrite + Unpin + 'static,
    {
        match self {
            Transport::Plain => Box::new(s),
            Transport::Sealed(keys) => {
                Box::new(Sealed::new(s, &keys).on_failure(move |e| {
                    tracing::error!(error = %e, "the peer's stream failed authentication; closing the connection");
                    on_auth_failure();
                }))
            }
            // Reads under TLS are small (rustls reads 4 KiB at a time):
            // buffer them.
            Transport::Tls(conn) => Box::new(TlsStream::new(
                futures_lite::io::BufReader::with_capacity(256 * 1024, s),
                *conn,
            )),
        }
    }

    /// Sends one frame over a blocking socket in this transport (a
    /// refusal from a thread). Consumes the transport: its record keys
    /// seal from record 0 once, never twice.
    pub fn send_frame(self, sock: &mut TcpStream, hdr: &Header, body: &[u8]) -> io::Result<()> {
        let mut bytes = hdr.encode().to_vec();
        bytes.extend_from_slice(body);
        match self {
            Transport::Plain => sock.write_all(&bytes),
            Transport::Sealed(keys) => {
                let mut out = Vec::new();
                super::seal::Sealer::new(&keys.send).seal(&bytes, &mut out);
                sock.write_all(&out)
            }
            Transport::Tls(mut conn) => tls::send_blocking(&mut conn, sock, &bytes),
        }
    }
}

/// A socket whose every operation ends by one deadline.
pub struct Deadline<'a> {
    sock: &'a TcpStream,
    until: Instant,
}

impl<'a> Deadline<'a> {
    /// `sock`, every operation bounded by `until`.
    pub fn new(sock: &'a TcpStream, until: Instant) -> Deadline<'a> {
        Deadline { sock, until }
    }

    fn left(&self) -> io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake took longer than the peer timeout",
            ));
        }
        Ok(left)
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.sock).read(buf).map_err(timed_out)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.set_write_timeout(Some(self.left()?))?;
        (&mut &*self.sock).write(buf).map_err(timed_out)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A read timeout shows as WouldBlock on Linux: say what it is.
fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the handshake took longer than the peer timeout",
        )
    } else {
        e
    }
}

/// The pre-session channel: plain, or inside TLS once it is up.
pub struct Chan<'a> {
    io: Deadline<'a>,
    tls: Option<Connection>,
}

impl<'a> Chan<'a> {
    /// A plain channel over `io`.
    pub fn new(io: Deadline<'a>) -> Chan<'a> {
        Chan { io, tls: None }
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.tls {
            None => self.io.write_all(bytes),
            Some(c) => tls::send_blocking(c, &mut self.io, bytes),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        match &mut self.tls {
            None => self.io.read_exact(buf),
            Some(c) => tls::read_exact_blocking(c, &mut self.io, buf),
        }
    }

    /// Sends one frame.
    pub fn send(&mut self, hdr: Header, body: &[u8]) -> io::Result<()> {
        let mut bytes = hdr.with_payload(body).encode().to_vec();
        bytes.extend_from_slice(body);
        self.write_all(&bytes)
    }

    /// Sends a refusal without state (best effort).
    pub fn refuse(&mut self, why: Refusal, message: String) {
        let body = HelloReply {
            version: PROTO_VERSION,
            refusal: Some(why),
            message,
            datasize: 0,
            extentsize: 0,
            gen: Gen::default(),
            flags: 0,
            bitmap: Vec::new(),
        }
        .encode();
        let _ = self.send(Header::reply(Kind::HelloReply, 0, 0), &body);
    }

    /// Reads one frame of one of the `kinds`, its payload at most `max`
    /// bytes (checked before anything is allocated).
    pub fn recv(&mut self, kinds: &[Kind], max: usize) -> Result<(Header, Vec<u8>), String> {
        let mut head = [0u8; HEADER_LEN];
        self.read_exact(&mut head).map_err(|e| io_text(&e))?;
        let hdr = Header::decode(&head).map_err(|e| e.to_string())?;
        if !kinds.contains(&hdr.kind) {
            return Err(format!(
                "expected {}, got a {} frame",
                kinds
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(" or "),
                hdr.kind
            ));
        }
        if hdr.payload_len as usize > max {
            return Err(format!(
                "{} payload of {} bytes is larger than {max} bytes",
                hdr.kind, hdr.payload_len
            ));
        }
        let mut body = vec![0u8; hdr.payload_len as usize];
        self.read_exact(&mut body).map_err(|e| io_text(&e))?;
        hdr.check_payload(&body).map_err(|e| e.to_string())?;
        Ok((hdr, body))
    }

    /// Runs the TLS handshake on the channel (it continues inside TLS).
    pub fn start_tls(&mut self, mut conn: Connection) -> Result<(), String> {
        tls::handshake_blocking(&mut conn, &mut self.io)?;
        self.tls = Some(conn);
        Ok(())
    }

    /// The TLS connection, once started.
    pub fn tls(&self) -> Option<&Connection> {
        self.tls.as_ref()
    }

    /// Gives up the channel: its TLS connection, if any.
    pub fn into_tls(self) -> Option<Connection> {
        self.tls
    }
}

/// An I/O error of the handshake in words (TLS errors explained).
fn io_text(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => "the peer closed the connection".into(),
        _ => tls::explain_io(e),
    }
}

/// The transcript of this handshake.
fn transcript(
    version: u16,
    modes: u16,
    intro: &Hello,
    secondary_node: &str,
    nonce_s: Nonce,
    nonce_p: Nonce,
    chan: &Chan<'_>,
) -> Result<Transcript, String> {
    let channel = match chan.tls() {
        Some(c) => tls::binding(c)?,
        None => Vec::new(),
    };
    Ok(Transcript {
        version,
        modes,
        resource: intro.resource.clone(),
        primary_node: intro.node.clone(),
        secondary_node: secondary_node.to_owned(),
        nonce_s,
        nonce_p,
        channel,
    })
}

/// The primary's introduction: who it is and for which resource, its
/// version range and security modes, no state.
pub fn introduction(resource: &str, node: &str, sec: &PeerSecurity) -> Hello {
    Hello {
        version_min: PROTO_VERSION_MIN,
        version_max: PROTO_VERSION,
        resource: resource.to_owned(),
        node: node.to_owned(),
        datasize: 0,
        extentsize: 0,
        gen: Gen::default(),
        flags: modes::to_hello_flags(sec.modes()),
    }
}

/// What the primary learnt in the pre-session.
#[derive(Debug)]
pub struct Opened {
    /// How the session continues.
    pub transport: Transport,
    /// The secondary's node name.
    pub peer_node: String,
}

/// An authentication failure (counted, logged with its reason).
fn auth_error(msg: String) -> LinkError {
    LinkError::Auth(msg)
}

/// The primary's side of the pre-session over a connected socket.
pub fn initiate(
    sock: &TcpStream,
    intro: &Hello,
    sec: &PeerSecurity,
    until: Instant,
) -> Result<Opened, LinkError> {
    let mut chan = Chan::new(Deadline::new(sock, until));
    let io = |e: io::Error| LinkError::Io(std::sync::Arc::new(e));
    chan.send(Header::request(Kind::Hello, 0, 0, 0, 0), &intro.encode())
        .map_err(io)?;
    let (hdr, body) = chan
        .recv(&[Kind::Challenge, Kind::HelloReply], MAX_REPLY_LEN)
        .map_err(LinkError::Protocol)?;
    if hdr.kind == Kind::HelloReply {
        let r = HelloReply::decode(&body)?;
        return Err(LinkError::Refused {
            reason: r.refusal.unwrap_or(Refusal::Refused),
            message: r.message,
        });
    }
    let ch = Challenge::decode(&body)?;
    let mine = sec.modes();
    if negotiate(PROTO_VERSION_MIN, PROTO_VERSION, ch.version, ch.version).is_none() {
        return Err(LinkError::Protocol(format!(
            "the secondary chose protocol version {}, outside {PROTO_VERSION_MIN}..={PROTO_VERSION}",
            ch.version
        )));
    }
    if ch.modes != mine {
        return Err(auth_error(format!(
            "the secondary answered with {} but this node uses {}",
            modes::describe(ch.modes),
            modes::describe(mine)
        )));
    }
    if let Some(id) = &sec.tls {
        let conn = id.client(&sec.peer_name).map_err(auth_error)?;
        chan.start_tls(conn)
            .map_err(|e| auth_error(format!("TLS with the secondary failed: {e}")))?;
    }
    // With TLS or a secret, the Proofs end the pre-session (without a
    // secret they carry zeroes: the secondary's says it accepted our
    // certificate).
    let keys = if mine != 0 {
        prove_primary(&mut chan, sec.secret.as_ref(), intro, &ch)?
    } else {
        None
    };
    let transport = match (chan.into_tls(), keys) {
        (Some(conn), _) => Transport::Tls(Box::new(conn)),
        (None, Some(keys)) => Transport::Sealed(keys),
        (None, None) => Transport::Plain,
    };
    Ok(Opened {
        transport,
        peer_node: ch.node,
    })
}

/// The primary's proof, then the secondary's, checked; the stream keys
/// when there is a secret.
fn prove_primary(
    chan: &mut Chan<'_>,
    secret: Option<&Secret>,
    intro: &Hello,
    ch: &Challenge,
) -> Result<Option<auth::StreamKeys>, LinkError> {
    let nonce_p = match secret {
        Some(_) => auth::fresh_nonce(),
        None => [0; NONCE_LEN],
    };
    let t = transcript(
        ch.version, ch.modes, intro, &ch.node, ch.nonce, nonce_p, chan,
    )
    .map_err(auth_error)?;
    let mine = Proof {
        nonce: nonce_p,
        mac: secret.map_or([0; PROOF_LEN], |s| auth::proof(s, Side::Primary, &t)),
    };
    chan.send(Header::request(Kind::Proof, 0, 0, 0, 0), &mine.encode())
        .map_err(|e| LinkError::Io(std::sync::Arc::new(e)))?;
    let (hdr, body) = chan
        .recv(&[Kind::Proof, Kind::HelloReply], MAX_REPLY_LEN)
        .map_err(|e| auth_error(format!("waiting for the secondary's proof: {e}")))?;
    if hdr.kind == Kind::HelloReply {
        let r = HelloReply::decode(&body)?;
        return Err(LinkError::Refused {
            reason: r.refusal.unwrap_or(Refusal::Refused),
            message: r.message,
        });
    }
    let theirs = Proof::decode(&body)?;
    let Some(secret) = secret else {
        return Ok(None);
    };
    if !auth::verify(secret, Side::Secondary, &t, &theirs.mac) {
        return Err(auth_error(
            "the secondary's proof of the shared secret is wrong: it does not know the secret \
             (or the connection was tampered with)"
                .into(),
        ));
    }
    Ok(Some(auth::stream_keys(secret, Side::Primary, &t)))
}

/// Why the secondary's side of the pre-session ended without a session.
#[derive(Debug)]
pub struct Failure {
    /// What to log.
    pub message: String,
    /// An authentication failure (counted in `hastctl list`).
    pub auth: bool,
}

impl Failure {
    fn plain(message: String) -> Failure {
        Failure {
            message,
            auth: false,
        }
    }

    fn auth(message: String) -> Failure {
        Failure {
            message,
            auth: true,
        }
    }
}

/// Reads the introduction (bounded: at most [`MAX_INTRO_LEN`] bytes).
pub fn read_introduction(chan: &mut Chan<'_>) -> Result<Hello, String> {
    let (_, body) = chan.recv(&[Kind::Hello], MAX_INTRO_LEN)?;
    Hello::decode(&body).map_err(|e: FrameError| e.to_string())
}

/// The secondary's side of the pre-session, after the introduction was
/// read and its resource and source address checked: version, modes,
/// Challenge, TLS, proofs. `node` is this node's name.
pub fn respond(
    mut chan: Chan<'_>,
    intro: &Hello,
    node: &str,
    sec: &PeerSecurity,
) -> Result<Transport, Failure> {
    let Some(version) = negotiate(
        PROTO_VERSION_MIN,
        PROTO_VERSION,
        intro.version_min,
        intro.version_max,
    ) else {
        let msg = format!(
            "no common protocol version (ours {PROTO_VERSION_MIN}..={PROTO_VERSION}, theirs {}..={})",
            intro.version_min, intro.version_max
        );
        chan.refuse(Refusal::VersionUnsupported, msg.clone());
        return Err(Failure::plain(msg));
    };
    let theirs = modes::of_hello_flags(intro.flags);
    let mine = sec.modes();
    if theirs != mine {
        let msg = format!(
            "the primary uses {} but resource '{}' here has {}",
            modes::describe(theirs),
            intro.resource,
            modes::describe(mine)
        );
        chan.refuse(Refusal::AuthMismatch, msg.clone());
        return Err(Failure::auth(msg));
    }
    let nonce_s = match sec.secret {
        Some(_) => auth::fresh_nonce(),
        None => [0; NONCE_LEN],
    };
    let ch = Challenge {
        version,
        modes: mine,
        nonce: nonce_s,
        node: node.to_owned(),
    };
    chan.send(Header::reply(Kind::Challenge, 0, 0), &ch.encode())
        .map_err(|e| Failure::plain(format!("sending the challenge: {}", io_text(&e))))?;
    if let Some(id) = &sec.tls {
        let conn = id
            .server()
            .map_err(|e| Failure::auth(format!("TLS: {e}")))?;
        chan.start_tls(conn)
            .map_err(|e| Failure::auth(format!("TLS with the primary failed: {e}")))?;
        let checked = chan
            .tls()
            .map(|c| tls::check_peer_name(c, &sec.peer_name))
            .unwrap_or(Ok(()));
        if let Err(e) = checked {
            chan.refuse(Refusal::AuthFailed, e.clone());
            return Err(Failure::auth(format!("TLS with the primary refused: {e}")));
        }
    }
    let keys = if mine != 0 {
        prove_secondary(&mut chan, sec.secret.as_ref(), intro, &ch)?
    } else {
        None
    };
    Ok(match (chan.into_tls(), keys) {
        (Some(conn), _) => Transport::Tls(Box::new(conn)),
        (None, Some(keys)) => Transport::Sealed(keys),
        (None, None) => Transport::Plain,
    })
}

/// Checks the primary's proof, then sends ours; the stream keys when
/// there is a secret.
fn prove_secondary(
    chan: &mut Chan<'_>,
    secret: Option<&Secret>,
    intro: &Hello,
    ch: &Challenge,
) -> Result<Option<auth::StreamKeys>, Failure> {
    let (_, body) = chan
        .recv(&[Kind::Proof], super::proto::PROOF_LEN)
        .map_err(|e| Failure::auth(format!("waiting for the primary's proof: {e}")))?;
    let theirs = Proof::decode(&body).map_err(|e| Failure::auth(e.to_string()))?;
    let t = transcript(
        ch.version,
        ch.modes,
        intro,
        &ch.node,
        ch.nonce,
        theirs.nonce,
        chan,
    )
    .map_err(Failure::auth)?;
    let Some(secret) = secret else {
        chan.send(
            Header::request(Kind::Proof, 0, 0, 0, 0),
            &Proof {
                nonce: [0; NONCE_LEN],
                mac: [0; PROOF_LEN],
            }
            .encode(),
        )
        .map_err(|e| Failure::plain(format!("sending our proof: {}", io_text(&e))))?;
        return Ok(None);
    };
    if !auth::verify(secret, Side::Primary, &t, &theirs.mac) {
        let msg = "the primary's proof of the shared secret is wrong \
                   (a different secret on each node, or a replayed or forged handshake)"
            .to_string();
        chan.refuse(Refusal::AuthFailed, msg.clone());
        return Err(Failure::auth(msg));
    }
    let mine = Proof {
        nonce: [0; NONCE_LEN],
        mac: auth::proof(secret, Side::Secondary, &t),
    };
    chan.send(Header::request(Kind::Proof, 0, 0, 0, 0), &mine.encode())
        .map_err(|e| Failure::plain(format!("sending our proof: {}", io_text(&e))))?;
    Ok(Some(auth::stream_keys(secret, Side::Secondary, &t)))
}

#[cfg(test)]
mod tests {
    use super::super::tls::testcerts::Ca;
    use super::*;
    use std::net::TcpListener;

    const S1: &[u8] = b"the shared secret of the cluster";
    const S2: &[u8] = b"a different secret, also long";

    fn sec(secret: Option<&[u8]>, tls: Option<&TlsIdentity>, peer: &str) -> PeerSecurity {
        PeerSecurity {
            secret: secret.map(|s| Secret::new(s).unwrap()),
            tls: tls.cloned(),
            peer_name: peer.into(),
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    /// Runs both sides over loopback TCP.
    fn run(
        p: PeerSecurity,
        s: PeerSecurity,
    ) -> (Result<Opened, LinkError>, Result<Transport, Failure>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            let (sock, _) = l.accept().unwrap();
            let mut chan = Chan::new(Deadline::new(&sock, soon()));
            let intro = read_introduction(&mut chan).map_err(Failure::plain)?;
            assert_eq!(intro.resource, "r0");
            assert_eq!(intro.gen, Gen::default(), "no state in the introduction");
            respond(chan, &intro, "beta", &s)
        });
        let sock = TcpStream::connect(addr).unwrap();
        let intro = introduction("r0", "alpha", &p);
        let opened = initiate(&sock, &intro, &p, soon());
        drop(sock);
        (opened, srv.join().unwrap())
    }

    #[test]
    fn without_security_the_transport_is_plain() {
        let (p, s) = run(sec(None, None, ""), sec(None, None, ""));
        let p = p.unwrap();
        assert!(matches!(p.transport, Transport::Plain));
        assert_eq!(p.peer_node, "beta");
        assert!(matches!(s.unwrap(), Transport::Plain));
    }

    #[test]
    fn the_right_secret_gives_matching_keys() {
        let (p, s) = run(sec(Some(S1), None, ""), sec(Some(S1), None, ""));
        let (Transport::Sealed(pk), Transport::Sealed(sk)) = (p.unwrap().transport, s.unwrap())
        else {
            panic!("not sealed");
        };
        assert_eq!(pk.send, sk.recv);
        assert_eq!(pk.recv, sk.send);
    }

    #[test]
    fn a_wrong_secret_is_refused_on_both_sides() {
        let (p, s) = run(sec(Some(S2), None, ""), sec(Some(S1), None, ""));
        let e = s.unwrap_err();
        assert!(
            e.auth && e.message.contains("proof of the shared secret is wrong"),
            "{e:?}"
        );
        match p.unwrap_err() {
            LinkError::Refused { reason, message } => {
                assert_eq!(reason, Refusal::AuthFailed);
                assert!(message.contains("wrong"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_missing_secret_is_refused_either_way() {
        for (p, s) in [
            (sec(None, None, ""), sec(Some(S1), None, "")),
            (sec(Some(S1), None, ""), sec(None, None, "")),
        ] {
            let (pr, sr) = run(p, s);
            let e = sr.unwrap_err();
            assert!(e.auth && e.message.contains("the primary uses"), "{e:?}");
            match pr.unwrap_err() {
                LinkError::Refused { reason, message } => {
                    assert_eq!(reason, Refusal::AuthMismatch);
                    assert!(message.contains("secret"), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn tls_with_and_without_a_secret() {
        let ca = Ca::new("ca");
        let id = |n: &str| {
            let (c, k) = ca.leaf(&[n]);
            TlsIdentity::from_pem(
                c.as_bytes(),
                k.as_bytes(),
                ca.pem().as_bytes(),
                ["c", "k", "a"],
            )
            .unwrap()
        };
        let (pa, sb) = (id("127.0.0.1"), id("127.0.0.2"));
        for secret in [None, Some(S1)] {
            let (p, s) = run(
                sec(secret, Some(&pa), "127.0.0.2"),
                sec(secret, Some(&sb), "127.0.0.1"),
            );
            assert!(matches!(p.unwrap().transport, Transport::Tls(_)));
            assert!(matches!(s.unwrap(), Transport::Tls(_)));
        }
        // Inside TLS, a wrong secret is still refused.
        let (p, s) = run(
            sec(Some(S2), Some(&pa), "127.0.0.2"),
            sec(Some(S1), Some(&sb), "127.0.0.1"),
        );
        assert!(s.unwrap_err().message.contains("proof"));
        assert!(matches!(
            p.unwrap_err(),
            LinkError::Refused {
                reason: Refusal::AuthFailed,
                ..
            }
        ));
        // A primary certificate for another address.
        let other = id("127.0.0.9");
        let (p, s) = run(
            sec(None, Some(&other), "127.0.0.2"),
            sec(None, Some(&sb), "127.0.0.1"),
        );
        let e = s.unwrap_err();
        assert!(
            e.auth && e.message.contains("does not name 127.0.0.1"),
            "{e:?}"
        );
        let e = p.unwrap_err().to_string();
        assert!(
            e.contains("AuthFailed") && e.contains("does not name"),
            "{e}"
        );
        // An untrusted CA.
        let rogue = Ca::new("rogue");
        let (c, k) = rogue.leaf(&["127.0.0.1"]);
        let bad = TlsIdentity::from_pem(
            c.as_bytes(),
            k.as_bytes(),
            ca.pem().as_bytes(),
            ["c", "k", "a"],
        )
        .unwrap();
        let (p, s) = run(
            sec(None, Some(&bad), "127.0.0.2"),
            sec(None, Some(&sb), "127.0.0.1"),
        );
        let e = s.unwrap_err();
        assert!(e.message.contains("not signed by the CA in tlsca"), "{e:?}");
        let e = p.unwrap_err().to_string();
        assert!(e.contains("refused this node's certificate"), "{e}");
        // TLS on one side only.
        let (p, s) = run(sec(None, None, ""), sec(None, Some(&sb), "127.0.0.1"));
        assert!(s.unwrap_err().message.contains("TLS"));
        assert!(matches!(
            p.unwrap_err(),
            LinkError::Refused {
                reason: Refusal::AuthMismatch,
                ..
            }
        ));
    }

    /// A handshake recorded by a fake secondary (which chose its nonce)
    /// and replayed to the real one fails: the real one's nonce is fresh.
    #[test]
    fn a_replayed_handshake_fails() {
        let fake = TcpListener::bind("127.0.0.1:0").unwrap();
        let fake_addr = fake.local_addr().unwrap();
        let recorder = std::thread::spawn(move || {
            let (mut sock, _) = fake.accept().unwrap();
            let mut hello = vec![0u8; HEADER_LEN];
            sock.read_exact(&mut hello).unwrap();
            let hdr = Header::decode(&hello[..].try_into().unwrap()).unwrap();
            let mut body = vec![0u8; hdr.payload_len as usize];
            sock.read_exact(&mut body).unwrap();
            hello.extend_from_slice(&body);
            let ch = Challenge {
                version: PROTO_VERSION,
                modes: modes::SECRET,
                nonce: [0x42; 32],
                node: "beta".into(),
            };
            let mut c = Chan::new(Deadline::new(&sock, soon()));
            c.send(Header::reply(Kind::Challenge, 0, 0), &ch.encode())
                .unwrap();
            let mut proof = vec![0u8; HEADER_LEN + super::super::proto::PROOF_LEN];
            sock.read_exact(&mut proof).unwrap();
            (hello, proof)
        });
        let p = sec(Some(S1), None, "");
        let sock = TcpStream::connect(fake_addr).unwrap();
        let _ = initiate(&sock, &introduction("r0", "alpha", &p), &p, soon());
        let (hello, proof) = recorder.join().unwrap();
        drop(sock);
        // The replay, to the real secondary.
        let real = TcpListener::bind("127.0.0.1:0").unwrap();
        let real_addr = real.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            let (sock, _) = real.accept().unwrap();
            let mut chan = Chan::new(Deadline::new(&sock, soon()));
            let intro = read_introduction(&mut chan).unwrap();
            respond(chan, &intro, "beta", &sec(Some(S1), None, ""))
        });
        let mut attacker = TcpStream::connect(real_addr).unwrap();
        attacker.write_all(&hello).unwrap();
        let mut chan = Chan::new(Deadline::new(&attacker, soon()));
        let (_, body) = chan.recv(&[Kind::Challenge], 200).unwrap();
        assert_ne!(Challenge::decode(&body).unwrap().nonce, [0x42; 32]);
        attacker.write_all(&proof).unwrap();
        let mut chan = Chan::new(Deadline::new(&attacker, soon()));
        let (hdr, body) = chan.recv(&[Kind::HelloReply, Kind::Proof], 5000).unwrap();
        assert_eq!(hdr.kind, Kind::HelloReply);
        let r = HelloReply::decode(&body).unwrap();
        assert_eq!(r.refusal, Some(Refusal::AuthFailed));
        assert_eq!((r.gen, r.datasize), (Gen::default(), 0), "nothing revealed");
        let e = srv.join().unwrap().unwrap_err();
        assert!(e.auth, "{e:?}");
    }

    #[test]
    fn one_deadline_bounds_a_slow_peer() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut slow = TcpStream::connect(addr).unwrap();
        let (sock, _) = l.accept().unwrap();
        let t0 = Instant::now();
        let feeder = std::thread::spawn(move || {
            // One byte every 100 ms: each read succeeds, the whole fails.
            for _ in 0..20 {
                if slow.write_all(b"H").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let mut chan = Chan::new(Deadline::new(
            &sock,
            Instant::now() + Duration::from_millis(500),
        ));
        let e = read_introduction(&mut chan).unwrap_err();
        let took = t0.elapsed();
        assert!(e.contains("longer than the peer timeout"), "{e}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
        drop(sock);
        feeder.join().unwrap();
    }

    /// The secondary's pre-session fed what a hostile primary might send:
    /// `bytes` after a valid introduction, or instead of one. It never
    /// panics, never accepts without the secret, and reads at most the
    /// bounded frames (no allocation beyond `MAX_INTRO_LEN` / the Proof).
    fn respond_to(bytes: Vec<u8>, intro_first: bool) -> Result<Transport, String> {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).unwrap();
        let (sock, _) = l.accept().unwrap();
        let feeder = std::thread::spawn(move || {
            let secret = sec(Some(S1), None, "127.0.0.1");
            if intro_first {
                let intro = introduction("r0", "alpha", &secret).encode();
                let h = Header::request(Kind::Hello, 0, 0, 0, 0).with_payload(&intro);
                let _ = client.write_all(&h.encode());
                let _ = client.write_all(&intro);
            }
            let _ = client.write_all(&bytes);
            let _ = client.shutdown(std::net::Shutdown::Write);
            // Drain what the secondary answers until it closes.
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink);
        });
        let mut chan = Chan::new(Deadline::new(
            &sock,
            Instant::now() + Duration::from_secs(5),
        ));
        let out = read_introduction(&mut chan).and_then(|intro| {
            respond(chan, &intro, "beta", &sec(Some(S1), None, "127.0.0.1")).map_err(|f| f.message)
        });
        drop(sock);
        feeder.join().unwrap();
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        #[test]
        fn hostile_pre_session_bytes_are_refused(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            intro_first in proptest::prelude::any::<bool>(),
        ) {
            proptest::prop_assert!(respond_to(bytes, intro_first).is_err());
        }

        /// A well-formed Proof frame with arbitrary contents after a valid
        /// introduction (the closest a forger gets) is refused.
        #[test]
        fn forged_proofs_are_refused(body in proptest::collection::vec(proptest::prelude::any::<u8>(), NONCE_LEN + PROOF_LEN)) {
            let h = Header::request(Kind::Proof, 0, 1, 0, 0).with_payload(&body);
            let mut bytes = h.encode().to_vec();
            bytes.extend_from_slice(&body);
            proptest::prop_assert!(respond_to(bytes, true).is_err());
        }
    }
}
