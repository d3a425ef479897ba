//! Half-close in both directions: a FIN travels end to end while the other direction stays open.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::net::{drain, hex, Backend, Payload, Report};
use crate::stack::{Stack, Transport};

per_transport!(client_half_closes_server_answers_later);
per_transport!(server_closes_first_client_still_uploads);
// The mux carries FIN in-band, so agent mode keeps half-close even through an edge that drops it
// (like nginx's stream proxy without proxy_half_close).
per_transport!(half_close_through_edge_that_drops_it: agent_tls);
per_transport!(client_half_closes_then_resets);

fn client_half_closes_server_answers_later(t: Transport) {
    client_half_close_case(t, &[]);
}

fn server_closes_first_client_still_uploads(t: Transport) {
    server_close_first_case(t, &[]);
}

fn half_close_through_edge_that_drops_it(t: Transport) {
    client_half_close_case(t, &["--no-half-close"]);
    server_close_first_case(t, &["--no-half-close"]);
}

/// The client sends a request, shuts its write side, then gives up with a reset while the
/// service is still silent: the service must learn that its client is gone (a reset), not wait
/// forever on a connection nobody will read.
fn client_half_closes_then_resets(t: Transport) {
    let backend = Backend::start(|mut sock, tx| {
        let (n, h) = drain(&mut sock).expect("service: read request to EOF");
        let _ = tx.send(Report {
            received: n,
            hash: h,
            note: "request".into(),
        });
        // After a FIN, Linux reads return 0 even once an RST came, and a probing write would
        // itself give the tunnel something to fail on: watch the socket's error instead.
        let deadline = std::time::Instant::now() + crate::harness::TIMEOUT / 2;
        let note = loop {
            match sock.take_error() {
                Ok(Some(e)) | Err(e) => break format!("{:?}", e.kind()),
                Ok(None) if std::time::Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => break "still open: the reset never arrived".to_string(),
            }
        };
        let _ = tx.send(Report {
            received: 0,
            hash: [0; 32],
            note,
        });
    });
    let stack = Stack::start(t, &[backend.port]);
    let fwd = stack.forward_to(backend.port);

    let mut conn = fwd.local().connect();
    let sent = Payload::new(rand::random(), 64 * 1024 + 3)
        .send(&mut conn)
        .unwrap();
    conn.shutdown_write().unwrap();
    let r = backend.next_report();
    assert_eq!(hex(&r.hash), hex(&sent), "request bytes at the service");
    let crate::net::Conn::Tcp(tcp) = conn else {
        unreachable!("forward_to listens on TCP")
    };
    socket2::SockRef::from(&tcp)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(tcp);
    let r = backend.next_report();
    assert!(
        r.note == "ConnectionReset" || r.note == "BrokenPipe",
        "service after the client's reset: {}",
        r.note
    );
}

/// The client sends a request and shuts its write side; the service reads to EOF, waits 2 s (so a
/// tunnel that tore the connection down on the first FIN would be caught), then answers with the
/// hash of the request followed by 1 MiB; the client gets all of it, then EOF.
fn client_half_close_case(t: Transport, edge_args: &[&str]) {
    let answer_seed: u64 = rand::random();
    let backend = Backend::start(move |mut sock, tx| {
        let (n, h) = drain(&mut sock).expect("service: read request to EOF");
        thread::sleep(Duration::from_secs(2));
        sock.write_all(&h).expect("service: answer hash");
        Payload::new(answer_seed, 1 << 20)
            .send(&mut sock)
            .expect("service: answer body");
        sock.shutdown(Shutdown::Write).unwrap();
        let _ = tx.send(Report {
            received: n,
            hash: h,
            note: "answered".into(),
        });
        // Keep the read side open until the client is done, then close normally.
        let mut rest = Vec::new();
        let _ = sock.read_to_end(&mut rest);
    });
    let stack = Stack::start_with_edge_args(t, &[backend.port], edge_args);
    let fwd = stack.forward_to(backend.port);

    let mut conn = fwd.local().connect();
    let req_seed: u64 = rand::random();
    let req_len = 3 * 1024 * 1024 + 17;
    let sent = Payload::new(req_seed, req_len).send(&mut conn).unwrap();
    conn.shutdown_write().unwrap();

    let mut answer = Vec::new();
    match conn.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) => panic!(
            "client: reading the answer failed after {} bytes: {e}",
            answer.len()
        ),
    }
    assert_eq!(answer.len(), 32 + (1 << 20), "answer length");
    assert_eq!(
        hex(answer[..32].try_into().unwrap()),
        hex(&sent),
        "service saw other request bytes"
    );
    let body: [u8; 32] = Sha256::digest(&answer[32..]).into();
    assert_eq!(
        hex(&body),
        hex(&Payload::hash(answer_seed, 1 << 20)),
        "answer body differs"
    );

    let r = backend.next_report();
    assert_eq!(r.received, req_len);
}

/// The service sends its whole reply and shuts its write side while the client is still uploading;
/// the client sees the reply then EOF, keeps uploading, and every uploaded byte reaches the service.
fn server_close_first_case(t: Transport, edge_args: &[&str]) {
    let reply_seed: u64 = rand::random();
    let reply_len = 2 * 1024 * 1024 + 5;
    let backend = Backend::start(move |mut sock, tx| {
        Payload::new(reply_seed, reply_len)
            .send(&mut sock)
            .expect("service: send reply");
        sock.shutdown(Shutdown::Write).unwrap();
        let note = match drain(&mut sock) {
            Ok((n, h)) => {
                let _ = tx.send(Report {
                    received: n,
                    hash: h,
                    note: "eof".into(),
                });
                return;
            }
            Err((e, n)) => format!("read error after {n} bytes: {e}"),
        };
        let _ = tx.send(Report {
            received: 0,
            hash: [0; 32],
            note,
        });
    });
    let stack = Stack::start_with_edge_args(t, &[backend.port], edge_args);
    let fwd = stack.forward_to(backend.port);

    let conn = fwd.local().connect();
    let mut reader = conn.try_clone();
    let (eof_tx, eof_rx) = mpsc::channel();
    let down = thread::spawn(move || {
        let r = drain(&mut reader);
        let _ = eof_tx.send(());
        r
    });

    let up_seed: u64 = rand::random();
    let first = Payload::bytes(up_seed, 4 * 1024 * 1024);
    let second = Payload::bytes(up_seed ^ 1, 4 * 1024 * 1024);
    let mut writer = conn;
    writer.write_all(&first).unwrap();
    // Only after the client has seen the service's EOF does the second half go up: the upload
    // provably continues after the other direction closed.
    eof_rx
        .recv_timeout(crate::harness::TIMEOUT)
        .expect("client never saw the service's EOF");
    writer.write_all(&second).unwrap();
    writer.shutdown_write().unwrap();

    match down.join().unwrap() {
        Ok((n, h)) => {
            assert_eq!(n, reply_len, "reply length");
            assert_eq!(
                hex(&h),
                hex(&Payload::hash(reply_seed, reply_len)),
                "reply bytes"
            );
        }
        Err((e, n)) => panic!("client: download failed after {n} bytes: {e}"),
    }

    let r = backend.next_report();
    assert_eq!(r.note, "eof", "service: {r:?}");
    let mut h = Sha256::new();
    h.update(&first);
    h.update(&second);
    let want: [u8; 32] = h.finalize().into();
    assert_eq!(
        r.received,
        first.len() + second.len(),
        "upload length at the service"
    );
    assert_eq!(hex(&r.hash), hex(&want), "upload bytes at the service");
}
