//! Events: the one list of what can happen to a resource, reported by the
//! data path and by the control plane (role changes), run as `exec` hooks
//! and published on the event stream (`hastctl events`).
//!
//! The data path sends [`Event`]s with `try_send` on a bounded channel
//! ([`EventSink`]): it never blocks on the control plane.
//!
//! # JSON form
//!
//! One flat object: the resource, the event name under `"event"`, the
//! event's fields, and the time in milliseconds since the Unix epoch:
//!
//! ```text
//! {"resource":"disk1","event":"connect","time_unix_ms":1700000000000}
//! {"resource":"disk1","event":"role","old":"secondary","new":"primary","time_unix_ms":1700000000000}
//! {"resource":"disk1","event":"progress","direction":"to-secondary","done":12582912,"total":67108864,"time_unix_ms":1700000000000}
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Which leg of a resource an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Leg {
    /// This node's provider.
    Local,
    /// The peer's provider.
    Remote,
}

impl Leg {
    /// `local` or `remote` (hook argument, JSON).
    pub fn name(self) -> &'static str {
        match self {
            Leg::Local => "local",
            Leg::Remote => "remote",
        }
    }
}

/// What happened; serialised as `"event": "<name>"` (see
/// [`EventKind::name`]) plus the variant's fields.
///
/// The first six are the original's hook events; `role` is reported by the
/// control plane; `progress` and `verify-progress` are samples of the event
/// stream and never run a hook ([`EventKind::runs_hook`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event")]
pub enum EventKind {
    /// Replication connection established (handshake done).
    #[serde(rename = "connect")]
    Connect,
    /// Replication connection lost.
    #[serde(rename = "disconnect")]
    Disconnect,
    /// Synchronisation started.
    #[serde(rename = "syncstart")]
    SyncStart,
    /// Synchronisation completed: both legs identical.
    #[serde(rename = "syncdone")]
    SyncDone,
    /// Synchronisation interrupted.
    #[serde(rename = "syncintr")]
    SyncIntr,
    /// Both nodes were primary: split-brain detected at handshake.
    #[serde(rename = "split-brain")]
    SplitBrain,
    /// A leg's disk was detached after its errors: this node's (`local`),
    /// or the peer's, as the peer said (`remote`). Reported once per
    /// failure (our extension).
    #[serde(rename = "disk-failed")]
    DiskFailed {
        /// Which leg.
        leg: Leg,
    },
    /// The role changed (role names as hastctl prints them: `init`,
    /// `primary`, `secondary`).
    #[serde(rename = "role")]
    Role {
        /// Previous role.
        old: String,
        /// New role.
        new: String,
    },
    /// Synchronisation progress (a sample of the event stream).
    #[serde(rename = "progress")]
    Progress {
        /// `to-secondary` or `from-secondary`.
        direction: String,
        /// Bytes copied in this pass.
        done: u64,
        /// Bytes to copy when the pass started.
        total: u64,
    },
    /// `hastctl verify` started (our extension).
    #[serde(rename = "verifystart")]
    VerifyStart,
    /// A verify ended (our extension); `ok` false: stopped early.
    #[serde(rename = "verifydone")]
    VerifyDone {
        /// It covered its whole range.
        ok: bool,
        /// Blocks compared.
        compared: u64,
        /// Blocks that differ.
        different: u64,
    },
    /// A verify found blocks that differ between the nodes (our
    /// extension; `hastctl list` shows the ranges).
    #[serde(rename = "out-of-sync")]
    OutOfSync {
        /// Blocks that differ.
        blocks: u64,
        /// Their bytes.
        bytes: u64,
        /// Differing ranges (merged).
        ranges: u64,
    },
    /// Verify progress (a sample of the event stream).
    #[serde(rename = "verify-progress")]
    VerifyProgress {
        /// Bytes of the range dealt with.
        done: u64,
        /// Bytes of the range.
        total: u64,
        /// Blocks found different so far.
        different: u64,
    },
}

impl EventKind {
    /// The event name: the JSON `event` field and the hook's first
    /// argument.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Disconnect => "disconnect",
            EventKind::SyncStart => "syncstart",
            EventKind::SyncDone => "syncdone",
            EventKind::SyncIntr => "syncintr",
            EventKind::SplitBrain => "split-brain",
            EventKind::DiskFailed { .. } => "disk-failed",
            EventKind::Role { .. } => "role",
            EventKind::Progress { .. } => "progress",
            EventKind::VerifyStart => "verifystart",
            EventKind::VerifyDone { .. } => "verifydone",
            EventKind::OutOfSync { .. } => "out-of-sync",
            EventKind::VerifyProgress { .. } => "verify-progress",
        }
    }

    /// Whether the event runs the resource's `exec` hook (samples of
    /// progress do not).
    pub fn runs_hook(&self) -> bool {
        !matches!(
            self,
            EventKind::Progress { .. } | EventKind::VerifyProgress { .. }
        )
    }

    /// The hook's arguments (after the program): `<event> <resource>`,
    /// `role <resource> <oldrole> <newrole>`, or `disk-failed <resource>
    /// <leg>`.
    pub fn hook_args(&self, resource: &str) -> Vec<String> {
        let mut args = vec![self.name().to_owned(), resource.to_owned()];
        match self {
            EventKind::Role { old, new } => {
                args.push(old.clone());
                args.push(new.clone());
            }
            EventKind::DiskFailed { leg } => args.push(leg.name().to_owned()),
            _ => {}
        }
        args
    }
}

