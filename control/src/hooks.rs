//! Event hooks: the program named by hast.conf's `exec <path>` statement,
//! run by hastd when something happens to a resource.
//!
//! As in FreeBSD HAST the program is called as
//!
//! ```text
//! <exec> <event> <resource>                      connect, disconnect, syncstart,
//!                                                syncdone, syncintr, split-brain,
//!                                                verifystart, verifydone, out-of-sync
//! <exec> role <resource> <oldrole> <newrole>     role changes
//! <exec> disk-failed <resource> local|remote     a disk was detached (extension)
//! ```
//!
//! Hooks run detached from the data path: events are queued to a
//! [`HookRunner`] (never blocking the submitter), whose thread takes them in
//! order and starts one process per event without waiting for the previous
//! one to finish, so hooks of the same resource are *started* in event
//! order. Each process is watched by its own thread, which reaps it (no
//! zombies) and logs its exit status; hooks still running after
//! [`HookLimits::warn_after`] are logged every such interval, like the
//! original's "Hook is running for N seconds" reports.
//!
//! Differences from the original, all extensions:
//!
//! * The hook's environment additionally holds `HAST_RESOURCE` and
//!   `HAST_EVENT` (and, for `role`, `HAST_OLDROLE` and `HAST_NEWROLE`; for
//!   `disk-failed`, `HAST_LEG`; these are removed from the environment of
//!   other events).
//! * `disk-failed` is new: this node's disk (`local`) or the peer's
//!   (`remote`) was detached after its errors (docs/failover.md).
//! * Standard output and standard error (one pipe, interleaved as written)
//!   are logged line by line at info level, up to [`OUTPUT_LIMIT`] bytes per
//!   hook; the rest is read and discarded. The original sends them to
//!   `/dev/null`. Standard input is `/dev/null`.
//! * At most [`HookLimits::max_running`] hooks run at once; further events
//!   wait in the queue, still in order.
//! * The exec path must be absolute (it is never looked up in `$PATH`).

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::Dispatch;

/// Events the queue of a [`HookRunner`] holds before dropping new ones.
pub const QUEUE_CAPACITY: usize = 1024;
/// Bytes of a hook's output (stdout and stderr together) that are logged.
pub const OUTPUT_LIMIT: usize = 64 * 1024;
/// How long the watcher of an exited hook waits for the rest of its output
/// (a background child of the hook may keep the pipe open).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// The events hooks run for (the one list of events is the data path's;
/// [`EventKind::runs_hook`] says which run a hook).
pub use hast_datapath::events::{Event, EventKind};

/// Tunables of a [`HookRunner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookLimits {
    /// A hook still running after this long is logged (warning), and again
    /// after every further such interval. `Duration::ZERO` disables it.
    pub warn_after: Duration,
    /// Hooks running at once; beyond that new hooks wait (in order) until
    /// one exits. Values below 1 count as 1.
    pub max_running: usize,
}

impl Default for HookLimits {
    /// 30 s (the original's report interval) and 64 hooks.
    fn default() -> HookLimits {
        HookLimits {
            warn_after: Duration::from_secs(30),
            max_running: 64,
        }
    }
}

/// Messages to the runner thread other than events.
enum Ctl {
    /// The hook with this id exited and was reaped.
    Exited(u64),
    /// Stop: drain what is queued and wait for running hooks until the
    /// deadline (`None`: no deadline).
    Stop(Option<Instant>),
}

/// Runs hooks on a thread of its own; see the module documentation.
pub struct HookRunner {
    submitter: HookSubmitter,
    ctl: flume::Sender<Ctl>,
    thread: Option<JoinHandle<()>>,
}

/// A cloneable, non-blocking handle queueing events to a [`HookRunner`],
/// with the same drop accounting as [`HookRunner::submit`].
#[derive(Clone)]
pub struct HookSubmitter {
    tx: flume::Sender<Event>,
    dropped: Arc<AtomicU64>,
}

impl HookSubmitter {
    /// Queues an event; never blocks. When the queue is full (or the runner
    /// has stopped) the event is dropped, counted and logged as an error.
    pub fn submit(&self, event: Event) {
        if !event.kind.runs_hook() {
            return;
        }
        let (event, why) = match self.tx.try_send(event) {
            Ok(()) => return,
            Err(flume::TrySendError::Full(e)) => (e, "hook queue full"),
            Err(flume::TrySendError::Disconnected(e)) => (e, "hook runner stopped"),
        };
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::error!(
            resource = %event.resource,
            event = %event.kind.name(),
            dropped,
            "{why}; event dropped"
        );
    }
}

impl HookRunner {
    /// Starts the runner thread with the default [`HookLimits`].
    /// `exec_for(resource)` returns the exec path configured for a resource
    /// (`None`: no hook); it is called on the runner thread, once per event.
    pub fn start(exec_for: impl Fn(&str) -> Option<PathBuf> + Send + 'static) -> HookRunner {
        HookRunner::start_with(exec_for, HookLimits::default())
    }

