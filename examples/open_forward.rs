//! Open a forward from your own program: a local edge stands in for Vers, an IPv6 echo service
//! for the VM, and one line of `serve` does what `forward 0:demo:PORT` does.
//!
//! ```sh
//! cargo run --example open_forward
//! ```

use std::sync::Arc;
use std::time::Duration;

use forward_edge::{Edge, EdgeConfig, PortMap};
use forward_tunnel::{serve, DirectConnector, Lifecycle, Listener, LocalAddr, Remote};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The "VM": an echo service on [::1], as a Vers VM service binds `::`.
    let vm = tokio::net::TcpListener::bind("[::1]:0").await?;
    let port = vm.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = vm.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });

    // The "edge": TLS for *.vm.vers.sh with a CA made here, listening on a free port of
    // 127.0.0.1 and routing to [::1]:port (the real edge listens on the VM port's number).
    let edge = Edge::start(EdgeConfig::with_ports([PortMap::to(0, port)])).await?;
    let edge_port = edge.addr().port();
    let ca = std::env::temp_dir().join(format!("open-forward-{}.pem", std::process::id()));
    edge.ca().write_ca_pem(&ca)?;

    // The forward: listen on 127.0.0.1:0, one verified TLS connection to the edge per client.
    let tls = forward_tunnel::tls::client_config(Some(&ca), &[])?;
    let connector = DirectConnector::new(
        Remote {
            host: edge.host_for("demo"),
            port: edge_port,
        },
        Some(edge.addr().ip().to_string()),
        tls,
        Duration::from_secs(10),
    )?;
    let listener = Listener::bind(&LocalAddr::Tcp("127.0.0.1:0".parse()?))?;
    let local = listener.local_addr()?;
    let life = Lifecycle::default();
    tokio::spawn(serve(
        listener,
        Arc::new(connector),
        "demo".into(),
        life.clone(),
    ));
    println!(
        "forwarding {local} -> {}:{edge_port}",
        edge.host_for("demo")
    );

    // Use it like any local port.
    let LocalAddr::Tcp(addr) = local else {
        unreachable!("bound a TCP address")
    };
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"hello through TLS\n").await?;
    s.shutdown().await?;
    let mut back = String::new();
    s.read_to_string(&mut back).await?;
    print!("echoed: {back}");
    if back != "hello through TLS\n" {
        return Err(format!("the echo came back as {back:?}").into());
    }

    life.shutdown(Duration::from_secs(1)).await;
    std::fs::remove_file(&ca)?;
    Ok(())
}
