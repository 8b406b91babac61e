//! Fixed newstyle negotiation (the handshake phase), server side.
//!
//! Sequential request/reply on the unsplit stream: greeting, client flags,
//! then options until the client enters transmission (`NBD_OPT_GO` or
//! `NBD_OPT_EXPORT_NAME`), aborts, or breaks a rule. Every read is bounded:
//! option data above [`proto::MAX_OPTION_LEN`] is refused before it is read,
//! and a session may send at most [`MAX_OPTIONS`] options.
//!
//! What the client negotiates on the way (structured replies, the
//! `base:allocation` metadata context) is returned with the way it entered
//! transmission, as a [`Negotiated`].

use std::io;

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{
    self, ClientFlags, ClientOption, InfoRequest, InvalidOption, MetaContextRequest, Negotiated,
    OptionHeaderError, OptionRequest, UnknownClientFlags,
};

/// Options accepted in one negotiation before the server gives up on the
/// client (a real client needs a handful).
pub(crate) const MAX_OPTIONS: usize = 256;

/// What the handshake advertises about the export.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExportInfo<'a> {
    /// Export name (the only one, also the default export).
    pub name: &'a str,
    /// Size in bytes.
    pub size: u64,
    /// Read-only export.
    pub read_only: bool,
    /// Minimum block size.
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Maximum payload.
    pub max_payload: u32,
}

impl ExportInfo<'_> {
    /// Whether a client asking for `name` gets this export.
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }

    /// Transmission flags for a client that negotiated `negotiated`.
    fn flags(&self, negotiated: &Negotiated) -> u16 {
        proto::transmission_flags(self.read_only, negotiated.structured_replies)
    }
}

/// How the client entered transmission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entered {
    /// Through `NBD_OPT_GO`.
    Go,
    /// Through `NBD_OPT_EXPORT_NAME`.
    ExportName,
}

