//! Unit tests of the whole pipeline through the public API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::resolve::MAX_RESOURCE_NAME;
use super::*;

/// A resource that every test node ("a" or "b") can resolve.
const MIN: &str =
    "resource r { on a { local /tmp/a remote 127.0.0.2 } on b { local /tmp/b remote 127.0.0.1 } }";

fn parse_as(text: &str, node: &NodeIdentity) -> Config {
    parse_str(text, Path::new("<string>"), node).unwrap_or_else(|e| panic!("{e}\n---\n{text}"))
}

fn parse(text: &str) -> Config {
    parse_as(text, &NodeIdentity::named("a"))
}

fn error_as(text: &str, node: &NodeIdentity) -> String {
    match parse_str(text, Path::new("/etc/hast.conf"), node) {
        Ok(cfg) => panic!("expected an error, got {cfg:?}\n---\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn error(text: &str) -> String {
    error_as(text, &NodeIdentity::named("a"))
}

fn addr(s: &str) -> PeerAddr {
    s.parse().unwrap()
}

fn only(cfg: &Config) -> &ResourceConfig {
    assert_eq!(cfg.resources.len(), 1);
    &cfg.resources[0]
}

// ---------------------------------------------------------------- defaults

#[test]
fn defaults() {
    let cfg = parse(MIN);
    assert_eq!(cfg.source, PathBuf::from("<string>"));
    assert_eq!(cfg.node, NodeIdentity::named("a"));
    assert_eq!(cfg.control, PathBuf::from("/var/run/hastctl"));
    assert_eq!(cfg.pidfile, PathBuf::from("/var/run/hastd.pid"));
    assert_eq!(
        cfg.listen,
        vec![addr("tcp4://0.0.0.0:8457"), addr("tcp6://[::]:8457")]
    );
    assert_eq!(cfg.exportdir, PathBuf::from("/run/hast"));
    assert_eq!(
        *only(&cfg),
        ResourceConfig {
            name: "r".into(),
            provname: "r".into(),
            localpath: "/tmp/a".into(),
            remote: Some(addr("tcp4://127.0.0.2:8457")),
            source: None,
            replication: Replication::MemSync,
            checksum: Checksum::None,
            compression: Compression::Hole,
            syncmode: crate::config::SyncMode::Auto,
            timeout: Duration::from_secs(20),
            exec: None,
            metaflush: true,
            splitbrain: crate::config::SplitBrainPolicy::Manual,
            node_name: "a".into(),
            secret: None,
            tls: None,
        }
    );
}

#[test]
fn empty_and_comment_only_files_are_valid() {
    for text in ["", "   \n\t\n", "# nothing here", "# a\n# b { }\n"] {
        let cfg = parse(text);
        assert!(cfg.resources.is_empty());
        assert_eq!(cfg.control, PathBuf::from(DEFAULT_CONTROL));
    }
}

// ------------------------------------------------------------------ layout

#[test]
fn one_line_resource_resolves_for_each_node() {
    let a = parse_as(MIN, &NodeIdentity::named("a"));
    let b = parse_as(MIN, &NodeIdentity::named("b"));
    assert_eq!(only(&a).localpath, PathBuf::from("/tmp/a"));
    assert_eq!(only(&a).remote, Some(addr("127.0.0.2")));
    assert_eq!(only(&a).node_name, "a");
    assert_eq!(only(&b).localpath, PathBuf::from("/tmp/b"));
    assert_eq!(only(&b).remote, Some(addr("127.0.0.1")));
    assert_eq!(only(&b).node_name, "b");
}

#[test]
fn braces_need_no_surrounding_whitespace() {
    let cfg = parse("resource r{on a{local /x remote none}}");
    assert_eq!(only(&cfg).localpath, PathBuf::from("/x"));
}

#[test]
fn comments_are_ignored_everywhere() {
    let text = "\
# hast.conf
timeout 5 # seconds
resource r { # the resource { with braces }
\ton a { # node a
\t\tlocal /dev/sdb# a comment right after a value: '#' ends the word
\t\tremote 10.0.0.2 }
}
# trailing comment without newline";
    let cfg = parse(text);
    let r = only(&cfg);
    assert_eq!(r.timeout, Duration::from_secs(5));
    assert_eq!(r.localpath, PathBuf::from("/dev/sdb"));
}

#[test]
fn keywords_can_be_names_and_values() {
    let text = "resource on { on on { local /dev/on name resource remote none } }";
    let cfg = parse_as(text, &NodeIdentity::named("on"));
    let r = only(&cfg);
    assert_eq!(r.name, "on");
    assert_eq!(r.provname, "resource");
    assert_eq!(r.localpath, PathBuf::from("/dev/on"));
    assert_eq!(r.remote, None);
    assert_eq!(r.node_name, "on");
}

// -------------------------------------------------------------- precedence

#[test]
fn resource_settings_override_global_ones() {
    let text = "
replication fullsync checksum crc32 compression lzf timeout 7 exec /bin/g metaflush off
resource r {
    replication async checksum none compression none timeout 9 exec /bin/r metaflush on
    syncmode full
    on a { local /x remote none }
}
resource s { on a { local /y remote none } }";
    let cfg = parse(text);
    let r = cfg.resource("r").unwrap();
    assert_eq!(r.replication, Replication::Async);
    assert_eq!(r.checksum, Checksum::None);
    assert_eq!(r.syncmode, crate::config::SyncMode::Full);
    assert_eq!(r.compression, Compression::None);
    assert_eq!(r.timeout, Duration::from_secs(9));
    assert_eq!(r.exec, Some(PathBuf::from("/bin/r")));
    assert!(r.metaflush);
    let s = cfg.resource("s").unwrap();
    assert_eq!(s.replication, Replication::FullSync);
    assert_eq!(s.checksum, Checksum::Crc32);
    assert_eq!(s.compression, Compression::Lzf);
    assert_eq!(s.syncmode, crate::config::SyncMode::Auto);
    assert_eq!(s.timeout, Duration::from_secs(7));
    assert_eq!(s.exec, Some(PathBuf::from("/bin/g")));
    assert!(!s.metaflush);
}

#[test]
fn node_settings_override_resource_ones() {
    let text = "
metaflush on
resource r {
    name res-dev local /dev/res metaflush on
    on a { name node-dev local /dev/node metaflush off remote none }
    on b { remote none }
}";
    let a = parse(text);
    let r = only(&a);
    assert_eq!(r.provname, "node-dev");
    assert_eq!(r.localpath, PathBuf::from("/dev/node"));
    assert!(!r.metaflush);
    let b = parse_as(text, &NodeIdentity::named("b"));
    let r = only(&b);
    assert_eq!(r.provname, "res-dev");
    assert_eq!(r.localpath, PathBuf::from("/dev/res"));
    assert!(r.metaflush);
}

#[test]
fn statement_order_does_not_matter() {
    let before = "replication async metaflush off control uds:///c
        resource r { timeout 3 on a { remote none } local /x }";
    let after = "resource r { on a { remote none } local /x timeout 3 }
        metaflush off control uds:///c replication async";
    let (x, y) = (parse(before), parse(after));
    assert_eq!(x, y);
    let r = only(&x);
    assert_eq!(r.replication, Replication::Async);
    assert!(!r.metaflush);
    assert_eq!(r.timeout, Duration::from_secs(3));
    assert_eq!(x.control, PathBuf::from("/c"));
}

#[test]
fn global_on_block_overrides_for_the_matching_node_only() {
    let text = "
control uds:///run/g.sock pidfile /run/g.pid exportdir /run/g
on a { control uds:///run/a.sock pidfile /run/a.pid exportdir /run/a }
on b { control uds:///run/b.sock }";
    let a = parse(text);
    assert_eq!(a.control, PathBuf::from("/run/a.sock"));
    assert_eq!(a.pidfile, PathBuf::from("/run/a.pid"));
    assert_eq!(a.exportdir, PathBuf::from("/run/a"));
    let b = parse_as(text, &NodeIdentity::named("b"));
    assert_eq!(b.control, PathBuf::from("/run/b.sock"));
    assert_eq!(b.pidfile, PathBuf::from("/run/g.pid"));
    assert_eq!(b.exportdir, PathBuf::from("/run/g"));
    let c = parse_as(text, &NodeIdentity::named("c"));
    assert_eq!(c.control, PathBuf::from("/run/g.sock"));
}

#[test]
fn exportdir_global_and_per_node() {
    assert_eq!(
        parse("exportdir /srv/hast").exportdir,
        PathBuf::from("/srv/hast")
    );
    assert_eq!(
        parse("on a { exportdir /srv/a }").exportdir,
        PathBuf::from("/srv/a")
    );
    assert_eq!(
        parse("on b { exportdir /srv/b }").exportdir,
        PathBuf::from(DEFAULT_EXPORTDIR)
    );
}

#[test]
fn listen_entries_accumulate_and_replace_the_defaults() {
    let cfg =
        parse("listen 127.0.0.1 on a { listen [::1]:9000 listen tcp://h:1 } listen 10.0.0.1:2");
    assert_eq!(
        cfg.listen,
        vec![
            addr("tcp4://127.0.0.1:8457"),
            addr("tcp6://[::1]:9000"),
            addr("tcp://h:1"),
            addr("tcp4://10.0.0.1:2"),
        ]
    );
    // Node-level entries alone also replace the defaults.
    assert_eq!(
        parse("on a { listen 127.0.0.1 }").listen,
        vec![addr("127.0.0.1")]
    );
    // Another node's entries do not count.
    assert_eq!(parse("on b { listen 127.0.0.1 }").listen.len(), 2);
}

// ---------------------------------------------------------- node matching

const NODES: &str = "resource r {
    on host.example.org { local /full remote none }
    on other { local /other remote none }
}";

#[test]
fn on_blocks_match_the_full_host_name() {
    let id = NodeIdentity::from_parts(Some("host.example.org"), Some("8f3c"));
    assert_eq!(
        only(&parse_as(NODES, &id)).localpath,
        PathBuf::from("/full")
    );
}

#[test]
fn on_blocks_match_the_short_host_name() {
    let text = NODES.replace("host.example.org", "host");
    let id = NodeIdentity::from_parts(Some("host.example.org"), Some("8f3c"));
    let cfg = parse_as(&text, &id);
    assert_eq!(only(&cfg).localpath, PathBuf::from("/full"));
    assert_eq!(only(&cfg).node_name, "host");
}

#[test]
fn on_blocks_match_the_machine_id() {
    let text = NODES.replace("host.example.org", "8f3c");
    let id = NodeIdentity::from_parts(Some("elsewhere"), Some("8f3c\n"));
    assert_eq!(only(&parse_as(&text, &id)).node_name, "8f3c");
}

#[test]
fn an_explicit_node_name_is_the_only_one_used() {
    // Overriding with "other" selects that block even though the host name
    // would match another one...
    let id = NodeIdentity::resolve(Some("other"));
    assert_eq!(
        only(&parse_as(NODES, &id)).localpath,
        PathBuf::from("/other")
    );
    // ...and the host's own names no longer match.
    let text = NODES.replace("host.example.org", "host");
    let err = error_as(&text, &NodeIdentity::named("host.example.org"));
    assert!(err.contains("this node is: host.example.org;"), "{err}");
}

#[test]
fn missing_on_block_error_names_the_node_and_the_declared_blocks() {
    let id = NodeIdentity::from_parts(Some("host.example"), Some("8f3c"));
    let text = "\n\n  resource disk1 {\n on alpha { local /a remote none }\n on beta { local /b remote none } }";
    assert_eq!(
        error_as(text, &id),
        "/etc/hast.conf:3:3: resource \"disk1\" has no 'on' block for this node \
         (this node is: host.example, host, 8f3c; the resource declares: alpha, beta)"
    );
    assert_eq!(
        error("resource r { local /x }"),
        "/etc/hast.conf:1:1: resource \"r\" has no 'on' block for this node \
         (this node is: a; the resource declares: no 'on' blocks)"
    );
}

#[test]
fn two_blocks_matching_this_node_are_rejected() {
    let id = NodeIdentity::from_parts(Some("host.example"), None);
    let text = "resource r { on host { remote none } on host.example { remote none } local /x }";
    assert_eq!(
        error_as(text, &id),
        "/etc/hast.conf:1:38: both 'on host' (at 1:14) and 'on host.example' match this node \
         (host.example, host); keep only one"
    );
    let text = "on host { } on host.example { }";
    assert!(error_as(text, &id).starts_with("/etc/hast.conf:1:13: both 'on host'"));
}

// ------------------------------------------------------- required settings

#[test]
fn local_is_required_for_this_node() {
    assert_eq!(
        error("resource r {\n on a { remote none }\n on b { local /b remote none } }"),
        "/etc/hast.conf:2:2: resource \"r\" has no 'local' path for node 'a' \
         (set 'local' in the resource block or in its 'on a' block)"
    );
    // At resource level it is enough; the other node's block is not checked.
    let cfg = parse("resource r { local /x on a { remote none } on b { } }");
    assert_eq!(only(&cfg).localpath, PathBuf::from("/x"));
}

#[test]
fn remote_is_required_in_this_nodes_block() {
    assert_eq!(
        error("resource r { local /x on a { } }"),
        "/etc/hast.conf:1:23: resource \"r\": block 'on a' has no 'remote' address \
         (use 'remote none' for a node without a peer)"
    );
}

#[test]
fn remote_none_means_no_peer_and_source_is_optional() {
    let cfg = parse("resource r { on a { local /x remote none source none } }");
    assert_eq!(only(&cfg).remote, None);
    assert_eq!(only(&cfg).source, None);
    let cfg = parse("resource r { on a { local /x remote 127.0.0.2 source 127.0.0.1 } }");
    // The source port defaults to 0: any local port.
    assert_eq!(
        only(&cfg).source,
        Some(addr("tcp4://127.0.0.1:1")).map(|a| PeerAddr { port: 0, ..a })
    );
    let cfg = parse("resource r { on a { local /x remote 127.0.0.2 source [::1]:7 } }");
    assert_eq!(only(&cfg).source, Some(addr("tcp6://[::1]:7")));
}

// --------------------------------------------------------------- duplicates

#[test]
fn duplicate_statements_are_rejected_at_every_level() {
    assert_eq!(
        error("timeout 1\ntimeout 2"),
        "/etc/hast.conf:2:1: duplicate 'timeout' statement in global section (first given at 1:1)"
    );
    assert_eq!(
        error("on a { pidfile /a pidfile /b }"),
        "/etc/hast.conf:1:19: duplicate 'pidfile' statement in global 'on' block (first given at 1:8)"
    );
    assert_eq!(
        error("resource r { exec /a exec /b on a { local /x remote none } }"),
        "/etc/hast.conf:1:22: duplicate 'exec' statement in resource block (first given at 1:14)"
    );
    assert_eq!(
        error("resource r { on a { local /x remote none remote none } }"),
        "/etc/hast.conf:1:42: duplicate 'remote' statement in resource 'on' block (first given at 1:30)"
    );
    // Also in a block for another node.
    assert!(
        error("resource r { on a { local /x remote none } on b { name x name y } }")
            .contains("duplicate 'name' statement")
    );
}

#[test]
fn duplicate_resources_blocks_and_listen_addresses_are_rejected() {
    assert_eq!(
        error(&format!("{MIN}\n{MIN}")),
        "/etc/hast.conf:2:1: duplicate resource \"r\" (first defined at 1:1)"
    );
    assert_eq!(
        error("resource r { on a { local /x remote none } on a { } }"),
        "/etc/hast.conf:1:44: duplicate 'on a' block (first given at 1:14)"
    );
    assert_eq!(
        error("on b { } on b { }"),
        "/etc/hast.conf:1:10: duplicate 'on b' block (first given at 1:1)"
    );
    assert_eq!(
        error("listen 127.0.0.1 on a { listen tcp4://127.0.0.1:8457 }"),
        "/etc/hast.conf:1:25: listen address tcp4://127.0.0.1:8457 is given twice (first at 1:1)"
    );
}

#[test]
fn provider_names_must_be_unique_and_valid() {
    assert_eq!(
        error(
            "resource r { on a { local /x remote none } }\n\
             resource s { name r on a { local /y remote none } }"
        ),
        "/etc/hast.conf:2:1: resource \"s\" uses provider name 'r', which resource \"r\" already uses"
    );
    assert_eq!(
        error("resource r { name a/b on a { local /x remote none } }"),
        "/etc/hast.conf:1:19: provider name 'a/b' is not a valid device name (no '/', '.' or '..')"
    );
    // A resource name that cannot be a device name needs a 'name'.
    assert!(error("resource .. { on a { local /x remote none } }").contains("provider name '..'"));
    let cfg = parse("resource a/b { name ab on a { local /x remote none } }");
    assert_eq!(only(&cfg).provname, "ab");
    assert_eq!(
        error("resource all { on a { local /x remote none } }"),
        "/etc/hast.conf:1:10: resource name 'all' is reserved (it means every resource)"
    );
}

// ------------------------------------------------------ levels and syntax

#[test]
fn per_node_replication_settings_are_rejected() {
    for key in [
        "replication async",
        "checksum crc32",
        "compression lzf",
        "timeout 5",
        "exec /x",
    ] {
        let text = format!("resource r {{ local /x on a {{ remote none {key} }} }}");
        let word = key.split(' ').next().unwrap();
        assert_eq!(
            error(&text),
            format!(
                "/etc/hast.conf:1:42: '{word}' is not allowed in a resource 'on' block: it cannot \
                 be set per node; set it in the resource block or the global section"
            )
        );
        let text = format!("on a {{ {key} }}");
        assert!(
            error(&text).contains("is not allowed in a global 'on' block"),
            "{text}"
        );
    }
}

#[test]
fn misplaced_statements_say_where_they_belong() {
    assert_eq!(
        error("local /x"),
        "/etc/hast.conf:1:1: 'local' is not allowed in a global section: \
         it belongs in a resource block or a resource's 'on' block"
    );
    assert_eq!(
        error("resource r { remote none }"),
        "/etc/hast.conf:1:14: 'remote' is not allowed in a resource block: \
         it belongs in a resource's 'on' block"
    );
    assert_eq!(
        error("resource r { listen 1.2.3.4 }"),
        "/etc/hast.conf:1:14: 'listen' is not allowed in a resource block: \
         it belongs in the global section or a global 'on' block"
    );
    assert_eq!(
        error("on a { metaflush off }"),
        "/etc/hast.conf:1:8: 'metaflush' is not allowed in a global 'on' block: \
         it belongs in the global section, a resource block or a resource's 'on' block"
    );
    assert_eq!(
        error("resource r { resource s { } }"),
        "/etc/hast.conf:1:14: 'resource' is not allowed in a resource block: \
         resource blocks belong in the global section"
    );
    assert_eq!(
        error("on a { on b { } }"),
        "/etc/hast.conf:1:8: 'on' blocks cannot be nested: found 'on' in a global 'on' block"
    );
}

#[test]
fn syntax_errors_say_what_was_expected_and_found() {
    let cases = [
        (
            "resource r {\n  on a {\n    remote none\n    local }\n  }\n}",
            "/etc/hast.conf:4:11: expected a value after 'local', found '}'",
        ),
        ("timeout", "/etc/hast.conf:1:8: expected a value after 'timeout', found end of file"),
        ("foo bar", "/etc/hast.conf:1:1: unknown statement 'foo' in global section"),
        (
            "resource r { foo bar }",
            "/etc/hast.conf:1:14: unknown statement 'foo' in resource block",
        ),
        (
            "resource r { on a { Local /x } }",
            "/etc/hast.conf:1:21: unknown statement 'Local' in resource 'on' block",
        ),
        ("resource { }", "/etc/hast.conf:1:10: expected a resource name after 'resource', found '{'"),
        ("on { }", "/etc/hast.conf:1:4: expected a node name after 'on', found '{'"),
        ("resource r local /x", "/etc/hast.conf:1:12: expected '{' after 'resource r', found 'local'"),
        ("on a", "/etc/hast.conf:1:5: expected '{' after 'on a', found end of file"),
        (
            "resource r {\n on a { local /x\n",
            "/etc/hast.conf:3:1: expected '}' to close the 'on a' block opened at 2:2, found end of file",
        ),
        (
            "resource r { on a { local /x remote none }",
            "/etc/hast.conf:1:43: expected '}' to close the 'resource r' block opened at 1:1, found end of file",
        ),
        ("}", "/etc/hast.conf:1:1: unexpected '}': there is no open block to close"),
        ("{", "/etc/hast.conf:1:1: expected a statement in global section, found '{'"),
        (
            "resource r { { } }",
            "/etc/hast.conf:1:14: expected a statement in resource block, found '{'",
        ),
        ("pidfile \"/x\"", "/etc/hast.conf:1:9: unexpected character '\"' (values are not quoted)"),
        ("exec /bin/a;b", "/etc/hast.conf:1:12: unexpected character ';'"),
    ];
    for (text, expected) in cases {
        assert_eq!(error(text), expected, "{text}");
    }
}

// ------------------------------------------------------------------ values

#[test]
fn value_errors_point_at_the_value() {
    let cases = [
        ("timeout 0", "1:9: timeout must be greater than 0 seconds"),
        ("timeout 1.5", "1:9: expected a whole number of seconds after 'timeout', found '1.5'"),
        ("timeout -1", "1:9: expected a whole number of seconds after 'timeout', found '-1'"),
        (
            "timeout 99999999999999999999",
            "1:9: timeout '99999999999999999999' is too large (at most 2147483647 seconds)",
        ),
        ("metaflush yes", "1:11: expected 'on' or 'off' after 'metaflush', found 'yes'"),
        (
            "replication sync",
            "1:13: unknown replication mode 'sync' (expected fullsync, memsync or async)",
        ),
        ("checksum md5", "1:10: unknown checksum algorithm 'md5' (expected none or crc32)"),
        (
            "checksum sha256",
            "1:10: checksum sha256 is not supported: every replicated frame already carries a \
             crc32c of its payload, checked before the data is used (use 'checksum crc32' or \
             'none'); to compare the nodes' data end to end with SHA-256, run \
             'hastctl verify --algorithm sha256'",
        ),
        ("compression gzip", "1:13: unknown compression algorithm 'gzip' (expected none, hole, lzf or lz4)"),
        ("syncmode fast", "1:10: unknown syncmode 'fast' (expected auto, full or checksum)"),
        (
            "\n  control tcp://127.0.0.1:8457",
            "2:11: only uds:// control addresses are supported, found 'tcp://127.0.0.1:8457'",
        ),
        (
            "control /var/run/hastctl",
            "1:9: only uds:// control addresses are supported, found '/var/run/hastctl'",
        ),
        (
            "listen 10.0.0.1:99999",
            "1:8: invalid address '10.0.0.1:99999': invalid port '99999' (expected a number from 1 to 65535)",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(error(text), format!("/etc/hast.conf:{expected}"), "{text}");
    }
    let text = "resource r { on a { local /x remote tcp4://[::1]:1 } }";
    assert_eq!(
        error(text),
        "/etc/hast.conf:1:37: invalid address 'tcp4://[::1]:1': tcp4:// cannot be used with IPv6 address ::1"
    );
}

#[test]
fn timeout_accepts_positive_seconds() {
    let cfg = parse(&format!("timeout 1 {MIN}"));
    assert_eq!(only(&cfg).timeout, Duration::from_secs(1));
    let cfg = parse(&format!("timeout {MAX_TIMEOUT_SECS} {MIN}"));
    assert_eq!(only(&cfg).timeout, Duration::from_secs(MAX_TIMEOUT_SECS));
}

#[test]
fn remote_address_forms() {
    let cases = [
        (
            "tcp4://127.0.0.2",
            PeerAddr::new(Scheme::Tcp4, "127.0.0.2", 8457),
        ),
        (
            "tcp4://127.0.0.2:9000",
            PeerAddr::new(Scheme::Tcp4, "127.0.0.2", 9000),
        ),
        ("127.0.0.2", PeerAddr::new(Scheme::Tcp4, "127.0.0.2", 8457)),
        ("127.0.0.2:1", PeerAddr::new(Scheme::Tcp4, "127.0.0.2", 1)),
        (
            "tcp6://[::1]:8458",
            PeerAddr::new(Scheme::Tcp6, "::1", 8458),
        ),
        ("[fe80::1]", PeerAddr::new(Scheme::Tcp6, "fe80::1", 8457)),
        ("tcp://[::1]", PeerAddr::new(Scheme::Tcp, "::1", 8457)),
        ("hostb", PeerAddr::new(Scheme::Tcp, "hostb", 8457)),
        (
            "hostb.example.org:7",
            PeerAddr::new(Scheme::Tcp, "hostb.example.org", 7),
        ),
        ("tcp6://hostb", PeerAddr::new(Scheme::Tcp6, "hostb", 8457)),
    ];
    for (text, expected) in cases {
        let cfg = parse(&format!(
            "resource r {{ on a {{ local /x remote {text} }} }}"
        ));
        assert_eq!(only(&cfg).remote.as_ref(), Some(&expected), "{text}");
    }
    assert_eq!(
        PeerAddr::new(Scheme::Tcp4, "127.0.0.2", 8457).to_string(),
        "tcp4://127.0.0.2:8457"
    );
    let err = error("resource r { on a { local /x remote 127.0.0.2:0 } }");
    assert_eq!(
        err,
        "/etc/hast.conf:1:37: invalid address '127.0.0.2:0': invalid port '0' (expected a number from 1 to 65535)"
    );
}

#[test]
fn control_takes_a_uds_path() {
    assert_eq!(
        parse("control uds:///tmp/hast/ctl").control,
        PathBuf::from("/tmp/hast/ctl")
    );
}

#[test]
fn value_enums_display_and_parse_their_keywords() {
    for r in Replication::ALL {
        assert_eq!(r.to_string().parse::<Replication>(), Ok(*r));
    }
    for c in Checksum::ALL {
        assert_eq!(c.to_string().parse::<Checksum>(), Ok(*c));
    }
    for c in Compression::ALL {
        assert_eq!(c.to_string().parse::<Compression>(), Ok(*c));
    }
    assert_eq!(Replication::FullSync.to_string(), "fullsync");
    assert_eq!(Replication::MemSync.to_string(), "memsync");
    assert_eq!(Replication::Async.to_string(), "async");
    assert_eq!(Checksum::Crc32.to_string(), "crc32");
    assert_eq!(Compression::Lzf.to_string(), "lzf");
    assert!("MEMSYNC".parse::<Replication>().is_err());
}

// ------------------------------------------------------------- selection

#[test]
fn select_all_names_and_unknown() {
    let text = "resource r1 { on a { local /1 remote none } }
                resource r2 { on a { local /2 remote none } }
                resource r3 { on a { local /3 remote none } }";
    let cfg = parse(text);
    let names = |sel: Vec<&ResourceConfig>| sel.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        names(cfg.select(&args(&["all"])).unwrap()),
        ["r1", "r2", "r3"]
    );
    assert_eq!(
        names(cfg.select(&args(&["r3", "all"])).unwrap()),
        ["r1", "r2", "r3"]
    );
    assert_eq!(
        names(cfg.select(&args(&["r3", "r1", "r3"])).unwrap()),
        ["r3", "r1"]
    );
    assert!(cfg.select(&[]).unwrap().is_empty());
    let err = cfg.select(&args(&["r2", "x", "y"])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "<string>: unknown resources \"x\", \"y\" (configured: r1, r2, r3)"
    );
    assert_eq!(err.position(), None);
    let err = cfg.select(&args(&["x"])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "<string>: unknown resource \"x\" (configured: r1, r2, r3)"
    );
    assert_eq!(cfg.resource("r2").unwrap().localpath, PathBuf::from("/2"));
    assert!(cfg.resource("r4").is_none());
}

// ------------------------------------------------------------ files, serde

#[test]
fn load_reads_a_file_and_names_it_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hast.conf");
    std::fs::write(&path, MIN).unwrap();
    let cfg = load(&path, &NodeIdentity::named("b")).unwrap();
    assert_eq!(cfg.source, path);
    assert_eq!(only(&cfg).localpath, PathBuf::from("/tmp/b"));

    std::fs::write(&path, "timeout 0\n").unwrap();
    let err = load(&path, &NodeIdentity::named("b")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}:1:9: timeout must be greater than 0 seconds",
            path.display()
        )
    );
    assert_eq!(err.position(), Some((1, 9)));

    let missing = dir.path().join("missing.conf");
    let err = load(&missing, &NodeIdentity::named("b")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("cannot read {}: ", missing.display())),
        "{shown}"
    );
}

