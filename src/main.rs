//! `forward`: reach ports of Vers VMs as if they were local.
//!
//! The binary is thin: it parses arguments (`cli`, `spec`), wires the library crates together
//! (`run`, `demo`) and turns errors into one line on stderr with a non-zero exit.

// Said once, plainly, instead of a page of errors from the Unix-only parts (signals, Unix
// sockets, file modes).
#[cfg(not(unix))]
compile_error!("forward runs on Linux and macOS; on Windows, build and run it in WSL");

mod agent;
mod cli;
mod demo;
mod run;
mod say;
mod spec;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::{CommandFactory, Parser};
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command, LogFormat, LogOpts};
use say::say_err;

// The mux and TLS paths allocate and free a chunk per frame or record across threads; glibc's
// allocator returned those pages to the OS and faulted them back in on every burst (10% of the
// agent's CPU in a profile). mimalloc keeps them in per-thread pages.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use spec::Spec;

/// `quiet` lowers the default by one notch: `forward stdio` runs as an ssh ProxyCommand, whose
/// stderr lands in the user's terminal at every login, so only problems belong there.
fn init_logging(opts: &LogOpts, quiet: bool) {
    let level = match (opts.verbose, opts.quiet) {
        (0, 0) if quiet => "warn",
        (0, 0) => "info",
        (1, _) => "debug",
        (v, _) if v >= 2 => "trace",
        (_, 1) => "warn",
        _ => "error",
    };
    // Our crates at the chosen level, dependencies one notch quieter unless RUST_LOG says.
    // rustls at error: its warnings (a peer that answered a ClientHello with one, a plain
    // service reached over TLS) came as a second line before our own error that says it.
    let default = format!(
        "warn,rustls=error,forward={level},forward_tunnel={level},forward_edge={level},forward_mux={level}"
    );
    let rust_log = std::env::var_os("RUST_LOG").filter(|v| !v.is_empty());
    let (filter, bad_filter) = match rust_log
        .as_deref()
        .map(|v| (v, v.to_str().map(|v| EnvFilter::try_new(user_filter(v)))))
    {
        // A typo of a level (`degub`) is a valid filter for a target of that name, and it
        // turned every line off, warnings and errors too, without a word.
        Some((v, Some(Ok(f)))) => (
            f,
            stray_targets(&v.to_string_lossy()).map(|w| {
                format!(
                    "RUST_LOG names '{w}', which is no level (error, warn, info, debug, trace, off) and no part of forward: only what a target '{w}' logs is shown"
                )
            }),
        ),
        Some((_, None)) => (
            EnvFilter::new(&default),
            Some("RUST_LOG is not valid UTF-8, so it is not a filter; using -v/-q levels".into()),
        ),
        Some((v, Some(Err(e)))) => (
            EnvFilter::new(&default),
            Some(format!(
                "RUST_LOG='{}' is not a valid filter ({e}); using -v/-q levels",
                v.to_string_lossy()
            )),
        ),
        None => (EnvFilter::new(&default), None),
    };
    // Colour only for a person at a terminal: as an ssh ProxyCommand or under a supervisor,
    // escape codes would end up in someone's terminal or log file as noise.
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        // On a failed write tracing-subscriber says so with `eprintln!`, which panics when the
        // failure is a closed stderr: the forwards would die at their next log line.
        .log_internal_errors(false);
    match opts.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    if let Some(warning) = bad_filter {
        // Past the filter: the user's own may hide it.
        let unfiltered = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .log_internal_errors(false);
        match opts.log_format {
            LogFormat::Json => {
                tracing::subscriber::with_default(unfiltered.json().finish(), || {
                    tracing::warn!("{warning}")
                })
            }
            LogFormat::Text => tracing::subscriber::with_default(unfiltered.finish(), || {
                tracing::warn!("{warning}")
            }),
        }
    }
}

