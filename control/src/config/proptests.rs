//! Property tests: the parser never panics and reports positions inside the
//! input; generated valid configurations resolve to the expected values
//! whatever the statement order and layout.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;

use super::*;

// ------------------------------------------------------------- robustness

/// The identity used for arbitrary input: answers to "a.b", "a" and "m".
fn fuzz_node() -> NodeIdentity {
    NodeIdentity::from_parts(Some("a.b"), Some("m"))
}

/// Checks that an error is positional and that the position is in `text`
/// (the end-of-file position, just after the last character, included).
fn check_error_position(text: &str, result: Result<Config, ConfigError>) {
    let Err(err) = result else { return };
    let Some((line, col)) = err.position() else {
        panic!("error without a position: {err}");
    };
    let lines: Vec<&str> = text.split('\n').collect();
    assert!(
        line >= 1 && line <= lines.len(),
        "line {line} out of range: {err}"
    );
    let width = lines[line - 1].chars().count();
    assert!(
        col >= 1 && col <= width + 1,
        "column {col} out of range: {err}"
    );
    assert!(err
        .to_string()
        .starts_with(&format!("<fuzz>:{line}:{col}: ")));
}

/// Words and separators from which syntactically plausible soup is made.
fn soup_piece() -> impl Strategy<Value = String> {
    const WORDS: &[&str] = &[
        "control",
        "pidfile",
        "listen",
        "replication",
        "checksum",
        "compression",
        "timeout",
        "exec",
        "metaflush",
        "resource",
        "name",
        "local",
        "remote",
        "source",
        "on",
        "off",
        "fullsync",
        "memsync",
        "async",
        "none",
        "crc32",
        "sha256",
        "hole",
        "lzf",
        "exportdir",
        "a",
        "a.b",
        "m",
        "z",
        "all",
        "r",
        "0",
        "20",
        "/x",
        "uds:///c",
        "127.0.0.1",
        "[::1]:1",
        "tcp4://[::1]",
        "tcp6://h:99999",
        "{",
        "}",
        "{",
        "}",
        "#",
        "\n",
        "é",
        "\"",
    ];
    prop_oneof![
        8 => proptest::sample::select(WORDS).prop_map(str::to_string),
        1 => "[a-z0-9:/\\[\\]._-]{1,8}",
    ]
}

