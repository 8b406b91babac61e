//! The control payload codec: [`Hello`], [`HelloReply`] (with [`Refusal`]),
//! [`Challenge`] and [`Proof`] (the authentication of the handshake) and
//! [`SyncComplete`], protocol version negotiation ([`negotiate`]) and the
//! length of the dirty bitmap ([`bitmap_len`]).

use std::fmt;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::header::FrameError;
use crate::digest::Algo;
use crate::generation::Gen;

/// Highest protocol version this build speaks. Version 2 added the
/// Checksums / ChecksumsReply and WrittenMap / WrittenMapReply kinds and
/// the compression flags. Version 3: the connection opens with an
/// introduction (a Hello without state), a Challenge and, with a secret,
/// a Proof each way; TLS and the authenticated stream.
pub const PROTO_VERSION: u16 = 3;
/// Lowest protocol version this build accepts: versions 1 and 2 have no
/// authentication (and cannot be told apart from an impostor), and such a
/// peer answers our introduction with `VersionUnsupported`.
pub const PROTO_VERSION_MIN: u16 = 3;
/// Longest resource name in a Hello (bytes of UTF-8).
pub const MAX_RESOURCE_LEN: usize = 127;
/// Longest node name in a Hello (bytes of UTF-8).
pub const MAX_NODE_LEN: usize = 63;
/// Longest message in a HelloReply (bytes of UTF-8).
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Size of a SyncComplete payload.
pub const SYNC_COMPLETE_LEN: usize = 16;
/// Size of a Checksums payload.
pub const CHECKSUMS_REQUEST_LEN: usize = 8;
/// Largest ChecksumsReply payload: 32-byte digests of 512-byte blocks of
/// a 32 MiB range.
pub const MAX_DIGESTS_PAYLOAD: u32 = 2 << 20;
/// Smallest block of a Checksums request.
pub const MIN_DIGEST_BLOCK: u32 = 512;
/// Largest block of a Checksums request.
pub const MAX_DIGEST_BLOCK: u32 = 1 << 20;

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
    /// Introduction (protocol 3): the primary's resource has `tls on`.
    pub const TLS: u64 = 16;
    /// Introduction (protocol 3): the primary's resource has a secret.
    pub const SECRET: u64 = 32;
    /// Hello only: the primary's disk is detached (after its errors): the
    /// secondary will hold the only copy of what is written, and records
    /// so before it accepts (as for the `DiskFailed` request).
    pub const DISK_FAILED: u64 = 64;
}

/// Security mode bits of a [`Challenge`] and of the authentication
/// transcript.
pub mod modes {
    /// The connection continues in TLS.
    pub const TLS: u16 = 1;
    /// Both sides prove the shared secret.
    pub const SECRET: u16 = 2;
    /// Every mode bit defined.
    pub const ALL: u16 = TLS | SECRET;

    /// The mode bits of an introduction's flags.
    pub const fn of_hello_flags(flags: u64) -> u16 {
        let mut m = 0;
        if flags & super::hello_flags::TLS != 0 {
            m |= TLS;
        }
        if flags & super::hello_flags::SECRET != 0 {
            m |= SECRET;
        }
        m
    }

    /// The introduction flags of mode bits.
    pub const fn to_hello_flags(modes: u16) -> u64 {
        let mut f = 0;
        if modes & TLS != 0 {
            f |= super::hello_flags::TLS;
        }
        if modes & SECRET != 0 {
            f |= super::hello_flags::SECRET;
        }
        f
    }

    /// "TLS and a secret", "a secret", "TLS", "neither TLS nor a secret".
    pub fn describe(modes: u16) -> &'static str {
        match (modes & TLS != 0, modes & SECRET != 0) {
            (true, true) => "TLS and a secret",
            (false, true) => "a secret (no TLS)",
            (true, false) => "TLS (no secret)",
            (false, false) => "neither TLS nor a secret",
        }
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
    /// One node has a secret or TLS and the other has not (protocol 3).
    AuthMismatch = 10,
    /// The primary's proof of the shared secret is wrong (protocol 3).
    AuthFailed = 11,
    /// The secondary's disk is detached after its errors: it takes no
    /// primary until it is attached again (see the message).
    DiskFailed = 12,
}

