//! `forward stdio HOST:PORT` (ssh ProxyCommand): stdin goes up, stdout comes down, and the
//! process exits 0 once both directions have ended.

use std::io::Write;
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::thread;

use crate::harness::{forward_bin, Proc};
use crate::net::{drain, hex, Backend, Payload};
use crate::stack::{Stack, Transport};

per_transport!(stdio_pipes_bytes_both_ways);
per_transport!(stdio_reaches_another_host_through_the_agent: agent_tls, quic);
per_transport!(sighup_from_ssh_still_delivers_what_stdin_held);
per_transport!(an_upload_that_outlives_the_answer_arrives_whole_before_exit);
per_transport!(a_lost_path_ends_stdio_with_one_error_line: direct, agent_tls, agent_tcp);
per_transport!(sigterm_resets_the_service_connection_at_once);

fn stdio_pipes_bytes_both_ways(t: Transport) {
    let backend = Backend::echo();
    let stack = Stack::start(t, &[backend.port]);
    let target = stack.target(backend.port);
    pipe_through_stdio(&stack, &backend, &target);
}

/// `forward stdio --agent P vm/HOST:PORT`, as in a SPEC: the agent dials HOST (here the VM's
/// IPv4 loopback, which the edge could not reach).
fn stdio_reaches_another_host_through_the_agent(t: Transport) {
    let backend = Backend::echo_on("127.0.0.1:0");
    let stack = Stack::start(t, &[]);
    let target = format!("{}/127.0.0.1:{}", crate::stack::VM, backend.port);
    pipe_through_stdio(&stack, &backend, &target);
}

#[test]
fn stdio_via_target_needs_the_agent() {
    let mut cmd = Command::new(forward_bin());
    cmd.args(["stdio", "--edge", "127.0.0.1", "vm1/10.0.0.5:22"]);
    let (st, _out, err) = crate::harness::run("forward stdio vm/target", cmd);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("needs the agent (--agent PORT)"), "{err}");

    // A malformed target is named whole, not only the part after the '/'.
    let mut cmd = Command::new(forward_bin());
    cmd.args(["stdio", "--edge", "127.0.0.1", "vm1/:22"]);
    let (st, _out, err) = crate::harness::run("forward stdio vm/:22", cmd);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("invalid target 'vm1/:22'"), "{err}");

    // An IPv6 target without brackets gets the hint a SPEC gets (a tester's nit).
    let mut cmd = Command::new(forward_bin());
    cmd.args(["stdio", "--edge", "127.0.0.1", "vm1/::1:22"]);
    let (st, _out, err) = crate::harness::run("forward stdio vm/::1:22", cmd);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(
        err.contains("invalid target 'vm1/::1:22' (an IPv6 target goes in brackets"),
        "{err}"
    );

    let mut cmd = Command::new(forward_bin());
    cmd.args(["stdio", "--edge", "127.0.0.1", "vm1/db.:22"]);
    let (st, _out, err) = crate::harness::run("forward stdio vm/db.:22", cmd);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(err.contains("drop the trailing dot"), "{err}");

    // One colon too many is named as a bad target, not as a bad TLS name.
    let mut cmd = Command::new(forward_bin());
    cmd.args(["stdio", "--edge", "127.0.0.1", "vm1:80:90"]);
    let (st, _out, err) = crate::harness::run("forward stdio vm1:80:90", cmd);
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(
        err.contains("invalid target 'vm1:80:90'") && err.contains("expected HOST:PORT"),
        "{err}"
    );

    // The `ssh -W localhost:22` habit: the host names the VM.
    for target in ["localhost:22", "127.0.0.1:22", "[::1]:22"] {
        let mut cmd = Command::new(forward_bin());
        cmd.args(["stdio", "--edge", "127.0.0.1", target]);
        let (st, _out, err) = crate::harness::run("forward stdio to a loopback host", cmd);
        assert_eq!(st.code(), Some(1), "{err}");
        assert!(err.contains("stands where the VM goes"), "{target}: {err}");
    }
}

