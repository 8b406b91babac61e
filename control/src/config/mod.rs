//! `hast.conf` parser.
//!
//! The configuration file format follows FreeBSD's `hast.conf(5)`, plus our
//! `exportdir` extension; `docs/hast.conf.md` is the user documentation.
//!
//! Parsing is done in three small steps:
//!
//! 1. [`lexer`] turns the text into words and braces, each with its position;
//! 2. [`parser`] is a recursive-descent parser that builds a raw tree of
//!    sections (global, `on`, `resource`), checking which statements may appear
//!    at which level;
//! 3. [`resolve`] converts the values, rejects duplicates, picks the `on`
//!    blocks that match this node and applies the precedence
//!    resource-node > resource > global > default.
//!
//! Apart from [`load`] (which reads the file) and [`NodeIdentity::from_system`]
//! / [`NodeIdentity::resolve`] (which read the host name, `/etc/machine-id`
//! and `HAST_NODE`), everything here is pure.

mod addr;
mod lexer;
mod node;
mod parser;
mod resolve;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Serialize, Serializer};

pub use addr::{PeerAddr, Scheme, DEFAULT_PORT, METRICS_PORT};
pub use node::{NodeIdentity, NODE_ENV};

/// Where `hastd` and `hastctl` look for the configuration by default.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/hast.conf";
/// Default control socket (`control uds:///var/run/hastctl`).
pub const DEFAULT_CONTROL: &str = "/var/run/hastctl";
/// Default pid file.
pub const DEFAULT_PIDFILE: &str = "/var/run/hastd.pid";
/// Default directory in which the replicated devices are exported (our extension).
pub const DEFAULT_EXPORTDIR: &str = "/run/hast";
/// Default I/O timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest accepted `timeout`, in seconds.
pub const MAX_TIMEOUT_SECS: u64 = i32::MAX as u64;
/// The resource name that [`Config::select`] treats as "every resource".
pub const ALL_RESOURCES: &str = "all";

/// A fully resolved configuration, as seen from one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// The file the configuration came from (for [`parse_str`]: whatever the
    /// caller passed, conventionally `<string>`).
    #[serde(serialize_with = "ser_path_lossy")]
    pub source: PathBuf,
    /// The identity `on` blocks were matched against.
    pub node: NodeIdentity,
    /// Path of the control socket.
    pub control: PathBuf,
    /// Path of the pid file.
    pub pidfile: PathBuf,
    /// Addresses to listen on for connections from the peers.
    pub listen: Vec<PeerAddr>,
    /// Directory in which the replicated devices are exported.
    pub exportdir: PathBuf,
    /// Where the Prometheus metrics are served (`metrics listen`); None:
    /// not served (the default).
    pub metrics: Option<PeerAddr>,
    /// The resources, in file order.
    pub resources: Vec<ResourceConfig>,
}

/// Split-brain handling (extension statement `splitbrain manual|auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitBrainPolicy {
    /// Refuse to synchronise; the operator resolves it (`hastctl
    /// split-brain discard`).
    #[default]
    Manual,
    /// Resolve automatically when one side changed no extent since the
    /// split: its counter moved but it holds nothing the other lacks.
    Auto,
}

impl std::fmt::Display for SplitBrainPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SplitBrainPolicy::Manual => "manual",
            SplitBrainPolicy::Auto => "auto",
        })
    }
}

/// A value with the position of the statement that set it. Comparisons
/// and serialization see only the value.
#[derive(Debug, Clone)]
pub struct Located<T> {
    /// The value.
    pub value: T,
    /// 1-based line of the statement.
    pub line: usize,
    /// 1-based column of the statement.
    pub column: usize,
}

impl<T: PartialEq> PartialEq for Located<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<T: Eq> Eq for Located<T> {}

impl<T: Serialize> Serialize for Located<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

impl<T> Located<T> {
    pub(crate) fn at(value: T, pos: Pos) -> Located<T> {
        Located {
            value,
            line: pos.line,
            column: pos.col,
        }
    }
}

/// Where a resource's shared secret comes from (`secret`,
/// `secretfile`). The secret itself is never printed or serialized.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `secret <string>`.
    Inline(String),
    /// `secretfile <path>`: a file only its owner may read.
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("Inline(<not shown>)"),
            SecretSource::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

