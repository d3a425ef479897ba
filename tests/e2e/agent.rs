//! Behaviour only the agent transports have (issue 3): authentication, a carrier shared by many
//! streams, reconnecting after the agent comes back, and VM-local services the edge cannot reach.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::{forward_bin, run, Src, TempDir, TIMEOUT};
use crate::net::{echo_exchange, Backend, Conn, Local, CHUNK};
use crate::stack::{Forward, Stack, Transport};

per_transport!(wrong_token_is_rejected: agent_tls, agent_tcp, quic);
per_transport!(agent_killed_then_back: agent_tls, agent_tcp, quic);
per_transport!(agent_down_resets_a_new_connection_at_once: agent_tls, agent_tcp);
per_transport!(reconnect_warnings_thin_out_while_the_agent_stays_down: agent_tls, agent_tcp);
per_transport!(a_drained_carrier_cut_alone_claims_no_other_carrier: agent_tls, agent_tcp);
per_transport!(ipv4_only_service_is_reachable: agent_tls, agent_tcp, quic);
per_transport!(thousand_streams_one_stalled: agent_tls, agent_tcp, quic);
per_transport!(stalled_readers_hold_at_most_their_windows: agent_tls, agent_tcp);
per_transport!(stalled_readers_do_not_stop_a_quic_carrier: quic);
per_transport!(stalled_uploads_do_not_stop_a_quic_carrier: quic);
per_transport!(wrong_pin_is_rejected: quic);
per_transport!(check_reaches_the_target: agent_tls, agent_tcp, quic);
per_transport!(agent_second_signal_cuts_the_drain: agent_tls, quic);
per_transport!(burst_of_clients_beyond_the_unauthenticated_cap: agent_tls, agent_tcp);
per_transport!(client_exit_is_a_clean_goodbye: agent_tls, agent_tcp);
per_transport!(silent_and_garbage_connections_do_not_disturb: agent_tcp);

fn agent_addr(stack: &Stack) -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, stack.agent_port()))
}

#[test]
fn agent_refuses_missing_or_short_token() {
    let dir = TempDir::new("agent-token");
    let mut cmd = Command::new(forward_bin());
    cmd.args(["agent", "--listen", "[::1]:0"])
        .env_remove("VERS_AUTH_TOKEN");
    let (st, out, err) = run("agent without token", cmd);
    assert_eq!(
        st.code(),
        Some(1),
        "want exit 1 without a token:\n{out}{err}"
    );
    assert!(
        err.to_lowercase().contains("token"),
        "stderr should name the token:\n{err}"
    );

    let short = dir.join("short-token");
    std::fs::write(&short, "0123456789abcdef\n").unwrap(); // 64 bits
    let mut cmd = Command::new(forward_bin());
    cmd.args(["agent", "--listen", "[::1]:0", "--token-file"])
        .arg(&short)
        .env_remove("VERS_AUTH_TOKEN");
    let (st, out, err) = run("agent with a short token", cmd);
    assert_eq!(
        st.code(),
        Some(1),
        "want exit 1 for a 64-bit token:\n{out}{err}"
    );
    assert!(
        err.contains("128"),
        "stderr should say a token needs 128 bits:\n{err}"
    );

    // The path of the token file in the variable (meant for --token-file): a long path would
    // pass the strength estimate and fail every authentication.
    let mut cmd = Command::new(forward_bin());
    cmd.args(["agent", "--listen", "[::1]:0"])
        .env("VERS_AUTH_TOKEN", &short);
    let (st, out, err) = run("agent with a path as its token", cmd);
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("holds the path of a file") && err.contains("--token-file"),
        "{err}"
    );

    // Set, but not text: said so, not "no token" (a tester's finding).
    use std::os::unix::ffi::OsStringExt;
    let mut cmd = Command::new(forward_bin());
    cmd.args(["agent", "--listen", "[::1]:0"]).env(
        "VERS_AUTH_TOKEN",
        std::ffi::OsString::from_vec(b"5f0c9a7e2b4d61f3\xff8a9c0e7d2b5a4f6c".to_vec()),
    );
    let (st, out, err) = run("agent with a token that is not UTF-8", cmd);
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("token from VERS_AUTH_TOKEN contains bytes that are not UTF-8 text"),
        "{err}"
    );
}

/// A token file is read whole, but only so far: `/dev/zero` (or a large file given by mistake)
/// is refused at 4 KiB instead of filling memory. A pipe works (`--token-file <(pass show t)`),
/// and one nobody writes to yet can be stopped: the token is read before the signal handlers
/// take over SIGINT and SIGTERM.
#[test]
fn token_files_that_are_not_plain_files() {
    use crate::harness::{Proc, Src};
    let (st, out, err) = run("agent with /dev/zero as token file", {
        let mut cmd = Command::new(forward_bin());
        cmd.args(["agent", "--listen", "[::1]:0", "--token-file", "/dev/zero"]);
        cmd
    });
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(err.contains("more than 4096 bytes"), "{err}");

    let dir = TempDir::new("agent-token-fifo");
    let fifo = dir.join("token");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let agent = |name: &str| {
        let mut cmd = Command::new(forward_bin());
        cmd.args(["agent", "--listen", "[::1]:0", "--token-file"])
            .arg(&fifo);
        Proc::spawn(name, cmd)
    };
    // Nobody writes: a signal ends the wait. SIGTERM, not SIGINT: a shell without job control
    // starts background commands with SIGINT ignored (CI run in the background did).
    let mut waiting = agent("agent waiting on a pipe");
    std::thread::sleep(Duration::from_millis(300));
    waiting.signal("TERM");
    let status = waiting.wait_exit();
    assert!(!status.success(), "{status}");
    // Someone writes: the agent starts with that token.
    let mut reading = agent("agent reading a pipe");
    std::fs::write(&fifo, "9c41e07a2bd35f86c1e94a7d0b3f52e8a6d17c04f9b25e3a\n").unwrap();
    reading.wait_line(Src::Stdout, "the agent's listening line", |l| {
        l.contains("listening on")
    });
    reading.signal("TERM");
    assert!(reading.wait_exit().success());
}

