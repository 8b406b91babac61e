//! NBD wire format: constants, header layouts, option and request parsing,
//! request validation and reply encoding.
//!
//! This module is pure: it never touches a socket, so every function here is
//! unit- and property-tested without an executor. The server
//! (`super::server`) reads bytes, hands them to these functions and writes
//! what they return.
//!
//! All integers on the wire are big-endian. Headers are `#[repr(C)]`
//! structs of `zerocopy` big-endian integers (alignment 1, so no padding);
//! their sizes are checked at compile time.
//!
//! Reference: the NBD protocol specification (`doc/proto.md` of
//! NetworkBlockDevice/nbd): fixed newstyle negotiation, simple and
//! structured replies, the `base:allocation` metadata context.

use std::fmt;

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::export::{Allocation, BackendError, BackendGeometry, Segment, WriteFlags};

// ---------------------------------------------------------------------------
// Magics
// ---------------------------------------------------------------------------

/// First 8 bytes the server sends (`"NBDMAGIC"`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle magic (`"IHAVEOPT"`), sent by the server after [`NBDMAGIC`] and
/// by the client in front of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------
// Handshake flags
// ---------------------------------------------------------------------------

/// Server handshake flag: fixed newstyle negotiation is supported.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the 124 zero bytes after `NBD_OPT_EXPORT_NAME`
/// may be omitted.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Handshake flags this server sends.
pub const SERVER_HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands; any other bit set means the
/// connection must be dropped.
pub const KNOWN_CLIENT_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------------------
// Options, option replies, info types
// ---------------------------------------------------------------------------

/// Option: choose an export and enter transmission (no error possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: option accepted / end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of an `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of export information (`NBD_OPT_INFO`/`GO`).
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context (`NBD_OPT_LIST/SET_META_CONTEXT`).
pub const REP_META_CONTEXT: u32 = 4;

const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option reply error: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR + 1;
/// Option reply error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR + 2;
/// Option reply error: syntactically invalid option.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR + 3;
/// Option reply error: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR + 4;
/// Option reply error: TLS required.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR + 5;
/// Option reply error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR + 6;
/// Option reply error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR + 7;
/// Option reply error: the client must request block sizes.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR + 8;
/// Option reply error: request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR + 9;

/// Info type: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Info type: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Transmission flags, commands, command flags
// ---------------------------------------------------------------------------

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: rotational medium.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections may be used at once.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: resize extension.
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: `NBD_CMD_CACHE` is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (followed by the payload).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: cache (prefetch hint).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status (needs structured replies).
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (write zeroes): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (read, structured replies): do not fragment.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (block status): one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (write zeroes): fail fast if zeroing is slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---------------------------------------------------------------------------
// Structured replies, metadata contexts
// ---------------------------------------------------------------------------

/// Structured reply flag: the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: nothing (only as the final chunk).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: read data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a read range that reads as zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status descriptors of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: an error (bit 15 marks error chunks).
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// Chunk type: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// The one metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id once selected (`NBD_OPT_SET_META_CONTEXT`); any value works,
/// clients treat it as opaque. `NBD_OPT_LIST_META_CONTEXT` replies carry 0.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// `base:allocation` flag: not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// Most descriptors in one block status reply (the spec asks for at most
/// 2^20; this keeps a reply at 8 KiB and its `lseek`s few).
pub const MAX_STATUS_DESCRIPTORS: usize = 1024;

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

/// Largest option payload the server reads. Anything longer is answered with
/// `NBD_REP_ERR_TOO_BIG` and the connection is closed.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest string (export name) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Size of the zero padding after an `NBD_OPT_EXPORT_NAME` reply.
pub const EXPORT_NAME_PADDING: usize = 124;

// ---------------------------------------------------------------------------
// Error values
// ---------------------------------------------------------------------------

/// Error value of a transmission reply (the NBD "errno" values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Errno {
    /// Operation not permitted (write to a read-only export).
    Perm = 1,
    /// Input/output error.
    Io = 5,
    /// Cannot allocate memory.
    NoMem = 12,
    /// Invalid argument.
    Inval = 22,
    /// No space left on device (write beyond the end).
    NoSpc = 28,
    /// Value too large (request above the maximum payload).
    Overflow = 75,
    /// Operation not supported.
    NotSup = 95,
    /// Server is shutting down.
    Shutdown = 108,
}

impl Errno {
    /// Every defined value.
    pub const ALL: [Errno; 8] = [
        Errno::Perm,
        Errno::Io,
        Errno::NoMem,
        Errno::Inval,
        Errno::NoSpc,
        Errno::Overflow,
        Errno::NotSup,
        Errno::Shutdown,
    ];

    /// Wire value.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// A short description for humans (error chunks carry it).
    pub fn message(self) -> &'static str {
        match self {
            Errno::Perm => "operation not permitted (read-only export)",
            Errno::Io => "input/output error",
            Errno::NoMem => "cannot allocate memory",
            Errno::Inval => "invalid argument",
            Errno::NoSpc => {
                "no space left on device (beyond the end of the export, or the disk is full)"
            }
            Errno::Overflow => "request too large",
            Errno::NotSup => "operation not supported",
            Errno::Shutdown => "server is shutting down",
        }
    }

    /// The error with this wire value, if it is a defined one.
    pub fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.code() == code)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Errno::Perm => "EPERM",
            Errno::Io => "EIO",
            Errno::NoMem => "ENOMEM",
            Errno::Inval => "EINVAL",
            Errno::NoSpc => "ENOSPC",
            Errno::Overflow => "EOVERFLOW",
            Errno::NotSup => "ENOTSUP",
            Errno::Shutdown => "ESHUTDOWN",
        };
        f.write_str(name)
    }
}

impl From<BackendError> for Errno {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Io => Errno::Io,
            BackendError::Invalid => Errno::Inval,
            BackendError::NoSpace => Errno::NoSpc,
            BackendError::Shutdown => Errno::Shutdown,
            BackendError::NotSupported => Errno::NotSup,
        }
    }
}

// ---------------------------------------------------------------------------
// Wire headers
// ---------------------------------------------------------------------------

/// Server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags (18 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Greeting {
    /// [`NBDMAGIC`].
    pub nbdmagic: U64,
    /// [`IHAVEOPT`].
    pub ihaveopt: U64,
    /// Handshake flags.
    pub flags: U16,
}

/// Option request header sent by the client (16 bytes); `length` bytes of
/// option data follow.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionHeader {
    /// [`IHAVEOPT`].
    pub magic: U64,
    /// Option code (`OPT_*`).
    pub option: U32,
    /// Length of the option data.
    pub length: U32,
}

/// Option reply header (20 bytes); `length` bytes of reply data follow.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionReplyHeader {
    /// [`OPTION_REPLY_MAGIC`].
    pub magic: U64,
    /// The option this replies to.
    pub option: U32,
    /// Reply type (`REP_*`).
    pub reply_type: U32,
    /// Length of the reply data.
    pub length: U32,
}

/// Transmission request header (28 bytes); a write's payload follows.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RequestHeader {
    /// [`REQUEST_MAGIC`].
    pub magic: U32,
    /// Command flags (`CMD_FLAG_*`).
    pub flags: U16,
    /// Command (`CMD_*`).
    pub command: U16,
    /// Opaque handle echoed in the reply.
    pub handle: U64,
    /// Byte offset.
    pub offset: U64,
    /// Byte length.
    pub length: U32,
}

/// Simple reply header (16 bytes); a successful read's data follows.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SimpleReplyHeader {
    /// [`SIMPLE_REPLY_MAGIC`].
    pub magic: U32,
    /// Error value, 0 on success.
    pub error: U32,
    /// Handle of the request.
    pub handle: U64,
}

/// Structured reply chunk header (20 bytes); `length` bytes of payload
/// follow.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct StructuredReplyHeader {
    /// [`STRUCTURED_REPLY_MAGIC`].
    pub magic: U32,
    /// Reply flags (`REPLY_FLAG_*`).
    pub flags: U16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub reply_type: U16,
    /// Handle of the request.
    pub handle: U64,
    /// Length of the payload.
    pub length: U32,
}

/// Size of [`Greeting`] on the wire.
pub const GREETING_LEN: usize = 18;
/// Size of [`OptionHeader`] on the wire.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of [`OptionReplyHeader`] on the wire.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Size of [`RequestHeader`] on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of [`SimpleReplyHeader`] on the wire.
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
/// Size of [`StructuredReplyHeader`] on the wire.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Size of the header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk: chunk
/// header and offset; the data follows.
pub const OFFSET_DATA_HEADER_LEN: usize = STRUCTURED_REPLY_HEADER_LEN + 8;