/// A non-blocking stdin and stdout (an inherited terminal, another program's socketpair) are
/// waited on, as ssh and socat do: reads and writes that said EAGAIN ended the relay (a
/// tester's finding). Here both stay empty or full long enough to say it.
#[test]
fn non_blocking_stdin_and_stdout_carry_every_byte() {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
    use std::os::fd::AsFd;

    let backend = Backend::echo();
    let stack = Stack::start(Transport::Direct, &[backend.port]);
    let (stdin_r, mut stdin_w) = std::io::pipe().expect("pipe");
    let (mut stdout_r, stdout_w) = std::io::pipe().expect("pipe");
    // Only forward's ends: each end of a pipe is an open file of its own.
    for fd in [stdin_r.as_fd(), stdout_w.as_fd()] {
        let flags = fcntl_getfl(fd).expect("F_GETFL");
        fcntl_setfl(fd, flags | OFlags::NONBLOCK).expect("F_SETFL");
    }
    let mut cmd = Command::new(forward_bin());
    cmd.arg("stdio")
        .args(stack.client_args())
        .arg(stack.target(backend.port))
        .env_remove("RUST_LOG")
        .stdin(stdin_r)
        .stdout(stdout_w);
    let mut proc = Proc::spawn_own_stdio("forward stdio, non-blocking", cmd);

    let seed = rand::random();
    let len = 4 * 1024 * 1024 + 5;
    let up = thread::spawn(move || {
        // stdin empty for a while: forward's first reads find nothing.
        thread::sleep(std::time::Duration::from_millis(300));
        let h = Payload::new(seed, len)
            .send(&mut stdin_w)
            .expect("write to forward's stdin");
        drop(stdin_w);
        h
    });
    // stdout unread for a while: the echo fills the pipe and forward's writes find no room.
    thread::sleep(std::time::Duration::from_millis(1500));
    let down = drain(&mut stdout_r);
    let sent = up.join().unwrap();
    let (n, h) = down.unwrap_or_else(|(e, n)| panic!("reading stdout failed after {n} bytes: {e}"));
    let status = proc.wait_exit();
    assert!(status.success(), "{status}: {}", proc.transcript());
    assert_eq!(n, len, "stdout length");
    assert_eq!(hex(&h), hex(&sent), "stdout bytes differ from stdin");
    let r = backend.next_report();
    assert_eq!(r.note, "eof");
    assert_eq!(hex(&r.hash), hex(&sent));
}

/// `forward stdio TARGET` with piped stdin and stdout, as ssh runs a ProxyCommand.
fn spawn_stdio(stack: &Stack, target: &str) -> (Proc, ChildStdout, ChildStdin) {
    let mut cmd = Command::new(forward_bin());
    cmd.arg("stdio")
        .args(stack.client_args())
        .arg(target)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped());
    let (mut proc, stdout) = Proc::spawn_raw_stdout("forward stdio", cmd);
    let stdin = proc.take_stdin();
    (proc, stdout, stdin)
}

fn pipe_through_stdio(stack: &Stack, backend: &Backend, target: &str) {
    let (mut proc, mut stdout, mut stdin) = spawn_stdio(stack, target);

    let seed = rand::random();
    let len = 8 * 1024 * 1024 + 3;
    let up = thread::spawn(move || {
        let h = Payload::new(seed, len)
            .send(&mut stdin)
            .expect("write to forward's stdin");
        stdin.flush().unwrap();
        drop(stdin); // EOF on stdin = half-close towards the service
        h
    });
    let down = drain(&mut stdout);
    let sent = up.join().unwrap();
    let (n, h) = down.unwrap_or_else(|(e, n)| panic!("reading stdout failed after {n} bytes: {e}"));
    assert_eq!(n, len, "stdout length");
    assert_eq!(hex(&h), hex(&sent), "stdout bytes differ from stdin");

    let status = proc.wait_exit();
    assert!(status.success(), "forward stdio exited with {status}");
    // As a ProxyCommand its stderr is the user's terminal: silent unless something is wrong.
    let stderr = proc.stderr_text();
    assert!(stderr.trim().is_empty(), "forward stdio logged:\n{stderr}");
    let r = backend.next_report();
    assert_eq!(r.note, "eof");
    assert_eq!(hex(&r.hash), hex(&sent));
}

