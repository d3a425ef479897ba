//! Stream credit over QUIC: every way a forwarded connection can end must give its stream back
//! to the client (quinn returns MAX_STREAMS credit only once both halves of a stream are closed
//! on the agent), and a client past the agent's stream limit must still get through. The agent
//! runs with a limit of 8 so that a leak or a missing overflow shows within a few connections.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use forward_tunnel::auth::Token;
use forward_tunnel::quic::{
    AgentVerify, QuicAgent, QuicAgentConfig, QuicCarrier, QuicCarrierConfig, QuicCert,
    QuicConnector,
};
use forward_tunnel::{serve, Lifecycle, Listener, LocalAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

mod quic_support;
mod stall;
use quic_support::{echo, pattern, round_trip, sha, v6, NAME, TOKEN};

const LIMIT: u32 = 8;

/// A deadline against hangs only; nothing asserts on speed.
async fn timed<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no progress for 60 s (stream credit leaked?)"))
}

fn token() -> Token {
    Token::new(TOKEN, "test").unwrap()
}

/// An agent allowing `LIMIT` streams per connection; returns its address, pin and stop switch.
fn agent() -> (SocketAddr, forward_tunnel::quic::SpkiPin, CancellationToken) {
    agent_with_limit(LIMIT)
}

fn agent_with_limit(limit: u32) -> (SocketAddr, forward_tunnel::quic::SpkiPin, CancellationToken) {
    let cert = QuicCert::generate(&[NAME.into()]).unwrap();
    let mut config = QuicAgentConfig::new(0, cert, token());
    config.listen = v6();
    config.grace = Duration::ZERO;
    config.max_streams = limit;
    let agent = QuicAgent::bind(config).unwrap();
    let (addr, pin) = (agent.local_addr(), agent.pin());
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move { agent.run(s).await.unwrap() });
    (addr, pin, stop)
}

/// A carrier with at most `connections` connections to the agent.
fn carrier(
    addr: SocketAddr,
    pin: forward_tunnel::quic::SpkiPin,
    connections: usize,
) -> Arc<QuicCarrier> {
    let mut c = QuicCarrierConfig::new(NAME, addr.port(), AgentVerify::Pin(pin), token());
    c.edge = Some(addr.ip().to_string());
    c.bind = v6();
    c.max_connections = connections;
    c.overflow_idle = Duration::from_millis(200);
    QuicCarrier::new(c).unwrap()
}

/// Backend that speaks first: a banner, then its FIN, then it reads the client's bytes to EOF.
async fn banner() -> u16 {
    let l = TcpListener::bind(v6()).await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                s.write_all(BANNER).await?;
                s.shutdown().await?;
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await?;
                Ok::<_, io::Error>(())
            });
        }
    });
    port
}

const BANNER: &[u8] = b"hello from the backend";

/// The backend ends its direction first; the client reads it to EOF, then sends and ends its own.
async fn backend_first_round(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, BANNER);
    s.write_all(b"bye").await.unwrap();
    s.shutdown().await.unwrap();
    drop(s);
}

/// A local forward as the binary runs it: listener, accept loop, relay to a QUIC stream.
async fn forward(carrier: Arc<QuicCarrier>, port: u16) -> SocketAddr {
    let connector = QuicConnector::new(carrier, "localhost", port).unwrap();
    let listener = Listener::bind(&LocalAddr::Tcp(v6())).unwrap();
    let LocalAddr::Tcp(addr) = listener.local_addr().unwrap() else {
        unreachable!("bound a TCP address")
    };
    tokio::spawn(serve(
        listener,
        Arc::new(connector),
        "test".into(),
        Lifecycle::default(),
    ));
    addr
}

/// Sends `data`, half-closes, reads the echo to EOF.
async fn echo_round(addr: SocketAddr, data: Vec<u8>) -> io::Result<Vec<u8>> {
    round_trip(TcpStream::connect(addr).await?, data).await
}

/// Sends two bytes, reads one back, then resets (SO_LINGER 0), as a client that gives up.
async fn reset_round(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"hi").await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"h");
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

