//! SIGTERM: forward stops accepting, lets open connections finish within `--grace`, exits 0.

use std::io::{ErrorKind, Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::TIMEOUT;
use crate::net::{echo_exchange, Backend, Conn, Local};
use crate::stack::{Forward, Stack, Transport};

per_transport!(sigterm_drains_open_connection);
per_transport!(sigterm_exits_after_grace);
per_transport!(second_signal_skips_the_grace: direct, agent_tls);
per_transport!(a_hangup_in_the_grace_period_ends_it_at_once: direct, agent_tcp);
per_transport!(sighup_ends_at_once_and_removes_the_socket_file: direct, agent_tcp);
per_transport!(under_nohup_a_hangup_changes_nothing: direct, agent_tcp);

/// Asserts a clean exit 0. Death by SIGTERM itself means the signal arrived before forward had
/// installed its handler, although it had already printed its `forwarding` lines (readiness):
/// handlers must be installed before those lines are printed.
fn assert_clean_exit(status: std::process::ExitStatus) {
    use std::os::unix::process::ExitStatusExt;
    assert!(
        status.signal() != Some(15),
        "forward died from SIGTERM's default action: it printed `forwarding ...` before installing \
         its SIGTERM handler (install the handlers first, then print)"
    );
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

/// Polls until a new connection to `local` is refused: the listener is gone. Connections that
/// still get through meanwhile (signal not handled yet) are closed at once.
fn wait_until_refused(local: &Local) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match local.try_connect() {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return,
            // Accepted into the backlog just before the listener closed: the kernel resets it.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connect after SIGTERM: want refused, got {e}"),
            Ok(c) => drop(c),
        }
        assert!(
            Instant::now() < deadline,
            "forward still accepts connections {TIMEOUT:?} after SIGTERM"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm_drains_open_connection(t: Transport) {
    let backend = Backend::echo();
    let stack = Stack::start(t, &[backend.port]);
    let mut fwd = stack.forward(
        &["--grace", "30"],
        &[format!("127.0.0.1:0:{}", stack.target(backend.port))],
        1,
    );
    let local = fwd.local().clone();

    let mut conn = local.connect();
    conn.write_all(b"before the signal").unwrap();
    let mut buf = [0u8; 17];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"before the signal");

    fwd.proc.signal("TERM");
    wait_until_refused(&local);
    // The reports of the probe connections above do not matter; only ours does.
    if let Some(st) = fwd.proc.try_status() {
        assert_clean_exit(st);
        panic!("forward exited ({st}) although a connection was open and the grace period is 30 s");
    }

    // The open connection still works both ways, and ends normally.
    echo_exchange(conn, rand::random(), 1 << 20);
    assert_clean_exit(fwd.proc.wait_exit());
    let mut ours = false;
    for _ in 0..64 {
        let r = backend.next_report();
        // Our connection sent "before the signal" then the payload; the probes sent nothing.
        if r.received == 17 + (1 << 20) {
            ours = true;
            break;
        }
    }
    assert!(ours, "the service never saw our connection complete");
}

/// A forward with `--grace SECS` and one connection through it that is open and idle.
fn one_idle_connection(t: Transport, grace: &str) -> (Backend, Stack, Forward, Conn) {
    let backend = Backend::echo();
    let stack = Stack::start(t, &[backend.port]);
    let fwd = stack.forward(
        &["--grace", grace],
        &[format!("127.0.0.1:0:{}", stack.target(backend.port))],
        1,
    );
    let mut conn = fwd.local().connect();
    conn.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    conn.read_exact(&mut one).unwrap();
    (backend, stack, fwd, conn)
}

/// The connection forward gave up on is reset, not closed as if it had finished.
fn assert_reset(mut conn: Conn, why: &str) {
    let mut rest = Vec::new();
    let err = conn.read_to_end(&mut rest).expect_err(why);
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}

fn sigterm_exits_after_grace(t: Transport) {
    let (_backend, _stack, mut fwd, idle) = one_idle_connection(t, "1");
    fwd.proc.signal("TERM");
    // The idle connection never ends by itself: forward must give up on it after the grace period.
    assert_clean_exit(fwd.proc.wait_exit());
    assert_reset(
        idle,
        "a connection cut at the end of the grace period must be reset, not cleanly closed",
    );
}

/// A second Ctrl-C does not wait out the grace period: open connections are reset at once.
fn second_signal_skips_the_grace(t: Transport) {
    assert_clean_exit(signal_in_the_grace_period(t, "INT"));
}

/// SIGHUP in the grace period (Ctrl-C, then the terminal closed) ends it at once, as SIGHUP
/// does before: open connections reset, exit status 129. It went unheard, and forward lingered
/// unseen for up to `--grace` (a tester's finding).
fn a_hangup_in_the_grace_period_ends_it_at_once(t: Transport) {
    let st = signal_in_the_grace_period(t, "HUP");
    assert_eq!(st.code(), Some(128 + 1), "{st}");
}

/// Ctrl-C with a connection open and a 120 s grace, then `signal`: forward must exit well
/// before the grace ends, its open connection reset, not closed as if it had finished.
fn signal_in_the_grace_period(t: Transport, signal: &str) -> std::process::ExitStatus {
    let (_backend, _stack, mut fwd, open) = one_idle_connection(t, "120");
    fwd.proc.signal("INT");
    fwd.proc
        .wait_line(crate::harness::Src::Stderr, "the stopping line", |l| {
            l.contains("stopping")
        });
    let second = Instant::now();
    fwd.proc.signal(signal);
    let st = fwd.proc.wait_exit();
    assert!(
        second.elapsed() < Duration::from_secs(60),
        "forward waited {:?} after SIG{signal} (grace 120 s)",
        second.elapsed()
    );
    assert_reset(
        open,
        &format!("a connection cut by SIG{signal} must be reset, not cleanly closed"),
    );
    st
}

/// A connection whose dial is still running when forward is told to stop (here: an edge that
/// accepts TCP and never answers the TLS handshake) does not hold the exit for the grace
/// period: it gets a moment to finish dialling (2 s), then is reset, never closed cleanly.
/// Before, Ctrl-C waited out the whole grace (10 s by default) for it.
#[test]
fn a_connection_still_dialling_at_stop_is_reset_without_waiting_out_the_grace() {
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = mute.local_addr().unwrap().port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    thread::spawn(move || {
        for s in mute.incoming().flatten() {
            keep.lock().unwrap().push(s);
        }
    });
    let args = ["--edge", "127.0.0.1", "--grace", "120"]
        .iter()
        .map(std::ffi::OsString::from)
        .chain([format!("127.0.0.1:0:vm1:{port}").into()])
        .collect();
    let mut fwd = Forward::start(args, 1, Transport::Direct);
    let conn = fwd.local().connect();
    // The dial has reached the mute edge.
    let deadline = Instant::now() + TIMEOUT;
    while held.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "forward never dialled the edge");
        thread::sleep(Duration::from_millis(20));
    }
    let stopped = Instant::now();
    fwd.proc.signal("TERM");
    // `wait_exit` gives up after 60 s, half the grace.
    assert_clean_exit(fwd.proc.wait_exit());
    assert!(
        stopped.elapsed() < Duration::from_secs(60),
        "forward waited {:?} for a connection that never got past its dial (grace 120 s)",
        stopped.elapsed()
    );
    assert_reset(conn, "a connection given up while dialling must be reset");
    assert!(
        fwd.proc.stderr_text().contains("still being set up"),
        "the reset connection is logged with the reason:\n{}",
        fwd.proc.transcript()
    );
}

