//! Bad input: every mistake gets one clear line naming the bad part, and a non-zero exit code
//! (1 for our errors, 2 for clap's usage errors). No edge is needed: these fail before dialing,
//! except the last two which fail while dialing.

use std::net::TcpListener;
use std::process::Command;

use crate::harness::{forward_bin, run, TempDir};
use crate::stack::{VM, VM_FQDN};

struct Outcome {
    code: i32,
    stderr: String,
}

fn forward(args: &[&str]) -> Outcome {
    let mut cmd = Command::new(forward_bin());
    cmd.args(args);
    let (status, _out, stderr) = run("forward", cmd);
    Outcome {
        code: status.code().unwrap_or(-1),
        stderr,
    }
}

fn assert_rejected(args: &[&str], codes: &[i32], needles: &[&str]) {
    let o = forward(args);
    assert!(
        codes.contains(&o.code),
        "forward {args:?}: exit code {} (want one of {codes:?}); stderr:\n{}",
        o.code,
        o.stderr
    );
    assert!(
        !o.stderr.contains("panicked"),
        "forward {args:?} panicked:\n{}",
        o.stderr
    );
    for needle in needles {
        assert!(
            o.stderr.to_lowercase().contains(&needle.to_lowercase()),
            "forward {args:?}: stderr should mention {needle:?}:\n{}",
            o.stderr
        );
    }
    if o.code == 2 {
        let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with("error: "),
            "forward {args:?}: a usage error should be one `error: ` line:\n{}",
            o.stderr
        );
    }
    if o.code == 1 {
        assert!(
            o.stderr.lines().any(|l| l.starts_with("error: ")),
            "forward {args:?}: want a line starting with `error: `:\n{}",
            o.stderr
        );
    }
}

const FORM: &str = "[bind:]lport:host:rport";

#[test]
fn malformed_specs_name_the_bad_part() {
    let table: &[(&str, &[&str])] = &[
        ("abc", &[FORM]),
        ("5432:vm1", &[FORM]),
        ("1:2:3:4:5", &["bind address", "'1:2'"]),
        ("99999:vm1:80", &["local port", "'99999'"]),
        ("x5432:vm1:80", &["local port", "'x5432'"]),
        ("5432:vm1:99999", &["remote port", "'99999'"]),
        ("5432:vm1:http", &["remote port", "'http'"]),
        ("5432:vm1:0", &["remote port", "1-65535"]),
        ("5432::80", &["host"]),
        ("5432:a b:80", &["host", "'a b'"]),
        ("nope:5432:vm1:80", &["bind address", "'nope'"]),
        (
            "[::1:5432:vm1:80",
            &["a '[' without its ']'", "in brackets"],
        ),
        (
            "[::1]5432:vm1:80",
            &["needs a ':' between the ']' and the local port"],
        ),
    ];
    for (spec, needles) in table {
        assert_rejected(&[spec], &[1, 2], needles);
    }
}

#[test]
fn missing_spec_is_a_usage_error() {
    // With options but no SPEC: the one-line usage error.
    assert_rejected(&["-v"], &[2], &["SPEC"]);
    // Bare `forward`: the help with its examples, still exit 2 (nothing was done).
    let o = forward(&[]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains("Usage:")
            && o.stderr.contains("Examples:")
            && !o.stderr.contains("panicked"),
        "{}",
        o.stderr
    );
}

