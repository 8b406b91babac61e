//! hastctl: the HAST control utility.

use std::path::PathBuf;
use std::process::exit;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hast_control::config::{self, Config, NodeIdentity};
use hast_control::exit as ex;
use hast_control::offline::{self, CreateParams};
use hast_control::proto::{self, Request, Response};
use hast_control::report;
use hast_control::size::parse_size;
use hast_datapath::metadata::Role;

/// Control utility for HAST resources.
///
/// create and dump work on the local providers directly; role, status and
/// list talk to hastd over its control socket.
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
    /// Act as node NAME instead of this host's name (also: HAST_NODE).
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
        /// Extent size: bytes covered by one activemap bit (default 2M).
        #[arg(short = 'e', value_name = "SIZE")]
        extentsize: Option<String>,
        /// Extents kept marked while idle (default 64).
        #[arg(short = 'k', value_name = "COUNT")]
        keepdirty: Option<String>,
        /// Bytes of the provider to use (default: all).
        #[arg(short = 'm', value_name = "SIZE")]
        mediasize: Option<String>,
        /// Resources.
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
    },
    /// Change the role of resources: init, primary or secondary.
    Role {
        /// The new role.
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
        /// `all` (default) or resource names.
        #[arg(value_name = "all|NAME")]
        names: Vec<String>,
    },
    /// Show a one-line status of resources.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// `all` (default) or resource names.
        #[arg(value_name = "all|NAME")]
        names: Vec<String>,
    },
    /// Print the metadata stored on resources' providers (offline).
    Dump {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// `all` (default) or resource names.
        #[arg(value_name = "all|NAME")]
        names: Vec<String>,
    },
}

fn load(cli: &Cli) -> Config {
    let ident = NodeIdentity::resolve(cli.node.as_deref());
    match config::load(&cli.config, &ident) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hastctl: {e}");
            exit(ex::CONFIG);
        }
    }
}

fn size_arg(what: &str, v: &Option<String>) -> Option<u64> {
    v.as_ref().map(|s| match parse_size(s) {
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

fn call(cfg: &Config, req: Request) -> Response {
    match proto::call(&cfg.control, req, Duration::from_secs(120)) {
        Ok(r) => {
            if let Some(e) = &r.error {
                eprintln!("hastctl: {e}");
                exit(ex::DATAERR);
            }
            r
        }
        Err(e) => {
            eprintln!("hastctl: {e}");
            exit(ex::UNAVAILABLE);
        }
    }
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
    let cfg = load(&cli);
    let code = match &cli.command {
        Command::Create {
            extentsize,
            keepdirty,
            mediasize,
            names,
        } => {
            let params = CreateParams {
                extentsize: size_arg("extent size", extentsize),
                keepdirty: size_arg("keepdirty", keepdirty),
                mediasize: size_arg("media size", mediasize),
            };
            let mut code = ex::OK;
            for name in names {
                let Some(res) = cfg.resource(name) else {
                    eprintln!("hastctl: unknown resource '{name}'");
                    code = ex::DATAERR;
                    continue;
                };
                let result = ensure_inactive(&cfg, name).and_then(|_| offline::create(res, params));
                match result {
                    Ok(md) => {
                        if cli.debug > 0 {
                            eprintln!(
                                "[{name}] created on {}: datasize {}, extentsize {}, keepdirty {}",
                                res.localpath.display(),
                                md.datasize,
                                md.extentsize,
                                md.keepdirty
                            );
                        }
                    }
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
        Command::Dump { json, names } => {
            let selected = match cfg.select(&all_if_empty(names)) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("hastctl: {e}");
                    exit(ex::DATAERR);
                }
            };
            let mut code = ex::OK;
            let mut out = Vec::new();
            for res in selected {
                match offline::read(res) {
                    Ok((md, marked)) => {
                        if *json {
                            let mut v = serde_json::to_value(&md).unwrap_or_default();
                            v["ondisk_dirty_extents"] = marked.into();
                            out.push(v);
                        } else {
                            print!("{}", report::dump(&md, marked));
                        }
                    }
                    Err(e) => {
                        eprintln!("hastctl: {e}");
                        code = ex::NOINPUT;
                    }
                }
            }
            if *json {
                println!("{}", serde_json::Value::Array(out));
            }
            code
        }
        Command::Role { role, names } => {
            let role: Role = match role.parse() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("hastctl: {e}");
                    exit(ex::USAGE);
                }
            };
            let resp = call(
                &cfg,
                Request::Role {
                    role,
                    resources: names.clone(),
                    force: false,
                },
            );
            let mut code = ex::OK;
            for r in &resp.resources {
                match (&r.error, &r.previous_role) {
                    (Some(e), _) => {
                        eprintln!("hastctl: {e}");
                        code = ex::SOFTWARE;
                    }
                    (None, Some(old)) if cli.debug > 0 => {
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
        Command::List { json, names } | Command::Status { json, names } => {
            let resp = call(
                &cfg,
                Request::Status {
                    resources: all_if_empty(names),
                },
            );
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&resp.resources).unwrap_or_default()
                );
            } else if matches!(cli.command, Command::List { .. }) {
                print!("{}", report::list(&resp.resources));
            } else {
                print!("{}", report::status_table(&resp.resources));
            }
            ex::OK
        }
    };
    exit(code);
}
