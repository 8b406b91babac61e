//! TLS for the replication connection: rustls (TLS 1.3 only, ring), both
//! nodes presenting a certificate and verifying the peer's against the
//! resource's CA (`tlscert`, `tlskey`, `tlsca` in hast.conf).
//!
//! - The primary verifies that the secondary's certificate is signed by
//!   the CA and names the host of its `remote` address (a DNS name or an
//!   IP address subject alternative name); the secondary verifies the
//!   primary's the same way against *its* `remote`.
//! - The TLS handshake runs on the threads that connect and listen
//!   (blocking, [`handshake_blocking`]); the established connection moves
//!   to the executor inside a [`TlsStream`], which drives rustls over any
//!   async byte stream. No session tickets, no resumption: every
//!   connection is a full handshake.

use std::fmt;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};

use super::auth::{TLS_BINDING_LEN, TLS_EXPORTER_LABEL};

/// Plaintext and ciphertext rustls buffers per connection, at most.
const BUFFER_LIMIT: usize = 256 * 1024;

/// This node's certificate, key and CA for one resource, ready to make
/// connections.
#[derive(Clone)]
pub struct TlsIdentity {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    /// Where the CA came from (for messages).
    ca: String,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TlsIdentity(ca {})", self.ca)
    }
}

impl PartialEq for TlsIdentity {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.client, &other.client)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (`what` names it in errors).
fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what}: not a PEM certificate file: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{what}: no certificate found (expected PEM 'CERTIFICATE' blocks)"
        ));
    }
    Ok(certs)
}

impl TlsIdentity {
    /// From PEM contents: this node's certificate chain (`cert`), its
    /// private key (`key`) and the CA certificates peers must be signed by
    /// (`ca`). `names` are the three files, for messages.
    pub fn from_pem(
        cert: &[u8],
        key: &[u8],
        ca: &[u8],
        names: [&str; 3],
    ) -> Result<TlsIdentity, String> {
        let [cert_name, key_name, ca_name] = names;
        let chain = certs(cert, &format!("tlscert {cert_name}"))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
            format!("tlskey {key_name}: no private key found (expected a PEM private key): {e}")
        })?;
        let mut roots = RootCertStore::empty();
        for c in certs(ca, &format!("tlsca {ca_name}"))? {
            roots
                .add(c)
                .map_err(|e| format!("tlsca {ca_name}: not a usable CA certificate: {e}"))?;
        }
        let roots = Arc::new(roots);
        let p = provider();
        let client = ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| {
                format!("tlscert {cert_name} / tlskey {key_name}: the key does not fit: {e}")
            })?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, p.clone())
            .build()
            .map_err(|e| format!("tlsca {ca_name}: {e}"))?;
        let mut server = ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| {
                format!("tlscert {cert_name} / tlskey {key_name}: the key does not fit: {e}")
            })?;
        server.send_tls13_tickets = 0;
        Ok(TlsIdentity {
            client: Arc::new(client),
            server: Arc::new(server),
            ca: ca_name.to_owned(),
        })
    }

    /// A client connection to a peer known as `peer_name` (the host of
    /// `remote`).
    pub fn client(&self, peer_name: &str) -> Result<Connection, String> {
        let name = server_name(peer_name)?;
        let mut c =
            ClientConnection::new(self.client.clone(), name).map_err(|e| format!("TLS: {e}"))?;
        c.set_buffer_limit(Some(BUFFER_LIMIT));
        Ok(Connection::Client(c))
    }

    /// A server connection.
    pub fn server(&self) -> Result<Connection, String> {
        let mut c =
            rustls::ServerConnection::new(self.server.clone()).map_err(|e| format!("TLS: {e}"))?;
        c.set_buffer_limit(Some(BUFFER_LIMIT));
        Ok(Connection::Server(c))
    }

    /// The CA file (for messages).
    pub fn ca(&self) -> &str {
        &self.ca
    }
}

/// `host` (of an address, brackets of an IPv6 literal removed) as a TLS
/// name.
fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(h.to_owned())
        .map_err(|_| format!("'{host}' is neither a DNS name nor an IP address usable with TLS"))
}

