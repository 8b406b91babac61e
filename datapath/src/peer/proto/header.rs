//! The frame header codec: the 48-byte [`Header`] that starts every frame,
//! its [`Kind`] and [`flags`], the per-kind length rules, the payload
//! checksum, and [`FrameError`], the error of both codecs.

use std::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::control::{
    CHECKSUMS_REQUEST_LEN, MAX_CHALLENGE_LEN, MAX_DIGESTS_PAYLOAD, PROOF_LEN, SYNC_COMPLETE_LEN,
};

/// Size of a frame header.
pub const HEADER_LEN: usize = 48;
/// Magic at offset 0 of every header: the bytes `HSTP` read little-endian.
pub const MAGIC: u32 = 0x5054_5348;
/// Largest data payload of a Write or ReadReply, and largest Read length.
pub const MAX_DATA: u32 = 32 << 20;
/// Largest payload of a Hello, HelloReply or SyncComplete (the bitmap of a
/// HelloReply dominates).
pub const MAX_CONTROL_PAYLOAD: u32 = 16 << 20;

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
    /// Write or ReadReply (protocol 2): the payload is an LZ4 block
    /// (`lz4_flex` block format) that decompresses to exactly `length`
    /// bytes.
    pub const LZ4: u8 = 8;
    /// Write or ReadReply (protocol 2): the payload is LZF-compressed
    /// (liblzf's raw format) and decompresses to exactly `length` bytes.
    pub const LZF: u8 = 16;
    /// Either compression bit.
    pub const COMPRESSED: u8 = LZ4 | LZF;
    /// Every flag bit defined by protocol version 2; other bits are refused.
    pub const ALL: u8 = WANT_RECEIVED | SYNC | FUA | LZ4 | LZF;
}

/// Kind of a frame (header byte 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Primary → secondary: first frame of a connection
    /// ([`Hello`](super::Hello) payload).
    Hello = 1,
    /// Secondary → primary: answer to Hello
    /// ([`HelloReply`](super::HelloReply) payload).
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
    /// A synchronisation completed
    /// ([`SyncComplete`](super::SyncComplete) payload): both nodes store
    /// the new generation; replied by Done.
    SyncComplete = 16,
    /// Orderly close (role change, shutdown); no reply.
    Bye = 17,
    /// The primary's disk was detached after its errors: from now on the
    /// secondary holds the only copy. It records so (a new generation,
    /// and every later write of the connection marked), durably, and
    /// replies Done.
    DiskFailed = 9,
    /// Secondary → primary, after the introduction (protocol 3): the
    /// security modes, the secondary's node name and nonce
    /// ([`Challenge`](super::Challenge) payload).
    Challenge = 3,
    /// Either side, after the Challenge when a secret is configured
    /// (protocol 3): the proof of the secret ([`Proof`](super::Proof)
    /// payload).
    Proof = 4,
    /// memsync: the payload of request `seq` was received; the write is not
    /// yet done.
    Received = 20,
    /// Request `seq` completed; `status` is 0 or an errno.
    Done = 21,
    /// Answer to Read: the data (payload), or `status` ≠ 0 and no payload.
    ReadReply = 22,
    /// Answer to Keepalive.
    KeepaliveReply = 23,
    /// Protocol 2: the checksums of the blocks of `[offset, offset +
    /// length)` ([`ChecksumsRequest`](super::ChecksumsRequest) payload:
    /// block size and algorithm); answered by ChecksumsReply. With SYNC
    /// (a checksum-based synchronisation) the secondary marks the range
    /// as a synchronisation write would.
    Checksums = 18,
    /// Answer to Checksums: one digest per block, in order, or `status`
    /// ≠ 0 and no payload.
    ChecksumsReply = 24,
    /// Protocol 2: the secondary's written map (the extents written since
    /// its `hastctl create`); answered by WrittenMapReply.
    WrittenMap = 19,
    /// Answer to WrittenMap: the bitmap (as in a HelloReply), or `status`
    /// `ENODATA` and no payload when the provider has no written map
    /// (metadata format 1).
    WrittenMapReply = 25,
}