/// With `--log-format json` the agent's start-up lines are JSON too, as the client's
/// `forwarding` lines are: the address (with the port picked for 0) and the QUIC pin.
#[test]
fn agent_start_up_lines_in_json() {
    use crate::harness::{Proc, Src};
    let dir = TempDir::new("agent-json");
    let token = dir.join("token");
    std::fs::write(&token, "9c41e07a2bd35f86c1e94a7d0b3f52e8a6d17c04f9b25e3a").unwrap();
    let mut cmd = Command::new(forward_bin());
    cmd.args([
        "agent",
        "--log-format",
        "json",
        "--listen",
        "[::1]:0",
        "--quic",
    ])
    .args(["--token-file".as_ref(), token.as_os_str()])
    .args(["--state-dir".as_ref(), dir.join("state").as_os_str()]);
    let mut agent = Proc::spawn("agent", cmd);
    let parse = |l: &str| serde_json::from_str::<serde_json::Value>(l).ok();
    let quic = agent.wait_line(Src::Stdout, "the QUIC line", |l| {
        parse(l).is_some_and(|v| v.get("quic_agent").is_some())
    });
    let tcp = agent.wait_line(Src::Stdout, "the agent line", |l| {
        parse(l).is_some_and(|v| v.get("agent").is_some())
    });
    let (quic, tcp) = (parse(&quic).unwrap(), parse(&tcp).unwrap());
    let listen: SocketAddr = tcp["agent"]["listen"].as_str().unwrap().parse().unwrap();
    assert_ne!(listen.port(), 0, "{tcp}");
    assert_eq!(tcp["agent"]["tls"], false, "{tcp}");
    let udp: SocketAddr = quic["quic_agent"]["listen"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(udp.port(), listen.port(), "{quic}");
    let pin = quic["quic_agent"]["pin"].as_str().unwrap();
    assert!(pin.starts_with("sha256:") && pin.len() == 51, "{quic}");
    agent.signal("TERM");
    assert!(agent.wait_exit().success());
}

/// Start-up mistakes on the VM side say what is wrong in one line.
#[test]
fn agent_start_up_errors_name_the_cause() {
    let dir = TempDir::new("agent-startup");
    let token = "00112233445566778899aabbccddeeff";
    let file = dir.join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let mut cmd = Command::new(forward_bin());
    cmd.args(["agent", "--quic", "--listen", "[::1]:0", "--state-dir"])
        .arg(&file)
        .env("VERS_AUTH_TOKEN", token);
    let (st, out, err) = run("agent with a file as --state-dir", cmd);
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(err.contains("exists and is not a directory"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // An address no interface has (TEST-NET-1): nothing is sent, the bind fails at once.
    let mut cmd = Command::new(forward_bin());
    cmd.args(["agent", "--listen", "192.0.2.1:0"])
        .env("VERS_AUTH_TOKEN", token);
    let (st, out, err) = run("agent on a foreign address", cmd);
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(err.contains("no such local address"), "{err}");
}

#[test]
fn health_answers_without_auth() {
    let stack = Stack::start(Transport::AgentTcp, &[]);
    crate::net::assert_health_ok(agent_addr(&stack));
}

/// A stranger's garbage after the upgrade closes its carrier; fifty strangers must not write
/// fifty warnings (protocol.md: what anyone can cause is logged once per 10 s, with a count).
#[test]
fn garbage_from_strangers_is_logged_once_per_interval() {
    const STRANGERS: usize = 50;
    let stack = Stack::start(Transport::AgentTcp, &[]);
    for _ in 0..STRANGERS {
        let mut s = TcpStream::connect(agent_addr(&stack)).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.write_all(
            b"GET /v1/tunnel HTTP/1.1\r\nHost: vm1\r\nConnection: Upgrade\r\nUpgrade: forward-mux/1\r\n\r\n",
        )
        .unwrap();
        // The 101 and its challenge, then garbage where AUTH belongs; the agent closes.
        let mut answer = Vec::new();
        let _ = s.write_all(&[0xff; 64]);
        let _ = s.read_to_end(&mut answer);
        assert!(
            answer.starts_with(b"HTTP/1.1 101"),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    let log = stack.agent_proc().stderr_text();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert!(
        !warnings.is_empty() && warnings.len() <= 2,
        "{} warnings for {STRANGERS} strangers:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    assert!(
        warnings[0].contains("carrier closed before authenticating"),
        "{}",
        warnings[0]
    );
}

/// An upgrade must name its host exactly once (the proof covers it): no Host, two, or a
/// malformed one gets 400, as protocol.md says of anything else on the port.
#[test]
fn an_upgrade_without_one_good_host_is_a_bad_request() {
    let stack = Stack::start(Transport::AgentTcp, &[]);
    for hosts in ["", "Host: a:1\r\nHost: b:2\r\n", "Host: [::1:9999\r\n"] {
        let mut s = TcpStream::connect(agent_addr(&stack)).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let req = format!(
            "GET /v1/tunnel HTTP/1.1\r\n{hosts}Connection: Upgrade\r\nUpgrade: forward-mux/1\r\n\r\n"
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{hosts:?}: {answer:?}");
    }
}

/// A client with another token is refused (`--check` exits 1 naming authentication) and the agent
/// keeps serving the right client.
fn wrong_token_is_rejected(t: Transport) {
    let backend = Backend::echo();
    let stack = Stack::start(t, &[backend.port]);
    let wrong = stack.dir.join("wrong-token");
    std::fs::write(
        &wrong,
        "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100",
    )
    .unwrap();
    let mut args = stack.client_args();
    let i = args.iter().position(|a| a == "--token-file").unwrap();
    args[i + 1] = wrong.into();

    let mut cmd = Command::new(forward_bin());
    cmd.args(&args)
        .arg("--check")
        .arg(format!("127.0.0.1:0:{}", stack.target(backend.port)));
    let (st, out, err) = run("forward --check (wrong token)", cmd);
    assert_eq!(st.code(), Some(1), "want exit 1:\n{out}{err}");
    assert!(
        err.to_lowercase().contains("auth"),
        "stderr should say authentication failed:\n{err}"
    );

    let fwd = stack.forward_to(backend.port);
    echo_exchange(fwd.local().connect(), rand::random(), 1 << 20);
}

/// Killing the agent resets the open streams; once it is back, the same forward process
/// reconnects and serves new connections.
fn agent_killed_then_back(t: Transport) {
    let source = Backend::start(|mut sock, _tx| {
        let buf = vec![0x5a; CHUNK];
        while sock.write_all(&buf).is_ok() {}
    });
    let echo = Backend::echo();
    let mut stack = Stack::start(t, &[]);
    let fwd = stack.forward(
        &[],
        &[
            format!("127.0.0.1:0:{}", stack.target(source.port)),
            format!("127.0.0.1:0:{}", stack.target(echo.port)),
        ],
        2,
    );
    let (src_local, echo_local) = (fwd.locals[0].clone(), fwd.locals[1].clone());

    let mut conn = src_local.connect();
    let mut buf = vec![0; CHUNK];
    let mut got = 0;
    while got < (1 << 20) {
        got += conn.read(&mut buf).expect("download before the kill");
    }
    stack.kill_agent();
    loop {
        match conn.read(&mut buf) {
            Ok(0) => panic!("clean EOF after the agent died; want a reset"),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            // A child of another test exiting interrupts this blocking read (QUIC waits 30 s).
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("want ConnectionReset, got {e}"),
        }
    }

    stack.restart_agent();
    // The carrier comes back with backoff; until then new connections may be reset.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let ok = thread::spawn({
            let local = echo_local.clone();
            move || echo_exchange(local.connect(), rand::random(), 64 * 1024)
        })
        .join()
        .is_ok();
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "forward did not reconnect to the restarted agent within {TIMEOUT:?}"
        );
        thread::sleep(Duration::from_millis(500));
    }
}

/// With the agent down (the edge up, for agent-tls), a new connection is reset with the reason
/// at once: the edge accepts and then hangs up because nothing listens behind it, and that
/// hang-up was taken for an overloaded agent and retried until the connect timeout (6-12 s
/// per connection at the default, while the user's psql hung).
fn agent_down_resets_a_new_connection_at_once(t: Transport) {
    let echo = Backend::echo();
    let mut stack = Stack::start(t, &[]);
    let mut fwd = stack.forward(
        &["--connect-timeout", "60"],
        &[format!("127.0.0.1:0:{}", stack.target(echo.port))],
        1,
    );
    echo_exchange(fwd.local().connect(), 7, 1024);
    stack.kill_agent();
    // The old carrier is gone; the next connection needs a new one.
    for _ in 0..2 {
        let started = Instant::now();
        // The reset can come before the connect call has returned.
        let outcome = first_read(fwd.local());
        let took = started.elapsed();
        match outcome {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("want a reset with the agent down, got {other:?}"),
        }
        // Generous: the point is "not the 60 s connect timeout" (one new carrier attempt, and
        // at most one redial of the lost carrier's backoff ahead of it).
        assert!(
            took < Duration::from_secs(15),
            "the reset took {took:?} with the agent down"
        );
    }
    // The log says why; through the edge, that the edge hung up before the agent answered.
    let why = match t {
        Transport::AgentTls => "closed before the agent answered",
        _ => "connection failed",
    };
    fwd.proc
        .wait_line(Src::Stderr, why, |l| l.contains("WARN") && l.contains(why));
}

/// While the agent stays down, the reconnect attempts go on with backoff but only attempts
/// 1, 2, 4, 8, … (or a new reason) warn: an outage of hours wrote a warning every 30 s.
fn reconnect_warnings_thin_out_while_the_agent_stays_down(t: Transport) {
    let echo = Backend::echo();
    let mut stack = Stack::start(t, &[]);
    let mut fwd = stack.forward_logging(
        "info,forward_tunnel::agent_client=debug",
        &[],
        &[format!("127.0.0.1:0:{}", stack.target(echo.port))],
        1,
    );
    echo_exchange(fwd.local().connect(), 7, 1024);
    stack.kill_agent();
    fwd.proc
        .wait_line(Src::Stderr, "the fifth reconnect attempt", |l| {
            l.contains("reconnect failed (attempt 5")
        });
    let log = fwd.proc.stderr_text();
    let attempts: Vec<(u32, bool)> = log
        .lines()
        .filter_map(|l| {
            let n = l.split("reconnect failed (attempt ").nth(1)?;
            let n: u32 = n
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()?;
            Some((n, l.contains("WARN")))
        })
        .collect();
    let warned: Vec<u32> = attempts.iter().filter(|a| a.1).map(|a| a.0).collect();
    let quiet: Vec<u32> = attempts.iter().filter(|a| !a.1).map(|a| a.0).collect();
    assert_eq!(&warned[..3], &[1, 2, 4], "{log}");
    assert!(quiet.contains(&3), "attempt 3 not logged at debug: {log}");
    assert!(
        !warned.contains(&3) && !warned.contains(&5),
        "same reason warned again: {log}"
    );
}

/// The agent dials VM-local services itself, so a service bound to 127.0.0.1 only (unreachable
/// through the edge, which dials [::1]) works.
fn ipv4_only_service_is_reachable(t: Transport) {
    let backend = Backend::echo_on("127.0.0.1:0");
    let stack = Stack::start(t, &[]);
    let fwd = stack.forward_to(backend.port);
    let sent = echo_exchange(fwd.local().connect(), rand::random(), 4 << 20);
    assert_eq!(backend.next_report().hash, sent);
}

/// One stream whose reader never reads must stall only itself: 1000 other streams on the same
/// carrier complete, memory stays bounded, and the stalled stream still works afterwards.
fn thousand_streams_one_stalled(t: Transport) {
    const N: usize = 1000;
    const LEN: usize = 16 * 1024;
    let (_source, _echo, stack, fwd) = source_and_echo(t, 0x33);
    let mut stalled = fwd.locals[0].connect();
    // Let the source fill every buffer and window on the way.
    thread::sleep(Duration::from_secs(2));

    let barrier = Arc::new(Barrier::new(N));
    let clients: Vec<_> = (0..N)
        .map(|_| {
            let local: Local = fwd.locals[1].clone();
            let barrier = Arc::clone(&barrier);
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let conn = local.connect();
                    barrier.wait();
                    echo_exchange(conn, rand::random(), LEN)
                })
                .unwrap()
        })
        .collect();
    // Join all before judging: a panic here would kill forward and turn the remaining streams'
    // outcome into noise.
    let failed = clients
        .into_iter()
        .map(|c| c.join())
        .filter(|r| r.is_err())
        .count();
    assert_eq!(
        failed, 0,
        "{failed} of {N} streams next to the stalled one failed (see above)"
    );

    let limit_kib = 256 * 1024;
    for (name, rss) in [
        ("forward", fwd.proc.rss_kib()),
        ("agent", stack.agent_proc().rss_kib()),
    ] {
        assert!(
            rss < limit_kib,
            "{name} holds {rss} KiB with one stalled stream; want < {limit_kib} KiB"
        );
    }

    let mut buf = vec![0; CHUNK];
    let mut got = 0;
    while got < (4 << 20) {
        match stalled.read(&mut buf) {
            Ok(0) => panic!("stalled stream ended after {got} bytes"),
            Ok(n) => got += n,
            Err(e) => panic!("stalled stream failed after {got} bytes: {e}"),
        }
    }
}

