//! The event stream of `hastctl events`: a [`Broadcaster`] in hastd fans
//! out every event the hooks get (connect, disconnect, syncstart, syncdone,
//! syncintr, split-brain, role changes) plus periodic synchronisation
//! progress samples to the subscribers of the control socket's `events`
//! request.
//!
//! - Events reach the broadcaster through a [`Notifier`], which hastd uses
//!   wherever it used to submit hook events: every hook event is also a
//!   stream event, in the same order.
//! - Progress: a sampler thread reads each resource's [`ResourceStats`]
//!   synchronisation counters every [`PROGRESS_INTERVAL`] and publishes a
//!   `progress` event for every resource between its `syncstart` and its
//!   `syncdone`/`syncintr`/`disconnect` (and only while someone listens).
//! - Each subscriber has its own thread writing to its connection and a
//!   queue of [`SUBSCRIBER_QUEUE`] events. Publishing never blocks: a
//!   subscriber whose queue is full, or whose connection does not take a
//!   line within [`WRITE_TIMEOUT`], is dropped (its connection closed) with
//!   a log line. At most [`MAX_SUBSCRIBERS`] subscribers at once.
//!
//! # JSON form
//!
//! One flat object per line: the hooks' [`Event`] JSON, plus the `progress`
//! event:
//!
//! ```text
//! {"resource":"disk1","event":"connect","time_unix_ms":1700000000000}
//! {"resource":"disk1","event":"role","old":"secondary","new":"primary","time_unix_ms":1700000000000}
//! {"resource":"disk1","event":"progress","direction":"to-secondary","done":12582912,"total":67108864,"time_unix_ms":1700000000000}
//! ```

use std::collections::HashSet;
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use hast_datapath::events::now_unix_ms;
use hast_datapath::stats::ResourceStats;
use serde::Serialize;

use crate::hooks::{Event, EventKind, HookSubmitter};
use crate::proto::Response;

/// Subscribers at most; further `events` requests are refused.
pub const MAX_SUBSCRIBERS: usize = 32;
/// Events queued per subscriber before it counts as too slow and is
/// dropped.
pub const SUBSCRIBER_QUEUE: usize = 1024;
/// How often synchronisation progress is sampled (at most one `progress`
/// event per resource per interval).
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// How long writing one line to a subscriber may take before it is
/// dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Start of the error of an `events` request refused because
/// [`MAX_SUBSCRIBERS`] are connected (hastctl exits with EX_TEMPFAIL).
pub const TOO_MANY_SUBSCRIBERS: &str = "too many event subscribers";

