//! The parts of a harness run: the raw disk, qemu-nbd, hastd in each
//! replication mode (plus two resources at once), and a full
//! synchronisation. Each part adds rows to [`Results`]; every process it
//! starts is stopped when the part ends, also when it fails (the handles
//! kill by PID on drop).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hast_tests::cluster::{Cluster, ClusterOptions};
use hast_tests::{require_tool, ResourceDef, TestNode};
use serde_json::json;

use crate::fio::{self, Target, Timing, Workload};
use crate::procmon::{mem_kib, Monitor, Watched};
use crate::report::{self, IdleRss, Results, Row, SyncResult};
use crate::util::{provider_size, run_bounded, sparse_file, Guarded, WorkDir, MIB};

/// Parameters of a run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Bytes of the benchmark file / each resource's data area; every fio
    /// job covers all of it.
    pub size: u64,
    /// Measured seconds per fio job.
    pub runtime: u32,
    /// Ramp seconds per fio job.
    pub ramp: u32,
    /// Replication modes of the hastd part.
    pub modes: Vec<String>,
    /// Workloads of the raw, qemu-nbd and hastd parts.
    pub workloads: Vec<Workload>,
    /// Data area of the full-sync resource.
    pub sync_size: u64,
    /// Replication mode of the sync part.
    pub sync_mode: String,
    /// Queue depth of the application load during the sync.
    pub sync_load_qd: u32,
    /// `hastctl create -k` for the hastd providers (None: the default, 64).
    pub keepdirty: Option<u64>,
    /// Working set of the big job (4k randwrite QD32 on qemu-nbd and on
    /// hastd memsync and fullsync).
    pub big_size: u64,
}

impl Config {
    /// fio timing of the main jobs.
    pub fn timing(&self) -> Timing {
        Timing {
            runtime: self.runtime,
            ramp: self.ramp,
            size: self.size,
        }
    }

    /// JSON form (for the report).
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "size": self.size,
            "runtime": self.runtime,
            "ramp": self.ramp,
            "modes": self.modes,
            "workloads": self.workloads.iter().map(|w| w.key).collect::<Vec<_>>(),
            "sync_size": self.sync_size,
            "sync_mode": self.sync_mode,
            "sync_load_qd": self.sync_load_qd,
            "keepdirty": self.keepdirty,
            "big_size": self.big_size,
        })
    }
}

/// Runs one part; a failure (panic) is recorded in `res.errors` and the
/// run goes on with the next part. The part's processes are gone either
/// way.
pub fn part(name: &str, res: &mut Results, f: impl FnOnce(&mut Results)) {
    eprintln!("==== {name}");
    let start = Instant::now();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(res)));
    if let Err(e) = r {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panic".into());
        eprintln!("==== {name} FAILED: {msg}");
        res.errors.push(format!("{name}: {msg}"));
    } else {
        eprintln!("==== {name} done in {:.0} s", start.elapsed().as_secs_f64());
    }
}

/// Tools every part needs.
pub fn require_tools() {
    for t in ["fio", "qemu-nbd", "qemu-io", "dd"] {
        require_tool(t);
    }
}

/// A file of `cfg.size` bytes filled with data (so that reads hit data and
/// writes overwrite allocated blocks), in a scratch directory.
pub fn bench_file(cfg: &Config) -> (WorkDir, PathBuf) {
    let wd = WorkDir::new("hast-bench-file");
    let file = wd.join("disk.img");
    sparse_file(&file, cfg.size);
    eprintln!(
        "== filling {} ({})",
        file.display(),
        crate::util::human_size(cfg.size)
    );
    fio::fill(&file, 0, cfg.size, wd.path());
    (wd, file)
}

fn log_row(r: &Row) {
    eprintln!(
        "   {} {}: {:.0} IOPS, {:.1} MB/s, p50 {:.0} µs, p99 {:.0} µs{}{}",
        r.system,
        r.label,
        r.fio.iops,
        r.fio.mb_per_s,
        r.fio.p50_us,
        r.fio.p99_us,
        r.usage
            .as_ref()
            .map(|u| format!(
                ", server CPU {:.2} s ({}), RSS {} MiB",
                u.cpu_s(),
                u.threads_summary(3),
                u.rss_mib()
            ))
            .unwrap_or_default(),
        r.syscalls_summary()
            .map(|s| format!(", {s}"))
            .unwrap_or_default()
    );
}