/// A service that sends `byte` forever and an echo service, forwarded by one forward: locals[0]
/// and locals[1], one carrier.
fn source_and_echo(t: Transport, byte: u8) -> (Backend, Backend, Stack, Forward) {
    let source = Backend::start(move |mut sock, _tx| {
        // A fixed small send buffer: on loopback the kernel otherwise grows it to tcp_wmem's
        // 4 MiB for every stalled stream, which is not forward's memory, and 200 of them put
        // the whole box under TCP memory pressure.
        let _ = socket2::SockRef::from(&sock).set_send_buffer_size(64 * 1024);
        let buf = vec![byte; CHUNK];
        while sock.write_all(&buf).is_ok() {}
    });
    let echo = Backend::echo();
    let stack = Stack::start(t, &[]);
    let fwd = stack.forward(
        &[],
        &[
            format!("127.0.0.1:0:{}", stack.target(source.port)),
            format!("127.0.0.1:0:{}", stack.target(echo.port)),
        ],
        2,
    );
    (source, echo, stack, fwd)
}

/// Many local readers that stop reading cost forward at most their stream windows and the
/// agent next to nothing: the relay returns a stream's credit only once its bytes are written
/// to the local socket, and the agent reads from a VM service only what the carrier can take
/// and holds no buffer for a stream that cannot send. (Before, the agent kept a 256 KiB relay
/// buffer and up to 128 KiB of send buffer per stalled stream: 57-116 MB here; at 300
/// streams 174 MB, and a 1 MiB exchange beside them took 22 s.) The other streams of the carrier keep
/// working, and a stalled stream resumes when read.
fn stalled_readers_hold_at_most_their_windows(t: Transport) {
    // Their windows (256 KiB each) fill 50 of the connection window's 64 MiB: past it, what
    // they leave unread would stop the carrier for every stream.
    // forward: each stalled stream holds at most its window (256 KiB unless it grew before the
    // stall: 50 MB here), in the session or in the relay. The agent: the carrier's send budget
    // (8 MiB) and a read buffer of at most its share per stream while it ran (8 MiB), and
    // whatever the allocator keeps of that start.
    stalled_readers(t, [200, 0], 128 * 1024, 40 * 1024);
}

/// quinn gives every stream the same fixed 16 MiB window, so each local reader that stops
/// holds up to that much in forward; the connection's receive window holds 16 of them. With
/// 64 MiB, five stopped the carrier for every stream: the exchange beside them timed out. Here
/// 20 stall, more than one connection holds: 12 first, and once they count as stalled (their
/// local sockets took nothing for a second) the client puts the next 8 and the exchange on an overflow
/// connection (before, all went on the first one, and the exchange got no byte). The agent
/// holds little (13-15 MB live with MIMALLOC_PURGE_DELAY=0), but the allocator keeps more of
/// the 320 MB that passed (up to 88 MB seen): an agent that held the streams' windows would
/// hold all of it.
fn stalled_readers_do_not_stop_a_quic_carrier(t: Transport) {
    stalled_readers(t, [12, 8], 404 * 1024, 128 * 1024);
}

