//! `forward agent`: the VM side of the mux carrier.
//!
//! ```text
//!  [::]:9999 (dual-stack) ──accept──► [TLS?] ──HTTP head──┬─ GET /health  → 200 ok (no auth)
//!                                                         └─ Upgrade      → 101 + challenge
//!      ──► Carrier (mux session) ── AUTH proof verified ──► Opened{id, target}
//!      ──► TargetPolicy::dial (loopback by default) ──► accept(id) + relay | reset(id, code)
//! ```
//!
//! Unauthenticated connections are capped (a newcomer over the cap evicts the oldest, see
//! `admission`) and must finish the HTTP head and AUTH within the auth deadline; a failure on
//! one carrier never touches the others.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use forward_mux::{ResetCode, Session, StreamId, Target};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admission::{Admission, Slot};
use crate::auth::{self, AgentNames, Token};
use crate::carrier::Carrier;
use crate::dial::{tune_tcp, TLS_WRITE_AHEAD};
use crate::policy::{DialRefusal, Escaped, TargetPolicy};
use crate::readahead::ReadAhead;
use crate::relay::relay;
use crate::throttle::Throttle;
use crate::upgrade::{self, Head};

/// Everything the agent needs.
#[derive(Clone)]
pub struct AgentConfig {
    /// Where to listen; `[::]:PORT` takes IPv4 too.
    pub listen: SocketAddr,
    /// The shared secret.
    pub token: Token,
    /// Which targets clients may reach.
    pub policy: TargetPolicy,
    /// Own TLS, for use without an edge in front.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Mux limits and windows.
    pub mux: forward_mux::Config,
    /// Deadline for dialling a target.
    pub dial_timeout: Duration,
    /// Deadline for the HTTP head plus AUTH.
    pub auth_timeout: Duration,
    /// Connections allowed to be unauthenticated at once; a newcomer over the cap closes the
    /// oldest of them. A real client waits a round trip between the upgrade's answer and its
    /// AUTH's arrival, looking just like a flood's connection meanwhile, so a flood evicts it
    /// by bringing this many connections within that round trip: 1024 at 100 ms is 10,000 a
    /// second (64 was 640, which a tester reached with 8 threads and locked clients out).
    pub max_unauthenticated: usize,
    /// The names proofs must be made for (empty: any).
    pub names: AgentNames,
    /// Share the port with an agent already listening there (both have `SO_REUSEPORT`), to
    /// take over from it while it drains; without it, a port in use is an error.
    pub handover: bool,
}

impl AgentConfig {
    /// Defaults from the protocol: 10 s dial, 10 s auth, 1024 unauthenticated.
    pub fn new(listen: SocketAddr, token: Token) -> Self {
        Self {
            listen,
            token,
            policy: TargetPolicy::default(),
            tls: None,
            mux: forward_mux::Config::default(),
            dial_timeout: crate::policy::DEFAULT_DIAL_TIMEOUT,
            auth_timeout: Duration::from_secs(10),
            max_unauthenticated: 1024,
            names: AgentNames::default(),
            handover: false,
        }
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The listen address could not be bound.
    #[error("agent cannot listen on {addr}: {cause}{hint}")]
    Bind {
        /// Address asked for.
        addr: SocketAddr,
        /// What the OS said.
        cause: std::io::Error,
        /// What to do.
        hint: &'static str,
    },
}

/// A bound agent, ready to run.
pub struct Agent {
    listener: TcpListener,
    config: Arc<AgentConfig>,
    carriers: Arc<Registry>,
}

/// The authenticated carriers, for the drain on stop.
///
/// A carrier whose client authenticates after the stop (it connected just before) is told to
/// go away as it registers, and the drain waits for its streams too: it would otherwise serve
/// until the process exits and then be cut without a GOAWAY.
#[derive(Default)]
struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    /// Each with the name its client got in the `101` (`upgrade::CARRIER_HEADER`).
    carriers: Vec<(String, Weak<Carrier>)>,
    stopping: bool,
}

