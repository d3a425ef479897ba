//! The QUIC transport over real UDP on loopback: agent, carrier, connectors, and a raw quinn
//! client for the protocol violations a well-behaved client never makes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use forward_tunnel::auth::{AgentNames, Token};
use forward_tunnel::quic::{
    client_config, close, code, encode_target, AgentVerify, QuicAgent, QuicAgentConfig,
    QuicCarrier, QuicCarrierConfig, QuicCert, QuicConnector, SpkiPin, ALPN, AUTH_HELLO,
    MAX_UNAUTHENTICATED,
};
use forward_tunnel::Connector;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[path = "agent/closed_port.rs"]
mod closed_port;
#[path = "agent/full_queue.rs"]
mod full_queue;
mod quic_support;
use quic_support::{echo, pattern, round_trip, sha, v4, v6, NAME, TOKEN};

const OTHER_TOKEN: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa9988";

/// A deadline against hangs only; nothing asserts on speed.
async fn timed<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("test step hung for 120 s")
}

fn token(t: &str) -> Token {
    Token::new(t, "test").unwrap()
}

struct Agent {
    addr: SocketAddr,
    pin: SpkiPin,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

fn agent_with(listen: SocketAddr, cert: QuicCert, grace: Duration) -> Agent {
    let mut config = QuicAgentConfig::new(0, cert, token(TOKEN));
    config.listen = listen;
    config.grace = grace;
    let agent = QuicAgent::bind(config).unwrap();
    let addr = agent.local_addr();
    let pin = agent.pin();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move { agent.run(s).await.unwrap() });
    Agent {
        addr,
        pin,
        stop,
        task,
    }
}

fn agent() -> Agent {
    agent_with(
        v6(),
        QuicCert::generate(&[NAME.into()]).unwrap(),
        Duration::ZERO,
    )
}

/// A carrier configuration that reaches `agent` on its address.
fn carrier_config(agent: &Agent, verify: AgentVerify, tok: &str) -> QuicCarrierConfig {
    let mut c = QuicCarrierConfig::new(NAME, agent.addr.port(), verify, token(tok));
    c.edge = Some(agent.addr.ip().to_string());
    c.bind = if agent.addr.is_ipv6() { v6() } else { v4() };
    c
}

fn carrier_with(agent: &Agent, verify: AgentVerify, tok: &str) -> Arc<QuicCarrier> {
    QuicCarrier::new(carrier_config(agent, verify, tok)).unwrap()
}

/// A new stream to the echo service on `port` carries `msg` there and back.
async fn echo_via(c: &QuicCarrier, port: u16, msg: &[u8]) {
    let s = timed(c.open("localhost", port)).await.unwrap();
    let got = timed(round_trip(s, msg.to_vec()))
        .await
        .unwrap_or_else(|e| panic!("round trip of {:?}: {e}", String::from_utf8_lossy(msg)));
    assert_eq!(got, msg);
}

/// An error, not EOF, from a stream whose agent stopped. Normally the stream reset says the
/// agent is shutting down; if every reset and close packet were lost on a loaded machine, the
/// idle timeout still ends it with an error.
fn assert_cut_by_the_agent_stopping(e: &io::Error) {
    let text = e.to_string();
    assert!(
        text.contains("shutting down") || text.contains("lost"),
        "{e}"
    );
}

fn carrier(agent: &Agent) -> Arc<QuicCarrier> {
    carrier_with(agent, AgentVerify::Pin(agent.pin), TOKEN)
}

#[tokio::test]
async fn sixteen_mib_each_way_hash_intact() {
    let a = agent();
    let port = echo(v6()).await;
    let c = QuicConnector::new(carrier(&a), "localhost", port).unwrap();
    let data = pattern(16 * 1024 * 1024 + 7, 1);
    let stream = timed(c.connect()).await.unwrap();
    let got = timed(round_trip(stream, data.clone())).await.unwrap();
    assert_eq!(got.len(), data.len());
    assert_eq!(sha(&got), sha(&data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_streams_share_one_connection() {
    let a = agent();
    let port = echo(v6()).await;
    let c = QuicConnector::new(carrier(&a), "localhost", port).unwrap();
    let mut tasks = Vec::new();
    for i in 0..50u8 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(200 * 1024 + usize::from(i), i);
            let s = c.connect().await.unwrap();
            let got = round_trip(s, data.clone()).await.unwrap();
            assert_eq!(sha(&got), sha(&data), "stream {i}");
        }));
    }
    for t in tasks {
        timed(t).await.unwrap();
    }
}

#[tokio::test]
async fn half_close_both_ways() {
    let a = agent();
    let c = carrier(&a);
    // Client closes first: the backend answers after seeing EOF.
    let l = TcpListener::bind(v6()).await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        s.write_all(b"answer to ").await.unwrap();
        s.write_all(&req).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let mut s = timed(c.open("localhost", port)).await.unwrap();
    s.write_all(b"question").await.unwrap();
    timed(s.shutdown()).await.unwrap();
    let mut got = Vec::new();
    timed(s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"answer to question");

    // Backend closes first: the client keeps sending after the backend's FIN.
    let l = TcpListener::bind(v6()).await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"greeting").await.unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        let _ = tx.send(rest);
    });
    let mut s = timed(c.open("localhost", port)).await.unwrap();
    let mut got = Vec::new();
    timed(s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"greeting");
    let late = pattern(3 * 1024 * 1024, 9);
    timed(s.write_all(&late)).await.unwrap();
    timed(s.shutdown()).await.unwrap();
    assert_eq!(sha(&timed(rx).await.unwrap()), sha(&late));
}

