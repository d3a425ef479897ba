//! The paths under test. Each one, once started, exposes a single TCP address on loopback
//! that ends at the backend; the workloads never know which path they are driving.
//!
//! ```text
//!  raw        client ─────────────────────────────────────────────► backend [::1]:P
//!  tls-client client ════════════TLS──► edge 127.0.0.1:P ──────────► backend
//!  direct     client ─► forward ──TLS──► edge 127.0.0.1:P ──────────► backend
//!  agent-tls  client ─► forward ══TLS══► edge 127.0.0.1:A ─► agent ─► backend
//!  agent-tcp  client ─► forward ══TCP═════════════════════► agent ─► backend
//!  quic       client ─► forward ══QUIC════════════════════► agent ─► backend
//!  stunnel    client ─► stunnel ─TLS──► edge 127.0.0.1:P ──────────► backend
//!  socat      client ─► socat ─────────────────────────────────────► backend
//!  ssh        client ─► ssh ══SSH══► sshd [::1]:S ─────────────────► backend
//! ```
//!
//! With a WAN profile, a relay is put on the hop between the client side and the server side
//! (the `─TLS─`/`══` hops above), on 127.0.0.2 with the same port where a tool cannot be told
//! another port (`forward --edge` keeps the remote port).
//!
//! Under `--netem` ([`start_in_lab`]) the server side runs inside a lab's network namespace
//! instead, and the same hops cross the packet-level link (see `netem`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use crate::netem::Lab;
use crate::peers;
use crate::process::{self, wait_line, wait_port, Proc, Side};
use crate::procstat;
use crate::wan::{Profile, TcpRelay, UdpRelay};
use crate::workload::{Target, Tls};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum PathKind {
    Raw,
    TlsClient,
    Direct,
    AgentTls,
    AgentTcp,
    Quic,
    Stunnel,
    Socat,
    Ssh,
}

pub const ALL: &[PathKind] = &[
    PathKind::Raw,
    PathKind::TlsClient,
    PathKind::Direct,
    PathKind::AgentTls,
    PathKind::AgentTcp,
    PathKind::Quic,
    PathKind::Stunnel,
    PathKind::Socat,
    PathKind::Ssh,
];

impl PathKind {
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Raw => "raw",
            PathKind::TlsClient => "tls-client",
            PathKind::Direct => "direct",
            PathKind::AgentTls => "agent-tls",
            PathKind::AgentTcp => "agent-tcp",
            PathKind::Quic => "quic",
            PathKind::Stunnel => "stunnel",
            PathKind::Socat => "socat",
            PathKind::Ssh => "ssh",
        }
    }

    pub fn parse(name: &str) -> Option<PathKind> {
        ALL.iter().copied().find(|k| k.name() == name)
    }

    /// Tools other than forward, measured for comparison.
    pub fn is_peer(self) -> bool {
        matches!(self, PathKind::Stunnel | PathKind::Socat | PathKind::Ssh)
    }

    /// Carried over UDP, so the lossy WAN profiles apply.
    pub fn is_udp(self) -> bool {
        self == PathKind::Quic
    }

    /// What the path is, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            PathKind::Raw => "client → backend, no tunnel (baseline)",
            PathKind::TlsClient => {
                "the harness's own TLS client (rustls) straight to the edge: direct mode and \
                 stunnel without their relay process, the best either could do through this edge"
            }
            PathKind::Direct => "forward direct: TLS per connection to the local edge",
            PathKind::AgentTls => {
                "forward --agent: one mux carrier, TLS to the edge, agent behind it"
            }
            PathKind::AgentTcp => "forward --agent --transport tcp: mux carrier over plain TCP",
            PathKind::Quic => "forward --agent --transport quic",
            PathKind::Stunnel => "stunnel client mode through the same edge (TLS, verified)",
            PathKind::Socat => "socat plain TCP relay, no TLS (a floor for relay cost)",
            PathKind::Ssh => "ssh -L through a local sshd",
        }
    }
}

/// Parses `--paths a,b,c`; the error is the one line to print.
pub fn parse_list(list: &str) -> Result<Vec<PathKind>, String> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let kind = PathKind::parse(name).ok_or_else(|| {
            let known: Vec<&str> = ALL.iter().map(|k| k.name()).collect();
            format!("unknown path '{name}'; known paths: {}", known.join(", "))
        })?;
        if !out.contains(&kind) {
            out.push(kind);
        }
    }
    if out.is_empty() {
        return Err("--paths is empty; give at least one of raw, direct, ...".into());
    }
    Ok(out)
}

