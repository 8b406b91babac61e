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
//!
//! Each codec has its own file, re-exported here: `header.rs` (the frame
//! header: [`Header`], [`Kind`], [`flags`], [`FrameError`]) and `control.rs`
//! (the control payloads, version negotiation and [`bitmap_len`]).

mod control;
mod header;

pub use control::*;
pub use header::*;