/// Checks that the peer's certificate (already verified against the CA
/// by the handshake) names `peer_name`.
pub fn check_peer_name(conn: &Connection, peer_name: &str) -> Result<(), String> {
    let name = server_name(peer_name)?;
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("the peer presented no certificate")?;
    let parsed = rustls::server::ParsedCertificate::try_from(cert)
        .map_err(|e| format!("the peer's certificate cannot be parsed: {}", explain(&e)))?;
    rustls::client::verify_server_name(&parsed, &name).map_err(|_| {
        format!(
            "the peer's certificate does not name {peer_name} (the address this node knows it by)"
        )
    })
}

/// Bytes exported from the session for the authentication transcript.
pub fn binding(conn: &Connection) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; TLS_BINDING_LEN];
    conn.export_keying_material(&mut out, TLS_EXPORTER_LABEL, None)
        .map_err(|e| format!("TLS exporter: {e}"))?;
    Ok(out)
}

/// A rustls error in words an operator can act on.
pub fn explain(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => {
                "the peer's certificate is not signed by the CA in tlsca".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the peer's certificate does not name the address this node connects to".into()
            }
            C::Expired | C::ExpiredContext { .. } => "the peer's certificate has expired".into(),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the peer's certificate is not valid yet (check the clocks)".into()
            }
            C::Revoked => "the peer's certificate is revoked".into(),
            other => format!("the peer's certificate is not acceptable: {other:?}"),
        },
        E::NoCertificatesPresented => "the peer presented no certificate".into(),
        E::AlertReceived(a) => match a {
            A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::DecryptError => format!(
                "the peer refused this node's certificate (TLS alert {a:?}): \
                 is it signed by the peer's tlsca, and does it name this node's address?"
            ),
            A::CertificateExpired => {
                "the peer refused this node's certificate: it has expired".into()
            }
            A::CertificateRequired => {
                "the peer requires a certificate from this node (tlscert)".into()
            }
            other => format!("the peer ended the TLS handshake (alert {other:?})"),
        },
        other => format!("TLS error: {other}"),
    }
}

/// The rustls error inside an I/O error, explained; or the I/O error.
pub fn explain_io(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => explain(t),
        None => e.to_string(),
    }
}

/// Runs the TLS handshake over a blocking stream and sends what it left
/// to send.
pub fn handshake_blocking<T: Read + Write>(
    conn: &mut Connection,
    io: &mut T,
) -> Result<(), String> {
    while conn.is_handshaking() {
        conn.complete_io(io).map_err(|e| explain_io(&e))?;
    }
    while conn.wants_write() {
        conn.write_tls(io).map_err(|e| explain_io(&e))?;
    }
    Ok(())
}

/// Sends `bytes` in the TLS session over a blocking stream. If the peer
/// closed the connection, the alert it sent first (why it refused us) is
/// the error rather than the broken pipe.
pub fn send_blocking<T: Read + Write>(
    conn: &mut Connection,
    io: &mut T,
    bytes: &[u8],
) -> io::Result<()> {
    conn.writer().write_all(bytes)?;
    while conn.wants_write() {
        if let Err(e) = conn.write_tls(io) {
            return Err(pending_alert(conn, io).unwrap_or(e));
        }
    }
    io.flush()
}

/// The error of what the peer sent before it closed, if it was one.
fn pending_alert<T: Read>(conn: &mut Connection, io: &mut T) -> Option<io::Error> {
    for _ in 0..4 {
        match conn.read_tls(io) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {
                if let Err(e) = conn.process_new_packets() {
                    return Some(tls_error(e));
                }
            }
        }
    }
    None
}

/// Reads exactly `buf.len()` plaintext bytes of the TLS session over a
/// blocking stream.
pub fn read_exact_blocking<T: Read + Write>(
    conn: &mut Connection,
    io: &mut T,
    buf: &mut [u8],
) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        match conn.reader().read(&mut buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                at += n;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if conn.read_tls(io)? == 0 {
            // The reader reports how the stream ended.
            conn.process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            continue;
        }
        conn.process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        while conn.wants_write() {
            conn.write_tls(io)?;
        }
    }
    Ok(())
}

