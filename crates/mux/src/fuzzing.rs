//! Entry points shared by the cargo-fuzz targets in `fuzz/` and the stable corpus test
//! (`tests/fuzz_corpus.rs`). Each must return normally for every input: a panic is a bug.

use std::time::{Duration, Instant};

use crate::decoder::Decoder;
use crate::event::{Event, ReadOutcome};
use crate::frame::Frame;
use crate::session::Session;
use crate::{Config, ResetCode};

/// Decode `data` split at points taken from its first byte, and check that every decoded frame
/// re-encodes to bytes that decode to the same frame.
pub fn frame_decode(data: &[u8]) {
    let step = data.first().map_or(1, |b| usize::from(*b % 17) + 1);
    let mut decoder = Decoder::new();
    for chunk in data.chunks(step) {
        let mut input = chunk;
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(frame)) => check_round_trip(&frame),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

fn check_round_trip(frame: &Frame) {
    let mut wire = Vec::new();
    frame.encode(&mut wire);
    let again = crate::decoder::decode_all(&wire).expect("a re-encoded frame decodes");
    assert_eq!(
        again.as_slice(),
        std::slice::from_ref(frame),
        "frame survives a round trip"
    );
}

/// Feed `data` to a session as a peer would, acting as a busy driver between chunks.
///
/// The first byte picks the scenario: a server before auth, a server that accepts the AUTH the input
/// starts with, or a client that has sent AUTH.
pub fn session_input(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let config = Config {
        stream_window: 1024,
        connection_window: 4096,
        max_concurrent_streams: 8,
        max_pending_opens: 4,
        reset_budget: 10,
        ping_budget: 10,
        ..Config::default()
    };
    let start = Instant::now();
    let mut now = start;
    let mut session = match mode % 3 {
        0 | 1 => Session::server(config, now),
        _ => {
            let mut s = Session::client(config, now);
            let _ = s.open(crate::Target {
                host: "db".into(),
                port: 5432,
            });
            let _ = s.send_auth(b"proof");
            let _ = s.open(crate::Target {
                host: String::new(),
                port: 22,
            });
            s
        }
    };
    let accept_auth = mode % 3 == 1;
    let step = usize::from(mode / 3 % 31) + 1;
    let mut out = Vec::new();
    let mut buf = [0u8; 700];
    for chunk in rest.chunks(step) {
        now += Duration::from_millis(u64::from(chunk[0] % 50));
        let _ = session.handle_input(now, chunk);
        while let Some(event) = session.poll_event() {
            match event {
                // Err when a later frame of the same input already closed the session: fine.
                Event::AuthRequest(_) if accept_auth => drop(session.auth_accept()),
                Event::AuthRequest(_) => drop(session.auth_reject()),
                Event::Opened { id, .. } => {
                    if id % 4 == 1 {
                        let _ = session.accept(id);
                        let _ = session.write(id, b"hello");
                    } else {
                        let _ = session.reset(id, ResetCode::Refused);
                    }
                }
                Event::Readable(id) => {
                    while let Ok(ReadOutcome::Data(_)) = session.read(id, &mut buf) {}
                }
                _ => {}
            }
        }
        out.clear();
        while session.poll_transmit(now, &mut out, 4096) > 0 {
            out.clear();
        }
        if let Some(t) = session.poll_timeout() {
            if chunk[0] == 0xff {
                session.handle_timeout(t);
                now = now.max(t);
            }
        }
    }
}
