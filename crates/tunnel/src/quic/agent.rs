//! The agent side: a UDP endpoint that authenticates each connection on its first stream, then
//! dials a target for every further stream and relays.

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::{RecvStream, SendStream, VarInt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::cert::SpkiPin;
use super::receive::{ReceiveHold, ReceiveWindow};
use super::window::WindowFit;
use super::{
    close, code, is_loopback, proof_host, read_target, transport, HeaderError, QuicCert, QuicError,
    QuicStream, ALPN, AUTH_HELLO, AUTH_TIMEOUT, MAX_STREAMS, MAX_UNAUTHENTICATED,
};
use crate::admission::Admission;
use crate::auth::{challenge, AgentNames, Token, CHALLENGE_LEN};
use crate::policy::{DialRefusal, Shown, TargetPolicy};
use crate::relay::{relay, Endpoint};
use crate::throttle::Throttle;

static EVICTIONS: Throttle = Throttle::new();
static EARLY_STREAMS: Throttle = Throttle::new();
static AUTH_FAILURES: Throttle = Throttle::new();
static NAME_REFUSALS: Throttle = Throttle::new();

/// How long a new stream may take to deliver its target header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent waits for peers to see its close before returning from `run`.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// After cutting streams at the end of the grace period: time for the resets to reach the
/// clients (they are retransmitted until acknowledged, a connection close is not), so a
/// client learns "agent is shutting down" even if the final close packet is lost.
const RESET_LINGER: Duration = Duration::from_millis(300);

/// What a QUIC agent needs.
#[derive(Debug, Clone)]
pub struct QuicAgentConfig {
    /// UDP address; an IPv6 address is dual-stack (`[::]:PORT` takes IPv4 too).
    pub listen: SocketAddr,
    /// The certificate presented to clients.
    pub cert: QuicCert,
    /// The shared token clients prove they know.
    pub token: Token,
    /// Which targets clients may reach.
    pub policy: TargetPolicy,
    /// Deadline for dialling one target.
    pub dial_timeout: Duration,
    /// On stop: how long streams in flight may go on before connections are closed.
    pub grace: Duration,
    /// Streams one client connection may always have open at once; a client that needs more
    /// opens another connection. (The agent grants up to 1/7 more, as quinn holds back part
    /// of the credit of closed streams.)
    pub max_streams: u32,
    /// The names (SNI) proofs must be made for (empty: any).
    pub names: AgentNames,
}

impl QuicAgentConfig {
    /// Defaults: `[::]:port`, loopback-only policy, 10 s dial timeout, 10 s grace,
    /// [`MAX_STREAMS`] streams per connection.
    pub fn new(port: u16, cert: QuicCert, token: Token) -> Self {
        Self {
            listen: SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port),
            cert,
            token,
            policy: TargetPolicy::default(),
            dial_timeout: crate::policy::DEFAULT_DIAL_TIMEOUT,
            grace: Duration::from_secs(10),
            max_streams: MAX_STREAMS,
            names: AgentNames::default(),
        }
    }
}

struct Shared {
    token: Token,
    names: AgentNames,
    policy: TargetPolicy,
    dial_timeout: Duration,
    port: u16,
    /// Connections in their handshake or auth, at most [`MAX_UNAUTHENTICATED`]: a newcomer
    /// over it evicts the oldest, as on the TCP side (crate::admission).
    admission: Arc<Admission>,
    streams: TaskTracker,
    /// Fires when the grace period is over: streams still open are reset.
    cut: CancellationToken,
    /// The server settings for clients on this host (large packets).
    loopback_server: Arc<quinn::ServerConfig>,
}

/// A bound QUIC agent, not yet serving: learn its address and pin, then [`QuicAgent::run`].
pub struct QuicAgent {
    endpoint: quinn::Endpoint,
    local: SocketAddr,
    pin: SpkiPin,
    grace: Duration,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for QuicAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuicAgent({}, {})", self.local, self.pin)
    }
}

/// The stream limit to advertise so that `limit` streams are always available to a client.
///
/// quinn returns the credit of closed streams (MAX_STREAMS) only in batches: it announces new
/// credit once more than 1/8 of the advertised limit has been freed, and holds the rest back
/// until then — indefinitely on a connection that then stays quiet. With exactly `limit`
/// advertised, up to `limit / 8` streams (128 of 1024) of closed connections were never given
/// back, and a client holding many connections found the agent "full" well below its limit.
/// Advertising `limit + limit / 7 + 1` keeps at least `limit` (in fact `limit + 1`) available
/// whatever is held back.
pub(super) fn stream_credit(limit: u32) -> u32 {
    limit.saturating_add(limit / 7).saturating_add(1)
}

