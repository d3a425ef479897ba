//! The client side: one QUIC connection per agent ([`QuicCarrier`]), connected lazily,
//! authenticated on its first stream, re-established with backoff when lost, and shared by the
//! [`QuicConnector`]s of every forward to that agent. When it is at the agent's stream limit,
//! or local readers that stopped reading hold most of its receive window, new streams go to
//! overflow connections (authenticated the same way), which close again once idle.

use std::future::Future;
use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::time::Instant;

use super::agent::udp_socket;
use super::cert::{CaVerifier, PinVerifier, Rejection, Seen};
use super::receive::{ReceiveHold, ReceiveWindow};
use super::stream::{Reopening, Replay};
use super::window::WindowFit;
use super::{
    close, encode_target, is_loopback, proof_host, transport, QuicError, QuicStream, SpkiPin, ALPN,
    AUTH_HELLO,
};
use crate::auth::{Token, CHALLENGE_LEN};
use crate::dial::{Connector, DialError};
use crate::policy::Shown;

/// First reconnect delay; doubles per failure up to [`BACKOFF_MAX`], then jittered.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Longest reconnect delay.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// How the client trusts the agent's certificate.
#[derive(Debug, Clone)]
pub enum AgentVerify {
    /// Normal verification against the OS store plus an optional `--ca-file`.
    CaFile(Option<PathBuf>),
    /// Exactly the certificate with this SPKI pin (`--agent-pin`).
    Pin(SpkiPin),
}

/// What a carrier needs to reach one agent.
#[derive(Debug, Clone)]
pub struct QuicCarrierConfig {
    /// The agent's host name: TLS name (SNI) and the name bound into the auth proof.
    pub host: String,
    /// Dial this address instead of resolving `host` (like `--edge`).
    pub edge: Option<String>,
    /// The agent's UDP port.
    pub port: u16,
    /// How the agent's certificate is trusted.
    pub verify: AgentVerify,
    /// The shared token.
    pub token: Token,
    /// Deadline for the handshake and for the auth exchange, each.
    pub connect_timeout: Duration,
    /// Local UDP address; `[::]:0` (dual-stack) reaches IPv4 and IPv6 agents.
    pub bind: SocketAddr,
    /// Connections to the agent at most: when every one is at the agent's stream limit, a new
    /// stream opens another (an overflow connection); past this many it waits for room.
    pub max_connections: usize,
    /// An overflow connection without streams for this long is closed.
    pub overflow_idle: Duration,
}

impl QuicCarrierConfig {
    /// Defaults: no `--edge`, 10 s timeouts, bound to `[::]:0`, up to 64 connections (64 ×
    /// 1024 streams), overflow connections closed after 10 s without streams.
    pub fn new(host: impl Into<String>, port: u16, verify: AgentVerify, token: Token) -> Self {
        Self {
            host: host.into(),
            edge: None,
            port,
            verify,
            token,
            connect_timeout: Duration::from_secs(10),
            bind: SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
            max_connections: 64,
            overflow_idle: Duration::from_secs(10),
        }
    }
}

/// The quinn client configuration for `verify`: TLS 1.3, ALPN forward-mux/1, ring, no 0-RTT
/// (replayable), the WAN transport settings. For tools that speak to an agent directly.
pub fn client_config(verify: &AgentVerify) -> Result<quinn::ClientConfig, QuicError> {
    Ok(build_client_config(verify)?.0)
}

fn build_client_config(verify: &AgentVerify) -> Result<(quinn::ClientConfig, Seen), QuicError> {
    let provider = crate::tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Tls(e.to_string()))?;
    // Both verifiers keep why they refused a certificate (see `Rejection`).
    let (verifier, seen): (Arc<dyn rustls::client::danger::ServerCertVerifier>, Seen) = match verify
    {
        AgentVerify::CaFile(ca) => {
            let v = CaVerifier::new(crate::tls::root_store(ca.as_deref())?, provider)?;
            let seen = v.seen.clone();
            (Arc::new(v), seen)
        }
        AgentVerify::Pin(pin) => {
            let v = PinVerifier::new(*pin, provider);
            let seen = v.seen.clone();
            (Arc::new(v), seen)
        }
    };
    let mut tls = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(0, false));
    Ok((config, seen))
}

/// The other way to trust an agent, for messages about an untrusted certificate.
const PIN_HINT: &str =
    "; or pin the agent's own certificate with --agent-pin sha256:... (printed by `forward agent --quic`)";

/// The sentence for a certificate CA verification refused, worded as for TLS carriers.
fn untrusted(host: &str, e: rustls::Error) -> String {
    use rustls::CertificateError as C;
    let unknown_issuer = matches!(
        e,
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature)
    );
    let text = crate::tls::describe_handshake_error(
        &format!("agent {host}"),
        &std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    );
    if unknown_issuer {
        format!("{text}{PIN_HINT}")
    } else {
        text
    }
}

/// One authenticated quinn connection of a carrier.
pub(super) struct Link {
    conn: quinn::Connection,
    /// Its send window's sizing, shared by its streams.
    fit: Arc<WindowFit>,
    /// Its receive window, kept above what its streams can hold (downloads).
    recv: Arc<ReceiveWindow>,
    /// The agent said it is shutting down: no new streams here.
    away: AtomicBool,
    /// Streams open on this connection (each holds a [`Lease`]).
    streams: AtomicUsize,
    /// An overflow connection, closed once idle for `idle`.
    overflow: bool,
    idle: Duration,
    /// Bumped every time the last stream ends, so the reaper sees a connection that was busy
    /// and went idle again while it slept.
    idle_epoch: AtomicU64,
    /// A reaper task is watching this connection.
    reaper: AtomicBool,
    /// Datagrams received so far, and when that count last moved (see [`Link::heard`]).
    rx: std::sync::Mutex<(u64, Instant)>,
    /// See [`Link::expect_answer`].
    answer_due: std::sync::Mutex<Option<AnswerDue>>,
    /// The read clocks of this connection's streams (see [`Link::stalled`]).
    clocks: std::sync::Mutex<Vec<Weak<ReadClock>>>,
    /// When it was established: see [`State::primary_lost`].
    since: Instant,
}

/// Since when a reader of a stream's bytes has taken none, in milliseconds since
/// [`clock_epoch`] ([`NOT_HOLDING`] while it takes them), one stamp per direction:
/// - `local`: the local socket a download goes to. The relay reads no more from the stream
///   meanwhile, so quinn keeps what arrives for it here (see
///   [`crate::relay::Endpoint::sink_blocked`]).
/// - `agent`: quinn takes no more of an upload, because the VM service stopped reading and
///   the agent keeps the stream's window of it (or, briefly, congestion).
///
/// An idle connection (a pooled database connection, an ssh session) has nothing to hand on:
/// it is not stalled.
pub(super) struct ReadClock {
    local: AtomicU64,
    agent: AtomicU64,
}

const NOT_HOLDING: u64 = u64::MAX;

fn clock_epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn clock_now() -> u64 {
    u64::try_from(clock_epoch().elapsed().as_millis()).unwrap_or(NOT_HOLDING - 1)
}

