//! A fake primary: a test thread speaking the replication protocol to a
//! real hastd secondary with blocking std sockets, through datapath's own
//! codec (`hast_datapath::peer::proto`), to act as a hostile or broken
//! peer would (floods, frames never answered, garbage after a valid
//! handshake).
//!
//! Everything that depends on how a connection is opened — today the
//! protocol 3 pre-session (datapath's own `presession::initiate`), then a
//! Hello and its HelloReply, see docs/protocol.md — is in [`FakePrimary::connect`]
//! (and [`hello`]): a change of the handshake (authentication, TLS) is
//! adapted there once, and every test built on this keeps working.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use hast_datapath::generation::Gen;
use hast_datapath::peer::presession::{self, PeerSecurity};
use hast_datapath::peer::proto::{
    Header, Hello, HelloReply, Kind, HEADER_LEN, PROTO_VERSION, PROTO_VERSION_MIN,
};

use crate::proxy::connect_from;

/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The Hello of a primary of `resource` with the given geometry and
/// counters.
pub fn hello(resource: &str, datasize: u64, extentsize: u32, gen: Gen) -> Hello {
    Hello {
        version_min: PROTO_VERSION_MIN,
        version_max: PROTO_VERSION,
        resource: resource.to_owned(),
        node: "fake-primary".to_owned(),
        datasize,
        extentsize,
        gen,
        flags: 0,
    }
}

/// A connection to a secondary on which the handshake was accepted.
pub struct FakePrimary {
    /// The connection (blocking; no timeouts after the handshake).
    pub stream: TcpStream,
    /// The secondary's answer to the Hello.
    pub reply: HelloReply,
    next_seq: u64,
}

impl FakePrimary {
    /// Connects from `source` (the IP the secondary expects its primary
    /// at) to `target` and completes the handshake with `hello`. A refusal
    /// is an error naming the reason.
    pub fn connect(source: IpAddr, target: SocketAddr, hello: &Hello) -> io::Result<FakePrimary> {
        let mut stream = connect_from(source, target)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
        // Protocol 3: the pre-session (introduction, Challenge; no secret
        // and no TLS here, so no Proofs), then the Hello.
        let sec = PeerSecurity::default();
        let intro = presession::introduction(&hello.resource, &hello.node, &sec);
        let opened =
            presession::initiate(&stream, &intro, &sec, Instant::now() + HANDSHAKE_TIMEOUT)
                .map_err(|e| io::Error::other(format!("pre-session: {e}")))?;
        if !matches!(opened.transport, presession::Transport::Plain) {
            return Err(io::Error::other(
                "the secondary asked for a secured session",
            ));
        }
        let body = hello.encode();
        let hdr = Header::request(Kind::Hello, 0, 0, 0, 0).with_payload(&body);
        stream.write_all(&hdr.encode())?;
        stream.write_all(&body)?;
        let rh = read_header(&mut stream)?;
        if rh.kind != Kind::HelloReply {
            return Err(io::Error::other(format!(
                "expected HelloReply, got {:?}",
                rh.kind
            )));
        }
        let mut payload = vec![0u8; rh.payload_len as usize];
        stream.read_exact(&mut payload)?;
        let reply = HelloReply::decode(&payload).map_err(|e| io::Error::other(e.to_string()))?;
        if let Some(r) = reply.refusal {
            return Err(io::Error::other(format!(
                "refused: {r:?}: {}",
                reply.message
            )));
        }
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
        Ok(FakePrimary {
            stream,
            reply,
            next_seq: 1,
        })
    }

    /// Sends one request with `payload` (a Write's data); returns its seq.
    pub fn request(
        &mut self,
        kind: Kind,
        flags: u8,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let hdr = Header::request(kind, flags, seq, offset, length).with_payload(payload);
        self.stream.write_all(&hdr.encode())?;
        self.stream.write_all(payload)?;
        Ok(seq)
    }

    /// A second handle on the connection (to read replies on another
    /// thread while this one sends).
    pub fn reader(&self) -> io::Result<TcpStream> {
        self.stream.try_clone()
    }
}

/// Reads and validates one frame header.
pub fn read_header(r: &mut impl Read) -> io::Result<Header> {
    let mut buf = [0u8; HEADER_LEN];
    r.read_exact(&mut buf)?;
    Header::decode(&buf).map_err(|e| io::Error::other(e.to_string()))
}

/// Reads one frame (header and payload).
pub fn read_frame(r: &mut impl Read) -> io::Result<(Header, Vec<u8>)> {
    let h = read_header(r)?;
    let mut payload = vec![0u8; h.payload_len as usize];
    r.read_exact(&mut payload)?;
    Ok((h, payload))
}