/// Binds a UDP socket; an IPv6 one accepts IPv4 too, whatever the system default.
pub(super) fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, QuicError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let fail = |cause| QuicError::Bind { addr, cause };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(fail)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).map_err(fail)?;
    }
    // Room for a burst at WAN bandwidth-delay products; the kernel may cap it, which is fine.
    let _ = socket.set_recv_buffer_size(8 * 1024 * 1024);
    let _ = socket.set_send_buffer_size(8 * 1024 * 1024);
    socket.bind(&addr.into()).map_err(fail)?;
    Ok(socket.into())
}

/// An agent restarted with the same token answers packets of its previous life's connections
/// with a stateless reset that the clients recognise, so they reconnect at once instead of
/// waiting out the idle timeout. That needs a reset key derived from the token, and connection
/// ids that a new process accepts as its own: plain random ids (quinn's default ids carry a
/// per-process keyed hash). The cost: any unknown short-header packet may draw a reset, which
/// quinn rate-limits and keeps smaller than the packet that caused it.
fn endpoint_config(token: &Token) -> quinn::EndpointConfig {
    let secret = token.prove(b"forward quic stateless reset key", "", 0);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    let mut config = super::endpoint_config(quinn::EndpointConfig::new(Arc::new(key)));
    config.cid_generator(|| Box::new(RandomCids));
    config
}

/// 8-byte random connection ids, valid in any process.
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

impl QuicAgent {
    /// Binds the UDP socket and prepares TLS. Must be called inside a tokio runtime.
    pub fn bind(config: QuicAgentConfig) -> Result<Self, QuicError> {
        let pin = config.cert.pin()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| QuicError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(config.cert.chain().to_vec(), config.cert.key().clone_key())
            .map_err(|e| {
                QuicError::Tls(format!(
                    "certificate and key do not go together or are unsupported: {e}"
                ))
            })?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        // No 0-RTT: early data is replayable.
        tls.max_early_data_size = 0;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| QuicError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let credit = stream_credit(config.max_streams);
        let mut loopback_server = server.clone();
        loopback_server.transport_config(transport(credit, true));
        server.transport_config(transport(credit, false));
        let socket = udp_socket(config.listen)?;
        let endpoint = quinn::Endpoint::new(
            endpoint_config(&config.token),
            Some(server),
            socket,
            Arc::new(super::udp::Tokio),
        )?;
        let local = endpoint.local_addr()?;
        Ok(Self {
            endpoint,
            local,
            pin,
            grace: config.grace,
            shared: Arc::new(Shared {
                token: config.token,
                names: config.names,
                policy: config.policy,
                dial_timeout: config.dial_timeout,
                port: local.port(),
                admission: Admission::new(MAX_UNAUTHENTICATED),
                streams: TaskTracker::new(),
                cut: CancellationToken::new(),
                loopback_server: Arc::new(loopback_server),
            }),
        })
    }

    /// The bound UDP address (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The certificate's pin, for clients' `--agent-pin`.
    pub fn pin(&self) -> SpkiPin {
        self.pin
    }

    /// A handle that ends every connection at once with CONNECTION_CLOSE, for a shutdown that
    /// cannot wait for the drain: without it, clients of a vanished agent notice only at their
    /// idle timeout (30 s).
    pub fn closer(&self) -> QuicCloser {
        QuicCloser(self.endpoint.clone())
    }

