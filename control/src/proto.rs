//! The control socket protocol between `hastctl` and `hastd`: one JSON
//! object per line in each direction, one request per connection. See
//! `docs/control.md`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use hast_datapath::metadata::Role;
pub use hast_datapath::stats::{VerifyReport, VerifyState};
use serde::{Deserialize, Serialize};

/// Version of this protocol; bumped on incompatible changes.
pub const CONTROL_VERSION: u32 = 1;
/// Longest request or reply line accepted.
pub const MAX_LINE: usize = 1 << 20;

/// A request from hastctl.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    /// Status of resources (`all` or names); used by `status` and `list`.
    Status {
        /// Resource names, or `["all"]`.
        resources: Vec<String>,
    },
    /// Change the role of resources.
    Role {
        /// The new role.
        role: Role,
        /// Resource names, or `["all"]`.
        resources: Vec<String>,
        /// Promote even a node that knows its data is out of date.
        #[serde(default)]
        force: bool,
    },
    /// Subscribe to the events of resources (`hastctl events`). The first
    /// reply line is a [`Response`] like `status`'s (the current reports: a
    /// snapshot, or the error); when it carries no error, the connection
    /// stays open and hastd writes one [`crate::hooks::Event`] JSON
    /// object per line until either side closes it.
    Events {
        /// Resource names, or `["all"]`.
        resources: Vec<String>,
    },
    /// Re-read hast.conf and apply the differences (`hastctl reload`,
    /// like SIGHUP); the reply's `reload` tells what changed.
    Reload,
    /// Start an online verify on the primary (`hastctl verify`); the reply
    /// comes once it started, progress and result in `status`.
    Verify {
        /// Resource names, or `["all"]`.
        resources: Vec<String>,
        /// Start of the range in the data area.
        #[serde(default)]
        offset: u64,
        /// Bytes (None: to the end of the data area).
        #[serde(default)]
        length: Option<u64>,
        /// `xxh3` (default) or `sha256`.
        #[serde(default)]
        algorithm: Option<String>,
        /// Mark the differing extents for synchronisation.
        #[serde(default)]
        repair: bool,
    },
    /// Resolve a split-brain on this node (`hastctl split-brain`).
    #[serde(rename = "split-brain")]
    SplitBrain {
        /// What to do; only `discard` (this node's changes since the
        /// split) exists.
        action: String,
        /// Resource names, or `["all"]`.
        resources: Vec<String>,
    },
}

/// Envelope of a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestEnvelope {
    /// Protocol version of the client.
    pub version: u32,
    /// The request.
    #[serde(flatten)]
    pub request: Request,
}

/// Counters of `hastctl list`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statistics {
    /// Reads served.
    pub reads: u64,
    /// Writes served.
    pub writes: u64,
    /// Discards served.
    pub deletes: u64,
    /// Flushes served.
    pub flushes: u64,
    /// Activemap metadata writes.
    pub activemap_updates: u64,
}

/// Local error counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalErrors {
    /// Failed local reads.
    pub read: u64,
    /// Failed local writes.
    pub write: u64,
    /// Failed local discards.
    pub delete: u64,
    /// Failed local flushes.
    pub flush: u64,
}

/// Queue depths.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queues {
    /// Requests in local processing.
    pub local: u64,
    /// Requests waiting to be sent to the peer.
    pub send: u64,
    /// Requests waiting for the peer's reply.
    pub recv: u64,
    /// Requests completed, reply not yet sent to the client.
    pub done: u64,
    /// Free request slots.
    pub idle: u64,
}

/// Progress of a synchronisation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    /// `to-secondary` or `from-secondary`.
    pub direction: String,
    /// Bytes copied in this pass.
    pub done: u64,
    /// Bytes to copy when the pass started.
    pub total: u64,
    /// Bytes per second so far.
    pub rate: u64,
    /// Estimated seconds left.
    pub eta_seconds: Option<u64>,
}

/// A verify as `hastctl list` shows it: the data path's report, plus its
/// rate and estimated time left.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifySummary {
    /// Progress and result.
    #[serde(flatten)]
    pub report: VerifyReport,
    /// Bytes dealt with per second so far.
    pub rate: u64,
    /// Estimated seconds left (running only).
    pub eta_seconds: Option<u64>,
}

