//! hastctl: the HAST control utility.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::exit;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use hast_control::config::{self, Config, NodeIdentity, ResourceConfig};
use hast_control::exit as ex;
use hast_control::offline::{self, CreateParams};
use hast_control::proto::{self, ErrorKind, ReloadReport, Request, Response};
use hast_control::report;
use hast_control::size::parse_size;
use hast_datapath::metadata::Role;

/// Control utility for HAST resources.
///
/// create and dump work on the local providers directly; the other
/// commands talk to hastd over its control socket.
#[derive(Parser, Debug)]
#[command(name = "hastctl", version, about, long_about)]
struct Cli {
    /// Configuration file.
    #[arg(
        short = 'c',
        value_name = "FILE",
        default_value = "/etc/hast.conf",
        global = true
    )]
    config: PathBuf,
    /// Debug output (repeat for more).
    #[arg(short = 'd', action = clap::ArgAction::Count, global = true)]
    debug: u8,
    /// Act as node NAME instead of this host's name (also: HAST_NODE)
    /// [default: the host name].
    #[arg(long, value_name = "NAME", global = true)]
    node: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Initialise the metadata and activemap of resources' providers
    /// (offline; the resource must not be active in hastd).
    Create {
        /// Extent size: bytes covered by one activemap bit.
        #[arg(short = 'e', value_name = "SIZE", default_value = "2M")]
        extentsize: String,
        /// Extents kept marked while idle (the original's default is 64).
        #[arg(short = 'k', value_name = "COUNT", default_value = "1024")]
        keepdirty: String,
        /// Bytes of the provider to use [default: all of it].
        #[arg(short = 'm', value_name = "SIZE")]
        mediasize: Option<String>,
        /// Overwrite a provider that holds another resource's metadata
        /// (destroys that resource's data on this node).
        #[arg(short = 'f', long)]
        force: bool,
        /// Resources.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// Change the role of resources: init, primary or secondary.
    Role {
        /// Promote even a node that knows its data is out of date.
        #[arg(long)]
        force: bool,
        /// The new role.
        #[arg(value_parser = ["init", "primary", "secondary"])]
        role: String,
        /// `all` or resource names.
        #[arg(required = true, value_name = "all|NAME")]
        names: Vec<String>,
    },
    /// Show every field of resources.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// `all` or resource names [default: all].
        #[arg(value_name = "all|NAME")]
        names: Vec<String>,
    },
    /// Show a one-line status of resources (coloured on a terminal).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// `all` or resource names [default: all].
        #[arg(value_name = "all|NAME")]
        names: Vec<String>,
    },
    /// Wait until resources reach a state; exits 75 (EX_TEMPFAIL) on
    /// timeout, naming the resources that are not there yet.
    ///
    /// States: `export` (primary, and its NBD socket accepts connections),
    /// `complete` (replication connection up), `in-sync` (complete, nothing
    /// dirty, no synchronisation running, nothing in flight to the peer),
    /// `disconnected` (replication connection down), `role:<role>`.
    /// `in-sync` draws a progress bar per resource when stderr is a
    /// terminal.
    Wait {
        /// export, complete, in-sync, disconnected, role:init,
        /// role:primary or role:secondary.
        state: String,
        /// Seconds to wait at most; 0 waits forever.
        #[arg(long, value_name = "S", default_value = "60")]
        timeout: f64,
        /// `all` or resource names.
        #[arg(required = true, value_name = "all|NAME")]
        names: Vec<String>,
    },
    /// Print events as they happen (role changes, connect, disconnect,
    /// syncstart, sync progress, syncdone, syncintr, split-brain,
    /// disk-failed), one per line, until interrupted.
    Events {
        /// Print JSON, one object per line.
        #[arg(long)]
        json: bool,
        /// `all` or resource names [default: all].
        #[arg(value_name = "all|NAME")]
        names: Vec<String>,
    },
    /// Compare the data of the primary and the secondary block by block,
    /// online, on the primary: both nodes digest the same 4 KiB blocks
    /// (xxh3, or sha256) under the range locks, at the synchronisation's
    /// pace (the application keeps about half of the disk). Extents never
    /// written since `hastctl create` are not compared.
    ///
    /// Shows a progress bar on a terminal, then per resource the blocks
    /// compared, the blocks that differ and the first differing ranges
    /// (`hastctl list` keeps the result). Exit status: 0 when nothing
    /// differs (or, with --repair, once the differences are
    /// synchronised), 1 when blocks differ, 75 on timeout, other values
    /// for errors.
    Verify {
        /// Start of the range, in bytes of the data area (K, M, G, T
        /// suffixes).
        #[arg(long, value_name = "N", default_value = "0")]
        offset: String,
        /// Bytes to verify [default: to the end of the data area].
        #[arg(long, value_name = "N")]
        length: Option<String>,
        /// Digest: xxh3 (fast, the default) or sha256.
        #[arg(long, value_name = "ALG", default_value = "xxh3",
              value_parser = ["xxh3", "sha256"])]
        algorithm: String,
        /// Mark the extents of differing blocks and synchronise them from
        /// the primary (waits until they are in sync).
        #[arg(long)]
        repair: bool,
        /// Start the verify and return at once (see `hastctl list`).
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait at most; 0 waits forever.
        #[arg(long, value_name = "S", default_value = "0")]
        timeout: f64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// `all` or resource names.
        #[arg(required = true, value_name = "all|NAME")]
        names: Vec<String>,
    },
    /// Print the metadata stored on resources' providers (offline).
    Dump {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// `all` or resource names [default: all].
        #[arg(value_name = "all|NAME")]
        names: Vec<String>,
    },
    /// Make hastd re-read its configuration file (as SIGHUP does) and
    /// print what changed, per resource. A file with an error changes
    /// nothing (exit 78).
    Reload {
        /// Print the outcome as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resolve a split-brain. `discard`, run on the node whose changes
    /// since the split are to be thrown away (it must be secondary or
    /// init): at the next connection it takes the primary's data over the
    /// extents either side changed — not a full copy.
    #[command(name = "split-brain")]
    SplitBrain {
        /// The resolution: `discard`.
        #[arg(value_parser = ["discard"])]
        action: String,
        /// Resources.
        #[arg(required = true, value_name = "all|NAME")]
        names: Vec<String>,
    },
    /// Print a shell completion script, generated from this command line
    /// definition (e.g. `hastctl completions bash > /etc/bash_completion.d/hastctl`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn load(cli: &Cli) -> Config {
    let ident = NodeIdentity::resolve(cli.node.as_deref());
    match config::load(&cli.config, &ident) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hastctl: {e}");
            if matches!(cli.command, Command::Reload { .. }) {
                // hastd would refuse the same file: not worth asking.
                eprintln!(
                    "hastctl: reload not sent; nothing changed (hastd keeps its configuration)"
                );
            }
            exit(ex::CONFIG);
        }
    }
}