const _: () = assert!(size_of::<Greeting>() == GREETING_LEN);
const _: () = assert!(size_of::<OptionHeader>() == OPTION_HEADER_LEN);
const _: () = assert!(size_of::<OptionReplyHeader>() == OPTION_REPLY_HEADER_LEN);
const _: () = assert!(size_of::<RequestHeader>() == REQUEST_HEADER_LEN);
const _: () = assert!(size_of::<SimpleReplyHeader>() == SIMPLE_REPLY_HEADER_LEN);
const _: () = assert!(size_of::<StructuredReplyHeader>() == STRUCTURED_REPLY_HEADER_LEN);

// ---------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------

/// The server greeting.
pub fn greeting() -> [u8; GREETING_LEN] {
    let g = Greeting {
        nbdmagic: U64::new(NBDMAGIC),
        ihaveopt: U64::new(IHAVEOPT),
        flags: U16::new(SERVER_HANDSHAKE_FLAGS),
    };
    let mut out = [0u8; GREETING_LEN];
    out.copy_from_slice(g.as_bytes());
    out
}

/// Client flags after validation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle (may send options other than
    /// `NBD_OPT_EXPORT_NAME` and understands option replies).
    pub fixed_newstyle: bool,
    /// Omit the zero padding after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// The client set flag bits this server does not know; the connection must
/// be dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown client flags {0:#x}")]
pub struct UnknownClientFlags(pub u32);

/// Parse the 32-bit client flags.
pub fn parse_client_flags(bytes: [u8; 4]) -> Result<ClientFlags, UnknownClientFlags> {
    let flags = u32::from_be_bytes(bytes);
    let unknown = flags & !KNOWN_CLIENT_FLAGS;
    if unknown != 0 {
        return Err(UnknownClientFlags(unknown));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// A malformed option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OptionHeaderError {
    /// Fewer bytes than a header.
    #[error("option header too short ({0} bytes)")]
    Short(usize),
    /// The magic is not `IHAVEOPT`: the stream is not NBD.
    #[error("bad option magic {0:#x}")]
    BadMagic(u64),
}

/// An option header: which option and how many bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionRequest {
    /// Option code (`OPT_*`).
    pub option: u32,
    /// Length of the option data.
    pub length: u32,
}

impl OptionRequest {
    /// Parse the 16-byte option header.
    pub fn parse(bytes: &[u8]) -> Result<Self, OptionHeaderError> {
        let (hdr, _) = OptionHeader::read_from_prefix(bytes)
            .map_err(|_| OptionHeaderError::Short(bytes.len()))?;
        if hdr.magic.get() != IHAVEOPT {
            return Err(OptionHeaderError::BadMagic(hdr.magic.get()));
        }
        Ok(Self {
            option: hdr.option.get(),
            length: hdr.length.get(),
        })
    }

    /// Encode as the client would send it (used by tests and clients).
    pub fn to_bytes(self) -> [u8; OPTION_HEADER_LEN] {
        let hdr = OptionHeader {
            magic: U64::new(IHAVEOPT),
            option: U32::new(self.option),
            length: U32::new(self.length),
        };
        let mut out = [0u8; OPTION_HEADER_LEN];
        out.copy_from_slice(hdr.as_bytes());
        out
    }

    /// Whether the option data is too long to be read at all.
    pub fn too_big(self) -> bool {
        self.length > MAX_OPTION_LEN
    }
}

/// A syntactically invalid option (answered with `NBD_REP_ERR_INVALID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid option data: {0}")]
pub struct InvalidOption(pub &'static str);

/// An `NBD_OPT_INFO` / `NBD_OPT_GO` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Requested export name (empty: the default export).
    pub name: &'a [u8],
    /// Requested info types, 2 bytes each, big-endian.
    info_types: &'a [u8],
}

impl<'a> InfoRequest<'a> {
    /// Parse the option data: u32 name length, name, u16 count, count u16
    /// info types. Lengths must match the data exactly.
    pub fn parse(data: &'a [u8]) -> Result<Self, InvalidOption> {
        let (name_len, rest) = split_u32(data).ok_or(InvalidOption("truncated name length"))?;
        let name_len = usize::try_from(name_len).map_err(|_| InvalidOption("name too long"))?;
        if name_len > MAX_STRING_LEN {
            return Err(InvalidOption("name too long"));
        }
        if name_len > rest.len() {
            return Err(InvalidOption("name length beyond option data"));
        }
        let (name, rest) = rest.split_at(name_len);
        let (count, info_types) =
            split_u16(rest).ok_or(InvalidOption("truncated info request count"))?;
        if info_types.len() != usize::from(count) * 2 {
            return Err(InvalidOption(
                "info request count does not match option length",
            ));
        }
        Ok(Self { name, info_types })
    }

    /// Requested info types, in order.
    pub fn info_types(&self) -> impl Iterator<Item = u16> + 'a {
        self.info_types
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
    }

    /// Whether the client asked for `info_type`.
    pub fn wants(&self, info_type: u16) -> bool {
        self.info_types().any(|t| t == info_type)
    }

    /// Encode option data for `name` and `info_types` (tests and clients).
    pub fn encode(name: &[u8], info_types: &[u16]) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + name.len() + 2 * info_types.len());
        out.extend_from_slice(&len_u32(name.len()).to_be_bytes());
        out.extend_from_slice(name);
        let count = u16::try_from(info_types.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for t in info_types.iter().take(usize::from(count)) {
            out.extend_from_slice(&t.to_be_bytes());
        }
        out
    }
}

/// An `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// Export name (empty: the default export).
    pub name: &'a [u8],
    /// Number of queries.
    count: u32,
    /// The queries, each a u32 length and that many bytes (checked).
    queries: &'a [u8],
}

impl<'a> MetaContextRequest<'a> {
    /// Parse the option data: u32 name length, name, u32 query count, then
    /// each query as a u32 length and a string. Lengths must match the data
    /// exactly; names and queries are at most [`MAX_STRING_LEN`] bytes.
    pub fn parse(data: &'a [u8]) -> Result<Self, InvalidOption> {
        let (name, rest) = split_string(data).ok_or(InvalidOption("bad export name"))?;
        let (count, queries) = split_u32(rest).ok_or(InvalidOption("truncated query count"))?;
        let mut left = queries;
        for _ in 0..count {
            let (_, tail) = split_string(left).ok_or(InvalidOption("bad query"))?;
            left = tail;
        }
        if !left.is_empty() {
            return Err(InvalidOption("query count does not match option length"));
        }
        Ok(Self {
            name,
            count,
            queries,
        })
    }

    /// The queries, in order.
    pub fn queries(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut left = self.queries;
        (0..self.count).map_while(move |_| {
            let (q, tail) = split_string(left)?;
            left = tail;
            Some(q)
        })
    }

    /// Whether the queries select `base:allocation`. Listing: no query,
    /// `base:` or `base:allocation`; selecting: `base:allocation` only.
    /// Queries of other namespaces, and other leaf names in `base:`, are
    /// ignored (as the spec requires); a query without a namespace is
    /// invalid.
    pub fn selects_base_allocation(&self, listing: bool) -> Result<bool, InvalidOption> {
        if listing && self.count == 0 {
            return Ok(true);
        }
        let mut selected = false;
        for q in self.queries() {
            if !q.contains(&b':') {
                return Err(InvalidOption(
                    "a query must start with a namespace and a colon",
                ));
            }
            selected |= q == BASE_ALLOCATION.as_bytes() || (listing && q == b"base:");
        }
        Ok(selected)
    }

    /// Encode option data (tests and clients).
    pub fn encode(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&len_u32(name.len()).to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&len_u32(queries.len()).to_be_bytes());
        for q in queries {
            out.extend_from_slice(&len_u32(q.len()).to_be_bytes());
            out.extend_from_slice(q);
        }
        out
    }
}

/// `NBD_REP_META_CONTEXT` data: context id, then its name.
pub fn meta_context_data(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// A parsed client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientOption<'a> {
    /// `NBD_OPT_EXPORT_NAME` with the requested name.
    ExportName(&'a [u8]),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest<'a>),
    /// `NBD_OPT_GO`.
    Go(InfoRequest<'a>),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextRequest<'a>),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextRequest<'a>),
    /// Any other option (answered with `NBD_REP_ERR_UNSUP`).
    Unsupported(u32),
}

