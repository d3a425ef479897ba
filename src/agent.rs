//! `forward agent` and the client side of `--agent`: wiring only, the work is in
//! `forward_tunnel::{agent, agent_client, quic}`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use forward_mux::Target;
use forward_tunnel::agent::{Agent, AgentConfig};
use forward_tunnel::agent_client::{AgentConnector, AgentLink, CarrierTransport, LinkConfig};
use forward_tunnel::auth::{AgentNames, Token};
use forward_tunnel::policy::TargetPolicy;
use forward_tunnel::quic::{
    AgentVerify, QuicAgent, QuicAgentConfig, QuicCarrier, QuicCarrierConfig, QuicCert,
    QuicConnector, QuicError,
};
use tokio_util::sync::CancellationToken;

use crate::cli::{AgentArgs, AgentClientOpts, ClientOpts, Transport};
use crate::run::{self, Bound};
use crate::spec::Spec;

/// Runs the agent until SIGINT/SIGTERM/SIGHUP, then drains.
pub async fn serve(args: AgentArgs, json: bool) -> Result<i32> {
    // Before the handlers: a token file that blocks (a named pipe nobody writes to yet) can
    // then be interrupted with Ctrl-C; with the handlers installed, nothing could stop it but
    // SIGKILL (a tester's finding).
    let token = Token::load(args.token_file.as_deref())?;
    let mut signals = run::Signals::install()?;
    // An agent started from an ssh session gets SIGHUP when the session closes; the default
    // action killed it on the spot (exit 129, no drain, not a word in the log). It drains as
    // for SIGTERM: the operator left, the clients did not. Installed with the others, before
    // the first line is printed, for the same reason (see `run::Signals`).
    let mut hangup = run::Hangup::install()?;
    if let Some(w) = ipv4_only_behind_the_edge(&args) {
        tracing::warn!("{w}");
    }
    let policy = TargetPolicy::new(&args.allow)?;
    let drain = Duration::from_secs(args.drain);
    let names = AgentNames::new(&args.names);
    let mut config = AgentConfig::new(args.listen, token.clone());
    config.policy = policy.clone();
    config.names = names.clone();
    config.mux.idle_timeout = Duration::from_secs(args.idle_timeout);
    config.dial_timeout = Duration::from_secs(args.dial_timeout);
    config.handover = args.handover;
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(forward_tunnel::tls::server_config_from_files(cert, key)?);
    }
    let tls = config.tls.is_some();
    let agent = Agent::bind(config)?;
    let addr = agent.local_addr()?;
    let stop = CancellationToken::new();
    let quic = if args.quic {
        let cert = quic_cert(&args)?;
        let mut qc = QuicAgentConfig::new(addr.port(), cert, token);
        qc.listen = std::net::SocketAddr::new(args.listen.ip(), addr.port());
        qc.policy = policy;
        qc.names = names;
        qc.grace = drain;
        qc.dial_timeout = Duration::from_secs(args.dial_timeout);
        match QuicAgent::bind(qc.clone()) {
            Ok(q) => {
                announce_quic(&q, json);
                let closer = q.closer();
                Some((tokio::spawn(q.run(stop.child_token())), Some(closer)))
            }
            // The UDP port is not shared (see `quic_when_free`): the old agent keeps it until
            // it exits, and meanwhile the TCP side serves.
            Err(e) if args.handover && udp_port_held(&e) => {
                tracing::warn!(
                    port = addr.port(),
                    "--handover: the UDP port is still held (the old agent, draining?); QUIC starts once it is free"
                );
                let task = tokio::spawn(quic_when_free(qc, json, stop.child_token()));
                Some((task, None))
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    if json {
        // As the client's `forwarding` lines: a script or a log shipper gets the address (the
        // port picked for 0) and the pin without parsing prose.
        let line = serde_json::json!({
            "agent": { "listen": addr.to_string(), "tls": tls }
        });
        crate::say::say!("{line}");
    } else {
        crate::say::say!(
            "agent listening on {addr} ({}; GET /health open, tunnel needs the token)",
            if tls {
                "TLS"
            } else {
                "plain TCP, TLS ends at the edge"
            }
        );
    }
    let task = tokio::spawn(agent.run(stop.clone(), drain));
    tokio::select! {
        _ = signals.recv() => {}
        _ = hangup.recv() => {
            tracing::info!(
                "SIGHUP (the terminal or ssh session that started the agent closed?): stopping \
                 as for SIGTERM"
            );
        }
    }
    stop.cancel();
    let (quic_task, closer) = quic.unzip();
    // Both drains, QUIC's included: with QUIC clients only, the TCP side has nothing to drain
    // and ends at once, and a second signal that came after it went unheard for the rest of
    // the QUIC grace period.
    let drained = async {
        task.await.context("agent task")?;
        if let Some(q) = quic_task {
            q.await.context("quic agent task")??;
        }
        anyhow::Ok(())
    };
    tokio::pin!(drained);
    // As the client does: a second signal does not wait out the drain. Exiting closes every
    // carrier, and clients reset the streams of a carrier that breaks. Only SIGINT or SIGTERM
    // count: one hang-up often brings two SIGHUPs (the shell passes its own on to its jobs,
    // then the kernel signals the foreground group as the shell exits), and the second is no
    // one's impatience. Further SIGHUPs are still taken, so they cannot kill.
    loop {
        tokio::select! {
            done = &mut drained => {
                done?;
                return Ok(0);
            }
            _ = hangup.recv() => {
                tracing::debug!("SIGHUP while draining: ignored (SIGINT or SIGTERM ends the drain)");
            }
            _ = signals.recv() => {
                tracing::warn!("second signal: exiting now, open streams are cut");
                if let Some(closer) = closer.as_ref().and_then(Option::as_ref) {
                    closer.close_now().await;
                }
                return Ok(0);
            }
        }
    }
}

/// The QUIC agent's start-up line: where it listens and the pin clients need.
fn announce_quic(q: &QuicAgent, json: bool) {
    if json {
        let line = serde_json::json!({
            "quic_agent": { "listen": q.local_addr().to_string(), "pin": q.pin().to_string() }
        });
        crate::say::say!("{line}");
    } else {
        crate::say::say!(
            "quic agent listening on udp {} pin {} (clients: --transport quic --agent-pin {})",
            q.local_addr(),
            q.pin(),
            q.pin()
        );
    }
}

/// Whether binding the QUIC agent failed because another socket holds its UDP port.
fn udp_port_held(e: &QuicError) -> bool {
    matches!(e, QuicError::Bind { cause, .. } if cause.kind() == std::io::ErrorKind::AddrInUse)
}

/// `--handover --quic` beside an agent that still holds the UDP port: binds once it is free,
/// then serves until `stop`. The UDP port is never shared: with `SO_REUSEPORT` the kernel
/// spreads datagrams over the sockets by address, so the old agent's connections would reach
/// the new one, which answers them with stateless resets.
async fn quic_when_free(
    qc: QuicAgentConfig,
    json: bool,
    stop: CancellationToken,
) -> std::result::Result<(), QuicError> {
    loop {
        match QuicAgent::bind(qc.clone()) {
            Ok(q) => {
                tracing::info!("--handover: the UDP port is free, QUIC is served");
                announce_quic(&q, json);
                return q.run(stop).await;
            }
            // Still held: the old agent has not exited yet.
            Err(e) if udp_port_held(&e) => {}
            Err(e) => return Err(e),
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// The QUIC certificate: given files, or one generated once and kept in the state directory
/// so the pin clients were told stays valid across restarts.
fn quic_cert(args: &AgentArgs) -> Result<QuicCert> {
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        return QuicCert::load(cert, key).map_err(|e| {
            anyhow::anyhow!(
                "{e}; pass the agent's certificate chain to --tls-cert and its key to --tls-key"
            )
        });
    }
    let dir = match args.state_dir.clone().or_else(default_state_dir) {
        Some(d) => d,
        None => anyhow::bail!(
            "no place for the generated QUIC certificate: HOME is not set; pass --state-dir DIR (or FORWARD_STATE_DIR)"
        ),
    };
    let (cert_path, key_path) = (dir.join("quic-cert.pem"), dir.join("quic-key.pem"));
    if let Some(w) = open_to_others(&dir) {
        tracing::warn!("{w}");
    }
    let load = || {
        if let Some(w) = forward_tunnel::auth::loose_permissions(&key_path, "QUIC key") {
            tracing::warn!("{w}");
        }
        // Files this agent wrote itself: a damaged one is no --tls-cert mistake.
        QuicCert::load(&cert_path, &key_path).map_err(|e| {
            anyhow::anyhow!(
                "{e}: the certificate kept in {} is damaged; remove {} and {} to generate a new one (clients then need the new --agent-pin)",
                dir.display(),
                cert_path.display(),
                key_path.display()
            )
        })
    };
    // An agent writes the key first and the certificate last (see `publish`): a key alone may
    // be another agent starting at this moment, so give it time to finish.
    // The certificate looked at first, then the key, each once: the key is written first,
    // so a certificate seen implies its key, and a key alone is waited for. Checked again
    // after, a key that another agent created in between was taken for a certificate lost
    // (the test of agents starting together failed on it).
    let mut has_cert = cert_path.exists();
    let has_key = key_path.exists();
    if has_key && !has_cert {
        wait_for(&cert_path);
        has_cert = cert_path.exists();
    }
    match (has_cert, has_key) {
        (true, true) => return load(),
        (false, false) => {}
        // A new certificate would change the pin every client was given: never silently.
        (has_cert, _) => {
            let (have, missing) = if has_cert {
                (&cert_path, &key_path)
            } else {
                (&key_path, &cert_path)
            };
            anyhow::bail!(
                "found {} but not {}; restore it, or remove both to generate a new certificate (clients then need the new --agent-pin)",
                have.display(),
                missing.display()
            );
        }
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let names: Vec<String> = ["localhost".to_owned(), host]
        .into_iter()
        .filter(|n| !n.is_empty())
        .collect();
    let cert = QuicCert::generate(&names)?;
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!(
            "the state directory {} exists and is not a directory; choose another with --state-dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir).with_context(|| {
        format!(
            "creating the state directory {} (choose another with --state-dir)",
            dir.display()
        )
    })?;
    let in_state_dir = || {
        format!(
            "keeping the generated QUIC certificate in {} (choose another directory with --state-dir)",
            dir.display()
        )
    };
    if publish(&cert, &cert_path, &key_path).with_context(in_state_dir)? {
        tracing::info!(dir = %dir.display(), "generated a QUIC certificate");
        return Ok(cert);
    }
    // Another agent sharing the state directory got there first: its pair is the one kept,
    // so it is the one to serve (and its pin the one to print).
    wait_for(&cert_path);
    load()
}

/// How long an agent waits for another one's certificate to appear beside its key.
const PAIR_WAIT: Duration = Duration::from_secs(5);

fn wait_for(path: &Path) {
    let deadline = std::time::Instant::now() + PAIR_WAIT;
    while !path.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes a new pair unless one is there: `false` when another agent's key already was.
/// Agents started together with one state directory (two systemd units) each generated a
/// certificate and overwrote each other's files, so one printed a pin that was not the one
/// kept, and one that read the key before the certificate was written refused to start (a
/// tester's finding). Now the key is created exclusively, so one agent wins; and the
/// certificate is renamed into place once complete, so a certificate beside a key means the
/// pair is whole.
fn publish(cert: &QuicCert, cert_path: &Path, key_path: &Path) -> Result<bool> {
    let (cert_pem, key_pem) = cert.to_pem();
    match create_private(key_path, key_pem.as_bytes()) {
        Ok(()) => {}
        // `exists` follows links: a link to nowhere is in the way, not another agent's key.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && key_path.exists() => {
            return Ok(false)
        }
        Err(_) if key_path.is_symlink() => {
            anyhow::bail!(
                "{} is a link to a file that does not exist",
                key_path.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("writing {}", key_path.display())),
    }
    let tmp = cert_path.with_extension(format!("pem.{}.tmp", std::process::id()));
    std::fs::write(&tmp, cert_pem)
        .and_then(|()| std::fs::rename(&tmp, cert_path))
        .with_context(|| format!("writing {}", cert_path.display()))?;
    Ok(true)
}

/// A warning for an agent the Vers edge cannot reach: the edge forwards to VMs over IPv6, so
/// an agent on an IPv4 address only (`--listen 0.0.0.0:9999`) behind it never sees a client,
/// and the client only says the agent did not answer (a tester's finding). With its own TLS it
/// is meant to be reached directly, where IPv4 may be what the network has.
fn ipv4_only_behind_the_edge(args: &AgentArgs) -> Option<String> {
    (args.listen.is_ipv4() && !args.listen.ip().is_loopback() && args.tls_cert.is_none()).then(
        || {
            format!(
                "listening on IPv4 only ({}): the Vers edge reaches VMs over IPv6, so clients \
                 through the edge cannot reach this agent; listen on [::]:{} (the default \
                 address takes IPv4 too)",
                args.listen,
                args.listen.port()
            )
        },
    )
}

/// A warning when other users may write to the state directory: they could put their own key
/// there, and clients would keep trusting its pin.
fn open_to_others(dir: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir).ok()?.permissions().mode();
    (mode & 0o022 != 0).then(|| {
        format!(
            "state directory {} can be written by other users (mode {:o}): one could replace the agent's QUIC key; run chmod 700 on it",
            dir.display(),
            mode & 0o777
        )
    })
}

/// `~/.forward`; never a directory relative to wherever a supervisor happened to start us.
fn default_state_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".forward"))
}

/// Creates a file only its owner can read; fails with `AlreadyExists` if it is there.
fn create_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?
        .write_all(data)
}