fn size_arg(what: &str, v: Option<&str>) -> Option<u64> {
    v.map(|s| match parse_size(s) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("hastctl: invalid {what}: {e}");
            exit(ex::USAGE);
        }
    })
}

fn all_if_empty(names: &[String]) -> Vec<String> {
    if names.is_empty() {
        vec!["all".into()]
    } else {
        names.to_vec()
    }
}

/// The exit code for an error reply of this kind.
fn exit_code_of(kind: Option<ErrorKind>) -> i32 {
    match kind {
        Some(ErrorKind::Busy) => ex::TEMPFAIL,
        Some(ErrorKind::Config) => ex::CONFIG,
        Some(ErrorKind::Failed) => ex::SOFTWARE,
        Some(ErrorKind::Provider) => ex::NOINPUT,
        _ => ex::DATAERR,
    }
}

/// One request; exits on a request-level error or an unreachable hastd.
fn call(cfg: &Config, req: Request) -> Response {
    match proto::call(&cfg.control, req, Duration::from_secs(120)) {
        Ok(r) => {
            if let Some(e) = &r.error {
                eprintln!("hastctl: {e}");
                exit(exit_code_of(r.error_kind));
            }
            r
        }
        Err(e) => {
            eprintln!("hastctl: {e}");
            exit(ex::UNAVAILABLE);
        }
    }
}

/// The named resources of the configuration; exits on an unknown one.
fn selected<'c>(cfg: &'c Config, names: &[String]) -> Vec<&'c ResourceConfig> {
    cfg.select(names).unwrap_or_else(|e| {
        eprintln!("hastctl: {e}");
        exit(ex::DATAERR);
    })
}

