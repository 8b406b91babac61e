//! The authenticated stream: after a handshake with a shared secret and
//! without TLS, every byte either side sends travels in records that carry
//! an HMAC-SHA256 under a key of that direction (see [`super::auth`]), so a
//! byte altered, injected, dropped, replayed or reordered on the wire is
//! detected before anything reads it, and the connection is dropped.
//!
//! A record (all integers little-endian):
//!
//! ```text
//! 0       4 length   bytes of data, 1 to MAX_RECORD
//! 4  length data     the next bytes of the stream (frames, cut anywhere)
//! …      32 mac      HMAC-SHA256(key of the direction, seq u64 || length u32 || data)
//! ```
//!
//! `seq` counts the records of one direction from 0 and is not sent: the
//! receiver counts too. The frames inside are unchanged (their crc32c
//! stays). [`Sealer`] and [`Opener`] are the pure codec; [`Sealed`] wraps
//! any async byte stream.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use hmac::Mac;

use super::auth::{HmacSha256, StreamKeys, KEY_LEN};

/// Largest record's data, bytes.
pub const MAX_RECORD: usize = 256 * 1024;
/// Bytes of a record's length field.
pub const LEN_BYTES: usize = 4;
/// Bytes of a record's MAC.
pub const TAG_LEN: usize = 32;
/// Bytes a record adds to its data.
pub const OVERHEAD: usize = LEN_BYTES + TAG_LEN;
/// Bytes read from the underlying stream at once, beyond a whole record.
const READ_AHEAD: usize = 64 * 1024;

/// Why the authenticated stream refused what it received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// A length field out of bounds.
    #[error(
        "authenticated stream: record {seq} announces {len} bytes (records carry 1 to {MAX_RECORD}); \
         the stream was altered on the wire"
    )]
    BadLength {
        /// The record's number in its direction.
        seq: u64,
        /// The length announced.
        len: u32,
    },
    /// A MAC that does not match.
    #[error(
        "authenticated stream: record {seq} does not carry a valid MAC: \
         data altered, injected or replayed on the wire"
    )]
    BadMac {
        /// The record's number in its direction.
        seq: u64,
    },
    /// The stream ended inside a record.
    #[error("authenticated stream: the connection ended inside record {seq}")]
    Truncated {
        /// The record's number in its direction.
        seq: u64,
    },
}

impl From<SealError> for io::Error {
    fn from(e: SealError) -> io::Error {
        let kind = match e {
            SealError::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, e)
    }
}

fn keyed(key: &[u8; KEY_LEN]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length")
}

fn record_mac(keyed: &HmacSha256, seq: u64, data: &[u8]) -> HmacSha256 {
    let mut m = keyed.clone();
    m.update(&seq.to_le_bytes());
    m.update(&(data.len() as u32).to_le_bytes());
    m.update(data);
    m
}

/// Seals the records of one direction.
pub struct Sealer {
    mac: HmacSha256,
    seq: u64,
}

impl Sealer {
    /// A sealer whose first record is number 0.
    pub fn new(key: &[u8; KEY_LEN]) -> Sealer {
        Sealer {
            mac: keyed(key),
            seq: 0,
        }
    }

    /// Appends the records carrying `data` to `out` (one record per
    /// [`MAX_RECORD`] bytes; nothing for empty data).
    pub fn seal(&mut self, data: &[u8], out: &mut Vec<u8>) {
        for chunk in data.chunks(MAX_RECORD) {
            out.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            out.extend_from_slice(chunk);
            let tag = record_mac(&self.mac, self.seq, chunk)
                .finalize()
                .into_bytes();
            out.extend_from_slice(&tag);
            self.seq += 1;
        }
    }
}

/// Checks the records of one direction.
pub struct Opener {
    mac: HmacSha256,
    seq: u64,
}

impl Opener {
    /// An opener expecting record number 0 first.
    pub fn new(key: &[u8; KEY_LEN]) -> Opener {
        Opener {
            mac: keyed(key),
            seq: 0,
        }
    }

