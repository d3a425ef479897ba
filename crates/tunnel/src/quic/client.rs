//! The client side: one QUIC connection per agent ([`QuicCarrier`]), connected lazily,
//! authenticated on its first stream, re-established with backoff when lost, and shared by the
//! [`QuicConnector`]s of every forward to that agent.

use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::time::Instant;

use super::agent::udp_socket;
use super::cert::PinVerifier;
use super::{
    close, encode_target, proof_host, transport, QuicError, QuicStream, SpkiPin, ALPN, AUTH_HELLO,
};
use crate::auth::{Token, CHALLENGE_LEN};
use crate::dial::{Connector, DialError};

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
}

impl QuicCarrierConfig {
    /// Defaults: no `--edge`, 10 s timeouts, bound to `[::]:0`.
    pub fn new(host: impl Into<String>, port: u16, verify: AgentVerify, token: Token) -> Self {
        Self {
            host: host.into(),
            edge: None,
            port,
            verify,
            token,
            connect_timeout: Duration::from_secs(10),
            bind: SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
        }
    }
}

/// The quinn client configuration for `verify`: TLS 1.3, ALPN forward-mux/1, ring, no 0-RTT
/// (replayable), the WAN transport settings. For tools that speak to an agent directly.
pub fn client_config(verify: &AgentVerify) -> Result<quinn::ClientConfig, QuicError> {
    Ok(build_client_config(verify)?.0)
}

type SeenPin = Option<Arc<Mutex<Option<String>>>>;

fn build_client_config(verify: &AgentVerify) -> Result<(quinn::ClientConfig, SeenPin), QuicError> {
    let provider = crate::tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Tls(e.to_string()))?;
    let (mut tls, seen) = match verify {
        AgentVerify::CaFile(ca) => (
            builder
                .with_root_certificates(crate::tls::root_store(ca.as_deref())?)
                .with_no_client_auth(),
            None,
        ),
        AgentVerify::Pin(pin) => {
            let v = PinVerifier::new(*pin, provider);
            let seen = v.seen.clone();
            (
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(v))
                    .with_no_client_auth(),
                Some(seen),
            )
        }
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(false));
    Ok((config, seen))
}

#[derive(Default)]
struct State {
    /// The connection and its "agent is going away" flag.
    conn: Option<(quinn::Connection, Arc<AtomicBool>)>,
    failures: u32,
    retry_at: Option<Instant>,
}

