//! The transmission phase of one connection.
//!
//! Structure (all tasks on the export's executor):
//!
//! - the **reader** (the connection task itself) reads one request at a
//!   time: header, validation, then a write's payload straight into a
//!   backend buffer; it spawns one **request task** per valid request and
//!   queues an error reply for an invalid one;
//! - **request tasks** call the backend and queue their reply; they run
//!   concurrently, so replies leave in completion order, not request order;
//! - the **writer** task is the only one that writes to the socket: it takes
//!   replies from a bounded channel and sends header (+ read data).
//!
//! Replies: without structured replies, every reply is a simple reply (a
//! read's data follows its header). With them, a read's data goes in one
//! final `OFFSET_DATA` chunk, a block status in one final `BLOCK_STATUS`
//! chunk, an error in one final `ERROR` chunk; other successful requests
//! still get a simple reply (the spec allows it for replies without
//! payload). Either way read data is written straight from the backend's
//! buffer when it is large, and small replies are batched.
//!
//! glommio streams cannot be split, so the stream is split with
//! [`futures_lite::io::split`]: both halves share the stream behind a mutex
//! that is only held inside a single `poll_read`/`poll_write` call (never
//! across an await), and glommio keeps separate read and write wakers, so
//! the reader and the writer never block each other. (Duplicating the file
//! descriptor would need the raw fd, which glommio's `UnixStream` does not
//! expose.)
//!
//! Bounds:
//! - in-flight requests: a semaphore of `max_inflight` permits, taken before
//!   a request header is read and released only when its reply has been
//!   written (or dropped), so at most `max_inflight` requests are executing
//!   or queued for the writer; the reply channel has that capacity and never
//!   fills;
//! - payload bytes: the export-wide budget semaphore; a read or write takes
//!   `len` units before its buffer exists and gives them back when the reply
//!   has been written;
//! - block status: at most [`proto::MAX_STATUS_DESCRIPTORS`] descriptors
//!   (8 bytes each) per reply, so at most `max_inflight` such small replies
//!   per connection;
//! - a rejected write's payload is discarded in chunks of at most
//!   [`DISCARD_CHUNK`] bytes.
//!
//! Ending: on `NBD_CMD_DISC`, end of stream, a framing error, a writer
//! failure or the export's stop signal the reader stops reading; every
//! request task is then awaited (backend operations are never cancelled),
//! the writer drains the queued replies (for at most [`DRAIN_TIMEOUT`]) and
//! shuts the socket down.

use std::io;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::io::DmaBuffer;
use glommio::net::UnixStream;
use glommio::sync::Gate;

use crate::semaphore::{Semaphore, StaticPermit};
use tracing::Instrument;

use super::proto::{
    self, Errno, ExportLimits, Negotiated, Op, Request, RequestError, SimpleReplyHeader,
    StatusDescriptor,
};
use crate::batch::{self, SendEnd};
use crate::export::{BlockBackend, WriteFlags};
use crate::signal::Signal;

/// How long the writer may take to send the replies still queued once the
/// connection is ending (the client may have stopped reading).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest chunk read at once when discarding a rejected write's payload.
pub(crate) const DISCARD_CHUNK: usize = 64 * 1024;

/// What a connection needs from its export.
pub(crate) struct ConnParams<B: BlockBackend> {
    /// The backend.
    pub backend: Rc<B>,
    /// Size, payload limit, read-only.
    pub limits: ExportLimits,
    /// What the client negotiated.
    pub negotiated: Negotiated,
    /// In-flight requests on this connection.
    pub max_inflight: usize,
    /// Export-wide payload byte budget.
    pub budget: Rc<Semaphore>,
    /// Fired when the export shuts down.
    pub stop: Signal,
}

/// Why the transmission phase ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnEnd {
    /// `NBD_CMD_DISC`.
    #[error("client disconnected")]
    Disconnect,
    /// End of stream between requests.
    #[error("client closed the connection without NBD_CMD_DISC")]
    ClientClosed,
    /// The export is shutting down.
    #[error("export shutting down")]
    Stopped,
    /// A reply could not be written.
    #[error("writing a reply failed")]
    WriterFailed,
    /// Bad request magic: framing is lost.
    #[error("protocol error: {0}")]
    Framing(RequestError),
    /// Socket error (including end of stream inside a request).
    #[error("I/O error: {0}")]
    Io(io::Error),
}

impl ConnEnd {
    /// Whether this is an ordinary end (info) rather than a failure (warn).
    pub(crate) fn is_ordinary(&self) -> bool {
        matches!(self, Self::Disconnect | Self::ClientClosed | Self::Stopped)
    }
}

/// Permits held by a request until its reply has been written.
struct Permits {
    _inflight: StaticPermit,
    _budget: Option<StaticPermit>,
}