/// The first directive of `rust_log` that is a bare word (no `=`) naming neither a level nor
/// a crate forward logs through: most likely a misspelt level.
fn stray_targets(rust_log: &str) -> Option<&str> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    const CRATES: [&str; 9] = [
        "forward",
        "forward_tunnel",
        "forward_edge",
        "forward_mux",
        "quinn",
        "quinn_proto",
        "quinn_udp",
        "rustls",
        "tokio",
    ];
    rust_log.split(',').map(str::trim).find(|d| {
        !d.is_empty()
            && !d.contains(['=', '['])
            && !LEVELS.iter().any(|l| d.eq_ignore_ascii_case(l))
            && !CRATES.contains(&d.split("::").next().unwrap_or(d))
    })
}

/// RUST_LOG as given, except that quinn's packet-level trace stays off unless it is named:
/// it prints each frame, stateless-reset tokens included, and whoever holds one can end the
/// connection (a user review found them in a `RUST_LOG=trace` log).
fn user_filter(rust_log: &str) -> String {
    if rust_log.contains("quinn") {
        rust_log.to_owned()
    } else {
        format!("{rust_log},quinn_proto=debug")
    }
}

/// Help and version print as clap renders them. A usage error becomes one line, like every
/// other error of ours: clap's message and its tip or list of possible values, without the
/// usage block (which also lists options taken from the environment as if they were typed).
fn usage_error(mut e: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    // clap's plain rendering strips escape sequences from the value quoted, so a value with
    // one would look fine in the error that refuses it (`FORWARD_EDGE` set with a stray
    // escape): quote it escaped instead. The value parsers escape their own quotes.
    if let Some(ContextValue::String(v)) = e.get(ContextKind::InvalidValue) {
        if let std::borrow::Cow::Owned(escaped) = say::escape_controls(v) {
            e.insert(ContextKind::InvalidValue, ContextValue::String(escaped));
        }
    }
    let mut line = one_line(&e.render().to_string());
    if let Some(var) = from_environment(&e) {
        // clap names only the flag, which the user never typed.
        line.push_str(&format!(
            " (the value comes from the environment variable {var}: fix or unset it)"
        ));
    }
    line.push_str("; see --help");
    if json_asked() {
        // A script that asked for JSON parses every error line, this one too.
        fatal_json(&line);
    } else {
        say_err!("error: {line}");
    }
    std::process::exit(2);
}

/// `forward -q demo --once` as `forward demo -q --once`. The log flags are global, but clap
/// takes any argument before a command as forwarding's own (`args_conflicts_with_subcommands`,
/// which keeps a SPEC from being read as a command), so `demo` became a SPEC and `--once` an
/// error whose tip, `-- --once`, led nowhere.
fn log_flags_after_command(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let commands: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    let mut i = 1;
    while let Some(a) = args.get(i).and_then(|a| a.to_str()) {
        let short = a.len() > 1
            && a.starts_with('-')
            && !a.starts_with("--")
            && a[1..].bytes().all(|b| b == b'v' || b == b'q');
        if short || a == "--verbose" || a == "--quiet" || a.starts_with("--log-format=") {
            i += 1;
        } else if a == "--log-format" {
            i += 2;
        } else {
            break;
        }
    }
    match args.get(i).and_then(|a| a.to_str()) {
        Some(c) if i > 1 && commands.iter().any(|n| n == c) => {
            let mut out = vec![args[0].clone(), args[i].clone()];
            out.extend_from_slice(&args[1..i]);
            out.extend_from_slice(&args[i + 1..]);
            out
        }
        _ => args,
    }
}

/// The environment variable an invalid value came from, if the flag clap blames was not on
/// the command line but its variable is set.
fn from_environment(e: &clap::Error) -> Option<&'static str> {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    // "--threads <N>" → "--threads" → FORWARD_THREADS.
    let long = arg.split_whitespace().next()?;
    let var = ENV_FLAGS.into_iter().find(|v| {
        v.strip_prefix("FORWARD_").is_some_and(|n| {
            n.replace('_', "-")
                .eq_ignore_ascii_case(long.trim_start_matches("--"))
        })
    })?;
    (!typed(long) && std::env::var_os(var).is_some()).then_some(var)
}

