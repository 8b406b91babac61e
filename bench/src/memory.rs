//! The memory bound of a hastd node, computed from its configuration; the
//! harness checks every node's peak RSS in every job against it.
//!
//! ```text
//! memory_bound(node) = baseline
//!                    + resources × (resource_baseline
//!                                   + buffer_budget + window_bytes + sync_bytes)
//! ```
//!
//! - `baseline` and `resource_baseline`: the resident memory of an idle
//!   node (binary, allocator, control thread) and what each resource adds
//!   to it idle (its executor with its io_uring rings and I/O memory, its
//!   activemap), measured: see [`BASELINE`];
//! - `buffer_budget`: write and read payload bytes an export buffers
//!   ([`hast_control::daemon::BUFFER_BUDGET`], per export: one per primary
//!   resource);
//! - `window_bytes`: the replication window
//!   ([`hast_control::daemon::WINDOW_BYTES`], per resource): on the primary
//!   the payloads sent and not yet written by the secondary (they outlive
//!   the export's budget, which is released when the client has its
//!   reply); on the secondary the frames it holds, whose byte budget must
//!   be the same so that no peer can make it hold more;
//! - `sync_bytes`: synchronisation chunks in flight ([`SYNC_BYTES`]).
//!
//! A resource is primary or secondary, never both, so the primary's sum
//! (which includes the secondary's) bounds it in either role.

use serde_json::json;

use crate::util::MIB;

/// Resident memory of an idle hastd node without its resources. Measured
/// with the release build on the project's VM (2 CPUs): a node idle after
/// start, its resources in sync, has 16.0 MiB resident with one resource
/// and 26.1 MiB with two (the harness's hastd part), so about 6 MiB for
/// the node and 10 MiB per resource (most of it the executor's I/O
/// memory); [`BASELINE`] and [`RESOURCE_BASELINE`] round both up. Each run
/// reports the idle RSS it measured.
pub const BASELINE: u64 = 8 * MIB;

/// What each resource adds to an idle node (see [`BASELINE`]); an upper
/// bound also on hosts with fewer CPUs than resources, where resources
/// share executors.
pub const RESOURCE_BASELINE: u64 = 12 * MIB;

/// Synchronisation chunks in flight per resource: 16 chunks of 1 MiB
/// (`sync_window` and `sync_chunk` of `activate_primary` in
/// datapath/src/node.rs, which are not public constants).
pub const SYNC_BYTES: u64 = 16 * MIB;

/// What the bound is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryModel {
    /// Idle resident memory of a node without resources.
    pub baseline: u64,
    /// What each resource adds to it, idle.
    pub resource_baseline: u64,
    /// Payload bytes an export buffers.
    pub buffer_budget: u64,
    /// Replication window bytes per resource.
    pub window_bytes: u64,
    /// Synchronisation bytes in flight per resource.
    pub sync_bytes: u64,
}

impl Default for MemoryModel {
    /// hastd's defaults.
    fn default() -> MemoryModel {
        MemoryModel {
            baseline: BASELINE,
            resource_baseline: RESOURCE_BASELINE,
            buffer_budget: hast_control::daemon::BUFFER_BUDGET as u64,
            window_bytes: hast_control::daemon::WINDOW_BYTES as u64,
            sync_bytes: SYNC_BYTES,
        }
    }
}

/// What the bound allows a node with `resources` resources (bytes).
pub fn memory_bound(m: &MemoryModel, resources: u64) -> u64 {
    m.baseline + resources * (m.resource_baseline + m.buffer_budget + m.window_bytes + m.sync_bytes)
}

impl MemoryModel {
    /// The bound for `resources` resources (bytes).
    pub fn bound(&self, resources: u64) -> u64 {
        memory_bound(self, resources)
    }

    /// The idle part of the bound for `resources` resources (bytes).
    pub fn idle(&self, resources: u64) -> u64 {
        self.baseline + resources * self.resource_baseline
    }

    /// The formula with its figures: `8 + 1 × (12 + 64 + 64 + 16) = 164 MiB`.
    pub fn describe(&self, resources: u64) -> String {
        let mib = |b: u64| format!("{:.0}", b as f64 / MIB as f64);
        format!(
            "{} + {resources} × ({} + {} + {} + {}) = {} MiB",
            mib(self.baseline),
            mib(self.resource_baseline),
            mib(self.buffer_budget),
            mib(self.window_bytes),
            mib(self.sync_bytes),
            mib(self.bound(resources))
        )
    }

    /// JSON form.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "baseline": self.baseline,
            "resource_baseline": self.resource_baseline,
            "buffer_budget": self.buffer_budget,
            "window_bytes": self.window_bytes,
            "sync_bytes": self.sync_bytes,
            "bound_one_resource": self.bound(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_adds_the_budgets_per_resource() {
        let m = MemoryModel {
            baseline: 10 * MIB,
            resource_baseline: 3 * MIB,
            buffer_budget: 4 * MIB,
            window_bytes: 2 * MIB,
            sync_bytes: MIB,
        };
        assert_eq!(m.bound(0), 10 * MIB);
        assert_eq!(m.bound(1), 20 * MIB);
        assert_eq!(m.bound(2), 30 * MIB);
        assert_eq!(m.idle(2), 16 * MIB);
        assert_eq!(m.describe(2), "10 + 2 × (3 + 4 + 2 + 1) = 30 MiB");
    }

    #[test]
    fn defaults_are_hastds() {
        let m = MemoryModel::default();
        assert_eq!(m.buffer_budget, hast_control::daemon::BUFFER_BUDGET as u64);
        assert_eq!(m.window_bytes, hast_control::daemon::WINDOW_BYTES as u64);
        assert_eq!(
            m.bound(1),
            BASELINE + RESOURCE_BASELINE + m.buffer_budget + m.window_bytes + SYNC_BYTES
        );
    }
}