/// Refuses `create` on a resource hastd is using.
fn ensure_inactive(cfg: &Config, name: &str) -> Result<(), String> {
    let req = Request::Status {
        resources: vec![name.to_owned()],
    };
    match proto::call(&cfg.control, req, Duration::from_secs(10)) {
        Ok(resp) => match resp.resources.first() {
            Some(r) if r.role != "init" => Err(format!(
                "[{name}] resource is active in hastd (role {}); run 'hastctl role init {name}' first",
                r.role
            )),
            _ => Ok(()),
        },
        // hastd is not running: the provider is ours.
        Err(_) => Ok(()),
    }
}

fn main() {
    let cli = Cli::parse();
    if let Command::Completions { shell } = &cli.command {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "hastctl",
            &mut std::io::stdout(),
        );
        exit(ex::OK);
    }
    let cfg = load(&cli);
    let code = match &cli.command {
        Command::Create {
            extentsize,
            keepdirty,
            mediasize,
            force,
            names,
        } => {
            let params = CreateParams {
                extentsize: size_arg("extent size", Some(extentsize)),
                keepdirty: size_arg("keepdirty", Some(keepdirty)),
                mediasize: size_arg("media size", mediasize.as_deref()),
                force: *force,
            };
            create(&cfg, params, names, cli.debug)
        }
        Command::SplitBrain { action, names } => split_brain(&cfg, action, names),
        Command::Dump { json, names } => dump(&cfg, *json, names),
        Command::Role { force, role, names } => set_role(&cfg, role, *force, names, cli.debug),
        Command::Wait {
            state,
            timeout,
            names,
        } => wait::run(&cfg, state, *timeout, names, cli.debug),
        Command::Events { json, names } => {
            events::run(&cfg, *json, &all_if_empty(names), cli.debug)
        }
        Command::List { json, names } => show(&cfg, *json, names, Show::List),
        Command::Status { json, names } => show(&cfg, *json, names, Show::Status),
        Command::Reload { json } => reload(&cfg, *json),
        Command::Verify {
            offset,
            length,
            algorithm,
            repair,
            no_wait,
            timeout,
            json,
            names,
        } => verify::run(
            &cfg,
            verify::Args {
                offset: size_arg("offset", Some(offset)).unwrap_or(0),
                length: size_arg("length", length.as_deref()),
                algorithm: algorithm.clone(),
                repair: *repair,
                wait: !*no_wait,
                timeout: *timeout,
                json: *json,
            },
            names,
        ),
        Command::Completions { .. } => ex::OK,
    };
    exit(code);
}

/// `hastctl create`.
fn create(cfg: &Config, params: CreateParams, names: &[String], debug: u8) -> i32 {
    let mut code = ex::OK;
    for name in names {
        let Some(res) = cfg.resource(name) else {
            eprintln!("hastctl: unknown resource '{name}'");
            code = ex::DATAERR;
            continue;
        };
        let result = ensure_inactive(cfg, name).and_then(|_| offline::create(res, params));
        if let Some(w) = std::fs::File::open(&res.localpath)
            .ok()
            .and_then(|f| hast_datapath::provider::sparse_warning(&res.localpath, &f))
        {
            eprintln!("hastctl: warning: [{name}] {w}");
        }
        match result {
            Ok(md) if debug > 0 => eprintln!(
                "[{name}] created on {}: datasize {}, extentsize {}, keepdirty {}",
                res.localpath.display(),
                md.datasize,
                md.extentsize,
                md.keepdirty
            ),
            Ok(_) => {}
            Err(e) => {
                eprintln!("hastctl: {e}");
                if code == ex::OK {
                    code = ex::DATAERR;
                }
            }
        }
    }
    code
}

/// `hastctl split-brain`.
fn split_brain(cfg: &Config, action: &str, names: &[String]) -> i32 {
    let resp = call(
        cfg,
        Request::SplitBrain {
            action: action.to_owned(),
            resources: names.to_vec(),
        },
    );
    let mut code = ex::OK;
    for r in &resp.resources {
        if let Some(e) = &r.error {
            eprintln!("hastctl: {e}");
            code = ex::SOFTWARE;
        } else {
            eprintln!(
                "[{}] this node's changes since the split-brain will be discarded when the primary connects",
                r.name
            );
        }
    }
    code
}

