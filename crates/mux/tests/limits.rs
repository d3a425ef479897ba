//! A hand-driven peer sends bad frames; the session must answer with the right GOAWAY and close.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{authed_server, drain, events, wire, GOOD_TOKEN};
use forward_mux::{
    frame::{Header, HEADER_LEN, MAX_PAYLOAD},
    CloseReason, Config, ErrorCode, Event, Frame, FrameType, ResetCode, Session, SessionError,
    Target,
};

fn open(id: u32) -> Frame {
    Frame::Open {
        id,
        target: Target::new("localhost", 80).unwrap(),
    }
}

fn data(id: u32, len: usize) -> Frame {
    Frame::Data {
        id,
        fin: false,
        payload: Bytes::from(vec![7u8; len]),
    }
}

/// Feed `frames`, expect the session to refuse them with `code`, send exactly that GOAWAY and close.
fn expect_goaway(mut s: Session, now: Instant, frames: &[Frame], code: ErrorCode, detail: &str) {
    let err = s
        .handle_input(now, &wire(frames))
        .expect_err("input must be refused");
    assert_eq!(err.code(), code, "error: {err}");
    assert!(
        err.to_string().contains(detail),
        "`{err}` should mention `{detail}`"
    );
    let out = drain(&mut s, now);
    match out.last() {
        Some(Frame::GoAway {
            code: sent, reason, ..
        }) => {
            assert_eq!(*sent, code);
            assert!(
                reason.contains(detail),
                "GOAWAY reason `{reason}` should mention `{detail}`"
            );
        }
        other => panic!("expected a GOAWAY, got {other:?}"),
    }
    let closed = events(&mut s).into_iter().find_map(|e| match e {
        Event::Closed { reason } => Some(reason),
        _ => None,
    });
    assert!(matches!(closed, Some(CloseReason::ProtocolError { code: c, .. }) if c == code));
    assert!(s.is_closed());
    assert_eq!(
        s.handle_input(now, &wire(&[Frame::AuthOk])),
        Err(SessionError::Closed)
    );
}

#[test]
fn frames_before_auth_are_a_protocol_error() {
    let now = Instant::now();
    let s = Session::server(Config::default(), now);
    expect_goaway(
        s,
        now,
        &[open(1)],
        ErrorCode::ProtocolError,
        "OPEN frame before AUTH",
    );
    let s = Session::server(Config::default(), now);
    let ping = Frame::Ping {
        ack: false,
        opaque: [0; 8],
    };
    expect_goaway(
        s,
        now,
        &[ping],
        ErrorCode::ProtocolError,
        "PING frame before AUTH",
    );
}

#[test]
fn garbage_instead_of_a_frame_is_rejected() {
    let now = Instant::now();
    let mut s = Session::server(Config::default(), now);
    let err = s.handle_input(now, b"GET / HTTP/1.1\r\n\r\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed frame from peer: unknown frame type 0x47 (is the peer speaking forward-mux/1?)"
    );
    assert!(matches!(
        drain(&mut s, now).last(),
        Some(Frame::GoAway {
            code: ErrorCode::ProtocolError,
            ..
        })
    ));
}

#[test]
fn oversized_frame_is_rejected_before_buffering() {
    let (mut s, now) = authed_server(Config::default());
    s.handle_input(now, &wire(&[open(1)])).unwrap();
    let header = Header::new(FrameType::Data, 0, 1, MAX_PAYLOAD + 1).encode();
    // Only the header is sent: the refusal must not wait for (or allocate) the payload.
    let err = s.handle_input(now, &header).unwrap_err();
    assert_eq!(err.code(), ErrorCode::FrameSizeError);
    assert!(matches!(
        drain(&mut s, now).last(),
        Some(Frame::GoAway {
            code: ErrorCode::FrameSizeError,
            ..
        })
    ));
    assert_eq!(header.len(), HEADER_LEN);
}