/// The upload side, through the binaries: a VM service that stops reading leaves each
/// upload's bytes in the agent, up to quinn's 16 MiB stream window, and 16 of them filled the
/// agent's receive window, so the exchange beside them got no byte. forward sees only that
/// quinn refuses those streams' writes; from 12 refused for a second, new connections go on
/// another QUIC connection. (The TCP carriers' form needs 300-600 uploads, whose local kernel
/// buffers would approach the box's TCP memory limit beside the rest of the suite; the tunnel
/// test `a_new_connection_avoids_a_carrier_that_stalled_uploads_filled` covers it.)
fn stalled_uploads_do_not_stop_a_quic_carrier(t: Transport) {
    let deaf = deaf_service();
    let echo = Backend::echo();
    let stack = Stack::start(t, &[]);
    let fwd = stack.forward(
        &[],
        &[
            format!("127.0.0.1:0:{}", stack.target(deaf)),
            format!("127.0.0.1:0:{}", stack.target(echo.port)),
        ],
        2,
    );
    let uploads: Vec<TcpStream> = (0..16)
        .map(|_| {
            let Conn::Tcp(s) = fwd.locals[0].connect() else {
                panic!("a TCP listener was asked for");
            };
            // A small send buffer, so the stall reaches forward rather than this socket.
            socket2::SockRef::from(&s)
                .set_send_buffer_size(64 * 1024)
                .unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    // Push until no upload moved for two seconds (each then stalled past the threshold).
    let chunk = vec![0x42u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut written = 0u64;
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(2) {
        assert!(Instant::now() < deadline, "uploads kept moving for 60 s");
        let mut moved = false;
        for mut s in &uploads {
            match s.write(&chunk) {
                Ok(n) => {
                    written += n as u64;
                    moved |= n > 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("an upload failed after {written} bytes in all: {e}"),
            }
        }
        if moved {
            quiet_since = Instant::now();
        } else {
            thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(
        written >= 16 * (16 << 20),
        "only {written} bytes went out before the uploads stalled: the agent's window is not full"
    );
    let sent = echo_exchange(fwd.locals[1].connect(), rand::random(), 4 << 20);
    assert_eq!(echo.next_report().hash, sent);
}

/// A VM service that accepts connections and never reads them; returns its port. A small
/// receive buffer and an Ethernet-sized segment (accepted sockets inherit both) keep the
/// kernel from absorbing megabytes per connection, so the stall reaches the agent at once.
/// Its sockets stay open until the test process ends.
fn deaf_service() -> u16 {
    let sock = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(16 * 1024).unwrap();
    sock.set_tcp_mss(1400).unwrap();
    sock.bind(&SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)).into())
        .unwrap();
    sock.listen(64).unwrap();
    let listener = std::net::TcpListener::from(sock);
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        let held: Vec<TcpStream> = listener.incoming().map_while(Result::ok).collect();
        drop(held);
    });
    port
}

/// Local readers stop reading a firehose, `batches[0]` of them, then once they settled (long
/// enough for the client to count them as stalled) `batches[1]` more; then forward and the
/// agent have grown by less than the limits (KiB, RSS), a 4 MiB exchange beside them on the
/// same carrier completes, and a stalled stream, read at last, delivers its bytes intact.
fn stalled_readers(
    t: Transport,
    batches: [usize; 2],
    forward_limit_kib: u64,
    agent_limit_kib: u64,
) {
    let n = batches[0] + batches[1];
    let (_source, echo, stack, fwd) = source_and_echo(t, 0x5a);
    let warm = echo_exchange(fwd.locals[1].connect(), rand::random(), 1 << 20);
    assert_eq!(echo.next_report().hash, warm);
    let rss = || (fwd.proc.rss_kib(), stack.agent_proc().rss_kib());
    let before = rss();

    let Local::Tcp(addr) = &fwd.locals[0] else {
        panic!("a TCP listener was asked for");
    };
    let stall = |count: usize| -> Vec<TcpStream> {
        (0..count)
            .map(|_| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                // A small receive buffer, so the kernel does not hide the stall in megabytes.
                s.set_recv_buffer_size(16 * 1024).unwrap();
                // An Ethernet-sized segment, so forward's socket to it does not start with a
                // send buffer for ten 64 KiB loopback segments (4 MiB once BBR grows it).
                s.set_tcp_mss(1400).unwrap();
                s.connect_timeout(&(*addr).into(), TIMEOUT).unwrap();
                s.into()
            })
            .collect()
    };
    // Settled: neither process grew for two seconds (so every stream is stalled, and its
    // window full, for as long).
    let settle = || {
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut last = rss();
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_secs(2) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(250));
            let now = rss();
            if now.0 > last.0 + 512 || now.1 > last.1 + 512 {
                quiet_since = Instant::now();
            }
            last = now;
        }
        last
    };
    let mut stalled = stall(batches[0]);
    if batches[1] > 0 {
        settle();
        stalled.extend(stall(batches[1]));
    }
    let last = settle();
    let grown = (
        last.0.saturating_sub(before.0),
        last.1.saturating_sub(before.1),
    );
    eprintln!(
        "{n} stalled streams: forward +{} KiB, agent +{} KiB",
        grown.0, grown.1
    );
    assert!(
        grown.0 < forward_limit_kib,
        "forward grew by {} KiB for {n} stalled streams; want < {forward_limit_kib} KiB",
        grown.0
    );
    assert!(
        grown.1 < agent_limit_kib,
        "the agent grew by {} KiB for {n} stalled streams; want < {agent_limit_kib} KiB",
        grown.1
    );

    let sent = echo_exchange(fwd.locals[1].connect(), rand::random(), 4 << 20);
    assert_eq!(echo.next_report().hash, sent);
    let mut first = &stalled[0];
    first.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = vec![0; CHUNK];
    let mut got = 0;
    while got < (4 << 20) {
        match first.read(&mut buf) {
            Ok(0) => panic!("stalled stream ended after {got} bytes"),
            Ok(n) => {
                assert!(
                    buf[..n].iter().all(|&b| b == 0x5a),
                    "stalled stream corrupted"
                );
                got += n;
            }
            Err(e) => panic!("stalled stream failed after {got} bytes: {e}"),
        }
    }
}

/// Connections that never authenticate, or send garbage, are closed by the agent (auth timeout,
/// protocol error, or at once beyond its cap of pending ones) while an already authenticated
/// client keeps working, during the flood and after it.
fn silent_and_garbage_connections_do_not_disturb(t: Transport) {
    let backend = Backend::echo();
    let stack = Stack::start(t, &[]);
    let addr = agent_addr(&stack);

    // Authenticate first: the carrier is up before the flood begins.
    let fwd = stack.forward_to(backend.port);
    echo_exchange(fwd.local().connect(), rand::random(), 64 * 1024);

    let silent: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    let mut garbage = Vec::new();
    for i in 0..5u8 {
        let Ok(mut s) = TcpStream::connect(addr) else {
            continue;
        };
        let junk: Vec<u8> = (0..4096u32)
            .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i))
            .collect();
        let _ = s.write_all(&junk);
        garbage.push(s);
    }

    let local = fwd.local().clone();
    let served = thread::spawn(move || echo_exchange(local.connect(), rand::random(), 8 << 20));
    assert!(
        served.join().is_ok(),
        "the authenticated client failed while {} unauthenticated connections were open",
        200 + 5
    );

    // Every unauthenticated connection ends (EOF or reset) by the auth timeout (10 s).
    for mut s in silent.into_iter().chain(garbage) {
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue, // an HTTP error answer, then the close
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("an unauthenticated connection stayed open: {e}"),
            }
        }
    }
    // And the authenticated client still works.
    echo_exchange(fwd.local().connect(), rand::random(), 1 << 20);
}