/// `hastctl dump`.
fn dump(cfg: &Config, json: bool, names: &[String]) -> i32 {
    let mut code = ex::OK;
    let mut out = Vec::new();
    for res in selected(cfg, &all_if_empty(names)) {
        match offline::read(res) {
            Ok((md, counts)) if json => {
                let mut v = serde_json::to_value(&md).unwrap_or_default();
                v["ondisk_dirty_extents"] = counts.marked.into();
                v["written_extents"] = counts.written.into();
                out.push(v);
            }
            Ok((md, counts)) => print!("{}", report::dump(&md, counts.marked, counts.written)),
            Err(e) => {
                eprintln!("hastctl: {e}");
                code = ex::NOINPUT;
            }
        }
    }
    if json {
        println!("{}", serde_json::Value::Array(out));
    }
    code
}

/// `hastctl role`.
fn set_role(cfg: &Config, role: &str, force: bool, names: &[String], debug: u8) -> i32 {
    let role: Role = match role.parse() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hastctl: {e}");
            return ex::USAGE;
        }
    };
    let resp = call(
        cfg,
        Request::Role {
            role,
            resources: names.to_vec(),
            force,
        },
    );
    let mut code = ex::OK;
    for r in &resp.resources {
        match (&r.error, &r.previous_role) {
            (Some(e), _) => {
                eprintln!("hastctl: {e}");
                code = ex::SOFTWARE;
            }
            (None, Some(old)) if debug > 0 => {
                if old == &r.role {
                    eprintln!("[{}] role unchanged ({old})", r.name);
                } else {
                    eprintln!("[{}] role changed from {old} to {}", r.name, r.role);
                }
            }
            _ => {}
        }
    }
    code
}

enum Show {
    List,
    Status,
}

/// `hastctl list` and `hastctl status`.
fn show(cfg: &Config, json: bool, names: &[String], what: Show) -> i32 {
    let resp = call(
        cfg,
        Request::Status {
            resources: all_if_empty(names),
        },
    );
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&resp.resources).unwrap_or_default()
        );
        return ex::OK;
    }
    match what {
        Show::List => print!("{}", report::list(&resp.resources)),
        Show::Status => {
            let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            print!("{}", report::status_table_styled(&resp.resources, colour));
        }
    }
    ex::OK
}

/// `hastctl reload`.
fn reload(cfg: &Config, json: bool) -> i32 {
    let resp = match proto::call(&cfg.control, Request::Reload, Duration::from_secs(300)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hastctl: {e}");
            return ex::UNAVAILABLE;
        }
    };
    if let Some(e) = &resp.error {
        eprintln!("hastctl: {e}");
        return exit_code_of(resp.error_kind);
    }
    let report = resp.reload.unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", report::reload(&report));
    }
    reload_code(&report)
}

fn reload_code(report: &ReloadReport) -> i32 {
    if report.resources.iter().any(|r| r.error.is_some()) {
        ex::SOFTWARE
    } else {
        ex::OK
    }
}

/// `hastctl wait`.
mod wait {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use hast_control::config::Config;
    use hast_control::exit as ex;
    use hast_control::progress::{Progress, Step};
    use hast_control::proto::{self, Request, ResourceReport};
    use hast_control::size::humanize;
    use hast_datapath::metadata::Role;

    /// How often `status` is polled.
    const POLL: Duration = Duration::from_millis(100);