/// A reply waiting for the writer.
struct Reply<R> {
    handle: u64,
    body: Body<R>,
    /// The connection negotiated structured replies.
    structured: bool,
    _permits: Permits,
}

impl<R: std::ops::Deref<Target = [u8]>> batch::Frame for Reply<R> {
    fn encode_head(&self, out: &mut Vec<u8>) {
        let (handle, structured) = (self.handle, self.structured);
        match &self.body {
            Body::Data { offset, data } if structured => {
                out.extend_from_slice(&proto::offset_data_header(handle, *offset, data.len()))
            }
            Body::Data { .. } | Body::Done => {
                out.extend_from_slice(&SimpleReplyHeader::new(handle, None).to_bytes())
            }
            Body::Error(errno) if structured => proto::encode_error_chunk(out, handle, *errno),
            Body::Error(errno) => {
                out.extend_from_slice(&SimpleReplyHeader::new(handle, Some(*errno)).to_bytes())
            }
            Body::Status {
                context,
                descriptors,
            } => proto::encode_block_status_chunk(out, handle, *context, descriptors),
        }
    }

    fn payload(&self) -> &[u8] {
        match &self.body {
            Body::Data { data, .. } => data,
            _ => &[],
        }
    }
}

/// What a reply carries.
enum Body<R> {
    /// Success, no payload.
    Done,
    /// A read's data, read at `offset`.
    Data { offset: u64, data: R },
    /// Block status of the metadata context `context`.
    Status {
        context: u32,
        descriptors: Vec<StatusDescriptor>,
    },
    /// Failure.
    Error(Errno),
}

/// Work for the backend.
enum Job {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        buf: DmaBuffer,
        flags: WriteFlags,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        flags: WriteFlags,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        flags: WriteFlags,
        fast: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
        context: u32,
    },
}

/// One request taken off the socket.
enum Incoming {
    /// A valid request for the backend.
    Job {
        req: Request,
        job: Job,
        permits: Permits,
    },
    /// An invalid request (payload already discarded): reply `errno`.
    Reject {
        req: Request,
        errno: Errno,
        permits: Permits,
    },
    /// `NBD_CMD_DISC`.
    Disconnect,
}

impl Incoming {
    /// A rejection holding only the in-flight permit.
    fn reject(req: Request, errno: Errno, inflight: StaticPermit) -> Self {
        let permits = Permits {
            _inflight: inflight,
            _budget: None,
        };
        Self::Reject {
            req,
            errno,
            permits,
        }
    }
}

/// Serve requests on `stream` (after a successful handshake) until the
/// connection ends; returns why, and how many requests were answered or
/// rejected.
pub(crate) async fn serve<B: BlockBackend>(
    stream: UnixStream,
    params: ConnParams<B>,
) -> (ConnEnd, u64)
where
    B::ReadBuf: 'static,
{
    let (reader, writer) = futures_lite::io::split(stream);
    // Requests sent together arrive in one read; a payload larger than
    // the buffer is read straight into its aligned buffer.
    let mut reader = futures_lite::io::BufReader::with_capacity(RECV_BUFFER, reader);
    let (tx, rx) = local_channel::new_bounded(params.max_inflight);
    let abort = Signal::new();
    let writer_task = glommio::spawn_local(
        write_replies(writer, rx, abort.clone()).instrument(tracing::Span::current()),
    );
    let mut conn = Conn {
        inflight: Rc::new(Semaphore::new(params.max_inflight as u64)),
        params,
        requests: Gate::new(),
        tx: Rc::new(tx),
        abort,
        count: 0,
    };
    let end = conn.read_loop(&mut reader).await;
    let Conn {
        requests,
        tx,
        count,
        ..
    } = conn;

    // Backend operations already started always run to completion.
    let _ = requests.close().await;
    drop(tx);
    let drained = future::or(
        async {
            writer_task.await;
            true
        },
        async {
            glommio::timer::sleep(DRAIN_TIMEOUT).await;
            false
        },
    )
    .await;
    if !drained {
        tracing::warn!("client did not read its replies within {DRAIN_TIMEOUT:?}; closing");
    }
    (end, count)
}

/// The reading side of a connection.
struct Conn<B: BlockBackend> {
    params: ConnParams<B>,
    /// `max_inflight` permits.
    inflight: Rc<Semaphore>,
    /// Every request task, so that the end of the connection can wait for
    /// them.
    requests: Gate,
    /// Replies to the writer (shared with the request tasks).
    tx: Rc<LocalSender<Reply<B::ReadBuf>>>,
    /// Fired by the writer when it cannot write.
    abort: Signal,
    /// Requests taken off the socket.
    count: u64,
}

