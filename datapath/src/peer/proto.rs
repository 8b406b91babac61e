//! The replication wire protocol between the primary and the secondary
//! (pure: no I/O). Our own protocol, not FreeBSD's; see `docs/protocol.md`.
//!
//! Every frame is a 48-byte [`Header`] followed by `payload_len` bytes of
//! payload. All integers are little-endian. The header carries a crc32c of
//! itself and of the payload, so that a corrupted or foreign stream is
//! detected before anything touches the disk.
//!
//! ```text
//!  0 magic u32 "HSTP"   4 kind u8   5 flags u8   6 reserved u16
//!  8 seq u64           16 offset u64
//! 24 length u32        28 payload_len u32   32 status u32   36 payload_crc u32
//! 40 reserved u32      44 header_crc u32 (crc32c of bytes 0..44)
//! ```
//!
//! Control payloads ([`Hello`], [`HelloReply`], [`SyncComplete`]) are a
//! fixed little-endian struct followed by length-prefixed variable parts.
//! Decoders never panic and reject truncated input and trailing bytes.

use std::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::generation::Gen;

/// Size of a frame header.
pub const HEADER_LEN: usize = 48;
/// Magic at offset 0 of every header: the bytes `HSTP` read little-endian.
pub const MAGIC: u32 = 0x5054_5348;
/// Highest protocol version this build speaks.
pub const PROTO_VERSION: u16 = 1;
/// Lowest protocol version this build accepts.
pub const PROTO_VERSION_MIN: u16 = 1;
/// Largest data payload of a Write or ReadReply, and largest Read length.
pub const MAX_DATA: u32 = 32 << 20;
/// Largest payload of a Hello, HelloReply or SyncComplete (the bitmap of a
/// HelloReply dominates).
pub const MAX_CONTROL_PAYLOAD: u32 = 16 << 20;
/// Longest resource name in a Hello (bytes of UTF-8).
pub const MAX_RESOURCE_LEN: usize = 127;
/// Longest node name in a Hello (bytes of UTF-8).
pub const MAX_NODE_LEN: usize = 63;
/// Longest message in a HelloReply (bytes of UTF-8).
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Size of a SyncComplete payload.
pub const SYNC_COMPLETE_LEN: usize = 16;

/// Offset of `header_crc`; the checksum covers the bytes before it.
const HEADER_CRC_OFFSET: usize = 44;

/// Header flag bits.
pub mod flags {
    /// memsync: send `Received` as soon as the payload is in memory, then
    /// `Done` when the write completed.
    pub const WANT_RECEIVED: u8 = 1;
    /// Synchronisation traffic, not an application write.
    pub const SYNC: u8 = 2;
    /// The data must be durable (on stable storage) before `Done`.
    pub const FUA: u8 = 4;
    /// Every flag bit defined by protocol version 1; other bits are refused.
    pub const ALL: u8 = WANT_RECEIVED | SYNC | FUA;
}

/// Flag bits of [`Hello::flags`] and [`HelloReply::flags`].
pub mod hello_flags {
    /// The sender's data is mid-synchronisation (it was the destination of
    /// a synchronisation that did not complete): it must not be used as a
    /// synchronisation source.
    pub const INCONSISTENT: u64 = 1;
    /// Hello only: the primary has never been written (`localcnt == 0 &&
    /// remotecnt == 0` and nothing dirty), the `p_virgin` argument of
    /// [`decide`](crate::generation::decide), so that the secondary reaches
    /// the same decision.
    pub const VIRGIN: u64 = 2;
    /// HelloReply: the secondary's operator chose to discard its changes
    /// since a split-brain (`hastctl split-brain discard`).
    pub const DISCARD: u64 = 4;
    /// The sender's dirty map is empty: it changed no extent the peer
    /// lacks (used by the `splitbrain auto` policy).
    pub const CLEAN: u64 = 8;
}

/// Kind of a frame (header byte 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Primary → secondary: first frame of a connection ([`Hello`] payload).
    Hello = 1,
    /// Secondary → primary: answer to Hello ([`HelloReply`] payload).
    HelloReply = 2,
    /// Write the payload (`length` bytes) at `offset`.
    Write = 10,
    /// Write `length` zero bytes at `offset`; no payload.
    Zero = 11,
    /// Flush the secondary's disk write cache.
    Flush = 12,
    /// Read `length` bytes at `offset`; answered by ReadReply.
    Read = 13,
    /// Liveness probe of an idle connection; answered by KeepaliveReply.
    Keepalive = 14,
    /// The secondary is about to be synchronised: it marks itself
    /// inconsistent (persistently) and replies Done.
    SyncStart = 15,
    /// A synchronisation completed ([`SyncComplete`] payload): both nodes
    /// store the new generation; replied by Done.
    SyncComplete = 16,
    /// Orderly close (role change, shutdown); no reply.
    Bye = 17,
    /// memsync: the payload of request `seq` was received; the write is not
    /// yet done.
    Received = 20,
    /// Request `seq` completed; `status` is 0 or an errno.
    Done = 21,
    /// Answer to Read: the data (payload), or `status` ≠ 0 and no payload.
    ReadReply = 22,
    /// Answer to Keepalive.
    KeepaliveReply = 23,
}

impl Kind {
    /// Every kind, in code order.
    pub const ALL: [Kind; 14] = [
        Kind::Hello,
        Kind::HelloReply,
        Kind::Write,
        Kind::Zero,
        Kind::Flush,
        Kind::Read,
        Kind::Keepalive,
        Kind::SyncStart,
        Kind::SyncComplete,
        Kind::Bye,
        Kind::Received,
        Kind::Done,
        Kind::ReadReply,
        Kind::KeepaliveReply,
    ];

    /// Kind from its wire code.
    pub const fn from_u8(code: u8) -> Option<Kind> {
        Some(match code {
            1 => Kind::Hello,
            2 => Kind::HelloReply,
            10 => Kind::Write,
            11 => Kind::Zero,
            12 => Kind::Flush,
            13 => Kind::Read,
            14 => Kind::Keepalive,
            15 => Kind::SyncStart,
            16 => Kind::SyncComplete,
            17 => Kind::Bye,
            20 => Kind::Received,
            21 => Kind::Done,
            22 => Kind::ReadReply,
            23 => Kind::KeepaliveReply,
            _ => return None,
        })
    }

    /// Wire code of the kind.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Is this a request (sent by the primary, or Bye by either side), as
    /// opposed to a reply carrying the `seq` of a request?
    pub const fn is_request(self) -> bool {
        matches!(
            self,
            Kind::Hello
                | Kind::Write
                | Kind::Zero
                | Kind::Flush
                | Kind::Read
                | Kind::Keepalive
                | Kind::SyncStart
                | Kind::SyncComplete
                | Kind::Bye
        )
    }

    /// Is the payload disk data (Write, ReadReply)?
    pub const fn has_data_payload(self) -> bool {
        matches!(self, Kind::Write | Kind::ReadReply)
    }

    /// Largest `payload_len` a frame of this kind may announce.
    pub const fn max_payload(self) -> u32 {
        match self {
            Kind::Write | Kind::ReadReply => MAX_DATA,
            Kind::Hello | Kind::HelloReply => MAX_CONTROL_PAYLOAD,
            Kind::SyncComplete => SYNC_COMPLETE_LEN as u32,
            _ => 0,
        }
    }