/// A fio workload and the names of its rows (a workload over another
/// working set than `--size` gets its own key).
#[derive(Debug, Clone)]
pub struct Job {
    /// What fio runs.
    pub w: Workload,
    /// Workload key of the rows.
    pub key: String,
    /// Label of the rows.
    pub label: String,
}

impl Job {
    /// A workload under its own name.
    pub fn plain(w: &Workload) -> Job {
        Job {
            w: *w,
            key: w.key.into(),
            label: w.label.into(),
        }
    }

    /// 4k randwrite QD32 over the big working set of `size` bytes.
    pub fn big(size: u64) -> Job {
        Job {
            w: fio::RANDWRITE_QD32,
            key: report::BIG.into(),
            label: format!(
                "{}, {}",
                fio::RANDWRITE_QD32.label,
                crate::util::human_size(size)
            ),
        }
    }
}

/// Runs one fio job while watching `procs`.
fn measure(
    system: &str,
    job: &Job,
    target: &Target,
    t: &Timing,
    procs: &[Watched],
    dir: &Path,
) -> Row {
    let mon = (!procs.is_empty())
        .then(|| Monitor::start(procs.to_vec(), Duration::from_secs(t.ramp.into())));
    let fio = fio::run(&job.w, target, t, dir);
    let usage = mon.map(Monitor::finish);
    let row = Row {
        system: system.into(),
        workload: job.key.clone(),
        label: job.label.clone(),
        fio,
        usage,
        compare: true,
        counters: None,
        resources: 0,
    };
    log_row(&row);
    row
}

/// The raw disk: fio, io_uring, O_DIRECT on `file`.
pub fn raw(cfg: &Config, res: &mut Results, file: &Path) {
    require_tool("fio");
    let dir = file.parent().expect("file has a directory");
    for w in &cfg.workloads {
        let row = measure(
            report::RAW,
            &Job::plain(w),
            &Target::File(file.to_owned()),
            &cfg.timing(),
            &[],
            dir,
        );
        res.rows.push(row);
    }
}

/// qemu-nbd serving `file` (`--cache=none --aio=io_uring -f raw`) on a
/// unix socket, measured with fio's nbd engine.
pub fn qemu_nbd(cfg: &Config, res: &mut Results, file: &Path) {
    let q = QemuNbd::start(file, 0);
    for w in &cfg.workloads {
        res.rows.push(q.measure(&Job::plain(w), &cfg.timing()));
    }
}

/// A qemu-nbd process serving a file from `offset` on, stopped on drop.
struct QemuNbd {
    wd: WorkDir,
    proc: Guarded,
    uri: String,
}

