//! What an administrator sees: configuration checks, create/dump checks and
//! refusals, with messages that name the file, line and resource.

use std::process::Command;

use hast_tests::*;

const MIB: u64 = 1 << 20;

fn hastd_check(conf: &str, node: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir_in(test_root()).expect("tmp");
    let path = dir.path().join("hast.conf");
    std::fs::write(&path, conf).expect("write conf");
    let out = Command::new(bin_dir().join("hastd"))
        .arg("-c")
        .arg(&path)
        .arg("-t")
        .arg("--node")
        .arg(node)
        .output()
        .expect("run hastd");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn hastd_t_accepts_a_one_line_resource() {
    let (code, out, err) = hastd_check(
        "resource r { on a { local /tmp/x remote 127.0.0.2 source 127.0.0.1 } on b { local /tmp/y remote 127.0.0.1 } }",
        "a",
    );
    assert_eq!(code, 0, "stderr: {err}");
    assert!(
        out.contains("configuration OK") && out.contains("1 resource(s): r"),
        "{out}"
    );
}

#[test]
fn hastd_t_reports_syntax_errors_with_position() {
    let (code, _, err) = hastd_check("resource r {\n  on a {\n    local\n  }\n}\n", "a");
    assert_ne!(code, 0);
    assert!(
        err.contains("hast.conf:4:"),
        "error names file and line: {err}"
    );
    assert!(err.contains("local"), "{err}");
}

#[test]
fn hastd_t_lists_node_names_when_no_on_block_matches() {
    let (code, _, err) = hastd_check(
        "resource r { on alpha { local /a remote none } on beta { local /b remote none } }",
        "gamma",
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("alpha") && err.contains("beta") && err.contains("gamma"),
        "{err}"
    );
}

#[test]
fn hastd_t_rejects_per_node_replication() {
    let (code, _, err) = hastd_check(
        "resource r { on a { local /a remote none replication async } }",
        "a",
    );
    assert_ne!(code, 0);
    assert!(err.contains("replication"), "{err}");
}

#[test]
fn create_rejects_bad_parameters_and_changes_nothing() {
    let node = TestNode::standalone(vec![ResourceDef::file("r1", 8 * MIB)]);
    let before = read_file(&node.provider("r1"));
    let out = node.hastctl_output(&["create", "-e", "1000", "r1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[r1]") && err.contains("multiple"), "{err}");
    let out = node.hastctl_output(&["create", "-m", "1G", "r1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("larger than provider"));
    let out = node.hastctl_output(&["create", "-e", "2Q", "r1"]);
    assert!(!out.status.success());
    let out = node.hastctl_output(&["create", "nosuch"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown resource 'nosuch'"));
    assert!(
        read_file(&node.provider("r1")) == before,
        "failed create wrote to the provider"
    );
}

#[test]
fn create_with_options_and_dump() {
    let node = TestNode::standalone(vec![ResourceDef::file("r1", 64 * MIB)]);
    node.hastctl(&["create", "-e", "1M", "-k", "8", "-m", "32M", "r1"]);
    let text = node.hastctl(&["dump", "r1"]);
    let expected = [
        "resource: r1",
        "    extentsize: 1048576 (1.0MB)",
        "    keepdirty: 8",
        "    resuid: 0",
        "    localcnt: 0",
        "    remotecnt: 0",
        "    prevrole: init",
        "    dirty: 0 extents, 0 (0B)",
    ];
    for line in expected {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    let d = node.dump("r1");
    assert!(d["datasize"].as_u64().unwrap() < 32 * MIB);
    assert!(d["datasize"].as_u64().unwrap() > 31 * MIB);
}

#[test]
fn dump_of_an_uninitialised_provider_is_a_clear_error() {
    let node = TestNode::standalone(vec![ResourceDef::file("r1", 8 * MIB)]);
    let out = node.hastctl_output(&["dump", "r1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no HAST metadata") && err.contains("hastctl create"),
        "{err}"
    );
}

#[test]
fn damaged_metadata_is_reported_not_repaired() {
    let node = TestNode::standalone(vec![ResourceDef::file("r1", 8 * MIB)]);
    node.create_all();
    let p = node.provider("r1");
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xff], 150).unwrap();
    let out = node.hastctl_output(&["dump", "r1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"));
    let after = read_file(&p);
    assert_eq!(after[150], 0xff, "nothing rewrote the block");
}

#[test]
fn a_provider_of_another_resource_is_refused() {
    let mut node = TestNode::standalone(vec![
        ResourceDef::file("r1", 8 * MIB),
        ResourceDef::file("r2", 8 * MIB),
    ]);
    node.create_all();
    // Point r2 at r1's provider.
    let p1 = node.provider("r1");
    node.resources[1].path = Some(p1);
    node.write_conf();
    node.start();
    let out = node.hastctl_output(&["role", "primary", "r2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to resource 'r1'"), "{err}");
    assert_eq!(node.list("r2")["role"], "init");
}

#[test]
fn create_is_refused_while_the_resource_is_active() {
    let mut node = TestNode::standalone(vec![ResourceDef::file("r1", 8 * MIB)]);
    node.create_all();
    node.start();
    node.role("primary", "r1");
    let out = node.hastctl_output(&["create", "r1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("role init r1"));
    node.hastctl(&["role", "init", "r1"]);
    node.hastctl(&["create", "r1"]);
}

#[test]
fn a_second_hastd_with_the_same_pidfile_is_refused() {
    let mut node = TestNode::standalone(vec![ResourceDef::file("r1", 8 * MIB)]);
    node.create_all();
    node.start();
    let out = Command::new(bin_dir().join("hastd"))
        .arg("-F")
        .arg("-c")
        .arg(&node.conf)
        .arg("--node")
        .arg(&node.name)
        .output()
        .expect("run second hastd");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another hastd is running"), "{err}");
    // The first one still answers.
    node.hastctl(&["status"]);
}

#[test]
fn hastctl_without_hastd_says_so() {
    let node = TestNode::standalone(vec![ResourceDef::file("r1", 8 * MIB)]);
    let out = node.hastctl_output(&["status"]);
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to hastd"));
}

/// Issue #11: `hastd -t` rejects, at file:line:col, what used to fail only
/// later (or never): a relative `local`, a huge resource name, a name whose
/// export socket path cannot be bound.
#[test]
fn hastd_t_rejects_relative_local_and_overlong_names() {
    let (code, _, err) = hastd_check(
        "resource r {\n  on a { local disk.img remote none }\n}\n",
        "a",
    );
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("hast.conf:2:16:") && err.contains("absolute path"),
        "{err}"
    );
    let huge = "r".repeat(1 << 20);
    let (code, _, err) = hastd_check(
        &format!("resource {huge} {{ on a {{ local /tmp/x remote none }} }}"),
        "a",
    );
    assert_eq!(code, 78);
    assert!(
        err.contains("hast.conf:1:10:") && err.contains("at most 127"),
        "{}",
        &err[..err.len().min(300)]
    );
    assert!(err.len() < 400, "the error does not echo a 1 MiB name");
    let long = "n".repeat(120);
    let (code, _, err) = hastd_check(
        &format!("resource {long} {{ on a {{ local /tmp/x remote none }} }}"),
        "a",
    );
    assert_eq!(code, 78);
    assert!(
        err.contains("hast.conf:1:10:") && err.contains("unix socket path must be at most 107"),
        "{err}"
    );
}