#[test]
fn data_beyond_the_stream_window_is_a_flow_control_error() {
    let config = Config {
        stream_window: 1000,
        ..Config::default()
    };
    let (mut s, now) = authed_server(config);
    s.handle_input(now, &wire(&[open(1), data(1, 600)]))
        .unwrap();
    // Header alone is enough to refuse.
    let header = Header::new(FrameType::Data, 0, 1, 401).encode();
    let err = s.handle_input(now, &header).unwrap_err();
    assert_eq!(err.to_string(), "peer broke the protocol (flow control error): DATA on stream 1 exceeds its window by 1 bytes");
    assert!(matches!(
        drain(&mut s, now).last(),
        Some(Frame::GoAway {
            code: ErrorCode::FlowControlError,
            ..
        })
    ));
}

#[test]
fn data_beyond_the_connection_window_is_a_flow_control_error() {
    let config = Config {
        stream_window: 1000,
        connection_window: 1500,
        ..Config::default()
    };
    let (s, now) = authed_server(config);
    let frames = [open(1), open(3), data(1, 1000), data(3, 501)];
    expect_goaway(
        s,
        now,
        &frames,
        ErrorCode::FlowControlError,
        "exceeds the connection window by 1 bytes",
    );
}

#[test]
fn reused_even_and_unknown_ids_are_protocol_errors() {
    let (s, now) = authed_server(Config::default());
    expect_goaway(
        s,
        now,
        &[open(3), open(1)],
        ErrorCode::ProtocolError,
        "OPEN reuses stream id 1",
    );
    let (s, now) = authed_server(Config::default());
    expect_goaway(
        s,
        now,
        &[open(3), open(3)],
        ErrorCode::ProtocolError,
        "OPEN reuses stream id 3",
    );
    let (s, now) = authed_server(Config::default());
    expect_goaway(
        s,
        now,
        &[open(2)],
        ErrorCode::ProtocolError,
        "OPEN with even stream id 2",
    );
    let (s, now) = authed_server(Config::default());
    expect_goaway(
        s,
        now,
        &[data(5, 10)],
        ErrorCode::ProtocolError,
        "DATA on stream 5, which was never opened",
    );
    let (s, now) = authed_server(Config::default());
    let rst = Frame::Rst {
        id: 9,
        code: ResetCode::Cancel,
    };
    expect_goaway(
        s,
        now,
        &[rst],
        ErrorCode::ProtocolError,
        "RST for stream 9, which was never opened",
    );
    let (s, now) = authed_server(Config::default());
    let fin = Frame::Data {
        id: 1,
        fin: true,
        payload: Bytes::from_static(b"x"),
    };
    expect_goaway(
        s,
        now,
        &[open(1), fin, data(1, 1)],
        ErrorCode::ProtocolError,
        "DATA on stream 1 after its FIN",
    );
}

#[test]
fn frames_for_a_stream_we_reset_are_ignored() {
    let (mut s, now) = authed_server(Config::default());
    s.handle_input(now, &wire(&[open(1)])).unwrap();
    s.reset(1, ResetCode::Refused).unwrap();
    // In flight before the peer saw our RST: not an error, and the credit comes back.
    let late = [
        data(1, 100),
        Frame::WindowUpdate {
            id: 1,
            increment: 5,
        },
        Frame::Rst {
            id: 1,
            code: ResetCode::Cancel,
        },
    ];
    s.handle_input(now, &wire(&late)).unwrap();
    assert!(!s.is_closed());
}

#[test]
fn bad_window_increments_are_rejected() {
    let (s, now) = authed_server(Config::default());
    let zero = Frame::WindowUpdate {
        id: 0,
        increment: 0,
    };
    expect_goaway(
        s,
        now,
        &[zero],
        ErrorCode::ProtocolError,
        "WINDOW_UPDATE with a zero increment on stream 0",
    );
    let (s, now) = authed_server(Config::default());
    let huge = Frame::WindowUpdate {
        id: 0,
        increment: u32::MAX,
    };
    expect_goaway(
        s,
        now,
        &[huge],
        ErrorCode::FlowControlError,
        "overflows the connection window",
    );
    let (s, now) = authed_server(Config::default());
    let huge = Frame::WindowUpdate {
        id: 1,
        increment: 1 << 31,
    };
    expect_goaway(
        s,
        now,
        &[open(1), huge],
        ErrorCode::FlowControlError,
        "overflows the window of stream 1",
    );
}

