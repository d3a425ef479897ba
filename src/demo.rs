//! `forward demo`: the whole path on one machine, no Vers account.
//!
//! ```text
//!  you ─► 127.0.0.1:7007 ─► forward ══TLS══► local edge 127.0.0.1:E ─► echo  on [::1]:P
//!  you ─► 127.0.0.1:8080 ─► forward ══TLS══► local edge 127.0.0.1:F ─► hello on [::1]:Q
//! ```
//!
//! The services bind IPv6 only, as a Vers VM service must; the edge terminates TLS for
//! `*.vm.vers.sh` with a CA made on the spot, exactly as the real edge does with a public one.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use forward_edge::{Edge, EdgeConfig, PortMap};
use forward_tunnel::{serve, DirectConnector, Lifecycle, Remote};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cli::DemoArgs;
use crate::spec::Spec;

const VM: &str = "demo";
const CHECK_BYTES: usize = 1 << 20;

/// Runs the demo; returns the exit code.
/// `json`: `--log-format json`: every line on stdout is a JSON object (the forwarding lines as
/// for `forward` itself, then `demo`, `try` and `self_check`), so a script parses all of it.
pub async fn run(args: DemoArgs, json: bool) -> Result<i32> {
    let mut signals = crate::run::Signals::install()?;
    // Handled, as by `forward` itself: the default action left the CA file in the temporary
    // directory (a tester's finding). Ignored under nohup, as there.
    let mut hangup = crate::run::Hangup::install()?;
    let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0);
    let echo = TcpListener::bind(v6)
        .await
        .context("starting the echo service on [::1] (is IPv6 loopback enabled?)")?;
    let hello = TcpListener::bind(v6)
        .await
        .context("starting the HTTP service on [::1]")?;
    let echo_port = echo.local_addr()?.port();
    let hello_port = hello.local_addr()?.port();
    tokio::spawn(echo_service(echo));
    tokio::spawn(hello_service(hello));

    // The edge listens on ports of its own choosing: asking it for the services' numbers
    // would need the same number free on 127.0.0.1 too, which another program may hold.
    let edge = Edge::start(EdgeConfig::with_ports([
        PortMap::to(0, echo_port),
        PortMap::to(0, hello_port),
    ]))
    .await
    .context("starting the local edge")?;
    let edge_port = |service: u16| {
        edge.listeners()
            .iter()
            .find(|l| l.vm.port() == service)
            .map(|l| l.addr.port())
            .context("the local edge has no listener for a demo service")
    };
    let (echo_edge, hello_edge) = (edge_port(echo_port)?, edge_port(hello_port)?);
    let ca_path = std::env::temp_dir().join(format!("forward-demo-{}-ca.pem", std::process::id()));
    edge.ca().write_ca_pem(&ca_path)?;
    let tls = forward_tunnel::tls::client_config(Some(&ca_path), &[])?;

    let life = Lifecycle::default();
    let mut local_ports = Vec::new();
    for (preferred, port) in [(7007u16, echo_edge), (8080, hello_edge)] {
        let listeners = match crate::run::bind(&Spec::parse(&format!("{preferred}:{VM}:{port}"))?) {
            Ok(l) => l,
            Err(e) => {
                // README promises these ports: say why the demo is elsewhere.
                tracing::warn!("localhost:{preferred} is not free ({e:#}); the demo takes a free port instead (see the lines below)");
                crate::run::bind(&Spec::parse(&format!("0:{VM}:{port}"))?)?
            }
        };
        let connector = Arc::new(DirectConnector::new(
            Remote {
                host: edge.host_for(VM),
                port,
            },
            Some(edge.addr().ip().to_string()),
            tls.clone(),
            Duration::from_secs(10),
        )?);
        let label: Arc<str> = forward_tunnel::Connector::describe(&*connector).into();
        for (listener, addr) in listeners {
            crate::run::announce(json, &addr.to_string(), &label);
            if let forward_tunnel::LocalAddr::Tcp(sa) = addr {
                if sa.is_ipv4() {
                    local_ports.push(sa.port());
                }
            }
            tokio::spawn(serve(
                listener,
                connector.clone(),
                label.clone(),
                life.clone(),
            ));
        }
    }
    let (echo_local, http_local) = (local_ports[0], local_ports[1]);
    let routes = edge.listeners();
    let tries = [
        format!("curl http://localhost:{http_local}/"),
        format!("nc localhost {echo_local}"),
    ];
    if json {
        let edge_json: Vec<_> = routes
            .iter()
            .map(|l| serde_json::json!({ "listen": l.addr.to_string(), "to": l.vm.to_string() }))
            .collect();
        let line = serde_json::json!({ "demo": {
            "edge": edge_json,
            "domain": edge.domain(),
            "ca_file": ca_path.display().to_string(),
            "services_on": "[::1]",
        }});
        crate::say::say!("{line}");
        if !args.once {
            crate::say::say!("{}", serde_json::json!({ "try": tries }));
        }
    } else {
        let edge_routes: Vec<String> = routes
            .iter()
            .map(|l| format!("{} -> {}", l.addr, l.vm))
            .collect();
        crate::say::say!(
            "\nlocal edge {} (TLS for *.{}, CA {}); the services listen on [::1] only",
            edge_routes.join(", "),
            edge.domain(),
            ca_path.display()
        );
        // Not with --once: it exits right after the check, so there is nothing to try.
        if !args.once {
            crate::say::say!(
                "try:\n  {}\n  {}      (type a line, it comes back)\n",
                tries[0],
                tries[1]
            );
        }
    }

    let report = self_check(echo_local, http_local).await;
    let code = i32::from(report.is_err());
    match (&report, json) {
        (Ok(r), false) => crate::say::say!("self-check ok: {r}"),
        (Err(e), false) => crate::say::say!("self-check FAILED: {e:#}"),
        (Ok(r), true) => crate::say::say!(
            "{}",
            serde_json::json!({ "self_check": {
                "ok": true,
                "echoed_bytes": CHECK_BYTES,
                "connect_first_byte_ms": (r.connect.as_secs_f64() * 1e4).round() / 10.0,
                "rtt_p50_us": r.rtt_p50.as_micros(),
                "http_status": 200,
            }})
        ),
        (Err(e), true) => crate::say::say!(
            "{}",
            serde_json::json!({ "self_check": { "ok": false, "error": format!("{e:#}") } })
        ),
    }
    let mut hung_up = false;
    if !args.once && code == 0 {
        if !json {
            crate::say::say!("serving until Ctrl-C");
        }
        hung_up = signals.recv_or_hangup(&mut hangup).await;
    }
    if hung_up {
        life.shutdown(Duration::ZERO).await;
    } else {
        // As `forward` does: SIGHUP in the grace period ends it at once, and says so in the
        // exit status.
        tokio::select! {
            _ = life.shutdown(Duration::from_secs(2)) => {}
            () = hangup.recv() => {
                hung_up = true;
                life.shutdown(Duration::ZERO).await;
            }
        }
    }
    let _ = std::fs::remove_file(&ca_path);
    Ok(if hung_up { 128 + 1 } else { code })
}

