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
//! NetworkBlockDevice/nbd), fixed newstyle negotiation, simple replies only.

use std::fmt;

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::export::{BackendError, BackendGeometry, WriteFlags};

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

/// Option reply: option accepted / end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of an `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of export information (`NBD_OPT_INFO`/`GO`).
pub const REP_INFO: u32 = 3;

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

const _: () = assert!(size_of::<Greeting>() == GREETING_LEN);
const _: () = assert!(size_of::<OptionHeader>() == OPTION_HEADER_LEN);
const _: () = assert!(size_of::<OptionReplyHeader>() == OPTION_REPLY_HEADER_LEN);
const _: () = assert!(size_of::<RequestHeader>() == REQUEST_HEADER_LEN);
const _: () = assert!(size_of::<SimpleReplyHeader>() == SIMPLE_REPLY_HEADER_LEN);

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
            OPT_STRUCTURED_REPLY => Ok(Self::StructuredReply),
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

/// Transmission flags advertised for an export.
pub fn transmission_flags(read_only: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;
    if read_only {
        flags |= FLAG_READ_ONLY;
    }
    flags
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
    /// advertises (FUA is valid everywhere once negotiated).
    fn allowed_flags(self) -> u16 {
        match self {
            Self::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
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
    },
    /// Disconnect: finish in-flight requests and close (no reply).
    Disconnect,
}

/// Decide whether `req` may be executed, and if not which error to reply.
///
/// The rules, in order:
/// - `DISC` is always accepted (it has no reply).
/// - unknown commands, and `BLOCK_STATUS` (no metadata context can be
///   negotiated without structured replies): `EINVAL`;
/// - `CACHE` (not advertised): `ENOTSUP`;
/// - a flag not valid for the command (anything but FUA, plus NO_HOLE on
///   WRITE_ZEROES): `EINVAL`;
/// - WRITE, TRIM, WRITE_ZEROES on a read-only export: `EPERM`;
/// - FLUSH with a non-zero offset or length: `EINVAL`;
/// - zero length: `EINVAL`;
/// - READ or WRITE longer than the maximum payload: `EOVERFLOW`;
/// - a range that overflows or ends beyond the export: `ENOSPC` for WRITE
///   and WRITE_ZEROES, `EINVAL` for READ and TRIM (as the spec recommends).
pub fn validate(req: &Request, limits: &ExportLimits) -> Result<Op, Errno> {
    let (offset, len) = (req.offset, req.length);
    let flags = WriteFlags {
        fua: req.flags & CMD_FLAG_FUA != 0,
    };
    match req.command {
        Command::Disc => Ok(Op::Disconnect),
        Command::Unknown(_) | Command::BlockStatus => Err(Errno::Inval),
        Command::Cache => Err(Errno::NotSup),
        Command::Flush => {
            check_flags(req)?;
            if offset != 0 || len != 0 {
                return Err(Errno::Inval);
            }
            Ok(Op::Flush)
        }
        Command::Read => {
            check_flags(req)?;
            check_range(req, limits)?;
            Ok(Op::Read { offset, len })
        }
        Command::Write => {
            check_flags(req)?;
            check_writable(limits)?;
            check_range(req, limits)?;
            Ok(Op::Write { offset, len, flags })
        }
        Command::Trim => {
            check_flags(req)?;
            check_writable(limits)?;
            check_range(req, limits)?;
            Ok(Op::Trim { offset, len, flags })
        }
        Command::WriteZeroes => {
            check_flags(req)?;
            check_writable(limits)?;
            check_range(req, limits)?;
            Ok(Op::WriteZeroes { offset, len, flags })
        }
    }
}

/// Only the flags documented for the command may be set.
fn check_flags(req: &Request) -> Result<(), Errno> {
    if req.flags & !req.command.allowed_flags() != 0 {
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

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn split_u32(data: &[u8]) -> Option<(u32, &[u8])> {
    let (head, rest) = data.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*head), rest))
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
        assert_eq!(
            transmission_flags(false),
            FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
                | FLAG_CAN_MULTI_CONN
        );
        assert_ne!(transmission_flags(true) & FLAG_READ_ONLY, 0);
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
        assert_eq!(
            validate(&req(Command::Cache, 0, 0, 1), &l),
            Err(Errno::NotSup)
        );
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
                Ok(Op::Flush) => prop_assert!(offset == 0 && length == 0),
                Ok(Op::Disconnect) => prop_assert_eq!(command, Command::Disc),
                Err(_) => {}
            }
            if let Ok(op) = validate(&r, &l) {
                // Only documented flags pass.
                if op != Op::Disconnect {
                    prop_assert_eq!(flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE), 0);
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