    /// Looks at the record at the start of `buf`: `Ok(None)` while it is
    /// incomplete, `Ok(Some(len))` once it is whole and verified (its data
    /// is `buf[LEN_BYTES..LEN_BYTES + len]`, the record `len + OVERHEAD`
    /// bytes), an error for a bad length or MAC. A length is refused as
    /// soon as its four bytes are there.
    pub fn open(&mut self, buf: &[u8]) -> Result<Option<usize>, SealError> {
        let Some(head) = buf.get(..LEN_BYTES) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        if len == 0 || len as usize > MAX_RECORD {
            return Err(SealError::BadLength { seq: self.seq, len });
        }
        let len = len as usize;
        let Some(rest) = buf.get(LEN_BYTES..LEN_BYTES + len + TAG_LEN) else {
            return Ok(None);
        };
        let (data, tag) = rest.split_at(len);
        if record_mac(&self.mac, self.seq, data)
            .verify_slice(tag)
            .is_err()
        {
            return Err(SealError::BadMac { seq: self.seq });
        }
        self.seq += 1;
        Ok(Some(len))
    }

    /// The number of the next record expected.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// Any async byte stream, authenticated: what is written is sealed into
/// records, what is read is checked before it is returned. An error of
/// the received stream is sticky.
pub struct Sealed<S> {
    inner: S,
    sealer: Sealer,
    /// A sealed record not yet handed to `inner` (at most one).
    out: Vec<u8>,
    out_pos: usize,
    opener: Opener,
    /// Bytes received; `inbuf[start..filled]` is not yet parsed.
    inbuf: Vec<u8>,
    filled: usize,
    start: usize,
    /// Verified data not yet read.
    plain: std::ops::Range<usize>,
    eof: bool,
    failed: Option<SealError>,
    on_failure: Option<FailureHook>,
}

/// Called once when the stream fails its authentication.
type FailureHook = Box<dyn Fn(&SealError)>;

impl<S> Sealed<S> {
    /// Wraps `inner` with the keys of one side.
    pub fn new(inner: S, keys: &StreamKeys) -> Sealed<S> {
        Sealed {
            inner,
            sealer: Sealer::new(&keys.send),
            out: Vec::new(),
            out_pos: 0,
            opener: Opener::new(&keys.recv),
            inbuf: vec![0; MAX_RECORD + OVERHEAD + READ_AHEAD],
            filled: 0,
            start: 0,
            plain: 0..0,
            eof: false,
            failed: None,
            on_failure: None,
        }
    }

    /// Runs `f` once, when the received stream is first refused (to count
    /// it).
    pub fn on_failure(mut self, f: impl Fn(&SealError) + 'static) -> Self {
        self.on_failure = Some(Box::new(f));
        self
    }

    fn fail(&mut self, e: SealError) -> io::Error {
        if self.failed.is_none() {
            if let Some(f) = &self.on_failure {
                f(&e);
            }
            self.failed = Some(e.clone());
        }
        e.into()
    }
}

impl<S: AsyncWrite + Unpin> Sealed<S> {
    /// Hands the pending record to `inner`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sealed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        loop {
            if !me.plain.is_empty() {
                let n = me.plain.len().min(buf.len());
                buf[..n].copy_from_slice(&me.inbuf[me.plain.start..me.plain.start + n]);
                me.plain.start += n;
                return Poll::Ready(Ok(n));
            }
            if let Some(e) = &me.failed {
                return Poll::Ready(Err(e.clone().into()));
            }
            match me.opener.open(&me.inbuf[me.start..me.filled]) {
                Ok(Some(len)) => {
                    let data = me.start + LEN_BYTES;
                    me.plain = data..data + len;
                    me.start = data + len + TAG_LEN;
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(me.fail(e))),
            }
            if me.eof {
                if me.start == me.filled {
                    return Poll::Ready(Ok(0));
                }
                let seq = me.opener.seq();
                return Poll::Ready(Err(me.fail(SealError::Truncated { seq })));
            }
            if me.start > 0 {
                me.inbuf.copy_within(me.start..me.filled, 0);
                me.filled -= me.start;
                me.start = 0;
            }
            let n = ready!(Pin::new(&mut me.inner).poll_read(cx, &mut me.inbuf[me.filled..]))?;
            if n == 0 {
                me.eof = true;
            }
            me.filled += n;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sealed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_RECORD);
        me.sealer.seal(&buf[..n], &mut me.out);
        // Accepted: what `inner` does not take now leaves with the next
        // write, flush or close.
        if let Poll::Ready(Err(e)) = me.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::auth::{stream_keys, Secret, Side, Transcript};
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    use proptest::prelude::*;
    use std::cell::Cell;
    use std::rc::Rc;

