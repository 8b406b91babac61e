//! Integration test harness: real `hastd` processes on this host, each with
//! its own directory (config, control socket, pidfile, exports, disks),
//! driven with real clients (qemu-io, nbdcopy, fio) and with hastctl.
//!
//! Binaries come from the workspace target directory; run
//! `cargo build --workspace --bins` first (the test script does).
//! Every process a test starts is killed by PID when its handle drops.

use std::fs::File;
use std::io::Read;
use std::net::IpAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod certs;
pub mod cluster;
pub mod failover;
pub mod fakepeer;
pub mod faulty;
pub mod nbd;
pub mod proxy;

/// Directory holding hastd and hastctl.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("HAST_BIN_DIR") {
        return PathBuf::from(d);
    }
    // A test binary lives in target/<profile>/deps, a tool binary (the
    // benchmark harness) in target/<profile>: look beside it first.
    let exe = std::env::current_exe().expect("current_exe");
    let here = exe.parent().expect("binary has a directory").to_path_buf();
    let dir = if here.join("hastd").exists() {
        here
    } else {
        here.parent().unwrap_or(&here).to_path_buf()
    };
    assert!(
        dir.join("hastd").exists() && dir.join("hastctl").exists(),
        "hastd/hastctl not found in {}: run `cargo build --workspace --bins` first \
         (or set HAST_BIN_DIR)",
        dir.display()
    );
    dir
}

/// Is an external tool available? Tests that need one fail loudly when it
/// is missing unless `HAST_ALLOW_MISSING_TOOLS=1` (then they print a skip
/// notice): CI installs every tool, so a silent pass is never possible there.
pub fn require_tool(name: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("HAST_ALLOW_MISSING_TOOLS").as_deref() == Ok("1") {
            eprintln!("SKIP: {name} is not installed (HAST_ALLOW_MISSING_TOOLS=1)");
            return false;
        }
        panic!("{name} is not installed: run scripts/install-test-deps.sh");
    }
    true
}

/// One resource of a test node.
#[derive(Debug, Clone)]
pub struct ResourceDef {
    /// Resource name.
    pub name: String,
    /// Provider size in bytes (a sparse file is created).
    pub size: u64,
    /// Provider path; None means a file in the node directory.
    pub path: Option<PathBuf>,
    /// Extra statements for the resource block.
    pub extra: String,
    /// `remote` for this resource, overriding [`NodeConfig::remote`].
    pub remote: Option<String>,
    /// `source` for this resource, overriding [`NodeConfig::source`].
    pub source: Option<String>,
}

impl ResourceDef {
    /// A file-backed resource of `size` bytes.
    pub fn file(name: &str, size: u64) -> Self {
        ResourceDef {
            name: name.into(),
            size,
            path: None,
            extra: String::new(),
            remote: None,
            source: None,
        }
    }
}

/// Everything of a node's hast.conf besides its resources and the
/// per-node paths (control socket, pidfile, exportdir: always in the node
/// directory). The default is a standalone node: `remote none`, built-in
/// defaults for everything else.
#[derive(Debug, Clone, Default)]
pub struct NodeConfig {
    /// The node's own IP (informational: the cluster sets it; nothing is
    /// written for it).
    pub ip: Option<IpAddr>,
    /// `listen` addresses, written in a global `on <node>` block.
    pub listen: Vec<String>,
    /// `listen` addresses, written in the global section.
    pub global_listen: Vec<String>,
    /// `remote` of every resource (None: `remote none`) unless the
    /// resource sets its own.
    pub remote: Option<String>,
    /// `source` of every resource (None: no `source`) unless the resource
    /// sets its own.
    pub source: Option<String>,
    /// Global `replication`.
    pub replication: Option<String>,
    /// Global `timeout` in seconds.
    pub timeout: Option<u32>,
    /// Global `exec`.
    pub exec: Option<PathBuf>,
    /// Extra statements for the global section.
    pub global_extra: String,
    /// Extra statements for every resource block.
    pub resource_extra: String,
}