    /// What to wait for.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum State {
        Export,
        Complete,
        InSync,
        Disconnected,
        Role(Role),
    }

    fn parse(s: &str) -> Result<State, String> {
        Ok(match s {
            "export" => State::Export,
            "complete" => State::Complete,
            "in-sync" => State::InSync,
            "disconnected" => State::Disconnected,
            _ => match s.strip_prefix("role:") {
                Some(r) => State::Role(r.parse()?),
                None => {
                    return Err(format!(
                        "unknown state '{s}' (expected export, complete, in-sync, \
                         disconnected or role:<init|primary|secondary>)"
                    ))
                }
            },
        })
    }

    /// Does the NBD server at `sock` answer? Connects, reads the
    /// fixed-newstyle greeting and leaves politely with `NBD_OPT_ABORT`.
    fn nbd_answers(sock: &Path) -> Result<(), String> {
        let mut s = UnixStream::connect(sock).map_err(|e| e.to_string())?;
        let t = Some(Duration::from_secs(2));
        s.set_read_timeout(t).map_err(|e| e.to_string())?;
        s.set_write_timeout(t).map_err(|e| e.to_string())?;
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting)
            .map_err(|e| format!("no NBD greeting: {e}"))?;
        if &greeting[..16] != b"NBDMAGICIHAVEOPT" {
            return Err("not an NBD server".into());
        }
        let mut bye = Vec::with_capacity(20);
        bye.extend_from_slice(&3u32.to_be_bytes()); // C_FIXED_NEWSTYLE | C_NO_ZEROES
        bye.extend_from_slice(b"IHAVEOPT");
        bye.extend_from_slice(&2u32.to_be_bytes()); // NBD_OPT_ABORT
        bye.extend_from_slice(&0u32.to_be_bytes());
        let _ = s.write_all(&bye);
        Ok(())
    }

    /// None when `r` is in `state`, else why not.
    fn pending(state: State, r: &ResourceReport) -> Option<String> {
        let ok = match state {
            State::Export => {
                if r.role != "primary" {
                    false
                } else {
                    match &r.export {
                        None => false,
                        Some(sock) => match nbd_answers(Path::new(sock)) {
                            Ok(()) => true,
                            Err(e) => return Some(format!("{}, export {sock}: {e}", brief(r))),
                        },
                    }
                }
            }
            State::Complete => r.status.as_deref() == Some("complete"),
            State::InSync => {
                r.status.as_deref() == Some("complete")
                    && r.dirty == 0
                    && r.sync.is_none()
                    && r.queues.recv == 0
            }
            State::Disconnected => !r.connected,
            State::Role(role) => r.role == role.as_str(),
        };
        (!ok).then(|| brief(r))
    }

    /// `role primary, status degraded, dirty 12MB` and whatever else is in
    /// the way.
    fn brief(r: &ResourceReport) -> String {
        let mut s = format!(
            "role {}, status {}, dirty {}",
            r.role,
            r.status.as_deref().unwrap_or("-"),
            humanize(r.dirty)
        );
        if let Some(sy) = &r.sync {
            let pct = (sy.done * 100).checked_div(sy.total).unwrap_or(100);
            s.push_str(&format!(", synchronising {} {pct}%", sy.direction));
        }
        if r.queues.recv > 0 {
            s.push_str(&format!(", {} in flight to the peer", r.queues.recv));
        }
        if r.split_brain {
            s.push_str(", split-brain");
        }
        if r.disk.as_deref() == Some("failed") {
            s.push_str(", disk failed");
        }
        if r.peer_disk.as_deref() == Some("failed") {
            s.push_str(", peer's disk failed");
        }
        if let Some(e) = &r.last_error {
            s.push_str(&format!(", last error: {e}"));
        }
        s
    }

    /// What the progress bar of `r` shows while waiting for in-sync.
    fn step(r: &ResourceReport) -> (Step, String) {
        if pending(State::InSync, r).is_none() {
            return (Step::Done, "in sync".into());
        }
        match &r.sync {
            Some(sy) => (
                Step::Copying {
                    done: sy.done,
                    total: sy.total,
                },
                sy.direction.clone(),
            ),
            None if r.status.as_deref() != Some("complete") => (
                Step::Waiting,
                format!(
                    "{}, waiting for the peer",
                    r.status.as_deref().unwrap_or("init")
                ),
            ),
            None => (Step::Waiting, format!("dirty {}", humanize(r.dirty))),
        }
    }

    /// Polls until every named resource is in `state`; returns the exit
    /// code.
    pub fn run(cfg: &Config, state: &str, timeout: f64, names: &[String], debug: u8) -> i32 {
        let state = match parse(state) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("hastctl: {e}");
                return ex::USAGE;
            }
        };
        if !timeout.is_finite() || timeout < 0.0 {
            eprintln!("hastctl: invalid timeout '{timeout}': expected seconds >= 0");
            return ex::USAGE;
        }
        let selected: Vec<String> = match cfg.select(names) {
            Ok(s) => s.into_iter().map(|r| r.name.clone()).collect(),
            Err(e) => {
                eprintln!("hastctl: {e}");
                return ex::DATAERR;
            }
        };
        let bars = (state == State::InSync).then(|| Progress::new(&selected, "sync"));
        let code = poll(cfg, state, timeout, names, debug, bars.as_ref());
        if let Some(b) = &bars {
            b.finish();
        }
        code
    }

    fn poll(
        cfg: &Config,
        state: State,
        timeout: f64,
        names: &[String],
        debug: u8,
        bars: Option<&Progress>,
    ) -> i32 {
        // Messages go above the bars, not through them.
        let say = |msg: String| match bars {
            Some(b) => b.suspend(|| eprintln!("{msg}")),
            None => eprintln!("{msg}"),
        };
        let start = Instant::now();
        let deadline = (timeout > 0.0).then(|| start + Duration::from_secs_f64(timeout));
        let mut last_said = String::new();
        loop {
            // Don't let one call overstay the deadline much.
            let call_timeout = deadline
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(30))
                .clamp(Duration::from_secs(1), Duration::from_secs(30));
            let req = Request::Status {
                resources: names.to_vec(),
            };
            let waiting = match proto::call(&cfg.control, req, call_timeout) {
                Ok(resp) => {
                    if let Some(e) = resp.error {
                        say(format!("hastctl: {e}"));
                        return ex::DATAERR;
                    }
                    if let Some(b) = bars {
                        for r in &resp.resources {
                            let (step, note) = step(r);
                            b.update(&r.name, step, &note);
                        }
                    }
                    let waiting: Vec<String> = resp
                        .resources
                        .iter()
                        .filter_map(|r| pending(state, r).map(|why| format!("{} ({why})", r.name)))
                        .collect();
                    if waiting.is_empty() {
                        if debug > 0 {
                            say(format!(
                                "hastctl: {} after {:.1}s",
                                describe_state(state),
                                start.elapsed().as_secs_f64()
                            ));
                        }
                        return ex::OK;
                    }
                    waiting.join("; ")
                }
                // hastd may be restarting: keep trying until the deadline.
                Err(e) => e,
            };
            if debug > 0 && waiting != last_said {
                say(format!(
                    "hastctl: waiting for {}: {waiting}",
                    describe_state(state)
                ));
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                say(format!(
                    "hastctl: timed out after {timeout}s waiting for {}; not there yet: {waiting}",
                    describe_state(state)
                ));
                return ex::TEMPFAIL;
            }
            last_said = waiting;
            std::thread::sleep(POLL);
        }
    }

    fn describe_state(state: State) -> String {
        match state {
            State::Export => "export".into(),
            State::Complete => "complete".into(),
            State::InSync => "in-sync".into(),
            State::Disconnected => "disconnected".into(),
            State::Role(r) => format!("role:{r}"),
        }
    }
}