/// What every path needs to start: binaries, scratch space, the backend.
pub struct Env {
    pub forward: Option<PathBuf>,
    /// The edge imitation: `forward-edge`, or `forward` with the `edge` subcommand.
    pub edge: Option<(PathBuf, Vec<String>)>,
    pub tmp: PathBuf,
    pub backend: SocketAddr,
    pub token_file: PathBuf,
}

pub const VM: &str = "vm1";
pub const DOMAIN: &str = "vm.vers.sh";
const READY: Duration = Duration::from_secs(15);

pub struct RunningPath {
    pub kind: PathKind,
    /// Where the workloads connect, with the TLS they speak themselves for `tls-client`.
    pub target: Target,
    pub procs: Vec<Proc>,
    _tcp_relay: Option<TcpRelay>,
    _udp_relay: Option<UdpRelay>,
}

impl RunningPath {
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.pid).collect()
    }

    pub fn client_pids(&self) -> Vec<u32> {
        self.procs
            .iter()
            .filter(|p| p.side == Side::Client)
            .map(|p| p.pid)
            .collect()
    }

    pub fn sample(&self) -> procstat::Sample {
        procstat::sample(&self.pids())
    }

    /// Kills the processes, clients first, and waits for them so their ports are free again.
    pub async fn shutdown(mut self) {
        while let Some(p) = self.procs.pop() {
            p.kill().await;
        }
    }

    /// Fails with the first dead process's last log line.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in &mut self.procs {
            p.check_alive()?;
        }
        Ok(())
    }
}

/// Why a path cannot run at all in this environment (checked once, before the first round).
pub fn unavailable(kind: PathKind, env: &Env) -> Option<String> {
    match kind {
        PathKind::Raw => None,
        PathKind::TlsClient if env.edge.is_none() => {
            Some("needs the edge imitation: neither forward-edge nor forward was found".into())
        }
        PathKind::TlsClient => None,
        PathKind::Direct | PathKind::AgentTls | PathKind::AgentTcp | PathKind::Quic => {
            match &env.forward {
                Some(_) => None,
                None => Some("forward binary not found (build it: cargo build --release -p forward, or pass --forward-bin)".into()),
            }
        }
        PathKind::Stunnel if env.edge.is_none() => {
            Some("needs the edge imitation: neither forward-edge nor forward was found".into())
        }
        PathKind::Stunnel => peers::stunnel_bin()
            .is_none()
            .then(|| "stunnel4/stunnel not installed (apt-get install stunnel4)".into()),
        PathKind::Socat => process::which("socat")
            .is_none()
            .then(|| "socat not installed (apt-get install socat)".into()),
        PathKind::Ssh => peers::ssh_unavailable(),
    }
}

fn forward_bin(env: &Env) -> anyhow::Result<PathBuf> {
    env.forward
        .clone()
        .ok_or_else(|| anyhow!("forward binary not found"))
}

/// A relay address on 127.0.0.2 with the port of `upstream`, or 127.0.0.1 with any port.
fn relay_listen(upstream: SocketAddr, same_port: bool) -> SocketAddr {
    let port = if same_port { upstream.port() } else { 0 };
    SocketAddr::new(IpAddr::from([127, 0, 0, 2]), port)
}

/// `upstream`, or with a WAN profile a relay in front of it on 127.0.0.2 (kept in `relay`,
/// which must live as long as the path).
async fn through_wan(
    upstream: SocketAddr,
    wan: Option<&Profile>,
    relay: &mut Option<TcpRelay>,
) -> anyhow::Result<SocketAddr> {
    let Some(w) = wan else {
        return Ok(upstream);
    };
    let r = TcpRelay::start(relay_listen(upstream, false), upstream, w).await?;
    let addr = r.addr;
    *relay = Some(r);
    Ok(addr)
}

/// `forward agent` arguments for an agent path listening on `listen`.
fn agent_args(env: &Env, listen: SocketAddr, kind: PathKind) -> Vec<String> {
    let mut args = vec![
        "agent".to_string(),
        "--listen".into(),
        listen.to_string(),
        "--token-file".into(),
        env.token_file.display().to_string(),
    ];
    if kind == PathKind::Quic {
        // A scratch state dir keeps the generated certificate out of ~/.forward.
        args.extend([
            "--quic".into(),
            "--state-dir".into(),
            env.tmp.join("agent-state").display().to_string(),
        ]);
    }
    args
}

