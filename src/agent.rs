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
use forward_tunnel::auth::Token;
use forward_tunnel::policy::TargetPolicy;
use forward_tunnel::quic::{
    AgentVerify, QuicAgent, QuicAgentConfig, QuicCarrier, QuicCarrierConfig, QuicCert,
    QuicConnector,
};
use tokio_util::sync::CancellationToken;

use crate::cli::{AgentArgs, Cli, Transport};
use crate::run::{self, Bound};
use crate::spec::Spec;

/// Runs the agent until SIGINT/SIGTERM, then drains.
pub async fn serve(args: AgentArgs) -> Result<i32> {
    let mut signals = run::Signals::install()?;
    let token = Token::load(args.token_file.as_deref())?;
    let policy = TargetPolicy::new(&args.allow)?;
    let drain = Duration::from_secs(args.drain);
    let mut config = AgentConfig::new(args.listen, token.clone());
    config.policy = policy.clone();
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
        qc.grace = drain;
        let q = QuicAgent::bind(qc)?;
        println!(
            "quic agent listening on udp {} pin {} (clients: --transport quic --agent-pin {})",
            q.local_addr(),
            q.pin(),
            q.pin()
        );
        Some(tokio::spawn(q.run(stop.child_token())))
    } else {
        None
    };
    println!(
        "agent listening on {addr} ({}; GET /health open, tunnel needs the token)",
        if tls {
            "TLS"
        } else {
            "plain TCP, TLS ends at the edge"
        }
    );
    let task = tokio::spawn(agent.run(stop.clone(), drain));
    signals.recv().await;
    stop.cancel();
    task.await.context("agent task")?;
    if let Some(q) = quic {
        q.await.context("quic agent task")??;
    }
    Ok(0)
}

/// The QUIC certificate: given files, or one generated once and kept in the state directory
/// so the pin clients were told stays valid across restarts.
fn quic_cert(args: &AgentArgs) -> Result<QuicCert> {
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        return Ok(QuicCert::load(cert, key)?);
    }
    let dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    let (cert_path, key_path) = (dir.join("quic-cert.pem"), dir.join("quic-key.pem"));
    if cert_path.exists() && key_path.exists() {
        return Ok(QuicCert::load(&cert_path, &key_path)?);
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let names: Vec<String> = ["localhost".to_owned(), host]
        .into_iter()
        .filter(|n| !n.is_empty())
        .collect();
    let cert = QuicCert::generate(&names)?;
    let (cert_pem, key_pem) = cert.to_pem();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))?;
    write_private(&key_path, key_pem.as_bytes())?;
    std::fs::write(&cert_path, cert_pem)
        .with_context(|| format!("writing {}", cert_path.display()))?;
    tracing::info!(dir = %dir.display(), "generated a QUIC certificate");
    Ok(cert)
}

fn default_state_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".forward"))
        .unwrap_or_else(|| PathBuf::from(".forward"))
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The target the agent dials for a spec: `vm/target` or the VM's loopback.
fn target_host(spec: &Spec) -> &str {
    spec.via_target
        .as_deref()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']')
}

/// Builds one connector per spec, sharing one link (one carrier) per VM.
pub fn forwards(cli: &Cli, specs: &[Spec], port: u16) -> Result<Vec<Bound<AgentConnector>>> {
    let token = Token::load(cli.agent.token_file.as_deref())?;
    let transport = match cli.agent.transport {
        Transport::Tls => CarrierTransport::Tls(run::tls_config(&cli.client)?),
        Transport::Tcp => CarrierTransport::Tcp,
        Transport::Quic => anyhow::bail!("QUIC forwards are built by quic_forwards"),
    };
    let mut links: HashMap<String, Arc<AgentLink>> = HashMap::new();
    let mut out = Vec::new();
    for spec in specs {
        let host = crate::spec::host_name(&spec.host, &cli.client.domain);
        let link = links
            .entry(host.clone())
            .or_insert_with(|| {
                AgentLink::new(LinkConfig {
                    host,
                    port,
                    edge: cli.client.edge.clone(),
                    transport: transport.clone(),
                    token: token.clone(),
                    mux: forward_mux::Config::default(),
                    timeout: Duration::from_secs(cli.client.connect_timeout),
                })
            })
            .clone();
        let target = Target::new(target_host(spec), spec.rport)
            .with_context(|| format!("forward spec '{}'", spec.text))?;
        out.push(Bound {
            listeners: run::bind(spec)?,
            connector: Arc::new(AgentConnector::new(link, target)),
        });
    }
    Ok(out)
}

/// QUIC: one quinn connection per VM, one stream per local connection.
pub fn quic_forwards(cli: &Cli, specs: &[Spec], port: u16) -> Result<Vec<Bound<QuicConnector>>> {
    let token = Token::load(cli.agent.token_file.as_deref())?;
    let verify = match &cli.agent.agent_pin {
        Some(pin) => AgentVerify::Pin(pin.parse()?),
        None => AgentVerify::CaFile(cli.client.ca_file.clone()),
    };
    let mut carriers: HashMap<String, Arc<QuicCarrier>> = HashMap::new();
    let mut out = Vec::new();
    for spec in specs {
        let host = crate::spec::host_name(&spec.host, &cli.client.domain);
        let carrier = match carriers.get(&host) {
            Some(c) => c.clone(),
            None => {
                let mut cfg =
                    QuicCarrierConfig::new(host.clone(), port, verify.clone(), token.clone());
                cfg.edge = cli.client.edge.clone();
                cfg.connect_timeout = Duration::from_secs(cli.client.connect_timeout);
                let c = QuicCarrier::new(cfg)?;
                carriers.insert(host, c.clone());
                c
            }
        };
        let target = match target_host(spec) {
            "" => "localhost",
            t => t,
        };
        out.push(Bound {
            listeners: run::bind(spec)?,
            connector: Arc::new(
                QuicConnector::new(carrier, target, spec.rport)
                    .with_context(|| format!("forward spec '{}'", spec.text))?,
            ),
        });
    }
    Ok(out)
}