impl<'a> ClientOption<'a> {
    /// Parse option `option` with its `data`.
    pub fn parse(option: u32, data: &'a [u8]) -> Result<Self, InvalidOption> {
        match option {
            OPT_EXPORT_NAME => {
                if data.len() > MAX_STRING_LEN {
                    return Err(InvalidOption("export name too long"));
                }
                Ok(Self::ExportName(data))
            }
            OPT_ABORT => Ok(Self::Abort),
            OPT_LIST if data.is_empty() => Ok(Self::List),
            OPT_LIST => Err(InvalidOption("NBD_OPT_LIST carries no data")),
            OPT_STARTTLS if data.is_empty() => Ok(Self::StartTls),
            OPT_STARTTLS => Err(InvalidOption("NBD_OPT_STARTTLS carries no data")),
            OPT_INFO => InfoRequest::parse(data).map(Self::Info),
            OPT_GO => InfoRequest::parse(data).map(Self::Go),
            OPT_STRUCTURED_REPLY if data.is_empty() => Ok(Self::StructuredReply),
            OPT_STRUCTURED_REPLY => Err(InvalidOption("NBD_OPT_STRUCTURED_REPLY carries no data")),
            OPT_LIST_META_CONTEXT => MetaContextRequest::parse(data).map(Self::ListMetaContext),
            OPT_SET_META_CONTEXT => MetaContextRequest::parse(data).map(Self::SetMetaContext),
            other => Ok(Self::Unsupported(other)),
        }
    }
}

/// Encode an option reply: header then `data`.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let hdr = OptionReplyHeader {
        magic: U64::new(OPTION_REPLY_MAGIC),
        option: U32::new(option),
        reply_type: U32::new(reply_type),
        length: U32::new(len_u32(data.len())),
    };
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    out.extend_from_slice(hdr.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A decoded option reply header (tests and clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    /// The option replied to.
    pub option: u32,
    /// Reply type.
    pub reply_type: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionReply {
    /// Parse a 20-byte option reply header; `None` if short or bad magic.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let (hdr, _) = OptionReplyHeader::read_from_prefix(bytes).ok()?;
        (hdr.magic.get() == OPTION_REPLY_MAGIC).then(|| Self {
            option: hdr.option.get(),
            reply_type: hdr.reply_type.get(),
            length: hdr.length.get(),
        })
    }
}

/// `NBD_REP_SERVER` data for `name`.
pub fn server_reply_data(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&len_u32(name.len()).to_be_bytes());
    out.extend_from_slice(name);
    out
}

/// `NBD_REP_INFO` data of type `NBD_INFO_EXPORT`.
pub fn info_export_data(size: u64, transmission_flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// `NBD_REP_INFO` data of type `NBD_INFO_NAME`.
pub fn info_name_data(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + name.len());
    out.extend_from_slice(&INFO_NAME.to_be_bytes());
    out.extend_from_slice(name);
    out
}

/// `NBD_REP_INFO` data of type `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size_data(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&min.to_be_bytes());
    out[6..10].copy_from_slice(&preferred.to_be_bytes());
    out[10..14].copy_from_slice(&max.to_be_bytes());
    out
}

/// Reply to a successful `NBD_OPT_EXPORT_NAME`: size, transmission flags,
/// then 124 zero bytes unless the client negotiated `NO_ZEROES`.
pub fn export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let padding = if no_zeroes { 0 } else { EXPORT_NAME_PADDING };
    let mut out = Vec::with_capacity(10 + padding);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    out.resize(10 + padding, 0);
    out
}

/// Transmission flags advertised for an export. `SEND_DF` only once
/// structured replies are negotiated (the spec forbids it before).
pub fn transmission_flags(read_only: bool, structured_replies: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_SEND_FAST_ZERO
        | FLAG_SEND_CACHE
        | FLAG_CAN_MULTI_CONN;
    if read_only {
        flags |= FLAG_READ_ONLY;
    }
    if structured_replies {
        flags |= FLAG_SEND_DF;
    }
    flags
}

/// What a connection negotiated before transmission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged: reads get structured
    /// replies, errors error chunks.
    pub structured_replies: bool,
    /// The id of `base:allocation` if the last `NBD_OPT_SET_META_CONTEXT`
    /// selected it: `NBD_CMD_BLOCK_STATUS` is allowed.
    pub base_allocation: Option<u32>,
}

/// Geometry that cannot be advertised as NBD block size constraints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// The minimum block size is not a power of two in 1..=64 KiB.
    #[error("minimum block size {0} is not a power of two between 1 and 65536")]
    MinBlock(u32),
    /// The preferred block size is not a power of two at least as large as
    /// the minimum block size and 512.
    #[error("preferred block size {0} is not a power of two >= max(minimum, 512)")]
    PreferredBlock(u32),
    /// The maximum payload is not a non-zero multiple of the minimum.
    #[error("maximum payload {0} is not a non-zero multiple of the minimum block size")]
    MaxPayload(u32),
}

/// Check that `g` satisfies the protocol's block size rules (clients such as
/// qemu refuse to connect otherwise).
pub fn check_geometry(g: &BackendGeometry) -> Result<(), GeometryError> {
    if !g.min_block.is_power_of_two() || g.min_block > 65536 {
        return Err(GeometryError::MinBlock(g.min_block));
    }
    if !g.preferred_block.is_power_of_two() || g.preferred_block < g.min_block.max(512) {
        return Err(GeometryError::PreferredBlock(g.preferred_block));
    }
    // `min_block` is a power of two here, so this is `max_payload % min_block`.
    if g.max_payload == 0 || g.max_payload & (g.min_block - 1) != 0 {
        return Err(GeometryError::MaxPayload(g.max_payload));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
    /// Any other value.
    Unknown(u16),
}

impl Command {
    /// Decode a wire value.
    pub fn from_wire(v: u16) -> Self {
        match v {
            CMD_READ => Self::Read,
            CMD_WRITE => Self::Write,
            CMD_DISC => Self::Disc,
            CMD_FLUSH => Self::Flush,
            CMD_TRIM => Self::Trim,
            CMD_CACHE => Self::Cache,
            CMD_WRITE_ZEROES => Self::WriteZeroes,
            CMD_BLOCK_STATUS => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    /// Encode to the wire value.
    pub fn to_wire(self) -> u16 {
        match self {
            Self::Read => CMD_READ,
            Self::Write => CMD_WRITE,
            Self::Disc => CMD_DISC,
            Self::Flush => CMD_FLUSH,
            Self::Trim => CMD_TRIM,
            Self::Cache => CMD_CACHE,
            Self::WriteZeroes => CMD_WRITE_ZEROES,
            Self::BlockStatus => CMD_BLOCK_STATUS,
            Self::Unknown(v) => v,
        }
    }

    /// Command flags valid for this command given what the server
    /// advertises (FUA is valid everywhere once negotiated; DF only with
    /// structured replies).
    fn allowed_flags(self, negotiated: &Negotiated) -> u16 {
        match self {
            Self::Read if negotiated.structured_replies => CMD_FLAG_FUA | CMD_FLAG_DF,
            Self::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Self::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            _ => CMD_FLAG_FUA,
        }
    }
}

/// Why a request header could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Fewer bytes than a header.
    #[error("request header too short ({0} bytes)")]
    Short(usize),
    /// Not a request: framing is lost, the connection must be closed.
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
}

/// A transmission request, decoded but not yet validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// The command.
    pub command: Command,
    /// Raw command flags.
    pub flags: u16,
    /// Client handle, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Parse a 28-byte request header, checking the magic.
    pub fn parse(bytes: &[u8]) -> Result<Self, RequestError> {
        let (hdr, _) =
            RequestHeader::read_from_prefix(bytes).map_err(|_| RequestError::Short(bytes.len()))?;
        if hdr.magic.get() != REQUEST_MAGIC {
            return Err(RequestError::BadMagic(hdr.magic.get()));
        }
        Ok(Self {
            command: Command::from_wire(hdr.command.get()),
            flags: hdr.flags.get(),
            handle: hdr.handle.get(),
            offset: hdr.offset.get(),
            length: hdr.length.get(),
        })
    }

    /// Encode as the client would send it.
    pub fn to_bytes(&self) -> [u8; REQUEST_HEADER_LEN] {
        let hdr = RequestHeader {
            magic: U32::new(REQUEST_MAGIC),
            flags: U16::new(self.flags),
            command: U16::new(self.command.to_wire()),
            handle: U64::new(self.handle),
            offset: U64::new(self.offset),
            length: U32::new(self.length),
        };
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out.copy_from_slice(hdr.as_bytes());
        out
    }

    /// Bytes of payload that follow the header on the wire (whether or not
    /// the request is valid): the length of a write, else 0.
    pub fn payload_len(&self) -> u32 {
        match self.command {
            Command::Write => self.length,
            _ => 0,
        }
    }
}

/// What a connection may do: derived from the backend geometry and the
/// export configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    /// Export size in bytes.
    pub size: u64,
    /// Largest read or write payload.
    pub max_payload: u32,
    /// Writes are refused.
    pub read_only: bool,
}