#[test]
fn invalid_utf8_is_reported_at_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hast.conf");
    std::fs::write(&path, b"# caf\xc3\xa9\nexec /x\xff\n").unwrap();
    let err = load(&path, &NodeIdentity::named("a")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}:2:8: the file is not valid UTF-8", path.display())
    );
}

#[test]
fn config_serializes_for_status_output() {
    let text = "resource r { exec /bin/x on a { local /tmp/a remote tcp6://[::1] } }";
    let json = serde_json::to_value(parse(text)).unwrap();
    let expected = serde_json::json!({
        "source": "<string>",
        "node": ["a"],
        "control": "/var/run/hastctl",
        "pidfile": "/var/run/hastd.pid",
        "listen": ["tcp4://0.0.0.0:8457", "tcp6://[::]:8457"],
        "exportdir": "/run/hast",
        "metrics": null,
        "resources": [{
            "name": "r",
            "provname": "r",
            "localpath": "/tmp/a",
            "remote": "tcp6://[::1]:8457",
            "source": null,
            "replication": "memsync",
            "checksum": "none",
            "compression": "hole",
            "syncmode": "auto",
            "timeout": 20,
            "exec": "/bin/x",
            "metaflush": true,
            "splitbrain": "manual",
            "secret": null,
            "tls": null,
            "node_name": "a",
        }],
    });
    assert_eq!(json, expected);
}