impl Kind {
    /// Every kind, in declaration order (new kinds are added at the end).
    pub const ALL: [Kind; 21] = [
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
        Kind::DiskFailed,
        Kind::Received,
        Kind::Done,
        Kind::ReadReply,
        Kind::KeepaliveReply,
        Kind::Checksums,
        Kind::ChecksumsReply,
        Kind::WrittenMap,
        Kind::WrittenMapReply,
        Kind::Challenge,
        Kind::Proof,
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
            9 => Kind::DiskFailed,
            20 => Kind::Received,
            21 => Kind::Done,
            22 => Kind::ReadReply,
            23 => Kind::KeepaliveReply,
            18 => Kind::Checksums,
            24 => Kind::ChecksumsReply,
            19 => Kind::WrittenMap,
            25 => Kind::WrittenMapReply,
            3 => Kind::Challenge,
            4 => Kind::Proof,
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
                | Kind::DiskFailed
                | Kind::Checksums
                | Kind::WrittenMap
                | Kind::Proof
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
            Kind::Hello | Kind::HelloReply | Kind::WrittenMapReply => MAX_CONTROL_PAYLOAD,
            Kind::SyncComplete => SYNC_COMPLETE_LEN as u32,
            Kind::Challenge => MAX_CHALLENGE_LEN as u32,
            Kind::Proof => PROOF_LEN as u32,
            Kind::Checksums => CHECKSUMS_REQUEST_LEN as u32,
            Kind::ChecksumsReply => MAX_DIGESTS_PAYLOAD,
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
            Kind::DiskFailed => "DiskFailed",
            Kind::Received => "Received",
            Kind::Done => "Done",
            Kind::ReadReply => "ReadReply",
            Kind::KeepaliveReply => "KeepaliveReply",
            Kind::Checksums => "Checksums",
            Kind::ChecksumsReply => "ChecksumsReply",
            Kind::WrittenMap => "WrittenMap",
            Kind::WrittenMapReply => "WrittenMapReply",
            Kind::Challenge => "Challenge",
            Kind::Proof => "Proof",
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
    #[error("reserved field '{field}' is {value:#x}; it must be 0")]
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
                Kind::Hello | Kind::HelloReply | Kind::WrittenMapReply => {
                    "payload exceeds the 16 MiB control payload limit"
                }
                Kind::SyncComplete => "a SyncComplete payload is exactly 16 bytes",
                Kind::Challenge => "a Challenge payload is at most 105 bytes",
                Kind::Proof => "a Proof payload is exactly 64 bytes",
                Kind::Checksums => "a Checksums payload is exactly 8 bytes",
                Kind::ChecksumsReply => "payload exceeds the 2 MiB digest limit",
                _ => "this kind carries no payload",
            });
        }
        let compressed = self.flags & flags::COMPRESSED;
        if compressed != 0 {
            if !self.kind.has_data_payload() {
                return bad("only a Write or a ReadReply may be compressed");
            }
            if compressed == flags::COMPRESSED {
                return bad("a payload is compressed by one algorithm, not two");
            }
            if self.payload_len == 0 || self.payload_len > self.length || self.length > MAX_DATA {
                return bad("a compressed payload is 1 to `length` bytes, `length` at most 32 MiB");
            }
        }
        match self.kind {
            Kind::Write if compressed == 0 && self.payload_len != self.length => {
                bad("a Write's payload must be exactly its length")
            }
            Kind::Read | Kind::Checksums if self.length > MAX_DATA => {
                bad("a Read or Checksums may cover at most 32 MiB")
            }
            Kind::Write | Kind::Zero | Kind::Read | Kind::Checksums
                if self.offset.checked_add(self.length.into()).is_none() =>
            {
                bad("offset + length overflows")
            }
            Kind::Checksums if self.payload_len as usize != CHECKSUMS_REQUEST_LEN => {
                bad("a Checksums payload is exactly 8 bytes")
            }
            Kind::ChecksumsReply | Kind::WrittenMapReply
                if self.status != 0 && self.payload_len != 0 =>
            {
                bad("a failed reply carries no payload")
            }
            Kind::SyncComplete if self.payload_len as usize != SYNC_COMPLETE_LEN => {
                bad("a SyncComplete payload is exactly 16 bytes")
            }
            Kind::Proof if self.payload_len as usize != PROOF_LEN => {
                bad("a Proof payload is exactly 64 bytes")
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

    /// Bytes the payload stands for once decompressed: `length` for a
    /// compressed frame, else `payload_len`. What a receiver allocates and
    /// what counts against the byte budgets of both sides.
    pub const fn data_len(&self) -> u32 {
        if self.flags & flags::COMPRESSED != 0 {
            self.length
        } else {
            self.payload_len
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::proto::SyncComplete;
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
        assert_eq!(Kind::ALL.len(), 21);
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
                Kind::Bye,
                Kind::DiskFailed,
                Kind::Checksums,
                Kind::WrittenMap,
                Kind::Proof
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
        for code in [0u8, 5, 8, 26, 255] {
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
        let ok = edited(h, |b| b[5] = flags::ALL & !flags::COMPRESSED);
        assert_eq!(
            Header::decode(&ok).unwrap().flags,
            flags::ALL & !flags::COMPRESSED
        );
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
            Kind::DiskFailed,
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
                    flags: fl & !flags::COMPRESSED,
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
                    Kind::Checksums => {
                        h.length %= MAX_DATA + 1;
                        h.payload_len = CHECKSUMS_REQUEST_LEN as u32;
                    }
                    Kind::SyncComplete => h.payload_len = SYNC_COMPLETE_LEN as u32,
                    Kind::Proof => h.payload_len = PROOF_LEN as u32,
                    Kind::ReadReply | Kind::ChecksumsReply | Kind::WrittenMapReply
                        if h.status != 0 =>
                    {
                        h.payload_len = 0
                    }
                    _ => {}
                }
                if matches!(
                    kind,
                    Kind::Write | Kind::Zero | Kind::Read | Kind::Checksums
                ) {
                    h.offset = h.offset.min(u64::MAX - u64::from(h.length));
                }
                if h.payload_len == 0 {
                    h.payload_crc = 0;
                }
                h
            })
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
    }
}