/// The relay takes a QUIC stream's bytes as quinn's own chunks: every byte in order, never
/// more than asked per call, EOF once the peer finished (and again if asked), and a stream
/// cut by the agent an error, never EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_reads_hand_over_every_byte_and_never_mistake_a_cut_for_eof() {
    use forward_tunnel::Endpoint;
    use std::collections::VecDeque;
    use std::future::poll_fn;

    async fn take(s: &mut impl Endpoint, max: usize) -> io::Result<Vec<u8>> {
        let mut chunks = VecDeque::new();
        let n = poll_fn(|cx| {
            s.poll_read_chunks(cx, max, &mut chunks)
                .expect("hands out chunks")
        })
        .await?;
        let got: Vec<u8> = chunks.into_iter().flatten().collect();
        assert_eq!(got.len(), n, "the count matches the chunks");
        assert!(n <= max, "{n} bytes handed out where {max} were asked for");
        Ok(got)
    }

    let a = agent();
    let port = echo(v6()).await;
    let c = carrier(&a);
    let data = pattern(4 * 1024 * 1024 + 3, 5);
    let mut s = timed(c.open("localhost", port)).await.unwrap();
    let (mut got, mut calls) = (Vec::new(), 0);
    for piece in data.chunks(256 * 1024) {
        timed(s.write_all(piece)).await.unwrap();
    }
    timed(s.shutdown()).await.unwrap();
    loop {
        // Odd, small limits: chunks are split, not only handed over whole.
        let bytes = timed(take(&mut s, 1000 + calls % 7 * 4099)).await.unwrap();
        calls += 1;
        if bytes.is_empty() {
            break;
        }
        got.extend_from_slice(&bytes);
    }
    assert_eq!(got.len(), data.len());
    assert_eq!(sha(&got), sha(&data));
    assert!(
        timed(take(&mut s, 1000)).await.unwrap().is_empty(),
        "EOF again"
    );

    // Cut mid-stream: the echo keeps sending what it gets; the agent stops.
    let mut s = timed(c.open("localhost", port)).await.unwrap();
    timed(s.write_all(&data[..64 * 1024])).await.unwrap();
    assert!(!timed(take(&mut s, 1000)).await.unwrap().is_empty());
    a.stop.cancel();
    let e = timed(async {
        loop {
            match take(&mut s, 64 * 1024).await {
                Ok(b) if b.is_empty() => panic!("a stopped agent read as a clean EOF"),
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    })
    .await;
    assert_cut_by_the_agent_stopping(&e);
}

#[tokio::test]
async fn refused_and_forbidden_targets_read_as_errors_not_eof() {
    let a = agent();
    let c = carrier(&a);
    let closed = closed_port::closed_port();
    let port = closed.port;
    let mut s = timed(c.open("localhost", port)).await.unwrap();
    let mut buf = Vec::new();
    let e = timed(s.read_to_end(&mut buf)).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    assert!(e.to_string().contains("connection refused"), "{e}");

    let mut s = timed(c.open("10.1.2.3", 80)).await.unwrap();
    let e = timed(s.read_to_end(&mut buf)).await.unwrap_err();
    assert!(e.to_string().contains("not allowed"), "{e}");
    assert!(e.to_string().contains("10.1.2.3:80"), "{e}");
}

#[tokio::test]
async fn a_stream_reset_while_its_target_is_dialled_stops_the_dial() {
    let a = agent();
    let c = carrier(&a);
    let (target, _fillers) = full_queue::full_listener().await;
    let port = target.local_addr().unwrap().port();
    let mut s = timed(c.open("127.0.0.1", port)).await.unwrap();
    s.write_all(b"never delivered").await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    full_queue::assert_no_late_connection(&target).await;
    let port = echo(v6()).await;
    let s = timed(c.open("localhost", port)).await.unwrap();
    let got = timed(round_trip(s, pattern(1000, 3))).await.unwrap();
    assert_eq!(
        sha(&got),
        sha(&pattern(1000, 3)),
        "the connection serves on"
    );
}

#[tokio::test]
async fn wrong_pin_is_rejected_naming_the_real_pin() {
    let a = agent();
    let other = QuicCert::generate(&[]).unwrap().pin().unwrap();
    let c = carrier_with(&a, AgentVerify::Pin(other), TOKEN);
    let e = timed(c.check()).await.unwrap_err().to_string();
    assert!(e.contains("does not match --agent-pin"), "{e}");
    assert!(e.contains(&a.pin.to_string()), "{e}");
    // The agent is unaffected.
    timed(carrier(&a).check()).await.unwrap();
}

/// The refusal races the agent dropping the connection (a stateless reset can arrive before
/// the close): every wrong-token check must still say why, not "connection lost".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wrong_token_check_names_the_token() {
    let a = agent();
    for i in 0..12 {
        let bad = carrier_with(&a, AgentVerify::Pin(a.pin), OTHER_TOKEN);
        let e = timed(bad.check()).await.unwrap_err().to_string();
        assert!(e.contains("use the same token"), "check {i}: {e}");
        assert!(e.contains("--name"), "check {i}: {e}");
    }
}

#[tokio::test]
async fn wrong_token_is_rejected_while_a_good_client_keeps_working() {
    let a = agent();
    let port = echo(v6()).await;
    let good = carrier(&a);
    let mut s = timed(good.open("localhost", port)).await.unwrap();
    s.write_all(b"before").await.unwrap();
    let mut b = [0u8; 6];
    timed(s.read_exact(&mut b)).await.unwrap();

    let bad = carrier_with(&a, AgentVerify::Pin(a.pin), OTHER_TOKEN);
    let e = timed(bad.check()).await.unwrap_err().to_string();
    // The agent cannot say which (one reply for both): the name is the other suspect.
    assert!(
        e.contains("check that both sides use the same token") && e.contains("--name"),
        "{e}"
    );
    let e = QuicConnector::new(bad, "localhost", port).unwrap();
    let e = timed(e.connect()).await.unwrap_err().to_string();
    assert!(e.contains("same token"), "{e}");

    s.write_all(b" after").await.unwrap();
    timed(s.shutdown()).await.unwrap();
    let mut rest = Vec::new();
    timed(s.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(rest, b" after");
    echo_via(&good, port, b"new").await;
}

#[tokio::test]
async fn an_agent_with_names_refuses_proofs_made_for_another_name() {
    // The agent answers to NAME only. A client that dialled another name (SNI) made its proof
    // for that name: refused, as a proof relayed from another agent's client would be.
    let cert = QuicCert::generate(&[NAME.into(), "other.vm.test".into()]).unwrap();
    let mut config = QuicAgentConfig::new(0, cert, token(TOKEN));
    config.listen = v6();
    config.names = AgentNames::new(&[NAME]);
    let agent = QuicAgent::bind(config).unwrap();
    let (addr, pin) = (agent.local_addr(), agent.pin());
    let stop = CancellationToken::new();
    tokio::spawn(agent.run(stop.clone()));
    let dial = |name: &str| {
        let mut c = QuicCarrierConfig::new(name, addr.port(), AgentVerify::Pin(pin), token(TOKEN));
        c.edge = Some(addr.ip().to_string());
        c.bind = v6();
        QuicCarrier::new(c).unwrap()
    };
    timed(dial(NAME).check())
        .await
        .expect("the agent's own name");
    let e = timed(dial("other.vm.test").check())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("same token"), "{e}");
    stop.cancel();
}

#[tokio::test]
async fn garbage_datagrams_do_not_stop_the_agent() {
    let a = agent();
    let port = echo(v6()).await;
    let udp = tokio::net::UdpSocket::bind(v6()).await.unwrap();
    for i in 0..200usize {
        let mut d = pattern(1 + (i * 37) % 1400, i as u8);
        if i % 3 == 0 {
            // Looks like a long-header Initial of QUIC v1, then nonsense.
            d[0] = 0xc0;
            if d.len() > 5 {
                d[1..5].copy_from_slice(&1u32.to_be_bytes());
            }
        }
        udp.send_to(&d, a.addr).await.unwrap();
    }
    let c = carrier(&a);
    echo_via(&c, port, b"still serving").await;
}

