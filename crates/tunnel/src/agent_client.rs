//! The client side of the mux carrier: one [`AgentLink`] per agent (VM host and port), shared by
//! every forward to that VM, and an [`AgentConnector`] per forward.
//!
//! ```text
//!  local conn ─► AgentConnector::connect ─► AgentLink::carrier() ─► Carrier::open (0 RTT)
//!                                              │ none / dead: TCP [+TLS] ─► HTTP upgrade
//!                                              │              ─► AUTH(HMAC) queued before opens
//!                                              └ watcher: on loss, reconnect with jittered
//!                                                exponential backoff (streams of the lost
//!                                                carrier are reset, never cleanly closed)
//! ```

use std::io;
use std::sync::{Arc, Weak};
use std::time::Duration;

use forward_mux::{CloseReason, Session, StreamError, Target};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::auth::{self, Token};
use crate::carrier::{Carrier, MuxStream, Reopen, Reopening};
use crate::dial::{connect_tcp, tls_handshake, Connector, DialError};
use crate::policy::Shown;
use crate::upgrade::{self, Head};

/// How the carrier reaches the agent.
#[derive(Clone)]
pub enum CarrierTransport {
    /// TLS (to the edge, or to an agent with its own certificate), verified as always.
    Tls(Arc<rustls::ClientConfig>),
    /// Plain TCP straight to the agent (a trusted network, or benchmarks).
    Tcp,
}

impl CarrierTransport {
    fn name(&self) -> &'static str {
        match self {
            CarrierTransport::Tls(_) => "tls",
            CarrierTransport::Tcp => "tcp",
        }
    }
}

/// Settings of one link.
#[derive(Clone)]
pub struct LinkConfig {
    /// The agent's host name (TLS name, HMAC input).
    pub host: String,
    /// The agent's port.
    pub port: u16,
    /// Connect here instead of resolving `host` (`--edge`).
    pub edge: Option<String>,
    /// TLS or TCP.
    pub transport: CarrierTransport,
    /// Shared secret.
    pub token: Token,
    /// Mux limits and windows.
    pub mux: forward_mux::Config,
    /// Deadline for TCP, TLS and the upgrade.
    pub timeout: Duration,
}

struct LinkState {
    current: Option<Arc<Carrier>>,
    /// More carriers to the same agent, opened when the current one is at its stream cap
    /// (1024): a forward with 10,000 open connections spreads over ten carriers.
    overflow: Vec<Arc<Carrier>>,
    failures: u32,
    last_attempt: Option<Instant>,
    last_error: Option<String>,
    /// The agent's name for `current` (`upgrade::CARRIER_HEADER`; older agents send none).
    current_id: Option<String>,
    /// The name of the carrier this link last lost: the next carrier's upgrade names it, so
    /// the agent closes it and its VM-side connections at once.
    lost_id: Option<String>,
}

impl LinkState {
    /// Forgets `c` if it is the current carrier, and says whether it was. One that never
    /// authenticated (wrong token, or cut during AUTH) counts as a failed attempt: otherwise a
    /// wrong token reconnected five times a second forever, and every local connection
    /// dialled again at once.
    fn retire(&mut self, c: &Arc<Carrier>) -> bool {
        if !self.current.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, c)) {
            return false;
        }
        self.current = None;
        let id = self.current_id.take();
        // A draining carrier (the agent's GOAWAY) still takes its streams to their end: named
        // in the next upgrade, it would be closed by the agent and its streams reset.
        if !c.is_draining() {
            self.lost_id = id;
        }
        if !c.is_authenticated() {
            self.failures = self.failures.saturating_add(1);
            self.last_attempt = Some(Instant::now());
            self.last_error = Some(
                c.dead_reason()
                    .unwrap_or_else(|| "carrier closed before authenticating".into()),
            );
        }
        true
    }
}

/// One agent, one carrier at a time, re-established when lost.
pub struct AgentLink {
    config: LinkConfig,
    state: tokio::sync::Mutex<LinkState>,
    /// See [`AgentLink::serve_one_connection`].
    one_connection: std::sync::atomic::AtomicBool,
    /// Cancelled by `close`: a connect in progress gives up, and carriers that end now are not
    /// lost, and nothing reconnects.
    closing: tokio_util::sync::CancellationToken,
}

