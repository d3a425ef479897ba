//! A TCP port on which nothing listens, held so that nothing can start to. Tests run in
//! parallel and bind `[::1]:0` and `127.0.0.1:0` all the time: a port taken and let go again
//! ("free") may be handed to another test's service at once, and a dial meant to be refused
//! reaches it. A socket bound without `listen` refuses connections and keeps the number.
//! Shared by the tunnel's test suites and forward's e2e suite (`#[path]`).

#![allow(dead_code)] // each suite uses its part

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Socket, Type};

/// A TCP socket bound to `addr` and never listening; `None` if the address is taken.
pub fn hold(addr: SocketAddr) -> Option<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    if addr.is_ipv6() {
        sock.set_only_v6(true).unwrap();
    }
    sock.bind(&addr.into()).ok()?;
    Some(sock)
}

/// A port refused on both loopbacks while this lives.
pub struct ClosedPort {
    pub port: u16,
    _held: [Socket; 2],
}

pub fn closed_port() -> ClosedPort {
    for _ in 0..100 {
        let v6 = hold((Ipv6Addr::LOCALHOST, 0).into()).expect("bind [::1]:0");
        let port = v6.local_addr().unwrap().as_socket().unwrap().port();
        if let Some(v4) = hold((Ipv4Addr::LOCALHOST, port).into()) {
            return ClosedPort {
                port,
                _held: [v6, v4],
            };
        }
    }
    panic!("no port free on both 127.0.0.1 and [::1] in 100 tries");
}