const GOING_AWAY: &str = "agent shutting down";

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, RegistryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, id: String, carrier: &Arc<Carrier>) {
        let mut inner = self.lock();
        inner.carriers.retain(|(_, w)| w.strong_count() > 0);
        inner.carriers.push((id, Arc::downgrade(carrier)));
        if inner.stopping {
            carrier.go_away(GOING_AWAY);
        }
    }

    /// Closes the carrier named `id`, which its client gave up (it reconnected naming it);
    /// `false` if there is none (gone already, or never ours). Its streams are reset, so the
    /// VM-side connections close now instead of when the silent carrier times out (a psql
    /// backend holding locks stayed for minutes in a review).
    fn replace(&self, id: &str, by: &Arc<Carrier>) -> bool {
        let old = self
            .lock()
            .carriers
            .iter()
            .find(|(name, _)| name == id)
            .and_then(|(_, w)| w.upgrade());
        match old {
            Some(c) if !Arc::ptr_eq(&c, by) => {
                c.close("replaced: the client lost this carrier and reconnected");
                true
            }
            _ => false,
        }
    }

    /// Marks the agent as stopping and sends GOAWAY on every carrier; returns how many.
    fn stop(&self) -> usize {
        let mut inner = self.lock();
        inner.stopping = true;
        let live: Vec<_> = inner
            .carriers
            .iter()
            .filter_map(|(_, w)| w.upgrade())
            .collect();
        for c in &live {
            c.go_away(GOING_AWAY);
        }
        live.len()
    }

    fn live(&self) -> Vec<Arc<Carrier>> {
        self.lock()
            .carriers
            .iter()
            .filter_map(|(_, w)| w.upgrade())
            .collect()
    }
}

fn dual_stack_socket(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // At Vers the edge arrives over IPv6; IPv4 clients (tests, other setups) work too.
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    Ok(socket)
}