/// QUIC trusts exactly the pinned agent key: another pin fails `--check` with a message about the
/// pin, and a data connection is reset.
fn wrong_pin_is_rejected(t: Transport) {
    let backend = Backend::echo();
    let stack = Stack::start(t, &[]);
    let mut args = stack.client_args();
    let i = args.iter().position(|a| a == "--agent-pin").unwrap();
    // A well-formed pin of 32 zero bytes: no real key has it.
    args[i + 1] = "sha256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into();

    let spec = format!("127.0.0.1:0:{}", stack.target(backend.port));
    let mut cmd = Command::new(forward_bin());
    cmd.args(&args).arg("--check").arg(&spec);
    let (st, out, err) = run("forward --check (wrong pin)", cmd);
    assert_eq!(st.code(), Some(1), "want exit 1:\n{out}{err}");
    assert!(
        err.to_lowercase().contains("pin"),
        "stderr should say the pin did not match:\n{err}"
    );

    args.push(spec.into());
    let fwd = crate::stack::Forward::start(args, 1, t);
    let mut conn = match fwd.local().try_connect() {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
        Err(e) => panic!("connect to forward: {e}"),
    };
    let mut buf = [0u8; 64];
    match conn.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("want a reset through a carrier with the wrong pin, got {other:?}"),
    }
}

/// A token file in `dir`, readable by its owner only (the agent warns otherwise).
fn token_file(dir: &TempDir) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let token = dir.join("token");
    std::fs::write(&token, "5d2c9a17e4b08f63a1c7d95e2b40f8a6c3e19d74").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    token
}

/// `forward agent --dial-timeout` bounds the agent's dial of a target that never answers (a
/// listener whose queue is full drops the SYNs): the client hears "timed out" after it, not
/// after the 10 s default, and its own --connect-timeout (30 s here) does not matter.
#[test]
fn agent_dial_timeout_bounds_a_silent_target() {
    let dir = TempDir::new("agent-dial-timeout");
    let token = token_file(&dir);
    let (silent_addr, queued) = unanswering_target();

    let mut agent = crate::harness::Proc::forward(
        "agent",
        [
            "agent".as_ref(),
            "--listen".as_ref(),
            "[::1]:0".as_ref(),
            "--dial-timeout".as_ref(),
            "1".as_ref(),
            "--token-file".as_ref(),
            token.as_os_str(),
        ],
    );
    let port = crate::stack::listening_port(&mut agent);

    let mut cmd = Command::new(forward_bin());
    cmd.args([
        "--agent",
        &port.to_string(),
        "--transport",
        "tcp",
        "--edge",
        "::1",
    ])
    .args(["--connect-timeout", "30", "--check", "--token-file"])
    .arg(&token)
    .arg(format!("127.0.0.1:0:vm:{}", silent_addr.port()));
    let started = Instant::now();
    let (st, out, err) = run("forward --check (a silent target)", cmd);
    let took = started.elapsed();
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("did not answer within the agent's dial timeout (its --dial-timeout)"),
        "{err}"
    );
    // Generous against a loaded host; the default would be 10 s.
    assert!(took < Duration::from_secs(7), "the check took {took:?}");
    drop(queued);
}

/// A listener on 127.0.0.1 that never accepts, its queue filled: further SYNs go unanswered.
/// Keep both until the test ends.
fn unanswering_target() -> (SocketAddr, (socket2::Socket, Vec<TcpStream>)) {
    let silent = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    silent
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    silent.listen(0).unwrap();
    let silent_addr = silent.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    loop {
        match TcpStream::connect_timeout(&silent_addr, Duration::from_millis(300)) {
            Ok(s) => queued.push(s),
            Err(e) if e.kind() == ErrorKind::TimedOut => break,
            Err(e) => panic!("filling the silent listener's queue: {e}"),
        }
        assert!(queued.len() < 64, "the queue never filled");
    }
    (silent_addr, (silent, queued))
}

/// Over QUIC the check waits longer than an agent's default dial: a target that never
/// answers is reported by the agent ("timed out") before the check would take it for a
/// silent service. With `--connect-timeout 3` such a target passed (a tester's finding).
#[test]
fn quic_check_of_a_target_that_never_answers_fails() {
    let (silent_addr, queued) = unanswering_target();
    let stack = Stack::start(Transport::Quic, &[]);
    let mut cmd = Command::new(forward_bin());
    cmd.args(stack.client_args())
        .args(["--connect-timeout", "3", "--check"])
        .arg(format!("127.0.0.1:0:{}", stack.target(silent_addr.port())));
    let (st, out, err) = run("forward --check (QUIC, a target that never answers)", cmd);
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(err.contains("agent timed out connecting to"), "{err}");
    drop(queued);
}

