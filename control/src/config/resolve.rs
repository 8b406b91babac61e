//! From the raw tree to a [`Config`]: value conversion, duplicate checks,
//! `on` block matching and precedence (resource-node > resource > global >
//! default).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::addr::parse_control;
use super::parser::{Block, Key, Level, Section, Setting, Word};
use super::{
    Checksum, Compression, Config, Diag, NodeIdentity, PeerAddr, Pos, Replication, ResourceConfig,
    Scheme, ALL_RESOURCES, DEFAULT_CONTROL, DEFAULT_EXPORTDIR, DEFAULT_PIDFILE, DEFAULT_PORT,
    DEFAULT_TIMEOUT, MAX_TIMEOUT_SECS,
};
use super::{Located, SecretSource, SplitBrainPolicy, SyncMode, TlsConfig};

/// A converted value and the position of its statement.
#[derive(Debug, Clone)]
struct At<T> {
    value: T,
    pos: Pos,
}

/// The converted settings of one section. Which fields can be set depends on
/// the level, which the parser has already checked.
#[derive(Debug, Default)]
struct Values {
    control: Option<At<PathBuf>>,
    pidfile: Option<At<PathBuf>>,
    listen: Vec<At<PeerAddr>>,
    exportdir: Option<At<PathBuf>>,
    replication: Option<At<Replication>>,
    checksum: Option<At<Checksum>>,
    compression: Option<At<Compression>>,
    syncmode: Option<At<SyncMode>>,
    timeout: Option<At<Duration>>,
    exec: Option<At<PathBuf>>,
    metaflush: Option<At<bool>>,
    name: Option<At<String>>,
    local: Option<At<PathBuf>>,
    remote: Option<At<Option<PeerAddr>>>,
    source: Option<At<Option<PeerAddr>>>,
    splitbrain: Option<At<SplitBrainPolicy>>,
    metrics: Option<At<Option<PeerAddr>>>,
    /// `secret <string>`, or `secret none` (None).
    secret: Option<At<Option<String>>>,
    secretfile: Option<At<PathBuf>>,
    tls: Option<At<bool>>,
    tlscert: Option<At<PathBuf>>,
    tlskey: Option<At<PathBuf>>,
    tlsca: Option<At<PathBuf>>,
}

impl Values {
    fn collect(settings: &[Setting], level: Level) -> Result<Values, Diag> {
        let mut v = Values::default();
        for s in settings {
            let word = &s.value;
            match s.key {
                Key::Control => set(&mut v.control, s, level, convert(word, parse_control)?)?,
                Key::Pidfile => set(&mut v.pidfile, s, level, path(word))?,
                Key::Listen => v.listen.push(At {
                    value: convert(word, |w| w.parse::<PeerAddr>().map_err(|e| e.0))?,
                    pos: s.pos,
                }),
                Key::Exportdir => set(&mut v.exportdir, s, level, path(word))?,
                Key::Replication => set(&mut v.replication, s, level, keyword(word)?)?,
                Key::Checksum => set(&mut v.checksum, s, level, checksum(word)?)?,
                Key::Compression => set(&mut v.compression, s, level, keyword(word)?)?,
                Key::Syncmode => set(&mut v.syncmode, s, level, keyword(word)?)?,
                Key::Timeout => set(&mut v.timeout, s, level, convert(word, parse_timeout)?)?,
                Key::Exec => set(&mut v.exec, s, level, convert(word, parse_exec)?)?,
                Key::Metaflush => set(&mut v.metaflush, s, level, convert(word, parse_on_off)?)?,
                Key::Name => set(&mut v.name, s, level, convert(word, parse_provname)?)?,
                Key::Local => set(&mut v.local, s, level, convert(word, parse_local)?)?,
                Key::Metrics => set(
                    &mut v.metrics,
                    s,
                    level,
                    optional_addr(word, PeerAddr::parse_metrics)?,
                )?,
                Key::Splitbrain => set(
                    &mut v.splitbrain,
                    s,
                    level,
                    convert(word, parse_splitbrain)?,
                )?,
                Key::Secret => set(&mut v.secret, s, level, convert(word, parse_secret)?)?,
                Key::Secretfile => set(
                    &mut v.secretfile,
                    s,
                    level,
                    convert(word, |w| absolute(w, "secretfile"))?,
                )?,
                Key::Tls => set(&mut v.tls, s, level, convert(word, |w| on_off(w, "tls"))?)?,
                Key::Tlscert => set(
                    &mut v.tlscert,
                    s,
                    level,
                    convert(word, |w| absolute(w, "tlscert"))?,
                )?,
                Key::Tlskey => set(
                    &mut v.tlskey,
                    s,
                    level,
                    convert(word, |w| absolute(w, "tlskey"))?,
                )?,
                Key::Tlsca => set(
                    &mut v.tlsca,
                    s,
                    level,
                    convert(word, |w| absolute(w, "tlsca"))?,
                )?,
                Key::Remote => set(&mut v.remote, s, level, optional_addr(word, str::parse)?)?,
                Key::Source => set(
                    &mut v.source,
                    s,
                    level,
                    optional_addr(word, PeerAddr::parse_source)?,
                )?,
            }
        }
        if let (Some(a), Some(b)) = (&v.secret, &v.secretfile) {
            return Err(Diag::new(
                a.pos.max(b.pos),
                format!(
                    "both 'secret' (at {}) and 'secretfile' (at {}) in {}: give one of them",
                    a.pos,
                    b.pos,
                    level.describe()
                ),
            ));
        }
        Ok(v)
    }