impl ExportLimits {
    /// Limits for `geometry`.
    pub fn new(geometry: &BackendGeometry, read_only: bool) -> Self {
        Self {
            size: geometry.size,
            max_payload: geometry.max_payload,
            read_only,
        }
    }
}

/// A validated request, ready to be handed to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte length (1..=max_payload).
        len: u32,
    },
    /// Write the `len`-byte payload at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Byte length (1..=max_payload).
        len: u32,
        /// FUA.
        flags: WriteFlags,
    },
    /// Flush.
    Flush,
    /// Trim (reads back as zeros with this backend).
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
        /// FUA.
        flags: WriteFlags,
    },
    /// Write zeroes.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
        /// FUA.
        flags: WriteFlags,
        /// `FAST_ZERO`: fail with `ENOTSUP` unless zeroing is fast.
        fast: bool,
    },
    /// Cache (prefetch hint).
    Cache {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
    },
    /// Block status of `base:allocation`.
    BlockStatus {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
        /// `REQ_ONE`: a single descriptor.
        req_one: bool,
    },
    /// Disconnect: finish in-flight requests and close (no reply).
    Disconnect,
}

/// [`validate_negotiated`] for a connection that negotiated nothing
/// (simple replies, no metadata context).
pub fn validate(req: &Request, limits: &ExportLimits) -> Result<Op, Errno> {
    validate_negotiated(req, limits, &Negotiated::default())
}

/// Decide whether `req` may be executed on a connection that negotiated
/// `negotiated`, and if not which error to reply.
///
/// The rules, in order:
/// - `DISC` is always accepted (it has no reply).
/// - unknown commands, and `BLOCK_STATUS` without a selected metadata
///   context: `EINVAL`;
/// - a flag not valid for the command (FUA is valid everywhere; NO_HOLE
///   and FAST_ZERO on WRITE_ZEROES; REQ_ONE on BLOCK_STATUS; DF on READ
///   once structured replies are negotiated; nothing else): `EINVAL`;
/// - WRITE, TRIM, WRITE_ZEROES on a read-only export: `EPERM`;
/// - FLUSH with a non-zero offset or length: `EINVAL`;
/// - zero length: `EINVAL`;
/// - READ or WRITE longer than the maximum payload: `EOVERFLOW`;
/// - a range that overflows or ends beyond the export: `ENOSPC` for WRITE
///   and WRITE_ZEROES, `EINVAL` for READ, TRIM, CACHE and BLOCK_STATUS (as
///   the spec recommends).
pub fn validate_negotiated(
    req: &Request,
    limits: &ExportLimits,
    negotiated: &Negotiated,
) -> Result<Op, Errno> {
    let (offset, len) = (req.offset, req.length);
    let flags = WriteFlags {
        fua: req.flags & CMD_FLAG_FUA != 0,
    };
    match req.command {
        Command::Disc => Ok(Op::Disconnect),
        Command::Unknown(_) => Err(Errno::Inval),
        Command::BlockStatus if negotiated.base_allocation.is_none() => Err(Errno::Inval),
        Command::BlockStatus => {
            check_flags(req, negotiated)?;
            check_range(req, limits)?;
            Ok(Op::BlockStatus {
                offset,
                len,
                req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
            })
        }
        Command::Cache => {
            check_flags(req, negotiated)?;
            check_range(req, limits)?;
            Ok(Op::Cache { offset, len })
        }
        Command::Flush => {
            check_flags(req, negotiated)?;
            if offset != 0 || len != 0 {
                return Err(Errno::Inval);
            }
            Ok(Op::Flush)
        }
        Command::Read => {
            check_flags(req, negotiated)?;
            check_range(req, limits)?;
            Ok(Op::Read { offset, len })
        }
        Command::Write => {
            check_flags(req, negotiated)?;
            check_writable(limits)?;
            check_range(req, limits)?;
            Ok(Op::Write { offset, len, flags })
        }
        Command::Trim => {
            check_flags(req, negotiated)?;
            check_writable(limits)?;
            check_range(req, limits)?;
            Ok(Op::Trim { offset, len, flags })
        }
        Command::WriteZeroes => {
            check_flags(req, negotiated)?;
            check_writable(limits)?;
            check_range(req, limits)?;
            Ok(Op::WriteZeroes {
                offset,
                len,
                flags,
                fast: req.flags & CMD_FLAG_FAST_ZERO != 0,
            })
        }
    }
}

/// Only the flags documented for the command may be set.
fn check_flags(req: &Request, negotiated: &Negotiated) -> Result<(), Errno> {
    if req.flags & !req.command.allowed_flags(negotiated) != 0 {
        return Err(Errno::Inval);
    }
    Ok(())
}

/// Writes are refused on a read-only export.
fn check_writable(limits: &ExportLimits) -> Result<(), Errno> {
    if limits.read_only {
        return Err(Errno::Perm);
    }
    Ok(())
}

/// Length and range checks for the commands that address a range.
fn check_range(req: &Request, limits: &ExportLimits) -> Result<(), Errno> {
    if req.length == 0 {
        return Err(Errno::Inval);
    }
    let has_payload = matches!(req.command, Command::Read | Command::Write);
    if has_payload && req.length > limits.max_payload {
        return Err(Errno::Overflow);
    }
    let in_range = req
        .offset
        .checked_add(u64::from(req.length))
        .is_some_and(|end| end <= limits.size);
    if in_range {
        return Ok(());
    }
    match req.command {
        Command::Write | Command::WriteZeroes => Err(Errno::NoSpc),
        _ => Err(Errno::Inval),
    }
}

impl SimpleReplyHeader {
    /// The reply header for `handle`, with `error` (`None`: success).
    pub fn new(handle: u64, error: Option<Errno>) -> Self {
        Self {
            magic: U32::new(SIMPLE_REPLY_MAGIC),
            error: U32::new(error.map_or(0, Errno::code)),
            handle: U64::new(handle),
        }
    }

    /// Encode.
    pub fn to_bytes(&self) -> [u8; SIMPLE_REPLY_HEADER_LEN] {
        let mut out = [0u8; SIMPLE_REPLY_HEADER_LEN];
        out.copy_from_slice(self.as_bytes());
        out
    }
}

/// A decoded simple reply (tests and clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// Raw error value (0: success).
    pub error: u32,
    /// Handle of the request.
    pub handle: u64,
}

impl SimpleReply {
    /// Parse a 16-byte simple reply header; `None` if short or bad magic.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let (hdr, _) = SimpleReplyHeader::read_from_prefix(bytes).ok()?;
        (hdr.magic.get() == SIMPLE_REPLY_MAGIC).then(|| Self {
            error: hdr.error.get(),
            handle: hdr.handle.get(),
        })
    }
}

impl StructuredReplyHeader {
    /// A chunk header for `handle`.
    pub fn new(handle: u64, flags: u16, reply_type: u16, length: u32) -> Self {
        Self {
            magic: U32::new(STRUCTURED_REPLY_MAGIC),
            flags: U16::new(flags),
            reply_type: U16::new(reply_type),
            handle: U64::new(handle),
            length: U32::new(length),
        }
    }

    /// Encode.
    pub fn to_bytes(&self) -> [u8; STRUCTURED_REPLY_HEADER_LEN] {
        let mut out = [0u8; STRUCTURED_REPLY_HEADER_LEN];
        out.copy_from_slice(self.as_bytes());
        out
    }
}

