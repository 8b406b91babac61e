//! hast-bench: end-to-end benchmarks on this host with real processes.
//!
//! `hast-bench all` measures, in one run and with the same fio jobs (4 KiB
//! random write QD1 and QD32, 4 KiB random read QD32 over written data,
//! 1 MiB sequential write QD8, 4 KiB 70/30 random read/write QD16, each
//! covering the whole `--size`):
//!
//! 1. `raw`: the raw disk, fio io_uring + O_DIRECT on a file;
//! 2. `qemu-nbd`: qemu-nbd (`--cache=none --aio=io_uring -f raw`) serving
//!    the same file on a unix socket, fio's nbd engine;
//! 3. `hastd`: two hastd nodes (127.0.0.1 primary, 127.0.0.2 secondary),
//!    fio's nbd engine against the primary's export, in each replication
//!    mode; `two`: two resources at once vs one (4k randwrite QD32);
//! 4. `big`: 4k randwrite QD32 over `--big-size` (8 GiB) on qemu-nbd and
//!    on hastd memsync and fullsync;
//! 5. `sync`: a full synchronisation of `--sync-size` to a new secondary
//!    vs a local `dd` copy, and application 4k random writes during a sync
//!    vs with no sync.
//!
//! It prints one table (IOPS, MB/s, p50/p99, server CPU s/GiB from
//! /proc/PID/stat of hastd or qemu-nbd, server system calls per request,
//! peak RSS, ratios against qemu-nbd and the raw disk) and the targets of
//! the performance issue, and writes JSON (`--json FILE`), a markdown
//! section (`--docs FILE`, replaced on each run) and SVG charts (`--charts
//! DIR`, by default `bench/` next to the docs file) that the section
//! embeds. Each part is also a subcommand; `replication` is the old
//! baseline (4k QD1 and 1M QD8 on hastd). Build release first:
//! `scripts/bench.sh` does both.

use std::path::PathBuf;
use std::process::exit;

use hast_bench::fio::{self, Workload};
use hast_bench::machine::Machine;
use hast_bench::report::{self, Results};
use hast_bench::suite::{self, Config};
use hast_bench::util::{command_line, parse_size, GIB};
use hast_bench::{charts, syscalls};

const USAGE: &str = "\
usage: hast-bench COMMAND [OPTIONS]

commands:
  all          everything below in one run (about 8 minutes with the defaults)
  raw          the raw disk: fio, io_uring, O_DIRECT on a file
  qemu-nbd     qemu-nbd serving a file on a unix socket, fio's nbd engine
  hastd        two hastd nodes, the primary's export, each mode of --modes
  two          two resources at once vs one (4k randwrite QD32, first mode)
  big          4k randwrite QD32 over --big-size: qemu-nbd, hastd memsync and fullsync
  sync         full sync of --sync-size vs a local dd copy, app IOPS during sync
  replication  the old baseline: hastd, 4k randwrite QD1 and 1M write QD8
  resync       resync after a primary crash under 4k random writes:
               syncmode full vs checksum (bytes on the wire, time; --size, 1G at most)
  compression  1M sequential writes, compressible and random data, with each
               compression setting (bytes on the wire, MB/s; --size, 512M at most)
  wire         resync and compression in one run
  security     the cost of authentication: 4k randwrite QD32 and 1M sequential
               write in memsync over the unauthenticated link, with a secret
               (AES-GCM records) and with TLS, as ratios to the unauthenticated link

options:
  --size SIZE         file / data area of each resource, covered by every job (2G)
  --runtime SECS      measured seconds per fio job (8; --seconds is an alias)
  --ramp SECS         fio ramp seconds per job (1)
  --modes LIST        replication modes (memsync,fullsync,async)
  --workloads LIST    fio workloads (all: randwrite-4k-qd1,randwrite-4k-qd32,
                      randread-4k-qd32,write-1m-qd8,randrw70-4k-qd16)
  --sync-size SIZE    data area of the full-sync resource (4G)
  --sync-mode MODE    replication mode of the sync test (memsync)
  --sync-load-qd N    queue depth of the 4k randwrite load during the sync (32)
  --big-size SIZE     working set of the big job (8G; both providers are that
                      big, filled with data; qemu-nbd serves the primary's)
  --keepdirty N       hastctl create -k for the hastd providers (default 64,
                      the original's); e.g. the extent count of --size to
                      size the activemap hot set to the working set
  --dir DIR           where files and nodes live; O_DIRECT needed, so not tmpfs
                      (default: $HAST_TEST_DIR or the system temp dir)
  --json FILE         write the results as JSON
  --docs FILE         replace (or append) the generated section of FILE,
                      e.g. docs/benchmarks.md
  --charts DIR        write SVG charts to DIR (default with --docs: bench/
                      next to FILE; the generated section embeds them)

Server system calls are counted with a raw_syscalls:sys_enter perf counter
per thread (needs root or CAP_PERFMON and tracefs); where that is not
possible the harness says why and reports n/a.";

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("hast-bench: {msg}");
    }
    eprintln!("{USAGE}");
    exit(64);
}