    /// The secret this block sets: `Some(None)` for `secret none`.
    fn secret(&self) -> Option<Option<Located<SecretSource>>> {
        if let Some(at) = &self.secret {
            return Some(
                at.value
                    .clone()
                    .map(|s| Located::at(SecretSource::Inline(s), at.pos)),
            );
        }
        self.secretfile
            .as_ref()
            .map(|at| Some(Located::at(SecretSource::File(at.value.clone()), at.pos)))
    }
}

/// A shared secret written in the file, or `none`.
fn parse_secret(s: &str) -> Result<Option<String>, String> {
    use hast_datapath::peer::auth::{MAX_SECRET_LEN, MIN_SECRET_LEN};
    if s == "none" {
        return Ok(None);
    }
    if s.len() < MIN_SECRET_LEN || s.len() > MAX_SECRET_LEN {
        return Err(format!(
            "a secret must be {MIN_SECRET_LEN} to {MAX_SECRET_LEN} characters long (this one has {}); \
             generate one with e.g. `openssl rand -hex 32`, or use 'secretfile'",
            s.len()
        ));
    }
    Ok(Some(s.to_owned()))
}

fn absolute(s: &str, what: &str) -> Result<PathBuf, String> {
    if s.starts_with('/') {
        Ok(PathBuf::from(s))
    } else {
        Err(format!(
            "'{what}' needs an absolute path (hastd runs in '/'), found '{s}'"
        ))
    }
}

fn on_off(s: &str, what: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!(
            "expected 'on' or 'off' after '{what}', found '{s}'"
        )),
    }
}

/// Stores a single-valued setting, rejecting a second one at the same level.
fn set<T>(slot: &mut Option<At<T>>, s: &Setting, level: Level, value: T) -> Result<(), Diag> {
    if let Some(first) = slot {
        return Err(Diag::new(
            s.pos,
            format!(
                "duplicate '{}' statement in {} (first given at {})",
                s.key.as_str(),
                level.describe(),
                first.pos
            ),
        ));
    }
    *slot = Some(At { value, pos: s.pos });
    Ok(())
}

/// Converts a value; errors point at the value.
fn convert<T>(word: &Word, f: impl FnOnce(&str) -> Result<T, String>) -> Result<T, Diag> {
    f(&word.text).map_err(|message| Diag::new(word.pos, message))
}

/// `checksum`: the frames always carry a crc32c; a per-frame sha256 on top
/// is not implemented, and is refused rather than silently ignored.
fn checksum(word: &Word) -> Result<Checksum, Diag> {
    if word.text == "sha256" {
        return Err(Diag::new(
            word.pos,
            "checksum sha256 is not supported: every replicated frame already carries a \
             crc32c of its payload, checked before the data is used (use 'checksum crc32' or \
             'none'); to compare the nodes' data end to end with SHA-256, run \
             'hastctl verify --algorithm sha256'",
        ));
    }
    keyword(word)
}

fn keyword<T: std::str::FromStr<Err = super::ValueError>>(word: &Word) -> Result<T, Diag> {
    convert(word, |w| w.parse::<T>().map_err(|e| e.0))
}

fn path(word: &Word) -> PathBuf {
    PathBuf::from(&word.text)
}