    /// Name of the kind as written in logs and docs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Hello => "Hello",
            Kind::HelloReply => "HelloReply",
            Kind::Write => "Write",
            Kind::Zero => "Zero",
            Kind::Flush => "Flush",
            Kind::Read => "Read",
            Kind::Keepalive => "Keepalive",
            Kind::SyncStart => "SyncStart",
            Kind::SyncComplete => "SyncComplete",
            Kind::Bye => "Bye",
            Kind::Received => "Received",
            Kind::Done => "Done",
            Kind::ReadReply => "ReadReply",
            Kind::KeepaliveReply => "KeepaliveReply",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a frame or a control payload was rejected. Any of these closes the
/// connection without touching the disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The header does not start with our magic: the peer is not this HAST
    /// implementation, or the stream lost its framing.
    #[error(
        "not a HAST replication frame: magic {0:#010x}, expected {MAGIC:#010x} (\"HSTP\"); \
         the peer is not running this HAST implementation or the stream is out of step"
    )]
    BadMagic(u32),
    /// The header checksum does not match: the header was corrupted.
    #[error(
        "frame header checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): \
         the header was corrupted in transit"
    )]
    HeaderChecksum {
        /// crc32c stored in the header.
        stored: u32,
        /// crc32c computed over header bytes 0..44.
        computed: u32,
    },
    /// The payload checksum does not match: the payload was corrupted.
    #[error(
        "payload checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): \
         the data was corrupted in transit"
    )]
    PayloadChecksum {
        /// crc32c announced in the header.
        stored: u32,
        /// crc32c computed over the payload received.
        computed: u32,
    },
    /// The kind byte is not one this build knows.
    #[error("unknown frame kind {0} (the peer speaks a protocol this node does not know)")]
    UnknownKind(u8),
    /// Flag bits this build does not know.
    #[error("unknown flag bits {flags:#04x} in a {kind} frame")]
    UnknownFlags {
        /// Kind of the frame.
        kind: Kind,
        /// The unknown bits.
        flags: u8,
    },
    /// A reserved field is not zero.
    #[error("reserved field '{field}' is {value:#x}; it must be 0 in protocol version 1")]
    ReservedNonZero {
        /// Name of the field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// `length` / `payload_len` are not valid for the kind.
    #[error("bad {kind} frame (length {length}, payload {payload_len} bytes): {reason}")]
    BadLength {
        /// Kind of the frame.
        kind: Kind,
        /// The `length` field.
        length: u32,
        /// The `payload_len` field.
        payload_len: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// The payload handed to [`Header::check_payload`] is not the size the
    /// header announced.
    #[error("{kind} payload is {actual} bytes but the header announced {expected}")]
    PayloadLength {
        /// Kind of the frame.
        kind: Kind,
        /// `payload_len` of the header.
        expected: u32,
        /// Bytes received.
        actual: usize,
    },
    /// A control payload ended early.
    #[error("{what} truncated: {needed} bytes needed, only {actual} present")]
    Truncated {
        /// The payload or field being decoded.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        actual: usize,
    },
    /// A control payload has bytes after its last field.
    #[error("{what} has {extra} unexpected trailing bytes")]
    TrailingBytes {
        /// The payload being decoded.
        what: &'static str,
        /// Bytes left over.
        extra: usize,
    },
    /// Any other violation of the protocol.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// crc32c (Castagnoli) of a payload, as stored in `payload_crc`.
pub fn payload_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// The header exactly as sent.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy)]
#[repr(C)]
struct RawHeader {
    magic: U32,
    kind: u8,
    flags: u8,
    reserved0: U16,
    seq: U64,
    offset: U64,
    length: U32,
    payload_len: U32,
    status: U32,
    payload_crc: U32,
    reserved1: U32,
    header_crc: U32,
}

const _: () = assert!(core::mem::size_of::<RawHeader>() == HEADER_LEN);

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame is.
    pub kind: Kind,
    /// [`flags`] bits.
    pub flags: u8,
    /// Request sequence number; a reply carries the seq of its request.
    pub seq: u64,
    /// Byte offset in the data area (Write, Zero, Read).
    pub offset: u64,
    /// Bytes the request covers (Write, Zero, Read).
    pub length: u32,
    /// Bytes of payload following this header.
    pub payload_len: u32,
    /// Replies: 0 or an errno. Requests: 0.
    pub status: u32,
    /// crc32c of the payload; 0 when there is none.
    pub payload_crc: u32,
}

impl Header {
    /// A request header without payload (add one with
    /// [`Header::with_payload`]).
    pub const fn request(kind: Kind, flags: u8, seq: u64, offset: u64, length: u32) -> Header {
        Header {
            kind,
            flags,
            seq,
            offset,
            length,
            payload_len: 0,
            status: 0,
            payload_crc: 0,
        }
    }

    /// A reply header for request `seq` without payload.
    pub const fn reply(kind: Kind, seq: u64, status: u32) -> Header {
        Header {
            kind,
            flags: 0,
            seq,
            offset: 0,
            length: 0,
            payload_len: 0,
            status,
            payload_crc: 0,
        }
    }

    /// The header announcing `payload` (sets `payload_len` and
    /// `payload_crc`). A payload over 4 GiB is announced as `u32::MAX`
    /// bytes, which every receiver refuses.
    pub fn with_payload(self, payload: &[u8]) -> Header {
        Header {
            payload_len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            payload_crc: payload_crc(payload),
            ..self
        }
    }

    /// The 48 bytes sent on the wire, checksum included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let raw = RawHeader {
            magic: U32::new(MAGIC),
            kind: self.kind.code(),
            flags: self.flags,
            reserved0: U16::new(0),
            seq: U64::new(self.seq),
            offset: U64::new(self.offset),
            length: U32::new(self.length),
            payload_len: U32::new(self.payload_len),
            status: U32::new(self.status),
            payload_crc: U32::new(self.payload_crc),
            reserved1: U32::new(0),
            header_crc: U32::new(0),
        };
        let mut out: [u8; HEADER_LEN] = zerocopy::transmute!(raw);
        let crc = crc32c::crc32c(&out[..HEADER_CRC_OFFSET]);
        out[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and validates a header: magic, checksum, known kind and
    /// flags, reserved fields zero, `status` 0 in requests, and lengths
    /// valid for the kind (see `docs/protocol.md`).
    pub fn decode(buf: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
        let raw: RawHeader = zerocopy::transmute!(*buf);
        if raw.magic.get() != MAGIC {
            return Err(FrameError::BadMagic(raw.magic.get()));
        }
        let stored = raw.header_crc.get();
        let computed = crc32c::crc32c(&buf[..HEADER_CRC_OFFSET]);
        if stored != computed {
            return Err(FrameError::HeaderChecksum { stored, computed });
        }
        let kind = Kind::from_u8(raw.kind).ok_or(FrameError::UnknownKind(raw.kind))?;
        if raw.reserved0.get() != 0 {
            return Err(FrameError::ReservedNonZero {
                field: "header bytes 6..8",
                value: raw.reserved0.get().into(),
            });
        }
        if raw.reserved1.get() != 0 {
            return Err(FrameError::ReservedNonZero {
                field: "header bytes 40..44",
                value: raw.reserved1.get().into(),
            });
        }
        if raw.flags & !flags::ALL != 0 {
            return Err(FrameError::UnknownFlags {
                kind,
                flags: raw.flags & !flags::ALL,
            });
        }
        let h = Header {
            kind,
            flags: raw.flags,
            seq: raw.seq.get(),
            offset: raw.offset.get(),
            length: raw.length.get(),
            payload_len: raw.payload_len.get(),
            status: raw.status.get(),
            payload_crc: raw.payload_crc.get(),
        };
        if kind.is_request() && h.status != 0 {
            return Err(FrameError::Malformed(format!(
                "{kind} request carries status {}; requests carry 0",
                h.status
            )));
        }
        if h.payload_len == 0 && h.payload_crc != 0 {
            return Err(FrameError::Malformed(format!(
                "{kind} frame without payload carries payload checksum {:#010x}; it must be 0",
                h.payload_crc
            )));
        }
        h.check_lengths()?;
        Ok(h)
    }

    /// The per-kind rules on `length` and `payload_len`.
    fn check_lengths(&self) -> Result<(), FrameError> {
        let bad = |reason: &'static str| {
            Err(FrameError::BadLength {
                kind: self.kind,
                length: self.length,
                payload_len: self.payload_len,
                reason,
            })
        };
        let max = self.kind.max_payload();
        if self.payload_len > max {
            return bad(match self.kind {
                Kind::Write | Kind::ReadReply => "payload exceeds the 32 MiB data limit",
                Kind::Hello | Kind::HelloReply => {
                    "payload exceeds the 16 MiB control payload limit"
                }
                Kind::SyncComplete => "a SyncComplete payload is exactly 16 bytes",
                _ => "this kind carries no payload",
            });
        }
        match self.kind {
            Kind::Write if self.payload_len != self.length => {
                bad("a Write's payload must be exactly its length")
            }
            Kind::Read if self.length > MAX_DATA => bad("a Read may cover at most 32 MiB"),
            Kind::Write | Kind::Zero | Kind::Read
                if self.offset.checked_add(self.length.into()).is_none() =>
            {
                bad("offset + length overflows")
            }
            Kind::SyncComplete if self.payload_len as usize != SYNC_COMPLETE_LEN => {
                bad("a SyncComplete payload is exactly 16 bytes")
            }
            Kind::ReadReply if self.status != 0 && self.payload_len != 0 => {
                bad("a failed ReadReply carries no data")
            }
            _ => Ok(()),
        }
    }

    /// Checks a received payload against `payload_len` and `payload_crc`.
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), FrameError> {
        if payload.len() != self.payload_len as usize {
            return Err(FrameError::PayloadLength {
                kind: self.kind,
                expected: self.payload_len,
                actual: payload.len(),
            });
        }
        let computed = payload_crc(payload);
        if computed != self.payload_crc {
            return Err(FrameError::PayloadChecksum {
                stored: self.payload_crc,
                computed,
            });
        }
        Ok(())
    }

    /// Is the flag `bit` (from [`flags`]) set?
    pub const fn has_flag(&self, bit: u8) -> bool {
        self.flags & bit != 0
    }
}

