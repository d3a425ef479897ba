//! The local side of a forward can be IPv4, IPv6 or a Unix socket, several in one process, and the
//! default bind covers both loopbacks.

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