/// An event of one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Resource name.
    pub resource: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
    /// When it happened, in milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
}

impl Event {
    /// An event for `resource` stamped with the current time.
    pub fn new(resource: impl Into<String>, kind: EventKind) -> Event {
        Event {
            resource: resource.into(),
            kind,
            time_unix_ms: now_unix_ms(),
        }
    }
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Where a resource reports its events.
#[derive(Clone)]
pub struct EventSink {
    resource: String,
    tx: Option<flume::Sender<Event>>,
}

impl EventSink {
    /// A sink for `resource` sending on `tx` (None: events are only logged).
    pub fn new(resource: &str, tx: Option<flume::Sender<Event>>) -> Self {
        EventSink {
            resource: resource.to_owned(),
            tx,
        }
    }

    /// Reports an event (logged; dropped with an error if the control
    /// plane is not keeping up).
    pub fn emit(&self, kind: EventKind) {
        tracing::info!(resource = %self.resource, event = ?kind, "event");
        if let Some(tx) = &self.tx {
            if let Err(e) = tx.try_send(Event::new(self.resource.as_str(), kind)) {
                tracing::error!(resource = %self.resource, event = ?e.into_inner().kind,
                    "event dropped: the control plane is not keeping up");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of every kind.
    fn all_kinds() -> Vec<EventKind> {
        vec![
            EventKind::Connect,
            EventKind::Disconnect,
            EventKind::SyncStart,
            EventKind::SyncDone,
            EventKind::SyncIntr,
            EventKind::SplitBrain,
            EventKind::DiskFailed { leg: Leg::Remote },
            EventKind::Role {
                old: "secondary".into(),
                new: "primary".into(),
            },
            EventKind::Progress {
                direction: "to-secondary".into(),
                done: 5,
                total: 10,
            },
            EventKind::VerifyStart,
            EventKind::VerifyDone {
                ok: true,
                compared: 3,
                different: 1,
            },
            EventKind::OutOfSync {
                blocks: 1,
                bytes: 4096,
                ranges: 1,
            },
            EventKind::VerifyProgress {
                done: 1,
                total: 2,
                different: 0,
            },
        ]
    }

    /// The JSON of every kind, as the event stream and the hooks' logs
    /// have always written it (golden).
    #[test]
    fn json_of_every_kind_is_unchanged() {
        let golden = [
            r#"{"resource":"d","event":"connect","time_unix_ms":7}"#,
            r#"{"resource":"d","event":"disconnect","time_unix_ms":7}"#,
            r#"{"resource":"d","event":"syncstart","time_unix_ms":7}"#,
            r#"{"resource":"d","event":"syncdone","time_unix_ms":7}"#,
            r#"{"resource":"d","event":"syncintr","time_unix_ms":7}"#,
            r#"{"resource":"d","event":"split-brain","time_unix_ms":7}"#,
            r#"{"resource":"d","event":"disk-failed","leg":"remote","time_unix_ms":7}"#,
            r#"{"resource":"d","event":"role","old":"secondary","new":"primary","time_unix_ms":7}"#,
            r#"{"resource":"d","event":"progress","direction":"to-secondary","done":5,"total":10,"time_unix_ms":7}"#,
            r#"{"resource":"d","event":"verifystart","time_unix_ms":7}"#,
            r#"{"resource":"d","event":"verifydone","ok":true,"compared":3,"different":1,"time_unix_ms":7}"#,
            r#"{"resource":"d","event":"out-of-sync","blocks":1,"bytes":4096,"ranges":1,"time_unix_ms":7}"#,
            r#"{"resource":"d","event":"verify-progress","done":1,"total":2,"different":0,"time_unix_ms":7}"#,
        ];
        let kinds = all_kinds();
        assert_eq!(kinds.len(), golden.len());
        for (kind, json) in kinds.into_iter().zip(golden) {
            let name = kind.name();
            let e = Event {
                resource: "d".into(),
                kind,
                time_unix_ms: 7,
            };
            assert_eq!(serde_json::to_string(&e).unwrap(), json);
            assert_eq!(serde_json::from_str::<Event>(json).unwrap(), e);
            assert!(json.contains(&format!(r#""event":"{name}""#)));
        }
    }

    #[test]
    fn hooks_run_for_events_not_for_samples() {
        let runs: Vec<_> = all_kinds()
            .iter()
            .filter(|k| !k.runs_hook())
            .map(EventKind::name)
            .collect();
        assert_eq!(runs, ["progress", "verify-progress"]);
        assert_eq!(EventKind::SplitBrain.hook_args("r0"), ["split-brain", "r0"]);
        assert_eq!(
            all_kinds()[6].hook_args("r0"),
            ["disk-failed", "r0", "remote"]
        );
        assert_eq!(
            all_kinds()[7].hook_args("r0"),
            ["role", "r0", "secondary", "primary"]
        );
    }

    #[test]
    fn sink_stamps_and_never_blocks() {
        let (tx, rx) = flume::bounded(1);
        let sink = EventSink::new("r", Some(tx));
        let before = now_unix_ms();
        sink.emit(EventKind::Connect);
        sink.emit(EventKind::Disconnect); // full: dropped, not blocked
        let e = rx.try_recv().unwrap();
        assert_eq!((e.resource.as_str(), e.kind), ("r", EventKind::Connect));
        assert!(e.time_unix_ms >= before);
        assert!(rx.try_recv().is_err());
    }
}