/// Builds agent connectors, sharing one link (one carrier, or one QUIC connection) per VM.
pub struct Connectors<'a> {
    client: &'a ClientOpts,
    opts: &'a AgentClientOpts,
    port: u16,
    token: Token,
    links: HashMap<String, Arc<AgentLink>>,
    quic: HashMap<String, Arc<QuicCarrier>>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl<'a> Connectors<'a> {
    /// Loads the token (and TLS config) once for every forward of the process.
    pub fn new(client: &'a ClientOpts, opts: &'a AgentClientOpts, port: u16) -> Result<Self> {
        if opts.agent_pin.is_some() && !matches!(opts.transport, Transport::Quic) {
            anyhow::bail!(
                "--agent-pin applies to --transport quic only (a tls carrier is verified against the CA, --ca-file; a tcp carrier relies on the edge's TLS)"
            );
        }
        let tls = match opts.transport {
            Transport::Tls => Some(run::tls_config(client)?),
            Transport::Tcp | Transport::Quic => None,
        };
        Ok(Self {
            client,
            opts,
            port,
            token: Token::load(opts.token_file.as_deref())?,
            links: HashMap::new(),
            quic: HashMap::new(),
            tls,
        })
    }

    /// A connector over the TCP or TLS carrier. `via` is the host the agent dials ("" for the
    /// VM's loopback).
    pub fn mux(&mut self, host: &str, via: &str, rport: u16) -> Result<AgentConnector> {
        let host = crate::spec::host_name(host, &self.client.domain);
        let transport = match &self.tls {
            Some(tls) => CarrierTransport::Tls(tls.clone()),
            None => CarrierTransport::Tcp,
        };
        let link = self
            .links
            .entry(host.clone())
            .or_insert_with(|| {
                AgentLink::new(LinkConfig {
                    host,
                    port: self.port,
                    edge: self.client.edge.clone(),
                    transport,
                    token: self.token.clone(),
                    mux: forward_mux::Config::default(),
                    timeout: Duration::from_secs(self.client.connect_timeout),
                })
            })
            .clone();
        Ok(AgentConnector::new(link, Target::new(via, rport)?))
    }

    /// `forward stdio`: every link serves one connection ([`AgentLink::serve_one_connection`]).
    pub fn mux_for_one_connection(
        &mut self,
        host: &str,
        via: &str,
        rport: u16,
    ) -> Result<AgentConnector> {
        let c = self.mux(host, via, rport)?;
        for link in self.links.values() {
            link.serve_one_connection();
        }
        Ok(c)
    }

    /// Ends every carrier and QUIC connection cleanly, for an orderly exit.
    pub async fn close(&self) {
        for link in self.links.values() {
            link.close("client exiting").await;
        }
        for carrier in self.quic.values() {
            carrier.close().await;
        }
    }

    /// A connector over QUIC.
    pub fn quic(&mut self, host: &str, via: &str, rport: u16) -> Result<QuicConnector> {
        let host = crate::spec::host_name(host, &self.client.domain);
        let carrier = match self.quic.get(&host) {
            Some(c) => c.clone(),
            None => {
                let verify = match &self.opts.agent_pin {
                    Some(pin) => AgentVerify::Pin(pin.parse()?),
                    None => AgentVerify::CaFile(self.client.ca_file.clone()),
                };
                let mut cfg =
                    QuicCarrierConfig::new(host.clone(), self.port, verify, self.token.clone());
                cfg.edge = self.client.edge.clone();
                cfg.connect_timeout = Duration::from_secs(self.client.connect_timeout);
                let c = QuicCarrier::new(cfg)?;
                self.quic.insert(host, c.clone());
                c
            }
        };
        let target = if via.is_empty() { "localhost" } else { via };
        Ok(QuicConnector::new(carrier, target, rport)?)
    }
}

