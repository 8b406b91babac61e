//! Per-resource counters shared between the data path (which updates them
//! with relaxed atomics on its own core) and the control plane (which reads
//! them for `hastctl list`/`status` without a cross-core hop).

use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicU8,
    Ordering::{Acquire, Relaxed, Release},
};
use std::sync::Arc;
use std::time::Duration;

use crate::generation::SyncDirection;
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
    /// Extents written since `hastctl create` (the written map; 0 for a
    /// format 1 provider, which has none).
    pub written_extents: AtomicU64,
    /// Written-map sector writes.
    pub written_map_updates: AtomicU64,
    /// Application requests being served: the load the synchronisation's
    /// rate control yields to.
    pub local_queue: Gauge,
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
    /// The synchronisation running, if any (see
    /// [`ResourceStats::sync_state`]).
    sync_direction: AtomicU8,
    /// Bytes to synchronise when the current pass started.
    pub sync_total: AtomicU64,
    /// Bytes synchronised in the current pass.
    pub sync_done: AtomicU64,
    /// When the current pass started (Unix ms; 0 = none).
    pub sync_started_ms: AtomicU64,
    /// Bytes synchronised since start-up (all passes).
    pub sync_bytes_total: AtomicU64,
    /// Bytes of dirty extents a synchronisation skipped since start-up:
    /// neither node wrote them since `hastctl create`.
    pub sync_skipped_bytes: AtomicU64,
    /// Bytes a checksum-based synchronisation found identical (and did
    /// not move) since start-up.
    pub sync_identical_bytes: AtomicU64,
    /// Synchronisation bytes received as the secondary.
    pub sync_received: AtomicU64,
    /// Bytes digested for the peer's Checksums requests (as the
    /// secondary).
    pub checksummed_bytes: AtomicU64,
    /// Replicated writes acknowledged to the client and waiting for the
    /// secondary's Done.
    pub remote_inflight: Gauge,
    /// Writes that waited for room in the replication window (the
    /// secondary is as far behind as the window allows).
    pub window_waits: AtomicU64,
    /// This node's provider was detached after its errors (see
    /// [`crate::health`]); `disk_error` says why.
    pub disk_failed: AtomicBool,
    /// Why the provider was detached (empty while it is used).
    pub disk_error: std::sync::Mutex<String>,
    /// A primary whose data is out of date: it is being synchronised from
    /// the secondary (or was, when the connection broke), and serves the
    /// extents not copied yet only from there.
    pub out_of_date: AtomicBool,
    /// The peer's provider is detached, as the peer said: on a primary,
    /// the secondary refused the connection for it; on a secondary, the
    /// primary writes only here (this node holds the only copy).
    pub peer_disk_failed: AtomicBool,
    /// Application reads that failed locally and were served by the
    /// secondary instead.
    pub reads_from_peer: AtomicU64,
    /// Last connection problem (for `hastctl list`).
    pub last_error: std::sync::Mutex<String>,
    /// Application writes whose remote leg failed (an error from the
    /// secondary, or the connection lost before its Done).
    pub remote_errors: AtomicU64,
    /// Bytes sent to the peer (frame headers and payloads).
    pub net_sent_bytes: AtomicU64,
    /// Bytes received from the peer (frame headers and payloads).
    pub net_received_bytes: AtomicU64,
    /// How long the primary took to acknowledge application writes.
    pub write_latency: LatencyHistogram,
    /// Connections refused because the peer failed authentication (a
    /// wrong or missing proof of the secret, a certificate not trusted,
    /// different security settings) or whose authenticated stream failed
    /// its MAC.
    pub auth_failures: AtomicU64,
    /// The verify running or last run (`hastctl verify`), if any.
    pub verify: std::sync::Mutex<Option<VerifyReport>>,
}

/// Differing ranges a verify keeps, at most (it counts all of them).
pub const VERIFY_MAX_RANGES: usize = 256;

/// Where a verify stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyState {
    /// Comparing.
    #[default]
    Running,
    /// Every block of the range was dealt with.
    Done,
    /// Stopped early: the connection was lost, the resource stopped, or a
    /// disk failed (see `error`).
    Failed,
}

