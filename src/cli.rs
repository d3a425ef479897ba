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
  forward /tmp/pg/.s.PGSQL.5432:abc123:5432   a Unix socket (psql -h /tmp/pg)
  forward --check 5432:abc123:5432         check every target first, exit 1 on failure
  forward --agent 9999 5432:abc123:5432    via `forward agent` on the VM (token: VERS_AUTH_TOKEN)
  forward --agent 9999 5433:abc123/db.internal:5432   the agent dials db.internal
  forward --agent 9999 --transport quic --agent-pin sha256:... --edge 203.0.113.7 5432:abc123:5432
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
    subcommand_negates_reqs = true,
    // Bare `forward` is someone looking for how to start: the help with its examples, not a
    // one-line complaint about a missing SPEC.
    arg_required_else_help = true
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

    /// Before serving, check every target and exit 1 if one fails (the local ports are bound
    /// first; a client connecting meanwhile waits): direct mode does the TLS
    /// handshake with the edge and fails if the edge then hangs up (nothing on that VM port);
    /// agent mode also authenticates and has the agent reach the target (nothing listening, or
    /// outside --allow, fails). The service sees one connection that closes.
    #[arg(long)]
    pub check: bool,

    /// On SIGINT/SIGTERM stop accepting and give open connections this long to finish (one
    /// still connecting to the edge or agent gets 2 s of it).
    #[arg(long, allow_negative_numbers = true, value_name = "SECS", default_value_t = 10, value_parser = secs)]
    pub grace: u64,

    /// Agent mode.
    #[command(flatten)]
    pub agent: AgentClientOpts,

    /// Logging.
    #[command(flatten)]
    pub log: LogOpts,

    /// Threads that run connections. Default: 1 for forwarding and the agent (a relay is
    /// bound by the network, and one thread saves the cross-thread wakeups that cost agent
    /// mode a quarter of its CPU per byte), plus, in direct mode, a spare thread for
    /// connections accepted while that one is busy; one per core for the edge and the demo.
    #[arg(
        long,
        global = true,
        env = "FORWARD_THREADS",
        value_name = "N",
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub threads: Option<u16>,
}

/// Multiplexed mode through `forward agent` on the VM.
#[derive(Debug, Clone, Args)]
pub struct AgentClientOpts {
    /// Use the agent listening on this port of the VM (one carrier per VM, zero round trips per
    /// connection) instead of one TLS connection per local connection.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub agent: Option<u16>,

    /// Carrier to the agent: tls (through the edge, or to an agent with its own certificate),
    /// tcp (plain TCP straight to the agent, trusted networks only), quic (UDP straight to
    /// `forward agent --quic`).
    #[arg(long, value_enum, default_value_t = Transport::Tls, requires = "agent")]
    pub transport: Transport,

    /// File holding the agent token (default: env VERS_AUTH_TOKEN). Never pass it on argv.
    #[arg(long, value_name = "FILE", requires = "agent")]
    pub token_file: Option<PathBuf>,

    /// With --transport quic: trust exactly the agent certificate with this SPKI pin (printed by
    /// `forward agent --quic`), instead of CA verification.
    #[arg(long, value_name = "sha256:BASE64", requires = "agent", value_parser = pin)]
    pub agent_pin: Option<String>,
}

/// Carrier kinds.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Transport {
    /// TLS over TCP.
    Tls,
    /// Plain TCP.
    Tcp,
    /// QUIC over UDP straight to `forward agent --quic` (not through the edge: it carries TCP only).
    Quic,
}

