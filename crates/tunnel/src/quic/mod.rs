//! The QUIC transport: the agent listens on UDP with its own certificate, and every local
//! connection becomes one bidirectional QUIC stream, so a lost packet stalls only its own stream
//! (no head-of-line blocking between forwarded connections, unlike one TCP carrier).
//!
//! ```text
//!  client (QuicCarrier: one quinn connection per agent, shared by its QuicConnectors, plus
//!          overflow connections while it is at the agent's stream limit)
//!    │  UDP, TLS 1.3, ALPN forward-mux/1, cert checked by --ca-file or --agent-pin sha256:…
//!    ▼
//!  agent (QuicAgent on [::]:PORT, dual-stack)
//!    stream 0 (auth): client 0x01 ─► agent challenge[32] ─► client HMAC proof[32] ─► agent 1|0
//!    stream 4, 8, …:  client `port u16 | hostlen u8 | host` + data at once (zero round trips)
//!                     agent: TargetPolicy::dial(host, port) ─► relay(stream, tcp)
//!                     refusal ─► RESET_STREAM/STOP_SENDING with a code (see [`code`])
//! ```
//!
//! Stream semantics match the other transports: local EOF → `finish()` (a FIN), peer FIN → EOF,
//! an error → `reset()` + `stop()` both ways. A clean shutdown waits until the peer has
//! acknowledged every byte (`stopped()`), so closing the connection afterwards loses nothing;
//! a stream that is dropped without an explicit shutdown is reset, never cleanly ended.
//! Streams of a lost connection see an error, never a clean EOF.
//!
//! The Vers edge carries TCP only: QUIC is for agents reachable directly over UDP.
//!
//! Left to others: command-line flags and the printed pin (the `forward` binary), the relay
//! ([`crate::relay()`]), target policy ([`crate::policy`]) and the token ([`crate::auth`]).

mod agent;
mod cert;
mod client;
mod congestion;
mod receive;
mod stream;
mod udp;
mod window;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use agent::{serve, QuicAgent, QuicAgentConfig, QuicCloser};
pub use cert::{QuicCert, SpkiPin};
pub use client::{client_config, AgentVerify, QuicCarrier, QuicCarrierConfig, QuicConnector};
pub use stream::QuicStream;

use crate::tls::TlsConfigError;

/// The ALPN both sides require; the same label as the mux protocol.
pub const ALPN: &[u8] = b"forward-mux/1";
/// First byte the client writes on the auth stream (protocol version of the exchange).
pub const AUTH_HELLO: u8 = 1;
/// Longest target host a header may carry (a DNS name is at most 253 characters).
pub const MAX_TARGET_HOST: usize = 253;
/// Time a client has to prove it knows the token, from the end of the handshake.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`QuicAgentConfig::max_streams`]: streams one client connection may have open.
pub const MAX_STREAMS: u32 = 1024;
/// Connections that may be in the handshake or auth phase at once; more are refused.
pub const MAX_UNAUTHENTICATED: usize = 64;

/// Application error codes of RESET_STREAM / STOP_SENDING on data streams.
pub mod code {
    /// The relay failed on the sending side (its local socket reset, or the stream was dropped).
    pub const ABORTED: u32 = 1;
    /// The agent's policy does not allow the target.
    pub const NOT_ALLOWED: u32 = 2;
    /// Nothing listens at the target.
    pub const REFUSED: u32 = 3;
    /// The target did not answer within the agent's dial timeout.
    pub const TIMEOUT: u32 = 4;
    /// The target's name or route failed.
    pub const UNREACHABLE: u32 = 5;
    /// The stream did not start with a valid target header.
    pub const BAD_HEADER: u32 = 6;
    /// The stream was opened before the connection authenticated.
    pub const AUTH_REQUIRED: u32 = 7;
    /// The agent is shutting down: a stream it had taken is cut at the end of its drain.
    pub const SHUTTING_DOWN: u32 = 8;
    /// The agent is shutting down and did not take this stream: its target was never dialled,
    /// so the client may open it again on a new connection (the agent that takes over).
    pub const GOING_AWAY: u32 = 9;
}