#[test]
fn second_auth_and_server_only_frames_are_rejected() {
    let (s, now) = authed_server(Config::default());
    let auth = Frame::Auth(Bytes::from_static(GOOD_TOKEN));
    expect_goaway(
        s,
        now,
        &[auth],
        ErrorCode::ProtocolError,
        "second AUTH frame",
    );
    let (s, now) = authed_server(Config::default());
    expect_goaway(
        s,
        now,
        &[Frame::OpenOk { id: 1 }],
        ErrorCode::ProtocolError,
        "OPEN_OK frame sent by the client",
    );
}

#[test]
fn rapid_resets_exhaust_the_reset_budget() {
    let config = Config {
        reset_budget: 200,
        ..Config::default()
    };
    let (mut s, now) = authed_server(config);
    let mut frames = Vec::new();
    for i in 0..200u32 {
        let id = 2 * i + 1;
        frames.push(open(id));
        frames.push(Frame::Rst {
            id,
            code: ResetCode::Cancel,
        });
    }
    s.handle_input(now, &wire(&frames)).unwrap();
    // A new budget window starts after 10 s: the same burst is fine again.
    let later = now + Duration::from_secs(10);
    s.handle_input(
        later,
        &wire(&[
            open(401),
            Frame::Rst {
                id: 401,
                code: ResetCode::Cancel,
            },
        ]),
    )
    .unwrap();
    let mut frames = Vec::new();
    for i in 201..401u32 {
        let id = 2 * i + 1;
        frames.push(open(id));
        frames.push(Frame::Rst {
            id,
            code: ResetCode::Cancel,
        });
    }
    expect_goaway(
        s,
        later,
        &frames,
        ErrorCode::EnhanceYourCalm,
        "more than 200 streams reset before being answered within 10s",
    );
}

#[test]
fn ping_flood_exhausts_the_ping_budget() {
    let (mut s, now) = authed_server(Config::default());
    let ping = Frame::Ping {
        ack: false,
        opaque: *b"flooding",
    };
    s.handle_input(now, &wire(&vec![ping.clone(); 100]))
        .unwrap();
    let acks = drain(&mut s, now);
    assert_eq!(acks.len(), 100);
    assert!(acks.iter().all(|f| *f
        == Frame::Ping {
            ack: true,
            opaque: *b"flooding"
        }));
    expect_goaway(
        s,
        now,
        &[ping],
        ErrorCode::EnhanceYourCalm,
        "more than 100 pings within 10s",
    );
}

#[test]
fn concurrent_stream_cap_refuses_without_closing() {
    let config = Config {
        max_concurrent_streams: 2,
        ..Config::default()
    };
    let (mut s, now) = authed_server(config);
    s.handle_input(now, &wire(&[open(1), open(3), open(5)]))
        .unwrap();
    let out = drain(&mut s, now);
    assert_eq!(
        out,
        [Frame::Rst {
            id: 5,
            code: ResetCode::StreamLimit
        }]
    );
    assert_eq!(s.stream_count(), 2);
}