/// A QUIC client pointed at a UDP port nothing listens on (an agent started without --quic)
/// fails at once with that reason, instead of waiting its whole connect timeout (30 s here)
/// for a handshake answer that cannot come.
#[test]
fn quic_to_a_closed_udp_port_says_so_at_once() {
    let dir = TempDir::new("quic-closed-port");
    let token = token_file(&dir);
    let closed = std::net::UdpSocket::bind("[::1]:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(forward_bin());
    cmd.args([
        "--agent",
        &closed.to_string(),
        "--transport",
        "quic",
        "--edge",
        "::1",
    ])
    .args([
        "--agent-pin",
        "sha256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    ])
    .args(["--connect-timeout", "30", "--check", "--token-file"])
    .arg(&token)
    .arg("127.0.0.1:0:vm:22");
    let started = Instant::now();
    let (st, out, err) = run("forward --check (QUIC to a closed UDP port)", cmd);
    let took = started.elapsed();
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(
        err.contains(&format!("nothing listens on UDP port {closed}")) && err.contains("--quic"),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "the check took {took:?}");
}

/// Over QUIC, `--check` of a service that stays silent after the client's end of stream
/// cannot tell it from a dial still running: it passes after --connect-timeout (at least 12 s,
/// past an agent's default dial; this service closes after 8), and says meanwhile why it
/// waits.
#[test]
fn quic_check_of_a_silent_service_says_why_it_waits() {
    let silent = Backend::start(|mut sock, _tx| {
        let mut buf = [0u8; 64];
        while matches!(sock.read(&mut buf), Ok(n) if n > 0) {}
        // Neither a byte nor the end: as a service waiting for a request.
        thread::sleep(Duration::from_secs(8));
    });
    let stack = Stack::start(Transport::Quic, &[]);
    let mut cmd = Command::new(forward_bin());
    cmd.args(stack.client_args())
        .args(["--connect-timeout", "3", "--check"])
        .arg(format!("127.0.0.1:0:{}", stack.target(silent.port)))
        .env("RUST_LOG", "info");
    // Served after the check: stop it once it listens.
    let mut fwd = crate::stack::Forward::start_with(
        crate::harness::Proc::spawn("forward --check (silent service)", cmd),
        1,
        Transport::Quic,
    );
    let waits = fwd.proc.wait_line(Src::Stderr, "the line saying why", |l| {
        l.contains("a silent service and a dial still running look alike")
    });
    assert!(waits.contains("12s"), "{waits}");
    fwd.proc
        .wait_line(Src::Stderr, "check ok", |l| l.contains("check ok"));
}

/// `forward agent --handover` starts beside a running agent on the same port; the old one,
/// stopped, drains its streams while new connections reach the new one: a restart refuses no
/// connection (before, they were refused until the old agent exited, up to its 30 s drain).
/// Without --handover a port in use still fails, and says how to hand over.
#[test]
fn a_new_agent_takes_over_while_the_old_one_drains() {
    use std::ffi::OsString;

    use crate::harness::{free_v6_port, Proc};
    let echo = Backend::echo();
    let dir = TempDir::new("agent-handover");
    let token = token_file(&dir);
    let port = free_v6_port();
    let agent_args = |handover: bool| -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "agent".into(),
            "--listen".into(),
            format!("[::1]:{port}").into(),
            "--token-file".into(),
            token.clone().into(),
            // One state directory: the new agent serves the old one's QUIC certificate, so
            // the clients' pin still holds.
            "--quic".into(),
            "--state-dir".into(),
            dir.join("state").into(),
        ];
        if handover {
            a.push("--handover".into());
        }
        a
    };
    let start = |name: &str, handover: bool| {
        let mut p = Proc::forward(name, agent_args(handover));
        p.wait_line(Src::Stdout, "the agent's listening line", |l| {
            l.contains("listening on")
        });
        p
    };
    let mut old = start("old agent", false);
    let pin = old.wait_line(Src::Stdout, "the QUIC pin", |l| l.contains("sha256:"));
    let pin = pin
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap()
        .to_owned();

    let mut cmd = Command::new(forward_bin());
    cmd.args(agent_args(false));
    let (st, out, err) = run("a second agent without --handover", cmd);
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("another process listens there") && err.contains("--handover"),
        "{err}"
    );

    // A client of the port, whichever agent answers there.
    let client = |transport: Transport, extra: &[&str]| {
        let mut args: Vec<OsString> = vec!["--agent".into(), port.to_string().into()];
        args.extend(extra.iter().map(OsString::from));
        args.extend([
            "--edge".into(),
            "::1".into(),
            "--token-file".into(),
            token.clone().into(),
            format!("127.0.0.1:0:vm:{}", echo.port).into(),
        ]);
        crate::stack::Forward::start(args, 1, transport)
    };
    let mut fwd = client(Transport::AgentTcp, &["--transport", "tcp"]);
    let mut open = fwd.local().connect();
    open.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).unwrap();

    let mut new = start("new agent", true);
    // Its TCP side serves; UDP is not shared, so QUIC waits for the old agent to exit.
    new.wait_line(Src::Stderr, "the UDP wait", |l| {
        l.contains("the UDP port is still held")
    });
    // Connections keep coming while the old agent stops. One opened in the instant before
    // the client hears the GOAWAY goes out on the old carrier and is refused there unprocessed;
    // the client opens it again through the new agent, so none of them fails.
    let stop = Arc::new(AtomicBool::new(false));
    let busy = {
        let (local, stop) = (fwd.local().clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                echo_exchange(local.connect(), 100 + n, 4096);
                n += 1;
            }
            n
        })
    };
    old.signal("TERM");
    old.wait_line(Src::Stderr, "the drain line", |l| l.contains("draining"));
    fwd.proc
        .wait_line(Src::Stderr, "the client hearing the GOAWAY", |l| {
            l.contains("peer is going away")
        });
    for i in 0..5 {
        echo_exchange(fwd.local().connect(), i, 64 * 1024);
    }
    stop.store(true, Ordering::SeqCst);
    let during = busy
        .join()
        .expect("every connection during the stop echoes");
    assert!(during > 0);
    assert_eq!(
        old.try_status(),
        None,
        "the old agent stopped draining early: {}",
        old.transcript()
    );
    // The stream on the old agent still works, and ends its drain.
    open.write_all(b"y").unwrap();
    open.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"y");
    drop(open);
    assert!(old.wait_exit().success(), "{}", old.transcript());
    echo_exchange(fwd.local().connect(), 9, 64 * 1024);
    new.wait_line(Src::Stdout, "the new agent's QUIC line", |l| {
        l.contains("quic agent listening") && l.contains(&pin)
    });
    let quic = client(
        Transport::Quic,
        &["--transport", "quic", "--agent-pin", pin.as_str()],
    );
    echo_exchange(quic.local().connect(), 10, 64 * 1024);
    new.signal("TERM");
    assert!(new.wait_exit().success(), "{}", new.transcript());
}

/// `--check` in agent mode goes as far as the target: a port with nothing behind it and a host
/// outside `--allow` fail with the agent's reason; a live service passes and is then served.
fn check_reaches_the_target(t: Transport) {
    let backend = Backend::echo();
    let stack = Stack::start(t, &[backend.port]);
    let closed = {
        let l = std::net::TcpListener::bind("[::1]:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let check = |spec: String| {
        let mut cmd = Command::new(forward_bin());
        cmd.args(stack.client_args()).arg("--check").arg(&spec);
        let (st, out, err) = run("forward --check", cmd);
        (st.code(), out, err)
    };

    let (code, out, err) = check(format!("127.0.0.1:0:{}", stack.target(closed)));
    assert_eq!(code, Some(1), "nothing listens on {closed}:\n{out}{err}");
    // In the same words over every transport (they differed between QUIC and the others).
    assert!(
        err.contains(&format!(
            "agent could not connect to localhost:{closed}: connection refused (is the service running on the VM?)"
        )),
        "{err}"
    );
    assert!(
        !out.contains("forwarding"),
        "listened after a failed check:\n{out}"
    );

    let (code, out, err) = check(format!("127.0.0.1:0:{}/192.0.2.1:22", crate::stack::VM));
    assert_eq!(code, Some(1), "192.0.2.1 is not allowed:\n{out}{err}");
    assert!(
        err.contains("agent refused 192.0.2.1:22: not allowed by its policy"),
        "{err}"
    );

    // Several at once: every failure is named, not only the first.
    let mut cmd = Command::new(forward_bin());
    cmd.args(stack.client_args()).arg("--check").args([
        format!("127.0.0.1:0:{}", stack.target(closed)),
        format!("127.0.0.1:0:{}", stack.target(backend.port)),
        format!("127.0.0.1:0:{}/192.0.2.1:22", crate::stack::VM),
    ]);
    let (st, out, err) = run("forward --check (three targets)", cmd);
    assert_eq!(st.code(), Some(1), "two of three fail:\n{out}{err}");
    assert!(err.contains("2 of 3 checks failed"), "{err}");
    assert!(
        err.contains("refused") && err.contains("not allowed"),
        "{err}"
    );

    let spec = format!("127.0.0.1:0:{}", stack.target(backend.port));
    let mut args = stack.client_args();
    args.push("--check".into());
    args.push(spec.into());
    let mut fwd = crate::stack::Forward::start(args, 1, t);
    fwd.proc
        .wait_line(crate::harness::Src::Stderr, "check ok", |l| {
            l.contains("check ok")
        });
    echo_exchange(fwd.local().connect(), rand::random(), 1 << 16);
}

/// SIGTERM to a draining agent: it exits 0 at once, and `open`, a stream it still carried, is
/// reset, not cleanly closed. Returns when the signal was sent.
fn sigterm_cuts_the_drain(agent: &mut crate::harness::Proc, open: &mut impl Read) -> Instant {
    let second = Instant::now();
    agent.signal("TERM");
    let status = agent.wait_exit();
    assert!(
        status.success(),
        "agent exit after SIGTERM while draining: {status}"
    );
    assert!(
        second.elapsed() < Duration::from_secs(15),
        "the agent drained on for {:?} after SIGTERM",
        second.elapsed()
    );
    let mut rest = Vec::new();
    let err = open
        .read_to_end(&mut rest)
        .expect_err("a stream cut by the agent's exit must be reset, not cleanly closed");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    second
}

/// SIGTERM makes the agent drain (30 s by default); a second one ends it at once, and the
/// client resets the streams of the carrier that broke.
fn agent_second_signal_cuts_the_drain(t: Transport) {
    use crate::harness::Src;
    let backend = Backend::echo();
    let mut stack = Stack::start(t, &[backend.port]);
    let fwd = stack.forward_to(backend.port);
    let mut open = fwd.local().connect();
    open.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).unwrap();

    let agent = stack.agent_proc_mut();
    agent.signal("TERM");
    agent.wait_line(Src::Stderr, "the drain line", |l| l.contains("draining"));
    let second = sigterm_cuts_the_drain(agent, &mut open);
    // Told, not found out at an idle timeout (QUIC: 30 s).
    assert!(
        second.elapsed() < Duration::from_secs(15),
        "the client learned of the agent's exit only after {:?}",
        second.elapsed()
    );
}