/// Options shared by every client mode.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// Domain appended to VM ids.
    #[arg(long, env = "FORWARD_DOMAIN", default_value = "vm.vers.sh", value_parser = domain)]
    pub domain: String,

    /// Connect to ADDR instead of resolving the host name (TLS name and port unchanged).
    #[arg(long, env = "FORWARD_EDGE", value_name = "ADDR", value_parser = edge)]
    pub edge: Option<String>,

    /// Extra trusted root certificates (PEM), in addition to the OS trust store.
    #[arg(long, env = "FORWARD_CA_FILE", value_name = "PEM")]
    pub ca_file: Option<PathBuf>,

    /// Give up on a TCP connect (each address; a name's addresses are raced 250 ms apart), a
    /// TLS handshake, or the agent's answer after this long.
    #[arg(long, allow_negative_numbers = true, value_name = "SECS", default_value_t = 10, value_parser = positive_secs)]
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
        after_help = "Examples:\n  ssh -o ProxyCommand='forward stdio %h:%p' -p 443 root@abc123.vm.vers.sh\n  ssh -o ProxyCommand='forward stdio --agent 9999 %h:22' root@abc123.vm.vers.sh   (via the agent)\n  forward stdio --agent 9999 abc123/10.0.0.5:22   (the agent dials 10.0.0.5)"
    )]
    Stdio(StdioArgs),
    /// Run a local imitation of the Vers edge (tests, demo, benchmarks).
    #[command(hide = true)]
    Edge(forward_edge::EdgeArgs),
    /// Run the agent on the VM: one authenticated carrier per client, streams dialled VM-side.
    #[command(
        after_help = "Examples:\n  VERS_AUTH_TOKEN=$(openssl rand -hex 32) forward agent            # [::]:9999, loopback targets\n  forward agent --token-file /etc/forward.token --allow db.internal:5432\n  forward agent --name abc123.vm.vers.sh   # refuse proofs made for other names\n  forward agent --handover --token-file /etc/forward.token   # beside the running agent; then stop\n                                           # the old one: it drains, no connection is refused\n  then on the laptop: VERS_AUTH_TOKEN=... forward --agent 9999 5432:<vm>:5432"
    )]
    Agent(AgentArgs),
    /// Start a local edge and services and forward to them end to end: no Vers account needed.
    Demo(DemoArgs),
}

/// `forward stdio`.
#[derive(Debug, Args)]
pub struct StdioArgs {
    /// Target as HOST:PORT; HOST is a VM id or a host name. With --agent, VM/HOST:PORT has the
    /// agent on VM dial HOST (as in a SPEC).
    #[arg(value_name = "HOST:PORT")]
    pub target: String,

    /// Where to reach the target.
    #[command(flatten)]
    pub client: ClientOpts,

    /// Through the agent instead of direct (e.g. ssh to the VM's port 22 via the carrier).
    #[command(flatten)]
    pub agent: AgentClientOpts,
}

/// `forward demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Run the self-check and exit instead of serving until Ctrl-C.
    #[arg(long)]
    pub once: bool,
}

/// `forward agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Address to listen on; [::] takes IPv4 too; a bare port means [::]:PORT.
    #[arg(long, default_value = "[::]:9999", value_name = "ADDR", value_parser = listen_addr)]
    pub listen: std::net::SocketAddr,

    /// File holding the token (default: env VERS_AUTH_TOKEN); at least 128 bits.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Also allow targets beyond the VM's loopback: HOST:PORT, `*` wildcards, `*.suffix`,
    /// IPv6 in brackets.
    #[arg(long, value_name = "HOST:PORT", value_parser = allow)]
    pub allow: Vec<String>,

    /// Close a carrier after this long without a byte from its client. Long, so that a
    /// client's open connections survive its laptop's sleep; a client closes a carrier it
    /// hears nothing from after 45 s itself. (QUIC: 30 s, negotiated.)
    #[arg(long, allow_negative_numbers = true, value_name = "SECS", default_value_t = 600, value_parser = idle_secs)]
    pub idle_timeout: u64,

    /// A host name clients reach this agent by, e.g. abc123.vm.vers.sh (repeatable): proofs
    /// made for any other name are refused, so a client tricked into authenticating elsewhere
    /// cannot be relayed here. Without it any name passes: then give each VM its own token.
    #[arg(long = "name", value_name = "HOST", value_parser = agent_name)]
    pub names: Vec<String>,

    /// Serve TLS with this certificate chain (PEM), for use without an edge in front.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) for --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// On SIGTERM, SIGINT or SIGHUP, give open streams this long to finish after GOAWAY (a
    /// second SIGTERM or SIGINT ends it at once).
    #[arg(long, allow_negative_numbers = true, value_name = "SECS", default_value_t = 30, value_parser = secs)]
    pub drain: u64,

    /// Give up dialling a target after this long; the client's connection is then reset with
    /// "timed out". The client's --connect-timeout covers only its way to the agent: a stream
    /// opens with zero round trips, so the agent's dial is what a user waits for.
    #[arg(long, allow_negative_numbers = true, value_name = "SECS", default_value_t = forward_tunnel::policy::DEFAULT_DIAL_TIMEOUT.as_secs(), value_parser = positive_secs)]
    pub dial_timeout: u64,

    /// Start beside an agent that already listens on this port, to replace it without
    /// refusing a connection: start the new one with --handover, then stop the old one (it
    /// drains; new carriers reach the new one). With --quic, the new agent takes the UDP port
    /// once the old one has exited.
    #[arg(long)]
    pub handover: bool,

    /// Also listen on UDP (same port) for QUIC clients (`--transport quic`).
    #[arg(long)]
    pub quic: bool,

    /// Where the agent keeps the certificate it generates for QUIC when --tls-cert is not given,
    /// so its pin survives restarts [default: ~/.forward].
    #[arg(long, value_name = "DIR", env = "FORWARD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