/// A blocking view of an async stream inside a poll: `Pending` becomes
/// `WouldBlock` (the waker is registered).
struct SyncIo<'a, 'b, S> {
    io: &'a mut S,
    cx: &'a mut Context<'b>,
}

impl<S: AsyncRead + Unpin> Read for SyncIo<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_read(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: AsyncWrite + Unpin> Write for SyncIo<'_, '_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.io).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match Pin::new(&mut *self.io).poll_flush(self.cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// An established (or starting) TLS connection over an async byte stream.
///
/// Reading never writes (the read and write halves of a split stream are
/// polled by different tasks, each waiting on its own direction): what
/// rustls has to send leaves with the next write or flush.
pub struct TlsStream<S> {
    inner: S,
    conn: Connection,
    /// TLS records taken from rustls, not yet handed to `inner`:
    /// `out[out_pos..]`. rustls hands out one record (16 KiB at most) per
    /// write, and the sockets write one buffer per call; gathering them
    /// here makes one write of a batch. Refilled only once empty, so it
    /// holds at most what rustls held ([`BUFFER_LIMIT`]).
    out: Vec<u8>,
    out_pos: usize,
}

impl<S> TlsStream<S> {
    /// Wraps `inner` with a rustls connection in any state.
    pub fn new(inner: S, conn: Connection) -> TlsStream<S> {
        TlsStream {
            inner,
            conn,
            out: Vec::new(),
            out_pos: 0,
        }
    }

    /// The rustls connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    /// Completes the handshake.
    pub async fn handshake(&mut self) -> io::Result<()> {
        futures_lite::future::poll_fn(|cx| {
            let me = &mut *self;
            loop {
                while me.conn.wants_write() {
                    let mut io = SyncIo {
                        io: &mut me.inner,
                        cx,
                    };
                    match me.conn.write_tls(&mut io) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                if !me.conn.is_handshaking() {
                    let mut io = SyncIo {
                        io: &mut me.inner,
                        cx,
                    };
                    return match io.flush() {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
                        r => Poll::Ready(r),
                    };
                }
                let mut io = SyncIo {
                    io: &mut me.inner,
                    cx,
                };
                match me.conn.read_tls(&mut io) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                    Ok(_) => {
                        if let Err(e) = me.conn.process_new_packets() {
                            // Tell the peer why (the alert), then fail.
                            let mut io = SyncIo {
                                io: &mut me.inner,
                                cx,
                            };
                            let _ = me.conn.write_tls(&mut io);
                            return Poll::Ready(Err(tls_error(e)));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        })
        .await
    }
}

impl<S: AsyncWrite + Unpin> TlsStream<S> {
    /// Hands rustls's pending records to `inner`: `Ready(Ok)` once all are
    /// taken.
    fn poll_push(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            while self.out_pos < self.out.len() {
                let n =
                    ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.out_pos += n;
            }
            self.out.clear();
            self.out_pos = 0;
            if !self.conn.wants_write() {
                return Poll::Ready(Ok(()));
            }
            // Everything rustls holds (at most its buffer limit), in one
            // buffer.
            while self.conn.wants_write() {
                self.conn.write_tls(&mut self.out)?;
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        loop {
            match me.conn.reader().read(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            let mut io = SyncIo {
                io: &mut me.inner,
                cx,
            };
            match me.conn.read_tls(&mut io) {
                Ok(_) => {
                    // At the end of the stream the reader reports how it
                    // ended (close_notify: 0 bytes; else UnexpectedEof).
                    me.conn.process_new_packets().map_err(tls_error)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        loop {
            let pushed = me.poll_push(cx)?;
            let n = me.conn.writer().write(buf)?;
            if n > 0 || buf.is_empty() {
                // Accepted; what `inner` does not take now leaves with the
                // next write or flush.
                if let Poll::Ready(Err(e)) = me.poll_push(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(n));
            }
            // rustls's buffer is full: wait until `inner` takes some.
            if pushed.is_pending() {
                return Poll::Pending;
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        me.conn.writer().flush()?;
        ready!(me.poll_push(cx))?;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        me.conn.send_close_notify();
        ready!(me.poll_push(cx))?;
        Pin::new(&mut me.inner).poll_close(cx)
    }
}

/// Test certificates (rcgen): a CA and certificates it signs.
#[cfg(test)]
pub(crate) mod testcerts {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};

    /// A CA.
    pub struct Ca {
        pub cert: rcgen::Certificate,
        pub key: KeyPair,
    }

    impl Ca {
        pub fn new(name: &str) -> Ca {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = p.self_signed(&key).unwrap();
            Ca { cert, key }
        }

        pub fn pem(&self) -> String {
            self.cert.pem()
        }

        /// A leaf certificate naming `names` (IP addresses or DNS names):
        /// (certificate PEM, key PEM).
        pub fn leaf(&self, names: &[&str]) -> (String, String) {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            for n in names {
                p.subject_alt_names
                    .push(match n.parse::<std::net::IpAddr>() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => SanType::DnsName((*n).try_into().unwrap()),
                    });
            }
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
            (cert.pem(), key.serialize_pem())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testcerts::Ca;
    use super::*;
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    use std::os::unix::net::UnixStream;

    fn identity(ca: &Ca, trusted: &Ca, names: &[&str]) -> TlsIdentity {
        let (c, k) = ca.leaf(names);
        TlsIdentity::from_pem(
            c.as_bytes(),
            k.as_bytes(),
            trusted.pem().as_bytes(),
            ["cert.pem", "key.pem", "ca.pem"],
        )
        .unwrap()
    }

    /// Runs a blocking handshake between a client for `peer_name` and a
    /// server; returns both outcomes and the connections.
    fn pair(
        client: &TlsIdentity,
        server: &TlsIdentity,
        peer_name: &str,
    ) -> (Result<Connection, String>, Result<Connection, String>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let mut s = server.server().unwrap();
        let t = std::thread::spawn(move || {
            let r = handshake_blocking(&mut s, &mut b);
            // Read one byte so that a refused client certificate shows.
            let mut one = [0u8; 1];
            let r = r.and_then(|()| {
                read_exact_blocking(&mut s, &mut b, &mut one).map_err(|e| explain_io(&e))
            });
            if r.is_err() {
                // As the listener does: let the client read our alert
                // before the connection goes.
                let _ = b.shutdown(std::net::Shutdown::Write);
                let _ = b.set_read_timeout(Some(std::time::Duration::from_secs(1)));
                let _ = b.read_to_end(&mut Vec::new());
            }
            r.map(|()| s)
        });
        let mut c = client.client(peer_name).unwrap();
        let r = handshake_blocking(&mut c, &mut a).and_then(|()| {
            send_blocking(&mut c, &mut a, b"x").map_err(|e| e.to_string())?;
            Ok(())
        });
        let srv = t.join().unwrap();
        // The client learns of a refused certificate when it reads next.
        let r = r.and_then(|()| {
            let mut one = [0u8; 1];
            let _ = a.set_read_timeout(Some(std::time::Duration::from_millis(300)));
            match read_exact_blocking(&mut c, &mut a, &mut one) {
                Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(explain_io(&e)),
                _ => Ok(()),
            }
        });
        (r.map(|()| c), srv)
    }

    #[test]
    fn mutual_verification() {
        let ca = Ca::new("cluster CA");
        let p = identity(&ca, &ca, &["127.0.0.1"]);
        let s = identity(&ca, &ca, &["127.0.0.2", "hastb.example"]);
        let (c, srv) = pair(&p, &s, "127.0.0.2");
        let (c, srv) = (c.unwrap(), srv.unwrap());
        // Both ends export the same binding; the server sees the client's
        // certificate and checks its name.
        assert_eq!(binding(&c).unwrap(), binding(&srv).unwrap());
        check_peer_name(&srv, "127.0.0.1").unwrap();
        let e = check_peer_name(&srv, "127.0.0.3").unwrap_err();
        assert!(e.contains("does not name 127.0.0.3"), "{e}");
        check_peer_name(&c, "hastb.example").unwrap();
        // By DNS name too.
        let (c, srv) = pair(&p, &s, "hastb.example");
        assert!(c.is_ok() && srv.is_ok());
    }

    #[test]
    fn refusals_say_why() {
        let ca = Ca::new("cluster CA");
        let rogue = Ca::new("rogue CA");
        let good_p = identity(&ca, &ca, &["127.0.0.1"]);
        let good_s = identity(&ca, &ca, &["127.0.0.2"]);
        // A server whose certificate another CA signed.
        let bad_s = identity(&rogue, &ca, &["127.0.0.2"]);
        let (c, _) = pair(&good_p, &bad_s, "127.0.0.2");
        let e = c.unwrap_err();
        assert!(e.contains("not signed by the CA in tlsca"), "{e}");
        // A server certificate for another name.
        let (c, _) = pair(&good_p, &good_s, "127.0.0.9");
        let e = c.unwrap_err();
        assert!(e.contains("does not name"), "{e}");
        // A client whose certificate another CA signed: the server says
        // why, the client learns it was refused.
        let bad_p = identity(&rogue, &ca, &["127.0.0.1"]);
        let (c, srv) = pair(&bad_p, &good_s, "127.0.0.2");
        let e = srv.unwrap_err();
        assert!(e.contains("not signed by the CA in tlsca"), "{e}");
        let e = c.unwrap_err();
        assert!(e.contains("refused this node's certificate"), "{e}");
    }

    #[test]
    fn bad_files_are_named() {
        let ca = Ca::new("ca");
        let (c, k) = ca.leaf(&["127.0.0.1"]);
        let names = ["/etc/c.pem", "/etc/k.pem", "/etc/ca.pem"];
        let e =
            TlsIdentity::from_pem(b"junk", k.as_bytes(), ca.pem().as_bytes(), names).unwrap_err();
        assert!(e.contains("tlscert /etc/c.pem"), "{e}");
        let e = TlsIdentity::from_pem(c.as_bytes(), b"", ca.pem().as_bytes(), names).unwrap_err();
        assert!(e.contains("tlskey /etc/k.pem"), "{e}");
        let e = TlsIdentity::from_pem(c.as_bytes(), k.as_bytes(), b"", names).unwrap_err();
        assert!(e.contains("tlsca /etc/ca.pem"), "{e}");
        // A key that is not the certificate's.
        let (_, other) = ca.leaf(&["127.0.0.1"]);
        let e = TlsIdentity::from_pem(c.as_bytes(), other.as_bytes(), ca.pem().as_bytes(), names)
            .unwrap_err();
        assert!(e.contains("does not fit"), "{e}");
    }

    #[test]
    fn async_stream_carries_data_both_ways() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let ca = Ca::new("ca");
                let p = identity(&ca, &ca, &["127.0.0.1"]);
                let s = identity(&ca, &ca, &["127.0.0.2"]);
                let (a, b) = crate::pipe::pipe(8192);
                let mut client = TlsStream::new(a, p.client("127.0.0.2").unwrap());
                let mut server = TlsStream::new(b, s.server().unwrap());
                let data: Vec<u8> = (0..(3 << 20) + 17).map(|i: u32| (i % 251) as u8).collect();
                let d2 = data.clone();
                let srv = glommio::spawn_local(async move {
                    server.handshake().await.unwrap();
                    let mut got = vec![0u8; d2.len()];
                    server.read_exact(&mut got).await.unwrap();
                    assert!(got == d2, "data intact");
                    server.write_all(b"thanks").await.unwrap();
                    server.flush().await.unwrap();
                    server.close().await.unwrap();
                    server
                });
                client.handshake().await.unwrap();
                client.write_all(&data).await.unwrap();
                client.flush().await.unwrap();
                let mut r = [0u8; 6];
                client.read_exact(&mut r).await.unwrap();
                assert_eq!(&r, b"thanks");
                // close_notify: a clean end of stream.
                let mut rest = Vec::new();
                client.read_to_end(&mut rest).await.unwrap();
                assert!(rest.is_empty());
                let server = srv.await;
                assert_eq!(
                    binding(client.connection()).unwrap(),
                    binding(server.connection()).unwrap()
                );
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
