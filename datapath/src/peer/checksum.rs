//! Digests of a range of the local data area, for `Checksums` requests
//! (the secondary's side) and for the primary's own side of a verify or
//! a checksum-based synchronisation. Holes (`SEEK_HOLE` on file-backed
//! providers) are digested as zeros without being read.

use std::io;

use crate::digest::{differing_runs, Algo, BlockDigester, DIGEST_BLOCK};
use crate::local::LocalDisk;
use crate::provider::Allocation;

use super::frame::LinkError;
use super::link::{Payload, PeerLink, Pending};
use super::proto::{ChecksumsRequest, Kind};

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

/// Asks the secondary for the digests of `[off, off + len)` in
/// [`DIGEST_BLOCK`] blocks (`flags`: `SYNC` for a synchronisation, which
/// makes it mark the range); the answer comes with [`differences`].
pub async fn ask(
    link: &PeerLink,
    flags: u8,
    off: u64,
    len: u32,
    algo: Algo,
) -> Result<Pending, LinkError> {
    let req = ChecksumsRequest {
        block: DIGEST_BLOCK,
        algo,
    };
    link.request(
        Kind::Checksums,
        flags,
        off,
        len,
        Payload::Bytes(req.encode().to_vec()),
    )
    .await
}

/// Waits for the secondary's digests and compares them with `ours`:
/// returns the differing ranges of `[off, off + len)`, `(offset,
/// length)` in data-area bytes, merged and in order.
pub async fn differences(
    theirs: Pending,
    ours: &[u8],
    algo: Algo,
    off: u64,
    len: u64,
) -> Result<Vec<(u64, u64)>, LinkError> {
    let theirs = theirs
        .done()
        .await?
        .ok_or_else(|| LinkError::Protocol("ChecksumsReply without digests".into()))?;
    if theirs.len() != ours.len() {
        return Err(LinkError::Protocol(format!(
            "ChecksumsReply with {} bytes of digests, expected {}",
            theirs.len(),
            ours.len()
        )));
    }
    let block = u64::from(DIGEST_BLOCK);
    Ok(differing_runs(ours, theirs.as_bytes(), algo.digest_len())
        .into_iter()
        .map(|r| {
            let from = r.start * block;
            (off + from, (r.end * block).min(len) - from)
        })
        .collect())
}
