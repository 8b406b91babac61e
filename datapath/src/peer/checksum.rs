//! Digests of a range of the local data area, for `Checksums` requests
//! (the secondary's side) and for the primary's own side of a verify or
//! a checksum-based synchronisation. Holes (`SEEK_HOLE` on file-backed
//! providers) are digested as zeros without being read.

use std::io;

use crate::digest::BlockDigester;
use crate::local::LocalDisk;
use crate::provider::Allocation;

use super::proto::ChecksumsRequest;

/// Segments asked of the allocation map at once.
const SEGMENTS: usize = 64;

/// The digests of the blocks of `[offset, offset + len)` (blocks of
/// `req.block` bytes from `offset`, the last one possibly short). The
/// caller holds the range lock.
pub async fn digest_range(
    disk: &LocalDisk,
    offset: u64,
    len: u64,
    req: ChecksumsRequest,
) -> io::Result<Vec<u8>> {
    let mut d = BlockDigester::new(req.algo, req.block);
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let map = disk.allocation(pos, end - pos, SEGMENTS);
        if map.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range beyond the data area",
            ));
        }
        for seg in map {
            match seg.allocation {
                Allocation::Hole => d.zeros(seg.len),
                Allocation::Data => {
                    let data = disk.read(seg.offset, seg.len as usize).await?;
                    d.data(&data);
                }
            }
            pos = seg.end();
        }
    }
    Ok(d.finish())
}