impl ReadClock {
    fn new() -> Self {
        Self {
            local: AtomicU64::new(NOT_HOLDING),
            agent: AtomicU64::new(NOT_HOLDING),
        }
    }

    fn stalled_at(&self, now: u64) -> bool {
        [&self.local, &self.agent].into_iter().any(|stamp| {
            let last = stamp.load(Ordering::Relaxed);
            last != NOT_HOLDING && now.saturating_sub(last) >= STALL_AFTER_MS
        })
    }

    /// Starts or ends a stall of one direction; only a change is stored, so a transfer that
    /// keeps going writes nothing shared.
    fn mark(stamp: &AtomicU64, blocked: bool) {
        if (stamp.load(Ordering::Relaxed) != NOT_HOLDING) != blocked {
            let mark = if blocked { clock_now() } else { NOT_HOLDING };
            stamp.store(mark, Ordering::Relaxed);
        }
    }
}

/// A stream whose local socket has taken nothing for this long counts as stalled.
const STALL_AFTER_MS: u64 = 1000;

/// A connection with this many stalled streams takes no new ones while another connection can
/// be had: three-quarters of the stream windows its first receive window holds, as for the TCP
/// carrier (`Carrier::has_room`). quinn gives every stream the same fixed window, so stalled
/// readers (a pager, a paused player) each keep up to [`super::STREAM_WINDOW`] unread. The
/// receive window now grows with the streams (`super::receive`), so they no longer stop the
/// others; a new stream still starts on a connection whose streams are moving.
const STALLED_LIMIT: usize = super::STALLED_STREAMS_FIT * 3 / 4;

impl Link {
    fn new(conn: quinn::Connection, overflow: bool, idle: Duration) -> Arc<Self> {
        Arc::new(Self {
            away: AtomicBool::new(false),
            streams: AtomicUsize::new(0),
            overflow,
            idle,
            idle_epoch: AtomicU64::new(0),
            reaper: AtomicBool::new(false),
            rx: std::sync::Mutex::new((conn_rx(&conn), Instant::now())),
            answer_due: std::sync::Mutex::new(None),
            clocks: std::sync::Mutex::new(Vec::new()),
            since: Instant::now(),
            fit: Arc::new(WindowFit::new(&conn)),
            recv: ReceiveWindow::new(&conn),
            conn,
        })
    }

    /// When a datagram last arrived, as far as the samples tell ([`watch_rx`] takes one a
    /// second). quinn keeps no such time; its count of datagrams received is enough.
    fn heard(&self) -> Instant {
        let now_count = conn_rx(&self.conn);
        let mut rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        if now_count != rx.0 {
            *rx = (now_count, Instant::now());
        }
        rx.1
    }

    /// Before a new stream is trusted to this connection: one that has heard nothing for
    /// longer than [`SILENT_AFTER`] (a live agent answers the 3 s keepalive well within it)
    /// must hear something within `within`, or it is closed and `false` returned. Without
    /// this, a stream opened on a connection whose path died waited for the 30 s idle timeout.
    async fn confirm_alive(&self, within: Duration) -> bool {
        let heard = self.heard();
        if heard.elapsed() <= SILENT_AFTER {
            return true;
        }
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            tokio::time::sleep(PROBE_POLL).await;
            if self.conn.close_reason().is_some() {
                return false;
            }
            if self.heard() > heard {
                return true;
            }
        }
        let silent = heard.elapsed();
        tracing::info!(silent = ?silent, "nothing heard from the agent over QUIC: closing the connection, the next stream opens a new one");
        self.conn.close(
            quinn::VarInt::from_u32(close::NORMAL),
            b"nothing heard from the agent",
        );
        false
    }

    /// A stream was just opened here: a live agent acknowledges its packets at once and is
    /// heard at least every keepalive. If nothing at all arrives within `within` (at least
    /// [`ANSWER_FLOOR`]), the path is dead and the connection is closed ([`watch_rx`] looks
    /// once a second), so the stream is reset then rather than at the 30 s idle timeout (29 s
    /// for a connection made just after the path died, in a user's test; `confirm_alive` only
    /// catches one already silent for 7 s).
    fn expect_answer(&self, within: Duration, opened: Instant) {
        let mut due = self.answer_due.lock().unwrap_or_else(|p| p.into_inner());
        // An earlier stream's wait, still running, covers this one too.
        if due.is_none() {
            *due = Some(AnswerDue {
                count: None,
                opened,
                within: within.max(ANSWER_FLOOR),
            });
        }
    }

    /// [`Link::expect_answer`]'s check, once a second: `true` when the connection was closed
    /// for silence. Only datagrams counted after the first look answer: ones the runtime took
    /// in just after the open may have left the agent before it died.
    fn answer_overdue(&self) -> bool {
        let heard = self.heard();
        let now_count = conn_rx(&self.conn);
        let mut due = self.answer_due.lock().unwrap_or_else(|p| p.into_inner());
        let Some(d) = due.as_mut() else {
            return false;
        };
        match d.count {
            None => {
                d.count = Some(now_count);
                return false;
            }
            Some(count) if now_count > count => {
                *due = None;
                return false;
            }
            Some(_) if d.opened.elapsed() < d.within => return false,
            Some(_) => {}
        }
        let opened = d.opened.elapsed();
        *due = None;
        drop(due);
        // Not "did not answer the stream": an answer that arrived before the first look is
        // not counted (see above), so the stream may well have been answered before the agent
        // went silent. What is certain is the silence since.
        tracing::info!(
            "nothing heard from the agent for {:.1}s, with a stream opened {:.1}s ago: closing the QUIC connection (the agent or the path is gone)",
            heard.elapsed().as_secs_f64(),
            opened.as_secs_f64()
        );
        self.conn.close(
            quinn::VarInt::from_u32(close::NORMAL),
            b"nothing heard from the agent",
        );
        true
    }

    fn usable(&self) -> bool {
        self.conn.close_reason().is_none() && !self.away.load(Ordering::Relaxed)
    }

    /// Opens a stream if the agent's stream credit allows one right now, without waiting:
    /// `None` when the connection is at its stream limit.
    fn try_open(
        self: &Arc<Self>,
        carrier: &Weak<QuicCarrier>,
    ) -> Option<Result<Opened, quinn::ConnectionError>> {
        if self.stalled() >= STALLED_LIMIT {
            return None;
        }
        let mut open = pin!(self.conn.open_bi());
        match open.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Pending => None,
            Poll::Ready(Err(e)) => Some(Err(e)),
            Poll::Ready(Ok((send, recv))) => Some(Ok((self.lease(carrier), send, recv))),
        }
    }

    fn lease(self: &Arc<Self>, carrier: &Weak<QuicCarrier>) -> Lease {
        let open = self.streams.fetch_add(1, Ordering::AcqRel) + 1;
        let clock = Arc::new(ReadClock::new());
        let mut clocks = self.clocks.lock().unwrap_or_else(PoisonError::into_inner);
        // Ended streams' entries go when they outnumber the live ones.
        if clocks.len() >= 2 * open {
            clocks.retain(|c| c.strong_count() > 0);
        }
        clocks.push(Arc::downgrade(&clock));
        drop(clocks);
        Lease {
            link: self.clone(),
            carrier: carrier.clone(),
            clock,
            _recv: self.recv.hold(),
            opened: Instant::now(),
            answered: AtomicBool::new(false),
        }
    }

    /// How many of this connection's streams stalled (see [`ReadClock`]). Looked at only once
    /// enough streams are open to matter, so a busy connection's opens do not each walk them.
    fn stalled(&self) -> usize {
        if self.streams.load(Ordering::Acquire) < STALLED_LIMIT {
            return 0;
        }
        let now = clock_now();
        let clocks = self.clocks.lock().unwrap_or_else(PoisonError::into_inner);
        clocks
            .iter()
            .filter(|c| c.upgrade().is_some_and(|c| c.stalled_at(now)))
            .count()
    }
}

