//! `forward agent` and the client side of `--agent`: wiring only, the work is in
//! `forward_tunnel::{agent, agent_client}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use forward_mux::Target;
use forward_tunnel::agent::{Agent, AgentConfig};
use forward_tunnel::agent_client::{AgentConnector, AgentLink, CarrierTransport, LinkConfig};
use forward_tunnel::auth::Token;
use forward_tunnel::policy::TargetPolicy;
use tokio_util::sync::CancellationToken;

use crate::cli::{AgentArgs, Cli, Transport};
use crate::run::{self, Bound};
use crate::spec::Spec;

/// Runs the agent until SIGINT/SIGTERM, then drains.
pub async fn serve(args: AgentArgs) -> Result<i32> {
    let token = Token::load(args.token_file.as_deref())?;
    let mut config = AgentConfig::new(args.listen, token);
    config.policy = TargetPolicy::new(&args.allow)?;
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(forward_tunnel::tls::server_config_from_files(cert, key)?);
    }
    let tls = config.tls.is_some();
    let agent = Agent::bind(config)?;
    let addr = agent.local_addr()?;
    println!(
        "agent listening on {addr} ({}; GET /health open, tunnel needs the token)",
        if tls {
            "TLS"
        } else {
            "plain TCP, TLS ends at the edge"
        }
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone(), Duration::from_secs(args.drain)));
    run::wait_for_signal().await?;
    stop.cancel();
    task.await.context("agent task")?;
    Ok(0)
}

/// Builds one connector per spec, sharing one link (one carrier) per VM.
pub fn forwards(cli: &Cli, specs: &[Spec], port: u16) -> Result<Vec<Bound<AgentConnector>>> {
    let token = Token::load(cli.agent.token_file.as_deref())?;
    let transport = match cli.agent.transport {
        Transport::Tls => CarrierTransport::Tls(run::tls_config(&cli.client)?),
        Transport::Tcp => CarrierTransport::Tcp,
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
        let via = spec
            .via_target
            .as_deref()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']');
        let target = Target::new(via, spec.rport)
            .with_context(|| format!("forward spec '{}'", spec.text))?;
        out.push(Bound {
            listeners: run::bind(spec)?,
            connector: Arc::new(AgentConnector::new(link, target)),
        });
    }
    Ok(out)
}
