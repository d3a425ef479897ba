//! A connection that breaks in the middle must look broken to the local client: a reset, never a
//! clean EOF that would pass a truncated download off as complete.

use std::io::{ErrorKind, Read, Write};
use std::thread;
use std::time::Duration;

use crate::harness::{free_v6_port, Src, TIMEOUT};
use crate::net::{echo_exchange, Backend, Conn, CHUNK};
use crate::stack::{Stack, Transport, VM_FQDN};

per_transport!(carrier_killed_mid_transfer);
per_transport!(edge_aborts_mid_transfer: direct, agent_tls);
per_transport!(a_cut_unix_socket_is_logged_as_closed_not_reset: direct, agent_tls);
per_transport!(service_resets_mid_transfer);
per_transport!(failing_forward_does_not_disturb_others);
per_transport!(a_long_upload_cut_is_not_blamed_on_the_service_bind: direct);
per_transport!(forward_killed_mid_download);
per_transport!(the_same_failure_is_logged_once_per_interval: direct, agent_tcp);
per_transport!(agent_killed_mid_upload: agent_tls, agent_tcp, quic);

/// Reads until the connection ends and asserts it ended with ECONNRESET. The client only reads
/// (no concurrent writes): a failed write would consume the socket's pending error and let the
/// next read return 0.
fn expect_reset(mut conn: Conn, after: usize) -> usize {
    let mut buf = vec![0; CHUNK];
    let mut total = after;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => panic!(
                "client saw a clean EOF after {total} bytes of a broken connection; want a reset"
            ),
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return total,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("client: want ConnectionReset, got {e} ({:?})", e.kind()),
        }
    }
}

/// A service that streams data until the connection breaks.
fn endless_source() -> Backend {
    Backend::start(|mut sock, _tx| {
        let buf = vec![0x5a; CHUNK];
        while sock.write_all(&buf).is_ok() {}
    })
}

fn read_at_least(conn: &mut Conn, want: usize) -> usize {
    let mut buf = vec![0; CHUNK];
    let mut got = 0;
    while got < want {
        match conn.read(&mut buf) {
            Ok(0) => panic!("EOF after {got} bytes while the service was still sending"),
            Ok(n) => got += n,
            Err(e) => panic!("read failed after {got} bytes: {e}"),
        }
    }
    got
}

/// The edge (or, without an edge, the agent) is killed with SIGKILL mid-download.
fn carrier_killed_mid_transfer(t: Transport) {
    let backend = endless_source();
    let mut stack = Stack::start(t, &[backend.port]);
    let fwd = stack.forward_to(backend.port);

    let mut conn = fwd.local().connect();
    let got = read_at_least(&mut conn, 4 * 1024 * 1024);
    stack.kill_carrier();
    expect_reset(conn, got);
    drop(fwd);
}

/// The edge's fault injection resets the edge-side connection after 4 MiB.
fn edge_aborts_mid_transfer(t: Transport) {
    let backend = endless_source();
    let stack =
        Stack::start_with_edge_args(t, &[backend.port], &["--abort-after-bytes", "4194304"]);
    let fwd = stack.forward_to(backend.port);
    expect_reset(fwd.local().connect(), 0);
}

/// A Unix socket has no reset, so its client sees a cut as an end of stream (README says so);
/// the log says that, where it used to claim both sides were reset.
fn a_cut_unix_socket_is_logged_as_closed_not_reset(t: Transport) {
    let backend = endless_source();
    let stack =
        Stack::start_with_edge_args(t, &[backend.port], &["--abort-after-bytes", "4194304"]);
    let sock = stack.dir.join("cut.sock");
    let spec = format!("{}:{}", sock.display(), stack.target(backend.port));
    let mut fwd = stack.forward(&[], &[spec], 1);
    let mut conn = fwd.local().connect();
    let mut got = Vec::new();
    let _ = conn.read_to_end(&mut got);
    fwd.proc.wait_line(Src::Stderr, "the cut's log line", |l| {
        l.contains("the local Unix socket closed (it has no reset")
    });
}

/// The service aborts its connection (close with unread input, which makes the kernel send RST);
/// the reset must travel to the local client.
fn service_resets_mid_transfer(t: Transport) {
    let backend = Backend::start(|mut sock, _tx| {
        let _ = sock.write_all(&vec![0xa5; 1024 * 1024]);
        // Wait until the client's bytes sit unread in our receive queue, then close: RST.
        let mut probe = [0u8; 1];
        let deadline = std::time::Instant::now() + TIMEOUT;
        while std::time::Instant::now() < deadline {
            match sock.peek(&mut probe) {
                Ok(n) if n > 0 => break,
                _ => thread::sleep(Duration::from_millis(10)),
            }
        }
        drop(sock);
    });
    let stack = Stack::start(t, &[backend.port]);
    let fwd = stack.forward_to(backend.port);

    let mut conn = fwd.local().connect();
    conn.write_all(b"unread request bytes").unwrap();
    expect_reset(conn, 0);
}