/// `hastctl verify`.
mod verify {
    use std::time::{Duration, Instant};

    use hast_control::config::Config;
    use hast_control::exit as ex;
    use hast_control::progress::{Progress, Step};
    use hast_control::proto::{self, Request, ResourceReport, VerifyState};
    use hast_control::size::humanize;

    /// How often `status` is polled.
    const POLL: Duration = Duration::from_millis(200);
    /// Ranges printed per resource.
    const SHOWN: usize = 8;

    /// The command line.
    pub struct Args {
        pub offset: u64,
        pub length: Option<u64>,
        pub algorithm: String,
        pub repair: bool,
        pub wait: bool,
        pub timeout: f64,
        pub json: bool,
    }

    /// Has the verify of `r` ended, and (with repair) is it in sync again?
    fn finished(r: &ResourceReport, repair: bool) -> bool {
        let Some(v) = &r.verify else { return true };
        if v.report.state == VerifyState::Running {
            return false;
        }
        !repair
            || v.report.blocks_different == 0
            || v.report.state != VerifyState::Done
            || !r.connected
            || (r.dirty == 0 && r.sync.is_none())
    }

    fn step(r: &ResourceReport, repair: bool) -> (Step, String) {
        match &r.verify {
            Some(v) if v.report.state == VerifyState::Running => (
                Step::Copying {
                    done: v.report.done,
                    total: v.report.length,
                },
                format!("{} blocks differ", v.report.blocks_different),
            ),
            Some(_) if !finished(r, repair) => (
                Step::Waiting,
                format!("repairing, dirty {}", humanize(r.dirty)),
            ),
            _ => (Step::Done, "done".into()),
        }
    }