    fn keys() -> (StreamKeys, StreamKeys) {
        let s = Secret::new(b"sixteen bytes at least").unwrap();
        let t = Transcript {
            version: 3,
            modes: 2,
            resource: "r".into(),
            primary_node: "a".into(),
            secondary_node: "b".into(),
            nonce_s: [3; 32],
            nonce_p: [4; 32],
            channel: Vec::new(),
        };
        (
            stream_keys(&s, Side::Primary, &t),
            stream_keys(&s, Side::Secondary, &t),
        )
    }

    fn sealed(data: &[&[u8]]) -> Vec<u8> {
        let (p, _) = keys();
        let mut s = Sealer::new(&p.send);
        let mut out = Vec::new();
        for d in data {
            s.seal(d, &mut out);
        }
        out
    }

    /// Opens every record of `wire`, returning the data or the error.
    fn open_all(wire: &[u8]) -> Result<Vec<u8>, SealError> {
        let (_, q) = keys();
        let mut o = Opener::new(&q.recv);
        let mut at = 0;
        let mut data = Vec::new();
        while at < wire.len() {
            match o.open(&wire[at..])? {
                Some(len) => {
                    data.extend_from_slice(&wire[at + LEN_BYTES..at + LEN_BYTES + len]);
                    at += len + OVERHEAD;
                }
                None => {
                    return Err(SealError::Truncated { seq: o.seq() });
                }
            }
        }
        Ok(data)
    }

    #[test]
    fn round_trip_and_layout() {
        let wire = sealed(&[b"hello", b" world"]);
        assert_eq!(wire.len(), 5 + 6 + 2 * OVERHEAD);
        assert_eq!(&wire[..4], &5u32.to_le_bytes());
        assert_eq!(&wire[4..9], b"hello");
        assert_eq!(open_all(&wire).unwrap(), b"hello world");
        // Big data is cut into records of at most MAX_RECORD bytes.
        let big = vec![7u8; MAX_RECORD * 2 + 5];
        let wire = sealed(&[&big]);
        assert_eq!(wire.len(), big.len() + 3 * OVERHEAD);
        assert_eq!(open_all(&wire).unwrap(), big);
    }

    #[test]
    fn tampering_is_refused() {
        let wire = sealed(&[b"first record", b"second record"]);
        // Every single bit flipped anywhere is detected.
        for bit in 0..wire.len() * 8 {
            let mut w = wire.clone();
            w[bit / 8] ^= 1 << (bit % 8);
            assert!(open_all(&w).is_err(), "flip of bit {bit} undetected");
        }
        // Reordered records, a dropped record, a replayed record.
        let first = 12 + OVERHEAD;
        let mut swapped = wire[first..].to_vec();
        swapped.extend_from_slice(&wire[..first]);
        assert_eq!(open_all(&swapped), Err(SealError::BadMac { seq: 0 }));
        assert_eq!(open_all(&wire[first..]), Err(SealError::BadMac { seq: 0 }));
        let mut replay = wire.clone();
        replay.extend_from_slice(&wire[..first]);
        assert_eq!(open_all(&replay), Err(SealError::BadMac { seq: 2 }));
        // A record sealed under the other direction's key.
        let (p, _) = keys();
        let mut wrong = Sealer::new(&p.recv);
        let mut w = Vec::new();
        wrong.seal(b"x", &mut w);
        assert_eq!(open_all(&w), Err(SealError::BadMac { seq: 0 }));
        // Lengths out of bounds are refused at once.
        let (_, q) = keys();
        let mut o = Opener::new(&q.recv);
        assert_eq!(
            o.open(&0u32.to_le_bytes()),
            Err(SealError::BadLength { seq: 0, len: 0 })
        );
        let huge = (MAX_RECORD as u32 + 1).to_le_bytes();
        assert!(matches!(o.open(&huge), Err(SealError::BadLength { .. })));
        assert_eq!(o.open(&wire[..10]), Ok(None));
    }