    /// Starts the runner thread with explicit limits.
    ///
    /// Log records of the runner and its hooks go to the tracing dispatcher
    /// current at this call (or to the global one if there is none yet).
    pub fn start_with(
        exec_for: impl Fn(&str) -> Option<PathBuf> + Send + 'static,
        limits: HookLimits,
    ) -> HookRunner {
        let limits = HookLimits {
            max_running: limits.max_running.max(1),
            ..limits
        };
        let (tx, events) = flume::bounded(QUEUE_CAPACITY);
        // Every running hook sends one Exited, plus one Stop: never full.
        let (ctl_tx, ctl_rx) = flume::bounded(limits.max_running + 1);
        let dispatch = current_dispatch();
        let runner = Runner {
            exec_for: Box::new(exec_for),
            limits,
            events,
            ctl_rx,
            ctl_tx: ctl_tx.clone(),
            dispatch: dispatch.clone(),
            running: HashMap::new(),
            next_id: 0,
        };
        let thread = match spawn_thread("hast-hooks", &dispatch, move || runner.run()) {
            Ok(t) => Some(t),
            Err(e) => {
                // The receiver went with the closure: submits fail and log.
                tracing::error!(error = %e, "cannot start the hook runner thread; hooks disabled");
                None
            }
        };
        HookRunner {
            submitter: HookSubmitter {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            ctl: ctl_tx,
            thread,
        }
    }

    /// Queues an event; never blocks. The queue holds [`QUEUE_CAPACITY`]
    /// events; when full, the event is dropped, counted ([`Self::dropped`])
    /// and logged as an error naming it.
    pub fn submit(&self, event: Event) {
        self.submitter.submit(event);
    }

    /// The raw queue, for other threads (the data path). Use
    /// `try_send` on it to never block; drops through it are not counted
    /// in [`Self::dropped`] (see [`Self::submitter`] for a handle that is).
    pub fn sender(&self) -> flume::Sender<Event> {
        self.submitter.tx.clone()
    }

    /// A cloneable handle behaving like [`Self::submit`] (extension).
    pub fn submitter(&self) -> HookSubmitter {
        self.submitter.clone()
    }

    /// Events dropped so far by [`Self::submit`] and [`HookSubmitter`]s.
    pub fn dropped(&self) -> u64 {
        self.submitter.dropped.load(Ordering::Relaxed)
    }

    /// Stops accepting events and returns once running hooks have finished
    /// or `grace` has passed. Events already queued are still started
    /// (within `grace`; any left over are logged as dropped). Hooks still
    /// running at the deadline are logged and left alone (not killed; their
    /// watchers still reap them). Joins the runner thread.
    pub fn shutdown(mut self, grace: Duration) {
        self.stop(grace);
    }

    fn stop(&mut self, grace: Duration) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now().checked_add(grace);
        // Never blocks: the channel has room for one Stop (see start_with).
        let _ = self.ctl.send(Ctl::Stop(deadline));
        if thread.join().is_err() {
            tracing::error!("the hook runner thread panicked");
        }
    }
}

impl Drop for HookRunner {
    /// Like `shutdown(Duration::ZERO)` if `shutdown` was not called.
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

/// The tracing dispatcher to install on the threads we start: the caller's,
/// unless there is none (then the threads use the global default, which may
/// be set later).
fn current_dispatch() -> Option<Dispatch> {
    let d = tracing::dispatcher::get_default(Dispatch::clone);
    (!d.is::<tracing::subscriber::NoSubscriber>()).then_some(d)
}

fn spawn_thread(
    name: &str,
    dispatch: &Option<Dispatch>,
    f: impl FnOnce() + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let dispatch = dispatch.clone();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || match dispatch {
            Some(d) => tracing::dispatcher::with_default(&d, f),
            None => f(),
        })
}

/// What log records about one hook name.
struct HookInfo {
    resource: String,
    event: &'static str,
    path: PathBuf,
    pid: u32,
}

/// A hook the runner has started and not yet seen exit.
struct Running {
    info: Arc<HookInfo>,
    started: Instant,
    next_warn: Option<Instant>,
}

type ExecFor = Box<dyn Fn(&str) -> Option<PathBuf> + Send>;

/// State of the runner thread.
struct Runner {
    exec_for: ExecFor,
    limits: HookLimits,
    events: flume::Receiver<Event>,
    ctl_rx: flume::Receiver<Ctl>,
    ctl_tx: flume::Sender<Ctl>,
    dispatch: Option<Dispatch>,
    running: HashMap<u64, Running>,
    next_id: u64,
}

enum Wake {
    Event(Result<Event, flume::RecvError>),
    Ctl(Result<Ctl, flume::RecvError>),
}

