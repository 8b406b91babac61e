//! The Prometheus endpoint (`metrics listen ADDR` in hast.conf): an HTTP
//! server on its own threads that, at each scrape, reads the counters the
//! data path keeps anyway ([`ResourceStats`]) and encodes them in the
//! Prometheus text format with `prometheus-client`. Nothing is recorded
//! per request for it: a scrape costs the data path nothing.
//!
//! Names follow drbd-reactor's exporter where the meaning is the same
//! (`*_outofsync_bytes`, `*_sent_bytes_total`, `*_lowerpending`, ...);
//! every metric has a `resource` label. docs/metrics.md lists them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hast_datapath::metadata::Role;
use hast_datapath::stats::ResourceStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Scrapes served at once, at most (more connections are closed).
pub const MAX_SCRAPERS: usize = 8;
/// How long a scraper may take to send its request or read the reply.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read.
const MAX_REQUEST: usize = 8 << 10;
/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One resource as the endpoint shows it.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Resource name.
    pub name: String,
    /// Its counters.
    pub stats: Arc<ResourceStats>,
}

/// Where the endpoint finds the resources at each scrape.
pub type Source = Arc<dyn Fn() -> Vec<Sample> + Send + Sync>;

/// The collector behind the registry.
struct HastCollector {
    source: Source,
}

impl std::fmt::Debug for HastCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HastCollector")
    }
}

/// One metric family being written.
struct Family<'e, 'a> {
    enc: &'e mut DescriptorEncoder<'a>,
}