/// Everything `hastctl status`/`list` shows about one resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceReport {
    /// Resource name.
    pub name: String,
    /// Current role.
    pub role: String,
    /// Provider (device) name.
    pub provname: String,
    /// Local provider path.
    pub localpath: String,
    /// Extent size in bytes (0 when the provider is not open).
    pub extentsize: u64,
    /// Keepdirty (0 when the provider is not open).
    pub keepdirty: u64,
    /// Remote address, or `none`.
    pub remoteaddr: String,
    /// Source address, when configured.
    pub sourceaddr: Option<String>,
    /// Replication mode.
    pub replication: String,
    /// `complete`, `degraded`, or None in role init.
    pub status: Option<String>,
    /// Process serving the resource (0 when idle).
    pub workerpid: u32,
    /// Bytes needing synchronisation.
    pub dirty: u64,
    /// Extents marked in the on-disk activemap.
    pub ondisk_extents: u64,
    /// Exported size in bytes (0 when the provider is not open).
    pub datasize: u64,
    /// The primary's NBD socket, when exporting.
    pub export: Option<String>,
    /// Connected NBD clients.
    pub clients: u64,
    /// Counters.
    pub statistics: Statistics,
    /// Local error counters.
    pub local_errors: LocalErrors,
    /// Queue depths.
    pub queues: Queues,
    /// Synchronisation in progress.
    pub sync: Option<SyncReport>,
    /// Bytes synchronised since hastd started (all passes).
    pub synced_bytes: u64,
    /// Of those, bytes skipped because neither node wrote them since
    /// `hastctl create`.
    #[serde(default)]
    pub sync_skipped_bytes: u64,
    /// Of those, bytes a checksum-based synchronisation found identical.
    #[serde(default)]
    pub sync_identical_bytes: u64,
    /// Extents written since `hastctl create` (the written map).
    #[serde(default)]
    pub written_extents: u64,
    /// Bytes sent to the peer since hastd started (frames and payloads).
    #[serde(default)]
    pub net_sent_bytes: u64,
    /// Bytes received from the peer since hastd started.
    #[serde(default)]
    pub net_received_bytes: u64,
    /// `compression` in force.
    #[serde(default)]
    pub compression: String,
    /// `syncmode` in force.
    #[serde(default)]
    pub syncmode: String,
    /// The verify running or last run since hastd started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifySummary>,
    /// The replication connection is up.
    pub connected: bool,
    /// Writes that waited for room in the replication window.
    pub window_waits: u64,
    /// The last handshake found a split-brain.
    pub split_brain: bool,
    /// A primary whose data is out of date: the extents not copied from
    /// the secondary yet are read from it, and fail (EIO) while it is not
    /// connected.
    #[serde(default)]
    pub out_of_date: bool,
    /// This node's disk: `ok`, or `failed` (detached after its errors;
    /// `disk_error` says why); None in role init.
    #[serde(default)]
    pub disk: Option<String>,
    /// Why this node's disk was detached.
    #[serde(default)]
    pub disk_error: Option<String>,
    /// The peer's disk as far as this node knows: `failed` (a primary: the
    /// secondary refused it for that; a secondary: the primary writes only
    /// here, this node holds the only copy), `ok` while connected, None
    /// otherwise.
    #[serde(default)]
    pub peer_disk: Option<String>,
    /// Reads that failed locally and were served by the secondary.
    #[serde(default)]
    pub reads_from_peer: u64,
    /// Connections refused for failed authentication (secret, TLS) or
    /// dropped for a stream that failed its MAC, since hastd started.
    #[serde(default)]
    pub auth_failures: u64,
    /// The last replication problem, if any.
    pub last_error: Option<String>,
    /// Per-resource error of a role change.
    pub error: Option<String>,
    /// The kind of `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
    /// Role before a role change.
    pub previous_role: Option<String>,
}

/// What kind of error a reply carries: hastctl picks its exit code by
/// kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request could not be read or understood.
    BadRequest,
    /// A named resource is not configured.
    UnknownResource,
    /// hastd is too busy to take the request now; try again.
    Busy,
    /// The configuration file is unreadable or invalid (reload).
    Config,
    /// The node's data is out of date; promotion needs `--force`.
    OutOfDate,
    /// Not possible in the resource's current role.
    WrongRole,
    /// The provider could not be opened or written.
    Provider,
    /// A role change, reload step or other operation failed.
    Failed,
}

/// Reply of hastd.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version of the server.
    pub version: u32,
    /// A request-level error (bad request, unknown resource).
    pub error: Option<String>,
    /// The kind of `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
    /// Per-resource results.
    pub resources: Vec<ResourceReport>,
    /// What a `reload` changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadReport>,
}

impl Response {
    /// A reply carrying only a request-level error.
    pub fn failure(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response {
            version: CONTROL_VERSION,
            error: Some(message.into()),
            error_kind: Some(kind),
            ..Default::default()
        }
    }
}

/// The outcome of a configuration reload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The file read.
    pub config: String,
    /// Node-wide settings that changed (`control`, `listen`, `metrics`,
    /// `pidfile`, `exportdir`).
    pub settings: Vec<SettingChange>,
    /// One entry per resource of the old or the new file.
    pub resources: Vec<ResourceOutcome>,
}

/// A node-wide setting changed by a reload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingChange {
    /// `control`, `listen`, `metrics`, `pidfile` or `exportdir`.
    pub setting: String,
    /// Before.
    pub old: String,
    /// After.
    pub new: String,
    /// Applied now (false: takes effect at the next start).
    pub applied: bool,
}

/// What a reload did to one resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceOutcome {
    /// Resource name.
    pub name: String,
    /// `unchanged`, `added` (role init), `removed`, `stored` (role init:
    /// used from the next role change), `restarted` or `live` (applied
    /// to the running primary).
    pub action: String,
    /// The role it runs in after the reload (before it, when removed).
    pub role: String,
    /// The statements whose value changed.
    pub changed: Vec<String>,
    /// Why the change could not be applied.
    pub error: Option<String>,
}

/// Sends one request and waits for the reply.
pub fn call(socket: &Path, request: Request, timeout: Duration) -> Result<Response, String> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot connect to hastd via {}: {e} (is hastd running with this configuration?)",
            socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let env = RequestEnvelope {
        version: CONTROL_VERSION,
        request,
    };
    let mut line = serde_json::to_string(&env).map_err(|e| e.to_string())?;
    line.push('\n');
    (&stream)
        .write_all(line.as_bytes())
        .map_err(|e| format!("cannot send command to hastd via {}: {e}", socket.display()))?;
    let reply = read_line(&stream).map_err(|e| {
        format!(
            "cannot receive reply from hastd via {}: {e}",
            socket.display()
        )
    })?;
    serde_json::from_str(&reply).map_err(|e| format!("malformed reply from hastd: {e}"))
}

/// Reads one bounded line.
pub fn read_line(stream: &UnixStream) -> std::io::Result<String> {
    let mut reader = BufReader::new(stream).take(MAX_LINE as u64);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "line too long or connection closed",
        ));
    }
    Ok(line)
}
