//! Per-resource counters shared between the data path (which updates them
//! with relaxed atomics on its own core) and the control plane (which reads
//! them for `hastctl list`/`status` without a cross-core hop).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;

use crate::metadata::Role;

/// Counters and gauges of one resource.
#[derive(Debug, Default)]
pub struct ResourceStats {
    role: AtomicU8,
    /// Application reads served.
    pub reads: AtomicU64,
    /// Application writes (including write-zeroes).
    pub writes: AtomicU64,
    /// Application discards (TRIM).
    pub deletes: AtomicU64,
    /// Application flushes.
    pub flushes: AtomicU64,
    /// Activemap metadata writes.
    pub activemap_updates: AtomicU64,
    /// Local read errors.
    pub read_errors: AtomicU64,
    /// Local write errors.
    pub write_errors: AtomicU64,
    /// Local discard errors.
    pub delete_errors: AtomicU64,
    /// Local flush errors.
    pub flush_errors: AtomicU64,
    /// Bytes needing synchronisation to the peer.
    pub dirty_bytes: AtomicU64,
    /// Extents marked in the on-disk activemap.
    pub ondisk_extents: AtomicU64,
    /// Requests being processed locally.
    pub local_queue: AtomicU64,
    /// Extent size of the open provider (0 when not open).
    pub extentsize: AtomicU64,
    /// Keepdirty of the open provider (0 when not open).
    pub keepdirty: AtomicU64,
    /// Exported size (0 when not open).
    pub datasize: AtomicU64,
    /// Connected NBD clients.
    pub clients: Arc<AtomicU64>,
    /// The replication connection is up (handshake done).
    pub connected: AtomicBool,
    /// The last handshake detected a split-brain.
    pub split_brain: AtomicBool,
    /// Synchronisation direction: 0 none, 1 to the secondary, 2 from it.
    pub sync_direction: AtomicU8,
    /// Bytes to synchronise when the current pass started.
    pub sync_total: AtomicU64,
    /// Bytes synchronised in the current pass.
    pub sync_done: AtomicU64,
    /// When the current pass started (Unix ms; 0 = none).
    pub sync_started_ms: AtomicU64,
    /// Bytes synchronised since start-up (all passes).
    pub sync_bytes_total: AtomicU64,
    /// Synchronisation bytes received as the secondary.
    pub sync_received: AtomicU64,
    /// Requests waiting for the peer (sent, not done).
    pub remote_inflight: AtomicU64,
    /// Writes that waited for room in the replication window (the
    /// secondary is as far behind as the window allows).
    pub window_waits: AtomicU64,
    /// Last connection problem (for `hastctl list`).
    pub last_error: std::sync::Mutex<String>,
}

impl ResourceStats {
    /// Current role.
    pub fn role(&self) -> Role {
        Role::from_code(self.role.load(Relaxed)).unwrap_or(Role::Init)
    }

    /// Records a role change.
    pub fn set_role(&self, role: Role) {
        self.role.store(role.code(), Relaxed);
    }

    /// The connected-clients gauge, shared with the export.
    pub fn clients_gauge(&self) -> Arc<AtomicU64> {
        self.clients.clone()
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }
}