// --------------------------------------------------------------- the docs

/// Every ```` ```conf nodes=a,b ```` block of docs/hast.conf.md must resolve
/// for each listed node.
#[test]
fn documentation_examples_parse() {
    let doc = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/hast.conf.md"));
    let mut checked = 0;
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(nodes) = line.strip_prefix("```conf nodes=") else {
            continue;
        };
        let text: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        let text = text.join("\n");
        for node in nodes.split(',') {
            parse_as(&text, &NodeIdentity::named(node.trim()));
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "only {checked} documentation examples checked"
    );
}

#[test]
fn exec_must_be_an_absolute_path() {
    let text = "exec hook.sh\nresource r { on a { local /tmp/a remote none } }";
    let e = parse_str(text, Path::new("hast.conf"), &NodeIdentity::named("a")).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("hast.conf:1:6:"), "{msg}");
    assert!(msg.contains("absolute path"), "{msg}");
}

fn error_of(text: &str) -> String {
    parse_str(text, Path::new("hast.conf"), &NodeIdentity::named("a"))
        .unwrap_err()
        .to_string()
}

#[test]
fn local_must_be_an_absolute_path() {
    let msg = error_of("resource r {\n on a { local disk.img remote none } }");
    assert!(msg.starts_with("hast.conf:2:15:"), "{msg}");
    assert!(
        msg.contains("absolute path") && msg.contains("disk.img"),
        "{msg}"
    );
}