/// The text form of `hastctl events`:
///
/// ```text
/// 2026-11-22T07:00:00Z disk1 role secondary primary
/// 2026-11-22T07:00:00Z disk1 syncstart
/// 2026-11-22T07:00:01Z disk1 sync 12.0MB/64.0MB
/// ```
pub fn text(ev: &Event) -> String {
    let head = format!("{} {}", utc_timestamp(ev.time_unix_ms), ev.resource);
    match &ev.kind {
        EventKind::Role { old, new } => format!("{head} role {old} {new}"),
        EventKind::DiskFailed { leg } => format!("{head} disk-failed {}", leg.name()),
        EventKind::Progress { done, total, .. } => {
            format!("{head} sync {}/{}", size_1dp(*done), size_1dp(*total))
        }
        EventKind::VerifyProgress {
            done,
            total,
            different,
        } => format!(
            "{head} verify {}/{} {different} blocks differ",
            size_1dp(*done),
            size_1dp(*total)
        ),
        EventKind::VerifyDone {
            ok,
            compared,
            different,
        } => format!(
            "{head} verifydone {} {compared} blocks compared, {different} differ",
            if *ok { "complete" } else { "stopped" }
        ),
        EventKind::OutOfSync {
            blocks,
            bytes,
            ranges,
        } => format!(
            "{head} out-of-sync {blocks} blocks ({}) in {ranges} ranges",
            size_1dp(*bytes)
        ),
        k => format!("{head} {}", k.name()),
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC) of a Unix time in milliseconds.
pub fn utc_timestamp(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 >= 0.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Bytes with a binary unit and always one decimal: `512B`, `12.0MB`.
pub fn size_1dp(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KB", "MB", "GB", "TB", "PB", "EB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

/// One connected subscriber, as the broadcaster sees it.
struct Sub {
    id: u64,
    /// Resources it listens to.
    names: HashSet<String>,
    tx: flume::Sender<Event>,
    /// A handle on its connection, to close it when it is dropped.
    conn: UnixStream,
}

#[derive(Default)]
struct Inner {
    subs: Vec<Sub>,
    next_id: u64,
    /// Resources between syncstart and its end (progress is sampled for
    /// these only).
    syncing: HashSet<String>,
    /// Resources between verifystart and verifydone.
    verifying: HashSet<String>,
}

impl Inner {
    fn publish(&mut self, ev: &Event) {
        match ev.kind {
            EventKind::SyncStart => {
                self.syncing.insert(ev.resource.clone());
            }
            EventKind::SyncDone
            | EventKind::SyncIntr
            | EventKind::Disconnect
            | EventKind::Role { .. } => {
                self.syncing.remove(&ev.resource);
            }
            EventKind::VerifyStart => {
                self.verifying.insert(ev.resource.clone());
            }
            _ => {}
        }
        if matches!(
            ev.kind,
            EventKind::VerifyDone { .. } | EventKind::Role { .. }
        ) {
            self.verifying.remove(&ev.resource);
        }
        self.subs.retain(|s| {
            if !s.names.contains(&ev.resource) {
                return true;
            }
            match s.tx.try_send(ev.clone()) {
                Ok(()) => true,
                Err(flume::TrySendError::Full(_)) => {
                    tracing::warn!(
                        subscriber = s.id,
                        queued = SUBSCRIBER_QUEUE,
                        "event subscriber too slow; dropped"
                    );
                    let _ = s.conn.shutdown(Shutdown::Both);
                    false
                }
                // Its thread has ended (and will remove it itself).
                Err(flume::TrySendError::Disconnected(_)) => false,
            }
        });
    }
}

/// Fans events out to the `events` subscribers; cheap to clone. See the
/// module documentation.
#[derive(Clone, Default)]
pub struct Broadcaster {
    inner: Arc<Mutex<Inner>>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // The state stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Broadcaster {
    /// A broadcaster without subscribers.
    pub fn new() -> Broadcaster {
        Broadcaster::default()
    }

    /// Sends an event to every subscriber of its resource; never blocks.
    pub fn publish(&self, ev: &Event) {
        lock(&self.inner).publish(ev);
    }

    /// Subscribers connected now.
    pub fn subscribers(&self) -> usize {
        lock(&self.inner).subs.len()
    }

    /// Serves an `events` request whose reply is `ack` (the snapshot of the
    /// selected resources, without error): registers a subscriber for the
    /// resources in `ack`, writes `ack` as the first line, and hands the
    /// connection to a thread of its own that writes the events. Returns
    /// at once. When [`MAX_SUBSCRIBERS`] are connected, writes an error
    /// reply instead and closes.
    pub fn subscribe(&self, stream: &UnixStream, ack: Response) -> std::io::Result<()> {
        let names: HashSet<String> = ack.resources.iter().map(|r| r.name.clone()).collect();
        let (tx, rx) = flume::bounded(SUBSCRIBER_QUEUE);
        let conn = stream.try_clone()?;
        conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let writer = conn.try_clone()?;
        let registered = {
            let mut g = lock(&self.inner);
            if g.subs.len() >= MAX_SUBSCRIBERS {
                None
            } else {
                let id = g.next_id;
                g.next_id += 1;
                g.subs.push(Sub {
                    id,
                    names: names.clone(),
                    tx,
                    conn,
                });
                Some((id, g.subs.len()))
            }
        };
        let Some((id, count)) = registered else {
            tracing::warn!(
                max = MAX_SUBSCRIBERS,
                "event subscription refused: too many subscribers"
            );
            let refusal = Response {
                error: Some(format!(
                    "{TOO_MANY_SUBSCRIBERS} (at most {MAX_SUBSCRIBERS}); try again later"
                )),
                error_kind: Some(crate::proto::ErrorKind::Busy),
                resources: vec![],
                ..ack
            };
            return write_json_line(&writer, &refusal);
        };
        // The acknowledgement goes out before any event: the writer thread
        // starts only afterwards; events published meanwhile are queued.
        if let Err(e) = write_json_line(&writer, &ack) {
            self.remove(id);
            return Err(e);
        }
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort();
        tracing::info!(subscriber = id, resources = ?names, subscribers = count,
            "event subscriber connected");
        let inner = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("hast-events-sub".into())
            .spawn(move || serve_subscriber(id, writer, rx, inner));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start an event subscriber thread");
            self.remove(id);
            return Err(e);
        }
        Ok(())
    }

    fn remove(&self, id: u64) {
        lock(&self.inner).subs.retain(|s| s.id != id);
    }

    /// Starts the thread publishing `progress` events for the resources
    /// `resources()` returns (asked at every sample: a reload changes
    /// them); it ends when the last clone of this broadcaster is gone.
    pub fn start_progress_sampler(
        &self,
        resources: impl Fn() -> Vec<(String, Arc<ResourceStats>)> + Send + 'static,
    ) {
        let inner = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("hast-progress".into())
            .spawn(move || sample_progress(&inner, resources));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the sync progress thread; no progress events");
        }
    }
}

fn write_json_line<T: Serialize>(mut w: &UnixStream, v: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_string(v).map_err(std::io::Error::other)?;
    line.push('\n');
    w.write_all(line.as_bytes())
}

/// The thread of one subscriber: writes its events until it goes away, is
/// dropped, or hastd stops.
fn serve_subscriber(
    id: u64,
    conn: UnixStream,
    rx: flume::Receiver<Event>,
    inner: Weak<Mutex<Inner>>,
) {
    let why = loop {
        match rx.recv_timeout(PROGRESS_INTERVAL) {
            Ok(ev) => {
                if let Err(e) = write_json_line(&conn, &ev) {
                    break format!("write failed: {e}");
                }
            }
            Err(flume::RecvTimeoutError::Timeout) => {
                if peer_closed(&conn) {
                    break "closed by the client".to_string();
                }
            }
            Err(flume::RecvTimeoutError::Disconnected) => break "dropped".to_string(),
        }
    };
    if let Some(inner) = inner.upgrade() {
        lock(&inner).subs.retain(|s| s.id != id);
    }
    let _ = conn.shutdown(Shutdown::Both);
    tracing::info!(subscriber = id, reason = %why, "event subscriber disconnected");
}

/// Has the client closed its end? Reads (and discards) whatever it sent,
/// without waiting.
fn peer_closed(conn: &UnixStream) -> bool {
    use nix::errno::Errno;
    use nix::sys::socket::{recv, MsgFlags};
    let mut buf = [0u8; 512];
    loop {
        match recv(conn.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(Errno::EAGAIN) => return false,
            Err(Errno::EINTR) => continue,
            Err(_) => return true,
        }
    }
}

fn sample_progress(
    inner: &Weak<Mutex<Inner>>,
    resources: impl Fn() -> Vec<(String, Arc<ResourceStats>)>,
) {
    loop {
        std::thread::sleep(PROGRESS_INTERVAL);
        let Some(inner) = inner.upgrade() else { return };
        if lock(&inner).subs.is_empty() {
            continue;
        }
        let resources = resources();
        let mut g = lock(&inner);
        if g.syncing.is_empty() && g.verifying.is_empty() {
            continue;
        }
        for (name, stats) in &resources {
            let sync = g
                .syncing
                .contains(name)
                .then(|| progress_of(stats))
                .flatten();
            let verify = g
                .verifying
                .contains(name)
                .then(|| verify_progress_of(stats))
                .flatten();
            for kind in sync.into_iter().chain(verify) {
                g.publish(&Event {
                    resource: name.clone(),
                    kind,
                    time_unix_ms: now_unix_ms(),
                });
            }
        }
    }
}

/// The progress of a running synchronisation, from the data path's
/// counters; None when none runs.
fn progress_of(stats: &ResourceStats) -> Option<EventKind> {
    let direction = stats.sync_state()?.name();
    let total = stats.sync_total.load(Relaxed);
    let done = stats.sync_done.load(Relaxed).min(total);
    Some(EventKind::Progress {
        direction: direction.into(),
        done,
        total,
    })
}

/// The progress of a running verify; None when none runs.
fn verify_progress_of(stats: &ResourceStats) -> Option<EventKind> {
    let g = stats.verify.lock().ok()?;
    let v = g.as_ref()?;
    (v.state == hast_datapath::stats::VerifyState::Running).then_some(EventKind::VerifyProgress {
        done: v.done,
        total: v.length,
        different: v.blocks_different,
    })
}

/// Where hastd submits events: to the hooks and to the event stream.
#[derive(Clone)]
pub struct Notifier {
    hooks: HookSubmitter,
    events: Broadcaster,
}

impl Notifier {
    /// Submits to `hooks` and publishes on `events`.
    pub fn new(hooks: HookSubmitter, events: Broadcaster) -> Notifier {
        Notifier { hooks, events }
    }

    /// Publishes an event to the stream's subscribers, then queues it for
    /// the hooks; never blocks.
    pub fn submit(&self, event: Event) {
        self.events.publish(&event);
        self.hooks.submit(event);
    }

    /// The event stream.
    pub fn events(&self) -> &Broadcaster {
        &self.events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ResourceReport;
    use hast_datapath::generation::SyncDirection;
    use std::io::{BufRead, BufReader};
    use std::time::Instant;

    fn ev(res: &str, kind: EventKind) -> Event {
        Event {
            resource: res.into(),
            kind,
            time_unix_ms: 1_700_000_000_000,
        }
    }

    fn ack(names: &[&str]) -> Response {
        Response {
            version: 1,
            error: None,
            error_kind: None,
            reload: None,
            resources: names
                .iter()
                .map(|n| ResourceReport {
                    name: (*n).into(),
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn json_shapes() {
        let j = |e: &Event| serde_json::to_string(e).unwrap();
        assert_eq!(
            j(&ev("disk1", EventKind::Connect)),
            r#"{"resource":"disk1","event":"connect","time_unix_ms":1700000000000}"#
        );
        assert_eq!(
            j(&ev("disk1", EventKind::SplitBrain)),
            r#"{"resource":"disk1","event":"split-brain","time_unix_ms":1700000000000}"#
        );
        assert_eq!(
            j(&ev(
                "disk1",
                EventKind::Role {
                    old: "secondary".into(),
                    new: "primary".into()
                }
            )),
            r#"{"resource":"disk1","event":"role","old":"secondary","new":"primary","time_unix_ms":1700000000000}"#
        );
        let p = ev(
            "disk1",
            EventKind::Progress {
                direction: "to-secondary".into(),
                done: 5,
                total: 10,
            },
        );
        assert_eq!(
            j(&p),
            r#"{"resource":"disk1","event":"progress","direction":"to-secondary","done":5,"total":10,"time_unix_ms":1700000000000}"#
        );
        let back: Event = serde_json::from_str(&j(&p)).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn text_form() {
        let t = 1_795_330_800_000; // 2026-11-22T07:00:00Z
        let mut e = ev(
            "disk1",
            EventKind::Role {
                old: "secondary".into(),
                new: "primary".into(),
            },
        );
        e.time_unix_ms = t;
        assert_eq!(
            text(&e),
            "2026-11-22T07:00:00Z disk1 role secondary primary"
        );
        e.kind = EventKind::SyncStart;
        assert_eq!(text(&e), "2026-11-22T07:00:00Z disk1 syncstart");
        e.kind = EventKind::Progress {
            direction: "to-secondary".into(),
            done: 12 << 20,
            total: 64 << 20,
        };
        assert_eq!(text(&e), "2026-11-22T07:00:00Z disk1 sync 12.0MB/64.0MB");
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(4_102_444_799_999), "2099-12-31T23:59:59Z");
        assert_eq!(size_1dp(0), "0B");
        assert_eq!(size_1dp(1536), "1.5KB");
        assert_eq!(size_1dp(3 << 30), "3.0GB");
    }

    fn read_event(r: &mut impl BufRead) -> Event {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// A subscriber to `r1`, with its acknowledgement read.
    fn subscribed(b: &Broadcaster) -> (BufReader<UnixStream>, Response) {
        let (server, client) = UnixStream::pair().unwrap();
        b.subscribe(&server, ack(&["r1"])).unwrap();
        drop(server);
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut r = BufReader::new(client);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let first = serde_json::from_str(&line).unwrap();
        (r, first)
    }

    #[test]
    fn subscribers_get_their_resources_events_after_the_ack() {
        let b = Broadcaster::new();
        let (mut r, first) = subscribed(&b);
        assert_eq!(first.resources[0].name, "r1");
        b.publish(&ev("r2", EventKind::Connect));
        b.publish(&ev("r1", EventKind::Connect));
        b.publish(&ev("r1", EventKind::SyncStart));
        assert_eq!(read_event(&mut r).kind, EventKind::Connect);
        assert_eq!(read_event(&mut r).kind, EventKind::SyncStart);
        assert_eq!(b.subscribers(), 1);
        // The client goes away: the subscriber is removed.
        drop(r);
        let start = Instant::now();
        while b.subscribers() != 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "not removed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_slow_subscriber_is_dropped_and_never_blocks_publishing() {
        let b = Broadcaster::new();
        let (server, client) = UnixStream::pair().unwrap();
        b.subscribe(&server, ack(&["r1"])).unwrap();
        // The client never reads. Publishing stays fast and the
        // subscriber is dropped once its socket and queue are full.
        let start = Instant::now();
        for i in 0..200_000u64 {
            b.publish(&ev(
                "r1",
                EventKind::Progress {
                    direction: "to-secondary".into(),
                    done: i,
                    total: 1 << 40,
                },
            ));
            if b.subscribers() == 0 {
                break;
            }
        }
        assert_eq!(b.subscribers(), 0, "the slow subscriber was dropped");
        assert!(start.elapsed() < Duration::from_secs(5), "publish blocked");
        drop(client);
    }

    #[test]
    fn at_most_max_subscribers() {
        let b = Broadcaster::new();
        let mut keep = Vec::new();
        for _ in 0..MAX_SUBSCRIBERS {
            let (server, client) = UnixStream::pair().unwrap();
            b.subscribe(&server, ack(&["r1"])).unwrap();
            keep.push(client);
        }
        let (server, client) = UnixStream::pair().unwrap();
        b.subscribe(&server, ack(&["r1"])).unwrap();
        drop(server);
        let mut line = String::new();
        BufReader::new(client).read_line(&mut line).unwrap();
        let resp: Response = serde_json::from_str(&line).unwrap();
        assert!(resp
            .error
            .as_deref()
            .unwrap()
            .starts_with(TOO_MANY_SUBSCRIBERS));
        assert_eq!(b.subscribers(), MAX_SUBSCRIBERS);
    }

    #[test]
    fn progress_only_between_syncstart_and_its_end() {
        let b = Broadcaster::new();
        let stats = Arc::new(ResourceStats::default());
        stats.set_sync_state(Some(SyncDirection::ToSecondary));
        stats.sync_total.store(100, Relaxed);
        stats.sync_done.store(40, Relaxed);
        let sampled = stats.clone();
        b.start_progress_sampler(move || vec![("r1".into(), sampled.clone())]);
        let (mut r, _) = subscribed(&b);
        // Direction set but no syncstart seen: nothing for 1.5 intervals.
        std::thread::sleep(PROGRESS_INTERVAL * 3 / 2);
        b.publish(&ev("r1", EventKind::SyncStart));
        assert_eq!(read_event(&mut r).kind, EventKind::SyncStart);
        let p = read_event(&mut r);
        assert_eq!(
            p.kind,
            EventKind::Progress {
                direction: "to-secondary".into(),
                done: 40,
                total: 100
            }
        );
        stats.set_sync_state(None);
        b.publish(&ev("r1", EventKind::SyncDone));
        // Whatever progress was sampled before, syncdone comes, and then
        // nothing but what we publish.
        loop {
            let e = read_event(&mut r);
            if e.kind == EventKind::SyncDone {
                break;
            }
            assert_eq!(e.kind.name(), "progress");
        }
        stats.set_sync_state(Some(SyncDirection::ToSecondary));
        std::thread::sleep(PROGRESS_INTERVAL * 3 / 2);
        b.publish(&ev("r1", EventKind::Connect));
        assert_eq!(read_event(&mut r).kind, EventKind::Connect);
    }
}