impl Serialize for SecretSource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            SecretSource::Inline(_) => s.serialize_str("inline"),
            SecretSource::File(p) => s.serialize_str(&format!("file {}", p.to_string_lossy())),
        }
    }
}

/// The TLS files of a resource with `tls on`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsConfig {
    /// `tlscert`: this node's certificate (chain), PEM.
    #[serde(serialize_with = "ser_located_path")]
    pub cert: Located<PathBuf>,
    /// `tlskey`: its private key, PEM (only its owner may read it).
    #[serde(serialize_with = "ser_located_path")]
    pub key: Located<PathBuf>,
    /// `tlsca`: the CA certificates the peer's certificate must chain to.
    #[serde(serialize_with = "ser_located_path")]
    pub ca: Located<PathBuf>,
}

fn ser_located_path<S: Serializer>(p: &Located<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    ser_path_lossy(&p.value, s)
}

/// One resource, resolved for this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResourceConfig {
    /// Resource name (`resource <name> { ... }`).
    pub name: String,
    /// Provider (device) name; defaults to the resource name.
    pub provname: String,
    /// Local backing device or file.
    pub localpath: PathBuf,
    /// The peer; `None` for `remote none`.
    pub remote: Option<PeerAddr>,
    /// Local address to connect from.
    pub source: Option<PeerAddr>,
    pub replication: Replication,
    pub checksum: Checksum,
    pub compression: Compression,
    /// How a synchronisation moves data (`syncmode`, our extension).
    pub syncmode: SyncMode,
    /// I/O timeout; serialized as whole seconds.
    #[serde(serialize_with = "ser_secs")]
    pub timeout: Duration,
    /// Program run on events.
    pub exec: Option<PathBuf>,
    pub metaflush: bool,
    /// What to do on split-brain (extension).
    pub splitbrain: SplitBrainPolicy,
    /// The shared secret both nodes prove (`secret`, `secretfile`).
    pub secret: Option<Located<SecretSource>>,
    /// TLS (`tls on` with `tlscert`, `tlskey`, `tlsca`); None: `tls off`.
    pub tls: Option<TlsConfig>,
    /// The name of the `on` block that matched this node.
    pub node_name: String,
}

/// Errors from loading or querying a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A syntax or semantic error at a position in the file. `line` and
    /// `column` are 1-based; the column counts characters.
    #[error("{}:{line}:{column}: {message}", .file.display())]
    Parse {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// [`Config::select`] was given names that are not configured.
    #[error("{}: {}", .file.display(), unknown_resources_message(.names, .known))]
    UnknownResource {
        file: PathBuf,
        names: Vec<String>,
        known: Vec<String>,
    },
}

impl ConfigError {
    /// `(line, column)` of a positional error.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Parse { line, column, .. } => Some((*line, *column)),
            _ => None,
        }
    }

    fn at(file: &Path, diag: Diag) -> Self {
        ConfigError::Parse {
            file: file.to_path_buf(),
            line: diag.pos.line,
            column: diag.pos.col,
            message: diag.message,
        }
    }
}

fn unknown_resources_message(names: &[String], known: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    let plural = if names.len() == 1 { "" } else { "s" };
    let known = if known.is_empty() {
        "none".to_string()
    } else {
        known.join(", ")
    };
    format!(
        "unknown resource{plural} {} (configured: {known})",
        quoted.join(", ")
    )
}

/// Error from parsing a single value (an address, a mode, ...), without a
/// position. Used as the `FromStr` error of the public value types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(pub String);

/// A position in the input: 1-based line and 1-based column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Pos {
    pub line: usize,
    pub col: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A message at a position; turned into [`ConfigError::Parse`] once the file
/// name is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Diag {
    pub pos: Pos,
    pub message: String,
}

impl Diag {
    pub fn new(pos: Pos, message: impl Into<String>) -> Self {
        Diag {
            pos,
            message: message.into(),
        }
    }
}

/// Defines a value enum written as lowercase keywords in the file, with
/// `as_str`, `Display`, `FromStr` and `Serialize` all using that keyword.
macro_rules! keyword_enum {
    (
        $(#[$meta:meta])*
        $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] $variant ),+
        }

        impl $name {
            /// Every value, in documentation order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The keyword used in the configuration file.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ValueError;

            fn from_str(s: &str) -> Result<Self, ValueError> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| {
                        let names: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                        ValueError(format!(
                            "unknown {} '{}' (expected {})",
                            $what,
                            s,
                            one_of(&names)
                        ))
                    })
            }
        }
    };
}

