//! Dialers: how one local connection reaches its remote end.
//!
//! A [`Connector`] is bound to one forward (one target) and opens one remote stream per call.
//! [`DirectConnector`] is direct mode: TCP to the edge (or `--edge`), then TLS with SNI = the
//! host name, verified. The agent carriers implement the same trait elsewhere.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::readahead::ReadAhead;
use crate::relay::Endpoint;
use crate::tls::describe_handshake_error;

/// A remote end named the way the user named it: a DNS name (the TLS name too) and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Remote {
    /// Host name, e.g. `abc.vm.vers.sh`.
    pub host: String,
    /// TCP port at that host.
    pub port: u16,
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a remote stream could not be opened. Each message names the host and hints at the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// DNS said no.
    #[error("cannot resolve {host}: {cause}; check the VM id and --domain, or pass --edge ADDR")]
    Resolve {
        /// The name that failed.
        host: String,
        /// Resolver error.
        cause: io::Error,
    },
    /// DNS answered with nothing usable.
    #[error("{host} resolved to no address")]
    NoAddress {
        /// The name that failed.
        host: String,
    },
    /// The TCP connection was refused or failed.
    #[error("cannot connect to {host} at {addr}: {cause}")]
    Connect {
        /// The name being reached.
        host: String,
        /// The address tried last.
        addr: SocketAddr,
        /// What the OS said.
        cause: io::Error,
    },
    /// No TCP connection within the deadline.
    #[error("connecting to {host} at {addr} timed out after {after:?}")]
    Timeout {
        /// The name being reached.
        host: String,
        /// The address tried last.
        addr: SocketAddr,
        /// The deadline.
        after: Duration,
    },
    /// The TLS handshake failed; the message is already worded for a user.
    #[error("{0}")]
    Tls(String),
    /// The host is not a valid TLS server name.
    #[error("'{0}' is not a valid TLS server name")]
    BadName(String),
    /// Failure reported by an agent carrier (auth, refusal, carrier loss).
    #[error("{0}")]
    Agent(String),
}

/// Opens remote streams for one forward.
pub trait Connector: Send + Sync + 'static {
    /// The stream relayed to the local connection.
    type Stream: Endpoint + 'static;
    /// Opens one remote stream.
    fn connect(&self) -> impl Future<Output = Result<Self::Stream, DialError>> + Send;
    /// Proves the remote end works (TLS handshake, agent auth) without leaving a stream open.
    fn check(&self) -> impl Future<Output = Result<(), DialError>> + Send;
    /// What this connector reaches, for the `forwarding A -> B (mode)` line.
    fn describe(&self) -> String;
    /// A hint for a remote stream that failed before a single byte came back: what the user
    /// should look at. `None` when the failure already says it.
    fn hint_no_answer(&self) -> Option<String> {
        None
    }
}

/// What an edge that hangs up on a fresh connection most likely means: the VM port has no
/// listener the edge can reach (it dials the VM over IPv6).
fn no_listener_hint(port: u16) -> String {
    format!(
        "is a service listening on port {port} of the VM, on :: (IPv6)? The edge cannot reach \
         one bound only to 0.0.0.0"
    )
}

/// Socket options every TCP connection of ours gets.
pub fn tune_tcp(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    SockRef::from(stream).set_tcp_keepalive(&keepalive)?;
    Ok(())
}

/// Resolves the name a connection dials: the `--edge` override when given, else `host`
/// (IPv6 literals may be bracketed). Shared by the TCP dialers and the QUIC carrier.
pub async fn resolve(
    host: &str,
    edge: Option<&str>,
    port: u16,
) -> Result<Vec<SocketAddr>, DialError> {
    let dial_host = edge.unwrap_or(host);
    let lookup = dial_host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((lookup, port))
        .await
        .map_err(|cause| DialError::Resolve {
            host: dial_host.to_owned(),
            cause,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(DialError::NoAddress {
            host: dial_host.to_owned(),
        });
    }
    Ok(addrs)
}

/// Resolves `host` (or the `--edge` override) and connects to the first address that answers.
pub async fn connect_tcp(
    host: &str,
    edge: Option<&str>,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, DialError> {
    let addrs = resolve(host, edge, port).await?;
    let mut last = None;
    for addr in &addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                if let Err(e) = tune_tcp(&stream) {
                    tracing::debug!(error = %e, "could not tune TCP socket");
                }
                return Ok(stream);
            }
            Ok(Err(cause)) => {
                last = Some(DialError::Connect {
                    host: host.to_owned(),
                    addr: *addr,
                    cause,
                })
            }
            Err(_) => {
                last = Some(DialError::Timeout {
                    host: host.to_owned(),
                    addr: *addr,
                    after: timeout,
                })
            }
        }
    }
    Err(last.unwrap_or(DialError::NoAddress {
        host: edge.unwrap_or(host).to_owned(),
    }))
}

