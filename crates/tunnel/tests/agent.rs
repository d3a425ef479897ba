//! The agent under attack and under load, over real loopback sockets: one carrier with 1000
//! streams and a stalled reader, authentication failures and replays, malformed input at every
//! layer, an agent that dies or drains, a carrier that goes silent, a flood of silent
//! connections, and targets inside and outside the loopback policy.
//!
//! Bytes are compared by SHA-256; nothing asserts a duration (deadlines are generous and only
//! bound how long a broken build takes to fail).

#[path = "agent/closed_port.rs"]
mod closed_port;
#[path = "agent/full_queue.rs"]
mod full_queue;
#[path = "agent/malformed.rs"]
mod malformed;
mod stall;
#[path = "agent/support.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use forward_mux::frame::{FrameType, Header};
use forward_mux::{ErrorCode, Frame};
use forward_tunnel::agent::{Agent, AgentConfig};
use forward_tunnel::agent_client::{AgentConnector, AgentLink, CarrierTransport};
use forward_tunnel::auth::{AgentNames, Token};
use forward_tunnel::{relay, Connector};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// Reads until EOF or error; returns what arrived and how it ended.
async fn drain<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> (Vec<u8>, std::io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

// ----- 1. many streams, one stalled reader --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_streams_complete_while_one_reader_stalls() {
    const STREAMS: u64 = 999;
    const EACH: usize = 64 * 1024;
    const HOSE: usize = 16 << 20;
    let agent = start_agent(|_| {});
    let echo = echo_server("[::1]:0").await;
    let (hose, hose_written) = firehose_server(HOSE, 4242).await;
    let link = AgentLink::new(link_config(agent.addr, token()));
    let echo_c = Arc::new(connector(&link, "", echo.port()));
    let hose_c = connector(&link, "", hose.port());

    // The stalled stream: opened, never read until the others are done.
    let mut stalled = hose_c.connect().await.expect("opening the stalled stream");
    within(
        "the firehose to push 1 MiB toward the stalled stream",
        async {
            while hose_written.load(Ordering::Relaxed) < 1 << 20 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        },
    )
    .await;

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..STREAMS {
        let c = echo_c.clone();
        tasks.spawn(async move { (i, echo_round_trip(&c, i, EACH).await) });
    }
    let mut failures = Vec::new();
    while let Some(r) = within("999 echo streams", tasks.join_next()).await {
        let (i, r) = r.expect("stream task");
        if let Err(e) = r {
            failures.push(format!("stream {i}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    // The receiver holds no more for the stalled stream than its window allows, however much
    // the target still has queued for it.
    let (buffered, window) = stalled.receive_backlog().expect("stalled stream is live");
    assert!(
        buffered <= window as usize && window <= forward_mux::Config::default().stream_window,
        "stalled stream buffers {buffered} bytes with a window of {window}"
    );
    assert!(
        hose_written.load(Ordering::Relaxed) >= 1 << 20,
        "the firehose should still have a backlog"
    );

    // Nothing was lost while it stalled.
    let (got, end) = within("the stalled stream to drain", drain(&mut stalled)).await;
    end.expect("stalled stream ends cleanly");
    assert_eq!(got.len(), HOSE);
    assert_eq!(sha256(&got), sha256(&pattern(4242, HOSE)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_avoids_a_carrier_that_stalled_readers_filled() {
    // 300 streams whose readers never read, with 512 KiB behind each: their 256 KiB windows
    // (75 MiB) hold more than the 64 MiB connection window, so the carrier can deliver nothing
    // more to any stream. A connection opened then must go on another carrier, not wait there.
    const STALLED: usize = 300;
    let agent = start_agent(|_| {});
    let echo = echo_server("[::1]:0").await;
    let (hose, _) = firehose_server(512 * 1024, 7).await;
    let link = AgentLink::new(link_config(agent.addr, token()));
    let hose_c = connector(&link, "", hose.port());
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        stalled.push(within("a stalled stream", hose_c.connect()).await.unwrap());
    }
    let window = u64::from(forward_mux::Config::default().connection_window);
    within("the stalled streams to fill the connection window", async {
        loop {
            let held: u64 = stalled
                .iter()
                .filter_map(|s| s.receive_backlog())
                .map(|(buffered, _)| buffered as u64)
                .sum();
            if held >= window {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    echo_on_an_overflow_carrier(
        &link,
        echo.port(),
        11,
        "local readers that stopped reading hold its window",
    )
    .await;
    // What a stalled stream holds is intact. (Its rest does not follow while the others stay
    // stalled: the credit it frees goes, round-robin, to those whose windows are not full.)
    let (held, _) = stalled[0]
        .receive_backlog()
        .expect("the stalled stream is live");
    let mut got = vec![0u8; held];
    within("a stalled stream's bytes", stalled[0].read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(sha256(&got), sha256(&pattern(7, 512 * 1024)[..held]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_opened_together_and_read_one_by_one_all_finish() {
    // A client that handles its connections in order: 320 downloads open on one carrier, read
    // one after another. Those not read yet fill their 256 KiB windows, 80 MiB between them,
    // more than the 64 MiB connection window. Until session 27 they took all of it and the
    // download being read got no byte more (1000 such downloads stopped after 4.9 MiB).
    const STREAMS: usize = 320;
    const EACH: usize = 768 * 1024;
    let agent = start_agent(|_| {});
    let (hose, _) = firehose_server(EACH, 13).await;
    let link = AgentLink::new(link_config(agent.addr, token()));
    let hose_c = connector(&link, "", hose.port());
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        streams.push(within("a download", hose_c.connect()).await.unwrap());
    }
    assert_eq!(
        link.carrier_count().await,
        1,
        "every download on one carrier"
    );
    let window = forward_mux::Config::default().connection_window as usize;
    within(
        "the downloads not read to fill the connection window",
        async {
            while streams
                .iter()
                .filter_map(|s| s.receive_backlog())
                .map(|(buffered, _)| buffered)
                .sum::<usize>()
                < window
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    let want = sha256(&pattern(13, EACH));
    for (i, mut s) in streams.into_iter().enumerate() {
        let (got, end) = within(&format!("download {i}"), drain(&mut s)).await;
        end.unwrap_or_else(|e| panic!("download {i}: {e}"));
        assert_eq!(got.len(), EACH, "download {i}");
        assert_eq!(sha256(&got), want, "download {i}");
    }
}

/// The primary carrier is full for the reason `full` names, so a new connection's 1 MiB echo
/// goes on another carrier and comes back intact.
async fn echo_on_an_overflow_carrier(link: &Arc<AgentLink>, echo_port: u16, seed: u64, full: &str) {
    let primary = link.carrier().await.unwrap();
    assert_eq!(primary.full(), Some(full));
    within(
        "a new connection beside stalled streams",
        echo_round_trip(&connector(link, "", echo_port), seed, 1 << 20),
    )
    .await
    .expect("a new connection beside stalled streams");
    assert!(
        link.carrier_count().await >= 2,
        "it went on another carrier"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_avoids_a_carrier_that_stalled_uploads_filled() {
    // The mirror of the test above, on the agent's side: uploads to a VM service that never
    // reads. Each holds up to its 256 KiB window in the agent, partly in the session and partly
    // in its relay; 600 of them leave the agent's 64 MiB connection window full, and the
    // carrier can take no byte for any stream (a new connection got none in 60 s). The client
    // cannot see the agent's memory, only that the agent stopped returning connection credit:
    // a connection opened then must go on another carrier, not wait behind them.
    const STALLED: usize = 600;
    let agent = start_agent(|_| {});
    let echo = echo_server("[::1]:0").await;
    let deaf = stall::deaf_server().await;
    let link = AgentLink::new(link_config(agent.addr, token()));
    let deaf_c = connector(&link, "", deaf.port());
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut uploads = Vec::new();
    for _ in 0..STALLED {
        let s = within("a stalled upload", deaf_c.connect()).await.unwrap();
        uploads.push(stall::upload(s, Some(1 << 20), written.clone()));
    }
    let stuck = stall::settled(&written).await;
    assert!(
        stuck >= u64::from(forward_mux::Config::default().connection_window),
        "only {stuck} bytes went out before the uploads stalled: the agent's window is not full"
    );
    echo_on_an_overflow_carrier(
        &link,
        echo.port(),
        12,
        "the agent holds most of its window (VM services not reading)",
    )
    .await;
    for u in uploads {
        u.abort();
    }
}

// ----- 2. tokens ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_is_rejected_while_a_good_client_keeps_working() {
    let agent = start_agent(|_| {});
    let echo = echo_server("[::1]:0").await;
    let good_link = AgentLink::new(link_config(agent.addr, token()));
    let good = Arc::new(connector(&good_link, "", echo.port()));
    good.check().await.expect("good token authenticates");

    let busy = {
        let good = good.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                echo_round_trip(&good, 100 + i, 256 * 1024).await?;
            }
            Ok::<_, String>(())
        })
    };

    let bad_token = Token::new(OTHER_TOKEN_HEX, "test").unwrap();
    let bad_link = AgentLink::new(link_config(agent.addr, bad_token.clone()));
    let bad = connector(&bad_link, "", echo.port());
    let e = bad
        .check()
        .await
        .expect_err("a wrong token must fail --check")
        .to_string();
    assert!(
        e.contains("authentication rejected") && e.contains("token"),
        "check error should say why: {e}"
    );

    // Without --check, the first connection learns the same reason: streams go only on a
    // carrier the agent has accepted (one round trip for a new carrier's first connection).
    let (target, dialled) = counted_echo_server("[::1]:0").await;
    let bad_link = AgentLink::new(link_config(agent.addr, bad_token));
    let bad = connector(&bad_link, "", target.port());
    let e = match within("the rejected connect", bad.connect()).await {
        Ok(_) => panic!("a connect over a rejected carrier must fail"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("authentication rejected"), "{e}");
    // Nothing was dialled for the rejected client.
    assert_eq!(
        dialled.load(Ordering::SeqCst),
        0,
        "the agent dialled for a rejected client"
    );

    within("the good client", busy)
        .await
        .unwrap()
        .expect("good client round trips");
    echo_round_trip(&good, 999, 1024)
        .await
        .expect("good client after the bad ones");
}

/// A GOAWAY(PROTOCOL_ERROR) before AUTH_OK (an agent of another version that cannot read what
/// this client sends) fails the connect at once, saying so, instead of being retried as if the
/// agent were busy until the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_error_before_auth_is_not_retried() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if forward_tunnel::upgrade::read_head(&mut s).await.is_err() {
                    return;
                }
                let hello = forward_tunnel::upgrade::switching(&"ab".repeat(32), &"c".repeat(32));
                if s.write_all(hello.as_bytes()).await.is_err() {
                    return;
                }
                // The AUTH, which this agent cannot read.
                let mut auth = [0u8; 16];
                if s.read_exact(&mut auth).await.is_err() {
                    return;
                }
                let mut out = Vec::new();
                forward_mux::frame::encode_goaway(
                    &mut out,
                    0,
                    ErrorCode::ProtocolError,
                    "unknown frame type 0x42",
                );
                let _ = s.write_all(&out).await;
                let _ = s.shutdown().await;
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            });
        }
    });
    let link = AgentLink::new(link_config(addr, token()));
    let e = within("the refused check", connector(&link, "", 5432).check())
        .await
        .expect_err("a carrier closed with PROTOCOL_ERROR must fail the check")
        .to_string();
    assert!(
        e.contains("protocol error")
            && e.contains("unknown frame type 0x42")
            && e.contains("same version"),
        "{e}"
    );
    assert!(!e.contains("it had said"), "the reason is given twice: {e}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the carrier was retried"
    );
}

#[test]
fn missing_unreadable_and_weak_tokens_are_refused_without_leaking_them() {
    let dir = std::env::temp_dir().join(format!("forward-agent-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let weak_file = dir.join("weak-token");
    std::fs::write(&weak_file, "hunter2\n").unwrap();
    let e = Token::load(Some(&weak_file)).unwrap_err().to_string();
    assert!(e.contains("too weak") && e.contains("128 bits"), "{e}");
    assert!(!e.contains("hunter2"), "the token leaked: {e}");

    let missing = dir.join("no-such-token");
    let e = Token::load(Some(&missing)).unwrap_err().to_string();
    assert!(
        e.contains("cannot read token file") && e.contains("no-such-token"),
        "{e}"
    );

    let good_file = dir.join("good-token");
    std::fs::write(&good_file, format!("{TOKEN_HEX}\n")).unwrap();
    let t = Token::load(Some(&good_file)).expect("a 256-bit token file loads");
    assert!(!format!("{t:?}").contains(TOKEN_HEX));
    if std::env::var_os(forward_tunnel::auth::TOKEN_ENV).is_none() {
        let e = Token::load(None).unwrap_err().to_string();
        assert!(e.contains("no token") && e.contains("--token-file"), "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_names_refuses_proofs_made_for_another_name() {
    // The agent answers to vm1.vm.test only. A client that dialled vm2.vm.test made its proof
    // for that name: refused, as one relayed from vm2's client by a party in the middle would
    // be (both agents share the token).
    let agent = start_agent(|c| c.names = AgentNames::new(&["vm1.vm.test"]));
    let echo = echo_server("[::1]:0").await;
    let dial = |name: &str| {
        let mut config = link_config(agent.addr, token());
        config.host = name.to_owned();
        config.edge = Some(agent.addr.ip().to_string());
        AgentLink::new(config)
    };
    let own = dial("VM1.vm.test.");
    echo_round_trip(&connector(&own, "", echo.port()), 5, 100_000)
        .await
        .expect("a proof for the agent's own name");
    let other = dial("vm2.vm.test");
    let e = connector(&other, "", echo.port())
        .check()
        .await
        .expect_err("a proof for another name")
        .to_string();
    assert!(e.contains("authentication rejected"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_backs_off_instead_of_hammering_the_agent() {
    let agent = start_agent(|_| {});
    let proxy = Proxy::start(agent.addr).await;
    let bad_token = Token::new(OTHER_TOKEN_HEX, "test").unwrap();
    let bad = AgentLink::new(link_config(proxy.addr, bad_token));
    let c = connector(&bad, "", 9);
    assert!(c.check().await.is_err());
    // A user connection right after the rejection is told why, without a new carrier.
    let e = c
        .connect()
        .await
        .expect_err("no new carrier within a second of a rejection");
    assert!(e.to_string().contains("authentication rejected"), "{e}");
    // Exponential backoff from 200 ms allows about five attempts in 5 s (fewer on a slow
    // machine, never more); reconnecting at the base rate would make 25.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let carriers = proxy.clients.lock().unwrap().len();
    assert!(
        carriers <= 10,
        "{carriers} carriers within 5 s for a wrong token"
    );
}

/// An agent that accepts the proof and then drops every carrier (a crash loop, an
/// incompatible build) is redialled with a growing backoff, as one that refuses the token is:
/// a tester's client made four carriers a second, for ever, each with a "carrier up" line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carriers_dropped_right_after_auth_are_redialled_with_backoff() {
    let agent = start_agent(|_| {});
    let echo = echo_server("[::1]:0").await;
    let proxy = Proxy::start_cutting(agent.addr, Duration::from_millis(400)).await;
    let link = AgentLink::new(link_config(proxy.addr, token()));
    connector(&link, "", echo.port())
        .check()
        .await
        .expect("each carrier authenticates before it is cut");
    tokio::time::sleep(Duration::from_secs(8)).await;
    // Redialled 0.1-0.3 s after each loss, as before, that is 11 carriers or more; the doubling
    // pauses (0.2-0.6 s, then 0.4-1.2 s, ...) allow 5.
    let carriers = proxy.clients.lock().unwrap().len();
    assert!(
        (3..=7).contains(&carriers),
        "{carriers} carriers in 8 s to an agent that drops each"
    );
}

// 3. replayed AUTH and 4. malformed input: agent/malformed.rs

// ----- 5. health ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_without_auth_and_other_paths_are_404() {
    let agent = start_agent(|_| {});
    let answer = http(agent.addr, b"GET /health HTTP/1.1\r\nHost: vm\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok\n"), "{answer}");
    // A probe's query string asks the same question.
    let tagged = http(
        agent.addr,
        b"GET /health?from=lb HTTP/1.1\r\nHost: vm\r\n\r\n",
    )
    .await;
    assert!(tagged.starts_with("HTTP/1.1 200"), "{tagged}");
    // Lines ended by LF alone (`printf ... | nc`) are answered, not left to the deadline.
    let bare = http(agent.addr, b"GET /health HTTP/1.1\nHost: vm\n\n").await;
    assert!(
        bare.starts_with("HTTP/1.1 200") && bare.ends_with("ok\n"),
        "{bare}"
    );
    let head = http(agent.addr, b"HEAD /health HTTP/1.1\r\nHost: vm\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("Content-Length: 3\r\n"), "{head}");
    assert!(
        head.ends_with("\r\n\r\n"),
        "HEAD answered with a body: {head:?}"
    );
    for req in [
        &b"GET / HTTP/1.1\r\nHost: vm\r\n\r\n"[..],
        b"GET /metrics HTTP/1.1\r\n\r\n",
        b"GET /healthz?x=1 HTTP/1.1\r\n\r\n",
        b"GET /v1/tunnel HTTP/1.1\r\nHost: vm\r\n\r\n", // no Upgrade header
        b"GET /v1/tunnel HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
    ] {
        let answer = http(agent.addr, req).await;
        assert!(
            answer.starts_with("HTTP/1.1 404"),
            "{}: {answer}",
            String::from_utf8_lossy(req)
        );
    }
}

/// `/health` exists: another method is told which ones it takes (405 with `Allow`), not that
/// the path is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_with_another_method_is_405_naming_get_and_head() {
    let agent = start_agent(|_| {});
    for req in [
        &b"POST /health HTTP/1.1\r\nHost: vm\r\nContent-Length: 0\r\n\r\n"[..],
        b"POST /health HTTP/1.1\r\nHost: vm\r\nContent-Length: 5\r\n\r\nhello",
        b"PUT /health HTTP/1.1\r\nHost: vm\r\nContent-Length: 2\r\n\r\nok",
        b"DELETE /health HTTP/1.1\r\nHost: vm\r\n\r\n",
        b"OPTIONS /health HTTP/1.1\r\n\r\n",
    ] {
        let answer = http(agent.addr, req).await;
        let req = String::from_utf8_lossy(req);
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{req}: no complete answer: {answer:?}"));
        assert!(
            head.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{req}: {answer}"
        );
        assert!(head.contains("\r\nAllow: GET, HEAD\r\n"), "{req}: {answer}");
        assert_eq!(
            body, "forward agent: /health answers GET and HEAD only\n",
            "{req}"
        );
        assert!(
            head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())),
            "{req}: {answer}"
        );
    }
    // Still open to its own methods afterwards.
    let answer = http(agent.addr, b"GET /health HTTP/1.1\r\nHost: vm\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

// ----- TLS --------------------------------------------------------------------------------------

/// The wrong `--transport` for what the port speaks names the right one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transport_mismatch_names_the_transport_to_use() {
    let (server, client) = tls_pair();
    let echo = echo_server("[::1]:0").await;

    // Plain TCP to an agent with its own TLS: its alert comes back where HTTP should.
    let tls_agent = start_agent(|c| c.tls = Some(server));
    let link = AgentLink::new(link_config(tls_agent.addr, token()));
    let e = connector(&link, "", echo.port())
        .check()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("use --transport tls"), "{e}");

    // TLS to a plain agent: its HTTP error page is no TLS record.
    let plain_agent = start_agent(|_| {});
    let mut cfg = link_config(plain_agent.addr, token());
    cfg.host = "localhost".into();
    cfg.edge = Some("127.0.0.1".into());
    cfg.transport = CarrierTransport::Tls(client);
    let link = AgentLink::new(cfg);
    let e = connector(&link, "", echo.port())
        .check()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not speak TLS") && e.contains("--transport tcp"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_tls_carries_streams_health_and_refuses_wrong_tokens() {
    let (server, client) = tls_pair();
    let agent = start_agent(|c| c.tls = Some(server));
    let echo = echo_server("[::1]:0").await;
    let mut cfg = link_config(agent.addr, token());
    cfg.host = "localhost".into();
    cfg.edge = Some("127.0.0.1".into());
    cfg.transport = CarrierTransport::Tls(client.clone());
    let link = AgentLink::new(cfg.clone());
    let c = connector(&link, "", echo.port());
    c.check().await.expect("TLS carrier authenticates");
    echo_round_trip(&c, 5, 3 << 20)
        .await
        .expect("TLS round trip");

    let tcp = TcpStream::connect(agent.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client.clone())
        .connect(name, tcp)
        .await
        .expect("TLS to the agent");
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = within("health over TLS", drain(&mut tls)).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));

    cfg.token = Token::new(OTHER_TOKEN_HEX, "test").unwrap();
    let bad = AgentLink::new(cfg);
    let e = connector(&bad, "", echo.port())
        .check()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("authentication rejected"), "{e}");

    // Plain TCP to a TLS agent is an upgrade failure with a hint, not a hang.
    let plain = AgentLink::new(link_config(agent.addr, token()));
    let e = connector(&plain, "", echo.port())
        .check()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("upgrade"), "{e}");
    echo_round_trip(&c, 6, 1000)
        .await
        .expect("TLS client unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_paused_longer_than_its_idle_timeout_keeps_a_live_carrier() {
    // A suspended laptop or SIGSTOP: the client's runtime stands still while the agent goes
    // on sending keepalives. When it runs again, its idle timer has expired, but the peer's
    // bytes are waiting in the socket: the carrier is alive and its streams must go on.
    let agent = start_agent(|c| c.mux.keepalive_interval = Duration::from_millis(200));
    let echo = echo_server("[::1]:0").await;
    let addr = agent.addr;
    let port = echo.port();
    let client = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut config = link_config(addr, token());
            config.mux.idle_timeout = Duration::from_millis(1500);
            let link = AgentLink::new(config);
            let mut s = connector(&link, "", port)
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(b"before").await.map_err(|e| e.to_string())?;
            let mut six = [0u8; 6];
            s.read_exact(&mut six).await.map_err(|e| e.to_string())?;
            // The whole runtime stops, timers and sockets alike, as in SIGSTOP.
            std::thread::sleep(Duration::from_secs(3));
            s.write_all(b"after!").await.map_err(|e| e.to_string())?;
            s.read_exact(&mut six)
                .await
                .map_err(|e| format!("after the pause: {e}"))?;
            if &six != b"after!" {
                return Err(format!("echo after the pause: {six:?}"));
            }
            Ok::<_, String>(())
        })
    });
    let outcome = within("the paused client", async {
        tokio::task::spawn_blocking(move || client.join().unwrap())
            .await
            .unwrap()
    })
    .await;
    outcome.expect("the carrier outlived the pause");
}

// ----- 6. agent killed --------------------------------------------------------------------------

/// An agent on its own runtime, so killing it drops every socket it holds at once.
struct ThreadAgent {
    addr: SocketAddr,
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ThreadAgent {
    fn start(listen: SocketAddr) -> ThreadAgent {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let agent = Agent::bind(AgentConfig::new(listen, token()));
                let agent = match agent {
                    Ok(a) => a,
                    Err(e) => {
                        let _ = addr_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = addr_tx.send(Ok(agent.local_addr().unwrap()));
                tokio::select! {
                    _ = agent.run(CancellationToken::new(), Duration::ZERO) => {}
                    _ = killed => {}
                }
            });
            // Dropping the runtime drops every task: listener, carriers, target sockets.
            drop(rt);
        });
        let addr = addr_rx
            .recv_timeout(PATIENCE)
            .expect("agent thread reports its address")
            .expect("agent binds");
        ThreadAgent {
            addr,
            kill: Some(kill),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("agent thread");
        }
    }
}

impl Drop for ThreadAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_transfer_resets_local_sockets_and_the_link_comes_back() {
    const HOSE: usize = 64 << 20;
    let (hose, _) = firehose_server(HOSE, 66).await;
    let echo = echo_server("[::1]:0").await;
    let mut agent = ThreadAgent::start("127.0.0.1:0".parse().unwrap());
    let addr = agent.addr;
    let mut cfg = link_config(addr, token());
    cfg.timeout = Duration::from_secs(3);
    let link = AgentLink::new(cfg);
    let hose_c = connector(&link, "", hose.port());

    // One stream read directly, one relayed to a real local TCP socket (what `serve` does).
    let mut direct = hose_c.connect().await.unwrap();
    let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut user = TcpStream::connect(local.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = local.accept().await.unwrap();
    let relayed = hose_c.connect().await.unwrap();
    let relay_task = tokio::spawn(relay(accepted, relayed));

    let mut got = vec![0u8; 1 << 20];
    direct
        .read_exact(&mut got)
        .await
        .expect("first MiB, direct");
    user.read_exact(&mut got).await.expect("first MiB, relayed");

    agent.kill();

    let (rest, end) = within("the direct stream to notice", drain(&mut direct)).await;
    assert!(
        rest.len() + (1 << 20) < HOSE,
        "the transfer cannot have finished"
    );
    let e = end.expect_err("a lost carrier must never look like a clean EOF");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert!(e.to_string().contains("carrier lost"), "{e}");

    let (rest, end) = within("the local socket to notice", drain(&mut user)).await;
    assert!(rest.len() + (1 << 20) < HOSE);
    let e = end.expect_err("the local TCP socket must be reset, not closed cleanly");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    let _ = within("the relay to end", relay_task).await;

    // While the agent is down, connections fail with a reason rather than hanging.
    let ec = connector(&link, "", echo.port());
    let down = within("a connect while the agent is down", async {
        loop {
            match ec.connect().await {
                Err(e) => return e.to_string(),
                Ok(s) => {
                    // Opened on a carrier not yet known dead: it must fail, not echo.
                    if exchange(s, b"x".to_vec()).await.is_ok() {
                        panic!("a stream worked while the agent was down");
                    }
                }
            }
        }
    })
    .await;
    assert!(down.contains("127.0.0.1"), "{down}");

    let _agent2 = ThreadAgent::start(addr);
    let back = within("the link to come back", async {
        loop {
            match echo_round_trip(&ec, 9, 100_000).await {
                Ok(()) => return,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    back.await;
}

// ----- 7. silent carrier --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_carrier_is_declared_dead_and_its_streams_reset() {
    let agent = start_agent(|_| {});
    let echo = echo_server("[::1]:0").await;
    let proxy = Proxy::start(agent.addr).await;
    // The agent checks the proof against the Host the client sent (the proxy's address), as
    // behind the edge.
    let mut cfg = link_config(proxy.addr, token());
    cfg.mux.keepalive_interval = Duration::from_millis(300);
    cfg.mux.idle_timeout = Duration::from_millis(1500);
    let link = AgentLink::new(cfg);
    let c = connector(&link, "", echo.port());
    c.check().await.expect("authenticates through the proxy");
    let mut s = c.connect().await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut four = [0u8; 4];
    s.read_exact(&mut four).await.unwrap();
    assert_eq!(&four, b"ping");

    // A quiet but healthy carrier survives several idle timeouts thanks to keepalive.
    tokio::time::sleep(Duration::from_secs(4)).await;
    s.write_all(b"pong").await.unwrap();
    s.read_exact(&mut four)
        .await
        .expect("keepalive kept the carrier up");
    assert_eq!(&four, b"pong");

    proxy.freeze();
    let (rest, end) = within("the silent carrier to be declared dead", drain(&mut s)).await;
    assert!(rest.is_empty());
    let e = end.expect_err("streams of a dead carrier are reset");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert!(e.to_string().contains("timed out"), "{e}");
    let client = proxy.clients.lock().unwrap()[0];
    released(
        "the dead carrier's socket to be closed",
        client.port(),
        proxy.addr.port(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_carrier_is_declared_dead_even_while_writes_are_stuck() {
    const STREAMS: u64 = 128;
    let agent = start_agent(|_| {});
    let echo = echo_server("[::1]:0").await;
    let proxy = Proxy::start(agent.addr).await;
    let mut cfg = link_config(proxy.addr, token());
    cfg.mux.keepalive_interval = Duration::from_millis(300);
    cfg.mux.idle_timeout = Duration::from_millis(1500);
    let link = AgentLink::new(cfg);
    let c = Arc::new(connector(&link, "", echo.port()));
    c.check().await.expect("authenticates through the proxy");
    proxy.freeze();

    // Enough stream data, all within the windows, to fill every socket buffer toward the
    // stalled proxy: the carrier's writer blocks in the middle of a write.
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let s = c.connect().await.expect("open on the stalled carrier");
        let (r, mut w) = tokio::io::split(s);
        tokio::spawn(async move {
            let _ = w.write_all(&pattern(i, 256 * 1024)).await;
            w
        });
        streams.push(r);
    }
    for (i, r) in streams.iter_mut().enumerate() {
        let (got, end) = within("the stuck carrier to be declared dead", drain(r)).await;
        assert!(got.is_empty());
        let e = end.expect_err("streams of a dead carrier are reset");
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "stream {i}: {e}"
        );
    }
    let client = proxy.clients.lock().unwrap()[0];
    released(
        "the dead carrier's socket to be closed",
        client.port(),
        proxy.addr.port(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_while_the_carrier_is_silently_dead_moves_to_a_new_one() {
    let agent = start_agent(|_| {});
    let echo = echo_server("[::1]:0").await;
    let proxy = Proxy::start(agent.addr).await;
    let mut cfg = link_config(proxy.addr, token());
    cfg.mux.keepalive_interval = Duration::from_millis(300);
    // Far beyond the test's patience: only the probe can get the new connection through.
    cfg.mux.idle_timeout = Duration::from_secs(600);
    cfg.timeout = Duration::from_secs(1);
    let link = AgentLink::new(cfg);
    let c = connector(&link, "", echo.port());
    let mut old = c.connect().await.unwrap();
    old.write_all(b"ping").await.unwrap();
    let mut four = [0u8; 4];
    old.read_exact(&mut four).await.unwrap();
    assert_eq!(&four, b"ping");

    proxy.freeze();
    // Silent for longer than a keepalive interval and the margin (2.3 s here): suspect.
    tokio::time::sleep(Duration::from_millis(2600)).await;
    proxy.thaw();
    let mut new = within("a connection over a silently dead carrier", c.connect())
        .await
        .expect("opened on a new carrier");
    within("the echo on the new carrier", async {
        new.write_all(b"pong").await.unwrap();
        new.read_exact(&mut four).await.unwrap();
    })
    .await;
    assert_eq!(&four, b"pong");
    assert_eq!(proxy.clients.lock().unwrap().len(), 2, "a second carrier");

    // The dead carrier's stream was reset, naming why.
    let (rest, end) = within("the old stream to end", drain(&mut old)).await;
    assert!(rest.is_empty());
    let e = end.expect_err("a stream of a dead carrier is reset");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert!(
        e.to_string().contains("no answer to a ping within 1.0s"),
        "{e}"
    );
}

/// A connection made the moment the path died (the carrier was busy, no keepalive missed yet)
/// goes out with zero round trips on the dead carrier; hearing nothing, the carrier is probed
/// and closed, and the connection is reset with the reason, in about two connect timeouts
/// instead of the idle timeout (43 s in a user's test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_as_the_path_dies_is_reset_within_two_connect_timeouts() {
    let agent = start_agent(|_| {});
    let echo = echo_server("[::1]:0").await;
    let proxy = Proxy::start(agent.addr).await;
    let mut cfg = link_config(proxy.addr, token());
    // Far beyond the test's patience: only the answer check can end the new connection.
    cfg.mux.idle_timeout = Duration::from_secs(600);
    cfg.timeout = Duration::from_secs(1);
    let link = AgentLink::new(cfg);
    let c = connector(&link, "", echo.port());
    let mut old = c.connect().await.unwrap();
    old.write_all(b"ping").await.unwrap();
    let mut four = [0u8; 4];
    old.read_exact(&mut four).await.unwrap();

    proxy.freeze();
    let mut new = c.connect().await.expect("opened at once, zero round trips");
    new.write_all(b"pong").await.unwrap();
    let (got, end) = within("the new connection to end", drain(&mut new)).await;
    assert!(got.is_empty());
    let e = end.expect_err("a connection on a dead carrier is reset");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert!(
        e.to_string().contains("no answer to a ping within 1.0s"),
        "{e}"
    );
    proxy.thaw();
}

/// An agent that accepts and never answers (a blackholed path behind a proxy, a hung agent):
/// the local connections that arrive while one carrier attempt runs all get its failure when
/// it ends, instead of each waiting for an attempt of its own (one failure per connect timeout
/// while the rest piled up, in a user's outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_waiting_on_a_mute_agent_all_fail_with_the_one_attempt() {
    let (addr, held) = mute_agent().await;
    let mut cfg = link_config(addr, token());
    cfg.timeout = Duration::from_secs(1);
    let link = AgentLink::new(cfg);
    let started = std::time::Instant::now();
    let mut tries = Vec::new();
    for _ in 0..8 {
        let c = connector(&link, "", 9);
        tries.push(tokio::spawn(async move { c.connect().await.map(drop) }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tries {
        let e = within("a waiting connection to fail", t)
            .await
            .unwrap()
            .expect_err("no agent answers");
        assert!(e.to_string().contains("no answer to the upgrade"), "{e}");
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "8 connections failed after {took:?}"
    );
    held.abort();
}

/// Closing (Ctrl-C, the end of `forward stdio`) does not wait behind a connect in progress,
/// which can take a timeout per stage when the agent does not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_does_not_wait_for_a_connect_in_progress() {
    let (addr, held) = mute_agent().await;
    let mut cfg = link_config(addr, token());
    cfg.timeout = Duration::from_secs(30);
    let link = AgentLink::new(cfg);
    let c = connector(&link, "", 1);
    let connecting = tokio::spawn(async move { c.check().await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::time::timeout(Duration::from_secs(5), link.close("test"))
        .await
        .expect("close waited for the connect in progress");
    let e = within("the check to end", connecting)
        .await
        .unwrap()
        .expect_err("no carrier");
    assert!(e.to_string().contains("closing"), "{e}");
    held.abort();
}

// ----- 8. silent unauthenticated flood ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_at_the_auth_deadline() {
    const SILENT: usize = 200;
    let agent = start_agent(|c| c.auth_timeout = Duration::from_secs(2));
    let echo = echo_server("[::1]:0").await;
    let link = AgentLink::new(link_config(agent.addr, token()));
    let c = connector(&link, "", echo.port());
    c.check().await.expect("authenticated before the flood");

    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(agent.addr).await.unwrap());
    }
    let waiters: Vec<_> = silent
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let (got, _) = drain(&mut s).await;
                String::from_utf8_lossy(&got).into_owned()
            })
        })
        .collect();
    echo_round_trip(&c, 31, 500_000)
        .await
        .expect("round trip during the flood");

    // Those past the cap of waiting connections are evicted with the agent's 503; the rest
    // reach the deadline and get nothing.
    let mut busy = 0;
    for w in waiters {
        let answer = within("every silent connection to end", w).await.unwrap();
        if answer.ends_with(forward_tunnel::upgrade::BUSY_BODY) {
            busy += 1;
        } else {
            assert!(
                answer.is_empty(),
                "a silent connection got an answer: {answer}"
            );
        }
    }
    let cap = AgentConfig::new(agent.addr, token()).max_unauthenticated;
    assert_eq!(busy, SILENT.saturating_sub(cap), "evicted connections");

    echo_round_trip(&c, 32, 500_000)
        .await
        .expect("round trip after the flood");
    let fresh = AgentLink::new(link_config(agent.addr, token()));
    connector(&fresh, "", echo.port())
        .check()
        .await
        .expect("the cap frees up once the silent ones are gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_flood_cannot_lock_out_a_new_client() {
    const SILENT: usize = 100;
    // Below the default (1024), so that 100 connections fill it.
    let cap = 64;
    // A deadline far beyond the test: only eviction can let the newcomer in.
    let agent = start_agent(|c| {
        c.auth_timeout = Duration::from_secs(600);
        c.max_unauthenticated = cap;
    });
    let echo = echo_server("[::1]:0").await;
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(agent.addr).await.unwrap());
    }
    let fresh = AgentLink::new(link_config(agent.addr, token()));
    let c = connector(&fresh, "", echo.port());
    within("a new client to authenticate during the flood", c.check())
        .await
        .expect("a new client gets in while the flood holds every unauthenticated place");
    echo_round_trip(&c, 33, 500_000)
        .await
        .expect("round trip during the flood");

    // The agent accepts in arrival order, so the oldest made room: those beyond the cap, and
    // one more for the new client.
    let evicted = SILENT - cap + 1;
    // Each is told why, so a real client evicted this way retries instead of giving up on
    // an agent it takes for absent.
    for (i, s) in silent.iter_mut().enumerate().take(evicted) {
        let (got, _) = within("an evicted connection to close", drain(s)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(
            got.starts_with("HTTP/1.1 503 ") && got.ends_with(forward_tunnel::upgrade::BUSY_BODY),
            "evicted connection {i} got {got:?}, want the agent's 503"
        );
    }
    for (i, s) in silent.iter().enumerate().skip(evicted) {
        let mut byte = [0u8; 1];
        match s.try_read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => {
                panic!("connection {i} is among the newest {cap} and must still wait: {other:?}")
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_but_silent_connection_is_closed_at_the_auth_deadline() {
    let agent = start_agent(|c| c.auth_timeout = Duration::from_secs(1));
    let mut raw = Raw::upgrade(agent.addr).await;
    let me = raw.s.local_addr().unwrap();
    match raw.ending().await {
        Ending::GoAway(ErrorCode::AuthTimeout, _) | Ending::Closed => {}
        other => panic!("expected the auth deadline to end the carrier, got {other:?}"),
    }
    // Ending the byte stream is not enough: the agent must let go of the socket, or silent
    // clients pile up file descriptors until it can accept no one.
    released(
        "the agent to close the silent connection",
        agent.addr.port(),
        me.port(),
    )
    .await;
    assert_still_serving(agent.addr).await;
}

// ----- 9. targets ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_only_service_is_reachable_and_other_hosts_are_not_allowed() {
    let agent = start_agent(|_| {});
    let v4 = echo_server("127.0.0.1:0").await;
    let link = AgentLink::new(link_config(agent.addr, token()));
    for host in ["", "localhost", "127.0.0.1"] {
        echo_round_trip(&connector(&link, host, v4.port()), 41, 1 << 20)
            .await
            .unwrap_or_else(|e| panic!("IPv4-only service via '{host}': {e}"));
    }

    // Documentation addresses and names: refused by policy before any packet leaves.
    for host in ["192.0.2.7", "example.com", "2001:db8::1"] {
        let mut s = connector(&link, host, 5432).connect().await.unwrap();
        let _ = s.write_all(b"SELECT 1").await;
        let (got, end) = within("the refusal", drain(&mut s)).await;
        assert!(got.is_empty());
        let e = end.expect_err("a refused target is an error, not an empty answer");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        assert!(e.to_string().contains("not allowed"), "{host}: {e}");
    }

    // Nothing listening on the VM: refused, said so.
    let closed = closed_port::closed_port();
    let port = closed.port;
    let mut s = connector(&link, "", port).connect().await.unwrap();
    let (_, end) = within("the dial failure", drain(&mut s)).await;
    let e = end.unwrap_err().to_string();
    assert!(e.contains("refused"), "{e}");

    echo_round_trip(&connector(&link, "", v4.port()), 42, 1000)
        .await
        .expect("the carrier survives refusals");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_while_its_target_is_dialled_stops_the_dial() {
    // The client gives up while the agent's dial waits on a target that drops SYNs: the
    // target must then never see a connection opened only to be closed.
    let agent = start_agent(|c| c.dial_timeout = Duration::from_secs(20));
    let (target, _fillers) = full_queue::full_listener().await;
    let port = target.local_addr().unwrap().port();
    let link = AgentLink::new(link_config(agent.addr, token()));
    let mut s = connector(&link, "127.0.0.1", port).connect().await.unwrap();
    s.write_all(b"never delivered").await.unwrap();
    // Long enough for the agent's dial to start and for its SYN to be dropped.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    full_queue::assert_no_late_connection(&target).await;
    echo_round_trip(
        &connector(&link, "", echo_server("[::1]:0").await.port()),
        7,
        1000,
    )
    .await
    .expect("the carrier serves on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_stream_cap_use_overflow_carriers_that_close_when_idle() {
    use forward_tunnel::Connector;
    let agent = start_agent(|_| {});
    let echo = echo_server("[::1]:0").await;
    let mut config = link_config(agent.addr, token());
    config.mux.max_concurrent_streams = 4;
    let link = AgentLink::new(config);
    let c = connector(&link, "", echo.port());
    // Ten connections held open at once need three carriers of four streams.
    let mut open = Vec::new();
    for i in 0..10u64 {
        let mut s = within("a connection", c.connect()).await.unwrap();
        let data = pattern(i, 1000);
        s.write_all(&data).await.unwrap();
        let mut back = vec![0u8; data.len()];
        within("the echo", s.read_exact(&mut back)).await.unwrap();
        assert_eq!(sha256(&back), sha256(&data), "connection {i}");
        open.push(s);
    }
    assert_eq!(link.carrier_count().await, 3);
    for mut s in open {
        s.shutdown().await.unwrap();
        let (rest, end) = within("the end", drain(&mut s)).await;
        assert!(rest.is_empty() && end.is_ok(), "{end:?}");
    }
    // Idle overflow carriers go (after 5-10 s); the current one stays for the next user.
    within("the idle overflow carriers to close", async {
        while link.carrier_count().await > 1 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    echo_round_trip(&c, 99, 10_000)
        .await
        .expect("the link serves on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reached_by_an_ipv6_literal_authenticates() {
    // The proof covers the host the client dialled; an IPv6 literal must survive the Host
    // header intact for the agent to check it.
    let agent = start_agent_on("[::1]:0".parse().unwrap(), |_| {});
    let echo = echo_server("127.0.0.1:0").await;
    let link = AgentLink::new(link_config(agent.addr, token()));
    assert_eq!(link_config(agent.addr, token()).host, "::1");
    let c = connector(&link, "", echo.port());
    c.check().await.expect("auth with an IPv6 literal host");
    echo_round_trip(&c, 61, 100_000).await.expect("round trip");
}

// ----- 10. graceful stop --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_drains_open_streams_and_refuses_new_ones() {
    const TOTAL: usize = 8 << 20;
    let agent = start_agent(|_| {});
    let echo = echo_server("[::1]:0").await;
    let mut cfg = link_config(agent.addr, token());
    cfg.timeout = Duration::from_secs(5);
    let link = AgentLink::new(cfg);
    let c = connector(&link, "", echo.port());
    let s = c.connect().await.unwrap();
    let data = pattern(51, TOTAL);
    let (mut r, mut w) = tokio::io::split(s);
    w.write_all(&data[..1 << 20]).await.unwrap();
    let mut first = vec![0u8; 1 << 20];
    r.read_exact(&mut first)
        .await
        .expect("first MiB before the stop");

    agent.stop.cancel();

    // New streams are refused: by GOAWAY on the old carrier, and with the listener closed.
    let refusal = within("new opens to be refused", async {
        loop {
            match c.connect().await {
                Err(e) => return e.to_string(),
                Ok(s) => {
                    if exchange(s, b"late".to_vec()).await.is_ok() {
                        // Opened before the GOAWAY reached us: still fine, try again.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        !refusal.contains("no answer"),
        "a stopping agent must refuse new carriers, not leave them hanging: {refusal}"
    );

    // The open stream finishes its transfer.
    let rest = data[1 << 20..].to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&rest).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let (tail, end) = within("the draining stream", drain(&mut r)).await;
    end.expect("the draining stream ends cleanly");
    writer.await.unwrap().expect("writes during the drain");
    first.extend_from_slice(&tail);
    assert_eq!(first.len(), TOTAL);
    assert_eq!(sha256(&first), sha256(&data));
    within("the agent to finish after the drain", agent.done)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_carrier_that_authenticates_during_the_drain_is_told_to_go_away() {
    // Connected before the stop, authenticated after it: this carrier was not in the list the
    // GOAWAYs went to, so it served on until the process exited and was then cut.
    let agent = start_agent(|_| {});
    let mut raw = Raw::upgrade(agent.addr).await;
    agent.stop.cancel();
    within("the agent to finish its (empty) drain", agent.done)
        .await
        .unwrap();
    let proof = token().prove(
        &raw.challenge,
        &agent.addr.ip().to_string(),
        agent.addr.port(),
    );
    raw.send(&auth_frame(&proof)).await.unwrap();
    assert_eq!(raw.next_frame().await, Some(Frame::AuthOk));
    let mut next = raw.next_frame().await;
    while let Some(Frame::Ping { .. }) = next {
        next = raw.next_frame().await;
    }
    match next {
        Some(Frame::GoAway { code, reason, .. }) => {
            assert_eq!(code, ErrorCode::NoError);
            assert_eq!(reason, "agent shutting down");
        }
        other => {
            panic!("expected a GOAWAY after authenticating to a stopping agent, got {other:?}")
        }
    }
}

/// A link through a [`Gate`] to a running agent, its carrier up, and the gate holding what
/// that agent sends from now on; the agent is then stopped (its GOAWAY waits in the gate) and
/// a second agent takes new connections. A stream opened now goes out on the old carrier.
async fn agent_stopped_unheard() -> (Gate, Arc<AgentLink>, AgentConnector, TestAgent) {
    let old = start_agent(|_| {});
    let echo = echo_server("[::1]:0").await;
    let gate = Gate::start(old.addr).await;
    let link = AgentLink::new(link_config(gate.addr, token()));
    let c = connector(&link, "", echo.port());
    echo_round_trip(&c, 71, 1000)
        .await
        .expect("a round trip through the first agent");
    gate.hold();
    old.stop.cancel();
    within("the first agent to finish its drain", old.done)
        .await
        .unwrap();
    let new = start_agent(|_| {});
    gate.retarget(new.addr);
    (gate, link, c, new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_stopping_agent_did_not_process_opens_again_on_the_next_one() {
    // The instant of a restart: the client opened a stream before it heard the old agent's
    // GOAWAY, which says the stream was never processed. The user's connection carries on
    // through the new agent, with what it had sent and its FIN, instead of being reset.
    let (gate, link, c, _new) = agent_stopped_unheard().await;
    let s = c.connect().await.expect("opened on the old carrier");
    let data = pattern(72, 40_000);
    let echoed = tokio::spawn(exchange(s, data.clone()));
    // The OPEN, the bytes and the FIN go out on the old carrier, unanswered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(link.carrier_count().await, 1);
    gate.release();
    let got = within("the stream to come back through the new agent", echoed)
        .await
        .unwrap()
        .expect("the refused stream is opened again, not reset");
    assert_eq!(sha256(&got), sha256(&data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_that_sent_more_than_the_retry_cap_is_reset_with_the_reason() {
    // Past RETRY_CAP unanswered bytes the stream keeps no copy (an upload, not a request):
    // the refusal then reaches the user as a reset that says why.
    let (gate, _link, c, _new) = agent_stopped_unheard().await;
    let s = c.connect().await.expect("opened on the old carrier");
    let data = pattern(73, forward_tunnel::carrier::RETRY_CAP + 1);
    let echoed = tokio::spawn(exchange(s, data));
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.release();
    let e = within("the refusal", echoed)
        .await
        .unwrap()
        .expect_err("a stream past the cap is not sent again");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    assert!(
        e.to_string()
            .contains("agent is shutting down and did not process this stream"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_carrier_closed_for_silence_says_so() {
    // A client that was only paused (a laptop asleep) reads why its carrier ended on waking,
    // instead of a bare "the peer closed the carrier".
    let agent = start_agent(|c| c.mux.idle_timeout = Duration::from_secs(1));
    let mut raw = Raw::authenticated(agent.addr).await;
    assert_eq!(
        raw.ending().await,
        Ending::GoAway(
            ErrorCode::NoError,
            "idle timeout: nothing received for 1s".into()
        )
    );
}

/// A target that reports when its one connection ends.
async fn target_reporting_its_end() -> (u16, tokio::sync::oneshot::Receiver<()>) {
    let l = TcpListener::bind("[::1]:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_naming_its_lost_carrier_gets_it_closed() {
    // A client that gave a carrier up (silent path) resets its streams; the agent, which heard
    // nothing, kept the carrier and its VM-side connections until its idle timeout (a psql
    // backend holding locks for minutes). The reconnecting client names the old carrier.
    // (An idle timeout beyond the test's patience: only the replacement can end the old one.)
    let agent = start_agent(|c| c.mux.idle_timeout = Duration::from_secs(600));
    let (port, mut ended) = target_reporting_its_end().await;
    let mut lost = Raw::authenticated(agent.addr).await;
    lost.send(&open_frame(1, "", port)).await.unwrap();
    lost.send(&data_frame(1, b"BEGIN;", false)).await.unwrap();
    loop {
        match lost.next_frame().await {
            Some(Frame::OpenOk { id: 1 }) => break,
            Some(Frame::Ping { .. }) => {}
            other => panic!("want OPEN_OK, got {other:?}"),
        }
    }

    // Neither a name the agent does not know nor a failed authentication closes anything.
    let _other = Raw::authenticated_replacing(agent.addr, Some(&"0".repeat(32))).await;
    let mut stranger = Raw::upgrade_replacing(agent.addr, Some(&lost.id)).await;
    stranger.send(&auth_frame(&[0u8; 32])).await.unwrap();
    assert_eq!(stranger.next_frame().await, Some(Frame::AuthFail));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut ended)
            .await
            .is_err(),
        "the target connection ended without a successful replacement"
    );

    let _new = Raw::authenticated_replacing(agent.addr, Some(&lost.id)).await;
    within("the lost carrier's target connection to close", ended)
        .await
        .unwrap();
    assert!(matches!(
        lost.ending().await,
        Ending::GoAway(..) | Ending::Closed
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_names_the_carrier_it_gave_up_and_the_agent_closes_its_connections() {
    let agent = start_agent(|c| c.mux.idle_timeout = Duration::from_secs(600));
    let (port, ended) = target_reporting_its_end().await;
    let echo = echo_server("[::1]:0").await;
    let proxy = Proxy::start(agent.addr).await;
    let mut cfg = link_config(proxy.addr, token());
    cfg.mux.idle_timeout = Duration::from_secs(600);
    cfg.timeout = Duration::from_secs(1);
    let link = AgentLink::new(cfg);
    let mut held = connector(&link, "", port).connect().await.unwrap();
    held.write_all(b"BEGIN;").await.unwrap();
    within("the target to be reached", held.opened())
        .await
        .unwrap();

    // The path dies; a new connection finds the carrier dead and the link gives it up.
    proxy.freeze();
    let c = connector(&link, "", echo.port());
    let mut doomed = c.connect().await.unwrap();
    let _ = doomed.write_all(b"x").await;
    let (_, end) = within(
        "the connection on the dead carrier to end",
        drain(&mut doomed),
    )
    .await;
    end.expect_err("reset");

    // The path is back: the next carrier names the lost one, and the agent ends its streams.
    proxy.thaw();
    echo_round_trip(&c, 71, 1000)
        .await
        .expect("a new carrier through the healed path");
    within("the lost carrier's VM-side connection to close", ended)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_left_at_the_end_of_the_drain_are_reset_not_closed() {
    let agent = start_agent_full(
        "127.0.0.1:0".parse().unwrap(),
        Duration::from_secs(1),
        |_| {},
    );
    let echo = echo_server("[::1]:0").await;
    let link = AgentLink::new(link_config(agent.addr, token()));
    let mut s = connector(&link, "", echo.port()).connect().await.unwrap();
    s.write_all(b"idle").await.unwrap();
    let mut four = [0u8; 4];
    s.read_exact(&mut four).await.unwrap();
    agent.stop.cancel();
    // This stream never finishes by itself: the drain ends it, and the local side must learn
    // that it was cut rather than see a clean end.
    let (_, end) = within("the drain to end", drain(&mut s)).await;
    let e = end.expect_err("a stream cut by the end of the drain is reset");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    // The client's log names the cause, not a bare "the peer closed the carrier".
    assert!(e.to_string().contains("drain time ran out"), "{e}");
    within("the agent to finish", agent.done).await.unwrap();
}

// ----- reset budgets (known failures in forward-mux) ----------------------------------------------

/// A stream kept open across `storm`, which must not disturb it.
async fn held_stream_survives<F: std::future::Future<Output = ()>>(
    link: &Arc<AgentLink>,
    echo_port: u16,
    storm: F,
) {
    let c = connector(link, "", echo_port);
    let s = c.connect().await.unwrap();
    let (mut r, mut w) = tokio::io::split(s);
    w.write_all(b"hold").await.unwrap();
    let mut four = [0u8; 4];
    r.read_exact(&mut four).await.unwrap();
    storm.await;
    w.write_all(b"more").await.unwrap();
    r.read_exact(&mut four)
        .await
        .expect("the held stream survives the storm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_refused_opens_leave_other_streams_alone() {
    // A script polling a port until its service comes up (every 10 ms, say) must not cut
    // every other connection to that VM.
    let agent = start_agent(|_| {});
    let echo = echo_server("[::1]:0").await;
    let link = AgentLink::new(link_config(agent.addr, token()));
    let closed = closed_port::closed_port();
    let port = closed.port;
    let closed = connector(&link, "", port);
    held_stream_survives(&link, echo.port(), async {
        for i in 0..300 {
            let mut s = closed.connect().await.unwrap();
            let (_, end) = drain(&mut s).await;
            let e = end.unwrap_err().to_string();
            assert!(e.contains("refused"), "attempt {i}: {e}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_aborted_connections_leave_other_streams_alone() {
    // Local clients that abort after their answer (timeouts, cancelled requests) are normal
    // traffic for a port forward, not a rapid-reset attack.
    let agent = start_agent(|_| {});
    let echo = echo_server("[::1]:0").await;
    let link = AgentLink::new(link_config(agent.addr, token()));
    let c = connector(&link, "", echo.port());
    held_stream_survives(&link, echo.port(), async {
        for i in 0..300 {
            let mut s = c.connect().await.unwrap();
            s.write_all(b"ab").await.unwrap();
            let mut two = [0u8; 2];
            if let Err(e) = s.read_exact(&mut two).await {
                panic!("attempt {i}: {e}");
            }
            drop(s); // not finished both ways: the stream is reset
        }
    })
    .await;
}