/// What ssh does to its ProxyCommand when it exits: write its last message (the disconnect),
/// close both pipes, send SIGHUP. The bytes already in the pipe must still reach the service,
/// followed by a clean end, and forward must exit 0.
fn sighup_from_ssh_still_delivers_what_stdin_held(t: Transport) {
    // Like sshd, it answers the goodbye only later: forward is still running at SIGHUP.
    let backend = Backend::sink(std::time::Duration::from_millis(500));
    let stack = Stack::start(t, &[backend.port]);
    let (mut proc, stdout, mut stdin) = spawn_stdio(&stack, &stack.target(backend.port));
    let seed = rand::random();
    let len = 1024 * 1024 + 7;
    let sent = Payload::new(seed, len)
        .send(&mut stdin)
        .expect("write to forward's stdin");
    // The pipe still holds the tail of it when ssh hangs up.
    drop(stdin);
    drop(stdout);
    proc.signal("HUP");
    let status = proc.wait_exit();
    assert!(
        status.success(),
        "forward stdio exited with {status} after SIGHUP"
    );
    let r = backend.next_report();
    assert_eq!(r.note, "eof", "the service saw {r:?}");
    assert_eq!(r.received, len);
    assert_eq!(hex(&r.hash), hex(&sent));
}

/// The service ends its direction first; the upload is still in flight when stdout ends and
/// stdin reaches EOF. `forward stdio` exits right after that, and every byte must reach the
/// service first, with a clean end: before the fix, an agent client closed its carrier with
/// part of the upload still queued (2-3 MiB of 20 lost, exit code 0).
fn an_upload_that_outlives_the_answer_arrives_whole_before_exit(t: Transport) {
    let backend = Backend::half_closing_sink();
    let stack = Stack::start(t, &[backend.port]);
    let (mut proc, mut stdout, mut stdin) = spawn_stdio(&stack, &stack.target(backend.port));
    let seed = rand::random();
    let len = 20 * 1024 * 1024 + 5;
    let up = thread::spawn(move || {
        let h = Payload::new(seed, len)
            .send(&mut stdin)
            .expect("write to forward's stdin");
        drop(stdin);
        h
    });
    let (n, _) = drain(&mut stdout).unwrap_or_else(|(e, n)| panic!("stdout failed after {n}: {e}"));
    assert_eq!(n, 0, "the service sent nothing");
    let sent = up.join().unwrap();
    let status = proc.wait_exit();
    assert!(status.success(), "forward stdio exited with {status}");
    let r = backend.next_report();
    assert_eq!(
        (r.received, r.note.as_str()),
        (len, "eof"),
        "{}",
        proc.stderr_text()
    );
    assert_eq!(hex(&r.hash), hex(&sent));
}

/// The path dies under a session: `forward stdio` exits 1 with one `error:` line on stderr
/// (ssh prints it on the user's terminal), not a "reconnecting" warning before it.
fn a_lost_path_ends_stdio_with_one_error_line(t: Transport) {
    let backend = Backend::echo();
    let mut stack = Stack::start(t, &[backend.port]);
    let (mut proc, mut stdout, mut stdin) = spawn_stdio(&stack, &stack.target(backend.port));
    stdin.write_all(b"ping").unwrap();
    let mut four = [0u8; 4];
    std::io::Read::read_exact(&mut stdout, &mut four).unwrap();
    assert_eq!(&four, b"ping");
    stack.kill_carrier();
    let status = proc.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", proc.transcript());
    let stderr = proc.stderr_text();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one line:\n{stderr}");
    assert!(lines[0].starts_with("error:"), "{stderr}");
    drop(stdin);
}

/// `forward stdio` (ssh's ProxyCommand) to a VM port with nothing behind it: the edge hangs up
/// after the handshake, and the one error line says what is likely missing, as `--check` does.
#[test]
fn stdio_to_a_port_with_nothing_behind_it_says_so() {
    let closed = crate::closed_port::closed_port();
    let port = closed.port;
    let stack = Stack::start(Transport::Direct, &[port]);
    let mut cmd = Command::new(forward_bin());
    cmd.arg("stdio")
        .args(stack.client_args())
        .arg(stack.target(port))
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped());
    let (mut proc, _stdout) = Proc::spawn_raw_stdout("forward stdio to nothing", cmd);
    let _stdin = proc.take_stdin();
    let st = proc.wait_exit();
    assert_eq!(st.code(), Some(1), "{}", proc.transcript());
    let err = proc.stderr_text();
    assert!(
        err.contains(&format!(
            "is a service listening on port {} of the VM",
            stack.rport(port)
        )),
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
}

