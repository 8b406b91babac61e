//! The boundary between a device export (NBD today; ublk or GEOM Gate
//! later) and the resource that stores the data.
//!
//! An export speaks a client protocol and calls into a [`BlockBackend`].
//! The backend owns everything about durability and replication; the export
//! owns framing, validation and per-connection bounds. Every method runs on
//! the glommio executor that owns the resource, so implementations use
//! `Rc`/`RefCell` and never block.

use std::ops::Deref;

use glommio::io::DmaBuffer;

pub use crate::provider::{Allocation, Segment};

/// Error of a backend operation, reported to the client as an errno-like
/// code (the NBD server maps it onto the NBD error values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The local (and, when replicating, the remote) leg failed.
    #[error("I/O error")]
    Io,
    /// Offset or length outside the device, or not acceptable.
    #[error("invalid argument")]
    Invalid,
    /// No space left on the provider.
    #[error("no space left on device")]
    NoSpace,
    /// The resource is going away (role change, shutdown).
    #[error("resource is shutting down")]
    Shutdown,
    /// The operation is not supported by this backend.
    #[error("operation not supported")]
    NotSupported,
}

/// Flags passed with a write-like request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data must be durable before the reply.
    pub fua: bool,
}

/// Static properties of a backend, read once per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendGeometry {
    /// Exported size in bytes.
    pub size: u64,
    /// Smallest request granularity that avoids read-modify-write
    /// (the provider's logical sector size).
    pub min_block: u32,
    /// Preferred request granularity (the provider's physical block size).
    pub preferred_block: u32,
    /// Largest read or write payload accepted in one request.
    pub max_payload: u32,
}

/// What an export needs from a resource.
///
/// All offsets and lengths are in bytes of the exported device. Requests
/// need not be aligned: the backend handles unaligned ones correctly (at a
/// cost), so a client that ignores the advertised block size still gets the
/// right data.
#[allow(async_fn_in_trait)] // single-threaded executor: futures are never sent
pub trait BlockBackend: 'static {
    /// Buffer returned by a read; it dereferences to exactly `len` bytes.
    type ReadBuf: Deref<Target = [u8]> + 'static;

    /// Geometry of the export.
    fn geometry(&self) -> BackendGeometry;

    /// An aligned buffer of exactly `len` bytes to receive a write payload into, so
    /// that it can be written to the provider (and sent to the peer) without
    /// a copy.
    fn alloc_buffer(&self, len: usize) -> DmaBuffer;

    /// Read `len` bytes at `offset`; the buffer holds exactly `len` bytes.
    async fn read(&self, offset: u64, len: u32) -> Result<Self::ReadBuf, BackendError>;

    /// Write `data` (its whole length) at `offset`.
    async fn write(
        &self,
        offset: u64,
        data: DmaBuffer,
        flags: WriteFlags,
    ) -> Result<(), BackendError>;

    /// Make every write completed before this call durable.
    async fn flush(&self) -> Result<(), BackendError>;

    /// Discard a range. This implementation zeroes it (the range reads back
    /// as zeros), so that both legs of a replicated resource stay identical.
    async fn trim(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<(), BackendError>;

    /// Write zeros over a range.
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> Result<(), BackendError>;

    /// Whether [`BlockBackend::write_zeroes`] of this range would be fast:
    /// clearly quicker than writing the same range of zeros with
    /// [`BlockBackend::write`] (e.g. a hole punch rather than zeros
    /// written). Answered at once, without I/O, before the zeroing is
    /// started (NBD's `FAST_ZERO` fails the request when this is false);
    /// when in doubt, false. The default: false.
    fn zeroes_are_fast(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }

    /// Where the data of `[offset, offset + len)` is: a map of data and
    /// holes (reading as zeros), contiguous from `offset`, at most
    /// `max_segments` segments (at least 1), each within the range. It may
    /// stop short of `offset + len` (the client asks again from there);
    /// empty only for an empty range. Reporting data where there is a hole
    /// is always correct, the reverse never. The default: all data.
    async fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_segments: usize,
    ) -> Result<Vec<Segment>, BackendError> {
        let _ = max_segments;
        Ok(vec![Segment {
            offset,
            len,
            allocation: Allocation::Data,
        }])
    }

    /// A hint that `[offset, offset + len)` will be accessed soon. It
    /// changes nothing a later request sees; a backend may prefetch. The
    /// default does nothing: a provider opened with `O_DIRECT` has no cache
    /// to fill.
    async fn cache(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let _ = (offset, len);
        Ok(())
    }
}
