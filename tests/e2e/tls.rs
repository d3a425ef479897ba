//! TLS is verified: a certificate from another CA, or for another name, is refused. `--check`
//! says so in one line naming the host; without `--check` the local connection is reset.

use std::ffi::OsString;
use std::io::{ErrorKind, Read};
use std::process::Command;

use crate::harness::{forward_bin, run, TempDir};
use crate::net::Backend;
use crate::stack::{Forward, Stack, Transport, VM, VM_FQDN};
use crate::tls_ca::{tls_server, TestCa};

per_transport!(wrong_ca_is_rejected: direct, agent_tls);
per_transport!(wrong_name_is_rejected: direct, agent_tls);
per_transport!(edge_of_another_domain_is_rejected: direct, agent_tls);

/// Replaces the value of `--ca-file` in a client argument list.
fn with_ca(mut args: Vec<OsString>, ca: &std::path::Path) -> Vec<OsString> {
    let i = args
        .iter()
        .position(|a| a == "--ca-file")
        .expect("client args carry --ca-file");
    args[i + 1] = ca.into();
    args
}

/// `forward --check ARGS SPEC` must fail with exit code 1 and a line naming the host and the
/// certificate problem.
fn assert_check_fails(args: &[OsString], spec: &str, needles: &[&str]) {
    let mut cmd = Command::new(forward_bin());
    cmd.args(args).arg("--check").arg(spec);
    let (status, stdout, stderr) = run("forward --check", cmd);
    assert_eq!(
        status.code(),
        Some(1),
        "forward --check should exit 1; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        !stdout.contains("forwarding "),
        "--check failed but forward listened anyway:\n{stdout}"
    );
    let err_line = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no `error: ` line in stderr:\n{stderr}"));
    for n in needles {
        assert!(
            err_line.to_lowercase().contains(&n.to_lowercase()),
            "error line should mention {n:?}: {err_line}"
        );
    }
}

/// Without --check forward listens, and the local connection is reset once the TLS handshake fails.
fn assert_data_connection_reset(args: Vec<OsString>, spec: &str, t: Transport) {
    let mut args = args;
    args.push(spec.into());
    let fwd = Forward::start(args, 1, t);
    // forward may reset the connection before connect() even returns here: that is a reset too.
    let mut conn = match fwd.local().try_connect() {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
        Err(e) => panic!("connect to forward: {e}"),
    };
    let mut buf = [0u8; 1024];
    match conn.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(0) => panic!("connection closed cleanly; want a reset when TLS verification fails"),
        Ok(n) => panic!("got {n} bytes through an unverified connection"),
        Err(e) => panic!("want ConnectionReset, got {e}"),
    }
}

fn wrong_ca_is_rejected(t: Transport) {
    let backend = Backend::echo();
    let stack = Stack::start(t, &[backend.port]);
    let other = TempDir::new("other-ca");
    let other_ca = other.join("other-ca.pem");
    TestCa::new("some other CA").write_pem(&other_ca);

    let args = with_ca(stack.client_args(), &other_ca);
    let spec = format!("127.0.0.1:0:{}", stack.target(backend.port));
    assert_check_fails(&args, &spec, &[VM_FQDN, "certificate", "--ca-file"]);
    assert_data_connection_reset(args, &spec, t);
}

/// A server whose certificate (from the trusted CA) is for `*.other.test`, not vm1.vm.vers.sh.
fn wrong_name_is_rejected(t: Transport) {
    let dir = TempDir::new("wrong-name");
    let ca = TestCa::new("wrong-name test CA");
    let ca_file = dir.join("ca.pem");
    ca.write_pem(&ca_file);
    let port = tls_server(&ca, &["*.other.test", "other.test"]);

    let mut args: Vec<OsString> = vec![
        "--edge".into(),
        "127.0.0.1".into(),
        "--ca-file".into(),
        ca_file.into(),
    ];
    let spec = match t {
        Transport::Direct => format!("127.0.0.1:0:{VM}:{port}"),
        Transport::AgentTls => {
            let token = dir.join("token");
            std::fs::write(
                &token,
                "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
            )
            .unwrap();
            args.extend([
                "--agent".into(),
                port.to_string().into(),
                "--transport".into(),
                "tls".into(),
                "--token-file".into(),
                token.into(),
            ]);
            format!("127.0.0.1:0:{VM}:5432")
        }
        _ => unreachable!("no edge TLS for {t:?}"),
    };
    assert_check_fails(&args, &spec, &[VM_FQDN, "name"]);
    assert_data_connection_reset(args, &spec, t);
}

