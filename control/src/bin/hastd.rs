//! hastd: the HAST daemon. Serves every resource of hast.conf configured
//! for this node; roles are changed with `hastctl role`.

use std::path::PathBuf;

use clap::Parser;
use hast_control::daemon::{self, Options};

/// HAST daemon: replicated block storage between two nodes.
///
/// Reads the configuration, starts every resource configured for this node
/// in role init, and serves the control socket for hastctl. A primary
/// exposes each resource as an NBD export at <exportdir>/<provname>.sock.
/// SIGTERM or SIGINT stop it cleanly: in-flight requests complete and the
/// activemaps are stored.
#[derive(Parser, Debug)]
#[command(name = "hastd", version, about, long_about)]
struct Cli {
    /// Configuration file.
    #[arg(short = 'c', value_name = "FILE", default_value = "/etc/hast.conf")]
    config: PathBuf,
    /// Debug logging (repeat for more).
    #[arg(short = 'd', action = clap::ArgAction::Count)]
    debug: u8,
    /// Run in the foreground and log to stderr.
    #[arg(short = 'F')]
    foreground: bool,
    /// Pidfile (overrides the configuration's pidfile).
    #[arg(short = 'P', value_name = "PIDFILE")]
    pidfile: Option<PathBuf>,
    /// Check the configuration for this node, print a summary and exit.
    #[arg(short = 't')]
    check: bool,
    /// Act as node NAME instead of this host's name (also: HAST_NODE).
    #[arg(long, value_name = "NAME")]
    node: Option<String>,
    /// Pin the data-path executors to these CPUs (comma separated).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    cpus: Option<Vec<usize>>,
    /// Number of data-path executors (default: one per CPU, at most one
    /// per resource).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

fn main() {
    let cli = Cli::parse();
    let code = daemon::run(Options {
        config: cli.config,
        foreground: cli.foreground,
        debug: cli.debug,
        pidfile: cli.pidfile,
        node: cli.node,
        check: cli.check,
        cpus: cli.cpus,
        threads: cli.threads,
    });
    std::process::exit(code);
}