#[test]
fn bad_flag_values_are_usage_errors() {
    assert_rejected(&["--grace", "soon", "0:vm1:80"], &[2], &["--grace"]);
    // The range, not clap's "use '-- -1'", which would make it a SPEC.
    assert_rejected(
        &["--grace", "-1", "0:vm1:80"],
        &[2],
        &["'-1' is not a whole number of seconds"],
    );
    assert_rejected(&["--no-such-flag", "0:vm1:80"], &[2], &["--no-such-flag"]);
    assert_rejected(
        &["--log-format", "xml", "0:vm1:80"],
        &[2],
        &["--log-format", "possible values: text, json"],
    );
    assert_rejected(&["-v", "-q", "0:vm1:80"], &[2], &["cannot be used with"]);
    assert_rejected(
        &["--edge", "127.0.0.1:443", "0:vm1:80"],
        &[2],
        &["--edge", "has a port"],
    );
    assert_rejected(&["--edge", "", "0:vm1:80"], &[2], &["--edge", "empty"]);
    assert_rejected(&["--domain", ".", "0:vm1:80"], &[2], &["--domain", "empty"]);
    assert_rejected(
        &["--domain", "bad domain", "0:vm1:80"],
        &[2],
        &["--domain", "not a DNS domain"],
    );
    assert_rejected(
        &["agent", "--listen", "[::1]:0", "--allow", "db"],
        &[2],
        &["--allow", "expected HOST:PORT"],
    );
    assert_rejected(
        &["--connect-timeout", "0", "0:vm1:80"],
        &[2],
        &["--connect-timeout"],
    );
    assert_rejected(&["--agent", "0", "0:vm1:80"], &[2], &["--agent <PORT>"]);
    // Seconds past a year overflowed a deadline and panicked (review, session 17); a
    // fraction said only "invalid digit found in string".
    const HUGE: &str = "18446744073709551615";
    for (args, flag) in [
        (
            vec!["--connect-timeout", HUGE, "0:vm1:80"],
            "--connect-timeout",
        ),
        (vec!["--grace", HUGE, "0:vm1:80"], "--grace"),
        (vec!["--grace", "1.5", "0:vm1:80"], "--grace"),
        (
            vec![
                "stdio",
                "--connect-timeout",
                "9223372036854775807",
                "vm1:22",
            ],
            "--connect-timeout",
        ),
        (vec!["agent", "--drain", HUGE], "--drain"),
        (vec!["agent", "--idle-timeout", HUGE], "--idle-timeout"),
    ] {
        assert_rejected(&args, &[2], &[flag, "whole number of seconds", "a year"]);
    }
    assert_rejected(
        &[
            "--agent",
            "9",
            "--transport",
            "quic",
            "--agent-pin",
            "sha256:AAAA",
            "0:vm1:80",
        ],
        &[2],
        &["--agent-pin", "32 bytes"],
    );
    let pin = "sha256:h/DgM4e2qTt5fJrrUbxuwDz5QK0O/6cad0FqsOyhoWU=";
    assert_rejected(
        &["--agent", "9", "--agent-pin", pin, "0:vm1:80"],
        &[1],
        &["--agent-pin applies to --transport quic only"],
    );
    assert_rejected(&["--threads", "0", "0:vm1:80"], &[2], &["--threads", "0"]);
    assert_rejected(
        &["agent", "--threads", "many"],
        &[2],
        &["--threads", "many"],
    );
}

#[test]
fn unreadable_or_non_pem_ca_file() {
    let dir = TempDir::new("cli");
    let missing = dir.join("missing.pem");
    let missing = missing.to_str().unwrap();
    assert_rejected(&["--ca-file", missing, "0:vm1:80"], &[1], &[missing]);

    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "this is not a certificate\n").unwrap();
    let garbage = garbage.to_str().unwrap();
    assert_rejected(&["--ca-file", garbage, "0:vm1:80"], &[1], &[garbage, "PEM"]);

    // Cut short: said so in words (the parser's own text was a list of byte values).
    let cut = dir.join("cut.pem");
    std::fs::write(&cut, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
    let cut = cut.to_str().unwrap();
    assert_rejected(
        &["--ca-file", cut, "0:vm1:80"],
        &[1],
        &[cut, "no -----END----- line (is the file cut short?)"],
    );
    let o = forward(&["--ca-file", cut, "0:vm1:80"]);
    assert!(!o.stderr.contains("[67, 69"), "{}", o.stderr);

    // Endless: an error after a few MiB, not every byte of memory (a tester's forward reached
    // 3.7 GB in 5 s and said nothing). The agent's own certificate and key, likewise.
    assert_rejected(
        &["--ca-file", "/dev/zero", "0:vm1:80"],
        &[1],
        &["/dev/zero", "more than 8 MiB", "is it the right file?"],
    );
    let token = dir.join("token");
    std::fs::write(&token, "5f0c9a7e2b4d61f38a9c0e7d2b5a4f6c").unwrap();
    let mut perms = std::fs::metadata(&token).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    std::fs::set_permissions(&token, perms).unwrap();
    let token = token.to_str().unwrap();
    {
        let (cert, key) = ("/dev/zero", "/dev/zero");
        let o = forward(&[
            "agent",
            "--listen",
            "[::1]:0",
            "--token-file",
            token,
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ]);
        assert_eq!(o.code, 1, "{}", o.stderr);
        assert!(
            o.stderr.trim().lines().count() == 1
                && o.stderr.contains("/dev/zero")
                && o.stderr.contains("more than 8 MiB"),
            "{}",
            o.stderr
        );
    }
}