/// Highest protocol version in both ranges, `None` when they do not
/// overlap (or a range is empty).
pub fn negotiate(ours_min: u16, ours_max: u16, theirs_min: u16, theirs_max: u16) -> Option<u16> {
    let lo = ours_min.max(theirs_min);
    let hi = ours_max.min(theirs_max);
    (lo <= hi).then_some(hi)
}

/// Bytes of a dirty bitmap for `datasize` bytes in extents of
/// `extentsize` bytes: one bit per extent, LSB first, rounded up to whole
/// bytes (`ceil(ceil(datasize / extentsize) / 8)`; 0 when `extentsize` is 0).
pub fn bitmap_len(datasize: u64, extentsize: u32) -> u64 {
    if extentsize == 0 {
        return 0;
    }
    datasize.div_ceil(u64::from(extentsize)).div_ceil(8)
}

// ---- control payloads --------------------------------------------------

/// Cursor over a control payload.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Truncated {
                what: self.what,
                needed: n,
                actual: self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn fixed<T: FromBytes + KnownLayout + Immutable>(&mut self) -> Result<T, FrameError> {
        let bytes = self.take(core::mem::size_of::<T>())?;
        T::read_from_bytes(bytes)
            .map_err(|_| FrameError::Malformed(format!("{} layout", self.what)))
    }

    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(self.fixed::<U16>()?.get())
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(self.fixed::<U32>()?.get())
    }

    /// A u16-length-prefixed UTF-8 string of at most `max` bytes.
    fn string(&mut self, field: &str, max: usize) -> Result<String, FrameError> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(FrameError::Malformed(format!(
                "{} {field} is {len} bytes, at most {max} allowed",
                self.what
            )));
        }
        let bytes = self.take(len)?;
        let s = std::str::from_utf8(bytes).map_err(|_| {
            FrameError::Malformed(format!("{} {field} is not valid UTF-8", self.what))
        })?;
        if s.contains('\0') {
            return Err(FrameError::Malformed(format!(
                "{} {field} contains a NUL byte",
                self.what
            )));
        }
        Ok(s.to_owned())
    }

    fn finish(self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::TrailingBytes {
                what: self.what,
                extra: self.buf.len(),
            })
        }
    }
}

/// Appends a u16-length-prefixed string (cut at 65535 bytes; the receiver
/// refuses anything over the field's limit anyway).
fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
    let len = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

fn reserved_zero(field: &'static str, value: u64) -> Result<(), FrameError> {
    if value == 0 {
        Ok(())
    } else {
        Err(FrameError::ReservedNonZero { field, value })
    }
}

/// Fixed part of a Hello payload (56 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawHello {
    version_min: U16,
    version_max: U16,
    reserved0: U32,
    datasize: U64,
    extentsize: U32,
    reserved1: U32,
    resuid: U64,
    localcnt: U64,
    remotecnt: U64,
    flags: U64,
}

/// Size of the fixed part of a Hello payload.
pub const HELLO_FIXED_LEN: usize = 56;
const _: () = assert!(core::mem::size_of::<RawHello>() == HELLO_FIXED_LEN);

/// Payload of a Hello: the primary introduces itself and its resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Lowest protocol version the primary accepts.
    pub version_min: u16,
    /// Highest protocol version the primary speaks.
    pub version_max: u16,
    /// Resource name (1 to 127 bytes of UTF-8, no NUL).
    pub resource: String,
    /// The primary's node name (at most 63 bytes of UTF-8, no NUL).
    pub node: String,
    /// The primary's data area size, bytes.
    pub datasize: u64,
    /// The primary's extent size, bytes.
    pub extentsize: u32,
    /// The primary's generation counters.
    pub gen: Gen,
    /// [`hello_flags`] bits; unknown bits are preserved and ignored.
    pub flags: u64,
}

impl Hello {
    /// Encodes the payload. Limits are not checked here: an invalid Hello
    /// (see [`Hello::validate`]) is refused by the receiver.
    pub fn encode(&self) -> Vec<u8> {
        let raw = RawHello {
            version_min: U16::new(self.version_min),
            version_max: U16::new(self.version_max),
            reserved0: U32::new(0),
            datasize: U64::new(self.datasize),
            extentsize: U32::new(self.extentsize),
            reserved1: U32::new(0),
            resuid: U64::new(self.gen.resuid),
            localcnt: U64::new(self.gen.localcnt),
            remotecnt: U64::new(self.gen.remotecnt),
            flags: U64::new(self.flags),
        };
        let mut out =
            Vec::with_capacity(HELLO_FIXED_LEN + 4 + self.resource.len() + self.node.len());
        out.extend_from_slice(raw.as_bytes());
        put_str(&mut out, &self.resource);
        put_str(&mut out, &self.node);
        out
    }

    /// Decodes and validates a Hello payload.
    pub fn decode(payload: &[u8]) -> Result<Hello, FrameError> {
        let mut r = Reader {
            buf: payload,
            what: "Hello",
        };
        let raw: RawHello = r.fixed()?;
        reserved_zero("Hello bytes 4..8", raw.reserved0.get().into())?;
        reserved_zero("Hello bytes 20..24", raw.reserved1.get().into())?;
        let resource = r.string("resource name", MAX_RESOURCE_LEN)?;
        let node = r.string("node name", MAX_NODE_LEN)?;
        r.finish()?;
        let hello = Hello {
            version_min: raw.version_min.get(),
            version_max: raw.version_max.get(),
            resource,
            node,
            datasize: raw.datasize.get(),
            extentsize: raw.extentsize.get(),
            gen: Gen {
                resuid: raw.resuid.get(),
                localcnt: raw.localcnt.get(),
                remotecnt: raw.remotecnt.get(),
            },
            flags: raw.flags.get(),
        };
        hello.validate()?;
        Ok(hello)
    }

    /// Checks the limits a receiver enforces: a non-empty version range not
    /// containing 0, a resource name of 1 to 127 bytes and a node name of at
    /// most 63 bytes, both without NUL.
    pub fn validate(&self) -> Result<(), FrameError> {
        if self.version_min == 0 || self.version_min > self.version_max {
            return Err(FrameError::Malformed(format!(
                "Hello version range {}..={} is empty or contains 0",
                self.version_min, self.version_max
            )));
        }
        check_str("Hello resource name", &self.resource, 1, MAX_RESOURCE_LEN)?;
        check_str("Hello node name", &self.node, 0, MAX_NODE_LEN)
    }

    /// The version range of a Hello payload, read from its first four
    /// bytes (frozen in every protocol version) even when the rest cannot
    /// be decoded: lets a secondary answer `VersionUnsupported`.
    pub fn peek_versions(payload: &[u8]) -> Option<(u16, u16)> {
        let min = payload.get(0..2)?;
        let max = payload.get(2..4)?;
        Some((
            u16::from_le_bytes([min[0], min[1]]),
            u16::from_le_bytes([max[0], max[1]]),
        ))
    }

    /// Is the sender mid-synchronisation ([`hello_flags::INCONSISTENT`])?
    pub const fn is_inconsistent(&self) -> bool {
        self.flags & hello_flags::INCONSISTENT != 0
    }
}

fn check_str(what: &str, s: &str, min: usize, max: usize) -> Result<(), FrameError> {
    if s.len() < min || s.len() > max || s.contains('\0') {
        return Err(FrameError::Malformed(format!(
            "{what} is {} bytes; it must be {min} to {max} bytes without NUL",
            s.len()
        )));
    }
    Ok(())
}

