//! `forward-edge`: the local Vers edge imitation as its own program.

use std::process::ExitCode;

use clap::Parser;
use forward_edge::EdgeArgs;

// The same allocator as `forward edge`, so the imitation costs the same however it is started.
// Under glibc's, where each connection's buffers happened to land decided whether rustls' copy
// of received plaintext hit this CPU's slow memcpy case (19 % and 44 % of those copies in two
// uploads), so upload figures through the edge swung from run to run.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let cli = Cli::try_parse().unwrap_or_else(|e| usage_error(e));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Its own report of a failed write is an `eprintln!`, which panics on a closed stderr.
        .log_internal_errors(false)
        .init();
    match forward_edge::run(cli.args, false).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            last_word(format_args!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// One line, exit 2, like `forward`'s usage errors: clap's first line without its usage block.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("error: invalid arguments");
    last_word(format_args!("{first}; see --help"));
    std::process::exit(2);
}

/// The line before a failing exit; dropped if stderr is closed (`eprintln!` would panic and
/// turn the exit status into 101).
fn last_word(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}