impl<B: BlockBackend> Conn<B>
where
    B::ReadBuf: 'static,
{
    /// Read and dispatch requests until the connection must end.
    async fn read_loop<R: AsyncRead + Unpin>(&mut self, reader: &mut R) -> ConnEnd {
        loop {
            if self.abort.is_fired() {
                return ConnEnd::WriterFailed;
            }
            if self.params.stop.is_fired() {
                return ConnEnd::Stopped;
            }
            let next = future::or(async { Some(self.next_request(reader).await) }, async {
                future::or(self.params.stop.wait(), self.abort.wait()).await;
                None
            })
            .await;
            let incoming = match next {
                None => continue, // the checks at the top say why
                Some(Ok(incoming)) => incoming,
                Some(Err(end)) => return end,
            };
            self.count += 1;
            match incoming {
                Incoming::Disconnect => return ConnEnd::Disconnect,
                Incoming::Reject {
                    req,
                    errno,
                    permits,
                } => {
                    tracing::warn!(?req, error = %errno, "rejected request");
                    let reply = Reply {
                        handle: req.handle,
                        body: Body::Error(errno),
                        structured: self.params.negotiated.structured_replies,
                        _permits: permits,
                    };
                    // Never waits: the channel has room for every permit.
                    let _ = self.tx.send(reply).await;
                }
                Incoming::Job { req, job, permits } => self.spawn_request(req, job, permits),
            }
        }
    }

    /// Take the next request off the socket: in-flight permit, header,
    /// validation, then budget and payload.
    async fn next_request<R: AsyncRead + Unpin>(
        &self,
        reader: &mut R,
    ) -> Result<Incoming, ConnEnd> {
        let inflight = self
            .inflight
            .acquire_static_permit(1)
            .await
            .map_err(|_| ConnEnd::Stopped)?;
        let mut hdr = [0u8; proto::REQUEST_HEADER_LEN];
        if !read_header(reader, &mut hdr).await.map_err(ConnEnd::Io)? {
            return Err(ConnEnd::ClientClosed);
        }
        let req = Request::parse(&hdr).map_err(ConnEnd::Framing)?;
        let op =
            match proto::validate_negotiated(&req, &self.params.limits, &self.params.negotiated) {
                Ok(op) => op,
                Err(errno) => {
                    discard(reader, req.payload_len())
                        .await
                        .map_err(ConnEnd::Io)?;
                    return Ok(Incoming::reject(req, errno, inflight));
                }
            };
        let (job, budget) = match op {
            Op::Disconnect => return Ok(Incoming::Disconnect),
            Op::Flush => (Job::Flush, None),
            Op::Trim { offset, len, flags } => (Job::Trim { offset, len, flags }, None),
            Op::WriteZeroes {
                offset,
                len,
                flags,
                fast,
            } => (
                Job::WriteZeroes {
                    offset,
                    len,
                    flags,
                    fast,
                },
                None,
            ),
            Op::Cache { offset, len } => (Job::Cache { offset, len }, None),
            Op::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                // Validation allows BLOCK_STATUS only with a context.
                let context = self.params.negotiated.base_allocation.unwrap_or_default();
                let job = Job::BlockStatus {
                    offset,
                    len,
                    req_one,
                    context,
                };
                (job, None)
            }
            Op::Read { offset, len } => (Job::Read { offset, len }, Some(self.budget(len).await?)),
            Op::Write { offset, len, flags } => {
                let permit = self.budget(len).await?;
                match self
                    .receive_payload(reader, len)
                    .await
                    .map_err(ConnEnd::Io)?
                {
                    Some(buf) => (Job::Write { offset, buf, flags }, Some(permit)),
                    None => return Ok(Incoming::reject(req, Errno::Io, inflight)),
                }
            }
        };
        let permits = Permits {
            _inflight: inflight,
            _budget: budget,
        };
        Ok(Incoming::Job { req, job, permits })
    }

    /// Take `len` bytes of the export's payload budget.
    async fn budget(&self, len: u32) -> Result<StaticPermit, ConnEnd> {
        self.params
            .budget
            .acquire_static_permit(u64::from(len))
            .await
            .map_err(|_| ConnEnd::Stopped)
    }

    /// Read a write's payload straight into a backend buffer. `None`
    /// (payload discarded) if the backend handed out a buffer shorter than
    /// asked for.
    async fn receive_payload<R: AsyncRead + Unpin>(
        &self,
        reader: &mut R,
        len: u32,
    ) -> io::Result<Option<DmaBuffer>> {
        let want = len as usize;
        let mut buf = self.params.backend.alloc_buffer(want);
        if buf.len() < want {
            tracing::warn!(
                asked = want,
                got = buf.len(),
                "backend returned a short buffer"
            );
            discard(reader, len).await?;
            return Ok(None);
        }
        if buf.len() > want {
            buf.trim_to_size(want);
        }
        reader.read_exact(buf.as_bytes_mut()).await?;
        Ok(Some(buf))
    }

    /// Spawn the task that runs `job` and queues its reply.
    fn spawn_request(&self, req: Request, job: Job, permits: Permits) {
        let backend = self.params.backend.clone();
        let tx = self.tx.clone();
        let structured = self.params.negotiated.structured_replies;
        let task = async move {
            let body = match run_job(&*backend, job).await {
                Ok(body) => body,
                Err(errno) => {
                    tracing::warn!(?req, error = %errno, "request failed");
                    Body::Error(errno)
                }
            };
            let reply = Reply {
                handle: req.handle,
                body,
                structured,
                _permits: permits,
            };
            // Fails only if the writer is gone; the connection is ending.
            let _ = tx.send(reply).await;
        };
        match self
            .requests
            .spawn(task.instrument(tracing::Span::current()))
        {
            Ok(task) => {
                task.detach();
            }
            Err(_) => {
                // The gate closes only after the read loop, so this is not
                // expected; the future (and its permits) has been dropped.
                tracing::warn!(?req, "could not start request");
            }
        }
    }
}