/// The header of the single, final `NBD_REPLY_TYPE_OFFSET_DATA` chunk of
/// a read of `len` bytes at `offset` (`len` at most `u32::MAX - 8`, which
/// the maximum payload guarantees); the data follows it on the wire.
pub fn offset_data_header(handle: u64, offset: u64, len: usize) -> [u8; OFFSET_DATA_HEADER_LEN] {
    let length = u32::try_from(len + 8).unwrap_or(u32::MAX);
    let hdr = StructuredReplyHeader::new(handle, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, length);
    let mut out = [0u8; OFFSET_DATA_HEADER_LEN];
    out[..STRUCTURED_REPLY_HEADER_LEN].copy_from_slice(hdr.as_bytes());
    out[STRUCTURED_REPLY_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    out
}

/// Appends the single, final `NBD_REPLY_TYPE_ERROR` chunk of a failed
/// request: the error and a short message for humans.
pub fn encode_error_chunk(out: &mut Vec<u8>, handle: u64, error: Errno) {
    let msg = error.message().as_bytes();
    let length = len_u32(6 + msg.len());
    out.extend_from_slice(
        StructuredReplyHeader::new(handle, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, length).as_bytes(),
    );
    out.extend_from_slice(&error.code().to_be_bytes());
    out.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(msg);
}

/// One `NBD_REPLY_TYPE_BLOCK_STATUS` descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusDescriptor {
    /// Length of the extent (never 0).
    pub length: u32,
    /// `base:allocation` flags (`STATE_*`).
    pub flags: u32,
}

/// `base:allocation` flags of a segment: a hole is `HOLE | ZERO`, data 0.
pub fn allocation_flags(a: Allocation) -> u32 {
    match a {
        Allocation::Hole => STATE_HOLE | STATE_ZERO,
        Allocation::Data => 0,
    }
}

/// The descriptors answering a block status request for
/// `[offset, offset + len)` from the backend's `segments`: consecutive from `offset`, each
/// non-empty and within the request (so their sum never exceeds `len`),
/// neighbours with the same flags merged, at most `max` (1 for
/// `REQ_ONE`). Segments that do not continue the map contiguously end it
/// (the client asks again from there); if nothing usable is left, one
/// data descriptor covers the request (data is always a correct answer).
pub fn status_descriptors(
    offset: u64,
    len: u32,
    segments: &[Segment],
    max: usize,
) -> Vec<StatusDescriptor> {
    let max = max.max(1);
    let end = offset + u64::from(len);
    let mut out: Vec<StatusDescriptor> = Vec::new();
    let mut pos = offset;
    for seg in segments {
        if pos >= end || seg.offset > pos {
            break;
        }
        let seg_end = seg.offset.saturating_add(seg.len).min(end);
        if seg_end <= pos {
            continue;
        }
        // Within the request, so below 2^32.
        let length = (seg_end - pos) as u32;
        let flags = allocation_flags(seg.allocation);
        let full = out.len() == max;
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += length,
            _ if full => break,
            _ => out.push(StatusDescriptor { length, flags }),
        }
        pos = seg_end;
    }
    if out.is_empty() {
        out.push(StatusDescriptor {
            length: len,
            flags: 0,
        });
    }
    out
}

/// Appends the single, final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk of
/// metadata context `context` with `descriptors`.
pub fn encode_block_status_chunk(
    out: &mut Vec<u8>,
    handle: u64,
    context: u32,
    descriptors: &[StatusDescriptor],
) {
    let length = len_u32(4 + 8 * descriptors.len());
    out.extend_from_slice(
        StructuredReplyHeader::new(handle, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, length)
            .as_bytes(),
    );
    out.extend_from_slice(&context.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.length.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
}

/// A decoded structured reply chunk header (tests and clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructuredReply {
    /// Reply flags.
    pub flags: u16,
    /// Chunk type.
    pub reply_type: u16,
    /// Handle of the request.
    pub handle: u64,
    /// Payload length.
    pub length: u32,
}

impl StructuredReply {
    /// Parse a 20-byte chunk header; `None` if short or bad magic.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let (hdr, _) = StructuredReplyHeader::read_from_prefix(bytes).ok()?;
        (hdr.magic.get() == STRUCTURED_REPLY_MAGIC).then(|| Self {
            flags: hdr.flags.get(),
            reply_type: hdr.reply_type.get(),
            handle: hdr.handle.get(),
            length: hdr.length.get(),
        })
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn split_u32(data: &[u8]) -> Option<(u32, &[u8])> {
    let (head, rest) = data.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*head), rest))
}

/// A u32 length and that many bytes (at most [`MAX_STRING_LEN`]).
fn split_string(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = split_u32(data)?;
    let len = usize::try_from(len).ok().filter(|&l| l <= MAX_STRING_LEN)?;
    (len <= rest.len()).then(|| rest.split_at(len))
}

fn split_u16(data: &[u8]) -> Option<(u16, &[u8])> {
    let (head, rest) = data.split_first_chunk::<2>()?;
    Some((u16::from_be_bytes(*head), rest))
}