/// "a, b or c".
fn one_of(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [only] => (*only).to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

keyword_enum! {
    /// Replication mode (`replication`).
    Replication("replication mode") {
        /// Writes complete when both nodes have stored the data.
        FullSync => "fullsync",
        /// Writes complete when the peer has received the data (default).
        #[default]
        MemSync => "memsync",
        /// Writes complete when stored locally.
        Async => "async",
    }
}

keyword_enum! {
    /// Checksum of replicated data (`checksum`). Every frame's payload
    /// carries a crc32c whatever this says (docs/protocol.md); `crc32`
    /// names that, `none` adds nothing to it. The original's `sha256` is
    /// refused with an explanation (see `resolve`).
    Checksum("checksum algorithm") {
        /// No checksum beyond the frames' crc32c (default).
        #[default]
        None => "none",
        /// The frames' crc32c.
        Crc32 => "crc32",
    }
}

keyword_enum! {
    /// Compression of replicated data (`compression`).
    Compression("compression algorithm") {
        /// Data travels as it is.
        None => "none",
        /// Only all-zero blocks are compressed, to a Zero request (default).
        #[default]
        Hole => "hole",
        /// `hole`, then LZF where it pays.
        Lzf => "lzf",
        /// `hole`, then LZ4 where it pays.
        Lz4 => "lz4",
    }
}

keyword_enum! {
    /// How a synchronisation moves data (`syncmode`, our extension).
    SyncMode("syncmode") {
        /// Checksums after a crash or a disconnect, a full copy for a new
        /// secondary (default).
        #[default]
        Auto => "auto",
        /// Every byte of every dirty extent.
        Full => "full",
        /// Block checksums first, always.
        Checksum => "checksum",
    }
}

/// Parses configuration text. `source` is only used to label the result and
/// the errors (pass `Path::new("<string>")` when there is no file).
pub fn parse_str(text: &str, source: &Path, node: &NodeIdentity) -> Result<Config, ConfigError> {
    let tokens = lexer::tokenize(text).map_err(|d| ConfigError::at(source, d))?;
    let tree = parser::parse(&tokens).map_err(|d| ConfigError::at(source, d))?;
    resolve::resolve(&tree, source, node).map_err(|d| ConfigError::at(source, d))
}

/// Parses raw file contents: invalid UTF-8 is reported at its position.
pub(crate) fn parse_bytes(
    bytes: &[u8],
    source: &Path,
    node: &NodeIdentity,
) -> Result<Config, ConfigError> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_str(text, source, node),
        Err(err) => {
            let valid = &bytes[..err.valid_up_to()];
            // The prefix is valid UTF-8 by construction.
            let prefix = std::str::from_utf8(valid).unwrap_or_default();
            let pos = lexer::end_position(prefix);
            Err(ConfigError::at(
                source,
                Diag::new(pos, "the file is not valid UTF-8"),
            ))
        }
    }
}

/// Reads and parses a configuration file.
pub fn load(path: &Path, node: &NodeIdentity) -> Result<Config, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_bytes(&bytes, path, node)
}

impl Config {
    /// The resource called `name`.
    pub fn resource(&self, name: &str) -> Option<&ResourceConfig> {
        self.resources.iter().find(|r| r.name == name)
    }

    /// Resources named on a command line. If any name is `all`, every
    /// resource is returned in file order; otherwise the named ones in the
    /// given order, without repeats. Unknown names are an error (listing all
    /// of them). An empty list selects nothing.
    pub fn select(&self, names: &[String]) -> Result<Vec<&ResourceConfig>, ConfigError> {
        if names.iter().any(|n| n == ALL_RESOURCES) {
            return Ok(self.resources.iter().collect());
        }
        let unknown: Vec<String> = names
            .iter()
            .filter(|n| self.resource(n).is_none())
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(ConfigError::UnknownResource {
                file: self.source.clone(),
                names: unknown,
                known: self.resources.iter().map(|r| r.name.clone()).collect(),
            });
        }
        let mut selected: Vec<&ResourceConfig> = Vec::new();
        for name in names {
            if let Some(res) = self.resource(name) {
                if !selected.iter().any(|r| r.name == res.name) {
                    selected.push(res);
                }
            }
        }
        Ok(selected)
    }
}

fn ser_path_lossy<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&path.to_string_lossy())
}

fn ser_secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}