/// Application error codes of CONNECTION_CLOSE.
pub mod close {
    /// Normal close.
    pub const NORMAL: u32 = 0;
    /// Wrong proof: the two sides do not share the token.
    pub const AUTH_FAILED: u32 = 1;
    /// No proof within [`super::AUTH_TIMEOUT`].
    pub const AUTH_TIMEOUT: u32 = 2;
    /// The peer broke the protocol (bad hello, wrong ALPN).
    pub const PROTOCOL: u32 = 3;
    /// The agent is stopping.
    pub const SHUTDOWN: u32 = 4;
    /// Too many connections were waiting to authenticate and this was the oldest: try again.
    pub const BUSY: u32 = 5;
}

/// Why a QUIC agent or client could not do its job. Messages name the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuicError {
    /// The UDP socket could not be bound.
    #[error("cannot listen on UDP {addr}: {cause}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        cause: io::Error,
    },
    /// A certificate or key file could not be read or parsed.
    #[error("{0}")]
    CertFile(String),
    /// The agent certificate could not be generated.
    #[error("cannot generate the agent certificate: {0}")]
    Generate(String),
    /// rustls refused the certificate, key or configuration.
    #[error("QUIC TLS configuration: {0}")]
    Tls(String),
    /// The roots for `--ca-file` verification could not be loaded.
    #[error(transparent)]
    TlsConfig(#[from] TlsConfigError),
    /// A malformed `--agent-pin`.
    #[error("invalid --agent-pin '{0}': expected sha256:<base64 of 32 bytes>, as printed by `forward agent --quic`")]
    BadPin(String),
    /// The agent presented a certificate other than the pinned one.
    #[error("agent certificate does not match --agent-pin (got {got}); if the agent's certificate was replaced on purpose, pin the new value")]
    PinMismatch {
        /// The pin of the certificate the agent presented.
        got: String,
    },
    /// `--ca-file` verification failed.
    #[error("{message}")]
    Untrusted {
        /// What was wrong and what to do, naming the agent.
        message: String,
    },
    /// The peer does not speak our ALPN.
    #[error("{host}:{port} does not speak forward-mux/1 over QUIC (ALPN mismatch); is it a forward agent started with --quic?")]
    WrongAlpn {
        /// The agent host.
        host: String,
        /// Its UDP port.
        port: u16,
    },
    /// The agent refused the proof.
    #[error(
        "agent {host}:{port} rejected authentication: check that both sides use the same token, and that the agent answers to {host} (its --name)"
    )]
    AuthRejected {
        /// The agent host.
        host: String,
        /// Its UDP port.
        port: u16,
    },
    /// The agent had too many connections waiting to authenticate and dropped this one, every
    /// try until the connect timeout.
    #[error("agent {host}:{port} is busy: too many connections are waiting to authenticate (a flood, or a burst of clients); tried again until --connect-timeout")]
    Busy {
        /// The agent host.
        host: String,
        /// Its UDP port.
        port: u16,
    },
    /// No handshake or auth answer in time.
    #[error("no QUIC answer from agent {host} at {addr} within {after:?}; is `forward agent --quic` running there and UDP port {} reachable?", addr.port())]
    Timeout {
        /// The agent host.
        host: String,
        /// The address tried.
        addr: SocketAddr,
        /// The deadline.
        after: Duration,
    },
    /// Several addresses, and none answered: what each one said.
    #[error("no QUIC answer from agent {host} at any of its addresses ({tried}); is `forward agent --quic` running there and UDP port {port} reachable?")]
    AllAddresses {
        /// The agent host.
        host: String,
        /// Its UDP port.
        port: u16,
        /// Every address tried and its failure, `; `-separated.
        tried: String,
    },
    /// The agent's name could not be resolved to a usable address.
    #[error(transparent)]
    Resolve(#[from] crate::dial::DialError),
    /// The connection failed or was lost for another reason.
    #[error("QUIC connection to agent {host}:{port}: {reason}")]
    Connection {
        /// The agent host.
        host: String,
        /// Its UDP port.
        port: u16,
        /// What went wrong.
        reason: String,
    },
    /// A target the header cannot carry.
    #[error("target host '{0}' cannot be sent to the agent: at most 253 characters of letters, digits, '.', '-', '_', ':' (or empty for the VM's loopback)")]
    BadTarget(String),
    /// Endpoint setup (runtime, socket) failed.
    #[error("QUIC endpoint: {0}")]
    Io(#[from] io::Error),
}

/// Transport settings sized for WAN paths: the windows cover a large bandwidth-delay product,
/// keepalives keep NAT bindings and detect a dead path, the idle timeout reclaims it.
/// `max_streams` is what the peer may open: the agent's limit, 0 on the client (the agent opens
/// no streams). `loopback`: the peer is on this host (see [`is_loopback`]).
fn transport(max_streams: u32, loopback: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    if loopback {
        // On loopback, 64 KiB packets cost a fraction of the per-packet crypto, framing and
        // syscalls of 1452-byte ones. Not on other paths: there probes above the path MTU are
        // lost, and while one is outstanding early in slow start it holds congestion window (a
        // 100 ms, 100 Mbit/s path filled 69 % instead of 75 % in 3 s), for no gain beyond
        // Ethernet-sized packets on most paths.
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        // Loopback loses packets only to a full socket buffer, never to an MTU black hole, but
        // quinn takes a few such bursts for one: it drops to 1200-byte packets and searches
        // again only after a cooldown, one minute by default. Uploads then ran at 5 instead of
        // 12 Gbit/s for 2.7× the CPU per byte (the "bimodal" QUIC upload of sessions 3–5).
        // (Starting at the full size instead is not possible: quinn's initial congestion
        // window, 12,000 bytes, would not let one such packet out.)
        mtu.black_hole_cooldown(LOOPBACK_BLACK_HOLE_COOLDOWN)
            .upper_bound(loopback_payload().unwrap_or(MAX_UDP_PAYLOAD));
        t.mtu_discovery_config(Some(mtu));
    }
    // Cubic alone shrinks the window at every random loss (see `congestion`).
    let congestion = if loopback {
        // quinn lets an ack-eliciting packet out only if a whole packet fits beside what is in
        // flight, and on loopback a packet is ~60 KB: as a bigger MTU probe went out, Cubic's
        // window (twice the packet) was full. A connection closed then never sent its
        // CONNECTION_CLOSE (quinn-proto 0.11.19 holds it behind the window, and a closed
        // connection no longer reads the acknowledgements that would open it: quinn issue
        // #2785, fixed upstream by #2787, unreleased), and the agent held it to its idle
        // timeout (`forward stdio` to a refused port: 5 closes in 32). Loopback has no link
        // to congest; eight packets of room keep such a close free in light use.
        congestion::LossTolerantConfig::with_initial_window(LOOPBACK_INITIAL_WINDOW)
    } else {
        congestion::LossTolerantConfig::default()
    };
    t.congestion_controller_factory(Arc::new(congestion));
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW))
        .receive_window(quinn::VarInt::from_u32(RECEIVE_WINDOW))
        .send_window(window::SEND_WINDOW)
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(max_streams))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .keep_alive_interval(Some(KEEPALIVE))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(30)).expect("30 s fits a VarInt"),
        ));
    Arc::new(t)
}

