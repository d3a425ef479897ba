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

#[path = "../../crates/tunnel/tests/agent/closed_port.rs"]
mod closed_port;
mod harness;
mod net;
mod stack;
mod tls_ca;

/// Instantiates `fn $scenario(Transport)` as one #[test] per transport (all four unless a list is
/// given). A transport that has not landed yet, or a (scenario, transport) pair waiting for a
/// feature, is an ignored test with the reason, e.g. `agent_tls("needs X")`: never a silently
/// passing one.
macro_rules! per_transport {
    ($scenario:ident) => {
        per_transport!($scenario: direct, agent_tls, agent_tcp, quic);
    };
    ($scenario:ident: $($t:ident $(($reason:literal))?),+ $(,)?) => {
        mod $scenario {
            $( transport_test!($t, $scenario $(, $reason)?); )+
        }
    };
}

macro_rules! transport_test {
    ($t:ident, $s:ident, $reason:literal) => {
        #[test]
        #[ignore = $reason]
        fn $t() {
            super::$s(transport!($t))
        }
    };
    ($t:ident, $s:ident) => {
        #[test]
        fn $t() {
            super::$s(transport!($t))
        }
    };
}

macro_rules! transport {
    (direct) => {
        crate::stack::Transport::Direct
    };
    (agent_tls) => {
        crate::stack::Transport::AgentTls
    };
    (agent_tcp) => {
        crate::stack::Transport::AgentTcp
    };
    (quic) => {
        crate::stack::Transport::Quic
    };
}

mod agent;
mod cli;
mod demo;
mod half_close;
mod integrity;
mod local_sides;
mod postgres;
mod resets;
mod shutdown;
mod ssh;
mod stdio;
mod tls;