/// Starts `kind` (with a WAN relay on its middle hop if `wan` is set).
pub async fn start(
    kind: PathKind,
    env: &Env,
    wan: Option<&Profile>,
    tag: &str,
) -> anyhow::Result<RunningPath> {
    let mut procs = Vec::new();
    let mut tcp_relay = None;
    let mut udp_relay = None;
    let mut tls = None;
    let log = |name: &str| env.tmp.join(format!("{tag}-{name}.log"));
    let p = env.backend.port();
    let addr = match kind {
        PathKind::TlsClient => {
            let ca = start_edge(env, p, &log("edge"), &mut procs).await?;
            tls = Some(Tls::new(&ca, &format!("{VM}.{DOMAIN}"))?);
            let edge = SocketAddr::from(([127, 0, 0, 1], p));
            through_wan(edge, wan, &mut tcp_relay).await?
        }
        PathKind::Raw => through_wan(env.backend, wan, &mut tcp_relay).await?,
        PathKind::Direct => {
            let ca = start_edge(env, p, &log("edge"), &mut procs).await?;
            let edge_ip = match wan {
                Some(w) => {
                    let up = SocketAddr::from(([127, 0, 0, 1], p));
                    tcp_relay = Some(TcpRelay::start(relay_listen(up, true), up, w).await?);
                    "127.0.0.2"
                }
                None => "127.0.0.1",
            };
            let args = vec![
                "--edge".into(),
                edge_ip.into(),
                "--ca-file".into(),
                ca.display().to_string(),
                format!("127.0.0.1:0:{VM}:{p}"),
            ];
            start_forward(env, args, &log("forward"), &mut procs).await?
        }
        PathKind::AgentTls | PathKind::AgentTcp | PathKind::Quic => {
            let a = process::free_port()?;
            let agent_addr = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a));
            let agent_args = agent_args(env, agent_addr, kind);
            let (mut agent, lines) = Proc::spawn(
                "forward agent",
                Side::Server,
                &forward_bin(env)?,
                &agent_args,
                log("agent"),
            )?;
            let pin = if kind == PathKind::Quic {
                // The agent prints the pin of its self-signed certificate.
                Some(
                    wait_line(&mut agent, lines, READY, |l| {
                        l.split_whitespace()
                            .find(|w| w.starts_with("sha256:"))
                            .map(str::to_string)
                    })
                    .await?,
                )
            } else {
                process::drain(lines);
                wait_port(&mut agent, agent_addr, READY).await?;
                None
            };
            procs.push(agent);
            let mut args = vec!["--agent".to_string(), a.to_string()];
            let edge_ip = match kind {
                PathKind::AgentTls => {
                    let ca = start_edge(env, a, &log("edge"), &mut procs).await?;
                    args.extend(["--ca-file".into(), ca.display().to_string()]);
                    if let Some(w) = wan {
                        let up = SocketAddr::from(([127, 0, 0, 1], a));
                        tcp_relay = Some(TcpRelay::start(relay_listen(up, true), up, w).await?);
                        "127.0.0.2"
                    } else {
                        "127.0.0.1"
                    }
                }
                PathKind::AgentTcp => {
                    args.extend(["--transport".into(), "tcp".into()]);
                    if let Some(w) = wan {
                        tcp_relay = Some(
                            TcpRelay::start(relay_listen(agent_addr, true), agent_addr, w).await?,
                        );
                        "127.0.0.2"
                    } else {
                        "::1"
                    }
                }
                _ => {
                    args.extend(["--transport".into(), "quic".into()]);
                    if let Some(pin) = pin {
                        args.extend(["--agent-pin".into(), pin]);
                    }
                    if let Some(w) = wan {
                        let r =
                            UdpRelay::start(relay_listen(agent_addr, true), agent_addr, w).await?;
                        let ip = r.addr.ip();
                        udp_relay = Some(r);
                        if ip.is_ipv4() {
                            "127.0.0.2"
                        } else {
                            "::1"
                        }
                    } else {
                        "::1"
                    }
                }
            };
            args.extend([
                "--edge".into(),
                edge_ip.into(),
                "--token-file".into(),
                env.token_file.display().to_string(),
                format!("127.0.0.1:0:{VM}:{p}"),
            ]);
            start_forward(env, args, &log("forward"), &mut procs).await?
        }
        PathKind::Stunnel => {
            let ca = start_edge(env, p, &log("edge"), &mut procs).await?;
            let edge = SocketAddr::from(([127, 0, 0, 1], p));
            let connect = through_wan(edge, wan, &mut tcp_relay).await?;
            peers::start_stunnel(env, &ca, connect, &log("stunnel"), &mut procs).await?
        }
        PathKind::Socat => {
            let connect = through_wan(env.backend, wan, &mut tcp_relay).await?;
            peers::start_socat(connect, &log("socat"), &mut procs).await?
        }
        PathKind::Ssh => {
            let sshd = peers::start_sshd(env, &log("sshd"), &mut procs).await?;
            let connect = through_wan(sshd, wan, &mut tcp_relay).await?;
            peers::start_ssh(env, connect, &log("ssh"), &mut procs).await?
        }
    };
    Ok(RunningPath {
        kind,
        target: Target { addr, tls },
        procs,
        _tcp_relay: tcp_relay,
        _udp_relay: udp_relay,
    })
}