    proptest! {
        /// Arbitrary bytes never open (unless by a 2^-256 chance), never
        /// panic, and never make the opener ask for more than one record.
        #[test]
        fn garbage_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let (_, q) = keys();
            let mut o = Opener::new(&q.recv);
            prop_assert!(!matches!(o.open(&bytes), Ok(Some(_))));
        }

        #[test]
        fn any_cut_of_the_stream_round_trips(
            parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..3000), 1..6),
            read in 1usize..5000,
        ) {
            let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
            let wire = sealed(&refs);
            let want: Vec<u8> = parts.concat();
            // Through the async stream, read in chunks of `read` bytes.
            let got = run_read(wire, read);
            prop_assert_eq!(got.unwrap(), want);
        }
    }

    fn run_read(wire: Vec<u8>, chunk: usize) -> io::Result<Vec<u8>> {
        let (_, q) = keys();
        futures_lite::future::block_on(async move {
            let mut s = Sealed::new(futures_lite::io::Cursor::new(wire), &q);
            let mut out = Vec::new();
            let mut buf = vec![0u8; chunk];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok(out);
                }
                out.extend_from_slice(&buf[..n]);
            }
        })
    }

    #[test]
    fn async_stream_both_ways_and_sticky_failure() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let (p, q) = keys();
                let (a, b) = crate::pipe::pipe(4096);
                let fails = Rc::new(Cell::new(0));
                let mut a = Sealed::new(a, &p);
                let f2 = fails.clone();
                let mut b = Sealed::new(b, &q).on_failure(move |_| f2.set(f2.get() + 1));
                let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
                let d2 = data.clone();
                let w = glommio::spawn_local(async move {
                    a.write_all(&d2).await.unwrap();
                    a.flush().await.unwrap();
                    a
                });
                let mut got = vec![0u8; data.len()];
                b.read_exact(&mut got).await.unwrap();
                assert_eq!(got, data);
                let mut a = w.await;
                // And back.
                b.write_all(b"reply").await.unwrap();
                b.flush().await.unwrap();
                let mut r = [0u8; 5];
                a.read_exact(&mut r).await.unwrap();
                assert_eq!(&r, b"reply");
                assert_eq!(fails.get(), 0);
            })
            .unwrap()
            .join()
            .unwrap();
        // A tampered stream fails, and keeps failing; the hook runs once.
        let mut wire = sealed(&[b"abc", b"def"]);
        let last = wire.len() - 1;
        wire[last] ^= 0x80;
        let (_, q) = keys();
        let fails = Rc::new(Cell::new(0));
        let f2 = fails.clone();
        futures_lite::future::block_on(async move {
            let mut s = Sealed::new(futures_lite::io::Cursor::new(wire), &q)
                .on_failure(move |_| f2.set(f2.get() + 1));
            let mut b = [0u8; 3];
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"abc");
            let e = s.read_exact(&mut b).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(e.to_string().contains("record 1"), "{e}");
            assert!(s.read_exact(&mut b).await.is_err());
        });
        assert_eq!(fails.get(), 1);
        // A stream cut inside a record is an error, not a clean end.
        let wire = sealed(&[b"abcdef"]);
        let e = run_read(wire[..wire.len() - 3].to_vec(), 64).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