/// How long a closing client waits for bytes its streams queued (uploads whose `FIN` is
/// queued but not sent) before it closes its carriers anyway.
pub const CLOSE_FLUSH: Duration = Duration::from_secs(3);
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A carrier that stayed up this long resets the reconnect backoff when it ends.
const STABLE_CARRIER: Duration = Duration::from_secs(10);
/// A user's connection may trigger an attempt this soon after the previous one, backoff or not.
const USER_RETRY: Duration = Duration::from_secs(1);
/// A live peer is heard from at least every keepalive interval (its PING, or the answer to
/// ours); this much longer (a slow round trip) and a carrier is pinged before it gets a new
/// stream.
const SILENCE_MARGIN: Duration = Duration::from_secs(2);

/// A new carrier and the agent's name for it, if it gave one.
type Established = (Arc<Carrier>, Option<String>);

/// How one attempt at a carrier ended, when not with an authenticated one.
enum Attempt {
    /// The agent dropped it before authentication (over its limit): worth another try.
    Dropped(DialError),
    /// Anything else: report it.
    Failed(DialError),
}

impl From<DialError> for Attempt {
    fn from(e: DialError) -> Self {
        Attempt::Failed(e)
    }
}

/// First pause before another try at a carrier the agent dropped before authentication.
pub(crate) const DROPPED_RETRY_BASE: Duration = Duration::from_millis(50);

fn jittered(failures: u32) -> Duration {
    jittered_from(BACKOFF_BASE, failures)
}

pub(crate) fn jittered_from(base: Duration, failures: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << failures.min(8))
        .min(BACKOFF_MAX);
    let mut r = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut r);
    // 50% to 150% of the exponential step, so many clients do not reconnect in lockstep.
    let f = 0.5 + f64::from(u16::from_le_bytes(r)) / f64::from(u16::MAX);
    exp.mul_f64(f)
}