/// The paths that run under `--netem`: those whose client side is `forward` (or nothing).
pub fn runs_in_lab(kind: PathKind) -> bool {
    matches!(
        kind,
        PathKind::Raw
            | PathKind::Direct
            | PathKind::AgentTls
            | PathKind::AgentTcp
            | PathKind::Quic
            | PathKind::Stunnel
    )
}

/// The agent's port inside a lab (the namespace is fresh, so any fixed port is free).
const LAB_AGENT_PORT: u16 = 9999;

/// Starts `kind` across a lab's emulated link: the VM side (edge, agent; the backend is
/// `env.backend`, already in the namespace) inside the lab's namespace, `forward` and the
/// measuring client in the root namespace.
///
/// ```text
///  raw        client ───────────────────────────────link──► backend [vm]:P
///  direct     client ─► forward ──TLS───────────────link──► edge [edge]:P ──► backend [vm]:P
///  agent-tls  client ─► forward ══TLS═══════════════link══► edge [edge]:A ──► agent [vm]:A ─► backend [::1]:P
///  agent-tcp  client ─► forward ══TCP═══════════════link══► agent [vm]:A ─► backend [::1]:P
///  quic       client ─► forward ══QUIC══════════════link══► agent [vm]:A ─► backend [::1]:P
///  stunnel    client ─► stunnel ──TLS───────────────link──► edge [edge]:P ──► backend [vm]:P
/// ```
pub async fn start_in_lab(
    kind: PathKind,
    env: &Env,
    lab: &Lab,
    tag: &str,
) -> anyhow::Result<RunningPath> {
    let mut procs = Vec::new();
    let log = |name: &str| env.tmp.join(format!("{tag}-{name}.log"));
    let p = env.backend.port();
    let spec = format!("127.0.0.1:0:{VM}:{p}");
    let addr = match kind {
        PathKind::Raw => env.backend,
        PathKind::Direct => {
            let ca = start_edge_in(env, Some(lab), p, &log("edge"), &mut procs).await?;
            let args = vec![
                "--edge".into(),
                lab.edge_ip.to_string(),
                "--ca-file".into(),
                ca.display().to_string(),
                spec,
            ];
            start_forward(env, args, &log("forward"), &mut procs).await?
        }
        PathKind::AgentTls | PathKind::AgentTcp | PathKind::Quic => {
            let a = LAB_AGENT_PORT;
            let agent_args = agent_args(env, SocketAddr::from((lab.vm_ip, a)), kind);
            let (bin, agent_args) = lab.wrap(&forward_bin(env)?, &agent_args);
            let (mut agent, lines) = Proc::spawn(
                "forward agent",
                Side::Server,
                &bin,
                &agent_args,
                log("agent"),
            )?;
            // With --quic the pin line comes first; the TCP listener's line says it is ready.
            let mut pin = None;
            wait_line(&mut agent, lines, READY, |l| {
                if let Some(p) = l.split_whitespace().find(|w| w.starts_with("sha256:")) {
                    pin = Some(p.to_string());
                }
                l.starts_with("agent listening on").then_some(())
            })
            .await?;
            procs.push(agent);
            let mut args = vec!["--agent".to_string(), a.to_string()];
            match kind {
                PathKind::AgentTls => {
                    let ca = start_edge_in(env, Some(lab), a, &log("edge"), &mut procs).await?;
                    args.extend([
                        "--ca-file".into(),
                        ca.display().to_string(),
                        "--edge".into(),
                        lab.edge_ip.to_string(),
                    ]);
                }
                PathKind::AgentTcp => args.extend([
                    "--transport".into(),
                    "tcp".into(),
                    "--edge".into(),
                    lab.vm_ip.to_string(),
                ]),
                _ => {
                    let pin = pin.ok_or_else(|| anyhow!("the QUIC agent printed no pin"))?;
                    args.extend([
                        "--transport".into(),
                        "quic".into(),
                        "--agent-pin".into(),
                        pin,
                        "--edge".into(),
                        lab.vm_ip.to_string(),
                    ]);
                }
            }
            args.extend([
                "--token-file".into(),
                env.token_file.display().to_string(),
                spec,
            ]);
            start_forward(env, args, &log("forward"), &mut procs).await?
        }
        PathKind::Stunnel => {
            let ca = start_edge_in(env, Some(lab), p, &log("edge"), &mut procs).await?;
            let edge = SocketAddr::from((lab.edge_ip, p));
            peers::start_stunnel(env, &ca, edge, &log("stunnel"), &mut procs).await?
        }
        _ => bail!("{} does not run under --netem", kind.name()),
    };
    Ok(RunningPath {
        kind,
        target: Target::from(addr),
        procs,
        _tcp_relay: None,
        _udp_relay: None,
    })
}

