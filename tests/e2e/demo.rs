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