/// A connection opened while the agent drains finds no agent to dial (it stopped listening);
/// when the drain is then cut, the client's log must not claim that another carrier is in use.
fn a_drained_carrier_cut_alone_claims_no_other_carrier(t: Transport) {
    use crate::harness::Src;
    let backend = Backend::echo();
    let mut stack = Stack::start(t, &[backend.port]);
    let mut fwd = stack.forward_to(backend.port);
    let mut open = open_echoed(&fwd);

    let agent = stack.agent_proc_mut();
    agent.signal("TERM");
    agent.wait_line(Src::Stderr, "the drain line", |l| l.contains("draining"));
    // Refused: the draining agent takes no new carrier.
    let outcome = first_read(fwd.local());
    assert!(
        outcome.is_err() || outcome.as_ref().is_ok_and(|n| *n == 0),
        "{outcome:?}"
    );
    sigterm_cuts_the_drain(agent, &mut open);
    let line = fwd.proc.wait_line(Src::Stderr, "the lost carrier", |l| {
        l.contains("carrier lost; its open connections were reset")
    });
    assert!(!line.contains("another carrier is in use"), "{line}");
}

/// 100 `forward stdio` processes at once, each with its own carrier: more than the agent's 64
/// unauthenticated connections (DESIGN.md), so it drops the oldest. Clients retry a carrier
/// dropped before authentication, and every one gets its bytes through.
fn burst_of_clients_beyond_the_unauthenticated_cap(t: Transport) {
    use std::process::Stdio;
    const N: usize = 100;
    let backend = Backend::echo();
    let stack = Stack::start(t, &[backend.port]);
    let target = stack.target(backend.port);
    let children: Vec<_> = (0..N)
        .map(|i| {
            let mut cmd = Command::new(forward_bin());
            cmd.arg("stdio")
                .args(stack.client_args())
                .arg(&target)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = cmd.spawn().expect("spawn forward stdio");
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(format!("client {i}\n").as_bytes()).unwrap();
            drop(stdin);
            (i, child)
        })
        .collect();
    let mut failed = Vec::new();
    for (i, child) in children {
        let out = child.wait_with_output().unwrap();
        let want = format!("client {i}\n");
        if !out.status.success() || out.stdout != want.as_bytes() {
            failed.push(format!(
                "client {i}: {} stdout {:?} stderr {}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {N} clients failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

/// The QUIC certificate's pin is what clients were given: a state directory that lost its key
/// is an error to fix, never a reason to make a new certificate quietly.
#[test]
fn quic_state_dir_with_a_lost_key_is_refused() {
    let dir = TempDir::new("agent-state");
    let token = dir.join("token");
    std::fs::write(&token, "9c41e07a2bd35f86c1e94a7d0b3f52e8a6d17c04f9b25e3a").unwrap();
    let state = dir.join("state");
    let agent = |name: &str| {
        let mut cmd = Command::new(forward_bin());
        cmd.args(["agent", "--listen", "[::1]:0", "--quic", "--token-file"])
            .arg(&token)
            .arg("--state-dir")
            .arg(&state);
        run(name, cmd)
    };
    // First start generates the pair; the agent then runs until stopped, so stop it.
    let mut first = Command::new(forward_bin());
    first
        .args(["agent", "--listen", "[::1]:0", "--quic", "--token-file"])
        .arg(&token)
        .arg("--state-dir")
        .arg(&state);
    let mut p = crate::harness::Proc::spawn("agent", first);
    p.wait_line(crate::harness::Src::Stdout, "the pin", |l| {
        l.contains("sha256:")
    });
    p.signal("TERM");
    assert!(p.wait_exit().success());
    std::fs::remove_file(state.join("quic-key.pem")).unwrap();

    let (st, out, err) = agent("agent without its key");
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("but not") && err.contains("quic-key.pem") && err.contains("--agent-pin"),
        "{err}"
    );
    assert!(!state.join("quic-key.pem").exists(), "a new key was made");
}

/// Agents started together with one fresh state directory (two systemd units on two ports)
/// all serve the one certificate that is kept, and print its pin. Each used to write its own
/// pair over the others': one printed a pin that was not the one kept (its clients broke at
/// its next restart), or one read the other's key before its certificate was written and
/// refused to start, calling the state damaged (a tester's finding: 4 of 12 trials).
#[test]
fn agents_starting_together_share_one_generated_certificate() {
    use crate::harness::{Proc, Src};
    let dir = TempDir::new("agent-state-race");
    let token = dir.join("token");
    std::fs::write(&token, "9c41e07a2bd35f86c1e94a7d0b3f52e8a6d17c04f9b25e3a").unwrap();
    let start = |state: &std::path::Path| {
        let mut cmd = Command::new(forward_bin());
        cmd.args(["agent", "--listen", "[::1]:0", "--quic", "--token-file"])
            .arg(&token)
            .arg("--state-dir")
            .arg(state);
        Proc::spawn("agent", cmd)
    };
    let pin_of = |p: &mut Proc| {
        let line = p.wait_line(Src::Stdout, "the pin", |l| l.contains("sha256:"));
        let pin = line.split_whitespace().find(|w| w.starts_with("sha256:"));
        pin.unwrap_or_else(|| panic!("no pin in {line:?}"))
            .to_owned()
    };
    for round in 0..10 {
        let state = dir.join(&format!("state{round}"));
        let mut agents: Vec<Proc> = (0..3).map(|_| start(&state)).collect();
        let pins: Vec<String> = agents.iter_mut().map(pin_of).collect();
        let mut later = start(&state);
        let kept = pin_of(&mut later);
        assert!(
            pins.iter().all(|p| *p == kept),
            "round {round}: agents printed {pins:?}, the state directory keeps {kept}"
        );
        for mut a in agents.into_iter().chain([later]) {
            a.signal("TERM");
            assert!(a.wait_exit().success(), "round {round}: {}", a.transcript());
        }
    }
}

/// The state directory's other troubles name it and what to do: damaged files (remove them;
/// not "--tls-cert", which was not used), a place the certificate cannot be written (another
/// --state-dir), and a directory other users may write to (a warning: one could swap the key).
#[test]
fn quic_state_dir_problems_say_what_to_do() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("agent-state-problems");
    let token = dir.join("token");
    std::fs::write(&token, "9c41e07a2bd35f86c1e94a7d0b3f52e8a6d17c04f9b25e3a").unwrap();
    let agent = |state: &std::path::Path| {
        let mut cmd = Command::new(forward_bin());
        cmd.args(["agent", "--listen", "[::1]:0", "--quic", "--token-file"])
            .arg(&token)
            .arg("--state-dir")
            .arg(state);
        cmd
    };

    let damaged = dir.join("damaged");
    std::fs::create_dir_all(&damaged).unwrap();
    std::fs::write(damaged.join("quic-cert.pem"), "not a certificate\n").unwrap();
    std::fs::write(damaged.join("quic-key.pem"), "not a key\n").unwrap();
    let (st, out, err) = run("agent with damaged state", agent(&damaged));
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("is damaged") && err.contains("remove") && err.contains("--agent-pin"),
        "{err}"
    );
    assert!(
        !err.contains("--tls-cert"),
        "--tls-cert was not used:\n{err}"
    );

    // Two agents' state directories, the key of one beside the certificate of the other: named
    // as such, not as rustls's bare "KeyMismatch" from QUIC's TLS set-up.
    let (one, two) = (dir.join("one"), dir.join("two"));
    for d in [&one, &two] {
        let mut a = crate::harness::Proc::spawn("agent making its state", agent(d));
        a.wait_line(Src::Stdout, "the QUIC listening line", |l| {
            l.contains("quic agent listening")
        });
        a.signal("TERM");
        assert!(a.wait_exit().success(), "{}", a.transcript());
    }
    std::fs::copy(two.join("quic-key.pem"), one.join("quic-key.pem")).unwrap();
    let (st, out, err) = run("agent with a mismatched pair", agent(&one));
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("does not belong to the certificate") && err.contains("remove"),
        "{err}"
    );
    assert!(!err.contains("KeyMismatch"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );

    // The key's path leads nowhere (root may write anywhere, so no read-only directory).
    let unwritable = dir.join("unwritable");
    std::fs::create_dir_all(&unwritable).unwrap();
    std::os::unix::fs::symlink(dir.join("no-such-dir/key"), unwritable.join("quic-key.pem"))
        .unwrap();
    let (st, out, err) = run("agent with an unwritable state dir", agent(&unwritable));
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(err.contains("--state-dir"), "{err}");

    let open = dir.join("open");
    std::fs::create_dir_all(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut p = crate::harness::Proc::spawn("agent", agent(&open));
    p.wait_line(
        crate::harness::Src::Stderr,
        "the open-directory warning",
        |l| l.contains("can be written by other users") && l.contains("chmod 700"),
    );
    p.signal("TERM");
    assert!(p.wait_exit().success());
}

/// A client that exits normally says goodbye (GOAWAY, then the end of the stream): the agent
/// logs it as such, not as a reset.
fn client_exit_is_a_clean_goodbye(t: Transport) {
    use crate::harness::Src;
    let backend = Backend::echo();
    let mut stack = Stack::start(t, &[backend.port]);
    let mut fwd = stack.forward_to(backend.port);
    echo_exchange(fwd.local().connect(), rand::random(), 1024);
    fwd.proc.signal("TERM");
    assert!(fwd.proc.wait_exit().success());
    let agent = stack.agent_proc_mut();
    agent.wait_line(Src::Stderr, "the agent noting the client's exit", |l| {
        l.contains("client exiting")
    });
    let log = agent.stderr_text();
    assert!(!log.contains("reset by peer"), "{log}");
}

per_transport!(agent_sighup_drains_like_sigterm: agent_tls, agent_tcp, quic);
per_transport!(client_resets_are_quiet_and_refusals_name_the_client: agent_tls, agent_tcp, quic);

/// A connection through `fwd` with one byte echoed: its stream is open at the agent.
/// Connects to `local` and reads once: the connect's or the read's outcome (a reset can come
/// before the connect call has returned).
fn first_read(local: &Local) -> std::io::Result<usize> {
    local.try_connect().and_then(|mut conn| {
        let mut buf = [0u8; 16];
        loop {
            match conn.read(&mut buf) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => break other,
            }
        }
    })
}

fn open_echoed(fwd: &Forward) -> Conn {
    let mut conn = fwd.local().connect();
    conn.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    conn.read_exact(&mut one).unwrap();
    conn
}

/// SIGHUP (the ssh session that started the agent closed) drains as SIGTERM does: open streams
/// go on, and the agent exits 0. A second SIGHUP (one hang-up often sends two) does not cut the
/// drain; SIGTERM then does, as after a first SIGTERM. Before, SIGHUP killed the agent at once
/// (exit 129) without a word.
fn agent_sighup_drains_like_sigterm(t: Transport) {
    use crate::harness::Src;
    let backend = Backend::echo();
    let mut stack = Stack::start(t, &[backend.port]);
    let fwd = stack.forward_to(backend.port);
    let finishing = open_echoed(&fwd);
    let mut idle = open_echoed(&fwd);

    let agent = stack.agent_proc_mut();
    agent.signal("HUP");
    agent.wait_line(Src::Stderr, "the SIGHUP line", |l| l.contains("SIGHUP"));
    agent.wait_line(Src::Stderr, "the drain line", |l| l.contains("draining"));
    if t == Transport::Quic {
        // Its own line, with its own count: the TCP side's said "every stream had finished"
        // about carriers these streams were never on.
        agent.wait_line(Src::Stderr, "the QUIC drain line", |l| {
            l.contains("QUIC agent stopping") && l.contains("streams=2")
        });
    }
    agent.signal("HUP");
    // Long enough for the TCP side's drain to end when it has nothing to wait for (QUIC).
    thread::sleep(Duration::from_millis(500));
    echo_exchange(finishing, rand::random(), 1 << 16);
    let agent = stack.agent_proc_mut();
    assert_eq!(
        agent.try_status(),
        None,
        "the agent exited while draining a stream"
    );

    sigterm_cuts_the_drain(agent, &mut idle);
}

/// A client that resets its streams (a browser cancelling requests) is everyday work: nothing
/// at INFO in the agent's log (the QUIC agent wrote a line per reset). A refused stream is
/// logged, inside the span that names the client's address.
fn client_resets_are_quiet_and_refusals_name_the_client(t: Transport) {
    use crate::harness::Src;
    const RESETS: usize = 20;
    let backend = Backend::echo();
    let closed = {
        let l = std::net::TcpListener::bind("[::1]:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut stack = Stack::start(t, &[backend.port]);
    let fwd = stack.forward_to(backend.port);
    for _ in 0..RESETS {
        let conn = open_echoed(&fwd);
        let Conn::Tcp(tcp) = conn else {
            unreachable!("forward_to listens on TCP")
        };
        socket2::SockRef::from(&tcp)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }
    // Each reset has reached the service, so the agent is done with it.
    for _ in 0..RESETS {
        let r = backend.next_report();
        assert_ne!(
            r.note, "eof",
            "a reset stream was closed cleanly at the service"
        );
    }

    // Clients that hang up at once, before any answer (the agent may not have read the
    // stream's target yet: the QUIC agent warned of a "bad target header" for each).
    for _ in 0..RESETS {
        let Conn::Tcp(mut tcp) = fwd.local().connect() else {
            unreachable!("forward_to listens on TCP")
        };
        let _ = tcp.write_all(&[7; 100]);
        socket2::SockRef::from(&tcp)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
    }

    let refused = stack.forward_to(closed);
    let mut conn = refused.local().connect();
    let _ = conn.read_to_end(&mut Vec::new());
    let agent = stack.agent_proc_mut();
    let line = agent.wait_line(Src::Stderr, "the refusal line", |l| {
        l.contains("refus") && l.contains(&closed.to_string())
    });
    let span = match t {
        Transport::Quic => "quic_conn{remote=[::1]:",
        _ => "conn{peer=[::1]:",
    };
    assert!(
        line.contains(span),
        "the refusal does not name the client ({span}...): {line}"
    );
    let level = |l: &str| l.split_whitespace().nth(1).unwrap_or("").to_owned();
    let loud: Vec<String> = agent
        .stderr_text()
        .lines()
        .filter(|l| ["INFO", "WARN", "ERROR"].contains(&level(l).as_str()))
        .filter(|l| l.contains("reset by the client") || l.contains("target header"))
        .map(str::to_owned)
        .collect();
    assert!(
        loud.is_empty(),
        "{} lines at INFO or above for {RESETS} client resets:\n{}",
        loud.len(),
        loud.join("\n")
    );
    // Nor in the client's: a local client's reset is passed on, not a failed connection.
    let log = fwd.proc.stderr_text();
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection failed"))
        .collect();
    assert!(
        failed.is_empty(),
        "client resets logged as failures:\n{}",
        failed.join("\n")
    );
}