/// A hastd node under test.
pub struct TestNode {
    /// Node name (`--node`).
    pub name: String,
    /// Node directory.
    pub dir: PathBuf,
    /// hast.conf path.
    pub conf: PathBuf,
    /// Resources.
    pub resources: Vec<ResourceDef>,
    /// The rest of the config; change it and call [`TestNode::write_conf`].
    pub cfg: NodeConfig,
    child: Option<Child>,
    bins: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl TestNode {
    /// A standalone node (`remote none`) with the given resources; writes
    /// its config and creates provider files, but does not run
    /// `hastctl create`.
    pub fn standalone(resources: Vec<ResourceDef>) -> TestNode {
        TestNode::new("nodeA", NodeConfig::default(), resources)
    }

    /// A node called `name` (`--node`) in a fresh directory under
    /// [`test_root`]; writes its config and creates the provider files of
    /// resources without a path, but does not run `hastctl create`.
    pub fn new(name: &str, cfg: NodeConfig, resources: Vec<ResourceDef>) -> TestNode {
        let tmp = tempfile::Builder::new()
            .prefix("hast-test-")
            .tempdir_in(test_root())
            .expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut node = TestNode {
            name: name.into(),
            conf: dir.join("hast.conf"),
            dir,
            resources,
            cfg,
            child: None,
            bins: bin_dir(),
            _tmp: Some(tmp),
        };
        for r in &mut node.resources {
            if r.path.is_none() {
                let p = node.dir.join(format!("{}.img", r.name));
                let f = File::create(&p).expect("create provider");
                f.set_len(r.size).expect("size provider");
                r.path = Some(p);
            }
        }
        node.write_conf();
        node
    }

    /// Rewrites hast.conf from the resource list and [`TestNode::cfg`].
    pub fn write_conf(&self) {
        std::fs::write(&self.conf, self.render_conf()).expect("write hast.conf");
    }

    /// The text [`TestNode::write_conf`] writes.
    pub fn render_conf(&self) -> String {
        let c = &self.cfg;
        let mut conf = format!(
            "# generated by the test harness\ncontrol uds://{d}/ctl.sock\npidfile {d}/hastd.pid\nexportdir {d}/export\n",
            d = self.dir.display()
        );
        if let Some(r) = &c.replication {
            conf.push_str(&format!("replication {r}\n"));
        }
        if let Some(t) = c.timeout {
            conf.push_str(&format!("timeout {t}\n"));
        }
        if let Some(e) = &c.exec {
            conf.push_str(&format!("exec {}\n", e.display()));
        }
        for l in &c.global_listen {
            conf.push_str(&format!("listen {l}\n"));
        }
        if !c.global_extra.is_empty() {
            conf.push_str(&c.global_extra);
            conf.push('\n');
        }
        if !c.listen.is_empty() {
            conf.push_str(&format!("on {} {{\n", self.name));
            for l in &c.listen {
                conf.push_str(&format!("  listen {l}\n"));
            }
            conf.push_str("}\n");
        }
        for r in &self.resources {
            let mut extra = r.extra.clone();
            if !c.resource_extra.is_empty() {
                extra.push_str("\n  ");
                extra.push_str(&c.resource_extra);
            }
            let remote = r
                .remote
                .as_deref()
                .or(c.remote.as_deref())
                .unwrap_or("none");
            let source = match r.source.as_deref().or(c.source.as_deref()) {
                Some(s) => format!("    source {s}\n"),
                None => String::new(),
            };
            conf.push_str(&format!(
                "resource {} {{\n  {}\n  on {} {{\n    local {}\n    remote {remote}\n{source}  }}\n}}\n",
                r.name,
                extra,
                self.name,
                r.path.as_ref().expect("path").display()
            ));
        }
        conf
    }

    /// Provider path of a resource.
    pub fn provider(&self, res: &str) -> PathBuf {
        self.resources
            .iter()
            .find(|r| r.name == res)
            .and_then(|r| r.path.clone())
            .expect("known resource")
    }

    /// NBD socket of a resource's export.
    pub fn export_socket(&self, res: &str) -> PathBuf {
        self.dir.join("export").join(format!("{res}.sock"))
    }

    /// NBD URI of a resource's export.
    pub fn uri(&self, res: &str) -> String {
        format!(
            "nbd+unix:///{res}?socket={}",
            self.export_socket(res).display()
        )
    }

    /// Control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }

    /// Runs hastctl with this node's config; returns its output.
    pub fn hastctl_output(&self, args: &[&str]) -> Output {
        Command::new(self.bins.join("hastctl"))
            .arg("-c")
            .arg(&self.conf)
            .arg("--node")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("run hastctl")
    }

    /// Runs hastctl and asserts success; returns stdout.
    pub fn hastctl(&self, args: &[&str]) -> String {
        let out = self.hastctl_output(args);
        assert!(
            out.status.success(),
            "hastctl {args:?} failed ({}):\nstdout: {}\nstderr: {}\nhastd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `hastctl create` for every resource.
    pub fn create_all(&self) {
        let names: Vec<&str> = self.resources.iter().map(|r| r.name.as_str()).collect();
        let mut args = vec!["create"];
        args.extend(names);
        self.hastctl(&args);
    }

    /// Starts hastd in the foreground (logging to `hastd.log`) and waits
    /// for its control socket.
    pub fn start(&mut self) {
        if let Err(e) = self.try_start() {
            panic!("{e}");
        }
    }

    /// Like [`TestNode::start`], but an hastd that exits before its control
    /// socket is up is an error (with its log) rather than a panic, so
    /// that the caller can retry, e.g. after EADDRINUSE.
    pub fn try_start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "hastd already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("hastd.log"))
            .expect("log file");
        let child = Command::new(self.bins.join("hastd"))
            .arg("-F")
            .arg("-c")
            .arg(&self.conf)
            .arg("--node")
            .arg(&self.name)
            .env("HAST_LOG", "debug,glommio=warn")
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn hastd");
        self.child = Some(child);
        let ctl = self.control_socket();
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return Err(format!("hastd exited early ({st}):\n{}", self.log()));
                }
            }
            // The socket accepts connections as soon as it is bound, before
            // hastd has started its resources and listeners: ready means
            // it answers a status request.
            if answers_status(&ctl) {
                return Ok(());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "timed out waiting for hastd control socket:\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// PID of the running hastd.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sets a role and waits for the export to appear (primary) or vanish.
    pub fn role(&self, role: &str, res: &str) {
        self.hastctl(&["role", role, res]);
        if role == "primary" {
            let sock = self.export_socket(res);
            wait_until(Duration::from_secs(10), "export socket", || sock.exists());
        }
    }

    /// Stops hastd with SIGTERM and waits for it to exit 0.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGTERM);
            let st = wait_child(&mut c, Duration::from_secs(30));
            assert!(st.success(), "hastd exited with {st}:\n{}", self.log());
        }
    }