/// Whether the flag `long` (`--ca-file`) is on the command line, as `--ca-file X` or
/// `--ca-file=X`.
fn typed(long: &str) -> bool {
    std::env::args_os().any(|a| {
        a.to_str()
            .is_some_and(|a| a == long || a.starts_with(&format!("{long}=")))
    })
}

/// What to add to an error about the value of `long` when it came from the environment
/// variable `var`: the user typed no such flag.
pub(crate) fn env_origin(long: &str, var: &str) -> Option<String> {
    (!typed(long) && std::env::var_os(var).is_some_and(|v| !v.is_empty()))
        .then(|| format!(" (the value comes from the environment variable {var}: fix or unset it)"))
}

/// The reason we exit, as a JSON log line on stderr, past any filter: `RUST_LOG=off` (or one
/// naming only another crate) must not leave a failed run without a word (found by review).
fn fatal_json(message: &str) {
    let unfiltered = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::ERROR)
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .finish();
    tracing::subscriber::with_default(unfiltered, || tracing::error!("{message}"));
}

/// Whether the command line asked for `--log-format json`, read without clap (which just
/// failed on it).
fn json_asked() -> bool {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    args.windows(2)
        .any(|w| w[0] == "--log-format" && w[1] == "json")
        || args.iter().any(|a| a == "--log-format=json")
}

fn one_line(rendered: &str) -> String {
    let (mut parts, mut tips): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    for line in rendered.lines() {
        let t = line.trim();
        if t.starts_with("Usage:") || t.starts_with("For more information") {
            break;
        }
        if let Some(tip) = t.strip_prefix("tip: ") {
            tips.push(tip);
        } else if !t.is_empty() {
            parts.push(t.strip_prefix("error: ").unwrap_or(t));
        }
    }
    let mut line = parts.join(" ");
    for tip in tips {
        line.push_str(&format!(" ({tip})"));
    }
    line
}

/// Our environment variables that are set but empty count as unset, as in most tools: clap
/// would otherwise read `FORWARD_CA_FILE=` as `--ca-file ''` and name a flag nobody typed.
/// A list, because clap reads the environment when it builds the command, which is too late to
/// clean it; a test keeps it equal to the command's `env =` names.
const ENV_FLAGS: [&str; 5] = [
    "FORWARD_THREADS",
    "FORWARD_DOMAIN",
    "FORWARD_EDGE",
    "FORWARD_CA_FILE",
    "FORWARD_STATE_DIR",
];

fn main() {
    for var in ENV_FLAGS {
        if std::env::var_os(var).is_some_and(|v| v.is_empty()) {
            // Before any thread exists: nothing else reads the environment yet.
            std::env::remove_var(var);
        }
    }
    let args = log_flags_after_command(std::env::args_os().collect());
    let cli = Cli::try_parse_from(args).unwrap_or_else(|e| usage_error(e));
    init_logging(&cli.log, matches!(cli.command, Some(Command::Stdio(_))));
    forward_tunnel::limits::raise_open_files();
    let threads = cli.threads.map(usize::from).unwrap_or(match cli.command {
        Some(Command::Edge(_)) | Some(Command::Demo(_)) => 0,
        _ => 1,
    });
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    builder.event_interval(forward_tunnel::relay::EVENT_INTERVAL);
    let json_logs = matches!(cli.log.log_format, LogFormat::Json);
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            say_err!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            // A log shipper reading JSON gets the reason we exit as JSON too.
            if json_logs {
                fatal_json(&format!("{e:#}"));
            } else {
                say_err!("error: {e:#}");
            }
            1
        }
    };
    // stdin is read on a blocking thread that cannot be interrupted; do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(100));
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Some(Command::Stdio(args)) => stdio(args).await,
        Some(Command::Edge(args)) => {
            forward_edge::run(args, matches!(cli.log.log_format, LogFormat::Json)).await?;
            Ok(0)
        }
        Some(Command::Demo(args)) => {
            demo::run(args, matches!(cli.log.log_format, LogFormat::Json)).await
        }
        Some(Command::Agent(args)) => {
            agent::serve(args, matches!(cli.log.log_format, LogFormat::Json)).await
        }
        None => forward(cli).await,
    }
}