fn soup() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(soup_piece(), 0..60),
        proptest::collection::vec(
            prop_oneof![Just(" "), Just("\n"), Just("\t"), Just("")],
            1..8,
        ),
    )
        .prop_map(|(pieces, seps)| {
            let mut text = String::new();
            for (i, piece) in pieces.iter().enumerate() {
                text.push_str(piece);
                text.push_str(seps[i % seps.len()]);
            }
            text
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_strings_never_panic(text in any::<String>()) {
        check_error_position(&text, parse_str(&text, Path::new("<fuzz>"), &fuzz_node()));
    }

    #[test]
    fn token_soup_never_panics(text in soup()) {
        check_error_position(&text, parse_str(&text, Path::new("<fuzz>"), &fuzz_node()));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let result = parse_bytes(&bytes, Path::new("<fuzz>"), &fuzz_node());
        if let Err(err) = result {
            let (line, col) = err.position().expect("positional error");
            let newlines = bytes.iter().filter(|&&b| b == b'\n').count();
            prop_assert!(line >= 1 && line <= newlines + 1 && col >= 1 && col <= bytes.len() + 1);
        }
    }
}

// ------------------------------------------------------ generated configs

/// An address as written, and what it must parse to.
#[derive(Debug, Clone)]
struct GenAddr {
    text: String,
    expected: PeerAddr,
    explicit_port: bool,
}

fn port_suffix() -> impl Strategy<Value = Option<u16>> {
    prop::option::of(1u16..)
}

fn with_port(base: String, port: Option<u16>) -> String {
    match port {
        Some(p) => format!("{base}:{p}"),
        None => base,
    }
}

fn gen_addr() -> impl Strategy<Value = GenAddr> {
    let v4 = (
        any::<[u8; 4]>(),
        prop::sample::select(vec!["", "tcp://", "tcp4://"]),
        port_suffix(),
    )
        .prop_map(|(octets, scheme, port)| {
            let ip = Ipv4Addr::from(octets);
            let expected_scheme = if scheme == "tcp://" {
                Scheme::Tcp
            } else {
                Scheme::Tcp4
            };
            GenAddr {
                text: with_port(format!("{scheme}{ip}"), port),
                expected: PeerAddr::new(
                    expected_scheme,
                    ip.to_string(),
                    port.unwrap_or(DEFAULT_PORT),
                ),
                explicit_port: port.is_some(),
            }
        });
    let v6 = (
        any::<[u16; 8]>(),
        prop::sample::select(vec!["", "tcp://", "tcp6://"]),
        port_suffix(),
    )
        .prop_map(|(segments, scheme, port)| {
            let ip = Ipv6Addr::from(segments);
            let expected_scheme = if scheme == "tcp://" {
                Scheme::Tcp
            } else {
                Scheme::Tcp6
            };
            GenAddr {
                text: with_port(format!("{scheme}[{ip}]"), port),
                expected: PeerAddr::new(
                    expected_scheme,
                    ip.to_string(),
                    port.unwrap_or(DEFAULT_PORT),
                ),
                explicit_port: port.is_some(),
            }
        });
    let name = (
        "[a-z][a-z0-9-]{0,8}(\\.[a-z][a-z0-9]{0,4}){0,2}"
            .prop_filter("not 'none'", |h| h != "none"),
        prop::sample::select(vec!["", "tcp://", "tcp4://", "tcp6://"]),
        port_suffix(),
    )
        .prop_map(|(host, scheme, port)| {
            let expected_scheme = match scheme {
                "tcp4://" => Scheme::Tcp4,
                "tcp6://" => Scheme::Tcp6,
                _ => Scheme::Tcp,
            };
            GenAddr {
                text: with_port(format!("{scheme}{host}"), port),
                expected: PeerAddr::new(expected_scheme, host, port.unwrap_or(DEFAULT_PORT)),
                explicit_port: port.is_some(),
            }
        });
    prop_oneof![v4, v6, name]
}

fn gen_path() -> impl Strategy<Value = String> {
    "(/[a-zA-Z0-9._-]{1,6}){1,3}"
}

/// A statement: its tokens.
type Stmt = Vec<String>;

fn kv(key: &str, value: impl ToString) -> Stmt {
    vec![key.to_string(), value.to_string()]
}

fn opt_kv<T: ToString>(out: &mut Vec<Stmt>, key: &str, value: &Option<T>) {
    if let Some(v) = value {
        out.push(kv(key, v.to_string()));
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Settings of the global section or a global `on` block.
#[derive(Debug, Clone)]
struct GenDaemon {
    control: Option<String>,
    pidfile: Option<String>,
    exportdir: Option<String>,
    listen: Vec<GenAddr>,
}

fn gen_daemon() -> impl Strategy<Value = GenDaemon> {
    (
        prop::option::of(gen_path()),
        prop::option::of(gen_path()),
        prop::option::of(gen_path()),
        prop::collection::vec(gen_addr(), 0..3),
    )
        .prop_map(|(control, pidfile, exportdir, listen)| GenDaemon {
            control,
            pidfile,
            exportdir,
            listen,
        })
}

impl GenDaemon {
    fn statements(&self) -> Vec<Stmt> {
        let mut out = Vec::new();
        opt_kv(
            &mut out,
            "control",
            &self.control.as_ref().map(|p| format!("uds://{p}")),
        );
        opt_kv(&mut out, "pidfile", &self.pidfile);
        opt_kv(&mut out, "exportdir", &self.exportdir);
        out.extend(self.listen.iter().map(|a| kv("listen", &a.text)));
        out
    }
}

/// Settings that exist at global and resource level.
#[derive(Debug, Clone)]
struct GenShared {
    replication: Option<Replication>,
    checksum: Option<Checksum>,
    compression: Option<Compression>,
    timeout: Option<u64>,
    exec: Option<String>,
    metaflush: Option<bool>,
}

fn gen_shared() -> impl Strategy<Value = GenShared> {
    (
        prop::option::of(prop::sample::select(Replication::ALL)),
        prop::option::of(prop::sample::select(Checksum::ALL)),
        prop::option::of(prop::sample::select(Compression::ALL)),
        prop::option::of(1..=MAX_TIMEOUT_SECS),
        prop::option::of(gen_path()),
        prop::option::of(any::<bool>()),
    )
        .prop_map(
            |(replication, checksum, compression, timeout, exec, metaflush)| GenShared {
                replication,
                checksum,
                compression,
                timeout,
                exec,
                metaflush,
            },
        )
}

impl GenShared {
    fn statements(&self) -> Vec<Stmt> {
        let mut out = Vec::new();
        opt_kv(&mut out, "replication", &self.replication);
        opt_kv(&mut out, "checksum", &self.checksum);
        opt_kv(&mut out, "compression", &self.compression);
        opt_kv(&mut out, "timeout", &self.timeout);
        opt_kv(&mut out, "exec", &self.exec);
        opt_kv(&mut out, "metaflush", &self.metaflush.map(on_off));
        out
    }
}

/// A resource's `on` block.
#[derive(Debug, Clone)]
struct GenResNode {
    name: Option<String>,
    local: Option<String>,
    metaflush: Option<bool>,
    /// `None` is written `remote none`.
    remote: Option<GenAddr>,
    source: Option<GenAddr>,
}

fn gen_res_node() -> impl Strategy<Value = GenResNode> {
    (
        any::<bool>(),
        prop::option::of(gen_path()),
        prop::option::of(any::<bool>()),
        prop::option::of(gen_addr()),
        prop::option::of(gen_addr()),
    )
        .prop_map(|(name, local, metaflush, remote, source)| GenResNode {
            // Made unique per resource when the resource is built.
            name: name.then(String::new),
            local,
            metaflush,
            remote,
            source,
        })
}

impl GenResNode {
    fn statements(&self) -> Vec<Stmt> {
        let mut out = Vec::new();
        opt_kv(&mut out, "name", &self.name);
        opt_kv(&mut out, "local", &self.local);
        opt_kv(&mut out, "metaflush", &self.metaflush.map(on_off));
        out.push(kv(
            "remote",
            self.remote.as_ref().map_or("none", |a| a.text.as_str()),
        ));
        opt_kv(
            &mut out,
            "source",
            &self.source.as_ref().map(|a| a.text.clone()),
        );
        out
    }
}

#[derive(Debug, Clone)]
struct GenResource {
    name: String,
    shared: GenShared,
    provname: Option<String>,
    local: Option<String>,
    /// The block for this node and the name it is written with.
    me_name: String,
    me: GenResNode,
    /// Blocks for other nodes.
    others: Vec<(String, GenResNode)>,
}

/// Names this node answers to (see [`gen_node`]) and others.
const MY_NAMES: &[&str] = &["me.example.org", "me", "0123abcd"];
const OTHER_NAMES: &[&str] = &["peer", "peer.example.org", "on", "resource", "x-1"];

fn gen_node() -> NodeIdentity {
    NodeIdentity::from_parts(Some("me.example.org"), Some("0123abcd\n"))
}

fn gen_resource(index: usize) -> impl Strategy<Value = GenResource> {
    (
        "[a-z][a-z0-9_]{0,6}",
        gen_shared(),
        any::<bool>(),
        prop::option::of(gen_path()),
        prop::sample::select(MY_NAMES),
        gen_res_node(),
        prop::sample::subsequence(OTHER_NAMES, 0..3),
        prop::collection::vec(gen_res_node(), 3),
    )
        .prop_map(
            move |(prefix, shared, provname, local, me_name, mut me, others, other_blocks)| {
                // Provider names must be unique across resources.
                let unique = |tag: &str| format!("dev-{index}-{tag}");
                if me.name.is_some() {
                    me.name = Some(unique("node"));
                }
                if me.local.is_none() && local.is_none() {
                    me.local = Some(format!("/dev/r{index}"));
                }
                let others = others
                    .into_iter()
                    .zip(other_blocks)
                    .map(|(name, mut block)| {
                        block.name = block.name.map(|_| unique("other"));
                        (name.to_string(), block)
                    })
                    .collect();
                GenResource {
                    name: format!("{prefix}{index}"),
                    shared,
                    provname: provname.then(|| unique("res")),
                    local,
                    me_name: me_name.to_string(),
                    me,
                    others,
                }
            },
        )
}

impl GenResource {
    fn statements(&self, order: &mut Shuffler) -> Vec<Stmt> {
        let mut body = self.shared.statements();
        opt_kv(&mut body, "name", &self.provname);
        opt_kv(&mut body, "local", &self.local);
        body.push(block("on", &self.me_name, self.me.statements(), order));
        for (name, node) in &self.others {
            body.push(block("on", name, node.statements(), order));
        }
        body
    }

    fn expected(&self, global: &GenShared) -> ResourceConfig {
        let me = &self.me;
        ResourceConfig {
            name: self.name.clone(),
            provname: me
                .name
                .clone()
                .or_else(|| self.provname.clone())
                .unwrap_or_else(|| self.name.clone()),
            localpath: PathBuf::from(me.local.clone().or_else(|| self.local.clone()).unwrap()),
            remote: me.remote.as_ref().map(|a| a.expected.clone()),
            // Without a port, a source address means any local port.
            source: me.source.as_ref().map(|a| PeerAddr {
                port: if a.explicit_port { a.expected.port } else { 0 },
                ..a.expected.clone()
            }),
            replication: self
                .shared
                .replication
                .or(global.replication)
                .unwrap_or_default(),
            checksum: self.shared.checksum.or(global.checksum).unwrap_or_default(),
            compression: self
                .shared
                .compression
                .or(global.compression)
                .unwrap_or_default(),
            syncmode: Default::default(),
            timeout: Duration::from_secs(self.shared.timeout.or(global.timeout).unwrap_or(20)),
            exec: self
                .shared
                .exec
                .clone()
                .or_else(|| global.exec.clone())
                .map(PathBuf::from),
            metaflush: me
                .metaflush
                .or(self.shared.metaflush)
                .or(global.metaflush)
                .unwrap_or(true),
            splitbrain: crate::config::SplitBrainPolicy::Manual,
            node_name: self.me_name.clone(),
            secret: None,
            tls: None,
        }
    }
}

#[derive(Debug, Clone)]
struct GenConfig {
    daemon: GenDaemon,
    shared: GenShared,
    /// Global `on` block for this node (with its name), and one for another.
    on_me: Option<(String, GenDaemon)>,
    on_other: Option<(String, GenDaemon)>,
    resources: Vec<GenResource>,
}

fn gen_config() -> impl Strategy<Value = GenConfig> {
    (
        gen_daemon(),
        gen_shared(),
        prop::option::of((prop::sample::select(MY_NAMES), gen_daemon())),
        prop::option::of((prop::sample::select(OTHER_NAMES), gen_daemon())),
        (0usize..4).prop_flat_map(|n| (0..n).map(gen_resource).collect::<Vec<_>>()),
    )
        .prop_map(|(daemon, shared, on_me, on_other, resources)| GenConfig {
            daemon,
            shared,
            on_me: on_me.map(|(n, d)| (n.to_string(), d)),
            on_other: on_other.map(|(n, d)| (n.to_string(), d)),
            resources,
        })
        .prop_filter("listen addresses must be distinct", |c| {
            let mut all: Vec<String> = c
                .daemon
                .listen
                .iter()
                .map(|a| a.expected.to_string())
                .collect();
            if let Some((_, d)) = &c.on_me {
                all.extend(d.listen.iter().map(|a| a.expected.to_string()));
            }
            let n = all.len();
            all.sort();
            all.dedup();
            all.len() == n
        })
}

impl GenConfig {
    fn statements(&self, order: &mut Shuffler) -> Vec<Stmt> {
        let mut out = self.daemon.statements();
        out.extend(self.shared.statements());
        for (name, d) in self.on_me.iter().chain(&self.on_other) {
            out.push(block("on", name, d.statements(), order));
        }
        for r in &self.resources {
            let body = r.statements(order);
            out.push(block("resource", &r.name, body, order));
        }
        order.shuffle(&mut out);
        out
    }

    fn expected(&self) -> Config {
        let here = self.on_me.as_ref().map(|(_, d)| d);
        let pick = |f: fn(&GenDaemon) -> &Option<String>, default: &str| {
            here.and_then(|d| f(d).clone())
                .or_else(|| f(&self.daemon).clone())
                .unwrap_or_else(|| default.to_string())
        };
        let mut listen: Vec<PeerAddr> = self
            .daemon
            .listen
            .iter()
            .chain(here.into_iter().flat_map(|d| &d.listen))
            .map(|a| a.expected.clone())
            .collect();
        if listen.is_empty() {
            listen = resolve::default_listen();
        }
        Config {
            source: PathBuf::from("<gen>"),
            node: gen_node(),
            control: pick(|d| &d.control, DEFAULT_CONTROL).into(),
            pidfile: pick(|d| &d.pidfile, DEFAULT_PIDFILE).into(),
            listen,
            exportdir: pick(|d| &d.exportdir, DEFAULT_EXPORTDIR).into(),
            metrics: None,
            resources: self
                .resources
                .iter()
                .map(|r| r.expected(&self.shared))
                .collect(),
        }
    }
}

/// `keyword name { body }`, with the body statements shuffled.
fn block(keyword: &str, name: &str, mut body: Vec<Stmt>, order: &mut Shuffler) -> Stmt {
    order.shuffle(&mut body);
    let mut tokens = vec![keyword.to_string(), name.to_string(), "{".to_string()];
    tokens.extend(body.into_iter().flatten());
    tokens.push("}".to_string());
    tokens
}

/// Deterministic shuffling from a generated seed (xorshift64).
struct Shuffler(u64);

impl Shuffler {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// Joins tokens with the given separators (cycled). An empty separator is
/// only used next to a brace, where no whitespace is needed.
fn render(tokens: &[String], seps: &[&str]) -> String {
    let mut text = String::new();
    for (i, token) in tokens.iter().enumerate() {
        if i > 0 {
            let sep = seps[i % seps.len()];
            let brace = |t: &String| t == "{" || t == "}";
            if sep.is_empty() && !brace(token) && !brace(&tokens[i - 1]) {
                text.push(' ');
            } else {
                text.push_str(sep);
            }
        }
        text.push_str(token);
    }
    text
}

fn separators() -> impl Strategy<Value = Vec<&'static str>> {
    let one_line = Just(vec![" "]);
    let mixed = prop::collection::vec(
        prop::sample::select(vec![
            " ",
            "\n",
            "\t",
            "",
            "\r\n",
            "\n\n    ",
            "  # a comment { }\n",
            " #\n",
        ]),
        1..10,
    );
    prop_oneof![one_line, mixed]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generated_configs_resolve_to_the_expected_values(
        config in gen_config(),
        seed in 1u64..,
        seps in separators(),
    ) {
        let tokens: Vec<String> = config
            .statements(&mut Shuffler(seed))
            .into_iter()
            .flatten()
            .collect();
        let text = render(&tokens, &seps);
        let parsed = parse_str(&text, Path::new("<gen>"), &gen_node());
        let mut parsed = match parsed {
            Ok(c) => c,
            Err(e) => return Err(TestCaseError::fail(format!("{e}\n---\n{text}"))),
        };
        let mut expected = config.expected();
        // Listen entries and resources come in file order, which the
        // shuffle decides.
        let by_text = |a: &PeerAddr, b: &PeerAddr| a.to_string().cmp(&b.to_string());
        parsed.listen.sort_by(by_text);
        expected.listen.sort_by(by_text);
        let file_pos = |r: &ResourceConfig| {
            tokens.windows(3).position(|w| w[0] == "resource" && w[1] == r.name && w[2] == "{")
        };
        expected.resources.sort_by_key(|r| file_pos(r));
        prop_assert_eq!(parsed, expected, "\n---\n{}", text);
    }

    #[test]
    fn canonical_addresses_round_trip(addr in gen_addr()) {
        let parsed: PeerAddr = addr.text.parse().unwrap();
        prop_assert_eq!(&parsed, &addr.expected);
        prop_assert_eq!(parsed.to_string().parse::<PeerAddr>().unwrap(), parsed);
    }
}
