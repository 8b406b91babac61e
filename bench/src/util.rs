//! Small helpers of the benchmark harness: sizes, scratch directories,
//! child processes that die with their handle, bounded waits.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// 1 KiB.
pub const KIB: u64 = 1 << 10;
/// 1 MiB.
pub const MIB: u64 = 1 << 20;
/// 1 GiB.
pub const GIB: u64 = 1 << 30;

/// Parses `4096`, `512K`, `2M`, `2G`, `1T` (binary units, optional `iB`/`B`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], KIB),
        Some('m' | 'M') => (&t[..t.len() - 1], MIB),
        Some('g' | 'G') => (&t[..t.len() - 1], GIB),
        Some('t' | 'T') => (&t[..t.len() - 1], GIB << 10),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("invalid size {s:?} (e.g. 512M, 2G)"))
}

/// `2 GiB`, `512 MiB`, `4096 B`.
pub fn human_size(n: u64) -> String {
    if n >= GIB && n.is_multiple_of(GIB) {
        format!("{} GiB", n / GIB)
    } else if n >= GIB {
        format!("{:.1} GiB", n as f64 / GIB as f64)
    } else if n >= MIB {
        format!("{} MiB", n / MIB)
    } else {
        format!("{n} B")
    }
}

/// Size of a provider whose data area is exactly `data` bytes with the
/// `hastctl create` defaults (2 MiB extents, 512-byte sectors; see
/// docs/format.md): metadata block, activemap, written map (as large as
/// the activemap), then the data area at a 4 KiB-aligned `localoff`.
pub fn provider_size(data: u64) -> u64 {
    const EXTENT: u64 = 2 * MIB;
    let mut media = data + 8192;
    loop {
        let extents = media.div_ceil(EXTENT);
        let mapsize = extents.div_ceil(8).next_multiple_of(512);
        let localoff = (4096 + 2 * mapsize).next_multiple_of(4096);
        let m = data + localoff;
        if m == media {
            return m;
        }
        media = m;
    }
}

/// A scratch directory under the harness root (`HAST_TEST_DIR` or the
/// system temp dir), removed with everything in it when dropped.
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// A fresh directory `<root>/<prefix>-<pid>-<n>`.
    pub fn new(prefix: &str) -> WorkDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = hast_tests::test_root().join(format!("{prefix}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        WorkDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Creates (or truncates) a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size)
        .unwrap_or_else(|e| panic!("size {}: {e}", path.display()));
}

/// A child process that is stopped when the handle drops: SIGTERM, up to
/// five seconds' grace, then SIGKILL; always reaped.
pub struct Guarded {
    child: Option<Child>,
    what: String,
}

impl Guarded {
    /// Spawns `cmd` (stdin from /dev/null).
    pub fn spawn(cmd: &mut Command, what: &str) -> Guarded {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        Guarded {
            child: Some(child),
            what: what.into(),
        }
    }

    /// Takes over a child started elsewhere (e.g. one end of a pipe).
    pub fn adopt(child: Child, what: &str) -> Guarded {
        Guarded {
            child: Some(child),
            what: what.into(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Exit status, if it has exited (it is then reaped).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `limit` for the process to exit; kills it and panics if
    /// it overstays.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.try_wait() {
                self.child = None;
                return st;
            }
            if start.elapsed() > limit {
                self.stop();
                panic!("{} did not finish within {limit:?}; killed", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process now (SIGTERM, grace, SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            hast_tests::signal(c.id(), 15);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a command to completion within `limit` (killed otherwise) with its
/// stdout and stderr captured in files of `dir`; panics unless it exits 0.
/// Returns (stdout, stderr).
pub fn run_bounded(cmd: &mut Command, limit: Duration, what: &str, dir: &Path) -> (String, String) {
    let mut child = spawn_captured(cmd, what, dir);
    let st = child.proc.wait(limit);
    let (out, err) = child.output();
    assert!(
        st.success(),
        "{what} failed ({st}):\nstdout: {out}\nstderr: {err}"
    );
    (out, err)
}

/// A running command whose output goes to files.
pub struct Captured {
    /// The process.
    pub proc: Guarded,
    out: PathBuf,
    err: PathBuf,
}

impl Captured {
    /// Stdout and stderr so far (the files are removed once read after
    /// the process exited).
    pub fn output(&mut self) -> (String, String) {
        let out = std::fs::read_to_string(&self.out).unwrap_or_default();
        let err = std::fs::read_to_string(&self.err).unwrap_or_default();
        if self.proc.try_wait().is_some() || self.proc.pid() == 0 {
            let _ = std::fs::remove_file(&self.out);
            let _ = std::fs::remove_file(&self.err);
        }
        (out, err)
    }
}

/// Spawns `cmd` with stdout/stderr to fresh files in `dir`.
pub fn spawn_captured(cmd: &mut Command, what: &str, dir: &Path) -> Captured {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let out = dir.join(format!(".out-{}-{n}", std::process::id()));
    let err = dir.join(format!(".err-{}-{n}", std::process::id()));
    let fo = File::create(&out).unwrap_or_else(|e| panic!("create {}: {e}", out.display()));
    let fe = File::create(&err).unwrap_or_else(|e| panic!("create {}: {e}", err.display()));
    let proc = Guarded::spawn(cmd.stdout(fo).stderr(fe), what);
    Captured { proc, out, err }
}

/// Output of a short command, or "" (for descriptions: `uname`, `date`).
pub fn command_line(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2G"), Ok(2 * GIB));
        assert_eq!(parse_size("512M"), Ok(512 * MIB));
        assert_eq!(parse_size("4GiB"), Ok(4 * GIB));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
        assert_eq!(human_size(2 * GIB), "2 GiB");
    }

    #[test]
    fn provider_sizes_match_the_format_doc() {
        // docs/format.md: a 1 GiB file has localoff 8192.
        assert_eq!(provider_size(1073733632), GIB);
        assert_eq!(provider_size(2 * GIB), 2 * GIB + 8192);
        assert_eq!(provider_size(4 * GIB), 4 * GIB + 8192);
        // 8 GiB needs 4097 extents: a 1024-byte map.
        assert_eq!(provider_size(8 * GIB), 8 * GIB + 8192);
    }
}