async fn forward(cli: Cli) -> Result<i32> {
    // Parse every spec before binding anything, so one typo does not leave half the forwards up.
    let specs = cli
        .specs
        .iter()
        .map(|s| Spec::parse(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            // `forward --agent 9999 stdio vm:22`: git-style, options before the subcommand;
            // or `forward 5432:vm:5432 stdio vm:22`. clap then takes the subcommand's name
            // for a SPEC.
            let command = Cli::command();
            let sub = cli
                .specs
                .iter()
                .position(|s| command.find_subcommand(s.as_str()).is_some());
            match sub {
                Some(0) => anyhow::anyhow!(
                    "'{}' is a subcommand: give its options after it, e.g. forward {} --help",
                    cli.specs[0],
                    cli.specs[0]
                ),
                Some(i) => anyhow::anyhow!(
                    "'{sub}' is a subcommand, not a SPEC: run it on its own, first, e.g. forward {sub} --help",
                    sub = cli.specs[i]
                ),
                None => e.into(),
            }
        })?;
    if let Some((a, b, shared)) = spec::first_clash(&specs) {
        anyhow::bail!(
            "forward specs '{}' and '{}' both listen on {shared}; give each its own",
            a.text,
            b.text
        );
    }
    let grace = Duration::from_secs(cli.grace);
    let json = matches!(cli.log.log_format, LogFormat::Json);
    if let Some(port) = cli.agent.agent {
        let mut make = agent::Connectors::new(&cli.client, &cli.agent, port)?;
        let via = |s: &Spec| agent::via_host(s.via_target.as_deref()).to_owned();
        let served = if cli.agent.transport == cli::Transport::Quic {
            let forwards = agent::bind_all(&specs, |s| make.quic(&s.host, &via(s), s.rport))?;
            run::serve_all(forwards, cli.check, grace, json).await
        } else {
            let forwards = agent::bind_all(&specs, |s| make.mux(&s.host, &via(s), s.rport))?;
            run::serve_all(forwards, cli.check, grace, json).await
        };
        // Leave as a client, not as a reset in the agent's log.
        make.close().await;
        return served;
    }
    let tls = run::tls_config(&cli.client)?;
    let mut forwards = Vec::new();
    for spec in &specs {
        let connector = run::spec_connector(spec, &cli.client, tls.clone())?;
        forwards.push(run::Bound {
            listeners: run::bind(spec)?,
            connector: Arc::new(connector),
        });
    }
    run::serve_all(forwards, cli.check, grace, json).await
}