impl Family<'_, '_> {
    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        rows: impl IntoIterator<Item = (Vec<(&'static str, String)>, i64)>,
    ) -> std::fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in rows {
            ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn counter(
        &mut self,
        name: &str,
        help: &str,
        rows: impl IntoIterator<Item = (Vec<(&'static str, String)>, u64)>,
    ) -> std::fmt::Result {
        // prometheus-client appends `_total` to counters.
        let base = name.strip_suffix("_total").unwrap_or(name);
        let mut m = self
            .enc
            .encode_descriptor(base, help, None, MetricType::Counter)?;
        for (labels, v) in rows {
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn res(s: &Sample) -> Vec<(&'static str, String)> {
    vec![("resource", s.name.clone())]
}

fn with(s: &Sample, key: &'static str, value: &str) -> Vec<(&'static str, String)> {
    vec![("resource", s.name.clone()), (key, value.to_owned())]
}

fn gauge_of(
    samples: &[Sample],
    f: impl Fn(&ResourceStats) -> u64,
) -> Vec<(Vec<(&'static str, String)>, i64)> {
    samples
        .iter()
        .map(|s| (res(s), i64::try_from(f(&s.stats)).unwrap_or(i64::MAX)))
        .collect()
}

fn counter_of(
    samples: &[Sample],
    f: impl Fn(&ResourceStats) -> u64,
) -> Vec<(Vec<(&'static str, String)>, u64)> {
    samples.iter().map(|s| (res(s), f(&s.stats))).collect()
}

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Relaxed)
}

/// Role, connection and synchronisation state: one series per possible
/// value, 1 for the current one (drbd-reactor's `enums` form).
fn states(fam: &mut Family<'_, '_>, samples: &[Sample]) -> std::fmt::Result {
    let role_rows = samples.iter().flat_map(|s| {
        let role = s.stats.role();
        [Role::Init, Role::Primary, Role::Secondary]
            .into_iter()
            .map(move |r| (with(s, "role", r.as_str()), i64::from(r == role)))
    });
    fam.gauge(
        "hast_resource_role",
        "The resource's role (1 for the current one).",
        role_rows,
    )?;
    let conn_rows = samples.iter().flat_map(|s| {
        let up = s.stats.connected.load(Relaxed);
        [("connected", up), ("disconnected", !up)]
            .into_iter()
            .map(move |(st, on)| (with(s, "state", st), i64::from(on)))
    });
    fam.gauge(
        "hast_connection_state",
        "The replication connection (1 for the current state).",
        conn_rows,
    )?;
    let sync_rows = samples.iter().flat_map(|s| {
        let now = s.stats.sync_state().map(|d| d.name()).unwrap_or("idle");
        ["idle", "to-secondary", "from-secondary"]
            .into_iter()
            .map(move |st| (with(s, "state", st), i64::from(st == now)))
    });
    fam.gauge(
        "hast_sync_state",
        "The synchronisation (1 for the current state).",
        sync_rows,
    )?;
    fam.gauge(
        "hast_resource_split_brain",
        "1 when the last handshake found a split-brain.",
        samples
            .iter()
            .map(|s| (res(s), i64::from(s.stats.split_brain.load(Relaxed)))),
    )?;
    let disk_rows = samples.iter().flat_map(|s| {
        [
            ("local", s.stats.disk_failed.load(Relaxed)),
            ("remote", s.stats.peer_disk_failed.load(Relaxed)),
        ]
        .into_iter()
        .map(move |(leg, failed)| (with(s, "leg", leg), i64::from(failed)))
    });
    fam.gauge(
        "hast_disk_failed",
        "1 when the leg's disk is detached after its errors (local: this node's; remote: the peer's, as it said).",
        disk_rows,
    )
}

/// Synchronisation, queue and size gauges.
fn gauges(fam: &mut Family<'_, '_>, samples: &[Sample]) -> std::fmt::Result {
    let g = |f: fn(&ResourceStats) -> u64| gauge_of(samples, f);
    fam.gauge(
        "hast_peerdevice_outofsync_bytes",
        "Bytes that need synchronisation to the peer (hastctl list: dirty).",
        g(|s| get(&s.dirty_bytes)),
    )?;
    fam.gauge(
        "hast_sync_total_bytes",
        "Bytes to copy when the running synchronisation pass started (0 when none runs).",
        g(|s| {
            if s.sync_state().is_none() {
                0
            } else {
                get(&s.sync_total)
            }
        }),
    )?;
    fam.gauge(
        "hast_sync_done_bytes",
        "Bytes copied in the running synchronisation pass (0 when none runs).",
        g(|s| {
            if s.sync_state().is_none() {
                0
            } else {
                get(&s.sync_done)
            }
        }),
    )?;
    fam.gauge(
        "hast_device_lowerpending",
        "Application requests being processed locally.",
        g(|s| s.local_queue.get()),
    )?;
    fam.gauge(
        "hast_peerdevice_pending",
        "Replicated requests sent to the peer and not yet done there.",
        g(|s| s.remote_inflight.get()),
    )?;
    fam.gauge(
        "hast_device_size_bytes",
        "Size of the exported device (0 while the provider is not open).",
        g(|s| get(&s.datasize)),
    )?;
    fam.gauge(
        "hast_export_clients",
        "NBD clients connected to the primary's export.",
        g(|s| s.clients.load(Relaxed)),
    )
}

/// Request, error and byte counters.
fn counters(fam: &mut Family<'_, '_>, samples: &[Sample]) -> std::fmt::Result {
    let c = |f: fn(&ResourceStats) -> u64| counter_of(samples, f);
    fam.counter(
        "hast_device_reads_total",
        "Application reads served.",
        c(|s| get(&s.reads)),
    )?;
    fam.counter(
        "hast_device_writes_total",
        "Application writes (and write-zeroes) served.",
        c(|s| get(&s.writes)),
    )?;
    fam.counter(
        "hast_device_deletes_total",
        "Application discards served.",
        c(|s| get(&s.deletes)),
    )?;
    fam.counter(
        "hast_device_flushes_total",
        "Application flushes served.",
        c(|s| get(&s.flushes)),
    )?;
    fam.counter(
        "hast_device_alwrites_total",
        "Updates of the on-disk activemap.",
        c(|s| get(&s.activemap_updates)),
    )?;
    let local = samples.iter().flat_map(|s| {
        let st = &s.stats;
        [
            ("read", get(&st.read_errors)),
            ("write", get(&st.write_errors)),
            ("delete", get(&st.delete_errors)),
            ("flush", get(&st.flush_errors)),
        ]
        .into_iter()
        .map(move |(op, v)| (with(s, "op", op), v))
    });
    fam.counter(
        "hast_local_errors_total",
        "Failed requests on the local provider, by operation.",
        local,
    )?;
    fam.counter(
        "hast_reads_from_peer_total",
        "Application reads that failed on the local disk and were served by the peer.",
        c(|s| get(&s.reads_from_peer)),
    )?;
    fam.counter(
        "hast_remote_errors_total",
        "Application writes whose remote leg failed (an error from the peer, or the connection lost first).",
        c(|s| get(&s.remote_errors)),
    )?;
    fam.counter(
        "hast_peerdevice_sent_bytes_total",
        "Bytes sent to the peer on the replication connection.",
        c(|s| get(&s.net_sent_bytes)),
    )?;
    fam.counter(
        "hast_peerdevice_received_bytes_total",
        "Bytes received from the peer on the replication connection.",
        c(|s| get(&s.net_received_bytes)),
    )?;
    fam.counter(
        "hast_sync_bytes_total",
        "Bytes synchronised since hastd started.",
        c(|s| get(&s.sync_bytes_total)),
    )?;
    fam.counter(
        "hast_window_waits_total",
        "Writes that waited for room in the replication window.",
        c(|s| get(&s.window_waits)),
    )?;
    fam.counter(
        "hast_auth_failures_total",
        "Replication connections refused for failed authentication (secret, TLS) or dropped for a stream that failed its MAC.",
        c(|s| get(&s.auth_failures)),
    )
}

fn latency(fam: &mut Family<'_, '_>, samples: &[Sample]) -> std::fmt::Result {
    let mut m = fam.enc.encode_descriptor(
        "hast_write_latency_seconds",
        "Time from a write's arrival to its acknowledgement on the primary.",
        None,
        MetricType::Histogram,
    )?;
    for s in samples {
        let h = s.stats.write_latency.snapshot();
        m.encode_family(&res(s))?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                h.sum_seconds,
                h.count,
                &h.buckets,
                None,
            )?;
    }
    Ok(())
}

impl Collector for HastCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let samples = (self.source)();
        let mut fam = Family { enc: &mut enc };
        fam.gauge("hastd_up", "hastd is running (always 1).", [(vec![], 1)])?;
        states(&mut fam, &samples)?;
        gauges(&mut fam, &samples)?;
        counters(&mut fam, &samples)?;
        latency(&mut fam, &samples)
    }
}

/// The exposition of every resource `source` returns.
pub fn render(source: &Source) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(HastCollector {
        source: source.clone(),
    }));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "cannot encode the metrics");
    }
    out
}