/// One forward of a process points at a VM port where nothing listens: its connections are reset
/// and logged with that forward's name, while a busy connection of another forward carries on.
fn failing_forward_does_not_disturb_others(t: Transport) {
    let backend = Backend::echo();
    let dead = free_v6_port();
    let stack = Stack::start(t, &[backend.port, dead]);
    let mut fwd = stack.forward(
        &[],
        &[
            format!("127.0.0.1:0:{}", stack.target(backend.port)),
            format!("127.0.0.1:0:{}", stack.target(dead)),
        ],
        2,
    );
    let (good, bad) = (fwd.locals[0].clone(), fwd.locals[1].clone());

    let busy = thread::spawn(move || echo_exchange(good.connect(), rand::random(), 16 << 20));
    for _ in 0..5 {
        match bad.try_connect() {
            Ok(conn) => {
                expect_reset(conn, 0);
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connect to the failing forward: {e}"),
        }
    }
    busy.join()
        .expect("the healthy forward's connection failed");

    // The label differs by mode (`vm1.vm.vers.sh:P (direct)`, `vm1.vm.vers.sh localhost:P (agent
    // tcp)`); both name the VM and the port.
    let port = format!(":{}", stack.rport(dead));
    fwd.proc
        .wait_line(Src::Stderr, "a log line naming the failing forward", |l| {
            l.contains(VM_FQDN) && l.contains(&port)
        });
}

/// An upload to a service that answers only at the end, cut after a while by the edge dying:
/// the log says the connection broke, and not that nothing listens on the VM's port (the hint
/// for an edge that hangs up right after the handshake, which a user was sent hunting for).
fn a_long_upload_cut_is_not_blamed_on_the_service_bind(t: Transport) {
    let sink = Backend::start(|mut sock, _tx| {
        let mut buf = vec![0; CHUNK];
        while matches!(sock.read(&mut buf), Ok(n) if n > 0) {}
    });
    let mut stack = Stack::start(t, &[sink.port]);
    let mut fwd = stack.forward_to(sink.port);
    let mut conn = fwd.local().connect();
    let chunk = vec![0x33; CHUNK];
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        conn.write_all(&chunk).expect("uploading before the cut");
    }
    stack.kill_carrier();
    while conn.write_all(&chunk).is_ok() {}
    let line = fwd
        .proc
        .wait_line(Src::Stderr, "the cut connection's log line", |l| {
            l.contains("connection failed")
        });
    assert!(
        !line.contains("before any reply") && !line.contains("0.0.0.0"),
        "a connection that ran for 1.5 s blamed on the service's bind: {line}"
    );
}

/// forward itself dies (kill -9, the OOM killer): the kernel closes its sockets, and the local
/// client must see a reset, not the FIN of an orderly end that would pass the cut download off
/// as whole (`nc > file`, an HTTP/1.0 body).
fn forward_killed_mid_download(t: Transport) {
    let backend = endless_source();
    let mut stack = Stack::start(t, &[backend.port]);
    let mut fwd = stack.forward_to(backend.port);
    let mut conn = fwd.local().connect();
    let got = read_at_least(&mut conn, 1024 * 1024);
    fwd.proc.kill();
    expect_reset(conn, got);
    // The agent's log says the carrier's end cost a VM-side connection.
    if matches!(t, Transport::AgentTls | Transport::AgentTcp) {
        stack
            .agent_proc_mut()
            .wait_line(Src::Stderr, "the carrier's end", |l| {
                l.contains("carrier ended; its 1 open stream(s) were reset")
            });
    }
}

/// The agent dies mid-upload: the VM service must see its connection reset, not an orderly
/// end that would pass the cut upload off as whole.
fn agent_killed_mid_upload(t: Transport) {
    let sink = Backend::start(|mut sock, tx| {
        let mut buf = vec![0; CHUNK];
        let mut total = 0;
        let mut started = false;
        let note = loop {
            match sock.read(&mut buf) {
                Ok(0) => break "eof".to_string(),
                Ok(n) => total += n,
                Err(e) => break format!("{:?}", e.kind()),
            }
            if !started && total >= 1 << 20 {
                // The upload is under way end to end: the test may kill the agent now.
                started = true;
                let _ = tx.send(crate::net::Report {
                    received: total,
                    hash: Default::default(),
                    note: "started".into(),
                });
            }
        };
        let _ = tx.send(crate::net::Report {
            received: total,
            hash: Default::default(),
            note,
        });
    });
    let mut stack = Stack::start(t, &[]);
    let fwd = stack.forward(
        &[],
        &[format!("127.0.0.1:0:{}", stack.target(sink.port))],
        1,
    );
    let mut conn = fwd.local().connect();
    let chunk = vec![0x44; CHUNK];
    let writer = thread::spawn(move || while conn.write_all(&chunk).is_ok() {});
    assert_eq!(sink.next_report().note, "started");
    stack.kill_agent();
    let report = sink.next_report();
    assert_eq!(
        report.note, "ConnectionReset",
        "the service saw {} after {} bytes; want a reset",
        report.note, report.received
    );
    drop(fwd);
    let _ = writer.join();
}

/// Twenty connections to a port with nothing behind it fail for one reason: one log line says
/// so, not twenty (a client retrying 20 times a second wrote 1,180 identical lines a minute).
/// Half of them send a request first, so the failure is met writing as well as reading: one
/// cause still, one line (two before, one per direction).
fn the_same_failure_is_logged_once_per_interval(t: Transport) {
    let dead = free_v6_port();
    let stack = Stack::start(t, &[dead]);
    let mut fwd = stack.forward_to(dead);
    for i in 0..20 {
        match fwd.local().try_connect() {
            Ok(mut conn) => {
                if i % 2 == 0 {
                    // The request may already meet the reset: either way it ends in one.
                    let _ = conn.write_all(&[0x47; 64 * 1024]);
                }
                expect_reset(conn, 0);
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connect: {e}"),
        }
    }
    fwd.proc.wait_line(Src::Stderr, "the failure's line", |l| {
        l.contains("connection failed")
    });
    // The last failures may still be on their way to the log: give them a moment.
    thread::sleep(Duration::from_millis(300));
    let lines = fwd
        .proc
        .stderr_text()
        .lines()
        .filter(|l| l.contains("connection failed"))
        .count();
    assert_eq!(lines, 1, "log:\n{}", fwd.proc.stderr_text());
}