async fn stdio(args: cli::StdioArgs) -> Result<i32> {
    let signals = StdioSignals::install()?;
    // `vm/target:port`, as in a SPEC: the agent on the VM dials `target`.
    let (host, via, port) = match args.target.split_once('/') {
        Some((vm, rest)) => {
            let bad = |hint: &str| {
                anyhow::anyhow!(
                    "invalid target '{}'{hint}: expected VM/HOST:PORT, e.g. abc123/10.0.0.5:22",
                    args.target
                )
            };
            // parse_host_port checks the target host; the VM part needs only to be there.
            let (target, port) = run::parse_host_port(rest).map_err(|_| {
                // An IPv6 address without brackets has more than one ':' (as a SPEC is told).
                if rest.matches(':').count() > 1 && !rest.starts_with('[') {
                    return bad(" (an IPv6 target goes in brackets, e.g. abc123/[::1]:22)");
                }
                // As a plain target is told (a tester's nit): `vm/db.:5432`.
                bad(rest
                    .rsplit_once(':')
                    .map_or("", |(h, _)| spec::trailing_dot_hint(h)))
            })?;
            if vm.is_empty() {
                return Err(bad(""));
            }
            (vm.to_owned(), Some(target), port)
        }
        None => {
            let (host, port) = run::parse_host_port(&args.target)?;
            if spec::is_loopback_host(&host) {
                anyhow::bail!(
                    "invalid target '{}': host '{host}' stands where the VM goes: name the VM (<vm>:22 reaches port 22 on the VM itself)",
                    args.target
                );
            }
            (host, None, port)
        }
    };
    if let Some(agent_port) = args.agent.agent {
        let via = agent::via_host(via.as_deref()).to_owned();
        let mut make = agent::Connectors::new(&args.client, &args.agent, agent_port)?;
        let done = match args.agent.transport {
            cli::Transport::Quic => stdio_via(make.quic(&host, &via, port)?, signals).await,
            _ => stdio_via(make.mux_for_one_connection(&host, &via, port)?, signals).await,
        };
        make.close().await;
        return done;
    }
    if via.is_some() {
        anyhow::bail!(
            "'{}': 'vm/target' reaches another host from the VM and needs the agent (--agent PORT)",
            args.target
        );
    }
    let tls = run::tls_config(&args.client)?;
    stdio_via(
        run::direct_connector(&host, port, &args.client, tls)?,
        signals,
    )
    .await
}

/// The signals `forward stdio` handles, installed before anything connects (a QUIC carrier
/// starts its handshake as it is made, and a signal before the handler was a plain death).
struct StdioSignals {
    /// ssh sends its ProxyCommand SIGHUP as it exits, right after writing its last message
    /// (the disconnect) and closing the pipe. Dying there lost that message and cut the
    /// connection: sshd logged a reset instead of "disconnected by user".
    hangup: run::Hangup,
    terminate: tokio::signal::unix::Signal,
    /// Ctrl-C at a terminal, as SIGTERM: by the default action a QUIC agent learnt of the
    /// exit only at its idle timeout, and nothing said why the process ended.
    interrupt: tokio::signal::unix::Signal,
}

impl StdioSignals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            hangup: run::Hangup::install()?,
            terminate: signal(SignalKind::terminate())
                .map_err(|e| anyhow::anyhow!("installing the SIGTERM handler: {e}"))?,
            interrupt: signal(SignalKind::interrupt())
                .map_err(|e| anyhow::anyhow!("installing the SIGINT handler: {e}"))?,
        })
    }

    /// The next signal: `None` for SIGHUP; for SIGTERM or SIGINT its name and the exit
    /// status a shell shows for death by it.
    async fn next(&mut self) -> Option<(&'static str, i32)> {
        tokio::select! {
            _ = self.hangup.recv() => None,
            _ = self.terminate.recv() => Some(("SIGTERM", 128 + 15)),
            _ = self.interrupt.recv() => Some(("SIGINT", 128 + 2)),
        }
    }
}

async fn stdio_via<C: forward_tunnel::Connector>(
    connector: C,
    mut signals: StdioSignals,
) -> Result<i32> {
    // Signals while connecting too: the handlers above replaced the default action, and ssh
    // that gave up (SIGHUP) or a supervisor (SIGTERM) waited up to --connect-timeout for an
    // edge that does not answer (found by review).
    let remote = tokio::select! {
        remote = connector.connect() => remote?,
        signal = signals.next() => match signal {
            None => {
                tracing::debug!("SIGHUP while connecting: nobody is left to relay for");
                return Ok(0);
            }
            Some((name, code)) => {
                tracing::info!("{name} while connecting: exiting");
                return Ok(code);
            }
        }
    };
    // Shutting stdout down only flushes it; the process exit closes fd 1.
    let stdio = forward_tunnel::stdio::stdio();
    let relay_started = std::time::Instant::now();
    let relay = forward_tunnel::relay(stdio, remote);
    tokio::pin!(relay);
    let done = tokio::select! {
        done = &mut relay => done,
        signal = signals.next() => match signal {
            None => {
                // What stdin still holds goes up, then the end of the stream; then we leave,
                // with or without the remote's answer (nobody reads stdout any more).
                tracing::debug!("SIGHUP: sending what stdin still holds, then exiting");
                // Errors now (stdout has no reader) concern nobody: the user has left.
                let end = tokio::time::timeout(HANGUP_GRACE, &mut relay).await;
                tracing::debug!(?end, "stdio relay after SIGHUP");
                return Ok(0);
            }
            Some((name, code)) => {
                // Killed by a supervisor, `kill` or Ctrl-C: the connection is cut, so the far
                // side must see a reset (dropping the relay resets the remote; the caller then
                // closes the carrier, which a QUIC agent would otherwise notice only at its
                // 30 s idle timeout).
                tracing::info!("{name}: resetting the connection and exiting");
                return Ok(code);
            }
        }
    };
    let stats = done.map_err(|e| {
        anyhow::anyhow!(
            "{}: {}",
            connector.describe(),
            forward_tunnel::serve::explain(
                &e,
                "stdin/stdout",
                false,
                &connector,
                relay_started.elapsed(),
            )
        )
    })?;
    tracing::debug!(up = stats.a_to_b, down = stats.b_to_a, "stdio relay done");
    Ok(0)
}