/// An address, or `none`.
fn optional_addr(
    word: &Word,
    parse: fn(&str) -> Result<PeerAddr, super::ValueError>,
) -> Result<Option<PeerAddr>, Diag> {
    match word.text.as_str() {
        "none" => Ok(None),
        _ => convert(word, |w| parse(w).map(Some).map_err(|e| e.0)),
    }
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "expected a whole number of seconds after 'timeout', found '{s}'"
        ));
    }
    match s.parse::<u64>() {
        Ok(0) => Err("timeout must be greater than 0 seconds".into()),
        Ok(n) if n <= MAX_TIMEOUT_SECS => Ok(Duration::from_secs(n)),
        _ => Err(format!(
            "timeout '{s}' is too large (at most {MAX_TIMEOUT_SECS} seconds)"
        )),
    }
}

/// Hooks run without a shell or a search path: the program must be named
/// by its absolute path.
fn parse_exec(s: &str) -> Result<PathBuf, String> {
    if s.starts_with('/') {
        Ok(PathBuf::from(s))
    } else {
        Err(format!(
            "'exec' needs an absolute path (hooks are not looked up in $PATH), found '{s}'"
        ))
    }
}

/// The provider is opened by a daemon whose working directory is `/`: a
/// relative path would name a different file than the one meant.
fn parse_local(s: &str) -> Result<PathBuf, String> {
    if s.starts_with('/') {
        Ok(PathBuf::from(s))
    } else {
        Err(format!(
            "'local' needs an absolute path (hastd runs in '/'), found '{s}'"
        ))
    }
}

fn parse_splitbrain(s: &str) -> Result<SplitBrainPolicy, String> {
    match s {
        "manual" => Ok(SplitBrainPolicy::Manual),
        "auto" => Ok(SplitBrainPolicy::Auto),
        _ => Err(format!(
            "expected 'manual' or 'auto' after 'splitbrain', found '{s}'"
        )),
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!(
            "expected 'on' or 'off' after 'metaflush', found '{s}'"
        )),
    }
}

/// Provider names become device file names under the export directory.
fn parse_provname(s: &str) -> Result<String, String> {
    if s.contains('/') || s == "." || s == ".." {
        return Err(format!(
            "provider name '{s}' is not a valid device name (no '/', '.' or '..')"
        ));
    }
    Ok(s.to_string())
}

