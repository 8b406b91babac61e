//! Frame I/O over a peer connection (both sides): reading a header,
//! reading a payload straight into an aligned buffer, writing a single
//! frame (the handshake; the request and reply streams go through
//! [`crate::batch`]), and the connection-level error type.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{flags, FrameError, Header, Hello, Kind, Refusal, HEADER_LEN};

/// Why a peer connection failed or a request on it did not complete.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Socket error (its kind kept).
    #[error("connection error: {0}")]
    Io(Arc<io::Error>),
    /// The peer closed the connection.
    #[error("connection closed by peer")]
    Closed,
    /// A frame failed validation; the connection is closed without
    /// touching the disk.
    #[error("protocol error: {0}")]
    Frame(#[from] FrameError),
    /// The peer did not answer in time.
    #[error("peer silent for {0:?}")]
    Timeout(Duration),
    /// The connection is gone (this request was in flight or queued).
    #[error("not connected")]
    Disconnected,
    /// The peer refused the handshake.
    #[error("peer refused: {reason:?}: {message}")]
    Refused {
        /// Machine-readable reason.
        reason: Refusal,
        /// The peer's explanation.
        message: String,
    },
    /// The peer executed the request and it failed with this errno (of
    /// its disk, mostly).
    #[error("the peer reported {}", errno_text(*.0))]
    Remote(u32),
    /// The peer sent something the protocol does not allow here.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Authentication failed: the peer's proof of the secret, its TLS
    /// certificate, or its security settings (see the message).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// A local disk operation failed.
    #[error("local {op}{} failed: {source}", at.map(|o| format!(" at {o}")).unwrap_or_default())]
    Disk {
        /// What was being done.
        op: &'static str,
        /// Where, in the data area, if one place.
        at: Option<u64>,
        /// The error, its kind kept.
        source: Arc<io::Error>,
    },
    /// This node ended the connection (stop, role change, a newer
    /// connection of the same peer).
    #[error("closed by this node")]
    Stopping,
    /// Extents keep being marked faster than the synchronisation copies
    /// them; the connection is restarted.
    #[error("extents keep being marked dirty; giving up this pass")]
    SyncStalled,
    /// The connection was lost, for this reason.
    #[error("connection lost: {0}")]
    Lost(Box<LinkError>),
}

/// An errno as people read it: `No space left on device (os error 28)`.
pub fn errno_text(errno: u32) -> String {
    match i32::try_from(errno) {
        Ok(n) => io::Error::from_raw_os_error(n).to_string(),
        Err(_) => format!("error {errno}"),
    }
}

impl LinkError {
    /// A failed local disk operation.
    pub fn disk(op: &'static str, at: Option<u64>, e: io::Error) -> LinkError {
        LinkError::Disk {
            op,
            at,
            source: Arc::new(e),
        }
    }
}

impl From<io::Error> for LinkError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            LinkError::Closed
        } else {
            LinkError::Io(Arc::new(e))
        }
    }
}

/// Reads and validates one frame header.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Header, LinkError> {
    let mut buf = [0u8; HEADER_LEN];
    r.read_exact(&mut buf).await?;
    Ok(Header::decode(&buf)?)
}

/// Reads `buf.len()` payload bytes and checks them against the header.
pub async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    hdr: &Header,
    buf: &mut [u8],
) -> Result<(), LinkError> {
    r.read_exact(buf).await?;
    hdr.check_payload(buf)?;
    Ok(())
}

/// Reads a data payload (Write, ReadReply) into `buf`, which must be
/// [`Header::data_len`] bytes: straight into it when the frame is not
/// compressed, else through a buffer of `payload_len` bytes decompressed
/// into it (see [`super::compress`]). The checksum covers the bytes on
/// the wire.
pub async fn read_data_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    hdr: &Header,
    buf: &mut [u8],
) -> Result<(), LinkError> {
    if hdr.flags & flags::COMPRESSED == 0 {
        return read_payload(r, hdr, buf).await;
    }
    let mut wire = vec![0u8; hdr.payload_len as usize];
    read_payload(r, hdr, &mut wire).await?;
    super::compress::decode(hdr.flags, &wire, buf)?;
    Ok(())
}

/// Reads and discards `n` bytes in bounded chunks.
pub async fn discard<R: AsyncRead + Unpin>(r: &mut R, mut n: usize) -> Result<(), LinkError> {
    let mut scratch = [0u8; 4096];
    while n > 0 {
        let k = n.min(scratch.len());
        r.read_exact(&mut scratch[..k]).await?;
        n -= k;
    }
    Ok(())
}

/// Writes a header and its payload.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    hdr: &Header,
    payload: &[u8],
) -> Result<(), LinkError> {
    let head = hdr.encode();
    if !payload.is_empty() && payload.len() <= crate::batch::SMALL_PAYLOAD {
        let mut one = Vec::with_capacity(HEADER_LEN + payload.len());
        one.extend_from_slice(&head);
        one.extend_from_slice(payload);
        w.write_all(&one).await?;
    } else {
        w.write_all(&head).await?;
        if !payload.is_empty() {
            w.write_all(payload).await?;
        }
    }
    // A buffering transport (TLS, the authenticated stream) sends now.
    w.flush().await?;
    Ok(())
}

/// Bytes read from a peer socket at once: frames queued together arrive
/// in one read, while a payload larger than this is read straight into
/// its aligned buffer.
pub const RECV_BUFFER: usize = 64 * 1024;

/// Reads the primary's Hello from a new connection (the listener does
/// the same for TCP, before handing the connection over).
pub async fn read_hello<R: AsyncRead + Unpin>(r: &mut R) -> Result<Hello, LinkError> {
    let hdr = read_header(r).await?;
    if hdr.kind != Kind::Hello {
        return Err(LinkError::Protocol(format!(
            "expected Hello, got {:?}",
            hdr.kind
        )));
    }
    let mut body = vec![0u8; hdr.payload_len as usize];
    read_payload(r, &hdr, &mut body).await?;
    Ok(Hello::decode(&body)?)
}

/// Runs `fut` with a deadline.
pub async fn with_timeout<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, LinkError>>,
) -> Result<T, LinkError> {
    futures_lite::future::or(fut, async {
        glommio::timer::sleep(limit).await;
        Err(LinkError::Timeout(limit))
    })
    .await
}

/// Is every byte zero? (Synchronisation sends such chunks as holes.)
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only
        // reinterprets the aligned middle of the byte slice.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[3] = 9;
        assert!(!is_zero(&v[1..]));
        assert!(is_zero(&[]));
    }
}
