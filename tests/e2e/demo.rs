//! `forward demo`, README's first command: the whole path on one machine, self-checked.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

use crate::harness::{forward_bin, run, Proc, Src, TIMEOUT};

#[test]
fn demo_once_passes_its_self_check() {
    let mut cmd = Command::new(forward_bin());
    cmd.args(["demo", "--once"]);
    let (st, out, err) = run("forward demo --once", cmd);
    assert!(st.success(), "forward demo --once: {st}\n{out}\n{err}");
    assert!(
        out.contains("self-check ok"),
        "stdout:\n{out}\nstderr:\n{err}"
    );
    // It exits right after the check: nothing to try.
    assert!(!out.contains("try:"), "{out}");
}

/// SIGHUP (the terminal closed) ends the demo as it ends `forward`: exit 129, and the CA file
/// it wrote to the temporary directory is removed (the default action left it there).
#[test]
fn demo_hangup_removes_its_ca_file() {
    let mut demo = Proc::forward("forward demo", ["demo"]);
    demo.wait_line(Src::Stdout, "`serving until Ctrl-C`", |l| {
        l.contains("serving until Ctrl-C")
    });
    let edge = demo.wait_line(Src::Stdout, "the local edge line", |l| {
        l.contains("local edge")
    });
    let ca = edge
        .split(", CA ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| panic!("no CA file in {edge:?}"));
    assert!(ca.exists(), "{}", ca.display());
    demo.signal("HUP");
    let st = demo.wait_exit();
    assert_eq!(st.code(), Some(129), "{}", demo.transcript());
    assert!(!ca.exists(), "{} left behind", ca.display());
}

/// Serves what it tells the user to try (`curl http://localhost:PORT/`) until Ctrl-C, then exits 0.
#[test]
fn demo_serves_until_interrupted() {
    let mut demo = Proc::forward("forward demo", ["demo"]);
    demo.wait_line(Src::Stdout, "`serving until Ctrl-C`", |l| {
        l.contains("serving until Ctrl-C")
    });
    let curl = demo.wait_line(Src::Stdout, "the `curl http://localhost:PORT/` hint", |l| {
        l.contains("curl http://localhost:")
    });
    let port: u16 = curl
        .split("localhost:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {curl:?}"));

    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "GET / answered {answer:?}"
    );

    demo.signal("INT");
    let st = demo.wait_exit();
    assert!(st.success(), "forward demo after Ctrl-C: {st}");
}

/// `forward demo | head -2`: the demo's report meets a closed pipe; it must neither panic nor
/// stop serving (it used `println!`, which panics there, and left its CA file behind).
#[test]
fn demo_survives_a_closed_stdout() {
    use std::io::{BufRead, BufReader};

    let mut cmd = Command::new(forward_bin());
    cmd.arg("demo").env("RUST_LOG", "info");
    let (mut demo, stdout) = Proc::spawn_raw_stdout("forward demo, stdout read once", cmd);
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).unwrap();
    let echo_port: u16 = first
        .trim_start_matches("forwarding ")
        .split_once(" -> ")
        .and_then(|(l, _)| l.rsplit(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
    // The self-check runs with stdout gone; then the demo serves until Ctrl-C.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        demo.try_status().is_none(),
        "the demo exited: {}",
        demo.transcript()
    );
    let mut s = TcpStream::connect(("127.0.0.1", echo_port)).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"still serving\n").unwrap();
    let mut back = [0u8; 14];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"still serving\n");
    demo.interrupt_cleanly();
}

/// `--log-format json` gives the demo's forwarding lines as JSON, as for `forward` itself.
#[test]
fn demo_forwarding_lines_follow_the_log_format() {
    let mut cmd = Command::new(forward_bin());
    cmd.args(["demo", "--once", "--log-format", "json"]);
    let (st, out, err) = run("forward demo --once --log-format json", cmd);
    assert!(st.success(), "{st}\n{out}\n{err}");
    // Every line, not only the forwarding ones: a script parses all of stdout.
    let lines: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let forwarding: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l.get("forwarding").is_some())
        .collect();
    assert_eq!(forwarding.len(), 4, "two forwards on two loopbacks:\n{out}");
    for f in &forwarding {
        assert!(
            f["forwarding"]["listen"].is_string() && f["forwarding"]["to"].is_string(),
            "{f}"
        );
    }
    let demo = lines
        .iter()
        .find_map(|l| l.get("demo"))
        .unwrap_or_else(|| panic!("no demo line:\n{out}"));
    assert_eq!(demo["edge"].as_array().map(Vec::len), Some(2), "{demo}");
    assert!(demo["ca_file"].is_string(), "{demo}");
    let check = lines
        .iter()
        .find_map(|l| l.get("self_check"))
        .unwrap_or_else(|| panic!("no self_check line:\n{out}"));
    assert_eq!(check["ok"], true, "{check}");
    assert_eq!(check["echoed_bytes"], 1 << 20, "{check}");
    assert!(check["rtt_p50_us"].as_u64().is_some(), "{check}");
    assert!(
        lines.iter().all(|l| l.get("try").is_none()),
        "--once: {out}"
    );
}