/// The `on` blocks of one section, all converted (so that mistakes in the
/// other nodes' blocks are reported too), and the one matching this node.
struct NodeBlocks<'a> {
    /// `(name, position)` of every block, in file order.
    declared: Vec<(&'a str, Pos)>,
    matching: Option<(&'a Block, Values)>,
}

impl<'a> NodeBlocks<'a> {
    fn collect(blocks: &'a [Block], level: Level, node: &NodeIdentity) -> Result<Self, Diag> {
        let mut declared: Vec<(&str, Pos)> = Vec::new();
        let mut matching: Option<(&Block, Values)> = None;
        for block in blocks {
            let name = block.name.text.as_str();
            if let Some((_, first)) = declared.iter().find(|(n, _)| *n == name) {
                return Err(Diag::new(
                    block.pos,
                    format!("duplicate 'on {name}' block (first given at {first})"),
                ));
            }
            declared.push((name, block.pos));
            let values = Values::collect(&block.body.settings, level)?;
            if node.matches(name) {
                if let Some((first, _)) = &matching {
                    return Err(Diag::new(
                        block.pos,
                        format!(
                            "both 'on {}' (at {}) and 'on {name}' match this node ({node}); keep only one",
                            first.name.text, first.pos
                        ),
                    ));
                }
                matching = Some((block, values));
            }
        }
        Ok(NodeBlocks { declared, matching })
    }
}

/// First of the given settings that is present, else `default`.
fn pick<T: Clone>(levels: &[&Option<At<T>>], default: T) -> T {
    levels
        .iter()
        .find_map(|slot| slot.as_ref().map(|at| at.value.clone()))
        .unwrap_or(default)
}

pub(crate) fn resolve(root: &Section, source: &Path, node: &NodeIdentity) -> Result<Config, Diag> {
    let global = Values::collect(&root.settings, Level::Global)?;
    let nodes = NodeBlocks::collect(&root.on_blocks, Level::GlobalNode, node)?;
    let empty = Values::default();
    let here = nodes.matching.as_ref().map_or(&empty, |(_, v)| v);

    let exportdir: PathBuf = pick(
        &[&here.exportdir, &global.exportdir],
        DEFAULT_EXPORTDIR.into(),
    );
    let control = pick(&[&here.control, &global.control], DEFAULT_CONTROL.into());
    if let Some(at) = here.control.as_ref().or(global.control.as_ref()) {
        check_socket_path(&at.value, "control socket", at.pos, "a shorter path")?;
    }
    let mut resources: Vec<ResourceConfig> = Vec::new();
    let mut seen: HashMap<&str, Pos> = HashMap::new();
    let mut provnames: HashMap<String, String> = HashMap::new();
    for block in &root.resources {
        let name = block.name.text.as_str();
        check_name_length(name, "resource name", MAX_RESOURCE_NAME, block.name.pos)?;
        if name == ALL_RESOURCES {
            return Err(Diag::new(
                block.name.pos,
                format!("resource name '{ALL_RESOURCES}' is reserved (it means every resource)"),
            ));
        }
        if let Some(first) = seen.insert(name, block.pos) {
            return Err(Diag::new(
                block.pos,
                format!("duplicate resource \"{name}\" (first defined at {first})"),
            ));
        }
        let res = resolve_resource(block, &global, here, node)?;
        check_socket_path(
            &exportdir.join(format!("{}.sock", res.provname)),
            &format!("resource \"{name}\": export socket"),
            provname_pos(block, node).unwrap_or(block.name.pos),
            "a shorter resource or provider name ('name'), or a shorter 'exportdir'",
        )?;
        if let Some(other) = provnames.get(&res.provname) {
            return Err(Diag::new(
                block.pos,
                format!(
                    "resource \"{name}\" uses provider name '{}', which resource \"{other}\" already uses",
                    res.provname
                ),
            ));
        }
        provnames.insert(res.provname.clone(), name.to_string());
        resources.push(res);
    }

    Ok(Config {
        source: source.to_path_buf(),
        node: node.clone(),
        control,
        pidfile: pick(&[&here.pidfile, &global.pidfile], DEFAULT_PIDFILE.into()),
        listen: listen_addresses(&global, here)?,
        exportdir,
        metrics: pick(&[&here.metrics, &global.metrics], None),
        resources,
    })
}

/// Longest resource name: what the handshake carries
/// (docs/protocol.md, Hello).
pub(crate) const MAX_RESOURCE_NAME: usize = 127;
/// Longest node name the handshake carries.
pub(crate) const MAX_NODE_NAME: usize = 63;
/// Longest unix socket path: `sun_path` holds 108 bytes with the NUL.
pub(crate) const MAX_SOCKET_PATH: usize = 107;

fn check_name_length(name: &str, what: &str, max: usize, pos: Pos) -> Result<(), Diag> {
    if name.len() > max {
        let shown: String = name.chars().take(32).collect();
        return Err(Diag::new(
            pos,
            format!(
                "{what} '{shown}...' is {} bytes long; at most {max} are allowed",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// A unix socket path must fit in `sun_path`; found now rather than when
/// hastd binds it.
fn check_socket_path(path: &Path, what: &str, pos: Pos, fix: &str) -> Result<(), Diag> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(Diag::new(
            pos,
            format!(
                "{what} {} would be {len} bytes long; a unix socket path must be at most \
                 {MAX_SOCKET_PATH} bytes (use {fix})",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Where the provider name of a resource comes from: its `name`
/// statement (this node's block first), if any.
fn provname_pos(block: &Block, node: &NodeIdentity) -> Option<Pos> {
    let named = |settings: &[Setting]| {
        settings
            .iter()
            .find(|s| s.key == Key::Name)
            .map(|s| s.value.pos)
    };
    block
        .body
        .on_blocks
        .iter()
        .filter(|b| node.matches(&b.name.text))
        .find_map(|b| named(&b.body.settings))
        .or_else(|| named(&block.body.settings))
}

/// Global and node-level `listen` addresses together; the defaults if none.
fn listen_addresses(global: &Values, here: &Values) -> Result<Vec<PeerAddr>, Diag> {
    let mut listen: Vec<&At<PeerAddr>> = global.listen.iter().chain(&here.listen).collect();
    if listen.is_empty() {
        return Ok(default_listen());
    }
    listen.sort_by_key(|at| at.pos);
    let mut out: Vec<PeerAddr> = Vec::new();
    for (i, at) in listen.iter().enumerate() {
        if let Some(first) = listen[..i].iter().find(|f| f.value == at.value) {
            return Err(Diag::new(
                at.pos,
                format!(
                    "listen address {} is given twice (first at {})",
                    at.value, first.pos
                ),
            ));
        }
        out.push(at.value.clone());
    }
    Ok(out)
}

/// `tcp4://0.0.0.0:8457` and `tcp6://[::]:8457`.
pub(crate) fn default_listen() -> Vec<PeerAddr> {
    vec![
        PeerAddr::new(Scheme::Tcp4, "0.0.0.0", DEFAULT_PORT),
        PeerAddr::new(Scheme::Tcp6, "::", DEFAULT_PORT),
    ]
}

fn resolve_resource(
    block: &Block,
    global: &Values,
    global_node: &Values,
    node: &NodeIdentity,
) -> Result<ResourceConfig, Diag> {
    let name = &block.name.text;
    let res = Values::collect(&block.body.settings, Level::Resource)?;
    let nodes = NodeBlocks::collect(&block.body.on_blocks, Level::ResourceNode, node)?;
    let Some((on, here)) = &nodes.matching else {
        let declared: Vec<&str> = nodes.declared.iter().map(|(n, _)| *n).collect();
        let declared = if declared.is_empty() {
            "no 'on' blocks".to_string()
        } else {
            declared.join(", ")
        };
        return Err(Diag::new(
            block.pos,
            format!(
                "resource \"{name}\" has no 'on' block for this node \
                 (this node is: {node}; the resource declares: {declared})"
            ),
        ));
    };
    let node_name = &on.name.text;
    check_name_length(node_name, "node name", MAX_NODE_NAME, on.name.pos)?;

    let Some(localpath) = here.local.as_ref().or(res.local.as_ref()) else {
        return Err(Diag::new(
            on.pos,
            format!(
                "resource \"{name}\" has no 'local' path for node '{node_name}' \
                 (set 'local' in the resource block or in its 'on {node_name}' block)"
            ),
        ));
    };
    let Some(remote) = &here.remote else {
        return Err(Diag::new(
            on.pos,
            format!(
                "resource \"{name}\": block 'on {node_name}' has no 'remote' address \
                 (use 'remote none' for a node without a peer)"
            ),
        ));
    };
    // Security: resource 'on' > resource > global 'on' > global.
    let levels = [here, &res, global_node, global];
    let secret = levels.iter().find_map(|v| v.secret()).flatten();
    let tls_on = levels
        .iter()
        .find_map(|v| v.tls.as_ref().map(|at| at.value))
        .unwrap_or(false);
    let tls = if tls_on {
        let file = |f: fn(&Values) -> &Option<At<PathBuf>>| {
            levels
                .iter()
                .find_map(|v| f(v).as_ref())
                .map(|at| Located::at(at.value.clone(), at.pos))
        };
        let (cert, key, ca) = (
            file(|v| &v.tlscert),
            file(|v| &v.tlskey),
            file(|v| &v.tlsca),
        );
        match (cert, key, ca) {
            (Some(cert), Some(key), Some(ca)) => Some(TlsConfig { cert, key, ca }),
            (cert, key, ca) => {
                let missing: Vec<&str> = [
                    ("tlscert", cert.is_none()),
                    ("tlskey", key.is_none()),
                    ("tlsca", ca.is_none()),
                ]
                .into_iter()
                .filter_map(|(n, m)| m.then_some(n))
                .collect();
                return Err(Diag::new(
                    on.pos,
                    format!(
                        "resource \"{name}\": 'tls on' needs 'tlscert', 'tlskey' and 'tlsca' for node \
                         '{node_name}' (missing: {})",
                        missing.join(", ")
                    ),
                ));
            }
        }
    } else {
        None
    };
    let provname = match here.name.as_ref().or(res.name.as_ref()) {
        Some(at) => at.value.clone(),
        None => parse_provname(name).map_err(|message| Diag::new(block.name.pos, message))?,
    };

    Ok(ResourceConfig {
        name: name.clone(),
        provname,
        localpath: localpath.value.clone(),
        remote: remote.value.clone(),
        source: here.source.as_ref().and_then(|at| at.value.clone()),
        replication: pick(
            &[&res.replication, &global.replication],
            Replication::default(),
        ),
        checksum: pick(&[&res.checksum, &global.checksum], Checksum::default()),
        compression: pick(
            &[&res.compression, &global.compression],
            Compression::default(),
        ),
        syncmode: pick(&[&res.syncmode, &global.syncmode], SyncMode::default()),
        timeout: pick(&[&res.timeout, &global.timeout], DEFAULT_TIMEOUT),
        exec: res
            .exec
            .as_ref()
            .or(global.exec.as_ref())
            .map(|at| at.value.clone()),
        metaflush: pick(&[&here.metaflush, &res.metaflush, &global.metaflush], true),
        splitbrain: pick(
            &[&res.splitbrain, &global.splitbrain],
            SplitBrainPolicy::Manual,
        ),
        node_name: node_name.clone(),
        secret,
        tls,
    })
}
