//! The local side of a forward can be IPv4, IPv6 or a Unix socket, several in one process, and the
//! default bind covers both loopbacks.

use std::process::Command;

use crate::harness::{forward_bin, is_root, skip_unless_root, Proc, Src};
use crate::net::{echo_exchange, Backend, Local};
use crate::stack::{Stack, Transport};

per_transport!(ipv4_ipv6_and_unix_listeners);
per_transport!(default_bind_is_both_loopbacks);

fn ipv4_ipv6_and_unix_listeners(t: Transport) {
    let backend = Backend::echo();
    let stack = Stack::start(t, &[backend.port]);
    let sock = stack.dir.join("local.sock");
    let target = stack.target(backend.port);
    let specs = [
        format!("127.0.0.1:0:{target}"),
        format!("[::1]:0:{target}"),
        format!("{}:{target}", sock.display()),
    ];
    let fwd = stack.forward(&[], &specs, 3);

    let has = |pred: &dyn Fn(&Local) -> bool| fwd.locals.iter().any(pred);
    assert!(has(
        &|l| matches!(l, Local::Tcp(a) if a.ip().to_string() == "127.0.0.1")
    ));
    assert!(has(
        &|l| matches!(l, Local::Tcp(a) if a.ip().to_string() == "::1")
    ));
    assert!(
        has(&|l| *l == Local::Unix(sock.clone())),
        "locals: {:?}",
        fwd.locals
    );

    for local in &fwd.locals {
        let seed = rand::random();
        let sent = echo_exchange(local.connect(), seed, 1 << 20);
        let r = backend.next_report();
        assert_eq!(r.hash, sent, "through {local}");
    }
}

fn default_bind_is_both_loopbacks(t: Transport) {
    let backend = Backend::echo();
    let stack = Stack::start(t, &[backend.port]);
    let fwd = stack.forward(&[], &[format!("0:{}", stack.target(backend.port))], 2);

    let mut ips: Vec<String> = fwd
        .locals
        .iter()
        .map(|l| match l {
            Local::Tcp(a) => a.ip().to_string(),
            Local::Unix(p) => panic!("unexpected Unix listener {}", p.display()),
        })
        .collect();
    ips.sort();
    assert_eq!(
        ips,
        ["127.0.0.1", "::1"],
        "default bind should be loopback only, both families"
    );

    for local in &fwd.locals {
        let sent = echo_exchange(local.connect(), rand::random(), 256 * 1024);
        assert_eq!(backend.next_report().hash, sent, "through {local}");
    }
}

/// A machine with IPv6 disabled (common in containers) has no [::1]: the default bind then
/// listens on 127.0.0.1 alone, as `ssh -L` does, and says so; an explicit [::1] still fails.
/// Runs in a network namespace of its own with IPv6 switched off.
#[test]
fn default_bind_without_ipv6_listens_on_ipv4_alone() {
    if !is_root() && skip_unless_root("needs a network namespace (unshare -n)") {
        return;
    }
    let in_netns = |spec: &str| {
        let mut cmd = Command::new("unshare");
        cmd.args(["-n", "sh", "-c"]).arg(format!(
            "ip link set lo up && sysctl -qw net.ipv6.conf.all.disable_ipv6=1 \
             net.ipv6.conf.lo.disable_ipv6=1 && \
             exec {} --edge 127.0.0.1 --domain vm.test {spec}",
            forward_bin()
        ));
        cmd.env("NO_COLOR", "1").env("RUST_LOG", "info");
        cmd
    };

    let mut fwd = Proc::spawn("forward in netns", in_netns("0:abc:5432"));
    let up = fwd.wait_line(Src::Stdout, "the listening line", |l| {
        l.starts_with("forwarding ")
    });
    assert!(up.starts_with("forwarding 127.0.0.1:"), "{up}");
    fwd.wait_line(Src::Stderr, "the warning about [::1]", |l| {
        l.contains("[::1]") && l.contains("listening on the other loopback only")
    });
    fwd.signal("TERM");
    assert!(fwd.wait_exit().success(), "{}", fwd.transcript());
    assert_eq!(
        fwd.stdout_text()
            .lines()
            .filter(|l| l.starts_with("forwarding"))
            .count(),
        1,
        "{}",
        fwd.transcript()
    );

    let mut explicit = Proc::spawn("forward [::1] in netns", in_netns("[::1]:0:abc:5432"));
    let status = explicit.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", explicit.transcript());
    let err = explicit.stderr_text();
    assert!(
        err.lines()
            .any(|l| l.starts_with("error: ") && l.contains("cannot listen on [::1]")),
        "{err}"
    );
}