/// Progress and result of `hastctl verify` on one resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    /// Running, done or failed.
    pub state: VerifyState,
    /// The digest algorithm (`xxh3`, `sha256`).
    pub algorithm: String,
    /// The range verified: its start in the data area.
    pub offset: u64,
    /// Its length.
    pub length: u64,
    /// Bytes of the range dealt with (compared or skipped).
    pub done: u64,
    /// When it started (Unix ms).
    pub started_ms: u64,
    /// When it ended (Unix ms; 0 while running).
    pub finished_ms: u64,
    /// Blocks compared on both nodes.
    pub blocks_compared: u64,
    /// Blocks whose digests differ.
    pub blocks_different: u64,
    /// Bytes of the differing blocks.
    pub bytes_different: u64,
    /// Bytes not compared: extents never written on the primary since
    /// `hastctl create`, or already marked for synchronisation.
    pub bytes_skipped: u64,
    /// Block size of the comparison.
    pub block: u32,
    /// Differing ranges (offset, length) in the data area, merged, in
    /// order, at most [`VERIFY_MAX_RANGES`].
    pub ranges: Vec<(u64, u64)>,
    /// How many differing ranges there were in all.
    pub ranges_total: u64,
    /// `--repair`: differing extents are marked and synchronised.
    pub repair: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// End of the last differing range recorded (merging).
    #[serde(skip)]
    last_end: Option<u64>,
}

impl VerifyReport {
    /// Records a differing range, merging it with the previous one when
    /// they touch.
    pub fn add_range(&mut self, offset: u64, len: u64) {
        self.bytes_different += len;
        let merge = self.last_end == Some(offset);
        self.last_end = Some(offset + len);
        if merge {
            if let Some(last) = self.ranges.last_mut() {
                if last.0 + last.1 == offset {
                    last.1 += len;
                }
            }
            return;
        }
        self.ranges_total += 1;
        if self.ranges.len() < VERIFY_MAX_RANGES {
            self.ranges.push((offset, len));
        }
    }
}

/// Upper bounds (inclusive, microseconds) of the write latency buckets; a
/// last bucket counts everything slower.
pub const LATENCY_BOUNDS_US: [u64; 15] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000,
];

/// A fixed-bucket latency histogram of relaxed atomics: recording costs a
/// bucket search over 15 bounds and two additions, nothing is allocated
/// and nothing locks.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_ns: AtomicU64,
}

/// A histogram read at one moment: cumulative counts per bound.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencySnapshot {
    /// `(upper bound in seconds, observations <= bound)`, bounds ascending.
    pub buckets: Vec<(f64, u64)>,
    /// Every observation (the `+Inf` bucket).
    pub count: u64,
    /// Sum of the observations, seconds.
    pub sum_seconds: f64,
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// The cumulative view Prometheus expects.
    pub fn snapshot(&self) -> LatencySnapshot {
        let mut acc = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BOUNDS_US.len());
        for (b, bound) in self.buckets.iter().zip(LATENCY_BOUNDS_US) {
            acc += b.load(Relaxed);
            buckets.push((bound as f64 / 1e6, acc));
        }
        let count = acc + self.buckets[LATENCY_BOUNDS_US.len()].load(Relaxed);
        LatencySnapshot {
            buckets,
            count,
            sum_seconds: self.sum_ns.load(Relaxed) as f64 / 1e9,
        }
    }
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

    /// The synchronisation running, and its direction.
    pub fn sync_state(&self) -> Option<SyncDirection> {
        // Acquire: pairs with the Release below (see set_sync_state).
        match self.sync_direction.load(Acquire) {
            1 => Some(SyncDirection::ToSecondary),
            2 => Some(SyncDirection::FromSecondary),
            _ => None,
        }
    }

    /// Records the synchronisation running (the remote leg's to set).
    pub fn set_sync_state(&self, s: Option<SyncDirection>) {
        let code = match s {
            None => 0,
            Some(SyncDirection::ToSecondary) => 1,
            Some(SyncDirection::FromSecondary) => 2,
        };
        // Release: a reader that sees a pass ended also sees what the
        // remote leg stored before ending it (out_of_date cleared).
        self.sync_direction.store(code, Release);
    }
}

/// How many things are in progress (requests being served, writes
/// waiting for the peer): read by the control plane, and by whoever
/// yields to them.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Counts one thing in progress until the guard is dropped.
    pub fn enter(&self) -> GaugeGuard<'_> {
        self.inc();
        GaugeGuard(self)
    }

    /// One more in progress.
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    /// One fewer in progress.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }

    /// How many are in progress.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }

    /// Is anything in progress?
    pub fn busy(&self) -> bool {
        self.get() > 0
    }
}

/// Counts one thing in a [`Gauge`] while alive.
pub struct GaugeGuard<'a>(&'a Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_cumulative_and_inclusive() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(50)); // <= 50 us
        h.observe(Duration::from_micros(51)); // <= 100 us
        h.observe(Duration::from_millis(3)); // <= 5 ms
        h.observe(Duration::from_secs(10)); // only +Inf
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], (50e-6, 1));
        assert_eq!(s.buckets[1], (100e-6, 2));
        assert_eq!(s.buckets[5].1, 2, "2.5 ms");
        assert_eq!(s.buckets[6].1, 3, "5 ms");
        assert_eq!(s.buckets.last().map(|b| b.1), Some(3));
        assert!(
            (s.sum_seconds - 10.003101).abs() < 1e-9,
            "{}",
            s.sum_seconds
        );
    }
}