    fn print(r: &ResourceReport, repair: bool) {
        let Some(v) = &r.verify else {
            println!("[{}] no verify result", r.name);
            return;
        };
        let v = &v.report;
        let what = match v.state {
            VerifyState::Done => "verified",
            VerifyState::Failed => "verify stopped",
            VerifyState::Running => "verifying",
        };
        println!(
            "[{}] {what} {} at {} ({}): {} blocks compared, {} differ ({}) in {} ranges, {} skipped",
            r.name,
            humanize(v.length),
            v.offset,
            v.algorithm,
            v.blocks_compared,
            v.blocks_different,
            humanize(v.bytes_different),
            v.ranges_total,
            humanize(v.bytes_skipped)
        );
        for (o, l) in v.ranges.iter().take(SHOWN) {
            println!("[{}]   differ: offset {o}, length {l}", r.name);
        }
        if v.ranges_total as usize > SHOWN {
            println!(
                "[{}]   ... {} more ranges (hastctl list --json)",
                r.name,
                v.ranges_total as usize - SHOWN
            );
        }
        if repair && v.blocks_different > 0 && v.state == VerifyState::Done {
            if r.dirty == 0 && r.sync.is_none() {
                println!("[{}]   repaired: synchronised from the primary", r.name);
            } else {
                println!(
                    "[{}]   marked for synchronisation (dirty {})",
                    r.name,
                    humanize(r.dirty)
                );
            }
        }
        if let Some(e) = &v.error {
            eprintln!("hastctl: [{}] verify stopped: {e}", r.name);
        }
    }

    /// Starts the verifies and, unless told not to, follows them to the
    /// end; returns the exit code.
    pub fn run(cfg: &Config, args: Args, names: &[String]) -> i32 {
        if !args.timeout.is_finite() || args.timeout < 0.0 {
            eprintln!(
                "hastctl: invalid timeout '{}': expected seconds >= 0",
                args.timeout
            );
            return ex::USAGE;
        }
        let req = Request::Verify {
            resources: names.to_vec(),
            offset: args.offset,
            length: args.length,
            algorithm: Some(args.algorithm.clone()),
            repair: args.repair,
        };
        let resp = super::call(cfg, req);
        let mut code = ex::OK;
        let mut started = Vec::new();
        for r in &resp.resources {
            match &r.error {
                Some(e) => {
                    eprintln!("hastctl: {e}");
                    code = ex::SOFTWARE;
                }
                None => started.push(r.name.clone()),
            }
        }
        if !args.wait || started.is_empty() {
            return code;
        }
        let bars = (!args.json).then(|| Progress::new(&started, "verify"));
        let deadline =
            (args.timeout > 0.0).then(|| Instant::now() + Duration::from_secs_f64(args.timeout));
        let last = loop {
            let req = Request::Status {
                resources: started.clone(),
            };
            let resp = match proto::call(&cfg.control, req, Duration::from_secs(30)) {
                Ok(r) if r.error.is_none() => r,
                Ok(r) => {
                    eprintln!("hastctl: {}", r.error.unwrap_or_default());
                    return ex::UNAVAILABLE;
                }
                Err(e) => {
                    eprintln!("hastctl: {e}");
                    return ex::UNAVAILABLE;
                }
            };
            if let Some(b) = &bars {
                for r in &resp.resources {
                    let (step, note) = step(r, args.repair);
                    b.update(&r.name, step, &note);
                }
            }
            if resp.resources.iter().all(|r| finished(r, args.repair)) {
                break resp.resources;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                if let Some(b) = &bars {
                    b.finish();
                }
                eprintln!(
                    "hastctl: timed out after {}s; the verify goes on (hastctl list)",
                    args.timeout
                );
                return ex::TEMPFAIL;
            }
            std::thread::sleep(POLL);
        };
        if let Some(b) = &bars {
            b.finish();
        }
        if args.json {
            let v: Vec<serde_json::Value> = last
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "name": r.name,
                        "verify": r.verify,
                        "dirty": r.dirty,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        for r in &last {
            if !args.json {
                print(r, args.repair);
            }
            let Some(v) = &r.verify else { continue };
            if v.report.state != VerifyState::Done {
                code = ex::SOFTWARE;
            } else if v.report.blocks_different > 0
                && !(args.repair && r.dirty == 0 && r.sync.is_none())
                && code == ex::OK
            {
                code = 1;
            }
        }
        code
    }
}

/// `hastctl events`.
mod events {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use hast_control::config::Config;
    use hast_control::events::TOO_MANY_SUBSCRIBERS;
    use hast_control::exit as ex;
    use hast_control::hooks::Event;
    use hast_control::proto::{Request, RequestEnvelope, Response, CONTROL_VERSION, MAX_LINE};