/// One QUIC connection to one agent, shared by every connector to it.
pub struct QuicCarrier {
    host: String,
    edge: Option<String>,
    port: u16,
    token: Token,
    connect_timeout: Duration,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    seen_pin: SeenPin,
    state: tokio::sync::Mutex<State>,
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
        let (client, seen_pin) = build_client_config(&config.verify)?;
        let socket = match udp_socket(config.bind) {
            // A host without IPv6 cannot bind [::]; IPv4 alone still reaches IPv4 agents.
            Err(_) if config.bind == SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0) => {
                udp_socket(SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0))?
            }
            other => other?,
        };
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        Ok(Arc::new(Self {
            host: config.host,
            edge: config.edge,
            port: config.port,
            token: config.token,
            connect_timeout: config.connect_timeout,
            endpoint,
            client,
            seen_pin,
            state: tokio::sync::Mutex::default(),
        }))
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

    /// Closes the connection (streams still open are cut) and waits briefly for the agent to
    /// hear of it.
    pub async fn close(&self) {
        if let Some((c, _)) = self.state.lock().await.conn.take() {
            c.close(quinn::VarInt::from_u32(close::NORMAL), b"client closing");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    /// The live, authenticated connection: the current one, or a new one after the backoff
    /// that previous failures earned. Callers queue here while a reconnect runs.
    pub async fn connection(&self) -> Result<quinn::Connection, QuicError> {
        self.live().await.map(|(c, _)| c)
    }

    async fn live(&self) -> Result<(quinn::Connection, Arc<AtomicBool>), QuicError> {
        let mut st = self.state.lock().await;
        if let Some((c, away)) = &st.conn {
            match c.close_reason() {
                None if !away.load(Ordering::Relaxed) => return Ok((c.clone(), away.clone())),
                // Left to its open streams; it closes when the last handle goes.
                None => {
                    tracing::info!(agent = %self.describe(), "agent is shutting down; new streams go to a new connection");
                    st.conn = None;
                }
                Some(why) => {
                    tracing::info!(agent = %self.describe(), reason = %why, "QUIC connection lost; reconnecting");
                    st.conn = None;
                }
            }
        }
        if let Some(at) = st.retry_at {
            tokio::time::sleep_until(at).await;
        }
        match self.establish().await {
            Ok(c) => {
                st.failures = 0;
                st.retry_at = None;
                let live = (c, Arc::new(AtomicBool::new(false)));
                st.conn = Some(live.clone());
                Ok(live)
            }
            Err(e) => {
                st.failures = st.failures.saturating_add(1);
                let wait = jittered(st.failures);
                st.retry_at = Some(Instant::now() + wait);
                tracing::debug!(error = %e, retry_in = ?wait, "QUIC connect failed");
                Err(e)
            }
        }
    }

    /// Opens a stream to `host:port` on the agent's side, writing the target header at once.
    pub async fn open(&self, host: &str, port: u16) -> Result<QuicStream, QuicError> {
        let header = encode_target(host, port)?;
        let shown: Arc<str> = format_target(host, port).into();
        self.open_with(&header, shown).await
    }

    async fn open_with(&self, header: &[u8], shown: Arc<str>) -> Result<QuicStream, QuicError> {
        let mut retried = false;
        loop {
            let (conn, away) = self.live().await?;
            let attempt = async {
                let (mut send, recv) = conn.open_bi().await?;
                send.write_all(header).await.map_err(|e| match e {
                    quinn::WriteError::ConnectionLost(c) => c,
                    _ => quinn::ConnectionError::LocallyClosed,
                })?;
                Ok::<_, quinn::ConnectionError>(
                    QuicStream::new(send, recv, "agent", shown.clone()).with_going_away(away),
                )
            };
            match attempt.await {
                Ok(s) => return Ok(s),
                // The connection died under us (agent restarted, path gone): one fresh try.
                Err(_) if !retried => retried = true,
                Err(e) => return Err(self.conn_error(e.to_string())),
            }
        }
    }

    fn conn_error(&self, reason: String) -> QuicError {
        QuicError::Connection {
            host: self.host.clone(),
            port: self.port,
            reason,
        }
    }

    async fn establish(&self) -> Result<quinn::Connection, QuicError> {
        let dial = self.edge.as_deref().unwrap_or(&self.host);
        let addrs = crate::dial::resolve(&self.host, self.edge.as_deref(), self.port).await?;
        let ipv6_socket = self.endpoint.local_addr()?.is_ipv6();
        let mut last = None;
        for addr in addrs {
            // A socket bound to an IPv4 address cannot send to an IPv6 one.
            if addr.is_ipv6() && !ipv6_socket {
                continue;
            }
            match self.handshake(addr).await {
                Ok(conn) => {
                    self.authenticate(&conn, addr).await?;
                    tracing::info!(agent = %self.describe(), %addr, "QUIC connection authenticated");
                    return Ok(conn);
                }
                // Retrying another address cannot fix a certificate or protocol problem.
                Err(
                    e @ (QuicError::PinMismatch { .. }
                    | QuicError::Untrusted { .. }
                    | QuicError::WrongAlpn { .. }),
                ) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        // Every address was of a family this socket cannot reach.
        Err(
            last.unwrap_or(QuicError::Resolve(crate::dial::DialError::NoAddress {
                host: dial.to_owned(),
            })),
        )
    }

    async fn handshake(&self, addr: SocketAddr) -> Result<quinn::Connection, QuicError> {
        if let Some(seen) = &self.seen_pin {
            if let Ok(mut s) = seen.lock() {
                *s = None;
            }
        }
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), addr, &self.host)
            .map_err(|e| self.conn_error(format!("cannot start a connection to {addr}: {e}")))?;
        let conn = match tokio::time::timeout(self.connect_timeout, connecting).await {
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
        let seen = self
            .seen_pin
            .as_ref()
            .and_then(|s| s.lock().ok().and_then(|mut s| s.take()));
        if let Some(got) = seen {
            return QuicError::PinMismatch { got };
        }
        // TLS alert 120: no_application_protocol.
        let no_alpn = quinn::TransportErrorCode::crypto(120);
        match &e {
            C::ConnectionClosed(c) if c.error_code == no_alpn => QuicError::WrongAlpn {
                host: self.host.clone(),
                port: self.port,
            },
            C::TransportError(t) if t.code == no_alpn => QuicError::WrongAlpn {
                host: self.host.clone(),
                port: self.port,
            },
            // A crypto error raised here is our verifier refusing the certificate.
            C::TransportError(t) if (0x100..0x200).contains(&u64::from(t.code)) => {
                QuicError::Untrusted {
                    host: self.host.clone(),
                    reason: t.reason.clone(),
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
        let closed_for_auth = matches!(
            conn.close_reason(),
            Some(quinn::ConnectionError::ApplicationClosed(ref a))
                if a.error_code == quinn::VarInt::from_u32(close::AUTH_FAILED)
        );
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

fn format_target(host: &str, port: u16) -> String {
    match host {
        "" => format!("localhost:{port}"),
        h if h.contains(':') && !h.starts_with('[') => format!("[{h}]:{port}"),
        h => format!("{h}:{port}"),
    }
}

fn is_vm_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.is_empty()
        || h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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
        let shown = format_target(target_host, target_port);
        let describe = if is_vm_loopback(target_host) {
            let host = carrier.describe();
            let host = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
            format!("{host}:{target_port} (agent quic)")
        } else {
            format!("{shown} via {} (agent quic)", carrier.describe())
        };
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

    async fn check(&self) -> Result<(), DialError> {
        self.carrier
            .check()
            .await
            .map_err(|e| DialError::Agent(e.to_string()))
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}