impl Runner {
    fn run(mut self) {
        // Set by Stop: the deadline, and how many queued events to start.
        let mut stopping: Option<Option<Instant>> = None;
        let mut to_drain = 0usize;
        let mut events_open = true;
        loop {
            let now = Instant::now();
            self.warn_long_running(now);
            if let Some(deadline) = stopping {
                let drained = to_drain == 0 || !events_open;
                if drained && self.running.is_empty() {
                    break;
                }
                if deadline.is_some_and(|d| now >= d) {
                    break;
                }
            }
            let take_events = events_open
                && self.running.len() < self.limits.max_running
                && (stopping.is_none() || to_drain > 0);
            let wake_at = self
                .running
                .values()
                .filter_map(|r| r.next_warn)
                .chain(stopping.flatten())
                .min();
            let mut sel = flume::Selector::new().recv(&self.ctl_rx, Wake::Ctl);
            if take_events {
                sel = sel.recv(&self.events, Wake::Event);
            }
            let woke = match wake_at {
                Some(t) => sel.wait_deadline(t).ok(),
                None => Some(sel.wait()),
            };
            match woke {
                None => {} // a warning is due, or the deadline passed
                Some(Wake::Event(Ok(event))) => {
                    if stopping.is_some() {
                        to_drain -= 1;
                    }
                    self.start_hook(event);
                }
                Some(Wake::Event(Err(flume::RecvError::Disconnected))) => events_open = false,
                Some(Wake::Ctl(Ok(Ctl::Exited(id)))) => {
                    self.running.remove(&id);
                }
                Some(Wake::Ctl(Ok(Ctl::Stop(deadline)))) => {
                    stopping = Some(deadline);
                    to_drain = self.events.len();
                }
                // We hold a sender ourselves.
                Some(Wake::Ctl(Err(flume::RecvError::Disconnected))) => break,
            }
        }
        let now = Instant::now();
        for r in self.running.values() {
            tracing::warn!(
                resource = %r.info.resource,
                event = %r.info.event,
                hook = %r.info.path.display(),
                pid = r.info.pid,
                running_for = ?now.duration_since(r.started),
                "hook still running at shutdown; not waiting for it"
            );
        }
        // Stop accepting: whatever is queued now is dropped, and once the
        // receiver is gone senders get Disconnected.
        for event in self.events.try_iter().take(QUEUE_CAPACITY) {
            tracing::error!(
                resource = %event.resource,
                event = %event.kind.name(),
                "hook runner stopping; event dropped"
            );
        }
    }

    fn warn_long_running(&mut self, now: Instant) {
        for r in self.running.values_mut() {
            let Some(at) = r.next_warn else { continue };
            if now < at {
                continue;
            }
            tracing::warn!(
                resource = %r.info.resource,
                event = %r.info.event,
                hook = %r.info.path.display(),
                pid = r.info.pid,
                running_for = ?now.duration_since(r.started),
                "hook still running"
            );
            r.next_warn = now.checked_add(self.limits.warn_after);
        }
    }