struct Cli {
    cmd: String,
    cfg: Config,
    json: Option<PathBuf>,
    docs: Option<PathBuf>,
    charts: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> Cli {
    let Some(cmd) = args.first().cloned() else {
        usage("")
    };
    if cmd == "-h" || cmd == "--help" {
        println!("{USAGE}");
        exit(0);
    }
    let mut cfg = Config {
        size: 2 * GIB,
        runtime: 8,
        ramp: 1,
        modes: vec!["memsync".into(), "fullsync".into(), "async".into()],
        workloads: fio::WORKLOADS.to_vec(),
        sync_size: 4 * GIB,
        sync_mode: "memsync".into(),
        sync_load_qd: 32,
        keepdirty: None,
        big_size: 8 * GIB,
    };
    let mut workloads_given = false;
    let (mut json, mut docs, mut charts) = (None, None, None);
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        let num = |v: String| -> u32 {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{a}: not a number: {v}")))
        };
        let size = |v: String| parse_size(&v).unwrap_or_else(|e| usage(&e));
        match a.as_str() {
            "--size" => cfg.size = size(val()),
            "--runtime" | "--seconds" => cfg.runtime = num(val()).max(1),
            "--ramp" => cfg.ramp = num(val()),
            "--modes" => {
                cfg.modes = val().split(',').map(str::to_owned).collect();
                for m in &cfg.modes {
                    if !["memsync", "fullsync", "async"].contains(&m.as_str()) {
                        usage(&format!("unknown replication mode {m}"));
                    }
                }
            }
            "--workloads" => {
                workloads_given = true;
                cfg.workloads = val()
                    .split(',')
                    .map(|k| {
                        fio::workload(k).unwrap_or_else(|| usage(&format!("unknown workload {k}")))
                    })
                    .collect();
            }
            "--sync-size" => cfg.sync_size = size(val()),
            "--sync-mode" => cfg.sync_mode = val(),
            "--sync-load-qd" => cfg.sync_load_qd = num(val()).max(1),
            "--keepdirty" => cfg.keepdirty = Some(u64::from(num(val()).max(1))),
            "--dir" => {
                let d = val();
                // hast_tests puts node directories under HAST_TEST_DIR.
                std::env::set_var("HAST_TEST_DIR", &d);
            }
            "--json" => json = Some(PathBuf::from(val())),
            "--docs" => docs = Some(PathBuf::from(val())),
            "--charts" => charts = Some(PathBuf::from(val())),
            "--big-size" => cfg.big_size = size(val()),
            _ => usage(&format!("unknown option {a}")),
        }
    }
    if cmd == "replication" && !workloads_given {
        cfg.workloads = vec![fio::RANDWRITE_QD1, fio::SEQWRITE_1M];
    }
    let charts = charts.or_else(|| {
        docs.as_ref().map(|d: &PathBuf| {
            d.parent()
                .unwrap_or(std::path::Path::new("."))
                .join("bench")
        })
    });
    Cli {
        cmd,
        cfg,
        json,
        docs,
        charts,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cli = parse_args(&args);
    let cfg = &cli.cfg;
    let root = hast_tests::test_root();
    // Everything of this run (node directories, files) lives in one
    // directory, removed at the end; scripts/bench.sh removes it when it
    // interrupts the run.
    let run_dir = RunDir::new(&root);
    let mut res = Results {
        date: command_line("date", &["-u", "+%Y-%m-%d %H:%M:%S"]),
        command: format!("hast-bench {}", args.join(" ")),
        machine: Machine::probe(&root),
        config: cfg.to_json(),
        load: (report::loadavg(), String::new()),
        ..Default::default()
    };
    eprintln!("hast-bench: {} in {}", res.machine.line(), root.display());
    if let Err(why) = syscalls::availability() {
        eprintln!("hast-bench: system calls cannot be counted (reported as n/a): {why}");
        res.syscalls_unavailable = Some(why);
    }
    let modes = cfg.modes.clone();
    let workloads: Vec<Workload> = cfg.workloads.clone();
    match cli.cmd.as_str() {
        "all" => {
            suite::require_tools();
            let mut file = None;
            suite::part("prepare the benchmark file", &mut res, |_| {
                file = Some(suite::bench_file(cfg));
            });
            if let Some((_dir, f)) = &file {
                suite::part("raw disk", &mut res, |r| suite::raw(cfg, r, f));
                suite::part("qemu-nbd", &mut res, |r| suite::qemu_nbd(cfg, r, f));
            }
            drop(file);
            suite::part("hastd", &mut res, |r| {
                suite::hastd(cfg, r, &modes, &workloads, true)
            });
            suite::part("authentication cost", &mut res, |r| suite::security(cfg, r));
            suite::part("big working set", &mut res, |r| suite::big(cfg, r));
            suite::part("full sync", &mut res, |r| suite::sync(cfg, r));
        }
        "raw" | "qemu-nbd" => suite::part(&cli.cmd.clone(), &mut res, |r| {
            let (_dir, f) = suite::bench_file(cfg);
            if cli.cmd == "raw" {
                suite::raw(cfg, r, &f)
            } else {
                suite::qemu_nbd(cfg, r, &f)
            }
        }),
        "hastd" | "replication" => suite::part("hastd", &mut res, |r| {
            suite::hastd(cfg, r, &modes, &workloads, false)
        }),
        "two" => suite::part("two resources", &mut res, |r| {
            suite::hastd(cfg, r, &modes[..1], &[], true)
        }),
        "big" => suite::part("big working set", &mut res, |r| suite::big(cfg, r)),
        "sync" => suite::part("full sync", &mut res, |r| suite::sync(cfg, r)),
        "resync" => suite::part("resync", &mut res, |r| hast_bench::wire::resync(cfg, r)),
        "compression" => suite::part("compression", &mut res, |r| {
            hast_bench::wire::compression(cfg, r)
        }),
        "security" => suite::part("authentication cost", &mut res, |r| suite::security(cfg, r)),
        "wire" => {
            suite::part("resync", &mut res, |r| hast_bench::wire::resync(cfg, r));
            suite::part("compression", &mut res, |r| {
                hast_bench::wire::compression(cfg, r)
            });
        }
        other => usage(&format!("unknown command {other}")),
    }
    res.load.1 = report::loadavg();
    if let Some(dir) = &cli.charts {
        let docs_dir = cli.docs.as_ref().and_then(|d| d.parent());
        match charts::write_all(&res, dir, docs_dir) {
            Ok(c) => {
                eprintln!("{} charts written to {}", c.len(), dir.display());
                res.charts = c;
            }
            Err(e) => {
                eprintln!("hast-bench: charts: {e}");
                res.errors.push(format!("charts: {e}"));
            }
        }
    }
    println!("{}", res.text());
    if let Some(p) = &cli.json {
        match std::fs::write(
            p,
            serde_json::to_string_pretty(&res.to_json()).expect("JSON") + "\n",
        ) {
            Ok(()) => eprintln!("results written to {}", p.display()),
            Err(e) => {
                eprintln!("hast-bench: cannot write {}: {e}", p.display());
                res.errors.push(format!("write {}: {e}", p.display()));
            }
        }
    }
    if let Some(p) = &cli.docs {
        match res.update_docs(p) {
            Ok(()) => eprintln!("section written to {}", p.display()),
            Err(e) => {
                eprintln!("hast-bench: cannot update {}: {e}", p.display());
                res.errors.push(format!("update {}: {e}", p.display()));
            }
        }
    }
    drop(run_dir);
    if !res.errors.is_empty() {
        exit(1);
    }
}

/// `<root>/hast-bench-run-<pid>`, made the harness root (`HAST_TEST_DIR`)
/// and removed when dropped.
struct RunDir(PathBuf);

impl RunDir {
    fn new(root: &std::path::Path) -> RunDir {
        let dir = root.join(format!("hast-bench-run-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("hast-bench: cannot create {}: {e}", dir.display());
            exit(73);
        }
        std::env::set_var("HAST_TEST_DIR", &dir);
        RunDir(dir)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