/// Why a secondary refused a Hello (HelloReply `refusal`, never 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Refusal {
    /// The secondary has no resource of that name.
    UnknownResource = 1,
    /// The resource is not in role secondary on the peer.
    NotSecondary = 2,
    /// datasize or extentsize differ between the nodes.
    GeometryMismatch = 3,
    /// The nodes hold different resource instances (resuid differs).
    ResuidMismatch = 4,
    /// Both nodes wrote while disconnected.
    SplitBrain = 5,
    /// No common protocol version.
    VersionUnsupported = 6,
    /// The resource already has a connected primary.
    Busy = 7,
    /// The generation counters contradict each other.
    InconsistentCounters = 8,
    /// Any other reason (see the message); also what an unknown code
    /// received from a newer peer decodes as.
    Refused = 9,
}

impl Refusal {
    /// Every refusal, in code order.
    pub const ALL: [Refusal; 9] = [
        Refusal::UnknownResource,
        Refusal::NotSecondary,
        Refusal::GeometryMismatch,
        Refusal::ResuidMismatch,
        Refusal::SplitBrain,
        Refusal::VersionUnsupported,
        Refusal::Busy,
        Refusal::InconsistentCounters,
        Refusal::Refused,
    ];

    /// Wire code.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// Refusal from its wire code; `None` for 0 (accepted) and unknown codes.
    pub const fn from_code(code: u16) -> Option<Refusal> {
        Some(match code {
            1 => Refusal::UnknownResource,
            2 => Refusal::NotSecondary,
            3 => Refusal::GeometryMismatch,
            4 => Refusal::ResuidMismatch,
            5 => Refusal::SplitBrain,
            6 => Refusal::VersionUnsupported,
            7 => Refusal::Busy,
            8 => Refusal::InconsistentCounters,
            9 => Refusal::Refused,
            _ => return None,
        })
    }

    /// The refusal matching a refusing [`Decision`](crate::generation::Decision).
    pub const fn from_decision(d: &crate::generation::Decision) -> Option<Refusal> {
        use crate::generation::Decision;
        match d {
            Decision::ResuidMismatch => Some(Refusal::ResuidMismatch),
            Decision::SplitBrain => Some(Refusal::SplitBrain),
            Decision::Inconsistent => Some(Refusal::InconsistentCounters),
            _ => None,
        }
    }

    /// Short description for logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownResource => "unknown resource",
            Refusal::NotSecondary => "resource is not secondary on the peer",
            Refusal::GeometryMismatch => "data size or extent size differ",
            Refusal::ResuidMismatch => "different resource instance (resuid differs)",
            Refusal::SplitBrain => "split brain",
            Refusal::VersionUnsupported => "no common protocol version",
            Refusal::Busy => "resource already connected to a primary",
            Refusal::InconsistentCounters => "generation counters are inconsistent",
            Refusal::Refused => "refused",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Fixed part of a HelloReply payload (48 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawHelloReply {
    version: U16,
    refusal: U16,
    extentsize: U32,
    datasize: U64,
    resuid: U64,
    localcnt: U64,
    remotecnt: U64,
    flags: U64,
}

/// Size of the fixed part of a HelloReply payload.
pub const HELLO_REPLY_FIXED_LEN: usize = 48;
const _: () = assert!(core::mem::size_of::<RawHelloReply>() == HELLO_REPLY_FIXED_LEN);

/// Payload of a HelloReply: the secondary accepts (with its counters and
/// dirty bitmap) or refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    /// Accepted: the negotiated version (≥ 1). Refused: the secondary's
    /// highest version (informational).
    pub version: u16,
    /// `None` when accepted.
    pub refusal: Option<Refusal>,
    /// Human explanation, mainly of a refusal (at most 4096 bytes UTF-8).
    pub message: String,
    /// The secondary's data area size, bytes (non-zero when accepted).
    pub datasize: u64,
    /// The secondary's extent size, bytes (non-zero when accepted).
    pub extentsize: u32,
    /// The secondary's generation counters.
    pub gen: Gen,
    /// [`hello_flags`] bits; unknown bits are preserved and ignored.
    pub flags: u64,
    /// Accepted: the secondary's dirty extents, one bit per extent, LSB
    /// first, exactly [`bitmap_len`]`(datasize, extentsize)` bytes (bits
    /// past the last extent are sent as 0 and ignored). Refused: empty.
    pub bitmap: Vec<u8>,
}

impl HelloReply {
    /// A refusal with an explanation (no geometry, counters or bitmap).
    pub fn refused(refusal: Refusal, message: impl Into<String>) -> HelloReply {
        HelloReply {
            version: PROTO_VERSION,
            refusal: Some(refusal),
            message: message.into(),
            datasize: 0,
            extentsize: 0,
            gen: Gen::default(),
            flags: 0,
            bitmap: Vec::new(),
        }
    }

    /// Encodes the payload. Limits are not checked here: an invalid reply
    /// (see [`HelloReply::validate`]) is refused by the receiver.
    pub fn encode(&self) -> Vec<u8> {
        let raw = RawHelloReply {
            version: U16::new(self.version),
            refusal: U16::new(self.refusal.map_or(0, Refusal::code)),
            extentsize: U32::new(self.extentsize),
            datasize: U64::new(self.datasize),
            resuid: U64::new(self.gen.resuid),
            localcnt: U64::new(self.gen.localcnt),
            remotecnt: U64::new(self.gen.remotecnt),
            flags: U64::new(self.flags),
        };
        let mut out =
            Vec::with_capacity(HELLO_REPLY_FIXED_LEN + 6 + self.message.len() + self.bitmap.len());
        out.extend_from_slice(raw.as_bytes());
        put_str(&mut out, &self.message);
        let n = u32::try_from(self.bitmap.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&self.bitmap);
        out
    }

    /// Decodes and validates a HelloReply payload. An unknown non-zero
    /// refusal code (from a newer peer) decodes as [`Refusal::Refused`].
    pub fn decode(payload: &[u8]) -> Result<HelloReply, FrameError> {
        let mut r = Reader {
            buf: payload,
            what: "HelloReply",
        };
        let raw: RawHelloReply = r.fixed()?;
        let message = r.string("message", MAX_MESSAGE_LEN)?;
        let n = r.u32()? as usize;
        let bitmap = r.take(n)?.to_vec();
        r.finish()?;
        let code = raw.refusal.get();
        let refusal = match code {
            0 => None,
            c => Some(Refusal::from_code(c).unwrap_or(Refusal::Refused)),
        };
        let reply = HelloReply {
            version: raw.version.get(),
            refusal,
            message,
            datasize: raw.datasize.get(),
            extentsize: raw.extentsize.get(),
            gen: Gen {
                resuid: raw.resuid.get(),
                localcnt: raw.localcnt.get(),
                remotecnt: raw.remotecnt.get(),
            },
            flags: raw.flags.get(),
            bitmap,
        };
        reply.validate()?;
        Ok(reply)
    }

    /// Checks what a receiver enforces: message limits; when accepted a
    /// version ≥ 1, non-zero geometry and a bitmap of exactly
    /// [`bitmap_len`] bytes; when refused an empty bitmap.
    pub fn validate(&self) -> Result<(), FrameError> {
        check_str("HelloReply message", &self.message, 0, MAX_MESSAGE_LEN)?;
        if self.refusal.is_some() {
            if !self.bitmap.is_empty() {
                return Err(FrameError::Malformed(format!(
                    "refusing HelloReply carries a {}-byte bitmap; it must be empty",
                    self.bitmap.len()
                )));
            }
            return Ok(());
        }
        if self.version == 0 {
            return Err(FrameError::Malformed(
                "accepting HelloReply negotiated version 0".into(),
            ));
        }
        if self.datasize == 0 || self.extentsize == 0 {
            return Err(FrameError::Malformed(format!(
                "accepting HelloReply has datasize {} and extentsize {}; both must be non-zero",
                self.datasize, self.extentsize
            )));
        }
        let want = bitmap_len(self.datasize, self.extentsize);
        if self.bitmap.len() as u64 != want {
            return Err(FrameError::Malformed(format!(
                "HelloReply bitmap is {} bytes; {} extents of {} bytes need {want}",
                self.bitmap.len(),
                self.datasize.div_ceil(u64::from(self.extentsize)),
                self.extentsize
            )));
        }
        Ok(())
    }