#[test]
fn local_port_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let spec = format!("127.0.0.1:{port}:{VM}:80");
    assert_rejected(
        &["--edge", "127.0.0.1", &spec],
        &[1],
        &[&port.to_string(), "in use"],
    );
}

#[test]
fn two_specs_on_one_local_port_are_named_before_anything_listens() {
    assert_rejected(
        &[
            "--edge",
            "127.0.0.1",
            "24546:vm1:5432",
            "6000:vm1:22",
            "24546:vm1:22",
        ],
        &[1],
        &["'24546:vm1:5432'", "'24546:vm1:22'", "local port 24546"],
    );
}

#[test]
fn check_reports_refused_edge() {
    // A port nothing listens on: bound a moment ago, now closed.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let spec = format!("127.0.0.1:0:{VM}:{port}");
    assert_rejected(
        &["--check", "--edge", "127.0.0.1", &spec],
        &[1],
        &[VM_FQDN, "refused"],
    );
}

/// `--log-format json`: every log line on stderr is one JSON object (for log shippers), and so
/// is each `forwarding` line on stdout (for scripts), with the real port and any Unix path intact.
#[test]
fn json_logs_are_one_object_per_line() {
    use crate::net::{echo_exchange, Backend, Local};
    use crate::stack::{Stack, Transport};

    let backend = Backend::echo();
    let stack = Stack::start(Transport::Direct, &[backend.port]);
    let dir = TempDir::new("json-lines");
    let sock = dir.join("a \"quoted\" name.sock");
    let mut fwd = stack.forward(
        &["--log-format", "json", "-v"],
        &[
            format!("127.0.0.1:0:{}", stack.target(backend.port)),
            format!("{}:{}", sock.display(), stack.target(backend.port)),
        ],
        2,
    );
    assert!(
        fwd.proc
            .stdout_text()
            .lines()
            .all(|l| l.starts_with("{\"forwarding\":")),
        "{}",
        fwd.proc.transcript()
    );
    assert!(matches!(fwd.locals[0], Local::Tcp(a) if a.port() != 0));
    assert_eq!(fwd.locals[1], Local::Unix(sock.clone()));
    for local in &fwd.locals {
        echo_exchange(local.connect(), rand::random(), 1024);
        backend.next_report();
    }
    fwd.proc.signal("TERM");
    assert!(fwd.proc.wait_exit().success());
    let stderr = fwd.proc.stderr_text();
    assert!(!stderr.trim().is_empty(), "no log lines at -v");
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not a JSON object: {line}"
        );
    }
}

