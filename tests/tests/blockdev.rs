//! Providers that are block devices (loop devices over files): sizes and
//! sector sizes come from the block-device ioctls, O_DIRECT is set
//! explicitly (glommio skips it for paths on /dev, a tmpfs), and a 4 KiB
//! logical sector device gets correct read-modify-write for 512-byte
//! client writes.

use std::process::Command;

use hast_tests::*;

const MIB: u64 = 1 << 20;

/// A loop device, detached on drop.
struct Loop {
    dev: String,
}

impl Loop {
    fn attach(file: &std::path::Path, sector: u32) -> Option<Loop> {
        if !require_tool("losetup") {
            return None;
        }
        let out = Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on", "--sector-size"])
            .arg(sector.to_string())
            .arg(file)
            .output()
            .expect("run losetup");
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            if std::env::var("HAST_ALLOW_MISSING_TOOLS").as_deref() == Ok("1") {
                eprintln!("SKIP: cannot attach a loop device: {err}");
                return None;
            }
            panic!("cannot attach a loop device (root needed): {err}");
        }
        Some(Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn node_on_loop(sector: u32) -> Option<(TestNode, Loop)> {
    let mut node = TestNode::standalone(vec![ResourceDef::file("r1", 64 * MIB)]);
    let lo = Loop::attach(&node.provider("r1"), sector)?;
    node.resources[0].path = Some(lo.dev.clone().into());
    node.write_conf();
    node.create_all();
    Some((node, lo))
}

#[test]
fn loop_device_with_512_byte_sectors() {
    if !require_tool("qemu-io") {
        return;
    }
    let Some((mut node, lo)) = node_on_loop(512) else {
        return;
    };
    let d = node.dump("r1");
    assert_eq!(d["sectorsize"].as_u64(), Some(512));
    node.start();
    node.role("primary", "r1");
    qemu_io(
        &node.uri("r1"),
        &[
            "write -P 0x61 0 1M",
            "write -P 0x62 1000 24",
            "flush",
            "read -P 0x61 0 1000",
            "read -P 0x62 1000 24",
        ],
    );
    node.stop();
    // Read the device directly: the data is where the metadata says.
    let localoff = d["localoff"].as_u64().unwrap();
    let f = std::fs::File::open(&lo.dev).unwrap();
    let mut buf = vec![0u8; 1024];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, localoff).unwrap();
    assert!(buf[..1000].iter().all(|&b| b == 0x61));
    assert!(buf[1000..1024].iter().all(|&b| b == 0x62));
}

#[test]
fn loop_device_with_4k_sectors_handles_small_writes() {
    if !require_tool("qemu-io") {
        return;
    }
    let Some((mut node, _lo)) = node_on_loop(4096) else {
        return;
    };
    let d = node.dump("r1");
    assert_eq!(d["sectorsize"].as_u64(), Some(4096));
    assert_eq!(d["localoff"].as_u64().unwrap() % 4096, 0);
    node.start();
    node.role("primary", "r1");
    // 512-byte and odd-sized writes on a 4 KiB-sector device.
    qemu_io(
        &node.uri("r1"),
        &[
            "write -P 0x71 0 64k",
            "write -P 0x72 512 512",
            "write -P 0x73 5000 100",
            "read -P 0x71 0 512",
            "read -P 0x72 512 512",
            "read -P 0x71 1024 3976",
            "read -P 0x73 5000 100",
            "read -P 0x71 5100 1000",
            "write -z 8192 4096",
            "read -P 0 8192 4096",
        ],
    );
    let l = node.list("r1");
    assert_eq!(l["local_errors"]["write"].as_u64(), Some(0));
}

/// A block device in use is claimed with O_EXCL (and flock): a second
/// hastd on the same device cannot activate it, `hastctl create` of it is
/// refused, and the claim goes in role init.
#[test]
fn a_block_device_in_use_is_not_shared() {
    let Some((mut node, lo)) = node_on_loop(512) else {
        return;
    };
    node.start();
    node.role("primary", "r1");
    let mut other = TestNode::new(
        "nodeC",
        NodeConfig::default(),
        vec![ResourceDef {
            path: Some(lo.dev.clone().into()),
            ..ResourceDef::file("r1", 64 * MIB)
        }],
    );
    other.start();
    let out = other.hastctl_output(&["role", "primary", "r1"]);
    assert!(!out.status.success(), "a second hastd activated the device");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("provider in use") && err.contains("claimed"),
        "{err}"
    );
    let out = other.hastctl_output(&["create", "r1"]);
    assert!(!out.status.success(), "create of a device in use");
    assert!(String::from_utf8_lossy(&out.stderr).contains("provider in use"));
    node.hastctl(&["role", "init", "r1"]);
    other.role("primary", "r1");
    other.hastctl(&["role", "init", "r1"]);
    other.stop();
    node.stop();
}