/// `--edge`: an address or name without a port (the port is the SPEC's, as at Vers).
fn edge(s: &str) -> Result<String, String> {
    let t = s.trim();
    let shown = crate::say::escape_controls(t);
    if t.is_empty() {
        return Err("empty; give the edge's IP or host name".into());
    }
    let host_port = t.rsplit_once(':').is_some_and(|(h, p)| {
        !h.is_empty() && p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']'))
    });
    if host_port {
        return Err(format!(
            "'{shown}' has a port; --edge takes only the address (the port is the SPEC's remote port, or --agent PORT in agent mode), e.g. 127.0.0.1"
        ));
    }
    // What is left must be an IP (IPv6 with or without brackets) or a host name: anything
    // else (`[::1`, `10.0.0.1:x`) would go to the resolver as a name and fail far from here.
    let inner = t
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(t);
    let ip = inner.parse::<std::net::IpAddr>().is_ok() && (inner == t || inner.contains(':'));
    if !ip && !forward_tunnel::policy::is_name(t) {
        return Err(format!(
            "'{shown}' is not an IP address or host name, e.g. 127.0.0.1, ::1 or edge.example"
        ));
    }
    Ok(t.to_owned())
}

/// `forward agent --listen`: IP:PORT, or a bare port on every interface, both families.
fn listen_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    let t = s.trim();
    if let Ok(port) = t.trim_start_matches(':').parse::<u16>() {
        return Ok((std::net::Ipv6Addr::UNSPECIFIED, port).into());
    }
    t.parse().map_err(|_| {
        let t = crate::say::escape_controls(t);
        format!("'{t}' is not IP:PORT or a port, e.g. [::]:9999, 127.0.0.1:9999 or 9999")
    })
}

/// `--domain`: a DNS suffix, without leading or trailing dots.
fn domain(s: &str) -> Result<String, String> {
    let t = s.trim().trim_matches('.');
    if t.is_empty() {
        return Err("empty; give the domain VM ids live under, e.g. vm.vers.sh".into());
    }
    if !forward_tunnel::policy::is_name(t) {
        return Err(
            "not a DNS domain (dot-separated labels of letters, digits and '-'), e.g. vm.vers.sh"
                .into(),
        );
    }
    // A name whose last label is a number is no TLS server name: every host under such a
    // "domain" failed later with a message that did not mention --domain.
    if t.rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "'{}' is an IP address or ends in a number, not a DNS domain; give the domain VM ids \
             live under, e.g. vm.vers.sh (to connect to an address, use --edge)",
            crate::say::escape_controls(t)
        ));
    }
    Ok(t.to_owned())
}

/// `forward agent --allow`: checked when typed, so a typo is a usage error (exit 2).
fn allow(s: &str) -> Result<String, String> {
    forward_tunnel::policy::TargetPolicy::new(&[s])
        .map(|_| s.to_owned())
        .map_err(|_| {
            "expected HOST:PORT with one host name or IP (no ranges), e.g. db.internal:5432, \
             10.0.0.5:*, *.internal:443 or *:*"
                .into()
        })
}

/// `--agent-pin`: checked when typed, not when the first connection needs it.
fn pin(s: &str) -> Result<String, String> {
    s.parse::<forward_tunnel::quic::SpkiPin>()
        .map(|_| s.trim().to_owned())
        .map_err(|e| e.to_string())
}

/// `forward agent --name`: a DNS name, as clients dial it.
fn agent_name(s: &str) -> Result<String, String> {
    let n = s.trim_end_matches('.');
    if forward_tunnel::policy::is_name(n) {
        Ok(n.to_owned())
    } else {
        Err(format!(
            "'{}' is not a host name; give the name clients dial, e.g. abc123.vm.vers.sh",
            crate::say::escape_controls(s)
        ))
    }
}

/// Longest time any SECS option takes: a year. A deadline is `now + SECS`, and far beyond
/// that it overflows the clock (a panic, found by review, with `--drain 18446744073709551615`).
const MAX_SECS: u64 = 365 * 24 * 3600;

/// Whole seconds from `min` to [`MAX_SECS`]; `why` explains the minimum.
fn secs_from(s: &str, min: u64, why: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if (min..=MAX_SECS).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{}' is not a whole number of seconds from {min} to {MAX_SECS} (a year){why}",
            crate::say::escape_controls(s)
        )),
    }
}