/// The target the agent dials for a spec: `vm/target` or the VM's loopback.
pub fn via_host(via: Option<&str>) -> &str {
    via.unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']')
}

/// Binds every spec and gives it a connector from `make`.
pub fn bind_all<C>(
    specs: &[Spec],
    mut make: impl FnMut(&Spec) -> Result<C>,
) -> Result<Vec<Bound<C>>> {
    specs
        .iter()
        .map(|spec| {
            let connector = make(spec).with_context(|| format!("forward spec '{}'", spec.text))?;
            Ok(Bound {
                listeners: run::bind(spec)?,
                connector: Arc::new(connector),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::ipv4_only_behind_the_edge;
    use crate::cli::{Cli, Command};

    fn warning(args: &[&str]) -> Option<String> {
        let cli = Cli::try_parse_from(["forward", "agent"].iter().chain(args)).unwrap();
        let Some(Command::Agent(agent)) = cli.command else {
            panic!("not the agent: {args:?}")
        };
        ipv4_only_behind_the_edge(&agent)
    }

    #[test]
    fn an_ipv4_only_agent_behind_the_edge_is_warned_about() {
        let w = warning(&["--listen", "0.0.0.0:9999"]).expect("a warning");
        assert!(w.contains("IPv6") && w.contains("[::]:9999"), "{w}");
        assert!(warning(&["--listen", "192.0.2.7:9999"]).is_some());
        // The default dual-stack address, loopback (tests, a local client), and an agent with
        // its own TLS (reached directly, not through the edge) are fine.
        assert_eq!(warning(&[]), None);
        assert_eq!(warning(&["--listen", "127.0.0.1:9999"]), None);
        assert_eq!(warning(&["--listen", "[::]:9999"]), None);
        let tls = [
            "--listen",
            "0.0.0.0:9999",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
        ];
        assert_eq!(warning(&tls), None);
    }
}