type Opened = (Lease, quinn::SendStream, quinn::RecvStream);

/// A stream's hold on its connection: counts it as busy, and marks it when the agent says it is
/// going away. The last lease of an overflow connection starts its idle countdown.
pub(super) struct Lease {
    link: Arc<Link>,
    carrier: Weak<QuicCarrier>,
    clock: Arc<ReadClock>,
    _recv: ReceiveHold,
    opened: Instant,
    /// The agent was heard on this stream (see [`Lease::answered`]).
    answered: AtomicBool,
}

impl Lease {
    /// Bytes or the end came from the agent on this stream. They were sent after the stream
    /// opened, so a wait for an answer that began no later ([`Link::expect_answer`]) is over:
    /// without this, an answer that arrived before the wait's first look (within a second)
    /// did not count, and an agent paused 10 s after answering cost the connection and every
    /// stream on it (a tester's download beside an echo).
    pub(super) fn answered(&self) {
        if self.answered.load(Ordering::Relaxed) {
            return;
        }
        self.answered.store(true, Ordering::Relaxed);
        let mut due = self
            .link
            .answer_due
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if due.as_ref().is_some_and(|d| d.opened <= self.opened) {
            *due = None;
        }
    }

    /// When the stream was opened.
    pub(super) fn opened(&self) -> Instant {
        self.opened
    }

    /// The local socket this stream's bytes go to stopped taking them, or takes them again.
    pub(super) fn sink_blocked(&self, blocked: bool) {
        ReadClock::mark(&self.clock.local, blocked);
    }

    /// quinn stopped taking this stream's bytes for the agent, or takes them again.
    pub(super) fn send_blocked(&self, blocked: bool) {
        ReadClock::mark(&self.clock.agent, blocked);
    }

    /// The agent is shutting down: the carrier opens new streams on a new connection.
    pub(super) fn going_away(&self) {
        self.link.away.store(true, Ordering::Relaxed);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let link = &self.link;
        if link.streams.fetch_sub(1, Ordering::AcqRel) != 1 || !link.overflow {
            return;
        }
        link.idle_epoch.fetch_add(1, Ordering::AcqRel);
        if link.reaper.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(reap(link.clone(), self.carrier.clone()));
            }
            Err(_) => link.reaper.store(false, Ordering::Release),
        }
    }
}

/// Closes an overflow connection once it has had no streams for its idle period.
async fn reap(link: Arc<Link>, carrier: Weak<QuicCarrier>) {
    loop {
        let epoch = link.idle_epoch.load(Ordering::Acquire);
        tokio::time::sleep(link.idle).await;
        let Some(carrier) = carrier.upgrade() else {
            return;
        };
        {
            // Openers take overflow streams under this lock, so none can start in between.
            let mut list = carrier
                .overflow
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if link.streams.load(Ordering::Acquire) == 0
                && link.idle_epoch.load(Ordering::Acquire) == epoch
            {
                list.retain(|l| !Arc::ptr_eq(l, &link));
                let left = list.len();
                drop(list);
                link.conn.close(
                    quinn::VarInt::from_u32(close::NORMAL),
                    b"idle overflow connection",
                );
                tracing::debug!(agent = %carrier.describe(), overflow = left, "closed an idle overflow QUIC connection");
                return;
            }
        }
        if link.streams.load(Ordering::Acquire) > 0 {
            link.reaper.store(false, Ordering::Release);
            // A stream that ended between the check and the store left the countdown to us.
            if link.streams.load(Ordering::Acquire) == 0
                && !link.reaper.swap(true, Ordering::AcqRel)
            {
                continue;
            }
            return;
        }
        // Busy and idle again while we slept: count from the newer idle start.
    }
}

#[derive(Default)]
struct State {
    /// The primary connection.
    primary: Option<Arc<Link>>,
    failures: u32,
    retry_at: Option<Instant>,
    /// When the last attempt failed (its end) and why: see [`QuicCarrier::live`].
    last_failure: Option<(Instant, String)>,
    /// Until when a new connection is tried again and again: the agent said it is stopping,
    /// and one that takes over (`--handover`, a restart) may need a moment to take the port.
    restart_until: Option<Instant>,
}

impl State {
    /// The primary connection was found lost after `lasted`. The backoff starts over only
    /// after one that lasted: one lost sooner counts as a failed attempt, so an agent that
    /// accepts the proof and then drops every connection (a crash loop, an incompatible build)
    /// is not redialled at once, for ever.
    fn primary_lost(&mut self, lasted: Duration) {
        self.primary = None;
        if lasted >= STABLE_CONNECTION {
            self.failures = 0;
            self.retry_at = None;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.retry_at = Some(Instant::now() + jittered(self.failures));
        }
    }
}

/// A primary connection that stayed up this long resets the reconnect backoff when it ends.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// The QUIC connections to one agent, shared by every connector to it: a primary connection,
/// plus overflow connections while the primary is at the agent's stream limit.
pub struct QuicCarrier {
    host: String,
    edge: Option<String>,
    port: u16,
    token: Token,
    connect_timeout: Duration,
    max_connections: usize,
    overflow_idle: Duration,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    /// The same for an agent on this host (large packets).
    client_loopback: quinn::ClientConfig,
    seen: Seen,
    state: tokio::sync::Mutex<State>,
    /// Overflow connections, in the order they were opened.
    overflow: Mutex<Vec<Arc<Link>>>,
    /// Held while an overflow connection is being established, so a burst opens one at a time.
    dialing: tokio::sync::Mutex<()>,
    /// `close` was called: a lost connection is not redialled.
    closing: AtomicBool,
    /// Wakes the [`redial`] task: the primary connection was lost.
    lost: Arc<tokio::sync::Notify>,
    me: Weak<QuicCarrier>,
}

impl Drop for QuicCarrier {
    fn drop(&mut self) {
        // The redial task finds nothing to upgrade and ends.
        self.lost.notify_one();
    }
}

impl std::fmt::Debug for QuicCarrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuicCarrier({}:{})", self.host, self.port)
    }
}

fn jittered(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1 << failures.saturating_sub(1).min(16));
    let cap = exp.min(BACKOFF_MAX);
    let mut r = [0u8; 2];
    let _ = SystemRandom::new().fill(&mut r);
    // Between half and all of the delay, so clients that lost the agent together spread out.
    let frac = 0.5 + f64::from(u16::from_be_bytes(r)) / f64::from(u16::MAX) / 2.0;
    cap.mul_f64(frac)
}