/// ssh sends its ProxyCommand SIGHUP when it gives up, a supervisor SIGTERM, a terminal
/// SIGINT: while the edge or agent has not answered yet, `forward stdio` leaves at once (0,
/// 143 and 130), not after `--connect-timeout` (it waited the whole timeout, and over QUIC
/// longer).
#[test]
fn signals_end_stdio_while_it_is_still_connecting() {
    // Accepts TCP and never says a word: a TLS handshake that never completes.
    let silent_tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    silent_tcp.set_nonblocking(true).unwrap();
    let tcp_port = silent_tcp.local_addr().unwrap().port();
    // Takes datagrams and never answers: a QUIC handshake that never completes.
    let silent_udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    silent_udp.set_nonblocking(true).unwrap();
    let udp_port = silent_udp.local_addr().unwrap().port();
    let token = crate::harness::TempDir::new("stdio-signals");
    let token_file = token.join("token");
    let secret = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    std::fs::write(&token_file, secret).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let token_file = token_file.display().to_string();
    let tcp = tcp_port.to_string();
    let udp = udp_port.to_string();
    let pin = "sha256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let modes: [(&str, Vec<&str>, String); 3] = [
        ("direct", vec![], format!("vm1:{tcp}")),
        (
            "agent",
            vec!["--agent", &tcp, "--token-file", &token_file],
            "vm1:22".into(),
        ),
        (
            "quic",
            vec![
                "--agent",
                &udp,
                "--transport",
                "quic",
                "--agent-pin",
                pin,
                "--token-file",
                &token_file,
            ],
            "vm1:22".into(),
        ),
    ];
    let mut held = Vec::new();
    for (mode, args, target) in &modes {
        for (sig, code) in [("HUP", 0), ("TERM", 143), ("INT", 130)] {
            // The last process's datagrams must not pass for this one's first.
            while silent_udp.recv_from(&mut [0u8; 2048]).is_ok() {}
            let mut cmd = Command::new(forward_bin());
            cmd.args(["stdio", "--edge", "127.0.0.1", "--connect-timeout", "60"])
                .args(args)
                .arg(target)
                .env_remove("RUST_LOG")
                .stdin(Stdio::piped());
            let (mut proc, _stdout) = Proc::spawn_raw_stdout("forward stdio connecting", cmd);
            let _stdin = proc.take_stdin();
            // Until the client's first packet arrives: then it is stuck in its handshake (the
            // TCP connection is held open).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let arrived = if *mode != "quic" {
                    silent_tcp.accept().map(|(c, _)| held.push(c)).is_ok()
                } else {
                    silent_udp.recv_from(&mut [0u8; 2048]).is_ok()
                };
                if arrived {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline && proc.try_status().is_none(),
                    "{mode}: forward stdio never tried to connect: {}",
                    proc.transcript()
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let sent = std::time::Instant::now();
            proc.signal(sig);
            let status = proc.wait_exit();
            assert_eq!(
                status.code(),
                Some(code),
                "{mode}, SIG{sig}: {}",
                proc.transcript()
            );
            assert!(
                sent.elapsed() < std::time::Duration::from_secs(10),
                "{mode}: SIG{sig} took {:?} to end forward stdio",
                sent.elapsed()
            );
            assert!(
                !proc.stderr_text().contains("panicked"),
                "{}",
                proc.transcript()
            );
        }
    }
}

/// SIGTERM (a supervisor, `kill`) cuts `forward stdio` mid-upload: the service sees a reset at
/// once, not a clean end, and over QUIC not only at the agent's 30 s idle timeout; the exit
/// status is what a shell shows for death by SIGTERM.
fn sigterm_resets_the_service_connection_at_once(t: Transport) {
    let backend = Backend::sink(std::time::Duration::ZERO);
    let stack = Stack::start(t, &[backend.port]);
    let (mut proc, _stdout, mut stdin) = spawn_stdio(&stack, &stack.target(backend.port));
    Payload::new(rand::random(), 1024 * 1024)
        .send(&mut stdin)
        .expect("write to forward's stdin");
    stdin.flush().unwrap();
    // Wait until bytes flow end to end (the sink reports only at the end).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sent = std::time::Instant::now();
    proc.signal("TERM");
    let status = proc.wait_exit();
    assert_eq!(
        status.code(),
        Some(143),
        "forward stdio exited with {status}"
    );
    let r = backend.next_report();
    assert!(
        r.note.contains("reset"),
        "the service saw {:?} after {} bytes; want a reset",
        r.note,
        r.received
    );
    assert!(
        sent.elapsed() < std::time::Duration::from_secs(15),
        "the service learned of the cut after {:?}",
        sent.elapsed()
    );
    drop(stdin);
}