/// A newline in what the user typed (a SPEC, a path) is shown escaped: the error stays one
/// line (it printed as two or three).
#[test]
fn an_error_quoting_a_newline_is_still_one_line() {
    let dir = TempDir::new("newline-errors");
    let sock = format!("{}/no\ndir/x.sock:abc:22", dir.join("d").display());
    for args in [
        &["31960:abc\n123:31007"][..],
        &["--ca-file", "/nonexistent\nfoo", "31960:abc:31007"],
        &[sock.as_str()],
    ] {
        let o = forward(args);
        assert_eq!(o.code, 1, "{args:?}: {}", o.stderr);
        let lines: Vec<&str> = o.stderr.lines().collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with("error: ") && lines[0].contains("\\n"),
            "{args:?}: want one escaped line:\n{}",
            o.stderr
        );
    }
}

/// `forward edge --log-format json`: its start-up lines on stdout are JSON objects too (they
/// were prose while its logs were JSON), with the port picked for 0 and the CA's path.
#[test]
fn edge_start_up_lines_in_json() {
    use crate::harness::{Proc, Src};
    let dir = TempDir::new("edge-json");
    let mut cmd = Command::new(forward_bin());
    cmd.args([
        "edge",
        "--log-format",
        "json",
        "--port",
        "0:5432",
        "--ca-dir",
    ])
    .arg(dir.join("ca"));
    let mut edge = Proc::spawn("edge", cmd);
    let ca = edge.wait_line(Src::Stdout, "the CA line", |l| l.contains("edge_ca"));
    let stdout = edge.stdout_text();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let listen: std::net::SocketAddr = lines[0]["edge"]["listen"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_ne!(listen.port(), 0, "{stdout}");
    assert_eq!(lines[0]["edge"]["to"], "[::1]:5432", "{stdout}");
    assert_eq!(lines[0]["edge"]["domain"], "vm.vers.sh", "{stdout}");
    let ca: serde_json::Value = serde_json::from_str(&ca).unwrap();
    let ca = std::path::PathBuf::from(ca["edge_ca"].as_str().unwrap());
    assert!(std::fs::read_to_string(&ca)
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    edge.signal("TERM");
    assert!(edge.wait_exit().success(), "{}", edge.transcript());
}

/// Logs to a pipe (an ssh ProxyCommand's stderr, a supervisor's log file) carry no colour
/// escape codes; only a terminal gets colour.
#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    use crate::harness::{Proc, Src};
    let mut cmd = Command::new(forward_bin());
    cmd.args(["--edge", "127.0.0.1", "127.0.0.1:0:abc:5432"])
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null());
    let mut fwd = Proc::spawn("forward", cmd);
    fwd.wait_line(Src::Stdout, "the listening line", |l| {
        l.starts_with("forwarding")
    });
    fwd.signal("TERM");
    assert!(fwd.wait_exit().success(), "{}", fwd.transcript());
    let stderr = fwd.stderr_text();
    assert!(
        stderr.contains("stopping"),
        "want the INFO line on stop:\n{stderr}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "escape codes in piped logs:\n{stderr:?}"
    );
}

