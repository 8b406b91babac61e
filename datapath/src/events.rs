//! Events the data path reports to the control plane (which runs the
//! `exec` hooks and the event stream). Sent with `try_send` on a
//! bounded channel: the data path never blocks on the control plane.

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerEventKind {
    /// Replication connection established (handshake done).
    Connect,
    /// Replication connection lost.
    Disconnect,
    /// Synchronisation started.
    SyncStart,
    /// Synchronisation completed: both legs identical.
    SyncDone,
    /// Synchronisation interrupted.
    SyncIntr,
    /// Split-brain detected at handshake.
    SplitBrain,
    /// `hastctl verify` started.
    VerifyStart,
    /// A verify ended (`ok`: it covered its whole range).
    VerifyDone {
        /// It covered the whole range.
        ok: bool,
        /// Blocks compared.
        compared: u64,
        /// Blocks that differ.
        different: u64,
    },
    /// A verify found blocks that differ between the nodes.
    OutOfSync {
        /// Blocks that differ.
        blocks: u64,
        /// Their bytes.
        bytes: u64,
        /// Differing ranges (merged).
        ranges: u64,
    },
}

/// An event of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEvent {
    /// Resource name.
    pub resource: String,
    /// What happened.
    pub kind: PeerEventKind,
}

/// Where a resource reports its events.
#[derive(Clone)]
pub struct EventSink {
    resource: String,
    tx: Option<flume::Sender<PeerEvent>>,
}

impl EventSink {
    /// A sink for `resource` sending on `tx` (None: events are only logged).
    pub fn new(resource: &str, tx: Option<flume::Sender<PeerEvent>>) -> Self {
        EventSink {
            resource: resource.to_owned(),
            tx,
        }
    }

    /// Reports an event (logged; dropped with an error if the control
    /// plane is not keeping up).
    pub fn emit(&self, kind: PeerEventKind) {
        tracing::info!(resource = %self.resource, event = ?kind, "event");
        if let Some(tx) = &self.tx {
            let ev = PeerEvent {
                resource: self.resource.clone(),
                kind,
            };
            if tx.try_send(ev).is_err() {
                tracing::error!(resource = %self.resource, event = ?kind,
                    "event dropped: the control plane is not keeping up");
            }
        }
    }
}
