//! Dialers: how one local connection reaches its remote end.
//!
//! A [`Connector`] is bound to one forward (one target) and opens one remote stream per call.
//! [`DirectConnector`] is direct mode: TCP to the edge (or `--edge`), then TLS with SNI = the
//! host name, verified. The agent carriers implement the same trait elsewhere.

use std::collections::HashMap;
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
    #[error("cannot resolve {host}: {cause}; {hint}")]
    Resolve {
        /// The name that failed.
        host: String,
        /// What to check: the VM id and domain, or the `--edge` given.
        hint: &'static str,
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
    #[error("cannot connect to {host} at {addr}: {cause}{}", crate::limits::out_of_files_suffix(.cause, "; "))]
    Connect {
        /// The name being reached.
        host: String,
        /// The address tried last.
        addr: SocketAddr,
        /// What the OS said.
        cause: io::Error,
    },
    /// Several addresses, and none answered: what each one said.
    #[error("cannot connect to {host} at any of its addresses: {tried}")]
    AllAddresses {
        /// The name being reached.
        host: String,
        /// Every address tried and its failure, `; `-separated.
        tried: String,
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
    #[error("'{0}' is not a valid TLS server name (labels of letters, digits and '-', at most 253 bytes, not ending in a number); check the VM id and --domain")]
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
    /// Whether a local connection for this connector may be handed to another thread before it
    /// carries a byte ([`crate::spare`]): true only when its remote stream needs nothing of the
    /// accepting thread's tasks. The default keeps it where it was accepted.
    fn movable(&self) -> bool {
        false
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

/// A connection of ours to the edge or an agent whose sent bytes stay unacknowledged this long
/// is reset (TCP_USER_TIMEOUT): a path that died silently under a direct connection (or
/// `forward stdio`) otherwise lingered for the kernel's ~15 minutes of retransmissions, and a
/// quiet one for 2 minutes of keepalives. The same 45 s as a silent agent carrier; a suspended
/// laptop's clock stands still, so sleeping does not count.
pub const PATH_DEAD_AFTER: Duration = Duration::from_secs(45);

/// Applies [`PATH_DEAD_AFTER`] where the kernel offers it (TCP_USER_TIMEOUT: Linux). macOS and
/// the BSDs have no such option in socket2; there a dead path under a direct connection lasts
/// the kernel's own retransmission limit, while agent carriers still end at their 45 s of
/// silence (the mux's keepalive, in user space).
#[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
pub(crate) fn give_up_on_dead_path(stream: &TcpStream) -> io::Result<()> {
    SockRef::from(stream).set_tcp_user_timeout(Some(PATH_DEAD_AFTER))
}

#[cfg(not(any(target_os = "android", target_os = "fuchsia", target_os = "linux")))]
pub(crate) fn give_up_on_dead_path(_stream: &TcpStream) -> io::Result<()> {
    Ok(())
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
/// (IPv6 literals may be bracketed). Shared by the TCP dialers and the QUIC carrier. The
/// address that answered last time ([`remember_answer`]) comes first: with a dead IPv6
/// address, only the first connection to a name pays the [`race`]'s attempt delay.
pub async fn resolve(
    host: &str,
    edge: Option<&str>,
    port: u16,
) -> Result<Vec<SocketAddr>, DialError> {
    let dial_host = edge.unwrap_or(host);
    let lookup = dial_host.trim_start_matches('[').trim_end_matches(']');
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((lookup, port))
        .await
        .map_err(|cause| DialError::Resolve {
            host: dial_host.to_owned(),
            hint: if edge.is_some() {
                "check the --edge address (or FORWARD_EDGE)"
            } else {
                "check the VM id and --domain, or pass --edge ADDR"
            },
            cause,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(DialError::NoAddress {
            host: dial_host.to_owned(),
        });
    }
    answered_first(dial_host, port, &mut addrs);
    Ok(addrs)
}

/// Moves the address of `name` and `port` that answered last (see [`remember_answer`]) to the
/// front of `addrs`, the others keeping their order.
pub fn answered_first(name: &str, port: u16, addrs: &mut [SocketAddr]) {
    if addrs.len() > 1 {
        let answered = lock_answers().get(&(name.to_owned(), port)).copied();
        if let Some(i) = answered.and_then(|w| addrs.iter().position(|a| *a == w)) {
            addrs[..=i].rotate_right(1);
        }
    }
}

/// Records that `addr`, one of several [`resolve`] gave for this name and port, answered.
pub fn remember_answer(host: &str, edge: Option<&str>, port: u16, addr: SocketAddr) {
    lock_answers().insert((edge.unwrap_or(host).to_owned(), port), addr);
}

/// The address of each (dialled name, port) that answered last.
fn lock_answers() -> std::sync::MutexGuard<'static, HashMap<(String, u16), SocketAddr>> {
    static ANSWERS: std::sync::OnceLock<std::sync::Mutex<HashMap<(String, u16), SocketAddr>>> =
        std::sync::OnceLock::new();
    ANSWERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// How long an attempt on one address runs alone before the next address is tried beside it
/// (RFC 8305's "Connection Attempt Delay"): a name whose IPv6 address is dead (a broken tunnel,
/// hotel Wi-Fi) costs 250 ms, not the whole connect timeout, on every connection.
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// The order to try addresses in: the resolver's first, then alternating address families
/// (RFC 8305 §4), so one dead family is not tried over and over before the other.
pub fn interleave(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return Vec::new();
    };
    let (mut same, mut other): (std::collections::VecDeque<_>, std::collections::VecDeque<_>) =
        addrs.iter().partition(|a| a.is_ipv6() == first.is_ipv6());
    let mut out = Vec::with_capacity(addrs.len());
    loop {
        match (same.pop_front(), other.pop_front()) {
            (None, None) => return out,
            (a, b) => out.extend(a.into_iter().chain(b).copied()),
        }
    }
}

/// Happy Eyeballs, simplified: attempts on `addrs` (in [`interleave`] order) start
/// [`ATTEMPT_DELAY`] apart, or at once when the one before fails; the first success wins and
/// the others are dropped. An error `fatal` says no other address can fix ends the race.
/// Otherwise every address's error comes back, in the order tried.
pub async fn race<T, E, Fut>(
    addrs: &[SocketAddr],
    mut attempt: impl FnMut(SocketAddr) -> Fut,
    fatal: impl Fn(&E) -> bool,
) -> Result<T, Vec<(SocketAddr, E)>>
where
    Fut: Future<Output = Result<T, E>>,
{
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let order = interleave(addrs);
    let mut running = FuturesUnordered::new();
    let mut next = 0;
    let mut failed = Vec::new();
    loop {
        // Every turn of the loop follows a start, a failure or the delay: each starts the next.
        if let Some(&addr) = order.get(next) {
            let f = attempt(addr);
            running.push(async move { (addr, f.await) });
            next += 1;
        }
        let more = next < order.len();
        let stagger = async {
            if more {
                tokio::time::sleep(ATTEMPT_DELAY).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            done = running.next() => match done {
                Some((_, Ok(t))) => return Ok(t),
                Some((addr, Err(e))) => {
                    let stop = fatal(&e);
                    failed.push((addr, e));
                    if stop || (running.is_empty() && !more) {
                        return Err(failed);
                    }
                }
                None => return Err(failed),
            },
            _ = stagger => {}
        }
    }
}

/// Resolves `host` (or the `--edge` override) and connects to the first address that answers,
/// racing them ([`race`]). `timeout` bounds each attempt.
pub async fn connect_tcp(
    host: &str,
    edge: Option<&str>,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, DialError> {
    let addrs = resolve(host, edge, port).await?;
    let stream = connect_addrs(host, &addrs, timeout).await?;
    if addrs.len() > 1 {
        if let Ok(peer) = stream.peer_addr() {
            remember_answer(host, edge, port, peer);
        }
    }
    Ok(stream)
}

/// A listener at `addr` that never answers a connect, as a firewall that drops would: its accept
/// queue is full, and Linux leaves the SYNs of a full queue unanswered. The connections that
/// filled it come back too: the queue stays full only while they live.
#[cfg(test)]
pub(crate) async fn silent_listener(
    addr: SocketAddr,
) -> io::Result<(tokio::net::TcpListener, Vec<TcpStream>)> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    socket.bind(addr)?;
    let listener = socket.listen(1)?;
    let addr = listener.local_addr()?;
    let mut fillers = Vec::new();
    // A refusal or endless room would make a test about silence pass for the wrong reason.
    while fillers.len() < 64 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            Ok(Err(e)) => panic!("filling the accept queue of {addr}: {e}"),
            Err(_) => return Ok((listener, fillers)),
        }
    }
    panic!("the accept queue of {addr} never filled")
}

/// [`connect_tcp`] after the lookup; `host` names the remote end in errors.
pub(crate) async fn connect_addrs(
    host: &str,
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<TcpStream, DialError> {
    let attempt = |addr: SocketAddr| async move {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(cause)) => Err(DialError::Connect {
                host: host.to_owned(),
                addr,
                cause,
            }),
            Err(_) => Err(DialError::Timeout {
                host: host.to_owned(),
                addr,
                after: timeout,
            }),
        }
    };
    match race(addrs, attempt, |_| false).await {
        Ok(stream) => {
            let tuned = tune_tcp(&stream).and_then(|()| give_up_on_dead_path(&stream));
            if let Err(e) = tuned {
                tracing::debug!(error = %e, "could not tune TCP socket");
            }
            Ok(stream)
        }
        Err(mut failed) if failed.len() == 1 => Err(failed.remove(0).1),
        Err(failed) => Err(DialError::AllAddresses {
            host: host.to_owned(),
            tried: each_address(&failed, |e| match e {
                DialError::Connect { cause, .. } => format!(": {cause}"),
                DialError::Timeout { after, .. } => format!(" timed out after {after:?}"),
                other => format!(": {other}"),
            }),
        }),
    }
}

/// What every address of a lost [`race`] said, `; `-separated, each after its address.
pub(crate) fn each_address<E>(failed: &[(SocketAddr, E)], said: impl Fn(&E) -> String) -> String {
    failed
        .iter()
        .map(|(addr, e)| format!("{addr}{}", said(e)))
        .collect::<Vec<_>>()
        .join("; ")
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

    fn movable(&self) -> bool {
        // Its own TCP + TLS connection, resolved and dialled on whatever thread runs it; the
        // shared TLS config and the answers cache are thread-safe.
        true
    }
}

/// How long a direct `--check` listens after the handshake for the edge to hang up: twice the
/// time the TCP and TLS handshakes took, within these bounds.
const CHECK_LISTEN_MIN: Duration = Duration::from_millis(250);
const CHECK_LISTEN_MAX: Duration = Duration::from_secs(3);

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_connect_out_of_descriptors_says_to_raise_the_limit() {
        let connect = |cause| DialError::Connect {
            host: "vm1.vm.vers.sh".into(),
            addr: a("127.0.0.1:443"),
            cause,
        };
        let emfile = io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        let text = connect(emfile).to_string();
        assert!(
            text.starts_with("cannot connect to vm1.vm.vers.sh at 127.0.0.1:443: ")
                && text.contains("open-file limit")
                && text.contains("ulimit -n"),
            "{text}"
        );
        let refused = connect(io::ErrorKind::ConnectionRefused.into()).to_string();
        assert_eq!(
            refused,
            "cannot connect to vm1.vm.vers.sh at 127.0.0.1:443: connection refused"
        );
    }

    #[test]
    fn addresses_alternate_families_starting_with_the_resolvers_first() {
        let got = interleave(&[a("[::1]:1"), a("[::2]:1"), a("10.0.0.1:1"), a("10.0.0.2:1")]);
        assert_eq!(
            got,
            [a("[::1]:1"), a("10.0.0.1:1"), a("[::2]:1"), a("10.0.0.2:1")]
        );
        let got = interleave(&[a("10.0.0.1:1"), a("[::1]:1"), a("[::2]:1")]);
        assert_eq!(got, [a("10.0.0.1:1"), a("[::1]:1"), a("[::2]:1")]);
    }

    /// What each address does in a simulated race: answer after a delay, or fail after one.
    fn behave(
        script: &'static [(&'static str, u64, bool)],
    ) -> impl FnMut(SocketAddr) -> std::pin::Pin<Box<dyn Future<Output = Result<SocketAddr, String>>>>
    {
        move |addr| {
            let (_, ms, ok) = *script
                .iter()
                .find(|(s, _, _)| a(s) == addr)
                .expect("scripted address");
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                if ok {
                    Ok(addr)
                } else {
                    Err(format!("{addr} failed"))
                }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_first_address_costs_one_attempt_delay_not_its_timeout() {
        const SCRIPT: &[(&str, u64, bool)] =
            &[("[::1]:1", 10_000, false), ("10.0.0.1:1", 20, true)];
        let t0 = tokio::time::Instant::now();
        let won = race(&[a("[::1]:1"), a("10.0.0.1:1")], behave(SCRIPT), |_| false).await;
        assert_eq!(won, Ok(a("10.0.0.1:1")));
        assert_eq!(t0.elapsed(), ATTEMPT_DELAY + Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_starts_the_next_address_at_once_and_all_failures_are_reported() {
        const SCRIPT: &[(&str, u64, bool)] = &[
            ("[::1]:1", 5, false),
            ("10.0.0.1:1", 5, false),
            ("[::2]:1", 5, false),
        ];
        let t0 = tokio::time::Instant::now();
        let addrs = [a("[::1]:1"), a("[::2]:1"), a("10.0.0.1:1")];
        let failed = race(&addrs, behave(SCRIPT), |_| false).await.unwrap_err();
        let order: Vec<_> = failed.iter().map(|(addr, _)| *addr).collect();
        assert_eq!(order, [a("[::1]:1"), a("10.0.0.1:1"), a("[::2]:1")]);
        assert_eq!(t0.elapsed(), Duration::from_millis(15));
    }

    #[tokio::test]
    async fn a_dead_address_first_does_not_hold_up_a_live_one_over_real_sockets() {
        let (dead, _fillers) = silent_listener(a("127.0.0.1:0")).await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        let live = tokio::net::TcpListener::bind(a("[::1]:0")).await.unwrap();
        let live_addr = live.local_addr().unwrap();
        // With the dead address tried alone first, this took the whole 60 s timeout.
        let s = tokio::time::timeout(
            Duration::from_secs(20),
            connect_addrs("test", &[dead_addr, live_addr], Duration::from_secs(60)),
        )
        .await
        .expect("the live address was not tried beside the dead one")
        .unwrap();
        assert_eq!(s.peer_addr().unwrap(), live_addr);

        // Both dead: one error that names each address and what it said.
        drop(live);
        let e = connect_addrs("test", &[dead_addr, live_addr], Duration::from_millis(500))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{dead_addr} timed out after 500ms"))
                && e.contains(&format!("{live_addr}: Connection refused")),
            "{e}"
        );
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn connections_to_the_edge_give_up_on_a_dead_path_after_45_s() {
        let l = tokio::net::TcpListener::bind(a("127.0.0.1:0"))
            .await
            .unwrap();
        let port = l.local_addr().unwrap().port();
        let s = connect_tcp("127.0.0.1", None, port, Duration::from_secs(5))
            .await
            .unwrap();
        let sock = SockRef::from(&s);
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(PATH_DEAD_AFTER));
        assert!(sock.tcp_nodelay().unwrap() && sock.keepalive().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fatal_error_ends_the_race_without_trying_the_rest() {
        const SCRIPT: &[(&str, u64, bool)] = &[("[::1]:1", 5, false), ("10.0.0.1:1", 5, true)];
        let failed = race(&[a("[::1]:1"), a("10.0.0.1:1")], behave(SCRIPT), |_| true)
            .await
            .unwrap_err();
        assert_eq!(failed.len(), 1);
    }
}
