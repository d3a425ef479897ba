//! End-to-end tests of the `forward` binary over real loopback sockets and real TLS.
//!
//! ```text
//!   test client --TCP/Unix--> forward --(transport)--> [edge] --> [agent] --> test service on [::1]
//! ```
//!
//! Every scenario is written once as `fn scenario(t: Transport)` and instantiated per transport by
//! `per_transport!`, so test names read `integrity::bulk_64mib_each_way::direct`. Run one transport
//! with e.g. `cargo test --test e2e direct`. The CA is generated at test time (by the local edge, or
//! by rcgen here); nothing listens beyond 127.0.0.1 and ::1. Timeouts are generous (60 s per wait)
//! and nothing asserts speed: that is the bench harness's job.
//!
//! PostgreSQL and OpenSSH tests start their own server in a temp dir; as root (CI) they must run,
//! as another user they may skip with a printed reason. `scripts/test-env.sh` installs them.

mod harness;
mod net;
mod stack;
mod tls_ca;

/// Instantiates `fn $scenario(Transport)` as one #[test] per transport (all four unless a list is
/// given). A transport that has not landed yet is an ignored test with the reason, never a
/// silently passing one.
macro_rules! per_transport {
    ($scenario:ident) => {
        per_transport!($scenario: direct, agent_tls, agent_tcp, quic);
    };
    ($scenario:ident: $($t:ident),+) => {
        mod $scenario {
            $( transport_test!($t, $scenario); )+
        }
    };
}

macro_rules! transport_test {
    (direct, $s:ident) => {
        #[test]
        fn direct() {
            super::$s(crate::stack::Transport::Direct)
        }
    };
    (agent_tls, $s:ident) => {
        #[test]
        #[ignore = "agent mode (forward agent, --agent) not landed yet"]
        fn agent_tls() {
            super::$s(crate::stack::Transport::AgentTls)
        }
    };
    (agent_tcp, $s:ident) => {
        #[test]
        #[ignore = "agent mode (forward agent, --transport tcp) not landed yet"]
        fn agent_tcp() {
            super::$s(crate::stack::Transport::AgentTcp)
        }
    };
    (quic, $s:ident) => {
        #[test]
        #[ignore = "QUIC transport (--transport quic) not landed yet"]
        fn quic() {
            super::$s(crate::stack::Transport::Quic)
        }
    };
}

mod agent;
mod cli;
mod half_close;
mod integrity;
mod local_sides;
mod postgres;
mod resets;
mod shutdown;
mod ssh;
mod stdio;
mod tls;