/// Every agent listens with `SO_REUSEPORT`, so that a new one started with `handover` can
/// listen beside it while it drains: a restart then refuses no connection (the old agent
/// stopped listening at its SIGTERM and the new one could bind only once it had exited, up to
/// its 30 s drain later). Without `handover` a port in use must still fail, as it did: the
/// kernel would otherwise share it between two agents started by mistake, perhaps with
/// different tokens. A probe socket without the option finds out (Linux refuses it beside a
/// listener, whatever that one set). A port of 0 gets neither: nobody can take over a port
/// the kernel picks, and with the option set the kernel may pick one that another agent's
/// socket with the option holds (two test agents shared a port, and their QUIC sockets then
/// clashed on it).
fn bind_dual_stack(addr: SocketAddr, handover: bool) -> std::io::Result<TcpListener> {
    let fixed = addr.port() != 0;
    if !handover && fixed {
        dual_stack_socket(addr)?.bind(&addr.into())?;
    }
    let socket = dual_stack_socket(addr)?;
    socket.set_reuse_port(fixed)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

impl Agent {
    /// Binds the listener (inside a tokio runtime).
    pub fn bind(config: AgentConfig) -> Result<Self, AgentError> {
        let listener = bind_dual_stack(config.listen, config.handover).map_err(|cause| AgentError::Bind {
            addr: config.listen,
            hint: match cause.kind() {
                std::io::ErrorKind::AddrInUse if config.handover => {
                    " (the process listening there does not share the port: an agent older than --handover, or another program)"
                }
                std::io::ErrorKind::AddrInUse => {
                    " (another process listens there: pick another --listen port; to replace a running agent without refusing connections, start the new one with --handover, then stop the old one)"
                }
                std::io::ErrorKind::PermissionDenied => " (ports below 1024 need root)",
                std::io::ErrorKind::AddrNotAvailable => {
                    " (no such local address: is that IP configured on this machine? [::] listens on all)"
                }
                _ => "",
            },
            cause,
        })?;
        Ok(Self {
            listener,
            config: Arc::new(config),
            carriers: Arc::default(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop`, then sends GOAWAY on every carrier, waits up to `drain` for their
    /// streams to finish, and closes them.
    pub async fn run(self, stop: CancellationToken, drain: Duration) {
        let admission = Admission::new(self.config.max_unauthenticated);
        loop {
            // Let the connections accepted so far read their requests before the next accept:
            // otherwise, on one thread, a backlog of a flood's connections is accepted in one go
            // and evicts a real client's before its task has looked at the request it sent.
            tokio::task::yield_now().await;
            let (tcp, peer) = tokio::select! {
                _ = stop.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        if let Some(more) = ACCEPT_FAILURES.pass() {
                            let hint = crate::limits::out_of_files_suffix(&e, ": ");
                            tracing::warn!(error = %e, not_logged = more, "accept failed{hint}");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let (slot, evicted) = admission.admit();
            if evicted {
                // One line per interval: a flood would otherwise write one per connection.
                if let Some(more) = EVICTIONS.pass() {
                    tracing::warn!(
                        not_logged = more,
                        "too many unauthenticated connections: closing the oldest waiting ones \
                         (a flood, or a burst of clients)"
                    );
                }
            }
            let config = self.config.clone();
            let carriers = self.carriers.clone();
            // One deadline from accept to AUTH, TLS handshake included.
            let accepted = Instant::now();
            tokio::spawn(
                async move {
                    if let Err(e) = tune_tcp(&tcp) {
                        tracing::debug!(error = %e, "tuning socket");
                    }
                    match config.tls.clone() {
                        Some(tls) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                            let handshake = tokio::time::timeout(
                                config.auth_timeout,
                                acceptor.accept(ReadAhead::new(tcp)),
                            );
                            let Some(done) = slot.unless_evicted(handshake).await else {
                                tracing::debug!(
                                    "evicted by newer connections before finishing TLS"
                                );
                                return;
                            };
                            match done {
                                Ok(Ok(mut s)) => {
                                    s.get_mut().1.set_buffer_limit(Some(TLS_WRITE_AHEAD));
                                    serve_conn(s, peer, accepted, config, carriers, slot).await
                                }
                                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                                Err(_) => tracing::debug!("TLS handshake timed out"),
                            }
                        }
                        None => serve_conn(tcp, peer, accepted, config, carriers, slot).await,
                    }
                }
                .instrument(tracing::info_span!("conn", %peer)),
            );
        }
        // Close the port now, not after the drain: a client that connects meanwhile gets a
        // refusal at once and backs off, instead of waiting in the backlog for an upgrade
        // that never comes.
        drop(self.listener);
        let carriers = self.carriers.stop();
        // "TCP/TLS": a QUIC agent beside this one drains its streams and says so itself.
        tracing::info!(
            carriers,
            ?drain,
            "stopping: GOAWAY sent on the TCP/TLS carriers, draining"
        );
        let deadline = tokio::time::Instant::now() + drain;
        // Listed anew each time: a carrier may still authenticate (see `Registry`).
        while self
            .carriers
            .live()
            .iter()
            .any(|c| c.dead_reason().is_none() && c.stream_count() > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut cut = 0;
        for c in &self.carriers.live() {
            let open = if c.dead_reason().is_none() {
                c.stream_count()
            } else {
                0
            };
            cut += open;
            c.close(if open > 0 {
                "agent shut down: its drain time ran out"
            } else {
                GOING_AWAY
            });
        }
        if cut > 0 {
            tracing::warn!(
                streams = cut,
                ?drain,
                "drain time ran out: open streams of the TCP/TLS carriers were reset"
            );
        } else {
            tracing::info!("drained: every stream of the TCP/TLS carriers had finished");
        }
        // Give the writers a moment to put GOAWAY and close_notify on the wire.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

static EVICTIONS: Throttle = Throttle::new();
static AUTH_FAILURES: Throttle = Throttle::new();
static NAME_REFUSALS: Throttle = Throttle::new();
static STRANGERS: Throttle = Throttle::new();
static ACCEPT_FAILURES: Throttle = Throttle::new();

async fn respond<S: AsyncWrite + Unpin>(s: &mut S, status: &str, body: &str) {
    respond_raw(s, &upgrade::simple(status, body)).await;
}

async fn respond_raw<S: AsyncWrite + Unpin>(s: &mut S, response: &str) {
    if s.write_all(response.as_bytes()).await.is_ok() {
        let _ = s.shutdown().await;
    }
}

/// Tells an evicted client that the agent is busy (`503`). What it already sent is read first:
/// closing a socket with unread bytes sends a reset, which can destroy the answer before the
/// client reads it. Nothing more is waited for: a flood of silent connections is what evicts.
async fn respond_busy<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    discard_unread(s).await;
    respond(s, "503 Service Unavailable", upgrade::BUSY_BODY).await;
}

/// Reads and drops what the client already sent, waiting for nothing more (see
/// [`respond_busy`] for why).
async fn discard_unread<S: AsyncRead + Unpin>(s: &mut S) {
    let mut sink = [0u8; 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::ZERO, s.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
}

/// `405` for `/health` asked with another method: the path exists, so "not found" sent a
/// probe's author looking for a typo instead of at the method.
fn health_method_not_allowed() -> String {
    upgrade::simple(
        "405 Method Not Allowed",
        "forward agent: /health answers GET and HEAD only\n",
    )
    .replacen("\r\n", "\r\nAllow: GET, HEAD\r\n", 1)
}

async fn serve_conn<S>(
    mut s: S,
    peer: SocketAddr,
    started: Instant,
    config: Arc<AgentConfig>,
    carriers: Arc<Registry>,
    slot: Slot,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let left = config.auth_timeout.saturating_sub(started.elapsed());
    let read = tokio::time::timeout(left, upgrade::read_head(&mut s));
    let Some(read) = slot.unless_evicted(read).await else {
        tracing::debug!("evicted by newer connections before sending a request");
        // Said, not just done: a client retries a busy agent, but takes a silent hang-up for
        // an agent that is not there (an edge in front hangs up when nothing listens).
        respond_busy(&mut s).await;
        return;
    };
    let (head, leftover) = match read {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "not a valid HTTP request; closing");
            respond(&mut s, "400 Bad Request", "bad request\n").await;
            return;
        }
        Err(_) => {
            tracing::debug!("no request within the auth deadline; closing");
            return;
        }
    };
    let Some(head) = Head::parse(&head) else {
        tracing::debug!("not an HTTP request; closing");
        respond(&mut s, "400 Bad Request", "bad request\n").await;
        return;
    };
    // A probe's cache-buster or tag (`/health?from=lb`) asks the same question.
    let path = match head.second.split_once('?') {
        Some(("/health", _)) => "/health",
        _ => head.second.as_str(),
    };
    match (head.first.as_str(), path) {
        ("GET", "/health") => {
            respond(&mut s, "200 OK", "ok\n").await;
            return;
        }
        // Load balancers and `curl -I` probe with HEAD: the same answer without its body.
        ("HEAD", "/health") => {
            let full = upgrade::simple("200 OK", "ok\n");
            respond_raw(&mut s, full.trim_end_matches("ok\n")).await;
            return;
        }
        (_, "/health") => {
            // A POST's body may still be unread; closing over it would reset the connection
            // and could destroy the answer.
            discard_unread(&mut s).await;
            respond_raw(&mut s, &health_method_not_allowed()).await;
            return;
        }
        ("GET", upgrade::TUNNEL_PATH) if head.is_upgrade() => {}
        _ => {
            respond(
                &mut s,
                "404 Not Found",
                "forward agent: only /health and the tunnel upgrade live here\n",
            )
            .await;
            return;
        }
    }
    slot.upgraded();
    let Some((host, port)) = head.single_host() else {
        tracing::debug!("upgrade without exactly one well-formed Host header; closing");
        respond(
            &mut s,
            "400 Bad Request",
            "bad request: one Host header required\n",
        )
        .await;
        return;
    };
    let challenge = auth::challenge();
    let carrier_id = auth::to_hex(&auth::challenge()[..upgrade::CARRIER_ID_LEN / 2]);
    let replaces = head
        .header(upgrade::REPLACES_HEADER)
        .filter(|v| upgrade::is_carrier_id(v))
        .map(str::to_owned);
    let switching = upgrade::switching(&auth::to_hex(&challenge), &carrier_id);
    // With --tls-cert the answer may still sit in rustls until a flush, and the client waits
    // for it before it sends anything the carrier's writer would flush with.
    let answered = async {
        s.write_all(switching.as_bytes()).await?;
        s.flush().await
    };
    if let Err(e) = answered.await {
        tracing::debug!(error = %e, "client left during the upgrade");
        return;
    }
    let mut mux = config.mux.clone();
    // The HTTP part already used some of the deadline.
    mux.auth_timeout = config.auth_timeout.saturating_sub(started.elapsed());
    let session = Session::server(mux, Instant::now());
    let (carrier, opened) = Carrier::start(s, session, leftover, peer.to_string());
    let Some(mut opened) = opened else { return };
    let proof = match slot.unless_evicted(carrier.wait_auth_request()).await {
        Some(Ok(p)) => p,
        Some(Err(reason)) => {
            // Anyone can do this, so it is logged like a failed authentication: one line per
            // 10 s, with a count of the rest.
            if let Some(more) = STRANGERS.pass() {
                tracing::warn!(%peer, not_logged = more, "carrier closed before authenticating: {reason}");
            } else {
                tracing::debug!(%reason, "carrier closed before authenticating");
            }
            return;
        }
        None => {
            tracing::debug!("evicted by newer connections before authenticating");
            carrier.close("evicted: too many unauthenticated connections");
            return;
        }
    };
    if !slot.settle() {
        tracing::debug!("evicted by newer connections while authenticating");
        carrier.close("evicted: too many unauthenticated connections");
        return;
    }
    let named = config.names.admits(&host);
    let ok = named && config.token.verify(&challenge, &host, port, &proof);
    carrier.decide_auth(ok);
    if !ok {
        // One uniform reply on the wire; the detail stays in our log.
        // Separate counts: a flood of wrong tokens must not hide the proofs made for another
        // name, the sign of one relayed from elsewhere.
        let throttle = if named {
            &AUTH_FAILURES
        } else {
            &NAME_REFUSALS
        };
        let host = Escaped(&host);
        if let Some(more) = throttle.pass() {
            if named {
                tracing::warn!(
                    %host,
                    port,
                    not_logged = more,
                    "authentication failed (wrong token, or a replayed proof)"
                );
            } else {
                tracing::warn!(
                    %host,
                    names = %config.names.list(),
                    not_logged = more,
                    "authentication refused: the client dialled a name not in --name \
                     (a client pointed elsewhere, or a relayed proof)"
                );
            }
        }
        return;
    }
    tracing::info!(host = %Escaped(&host), port, "carrier authenticated");
    carriers.register(carrier_id, &carrier);
    // Only now, authenticated: a stranger who saw a name (plain TCP) cannot use it.
    if let Some(old) = replaces {
        if carriers.replace(&old, &carrier) {
            tracing::info!(
                "closed the carrier this client lost before reconnecting; its streams were reset"
            );
        }
    }
    loop {
        let (id, target) = tokio::select! {
            reason = carrier.closed() => {
                // The streams it cut are VM-side connections reset: worth saying (an idle
                // timeout read as if nothing was lost).
                match carrier.streams_cut() {
                    0 => tracing::info!(%reason, "carrier ended"),
                    cut => tracing::info!(%reason, cut, "carrier ended; its {cut} open stream(s) were reset"),
                }
                return;
            }
            next = opened.recv() => match next {
                Some(x) => x,
                None => return,
            },
        };
        let carrier = carrier.clone();
        let config = config.clone();
        // Inside the connection's span too: the stream span is debug, so at the default level
        // it is off, and a spawned task does not inherit the span it was spawned from; a
        // `refusing stream` line then did not say which client asked.
        tokio::spawn(
            open_stream(carrier, id, target, config)
                .instrument(tracing::debug_span!("stream", id))
                .in_current_span(),
        );
    }
}

async fn open_stream(
    carrier: Arc<Carrier>,
    id: StreamId,
    target: Target,
    config: Arc<AgentConfig>,
) {
    let dial = config
        .policy
        .dial(&target.host, target.port, config.dial_timeout);
    // A dial outlives nothing it was for: when the client resets the stream or the carrier
    // ends, it stops, so the target never sees a connection opened only to be closed.
    let dialled = tokio::select! {
        d = dial => d,
        _ = carrier.abandoned(id) => {
            carrier.reset(id, ResetCode::Cancel);
            tracing::debug!("stream reset by the client while dialling: dial abandoned");
            return;
        }
    };
    let tcp = match dialled {
        Ok(t) => t,
        Err(refusal) => {
            let code = match &refusal {
                DialRefusal::NotAllowed(_) => ResetCode::NotAllowed,
                DialRefusal::Refused(_) => ResetCode::Refused,
                DialRefusal::Timeout(_) => ResetCode::DialTimeout,
                DialRefusal::Unreachable(..) => ResetCode::Unreachable,
            };
            crate::policy::log_refusal(&refusal);
            carrier.reset(id, code);
            return;
        }
    };
    let stream = match carrier.accept(id) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "stream gone before accept");
            return;
        }
    };
    match relay(stream, tcp).await {
        Ok(stats) => tracing::debug!(up = stats.a_to_b, down = stats.b_to_a, "stream done"),
        Err(e) => tracing::debug!("stream failed: {}", e.describe("carrier", "target")),
    }
}