impl QuicCarrier {
    /// Builds the TLS configuration and binds the local UDP socket; connects on first use.
    /// Must be called inside a tokio runtime.
    pub fn new(config: QuicCarrierConfig) -> Result<Arc<Self>, QuicError> {
        let (client, seen) = build_client_config(&config.verify)?;
        let mut client_loopback = client.clone();
        client_loopback.transport_config(transport(0, true));
        let socket = match udp_socket(config.bind) {
            // A host without IPv6 cannot bind [::]; IPv4 alone still reaches IPv4 agents.
            Err(_) if config.bind == SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0) => {
                udp_socket(SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0))?
            }
            other => other?,
        };
        let endpoint = quinn::Endpoint::new(
            super::endpoint_config(quinn::EndpointConfig::default()),
            None,
            socket,
            Arc::new(super::udp::Tokio),
        )?;
        let lost = Arc::new(tokio::sync::Notify::new());
        let carrier = Arc::new_cyclic(|me| Self {
            host: config.host,
            edge: config.edge,
            port: config.port,
            token: config.token,
            connect_timeout: config.connect_timeout,
            max_connections: config.max_connections.max(1),
            overflow_idle: config.overflow_idle,
            endpoint,
            client,
            client_loopback,
            seen,
            state: tokio::sync::Mutex::default(),
            overflow: Mutex::default(),
            dialing: tokio::sync::Mutex::default(),
            closing: AtomicBool::new(false),
            lost: lost.clone(),
            me: me.clone(),
        });
        tokio::spawn(redial(Arc::downgrade(&carrier), lost));
        Ok(carrier)
    }

    /// How long a connect, or an answer the agent owes, may take.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// `host:port` of the agent.
    pub fn describe(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The local UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Moves the carrier to another local UDP socket (e.g. after a network change); the open
    /// connection migrates and its streams go on.
    pub fn rebind(&self, socket: std::net::UdpSocket) -> Result<(), QuicError> {
        self.endpoint.rebind(socket)?;
        Ok(())
    }

    /// Connects and authenticates if needed, and proves the agent answers.
    pub async fn check(&self) -> Result<(), QuicError> {
        self.connection().await.map(drop)
    }

    /// Closes every connection (streams still open are cut) and waits briefly for the agent
    /// to hear of it.
    pub async fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
        // The endpoint's, not each connection we hold: a (re)connect in progress holds the
        // state lock (for up to the connect timeout) and the connection it is making, and a
        // `forward stdio` that closed around one left the agent holding it for its idle
        // timeout. A connection made after this fails to start.
        self.endpoint
            .close(quinn::VarInt::from_u32(close::NORMAL), b"client closing");
        let overflow = !std::mem::take(&mut *self.overflow_list()).is_empty();
        // How long the agent may take to hear of it: up to 2 s for a connection it had
        // accepted; none for a handshake it never answered (a failed check, a signal while
        // connecting: waiting out its drain held the exit 2 s); a moment for the frames to
        // leave when a (re)connect holds the state.
        let linger = match self.state.try_lock() {
            Ok(st) if overflow || st.primary.is_some() => Duration::from_secs(2),
            Ok(_) => Duration::ZERO,
            Err(_) => Duration::from_millis(100),
        };
        let _ = tokio::time::timeout(linger, self.endpoint.wait_idle()).await;
    }

    /// The live, authenticated primary connection: the current one, or a new one (within a
    /// second of a failed attempt, that attempt's failure). Callers queue here while a
    /// reconnect runs.
    pub async fn connection(&self) -> Result<quinn::Connection, QuicError> {
        self.live(true).await.map(|l| l.conn.clone())
    }

    /// Whether a primary connection is up (none yet, or a lost one not replaced: false).
    pub async fn connected(&self) -> bool {
        self.state
            .lock()
            .await
            .primary
            .as_ref()
            .is_some_and(|l| l.conn.close_reason().is_none())
    }

    /// Connections open to the agent: the primary (if connected) and the overflow ones.
    pub async fn connections(&self) -> usize {
        let primary = self
            .state
            .lock()
            .await
            .primary
            .as_ref()
            .is_some_and(|l| l.conn.close_reason().is_none());
        let overflow = self
            .overflow_list()
            .iter()
            .filter(|l| l.conn.close_reason().is_none())
            .count();
        usize::from(primary) + overflow
    }

    fn overflow_list(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Link>>> {
        self.overflow.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The primary connection, or a new one. `user`: a local connection waits for it. Within a
    /// second of the end of a failed attempt it gets that failure instead of another attempt,
    /// so connections that queued behind one attempt all fail with it, and none waits for a
    /// backoff: before, one queued connection failed per 10 s while the rest piled up
    /// (thousands of descriptors during an outage, and stale requests delivered when the agent
    /// came back). The background redial (`user` false) keeps the backoff and waits it out
    /// itself.
    async fn live(&self, user: bool) -> Result<Arc<Link>, QuicError> {
        let mut st = self.state.lock().await;
        if let Some(link) = &st.primary {
            let stopping = link.away.load(Ordering::Relaxed) || closed_by_stop(&link.conn);
            match link.conn.close_reason() {
                None if !stopping => return Ok(link.clone()),
                // Left to its open streams; it closes when the last handle goes.
                None => {
                    tracing::info!(agent = %self.describe(), "agent is shutting down; new streams go to a new connection");
                    st.primary = None;
                }
                // Its loss was logged when it happened (`report_loss`).
                Some(why) => {
                    tracing::debug!(agent = %self.describe(), reason = %why, "reconnecting after a lost QUIC connection");
                    // An agent that said it stops is handled below (`restart_until`).
                    if stopping {
                        st.primary = None;
                    } else {
                        let lasted = link.since.elapsed();
                        st.primary_lost(lasted);
                    }
                }
            }
            if stopping {
                st.restart_until = Some(Instant::now() + self.connect_timeout);
            }
        }
        // After a graceful stop, the agent that takes over gets the connect timeout to take
        // the UDP port: the old one refuses connections while it drains, and the port is free
        // only once it has exited (a --handover agent polls for it). A local connection waits
        // that long instead of failing at once, as a TCP or TLS carrier's does not need to.
        // The window outlives the attempt that opened it: the background redial may be the
        // first to see the stop, and its failures must not fail the users' connections fast.
        let restarting = |st: &State, margin: Duration| {
            st.restart_until
                .is_some_and(|until| Instant::now() + margin < until)
        };
        if let (true, Some((at, err))) = (user, &st.last_failure) {
            if at.elapsed() < USER_RETRY && !restarting(&st, Duration::ZERO) {
                return Err(self.conn_error(format!("the last attempt failed moments ago: {err}")));
            }
        }
        let established = loop {
            let r = self.establish().await;
            match &r {
                Err(e) if user && restartable(e) && restarting(&st, RESTART_POLL) => {
                    tracing::debug!(error = %e, "the agent is restarting: trying again");
                    tokio::time::sleep(RESTART_POLL).await;
                }
                _ => break r,
            }
        };
        match established {
            Ok(c) if self.closing.load(Ordering::Relaxed) => {
                c.close(quinn::VarInt::from_u32(close::NORMAL), b"client closing");
                Err(self.conn_error("the client is closing".into()))
            }
            Ok(c) => {
                // `failures` starts over once a connection has lasted (`State::primary_lost`).
                st.retry_at = None;
                st.last_failure = None;
                st.restart_until = None;
                tokio::spawn(report_loss(c.clone(), self.describe(), self.lost.clone()));
                let link = Link::new(c, false, self.overflow_idle);
                tokio::spawn(watch_rx(Arc::downgrade(&link)));
                st.primary = Some(link.clone());
                Ok(link)
            }
            Err(e) => {
                st.failures = st.failures.saturating_add(1);
                let wait = jittered(st.failures);
                st.retry_at = Some(Instant::now() + wait);
                // Within the window (the background redial's attempt), users still wait.
                if !(restartable(&e) && restarting(&st, Duration::ZERO)) {
                    st.last_failure = Some((Instant::now(), e.to_string()));
                    st.restart_until = None;
                }
                tracing::debug!(error = %e, retry_in = ?wait, "QUIC connect failed");
                Err(e)
            }
        }
    }

    /// Opens a stream to `host:port` on the agent's side, writing the target header at once.
    pub async fn open(&self, host: &str, port: u16) -> Result<QuicStream, QuicError> {
        let header = encode_target(host, port)?;
        let shown: Arc<str> = Shown(host, port).to_string().into();
        self.open_with(&header, shown).await
    }

    async fn open_with(&self, header: &[u8], shown: Arc<str>) -> Result<QuicStream, QuicError> {
        self.open_stream_to(header, shown, true).await
    }

    /// `replayable`: the stream may be opened again on a new connection if the agent turns out
    /// to have restarted before it saw it (see [`super::stream::Replay`]); not for a stream
    /// that is that replay.
    async fn open_stream_to(
        &self,
        header: &[u8],
        shown: Arc<str>,
        replayable: bool,
    ) -> Result<QuicStream, QuicError> {
        let mut retried = false;
        loop {
            let primary = self.live(true).await?;
            if !primary.confirm_alive(self.connect_timeout).await {
                // Closed: `live` opens a new connection (or says why it cannot).
                continue;
            }
            let attempt = async {
                let (lease, mut send, recv) = self.open_stream(&primary).await?;
                let link = lease.link.clone();
                let rx_at_open = conn_rx(&link.conn);
                send.write_all(header).await.map_err(|e| match e {
                    quinn::WriteError::ConnectionLost(c) => c,
                    _ => quinn::ConnectionError::LocallyClosed,
                })?;
                let mut stream = QuicStream::new(send, recv, "agent", shown.clone())
                    .with_fit(link.fit.clone())
                    .with_lease(lease);
                if replayable {
                    let replay =
                        Replay::new(link.conn.clone(), rx_at_open, self.reopener(header, &shown));
                    stream = stream.with_replay(replay);
                }
                Ok::<_, quinn::ConnectionError>((stream, link))
            };
            match attempt.await {
                Ok((s, link)) => {
                    link.expect_answer(
                        self.connect_timeout,
                        s.opened().unwrap_or_else(Instant::now),
                    );
                    return Ok(s);
                }
                // The connection died under us (agent restarted, path gone): one fresh try.
                Err(_) if !retried => retried = true,
                Err(e) => return Err(self.conn_error(e.to_string())),
            }
        }
    }

    /// How a [`Replay`] opens its stream again: on this carrier, as it was opened, once.
    fn reopener(
        &self,
        header: &[u8],
        shown: &Arc<str>,
    ) -> Box<dyn Fn() -> Reopening + Send + Sync> {
        let (me, header, shown) = (self.me.clone(), header.to_vec(), shown.clone());
        Box::new(move || {
            let (me, header, shown) = (me.clone(), header.clone(), shown.clone());
            Box::pin(async move {
                let Some(carrier) = me.upgrade() else {
                    return Err(QuicError::Io(io::Error::other("the client is closing")));
                };
                carrier.open_stream_to(&header, shown, false).await
            })
        })
    }

    /// A new stream on the primary if the agent's stream credit allows and its readers have
    /// not stalled (see [`STALLED_LIMIT`]), else on an overflow connection with room, else on
    /// a new overflow connection; past `max_connections` (or if the agent cannot be reached
    /// again) it waits for credit on the primary.
    async fn open_stream(&self, primary: &Arc<Link>) -> Result<Opened, quinn::ConnectionError> {
        if let Some(opened) = primary.try_open(&self.me) {
            return opened;
        }
        if let Some(opened) = self.try_overflow() {
            return Ok(opened);
        }
        if self.overflow_list().len() + 1 < self.max_connections {
            let _dialing = self.dialing.lock().await;
            // Room may have come back, or a new connection appeared, while we waited.
            if let Some(opened) = primary.try_open(&self.me) {
                return opened;
            }
            if let Some(opened) = self.try_overflow() {
                return Ok(opened);
            }
            match self.establish().await {
                Ok(conn) => {
                    let link = Link::new(conn, true, self.overflow_idle);
                    let mut list = self.overflow_list();
                    list.push(link.clone());
                    tracing::debug!(agent = %self.describe(), connections = list.len() + 1, "primary QUIC connection at the agent's stream limit or held by stalled streams (local readers or VM services not reading): opened an overflow connection");
                    if let Some(Ok(opened)) = link.try_open(&self.me) {
                        return Ok(opened);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot open an overflow QUIC connection; waiting for stream credit")
                }
            }
        }
        let (send, recv) = primary.conn.open_bi().await?;
        Ok((primary.lease(&self.me), send, recv))
    }

    /// A stream on the first overflow connection with room; dead ones are dropped on the way.
    fn try_overflow(&self) -> Option<Opened> {
        let mut list = self.overflow_list();
        let mut found = None;
        list.retain(|link| {
            if found.is_some() || !link.usable() {
                return link.usable();
            }
            match link.try_open(&self.me) {
                Some(Ok(opened)) => {
                    found = Some(opened);
                    true
                }
                Some(Err(_)) => false,
                None => true,
            }
        });
        found
    }

    fn conn_error(&self, reason: String) -> QuicError {
        QuicError::Connection {
            host: self.host.clone(),
            port: self.port,
            reason,
        }
    }

    /// A new authenticated connection. An agent with too many connections waiting to
    /// authenticate evicts the oldest (a flood, or a burst of clients): that is retried, with
    /// jittered pauses, until the connect timeout, with the pauses a TCP carrier takes to retry a
    /// `503`.
    async fn establish(&self) -> Result<quinn::Connection, QuicError> {
        use crate::agent_client::{jittered_from, DROPPED_RETRY_BASE};
        let deadline = Instant::now() + self.connect_timeout;
        let mut attempt = 0;
        loop {
            match self.establish_once().await {
                Err(e @ QuicError::Busy { .. }) => {
                    let pause = jittered_from(DROPPED_RETRY_BASE, attempt);
                    if Instant::now() + pause >= deadline {
                        return Err(e);
                    }
                    tracing::debug!(?pause, "{e}: trying again");
                    attempt += 1;
                    tokio::time::sleep(pause).await;
                }
                r => return r,
            }
        }
    }

    async fn establish_once(&self) -> Result<quinn::Connection, QuicError> {
        let dial = self.edge.as_deref().unwrap_or(&self.host);
        let addrs = crate::dial::resolve(&self.host, self.edge.as_deref(), self.port).await?;
        let ipv6_socket = self.endpoint.local_addr()?.is_ipv6();
        // A socket bound to an IPv4 address cannot send to an IPv6 one.
        let usable: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|a| ipv6_socket || a.is_ipv4())
            .collect();
        // Addresses are raced as for TCP: QUIC ignores "port unreachable", so an agent that
        // listens on IPv4 only behind a dual-stack name cost a whole timeout per connection.
        // Retrying another address cannot fix a certificate or protocol problem.
        let fatal = |e: &QuicError| {
            matches!(
                e,
                QuicError::PinMismatch { .. }
                    | QuicError::Untrusted { .. }
                    | QuicError::WrongAlpn { .. }
            )
        };
        let (conn, addr) = match crate::dial::race(
            &usable,
            |addr| async move { self.handshake(addr).await.map(|c| (c, addr)) },
            fatal,
        )
        .await
        {
            Ok(won) => won,
            Err(failed) => return Err(race_lost(&self.host, self.port, dial, failed, fatal)),
        };
        if usable.len() > 1 {
            crate::dial::remember_answer(&self.host, self.edge.as_deref(), self.port, addr);
        }
        self.authenticate(&conn, addr).await?;
        tracing::info!(agent = %self.describe(), %addr, "QUIC connection authenticated");
        Ok(conn)
    }

    async fn handshake(&self, addr: SocketAddr) -> Result<quinn::Connection, QuicError> {
        if let Ok(mut s) = self.seen.lock() {
            *s = None;
        }
        let connecting = self
            .endpoint
            .connect_with(
                if is_loopback(addr.ip()) {
                    self.client_loopback.clone()
                } else {
                    self.client.clone()
                },
                addr,
                &self.host,
            )
            .map_err(|e| self.conn_error(format!("cannot start a connection to {addr}: {e}")))?;
        let answered = tokio::select! {
            r = tokio::time::timeout(self.connect_timeout, connecting) => r,
            () = udp_port_closed(addr) => {
                return Err(self.conn_error(format!(
                    "nothing listens on UDP port {} at {addr} (it answered 'port unreachable'); is the agent running with --quic?",
                    addr.port()
                )));
            }
        };
        let conn = match answered {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(self.handshake_error(e, addr)),
            Err(_) => {
                return Err(QuicError::Timeout {
                    host: self.host.clone(),
                    addr,
                    after: self.connect_timeout,
                })
            }
        };
        let alpn = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|hd| hd.protocol);
        if alpn.as_deref() != Some(ALPN) {
            conn.close(
                quinn::VarInt::from_u32(close::PROTOCOL),
                b"ALPN forward-mux/1 required",
            );
            return Err(QuicError::WrongAlpn {
                host: self.host.clone(),
                port: self.port,
            });
        }
        Ok(conn)
    }

    fn handshake_error(&self, e: quinn::ConnectionError, addr: SocketAddr) -> QuicError {
        use quinn::ConnectionError as C;
        let seen = self.seen.lock().ok().and_then(|mut s| s.take());
        match seen {
            Some(Rejection::Pin(got)) => return QuicError::PinMismatch { got },
            Some(Rejection::Cert(e)) => {
                return QuicError::Untrusted {
                    message: untrusted(&self.host, e),
                }
            }
            None => {}
        }
        // TLS alert 120: no_application_protocol.
        let no_alpn = quinn::TransportErrorCode::crypto(120);
        match &e {
            // The agent dropped the handshake: only an eviction does that (an application's
            // close during the handshake reaches the peer as APPLICATION_ERROR).
            C::ConnectionClosed(c)
                if c.error_code == quinn::TransportErrorCode::APPLICATION_ERROR =>
            {
                QuicError::Busy {
                    host: self.host.clone(),
                    port: self.port,
                }
            }
            C::ConnectionClosed(c) if c.error_code == no_alpn => QuicError::WrongAlpn {
                host: self.host.clone(),
                port: self.port,
            },
            C::TransportError(t) if t.code == no_alpn => QuicError::WrongAlpn {
                host: self.host.clone(),
                port: self.port,
            },
            // A crypto error raised here is our verifier refusing the certificate (its cause
            // was taken above; this is the fallback).
            C::TransportError(t) if (0x100..0x200).contains(&u64::from(t.code)) => {
                QuicError::Untrusted {
                    message: format!(
                        "certificate of agent {} rejected: {}{PIN_HINT}",
                        self.host, t.reason
                    ),
                }
            }
            C::TimedOut => QuicError::Timeout {
                host: self.host.clone(),
                addr,
                after: self.connect_timeout,
            },
            _ => self.conn_error(format!("handshake with {addr} failed: {e}")),
        }
    }

    async fn authenticate(
        &self,
        conn: &quinn::Connection,
        addr: SocketAddr,
    ) -> Result<(), QuicError> {
        let rejected = || QuicError::AuthRejected {
            host: self.host.clone(),
            port: self.port,
        };
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&[AUTH_HELLO]).await?;
            let mut ch = [0u8; CHALLENGE_LEN];
            recv.read_exact(&mut ch).await?;
            let proof = self.token.prove(&ch, &proof_host(&self.host), self.port);
            send.write_all(&proof).await?;
            let mut verdict = [0u8; 1];
            recv.read_exact(&mut verdict).await?;
            let _ = send.finish();
            Ok::<bool, Box<dyn std::error::Error + Send + Sync>>(verdict[0] == 1)
        };
        let outcome = tokio::time::timeout(self.connect_timeout, exchange).await;
        // The agent closes a rejected connection with AUTH_FAILED, but the client's next packet
        // can meet the agent after it dropped the connection, and the stateless reset that
        // answers it can arrive first: a reset in the middle of the exchange is the same refusal
        // (1 in 2 wrong-token checks on loopback said only "connection lost").
        let closed_for_auth = match conn.close_reason() {
            Some(quinn::ConnectionError::ApplicationClosed(a))
                if a.error_code == quinn::VarInt::from_u32(close::BUSY) =>
            {
                return Err(QuicError::Busy {
                    host: self.host.clone(),
                    port: self.port,
                });
            }
            Some(quinn::ConnectionError::ApplicationClosed(a)) => {
                a.error_code == quinn::VarInt::from_u32(close::AUTH_FAILED)
            }
            Some(quinn::ConnectionError::Reset) => true,
            _ => false,
        };
        match outcome {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(rejected()),
            _ if closed_for_auth => Err(rejected()),
            Ok(Err(e)) => Err(self.conn_error(format!("authentication exchange failed: {e}"))),
            Err(_) => {
                conn.close(quinn::VarInt::from_u32(close::NORMAL), b"auth timeout");
                Err(QuicError::Timeout {
                    host: self.host.clone(),
                    addr,
                    after: self.connect_timeout,
                })
            }
        }
    }
}