async fn raw_connection(
    a: &Agent,
    alpn: &[u8],
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let mut config = client_config(&AgentVerify::Pin(a.pin)).unwrap();
    if alpn != ALPN {
        // Rebuild the TLS side with a foreign ALPN, pinned by hand through a CA-less trick:
        // the agent rejects the handshake before any certificate question arises.
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        tls.alpn_protocols = vec![alpn.to_vec()];
        config = quinn::ClientConfig::new(Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
        ));
    }
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        std::net::UdpSocket::bind(v6()).unwrap(),
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap();
    endpoint.connect_with(config, a.addr, NAME).unwrap().await
}

/// Starts the auth exchange by hand: hello out, challenge in.
async fn raw_auth(conn: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream, [u8; 32]) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[AUTH_HELLO]).await.unwrap();
    let mut ch = [0u8; 32];
    recv.read_exact(&mut ch).await.unwrap();
    (send, recv, ch)
}

/// A stranger holding as many finished handshakes as the agent lets wait for authentication,
/// and reopening them as they time out, locked every client out: the agent refused newcomers.
/// Now a newcomer takes the oldest one's place, and that one is told the agent is busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_authenticate_do_not_lock_a_client_out() {
    let a = agent();
    let port = echo(v6()).await;
    // All at once: one after another, on a loaded box the first reached the auth timeout
    // (10 s) before the last was up, and the queue was never full.
    let squatters: Vec<quinn::Connection> = timed(futures_util::future::join_all(
        (0..MAX_UNAUTHENTICATED).map(|_| raw_connection(&a, ALPN)),
    ))
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    assert!(
        squatters.iter().all(|c| c.close_reason().is_none()),
        "a squatter was closed before the queue was full"
    );
    let good = carrier(&a);
    timed(good.check()).await.unwrap();
    echo_via(&good, port, b"through a full queue").await;
    // The newcomer took one squatter's place, and that one was told why.
    let (first_closed, _, _) = timed(futures_util::future::select_all(
        squatters.iter().map(|c| Box::pin(c.closed())),
    ))
    .await;
    assert!(
        matches!(&first_closed, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(close::BUSY)),
        "{first_closed:?}"
    );
}

#[tokio::test]
async fn a_stream_opened_before_auth_is_reset_and_auth_still_works() {
    let a = agent();
    let port = echo(v6()).await;
    let conn = timed(raw_connection(&a, ALPN)).await.unwrap();
    let (mut auth_send, mut auth_recv, ch) = timed(raw_auth(&conn)).await;

    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode_target("localhost", port).unwrap())
        .await
        .unwrap();
    send.write_all(b"sneaky").await.unwrap();
    let e = timed(recv.read_to_end(1024)).await.unwrap_err();
    assert!(
        matches!(e, quinn::ReadToEndError::Read(quinn::ReadError::Reset(c)) if c == quinn::VarInt::from_u32(code::AUTH_REQUIRED)),
        "{e:?}"
    );

    let proof = token(TOKEN).prove(&ch, NAME, a.addr.port());
    auth_send.write_all(&proof).await.unwrap();
    let mut verdict = [0u8; 1];
    timed(auth_recv.read_exact(&mut verdict)).await.unwrap();
    assert_eq!(verdict, [1]);

    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode_target("localhost", port).unwrap())
        .await
        .unwrap();
    send.write_all(b"after auth").await.unwrap();
    send.finish().unwrap();
    let got = timed(recv.read_to_end(1024)).await.unwrap();
    assert_eq!(got, b"after auth");
}

#[tokio::test]
async fn a_first_stream_that_is_not_auth_closes_the_connection() {
    let a = agent();
    let conn = timed(raw_connection(&a, ALPN)).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode_target("localhost", 22).unwrap())
        .await
        .unwrap();
    let e = timed(conn.closed()).await;
    assert!(e.to_string().contains("not an auth hello"), "{e}");
    timed(carrier(&a).check()).await.unwrap();
}

#[tokio::test]
async fn wrong_alpn_is_refused_and_the_agent_keeps_serving() {
    let a = agent();
    let e = timed(raw_connection(&a, b"h3")).await.unwrap_err();
    assert!(
        matches!(&e, quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::crypto(120)),
        "{e:?}"
    );
    timed(carrier(&a).check()).await.unwrap();
}

