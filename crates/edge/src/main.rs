//! `forward-edge`: the local Vers edge imitation as its own program.

use std::process::ExitCode;

use clap::Parser;
use forward_edge::EdgeArgs;

/// A local imitation of the Vers edge: terminates TLS for *.vm.vers.sh on loopback and relays
/// plain TCP to the VM address over IPv6.
///
/// Example: forward-edge --port 0:5432 --ca-dir /tmp/edge-ca
#[derive(Debug, Parser)]
#[command(name = "forward-edge", version)]
struct Cli {
    #[command(flatten)]
    args: EdgeArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match forward_edge::run(cli.args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forward-edge: {e}");
            ExitCode::FAILURE
        }
    }
}
