//! Per-resource counters shared between the data path (which updates them
//! with relaxed atomics on its own core) and the control plane (which reads
//! them for `hastctl list`/`status` without a cross-core hop).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
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

    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
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