impl Refusal {
    /// Every refusal, in code order.
    pub const ALL: [Refusal; 12] = [
        Refusal::UnknownResource,
        Refusal::NotSecondary,
        Refusal::GeometryMismatch,
        Refusal::ResuidMismatch,
        Refusal::SplitBrain,
        Refusal::VersionUnsupported,
        Refusal::Busy,
        Refusal::InconsistentCounters,
        Refusal::Refused,
        Refusal::AuthMismatch,
        Refusal::AuthFailed,
        Refusal::DiskFailed,
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
            10 => Refusal::AuthMismatch,
            11 => Refusal::AuthFailed,
            12 => Refusal::DiskFailed,
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
            Refusal::AuthMismatch => "security settings differ (secret, TLS)",
            Refusal::AuthFailed => "authentication failed (wrong secret)",
            Refusal::DiskFailed => "the secondary's disk failed",
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

/// Fixed part of a Challenge payload (40 bytes).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawChallenge {
    version: U16,
    modes: U16,
    reserved: U32,
    nonce: [u8; CHALLENGE_NONCE_LEN],
}

/// Bytes of a nonce in a [`Challenge`] or a [`Proof`].
pub const CHALLENGE_NONCE_LEN: usize = 32;
/// Bytes of a MAC in a [`Proof`].
pub const PROOF_MAC_LEN: usize = 32;
/// Size of the fixed part of a Challenge payload.
pub const CHALLENGE_FIXED_LEN: usize = 40;
const _: () = assert!(core::mem::size_of::<RawChallenge>() == CHALLENGE_FIXED_LEN);
/// Largest Challenge payload.
pub const MAX_CHALLENGE_LEN: usize = CHALLENGE_FIXED_LEN + 2 + MAX_NODE_LEN;
/// Size of a Proof payload.
pub const PROOF_LEN: usize = CHALLENGE_NONCE_LEN + PROOF_MAC_LEN;

/// Payload of a Challenge (protocol 3): the secondary accepts the
/// introduction, states its security modes and its node name, and sends
/// its nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The negotiated protocol version.
    pub version: u16,
    /// [`modes`] bits: what the connection continues with.
    pub modes: u16,
    /// The secondary's nonce (random; zero when there is no secret).
    pub nonce: [u8; CHALLENGE_NONCE_LEN],
    /// The secondary's node name (at most 63 bytes of UTF-8, no NUL).
    pub node: String,
}

impl Challenge {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let raw = RawChallenge {
            version: U16::new(self.version),
            modes: U16::new(self.modes),
            reserved: U32::new(0),
            nonce: self.nonce,
        };
        let mut out = Vec::with_capacity(CHALLENGE_FIXED_LEN + 2 + self.node.len());
        out.extend_from_slice(raw.as_bytes());
        put_str(&mut out, &self.node);
        out
    }

    /// Decodes and validates a Challenge payload.
    pub fn decode(payload: &[u8]) -> Result<Challenge, FrameError> {
        let mut r = Reader {
            buf: payload,
            what: "Challenge",
        };
        let raw: RawChallenge = r.fixed()?;
        reserved_zero("Challenge bytes 4..8", raw.reserved.get().into())?;
        let node = r.string("node name", MAX_NODE_LEN)?;
        r.finish()?;
        let modes = raw.modes.get();
        if modes & !modes::ALL != 0 {
            return Err(FrameError::Malformed(format!(
                "Challenge has unknown mode bits {:#06x}",
                modes & !modes::ALL
            )));
        }
        if raw.version.get() == 0 {
            return Err(FrameError::Malformed("Challenge version 0".into()));
        }
        Ok(Challenge {
            version: raw.version.get(),
            modes,
            nonce: raw.nonce,
            node,
        })
    }
}

/// Payload of a Proof (protocol 3, 64 bytes): the sender's nonce (the
/// secondary sends zeroes: its nonce was in the Challenge) and its
/// HMAC-SHA256 proof of the shared secret over the handshake transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// The sender's nonce.
    pub nonce: [u8; CHALLENGE_NONCE_LEN],
    /// The sender's proof.
    pub mac: [u8; PROOF_MAC_LEN],
}

impl Proof {
    /// The 64 payload bytes.
    pub fn encode(&self) -> [u8; PROOF_LEN] {
        let mut out = [0u8; PROOF_LEN];
        out[..CHALLENGE_NONCE_LEN].copy_from_slice(&self.nonce);
        out[CHALLENGE_NONCE_LEN..].copy_from_slice(&self.mac);
        out
    }

    /// Decodes a Proof payload.
    pub fn decode(payload: &[u8]) -> Result<Proof, FrameError> {
        let mut r = Reader {
            buf: payload,
            what: "Proof",
        };
        let nonce = r
            .take(CHALLENGE_NONCE_LEN)?
            .try_into()
            .map_err(|_| FrameError::Malformed("Proof nonce".into()))?;
        let mac = r
            .take(PROOF_MAC_LEN)?
            .try_into()
            .map_err(|_| FrameError::Malformed("Proof MAC".into()))?;
        r.finish()?;
        Ok(Proof { nonce, mac })
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

/// Payload of a Checksums request: how to cut the range into blocks and
/// which digest to take of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChecksumsRequest {
    /// Bytes per block: a power of two from 512 to 1 MiB.
    pub block: u32,
    /// The digest algorithm.
    pub algo: Algo,
}

impl ChecksumsRequest {
    /// The 8 payload bytes: block (u32), algorithm code (u8), 3 reserved.
    pub fn encode(&self) -> [u8; CHECKSUMS_REQUEST_LEN] {
        let mut out = [0u8; CHECKSUMS_REQUEST_LEN];
        out[..4].copy_from_slice(&self.block.to_le_bytes());
        out[4] = self.algo.code();
        out
    }