/// With `--log-format json` the final error is a JSON object too, so a log shipper sees why
/// the process exited.
#[test]
fn json_mode_reports_the_fatal_error_as_json() {
    let o = forward(&[
        "--log-format",
        "json",
        "--ca-file",
        "/nonexistent/ca.pem",
        "0:vm1:80",
    ]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not JSON: {line}"
        );
    }
    let last = lines.last().unwrap();
    assert!(
        last.contains("\"level\":\"ERROR\"") && last.contains("/nonexistent/ca.pem"),
        "{last}"
    );

    // Whatever RUST_LOG filters out, the reason we exit is printed (it was lost with these).
    for rust_log in ["off", "rustls=debug", "degub"] {
        let mut cmd = Command::new(forward_bin());
        cmd.env("RUST_LOG", rust_log).args([
            "--log-format",
            "json",
            "--ca-file",
            "/nonexistent/ca.pem",
            "0:vm1:80",
        ]);
        let (status, _out, stderr) = run("forward", cmd);
        assert_eq!(status.code(), Some(1), "RUST_LOG={rust_log}: {stderr}");
        let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        let v: serde_json::Value = serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("RUST_LOG={rust_log}: not JSON ({e}): {stderr}"));
        assert_eq!(v["level"], "ERROR", "RUST_LOG={rust_log}: {last}");
        assert!(
            v["fields"]["message"]
                .as_str()
                .unwrap()
                .contains("/nonexistent/ca.pem"),
            "RUST_LOG={rust_log}: {last}"
        );
    }

    // A usage error too (clap failed before any logging was set up), still exit 2.
    let o = forward(&["--log-format", "json", "--bogus", "0:vm1:80"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    let line = o.stderr.trim();
    let v: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(v["level"], "ERROR", "{line}");
    assert!(
        v["fields"]["message"].as_str().unwrap().contains("--bogus"),
        "{line}"
    );
}

/// The README's way to learn a picked port, `forward 0:vm:PORT | head -1`, closes stdout after
/// the first line: the other start-up lines hit a closed pipe, and the forwards must go on.
#[test]
fn a_closed_stdout_does_not_stop_the_forwards() {
    use std::io::{BufRead, BufReader};

    use crate::harness::Proc;
    use crate::net::{echo_exchange, Backend, Local};
    use crate::stack::{Stack, Transport};

    let backend = Backend::echo();
    let stack = Stack::start(Transport::Direct, &[backend.port]);
    let mut cmd = Command::new(forward_bin());
    cmd.args(stack.client_args()).env("RUST_LOG", "info");
    // Three specs, two listeners each: five more lines after the first.
    for _ in 0..3 {
        cmd.arg(format!("0:{}", stack.target(backend.port)));
    }
    let (mut fwd, stdout) = Proc::spawn_raw_stdout("forward, stdout read once", cmd);
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).unwrap();
    // `head -1` exits here: the reader is dropped with the pipe.
    let local = first
        .trim_start_matches("forwarding ")
        .split_once(" -> ")
        .and_then(|(l, _)| Local::parse(l))
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        fwd.try_status().is_none(),
        "forward exited after its stdout closed: {}",
        fwd.transcript()
    );
    echo_exchange(local.connect(), 7, 1 << 20);
    fwd.interrupt_cleanly();
}

/// A closed stderr (`forward ... 2>&1 | head`, a log reader that died) changes no exit status:
/// every write to it, the last error line and the logs, used to panic (101).
#[test]
fn a_closed_stderr_changes_no_exit_status() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let closed_stderr = || {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        Stdio::from(writer)
    };
    let status = |args: &[&str]| {
        Command::new(forward_bin())
            .args(args)
            .stderr(closed_stderr())
            .status()
            .expect("run forward")
            .code()
    };
    assert_eq!(status(&["5432:vm1"]), Some(1), "a bad SPEC");
    assert_eq!(status(&["--no-such-flag"]), Some(2), "a usage error");
    assert_eq!(
        status(&["--log-format", "json", "5432:vm1"]),
        Some(1),
        "a bad SPEC, JSON logs"
    );

    // Serving, logging at every level, then a graceful stop that logs too.
    let mut child = Command::new(forward_bin())
        .args(["-vv", "--edge", "127.0.0.1", "127.0.0.1:0:vm1:5432"])
        .stdout(Stdio::piped())
        .stderr(closed_stderr())
        .spawn()
        .expect("start forward");
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("forwarding "), "{first:?}");
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + crate::harness::TIMEOUT;
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("forward did not stop after SIGINT");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(st.code(), Some(0), "{st}");
}

/// `FORWARD_CA_FILE=` and friends set but empty are unset, not an empty flag nobody typed.
#[test]
fn empty_environment_variables_count_as_unset() {
    let closed = crate::closed_port::closed_port();
    let port = closed.port;
    let mut cmd = Command::new(forward_bin());
    cmd.args(["--check", "--connect-timeout", "2", "--edge", "127.0.0.1"])
        .arg(format!("127.0.0.1:0:{VM}:{port}"));
    for var in [
        "FORWARD_THREADS",
        "FORWARD_DOMAIN",
        "FORWARD_EDGE",
        "FORWARD_CA_FILE",
        "FORWARD_STATE_DIR",
    ] {
        cmd.env(var, "");
    }
    let (st, out, err) = run("forward --check with empty FORWARD_* variables", cmd);
    // Not a usage error about a flag: the check runs (default domain) and finds nothing there.
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(err.contains(&format!("{VM}.vm.vers.sh")), "{err}");
    assert!(
        !err.contains("--ca-file") && !err.contains("--threads"),
        "{err}"
    );
}