impl AgentLink {
    /// A link; nothing is dialled until first use.
    pub fn new(config: LinkConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            state: tokio::sync::Mutex::new(LinkState {
                current: None,
                overflow: Vec::new(),
                failures: 0,
                last_attempt: None,
                last_error: None,
                current_id: None,
                lost_id: None,
            }),
            one_connection: std::sync::atomic::AtomicBool::new(false),
            closing: tokio_util::sync::CancellationToken::new(),
        })
    }

    /// The link serves one connection and ends with it (`forward stdio`): a lost carrier is
    /// that connection's error, which its caller reports once; nothing reconnects, and the
    /// loss is not announced a second time as "reconnecting".
    pub fn serve_one_connection(&self) {
        self.one_connection
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// `host:port (agent tls)`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "agent {}:{} ({})",
            self.config.host,
            self.config.port,
            self.config.transport.name()
        )
    }

    /// A usable carrier: the current one, or a new one. Within a second of the end of a failed
    /// attempt a user's connection gets that failure instead of another attempt.
    pub async fn carrier(self: &Arc<Self>) -> Result<Arc<Carrier>, DialError> {
        self.carrier_or_attempt(false).await
    }

    /// `forced`: the reconnect watcher, which paces its attempts by its own backoff; the
    /// one-second guard would make it count (and log) an attempt it never made.
    async fn carrier_or_attempt(self: &Arc<Self>, forced: bool) -> Result<Arc<Carrier>, DialError> {
        let mut st = self.state.lock().await;
        if let Some(c) = st.current.clone() {
            if c.is_usable() {
                return Ok(c);
            }
            st.retire(&c);
            if c.is_draining() {
                // Its streams finish there; then nobody needs it (the agent closes one it
                // drains itself, not one that used up its stream ids).
                tokio::spawn(close_when_drained(c, "drained"));
            }
        }
        if let (Some(at), Some(err), false) = (st.last_attempt, &st.last_error, forced) {
            if at.elapsed() < USER_RETRY {
                return Err(DialError::Agent(format!(
                    "{}: the last attempt failed moments ago: {err}",
                    self.describe()
                )));
            }
        }
        st.last_attempt = Some(Instant::now());
        let replaces = st.lost_id.clone();
        match self.establish(replaces.as_deref()).await {
            Ok((c, id)) => {
                // `failures` is reset by the watcher once a carrier has lasted (STABLE_CARRIER).
                st.last_error = None;
                st.current = Some(c.clone());
                st.current_id = id;
                st.lost_id = None;
                tokio::spawn(watch(Arc::downgrade(self), c.clone()));
                Ok(c)
            }
            Err(e) => {
                st.failures = st.failures.saturating_add(1);
                // Dated from its end: connections that queued behind this attempt (up to a
                // connect timeout) get its failure instead of each making one more (a second
                // connection during an outage waited three timeouts).
                st.last_attempt = Some(Instant::now());
                st.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Closes every carrier of the link cleanly (GOAWAY, what streams still queue, then the end
    /// of the byte stream; a TLS carrier sends close_notify), so the agent sees a client leave
    /// rather than a reset and gets every upload whole. Waits at most [`CLOSE_FLUSH`] for the
    /// queued bytes, then briefly for the writers to put the end on the wire.
    pub async fn close(&self, reason: &str) {
        self.closing.cancel();
        let carriers: Vec<Arc<Carrier>> = {
            let st = self.state.lock().await;
            st.current.iter().chain(&st.overflow).cloned().collect()
        };
        let deadline = tokio::time::Instant::now() + CLOSE_FLUSH;
        for c in &carriers {
            c.close_flushed(reason, deadline).await;
        }
        if !carriers.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A usable carrier with room for one more stream: the current one, or an overflow carrier
    /// (reused while it has room, dropped from the list once dead).
    pub async fn carrier_with_room(self: &Arc<Self>) -> Result<Arc<Carrier>, DialError> {
        let primary = self.carrier().await?;
        let Some(full) = primary.full() else {
            return Ok(primary);
        };
        let mut st = self.state.lock().await;
        st.overflow.retain(|c| c.is_usable());
        if let Some(c) = st.overflow.iter().find(|c| c.has_room()) {
            return Ok(c.clone());
        }
        let (c, _) = self.establish(None).await?;
        tracing::debug!(link = %self.describe(), carriers = st.overflow.len() + 2, primary = full, "opened an overflow carrier");
        st.overflow.push(c.clone());
        tokio::spawn(reap_overflow(Arc::downgrade(self), c.clone()));
        Ok(c)
    }

    /// How many carriers the link holds now: the current one (if any) and the overflow ones.
    pub async fn carrier_count(&self) -> usize {
        let st = self.state.lock().await;
        usize::from(st.current.is_some()) + st.overflow.len()
    }

    /// A new authenticated carrier. The agent holds at most 64 connections that have not
    /// authenticated yet and drops the oldest beyond that (DESIGN.md), so a burst of clients
    /// (100 `forward stdio` ProxyCommands at once) loses some carriers before their AUTH_OK.
    /// Such a loss (a `503` before the upgrade, the carrier closed after it) is retried, with
    /// jittered pauses, until the connect timeout; a refused connection or token, or a hang-up
    /// without a word (nothing listening behind the edge), is not. Streams go only on an
    /// authenticated carrier, which is what makes the retry safe: nothing of theirs was sent
    /// yet. The price is one round trip on the first connection of a carrier; later ones still
    /// cost none.
    async fn establish(&self, replaces: Option<&str>) -> Result<Established, DialError> {
        // `close` must not wait behind a connect to a gone agent, which holds the link's lock
        // for up to a timeout per stage (Ctrl-C during an outage).
        tokio::select! {
            r = self.establish_until_closed(replaces) => r,
            _ = self.closing.cancelled() => Err(DialError::Agent(format!(
                "{}: the client is closing",
                self.describe()
            ))),
        }
    }

    async fn establish_until_closed(
        &self,
        replaces: Option<&str>,
    ) -> Result<Established, DialError> {
        let deadline = Instant::now() + self.config.timeout;
        let mut attempt = 0u32;
        loop {
            match self.establish_once(replaces).await {
                Ok(c) => return Ok(c),
                Err(Attempt::Dropped(e)) => {
                    let pause = jittered_from(DROPPED_RETRY_BASE, attempt);
                    if Instant::now() + pause >= deadline {
                        return Err(e);
                    }
                    tracing::debug!(link = %self.describe(), error = %e, ?pause, "agent dropped the carrier before authentication; retrying");
                    attempt += 1;
                    tokio::time::sleep(pause).await;
                }
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
    }

    async fn establish_once(&self, replaces: Option<&str>) -> Result<Established, Attempt> {
        let c = &self.config;
        let tcp = connect_tcp(&c.host, c.edge.as_deref(), c.port, c.timeout).await?;
        let label = format!("{}:{}", c.host, c.port);
        let (carrier, id) = match &c.transport {
            CarrierTransport::Tcp => self.upgrade(tcp, label, replaces).await?,
            CarrierTransport::Tls(tls) => {
                let name = ServerName::try_from(c.host.clone())
                    .map_err(|_| DialError::BadName(c.host.clone()))?;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                let stream = tls_handshake(&connector, name, &c.host, tcp, c.timeout).await?;
                self.upgrade(stream, label, replaces).await?
            }
        };
        let who = self.describe();
        // The agent gets the whole timeout for its answer, whatever the connect took: a slow
        // connect (a dead address tried first) once left this wait nothing, and a carrier that
        // had reached a healthy agent was given up as "no answer to AUTH". The connect timeout
        // bounds the retries of dropped carriers (`establish`), not this one attempt.
        match tokio::time::timeout(c.timeout, carrier.wait_authed()).await {
            Ok(Ok(())) => {
                tracing::info!(link = %who, "carrier up");
                Ok((carrier, id))
            }
            Ok(Err(reason)) if reason == CloseReason::AuthRejected.to_string() => {
                Err(Attempt::Failed(DialError::Agent(format!("{who}: {reason}"))))
            }
            // One side took what the other sent for a breach of the protocol: trying again
            // sends the same. Most likely the two ends are different versions.
            Ok(Err(reason)) if carrier.broke_protocol() => {
                Err(Attempt::Failed(DialError::Agent(format!(
                    "{who}: the carrier broke down before authentication ({reason}); are the client and the agent the same version of forward?"
                ))))
            }
            Ok(Err(reason)) => Err(Attempt::Dropped(DialError::Agent(format!(
                "{who}: the agent closed the carrier before authentication ({reason}); it may be overloaded"
            )))),
            Err(_) => {
                // Given up on: its tasks and socket must not live on until its idle timeout.
                carrier.close("no answer to AUTH");
                Err(Attempt::Failed(DialError::Agent(format!(
                    "{who}: no answer to AUTH within {:?}",
                    self.config.timeout
                ))))
            }
        }
    }

    async fn upgrade<S>(
        &self,
        mut s: S,
        label: String,
        replaces: Option<&str>,
    ) -> Result<Established, Attempt>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let c = &self.config;
        let who = self.describe();
        let exchange = async {
            s.write_all(upgrade::request_replacing(&c.host, c.port, replaces).as_bytes())
                .await?;
            // Over TLS the request may still sit in rustls (it buffers like a `BufWriter`).
            s.flush().await?;
            upgrade::read_head(&mut s).await
        };
        let (head, leftover) = match tokio::time::timeout(c.timeout, exchange).await {
            Ok(Ok(x)) => x,
            // A hang-up without an answer: nothing listens behind the edge (it accepts, then
            // cannot reach the port), or the agent died. Not retried: an agent over its limit of
            // waiting connections says so (`503`), and a user should not wait out the connect
            // timeout for a port with nothing behind it (a client waited 6-12 s here).
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
                ) =>
            {
                return Err(Attempt::Failed(DialError::Agent(format!(
                    "{who}: the connection was closed before the agent answered ({e}); is `forward agent` running on port {} of the VM? An edge in front hangs up when nothing listens there",
                    c.port
                ))))
            }
            Ok(Err(e)) if upgrade::answered_with_tls_alert(&e) => {
                return Err(Attempt::Failed(DialError::Agent(format!(
                    "{who}: upgrade failed: {e}: port {} speaks TLS (an edge, or an agent with --tls-cert): use --transport tls",
                    c.port
                ))))
            }
            Ok(Err(e)) => {
                return Err(Attempt::Failed(DialError::Agent(format!(
                    "{who}: upgrade failed: {e} (is `forward agent` listening on port {}?)",
                    c.port
                ))))
            }
            Err(_) => {
                return Err(Attempt::Failed(DialError::Agent(format!(
                    "{who}: no answer to the upgrade within {:?}",
                    c.timeout
                ))))
            }
        };
        let parsed = Head::parse(&head);
        if parsed.as_ref().is_some_and(|h| h.second == "503") {
            return Err(Attempt::Dropped(DialError::Agent(format!(
                "{who}: the agent is busy (too many connections waiting to authenticate)"
            ))));
        }
        let challenge = parsed
            .as_ref()
            .filter(|h| h.second == "101" && h.is_upgrade())
            .and_then(|h| h.header(upgrade::CHALLENGE_HEADER))
            .and_then(auth::from_hex)
            .filter(|ch| ch.len() == auth::CHALLENGE_LEN);
        let Some(challenge) = challenge else {
            let first = head.lines().next().unwrap_or("").to_owned();
            return Err(Attempt::Failed(DialError::Agent(format!(
                "{who}: answered '{first}' instead of the forward-mux upgrade; is `forward agent` listening on port {}?",
                c.port
            ))));
        };
        let id = parsed
            .as_ref()
            .and_then(|h| h.header(upgrade::CARRIER_HEADER))
            .filter(|v| upgrade::is_carrier_id(v))
            .map(str::to_owned);
        let proof = c.token.prove(&challenge, &c.host, c.port);
        let session = Session::client(c.mux.clone(), std::time::Instant::now());
        let (carrier, _) = Carrier::start(s, session, leftover, label);
        if let Err(e) = carrier.send_auth(&proof) {
            // Closed by what came with the 101 (a GOAWAY): waiting for AUTH_OK says why.
            if carrier.dead_reason().is_none() {
                return Err(Attempt::Failed(DialError::Agent(format!("{who}: {e}"))));
            }
        }
        Ok((carrier, id))
    }
}

/// Keeps the link warm: when its carrier dies, reconnect with backoff until it works again or
/// the link is dropped.
///
/// Boxed with an explicit `Send` so the compiler need not see through the recursion
/// `carrier()` → `watch()` → `carrier()`.
fn watch(
    link: Weak<AgentLink>,
    carrier: Arc<Carrier>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(watch_inner(link, carrier))
}

/// An overflow carrier that carried no stream for this long is closed, as QUIC's overflow
/// connections are: after a burst past 1024 connections, the extra carriers would otherwise
/// stay (and keep pinging) for the life of the process.
const OVERFLOW_IDLE: Duration = Duration::from_secs(10);

/// Closes `c` once it has been idle for [`OVERFLOW_IDLE`], and forgets it once it is dead.
async fn reap_overflow(link: Weak<AgentLink>, c: Arc<Carrier>) {
    let mut idle_looks = 0;
    let idle = loop {
        tokio::select! {
            _ = c.closed() => break false,
            _ = tokio::time::sleep(OVERFLOW_IDLE / 2) => {}
        }
        idle_looks = if c.stream_count() == 0 {
            idle_looks + 1
        } else {
            0
        };
        if idle_looks >= 2 {
            break true;
        }
    };
    // Out of the list first, so no new connection picks it while it closes.
    let Some(l) = link.upgrade() else { return };
    l.state
        .lock()
        .await
        .overflow
        .retain(|x| !Arc::ptr_eq(x, &c));
    drop(l);
    if !idle {
        return;
    }
    // A connection that took this carrier just before may still open on it: GOAWAY makes
    // that open fail over to another carrier, and one that got in first drains.
    c.go_away("idle overflow carrier");
    close_when_drained(c, "idle overflow carrier").await;
}

/// Closes `c`, which takes no new streams, once its last stream ended.
async fn close_when_drained(c: Arc<Carrier>, reason: &'static str) {
    while c.stream_count() > 0 && c.is_alive() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.close(reason);
    tracing::debug!(carrier = %c.label(), "closed a drained carrier ({reason})");
}

async fn watch_inner(link: Weak<AgentLink>, carrier: Arc<Carrier>) {
    let authed = carrier.wait_authed().await.is_ok();
    let up_since = Instant::now();
    let reason = carrier.closed().await;
    let Some(l) = link.upgrade() else { return };
    let (mut failures, current, other_in_use, closing) = {
        let mut st = l.state.lock().await;
        let current = st.retire(&carrier);
        // The backoff starts over only after a carrier that lasted: an agent that accepts the
        // proof and then drops every carrier (a crash loop, an incompatible build) was
        // redialled four times a second for ever, each time with a "carrier up" line.
        if current && authed {
            st.failures = if up_since.elapsed() >= STABLE_CARRIER {
                0
            } else {
                st.failures.saturating_add(1)
            };
        }
        // Only one that works: after a drain the current one may be a failed attempt.
        let other_in_use = st.current.as_ref().is_some_and(|c| c.is_usable());
        (st.failures, current, other_in_use, l.closing.is_cancelled())
    };
    if l.one_connection.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::debug!(link = %l.describe(), %reason, "carrier ended");
        return;
    }
    // Only the loss of the current carrier leads to a reconnect; an older one (drained after
    // a GOAWAY, an overflow carrier) or one we closed on exit just ends.
    let next = if closing {
        ""
    } else if current {
        ", reconnecting"
    } else if other_in_use {
        " (another carrier is in use)"
    } else {
        // Not the current one, so nothing reconnects now: the next connection dials.
        ""
    };
    match carrier.streams_cut() {
        // A drained or idle carrier going away loses nothing: not worth a warning.
        0 if closing => tracing::debug!(link = %l.describe(), %reason, "carrier closed"),
        0 => tracing::info!(link = %l.describe(), %reason, "carrier closed{next}"),
        cut => tracing::warn!(
            link = %l.describe(),
            %reason,
            cut,
            "carrier lost; its open connections were reset{next}"
        ),
    }
    if closing || !current {
        return;
    }
    drop(carrier);
    drop(l);
    // Counted apart from `failures`, which may already hold a carrier lost right after it came
    // up: the log numbers this outage's attempts.
    let mut attempts = crate::throttle::Attempts::default();
    loop {
        tokio::time::sleep(jittered(failures)).await;
        let Some(l) = link.upgrade() else { return };
        if l.closing.is_cancelled() {
            return;
        }
        {
            let st = l.state.lock().await;
            if st.current.as_ref().is_some_and(|c| c.is_usable()) {
                return;
            }
        }
        match l.carrier_or_attempt(true).await {
            Ok(_) => return,
            Err(e) => {
                failures = failures.saturating_add(1);
                let next = attempts.failed(&e.to_string());
                let attempt = attempts.count();
                match next {
                    Some(next) => tracing::warn!(
                        link = %l.describe(),
                        "reconnect failed (attempt {attempt}; retrying with backoff, logged again at attempt {next} or when the reason changes): {e}"
                    ),
                    None => {
                        tracing::debug!(link = %l.describe(), "reconnect failed (attempt {attempt}): {e}")
                    }
                }
            }
        }
    }
}

/// One forward through an agent link.
pub struct AgentConnector {
    link: Arc<AgentLink>,
    target: Target,
    shown: String,
    /// How a stream the agent refused unprocessed is opened again (see `carrier::retry`).
    reopen: Reopen,
}

impl AgentConnector {
    /// `target` is what the agent dials on the VM; an empty host means its loopback.
    pub fn new(link: Arc<AgentLink>, target: Target) -> Self {
        let shown = format!(
            "{} {} (agent {})",
            link.config.host,
            Shown(&target.host, target.port),
            link.config.transport.name()
        );
        let reopen: Reopen = {
            let (link, target) = (link.clone(), target.clone());
            Arc::new(move || -> Reopening {
                let (link, target) = (link.clone(), target.clone());
                Box::pin(async move {
                    open_stream(&link, &target)
                        .await
                        .map_err(|e| io::Error::new(io::ErrorKind::ConnectionReset, e.to_string()))
                })
            })
        };
        Self {
            link,
            target,
            shown,
            reopen,
        }
    }
}

/// A new stream to `target` on a carrier of `link` with room for it.
async fn open_stream(link: &Arc<AgentLink>, target: &Target) -> Result<MuxStream, DialError> {
    // A carrier may be found dead, draining or full between the check and the open: retry
    // on another one, a bounded number of times.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let carrier = link.carrier_with_room().await?;
        // A carrier silent for longer than a keepalive round is pinged first: if the path
        // died, this connection moves to a new carrier after `--connect-timeout` instead
        // of waiting out the idle timeout on the dead one.
        let silence = link.config.mux.keepalive_interval + SILENCE_MARGIN;
        if let Err(reason) = carrier.confirm_alive(silence, link.config.timeout).await {
            if attempt < 3 {
                continue;
            }
            return Err(DialError::Agent(format!("{}: {reason}", link.describe())));
        }
        match carrier.open(target.clone()) {
            Ok(s) => {
                carrier.expect_answer(link.config.timeout);
                return Ok(s);
            }
            Err(
                StreamError::GoingAway | StreamError::SessionClosed | StreamError::StreamLimit(_),
            ) if attempt < 3 => continue,
            Err(e) => {
                return Err(DialError::Agent(format!(
                    "{}: cannot open a stream: {e}",
                    link.describe()
                )))
            }
        }
    }
}

impl Connector for AgentConnector {
    type Stream = MuxStream;

    async fn connect(&self) -> Result<MuxStream, DialError> {
        let s = open_stream(&self.link, &self.target).await?;
        Ok(s.with_retry(self.reopen.clone()))
    }

    /// The carrier, the token, and then the target: a stream is opened and the agent must
    /// reach the target (`OPEN_OK`), so a port with nothing behind it or one outside `--allow`
    /// fails the check with the agent's reason. The target sees one connection that closes.
    async fn check(&self) -> Result<(), DialError> {
        // The link hands out authenticated carriers only (`establish`): connecting is the
        // check of the token.
        let timeout = self.link.config.timeout;
        let mut stream = self.connect().await?;
        let reached = tokio::time::timeout(timeout, stream.opened()).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
        match reached {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(DialError::Agent(e.to_string())),
            Err(_) => Err(DialError::Agent(format!(
                "the agent did not report reaching the target within {timeout:?}"
            ))),
        }
    }

    fn describe(&self) -> String {
        self.shown.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(c: &Arc<Carrier>) -> LinkState {
        LinkState {
            current: Some(c.clone()),
            overflow: Vec::new(),
            failures: 0,
            last_attempt: None,
            last_error: None,
            current_id: Some("c1".into()),
            lost_id: None,
        }
    }

    /// The next carrier's upgrade names the one the link lost, so the agent closes it; never
    /// one that is only draining, whose streams are still running.
    #[tokio::test]
    async fn only_a_lost_carrier_is_named_for_replacement() {
        let (io, _peer) = tokio::io::duplex(64 * 1024);
        let session =
            forward_mux::Session::client(forward_mux::Config::default(), std::time::Instant::now());
        let (c, _) = Carrier::start(io, session, Vec::new(), "test".into());
        let mut st = state(&c);
        c.go_away("draining");
        assert!(c.is_draining());
        assert!(st.retire(&c));
        assert_eq!(st.lost_id, None, "a draining carrier was named");

        let mut st = state(&c);
        c.close("lost");
        assert!(!c.is_draining());
        assert!(st.retire(&c));
        assert_eq!(st.lost_id.as_deref(), Some("c1"));
    }
}