#[test]
fn overlong_resource_names_are_rejected_where_written() {
    let name = "r".repeat(1 << 20);
    let msg = error_of(&format!(
        "resource {name} {{ on a {{ local /tmp/a remote none }} }}"
    ));
    assert!(msg.starts_with("hast.conf:1:10:"), "{}", &msg[..200]);
    assert!(
        msg.contains("1048576 bytes long; at most 127"),
        "{}",
        &msg[..200]
    );
    assert!(msg.len() < 300, "the message does not repeat the name");
    // 127 is fine (with a short device name: the export socket's path
    // must fit too).
    let ok = format!(
        "resource {} {{ name p on a {{ local /tmp/a remote none }} }}",
        "r".repeat(MAX_RESOURCE_NAME)
    );
    parse_as(&ok, &NodeIdentity::named("a"));
}

#[test]
fn export_socket_paths_must_fit_in_sun_path() {
    let name = "x".repeat(120);
    let msg = error_of(&format!(
        "resource {name} {{ on a {{ local /tmp/a remote none }} }}"
    ));
    assert!(msg.starts_with("hast.conf:1:10:"), "{msg}");
    assert!(
        msg.contains("export socket /run/hast/") && msg.contains("at most 107 bytes"),
        "{msg}"
    );
    // Reported at the `name` statement when that is what makes it long.
    let msg = error_of(&format!(
        "resource r {{\n name {name}\n on a {{ local /tmp/a remote none }} }}"
    ));
    assert!(msg.starts_with("hast.conf:2:7:"), "{msg}");
    let msg = error_of(&format!(
        "control uds:///{}\nresource r {{ on a {{ local /tmp/a remote none }} }}",
        "c".repeat(110)
    ));
    assert!(msg.starts_with("hast.conf:1:1:"), "{msg}");
    assert!(msg.contains("control socket"), "{msg}");
}