/// A running endpoint.
pub struct MetricsServer {
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    sockets: Vec<TcpListener>,
    threads: Vec<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds every address (all or none) without serving yet: a reload
    /// binds first and starts only when everything else succeeded.
    pub fn bind(addrs: &[SocketAddr]) -> std::io::Result<Vec<TcpListener>> {
        addrs
            .iter()
            .map(|a| {
                TcpListener::bind(a).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot serve metrics on {a}: {e}"))
                })
            })
            .collect()
    }

    /// Serves the bound sockets.
    pub fn start(sockets: Vec<TcpListener>, source: Source) -> std::io::Result<MetricsServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        let mut addrs = Vec::new();
        for sock in &sockets {
            let sock = sock.try_clone()?;
            addrs.push(sock.local_addr()?);
            tracing::info!(address = %sock.local_addr()?, "serving Prometheus metrics");
            let (stop, busy, source) = (stop.clone(), busy.clone(), source.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("hast-metrics".into())
                    .spawn(move || accept_loop(&sock, &stop, &busy, &source))?,
            );
        }
        Ok(MetricsServer {
            addrs,
            stop,
            sockets,
            threads,
        })
    }

    /// The addresses served.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stops serving and closes the sockets.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in &self.sockets {
            // SAFETY: shutdown(2) on a listening socket this server owns
            // (kept open in `sockets` until after the join); it wakes the
            // blocked accept(2). No memory is involved.
            unsafe {
                libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR);
            }
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn accept_loop(sock: &TcpListener, stop: &AtomicBool, busy: &Arc<AtomicUsize>, source: &Source) {
    for conn in sock.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        if busy.fetch_add(1, Ordering::SeqCst) >= MAX_SCRAPERS {
            busy.fetch_sub(1, Ordering::SeqCst);
            continue; // dropped: closes the connection
        }
        let (busy, source) = (busy.clone(), source.clone());
        let spawned = std::thread::Builder::new()
            .name("hast-scrape".into())
            .spawn(move || {
                if let Err(e) = serve(conn, &source) {
                    tracing::debug!(error = %e, "metrics request failed");
                }
                busy.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            tracing::warn!("cannot start a metrics thread");
        }
    }
}

/// Reads the request head (bounded in size and time) and answers it.
fn serve(mut conn: TcpStream, source: &Source) -> std::io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
            );
        }
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => respond(&mut conn, "200 OK", CONTENT_TYPE, &render(source)),
        ("GET", "/") => respond(
            &mut conn,
            "200 OK",
            "text/plain",
            "hastd: Prometheus metrics at /metrics\n",
        ),
        ("GET", _) => respond(
            &mut conn,
            "404 Not Found",
            "text/plain",
            "not found; try /metrics\n",
        ),
        _ => respond(
            &mut conn,
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n",
        ),
    }
}

fn respond(conn: &mut TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn source() -> (Source, Arc<ResourceStats>) {
        let stats = Arc::new(ResourceStats::default());
        stats.set_role(Role::Primary);
        stats.writes.store(7, Relaxed);
        stats.dirty_bytes.store(4096, Relaxed);
        stats.write_errors.store(2, Relaxed);
        stats.write_latency.observe(Duration::from_micros(300));
        let s = stats.clone();
        let src: Source = Arc::new(move || {
            vec![Sample {
                name: "disk1".into(),
                stats: s.clone(),
            }]
        });
        (src, stats)
    }

    #[test]
    fn exposition_has_the_counters_with_resource_labels() {
        let (src, _) = source();
        let text = render(&src);
        for line in [
            "# TYPE hast_device_writes_total counter",
            "hast_device_writes_total{resource=\"disk1\"} 7",
            "hast_peerdevice_outofsync_bytes{resource=\"disk1\"} 4096",
            "hast_resource_role{resource=\"disk1\",role=\"primary\"} 1",
            "hast_resource_role{resource=\"disk1\",role=\"init\"} 0",
            "hast_local_errors_total{resource=\"disk1\",op=\"write\"} 2",
            "hast_write_latency_seconds_bucket{resource=\"disk1\",le=\"0.00025\"} 0",
            "hast_write_latency_seconds_bucket{resource=\"disk1\",le=\"0.0005\"} 1",
            "hast_write_latency_seconds_count{resource=\"disk1\"} 1",
            "hastd_up 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