/// SIGHUP (the terminal closed) ends forward at once, as it ends `ssh -L`, whatever the grace:
/// open connections are reset, the exit status is what a shell shows for death by SIGHUP, and
/// a Unix socket's file is removed (the default action left it behind).
fn sighup_ends_at_once_and_removes_the_socket_file(t: Transport) {
    let backend = Backend::echo();
    let stack = Stack::start(t, &[backend.port]);
    let sock = stack.dir.join("hup.sock");
    let target = stack.target(backend.port);
    // A TCP side too: a Unix socket has no reset to show.
    let mut fwd = stack.forward(
        &["--grace", "120"],
        &[
            format!("{}:{target}", sock.display()),
            format!("127.0.0.1:0:{target}"),
        ],
        2,
    );
    let tcp = fwd
        .locals
        .iter()
        .find(|l| matches!(l, Local::Tcp(_)))
        .unwrap()
        .clone();
    let mut conn = tcp.connect();
    conn.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    conn.read_exact(&mut one).unwrap();
    assert!(sock.exists());
    let sent = Instant::now();
    fwd.proc.signal("HUP");
    let status = fwd.proc.wait_exit();
    assert_eq!(
        status.code(),
        Some(129),
        "exit status after SIGHUP: {status}"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(60),
        "forward waited {:?} after SIGHUP (grace 120 s)",
        sent.elapsed()
    );
    assert!(
        !sock.exists(),
        "the socket file {} is left behind",
        sock.display()
    );
    assert_reset(conn, "a connection cut by SIGHUP must be reset");
}