#[test]
fn metrics_listen_is_off_by_default_and_takes_an_address() {
    let base = "resource r { on a { local /tmp/a remote none } }";
    assert_eq!(parse(base).metrics, None);
    let c = parse(&format!("metrics listen tcp://127.0.0.1\n{base}"));
    assert_eq!(
        c.metrics.map(|a| a.to_string()).as_deref(),
        Some("tcp://127.0.0.1:9942")
    );
    let c = parse(&format!(
        "metrics listen 127.0.0.1:9000\non a {{ metrics listen 127.0.0.2:9001 }}\n{base}"
    ));
    assert_eq!(
        c.metrics.map(|a| a.to_string()).as_deref(),
        Some("tcp4://127.0.0.2:9001")
    );
    let c = parse(&format!("metrics none\n{base}"));
    assert_eq!(c.metrics, None);
    let msg = error_of(&format!("metrics 127.0.0.1\n{base}"));
    assert!(
        msg.starts_with("hast.conf:1:9:") && msg.contains("'listen <address>'"),
        "{msg}"
    );
    let msg = error_of(&format!(
        "resource q {{ metrics none on a {{ local /q remote none }} }}\n{base}"
    ));
    assert!(
        msg.contains("'metrics' is not allowed in a resource block"),
        "{msg}"
    );
}