/// A length as the u32 the wire carries. Callers only pass lengths bounded
/// by [`MAX_OPTION_LEN`]-sized buffers; saturate rather than wrap otherwise.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GEO: BackendGeometry = BackendGeometry {
        size: 1 << 20,
        min_block: 512,
        preferred_block: 4096,
        max_payload: 64 * 1024,
    };

    fn limits() -> ExportLimits {
        ExportLimits::new(&GEO, false)
    }

    fn req(command: Command, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            command,
            flags,
            handle: 7,
            offset,
            length,
        }
    }

    #[test]
    fn header_layouts() {
        let g = greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);

        let r = req(
            Command::Write,
            CMD_FLAG_FUA,
            0x0102_0304_0506_0708,
            0x1122_3344,
        );
        let b = r.to_bytes();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..6], &[0, 1]);
        assert_eq!(&b[6..8], &[0, 1]);
        assert_eq!(&b[8..16], &7u64.to_be_bytes());
        assert_eq!(&b[16..24], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[24..28], &[0x11, 0x22, 0x33, 0x44]);

        let h = SimpleReplyHeader::new(0xdead_beef, Some(Errno::Inval)).to_bytes();
        assert_eq!(&h[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&h[4..8], &22u32.to_be_bytes());
        assert_eq!(&h[8..16], &0xdead_beefu64.to_be_bytes());
    }

    #[test]
    fn option_reply_layout() {
        let r = option_reply(OPT_GO, REP_ERR_UNKNOWN, b"no");
        assert_eq!(r.len(), 22);
        assert_eq!(&r[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[8..12], &7u32.to_be_bytes());
        assert_eq!(&r[12..16], &0x8000_0006u32.to_be_bytes());
        assert_eq!(&r[16..20], &2u32.to_be_bytes());
        assert_eq!(&r[20..], b"no");
        let parsed = OptionReply::parse(&r).expect("valid reply");
        assert_eq!(parsed.reply_type, REP_ERR_UNKNOWN);
    }

    #[test]
    fn constants_match_spec() {
        assert_eq!(REP_ERR_UNSUP, 0x8000_0001);
        assert_eq!(REP_ERR_TOO_BIG, 0x8000_0009);
        assert_eq!(FLAG_SEND_FAST_ZERO, 0x800);
        assert_eq!(STRUCTURED_REPLY_MAGIC, 0x668e_33ef);
        assert_eq!((OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT), (9, 10));
        assert_eq!(REP_META_CONTEXT, 4);
        assert_eq!((REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET), (32769, 32770));
        assert_eq!((REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_BLOCK_STATUS), (1, 5));
        assert_eq!((FLAG_SEND_CACHE, FLAG_SEND_DF), (0x400, 0x80));
        assert_eq!(
            transmission_flags(false, false),
            FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
                | FLAG_SEND_FAST_ZERO
                | FLAG_SEND_CACHE
                | FLAG_CAN_MULTI_CONN
        );
        assert_ne!(transmission_flags(true, false) & FLAG_READ_ONLY, 0);
        // DF only once structured replies are negotiated.
        assert_eq!(transmission_flags(false, false) & FLAG_SEND_DF, 0);
        assert_eq!(
            transmission_flags(false, true),
            transmission_flags(false, false) | FLAG_SEND_DF
        );
        for e in Errno::ALL {
            assert_eq!(Errno::from_code(e.code()), Some(e));
        }
        assert_eq!(Errno::from_code(0), None);
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags(3u32.to_be_bytes()),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            parse_client_flags(0u32.to_be_bytes()),
            Ok(ClientFlags::default())
        );
        assert_eq!(
            parse_client_flags(5u32.to_be_bytes()),
            Err(UnknownClientFlags(4))
        );
    }

    #[test]
    fn export_name_reply_padding() {
        assert_eq!(export_name_reply(1, 1, true).len(), 10);
        let r = export_name_reply(0x1234, 0x0103, false);
        assert_eq!(r.len(), 134);
        assert_eq!(&r[0..8], &0x1234u64.to_be_bytes());
        assert_eq!(&r[8..10], &[1, 3]);
        assert!(r[10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn info_request_parse() {
        let data = InfoRequest::encode(b"disk", &[INFO_NAME, INFO_BLOCK_SIZE]);
        let info = InfoRequest::parse(&data).expect("valid");
        assert_eq!(info.name, b"disk");
        assert!(info.wants(INFO_NAME));
        assert!(info.wants(INFO_BLOCK_SIZE));
        assert!(!info.wants(INFO_DESCRIPTION));

        // Count says 2, only one present.
        let mut bad = InfoRequest::encode(b"disk", &[INFO_NAME]);
        let n = bad.len();
        bad[n - 3] = 2;
        assert!(InfoRequest::parse(&bad).is_err());
        // Trailing garbage.
        let mut bad = InfoRequest::encode(b"", &[]);
        bad.push(0);
        assert!(InfoRequest::parse(&bad).is_err());
        // Name length beyond the data.
        assert!(InfoRequest::parse(&[0, 0, 0, 9, b'a', 0, 0]).is_err());
        assert!(InfoRequest::parse(&[0, 0, 0]).is_err());
        // Huge name length does not overflow.
        assert!(InfoRequest::parse(&[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
    }

    #[test]
    fn option_parse() {
        assert_eq!(ClientOption::parse(OPT_LIST, b""), Ok(ClientOption::List));
        assert!(ClientOption::parse(OPT_LIST, b"x").is_err());
        assert_eq!(ClientOption::parse(OPT_ABORT, b""), Ok(ClientOption::Abort));
        assert_eq!(
            ClientOption::parse(OPT_EXPORT_NAME, b"a"),
            Ok(ClientOption::ExportName(b"a"))
        );
        assert_eq!(
            ClientOption::parse(OPT_STRUCTURED_REPLY, b""),
            Ok(ClientOption::StructuredReply)
        );
        assert!(ClientOption::parse(OPT_STRUCTURED_REPLY, b"x").is_err());
        let data = MetaContextRequest::encode(b"r0", &[b"base:allocation"]);
        assert!(matches!(
            ClientOption::parse(OPT_SET_META_CONTEXT, &data),
            Ok(ClientOption::SetMetaContext(r)) if r.name == b"r0"
        ));
        assert!(matches!(
            ClientOption::parse(OPT_LIST_META_CONTEXT, &data),
            Ok(ClientOption::ListMetaContext(_))
        ));
        assert!(ClientOption::parse(OPT_LIST_META_CONTEXT, &data[..data.len() - 1]).is_err());
        assert_eq!(
            ClientOption::parse(42, b"zz"),
            Ok(ClientOption::Unsupported(42))
        );
        assert!(ClientOption::parse(OPT_EXPORT_NAME, &[b'a'; 5000]).is_err());

        let hdr = OptionRequest {
            option: OPT_GO,
            length: 10,
        };
        assert_eq!(OptionRequest::parse(&hdr.to_bytes()), Ok(hdr));
        let mut bad = hdr.to_bytes();
        bad[0] ^= 1;
        assert!(matches!(
            OptionRequest::parse(&bad),
            Err(OptionHeaderError::BadMagic(_))
        ));
        assert_eq!(
            OptionRequest::parse(&bad[..3]),
            Err(OptionHeaderError::Short(3))
        );
        assert!(OptionRequest {
            option: 1,
            length: MAX_OPTION_LEN + 1
        }
        .too_big());
    }

    #[test]
    fn request_parse_errors() {
        let mut b = req(Command::Read, 0, 0, 512).to_bytes();
        assert_eq!(Request::parse(&b[..27]), Err(RequestError::Short(27)));
        b[3] = 0;
        assert_eq!(Request::parse(&b), Err(RequestError::BadMagic(0x2560_9500)));
    }

    #[test]
    fn validate_rules() {
        let l = limits();
        assert_eq!(
            validate(&req(Command::Read, 0, 0, 512), &l),
            Ok(Op::Read {
                offset: 0,
                len: 512
            })
        );
        assert_eq!(
            validate(&req(Command::Write, CMD_FLAG_FUA, 1, 3), &l),
            Ok(Op::Write {
                offset: 1,
                len: 3,
                flags: WriteFlags { fua: true }
            })
        );
        assert_eq!(validate(&req(Command::Flush, 0, 0, 0), &l), Ok(Op::Flush));
        assert_eq!(
            validate(&req(Command::Flush, 0, 1, 0), &l),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&req(Command::Disc, 0xffff, 5, 5), &l),
            Ok(Op::Disconnect)
        );
        assert_eq!(
            validate(&req(Command::Unknown(99), 0, 0, 1), &l),
            Err(Errno::Inval)
        );
        // CACHE: any length within the export, FUA only.
        assert_eq!(
            validate(&req(Command::Cache, 0, 0, 1 << 20), &l),
            Ok(Op::Cache {
                offset: 0,
                len: 1 << 20
            })
        );
        assert_eq!(
            validate(&req(Command::Cache, 0, 1 << 20, 1), &l),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&req(Command::Cache, CMD_FLAG_DF, 0, 1), &l),
            Err(Errno::Inval)
        );
        // BLOCK_STATUS needs a selected context.
        assert_eq!(
            validate(&req(Command::BlockStatus, 0, 0, 1), &l),
            Err(Errno::Inval)
        );
        // Flags.
        assert_eq!(
            validate(&req(Command::Read, CMD_FLAG_DF, 0, 1), &l),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&req(Command::Write, CMD_FLAG_NO_HOLE, 0, 1), &l),
            Err(Errno::Inval)
        );
        assert!(validate(&req(Command::WriteZeroes, CMD_FLAG_NO_HOLE, 0, 1), &l).is_ok());
        assert_eq!(
            validate(&req(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, 0, 1), &l),
            Ok(Op::WriteZeroes {
                offset: 0,
                len: 1,
                flags: WriteFlags::default(),
                fast: true
            })
        );
        assert_eq!(
            validate(&req(Command::Trim, CMD_FLAG_FAST_ZERO, 0, 1), &l),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&req(Command::BlockStatus, CMD_FLAG_REQ_ONE, 0, 1), &l),
            Err(Errno::Inval)
        );
        // FUA accepted on reads and flushes (the spec says it must be).
        assert!(validate(&req(Command::Read, CMD_FLAG_FUA, 0, 1), &l).is_ok());
        assert!(validate(&req(Command::Flush, CMD_FLAG_FUA, 0, 0), &l).is_ok());
        // Lengths and ranges.
        assert_eq!(
            validate(&req(Command::Read, 0, 0, 0), &l),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&req(Command::Trim, 0, 0, 0), &l),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&req(Command::Read, 0, 0, 64 * 1024 + 1), &l),
            Err(Errno::Overflow)
        );
        // Trim and write zeroes are not limited by the payload size.
        assert!(validate(&req(Command::Trim, 0, 0, 1 << 20), &l).is_ok());
        assert!(validate(&req(Command::WriteZeroes, 0, 0, 1 << 20), &l).is_ok());
        assert_eq!(
            validate(&req(Command::Read, 0, (1 << 20) - 1, 2), &l),
            Err(Errno::Inval)
        );
        assert_eq!(
            validate(&req(Command::Write, 0, 1 << 20, 1), &l),
            Err(Errno::NoSpc)
        );
        assert_eq!(
            validate(&req(Command::WriteZeroes, 0, u64::MAX, 1), &l),
            Err(Errno::NoSpc)
        );
        assert_eq!(
            validate(&req(Command::Trim, 0, u64::MAX, 1), &l),
            Err(Errno::Inval)
        );
        // Read-only.
        let ro = ExportLimits::new(&GEO, true);
        assert_eq!(
            validate(&req(Command::Write, 0, 0, 1), &ro),
            Err(Errno::Perm)
        );
        assert_eq!(
            validate(&req(Command::Trim, 0, 0, 1), &ro),
            Err(Errno::Perm)
        );
        assert!(validate(&req(Command::Read, 0, 0, 1), &ro).is_ok());
        assert!(validate(&req(Command::Flush, 0, 0, 0), &ro).is_ok());
    }

    #[test]
    fn geometry_checks() {
        assert_eq!(check_geometry(&GEO), Ok(()));
        let bad_min = BackendGeometry {
            min_block: 3,
            ..GEO
        };
        assert!(check_geometry(&bad_min).is_err());
        let bad_pref = BackendGeometry {
            preferred_block: 256,
            ..GEO
        };
        assert!(check_geometry(&bad_pref).is_err());
        let bad_max = BackendGeometry {
            max_payload: 1000,
            ..GEO
        };
        assert!(check_geometry(&bad_max).is_err());
        let tiny = BackendGeometry {
            min_block: 1,
            preferred_block: 512,
            max_payload: 1,
            size: 10,
        };
        assert_eq!(check_geometry(&tiny), Ok(()));
    }

    #[test]
    fn backend_error_mapping() {
        assert_eq!(Errno::from(BackendError::Io), Errno::Io);
        assert_eq!(Errno::from(BackendError::Invalid), Errno::Inval);
        assert_eq!(Errno::from(BackendError::NoSpace), Errno::NoSpc);
        assert_eq!(Errno::from(BackendError::Shutdown), Errno::Shutdown);
        assert_eq!(Errno::from(BackendError::NotSupported), Errno::NotSup);
    }

    const STRUCTURED: Negotiated = Negotiated {
        structured_replies: true,
        base_allocation: None,
    };
    const WITH_CONTEXT: Negotiated = Negotiated {
        structured_replies: true,
        base_allocation: Some(BASE_ALLOCATION_ID),
    };

    #[test]
    fn validate_negotiated_rules() {
        let l = limits();
        // DF: only with structured replies.
        let df = req(Command::Read, CMD_FLAG_DF, 0, 512);
        assert_eq!(validate(&df, &l), Err(Errno::Inval));
        assert_eq!(
            validate_negotiated(&df, &l, &STRUCTURED),
            Ok(Op::Read {
                offset: 0,
                len: 512
            })
        );
        // BLOCK_STATUS: only with a context; any length within the export.
        let bs = req(Command::BlockStatus, CMD_FLAG_REQ_ONE, 4096, 1 << 20);
        assert_eq!(validate_negotiated(&bs, &l, &STRUCTURED), Err(Errno::Inval));
        assert_eq!(
            validate_negotiated(&bs, &l, &WITH_CONTEXT),
            Err(Errno::Inval),
            "ends beyond the export"
        );
        let bs = req(Command::BlockStatus, CMD_FLAG_REQ_ONE, 0, 1 << 20);
        assert_eq!(
            validate_negotiated(&bs, &l, &WITH_CONTEXT),
            Ok(Op::BlockStatus {
                offset: 0,
                len: 1 << 20,
                req_one: true
            })
        );
        let bs = req(Command::BlockStatus, CMD_FLAG_DF, 0, 512);
        assert_eq!(
            validate_negotiated(&bs, &l, &WITH_CONTEXT),
            Err(Errno::Inval)
        );
        let bs = req(Command::BlockStatus, 0, 0, 0);
        assert_eq!(
            validate_negotiated(&bs, &l, &WITH_CONTEXT),
            Err(Errno::Inval)
        );
        // Block status is allowed on a read-only export.
        let ro = ExportLimits::new(&GEO, true);
        let bs = req(Command::BlockStatus, 0, 0, 512);
        assert!(validate_negotiated(&bs, &ro, &WITH_CONTEXT).is_ok());
        assert!(validate_negotiated(&req(Command::Cache, 0, 0, 512), &ro, &WITH_CONTEXT).is_ok());
        assert_eq!(
            validate_negotiated(
                &req(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, 0, 512),
                &ro,
                &WITH_CONTEXT
            ),
            Err(Errno::Perm)
        );
    }

    #[test]
    fn meta_context_requests() {
        let q = |queries: &[&[u8]]| MetaContextRequest::encode(b"r0", queries);
        let sel = |data: &[u8], listing| {
            MetaContextRequest::parse(data)
                .expect("valid")
                .selects_base_allocation(listing)
        };
        // Listing: everything with no query, the base: wildcard, the name.
        assert_eq!(sel(&q(&[]), true), Ok(true));
        assert_eq!(sel(&q(&[b"base:"]), true), Ok(true));
        assert_eq!(sel(&q(&[b"base:allocation"]), true), Ok(true));
        // Selecting: nothing with no query; base: is ignored.
        assert_eq!(sel(&q(&[]), false), Ok(false));
        assert_eq!(sel(&q(&[b"base:"]), false), Ok(false));
        assert_eq!(sel(&q(&[b"base:allocation"]), false), Ok(true));
        // Unknown namespaces and leaf names are ignored, not errors.
        let mixed = q(&[b"qemu:dirty-bitmap:x", b"base:other", b"base:allocation"]);
        assert_eq!(sel(&mixed, false), Ok(true));
        assert_eq!(sel(&q(&[b"qemu:allocation-depth"]), false), Ok(false));
        assert_eq!(sel(&q(&[b"x-foo:bar"]), true), Ok(false));
        // A query without a namespace is invalid.
        assert!(sel(&q(&[b"allocation"]), false).is_err());
        let r = MetaContextRequest::parse(&mixed).expect("valid");
        assert_eq!(r.name, b"r0");
        assert_eq!(r.queries().count(), 3);
        // Malformed: counts and lengths must add up exactly.
        let good = q(&[b"base:allocation"]);
        assert!(MetaContextRequest::parse(&good[..good.len() - 1]).is_err());
        let mut extra = good.clone();
        extra.push(0);
        assert!(MetaContextRequest::parse(&extra).is_err());
        let mut count = good.clone();
        count[9] = 2; // query count 2, one present
        assert!(MetaContextRequest::parse(&count).is_err());
        assert!(MetaContextRequest::parse(&[0, 0, 0]).is_err());
        assert!(MetaContextRequest::parse(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]).is_err());
        let long = vec![b'a'; MAX_STRING_LEN + 1];
        assert!(MetaContextRequest::parse(&MetaContextRequest::encode(b"", &[&long])).is_err());
        let data = meta_context_data(7, BASE_ALLOCATION);
        assert_eq!(&data[..4], &7u32.to_be_bytes());
        assert_eq!(&data[4..], b"base:allocation");
    }

    #[test]
    fn structured_chunk_layouts() {
        let h = offset_data_header(0x1122, 0x3344, 4096);
        let r = StructuredReply::parse(&h).expect("magic");
        assert_eq!(&h[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(
            r,
            StructuredReply {
                flags: REPLY_FLAG_DONE,
                reply_type: REPLY_TYPE_OFFSET_DATA,
                handle: 0x1122,
                length: 4096 + 8
            }
        );
        assert_eq!(&h[20..28], &0x3344u64.to_be_bytes());

        let mut out = Vec::new();
        encode_error_chunk(&mut out, 9, Errno::NotSup);
        let r = StructuredReply::parse(&out).expect("magic");
        assert_eq!(
            (r.flags, r.reply_type, r.handle),
            (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 9)
        );
        assert_eq!(r.length as usize, out.len() - STRUCTURED_REPLY_HEADER_LEN);
        assert_eq!(&out[20..24], &95u32.to_be_bytes());
        let msg_len = u16::from_be_bytes([out[24], out[25]]) as usize;
        assert_eq!(msg_len, out.len() - 26);
        assert_eq!(&out[26..], Errno::NotSup.message().as_bytes());

        let mut out = Vec::new();
        let d = [
            StatusDescriptor {
                length: 4096,
                flags: 0,
            },
            StatusDescriptor {
                length: 512,
                flags: STATE_HOLE | STATE_ZERO,
            },
        ];
        encode_block_status_chunk(&mut out, 5, BASE_ALLOCATION_ID, &d);
        let r = StructuredReply::parse(&out).expect("magic");
        assert_eq!((r.reply_type, r.length), (REPLY_TYPE_BLOCK_STATUS, 4 + 16));
        assert_eq!(out.len(), 20 + 4 + 16);
        assert_eq!(&out[20..24], &BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(&out[24..32], &[0, 0, 0x10, 0, 0, 0, 0, 0]);
        assert_eq!(&out[32..40], &[0, 0, 2, 0, 0, 0, 0, 3]);
        assert!(StructuredReply::parse(&out[..19]).is_none());
        assert!(StructuredReply::parse(&SimpleReplyHeader::new(1, None).to_bytes()).is_none());
    }

    fn seg(offset: u64, len: u64, hole: bool) -> Segment {
        let allocation = if hole {
            Allocation::Hole
        } else {
            Allocation::Data
        };
        Segment {
            offset,
            len,
            allocation,
        }
    }

    fn desc(length: u32, hole: bool) -> StatusDescriptor {
        StatusDescriptor {
            length,
            flags: if hole { STATE_HOLE | STATE_ZERO } else { 0 },
        }
    }

    #[test]
    fn descriptors_from_segments() {
        let segs = [
            seg(0, 4096, false),
            seg(4096, 8192, true),
            seg(12288, 4096, false),
        ];
        assert_eq!(
            status_descriptors(0, 16384, &segs, 100),
            vec![desc(4096, false), desc(8192, true), desc(4096, false)]
        );
        // Clipped to the request, REQ_ONE.
        assert_eq!(
            status_descriptors(1000, 5000, &segs, 100),
            vec![desc(3096, false), desc(1904, true)]
        );
        assert_eq!(
            status_descriptors(5000, 100_000, &segs, 1),
            vec![desc(7288, true)]
        );
        // Same state merged; bounded.
        let same = [
            seg(0, 512, true),
            seg(512, 512, true),
            seg(1024, 512, false),
        ];
        assert_eq!(
            status_descriptors(0, 1536, &same, 1),
            vec![desc(1024, true)]
        );
        // A gap ends the map; nothing usable: one data descriptor.
        let gap = [seg(0, 512, true), seg(1024, 512, true)];
        assert_eq!(status_descriptors(0, 4096, &gap, 10), vec![desc(512, true)]);
        assert_eq!(
            status_descriptors(0, 4096, &[], 10),
            vec![desc(4096, false)]
        );
        assert_eq!(
            status_descriptors(8192, 4096, &[seg(9000, 10, true)], 10),
            vec![desc(4096, false)]
        );
    }

    fn any_command() -> impl Strategy<Value = Command> {
        any::<u16>().prop_map(|v| Command::from_wire(v % 12))
    }

    proptest! {
        #[test]
        fn request_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Request::parse(&bytes);
        }

        #[test]
        fn option_parsers_never_panic(
            option in 0u32..16,
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let _ = OptionRequest::parse(&bytes);
            let _ = ClientOption::parse(option, &bytes);
            let _ = InfoRequest::parse(&bytes);
            let _ = OptionReply::parse(&bytes);
            let _ = SimpleReply::parse(&bytes);
        }

        #[test]
        fn meta_context_request_roundtrip(
            name in proptest::collection::vec(any::<u8>(), 0..64),
            queries in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8),
        ) {
            let refs: Vec<&[u8]> = queries.iter().map(Vec::as_slice).collect();
            let data = MetaContextRequest::encode(&name, &refs);
            let r = MetaContextRequest::parse(&data).expect("encoded request parses");
            prop_assert_eq!(r.name, &name[..]);
            prop_assert_eq!(r.queries().collect::<Vec<_>>(), refs.clone());
            let _ = r.selects_base_allocation(true);
            let _ = r.selects_base_allocation(false);
            // Any truncation is refused, never a panic.
            for cut in 0..data.len() {
                prop_assert!(MetaContextRequest::parse(&data[..cut]).is_err());
            }
        }

        #[test]
        fn descriptors_follow_the_rules(
            raw in proptest::collection::vec((1u64..10_000, any::<bool>()), 0..20),
            start in 0u64..5000,
            len in 1u32..100_000,
            max in 1usize..10,
        ) {
            let mut segs = Vec::new();
            let mut pos = 0;
            for (l, hole) in raw {
                segs.push(seg(pos, l, hole));
                pos += l;
            }
            let d = status_descriptors(start, len, &segs, max);
            prop_assert!(!d.is_empty() && d.len() <= max);
            let sum: u64 = d.iter().map(|x| u64::from(x.length)).sum();
            prop_assert!(sum <= u64::from(len));
            prop_assert!(d.iter().all(|x| x.length > 0));
            // Every hole reported is a hole in the backend's map.
            let mut at = start;
            for x in &d {
                if x.flags != 0 {
                    let end = at + u64::from(x.length);
                    let inside = end <= pos && segs.iter()
                        .filter(|s| s.offset < end && at < s.end())
                        .all(|s| s.allocation == Allocation::Hole);
                    prop_assert!(inside, "hole at {} not in {:?}", at, segs);
                }
                at += u64::from(x.length);
            }
            // Complete when the map covers the request and the bound allows.
            let covered = pos >= start + u64::from(len);
            if covered && max >= segs.len() {
                prop_assert_eq!(sum, u64::from(len));
            }
        }

        #[test]
        fn structured_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = StructuredReply::parse(&bytes);
            let _ = MetaContextRequest::parse(&bytes);
        }

        #[test]
        fn info_request_roundtrip(
            name in proptest::collection::vec(any::<u8>(), 0..300),
            types in proptest::collection::vec(any::<u16>(), 0..40),
        ) {
            let data = InfoRequest::encode(&name, &types);
            let info = InfoRequest::parse(&data).expect("encoded request parses");
            prop_assert_eq!(info.name, &name[..]);
            prop_assert_eq!(info.info_types().collect::<Vec<_>>(), types);
        }

        #[test]
        fn request_roundtrip(
            command in any_command(),
            flags in any::<u16>(),
            handle in any::<u64>(),
            offset in any::<u64>(),
            length in any::<u32>(),
        ) {
            let r = Request { command, flags, handle, offset, length };
            prop_assert_eq!(Request::parse(&r.to_bytes()), Ok(r));
        }

        #[test]
        fn simple_reply_roundtrip(handle in any::<u64>(), err in proptest::option::of(0usize..8)) {
            let error = err.map(|i| Errno::ALL[i]);
            let h = SimpleReplyHeader::new(handle, error).to_bytes();
            let r = SimpleReply::parse(&h).expect("valid header");
            prop_assert_eq!(r.handle, handle);
            prop_assert_eq!(Errno::from_code(r.error), error);
        }

        #[test]
        fn option_header_roundtrip(option in any::<u32>(), length in any::<u32>()) {
            let h = OptionRequest { option, length };
            prop_assert_eq!(OptionRequest::parse(&h.to_bytes()), Ok(h));
        }

        #[test]
        fn validate_never_accepts_out_of_range(
            command in any_command(),
            flags in any::<u16>(),
            offset in any::<u64>(),
            length in any::<u32>(),
            size in any::<u64>(),
            max_payload in 1u32..(1 << 26),
            read_only in any::<bool>(),
        ) {
            let l = ExportLimits { size, max_payload, read_only };
            let r = Request { command, flags, handle: 0, offset, length };
            match validate(&r, &l) {
                Ok(Op::Read { offset: o, len }) => {
                    prop_assert!(len > 0 && len <= max_payload);
                    prop_assert!(o.checked_add(u64::from(len)).is_some_and(|e| e <= size));
                }
                Ok(Op::Write { offset: o, len, .. }) => {
                    prop_assert!(!read_only);
                    prop_assert!(len > 0 && len <= max_payload);
                    prop_assert!(o.checked_add(u64::from(len)).is_some_and(|e| e <= size));
                }
                Ok(Op::Trim { offset: o, len, .. }) | Ok(Op::WriteZeroes { offset: o, len, .. }) => {
                    prop_assert!(!read_only);
                    prop_assert!(len > 0);
                    prop_assert!(o.checked_add(u64::from(len)).is_some_and(|e| e <= size));
                }
                Ok(Op::Cache { offset: o, len }) => {
                    prop_assert!(len > 0);
                    prop_assert!(o.checked_add(u64::from(len)).is_some_and(|e| e <= size));
                }
                Ok(Op::BlockStatus { .. }) => prop_assert!(false, "no context negotiated"),
                Ok(Op::Flush) => prop_assert!(offset == 0 && length == 0),
                Ok(Op::Disconnect) => prop_assert_eq!(command, Command::Disc),
                Err(_) => {}
            }
            if let Ok(op) = validate(&r, &l) {
                // Only documented flags pass.
                if op != Op::Disconnect {
                    prop_assert_eq!(flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO), 0);
                }
            }
        }

        #[test]
        fn validate_accepts_in_range(
            offset in 0u64..(1 << 20),
            length in 1u32..=(64 * 1024),
            fua in any::<bool>(),
        ) {
            let l = limits();
            let flags = if fua { CMD_FLAG_FUA } else { 0 };
            let r = req(Command::Write, flags, offset, length);
            let ok = offset + u64::from(length) <= 1 << 20;
            prop_assert_eq!(validate(&r, &l).is_ok(), ok);
        }
    }
}