    /// Kills hastd with SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Waits until a primary's resource is connected, not synchronising,
    /// with nothing dirty and nothing in flight to the secondary (`limit`
    /// at most); returns its `list --json` entry.
    pub fn wait_in_sync(&self, res: &str, limit: Duration) -> serde_json::Value {
        self.wait_list(res, limit, |j| {
            j["status"] == "complete"
                && j["dirty"].as_u64() == Some(0)
                && j["sync"].is_null()
                && j["queues"]["recv"].as_u64() == Some(0)
        })
    }

    /// Waits until the hastd log contains `needle`.
    pub fn wait_until_log(&self, needle: &str, limit: Duration) {
        let start = Instant::now();
        while !self.log().contains(needle) {
            assert!(
                start.elapsed() < limit,
                "hastd log never said {needle:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The hastd log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("hastd.log")).unwrap_or_default()
    }

    /// The last `lines` lines of the hastd log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Polls `hastctl list --json` for `res` until `pred` holds of its
    /// entry (e.g. `|j| j["status"] == "complete"`), and returns that
    /// entry. Panics after `limit` with the last answer and the log tail.
    pub fn wait_list(
        &self,
        res: &str,
        limit: Duration,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let last;
            let out = self.hastctl_output(&["list", "--json", res]);
            if out.status.success() {
                let text = String::from_utf8_lossy(&out.stdout);
                match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(v) => {
                        let entry = v[0].clone();
                        if pred(&entry) {
                            return entry;
                        }
                        last = serde_json::to_string_pretty(&entry).unwrap_or_default();
                    }
                    Err(e) => last = format!("unparsable ({e}): {text}"),
                }
            } else {
                last = format!(
                    "hastctl failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            if start.elapsed() > limit {
                panic!(
                    "node {}: resource {res}: condition not reached within {limit:?}\n\
                     last `hastctl list --json`:\n{last}\nhastd log (tail):\n{}",
                    self.name,
                    self.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `hastctl list --json` for one resource.
    pub fn list(&self, res: &str) -> serde_json::Value {
        let out = self.hastctl(&["list", "--json", res]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("list json");
        v[0].clone()
    }

    /// `hastctl dump --json` for one resource.
    pub fn dump(&self, res: &str) -> serde_json::Value {
        let out = self.hastctl(&["dump", "--json", res]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("dump json");
        v[0].clone()
    }

    /// Reads `len` bytes at `offset` of a resource's data area straight
    /// from its provider (bypassing hastd).
    pub fn read_provider_data(&self, res: &str, offset: u64, len: usize) -> Vec<u8> {
        let md = self.dump(res);
        let localoff = md["localoff"].as_u64().expect("localoff");
        let f = File::open(self.provider(res)).expect("open provider");
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, localoff + offset)
            .expect("read provider");
        buf
    }

    /// The on-disk activemap bits of a resource, read from its provider.
    pub fn ondisk_bitmap(&self, res: &str) -> Vec<bool> {
        let md = self.dump(res);
        let mapoff = md["mapoff"].as_u64().expect("mapoff");
        let mapsize = md["mapsize"].as_u64().expect("mapsize") as usize;
        let extentsize = md["extentsize"].as_u64().expect("extentsize");
        let datasize = md["datasize"].as_u64().expect("datasize");
        let n = datasize.div_ceil(extentsize) as usize;
        let f = File::open(self.provider(res)).expect("open provider");
        let mut map = vec![0u8; mapsize];
        f.read_exact_at(&mut map, mapoff).expect("read map");
        (0..n).map(|e| map[e / 8] & (1 << (e % 8)) != 0).collect()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
        // A failing test's whole log, where `HAST_KEEP_LOGS` says (the
        // panic message shows only a tail).
        if let (true, Ok(dir)) = (std::thread::panicking(), std::env::var("HAST_KEEP_LOGS")) {
            let dir = PathBuf::from(dir);
            let name = format!("{}-{}.log", self.name, std::process::id());
            if std::fs::create_dir_all(&dir).is_ok()
                && std::fs::write(dir.join(&name), self.log()).is_ok()
            {
                eprintln!(
                    "{}: whole log kept in {}",
                    self.name,
                    dir.join(name).display()
                );
            }
        }
    }
}

/// Where test directories are created (`HAST_TEST_DIR`, default the
/// system temp dir). Must support O_DIRECT (tmpfs does not).
pub fn test_root() -> PathBuf {
    std::env::var("HAST_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir())
}

/// Sends a signal to a process.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a PID this harness spawned; no memory involved.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Waits for a child with a deadline, killing it if it overstays.
pub fn wait_child(c: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = c.try_wait().expect("try_wait") {
            return st;
        }
        if start.elapsed() > limit {
            let _ = c.kill();
            panic!("process {} did not exit within {limit:?}", c.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Cleanup: waits up to `limit` for a child to exit, then kills it (no
/// panic: used from drops). Returns whether it exited by itself.
pub fn reap(c: &mut Child, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        if let Ok(Some(_)) = c.try_wait() {
            return true;
        }
        if start.elapsed() > limit {
            let _ = c.kill();
            let _ = c.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `cond` until true or panics after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command, asserting success; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs qemu-io commands against an NBD URI without asserting: whether
/// they all succeeded, and qemu-io's output (stdout and stderr).
pub fn qemu_io_result(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.arg(uri).output().expect("run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = out.status.success()
        && !text.contains("failed")
        && !text.contains("Pattern verification failed");
    (ok, text)
}

/// Runs qemu-io commands against an NBD URI; asserts success and that no
/// pattern mismatch was reported.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("raw");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    let out = run(&mut c);
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed:"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

/// `n` bytes from a seeded PRNG (xorshift), reproducible.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Reads a whole file.
pub fn read_file(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    File::open(p)
        .and_then(|mut f| f.read_to_end(&mut v))
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    v
}

/// Resident memory of a process from `/proc/PID/status`, in bytes:
/// (`VmRSS`, `VmHWM`, the peak since it started). None once it is gone.
pub fn proc_memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Is the process alive (and not a zombie)?
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Does hastd answer a status request on its control socket?
fn answers_status(ctl: &Path) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(ctl) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = b"{\"version\":1,\"cmd\":\"status\",\"resources\":[\"all\"]}\n";
    if s.write_all(req).is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok_and(|n| n > 0)
}