// ---------------------------------------------------------------- security

fn secret_of(text: &str) -> Option<SecretSource> {
    only(&parse(text)).secret.as_ref().map(|l| l.value.clone())
}

const S16: &str = "0123456789abcdef";

#[test]
fn secret_precedence_resource_node_over_resource_over_global_node_over_global() {
    let r = |res: &str, node: &str| {
        format!("resource r {{ {res} on a {{ local /tmp/a remote 127.0.0.2 {node} }} on b {{ local /tmp/b remote 127.0.0.1 }} }}")
    };
    assert_eq!(secret_of(&r("", "")), None);
    let g = format!("secret global{S16}\n");
    assert_eq!(
        secret_of(&format!("{g}{}", r("", ""))),
        Some(SecretSource::Inline(format!("global{S16}")))
    );
    let gn = format!("{g}on a {{ secretfile /etc/hast/a.key }}\n");
    assert_eq!(
        secret_of(&format!("{gn}{}", r("", ""))),
        Some(SecretSource::File("/etc/hast/a.key".into()))
    );
    let res = format!("secret res{S16}");
    assert_eq!(
        secret_of(&format!("{gn}{}", r(&res, ""))),
        Some(SecretSource::Inline(format!("res{S16}")))
    );
    assert_eq!(
        secret_of(&format!("{gn}{}", r(&res, "secretfile /etc/hast/r.key"))),
        Some(SecretSource::File("/etc/hast/r.key".into()))
    );
    // `secret none` at a more specific level turns an inherited one off.
    assert_eq!(secret_of(&format!("{gn}{}", r("secret none", ""))), None);
    // The line and column of the statement come along (for file errors).
    let cfg = parse(&format!("{g}{}", r("", "")));
    let l = only(&cfg).secret.as_ref().unwrap();
    assert_eq!((l.line, l.column), (1, 1));
    // Never printed.
    assert!(!format!("{cfg:?}").contains(S16));
    assert!(!serde_json::to_string(&cfg).unwrap().contains(S16));
}