    /// Decodes a Checksums payload.
    pub fn decode(payload: &[u8]) -> Result<ChecksumsRequest, FrameError> {
        let b: [u8; CHECKSUMS_REQUEST_LEN] =
            payload.try_into().map_err(|_| FrameError::Truncated {
                what: "Checksums",
                needed: CHECKSUMS_REQUEST_LEN,
                actual: payload.len(),
            })?;
        let block = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if !block.is_power_of_two() || !(MIN_DIGEST_BLOCK..=MAX_DIGEST_BLOCK).contains(&block) {
            return Err(FrameError::Malformed(format!(
                "Checksums block size {block} is not a power of two from 512 to 1 MiB"
            )));
        }
        let algo = Algo::from_code(b[4]).ok_or_else(|| {
            FrameError::Malformed(format!("unknown checksum algorithm code {}", b[4]))
        })?;
        reserved_zero(
            "Checksums bytes 5..8",
            u64::from(b[5]) | u64::from(b[6]) << 8 | u64::from(b[7]) << 16,
        )?;
        Ok(ChecksumsRequest { block, algo })
    }

    /// Bytes of the reply's digests for `length` bytes.
    pub fn reply_len(&self, length: u32) -> usize {
        crate::digest::block_count(u64::from(length), self.block) as usize * self.algo.digest_len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn checksums_request() {
        let r = ChecksumsRequest {
            block: 4096,
            algo: Algo::Sha256,
        };
        assert_eq!(r.encode(), [0, 0x10, 0, 0, 2, 0, 0, 0]);
        assert_eq!(ChecksumsRequest::decode(&r.encode()), Ok(r));
        assert_eq!(r.reply_len(8193), 3 * 32);
        for bad in [
            [0u8, 0x10, 0, 0, 9, 0, 0, 0],
            [0, 0x10, 0, 0, 1, 0, 1, 0],
            [0, 0x11, 0, 0, 1, 0, 0, 0],
            [0, 1, 0, 0, 1, 0, 0, 0],
        ] {
            assert!(ChecksumsRequest::decode(&bad).is_err(), "{bad:?}");
        }
        assert!(ChecksumsRequest::decode(&[0; 7]).is_err());
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
        assert_eq!(&b[0..4], &[3, 0, 3, 0]);
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
        assert_eq!(Hello::peek_versions(&b), Some((3, 3)));
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
        assert_eq!(Refusal::from_code(13), None);
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
    fn challenge_and_proof_layout() {
        let c = Challenge {
            version: 3,
            modes: modes::SECRET,
            nonce: [9; 32],
            node: "beta".into(),
        };
        let b = c.encode();
        assert_eq!(b.len(), CHALLENGE_FIXED_LEN + 2 + 4);
        assert_eq!(&b[0..8], &[3, 0, 2, 0, 0, 0, 0, 0]);
        assert_eq!(&b[8..40], &[9; 32]);
        assert_eq!(&b[40..], b"\x04\x00beta");
        assert_eq!(Challenge::decode(&b), Ok(c.clone()));
        let mut bad = b.clone();
        bad[2] = 4;
        assert!(
            matches!(Challenge::decode(&bad), Err(FrameError::Malformed(m)) if m.contains("mode"))
        );
        let mut bad = b.clone();
        bad[5] = 1;
        assert!(matches!(
            Challenge::decode(&bad),
            Err(FrameError::ReservedNonZero { .. })
        ));
        let mut bad = b.clone();
        bad[0] = 0;
        assert!(Challenge::decode(&bad).is_err());
        assert!(Challenge::decode(&b[..39]).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(matches!(
            Challenge::decode(&long),
            Err(FrameError::TrailingBytes { .. })
        ));
        let mut c2 = c;
        c2.node = "n".repeat(64);
        assert!(Challenge::decode(&c2.encode()).is_err());

        let p = Proof {
            nonce: [1; 32],
            mac: [2; 32],
        };
        let b = p.encode();
        assert_eq!(&b[..32], &[1; 32]);
        assert_eq!(&b[32..], &[2; 32]);
        assert_eq!(Proof::decode(&b), Ok(p));
        assert!(Proof::decode(&b[..63]).is_err());
        let mut long = b.to_vec();
        long.push(0);
        assert!(Proof::decode(&long).is_err());
        assert_eq!(
            modes::of_hello_flags(hello_flags::TLS | hello_flags::CLEAN),
            modes::TLS
        );
        assert_eq!(
            modes::to_hello_flags(modes::ALL),
            hello_flags::TLS | hello_flags::SECRET
        );
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

    // ---- property tests -------------------------------------------------

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
            if let Ok(c) = Challenge::decode(&bytes) {
                prop_assert_eq!(c.encode(), bytes.clone());
            }
            if let Ok(p) = Proof::decode(&bytes) {
                prop_assert_eq!(p.encode().to_vec(), bytes.clone());
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