/// `forward edge --port P`; returns the CA file the edge's certificates chain to.
async fn start_edge(
    env: &Env,
    port: u16,
    log: &std::path::Path,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<PathBuf> {
    start_edge_in(env, None, port, log, procs).await
}

/// The edge on loopback, or with a lab on the lab's edge address inside its namespace,
/// routing every VM name to the lab's VM address.
async fn start_edge_in(
    env: &Env,
    lab: Option<&Lab>,
    port: u16,
    log: &std::path::Path,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<PathBuf> {
    let ca_dir = env.tmp.join("edge-ca");
    std::fs::create_dir_all(&ca_dir)?;
    let (bin, mut args) = env
        .edge
        .clone()
        .ok_or_else(|| anyhow!("no edge binary (forward-edge or forward) found"))?;
    args.extend([
        "--port".into(),
        port.to_string(),
        "--ca-dir".into(),
        ca_dir.display().to_string(),
    ]);
    let (bin, args, listen) = match lab {
        Some(lab) => {
            args.extend([
                "--bind".into(),
                lab.edge_ip.to_string(),
                "--vm-addr".into(),
                lab.vm_ip.to_string(),
            ]);
            let (bin, args) = lab.wrap(&bin, &args);
            (bin, args, SocketAddr::from((lab.edge_ip, port)))
        }
        None => (bin, args, SocketAddr::from(([127, 0, 0, 1], port))),
    };
    let (mut edge, lines) = Proc::spawn("edge", Side::Server, &bin, &args, log.into())?;
    let printed = wait_line(&mut edge, lines, READY, |l| {
        l.strip_prefix("edge CA:")
            .and_then(|p| p.split_whitespace().next())
            .map(PathBuf::from)
    })
    .await?;
    wait_port(&mut edge, listen, READY).await?;
    procs.push(edge);
    Ok(if printed.is_file() {
        printed
    } else {
        ca_dir.join("ca.pem")
    })
}

/// Runs the forward client with `args` and returns the local address it printed.
async fn start_forward(
    env: &Env,
    args: Vec<String>,
    log: &std::path::Path,
    procs: &mut Vec<Proc>,
) -> anyhow::Result<SocketAddr> {
    let (mut fwd, lines) = Proc::spawn(
        "forward",
        Side::Client,
        &forward_bin(env)?,
        &args,
        log.into(),
    )?;
    let addr = wait_line(&mut fwd, lines, READY, |l| {
        l.strip_prefix("forwarding ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse::<SocketAddr>().ok())
    })
    .await
    .context("forward did not print its listening address")?;
    procs.push(fwd);
    if addr.port() == 0 {
        bail!("forward printed port 0");
    }
    Ok(addr)
}