/// `nohup forward ...` starts forward with SIGHUP ignored, to outlive the terminal; forward
/// keeps it ignored. Before, its own handler replaced nohup's, and the hang-up ended it
/// (status 129) as if nohup were not there (a tester's finding).
fn under_nohup_a_hangup_changes_nothing(t: Transport) {
    use crate::harness::{forward_bin, forward_env, Proc};
    let backend = Backend::echo();
    let stack = Stack::start(t, &[backend.port]);
    let mut cmd = std::process::Command::new("nohup");
    cmd.arg(forward_bin())
        .args(stack.client_args())
        .arg(format!("127.0.0.1:0:{}", stack.target(backend.port)));
    forward_env(&mut cmd, "info");
    let mut fwd = Forward::start_with(Proc::spawn("forward", cmd), 1, t);
    let open = fwd.local().connect();
    fwd.proc.signal("HUP");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        fwd.proc.try_status(),
        None,
        "SIGHUP ended forward under nohup"
    );
    echo_exchange(open, rand::random(), 1 << 16);
    echo_exchange(fwd.local().connect(), rand::random(), 1 << 16);
    fwd.proc.signal("TERM");
    assert_clean_exit(fwd.proc.wait_exit());
}

/// The same for the agent (README: `nohup forward agent ... &` where there is no systemd): it
/// goes on serving after the ssh session that started it hangs up.
#[test]
fn an_agent_under_nohup_outlives_the_hangup() {
    use crate::harness::{forward_bin, forward_env, Proc, Src, TempDir};
    let dir = TempDir::new("nohup-agent");
    let token = dir.join("token");
    std::fs::write(&token, "00112233445566778899aabbccddeeff0011223344556677").unwrap();
    let mut cmd = std::process::Command::new("nohup");
    cmd.arg(forward_bin())
        .args(["agent", "--listen", "[::1]:0", "--token-file"])
        .arg(&token);
    forward_env(&mut cmd, "info");
    let mut agent = Proc::spawn("agent", cmd);
    let line = agent.wait_line(Src::Stdout, "the agent's listening line", |l| {
        l.contains("listening on")
    });
    let addr = line
        .split_whitespace()
        .find_map(|w| w.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no address in agent line {line:?}"));
    agent.signal("HUP");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        agent.try_status(),
        None,
        "SIGHUP ended the agent under nohup"
    );
    crate::net::assert_health_ok(addr);
    agent.signal("TERM");
    assert_clean_exit(agent.wait_exit());
}

/// SIGTERM while `--check` waits for a target removes the Unix socket forward had bound (and
/// its lock file), as a stop does later; the handlers used to be installed only after the
/// check, so the default action left both files behind. The exit status is the signal's
/// (143), not 0: the check did not pass, and a script must not read it as passed (a tester's
/// finding).
#[test]
fn a_signal_during_the_check_removes_the_socket_and_does_not_pass() {
    use crate::harness::{Proc, TempDir};
    // An edge that takes the connection and never answers the TLS handshake.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = mute.local_addr().unwrap().port();
    thread::spawn(move || {
        let mut held = Vec::new();
        for s in mute.incoming().flatten() {
            held.push(s);
        }
    });
    let dir = TempDir::new("check-signal");
    let sock = dir.join("check.sock");
    let lock = dir.join("check.sock.lock");
    let mut fwd = Proc::forward(
        "forward",
        [
            "--edge".into(),
            "127.0.0.1".into(),
            "--connect-timeout".into(),
            "60".into(),
            "--check".into(),
            format!("{}:vm1:{port}", sock.display()),
        ],
    );
    let deadline = Instant::now() + TIMEOUT;
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "forward never bound {}",
            sock.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
    // Past the bind, inside the check's wait for the handshake.
    thread::sleep(Duration::from_millis(300));
    fwd.signal("TERM");
    let st = fwd.wait_exit();
    assert_eq!(st.code(), Some(128 + 15), "{st}: {}", fwd.transcript());
    assert!(!sock.exists(), "{} is left behind", sock.display());
    assert!(!lock.exists(), "{} is left behind", lock.display());
}
