//! Hostile input at every layer of the agent: a replayed proof, garbage instead of HTTP,
//! garbage and oversized frames, frames before AUTH, data beyond the window. Each case must end
//! only its own connection; the agent keeps serving good clients.

use super::*;

// ----- 3. replayed AUTH ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_auth_is_rejected() {
    let agent = start_agent(|_| {});
    let echo = echo_server("[::1]:0").await;
    let proxy = Proxy::start(agent.addr).await;
    let victim = AgentLink::new(link_config(proxy.addr, token()));
    let vc = connector(&victim, "", echo.port());
    vc.check()
        .await
        .expect("the victim authenticates through the proxy");

    // Captured: the victim's upgrade request and its AUTH frame.
    let captured = proxy.upstream.lock().unwrap().clone();
    let head_end = captured.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let hdr: [u8; 12] = captured[head_end..head_end + 12].try_into().unwrap();
    let h = Header::decode(&hdr);
    assert_eq!(h.ty, FrameType::Auth as u8, "the first frame is AUTH");
    let replay = captured[..head_end + 12 + h.length as usize].to_vec();

    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&replay).await.unwrap();
    let (answer, _) = within("the agent's answer to a replay", drain(&mut s)).await;
    let head_len = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&answer[..head_len]);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut frames = &answer[head_len..];
    let mut dec = forward_mux::Decoder::new();
    let first = dec.decode(&mut frames).unwrap();
    assert_eq!(first, Some(Frame::AuthFail), "a replayed proof must fail");
    while let Ok(Some(f)) = dec.decode(&mut frames) {
        assert!(
            !matches!(f, Frame::AuthOk | Frame::OpenOk { .. }),
            "{f:?} after a rejection"
        );
    }

    // The victim's carrier and new clients are unaffected.
    echo_round_trip(&vc, 1, 100_000)
        .await
        .expect("victim after the replay");
    let other = AgentLink::new(link_config(agent.addr, token()));
    echo_round_trip(&connector(&other, "", echo.port()), 2, 100_000)
        .await
        .expect("a new client after the replay");
}

// ----- 4. malformed input -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_http_gets_400() {
    let agent = start_agent(|_| {});
    let mut garbage = pattern(1, 300);
    garbage[0] = 0xff; // never UTF-8
    garbage.extend_from_slice(b"\r\n\r\n");
    let answer = http(agent.addr, &garbage).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    let endless = vec![b'A'; 9 * 1024];
    let answer = http(agent.addr, &endless).await;
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "an endless head: {answer}"
    );

    let answer = http(agent.addr, b"hello\r\n\r\n").await;
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "one-word request line: {answer}"
    );

    assert_still_serving(agent.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_after_auth_close_the_carrier() {
    let agent = start_agent(|_| {});
    let mut raw = Raw::authenticated(agent.addr).await;
    let mut garbage = pattern(2, 4096);
    garbage[0] = 0xee; // not a frame type
    raw.send(&garbage).await.unwrap();
    match raw.ending().await {
        Ending::GoAway(ErrorCode::ProtocolError, reason) => {
            assert!(reason.contains("unknown frame type"), "{reason}")
        }
        other => panic!("expected GOAWAY(PROTOCOL_ERROR), got {other:?}"),
    }
    assert_still_serving(agent.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_is_refused_from_its_header() {
    let agent = start_agent(|_| {});
    let mut raw = Raw::authenticated(agent.addr).await;
    raw.send(&open_frame(1, "", 9)).await.unwrap();
    // A header announcing 70,000 bytes; the payload never needs to arrive.
    let big = Header::new(FrameType::Data, 0, 1, 70_000).encode();
    raw.send(&big).await.unwrap();
    // docs/protocol.md: payload over 64 KiB → GOAWAY(FRAME_SIZE_ERROR).
    match raw.ending().await {
        Ending::GoAway(ErrorCode::FrameSizeError, reason) => {
            assert!(reason.contains("70000"), "{reason}")
        }
        other => panic!("expected GOAWAY(FRAME_SIZE_ERROR), got {other:?}"),
    }
    assert_still_serving(agent.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_before_auth_close_the_carrier() {
    let agent = start_agent(|_| {});
    let (echo, dialled) = counted_echo_server("[::1]:0").await;
    let first_frames = [
        open_frame(1, "", echo.port()),
        data_frame(1, b"sneaky", false),
        [open_frame(1, "", echo.port()), data_frame(1, b"x", true)].concat(),
    ];
    for first in first_frames {
        let mut raw = Raw::upgrade(agent.addr).await;
        raw.send(&first).await.unwrap();
        match raw.ending().await {
            Ending::Closed | Ending::GoAway(ErrorCode::ProtocolError, _) => {}
            other => panic!("expected the carrier to close, got {other:?}"),
        }
    }
    // A valid AUTH behind an OPEN is too late.
    let mut raw = Raw::upgrade(agent.addr).await;
    let proof = token().prove(
        &raw.challenge,
        &agent.addr.ip().to_string(),
        agent.addr.port(),
    );
    raw.send(&[open_frame(1, "", echo.port()), auth_frame(&proof)].concat())
        .await
        .unwrap();
    let mut frames = Vec::new();
    while let Some(f) = raw.next_frame().await {
        frames.push(f);
    }
    assert!(
        !frames
            .iter()
            .any(|f| matches!(f, Frame::AuthOk | Frame::OpenOk { .. })),
        "nothing may be accepted after an OPEN before AUTH: {frames:?}"
    );
    assert_eq!(
        dialled.load(Ordering::SeqCst),
        0,
        "the agent dialled before AUTH"
    );
    assert_still_serving(agent.addr).await;
}

/// A listener whose accept queue is full, so a dial to it hangs: the agent cannot accept the
/// stream, hence never reads it and never returns credit, and a window violation is certain.
async fn unanswering_port() -> (u16, Vec<TcpStream>) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l: TcpListener = sock.listen(0).unwrap();
    let addr = l.local_addr().unwrap();
    let mut fillers = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
            Ok(Ok(s)) if fillers.len() < 16 => fillers.push(s),
            Ok(Ok(_)) => panic!("the accept queue of a backlog-0 listener never filled"),
            Ok(Err(e)) => panic!("filling the accept queue: {e}"),
            Err(_) => break,
        }
    }
    std::mem::forget(l); // keep the queue full for the rest of the test
    (addr.port(), fillers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_beyond_the_stream_window_is_a_flow_control_error() {
    let agent = start_agent(|c| c.dial_timeout = Duration::from_secs(120));
    let (port, _fillers) = unanswering_port().await;
    let mut raw = Raw::authenticated(agent.addr).await;
    let window = forward_mux::Config::default().stream_window as usize;
    let chunk = vec![7u8; 64 * 1024];
    let mut burst = open_frame(1, "127.0.0.1", port);
    let mut sent = 0;
    while sent <= window {
        burst.extend_from_slice(&data_frame(1, &chunk, false));
        sent += chunk.len();
    }
    raw.send(&burst).await.unwrap();
    match raw.ending().await {
        Ending::GoAway(ErrorCode::FlowControlError, reason) => {
            assert!(reason.contains("window"), "{reason}")
        }
        other => panic!("expected GOAWAY(FLOW_CONTROL_ERROR), got {other:?}"),
    }
    assert_still_serving(agent.addr).await;
}