/// A bad value from the environment names the variable, not only the flag clap reads it
/// for; the same value typed as the flag names the flag alone.
#[test]
fn a_bad_value_from_the_environment_names_the_variable() {
    let mut cmd = Command::new(forward_bin());
    cmd.arg("0:vm:80").env("FORWARD_THREADS", "abc");
    let (st, out, err) = run("forward with FORWARD_THREADS=abc", cmd);
    assert_eq!(st.code(), Some(2), "{out}{err}");
    assert!(
        err.contains("invalid value 'abc' for '--threads <N>'")
            && err.contains("environment variable FORWARD_THREADS"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let mut cmd = Command::new(forward_bin());
    cmd.args(["--threads", "abc", "0:vm:80"])
        .env("FORWARD_THREADS", "2");
    let (st, out, err) = run("forward --threads abc", cmd);
    assert_eq!(st.code(), Some(2), "{out}{err}");
    assert!(!err.contains("FORWARD_THREADS"), "{err}");

    let mut cmd = Command::new(forward_bin());
    cmd.arg("0:vm:80").env("FORWARD_DOMAIN", "bad domain");
    let (st, out, err) = run("forward with FORWARD_DOMAIN='bad domain'", cmd);
    assert_eq!(st.code(), Some(2), "{out}{err}");
    assert!(err.contains("environment variable FORWARD_DOMAIN"), "{err}");

    // A file that cannot be read is found after parsing, and named the same way.
    let mut cmd = Command::new(forward_bin());
    cmd.arg("0:vm:80")
        .env("FORWARD_CA_FILE", "/nonexistent/ca.pem");
    let (st, out, err) = run("forward with FORWARD_CA_FILE=/nonexistent/ca.pem", cmd);
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("/nonexistent/ca.pem") && err.contains("environment variable FORWARD_CA_FILE"),
        "{err}"
    );
    let mut cmd = Command::new(forward_bin());
    cmd.args(["--ca-file", "/nonexistent/ca.pem", "0:vm:80"]);
    let (st, out, err) = run("forward --ca-file /nonexistent/ca.pem", cmd);
    assert_eq!(st.code(), Some(1), "{out}{err}");
    assert!(!err.contains("FORWARD_CA_FILE"), "{err}");
}

/// A value refused for an escape sequence in it shows the escape, in clap's quote and in ours:
/// clap's plain rendering strips it, and the value looked fine in the error that refused it.
#[test]
fn a_refused_value_shows_its_escape_sequence() {
    let mut cmd = Command::new(forward_bin());
    cmd.arg("0:vm:80").env("FORWARD_EDGE", "10.0.0\x1b[31m.1");
    let (st, out, err) = run("forward with an escape in FORWARD_EDGE", cmd);
    assert_eq!(st.code(), Some(2), "{out}{err}");
    assert!(!err.contains('\x1b'), "{err:?}");
    assert_eq!(
        err.matches("'10.0.0\\u{1b}[31m.1'").count(),
        2,
        "want the value escaped in both quotes: {err}"
    );
    assert!(err.contains("environment variable FORWARD_EDGE"), "{err}");
    assert_rejected(
        &["--grace", "1\u{202e}0", "0:vm1:80"],
        &[2],
        &["'1\\u{202e}0' is not a whole number of seconds"],
    );
}

/// A RUST_LOG that cannot be used is said to be ignored, not ignored in silence: the user set
/// it to see something.
#[test]
fn an_unusable_rust_log_is_reported() {
    use std::os::unix::ffi::OsStrExt;
    let not_utf8 = std::ffi::OsStr::from_bytes(b"forward=debug\xff");
    for (value, want) in [
        (not_utf8, "RUST_LOG is not valid UTF-8"),
        (
            std::ffi::OsStr::new("forward=loud"),
            "RUST_LOG='forward=loud' is not a valid filter",
        ),
    ] {
        let mut cmd = Command::new(forward_bin());
        cmd.args(["--ca-file", "/nonexistent/ca.pem", "0:vm:80"])
            .env("RUST_LOG", value);
        let (st, out, err) = run("forward with a bad RUST_LOG", cmd);
        assert_eq!(st.code(), Some(1), "{out}{err}");
        assert!(
            err.contains(want) && err.contains("using -v/-q levels"),
            "{err}"
        );
        // The run goes on at the default level: its own error is still there.
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
    // A misspelt level is a valid filter (for a target of that name) that hides everything:
    // it is applied, and said so past itself.
    for (value, named) in [("degub", "degub"), ("info,verbose", "verbose")] {
        let mut cmd = Command::new(forward_bin());
        cmd.args(["--edge", "127.0.0.1", "--check", "127.0.0.1:0:vm1:1"])
            .env("RUST_LOG", value);
        let (st, out, err) = run("forward with a misspelt RUST_LOG", cmd);
        assert_eq!(st.code(), Some(1), "{out}{err}");
        assert!(
            err.contains(&format!("RUST_LOG names '{named}', which is no level")),
            "{err}"
        );
    }
    for fine in [
        "debug",
        "forward_tunnel=debug",
        "quinn",
        "forward_mux::session",
        "INFO",
    ] {
        let mut cmd = Command::new(forward_bin());
        cmd.args(["--ca-file", "/nonexistent/ca.pem", "0:vm:80"])
            .env("RUST_LOG", fine);
        let (_, out, err) = run("forward with a good RUST_LOG", cmd);
        assert!(!err.contains("RUST_LOG"), "RUST_LOG={fine}: {out}{err}");
    }
}

/// Out of file descriptors, accept fails again and again: one warning per interval, with a
/// count, not one per attempt (585 lines in 30 s before).
#[test]
fn accept_failures_are_logged_once_per_interval() {
    use std::time::Duration;

    use crate::harness::{Proc, Src};

    // An "edge" that accepts and never answers TLS: every forwarded connection holds two
    // descriptors until the handshake times out.
    let edge = TcpListener::bind("127.0.0.1:0").unwrap();
    let edge_port = edge.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in edge.incoming().flatten() {
            held.push(s);
        }
    });
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "ulimit -n 40 && exec {} --edge 127.0.0.1 127.0.0.1:0:{VM}:{edge_port}",
            forward_bin()
        ))
        .env("RUST_LOG", "info");
    let mut fwd = Proc::spawn("forward with 40 descriptors", cmd);
    let line = fwd.wait_line(Src::Stdout, "the forwarding line", |l| {
        l.starts_with("forwarding ")
    });
    let port: u16 = line
        .split(" -> ")
        .next()
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let clients: Vec<_> = (0..60)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let log = fwd.stderr_text();
    let failures = log.lines().filter(|l| l.contains("accept failed")).count();
    assert!(
        (1..=2).contains(&failures),
        "{failures} 'accept failed' lines in 3 s:\n{log}"
    );
    drop(clients);
}

/// Options before the subcommand (`forward --agent 9999 stdio vm:22`) get a hint, not "invalid
/// forward spec 'stdio'".
#[test]
fn options_before_a_subcommand_are_explained() {
    assert_rejected(
        &["--agent", "9999", "stdio", "vm1:22"],
        &[1],
        &["'stdio' is a subcommand", "forward stdio --help"],
    );
    assert_rejected(
        &["31973:abc123:31007", "stdio", "abc123:22"],
        &[1],
        &["'stdio' is a subcommand, not a SPEC", "first"],
    );
}