    /// Serves until `stop` fires, then refuses new connections and streams, lets streams in
    /// flight go on for the grace period, and closes every connection.
    pub async fn run(self, stop: CancellationToken) -> Result<(), QuicError> {
        tracing::info!(addr = %self.local, pin = %self.pin, "QUIC agent listening");
        let conns = TaskTracker::new();
        loop {
            let incoming = tokio::select! {
                _ = stop.cancelled() => break,
                i = self.endpoint.accept() => i,
            };
            let Some(incoming) = incoming else { break };
            let remote = incoming.remote_address();
            // Under a flood an address must show it receives our packets before it costs a
            // place (and evicts someone): a Retry is stateless, and a spoofed source never
            // answers it. Refusing newcomers instead let 64 connections that never
            // authenticate, reopened every 10 s, lock every client out (a tester's finding).
            if self.shared.admission.is_full()
                && !incoming.remote_address_validated()
                && incoming.may_retry()
            {
                if let Err(e) = incoming.retry() {
                    tracing::debug!(%remote, error = %e, "QUIC retry failed");
                }
                continue;
            }
            let shared = self.shared.clone();
            let stop = stop.clone();
            let span = tracing::info_span!("quic_conn", %remote);
            conns.spawn(handle_incoming(incoming, shared, stop).instrument(span));
        }
        // The TCP side logs its own carriers' drain; these streams are not among them.
        tracing::info!(
            streams = self.shared.streams.len(),
            grace = ?self.grace,
            "QUIC agent stopping: no new connections, draining the open streams"
        );
        self.endpoint.set_server_config(None);
        self.shared.streams.close();
        if tokio::time::timeout(self.grace, self.shared.streams.wait())
            .await
            .is_err()
        {
            tracing::info!(
                grace = ?self.grace,
                "grace period over: resetting the remaining QUIC streams"
            );
            self.shared.cut.cancel();
            let _ = tokio::time::timeout(CLOSE_LINGER, self.shared.streams.wait()).await;
            tokio::time::sleep(RESET_LINGER).await;
        } else {
            tracing::info!("QUIC agent drained: every stream had finished");
        }
        self.endpoint
            .close(VarInt::from_u32(close::SHUTDOWN), b"agent shutting down");
        conns.close();
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            conns.wait().await;
            self.endpoint.wait_idle().await;
        })
        .await;
        Ok(())
    }
}

/// Binds and serves until `stop` fires.
pub async fn serve(config: QuicAgentConfig, stop: CancellationToken) -> Result<(), QuicError> {
    QuicAgent::bind(config)?.run(stop).await
}

async fn handle_incoming(incoming: quinn::Incoming, shared: Arc<Shared>, stop: CancellationToken) {
    let (slot, evicted) = shared.admission.admit();
    if evicted {
        if let Some(more) = EVICTIONS.pass() {
            tracing::warn!(
                not_logged = more,
                "too many QUIC connections waiting to authenticate: closing the oldest (a \
                 flood, or a burst of clients)"
            );
        }
    }
    let accepted = if is_loopback(incoming.remote_address().ip()) {
        incoming.accept_with(shared.loopback_server.clone())
    } else {
        incoming.accept()
    };
    let connecting = match accepted {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "QUIC connection attempt dropped");
            return;
        }
    };
    // Dropping an evicted handshake closes it.
    let Some(handshake) = slot
        .unless_evicted(tokio::time::timeout(AUTH_TIMEOUT, connecting))
        .await
    else {
        tracing::debug!("evicted by newer connections during the QUIC handshake");
        return;
    };
    let conn = match handshake {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            // Anyone can cause this at will; a real client says why on its side (pin, ALPN).
            tracing::debug!(error = %e, "QUIC handshake failed (wrong ALPN, or the client does not trust this certificate?)");
            return;
        }
        Err(_) => {
            tracing::debug!("QUIC handshake timed out");
            return;
        }
    };
    let fit = Arc::new(WindowFit::new(&conn));
    let hd = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok());
    let (alpn, sni) = match hd {
        Some(hd) => (hd.protocol, hd.server_name),
        None => (None, None),
    };
    if alpn.as_deref() != Some(ALPN) {
        tracing::debug!("QUIC client without ALPN forward-mux/1: closed");
        conn.close(
            VarInt::from_u32(close::PROTOCOL),
            b"ALPN forward-mux/1 required",
        );
        return;
    }
    // A completed handshake goes after those still in theirs: a flood of Initials (cheap, and
    // from any source address until the Retry above kicks in) cannot evict a client that is
    // one round trip from its verdict.
    slot.upgraded();
    let host = proof_host(sni.as_deref().unwrap_or(""));
    let busy = |conn: &quinn::Connection| {
        conn.close(
            VarInt::from_u32(close::BUSY),
            b"too many connections waiting to authenticate",
        )
    };
    let Some(verdict) = slot
        .unless_evicted(authenticate(&conn, &shared, &host))
        .await
    else {
        tracing::debug!("evicted by newer connections while authenticating");
        busy(&conn);
        return;
    };
    match verdict {
        Ok(()) => {
            if !slot.settle() {
                tracing::debug!("evicted by newer connections while authenticating");
                busy(&conn);
                return;
            }
            tracing::info!(sni = %host, "QUIC client authenticated");
        }
        Err((c, reason)) => {
            if let Some(more) = AUTH_FAILURES.pass() {
                tracing::warn!(sni = %host, not_logged = more, "QUIC client rejected: {reason}");
            }
            conn.close(VarInt::from_u32(c), reason.as_bytes());
            return;
        }
    }
    serve_streams(conn, shared, stop, fit).await;
}