/// Run one job on the backend.
async fn run_job<B: BlockBackend>(backend: &B, job: Job) -> Result<Body<B::ReadBuf>, Errno> {
    match job {
        Job::Read { offset, len } => {
            let data = backend.read(offset, len).await?;
            if data.len() != len as usize {
                tracing::warn!(
                    offset,
                    len,
                    got = data.len(),
                    "backend read returned a wrong length"
                );
                return Err(Errno::Io);
            }
            Ok(Body::Data { offset, data })
        }
        Job::Write { offset, buf, flags } => {
            backend.write(offset, buf, flags).await?;
            Ok(Body::Done)
        }
        Job::Flush => {
            backend.flush().await?;
            Ok(Body::Done)
        }
        Job::Trim { offset, len, flags } => {
            backend.trim(offset, u64::from(len), flags).await?;
            Ok(Body::Done)
        }
        Job::WriteZeroes {
            offset,
            len,
            flags,
            fast,
        } => {
            // FAST_ZERO: fail at once, before touching anything, unless
            // the backend says zeroing this range is fast.
            if fast && !backend.zeroes_are_fast(offset, u64::from(len)) {
                return Err(Errno::NotSup);
            }
            backend.write_zeroes(offset, u64::from(len), flags).await?;
            Ok(Body::Done)
        }
        Job::Cache { offset, len } => {
            backend.cache(offset, u64::from(len)).await?;
            Ok(Body::Done)
        }
        Job::BlockStatus {
            offset,
            len,
            req_one,
            context,
        } => {
            let max = if req_one {
                1
            } else {
                proto::MAX_STATUS_DESCRIPTORS
            };
            let segments = backend.block_status(offset, u64::from(len), max).await?;
            let descriptors = proto::status_descriptors(offset, len, &segments, max);
            Ok(Body::Status {
                context,
                descriptors,
            })
        }
    }
}

/// Bytes read from the socket at once when requests are queued.
const RECV_BUFFER: usize = 64 * 1024;

/// The writer task: sends queued replies until every sender is gone, then
/// shuts the socket down for writing — through the one batching writer
/// ([`crate::batch`]): replies queued together (header-only replies,
/// chunks and small reads) leave in one write; large read data is written
/// straight from its buffer. On a write error, fire `abort` so the reader
/// stops, and drop the queue (which releases its permits).
async fn write_replies<W, D>(mut w: W, rx: LocalReceiver<Reply<D>>, abort: Signal)
where
    W: AsyncWrite + Unpin,
    D: std::ops::Deref<Target = [u8]>,
{
    // Nothing stops the writer but the end of the queue: replies of
    // requests already started are always sent.
    let never = Signal::new();
    match batch::send(&mut w, &rx, &never, |_| {}).await {
        SendEnd::Failed(e) => {
            tracing::info!(error = %e, "cannot send reply; closing connection");
            abort.fire();
        }
        SendEnd::Drained | SendEnd::Stopped => {
            let _ = w.close().await;
        }
    }
}

/// Read a request header. `Ok(false)` on a clean end of stream (nothing
/// read); end of stream inside the header is an error.
async fn read_header<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(true)
}

/// Read and drop `len` bytes, at most [`DISCARD_CHUNK`] at a time.
async fn discard<R: AsyncRead + Unpin>(r: &mut R, len: u32) -> io::Result<()> {
    let mut left = len as usize;
    if left == 0 {
        return Ok(());
    }
    let mut scratch = vec![0u8; left.min(DISCARD_CHUNK)];
    while left > 0 {
        let n = left.min(scratch.len());
        r.read_exact(&mut scratch[..n]).await?;
        left -= n;
    }
    Ok(())
}