/// Whether a peer address is on this host (an IPv4 one may come as `::ffff:127.x.y.z` on the
/// agent's dual-stack socket).
fn is_loopback(ip: std::net::IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Largest UDP payload either side accepts, and probes for on loopback: 15.5 pages, 2 KiB short
/// of the IPv6 maximum (65,527). quinn receives into one buffer cut into slots of this size and
/// copies each datagram out into a fresh, page-aligned allocation; at 65,527 (−9 modulo 4 KiB)
/// the second to fourth slots sat 9, 18 and 27 bytes before their copy's page offset, where
/// memcpy on AMD Zen with glibc runs at 2 GB/s instead of ~40 (see docs/architecture.md): 40 %
/// of an agent's datagram copies in a QUIC upload. At a multiple of 2 KiB every slot is 0 or
/// 2 KiB off. Loopback packets are 3 % smaller for it.
const MAX_UDP_PAYLOAD: u16 = 63488;

/// The congestion window a loopback connection starts with (see [`transport`]): eight of its
/// largest packets.
const LOOPBACK_INITIAL_WINDOW: u64 = 8 * MAX_UDP_PAYLOAD as u64;

/// How often an idle connection sends a PING. Short, because UDP has no reset: an agent that
/// was killed and restarted forgets the connection, and only answers its next packet with a
/// stateless reset. With 10 s, a connection made in the first seconds after such a restart
/// went out on the forgotten connection and was reset; with 3 s, the client has usually
/// learned of the restart (and reconnects) before anyone connects. Two small packets every
/// 3 s on an idle carrier.
const KEEPALIVE: Duration = Duration::from_secs(3);

/// Receive window per stream: a 100 ms, 1 Gbit/s path needs 12.5 MB in flight.
const STREAM_WINDOW: u32 = 16 * 1024 * 1024;

/// Receive window a connection starts with: what the peer may have sent that our streams have
/// not read. quinn gives every stream the same fixed window ([`STREAM_WINDOW`]), never a small
/// one that grows with its reader as the TCP carrier's do, so a local reader that stops reading
/// (a pager, a paused client) holds up to a whole stream window of it. With 64 MiB, five such
/// readers stopped the carrier for every stream. From 16 open streams on it grows with them
/// ([`receive`]), so unread streams never hold all of it; from 12 stalled streams on, the
/// client also opens new streams on another connection (`client::Link`'s read clocks). It
/// bounds memory only while readers stall: bytes that are read leave at once, and what is in
/// flight is bounded by the sender's window (see [`window`]).
const RECEIVE_WINDOW: u32 = STALLED_STREAMS_FIT as u32 * STREAM_WINDOW;

/// How many whole stream windows the connection's receive window holds.
const STALLED_STREAMS_FIT: usize = 16;

/// How long a loopback connection keeps small packets after quinn suspected a black hole.
const LOOPBACK_BLACK_HOLE_COOLDOWN: Duration = Duration::from_secs(1);

/// The largest UDP payload the loopback interface carries unfragmented, for IPv4 and IPv6
/// alike (its MTU less 40 bytes of IPv6 and 8 of UDP header), when the OS tells us its MTU:
/// probes above it could only be lost.
fn loopback_payload() -> Option<u16> {
    let mtu = std::fs::read_to_string("/sys/class/net/lo/mtu").ok()?;
    payload_for_mtu(mtu.trim().parse().ok()?)
}

fn payload_for_mtu(mtu: u32) -> Option<u16> {
    let payload = u16::try_from(mtu.checked_sub(48)?.min(u32::from(MAX_UDP_PAYLOAD))).ok()?;
    (payload >= 1200).then_some(payload)
}

/// Endpoint settings both sides share: accept UDP payloads up to [`MAX_UDP_PAYLOAD`], so the
/// peer's PMTUD can find large packets on loopback.
fn endpoint_config(mut config: quinn::EndpointConfig) -> quinn::EndpointConfig {
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .expect("63488 is a valid UDP payload size");
    config
}

/// Encodes a target header: `port u16 | hostlen u8 | host`.
pub fn encode_target(host: &str, port: u16) -> Result<Vec<u8>, QuicError> {
    if !valid_host(host.as_bytes()) {
        return Err(QuicError::BadTarget(host.to_owned()));
    }
    let mut h = Vec::with_capacity(3 + host.len());
    h.extend_from_slice(&port.to_be_bytes());
    h.push(host.len() as u8);
    h.extend_from_slice(host.as_bytes());
    Ok(h)
}

fn valid_host(host: &[u8]) -> bool {
    host.len() <= MAX_TARGET_HOST
        && host
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:[]%".contains(b))
}

/// A bad target header, as the agent logs it.
#[derive(Debug, thiserror::Error)]
enum HeaderError {
    #[error("stream ended inside the target header")]
    Truncated,
    #[error("target port 0")]
    PortZero,
    #[error("target host of {0} bytes (at most 253)")]
    TooLong(usize),
    #[error("target host is not a host name")]
    NotText,
    #[error("no target header within {0:?}")]
    Slow(Duration),
    #[error("{0}")]
    Read(quinn::ReadError),
}

/// Reads and validates a target header from the start of a data stream.
async fn read_target(recv: &mut quinn::RecvStream) -> Result<(String, u16), HeaderError> {
    let map = |e: quinn::ReadExactError| match e {
        quinn::ReadExactError::FinishedEarly(_) => HeaderError::Truncated,
        quinn::ReadExactError::ReadError(e) => HeaderError::Read(e),
    };
    let mut fixed = [0u8; 3];
    recv.read_exact(&mut fixed).await.map_err(map)?;
    let port = u16::from_be_bytes([fixed[0], fixed[1]]);
    let len = usize::from(fixed[2]);
    if len > MAX_TARGET_HOST {
        return Err(HeaderError::TooLong(len));
    }
    let mut host = vec![0u8; len];
    recv.read_exact(&mut host).await.map_err(map)?;
    if port == 0 {
        return Err(HeaderError::PortZero);
    }
    if !valid_host(&host) {
        return Err(HeaderError::NotText);
    }
    Ok((
        String::from_utf8(host).map_err(|_| HeaderError::NotText)?,
        port,
    ))
}

/// The name both sides mix into the auth proof: the SNI, lower-cased, without a trailing dot;
/// empty for an IP address (no SNI is sent for one).
fn proof_host(name: &str) -> String {
    let n = name.trim_start_matches('[').trim_end_matches(']');
    if n.parse::<std::net::IpAddr>().is_ok() {
        return String::new();
    }
    n.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_header_round_trip_shape() {
        let h = encode_target("localhost", 5432).unwrap();
        assert_eq!(&h[..3], &[0x15, 0x38, 9]);
        assert_eq!(&h[3..], b"localhost");
        assert_eq!(encode_target("", 22).unwrap(), vec![0, 22, 0]);
        let long = "a".repeat(254);
        let e = encode_target(&long, 1).unwrap_err().to_string();
        assert!(e.contains("at most 253"), "{e}");
        assert!(encode_target("bad host", 1).is_err());
        assert!(encode_target("::1", 1).is_ok());
    }

    #[test]
    fn advertised_credit_covers_the_limit_despite_quinn_batching() {
        for limit in 0..5000u32 {
            let advertised = agent::stream_credit(limit);
            // quinn holds back at most advertised / 8 of freed credit.
            assert!(advertised - advertised / 8 >= limit, "limit {limit}");
        }
        assert_eq!(agent::stream_credit(MAX_STREAMS), 1171);
    }

    #[test]
    fn loopback_payload_leaves_room_for_headers() {
        assert_eq!(payload_for_mtu(65536), Some(MAX_UDP_PAYLOAD));
        assert_eq!(payload_for_mtu(63536), Some(63488));
        assert_eq!(payload_for_mtu(16384), Some(16336));
        assert_eq!(payload_for_mtu(1500), Some(1452));
        assert_eq!(payload_for_mtu(1248), Some(1200));
        // Below QUIC's minimum, or nonsense: PMTUD from the defaults instead.
        assert_eq!(payload_for_mtu(1247), None);
        assert_eq!(payload_for_mtu(20), None);
        assert_eq!(payload_for_mtu(1 << 20), Some(MAX_UDP_PAYLOAD));
    }

    #[test]
    fn proof_host_normalises() {
        assert_eq!(proof_host("VM1.vm.vers.sh."), "vm1.vm.vers.sh");
        assert_eq!(proof_host("127.0.0.1"), "");
        assert_eq!(proof_host("[::1]"), "");
    }
}