#[test]
fn auth_timeout_sends_goaway_and_closes() {
    let now = Instant::now();
    // What an agent passes when the upgrade took 82 µs of its 10 s.
    let left = Duration::from_secs(10) - Duration::from_micros(82);
    let config = Config {
        auth_timeout: left,
        ..Config::default()
    };
    let mut s = Session::server(config, now);
    let deadline = s.poll_timeout().unwrap();
    assert_eq!(deadline - now, left);
    s.handle_timeout(deadline - Duration::from_millis(1));
    assert!(!s.is_closed());
    s.handle_timeout(deadline);
    assert_eq!(s.close_reason(), Some(&CloseReason::AuthTimeout));
    match drain(&mut s, deadline).as_slice() {
        [Frame::GoAway {
            code: ErrorCode::AuthTimeout,
            reason,
            ..
        }] => assert_eq!(reason, "no authentication within 10.0s of the connection"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn the_auth_deadline_holds_even_while_the_driver_decides() {
    let now = Instant::now();
    let mut s = Session::server(Config::default(), now);
    s.handle_input(now, &wire(&[Frame::Auth(Bytes::from_static(b"x"))]))
        .unwrap();
    s.handle_timeout(now + Duration::from_secs(10));
    assert_eq!(s.close_reason(), Some(&CloseReason::AuthTimeout));
}

#[test]
fn nothing_leaves_the_server_before_auth_is_accepted() {
    let now = Instant::now();
    let mut s = Session::server(Config::default(), now);
    let ping = Frame::Ping {
        ack: false,
        opaque: [1; 8],
    };
    s.handle_input(
        now,
        &wire(&[Frame::Auth(Bytes::from_static(b"x")), open(1), ping]),
    )
    .unwrap();
    let evs = events(&mut s);
    assert!(matches!(evs[0], Event::AuthRequest(_)));
    assert!(matches!(evs[1], Event::Opened { id: 1, .. }));
    assert!(
        drain(&mut s, now).is_empty(),
        "no byte before the auth decision"
    );
    assert!(s.accept(1).is_err(), "accept before auth_accept is refused");
    s.auth_accept().unwrap();
    let out = drain(&mut s, now);
    assert_eq!(out[0], Frame::AuthOk);
    assert!(out.contains(&Frame::Ping {
        ack: true,
        opaque: [1; 8]
    }));
}

#[test]
fn client_rejects_frames_before_auth_ok() {
    let now = Instant::now();
    let mut c = Session::client(Config::default(), now);
    c.send_auth(b"proof").unwrap();
    let err = c
        .handle_input(
            now,
            &wire(&[Frame::Ping {
                ack: false,
                opaque: [0; 8],
            }]),
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "peer broke the protocol (protocol error): PING frame before AUTH_OK"
    );
}

#[test]
fn peer_goaway_with_an_error_closes_the_session() {
    let now = Instant::now();
    let mut c = Session::client(Config::default(), now);
    let id = c.open(Target::new("", 80).unwrap()).unwrap();
    c.send_auth(b"proof").unwrap();
    let goaway = Frame::GoAway {
        last_id: 0,
        code: ErrorCode::ProtocolError,
        reason: "bad frame".into(),
    };
    c.handle_input(now, &wire(&[Frame::AuthOk, goaway]))
        .unwrap();
    let reason = c.close_reason().unwrap().clone();
    assert_eq!(
        reason.to_string(),
        "peer closed the carrier: protocol error: bad frame"
    );
    assert!(c.write(id, b"x").is_err());
}

#[test]
fn a_goaway_reason_cannot_forge_log_lines() {
    let now = Instant::now();
    let mut c = Session::client(Config::default(), now);
    c.send_auth(b"proof").unwrap();
    let goaway = Frame::GoAway {
        last_id: 0,
        code: ErrorCode::NoError,
        reason: "bye\n2026-01-01T00:00:00Z  INFO carrier authenticated \u{1b}[32m".into(),
    };
    c.handle_input(now, &wire(&[Frame::AuthOk, goaway]))
        .unwrap();
    let reason = events(&mut c)
        .into_iter()
        .find_map(|e| match e {
            Event::GoAway { reason, .. } => Some(reason),
            _ => None,
        })
        .expect("a GoAway event");
    assert!(!reason.chars().any(char::is_control), "{reason:?}");
    assert!(reason.starts_with("bye\\n2026"), "{reason:?}");
}

#[test]
fn resets_of_established_streams_are_not_rate_limited() {
    let (mut s, now) = authed_server(Config::default());
    for i in 0..300u32 {
        let id = 2 * i + 1;
        s.handle_input(now, &wire(&[open(id)])).unwrap();
        s.accept(id).unwrap();
        let rst = Frame::Rst {
            id,
            code: ResetCode::Cancel,
        };
        s.handle_input(now, &wire(&[rst])).unwrap();
    }
    assert!(!s.is_closed());
}

#[test]
fn a_burst_of_refusals_does_not_close_the_client() {
    let now = Instant::now();
    let mut c = Session::client(Config::default(), now);
    c.send_auth(b"proof").unwrap();
    let mut frames = vec![Frame::AuthOk];
    for _ in 0..300 {
        let id = c.open(Target::new("", 1).unwrap()).unwrap();
        frames.push(Frame::Rst {
            id,
            code: ResetCode::Refused,
        });
        if frames.len() > 200 {
            c.handle_input(now, &wire(&frames)).unwrap();
            frames.clear();
        }
    }
    c.handle_input(now, &wire(&frames)).unwrap();
    assert!(!c.is_closed());
}

#[test]
fn tiny_data_frames_cost_about_their_size_in_memory() {
    // A peer within its window may send it as 1-byte frames. Held one per frame, each byte cost
    // a queue slot and an allocation: 44 times its size (a report measured 740 MB of agent
    // memory for 16.8 MB of window). Small payloads must be stored together, in order.
    let (mut s, now) = authed_server(Config::default());
    s.handle_input(now, &wire(&[open(1)])).unwrap();
    let mut sent = Vec::new();
    let mut frames = Vec::new();
    for i in 0..200_000u32 {
        // Mostly single bytes, with a large payload now and then: order must survive both.
        let payload: Vec<u8> = if i % 50_000 == 25_000 {
            (0..4096).map(|k| (k % 251) as u8).collect()
        } else {
            vec![(i % 253) as u8]
        };
        sent.extend_from_slice(&payload);
        frames.push(Frame::Data {
            id: 1,
            fin: false,
            payload: Bytes::from(payload),
        });
    }
    assert!(sent.len() <= 256 * 1024, "stays within the initial window");
    s.handle_input(now, &wire(&frames)).unwrap();
    let held = s.memory_estimate();
    assert!(
        held <= 2 * sent.len() + 64 * 1024,
        "{} bytes received as {} frames are held in {held} bytes",
        sent.len(),
        frames.len()
    );
    let mut got = Vec::new();
    let mut buf = [0u8; 3000];
    while let forward_mux::ReadOutcome::Data(n) = s.read(1, &mut buf).unwrap() {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "bytes came out of order");
}

#[test]
fn a_close_keeps_streams_the_peer_finished_readable_and_drops_the_others() {
    use forward_mux::{ReadOutcome, StreamError};
    let (mut s, now) = authed_server(Config::default());
    let fin = |id: u32, body: &[u8]| Frame::Data {
        id,
        fin: true,
        payload: Bytes::copy_from_slice(body),
    };
    s.handle_input(now, &wire(&[open(1), open(3), open(5)]))
        .unwrap();
    for id in [1, 3] {
        s.accept(id).unwrap();
    }
    // 1: whole (FIN). 3: mid-transfer. 5: whole, but never accepted (its dial still ran).
    s.handle_input(
        now,
        &wire(&[fin(1, b"complete"), data(3, 100), fin(5, b"x")]),
    )
    .unwrap();
    s.write(1, b"unsent answer").unwrap();
    s.close_now(ErrorCode::NoError, "carrier ended");
    assert!(s.is_complete_after_close(1));
    assert!(!s.is_complete_after_close(3) && !s.is_complete_after_close(5));

    let mut buf = [0u8; 64];
    assert_eq!(s.read(1, &mut buf).unwrap(), ReadOutcome::Data(8));
    assert_eq!(&buf[..8], b"complete");
    assert!(matches!(
        s.write(1, b"more"),
        Err(StreamError::SessionClosed)
    ));
    assert_eq!(s.read(1, &mut buf).unwrap(), ReadOutcome::Fin);
    assert!(!s.is_complete_after_close(1), "read to its end, then gone");
    for id in [3, 5] {
        assert!(matches!(
            s.read(id, &mut buf),
            Err(StreamError::SessionClosed)
        ));
    }
    // Nothing more leaves after the final GOAWAY: no window update for bytes read late.
    let out = drain(&mut s, now);
    assert!(matches!(out.last(), Some(Frame::GoAway { .. })), "{out:?}");
    assert_eq!(drain(&mut s, now), Vec::<Frame>::new());
}

/// A library user's absurd timeouts are clamped: deadlines are `now + interval`, and
/// `Duration::MAX` overflowed the clock (a panic in `poll_timeout`).
#[test]
fn absurd_timeouts_do_not_overflow_the_clock() {
    let now = Instant::now();
    let config = Config {
        idle_timeout: Duration::MAX,
        auth_timeout: Duration::MAX,
        keepalive_interval: Duration::MAX,
        rtt_probe_interval: Duration::MAX,
        ..Config::default()
    };
    for mut s in [
        Session::client(config.clone(), now),
        Session::server(config.clone(), now),
    ] {
        let due = s.poll_timeout().expect("a live session has a deadline");
        assert!(due > now + Duration::from_secs(364 * 24 * 3600), "{due:?}");
        s.handle_timeout(now + Duration::from_secs(3600));
        assert!(s.poll_timeout().is_some());
    }
}