    /// Subscribes and prints events until hastd goes away (exit 69) or
    /// stdout is closed (exit 0).
    pub fn run(cfg: &Config, json: bool, names: &[String], debug: u8) -> i32 {
        let sock = cfg.control.display();
        let stream = match UnixStream::connect(&cfg.control) {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "hastctl: cannot connect to hastd via {sock}: {e} \
                     (is hastd running with this configuration?)"
                );
                return ex::UNAVAILABLE;
            }
        };
        let env = RequestEnvelope {
            version: CONTROL_VERSION,
            request: Request::Events {
                resources: names.to_vec(),
            },
        };
        let mut req = serde_json::to_string(&env).unwrap_or_default();
        req.push('\n');
        let t = Some(Duration::from_secs(10));
        if let Err(e) = stream
            .set_write_timeout(t)
            .and_then(|_| stream.set_read_timeout(t))
            .and_then(|_| (&stream).write_all(req.as_bytes()))
        {
            eprintln!("hastctl: cannot send command to hastd via {sock}: {e}");
            return ex::UNAVAILABLE;
        }
        // One reader for the whole stream: the acknowledgement and the
        // events may arrive in one read.
        let mut reader = BufReader::new(&stream);
        let ack = match next_line(&mut reader) {
            Ok(Some(l)) => l,
            Ok(None) => {
                eprintln!("hastctl: hastd closed the connection without a reply");
                return ex::UNAVAILABLE;
            }
            Err(e) => {
                eprintln!("hastctl: cannot receive reply from hastd via {sock}: {e}");
                return ex::UNAVAILABLE;
            }
        };
        let ack: Response = match serde_json::from_str(&ack) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("hastctl: malformed reply from hastd: {e}");
                return ex::UNAVAILABLE;
            }
        };
        if let Some(e) = ack.error {
            eprintln!("hastctl: {e}");
            return if e.starts_with(TOO_MANY_SUBSCRIBERS) {
                ex::TEMPFAIL
            } else {
                ex::DATAERR
            };
        }
        if debug > 0 {
            let names: Vec<&str> = ack.resources.iter().map(|r| r.name.as_str()).collect();
            eprintln!("hastctl: subscribed to the events of {}", names.join(", "));
        }
        if let Err(e) = stream.set_read_timeout(None) {
            eprintln!("hastctl: {sock}: {e}");
            return ex::UNAVAILABLE;
        }
        let stdout = std::io::stdout();
        loop {
            let line = match next_line(&mut reader) {
                Ok(Some(l)) => l,
                Ok(None) => {
                    eprintln!("hastctl: hastd closed the event stream");
                    return ex::UNAVAILABLE;
                }
                Err(e) => {
                    eprintln!("hastctl: event stream from hastd failed: {e}");
                    return ex::UNAVAILABLE;
                }
            };
            let line = line.trim_end();
            let out = if json {
                line.to_owned()
            } else {
                match serde_json::from_str::<Event>(line) {
                    Ok(ev) => hast_control::events::text(&ev),
                    // An event this hastctl does not know: show it as is.
                    Err(_) => line.to_owned(),
                }
            };
            let mut w = stdout.lock();
            if writeln!(w, "{out}").and_then(|_| w.flush()).is_err() {
                return ex::OK; // stdout closed: the reader is done
            }
        }
    }

    /// The next line (without a length above MAX_LINE); None at EOF.
    fn next_line(r: &mut impl BufRead) -> std::io::Result<Option<String>> {
        let mut line = String::new();
        let n = r.take(MAX_LINE as u64).read_line(&mut line)?;
        if n == 0 {
            return Ok(None);
        }
        if !line.ends_with('\n') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "line too long or connection closed mid-line",
            ));
        }
        Ok(Some(line))
    }
}