/// Why negotiation ended without entering transmission.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeEnd {
    /// The client sent `NBD_OPT_ABORT`.
    #[error("client aborted negotiation")]
    Aborted,
    /// The client closed the connection.
    #[error("client closed the connection during negotiation")]
    Eof,
    /// Socket error.
    #[error("I/O error during negotiation: {0}")]
    Io(io::Error),
    /// Unknown client flags: the spec requires dropping the connection.
    #[error(transparent)]
    ClientFlags(#[from] UnknownClientFlags),
    /// Not an option header: the stream is not NBD.
    #[error(transparent)]
    OptionHeader(#[from] OptionHeaderError),
    /// Option data above [`proto::MAX_OPTION_LEN`].
    #[error("option {option} carries {length} bytes of data, more than the limit")]
    TooBig {
        /// Option code.
        option: u32,
        /// Announced length.
        length: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` for an export we do not have (no error reply
    /// is possible for this option).
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    /// A non-fixed-newstyle client sent an option other than
    /// `NBD_OPT_EXPORT_NAME`.
    #[error("option {0} from a client without fixed newstyle")]
    NotFixedNewstyle(u32),
    /// More than [`MAX_OPTIONS`] options.
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
}

impl HandshakeEnd {
    /// Whether this is an ordinary end (logged at debug) rather than a
    /// misbehaving client or a failure (logged at warn).
    pub(crate) fn is_ordinary(&self) -> bool {
        matches!(self, Self::Aborted | Self::Eof)
    }
}

impl From<io::Error> for HandshakeEnd {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Self::Eof
        } else {
            Self::Io(e)
        }
    }
}

/// What to do after one option.
enum Next {
    Continue,
    Transmission(Entered),
}

/// Run the negotiation on `io` for `export`.
pub(crate) async fn negotiate<S>(
    io: &mut S,
    export: &ExportInfo<'_>,
) -> Result<(Entered, Negotiated), HandshakeEnd>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.write_all(&proto::greeting()).await?;
    let mut flags = [0u8; 4];
    io.read_exact(&mut flags).await?;
    let client = proto::parse_client_flags(flags)?;
    let mut session = Negotiated::default();
    for _ in 0..MAX_OPTIONS {
        let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
        io.read_exact(&mut hdr).await?;
        let opt = OptionRequest::parse(&hdr)?;
        if opt.too_big() {
            if client.fixed_newstyle {
                let msg = b"option data too long";
                send(
                    io,
                    &proto::option_reply(opt.option, proto::REP_ERR_TOO_BIG, msg),
                )
                .await?;
            }
            return Err(HandshakeEnd::TooBig {
                option: opt.option,
                length: opt.length,
            });
        }
        // Bounded by MAX_OPTION_LEN (checked above).
        let mut data = vec![0u8; opt.length as usize];
        io.read_exact(&mut data).await?;
        match handle_option(io, client, &mut session, opt.option, &data, export).await? {
            Next::Continue => {}
            Next::Transmission(how) => return Ok((how, session)),
        }
    }
    Err(HandshakeEnd::TooManyOptions)
}

/// Answer one option.
async fn handle_option<S>(
    io: &mut S,
    client: ClientFlags,
    session: &mut Negotiated,
    option: u32,
    data: &[u8],
    export: &ExportInfo<'_>,
) -> Result<Next, HandshakeEnd>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if option == proto::OPT_SET_META_CONTEXT {
        // Replaces the selection, even when it fails.
        session.base_allocation = None;
    }
    let parsed = match ClientOption::parse(option, data) {
        Ok(parsed) => parsed,
        Err(InvalidOption(_)) if option == proto::OPT_EXPORT_NAME => {
            return Err(HandshakeEnd::UnknownExport(lossy(data)));
        }
        Err(InvalidOption(msg)) if client.fixed_newstyle => {
            tracing::warn!(option, reason = msg, "invalid option");
            let reply = proto::option_reply(option, proto::REP_ERR_INVALID, msg.as_bytes());
            send(io, &reply).await?;
            return Ok(Next::Continue);
        }
        Err(InvalidOption(_)) => return Err(HandshakeEnd::NotFixedNewstyle(option)),
    };
    if !client.fixed_newstyle && !matches!(parsed, ClientOption::ExportName(_)) {
        return Err(HandshakeEnd::NotFixedNewstyle(option));
    }
    match parsed {
        ClientOption::ExportName(name) => export_name(io, client, session, name, export).await,
        ClientOption::Abort => {
            // The client may already be gone; the spec tells it to cope
            // with either outcome, so a failed ACK is not an error.
            let _ = send(io, &proto::option_reply(option, proto::REP_ACK, &[])).await;
            Err(HandshakeEnd::Aborted)
        }
        ClientOption::List => {
            let mut out = proto::option_reply(
                option,
                proto::REP_SERVER,
                &proto::server_reply_data(export.name.as_bytes()),
            );
            out.extend_from_slice(&proto::option_reply(option, proto::REP_ACK, &[]));
            send(io, &out).await?;
            Ok(Next::Continue)
        }
        ClientOption::StartTls => {
            let msg = b"TLS is not supported; use the unix socket's permissions";
            send(io, &proto::option_reply(option, proto::REP_ERR_POLICY, msg)).await?;
            Ok(Next::Continue)
        }
        ClientOption::Info(req) => info(io, option, session, &req, export, None).await,
        ClientOption::Go(req) => info(io, option, session, &req, export, Some(Entered::Go)).await,
        ClientOption::StructuredReply => {
            session.structured_replies = true;
            send(io, &proto::option_reply(option, proto::REP_ACK, &[])).await?;
            Ok(Next::Continue)
        }
        ClientOption::ListMetaContext(req) => {
            meta_context(io, option, session, &req, export, true).await
        }
        ClientOption::SetMetaContext(req) => {
            meta_context(io, option, session, &req, export, false).await
        }
        ClientOption::Unsupported(_) => {
            let msg = b"option not supported by this server";
            send(io, &proto::option_reply(option, proto::REP_ERR_UNSUP, msg)).await?;
            Ok(Next::Continue)
        }
    }
}

/// `NBD_OPT_EXPORT_NAME`: enter transmission or drop the connection.
async fn export_name<S>(
    io: &mut S,
    client: ClientFlags,
    session: &Negotiated,
    name: &[u8],
    export: &ExportInfo<'_>,
) -> Result<Next, HandshakeEnd>
where
    S: AsyncWrite + Unpin,
{
    if !export.matches(name) {
        return Err(HandshakeEnd::UnknownExport(lossy(name)));
    }
    let reply = proto::export_name_reply(export.size, export.flags(session), client.no_zeroes);
    send(io, &reply).await?;
    Ok(Next::Transmission(Entered::ExportName))
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`: describe the export, then ACK (and enter
/// transmission when `enter` is set), or `NBD_REP_ERR_UNKNOWN`.
async fn info<S>(
    io: &mut S,
    option: u32,
    session: &Negotiated,
    req: &InfoRequest<'_>,
    export: &ExportInfo<'_>,
    enter: Option<Entered>,
) -> Result<Next, HandshakeEnd>
where
    S: AsyncWrite + Unpin,
{
    if !export.matches(req.name) {
        tracing::warn!(option, name = %lossy(req.name), "client asked for an unknown export");
        let msg = format!("unknown export; this server exports {:?}", export.name);
        send(
            io,
            &proto::option_reply(option, proto::REP_ERR_UNKNOWN, msg.as_bytes()),
        )
        .await?;
        return Ok(Next::Continue);
    }
    send(io, &info_replies(option, session, req, export)).await?;
    Ok(match enter {
        Some(how) => Next::Transmission(how),
        None => Next::Continue,
    })
}

/// The `NBD_REP_INFO` replies and the final ACK, in one buffer: export
/// information and block sizes always, the name when asked for.
fn info_replies(
    option: u32,
    session: &Negotiated,
    req: &InfoRequest<'_>,
    export: &ExportInfo<'_>,
) -> Vec<u8> {
    let mut out = proto::option_reply(
        option,
        proto::REP_INFO,
        &proto::info_export_data(export.size, export.flags(session)),
    );
    out.extend_from_slice(&proto::option_reply(
        option,
        proto::REP_INFO,
        &proto::info_block_size_data(export.min_block, export.preferred_block, export.max_payload),
    ));
    if req.wants(proto::INFO_NAME) {
        out.extend_from_slice(&proto::option_reply(
            option,
            proto::REP_INFO,
            &proto::info_name_data(export.name.as_bytes()),
        ));
    }
    out.extend_from_slice(&proto::option_reply(option, proto::REP_ACK, &[]));
    out
}

/// `NBD_OPT_LIST_META_CONTEXT` (`listing`) or `NBD_OPT_SET_META_CONTEXT`:
/// `base:allocation` (id 0 when listing) if the queries select it, then
/// ACK. Both need structured replies first (`ERR_INVALID` otherwise) and
/// our export (`ERR_UNKNOWN`). Selecting records the context in `session`
/// (the caller already cleared it).
async fn meta_context<S>(
    io: &mut S,
    option: u32,
    session: &mut Negotiated,
    req: &MetaContextRequest<'_>,
    export: &ExportInfo<'_>,
    listing: bool,
) -> Result<Next, HandshakeEnd>
where
    S: AsyncWrite + Unpin,
{
    let refuse = |reply_type, msg: &str| proto::option_reply(option, reply_type, msg.as_bytes());
    let reply = if !session.structured_replies {
        refuse(
            proto::REP_ERR_INVALID,
            "negotiate NBD_OPT_STRUCTURED_REPLY first",
        )
    } else if !export.matches(req.name) {
        let msg = format!("unknown export; this server exports {:?}", export.name);
        refuse(proto::REP_ERR_UNKNOWN, &msg)
    } else {
        match req.selects_base_allocation(listing) {
            Err(InvalidOption(msg)) => refuse(proto::REP_ERR_INVALID, msg),
            Ok(selected) => {
                let mut out = Vec::new();
                if selected {
                    let id = if listing {
                        0
                    } else {
                        session.base_allocation = Some(proto::BASE_ALLOCATION_ID);
                        proto::BASE_ALLOCATION_ID
                    };
                    out = proto::option_reply(
                        option,
                        proto::REP_META_CONTEXT,
                        &proto::meta_context_data(id, proto::BASE_ALLOCATION),
                    );
                }
                out.extend_from_slice(&proto::option_reply(option, proto::REP_ACK, &[]));
                out
            }
        }
    };
    tracing::debug!(option, listing, selected = ?session.base_allocation, "metadata context");
    send(io, &reply).await?;
    Ok(Next::Continue)
}

async fn send<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

/// A client-supplied name for logs, bounded and without control characters.
fn lossy(name: &[u8]) -> String {
    let shown = &name[..name.len().min(128)];
    String::from_utf8_lossy(shown)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