#[tokio::test]
async fn bad_target_headers_are_reset_and_the_connection_goes_on() {
    let a = agent();
    let port = echo(v6()).await;
    let c = carrier(&a);
    let conn = timed(c.connection()).await.unwrap();
    let oversized = {
        let mut h = vec![0, 80, 255];
        h.extend(std::iter::repeat_n(b'a', 255));
        h
    };
    let headers: [&[u8]; 3] = [&oversized, b"\x00\x00\x09localhost", b"\x00\x50\x03a b"];
    for h in headers {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(h).await.unwrap();
        send.write_all(b"payload").await.unwrap();
        let e = timed(recv.read_to_end(1024)).await.unwrap_err();
        assert!(
            matches!(e, quinn::ReadToEndError::Read(quinn::ReadError::Reset(c)) if c == quinn::VarInt::from_u32(code::BAD_HEADER)),
            "{e:?}"
        );
    }
    // A header that ends early.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&[0, 80, 20, b'x']).await.unwrap();
    send.finish().unwrap();
    assert!(timed(recv.read_to_end(1024)).await.is_err());

    let e = QuicConnector::new(c.clone(), &"a".repeat(254), 80)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 253"), "{e}");
    echo_via(&c, port, b"fine").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_stopped_mid_transfer_is_an_error_not_eof() {
    let a = agent();
    let port = echo(v6()).await;
    let c = carrier(&a);
    let s = timed(c.open("localhost", port)).await.unwrap();
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        loop {
            if let Err(e) = w.write_all(&chunk).await {
                return e;
            }
        }
    });
    let mut first = [0u8; 1024];
    timed(r.read_exact(&mut first)).await.unwrap();
    a.stop.cancel();
    let mut sink = vec![0u8; 64 * 1024];
    let e = timed(async {
        loop {
            match r.read(&mut sink).await {
                Ok(0) => panic!("clean EOF from a stopped agent"),
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    })
    .await;
    assert_cut_by_the_agent_stopping(&e);
    assert_cut_by_the_agent_stopping(&timed(writer).await.unwrap());
    timed(a.task).await.unwrap();
}

#[tokio::test]
async fn reconnects_after_the_agent_restarts_on_the_same_port() {
    let cert = QuicCert::generate(&[NAME.into()]).unwrap();
    let a = agent_with(v6(), cert.clone(), Duration::ZERO);
    let port = echo(v6()).await;
    let c = carrier(&a);
    let mut old = timed(c.open("localhost", port)).await.unwrap();
    old.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    timed(old.read_exact(&mut b)).await.unwrap();
    a.stop.cancel();
    timed(a.task).await.unwrap();
    let mut rest = Vec::new();
    assert!(timed(old.read_to_end(&mut rest)).await.is_err());

    let b = agent_with(a.addr, cert, Duration::ZERO);
    let got = timed(async {
        // The first attempts may still see the old connection's end; the carrier reconnects.
        loop {
            match c.open("localhost", port).await {
                Ok(s) => match round_trip(s, b"again".to_vec()).await {
                    Ok(got) => return got,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                },
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    assert_eq!(got, b"again");
    b.stop.cancel();
}

#[tokio::test]
async fn an_open_stream_survives_a_rebind_to_a_new_local_port() {
    let a = agent();
    let port = echo(v6()).await;
    let c = carrier(&a);
    let mut s = timed(c.open("localhost", port)).await.unwrap();
    let before = pattern(512 * 1024, 3);
    s.write_all(&before).await.unwrap();
    let mut got = vec![0u8; before.len()];
    timed(s.read_exact(&mut got)).await.unwrap();
    assert_eq!(sha(&got), sha(&before));

    let old_port = c.local_addr().unwrap().port();
    c.rebind(std::net::UdpSocket::bind(v6()).unwrap()).unwrap();
    assert_ne!(c.local_addr().unwrap().port(), old_port);

    let after = pattern(2 * 1024 * 1024, 4);
    let got = timed(round_trip(s, after.clone())).await.unwrap();
    assert_eq!(sha(&got), sha(&after));
}

#[tokio::test]
async fn ipv4_only_backend_and_ipv4_agent() {
    let a = agent_with(v4(), QuicCert::generate(&[]).unwrap(), Duration::ZERO);
    let port = echo(v4()).await;
    let c = QuicConnector::new(carrier(&a), "localhost", port).unwrap();
    assert_eq!(
        c.describe(),
        format!("{NAME} localhost:{port} (agent quic)")
    );
    timed(c.check()).await.unwrap();
    let got = timed(round_trip(
        timed(c.connect()).await.unwrap(),
        b"v4".to_vec(),
    ))
    .await
    .unwrap();
    assert_eq!(got, b"v4");
}

/// A CA and an agent certificate for NAME signed by it, as PEM files in `dir`.
fn ca_and_leaf(dir: &std::path::Path) -> (QuicCert, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![NAME.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key, ca_file) = (
        dir.join("agent.pem"),
        dir.join("agent.key"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    std::fs::write(&ca_file, ca.pem()).unwrap();
    (QuicCert::load(&cert, &key).unwrap(), ca_file)
}

#[tokio::test]
async fn ca_file_verification_accepts_the_right_ca_only() {
    let dir = std::env::temp_dir().join(format!("fwd-quic-ca-{}", std::process::id()));
    let (cert, ca_file) = ca_and_leaf(&dir);
    let (_, other_ca) = ca_and_leaf(&dir.join("other"));
    let a = agent_with(v6(), cert, Duration::ZERO);
    let port = echo(v6()).await;
    let good = carrier_with(&a, AgentVerify::CaFile(Some(ca_file.clone())), TOKEN);
    echo_via(&good, port, b"verified").await;
    let bad = carrier_with(&a, AgentVerify::CaFile(Some(other_ca)), TOKEN);
    let e = timed(bad.check()).await.unwrap_err().to_string();
    // Both test CAs have the same (empty) name, so the other one is taken for the issuer.
    assert_eq!(
        e,
        "certificate of agent agent.test is not trusted (its signature does not verify: issued \
         by another CA with the same name?); --ca-file must hold the CA that issued it; or pin \
         the agent's own certificate with --agent-pin sha256:... (printed by `forward agent \
         --quic`)"
    );

    // A CA of another name: the agent's issuer is unknown.
    let stranger = {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "a stranger's CA");
        let ca = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let path = dir.join("stranger.pem");
        std::fs::write(&path, ca.pem()).unwrap();
        path
    };
    let unknown = carrier_with(&a, AgentVerify::CaFile(Some(stranger)), TOKEN);
    let e = timed(unknown.check()).await.unwrap_err().to_string();
    assert_eq!(
        e,
        "certificate of agent agent.test is not trusted (unknown issuer); if it comes from a \
         private CA (a local edge, an agent's own --tls-cert), pass that CA with --ca-file; or \
         pin the agent's own certificate with --agent-pin sha256:... (printed by `forward \
         agent --quic`)"
    );

    // The right CA, the wrong name: worded as over TLS, not as rustls' debug output.
    let mut config = carrier_config(&a, AgentVerify::CaFile(Some(ca_file)), TOKEN);
    config.host = "other.test".into();
    let misnamed = QuicCarrier::new(config).unwrap();
    let e = timed(misnamed.check()).await.unwrap_err().to_string();
    assert_eq!(
        e,
        "certificate presented for agent other.test is not valid for that name (is --domain or \
         the host right?)"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn dropping_a_stream_without_shutdown_resets_the_backend() {
    let a = agent();
    let l = TcpListener::bind(v6()).await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (arrived, seen) = tokio::sync::oneshot::channel();
    let backend = tokio::spawn(async move {
        let (mut s, _): (TcpStream, _) = l.accept().await.unwrap();
        let mut first = [0u8; 14];
        s.read_exact(&mut first).await.unwrap();
        let _ = arrived.send(());
        let mut got = Vec::new();
        s.read_to_end(&mut got).await
    });
    let c = carrier(&a);
    let mut s = timed(c.open("localhost", port)).await.unwrap();
    s.write_all(b"half a message").await.unwrap();
    // Once the backend has the bytes, the drop is what ends the stream.
    timed(seen).await.unwrap();
    drop(s);
    let r = timed(backend).await.unwrap();
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
}

/// More streams than the connection's first receive window has stream windows for: 16 of
/// 16 MiB in 256 MiB. Each stream carries more than its window, so the ones not being read
/// fill theirs while the test reads the streams one after another.
const IN_ORDER_STREAMS: usize = 18;
const IN_ORDER_BYTES: usize = 17 * 1024 * 1024;

/// Reads `stream` to its end, failing if it stops moving for 30 s; returns the bytes' hash.
async fn hash_to_end<R: tokio::io::AsyncRead + Unpin>(mut stream: R, what: &str) -> Vec<u8> {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let (mut buf, mut total) = (vec![0u8; 256 * 1024], 0usize);
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what}: no byte for 30 s after {total}"))
            .unwrap_or_else(|e| panic!("{what}: {e} after {total}"));
        if n == 0 {
            return digest.finish().as_ref().to_vec();
        }
        digest.update(&buf[..n]);
        total += n;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_opened_together_and_read_one_by_one_all_finish() {
    // With the connection's window fixed at 16 stream windows, the 17th stream deadlocked
    // this: the unread streams took all the credit the read one gave back.
    let a = agent();
    let l = TcpListener::bind(v6()).await.unwrap();
    let port = l.local_addr().unwrap().port();
    let data = Arc::new(pattern(IN_ORDER_BYTES, 7));
    let source = data.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let source = source.clone();
            tokio::spawn(async move {
                s.write_all(&source).await?;
                s.shutdown().await
            });
        }
    });
    let c = carrier(&a);
    let mut streams = Vec::new();
    for _ in 0..IN_ORDER_STREAMS {
        streams.push(timed(c.open("localhost", port)).await.unwrap());
    }
    // Time for the unread streams to fill their windows.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (i, s) in streams.into_iter().enumerate() {
        assert_eq!(
            hash_to_end(s, &format!("download {i}")).await,
            sha(&data),
            "download {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_to_a_service_that_reads_one_connection_at_a_time_all_arrive() {
    // The same deadlock in the agent: a VM service that serves its connections one after
    // another, while the client uploads on all of them at once. The kernel buffers several
    // MiB of each connection the service has not reached yet (socket buffers at both ends), so
    // each upload carries that much more than a stream window, and a few more streams than
    // above make sure the unread ones can fill the connection's window.
    let a = agent();
    let l = TcpListener::bind(v6()).await.unwrap();
    let port = l.local_addr().unwrap().port();
    let data = Arc::new(pattern(IN_ORDER_BYTES + 24 * 1024 * 1024, 9));
    let c = carrier(&a);
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..IN_ORDER_STREAMS + 6 {
        let s = timed(c.open("localhost", port)).await.unwrap();
        let (r, mut w) = tokio::io::split(s);
        let data = data.clone();
        writers.push(tokio::spawn(async move {
            w.write_all(&data).await?;
            w.shutdown().await?;
            Ok::<_, io::Error>(w)
        }));
        readers.push(r);
    }
    // Every connection is open at the service before it starts reading the first.
    let mut accepted = Vec::new();
    while accepted.len() < writers.len() {
        accepted.push(timed(l.accept()).await.unwrap().0);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, mut s) in accepted.into_iter().enumerate() {
        let got = hash_to_end(&mut s, &format!("upload {i}")).await;
        assert_eq!(got, sha(&data), "upload {i}");
        s.shutdown().await.unwrap();
    }
    for (i, (w, mut r)) in writers.into_iter().zip(readers).enumerate() {
        let _w = timed(w)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("upload {i}: {e}"));
        let mut rest = Vec::new();
        timed(r.read_to_end(&mut rest)).await.unwrap();
        assert!(rest.is_empty(), "upload {i}: the service sent nothing");
    }
}

/// The test's runtime, and an agent on a runtime of its own: dropping that runtime kills the
/// agent outright (its tasks and socket vanish without a word to the client). The certificate
/// lets a successor keep the pin.
fn killable_agent() -> (
    tokio::runtime::Runtime,
    tokio::runtime::Runtime,
    QuicCert,
    Agent,
) {
    let main = tokio::runtime::Runtime::new().unwrap();
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let cert = QuicCert::generate(&[NAME.into()]).unwrap();
    let a = doomed.block_on(async { agent_with(v6(), cert.clone(), Duration::ZERO) });
    (main, doomed, cert, a)
}

/// A killed agent sends nothing; its successor on the same port (same token) answers the old
/// connection's packets with a stateless reset, so the client errors and reconnects at once
/// instead of waiting for the 30 s idle timeout.
#[test]
fn a_restarted_agent_resets_the_connections_of_a_killed_one() {
    let (main, doomed, cert, a) = killable_agent();
    let (addr, pin) = (a.addr, a.pin);
    let port = main.block_on(echo(v6()));
    let c = main.block_on(async { carrier(&a) });
    let mut old = main.block_on(async {
        let mut s = timed(c.open("localhost", port)).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        timed(s.read_exact(&mut b)).await.unwrap();
        s
    });
    // Killed: its tasks and socket vanish without a word to the client.
    drop(doomed);
    main.block_on(async {
        let b = agent_with(addr, cert, Duration::ZERO);
        assert_eq!(b.pin, pin);
        // Any packet of the old connection draws the successor's stateless reset, and the
        // client sends some (ACKs) by itself: the reset may already be in when this write
        // runs. The stream must fail with it on whichever call comes first.
        let e = match old.write_all(&[1u8; 4096]).await {
            Err(e) => e,
            Ok(()) => {
                let mut rest = Vec::new();
                timed(old.read_to_end(&mut rest)).await.unwrap_err()
            }
        };
        assert!(e.to_string().contains("reset by peer"), "{e}");
        echo_via(&c, port, b"after restart").await;
        b.stop.cancel();
    });
}

/// A carrier that reached an echo service once and then sat quiet for a second, and an agent
/// killed and restarted on the same port just now: the client has not heard of it yet.
fn restarted_behind_a_quiet_carrier() -> (tokio::runtime::Runtime, Arc<QuicCarrier>, u16, Agent) {
    let (main, doomed, cert, a) = killable_agent();
    let addr = a.addr;
    let port = main.block_on(echo(v6()));
    let c = main.block_on(async { carrier(&a) });
    main.block_on(async {
        echo_via(&c, port, b"before").await;
        // Quiet: no ACK of the old agent's last packets is left in flight.
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    drop(doomed);
    let b = main.block_on(async { agent_with(addr, cert, Duration::ZERO) });
    (main, c, port, b)
}

/// An agent killed and restarted while its client sat idle: the client's keepalive draws the
/// successor's stateless reset within seconds, so the first connection the user makes after
/// that goes out on a new QUIC connection instead of being reset on the forgotten one.
#[test]
fn after_an_agent_restart_the_first_new_connection_works() {
    let (main, c, port, b) = restarted_behind_a_quiet_carrier();
    main.block_on(async {
        // The user comes back a few seconds after the restart (one keepalive interval).
        tokio::time::sleep(Duration::from_secs(4)).await;
        echo_via(&c, port, b"after restart").await;
        b.stop.cancel();
    });
}

/// A stream opened right after an agent restart, before the client's next keepalive has drawn
/// the new agent's stateless reset: it goes out on the forgotten connection and the reset is
/// the only answer. The reset proves the agent never saw the stream, so it is opened again on
/// a new connection with what it had sent, and the user's connection works (13 of 25 restart
/// cycles reset it in a user's test).
#[test]
fn a_stream_sent_into_a_restarted_agent_is_replayed_on_a_new_connection() {
    let (main, c, port, b) = restarted_behind_a_quiet_carrier();
    main.block_on(async {
        for i in 0..3 {
            let msg = format!("right after the restart {i}");
            echo_via(&c, port, msg.as_bytes()).await;
        }
        b.stop.cancel();
    });
}

/// The other side of the replay: a stream the old agent had acknowledged (and delivered) is
/// never sent twice. Its connection's reset ends it with an error, and the service saw one
/// connection.
#[test]
fn a_stream_the_old_agent_saw_is_not_replayed() {
    let (main, doomed, cert, a) = killable_agent();
    let addr = a.addr;
    let (port, accepted) = main.block_on(async {
        let l = tokio::net::TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        (port, accepted)
    });
    let c = main.block_on(async { carrier(&a) });
    let mut s = main.block_on(async {
        let mut s = timed(c.open("localhost", port)).await.unwrap();
        s.write_all(b"once").await.unwrap();
        // The old agent acknowledges, dials and delivers.
        tokio::time::sleep(Duration::from_millis(500)).await;
        s
    });
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(doomed);
    main.block_on(async {
        let b = agent_with(addr, cert, Duration::ZERO);
        let outcome = timed(async {
            s.write_all(b"more").await?;
            let mut buf = [0u8; 16];
            s.read(&mut buf).await
        })
        .await;
        assert!(
            outcome.is_err(),
            "the stream survived its agent: {outcome:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the service saw the stream twice"
        );
        b.stop.cancel();
    });
}

/// An agent that died and stays away: its connection falls silent. A stream opened later must
/// not be sent into the silence for the 30 s idle timeout: the connection is given up after
/// `--connect-timeout` and the error says the agent does not answer; once it is back, streams
/// work again.
#[test]
fn a_stream_on_a_silent_connection_fails_fast_and_the_next_one_reconnects() {
    let (main, doomed, cert, a) = killable_agent();
    let addr = a.addr;
    let port = main.block_on(echo(v6()));
    let c = main.block_on(async {
        let mut cfg = carrier_config(&a, AgentVerify::Pin(a.pin), TOKEN);
        cfg.connect_timeout = Duration::from_secs(1);
        let c = QuicCarrier::new(cfg).unwrap();
        echo_via(&c, port, b"before").await;
        c
    });
    drop(doomed);
    main.block_on(async {
        // Past the 7 s a live agent never stays silent for.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let started = std::time::Instant::now();
        let attempt = async {
            let s = c.open("localhost", port).await?;
            round_trip(s, b"into the silence".to_vec())
                .await
                .map_err(forward_tunnel::quic::QuicError::Io)
        };
        let e = tokio::time::timeout(Duration::from_secs(15), attempt)
            .await
            .expect("the stream waited for the idle timeout")
            .expect_err("no agent there");
        // Refused before it opens (the connection looked silent), or cut a moment after (it
        // heard nothing once open: under load the silence can be noticed late).
        let e = e.to_string();
        assert!(
            e.contains("no QUIC answer")
                || e.contains("nothing listens on UDP port")
                || e.contains("connection to the agent lost"),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(15));

        let b = agent_with(addr, cert, Duration::ZERO);
        let got = timed(async {
            loop {
                // The failed reconnect holds off the next attempt for a moment.
                match c.open("localhost", port).await {
                    Ok(s) => return round_trip(s, b"after".to_vec()).await.unwrap(),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        })
        .await;
        assert_eq!(got, b"after");
        b.stop.cancel();
    });
}

/// A stream opened the moment the agent vanished (the connection was busy a moment ago, so
/// nothing looks silent yet) hears nothing back: the connection is closed after about
/// `--connect-timeout` and the stream fails then, not at the 30 s idle timeout.
#[test]
fn a_stream_opened_as_the_agent_vanishes_fails_after_the_connect_timeout() {
    let (main, doomed, _cert, a) = killable_agent();
    let port = main.block_on(echo(v6()));
    let c = main.block_on(async {
        let mut cfg = carrier_config(&a, AgentVerify::Pin(a.pin), TOKEN);
        cfg.connect_timeout = Duration::from_secs(2);
        let c = QuicCarrier::new(cfg).unwrap();
        echo_via(&c, port, b"before").await;
        c
    });
    drop(doomed);
    main.block_on(async {
        let started = std::time::Instant::now();
        let attempt = async {
            let s = c.open("localhost", port).await?;
            round_trip(s, b"into the void".to_vec())
                .await
                .map_err(forward_tunnel::quic::QuicError::Io)
        };
        let outcome = tokio::time::timeout(Duration::from_secs(20), attempt).await;
        let took = started.elapsed();
        outcome
            .expect("the stream waited for the idle timeout")
            .expect_err("no agent there");
        // 2 s for an answer, checked once a second; far from the 30 s idle timeout.
        assert!(took < Duration::from_secs(8), "failed after {took:?}");
    });
}

/// With the agent unreachable and no connection up, local connections that arrive while one
/// attempt runs all get its failure, and none waits out a backoff: before, one of them failed
/// per connect timeout and the rest piled up (thousands of descriptors in a user's outage).
#[test]
fn connections_waiting_on_a_dead_agent_all_fail_with_the_one_attempt() {
    let (main, doomed, _cert, a) = killable_agent();
    let c = main.block_on(async {
        let mut cfg = carrier_config(&a, AgentVerify::Pin(a.pin), TOKEN);
        cfg.connect_timeout = Duration::from_secs(1);
        Arc::new(QuicCarrier::new(cfg).unwrap())
    });
    drop(doomed);
    main.block_on(async {
        let started = std::time::Instant::now();
        let mut opens = Vec::new();
        for _ in 0..8 {
            let c = c.clone();
            opens.push(tokio::spawn(async move {
                c.open("localhost", 9).await.map(drop)
            }));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for o in opens {
            let e = tokio::time::timeout(Duration::from_secs(30), o)
                .await
                .expect("an open still waiting after 30 s")
                .unwrap()
                .expect_err("no agent there");
            // Its port closed: said at once (one still bound: at the connect timeout).
            let e = e.to_string();
            assert!(
                e.contains("nothing listens on UDP port") || e.contains("no QUIC answer"),
                "{e}"
            );
        }
        let took = started.elapsed();
        // One attempt of 1 s, shared; one by one they took 8 attempts plus backoffs.
        assert!(
            took < Duration::from_secs(4),
            "8 opens failed after {took:?}"
        );
    });
}

/// A lost connection is replaced in the background, as the TCP carriers' is: after an agent
/// restart, the carrier is connected again without waiting for a local connection.
#[test]
fn a_lost_connection_is_redialled_in_the_background() {
    let (main, doomed, cert, a) = killable_agent();
    let addr = a.addr;
    let c = main.block_on(async {
        let c = carrier(&a);
        timed(c.check()).await.unwrap();
        assert!(c.connected().await);
        // Quiet before the kill, as in `after_an_agent_restart_the_first_new_connection_works`.
        tokio::time::sleep(Duration::from_secs(1)).await;
        c
    });
    drop(doomed);
    main.block_on(async {
        let b = agent_with(addr, cert, Duration::ZERO);
        // The keepalive (3 s) draws the successor's stateless reset; the redial follows.
        let back = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if c.connected().await {
                    return;
                }
            }
        });
        // Right after the kill the old connection still counts as up: wait for the loss first.
        tokio::time::sleep(Duration::from_secs(5)).await;
        back.await
            .expect("reconnected with no local connection asking");
        assert_eq!(c.connections().await, 1);
        b.stop.cancel();
    });
}

/// Closing (Ctrl-C, the end of `forward stdio`) does not wait behind a connect in progress,
/// which can take the whole connect timeout when the agent is gone (a background redial).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_does_not_wait_for_a_connect_in_progress() {
    let free = std::net::UdpSocket::bind(v6()).unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let pin = QuicCert::generate(&[]).unwrap().pin().unwrap();
    let mut cfg = QuicCarrierConfig::new(NAME, port, AgentVerify::Pin(pin), token(TOKEN));
    cfg.edge = Some("::1".into());
    cfg.bind = v6();
    cfg.connect_timeout = Duration::from_secs(20);
    let c = QuicCarrier::new(cfg).unwrap();
    let connecting = tokio::spawn({
        let c = c.clone();
        async move { c.check().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::time::timeout(Duration::from_secs(5), c.close())
        .await
        .expect("close waited for the connect in progress");
    connecting.abort();
}

#[tokio::test]
async fn a_quic_server_with_another_alpn_is_named_as_such() {
    // Not a forward agent: some other QUIC service with the same certificate.
    let cert = QuicCert::generate(&[NAME.into()]).unwrap();
    let pin = cert.pin().unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(cert.chain().to_vec(), cert.key().clone_key())
    .unwrap();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap(),
    ));
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        std::net::UdpSocket::bind(v6()).unwrap(),
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let accept = tokio::spawn(async move {
        while let Some(i) = endpoint.accept().await {
            let _ = i.await;
        }
    });
    let mut c = QuicCarrierConfig::new(NAME, addr.port(), AgentVerify::Pin(pin), token(TOKEN));
    c.edge = Some(addr.ip().to_string());
    c.bind = v6();
    let e = timed(QuicCarrier::new(c).unwrap().check())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not speak forward-mux/1"), "{e}");
    accept.abort();
}

/// Nothing on the UDP port: the kernel's "port unreachable" says so at once (quinn's own
/// socket never hears it). A socket that takes the datagrams and never answers (a firewall
/// that drops them looks the same) is a clear timeout.
#[tokio::test]
async fn no_agent_listening_is_said_at_once_and_a_silent_one_times_out() {
    let carrier_to = |port: u16| {
        let pin = QuicCert::generate(&[]).unwrap().pin().unwrap();
        let mut c = QuicCarrierConfig::new(NAME, port, AgentVerify::Pin(pin), token(TOKEN));
        c.edge = Some("::1".into());
        c.bind = v6();
        c.connect_timeout = Duration::from_secs(5);
        QuicCarrier::new(c).unwrap()
    };
    let free = std::net::UdpSocket::bind(v6()).unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let carrier = carrier_to(port);
    let started = std::time::Instant::now();
    let e = timed(carrier.check()).await.unwrap_err().to_string();
    assert!(
        e.contains(&format!("nothing listens on UDP port {port}")) && e.contains("--quic"),
        "{e}"
    );
    // Not the 5 s connect timeout: a refusal comes back within milliseconds.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let c = QuicConnector::new(carrier, "localhost", 5432).unwrap();
    let e = timed(c.connect()).await.unwrap_err().to_string();
    assert!(e.contains("nothing listens on UDP port"), "{e}");

    let silent = std::net::UdpSocket::bind(v6()).unwrap();
    let port = silent.local_addr().unwrap().port();
    let e = timed(carrier_to(port).check())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no QUIC answer from agent agent.test"), "{e}");
    assert!(e.contains(&format!("UDP port {port}")), "{e}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_lets_open_streams_finish_and_refuses_new_ones() {
    let a = agent_with(
        v6(),
        QuicCert::generate(&[NAME.into()]).unwrap(),
        Duration::from_secs(60),
    );
    let port = echo(v6()).await;
    let c = carrier(&a);
    let mut open = timed(c.open("localhost", port)).await.unwrap();
    open.write_all(b"before stop").await.unwrap();
    let mut b = [0u8; 11];
    timed(open.read_exact(&mut b)).await.unwrap();
    a.stop.cancel();

    // New streams are refused while the old one drains; the refusal says why.
    let refused = timed(async {
        loop {
            match c.open("localhost", port).await {
                Ok(mut s) => {
                    let mut buf = Vec::new();
                    let ended = match s.shutdown().await {
                        Ok(()) => s.read_to_end(&mut buf).await.map(drop),
                        Err(e) => Err(e),
                    };
                    match ended {
                        Err(e) => return e.to_string(),
                        // Opened before the agent noticed the stop: an ordinary stream.
                        Ok(()) => continue,
                    }
                }
                Err(e) => return e.to_string(),
            }
        }
    })
    .await;
    assert!(
        refused.contains("shutting down") || refused.contains("refused"),
        "{refused}"
    );

    let tail = pattern(1024 * 1024, 5);
    timed(open.write_all(&tail)).await.unwrap();
    timed(open.shutdown()).await.unwrap();
    let mut got = Vec::new();
    timed(open.read_to_end(&mut got)).await.unwrap();
    assert_eq!(sha(&got), sha(&tail));
    drop(open);
    timed(a.task).await.unwrap();
}

/// A stream opened as the agent stops reaches the agent that takes over (`--handover`: the
/// old one drains while the new one waits for the UDP port). The old agent refuses it
/// unprocessed (`GOING_AWAY`); the client opens it again on a new connection, tried again and
/// again while the port changes hands, and sends what it had sent. A tester lost a few
/// connections at every QUIC restart, which TCP and TLS carriers already carried through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refused_by_a_stopping_agent_reaches_the_one_that_takes_over() {
    let cert = QuicCert::generate(&[NAME.into()]).unwrap();
    let (cert_pem, key_pem) = cert.to_pem();
    let old = agent_with(v6(), cert, Duration::from_secs(2));
    let port = echo(v6()).await;
    let mut config = carrier_config(&old, AgentVerify::Pin(old.pin), TOKEN);
    config.connect_timeout = Duration::from_secs(30);
    let c = QuicCarrier::new(config).unwrap();
    // An open stream keeps the old agent draining (its 2 s grace): the port stays taken.
    let mut held = timed(c.open("localhost", port)).await.unwrap();
    held.write_all(b"held").await.unwrap();
    let mut b = [0u8; 4];
    timed(held.read_exact(&mut b)).await.unwrap();
    old.stop.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The client has heard nothing yet: this goes out on the stopping agent's connection.
    let msg = b"opened as the agent stopped".to_vec();
    let stream = timed(c.open("localhost", port)).await.unwrap();
    let trip = tokio::spawn(round_trip(stream, msg.clone()));

    // The new agent, once the old one has exited and its socket is gone.
    timed(old.task).await.unwrap();
    let (stop, task) = successor(old.addr, &cert_pem, &key_pem).await;

    let got = timed(trip).await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got, msg);
    // The held stream was cut at the end of the old agent's drain, and says so.
    let mut rest = Vec::new();
    assert_cut_by_the_agent_stopping(&timed(held.read_to_end(&mut rest)).await.unwrap_err());
    echo_via(&c, port, b"and after").await;
    stop.cancel();
    timed(task).await.unwrap();
}

/// After an agent stopped for good (its drain over, its connections closed), a connection made
/// before the next one is up waits for it, up to the connect timeout, instead of failing at
/// once; the background redial failing meanwhile does not fail it fast either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_while_the_agent_restarts_waits_for_the_new_one() {
    let cert = QuicCert::generate(&[NAME.into()]).unwrap();
    let (cert_pem, key_pem) = cert.to_pem();
    let old = agent_with(v6(), cert, Duration::ZERO);
    let port = echo(v6()).await;
    let mut config = carrier_config(&old, AgentVerify::Pin(old.pin), TOKEN);
    config.connect_timeout = Duration::from_secs(30);
    let c = QuicCarrier::new(config).unwrap();
    echo_via(&c, port, b"before the stop").await;
    old.stop.cancel();
    timed(old.task).await.unwrap();
    // The client hears the close; its redial finds nothing there.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let trip = tokio::spawn({
        let c = c.clone();
        async move { echo_via(&c, port, b"during the restart").await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !trip.is_finished(),
        "the connection did not wait for the new agent"
    );
    let (stop, task) = successor(old.addr, &cert_pem, &key_pem).await;
    timed(trip).await.unwrap();
    stop.cancel();
    timed(task).await.unwrap();
}

/// A new agent on `addr` with the certificate of the one before (so the pin holds), bound
/// as soon as the port is free.
async fn successor(
    addr: SocketAddr,
    cert_pem: &str,
    key_pem: &str,
) -> (CancellationToken, JoinHandle<()>) {
    let dir = std::env::temp_dir().join(format!(
        "fwd-quic-successor-{}-{}",
        std::process::id(),
        addr.port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert_pem).unwrap();
    std::fs::write(&key_file, key_pem).unwrap();
    let cert = QuicCert::load(&cert_file, &key_file).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = QuicAgentConfig::new(0, cert, token(TOKEN));
    config.listen = addr;
    let agent = timed(async {
        loop {
            match QuicAgent::bind(config.clone()) {
                Ok(a) => break a,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { agent.run(stop).await.unwrap() }
    });
    (stop, task)
}

/// Rough loopback numbers for one stream (not an assertion; the bench harness owns speed):
/// `cargo test -p forward-tunnel --test quic -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn throughput_probe() {
    const TOTAL: usize = 512 * 1024 * 1024;
    let sink = TcpListener::bind(v6()).await.unwrap();
    let port = sink.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = sink.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let n = tokio::io::copy(&mut s, &mut tokio::io::sink())
                    .await
                    .unwrap();
                s.write_all(&n.to_be_bytes()).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    let chunk = vec![0x5au8; 256 * 1024];
    let send = |mut s: Box<dyn forward_tunnel::Endpoint>| {
        let chunk = chunk.clone();
        async move {
            let t = std::time::Instant::now();
            let mut sent = 0;
            while sent < TOTAL {
                s.write_all(&chunk).await.unwrap();
                sent += chunk.len();
            }
            s.shutdown().await.unwrap();
            let mut n = [0u8; 8];
            s.read_exact(&mut n).await.unwrap();
            assert_eq!(u64::from_be_bytes(n), TOTAL as u64);
            (TOTAL as f64 / t.elapsed().as_secs_f64()) / 1e6
        }
    };
    let tcp = TcpStream::connect(("::1", port)).await.unwrap();
    let raw = send(Box::new(tcp)).await;
    let a = agent();
    let c = carrier(&a);
    let q = send(Box::new(c.open("localhost", port).await.unwrap())).await;
    eprintln!("one stream, loopback: raw TCP {raw:.0} MB/s, QUIC {q:.0} MB/s");
    if std::env::var_os("QUIC_STATS").is_some() {
        let st = c.connection().await.unwrap().stats();
        eprintln!(
            "udp tx {:?} rx {:?} path: mtu {} cwnd {} lost {} congestion events {}",
            st.udp_tx,
            st.udp_rx,
            st.path.current_mtu,
            st.path.cwnd,
            st.path.lost_packets,
            st.path.congestion_events
        );
    }
}

/// A UDP relay in front of `agent` that drops every datagram both ways while `frozen`: an
/// agent paused (SIGSTOP) or a path that stops carrying packets for a while.
async fn freezable_relay(agent: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    // The agent's port number, on the other loopback: the client's proof covers the port.
    let front = tokio::net::UdpSocket::bind(("127.0.0.1", agent.port()))
        .await
        .unwrap();
    let front = Arc::new(front);
    let back = Arc::new(tokio::net::UdpSocket::bind(v6()).await.unwrap());
    back.connect(agent).await.unwrap();
    let addr = front.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let client = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    tokio::spawn({
        let (front, back, frozen, client) =
            (front.clone(), back.clone(), frozen.clone(), client.clone());
        async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap() = Some(from);
                if !frozen.load(Ordering::SeqCst) {
                    let _ = back.send(&buf[..n]).await;
                }
            }
        }
    });
    tokio::spawn({
        let frozen = frozen.clone();
        async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = back.recv(&mut buf).await {
                let to = *client.lock().unwrap();
                if let (false, Some(to)) = (frozen.load(Ordering::SeqCst), to) {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        }
    });
    (addr, frozen)
}

/// An agent that answered a stream and then went quiet for a while (paused, a path hiccup)
/// keeps the connection until the idle timeout: only a stream that heard nothing at all is
/// proof of a dead path. A tester's download was reset 10 s into a 15 s SIGSTOP because an
/// echo stream had opened, and been answered, a second before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_answered_before_a_pause_does_not_cost_the_connection() {
    use std::sync::atomic::Ordering;
    let a = agent();
    let port = echo(v6()).await;
    let (relay, frozen) = freezable_relay(a.addr).await;
    let mut cfg = QuicCarrierConfig::new(NAME, relay.port(), AgentVerify::Pin(a.pin), token(TOKEN));
    cfg.edge = Some(relay.ip().to_string());
    cfg.bind = v4();
    // The wait for an answer is then its floor, 4 s.
    cfg.connect_timeout = Duration::from_secs(1);
    let c = QuicCarrier::new(cfg).unwrap();
    let mut held = timed(c.open("localhost", port)).await.unwrap();
    held.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    timed(held.read_exact(&mut got)).await.unwrap();
    frozen.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(7)).await;
    frozen.store(false, Ordering::SeqCst);
    held.write_all(b"pong").await.unwrap();
    timed(held.read_exact(&mut got))
        .await
        .expect("the stream outlived the pause");
    assert_eq!(&got, b"pong");
}