    /// Starts the hook for one event, if one is configured; failures are
    /// logged.
    fn start_hook(&mut self, event: Event) {
        let name = event.kind.name();
        let path = match catch_unwind(AssertUnwindSafe(|| (self.exec_for)(&event.resource))) {
            Ok(Some(path)) => path,
            Ok(None) => {
                tracing::debug!(resource = %event.resource, event = %name, "no hook configured");
                return;
            }
            Err(_) => {
                tracing::error!(
                    resource = %event.resource,
                    event = %name,
                    "hook lookup panicked; event skipped"
                );
                return;
            }
        };
        let fail = |error: &dyn std::fmt::Display, what: &str| {
            tracing::error!(
                resource = %event.resource,
                event = %name,
                hook = %path.display(),
                error = %error,
                "{what}"
            );
        };
        if let Err(e) = check_executable(&path) {
            fail(&e, "cannot execute hook");
            return;
        }

        // The watcher thread exists before the process does, so that a
        // started process always has someone to reap it.
        let (child_tx, child_rx) = flume::bounded::<(Child, Arc<HookInfo>)>(1);
        let (out_done_tx, out_done_rx) = flume::bounded::<()>(1);
        let id = self.next_id;
        self.next_id += 1;
        let ctl = self.ctl_tx.clone();
        let started = Instant::now();
        let watcher = move || {
            let Ok((mut child, info)) = child_rx.recv() else {
                return; // the process was not started
            };
            let status = child.wait();
            // Let the output reader finish, so that the output is logged
            // before the exit status.
            let _ = out_done_rx.recv_timeout(OUTPUT_GRACE);
            log_exit(&info, status, started.elapsed());
            let _ = ctl.send(Ctl::Exited(id));
        };
        if let Err(e) = spawn_thread("hast-hook-wait", &self.dispatch, watcher) {
            fail(&e, "cannot start a hook watcher thread; hook not run");
            return;
        }

        // stdout and stderr share one pipe, read by a thread of its own.
        let (info_tx, info_rx) = flume::bounded::<Arc<HookInfo>>(1);
        let output = match io::pipe().and_then(|(r, w)| Ok((r, w.try_clone()?, w))) {
            Ok((reader, w1, w2)) => {
                let read = move || {
                    let info = info_rx.recv().ok();
                    log_output(reader, info.as_deref());
                    drop(out_done_tx);
                };
                match spawn_thread("hast-hook-out", &self.dispatch, read) {
                    Ok(_) => Some((w1, w2)),
                    Err(e) => {
                        fail(&e, "cannot start a hook output thread; output discarded");
                        None
                    }
                }
            }
            Err(e) => {
                fail(&e, "cannot create a pipe for hook output; output discarded");
                None
            }
        };

        let mut cmd = Command::new(&path);
        cmd.args(event.kind.hook_args(&event.resource))
            .env("HAST_RESOURCE", &event.resource)
            .env("HAST_EVENT", name)
            .stdin(Stdio::null());
        match &event.kind {
            EventKind::Role { old, new } => cmd.env("HAST_OLDROLE", old).env("HAST_NEWROLE", new),
            _ => cmd.env_remove("HAST_OLDROLE").env_remove("HAST_NEWROLE"),
        };
        match &event.kind {
            EventKind::DiskFailed { leg } => cmd.env("HAST_LEG", leg.name()),
            EventKind::VerifyDone {
                compared,
                different,
                ..
            } => cmd
                .env("HAST_BLOCKS_COMPARED", compared.to_string())
                .env("HAST_BLOCKS_DIFFERENT", different.to_string()),
            EventKind::OutOfSync {
                blocks,
                bytes,
                ranges,
            } => cmd
                .env("HAST_BLOCKS_DIFFERENT", blocks.to_string())
                .env("HAST_BYTES_DIFFERENT", bytes.to_string())
                .env("HAST_RANGES_DIFFERENT", ranges.to_string()),
            _ => &mut cmd,
        };
        if !matches!(event.kind, EventKind::DiskFailed { .. }) {
            cmd.env_remove("HAST_LEG");
        }
        match output {
            Some((w1, w2)) => cmd.stdout(w1).stderr(w2),
            None => cmd.stdout(Stdio::null()).stderr(Stdio::null()),
        };
        let spawned = cmd.spawn();
        // Close our copies of the pipe's write end, so the reader sees EOF
        // when the hook (and its children) are done with it.
        drop(cmd);
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                fail(&e, "cannot execute hook");
                return; // dropping child_tx and info_tx ends both threads
            }
        };
        let info = Arc::new(HookInfo {
            resource: event.resource,
            event: name,
            path,
            pid: child.id(),
        });
        tracing::info!(
            resource = %info.resource,
            event = %info.event,
            hook = %info.path.display(),
            pid = info.pid,
            "hook started"
        );
        // Both channels have room for the one message; the receivers are
        // alive (or the reader thread was not started: nothing to tell).
        let _ = info_tx.send(info.clone());
        let _ = child_tx.send((child, info.clone()));
        let next_warn = if self.limits.warn_after.is_zero() {
            None
        } else {
            started.checked_add(self.limits.warn_after)
        };
        self.running.insert(
            id,
            Running {
                info,
                started,
                next_warn,
            },
        );
    }
}

/// Why `path` cannot be run as a hook, if it cannot.
fn check_executable(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err("not an absolute path".to_owned());
    }
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_owned());
    }
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK)
        .map_err(|e| format!("not executable: {}", e.desc()))
}

/// Logs the hook's output lines at info level, up to [`OUTPUT_LIMIT`]
/// bytes; reads (and discards) the rest until EOF. Without `info` (the
/// hook was not started) just reads to EOF.
fn log_output(reader: impl Read, info: Option<&HookInfo>) {
    let mut reader = BufReader::new(reader);
    let Some(info) = info else {
        let _ = io::copy(&mut reader, &mut io::sink());
        return;
    };
    let mut logged = 0usize;
    let mut line = Vec::new();
    while logged < OUTPUT_LIMIT {
        line.clear();
        let room = (OUTPUT_LIMIT - logged) as u64;
        match reader.by_ref().take(room).read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(n) => logged += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(
                    resource = %info.resource,
                    event = %info.event,
                    pid = info.pid,
                    error = %e,
                    "cannot read hook output"
                );
                return;
            }
        }
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        tracing::info!(
            resource = %info.resource,
            event = %info.event,
            pid = info.pid,
            "hook output: {}",
            String::from_utf8_lossy(&line)
        );
    }
    let discarded = io::copy(&mut reader, &mut io::sink()).unwrap_or(0);
    if discarded > 0 {
        tracing::warn!(
            resource = %info.resource,
            event = %info.event,
            pid = info.pid,
            discarded,
            "hook output truncated after {OUTPUT_LIMIT} bytes"
        );
    }
}