/// How long `forward stdio` goes on after SIGHUP for the bytes already written to it.
const HANGUP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quinn_packet_traces_stay_off_unless_named() {
        assert_eq!(user_filter("trace"), "trace,quinn_proto=debug");
        assert_eq!(
            user_filter("forward_tunnel=trace"),
            "forward_tunnel=trace,quinn_proto=debug"
        );
        assert_eq!(
            user_filter("trace,quinn_proto=trace"),
            "trace,quinn_proto=trace"
        );
        // A directive for the target is more specific than the global one, so the cap holds.
        let f = EnvFilter::try_new(user_filter("trace")).unwrap();
        assert!(f.to_string().contains("quinn_proto=debug"), "{f}");
    }

    #[test]
    fn the_empty_variable_list_is_every_env_of_the_command() {
        fn envs(cmd: &clap::Command, out: &mut Vec<String>) {
            out.extend(
                cmd.get_arguments()
                    .filter_map(|a| a.get_env())
                    .map(|v| v.to_string_lossy().into_owned()),
            );
            cmd.get_subcommands().for_each(|s| envs(s, out));
        }
        let mut found = Vec::new();
        envs(&Cli::command(), &mut found);
        found.sort();
        found.dedup();
        let mut listed: Vec<String> = ENV_FLAGS.iter().map(|v| v.to_string()).collect();
        listed.sort();
        assert_eq!(found, listed);
    }

    #[test]
    fn log_flags_before_a_command_move_after_it() {
        let moved = |line: &str| -> String {
            let args = line.split(' ').map(std::ffi::OsString::from).collect();
            let out = log_flags_after_command(args);
            let out: Vec<String> = out.into_iter().map(|a| a.into_string().unwrap()).collect();
            out.join(" ")
        };
        assert_eq!(moved("forward -q demo --once"), "forward demo -q --once");
        assert_eq!(
            moved("forward -vv --log-format json agent --listen [::1]:0"),
            "forward agent -vv --log-format json --listen [::1]:0"
        );
        assert_eq!(
            moved("forward --quiet --log-format=json stdio h:443"),
            "forward stdio --quiet --log-format=json h:443"
        );
        // SPECs, and a command after a SPEC (refused by clap as before), stay as they are.
        for same in [
            "forward -q 5432:vm:5432",
            "forward demo -q",
            "forward -q 5432:vm:5432 demo",
            "forward --check demo",
            "forward -x demo",
        ] {
            assert_eq!(moved(same), same);
        }
        // And clap takes the result.
        let args = ["forward", "-q", "demo", "--once"].map(std::ffi::OsString::from);
        let cli = Cli::try_parse_from(log_flags_after_command(args.to_vec())).unwrap();
        assert!(matches!(cli.command, Some(Command::Demo(_))));
        assert_eq!(cli.log.quiet, 1);
    }
}