/// A forward through a QUIC agent: one stream per local connection to one target on the
/// agent's side. Clone it or build several over the same [`QuicCarrier`].
#[derive(Clone)]
pub struct QuicConnector {
    carrier: Arc<QuicCarrier>,
    header: Arc<[u8]>,
    shown: Arc<str>,
    describe: String,
}

impl std::fmt::Debug for QuicConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuicConnector({})", self.describe)
    }
}

impl QuicConnector {
    /// `target_host:target_port` as the agent dials it (`localhost` for the VM itself).
    pub fn new(
        carrier: Arc<QuicCarrier>,
        target_host: &str,
        target_port: u16,
    ) -> Result<Self, QuicError> {
        let header = encode_target(target_host, target_port)?;
        let shown = Shown(target_host, target_port).to_string();
        // As the TCP carriers show a forward: `VM TARGET (agent quic)`.
        let agent = carrier.describe();
        let vm = agent.rsplit_once(':').map_or(agent.as_str(), |(h, _)| h);
        let vm = vm.trim_start_matches('[').trim_end_matches(']');
        let describe = format!("{vm} {shown} (agent quic)");
        Ok(Self {
            carrier,
            header: header.into(),
            shown: shown.into(),
            describe,
        })
    }

    /// The carrier this connector opens streams on.
    pub fn carrier(&self) -> &Arc<QuicCarrier> {
        &self.carrier
    }
}

