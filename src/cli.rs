//! Command-line surface (clap derive). Validation beyond clap's lives next to the types it
//! produces (`spec.rs`); resolution into running forwards lives in `run.rs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXAMPLES: &str = "\
Examples:
  forward 5432:abc123:5432                 psql -h localhost -p 5432 reaches port 5432 of VM abc123
  forward 8080:abc123:3000 5433:abc123:5432   several forwards in one process
  forward 0:abc123:80                      pick a free local port and print it
  forward '[::1]:8080:abc123:80'           listen on ::1 only (default: 127.0.0.1 and ::1)
  forward /tmp/pg.sock:abc123:5432         a Unix socket as the local side
  forward --check 5432:abc123:5432         verify TLS to every target first, exit 1 on failure
  ssh -o ProxyCommand='forward stdio %h:443' root@abc123.vm.vers.sh
  forward demo                             local edge + services, end to end, no Vers account

A host without a dot is a VM id: abc123 -> abc123.vm.vers.sh (see --domain); a host with a dot is
used as given. TLS is always verified (OS trust store plus --ca-file).";

/// forward: reach ports of Vers VMs as if they were local (ssh -L style, over TLS through the edge)
#[derive(Debug, Parser)]
#[command(
    name = "forward",
    version,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// Subcommand; without one, forward the SPECs.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Forward specs `[bind:]lport:host:rport` (as in ssh -L); lport 0 picks a free port.
    #[arg(value_name = "SPEC", required = true)]
    pub specs: Vec<String>,

    /// Where to reach the targets.
    #[command(flatten)]
    pub client: ClientOpts,

    /// Do a TLS handshake with every target before listening; exit 1 if one fails.
    #[arg(long)]
    pub check: bool,

    /// On SIGINT/SIGTERM stop accepting and give open connections this long to finish.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub grace: u64,

    /// Logging.
    #[command(flatten)]
    pub log: LogOpts,
}

/// Options shared by every client mode.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// Domain appended to VM ids.
    #[arg(long, env = "FORWARD_DOMAIN", default_value = "vm.vers.sh")]
    pub domain: String,

    /// Connect to ADDR instead of resolving the host name (TLS name and port unchanged).
    #[arg(long, env = "FORWARD_EDGE", value_name = "ADDR")]
    pub edge: Option<String>,

    /// Extra trusted root certificates (PEM), in addition to the OS trust store.
    #[arg(long, env = "FORWARD_CA_FILE", value_name = "PEM")]
    pub ca_file: Option<PathBuf>,

    /// Give up on a TCP connect or TLS handshake after this long.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub connect_timeout: u64,
}

/// Logging options.
#[derive(Debug, Clone, Args)]
pub struct LogOpts {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Less log output (-q warnings only, -qq errors only).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "verbose")]
    pub quiet: u8,

    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relay stdin/stdout over TLS to HOST:PORT (for ssh ProxyCommand).
    #[command(
        after_help = "Example:\n  ssh -o ProxyCommand='forward stdio %h:%p' -p 443 root@abc123.vm.vers.sh"
    )]
    Stdio(StdioArgs),
    /// Run a local imitation of the Vers edge (tests, demo, benchmarks).
    #[command(hide = true)]
    Edge(forward_edge::EdgeArgs),
    /// Start a local edge and services and forward to them end to end: no Vers account needed.
    Demo(DemoArgs),
}

/// `forward stdio`.
#[derive(Debug, Args)]
pub struct StdioArgs {
    /// Target as HOST:PORT; HOST is a VM id or a host name.
    #[arg(value_name = "HOST:PORT")]
    pub target: String,

    /// Where to reach the target.
    #[command(flatten)]
    pub client: ClientOpts,
}

/// `forward demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Run the self-check and exit instead of serving until Ctrl-C.
    #[arg(long)]
    pub once: bool,
}