/// What the self-check measured.
struct CheckReport {
    connect: Duration,
    rtt_p50: Duration,
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "1 MiB echoed through TLS and verified, half-close honoured, connect + first byte {:.1} ms, 1-byte round trip p50 {} µs, HTTP 200",
            self.connect.as_secs_f64() * 1e3,
            self.rtt_p50.as_micros()
        )
    }
}

async fn self_check(echo_port: u16, http_port: u16) -> Result<CheckReport> {
    // Bulk: 1 MiB of pseudo-random bytes must come back identical.
    let payload: Vec<u8> = {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id());
        (0..CHECK_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let start = Instant::now();
    let s = TcpStream::connect(("127.0.0.1", echo_port))
        .await
        .context("connecting to the local echo forward")?;
    s.set_nodelay(true)?;
    let (mut r, mut w) = s.into_split();
    // Connect + first byte: local accept, TCP + TLS to the edge, edge to the service and back.
    let mut one = [0u8; 1];
    w.write_all(b"!").await?;
    r.read_exact(&mut one).await?;
    let connect = start.elapsed();
    // Round trips on the same connection, one byte each.
    let mut rtts = Vec::with_capacity(200);
    for i in 0..200u32 {
        let t = Instant::now();
        w.write_all(&[i as u8]).await?;
        r.read_exact(&mut one).await?;
        ensure!(one[0] == i as u8, "round-trip byte differs");
        rtts.push(t.elapsed());
    }
    // Then the bulk, and our end of the stream right after it: most of the echo comes back
    // after our FIN, so a tunnel that closed both ways at the first FIN would cut it.
    let send = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&send).await?;
        w.shutdown().await
    });
    let mut back = Vec::with_capacity(CHECK_BYTES);
    r.read_to_end(&mut back)
        .await
        .context("reading the echo back")?;
    writer.await??;
    ensure!(
        back.len() == CHECK_BYTES,
        "the echo ended after {} of {CHECK_BYTES} bytes (half-close not honoured?)",
        back.len()
    );
    ensure!(back == payload, "echoed bytes differ from what was sent");
    rtts.sort();
    let p50 = rtts[rtts.len() / 2];

    let mut h = TcpStream::connect(("127.0.0.1", http_port)).await?;
    h.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut resp = String::new();
    h.read_to_string(&mut resp).await?;
    ensure!(
        resp.starts_with("HTTP/1.1 200"),
        "HTTP answer was not 200: {:?}",
        resp.lines().next()
    );
    Ok(CheckReport {
        connect,
        rtt_p50: p50,
    })
}

async fn echo_service(listener: TcpListener) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = s.split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        });
    }
}

async fn hello_service(listener: TcpListener) {
    while let Ok((mut s, peer)) = listener.accept().await {
        tokio::spawn(async move {
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let body = format!(
                "hello from a VM-side service on [::1], reached through forward and the local edge (edge connected from {peer})\n"
            );
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(resp.as_bytes()).await.is_ok() {
                let _ = s.shutdown().await;
            }
        });
    }
}