/// `--grace`, `--drain`: 0 allowed (reset, or close, at once).
fn secs(s: &str) -> Result<u64, String> {
    secs_from(s, 0, "")
}

/// `--connect-timeout`: 0 would fail every connection.
fn positive_secs(s: &str) -> Result<u64, String> {
    secs_from(s, 1, "")
}

/// `forward agent --idle-timeout`: at least 30: an idle client pings every 15 s, and a shorter
/// timeout would close healthy idle carriers.
fn idle_secs(s: &str) -> Result<u64, String> {
    secs_from(s, 30, "; idle clients ping every 15 s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_addresses() {
        for ok in [
            "127.0.0.1",
            "::1",
            "[::1]",
            "edge.example.com",
            "2001:db8::7",
        ] {
            assert_eq!(edge(ok).as_deref(), Ok(ok), "{ok}");
        }
        for (bad, want) in [
            ("127.0.0.1:443", "has a port"),
            ("[::1]:443", "has a port"),
            ("edge.example.com:443", "has a port"),
            ("", "empty"),
            ("  ", "empty"),
        ] {
            let e = edge(bad).unwrap_err();
            assert!(e.contains(want), "{bad:?}: {e}");
        }
    }

    #[test]
    fn listen_addresses() {
        let any = |p| std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, p));
        assert_eq!(listen_addr("9999"), Ok(any(9999)));
        assert_eq!(listen_addr(":9999"), Ok(any(9999)));
        assert_eq!(
            listen_addr("127.0.0.1:1"),
            Ok("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!(listen_addr("[::1]:2"), Ok("[::1]:2".parse().unwrap()));
        assert!(listen_addr("localhost:9999")
            .unwrap_err()
            .contains("IP:PORT"));
    }

    #[test]
    fn seconds() {
        assert_eq!(secs("0"), Ok(0));
        assert_eq!(secs(" 10 "), Ok(10));
        assert_eq!(secs("31536000"), Ok(MAX_SECS));
        assert_eq!(positive_secs("1"), Ok(1));
        assert_eq!(idle_secs("30"), Ok(30));
        for (parse, bad) in [
            (secs as fn(&str) -> Result<u64, String>, "31536001"),
            (secs, "18446744073709551615"),
            (secs, "1.5"),
            (secs, "-1"),
            (secs, "5s"),
            (positive_secs, "0"),
            (idle_secs, "29"),
            (idle_secs, "9223372036854775807"),
        ] {
            let e = parse(bad).unwrap_err();
            assert!(
                e.contains("is not a whole number of seconds from"),
                "{bad}: {e}"
            );
            assert!(e.contains(bad), "{bad}: {e}");
        }
        assert!(idle_secs("29").unwrap_err().contains("ping every 15 s"));
    }

    #[test]
    fn domains() {
        assert_eq!(domain("vm.test.").as_deref(), Ok("vm.test"));
        assert!(domain("").unwrap_err().contains("empty"));
        assert!(domain(".").unwrap_err().contains("empty"));
        assert!(domain("bad domain")
            .unwrap_err()
            .contains("not a DNS domain"));
        assert!(domain("vm/x").unwrap_err().contains("not a DNS domain"));
        for ip in ["127.0.0.1", "vm.42"] {
            let e = domain(ip).unwrap_err();
            assert!(
                e.contains("ends in a number") && e.contains("--edge"),
                "{ip}: {e}"
            );
        }
    }

    #[test]
    fn edge_addresses_that_are_neither_ip_nor_name() {
        for good in ["127.0.0.1", "::1", "[::1]", "edge.example", "localhost"] {
            assert_eq!(edge(good).as_deref(), Ok(good), "{good}");
        }
        assert!(edge("127.0.0.1:443").unwrap_err().contains("has a port"));
        for bad in ["[::1", "127.0.0.1:notaport", "a b", "[127.0.0.1]"] {
            assert!(
                edge(bad)
                    .unwrap_err()
                    .contains("not an IP address or host name"),
                "{bad}"
            );
        }
    }

    #[test]
    fn allow_patterns_are_checked_when_typed() {
        for good in [
            "db.internal:5432",
            "10.0.0.5:*",
            "*.internal:443",
            "*:*",
            "[::1]:22",
        ] {
            assert_eq!(allow(good).as_deref(), Ok(good), "{good}");
        }
        for bad in ["db", "bad host:22", "10.0.0.0/8:22", "db:0", ""] {
            assert!(
                allow(bad).unwrap_err().contains("expected HOST:PORT"),
                "{bad}"
            );
        }
    }
}