    /// Is the secondary mid-synchronisation ([`hello_flags::INCONSISTENT`])?
    pub const fn is_inconsistent(&self) -> bool {
        self.flags & hello_flags::INCONSISTENT != 0
    }
}

/// Payload of a SyncComplete (16 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawSyncComplete {
    generation: U64,
    reserved: U64,
}

const _: () = assert!(core::mem::size_of::<RawSyncComplete>() == SYNC_COMPLETE_LEN);

/// Payload of a SyncComplete: the generation both nodes now store as
/// `localcnt` and `remotecnt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncComplete {
    /// The new generation (see
    /// [`target_generation`](crate::generation::target_generation)).
    pub generation: u64,
}

impl SyncComplete {
    /// The 16 payload bytes (generation, then 8 reserved zero bytes).
    pub fn encode(&self) -> [u8; SYNC_COMPLETE_LEN] {
        zerocopy::transmute!(RawSyncComplete {
            generation: U64::new(self.generation),
            reserved: U64::new(0),
        })
    }

    /// Decodes a SyncComplete payload.
    pub fn decode(payload: &[u8]) -> Result<SyncComplete, FrameError> {
        let mut r = Reader {
            buf: payload,
            what: "SyncComplete",
        };
        let raw: RawSyncComplete = r.fixed()?;
        r.finish()?;
        reserved_zero("SyncComplete bytes 8..16", raw.reserved.get())?;
        Ok(SyncComplete {
            generation: raw.generation.get(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Re-seals a header after editing its bytes (valid checksum).
    fn reseal(mut b: [u8; HEADER_LEN]) -> [u8; HEADER_LEN] {
        let crc = crc32c::crc32c(&b[..HEADER_CRC_OFFSET]);
        b[HEADER_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn edited(h: Header, f: impl FnOnce(&mut [u8; HEADER_LEN])) -> [u8; HEADER_LEN] {
        let mut b = h.encode();
        f(&mut b);
        reseal(b)
    }

    fn sample_write() -> (Header, Vec<u8>) {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let h = Header::request(
            Kind::Write,
            flags::WANT_RECEIVED | flags::FUA,
            0x0102_0304_0506_0708,
            0x1000,
            4096,
        )
        .with_payload(&data);
        (h, data)
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn crc_is_castagnoli() {
        // The standard check value of CRC-32C.
        assert_eq!(payload_crc(b"123456789"), 0xE306_9283);
        assert_eq!(payload_crc(&[]), 0);
    }

    /// The wire format of a header, frozen: bytes computed by an
    /// independent crc32c implementation. If this test fails the protocol
    /// changed; bump PROTO_VERSION instead of editing the bytes.
    #[test]
    fn golden_header() {
        let h = Header::request(
            Kind::Write,
            flags::WANT_RECEIVED | flags::FUA,
            0x0102_0304_0506_0708,
            0x1000,
            9,
        )
        .with_payload(b"123456789");
        let golden = hex("48535450 0a 05 0000  0807060504030201  0010000000000000
             09000000 09000000 00000000 839206e3  00000000 3967601f");
        assert_eq!(h.encode().to_vec(), golden);
        let golden: [u8; HEADER_LEN] = golden.try_into().unwrap();
        assert_eq!(Header::decode(&golden), Ok(h));
        h.check_payload(b"123456789").unwrap();
    }

    #[test]
    fn constructors() {
        let (h, data) = sample_write();
        assert_eq!(h.payload_len, 4096);
        assert_eq!(h.payload_crc, payload_crc(&data));
        assert_eq!(h.status, 0);
        assert!(h.has_flag(flags::FUA));
        assert!(!h.has_flag(flags::SYNC));
        let r = Header::reply(Kind::Done, 77, 5);
        assert_eq!(
            (
                r.kind,
                r.seq,
                r.status,
                r.flags,
                r.payload_len,
                r.payload_crc
            ),
            (Kind::Done, 77, 5, 0, 0, 0)
        );
        assert_eq!(Header::decode(&r.encode()).unwrap(), r);
        let e = Header::reply(Kind::ReadReply, 9, 0).with_payload(&[]);
        assert_eq!((e.payload_len, e.payload_crc), (0, 0));
    }

    #[test]
    fn kinds() {
        for code in 0..=255u8 {
            match Kind::from_u8(code) {
                Some(k) => {
                    assert_eq!(k.code(), code);
                    assert!(Kind::ALL.contains(&k));
                }
                None => assert!(!Kind::ALL.iter().any(|k| k.code() == code)),
            }
        }
        assert_eq!(Kind::ALL.len(), 14);
        let requests: Vec<Kind> = Kind::ALL.into_iter().filter(|k| k.is_request()).collect();
        assert_eq!(
            requests,
            [
                Kind::Hello,
                Kind::Write,
                Kind::Zero,
                Kind::Flush,
                Kind::Read,
                Kind::Keepalive,
                Kind::SyncStart,
                Kind::SyncComplete,
                Kind::Bye
            ]
        );
        let data: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| k.has_data_payload())
            .collect();
        assert_eq!(data, [Kind::Write, Kind::ReadReply]);
        assert_eq!(Kind::SyncStart.to_string(), "SyncStart");
    }

    #[test]
    fn payload_check() {
        let (h, mut data) = sample_write();
        h.check_payload(&data).unwrap();
        assert_eq!(
            h.check_payload(&data[1..]),
            Err(FrameError::PayloadLength {
                kind: Kind::Write,
                expected: 4096,
                actual: 4095
            })
        );
        data[100] ^= 0x10;
        assert!(matches!(
            h.check_payload(&data),
            Err(FrameError::PayloadChecksum { stored, computed }) if stored == h.payload_crc && computed != stored
        ));
        Header::reply(Kind::Done, 1, 0).check_payload(&[]).unwrap();
    }

    #[test]
    fn bad_magic() {
        let (h, _) = sample_write();
        let b = edited(h, |b| b[0] = b'X');
        assert!(matches!(Header::decode(&b), Err(FrameError::BadMagic(m)) if m == 0x5054_5358));
        assert!(matches!(
            Header::decode(&[0u8; HEADER_LEN]),
            Err(FrameError::BadMagic(0))
        ));
        // An NBD request is not mistaken for a frame.
        let mut nbd = [0u8; HEADER_LEN];
        nbd[..4].copy_from_slice(&[0x25, 0x60, 0x95, 0x13]);
        assert!(matches!(Header::decode(&nbd), Err(FrameError::BadMagic(_))));
    }

    #[test]
    fn header_checksum() {
        let (h, _) = sample_write();
        let mut b = h.encode();
        b[20] ^= 1;
        let Err(FrameError::HeaderChecksum { stored, computed }) = Header::decode(&b) else {
            panic!("corruption not detected");
        };
        assert_ne!(stored, computed);
        let msg = FrameError::HeaderChecksum { stored, computed }.to_string();
        assert!(msg.contains("corrupted"), "{msg}");
    }

    #[test]
    fn unknown_kind() {
        let (h, _) = sample_write();
        for code in [0u8, 3, 9, 18, 19, 24, 255] {
            let b = edited(h, |b| b[4] = code);
            assert_eq!(Header::decode(&b), Err(FrameError::UnknownKind(code)));
        }
    }

    #[test]
    fn unknown_flags() {
        let (h, _) = sample_write();
        let b = edited(h, |b| b[5] = 0x85);
        assert_eq!(
            Header::decode(&b),
            Err(FrameError::UnknownFlags {
                kind: Kind::Write,
                flags: 0x80
            })
        );
        let ok = edited(h, |b| b[5] = flags::ALL);
        assert_eq!(Header::decode(&ok).unwrap().flags, flags::ALL);
    }

    #[test]
    fn reserved_fields() {
        let (h, _) = sample_write();
        let b = edited(h, |b| b[7] = 1);
        assert_eq!(
            Header::decode(&b),
            Err(FrameError::ReservedNonZero {
                field: "header bytes 6..8",
                value: 0x100
            })
        );
        let b = edited(h, |b| b[40] = 2);
        assert_eq!(
            Header::decode(&b),
            Err(FrameError::ReservedNonZero {
                field: "header bytes 40..44",
                value: 2
            })
        );
    }

    #[test]
    fn status_in_request_and_stray_crc() {
        let mut h = Header::request(Kind::Flush, 0, 1, 0, 0);
        h.status = 5;
        assert!(
            matches!(Header::decode(&h.encode()), Err(FrameError::Malformed(m)) if m.contains("status"))
        );
        let mut h = Header::reply(Kind::Done, 1, 0);
        h.payload_crc = 1;
        assert!(
            matches!(Header::decode(&h.encode()), Err(FrameError::Malformed(m)) if m.contains("checksum"))
        );
        // A failed Done is fine.
        Header::decode(&Header::reply(Kind::Done, 1, 5).encode()).unwrap();
    }

    fn reason(h: Header) -> &'static str {
        match Header::decode(&h.encode()) {
            Err(FrameError::BadLength { reason, .. }) => reason,
            other => panic!("{h:?}: expected BadLength, got {other:?}"),
        }
    }

    #[test]
    fn bad_lengths() {
        let w = Header::request(Kind::Write, 0, 1, 0, 10);
        assert!(reason(Header {
            payload_len: 9,
            payload_crc: 1,
            ..w
        })
        .contains("exactly its length"));
        assert!(reason(Header {
            length: MAX_DATA + 1,
            payload_len: MAX_DATA + 1,
            payload_crc: 1,
            ..w
        })
        .contains("32 MiB"));
        let max = Header {
            length: MAX_DATA,
            payload_len: MAX_DATA,
            payload_crc: 1,
            ..w
        };
        Header::decode(&max.encode()).unwrap();
        assert!(reason(Header::request(Kind::Read, 0, 1, 0, MAX_DATA + 1)).contains("32 MiB"));
        Header::decode(&Header::request(Kind::Read, 0, 1, 0, MAX_DATA).encode()).unwrap();
        for k in [Kind::Write, Kind::Zero, Kind::Read] {
            let h = Header::request(k, 0, 1, u64::MAX - 4, 5);
            let h = if k == Kind::Write {
                Header {
                    payload_len: 5,
                    payload_crc: 1,
                    ..h
                }
            } else {
                h
            };
            assert!(reason(h).contains("overflows"), "{k}");
            let ok = Header {
                offset: u64::MAX - 5,
                ..h
            };
            Header::decode(&ok.encode()).unwrap();
        }
        for k in [
            Kind::Zero,
            Kind::Flush,
            Kind::Read,
            Kind::Keepalive,
            Kind::SyncStart,
            Kind::Bye,
            Kind::Received,
            Kind::Done,
            Kind::KeepaliveReply,
        ] {
            let h = Header {
                payload_len: 1,
                payload_crc: 1,
                ..Header::request(k, 0, 1, 0, 0)
            };
            assert!(reason(h).contains("no payload"), "{k}");
        }
        for k in [Kind::Hello, Kind::HelloReply] {
            let h = Header {
                payload_len: MAX_CONTROL_PAYLOAD + 1,
                payload_crc: 1,
                ..Header::request(k, 0, 1, 0, 0)
            };
            assert!(reason(h).contains("16 MiB"), "{k}");
            let ok = Header {
                payload_len: MAX_CONTROL_PAYLOAD,
                ..h
            };
            Header::decode(&ok.encode()).unwrap();
        }
        let sc = Header::request(Kind::SyncComplete, 0, 1, 0, 0);
        for n in [0u32, 15, 17] {
            let h = Header {
                payload_len: n,
                payload_crc: u32::from(n != 0),
                ..sc
            };
            assert!(reason(h).contains("16 bytes"), "{n}");
        }
        Header::decode(
            &sc.with_payload(&SyncComplete { generation: 3 }.encode())
                .encode(),
        )
        .unwrap();
        let rr = Header::reply(Kind::ReadReply, 1, 5).with_payload(b"x");
        assert!(reason(rr).contains("failed ReadReply"));
        let rr = Header::reply(Kind::ReadReply, 1, 0);
        assert!(reason(Header {
            payload_len: MAX_DATA + 1,
            payload_crc: 1,
            ..rr
        })
        .contains("32 MiB"));
    }

    #[test]
    fn bit_flips_are_detected() {
        let (w, _) = sample_write();
        let headers = [
            w,
            Header::reply(Kind::Done, 3, 0),
            Header::request(Kind::Keepalive, 0, 0, 0, 0),
            Header::reply(Kind::ReadReply, u64::MAX, 0).with_payload(&[1, 2, 3]),
        ];
        for h in headers {
            let good = h.encode();
            assert_eq!(Header::decode(&good).unwrap(), h);
            for bit in 0..HEADER_LEN * 8 {
                let mut b = good;
                b[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    Header::decode(&b).is_err(),
                    "flip of bit {bit} in {h:?} undetected"
                );
            }
        }
    }

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(1, 1, 1, 1), Some(1));
        assert_eq!(negotiate(1, 3, 2, 5), Some(3));
        assert_eq!(negotiate(2, 5, 1, 3), Some(3));
        assert_eq!(negotiate(1, 2, 3, 4), None);
        assert_eq!(negotiate(3, 4, 1, 2), None);
        assert_eq!(negotiate(2, 1, 1, 2), None);
        assert_eq!(negotiate(1, 4, 2, 2), Some(2));
        assert_eq!(
            negotiate(
                PROTO_VERSION_MIN,
                PROTO_VERSION,
                PROTO_VERSION_MIN,
                PROTO_VERSION
            ),
            Some(PROTO_VERSION)
        );
    }

    #[test]
    fn bitmap_lengths() {
        assert_eq!(bitmap_len(1 << 30, 2 << 20), 64);
        assert_eq!(bitmap_len((1 << 30) + 1, 2 << 20), 65);
        assert_eq!(bitmap_len(1, 4096), 1);
        assert_eq!(bitmap_len(8 * 4096, 4096), 1);
        assert_eq!(bitmap_len(8 * 4096 + 1, 4096), 2);
        assert_eq!(bitmap_len(100, 0), 0);
        assert_eq!(bitmap_len(u64::MAX, 1), u64::MAX.div_ceil(8));
    }

    // ---- control payloads ---------------------------------------------

    fn sample_hello() -> Hello {
        Hello {
            version_min: PROTO_VERSION_MIN,
            version_max: PROTO_VERSION,
            resource: "shared".into(),
            node: "alpha".into(),
            datasize: 1 << 30,
            extentsize: 2 << 20,
            gen: Gen {
                resuid: 0xdead_beef_0bad_cafe,
                localcnt: 7,
                remotecnt: 6,
            },
            flags: hello_flags::INCONSISTENT,
        }
    }

    fn sample_reply() -> HelloReply {
        HelloReply {
            version: 1,
            refusal: None,
            message: "ok".into(),
            datasize: 1 << 30,
            extentsize: 2 << 20,
            gen: Gen {
                resuid: 0xdead_beef_0bad_cafe,
                localcnt: 6,
                remotecnt: 6,
            },
            flags: 0,
            bitmap: {
                let mut b = vec![0u8; 64];
                b[0] = 0b101;
                b[63] = 0x80;
                b
            },
        }
    }

    #[test]
    fn hello_layout() {
        let h = sample_hello();
        let b = h.encode();
        assert_eq!(b.len(), HELLO_FIXED_LEN + 2 + 6 + 2 + 5);
        assert_eq!(&b[0..4], &[1, 0, 1, 0]);
        assert_eq!(&b[8..16], &(1u64 << 30).to_le_bytes());
        assert_eq!(&b[16..20], &(2u32 << 20).to_le_bytes());
        assert_eq!(&b[24..32], &0xdead_beef_0bad_cafeu64.to_le_bytes());
        assert_eq!(&b[32..40], &7u64.to_le_bytes());
        assert_eq!(&b[40..48], &6u64.to_le_bytes());
        assert_eq!(&b[48..56], &1u64.to_le_bytes());
        assert_eq!(&b[56..64], b"\x06\x00shared");
        assert_eq!(&b[64..], b"\x05\x00alpha");
        assert_eq!(Hello::decode(&b).unwrap(), h);
        assert!(h.is_inconsistent());
        assert_eq!(Hello::peek_versions(&b), Some((1, 1)));
        assert_eq!(Hello::peek_versions(&b[..3]), None);
    }

    #[test]
    fn hello_errors() {
        let good = sample_hello().encode();
        assert!(matches!(
            Hello::decode(&good[..10]),
            Err(FrameError::Truncated {
                what: "Hello",
                needed: 56,
                actual: 10
            })
        ));
        assert!(matches!(
            Hello::decode(&good[..good.len() - 1]),
            Err(FrameError::Truncated { .. })
        ));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(
            Hello::decode(&long),
            Err(FrameError::TrailingBytes {
                what: "Hello",
                extra: 1
            })
        );
        let mut b = good.clone();
        b[5] = 1;
        assert!(matches!(
            Hello::decode(&b),
            Err(FrameError::ReservedNonZero { .. })
        ));
        let mut b = good.clone();
        b[22] = 1;
        assert!(matches!(
            Hello::decode(&b),
            Err(FrameError::ReservedNonZero { .. })
        ));
        let mut b = good.clone();
        b[58] = 0xff; // resource name not UTF-8
        assert!(matches!(Hello::decode(&b), Err(FrameError::Malformed(m)) if m.contains("UTF-8")));
        let mut b = good.clone();
        b[59] = 0; // NUL in the resource name
        assert!(matches!(Hello::decode(&b), Err(FrameError::Malformed(m)) if m.contains("NUL")));
        let bad = |f: fn(&mut Hello)| {
            let mut h = sample_hello();
            f(&mut h);
            assert!(h.validate().is_err());
            match Hello::decode(&h.encode()) {
                Err(FrameError::Malformed(_)) => {}
                other => panic!("{h:?}: {other:?}"),
            }
        };
        bad(|h| h.resource.clear());
        bad(|h| h.resource = "r".repeat(128));
        bad(|h| h.node = "n".repeat(64));
        bad(|h| h.version_min = 0);
        bad(|h| {
            h.version_min = 3;
            h.version_max = 2;
        });
        let mut ok = sample_hello();
        ok.resource = "r".repeat(127);
        ok.node = "n".repeat(63);
        assert_eq!(Hello::decode(&ok.encode()).unwrap(), ok);
        ok.node.clear();
        assert_eq!(Hello::decode(&ok.encode()).unwrap(), ok);
        // A name too long for the u16 prefix is cut, then refused.
        let mut huge = sample_hello();
        huge.resource = "x".repeat(70_000);
        assert!(Hello::decode(&huge.encode()).is_err());
    }

    #[test]
    fn hello_reply_layout() {
        let r = sample_reply();
        let b = r.encode();
        assert_eq!(b.len(), HELLO_REPLY_FIXED_LEN + 2 + 2 + 4 + 64);
        assert_eq!(&b[0..2], &[1, 0]);
        assert_eq!(&b[2..4], &[0, 0]);
        assert_eq!(&b[4..8], &(2u32 << 20).to_le_bytes());
        assert_eq!(&b[8..16], &(1u64 << 30).to_le_bytes());
        assert_eq!(&b[16..24], &0xdead_beef_0bad_cafeu64.to_le_bytes());
        assert_eq!(&b[48..52], b"\x02\x00ok");
        assert_eq!(&b[52..56], &64u32.to_le_bytes());
        assert_eq!(b[56], 0b101);
        assert_eq!(HelloReply::decode(&b).unwrap(), r);
        assert!(!r.is_inconsistent());

        let no = HelloReply::refused(Refusal::SplitBrain, "both nodes wrote");
        let b = no.encode();
        assert_eq!(&b[2..4], &5u16.to_le_bytes());
        assert_eq!(HelloReply::decode(&b).unwrap(), no);
    }

    #[test]
    fn hello_reply_errors() {
        let good = sample_reply().encode();
        assert!(matches!(
            HelloReply::decode(&good[..47]),
            Err(FrameError::Truncated { needed: 48, .. })
        ));
        assert!(matches!(
            HelloReply::decode(&good[..good.len() - 1]),
            Err(FrameError::Truncated {
                needed: 64,
                actual: 63,
                ..
            })
        ));
        let mut long = good.clone();
        long.extend_from_slice(&[0, 0]);
        assert_eq!(
            HelloReply::decode(&long),
            Err(FrameError::TrailingBytes {
                what: "HelloReply",
                extra: 2
            })
        );
        let malformed = |f: fn(&mut HelloReply)| {
            let mut r = sample_reply();
            f(&mut r);
            assert!(r.validate().is_err());
            match HelloReply::decode(&r.encode()) {
                Err(FrameError::Malformed(_)) => {}
                other => panic!("{r:?}: {other:?}"),
            }
        };
        malformed(|r| r.bitmap.push(0));
        malformed(|r| r.bitmap.clear());
        malformed(|r| r.extentsize = 0);
        malformed(|r| r.datasize = 0);
        malformed(|r| r.version = 0);
        malformed(|r| r.message = "m".repeat(4097));
        malformed(|r| {
            r.refusal = Some(Refusal::Busy);
        });
        let mut ok = sample_reply();
        ok.message = "m".repeat(4096);
        assert_eq!(HelloReply::decode(&ok.encode()).unwrap(), ok);
        // An unknown refusal code from a newer peer is still a refusal.
        let mut b = HelloReply::refused(Refusal::Busy, "x").encode();
        b[2..4].copy_from_slice(&77u16.to_le_bytes());
        assert_eq!(
            HelloReply::decode(&b).unwrap().refusal,
            Some(Refusal::Refused)
        );
        // A bitmap length beyond the payload is truncation, not allocation.
        let mut b = sample_reply().encode();
        b[52..56].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            HelloReply::decode(&b),
            Err(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn refusals() {
        for (i, r) in Refusal::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(r.code()), i + 1);
            assert_eq!(Refusal::from_code(r.code()), Some(r));
            assert!(!r.to_string().is_empty());
        }
        assert_eq!(Refusal::from_code(0), None);
        assert_eq!(Refusal::from_code(10), None);
        use crate::generation::Decision;
        assert_eq!(
            Refusal::from_decision(&Decision::SplitBrain),
            Some(Refusal::SplitBrain)
        );
        assert_eq!(
            Refusal::from_decision(&Decision::Inconsistent),
            Some(Refusal::InconsistentCounters)
        );
        assert_eq!(
            Refusal::from_decision(&Decision::ResuidMismatch),
            Some(Refusal::ResuidMismatch)
        );
        assert_eq!(Refusal::from_decision(&Decision::InSync), None);
    }

    #[test]
    fn sync_complete() {
        let s = SyncComplete { generation: 42 };
        let b = s.encode();
        assert_eq!(&b[..8], &42u64.to_le_bytes());
        assert_eq!(&b[8..], &[0; 8]);
        assert_eq!(SyncComplete::decode(&b), Ok(s));
        assert!(matches!(
            SyncComplete::decode(&b[..15]),
            Err(FrameError::Truncated {
                needed: 16,
                actual: 15,
                ..
            })
        ));
        let mut long = b.to_vec();
        long.push(1);
        assert_eq!(
            SyncComplete::decode(&long),
            Err(FrameError::TrailingBytes {
                what: "SyncComplete",
                extra: 1
            })
        );
        let mut r = b;
        r[15] = 1;
        assert!(matches!(
            SyncComplete::decode(&r),
            Err(FrameError::ReservedNonZero { .. })
        ));
    }

    #[test]
    fn errors_read_well() {
        let all = [
            FrameError::BadMagic(1),
            FrameError::HeaderChecksum {
                stored: 1,
                computed: 2,
            },
            FrameError::PayloadChecksum {
                stored: 1,
                computed: 2,
            },
            FrameError::UnknownKind(99),
            FrameError::UnknownFlags {
                kind: Kind::Write,
                flags: 0x80,
            },
            FrameError::ReservedNonZero {
                field: "x",
                value: 1,
            },
            FrameError::BadLength {
                kind: Kind::Write,
                length: 1,
                payload_len: 2,
                reason: "r",
            },
            FrameError::PayloadLength {
                kind: Kind::Write,
                expected: 1,
                actual: 2,
            },
            FrameError::Truncated {
                what: "Hello",
                needed: 1,
                actual: 0,
            },
            FrameError::TrailingBytes {
                what: "Hello",
                extra: 1,
            },
            FrameError::Malformed("m".into()),
        ];
        for e in all {
            let s = e.to_string();
            assert!(s.len() > 10, "{s}");
        }
        assert!(FrameError::BadMagic(0).to_string().contains("HSTP"));
    }

    // ---- property tests -------------------------------------------------

    fn any_kind() -> impl Strategy<Value = Kind> {
        proptest::sample::select(Kind::ALL.to_vec())
    }

    /// Valid headers of every kind.
    fn valid_header() -> impl Strategy<Value = Header> {
        (
            any_kind(),
            0u8..=flags::ALL,
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            1u32..,
        )
            .prop_map(|(kind, fl, seq, offset, length, plen, status, crc)| {
                let mut h = Header {
                    kind,
                    flags: fl,
                    seq,
                    offset,
                    length,
                    payload_len: plen % (kind.max_payload() + 1),
                    status: if kind.is_request() { 0 } else { status },
                    payload_crc: crc,
                };
                match kind {
                    Kind::Write => {
                        h.length %= MAX_DATA + 1;
                        h.payload_len = h.length;
                    }
                    Kind::Read => h.length %= MAX_DATA + 1,
                    Kind::SyncComplete => h.payload_len = SYNC_COMPLETE_LEN as u32,
                    Kind::ReadReply if h.status != 0 => h.payload_len = 0,
                    _ => {}
                }
                if matches!(kind, Kind::Write | Kind::Zero | Kind::Read) {
                    h.offset = h.offset.min(u64::MAX - u64::from(h.length));
                }
                if h.payload_len == 0 {
                    h.payload_crc = 0;
                }
                h
            })
    }

    fn valid_hello() -> impl Strategy<Value = Hello> {
        (
            1u16..,
            any::<u16>(),
            "[a-z0-9_.é-]{1,40}",
            "[a-zA-Z0-9.-]{0,63}",
            any::<u64>(),
            any::<u32>(),
            any::<(u64, u64, u64)>(),
            any::<u64>(),
        )
            .prop_map(
                |(vmin, span, resource, node, datasize, extentsize, g, flags)| Hello {
                    version_min: vmin,
                    version_max: vmin.saturating_add(span % 4),
                    resource,
                    node,
                    datasize,
                    extentsize,
                    gen: Gen {
                        resuid: g.0,
                        localcnt: g.1,
                        remotecnt: g.2,
                    },
                    flags,
                },
            )
            .prop_filter("name limits", |h| {
                h.resource.len() <= MAX_RESOURCE_LEN && h.node.len() <= MAX_NODE_LEN
            })
    }

    fn valid_reply() -> impl Strategy<Value = HelloReply> {
        (
            1u16..,
            proptest::option::of(proptest::sample::select(Refusal::ALL.to_vec())),
            "[ -~]{0,200}",
            1u64..(1 << 40),
            12u32..28,
            any::<(u64, u64, u64)>(),
            any::<u64>(),
            any::<u8>(),
        )
            .prop_map(
                |(version, refusal, message, datasize, shift, g, flags, fill)| {
                    let extentsize = 1u32 << shift;
                    let bitmap = if refusal.is_some() {
                        Vec::new()
                    } else {
                        let n = bitmap_len(datasize, extentsize) as usize;
                        (0..n).map(|i| fill.wrapping_mul(i as u8 | 1)).collect()
                    };
                    HelloReply {
                        version,
                        refusal,
                        message,
                        datasize,
                        extentsize,
                        gen: Gen {
                            resuid: g.0,
                            localcnt: g.1,
                            remotecnt: g.2,
                        },
                        flags,
                        bitmap,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn header_round_trip(h in valid_header()) {
            let b = h.encode();
            prop_assert_eq!(Header::decode(&b), Ok(h));
        }

        #[test]
        fn header_bit_flip_detected(h in valid_header(), bit in 0usize..HEADER_LEN * 8) {
            let mut b = h.encode();
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Header::decode(&b).is_err());
        }

        #[test]
        fn arbitrary_headers_are_rejected_unless_valid(b in any::<[u8; HEADER_LEN]>()) {
            if let Ok(h) = Header::decode(&b) {
                prop_assert_eq!(h.encode(), b);
            }
        }

        /// Arbitrary bytes behind a correct magic and checksum exercise
        /// every validation rule: accepted headers are canonical.
        #[test]
        fn sealed_arbitrary_headers(mut b in any::<[u8; HEADER_LEN]>(), kind in any_kind(), small in any::<bool>()) {
            b[..4].copy_from_slice(&MAGIC.to_le_bytes());
            b[4] = kind.code();
            if small {
                // Make the interesting (valid) cases likely.
                b[5] &= flags::ALL;
                b[6..8].fill(0);
                b[40..44].fill(0);
                b[26..28].fill(0);
                b[30..32].fill(0);
            }
            let b = reseal(b);
            match Header::decode(&b) {
                Ok(h) => {
                    prop_assert_eq!(h.encode(), b);
                    prop_assert!(h.payload_len <= h.kind.max_payload());
                }
                Err(e) => {
                    let sealed_ok = !matches!(e, FrameError::BadMagic(_) | FrameError::HeaderChecksum { .. });
                    prop_assert!(sealed_ok, "{}", e);
                }
            }
        }

        #[test]
        fn payload_round_trip(data in proptest::collection::vec(any::<u8>(), 0..2000), seq in any::<u64>()) {
            let h = Header::reply(Kind::ReadReply, seq, 0).with_payload(&data);
            let h2 = Header::decode(&h.encode()).unwrap();
            prop_assert!(h2.check_payload(&data).is_ok());
            if !data.is_empty() {
                let mut bad = data.clone();
                let i = (seq as usize) % bad.len();
                bad[i] ^= 1 << (seq % 8);
                prop_assert!(
                    matches!(h2.check_payload(&bad), Err(FrameError::PayloadChecksum { .. })),
                    "payload corruption undetected"
                );
            }
        }

        #[test]
        fn hello_round_trip(h in valid_hello()) {
            let b = h.encode();
            prop_assert_eq!(Hello::peek_versions(&b), Some((h.version_min, h.version_max)));
            prop_assert_eq!(Hello::decode(&b), Ok(h));
            for cut in [0, 1, HELLO_FIXED_LEN - 1, HELLO_FIXED_LEN + 1, b.len() - 1] {
                prop_assert!(Hello::decode(&b[..cut.min(b.len() - 1)]).is_err());
            }
        }

        #[test]
        fn hello_reply_round_trip(r in valid_reply()) {
            let b = r.encode();
            prop_assert_eq!(HelloReply::decode(&b), Ok(r));
            prop_assert!(HelloReply::decode(&b[..b.len() - 1]).is_err());
            let mut long = b.clone();
            long.push(0);
            let is_trailing = matches!(HelloReply::decode(&long), Err(FrameError::TrailingBytes { .. }));
            prop_assert!(is_trailing);
        }

        #[test]
        fn sync_complete_round_trip(g in any::<u64>()) {
            let s = SyncComplete { generation: g };
            prop_assert_eq!(SyncComplete::decode(&s.encode()), Ok(s));
        }

        #[test]
        fn control_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(h) = Hello::decode(&bytes) {
                prop_assert_eq!(h.encode(), bytes.clone());
            }
            if let Ok(r) = HelloReply::decode(&bytes) {
                prop_assert_eq!(HelloReply::decode(&r.encode()), Ok(r));
            }
            if let Ok(s) = SyncComplete::decode(&bytes) {
                prop_assert_eq!(s.encode().to_vec(), bytes.clone());
            }
            let _ = Hello::peek_versions(&bytes);
        }

        /// Mutations of valid payloads (the interesting neighbourhood of
        /// the decoders) never panic and decode canonically.
        #[test]
        fn mutated_control_payloads(h in valid_hello(), r in valid_reply(), pos in any::<usize>(), val in any::<u8>(), cut in any::<usize>()) {
            let mut b = h.encode();
            let i = pos % b.len();
            b[i] = val;
            b.truncate(b.len() - cut % 3);
            if let Ok(h2) = Hello::decode(&b) {
                prop_assert_eq!(h2.encode(), b);
            }
            let mut b = r.encode();
            let i = pos % b.len();
            b[i] = val;
            b.truncate(b.len() - cut % 3);
            if let Ok(r2) = HelloReply::decode(&b) {
                prop_assert_eq!(HelloReply::decode(&r2.encode()), Ok(r2));
            }
        }
    }
}