/// Logs how a hook ended: info on exit status 0, warning otherwise.
fn log_exit(info: &HookInfo, status: io::Result<ExitStatus>, elapsed: Duration) {
    let (resource, event, hook, pid) = (&info.resource, info.event, info.path.display(), info.pid);
    match status {
        Ok(s) if s.success() => tracing::info!(
            resource = %resource, event = %event, hook = %hook, pid, elapsed = ?elapsed,
            "hook finished"
        ),
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => tracing::warn!(
                resource = %resource, event = %event, hook = %hook, pid, elapsed = ?elapsed,
                exit_code = code,
                "hook failed"
            ),
            (None, Some(signal)) => tracing::warn!(
                resource = %resource, event = %event, hook = %hook, pid, elapsed = ?elapsed,
                signal,
                core_dumped = s.core_dumped(),
                "hook killed by signal"
            ),
            (None, None) => tracing::warn!(
                resource = %resource, event = %event, hook = %hook, pid, elapsed = ?elapsed,
                status = %s,
                "hook ended abnormally"
            ),
        },
        Err(e) => tracing::error!(
            resource = %resource, event = %event, hook = %hook, pid, error = %e,
            "cannot wait for hook"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Mutex;

    /// A log buffer fed by a tracing subscriber installed for this thread
    /// (and, through `HookRunner::start*`, for the runner's threads).
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl Write for Logs {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Logs {
        fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
            let logs = Logs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .without_time()
                .with_target(false)
                .with_max_level(tracing::Level::DEBUG)
                .finish();
            (logs, tracing::subscriber::set_default(subscriber))
        }

        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }

        /// Log lines containing all of `parts`.
        fn lines_with(&self, parts: &[&str]) -> Vec<String> {
            self.text()
                .lines()
                .filter(|l| parts.iter().all(|p| l.contains(p)))
                .map(str::to_owned)
                .collect()
        }

        /// Waits up to 10 s for a line containing all of `parts`.
        fn wait_for(&self, parts: &[&str]) -> String {
            let until = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(l) = self.lines_with(parts).into_iter().next() {
                    return l;
                }
                assert!(
                    Instant::now() < until,
                    "no log line with {parts:?}:\n{}",
                    self.text()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// A hook appending one line per call to `out`: each argument in <>,
    /// then the HAST_* variables ("unset" when absent).
    fn recorder(dir: &Path, out: &Path) -> PathBuf {
        script(
            dir,
            "record",
            &format!(
                r#"line=""
for a in "$@"; do line="$line<$a>"; done
printf '%s R=%s E=%s O=%s N=%s\n' "$line" "${{HAST_RESOURCE-unset}}" "${{HAST_EVENT-unset}}" "${{HAST_OLDROLE-unset}}" "${{HAST_NEWROLE-unset}}" >> '{}'"#,
                out.display()
            ),
        )
    }

    fn read_lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn role(old: &str, new: &str) -> EventKind {
        EventKind::Role {
            old: old.into(),
            new: new.into(),
        }
    }

    fn all_kinds() -> Vec<EventKind> {
        vec![
            EventKind::Connect,
            EventKind::Disconnect,
            EventKind::SyncStart,
            EventKind::SyncDone,
            EventKind::SyncIntr,
            EventKind::SplitBrain,
            role("secondary", "primary"),
        ]
    }

    /// The pids of the hooks the log says were started.
    fn started_pids(logs: &Logs) -> Vec<u32> {
        logs.lines_with(&["hook started"])
            .iter()
            .map(|l| {
                let pid = l.split("pid=").nth(1).unwrap();
                pid.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    /// Whether `pid` is a zombie child of this process.
    fn is_our_zombie(pid: u32) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // "pid (comm) S ppid ...": comm may hold spaces; split after ')'.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let mut f = rest.split(' ');
        let state = f.next().unwrap();
        let ppid: u32 = f.next().unwrap().parse().unwrap();
        state == "Z" && ppid == std::process::id()
    }

    #[test]
    fn names_and_args() {
        let names: Vec<_> = all_kinds().iter().map(EventKind::name).collect();
        assert_eq!(
            names,
            [
                "connect",
                "disconnect",
                "syncstart",
                "syncdone",
                "syncintr",
                "split-brain",
                "role"
            ]
        );
        assert_eq!(EventKind::SplitBrain.hook_args("r0"), ["split-brain", "r0"]);
        assert_eq!(
            role("init", "secondary").hook_args("r0"),
            ["role", "r0", "init", "secondary"]
        );
        let e = Event::new("disk1", EventKind::Connect);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        assert!(now.as_millis().abs_diff(u128::from(e.time_unix_ms)) < 60_000);
        assert_eq!(e.resource, "disk1");
    }

    #[test]
    fn event_json_shape_and_round_trip() {
        let ev = |kind| Event {
            resource: "disk1".into(),
            kind,
            time_unix_ms: 1_700_000_000_123,
        };
        let cases = [
            (
                ev(role("secondary", "primary")),
                r#"{"resource":"disk1","event":"role","old":"secondary","new":"primary","time_unix_ms":1700000000123}"#,
            ),
            (
                ev(EventKind::SplitBrain),
                r#"{"resource":"disk1","event":"split-brain","time_unix_ms":1700000000123}"#,
            ),
            (
                ev(EventKind::Connect),
                r#"{"resource":"disk1","event":"connect","time_unix_ms":1700000000123}"#,
            ),
        ];
        for (event, json) in cases {
            assert_eq!(serde_json::to_string(&event).unwrap(), json);
            assert_eq!(serde_json::from_str::<Event>(json).unwrap(), event);
        }
        for kind in all_kinds() {
            let event = ev(kind);
            let json = serde_json::to_string(&event).unwrap();
            assert!(json.contains(&format!(r#""event":"{}""#, event.kind.name())));
            assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), event);
        }
        // Field order does not matter when reading.
        let json =
            r#"{"new":"init","time_unix_ms":5,"event":"role","old":"primary","resource":"r"}"#;
        assert_eq!(
            serde_json::from_str::<Event>(json).unwrap(),
            Event {
                resource: "r".into(),
                kind: role("primary", "init"),
                time_unix_ms: 5
            }
        );
        assert!(serde_json::from_str::<Event>(
            r#"{"resource":"r","event":"bogus","time_unix_ms":1}"#
        )
        .is_err());
        assert!(serde_json::from_str::<Event>(
            r#"{"resource":"r","event":"role","time_unix_ms":1}"#
        )
        .is_err());
    }

    #[test]
    fn argv_and_environment_for_every_event() {
        let (logs, _guard) = Logs::capture();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let hook = recorder(dir.path(), &out);
        // One at a time, so the file is written in start order.
        let limits = HookLimits {
            max_running: 1,
            ..HookLimits::default()
        };
        let runner = HookRunner::start_with(move |_| Some(hook.clone()), limits);
        for kind in all_kinds() {
            runner.submit(Event::new("disk1", kind));
        }
        runner.shutdown(Duration::from_secs(20));
        assert_eq!(
            read_lines(&out),
            [
                "<connect><disk1> R=disk1 E=connect O=unset N=unset",
                "<disconnect><disk1> R=disk1 E=disconnect O=unset N=unset",
                "<syncstart><disk1> R=disk1 E=syncstart O=unset N=unset",
                "<syncdone><disk1> R=disk1 E=syncdone O=unset N=unset",
                "<syncintr><disk1> R=disk1 E=syncintr O=unset N=unset",
                "<split-brain><disk1> R=disk1 E=split-brain O=unset N=unset",
                "<role><disk1><secondary><primary> R=disk1 E=role O=secondary N=primary",
            ]
        );
        assert_eq!(
            logs.lines_with(&["INFO", "hook finished", "resource=disk1"])
                .len(),
            7
        );
        assert_eq!(runner_dropped_none(&logs), 0);
        // Every child was reaped.
        let pids = started_pids(&logs);
        assert_eq!(pids.len(), 7);
        for pid in pids {
            assert!(!is_our_zombie(pid), "hook {pid} is a zombie");
        }
    }

    /// Count of "event dropped" lines.
    fn runner_dropped_none(logs: &Logs) -> usize {
        logs.lines_with(&["event dropped"]).len()
    }

    #[test]
    fn same_resource_hooks_start_in_event_order() {
        let (logs, _guard) = Logs::capture();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let hook = recorder(dir.path(), &out);
        let runner = HookRunner::start(move |_| Some(hook.clone()));
        let mut sent = Vec::new();
        for i in 0..6 {
            for res in ["a", "b"] {
                let kind = all_kinds()[(i + usize::from(res == "b")) % 7].clone();
                sent.push((res, kind.name()));
                runner.submit(Event::new(res, kind));
            }
        }
        runner.shutdown(Duration::from_secs(20));
        for res in ["a", "b"] {
            let expect: Vec<_> = sent.iter().filter(|s| s.0 == res).map(|s| s.1).collect();
            let started: Vec<_> = logs
                .lines_with(&["hook started", &format!("resource={res} ")])
                .iter()
                .map(|l| {
                    let e = l.split("event=").nth(1).unwrap();
                    e.split(' ').next().unwrap().to_owned()
                })
                .collect();
            assert_eq!(started, expect, "start order of {res}");
            // All ran (in whatever order they finished).
            let mut ran: Vec<_> = read_lines(&out)
                .into_iter()
                .filter(|l| l.contains(&format!(" R={res} ")))
                .collect();
            ran.sort();
            let mut want: Vec<_> = expect
                .iter()
                .map(|e| {
                    let roles = if *e == "role" {
                        "<secondary><primary>"
                    } else {
                        ""
                    };
                    let env = if *e == "role" {
                        "O=secondary N=primary"
                    } else {
                        "O=unset N=unset"
                    };
                    format!("<{e}><{res}>{roles} R={res} E={e} {env}")
                })
                .collect();
            want.sort();
            assert_eq!(ran, want);
        }
    }

    #[test]
    fn failures_are_logged_and_do_not_stop_later_hooks() {
        let (logs, _guard) = Logs::capture();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let good = recorder(dir.path(), &out);
        let failing = script(dir.path(), "fail", "echo failing >&2\nexit 3");
        let killed = script(dir.path(), "killed", "kill -KILL $$");
        let missing = dir.path().join("no-such-hook");
        let noexec = dir.path().join("noexec");
        std::fs::write(&noexec, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&noexec, std::fs::Permissions::from_mode(0o644)).unwrap();
        let map: HashMap<&str, PathBuf> = [
            ("fail", failing.clone()),
            ("killed", killed),
            ("missing", missing.clone()),
            ("noexec", noexec.clone()),
            ("dir", dir.path().to_owned()),
            ("relative", PathBuf::from("bin/hook")),
            ("good", good),
        ]
        .into_iter()
        .collect();
        let runner = HookRunner::start(move |r| map.get(r).cloned());
        runner.submit(Event::new("fail", EventKind::Connect));
        runner.submit(Event::new("killed", EventKind::SyncIntr));
        runner.submit(Event::new("missing", EventKind::Disconnect));
        runner.submit(Event::new("noexec", EventKind::SyncStart));
        runner.submit(Event::new("dir", EventKind::SplitBrain));
        runner.submit(Event::new("relative", role("init", "primary")));
        runner.submit(Event::new("unconfigured", EventKind::Connect));
        runner.submit(Event::new("good", EventKind::SyncDone));
        runner.shutdown(Duration::from_secs(20));

        assert_eq!(
            read_lines(&out),
            ["<syncdone><good> R=good E=syncdone O=unset N=unset"]
        );
        let failed = logs.wait_for(&["WARN", "hook failed", "resource=fail", "event=connect"]);
        assert!(failed.contains("exit_code=3"), "{failed}");
        assert!(
            failed.contains(&format!("hook={}", failing.display())),
            "{failed}"
        );
        logs.wait_for(&["hook output: failing", "resource=fail"]);
        let sig = logs.wait_for(&["WARN", "hook killed by signal", "resource=killed"]);
        assert!(sig.contains("signal=9"), "{sig}");
        for (res, event, path, why) in [
            (
                "missing",
                "disconnect",
                missing.display().to_string(),
                "No such file",
            ),
            (
                "noexec",
                "syncstart",
                noexec.display().to_string(),
                "not executable",
            ),
            (
                "dir",
                "split-brain",
                dir.path().display().to_string(),
                "not a regular file",
            ),
            (
                "relative",
                "role",
                "bin/hook".to_owned(),
                "not an absolute path",
            ),
        ] {
            let line = logs.wait_for(&[
                "ERROR",
                "cannot execute hook",
                &format!("resource={res} "),
                &format!("event={event} "),
                &format!("hook={path} "),
            ]);
            assert!(line.contains(why), "{line}");
        }
        logs.wait_for(&["DEBUG", "no hook configured", "resource=unconfigured"]);
        assert_eq!(logs.lines_with(&["hook started"]).len(), 3);
    }

    #[test]
    fn long_running_hook_is_reported() {
        let (logs, _guard) = Logs::capture();
        let dir = tempfile::tempdir().unwrap();
        let slow = script(dir.path(), "slow", "sleep 0.6");
        let limits = HookLimits {
            warn_after: Duration::from_millis(100),
            max_running: 4,
        };
        let runner = HookRunner::start_with(move |_| Some(slow.clone()), limits);
        runner.submit(Event::new("slow", role("secondary", "primary")));
        let warned = logs.wait_for(&["WARN", "hook still running", "resource=slow", "event=role"]);
        assert!(warned.contains("running_for="), "{warned}");
        runner.shutdown(Duration::from_secs(20));
        // Reported every interval, not just once.
        assert!(
            logs.lines_with(&["hook still running", "resource=slow"])
                .len()
                >= 2
        );
        logs.wait_for(&["INFO", "hook finished", "resource=slow"]);
        assert!(logs.lines_with(&["at shutdown"]).is_empty());
    }

    #[test]
    fn submit_never_blocks_and_counts_drops() {
        let (logs, _guard) = Logs::capture();
        let (entered_tx, entered_rx) = flume::bounded::<()>(1);
        let (release_tx, release_rx) = flume::bounded::<()>(1);
        // The first lookup blocks the runner until released.
        let runner = HookRunner::start(move |_| {
            let _ = entered_tx.try_send(());
            let _ = release_rx.recv();
            None
        });
        runner.submit(Event::new("r0", EventKind::Connect));
        entered_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let t = Instant::now();
        for i in 1..=QUEUE_CAPACITY + 10 {
            runner.submit(Event::new(format!("r{i}"), EventKind::Disconnect));
        }
        let submitter = runner.submitter();
        submitter.submit(Event::new("extra", EventKind::SplitBrain));
        assert!(matches!(
            runner
                .sender()
                .try_send(Event::new("raw", EventKind::Connect)),
            Err(flume::TrySendError::Full(_))
        ));
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "submit blocked: {:?}",
            t.elapsed()
        );
        assert_eq!(runner.dropped(), 11);
        let dropped = logs.lines_with(&["ERROR", "hook queue full; event dropped"]);
        assert_eq!(dropped.len(), 11);
        assert!(dropped[0].contains(&format!("resource=r{} ", QUEUE_CAPACITY + 1)));
        assert!(dropped[0].contains("event=disconnect"));
        assert!(dropped[10].contains("resource=extra event=split-brain"));
        drop(release_tx);
        runner.shutdown(Duration::from_secs(20));
        // Everything queued before shutdown was still processed.
        assert_eq!(
            logs.lines_with(&["no hook configured"]).len(),
            QUEUE_CAPACITY + 1
        );
        // After shutdown the queue refuses events.
        submitter.submit(Event::new("late", EventKind::Connect));
        logs.wait_for(&["hook runner stopped; event dropped", "resource=late"]);
    }

    #[test]
    fn shutdown_waits_for_running_hooks() {
        let (logs, _guard) = Logs::capture();
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker");
        let hook = script(
            dir.path(),
            "hook",
            &format!("sleep 0.4\necho done > '{}'", marker.display()),
        );
        let runner = HookRunner::start(move |_| Some(hook.clone()));
        let t = Instant::now();
        runner.submit(Event::new("r", EventKind::SyncDone));
        runner.shutdown(Duration::from_secs(20));
        assert!(t.elapsed() >= Duration::from_millis(400));
        assert!(
            marker.exists(),
            "shutdown returned before the hook finished"
        );
        logs.wait_for(&["hook finished", "resource=r"]);
        assert!(logs.lines_with(&["at shutdown"]).is_empty());
    }

    #[test]
    fn shutdown_gives_up_after_grace_without_killing() {
        let (logs, _guard) = Logs::capture();
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker");
        let hook = script(
            dir.path(),
            "hook",
            &format!("sleep 2\necho done > '{}'", marker.display()),
        );
        let runner = HookRunner::start(move |_| Some(hook.clone()));
        let t = Instant::now();
        runner.submit(Event::new("r", EventKind::SyncStart));
        runner.shutdown(Duration::from_millis(300));
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_millis(1800), "{took:?}");
        assert!(!marker.exists());
        logs.wait_for(&[
            "WARN",
            "hook still running at shutdown; not waiting for it",
            "resource=r",
            "event=syncstart",
        ]);
        // Not killed: it finishes, and its watcher reaps it and logs it.
        logs.wait_for(&["hook finished", "resource=r"]);
        assert!(marker.exists());
        let pid = started_pids(&logs)[0];
        assert!(!is_our_zombie(pid));
    }

    #[test]
    fn output_is_logged_and_bounded() {
        let (logs, _guard) = Logs::capture();
        let dir = tempfile::tempdir().unwrap();
        let hook = script(
            dir.path(),
            "chatty",
            "echo hello-out\necho hello-err >&2\nprintf 'no newline'\necho\n\
             yes 0123456789abcdef | head -n 10000\necho after-the-flood",
        );
        let runner = HookRunner::start(move |_| Some(hook.clone()));
        runner.submit(Event::new("c", EventKind::Connect));
        runner.shutdown(Duration::from_secs(20));
        logs.wait_for(&[
            "INFO",
            "hook output: hello-out",
            "resource=c",
            "event=connect",
        ]);
        logs.wait_for(&["INFO", "hook output: hello-err", "resource=c"]);
        logs.wait_for(&["hook output: no newline", "resource=c"]);
        let flood = logs.lines_with(&["hook output: 0123456789abcdef"]).len();
        let first = "hello-out\nhello-err\nno newline\n".len();
        assert_eq!(flood, (OUTPUT_LIMIT - first) / 17, "lines logged");
        // The line crossing the bound is logged up to it.
        let partial = &"0123456789abcdef"[..(OUTPUT_LIMIT - first) % 17];
        let last = logs.lines_with(&["hook output:"]).pop().unwrap();
        assert!(last.contains(&format!("hook output: {partial} ")), "{last}");
        assert!(logs.lines_with(&["after-the-flood"]).is_empty());
        let trunc = logs.wait_for(&[
            "WARN",
            "hook output truncated after 65536 bytes",
            "resource=c",
        ]);
        assert!(trunc.contains("discarded="), "{trunc}");
        // The hook was not stalled or killed by the bound.
        logs.wait_for(&["INFO", "hook finished", "resource=c"]);
    }

    #[test]
    fn at_most_max_running_hooks_at_once() {
        let (_logs, _guard) = Logs::capture();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let hook = script(
            dir.path(),
            "hook",
            &format!(
                "echo + >> '{o}'\nsleep 0.2\necho - >> '{o}'",
                o = out.display()
            ),
        );
        let limits = HookLimits {
            max_running: 2,
            ..HookLimits::default()
        };
        let runner = HookRunner::start_with(move |_| Some(hook.clone()), limits);
        for i in 0..6 {
            runner.submit(Event::new(format!("r{i}"), EventKind::Connect));
        }
        runner.shutdown(Duration::from_secs(20));
        let lines = read_lines(&out);
        assert_eq!(lines.len(), 12);
        let (mut now, mut max) = (0i32, 0i32);
        for l in &lines {
            now += if l == "+" { 1 } else { -1 };
            max = max.max(now);
        }
        assert_eq!(max, 2, "{lines:?}");
    }

    #[test]
    fn drop_without_shutdown_does_not_hang() {
        let (logs, _guard) = Logs::capture();
        let runner = HookRunner::start(|_| None);
        runner.submit(Event::new("r", EventKind::Connect));
        let sender = runner.sender();
        let t = Instant::now();
        drop(runner);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(sender
            .try_send(Event::new("r", EventKind::Connect))
            .is_err());
        assert!(logs.lines_with(&["panicked"]).is_empty());
    }
}