/// Ciphertext rustls may queue before a write waits for the socket. rustls' default, 64 KiB,
/// makes four `writev`s of the relay's 256 KiB batch; one is enough. The memory is used only
/// while a batch is queued.
pub const TLS_WRITE_AHEAD: usize = 256 * 1024;

/// Direct mode: one TCP + TLS connection to the edge per local connection.
#[derive(Clone)]
pub struct DirectConnector {
    remote: Remote,
    name: ServerName<'static>,
    edge: Option<String>,
    tls: TlsConnector,
    timeout: Duration,
}

impl DirectConnector {
    /// `config` should be shared by every connector of the process so sessions resume.
    pub fn new(
        remote: Remote,
        edge: Option<String>,
        config: Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> Result<Self, DialError> {
        let name = ServerName::try_from(remote.host.clone())
            .map_err(|_| DialError::BadName(remote.host.clone()))?;
        Ok(Self {
            remote,
            name,
            edge,
            tls: TlsConnector::from(config),
            timeout,
        })
    }

    /// The remote end this connector reaches.
    pub fn remote(&self) -> &Remote {
        &self.remote
    }

    async fn open(&self) -> Result<TlsStream<ReadAhead<TcpStream>>, DialError> {
        let tcp = connect_tcp(
            &self.remote.host,
            self.edge.as_deref(),
            self.remote.port,
            self.timeout,
        )
        .await?;
        tls_handshake(
            &self.tls,
            self.name.clone(),
            &self.remote.host,
            tcp,
            self.timeout,
        )
        .await
    }
}

/// TLS over `tcp` to `host` (SNI `name`), with the read-ahead underneath and room for a whole
/// relay batch of ciphertext: the one client handshake of direct mode and the agent carrier.
pub async fn tls_handshake(
    tls: &TlsConnector,
    name: ServerName<'static>,
    host: &str,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<TlsStream<ReadAhead<TcpStream>>, DialError> {
    match tokio::time::timeout(timeout, tls.connect(name, ReadAhead::new(tcp))).await {
        Ok(Ok(mut stream)) => {
            stream.get_mut().1.set_buffer_limit(Some(TLS_WRITE_AHEAD));
            Ok(stream)
        }
        Ok(Err(e)) => Err(DialError::Tls(describe_handshake_error(host, &e))),
        Err(_) => Err(DialError::Tls(format!(
            "TLS handshake with {host} timed out after {timeout:?}"
        ))),
    }
}

impl Connector for DirectConnector {
    type Stream = TlsStream<ReadAhead<TcpStream>>;

    fn connect(&self) -> impl Future<Output = Result<Self::Stream, DialError>> + Send {
        self.open()
    }

    async fn check(&self) -> Result<(), DialError> {
        let started = std::time::Instant::now();
        let mut tls = self.open().await?;
        // The edge dials the VM only after the handshake and hangs up when that fails, so a
        // handshake alone passes for a port with nothing behind it. Listen a little: a hang-up
        // within about one more round trip is the answer; silence (a server that waits for its
        // client) or bytes (one that speaks first) mean the port answered.
        let wait = (started.elapsed() * 2).clamp(CHECK_LISTEN_MIN, CHECK_LISTEN_MAX);
        let mut byte = [0u8; 1];
        let heard = tokio::time::timeout(wait, tokio::io::AsyncReadExt::read(&mut tls, &mut byte));
        if let Ok(Ok(0) | Err(_)) = heard.await {
            return Err(DialError::Tls(format!(
                "{} accepted TLS, then closed the connection before any reply: {}",
                self.remote.host,
                no_listener_hint(self.remote.port)
            )));
        }
        // Close politely so the edge sees close_notify, not a truncation.
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("{} (direct)", self.remote)
    }

    fn hint_no_answer(&self) -> Option<String> {
        Some(no_listener_hint(self.remote.port))
    }
}

/// How long a direct `--check` listens after the handshake for the edge to hang up: twice the
/// time the TCP and TLS handshakes took, within these bounds.
const CHECK_LISTEN_MIN: Duration = Duration::from_millis(250);
const CHECK_LISTEN_MAX: Duration = Duration::from_secs(3);