#[test]
fn secret_errors() {
    let e = error(&format!("secret short\n{MIN}"));
    assert!(
        e.contains("1:8: a secret must be 16 to 4096 characters"),
        "{e}"
    );
    let e = error(&format!("secret {S16}\nsecretfile /k\n{MIN}"));
    assert!(
        e.contains("2:1: both 'secret' (at 1:1) and 'secretfile' (at 2:1)"),
        "{e}"
    );
    let e = error(&format!("secretfile k.key\n{MIN}"));
    assert!(e.contains("'secretfile' needs an absolute path"), "{e}");
    let e = error(&format!("secret {S16}\nsecret {S16}x\n{MIN}"));
    assert!(e.contains("duplicate 'secret'"), "{e}");
}

#[test]
fn tls_settings() {
    let files = "tlscert /etc/hast/c.pem tlskey /etc/hast/k.pem tlsca /etc/hast/ca.pem";
    let cfg = parse(&format!("{files}\n{MIN}"));
    assert_eq!(only(&cfg).tls, None, "tls is off by default");
    let cfg = parse(&format!("tls on\n{files}\n{MIN}"));
    let t = only(&cfg).tls.clone().unwrap();
    assert_eq!(t.cert.value, PathBuf::from("/etc/hast/c.pem"));
    assert_eq!(t.ca.value, PathBuf::from("/etc/hast/ca.pem"));
    // Per node certificates in the resource's 'on' block win.
    let cfg = parse(&format!(
        "tls on\n{files}\nresource r {{ on a {{ local /tmp/a remote 127.0.0.2 tlscert /etc/hast/a.pem }} on b {{ local /tmp/b remote 127.0.0.1 }} }}"
    ));
    assert_eq!(
        only(&cfg).tls.as_ref().unwrap().cert.value,
        PathBuf::from("/etc/hast/a.pem")
    );
    let e = error(&format!("tls on\ntlscert /c\n{MIN}"));
    assert!(
        e.contains("'tls on' needs") && e.contains("missing: tlskey, tlsca"),
        "{e}"
    );
    let e = error(&format!("tls maybe\n{MIN}"));
    assert!(e.contains("expected 'on' or 'off' after 'tls'"), "{e}");
    let e = error(&format!("tlsca ca.pem\n{MIN}"));
    assert!(e.contains("'tlsca' needs an absolute path"), "{e}");
    // A resource can turn it off again.
    let cfg = parse(&format!(
        "tls on\n{files}\nresource r {{ tls off on a {{ local /tmp/a remote 127.0.0.2 }} on b {{ local /tmp/b remote 127.0.0.1 }} }}"
    ));
    assert_eq!(only(&cfg).tls, None);
}