/// The edge serves `*.other.test` while forward asks for vm1.vm.vers.sh: the edge refuses the name,
/// and forward says which host was refused.
fn edge_of_another_domain_is_rejected(t: Transport) {
    let backend = Backend::echo();
    let stack = Stack::start_with_edge_args(t, &[backend.port], &["--domain", "other.test"]);
    let args = stack.client_args();
    let spec = format!("127.0.0.1:0:{}", stack.target(backend.port));
    assert_check_fails(&args, &spec, &[VM_FQDN]);
    assert_data_connection_reset(args, &spec, t);
}

/// The mistake every Vers user makes once: a service bound to 127.0.0.1 (or 0.0.0.0) only. The
/// edge dials the VM over IPv6, finds nothing and hangs up right after the TLS handshake, which
/// alone would pass. `--check` must fail and point at the listener; a port with a listener must
/// still pass; and a connection's warning must give the same hint.
#[test]
fn direct_check_names_a_vm_port_without_a_listener() {
    use std::io::Write;

    use crate::harness::Src;

    let v4_only = Backend::echo_on("127.0.0.1:0");
    let live = Backend::echo();
    let stack = Stack::start(Transport::Direct, &[v4_only.port, live.port]);
    let spec = format!("127.0.0.1:0:{}", stack.target(v4_only.port));
    let port = format!("port {}", stack.rport(v4_only.port));
    assert_check_fails(&stack.client_args(), &spec, &[VM_FQDN, &port, ":: (IPv6)"]);

    let ok = stack.forward(
        &["--check"],
        &[format!("127.0.0.1:0:{}", stack.target(live.port))],
        1,
    );
    drop(ok);

    let mut fwd = stack.forward(&[], &[spec], 1);
    let mut conn = fwd.local().connect();
    let _ = conn.write_all(b"anyone there?");
    let mut buf = [0u8; 64];
    match conn.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("want a reset from a VM port without a listener, got {other:?}"),
    }
    fwd.proc
        .wait_line(Src::Stderr, "the hint in the warning", |l| {
            l.contains("connection failed") && l.contains(&port) && l.contains(":: (IPv6)")
        });
}

/// Failures beyond the first of a burst are counted in a line of their own, even when nothing
/// fails after them: here at exit (they were never mentioned before, a tester's finding).
#[test]
fn a_burst_of_failed_connections_is_counted_by_exit() {
    use crate::harness::Src;

    let v4_only = Backend::echo_on("127.0.0.1:0");
    let stack = Stack::start(Transport::Direct, &[v4_only.port]);
    let mut fwd = stack.forward(
        &[],
        &[format!("127.0.0.1:0:{}", stack.target(v4_only.port))],
        1,
    );
    for _ in 0..6 {
        let mut conn = fwd.local().connect();
        let mut buf = [0u8; 64];
        match conn.read(&mut buf) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("want a reset from a VM port without a listener, got {other:?}"),
        }
    }
    fwd.proc.wait_line(Src::Stderr, "the first failure", |l| {
        l.contains("connection failed")
    });
    fwd.proc.signal("TERM");
    assert!(fwd.proc.wait_exit().success(), "{}", fwd.proc.transcript());
    let log = fwd.proc.stderr_text();
    assert_eq!(log.matches("connection failed").count(), 1, "{log}");
    assert!(
        log.contains("5 more connection(s) failed the same way in the last 10s"),
        "{log}"
    );
}