impl QemuNbd {
    fn start(file: &Path, offset: u64) -> QemuNbd {
        require_tool("fio");
        require_tool("qemu-nbd");
        let wd = WorkDir::new("hast-bench-qemu");
        let sock = wd.join("qemu.sock");
        let log = std::fs::File::create(wd.join("qemu-nbd.log")).expect("qemu-nbd log");
        let mut q = Guarded::spawn(
            Command::new("qemu-nbd")
                .arg("--persistent")
                .arg("--cache=none")
                .arg("--aio=io_uring")
                .arg(format!("--offset={offset}"))
                .args(["-f", "raw", "-k"])
                .arg(&sock)
                .arg(file)
                .stdout(Stdio::null())
                .stderr(log),
            "qemu-nbd",
        );
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if let Some(st) = q.try_wait() {
                panic!(
                    "qemu-nbd exited ({st}): {}",
                    std::fs::read_to_string(wd.join("qemu-nbd.log")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "qemu-nbd did not open {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        QemuNbd { wd, proc: q, uri }
    }

    fn measure(&self, job: &Job, t: &Timing) -> Row {
        let procs = [Watched::new("qemu-nbd", self.proc.pid())];
        measure(
            report::QEMU,
            job,
            &Target::Nbd(self.uri.clone()),
            t,
            &procs,
            self.wd.path(),
        )
    }
}

/// The list entry of a resource, or None if hastctl fails.
fn list(node: &TestNode, res: &str) -> Option<serde_json::Value> {
    let out = node.hastctl_output(&["list", "--json", res]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .map(|v| v[0].clone())
}

/// Connected, nothing dirty, no synchronisation in progress.
fn in_sync(j: &serde_json::Value) -> bool {
    j["connected"] == true && j["dirty"].as_u64() == Some(0) && j["sync"].is_null()
}

/// Polls `hastctl list` every `every` until `pred`, showing every status
/// to `seen` first; returns when `pred` first held. Panics after `limit`.
fn wait_for(
    node: &TestNode,
    res: &str,
    what: &str,
    limit: Duration,
    every: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
    mut seen: impl FnMut(&serde_json::Value),
) -> Instant {
    let start = Instant::now();
    loop {
        let j = list(node, res);
        if let Some(j) = &j {
            seen(j);
        }
        if j.as_ref().is_some_and(&pred) {
            return Instant::now();
        }
        assert!(
            start.elapsed() < limit,
            "{} {res}: timed out after {limit:?} waiting for {what}; last status: {}\nlog tail:\n{}",
            node.name,
            j.map(|j| j.to_string()).unwrap_or_default(),
            node.log_tail(30)
        );
        std::thread::sleep(every);
    }
}

/// Records (seconds since `t0`, `synced_bytes`) of a status in `trace`.
fn trace_sync(trace: &mut Vec<(f64, u64)>, t0: Instant, j: &serde_json::Value) {
    if let Some(b) = j["synced_bytes"].as_u64() {
        trace.push((t0.elapsed().as_secs_f64(), b));
    }
}

/// Waits (bounded, without failing) until the resources are in sync, so
/// that one job's replication backlog does not spill into the next.
fn settle(c: &Cluster, names: &[&str]) {
    for n in names {
        let start = Instant::now();
        while !list(&c.a, n).is_some_and(|j| in_sync(&j)) {
            if start.elapsed() > Duration::from_secs(30) {
                eprintln!("   warning: {n} still not in sync after 30 s; going on");
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Sets every bit of a resource's written map (metadata format 2), for
/// data written into the provider directly rather than through hastd.
fn mark_all_written(node: &TestNode, res: &str) {
    use std::os::unix::fs::FileExt;
    let md = node.dump(res);
    let (Some(off), Some(len)) = (md["datamapoff"].as_u64(), md["mapsize"].as_u64()) else {
        return;
    };
    if off == 0 {
        return;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(node.provider(res))
        .expect("open the provider");
    f.write_all_at(&vec![0xff; len as usize], off)
        .expect("write the written map");
    f.sync_all().expect("sync the provider");
}

/// Fills the data area of every resource of a node (fio, O_DIRECT).
fn fill_node(node: &TestNode, names: &[&str], size: u64) {
    for n in names {
        let md = node.dump(n);
        let localoff = md["localoff"].as_u64().expect("localoff");
        let datasize = md["datasize"].as_u64().expect("datasize");
        assert_eq!(
            datasize, size,
            "{n}: data area is {datasize} bytes, expected {size}"
        );
        let mb = fio::fill(&node.provider(n), localoff, size, &node.dir);
        eprintln!("   filled {}'s {n} at {mb:.0} MB/s", node.name);
    }
}

/// Copies `size` bytes at `offset` of `src` to a new file on the same
/// filesystem and returns the seconds it took: `dd | dd`, 4 MiB O_DIRECT
/// reads and writes, so that reading the next block overlaps writing the
/// previous one (as a pipelined synchronisation does), then fsync.
fn local_copy(src: &Path, offset: u64, size: u64) -> f64 {
    let wd = WorkDir::new("hast-bench-copy");
    let dst = wd.join("copy.img");
    let limit = Duration::from_secs(size / (10 * MIB) + 60);
    let start = Instant::now();
    let mut reader = Command::new("dd")
        .arg(format!("if={}", src.display()))
        .args([
            "bs=4M",
            "iflag=direct,skip_bytes,count_bytes",
            "status=none",
        ])
        .arg(format!("skip={offset}"))
        .arg(format!("count={size}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start dd (reader)");
    let pipe = reader.stdout.take().expect("dd's stdout");
    let mut reader = Guarded::adopt(reader, "dd (reader)");
    let writer = Command::new("dd")
        .arg(format!("of={}", dst.display()))
        .args([
            "bs=4M",
            "iflag=fullblock",
            "oflag=direct",
            "conv=fsync",
            "status=none",
        ])
        .stdin(pipe)
        .spawn()
        .expect("start dd (writer)");
    let mut writer = Guarded::adopt(writer, "dd (writer)");
    let r = reader.wait(limit);
    let w = writer.wait(limit.saturating_sub(start.elapsed()) + Duration::from_secs(5));
    let secs = start.elapsed().as_secs_f64();
    assert!(
        r.success() && w.success(),
        "local copy failed: reader {r}, writer {w}"
    );
    let copied = std::fs::metadata(&dst).map_or(0, |m| m.len());
    assert_eq!(
        copied, size,
        "local copy wrote {copied} bytes, expected {size}"
    );
    secs
}

/// hastd's request counters of `names` on both nodes, summed over the
/// resources: `{"A": {"writes": …}, "B": {…}}`.
fn counters(c: &Cluster, names: &[&str]) -> serde_json::Value {
    const KEYS: [&str; 4] = ["reads", "writes", "flushes", "activemap_updates"];
    let mut out = serde_json::Map::new();
    for (label, node) in [("A", &c.a), ("B", &c.b)] {
        let mut sums = [0u64; 4];
        for n in names {
            if let Some(j) = list(node, n) {
                for (s, k) in sums.iter_mut().zip(KEYS) {
                    *s += j["statistics"][k].as_u64().unwrap_or(0);
                }
            }
        }
        let m: serde_json::Map<String, serde_json::Value> = KEYS
            .iter()
            .zip(sums)
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect();
        out.insert(label.to_owned(), m.into());
    }
    out.into()
}

/// `after - before` of two [`counters`] values.
fn counters_delta(before: &serde_json::Value, after: &serde_json::Value) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (node, a) in after.as_object().into_iter().flatten() {
        let mut m = serde_json::Map::new();
        for (k, v) in a.as_object().into_iter().flatten() {
            let b = before[node][k].as_u64().unwrap_or(0);
            m.insert(k.clone(), json!(v.as_u64().unwrap_or(0).saturating_sub(b)));
        }
        out.insert(node.clone(), m.into());
    }
    out.into()
}

/// [`measure`] on a cluster, with hastd's counters of `names`.
fn measure_hastd(
    c: &Cluster,
    names: &[&str],
    system: &str,
    job: &Job,
    target: &Target,
    t: &Timing,
    procs: &[Watched],
) -> Row {
    let before = counters(c, names);
    let mut row = measure(system, job, target, t, procs, &c.a.dir);
    row.counters = Some(counters_delta(&before, &counters(c, names)));
    row.resources = c.a.resources.len() as u64;
    if let Some(a) = row.activemap_summary() {
        eprintln!("   {a}");
    }
    row
}

fn hastd_pids(c: &Cluster) -> Vec<Watched> {
    vec![
        Watched::new("A", c.a.pid().expect("nodeA runs")),
        Watched::new("B", c.b.pid().expect("nodeB runs")),
    ]
}

/// Two hastd nodes (127.0.0.1 primary, 127.0.0.2 secondary) with resources
/// `names` whose data areas are `size` bytes, created (`hastctl create`,
/// with `--keepdirty`), not started; the providers are sparse until
/// [`fill_node`].
fn new_pair(cfg: &Config, names: &[&str], size: u64, mode: &str) -> Cluster {
    let defs = names
        .iter()
        .map(|n| ResourceDef::file(n, provider_size(size)))
        .collect();
    let c = Cluster::new(
        defs,
        ClusterOptions {
            replication: mode.into(),
            timeout_secs: 10,
            ..Default::default()
        },
    );
    c.create_all();
    if let Some(k) = cfg.keepdirty {
        eprintln!("== hastd: keepdirty {k}");
        for node in [&c.a, &c.b] {
            let k = k.to_string();
            let mut args = vec!["create", "-k", k.as_str()];
            args.extend(names.iter().copied());
            node.hastctl(&args);
        }
    }
    c
}

/// Two hastd nodes (127.0.0.1 primary, 127.0.0.2 secondary) with one
/// resource of `cfg.size` (two with `two`), providers filled with data;
/// in each mode of `modes` (both nodes restarted with the new mode), the
/// workloads against the primary's export, then (first mode only, with
/// `two`) 4k randwrite QD32 on one resource alone and on both at once.
pub fn hastd(cfg: &Config, res: &mut Results, modes: &[String], workloads: &[Workload], two: bool) {
    require_tool("fio");
    let names: Vec<&str> = if two { vec!["r1", "r2"] } else { vec!["r1"] };
    let first = modes.first().map_or("memsync", String::as_str);
    let mut c = new_pair(cfg, &names, cfg.size, first);
    eprintln!("== hastd: filling the providers");
    fill_node(&c.a, &names, cfg.size);
    fill_node(&c.b, &names, cfg.size);
    let jobs: Vec<Job> = workloads.iter().map(Job::plain).collect();
    run_modes(&mut c, &names, modes, &jobs, &cfg.timing(), two, res);
}

/// In each mode, both nodes of `c` (re)started with it and the resources
/// in sync, each job against the primary's export of `r1` (and, first
/// mode only, with `two`, the two-resource test).
fn run_modes(
    c: &mut Cluster,
    names: &[&str],
    modes: &[String],
    jobs: &[Job],
    t: &Timing,
    two: bool,
    res: &mut Results,
) {
    for (i, mode) in modes.iter().enumerate() {
        eprintln!("== hastd {mode}: starting two nodes");
        for n in [&mut c.a, &mut c.b] {
            n.cfg.replication = Some(mode.clone());
            n.write_conf();
        }
        c.start();
        for n in names {
            c.b.hastctl(&["role", "secondary", n]);
        }
        for n in names {
            c.a.role("primary", n);
        }
        for n in names {
            wait_for(
                &c.a,
                n,
                "connected and in sync",
                Duration::from_secs(120),
                Duration::from_millis(100),
                in_sync,
                |_| {},
            );
        }
        let procs = hastd_pids(c);
        let system = report::hastd(mode);
        res.idle.push(idle_rss(&system, c, &procs));
        let uri = c.a.uri("r1");
        for job in jobs {
            settle(c, &names[..1]);
            let row = measure_hastd(
                c,
                &names[..1],
                &system,
                job,
                &Target::Nbd(uri.clone()),
                t,
                &procs,
            );
            res.rows.push(row);
        }
        if two && i == 0 {
            two_resources(c, &system, t, &procs, res);
        }
        let st = c.a.list("r1");
        if st["connected"] != true {
            eprintln!("   warning: r1 is not connected after the jobs: {st}");
        }
        c.stop();
    }
}

/// The nodes' resident memory now (idle, in sync).
fn idle_rss(system: &str, c: &Cluster, procs: &[Watched]) -> IdleRss {
    let i = IdleRss {
        system: system.into(),
        resources: c.a.resources.len() as u64,
        procs: procs
            .iter()
            .map(|p| (p.label.clone(), mem_kib(p.pid).map_or(0, |m| m.0)))
            .collect(),
    };
    eprintln!(
        "   idle RSS: {}",
        i.procs
            .iter()
            .map(|(l, k)| format!("{l} {:.1} MiB", *k as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    i
}

fn two_resources(c: &Cluster, system: &str, t: &Timing, procs: &[Watched], res: &mut Results) {
    let w = fio::RANDWRITE_QD32;
    settle(c, &["r1", "r2"]);
    eprintln!("== {system}: {} on r1 alone", w.label);
    let one = Job {
        key: report::ONE_RES.into(),
        label: "4k randwrite QD32, 1 res".into(),
        ..Job::plain(&w)
    };
    let mut one = measure_hastd(
        c,
        &["r1"],
        system,
        &one,
        &Target::Nbd(c.a.uri("r1")),
        t,
        procs,
    );
    one.compare = false;
    res.rows.push(one);
    settle(c, &["r1", "r2"]);
    eprintln!("== {system}: {} on r1 and r2 at once", w.label);
    let before = counters(c, &["r1", "r2"]);
    let mon = Monitor::start(procs.to_vec(), Duration::from_secs(t.ramp.into()));
    let runs: Vec<fio::Running> = ["r1", "r2"]
        .iter()
        .map(|n| fio::spawn(&w, &Target::Nbd(c.a.uri(n)), t, &c.a.dir))
        .collect();
    let parts: Vec<fio::FioResult> = runs.into_iter().map(fio::Running::wait).collect();
    let usage = mon.finish();
    eprintln!(
        "   r1 {:.0} IOPS, r2 {:.0} IOPS",
        parts[0].iops, parts[1].iops
    );
    let row = Row {
        system: system.into(),
        workload: report::TWO_RES.into(),
        label: "4k randwrite QD32, 2 res".into(),
        fio: fio::FioResult::combine(&parts),
        usage: Some(usage),
        compare: false,
        counters: Some(counters_delta(&before, &counters(c, &["r1", "r2"]))),
        resources: c.a.resources.len() as u64,
    };
    log_row(&row);
    res.rows.push(row);
}

/// 4k randwrite QD32 over a working set of `cfg.big_size` (bigger than
/// any sensible activemap hot set), default configuration: qemu-nbd on
/// the primary's provider file (from its data area on), then hastd in
/// memsync and fullsync (those of `cfg.modes`). Each provider is filled
/// just before it is first used; everything is deleted at the end.
pub fn big(cfg: &Config, res: &mut Results) {
    require_tool("fio");
    require_tool("qemu-nbd");
    let size = cfg.big_size;
    let modes: Vec<String> = ["memsync", "fullsync"]
        .into_iter()
        .filter(|m| cfg.modes.iter().any(|x| x == m))
        .map(String::from)
        .collect();
    let mut c = new_pair(
        cfg,
        &["r1"],
        size,
        modes.first().map_or("memsync", String::as_str),
    );
    let job = Job::big(size);
    let t = Timing {
        size,
        ..cfg.timing()
    };
    eprintln!("== big: filling the primary's provider");
    fill_node(&c.a, &["r1"], size);
    let localoff = c.a.dump("r1")["localoff"].as_u64().expect("localoff");
    {
        eprintln!("== big: qemu-nbd on the primary's provider (its data area)");
        let q = QemuNbd::start(&c.a.provider("r1"), localoff);
        res.rows.push(q.measure(&job, &t));
    }
    if modes.is_empty() {
        eprintln!("== big: neither memsync nor fullsync in --modes; no hastd jobs");
        return;
    }
    eprintln!("== big: filling the secondary's provider");
    fill_node(&c.b, &["r1"], size);
    run_modes(&mut c, &["r1"], &modes, &[job], &t, false, res);
}
/// Full synchronisation of a `cfg.sync_size` resource to a new secondary:
/// the primary's data area is filled locally, copied once with `dd`
/// (O_DIRECT) for the local rate, then hastd synchronises it (timed from
/// the connection to `dirty 0` with no sync in progress); then again to a
/// re-created secondary with 4k random writes on the export, and the same
/// writes once more with no sync running.
pub fn sync(cfg: &Config, res: &mut Results) {
    require_tool("fio");
    require_tool("qemu-io");
    require_tool("dd");
    let size = cfg.sync_size;
    assert!(
        size.is_multiple_of(4 * MIB),
        "--sync-size must be a multiple of 4 MiB"
    );
    let mode = cfg.sync_mode.clone();
    let mut c = new_pair(cfg, &["big"], size, &mode);
    let md = c.a.dump("big");
    let localoff = md["localoff"].as_u64().expect("localoff");
    assert_eq!(md["datasize"].as_u64(), Some(size), "data area size");
    let provider = c.a.provider("big");
    eprintln!(
        "== sync: filling the primary's {} data area",
        crate::util::human_size(size)
    );
    let fill_mb_s = fio::fill(&provider, localoff, size, &c.a.dir);
    // Written behind hastd's back: tell the written map, or the full
    // synchronisation would (rightly) skip what hastd never wrote.
    mark_all_written(&c.a, "big");

    eprintln!("== sync: local copy (dd | dd, O_DIRECT)");
    let local_copy_s = local_copy(&provider, localoff, size);
    eprintln!(
        "   {:.1} s, {:.0} MB/s",
        local_copy_s,
        size as f64 / 1e6 / local_copy_s
    );

    c.start();
    c.a.role("primary", "big");
    // One write while disconnected: the primary is no longer virgin, so a
    // new secondary gets a full synchronisation.
    let uri = c.a.uri("big");
    run_bounded(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 0 4k"])
            .arg(&uri),
        Duration::from_secs(30),
        "qemu-io",
        &c.a.dir,
    );
    let limit = Duration::from_secs(size / (10 * MIB) + 60);
    let every = Duration::from_millis(100);
    let wait_connected = |c: &Cluster| {
        wait_for(
            &c.a,
            "big",
            "the connection",
            Duration::from_secs(30),
            every,
            |j| j["connected"] == true,
            |_| {},
        )
    };
    let procs = hastd_pids(&c);
    eprintln!("== sync: new secondary, full synchronisation");
    let mon = Monitor::start(procs, Duration::ZERO);
    let asked = Instant::now();
    c.b.hastctl(&["role", "secondary", "big"]);
    let connected = wait_connected(&c);
    // The end of a sync, tracing its progress from `t0`.
    let wait_synced = |c: &Cluster, trace: &mut Vec<(f64, u64)>, t0: Instant| {
        wait_for(
            &c.a,
            "big",
            "the end of the sync",
            limit,
            every,
            in_sync,
            |j| trace_sync(trace, t0, j),
        )
    };
    let mut alone = Vec::new();
    let done = wait_synced(&c, &mut alone, connected);
    let usage = mon.finish();
    let mut s = SyncResult {
        mode: mode.clone(),
        size,
        fill_mb_s,
        local_copy_s,
        sync_s: done.duration_since(connected).as_secs_f64(),
        connect_s: connected.duration_since(asked).as_secs_f64(),
        usage: Some(usage),
        load_qd: cfg.sync_load_qd,
        ..Default::default()
    };
    s.timeline.alone = alone;
    eprintln!(
        "   {:.1} s, {:.0} MB/s (local copy {:.0} MB/s); {}",
        s.sync_s,
        s.sync_mb_s(),
        s.local_mb_s(),
        s.usage
            .as_ref()
            .map(|u| u.threads_summary(4))
            .unwrap_or_default()
    );
    // Record what is known so far, in case the loaded half fails.
    res.sync = Some(s.clone());

    eprintln!("== sync: re-created secondary, sync under application load");
    c.b.stop();
    sparse_file(&c.b.provider("big"), provider_size(size));
    c.b.create_all();
    c.b.start();
    let procs = hastd_pids(&c);
    c.b.hastctl(&["role", "secondary", "big"]);
    let connected = wait_connected(&c);
    // The load must end before the sync does: 60% of the unloaded sync.
    let runtime = ((s.sync_s * 0.6) as u32)
        .saturating_sub(cfg.ramp)
        .clamp(2, cfg.runtime.max(2));
    let t = Timing {
        runtime,
        ramp: cfg.ramp,
        size,
    };
    let w = Workload {
        qd: cfg.sync_load_qd,
        ..fio::RANDWRITE_QD32
    };
    let before = counters(&c, &["big"]);
    let mon = Monitor::start(procs.clone(), Duration::from_secs(cfg.ramp.into()));
    let fio_start = Instant::now();
    let log = c.a.dir.join("app");
    let mut run = fio::spawn_logged(&w, &Target::Nbd(uri.clone()), &t, &c.a.dir, &log);
    let mut sync_end = None;
    let mut loaded = Vec::new();
    while !run.done() {
        if let Some(j) = list(&c.a, "big") {
            trace_sync(&mut loaded, connected, &j);
            if sync_end.is_none() && in_sync(&j) {
                sync_end = Some(Instant::now());
            }
        }
        std::thread::sleep(every);
    }
    let fio_end = Instant::now();
    let busy = run.wait();
    let usage = mon.finish();
    let sync_end = match sync_end {
        Some(e) => e,
        None => wait_synced(&c, &mut loaded, connected),
    };
    // fio's log counts from the end of its ramp.
    let log_start = (fio_start + Duration::from_secs(cfg.ramp.into()))
        .saturating_duration_since(connected)
        .as_secs_f64();
    s.timeline.loaded = loaded;
    s.timeline.app_iops = fio::read_iops_log(&log)
        .into_iter()
        .map(|(t, iops)| (t + log_start, iops))
        .collect();
    let window_start = fio_start + Duration::from_secs(cfg.ramp.into());
    let window = fio_end
        .saturating_duration_since(window_start)
        .as_secs_f64();
    let ran = sync_end
        .saturating_duration_since(window_start)
        .as_secs_f64();
    s.load_overlap = if window > 0.0 {
        (ran / window).min(1.0)
    } else {
        0.0
    };
    s.loaded_sync_s = Some(sync_end.duration_since(connected).as_secs_f64());
    s.load_runtime = runtime;
    let label = |what: &str| format!("app 4k QD{}, {what}", w.qd);
    let row = Row {
        system: report::hastd(&mode),
        workload: report::SYNC_BUSY.into(),
        label: label("during sync"),
        fio: busy,
        usage: Some(usage),
        compare: false,
        counters: Some(counters_delta(&before, &counters(&c, &["big"]))),
        resources: 1,
    };
    log_row(&row);
    res.rows.push(row);
    eprintln!("== sync: the same load with no sync running");
    settle(&c, &["big"]);
    let job = Job {
        w,
        key: report::SYNC_IDLE.into(),
        label: label("no sync"),
    };
    let mut idle = measure_hastd(
        &c,
        &["big"],
        &report::hastd(&mode),
        &job,
        &Target::Nbd(uri),
        &t,
        &procs,
    );
    idle.compare = false;
    res.rows.push(idle);
    res.sync = Some(s);
    c.stop();
}

/// The `security` part's link variants: (key, label).
pub const SECURITY_VARIANTS: [(&str, &str); 3] = [
    ("plain", "unauthenticated"),
    ("secret", "secret (AES-256-GCM records)"),
    ("tls", "TLS 1.3"),
];

/// The cost of authentication: one memsync pair, 4k randwrite QD32 and 1M
/// sequential write over the unauthenticated link, with a secret (the
/// AES-GCM record stream) and with TLS, in this run; rows `hastd memsync,
/// <variant>` and a table of the ratios to the unauthenticated link
/// (targets: secret ≥ 0.95 on both, TLS ≥ 0.8 on 1M sequential).
pub fn security(cfg: &Config, res: &mut Results) {
    require_tool("fio");
    let names = ["r1"];
    let mut c = new_pair(cfg, &names, cfg.size, "memsync");
    eprintln!("== security: filling the providers");
    fill_node(&c.a, &names, cfg.size);
    fill_node(&c.b, &names, cfg.size);
    let pki = c.a.dir.join("pki");
    std::fs::create_dir_all(&pki).expect("pki directory");
    let ca = hast_tests::certs::TestCa::new(&pki, "bench-ca");
    let certs = [
        ca.node(&pki, "nodeA", hast_tests::cluster::IP_A),
        ca.node(&pki, "nodeB", hast_tests::cluster::IP_B),
    ];
    let base = [
        c.a.cfg.resource_extra.clone(),
        c.b.cfg.resource_extra.clone(),
    ];
    let jobs = [
        Job::plain(&fio::RANDWRITE_QD32),
        Job::plain(&fio::SEQWRITE_1M),
    ];
    let secret = "\tsecret bench-secret-0123456789abcdef\n";
    for (key, label) in SECURITY_VARIANTS {
        eprintln!("== security: {label}");
        for (i, n) in [&mut c.a, &mut c.b].into_iter().enumerate() {
            n.cfg.resource_extra = base[i].clone();
            match key {
                "secret" => n.cfg.resource_extra.push_str(secret),
                "tls" => n
                    .cfg
                    .resource_extra
                    .push_str(&hast_tests::certs::tls_statements(&ca.pem_path, &certs[i])),
                _ => {}
            }
        }
        let (rows, idle) = (res.rows.len(), res.idle.len());
        run_modes(
            &mut c,
            &names,
            &["memsync".into()],
            &jobs,
            &cfg.timing(),
            false,
            res,
        );
        res.idle.truncate(idle);
        for r in &mut res.rows[rows..] {
            r.system = report::secured(key);
            // Compared with the unauthenticated link only (below).
            r.compare = false;
        }
    }
    let mut t = String::from(
        "| link | 4k randwrite QD32 IOPS | ratio | 1M seq write MB/s | ratio |\n|---|---:|---:|---:|---:|\n",
    );
    let fig = |key: &str, w: &Workload| {
        res.row(&report::secured(key), w.key)
            .map(|r| (r.fio.iops, r.fio.mb_per_s))
    };
    let base4 = fig("plain", &fio::RANDWRITE_QD32).map(|f| f.0);
    let base1 = fig("plain", &fio::SEQWRITE_1M).map(|f| f.1);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.3}", a / b),
        _ => "n/a".into(),
    };
    let mut json = Vec::new();
    for (key, label) in SECURITY_VARIANTS {
        let q = fig(key, &fio::RANDWRITE_QD32).map(|f| f.0);
        let s = fig(key, &fio::SEQWRITE_1M).map(|f| f.1);
        t.push_str(&format!(
            "| {label} | {:.0} | {} | {:.0} | {} |\n",
            q.unwrap_or(0.0),
            ratio(q, base4),
            s.unwrap_or(0.0),
            ratio(s, base1)
        ));
        json.push(json!({"link": key, "randwrite_4k_qd32_iops": q, "seqwrite_1m_mb_s": s}));
    }
    t.push_str(
        "\ntargets: secret ≥ 0.95 × unauthenticated on both; TLS ≥ 0.8 × on 1M sequential writes\n",
    );
    eprintln!("{t}");
    res.extra.push((
        "authentication cost (memsync)".into(),
        t,
        serde_json::Value::Array(json),
    ));
}