fn reject(send: &mut SendStream, recv: &mut RecvStream, c: u32) {
    let _ = send.reset(VarInt::from_u32(c));
    let _ = recv.stop(VarInt::from_u32(c));
}

async fn authenticate(
    conn: &quinn::Connection,
    shared: &Shared,
    host: &str,
) -> Result<(), (u32, String)> {
    let deadline = tokio::time::Instant::now() + AUTH_TIMEOUT;
    let timeout = || {
        (
            close::AUTH_TIMEOUT,
            format!("no authentication within {AUTH_TIMEOUT:?}"),
        )
    };
    let lost = |e: &dyn std::fmt::Display| (close::PROTOCOL, format!("auth stream failed: {e}"));
    // Streams are accepted in id order, so the first one is the client's first stream.
    let (mut send, mut recv) = match tokio::time::timeout_at(deadline, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(lost(&e)),
        Err(_) => return Err(timeout()),
    };
    let exchange = async {
        let mut hello = [0u8; 1];
        recv.read_exact(&mut hello).await.map_err(|e| lost(&e))?;
        if hello[0] != AUTH_HELLO {
            return Err((
                close::PROTOCOL,
                format!(
                    "first stream is not an auth hello (byte {:#04x}); is the client a forward of the same version?",
                    hello[0]
                ),
            ));
        }
        let ch = challenge();
        send.write_all(&ch).await.map_err(|e| lost(&e))?;
        let mut proof = [0u8; 32];
        recv.read_exact(&mut proof).await.map_err(|e| lost(&e))?;
        debug_assert_eq!(ch.len(), CHALLENGE_LEN);
        let named = shared.names.admits(host);
        if !named {
            if let Some(more) = NAME_REFUSALS.pass() {
                tracing::warn!(
                    sni = %host,
                    names = %shared.names.list(),
                    not_logged = more,
                    "the client dialled a name not in --name (a client pointed elsewhere, or a \
                     relayed proof)"
                );
            }
        }
        let ok = named && shared.token.verify(&ch, host, shared.port, &proof);
        send.write_all(&[u8::from(ok)])
            .await
            .map_err(|e| lost(&e))?;
        let _ = send.finish();
        if ok {
            Ok(())
        } else {
            Err((
                close::AUTH_FAILED,
                "authentication failed: check that both sides use the same token, and that the agent answers to the name dialled (its --name)".to_owned(),
            ))
        }
    };
    tokio::pin!(exchange);
    loop {
        tokio::select! {
            r = &mut exchange => return r,
            _ = tokio::time::sleep_until(deadline) => return Err(timeout()),
            s = conn.accept_bi() => match s {
                Ok((mut s, mut r)) => {
                    // Anyone can cause this at will, thousands a second (a tester's finding).
                    match EARLY_STREAMS.pass() {
                        Some(more) => tracing::warn!(
                            stream = %s.id(),
                            not_logged = more,
                            "stream opened before authentication: reset"
                        ),
                        None => tracing::debug!(stream = %s.id(), "stream opened before authentication: reset"),
                    }
                    reject(&mut s, &mut r, code::AUTH_REQUIRED);
                }
                Err(e) => return Err(lost(&e)),
            },
        }
    }
}

async fn serve_streams(
    conn: quinn::Connection,
    shared: Arc<Shared>,
    stop: CancellationToken,
    fit: Arc<WindowFit>,
) {
    // Uploads: the VM services' sockets are what read these streams.
    let recv_window = ReceiveWindow::new(&conn);
    let mut stopping = false;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled(), if !stopping => {
                stopping = true;
                continue;
            }
            s = conn.accept_bi() => s,
        };
        match accepted {
            Ok((mut send, mut recv)) => {
                if stopping {
                    reject(&mut send, &mut recv, code::GOING_AWAY);
                    continue;
                }
                let span = tracing::debug_span!("stream", id = %send.id());
                // Inside the connection's span too, so that its lines name the client: the
                // stream span is off at the default level, and a spawned task does not inherit
                // the span it was spawned from.
                let held = recv_window.hold();
                shared.streams.spawn(
                    handle_stream(send, recv, shared.clone(), fit.clone(), held)
                        .instrument(span)
                        .in_current_span(),
                );
            }
            Err(e) => {
                match &e {
                    quinn::ConnectionError::ApplicationClosed(_)
                    | quinn::ConnectionError::LocallyClosed => {
                        tracing::info!(reason = %e, "QUIC client disconnected")
                    }
                    _ => tracing::info!(reason = %e, "QUIC connection lost"),
                }
                return;
            }
        }
    }
}

