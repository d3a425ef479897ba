//! Run an agent in-process and reach a service through it with zero-round-trip streams: the
//! library form of `forward agent` + `forward --agent PORT --transport tcp`.
//!
//! ```sh
//! cargo run --example agent_in_process
//! ```

use std::time::Duration;

use forward_mux::Target;
use forward_tunnel::agent::{Agent, AgentConfig};
use forward_tunnel::agent_client::{AgentConnector, AgentLink, CarrierTransport, LinkConfig};
use forward_tunnel::auth::{self, Token};
use forward_tunnel::Connector;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A service bound to IPv4 loopback only: unreachable through the edge, fine for the agent.
    let svc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let svc_port = svc.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = svc.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"hello from an IPv4-only service\n").await;
                let _ = s.shutdown().await;
            });
        }
    });

    let secret = auth::to_hex(&auth::challenge()); // 256 random bits, as `openssl rand -hex 32`
    let token = Token::new(&secret, "example")?;
    let agent = Agent::bind(AgentConfig::new("[::1]:0".parse()?, token.clone()))?;
    let agent_port = agent.local_addr()?.port();
    let stop = CancellationToken::new();
    let running = tokio::spawn(agent.run(stop.clone(), Duration::from_secs(1)));

    let link = AgentLink::new(LinkConfig {
        host: "::1".into(),
        port: agent_port,
        edge: None,
        transport: CarrierTransport::Tcp,
        token,
        mux: forward_mux::Config::default(),
        timeout: Duration::from_secs(5),
    });
    let connector = AgentConnector::new(link, Target::new("", svc_port)?);
    connector.check().await?;
    for i in 0..3 {
        let mut stream = connector.connect().await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        stream.shutdown().await?;
        print!("stream {i}: {answer}");
        if answer != "hello from an IPv4-only service\n" {
            return Err(format!("stream {i} answered {answer:?}").into());
        }
    }
    stop.cancel();
    running.await?;
    Ok(())
}