impl Connector for QuicConnector {
    type Stream = QuicStream;

    async fn connect(&self) -> Result<QuicStream, DialError> {
        self.carrier
            .open_with(&self.header, self.shown.clone())
            .await
            .map_err(|e| DialError::Agent(e.to_string()))
    }

    /// The connection, the token, and then the target. QUIC has no `OPEN_OK`: the stream is
    /// opened and ended at once, and the agent either refuses it (a reset naming why: nothing
    /// listening, not allowed) or relays the end to the target, whose close or first bytes
    /// come back. A target that stays silent after our end counts as reached: the agent has
    /// dialled it, or it would have said so.
    async fn check(&self) -> Result<(), DialError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.carrier
            .check()
            .await
            .map_err(|e| DialError::Agent(e.to_string()))?;
        let mut stream = self.connect().await?;
        let fail = |e: std::io::Error| DialError::Agent(e.to_string());
        stream.shutdown().await.map_err(fail)?;
        let mut buf = [0u8; 512];
        // At least as long as an agent's default dial: a target that never answers is then
        // refused (TIMEOUT) before the check would take it for a silent service. The
        // connect timeout alone, 10 s like that dial, made it a race a tester saw lost.
        let wait = self
            .carrier
            .connect_timeout()
            .max(crate::policy::DEFAULT_DIAL_TIMEOUT + Duration::from_secs(2));
        let read = stream.read(&mut buf);
        tokio::pin!(read);
        // QUIC's agent sends no word when its dial succeeds (the TCP carrier's does), so a
        // service that stays silent after our end of stream looks like a dial still running,
        // and only the agent's refusal tells them apart. Say why the check waits.
        let early = wait.min(Duration::from_secs(1));
        let outcome = match tokio::time::timeout(early, &mut read).await {
            Ok(r) => Ok(r),
            Err(_) => {
                tracing::info!(
                    target = %self.describe,
                    "check: no answer from the service yet; over QUIC a silent service and a dial still running look alike, so the check waits up to {wait:?} for a refusal (--connect-timeout, at least the agent's default --dial-timeout and 2 s)"
                );
                tokio::time::timeout(wait - early, read).await
            }
        };
        match outcome {
            Ok(Err(e)) => Err(fail(e)),
            Ok(Ok(_)) | Err(_) => Ok(()),
        }
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

/// Datagrams a connection has received so far.
fn conn_rx(conn: &quinn::Connection) -> u64 {
    conn.stats().udp_rx.datagrams
}

/// A stream waiting for its first answer (see [`Link::expect_answer`]).
struct AnswerDue {
    /// Datagrams received as of the first look after the open.
    count: Option<u64>,
    opened: Instant,
    within: Duration,
}

/// The shortest wait of [`Link::expect_answer`]: a live agent is heard at least every
/// keepalive, plus a round trip.
const ANSWER_FLOOR: Duration = Duration::from_secs(super::KEEPALIVE.as_secs() + 1);

/// A user's connection may trigger an attempt this soon after the last failed one.
const USER_RETRY: Duration = Duration::from_secs(1);

/// How often a new connection is tried while the agent restarts (see [`QuicCarrier::live`]).
const RESTART_POLL: Duration = Duration::from_millis(200);

/// Whether the agent closed `conn` because it was stopping (its drain ended).
fn closed_by_stop(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == quinn::VarInt::from_u32(close::SHUTDOWN)
    )
}

