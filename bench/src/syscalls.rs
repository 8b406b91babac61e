//! System calls of a server process during a job, counted by the kernel.
//!
//! A [`SyscallCounter`] opens one perf counter of the `raw_syscalls:sys_enter`
//! tracepoint per thread of the process (inherited by the threads those
//! create), which is what `perf stat -e raw_syscalls:sys_enter -p PID`
//! counts, without the `perf` tool: Debian's perf 6.1 counts nothing with
//! `-p` on this host's 6.18 kernel (`<not counted>`, the events are never
//! enabled), while the same counter opened directly works. Counting needs
//! root (or CAP_PERFMON, or `kernel.perf_event_paranoid` ≤ 1 for processes
//! of the same user) and tracefs (`/sys/kernel/tracing`, or
//! `/sys/kernel/debug/tracing`); without them the harness reports `n/a`
//! and [`availability`] says why.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::OnceLock;

/// `PERF_TYPE_TRACEPOINT` (linux/perf_event.h).
const PERF_TYPE_TRACEPOINT: u32 = 2;
/// `perf_event_attr.inherit` (bit 1 of the flag word).
const ATTR_INHERIT: u64 = 1 << 1;
/// `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `PERF_ATTR_SIZE_VER7`: the fields up to `sig_data`; the kernel accepts
/// any published size and zeroes what it knows beyond it.
const ATTR_SIZE: usize = 128;

/// `struct perf_event_attr` up to the flag word, zero-padded to
/// [`ATTR_SIZE`] (the fields after the flags stay zero).
#[repr(C)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    rest: [u64; (ATTR_SIZE - 48) / 8],
}

const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == ATTR_SIZE);

/// Where tracefs may be mounted.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The id of a tracepoint from the text of its `id` file.
fn parse_tracepoint_id(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The id of `raw_syscalls:sys_enter`, read once.
fn tracepoint_id() -> Result<u64, String> {
    static ID: OnceLock<Result<u64, String>> = OnceLock::new();
    ID.get_or_init(|| {
        for dir in TRACEFS {
            let p = format!("{dir}/events/raw_syscalls/sys_enter/id");
            if let Some(id) = std::fs::read_to_string(&p)
                .ok()
                .and_then(|t| parse_tracepoint_id(&t))
            {
                return Ok(id);
            }
        }
        Err(format!(
            "no tracefs with raw_syscalls:sys_enter (looked in {}; as root: \
             mount -t tracefs nodev /sys/kernel/tracing)",
            TRACEFS.join(", ")
        ))
    })
    .clone()
}

/// One counter on thread `tid` (and the threads it creates from now on).
fn open_counter(id: u64, tid: u32) -> Result<OwnedFd, String> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: ATTR_SIZE as u32,
        config: id,
        sample_period: 0,
        sample_type: 0,
        read_format: 0,
        // Enabled from the open on (no `disabled` bit), inherited.
        flags: ATTR_INHERIT,
        rest: [0; (ATTR_SIZE - 48) / 8],
    };
    let tid = libc::pid_t::try_from(tid).map_err(|_| format!("thread id {tid} out of range"))?;
    // SAFETY: perf_event_open(2) reads `attr.size` bytes of a live,
    // initialised #[repr(C)] struct of exactly that size; pid = a thread
    // id, cpu = -1 (any), group_fd = -1; the result is a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            tid,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!(
            "perf_event_open(raw_syscalls:sys_enter, thread {tid}): {e} \
             (needs root, CAP_PERFMON or kernel.perf_event_paranoid <= 1)"
        ));
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| "perf_event_open: fd out of range")?;
    // SAFETY: `fd` was just returned by the kernel and is owned by nothing
    // else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The count of one counter (read_format 0: a single u64).
#[allow(clippy::host_endian_bytes)] // the kernel ABI: the host's byte order
fn read_counter(fd: &OwnedFd) -> Option<u64> {
    let mut f = File::from(fd.try_clone().ok()?);
    let mut b = [0u8; 8];
    f.read_exact(&mut b).ok()?;
    Some(u64::from_ne_bytes(b))
}

/// Counts the system calls of one process from [`SyscallCounter::start`]
/// on.
pub struct SyscallCounter {
    fds: Vec<OwnedFd>,
}

impl SyscallCounter {
    /// Starts counting every thread of `pid` (threads it creates later are
    /// counted through inheritance).
    pub fn start(pid: u32) -> Result<SyscallCounter, String> {
        let id = tracepoint_id()?;
        let tids: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map_err(|e| format!("/proc/{pid}/task: {e}"))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        if tids.is_empty() {
            return Err(format!("process {pid} has no threads"));
        }
        let mut fds = Vec::with_capacity(tids.len());
        for tid in tids {
            match open_counter(id, tid) {
                Ok(fd) => fds.push(fd),
                // The thread exited between the listing and the open.
                Err(_) if !std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(SyscallCounter { fds })
    }

    /// System calls so far (threads that exited keep their count).
    pub fn read(&self) -> Option<u64> {
        self.fds.iter().map(read_counter).sum()
    }
}

/// Whether system calls can be counted here: Ok, or why not (checked once,
/// on this process).
pub fn availability() -> Result<(), String> {
    static A: OnceLock<Result<(), String>> = OnceLock::new();
    A.get_or_init(|| {
        let c = SyscallCounter::start(std::process::id())?;
        // Some system calls of our own: the counter must see them.
        for _ in 0..10 {
            let _ = std::fs::metadata("/proc/self");
        }
        match c.read() {
            Some(n) if n >= 10 => Ok(()),
            n => Err(format!(
                "a raw_syscalls:sys_enter counter on this process counted {n:?} \
                 system calls for at least 10"
            )),
        }
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracepoint_ids_parse() {
        assert_eq!(parse_tracepoint_id("443\n"), Some(443));
        assert_eq!(parse_tracepoint_id(""), None);
    }

    /// Where counting works (root, tracefs), the counter sees a known
    /// number of system calls of another thread exactly once each, at
    /// least; elsewhere `availability` explains why not.
    #[test]
    fn counts_another_threads_calls() {
        if let Err(why) = availability() {
            eprintln!("system calls cannot be counted here: {why}");
            return;
        }
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            ready_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            for _ in 0..1000 {
                // SAFETY: getppid(2) has no arguments and cannot fail.
                unsafe { libc::getppid() };
            }
        });
        ready_rx.recv().unwrap();
        let c = SyscallCounter::start(std::process::id()).expect("counter");
        let before = c.read().expect("read");
        go_tx.send(()).unwrap();
        t.join().unwrap();
        let n = c.read().expect("read") - before;
        assert!(n >= 1000, "counted {n} system calls, made at least 1000");
    }
}