/// Reads the whole answer, then closes without a half-close: the backend's FIN and ours cross.
async fn plain_close_round(addr: SocketAddr, seed: u8) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let data = pattern(3000, seed);
    s.write_all(&data).await.unwrap();
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(sha(&got), sha(&data));
    drop(s);
}

/// `n` connections at once, each with its own bytes; all must come back intact. `at_peak`
/// runs while all of them are open.
async fn concurrent<F: Future<Output = ()>>(addr: SocketAddr, n: u8, at_peak: F) {
    // Every connection holds its stream until all have connected and exchanged a first
    // byte, so they are open at the same time.
    let barrier = Arc::new(tokio::sync::Barrier::new(usize::from(n) + 1));
    let mut tasks = Vec::new();
    for i in 0..n {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(64 * 1024 + usize::from(i), i);
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&data[..1]).await.unwrap();
            let mut first = [0u8; 1];
            s.read_exact(&mut first).await.unwrap();
            barrier.wait().await;
            let got = round_trip(s, data[1..].to_vec()).await.unwrap();
            let mut all = first.to_vec();
            all.extend_from_slice(&got);
            assert_eq!(sha(&all), sha(&data), "connection {i}");
        }));
    }
    barrier.wait().await;
    at_peak.await;
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_ended_every_way_give_their_credit_back() {
    let (addr, pin, stop) = agent();
    let port = echo(v6()).await;
    // One connection only: a stream that is not given back cannot hide behind an overflow one.
    let carrier = carrier(addr, pin, 1);
    let local = forward(carrier.clone(), port).await;

    // Each kind of ending, then a check that all LIMIT streams can be open at once; the check
    // runs twice, one connection apart, as quinn gives credit back in batches (whether one
    // stream is held back depends on how many were freed).
    let banner_local = forward(carrier.clone(), banner().await).await;
    for kind in ["reset", "clean", "plain close", "backend-first"] {
        for i in 0..50u8 {
            let what = format!("{kind} connection {i}");
            match kind {
                "reset" => timed(&what, reset_round(local)).await,
                "clean" => {
                    let data = pattern(1000 + usize::from(i), i);
                    let got = timed(&what, echo_round(local, data.clone())).await.unwrap();
                    assert_eq!(sha(&got), sha(&data), "{what}");
                }
                "plain close" => timed(&what, plain_close_round(local, i)).await,
                _ => timed(&what, backend_first_round(banner_local)).await,
            }
        }
        for check in 0..2 {
            let what = format!("{LIMIT} concurrent connections after the {kind} ones ({check})");
            // With any stream above not given back, some of these would wait for credit
            // that never comes.
            timed(&what, concurrent(local, LIMIT as u8, async {})).await;
            timed(&what, reset_round(local)).await;
        }
    }
    assert_eq!(carrier.connections().await, 1);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_stream_limit_new_connections_overflow_and_idle_ones_close() {
    let (addr, pin, stop) = agent();
    let port = echo(v6()).await;
    let carrier = carrier(addr, pin, 64);
    let local = forward(carrier.clone(), port).await;
    let peak = carrier.clone();
    timed(
        "30 concurrent connections over a limit of 8",
        concurrent(local, 30, async move {
            let n = peak.connections().await;
            // 30 open streams need at least three connections of 8 to 10 streams each.
            assert!(n >= 3, "{n} QUIC connections for 30 streams");
        }),
    )
    .await;
    // The overflow connections close once idle; the primary stays.
    timed("idle overflow connections to close", async {
        while carrier.connections().await > 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(carrier.connections().await, 1);
    // And they come back when needed.
    timed(
        "30 concurrent connections again",
        concurrent(local, 30, async {}),
    )
    .await;
    stop.cancel();
}

/// Backend that writes without end and never reads.
async fn firehose() -> u16 {
    let l = TcpListener::bind(v6()).await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![0x5au8; 64 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    port
}

/// Readers that stopped reading a download make a connection take no new streams once 12 of
/// them have been silent for a second (quinn gives each a fixed 16 MiB window and the
/// connection's receive window holds 16, so more would stop every stream on it); readers
/// that are only idle (a pooled database connection, an ssh session) do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_move_new_streams_to_another_connection_idle_ones_do_not() {
    let (addr, pin, stop) = agent_with_limit(256);
    let carrier = carrier(addr, pin, 64);
    let echo_local = forward(carrier.clone(), echo(v6()).await).await;
    let hose_local = forward(carrier.clone(), firehose().await).await;

    // 16 idle connections, each after a first exchange, then a pause longer than the stall
    // threshold: the next connection still goes on the same QUIC connection.
    let mut idle = Vec::new();
    for i in 0..16u8 {
        let mut s = TcpStream::connect(echo_local).await.unwrap();
        s.write_all(&[i]).await.unwrap();
        let mut one = [0u8; 1];
        timed("first echo byte", s.read_exact(&mut one))
            .await
            .unwrap();
        assert_eq!(one, [i]);
        idle.push(s);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let data = pattern(100_000, 7);
    let got = timed(
        "echo beside idle connections",
        echo_round(echo_local, data.clone()),
    )
    .await
    .unwrap();
    assert_eq!(sha(&got), sha(&data));
    assert_eq!(
        carrier.connections().await,
        1,
        "idle readers counted as stalled"
    );

    // 12 downloads whose readers never read; once they are silent for a second, a new
    // connection opens on a second QUIC connection and its bytes come back intact.
    let mut stalled = Vec::new();
    for _ in 0..12 {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        // A small receive buffer, so the stall reaches the relay before the kernel has
        // taken megabytes.
        s.set_recv_buffer_size(16 * 1024).unwrap();
        s.connect(&hose_local.into()).unwrap();
        stalled.push(std::net::TcpStream::from(s));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    echo_on_an_overflow_connection(&carrier, echo_local, data).await;
    drop(stalled);
    drop(idle);
    stop.cancel();
}

/// With one QUIC connection whose streams stalled, a new connection goes on a second one and
/// its echo of `data` comes back intact.
async fn echo_on_an_overflow_connection(
    carrier: &QuicCarrier,
    echo_local: SocketAddr,
    data: Vec<u8>,
) {
    assert_eq!(carrier.connections().await, 1);
    let mut s = TcpStream::connect(echo_local).await.unwrap();
    s.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    timed("echo beside stalled streams", s.read_exact(&mut one))
        .await
        .unwrap();
    // Asked while the stream is open: an idle overflow connection closes after 200 ms here.
    assert_eq!(
        carrier.connections().await,
        2,
        "a new stream beside stalled streams should open an overflow connection"
    );
    let got = timed("echo beside stalled streams", round_trip(s, data.clone()))
        .await
        .unwrap();
    assert_eq!(sha(&got), sha(&data));
}

/// The upload side of the test above: a VM service that stops reading leaves each upload's
/// bytes in the agent, up to the 16 MiB stream window, and 16 of them fill the agent's
/// receive window, so the connection carries nothing more for any stream (a new connection
/// got no byte in 60 s). The client sees only that quinn takes no more of these streams'
/// bytes; once 12 were refused for a second, new connections go on another QUIC connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_move_new_streams_to_another_connection() {
    let (addr, pin, stop) = agent_with_limit(256);
    let carrier = carrier(addr, pin, 64);
    let echo_local = forward(carrier.clone(), echo(v6()).await).await;
    let deaf_local = forward(carrier.clone(), stall::deaf_server().await.port()).await;
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut uploads = Vec::new();
    for _ in 0..16 {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
        // A small send buffer, so the stall reaches forward rather than this socket.
        s.set_send_buffer_size(64 * 1024).unwrap();
        s.connect(&deaf_local.into()).unwrap();
        s.set_nonblocking(true).unwrap();
        let s = TcpStream::from_std(s.into()).unwrap();
        uploads.push(stall::upload(s, None, written.clone()));
    }
    let stuck = stall::settled(&written).await;
    assert!(
        stuck >= 16 * (16 << 20),
        "only {stuck} bytes went out before the uploads stalled: the agent's window is not full"
    );
    echo_on_an_overflow_connection(&carrier, echo_local, pattern(100_000, 9)).await;
    for u in uploads {
        u.abort();
    }
    stop.cancel();
}