/// Whether a failed connect may succeed a moment later, once a restarting agent is back:
/// refused or unanswered, not a certificate, pin or token that will not change.
fn restartable(e: &QuicError) -> bool {
    matches!(
        e,
        QuicError::Connection { .. } | QuicError::AllAddresses { .. }
    )
}

/// A connection silent this long is suspect: the agent's keepalive, or its answer to ours,
/// comes every 3 s.
const SILENT_AFTER: Duration = Duration::from_secs(7);
/// How often [`Link::confirm_alive`] looks for a datagram while it waits.
const PROBE_POLL: Duration = Duration::from_millis(50);

/// Samples the connection's received-datagram count once a second while it lives, so
/// [`Link::heard`] knows roughly when the last one came.
async fn watch_rx(link: Weak<Link>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(link) = link.upgrade() else { return };
        if link.conn.close_reason().is_some() || link.answer_overdue() {
            return;
        }
    }
}

/// Logs the loss of a primary connection when it happens, not when the next local connection
/// finds it gone (that could be minutes later, about an outage long over), and has [`redial`]
/// replace it.
async fn report_loss(conn: quinn::Connection, agent: String, lost: Arc<tokio::sync::Notify>) {
    use quinn::ConnectionError as E;
    match conn.closed().await {
        // Ours: `close`, a silent connection given up (the stream that did it reconnects), or
        // an idle overflow connection.
        E::LocallyClosed => return,
        E::ApplicationClosed(c) => tracing::info!(
            %agent,
            reason = %String::from_utf8_lossy(&c.reason),
            "the agent closed the QUIC connection; reconnecting"
        ),
        E::TimedOut => tracing::warn!(
            %agent,
            "QUIC connection lost: nothing heard from the agent for 30 s (the agent or the path \
             is gone, or this process was stopped that long); reconnecting"
        ),
        why => tracing::warn!(%agent, reason = %why, "QUIC connection lost; reconnecting"),
    }
    lost.notify_one();
}