async fn handle_stream(
    mut send: SendStream,
    mut recv: RecvStream,
    shared: Arc<Shared>,
    fit: Arc<WindowFit>,
    _held: ReceiveHold,
) {
    let target = match tokio::time::timeout(HEADER_TIMEOUT, read_target(&mut recv)).await {
        Ok(Ok(t)) => t,
        // A local client that hung up at once: the client's reset discards the header with
        // the rest of what was unread. Nothing was wrong with it (a WARN a time, 101 of 134
        // lines of an agent's log under churn, a tester's finding).
        Ok(Err(HeaderError::Read(
            e @ (quinn::ReadError::Reset(_) | quinn::ReadError::ConnectionLost(_)),
        ))) => {
            tracing::debug!("stream ended before its target header was read ({e})");
            reject(&mut send, &mut recv, code::BAD_HEADER);
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!("bad target header ({e}): stream reset");
            reject(&mut send, &mut recv, code::BAD_HEADER);
            return;
        }
        Err(_) => {
            tracing::warn!(
                "bad target header ({}): stream reset",
                HeaderError::Slow(HEADER_TIMEOUT)
            );
            reject(&mut send, &mut recv, code::BAD_HEADER);
            return;
        }
    };
    let (host, port) = target;
    let shown: Arc<str> = Shown(&host, port).to_string().into();
    // The client's reset arrives as STOP_SENDING: the dial stops, so the target never sees a
    // connection opened only to be closed. A lost connection ends `stopped` too.
    let stopped = send.stopped();
    let dialled = tokio::select! {
        d = shared.policy.dial(&host, port, shared.dial_timeout) => d,
        _ = stopped => {
            tracing::debug!(target = %shown, "stream reset by the client while dialling: dial abandoned");
            return;
        }
    };
    let tcp = match dialled {
        Ok(t) => t,
        Err(refusal) => {
            let c = match refusal {
                DialRefusal::NotAllowed(_) => code::NOT_ALLOWED,
                DialRefusal::Refused(_) => code::REFUSED,
                DialRefusal::Timeout(_) => code::TIMEOUT,
                DialRefusal::Unreachable(..) => code::UNREACHABLE,
            };
            crate::policy::log_refusal(&refusal);
            reject(&mut send, &mut recv, c);
            return;
        }
    };
    tracing::debug!(target = %shown, "stream opened");
    let mut quic = QuicStream::new(send, recv, "client", shown.clone()).with_fit(fit);
    let mut tcp = tcp;
    let outcome = tokio::select! {
        // The cut is checked first: a busy relay must not hide it.
        biased;
        _ = shared.cut.cancelled() => {
            tracing::info!(target = %shown, "agent shutting down: stream reset");
            tcp.abort();
            quic.reset(code::SHUTTING_DOWN);
            return;
        }
        r = relay(&mut quic, &mut tcp) => r,
    };
    match outcome {
        Ok(stats) => tracing::debug!(
            target = %shown,
            up = stats.a_to_b,
            down = stats.b_to_a,
            "stream done"
        ),
        // A client that resets its stream is its user cancelling (a browser dropping a
        // request), everyday work that the TCP agent does not log either.
        Err(e) if e.reset_by_a() => tracing::debug!(
            "stream to {shown} ended: {}",
            e.describe("client", "target")
        ),
        Err(e) => tracing::info!(
            "stream to {shown} ended: {}",
            e.describe("client", "target")
        ),
    }
}

/// See [`QuicAgent::closer`].
#[derive(Debug, Clone)]
pub struct QuicCloser(quinn::Endpoint);

impl QuicCloser {
    /// Closes every connection and waits briefly for the CONNECTION_CLOSE frames to leave.
    pub async fn close_now(&self) {
        self.0
            .close(VarInt::from_u32(close::SHUTDOWN), b"agent shutting down");
        // Not `CLOSE_LINGER`: the frames leave at the endpoint driver's next turn, and what
        // `wait_idle` waits for beyond that is each connection's drain (three probe timeouts:
        // over a 100 ms path, over a second after the log said "exiting now").
        let _ = tokio::time::timeout(Duration::from_millis(250), self.0.wait_idle()).await;
    }
}