/// Redials a lost primary connection in the background (as the TCP carriers' watcher does),
/// so the next local connection finds a live one instead of paying the handshake, or learning
/// of the loss only then. One task per carrier; it ends with the carrier.
async fn redial(carrier: Weak<QuicCarrier>, lost: Arc<tokio::sync::Notify>) {
    loop {
        lost.notified().await;
        // Thinned out as over TLS and TCP: every attempt was a warning (17 lines in 2 minutes
        // of a killed agent, where TLS and TCP wrote 5).
        let mut attempts = crate::throttle::Attempts::default();
        loop {
            let Some(c) = carrier.upgrade() else { return };
            if c.closing.load(Ordering::Relaxed) {
                return;
            }
            // Wait out the backoff without holding the state lock, so `close` is not held up.
            let retry_at = {
                let mut st = c.state.lock().await;
                if st.primary.as_ref().is_some_and(|l| l.usable()) {
                    break;
                }
                // A loss, not a stop: `live` handles an agent that said it stops.
                if let Some(lasted) = st
                    .primary
                    .as_ref()
                    .filter(|l| {
                        l.conn.close_reason().is_some()
                            && !l.away.load(Ordering::Relaxed)
                            && !closed_by_stop(&l.conn)
                    })
                    .map(|l| l.since.elapsed())
                {
                    st.primary_lost(lasted);
                }
                st.retry_at
            };
            if let Some(at) = retry_at.filter(|at| *at > Instant::now()) {
                drop(c);
                tokio::time::sleep_until(at).await;
                continue;
            }
            match c.live(false).await {
                Ok(_) => {
                    tracing::info!(agent = %c.describe(), "QUIC connection to the agent is back");
                    break;
                }
                Err(e) => {
                    let next = attempts.failed(&e.to_string());
                    let attempt = attempts.count();
                    match next {
                        Some(next) => tracing::warn!(
                            agent = %c.describe(),
                            "reconnect failed (attempt {attempt}; retrying with backoff, logged again at attempt {next} or when the reason changes): {e}"
                        ),
                        None => {
                            tracing::debug!(agent = %c.describe(), "reconnect failed (attempt {attempt}): {e}")
                        }
                    }
                }
            }
        }
    }
}

/// The error of an address race nobody won: the fatal error that ended it, the one address's
/// error, or every address and what it said. None at all: every address was of a family the
/// socket cannot reach.
fn race_lost(
    host: &str,
    port: u16,
    dial: &str,
    mut failed: Vec<(SocketAddr, QuicError)>,
    fatal: impl Fn(&QuicError) -> bool,
) -> QuicError {
    if failed.len() > 1 && !failed.last().is_some_and(|(_, e)| fatal(e)) {
        let tried = crate::dial::each_address(&failed, |e| match e {
            QuicError::Timeout { after, .. } => format!(": no answer within {after:?}"),
            QuicError::Connection { reason, .. } => format!(": {reason}"),
            other => format!(": {other}"),
        });
        return QuicError::AllAddresses {
            host: host.to_owned(),
            port,
            tried,
        };
    }
    failed.pop().map(|(_, e)| e).unwrap_or_else(|| {
        QuicError::Resolve(crate::dial::DialError::NoAddress {
            host: dial.to_owned(),
        })
    })
}

/// How long a handshake runs before [`udp_port_closed`] asks the kernel: a live agent
/// answers well before, even across the world.
const CLOSED_PORT_PROBE_AFTER: Duration = Duration::from_millis(300);

/// Resolves only if `addr`'s UDP port is known to be closed: quinn's socket is not connected,
/// so it never hears the ICMP "port unreachable" that comes back at once, and a client
/// pointed at an agent started without `--quic` waited the whole connect timeout for an
/// answer that could not come. A connected socket of our own sends an empty datagram (QUIC
/// drops it) and hears the refusal. Without one (a firewall that drops ICMP, a live agent)
/// this never resolves and the handshake's own timeout decides.
async fn udp_port_closed(addr: SocketAddr) {
    tokio::time::sleep(CLOSED_PORT_PROBE_AFTER).await;
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let refused = |r: std::io::Result<usize>| matches!(r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused);
    if let Ok(sock) = tokio::net::UdpSocket::bind(local).await {
        if sock.connect(addr).await.is_ok() {
            let mut buf = [0u8; 64];
            for _ in 0..3 {
                if refused(sock.send(&[]).await) {
                    return;
                }
                if let Ok(r) =
                    tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf)).await
                {
                    if refused(r) {
                        return;
                    }
                }
            }
        }
    }
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_counts_as_stalled_a_second_after_its_sink_blocked() {
        for blocked_side in 0..2 {
            let clock = ReadClock::new();
            let stamp = [&clock.local, &clock.agent][blocked_side];
            stamp.store(5_000, Ordering::Relaxed);
            assert!(!clock.stalled_at(5_000));
            assert!(!clock.stalled_at(5_000 + STALL_AFTER_MS - 1));
            assert!(clock.stalled_at(5_000 + STALL_AFTER_MS));
            // A clock read just after `now` was taken elsewhere is not stalled.
            assert!(!clock.stalled_at(4_000));
            // A stall that goes on keeps its start; the end clears it.
            ReadClock::mark(stamp, true);
            assert_eq!(stamp.load(Ordering::Relaxed), 5_000);
            ReadClock::mark(stamp, false);
            assert!(!clock.stalled_at(u64::MAX - 1));
        }
        // A new stream, and one whose sink takes bytes, holds nothing.
        assert!(!ReadClock::new().stalled_at(u64::MAX - 1));
        // The receive window holds 16 stream windows; new streams move at three-quarters.
        assert_eq!(STALLED_LIMIT, 12);
    }

    fn timeout(addr: &str) -> (SocketAddr, QuicError) {
        let addr: SocketAddr = addr.parse().unwrap();
        let e = QuicError::Timeout {
            host: "vm.example".into(),
            addr,
            after: Duration::from_secs(2),
        };
        (addr, e)
    }

    #[test]
    fn a_lost_race_names_every_address_unless_one_error_settles_it() {
        let never = |_: &QuicError| false;
        let e = race_lost(
            "vm.example",
            9999,
            "vm.example",
            vec![timeout("[2001:db8::1]:9999"), timeout("192.0.2.1:9999")],
            never,
        )
        .to_string();
        assert_eq!(
            e,
            "no QUIC answer from agent vm.example at any of its addresses ([2001:db8::1]:9999: \
             no answer within 2s; 192.0.2.1:9999: no answer within 2s); is `forward agent \
             --quic` running there and UDP port 9999 reachable?"
        );

        // One address: its own error, with its own advice.
        let e = race_lost(
            "vm.example",
            9999,
            "vm.example",
            vec![timeout("192.0.2.1:9999")],
            never,
        );
        assert!(matches!(e, QuicError::Timeout { .. }), "{e}");

        // A fatal error (a wrong pin) ends the race: it alone is the answer.
        let pin = QuicError::PinMismatch {
            got: "sha256:x".into(),
        };
        let e = race_lost(
            "vm.example",
            9999,
            "vm.example",
            vec![
                timeout("[2001:db8::1]:9999"),
                ("192.0.2.1:9999".parse().unwrap(), pin),
            ],
            |e| matches!(e, QuicError::PinMismatch { .. }),
        );
        assert!(matches!(e, QuicError::PinMismatch { .. }), "{e}");

        // Nothing tried at all.
        let e = race_lost("vm.example", 9999, "10.0.0.1", Vec::new(), never).to_string();
        assert!(e.contains("10.0.0.1"), "{e}");
    }
}
